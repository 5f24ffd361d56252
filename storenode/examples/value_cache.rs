//! What the value cache saves per read, below gRPC: `Engine::get_record` on a zipfian key
//! stream, with the cache off and on (docs/bench/value-cache.md).
//!
//!     cargo run --release -p skv-storenode --example value_cache -- [KEYS] [VALUE_BYTES] [READS]
//!
//! Loads KEYS records into a fresh engine in a temporary directory, flushes them to disk
//! tables (so reads go through fjall's block cache, 32 MiB by default, not its memtable),
//! then times READS zipfian (theta 0.99) reads on one thread, after as many unmeasured reads
//! to warm both caches.

use skv_storenode::engine::{Engine, encode_value};
use skv_storenode::metrics::Metrics;
use std::time::Instant;

fn arg(i: usize, default: u64) -> u64 {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Key ranks drawn from a zipfian distribution over `n` keys (inverse CDF, binary search).
struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    fn new(n: usize, theta: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for i in 1..=n {
            sum += 1.0 / (i as f64).powf(theta);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf, state: 42 }
    }

    fn next(&mut self) -> usize {
        // xorshift64*: reproducible, no dependency
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let u = (self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

fn key(rank: usize, n: usize) -> Vec<u8> {
    // Spread hot ranks over the key space, as skv-bench does.
    let scrambled = (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) % n as u64;
    format!("bench/{scrambled:010}").into_bytes()
}

fn run(engine: &Engine, keys: usize, reads: u64) -> anyhow::Result<(f64, u64)> {
    let mut z = Zipf::new(keys, 0.99);
    let mut found = 0u64;
    for _ in 0..reads {
        found += u64::from(engine.get_record(&key(z.next(), keys))?.is_some());
    }
    let mut z = Zipf::new(keys, 0.99);
    let t = Instant::now();
    for _ in 0..reads {
        found += u64::from(engine.get_record(&key(z.next(), keys))?.is_some());
    }
    Ok((t.elapsed().as_nanos() as f64 / reads as f64, found))
}

fn main() -> anyhow::Result<()> {
    let keys = arg(1, 400_000) as usize;
    let value_len = arg(2, 1024) as usize;
    let reads = arg(3, 1_000_000);
    let dir = tempfile::tempdir()?;
    let value = vec![7u8; value_len];
    {
        let engine = Engine::open_with(dir.path(), Metrics::new(), 0)?;
        for chunk in (0..keys).collect::<Vec<_>>().chunks(10_000) {
            let mut batch = engine.db.batch();
            for i in chunk {
                batch.insert(&engine.data, format!("bench/{i:010}"), encode_value(1, &value));
            }
            batch.commit()?;
        }
        engine.data.rotate_memtable_and_wait()?;
        engine.stop_syncer();
    }
    println!("{keys} keys of {value_len} bytes, {reads} zipfian reads (theta 0.99) on one thread");
    for (label, cache) in [
        ("off", 0u64),
        ("on (256 MiB)", 256 << 20),
        ("off", 0),
        ("on (256 MiB)", 256 << 20),
    ] {
        let metrics = Metrics::new();
        let engine = Engine::open_with(dir.path(), metrics.clone(), cache)?;
        let (ns, found) = run(&engine, keys, reads)?;
        let hits = metrics.value_cache_hits.get();
        let misses = metrics.value_cache_misses.get();
        let ratio = if hits + misses > 0 {
            hits as f64 / (hits + misses) as f64 * 100.0
        } else {
            0.0
        };
        println!("cache {label:<13} {ns:>8.0} ns/read  found {found}  hit ratio (warm-up included) {ratio:.1}%");
        engine.stop_syncer();
    }
    Ok(())
}
