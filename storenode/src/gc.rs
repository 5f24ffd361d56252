//! Garbage collection of replicas this store no longer holds.
//!
//! A replica is destroyed when (a) placement names it stale in a store heartbeat AND the
//! descriptor placement sends proves it ([`verify_stale`]), or (b) a merge retired it (the
//! source of a merge: its Raft state goes, its data stays, it belongs to the target).
//! Applying a membership without this store is NOT enough: a store added back after a
//! removal replays that old removal from the log while the leader counts it as a member
//! again, and destroying it then would wipe a live member's log. Placement, for its part,
//! names no replica of a range stale while an operator on that range is in flight or
//! settling.
//!
//! Destroying is crash-safe and never races a live replica:
//! 1. the range is put in the node's GC set (no Raft message or CreateReplica may reopen it
//!    meanwhile) and its group is stopped (it serves nothing from then on: requests answer
//!    RangeNotFound);
//! 2. one fsynced batch writes a GC marker (`meta: gc/<range>`: the key span to clear and
//!    whether data goes) and a tombstone (`meta: tomb/<range>`: the epoch it had), and
//!    deletes its descriptor, so a restart never reopens it (it resumes the GC instead);
//! 3. in the background, its data keys are deleted in batches of [`GC_BATCH`] — only in
//!    the parts of its span that no live local replica covers, each part claimed like a
//!    snapshot install (`NodeInner::claim_install`), so no overlapping install can write
//!    there meanwhile — then its Raft state (log, vote, purge and commit ids), applied
//!    state and counters, and the GC marker last.
//!
//! The tombstone stays: a Raft message whose descriptor is not newer (conf_ver) than the
//! tombstone cannot recreate the peer; a CreateReplica with a newer conf_ver (the store is
//! added back) removes it.

use crate::engine::{applied_key, data_range, desc_key, io_err};
use crate::node::NodeInner;
use crate::stats::stats_key;
use prost::Message;
use serde::{Deserialize, Serialize};
use skv_common::keys::KeySpan;
use skv_common::{RangeId, StoreId};
use skv_proto::internal::{RangeDescriptor, StaleReplica};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Data keys deleted per engine batch.
pub const GC_BATCH: usize = 1024;

/// What is left to clear of a destroyed replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcMarker {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    /// False for a merge source: its keys belong to the target.
    pub delete_data: bool,
}

/// The epoch a destroyed replica had (refuses older messages that would recreate it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub conf_ver: u64,
    pub version: u64,
}

