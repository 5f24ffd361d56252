//! Garbage collection of delete tombstones (ADR 0034).
//!
//! A delete leaves a tombstone that keeps the deleted incarnation's version, so that the next
//! put continues from it and a condition naming an old version never matches a new
//! incarnation (ADR 0008). Tombstones are visited by every scan, snapshot and checkpoint, so
//! a range of deleted keys would slow them forever. They are collected by a Raft command,
//! [`crate::raft::Command::GcTombstones`], that the range leader proposes with the exact
//! tombstones it found (key and version): apply removes each one that is still exactly that
//! tombstone and raises the range's **version floor** F to the highest version removed.
//!
//! Invariant: F ≥ the version of every tombstone this range (or a range it was split from or
//! merged with) ever dropped. A put on an absent key gets version F + 1 instead of 1, so
//! every version a client saw of a collected incarnation is below every version of a later
//! one. F is persisted in `meta: vfloor/<range>` in the batch that changes it, travels with
//! a split (the right half starts with the left's F), a merge (the target takes the larger),
//! a snapshot and a checkpoint (field [`FLOOR_FIELD`] of the descriptor bytes).
//!
//! The leader loop here only *finds* candidates (a read-only scan of an engine snapshot);
//! every replica decides the same from the entry and its own data at that log index.

use crate::engine::{Engine, data_range, decode_record, io_err};
use crate::node::NodeInner;
use crate::raft::{CmdResponse, Command};
use skv_common::RangeId;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Protobuf field number of the version floor appended (as a varint) to the descriptor
/// bytes of a snapshot file or a checkpoint, after `RangeDescriptor`'s own fields (whose
/// decoder skips it). Absent means 0.
pub const FLOOR_FIELD: u64 = 101;
/// Tombstones named by one GC command at most.
pub const MAX_ENTRIES: usize = 10_000;
/// Encoded bytes of one GC command at most: the restore chunk bound, which fits one Raft
/// entry (and one AppendEntries next to the byte budget) whatever `--max-value-len` is.
pub const MAX_COMMAND_BYTES: usize = skv_common::limits::INGEST_CHUNK_BYTES;
/// Encoded bytes one named tombstone adds besides its key (an upper bound): the key's length
/// prefix and the version, varints of at most 5 and 10 bytes.
const ENTRY_OVERHEAD: usize = 15;
/// Default `--tombstone-gc-interval-secs`.
pub const DEFAULT_INTERVAL_SECS: u64 = 600;
/// A GC proposal waits this long for its commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// `meta` key of a range's version floor.
pub fn floor_key(range: RangeId) -> Vec<u8> {
    let mut k = b"vfloor/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn encode_floor(floor: u64) -> [u8; 8] {
    floor.to_be_bytes()
}

/// Writes `range`'s version floor into `batch` (with the applied state or install it goes
/// with).
pub fn put_floor(engine: &Engine, batch: &mut fjall::OwnedWriteBatch, range: RangeId, floor: u64) {
    batch.insert(&engine.meta, floor_key(range), encode_floor(floor));
}

/// The stored version floor of `range` (0 when none was ever written). A stored value that
/// does not decode is an error, never read as 0: a floor read too low could let a put reuse
/// a version a client saw.
pub fn load_floor(engine: &Engine, range: RangeId) -> io::Result<u64> {
    decode_floor(engine.meta.get(floor_key(range)).map_err(io_err)?.as_deref(), range)
}

/// [`load_floor`] as of the engine snapshot `snap` (read with the data and the applied
/// state it goes with: snapshot files and checkpoints).
pub fn floor_in(engine: &Engine, snap: &fjall::Snapshot, range: RangeId) -> io::Result<u64> {
    use fjall::Readable;
    decode_floor(
        snap.get(&engine.meta, floor_key(range)).map_err(io_err)?.as_deref(),
        range,
    )
}

fn decode_floor(stored: Option<&[u8]>, range: RangeId) -> io::Result<u64> {
    match stored {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v)
            .map(u64::from_be_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad version floor of {range}"))),
    }
}

/// `desc_bytes` with the version floor appended when it is above 0 (older readers, and
/// restore, decode the descriptor and skip the field).
pub fn append_floor(desc_bytes: &mut Vec<u8>, floor: u64) {
    if floor > 0 {
        prost::encoding::encode_varint(FLOOR_FIELD << 3, desc_bytes);
        prost::encoding::encode_varint(floor, desc_bytes);
    }
}

/// The version floor carried by descriptor bytes (0 when absent); `None` when the bytes do
/// not parse as protobuf fields.
pub fn floor_of(desc_bytes: &[u8]) -> Option<u64> {
    let mut floor = 0;
    crate::raft::bootstrap::walk_fields(desc_bytes, |field, value| {
        if let (FLOOR_FIELD, crate::raft::bootstrap::FieldValue::Varint(v)) = (field, value) {
            floor = v;
        }
    })
    .ok()?;
    Some(floor)
}

/// The tombstones of `[start, end)` in `snap` (key, version), in key order, up to
/// [`MAX_ENTRIES`] or a command of [`MAX_COMMAND_BYTES`].
pub fn find_tombstones(
    engine: &Engine,
    snap: &fjall::Snapshot,
    start: &[u8],
    end: &[u8],
) -> io::Result<Vec<(Vec<u8>, u64)>> {
    use fjall::Readable;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(start, end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        if let Some(crate::engine::Record::Tombstone { version }) = decode_record(&v) {
            let cost = k.len() + ENTRY_OVERHEAD;
            if bytes + cost > MAX_COMMAND_BYTES {
                break;
            }
            bytes += cost;
            out.push((k.to_vec(), version));
            if out.len() >= MAX_ENTRIES {
                break;
            }
        }
    }
    Ok(out)
}

