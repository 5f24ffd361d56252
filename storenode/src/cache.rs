//! The value cache: hot records of the `data` keyspace in memory (foyer, DESIGN.md §5).
//!
//! One cache per node, in front of the shared engine, keyed by the stored key. A cached
//! record is what the engine holds *now* for that key (a live value, a tombstone, or
//! nothing), so a cache hit answers exactly what an engine read would have. That holds
//! because every change of the `data` keyspace goes through one of two doors:
//!
//! - **apply** ([`ValueCache::publish`]): after the batch commit and before the applied
//!   index is published (so a read that waited for that index sees the new record), each
//!   written key's new record is put in the cache;
//! - **bulk changes** (snapshot install, replica uninitialize, replica GC,
//!   [`ValueCache::invalidate`]): after each commit, every touched key is dropped.
//!
//! A read that misses fills the cache from the engine. To keep such a fill from putting
//! back a record older than a concurrent publish or invalidation, keys are striped, each
//! stripe has a generation bumped under its lock by every publish and invalidation, and a
//! fill inserts only when the generation it saw before its engine read is still current.
//!
//! Leaders and followers apply the same log, so the cache of a replica that becomes leader
//! is already right; nothing is flushed on leadership changes.

use crate::engine::Record;
use crate::metrics::Metrics;
use foyer::{Cache, CacheBuilder, LfuConfig};
use parking_lot::Mutex;

/// Default capacity (`--value-cache-bytes`): 8× fjall's default block cache, so that a
/// zipfian working set several times larger than the block cache is served from memory.
pub const DEFAULT_VALUE_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Per-entry overhead counted on top of the key and value bytes.
const ENTRY_OVERHEAD: usize = 64;
const STRIPES: usize = 4096;

/// What the engine holds for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    Absent,
    Record(Record),
}

impl Cached {
    fn weight(&self) -> usize {
        match self {
            Cached::Record(Record::Live { value, .. }) => value.len() + 8,
            _ => 8,
        }
    }

    pub fn into_record(self) -> Option<Record> {
        match self {
            Cached::Absent => None,
            Cached::Record(r) => Some(r),
        }
    }
}

impl From<Option<Record>> for Cached {
    fn from(r: Option<Record>) -> Self {
        match r {
            None => Cached::Absent,
            Some(r) => Cached::Record(r),
        }
    }
}

/// The generation a reader saw before its engine read (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct FillTicket {
    stripe: usize,
    generation: u64,
}

pub struct ValueCache {
    /// `None` when disabled (`--value-cache-bytes 0`).
    cache: Option<Cache<Vec<u8>, Cached>>,
    stripes: Box<[Mutex<u64>]>,
    metrics: Metrics,
}

fn stripe_of(key: &[u8]) -> usize {
    // FNV-1a (the snapshot checksum's): keys are short; this only spreads them over stripes.
    (crate::raft::state_machine::fnv1a(crate::raft::state_machine::FNV_OFFSET, key) as usize) % STRIPES
}