pub fn gc_key(range: RangeId) -> Vec<u8> {
    let mut k = b"gc/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn tomb_key(range: RangeId) -> Vec<u8> {
    let mut k = b"tomb/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

fn id_of(key: &[u8], prefix_len: usize) -> Option<RangeId> {
    let b = <[u8; 8]>::try_from(key.get(prefix_len..prefix_len + 8)?).ok()?;
    Some(RangeId(u64::from_be_bytes(b)))
}

/// Ranges whose GC is pending (markers in `meta`).
pub fn pending(engine: &crate::engine::Engine) -> io::Result<Vec<RangeId>> {
    let mut out = Vec::new();
    for g in engine.meta.prefix(b"gc/") {
        let k = g.key().map_err(io_err)?;
        if let Some(id) = id_of(&k, 3) {
            out.push(id);
        }
    }
    Ok(out)
}

pub fn load_tombstone(engine: &crate::engine::Engine, range: RangeId) -> io::Result<Option<Tombstone>> {
    Ok(engine
        .meta
        .get(tomb_key(range))
        .map_err(io_err)?
        .and_then(|v| postcard::from_bytes(&v).ok()))
}

/// Whether placement's `current` descriptor proves that `local` (this store's replica of
/// the stale range) was removed: the same range at a newer `conf_ver` without this store,
/// or (the range was retired by a merge) another range covering all of `local`'s keys at a
/// newer `version`. Anything else is refused: placement's copy may lag or be wrong.
pub fn verify_stale(store: StoreId, local: &RangeDescriptor, current: &RangeDescriptor) -> Result<(), String> {
    let le = local.epoch.unwrap_or_default();
    let ce = current.epoch.unwrap_or_default();
    if current.range_id == local.range_id {
        if current.replicas.iter().any(|r| r.store_id == store.0) {
            return Err("placement's descriptor still lists this store".into());
        }
        if ce.conf_ver <= le.conf_ver {
            return Err(format!(
                "placement's conf_ver {} is not newer than the local {}",
                ce.conf_ver, le.conf_ver
            ));
        }
        return Ok(());
    }
    let covers = current.start <= local.start
        && (current.end.is_empty() || (!local.end.is_empty() && local.end <= current.end && local.start < current.end));
    if !covers {
        return Err(format!(
            "range {} does not cover the local range {}",
            current.range_id, local.range_id
        ));
    }
    if ce.version <= le.version {
        return Err(format!(
            "range {}'s version {} is not newer than the local {}",
            current.range_id, ce.version, le.version
        ));
    }
    Ok(())
}

/// `[start, end)` minus the `covered` spans (empty end = +infinity), in key order.
pub fn uncovered(start: &[u8], end: &[u8], covered: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut spans: Vec<&(Vec<u8>, Vec<u8>)> = covered
        .iter()
        .filter(|(s, e)| KeySpan::new(s, e).overlaps(&KeySpan::new(start, end)))
        .collect();
    spans.sort();
    let mut out = Vec::new();
    let mut cur = start.to_vec();
    for (s, e) in spans {
        if s.as_slice() > cur.as_slice() {
            // A piece before this covered span (bounded by the end).
            let piece_end = if !end.is_empty() && end < s.as_slice() {
                end.to_vec()
            } else {
                s.clone()
            };
            if piece_end.as_slice() > cur.as_slice() {
                out.push((cur.clone(), piece_end));
            }
        }
        if e.is_empty() {
            return out;
        }
        if e.as_slice() > cur.as_slice() {
            cur = e.clone();
        }
        if !end.is_empty() && cur.as_slice() >= end {
            return out;
        }
    }
    if end.is_empty() || cur.as_slice() < end {
        out.push((cur, end.to_vec()));
    }
    out
}

impl NodeInner {
    /// Destroys local replica `id` (see the module doc). `delete_data` is false for a merge
    /// source. Idempotent; returns once the replica is stopped and its GC marker durable
    /// (the deletion itself runs in the background).
    pub async fn destroy_replica(self: &Arc<Self>, id: RangeId, delete_data: bool, reason: &str) -> io::Result<()> {
        if !self.begin_gc(id) {
            return Ok(());
        }
        // A disk or decode error is an error: treating it as "no descriptor" would write no
        // tombstone, and a stale message could then bring the replica back.
        let desc = match self.replica(id).map(|r| r.shared.desc()) {
            Some(d) => Some(d),
            None => match self.engine.meta.get(desc_key(id)) {
                Ok(v) => match v.map(|v| RangeDescriptor::decode(&v[..])).transpose() {
                    Ok(d) => d,
                    Err(e) => {
                        self.end_gc(id);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                },
                Err(e) => {
                    self.end_gc(id);
                    return Err(io_err(e));
                }
            },
        };
        tracing::info!(store_id = %self.store_id, range_id = %id, delete_data, reason, "destroying replica");
        self.stop_replica(id).await;
        let r = async {
            let mut batch = self.engine.db.batch();
            if let Some(d) = &desc {
                let marker = GcMarker {
                    start: d.start.clone(),
                    end: d.end.clone(),
                    delete_data,
                };
                batch.insert(
                    &self.engine.meta,
                    gc_key(id),
                    postcard::to_allocvec(&marker).map_err(io_err)?,
                );
                let e = d.epoch.unwrap_or_default();
                let tomb = Tombstone {
                    conf_ver: e.conf_ver,
                    version: e.version,
                };
                batch.insert(
                    &self.engine.meta,
                    tomb_key(id),
                    postcard::to_allocvec(&tomb).map_err(io_err)?,
                );
            } else {
                // Nothing stored: only Raft state (an uninitialized peer) to clear.
                let marker = GcMarker {
                    start: Vec::new(),
                    end: Vec::new(),
                    delete_data: false,
                };
                batch.insert(
                    &self.engine.meta,
                    gc_key(id),
                    postcard::to_allocvec(&marker).map_err(io_err)?,
                );
            }
            batch.remove(&self.engine.meta, desc_key(id));
            batch.commit().map_err(io_err)?;
            self.engine.sync().await
        }
        .await;
        if let Err(e) = r {
            self.end_gc(id);
            return Err(e);
        }
        self.metrics.replicas_destroyed.inc();
        let node = self.clone();
        tokio::spawn(async move { node.run_gc(id).await });
        Ok(())
    }

    /// Resumes the GC of every replica with a pending marker (start path, after the live
    /// replicas opened).
    pub fn resume_gc(self: &Arc<Self>) -> io::Result<()> {
        for id in pending(&self.engine)? {
            if self.begin_gc(id) {
                let node = self.clone();
                tokio::spawn(async move { node.run_gc(id).await });
            }
        }
        Ok(())
    }

    /// Deletes what the GC marker of `id` names, then the marker. Retries on claim
    /// conflicts (an overlapping install under way) and on engine errors.
    async fn run_gc(self: Arc<Self>, id: RangeId) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.gc_once(id).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(store_id = %self.store_id, range_id = %id, error = %e, "replica GC failed; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        self.end_gc(id);
    }

    /// One attempt; `Ok(false)` when a claim was refused (retry later).
    async fn gc_once(&self, id: RangeId) -> io::Result<bool> {
        let Some(v) = self.engine.meta.get(gc_key(id)).map_err(io_err)? else {
            return Ok(true);
        };
        let marker: Option<GcMarker> = match postcard::from_bytes(&v) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(store_id = %self.store_id, range_id = %id, error = %e, "GC marker does not decode: the replica's data is left in place");
                None
            }
        };
        if let Some(m) = marker.as_ref().filter(|m| m.delete_data) {
            let live = self.live_spans(id);
            for (start, end) in uncovered(&m.start, &m.end, &live) {
                // Claimed like a snapshot install: no overlapping install writes meanwhile,
                // and none can start while a live range overlaps (checked in the claim).
                let Ok(claim) = self.claim_install(id, &start, &end) else {
                    return Ok(false);
                };
                let engine = self.engine.clone();
                let (keys, bytes) = tokio::task::spawn_blocking(move || delete_span(&engine, &start, &end))
                    .await
                    .map_err(io_err)??;
                drop(claim);
                self.metrics.gc_keys_deleted.inc_by(keys);
                self.metrics.gc_bytes_deleted.inc_by(bytes);
            }
        }
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || delete_raft_state(&engine, id))
            .await
            .map_err(io_err)??;
        self.engine.sync().await?;
        tracing::info!(store_id = %self.store_id, range_id = %id, "replica garbage-collected");
        Ok(true)
    }

    /// Checks each stale replica placement named, and destroys the ones proven removed.
    pub async fn handle_stale(self: &Arc<Self>, stale: Vec<StaleReplica>) {
        for s in stale {
            let id = RangeId(s.range_id);
            let Some(r) = self.replica(id) else { continue };
            let Some(current) = s.current else {
                self.metrics.stale_refused.inc();
                continue;
            };
            if r.is_leader() {
                tracing::warn!(store_id = %self.store_id, range_id = %id, "placement names a replica stale that leads its range; ignored");
                self.metrics.stale_refused.inc();
                continue;
            }
            let local = r.shared.desc();
            // Retired by a merge while the local target lags: the target's own CommitMerge (or
            // its snapshot) retires this replica; destroying it first would drop keys the
            // target has not absorbed here yet.
            if current.range_id != local.range_id
                && let Some(t) = self.replica(RangeId(current.range_id))
                && t.shared.is_initialized()
                && !crate::merge::covers(&t.shared.desc(), &local)
            {
                tracing::info!(store_id = %self.store_id, range_id = %id, target = current.range_id, "merged source kept until the local target absorbs it");
                self.metrics.stale_refused.inc();
                continue;
            }
            match verify_stale(self.store_id, &local, &current) {
                Ok(()) => {
                    if let Err(e) = self.destroy_replica(id, true, "placement: removed").await {
                        tracing::warn!(store_id = %self.store_id, range_id = %id, error = %e, "cannot destroy replica");
                    }
                }
                Err(why) => {
                    tracing::info!(store_id = %self.store_id, range_id = %id, why, "stale replica not confirmed locally; kept");
                    self.metrics.stale_refused.inc();
                }
            }
        }
    }
}