/// Every `interval`, proposes a GC of the tombstones of each range this store leads that
/// holds any (one command per range and pass, so a range of many tombstones is collected
/// over several passes of at most [`MAX_ENTRIES`] each).
pub async fn run(node: Arc<NodeInner>, interval: Duration, cancel: CancellationToken) {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = t.tick() => {}
        }
        for r in node.replicas() {
            if cancel.is_cancelled() {
                return;
            }
            if !r.shared.is_initialized() || r.shared.merging.lock().is_some() || !r.is_leader() {
                continue;
            }
            let span = tracing::info_span!("tombstone_gc", range_id = %r.shared.range_id, store_id = %node.store_id);
            collect_range(&node, &r).instrument(span).await;
        }
    }
}

/// One GC pass over one led range: find, propose, count.
async fn collect_range(node: &Arc<NodeInner>, r: &Arc<crate::node::Replica>) {
    let m = |result: &'static str| {
        node.metrics
            .tombstone_gc_runs
            .get_or_create(&crate::metrics::GcResult { result })
            .inc();
    };
    let desc = r.shared.desc();
    let engine = node.engine.clone();
    let found = tokio::task::spawn_blocking(move || {
        let snap = engine.db.snapshot();
        find_tombstones(&engine, &snap, &desc.start, &desc.end)
    })
    .await;
    let entries = match found {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "tombstone scan failed");
            m("failed");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "tombstone scan task failed");
            m("failed");
            return;
        }
    };
    if entries.is_empty() {
        return;
    }
    let n = entries.len();
    let cmd = Command::GcTombstones {
        entries: entries
            .into_iter()
            .map(|(key, version)| crate::raft::GcEntry { key, version })
            .collect(),
    };
    match r.raft.propose(cmd, PROPOSE_TIMEOUT).await {
        Ok(CmdResponse::Collected { removed, floor }) => {
            tracing::info!(found = n, removed, floor, "tombstones collected");
            m("collected");
        }
        Ok(other) => {
            tracing::debug!(response = ?other, "tombstone GC not applied (the range changed)");
            m("rejected");
        }
        Err(e) => {
            tracing::debug!(error = %e, "tombstone GC proposal failed");
            m("failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{encode_tombstone, encode_value};
    use crate::metrics::Metrics;
    use prost::Message;
    use skv_proto::internal::RangeDescriptor;

    #[test]
    fn the_floor_rides_on_descriptor_bytes_that_old_readers_still_decode() {
        let d = RangeDescriptor {
            range_id: 7,
            start: b"a".to_vec(),
            end: b"q".to_vec(),
            ..Default::default()
        };
        let mut b = d.encode_to_vec();
        assert_eq!(floor_of(&b), Some(0));
        append_floor(&mut b, 0);
        assert_eq!(b, d.encode_to_vec(), "a floor of 0 adds nothing");
        append_floor(&mut b, 1 << 40);
        assert_eq!(floor_of(&b), Some(1 << 40));
        assert_eq!(RangeDescriptor::decode(&b[..]).unwrap(), d);
        assert_eq!(floor_of(&[0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn tombstones_are_found_in_the_span_and_a_bad_floor_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        e.data.insert(b"a", encode_tombstone(3)).unwrap();
        e.data.insert(b"b", encode_value(2, b"x")).unwrap();
        e.data.insert(b"c", encode_tombstone(9)).unwrap();
        e.data.insert(b"z", encode_tombstone(1)).unwrap();
        let snap = e.db.snapshot();
        let found = find_tombstones(&e, &snap, b"a", b"y").unwrap();
        assert_eq!(found, vec![(b"a".to_vec(), 3), (b"c".to_vec(), 9)]);
        assert_eq!(load_floor(&e, RangeId(4)).unwrap(), 0);
        e.meta.insert(floor_key(RangeId(4)), encode_floor(12)).unwrap();
        assert_eq!(load_floor(&e, RangeId(4)).unwrap(), 12);
        e.meta.insert(floor_key(RangeId(4)), b"bad").unwrap();
        assert!(load_floor(&e, RangeId(4)).is_err());
    }

    #[test]
    fn a_gc_command_fits_one_raft_entry_of_any_max_value_len() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        // 3,000 tombstones of 200-byte keys: 645,000 bytes of keys, more than one command.
        for i in 0..3_000u32 {
            let mut k = vec![b'k'; 200];
            k[..4].copy_from_slice(&i.to_be_bytes());
            e.data.insert(k, encode_tombstone(u64::MAX >> 2)).unwrap();
        }
        let snap = e.db.snapshot();
        let found = find_tombstones(&e, &snap, b"", b"").unwrap();
        assert!(!found.is_empty() && found.len() < 3_000, "{}", found.len());
        let cmd = crate::raft::Command::GcTombstones {
            entries: found
                .into_iter()
                .map(|(key, version)| crate::raft::GcEntry { key, version })
                .collect(),
        };
        let encoded = crate::raft::encode(&cmd).unwrap().len();
        assert!(encoded <= MAX_COMMAND_BYTES, "{encoded}");
        // The smallest Store message any --max-value-len allows (a Raft entry of that size
        // always fits an AppendEntries).
        assert!(encoded < skv_common::limits::max_store_message(0), "{encoded}");
    }
}