impl ValueCache {
    /// A cache of at most `capacity_bytes` (keys, values and overhead); 0 disables it.
    pub fn new(capacity_bytes: u64, metrics: Metrics) -> Self {
        let cache = (capacity_bytes > 0).then(|| {
            CacheBuilder::new(usize::try_from(capacity_bytes).unwrap_or(usize::MAX))
                .with_name("skv_value_cache")
                .with_shards(16)
                .with_eviction_config(LfuConfig::default())
                .with_weighter(|k: &Vec<u8>, v: &Cached| k.len() + v.weight() + ENTRY_OVERHEAD)
                .build()
        });
        metrics.value_cache_capacity_bytes.set(capacity_bytes as i64);
        Self {
            cache,
            stripes: (0..STRIPES).map(|_| Mutex::new(0)).collect(),
            metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The cached record of `key`, or a ticket to fill it after reading the engine.
    pub fn lookup(&self, key: &[u8]) -> Result<Cached, FillTicket> {
        let Some(c) = &self.cache else {
            // Disabled: nothing to fill, no stripe to look at.
            return Err(FillTicket {
                stripe: 0,
                generation: 0,
            });
        };
        if let Some(e) = c.get(key) {
            self.metrics.value_cache_hits.inc();
            return Ok(e.value().clone());
        }
        self.metrics.value_cache_misses.inc();
        let stripe = stripe_of(key);
        Err(FillTicket {
            stripe,
            generation: *self.stripes[stripe].lock(),
        })
    }

    /// Caches what a reader read from the engine after [`Self::lookup`] gave `ticket`,
    /// unless the key's stripe changed since (the record read may be stale).
    pub fn fill(&self, key: &[u8], ticket: FillTicket, value: Cached) {
        let Some(c) = &self.cache else { return };
        let g = self.stripes[ticket.stripe].lock();
        if *g == ticket.generation {
            c.insert(key.to_vec(), value);
        }
    }

    /// Records what apply just committed for `key` (call after the commit, before the
    /// applied index is published).
    pub fn publish(&self, key: Vec<u8>, value: Cached) {
        let Some(c) = &self.cache else { return };
        let mut g = self.stripes[stripe_of(&key)].lock();
        *g = g.wrapping_add(1);
        c.insert(key, value);
    }

    /// Drops `keys` after a bulk change of the engine committed.
    pub fn invalidate<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        let Some(c) = &self.cache else { return };
        for key in keys {
            let mut g = self.stripes[stripe_of(key)].lock();
            *g = g.wrapping_add(1);
            c.remove(key);
        }
    }

    /// Bytes held (as weighed).
    pub fn usage(&self) -> usize {
        self.cache.as_ref().map(|c| c.usage()).unwrap_or(0)
    }

    /// Sets the bytes-held gauge (sampled once per store heartbeat, not per operation).
    pub fn sample_usage(&self) {
        self.metrics.value_cache_bytes.set(self.usage() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(v: u64, b: &[u8]) -> Cached {
        Cached::Record(Record::Live {
            version: v,
            value: b.to_vec(),
        })
    }

    #[test]
    fn a_fill_that_raced_a_publish_is_dropped() {
        let c = ValueCache::new(1 << 20, Metrics::new());
        let t = c.lookup(b"k").unwrap_err();
        // apply commits and publishes version 2 while the reader holds version 1
        c.publish(b"k".to_vec(), live(2, b"new"));
        c.fill(b"k", t, live(1, b"old"));
        assert_eq!(c.lookup(b"k").ok(), Some(live(2, b"new")));
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_dropped() {
        let c = ValueCache::new(1 << 20, Metrics::new());
        let t = c.lookup(b"k").unwrap_err();
        c.invalidate([&b"k"[..]]);
        c.fill(b"k", t, live(1, b"old"));
        assert!(c.lookup(b"k").is_err());
        let t = c.lookup(b"k").unwrap_err();
        c.fill(b"k", t, Cached::Absent);
        assert_eq!(c.lookup(b"k").ok(), Some(Cached::Absent));
    }

    #[test]
    fn disabled_cache_never_hits() {
        let c = ValueCache::new(0, Metrics::new());
        assert!(!c.enabled());
        c.publish(b"k".to_vec(), live(1, b"v"));
        let t = c.lookup(b"k").unwrap_err();
        c.fill(b"k", t, live(1, b"v"));
        assert!(c.lookup(b"k").is_err());
    }

    #[test]
    fn capacity_bounds_the_bytes_held() {
        let c = ValueCache::new(64 * 1024, Metrics::new());
        for i in 0..10_000u32 {
            c.publish(i.to_be_bytes().to_vec(), live(1, &[0u8; 200]));
        }
        assert!(c.usage() <= 64 * 1024 + 512, "usage {}", c.usage());
        assert!(c.usage() > 0);
    }
}