/// Deletes the data records of `[start, end)` in batches; returns (keys, bytes) deleted.
fn delete_span(engine: &crate::engine::Engine, start: &[u8], end: &[u8]) -> io::Result<(u64, u64)> {
    let (mut keys, mut bytes) = (0u64, 0u64);
    loop {
        let mut batch = engine.db.batch();
        let mut touched: Vec<Vec<u8>> = Vec::new();
        for g in engine.data.range::<&[u8], _>(data_range(start, end)).take(GC_BATCH) {
            let (k, v) = g.into_inner().map_err(io_err)?;
            bytes += (k.len() + v.len()) as u64;
            touched.push(k.to_vec());
            batch.remove(&engine.data, k);
        }
        if touched.is_empty() {
            return Ok((keys, bytes));
        }
        keys += touched.len() as u64;
        batch.commit().map_err(io_err)?;
        engine.cache.invalidate(touched.iter().map(|k| &k[..]));
    }
}

/// Deletes the Raft state, applied state, counters and descriptor of `range`, and its GC
/// marker last (one batch).
fn delete_raft_state(engine: &crate::engine::Engine, range: RangeId) -> io::Result<()> {
    let mut batch = engine.db.batch();
    for g in engine.raft.prefix(range.0.to_be_bytes()) {
        let k = g.key().map_err(io_err)?;
        batch.remove(&engine.raft, k);
    }
    batch.remove(&engine.meta, applied_key(range));
    batch.remove(&engine.meta, stats_key(range));
    batch.remove(&engine.meta, desc_key(range));
    batch.remove(&engine.meta, crate::merge::merge_key(range));
    batch.remove(&engine.meta, crate::tombgc::floor_key(range));
    batch.remove(&engine.meta, gc_key(range));
    batch.commit().map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skv_proto::internal::{RangeEpoch, Replica, ReplicaRole};

    fn d(id: u64, start: &[u8], end: &[u8], conf_ver: u64, version: u64, stores: &[u64]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch: Some(RangeEpoch { conf_ver, version }),
            replicas: stores
                .iter()
                .map(|s| Replica {
                    store_id: *s,
                    role: ReplicaRole::Voter as i32,
                })
                .collect(),
        }
    }

    #[test]
    fn stale_is_accepted_only_with_proof() {
        let me = StoreId(3);
        let local = d(5, b"b", b"m", 4, 2, &[1, 2, 3]);
        // Same range, newer conf_ver, without this store: removed.
        assert!(verify_stale(me, &local, &d(5, b"b", b"m", 5, 2, &[1, 2, 4])).is_ok());
        // Still listed, or not newer: refused.
        assert!(verify_stale(me, &local, &d(5, b"b", b"m", 6, 2, &[1, 2, 3])).is_err());
        assert!(verify_stale(me, &local, &d(5, b"b", b"m", 4, 2, &[1, 2])).is_err());
        assert!(verify_stale(me, &local, &d(5, b"b", b"m", 3, 2, &[1, 2])).is_err());
        // Merged away: a range covering all its keys at a newer version.
        assert!(verify_stale(me, &local, &d(4, b"a", b"z", 4, 3, &[1, 2, 3])).is_ok());
        assert!(verify_stale(me, &local, &d(4, b"a", b"", 4, 3, &[1, 2, 3])).is_ok());
        assert!(verify_stale(me, &local, &d(4, b"a", b"z", 4, 2, &[1, 2, 3])).is_err());
        assert!(verify_stale(me, &local, &d(4, b"c", b"z", 4, 9, &[1, 2, 3])).is_err());
        assert!(verify_stale(me, &local, &d(4, b"a", b"k", 4, 9, &[1, 2, 3])).is_err());
        let open_end = d(5, b"b", b"", 4, 2, &[1, 2, 3]);
        assert!(verify_stale(me, &open_end, &d(4, b"a", b"z", 4, 9, &[1, 2, 3])).is_err());
        assert!(verify_stale(me, &open_end, &d(4, b"", b"", 4, 9, &[1, 2, 3])).is_ok());
    }

    /// A GC interrupted by a crash (marker left) is resumed at start: the data of its span
    /// goes, except where a live replica overlaps; its Raft state and marker go; other
    /// ranges' state stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_gc_resumes_and_spares_live_ranges() {
        use crate::engine::{Engine, encode_value, log_key};
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        let node = NodeInner::new(
            StoreId(1),
            engine.clone(),
            crate::raft::network::Transport::new(StoreId(1), None, 1 << 20),
            crate::raft::raft_config(100).unwrap(),
            dir.path().join("snaps"),
            crate::metrics::Metrics::new(),
        );
        // A live single-voter range 7 over [k, m).
        node.create_replica(d(7, b"k", b"m", 1, 1, &[1]), true).await.unwrap();
        for k in [&b"b"[..], b"c", b"k1", b"l", b"n"] {
            engine.data.insert(k, encode_value(1, b"v")).unwrap();
        }
        // Read (so cached): the value cache must not answer them once GC deleted them.
        assert!(engine.get_data(b"b").unwrap().is_some());
        assert!(engine.get_data(b"c").unwrap().is_some());
        // Range 9 over [b, m) was being destroyed.
        let marker = GcMarker {
            start: b"b".to_vec(),
            end: b"m".to_vec(),
            delete_data: true,
        };
        engine
            .meta
            .insert(gc_key(RangeId(9)), postcard::to_allocvec(&marker).unwrap())
            .unwrap();
        engine.raft.insert(log_key(RangeId(9), 3), b"entry").unwrap();
        engine.raft.insert(log_key(RangeId(7), 3), b"other").unwrap();
        node.resume_gc().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while engine.meta.get(gc_key(RangeId(9))).unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "GC did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(engine.get_data(b"b").unwrap(), None);
        assert_eq!(engine.get_data(b"c").unwrap(), None);
        // Inside live range 7, or outside the span: kept.
        assert!(engine.get_data(b"k1").unwrap().is_some());
        assert!(engine.get_data(b"l").unwrap().is_some());
        assert!(engine.get_data(b"n").unwrap().is_some());
        assert!(engine.raft.get(log_key(RangeId(9), 3)).unwrap().is_none());
        assert!(engine.raft.get(log_key(RangeId(7), 3)).unwrap().is_some());
        assert_eq!(node.metrics.gc_keys_deleted.get(), 2);
        node.stop_all().await;
    }

    #[test]
    fn only_uncovered_parts_are_cleared() {
        let s = |a: &[u8], b: &[u8]| (a.to_vec(), b.to_vec());
        assert_eq!(uncovered(b"b", b"m", &[]), vec![s(b"b", b"m")]);
        assert_eq!(uncovered(b"b", b"m", &[s(b"a", b"z")]), vec![]);
        assert_eq!(uncovered(b"b", b"m", &[s(b"a", b"")]), vec![]);
        assert_eq!(
            uncovered(b"b", b"m", &[s(b"d", b"f"), s(b"h", b"j")]),
            vec![s(b"b", b"d"), s(b"f", b"h"), s(b"j", b"m")]
        );
        assert_eq!(uncovered(b"b", b"m", &[s(b"a", b"c")]), vec![s(b"c", b"m")]);
        assert_eq!(uncovered(b"b", b"m", &[s(b"k", b"")]), vec![s(b"b", b"k")]);
        assert_eq!(
            uncovered(b"b", b"", &[s(b"k", b"n")]),
            vec![s(b"b", b"k"), s(b"n", b"")]
        );
        assert_eq!(uncovered(b"", b"", &[s(b"", b"")]), vec![]);
        // Disjoint spans are ignored.
        assert_eq!(uncovered(b"b", b"m", &[s(b"m", b"z")]), vec![s(b"b", b"m")]);
    }
}
