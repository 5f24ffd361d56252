//! The replicated state machine of one range: user data in the shared `data` keyspace,
//! applied state and descriptor in `meta`, written in one atomic batch per entry.
//! Snapshots are streamed to/from files (bounded memory whatever the range size).

use super::{
    BatchOp, CmdResponse, Command, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, WriteOp,
    WriteOutcome, decode, encode,
};
use crate::engine::{Engine, applied_key, data_range, decode_record, desc_key, encode_tombstone, encode_value, io_err};
use crate::metrics::Metrics;
use crate::node::NodeInner;
use crate::stats::{RangeStats, count_span, encode_stats, load_stats, stats_key};
use futures::{Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{ApplyResponder, EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use skv_common::RangeId;
use skv_common::keys::desc_contains;
use skv_proto::internal::{RangeDescriptor, RangeEpoch, Replica, ReplicaRole};
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

const SNAP_MAGIC: &[u8; 8] = b"SKVSNAP2";
/// Frame length marking the end of the pairs; the trailer (count, checksum) follows.
const END_FRAME: u32 = u32::MAX;
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// State of a range shared between its state machine and the services.
pub struct RangeShared {
    pub range_id: RangeId,
    pub desc: RwLock<RangeDescriptor>,
    /// True once the replica holds data for its descriptor (bootstrap, split, snapshot,
    /// or an applied entry); an uninitialized peer only exists to receive a snapshot.
    pub initialized: AtomicBool,
    pub applied_index: AtomicU64,
    /// Load counted by the serving node since the last range heartbeat.
    pub load: Mutex<LoadStats>,
    /// Recent AppendEntries accepted from a leader (committed vote) that left this replica's
    /// log matching the leader's, with the commit index each one taught (bounds how stale a
    /// follower read can be, see [`LeaderContacts`]).
    pub leader_contacts: Mutex<LeaderContacts>,
    /// Log id of the membership the descriptor's replicas and `conf_ver` were derived from.
    /// Written only under the `desc` write lock, read under its read lock
    /// ([`Self::desc_and_membership`]), so the two always match.
    membership_log_id: Mutex<Option<LogId>>,
    /// True while a snapshot install modifies this range's data (and for good if it failed:
    /// the group is stopped and the data may be half-replaced): no stale read is served.
    pub installing: AtomicBool,
    /// Approximate live bytes (key + value) and keys, as of the last applied batch
    /// ([`crate::stats`]).
    pub approx_bytes: AtomicU64,
    pub approx_keys: AtomicU64,
    /// Set while this range is the frozen source of a merge (ADR 0016): no write applies,
    /// no request is admitted.
    pub merging: Mutex<Option<crate::merge::MergeState>>,
    /// Applied index of the range's latest object-storage checkpoint, set by the checkpointer
    /// while this store leads the range (0: none, or not leading): log compaction keeps the
    /// log from there, so new learners bootstrap from it (ADR 0027).
    pub checkpoint_floor: AtomicU64,
    /// The range's version floor (ADR 0034, [`crate::tombgc`]): a put on an absent key gets
    /// this + 1. Written by apply only, as of the applied index.
    pub version_floor: AtomicU64,
}

/// The AppendEntries a follower accepted recently from a leader: when each arrived and the
/// highest leader commit index learnt up to it.
///
/// The leader's commit index in a message covers every write the cluster acknowledged
/// before the leader sent it, and commit indexes only grow, so a replica that has applied
/// at least the commit index learnt at a contact holds every write acknowledged before that
/// contact (give or take the message's one-way delay). [`Self::fresh_as_of`] finds the
/// latest such contact; a replica whose apply lags behind every recent contact has none.
#[derive(Debug, Default)]
pub struct LeaderContacts {
    /// (received, highest commit index learnt so far), commit indexes rising.
    recent: std::collections::VecDeque<(Instant, u64)>,
}

/// Contacts remembered (one per distinct commit index).
const CONTACTS_KEPT: usize = 16;

impl LeaderContacts {
    /// Records an accepted AppendEntries that arrived `at` with the leader's `commit` index.
    pub fn record(&mut self, at: Instant, commit: u64) {
        let commit = self.recent.back().map_or(commit, |&(_, c)| c.max(commit));
        if let Some(last) = self.recent.back_mut()
            && last.1 == commit
        {
            last.0 = last.0.max(at);
            return;
        }
        self.recent.push_back((at, commit));
        if self.recent.len() > CONTACTS_KEPT {
            self.recent.pop_front();
        }
    }

    /// The latest contact whose commit index is at most `applied`: the replica's data is no
    /// older than that contact. `None` if it has applied none of the recent contacts' commits.
    pub fn fresh_as_of(&self, applied: u64) -> Option<Instant> {
        self.recent.iter().filter(|(_, c)| *c <= applied).map(|(t, _)| *t).max()
    }
}

/// Per-range load since the last report (leader side), with a reservoir sample of keys.
#[derive(Default, Clone, Debug)]
pub struct LoadStats {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub sampled_keys: Vec<Vec<u8>>,
    seen: u64,
}

/// Keys sampled per report interval (reads and writes alike), reservoir-style: every key
/// seen has the same chance to be in the sample, whatever the load.
pub const LOAD_SAMPLE: usize = 64;

impl LoadStats {
    fn sample(&mut self, key: &[u8]) {
        self.seen += 1;
        if self.sampled_keys.len() < LOAD_SAMPLE {
            self.sampled_keys.push(key.to_vec());
        } else {
            let i = rand::random_range(0..self.seen);
            if let Some(slot) = self.sampled_keys.get_mut(i as usize) {
                *slot = key.to_vec();
            }
        }
    }
}

impl RangeShared {
    /// Counts a served read.
    pub fn record_read(&self, key: &[u8], bytes: usize) {
        let mut l = self.load.lock();
        l.reads += 1;
        l.read_bytes += bytes as u64;
        l.sample(key);
    }
    /// Counts a proposed write.
    pub fn record_write(&self, key: &[u8], bytes: usize) {
        let mut l = self.load.lock();
        l.writes += 1;
        l.written_bytes += bytes as u64;
        l.sample(key);
    }
    /// Returns and resets the load counters.
    pub fn take_load(&self) -> LoadStats {
        std::mem::take(&mut *self.load.lock())
    }

    pub fn new(desc: RangeDescriptor, initialized: bool) -> Arc<Self> {
        Arc::new(Self {
            range_id: RangeId(desc.range_id),
            desc: RwLock::new(desc),
            initialized: AtomicBool::new(initialized),
            applied_index: AtomicU64::new(0),
            load: Mutex::new(LoadStats::default()),
            leader_contacts: Mutex::new(LeaderContacts::default()),
            membership_log_id: Mutex::new(None),
            installing: AtomicBool::new(false),
            checkpoint_floor: AtomicU64::new(0),
            version_floor: AtomicU64::new(0),
            approx_bytes: AtomicU64::new(0),
            approx_keys: AtomicU64::new(0),
            merging: Mutex::new(None),
        })
    }
    pub fn desc(&self) -> RangeDescriptor {
        self.desc.read().clone()
    }
    /// The descriptor and the log id of the membership its `conf_ver` reflects, read together.
    pub fn desc_and_membership(&self) -> (RangeDescriptor, Option<LogId>) {
        let d = self.desc.read();
        let m = *self.membership_log_id.lock();
        (d.clone(), m)
    }
    /// Publishes a new descriptor (when given) and the current membership log id together.
    fn publish(&self, desc: Option<RangeDescriptor>, membership: Option<LogId>) {
        let mut d = self.desc.write();
        if let Some(new) = desc {
            *d = new;
        }
        *self.membership_log_id.lock() = membership;
    }
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }
    /// (bytes, keys) as of the last applied batch.
    pub fn approximate_size(&self) -> (u64, u64) {
        (
            self.approx_bytes.load(Ordering::Acquire),
            self.approx_keys.load(Ordering::Acquire),
        )
    }
    fn publish_stats(&self, s: &RangeStats) {
        self.approx_bytes.store(s.bytes, Ordering::Release);
        self.approx_keys.store(s.keys, Ordering::Release);
    }
}

/// A snapshot on disk, opened (so the file outlives a concurrent replacement).
#[derive(Debug)]
pub struct SnapFile {
    pub path: PathBuf,
    pub file: std::fs::File,
}

impl SnapFile {
    pub fn open(path: PathBuf) -> io::Result<Self> {
        let file = std::fs::File::open(&path)?;
        Ok(Self { path, file })
    }

    /// The empty file that goes with a compaction's meta-only snapshot (openraft's
    /// `build_snapshot` returns data with its meta; only the meta is used, and such a
    /// snapshot is never sent: `get_current_snapshot` writes a real file first).
    fn meta_only(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("compaction.empty");
        std::fs::File::create(&path)?;
        Self::open(path)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// The applied log index stored for `range`, if any.
pub fn stored_applied_index(engine: &Engine, range: RangeId) -> io::Result<Option<u64>> {
    match engine.meta.get(applied_key(range)).map_err(io_err)? {
        None => Ok(None),
        Some(v) => {
            let s: AppliedState = decode(&v).map_err(io_err)?;
            Ok(s.last_applied.map(|l| l.index()))
        }
    }
}

pub fn encode_applied(last_applied: Option<LogId>, membership: StoredMembership) -> io::Result<Vec<u8>> {
    encode(&AppliedState {
        last_applied,
        membership,
    })
    .map_err(io_err)
}

/// Records written earlier in an uncommitted apply batch: key → (the new record, key +
/// value bytes when live). Published to the value cache once the batch commits.
type Overlay = HashMap<Vec<u8>, (crate::engine::Record, u64)>;

/// A tombstone GC that applied: the version floor after it and the keys removed.
type GcApplied = (u64, Vec<Vec<u8>>);

/// A merge that applied on the target: (source, merged descriptor, source bytes, source keys,
/// the target's version floor after it).
type MergeApplied = (RangeDescriptor, RangeDescriptor, u64, u64, u64);

/// A split that applied: the right descriptor, whether its storage was seeded, and the
/// node's creation lock (held until the right range is reopened).
type SplitOutcome = (RangeDescriptor, bool, Option<tokio::sync::OwnedMutexGuard<()>>);

/// The latest snapshot: its meta, and the file holding it once one was materialized.
///
/// Log compaction (openraft's `build_snapshot`, every `--raft-snapshot-logs` entries) records
/// only the meta: the range's state is durable in the shared engine, so truncating the log
/// needs no copy of it (TiKV and CockroachDB truncate the same way). The file is written
/// when a follower needs a snapshot (`get_current_snapshot`), from the engine as it is then
/// (ADR 0023). Before, every compaction wrote the whole range to a file on every replica.
type CurrentSnapshot = Arc<Mutex<Option<(SnapshotMeta, Option<PathBuf>)>>>;

/// Replaces the current snapshot; removes the file of the one it replaces (a send that
/// opened it keeps reading it).
fn replace_current(current: &CurrentSnapshot, meta: SnapshotMeta, path: Option<PathBuf>) {
    let old = current.lock().replace((meta, path.clone()));
    if let Some((_, Some(p))) = old
        && Some(&p) != path.as_ref()
    {
        let _ = std::fs::remove_file(p);
    }
}

pub struct StateMachine {
    engine: Arc<Engine>,
    shared: Arc<RangeShared>,
    node: Weak<NodeInner>,
    snap_dir: PathBuf,
    metrics: Metrics,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: CurrentSnapshot,
    /// Size and key counters as of `last_applied` (committed with it).
    stats: RangeStats,
    /// Changes to `stats` made by the writes of the batch being built (signed).
    pending_bytes: AtomicI64,
    pending_keys: AtomicI64,
}

impl StateMachine {
    pub fn open(
        engine: Arc<Engine>,
        shared: Arc<RangeShared>,
        node: Weak<NodeInner>,
        snap_dir: PathBuf,
        metrics: Metrics,
    ) -> io::Result<Self> {
        let (last_applied, membership) = match engine.meta.get(applied_key(shared.range_id)).map_err(io_err)? {
            Some(v) => {
                let s: AppliedState = decode(&v).map_err(io_err)?;
                (s.last_applied, s.membership)
            }
            None => (None, StoredMembership::default()),
        };
        if let Some(l) = &last_applied {
            shared.applied_index.store(l.index(), Ordering::Release);
        }
        shared.publish(None, *membership.log_id());
        let index = last_applied.map_or(0, |l| l.index());
        let stats = match load_stats(&engine, shared.range_id)? {
            Some(s) if s.applied_index == index => s,
            // Counters that do not match the applied state (a snapshot install, or data
            // from before counters existed): one scan of the span.
            _ if last_applied.is_some() => {
                let d = shared.desc();
                let (bytes, keys) = count_span(&engine, &d.start, &d.end)?;
                RangeStats {
                    bytes,
                    keys,
                    applied_index: index,
                }
            }
            _ => RangeStats::default(),
        };
        shared.publish_stats(&stats);
        *shared.merging.lock() = crate::merge::load_state(&engine, shared.range_id)?;
        shared
            .version_floor
            .store(crate::tombgc::load_floor(&engine, shared.range_id)?, Ordering::Release);
        Ok(Self {
            engine,
            shared,
            node,
            snap_dir,
            metrics,
            last_applied,
            membership,
            current: Arc::new(Mutex::new(None)),
            stats,
            pending_bytes: AtomicI64::new(0),
            pending_keys: AtomicI64::new(0),
        })
    }

    /// Adds the pending write deltas (and `extra`) to the counters, tagged with the applied
    /// index, into `batch`. Returns the new counters (published once the batch committed).
    fn stats_into(&mut self, batch: &mut fjall::OwnedWriteBatch, extra: (i64, i64)) -> io::Result<RangeStats> {
        let db = self.pending_bytes.swap(0, Ordering::Relaxed) + extra.0;
        let dk = self.pending_keys.swap(0, Ordering::Relaxed) + extra.1;
        let add = |v: u64, d: i64| {
            if d >= 0 {
                v.saturating_add(d as u64)
            } else {
                v.saturating_sub(d.unsigned_abs())
            }
        };
        let s = RangeStats {
            bytes: add(self.stats.bytes, db),
            keys: add(self.stats.keys, dk),
            applied_index: self.last_applied.map_or(0, |l| l.index()),
        };
        batch.insert(&self.engine.meta, stats_key(self.shared.range_id), encode_stats(&s)?);
        Ok(s)
    }

    /// Recounts the counters from the data (after a snapshot install).
    async fn recount_stats(&mut self) -> io::Result<()> {
        let engine = self.engine.clone();
        let d = self.shared.desc();
        let (bytes, keys) = tokio::task::spawn_blocking(move || count_span(&engine, &d.start, &d.end))
            .await
            .map_err(io_err)??;
        self.stats = RangeStats {
            bytes,
            keys,
            applied_index: self.last_applied.map_or(0, |l| l.index()),
        };
        self.pending_bytes.store(0, Ordering::Relaxed);
        self.pending_keys.store(0, Ordering::Relaxed);
        self.shared.publish_stats(&self.stats);
        Ok(())
    }

    /// Commits `batch` with the applied state (and the descriptor when it changed), then
    /// publishes the new state and answers the waiting clients.
    fn commit_applied(
        &mut self,
        batch: fjall::OwnedWriteBatch,
        overlay: &mut Overlay,
        replies: &mut Vec<(ApplyResponder<TypeConfig>, CmdResponse)>,
    ) -> io::Result<()> {
        crate::crash_point!(crate::failpoints::MID_APPLY);
        self.commit_applied_with(batch, None, overlay, replies, (0, 0))
    }

    /// [`Self::commit_applied`], with a new descriptor and `extra` (bytes, keys) added to
    /// the counters (a split hands the right half's away, a merge takes the source's).
    ///
    /// The written records (`overlay`) go to the value cache after the commit and before
    /// the applied index is published: a read that waited for that index must find them.
    fn commit_applied_with(
        &mut self,
        mut batch: fjall::OwnedWriteBatch,
        new_desc: Option<RangeDescriptor>,
        overlay: &mut Overlay,
        replies: &mut Vec<(ApplyResponder<TypeConfig>, CmdResponse)>,
        extra: (i64, i64),
    ) -> io::Result<()> {
        let stats = self.stats_into(&mut batch, extra)?;
        batch.insert(
            &self.engine.meta,
            applied_key(self.shared.range_id),
            encode_applied(self.last_applied, self.membership.clone())?,
        );
        if let Some(d) = &new_desc {
            batch.insert(&self.engine.meta, desc_key(self.shared.range_id), d.encode_to_vec());
        }
        if let Err(e) = commit_apply(batch) {
            crate::engine::fail_stop("a Raft apply (the state machine's batch commit)", &e);
        }
        for (key, (rec, _)) in overlay.drain() {
            self.engine.cache.publish(key, crate::cache::Cached::Record(rec));
        }
        self.stats = stats;
        self.shared.publish_stats(&stats);
        if new_desc.is_some() {
            self.shared.publish(new_desc, *self.membership.log_id());
        }
        self.shared.initialized.store(true, Ordering::Release);
        if let Some(l) = &self.last_applied {
            self.shared.applied_index.store(l.index(), Ordering::Release);
        }
        for (r, resp) in replies.drain(..) {
            r.send(resp);
        }
        Ok(())
    }

    /// Applies one write into `batch`; `overlay` holds the records (stored version, live)
    /// written earlier in the same (uncommitted) batch so conditions see them.
    ///
    /// A key's version rises by 1 on every put, across deletes: a delete leaves a tombstone
    /// keeping the version, so a later put continues from it and a condition naming an
    /// older incarnation's version can never match a newer one. Conditions compare with
    /// the live version (0 when absent or deleted).
    fn apply_write(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut Overlay,
        key: Vec<u8>,
        op: WriteOp,
        condition: Option<u64>,
    ) -> io::Result<CmdResponse> {
        let desc = self.shared.desc();
        if self.shared.merging.lock().is_some() {
            // Frozen by a merge (its version rose): the writer re-routes.
            return Ok(CmdResponse::EpochNotMatch(desc.encode_to_vec()));
        }
        if !desc_contains(&desc, &key) {
            return Ok(CmdResponse::KeyNotInRange(desc.encode_to_vec()));
        }
        let o = self.write_one(batch, overlay, key, op, condition)?;
        Ok(CmdResponse::Write {
            succeeded: o.succeeded,
            version: o.version,
            existed: o.existed,
        })
    }

    /// Applies a batch of writes into `batch`, in order, sharing `overlay` so that each op
    /// sees the earlier ones. All keys are checked against the range first: if one is outside
    /// (a split applied after the proposal), nothing is written and the whole batch answers
    /// KeyNotInRange (a routing error from an apply that wrote nothing, ADR 0006).
    fn apply_batch(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut Overlay,
        ops: Vec<BatchOp>,
    ) -> io::Result<CmdResponse> {
        let desc = self.shared.desc();
        if self.shared.merging.lock().is_some() {
            return Ok(CmdResponse::EpochNotMatch(desc.encode_to_vec()));
        }
        if ops.iter().any(|o| !desc_contains(&desc, &o.key)) {
            return Ok(CmdResponse::KeyNotInRange(desc.encode_to_vec()));
        }
        let mut out = Vec::with_capacity(ops.len());
        for o in ops {
            out.push(self.write_one(batch, overlay, o.key, o.op, o.condition)?);
        }
        Ok(CmdResponse::Batch(out))
    }

    /// Restore (ADR 0028): writes each record as given unless the key already holds a
    /// newer version ([`crate::service::backup::ingest_wins`]), so ingesting the same records twice
    /// changes nothing. All keys are checked against the range first, as a batch's.
    fn apply_ingest(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut Overlay,
        records: Vec<super::IngestOp>,
    ) -> io::Result<CmdResponse> {
        let desc = self.shared.desc();
        if self.shared.merging.lock().is_some() {
            return Ok(CmdResponse::EpochNotMatch(desc.encode_to_vec()));
        }
        if records.iter().any(|o| !desc_contains(&desc, &o.key)) {
            return Ok(CmdResponse::KeyNotInRange(desc.encode_to_vec()));
        }
        // Every record decodes before anything is written (the proposer checked too).
        let Some(decoded) = records
            .iter()
            .map(|o| crate::engine::decode_record(&o.record))
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(CmdResponse::Rejected("ingest: a record does not decode".into()));
        };
        // The proposer refused these too; checked again here so every replica decides the
        // same from the entry alone (a version near u64::MAX would make a later put wrap).
        if let Some(v) = decoded
            .iter()
            .map(|r| r.version())
            .find(|v| skv_common::limits::check_record_version(*v).is_err())
        {
            return Ok(CmdResponse::Rejected(format!(
                "ingest: record version {v} is above {}",
                skv_common::limits::MAX_RECORD_VERSION
            )));
        }
        let (mut written, mut skipped) = (0u64, 0u64);
        for (o, rec) in records.into_iter().zip(decoded) {
            let (current, live, old_bytes) = match overlay.get(&o.key) {
                Some((r, bytes)) => (Some(r.version()), r.is_live(), *bytes),
                None => match self.engine.get_record(&o.key)? {
                    Some(crate::engine::Record::Live { version, value }) => {
                        (Some(version), true, (o.key.len() + value.len()) as u64)
                    }
                    Some(r) => (Some(r.version()), false, 0),
                    None => (None, false, 0),
                },
            };
            if !crate::service::backup::ingest_wins(current, rec.version()) {
                skipped += 1;
                continue;
            }
            let new_bytes = match &rec {
                crate::engine::Record::Live { value, .. } => (o.key.len() + value.len()) as u64,
                crate::engine::Record::Tombstone { .. } => 0,
            };
            self.pending_bytes
                .fetch_add(new_bytes as i64 - old_bytes as i64, Ordering::Relaxed);
            self.pending_keys
                .fetch_add(i64::from(rec.is_live()) - i64::from(live), Ordering::Relaxed);
            batch.insert(&self.engine.data, o.key.clone(), o.record);
            overlay.insert(o.key, (rec, new_bytes));
            written += 1;
        }
        Ok(CmdResponse::Ingested { written, skipped })
    }

    /// One write of a key already checked against the range (see [`Self::apply_write`]).
    fn write_one(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut Overlay,
        key: Vec<u8>,
        op: WriteOp,
        condition: Option<u64>,
    ) -> io::Result<WriteOutcome> {
        let (stored_version, live, old_bytes) = match overlay.get(&key) {
            Some((rec, bytes)) => (rec.version(), rec.is_live(), *bytes),
            None => match self.engine.get_record(&key)? {
                Some(crate::engine::Record::Live { version, value }) => {
                    (version, true, (key.len() + value.len()) as u64)
                }
                Some(r) => (r.version(), false, 0),
                // Never written, or its tombstone was collected: versions continue from the
                // range's floor (ADR 0034), above every version a collected one had.
                None => (self.shared.version_floor.load(Ordering::Acquire), false, 0),
            },
        };
        let live_version = if live { stored_version } else { 0 };
        if let Some(want) = condition
            && want != live_version
        {
            return Ok(WriteOutcome {
                succeeded: false,
                version: live_version,
                existed: live,
            });
        }
        Ok(match op {
            WriteOp::Put(v) => {
                // Saturating, never wrapping: a stored version is at most MAX_RECORD_VERSION
                // plus the puts since (limits::MAX_RECORD_VERSION), far below u64::MAX.
                let version = stored_version.saturating_add(1);
                let new_bytes = (key.len() + v.len()) as u64;
                self.pending_bytes
                    .fetch_add(new_bytes as i64 - old_bytes as i64, Ordering::Relaxed);
                if !live {
                    self.pending_keys.fetch_add(1, Ordering::Relaxed);
                }
                batch.insert(&self.engine.data, key.clone(), encode_value(version, &v));
                overlay.insert(key, (crate::engine::Record::Live { version, value: v }, new_bytes));
                WriteOutcome {
                    succeeded: true,
                    version,
                    existed: live,
                }
            }
            WriteOp::Delete => {
                if live {
                    self.pending_bytes.fetch_sub(old_bytes as i64, Ordering::Relaxed);
                    self.pending_keys.fetch_sub(1, Ordering::Relaxed);
                    batch.insert(&self.engine.data, key.clone(), encode_tombstone(stored_version));
                    overlay.insert(
                        key,
                        (
                            crate::engine::Record::Tombstone {
                                version: stored_version,
                            },
                            0,
                        ),
                    );
                }
                WriteOutcome {
                    succeeded: true,
                    version: 0,
                    existed: live,
                }
            }
        })
    }

    /// Applies a tombstone GC (ADR 0034) into `batch`: raises the version floor to the
    /// highest version the entry names, and removes each named tombstone that is still
    /// exactly that tombstone and inside the range. Returns the response, the new floor and
    /// the keys removed.
    ///
    /// The floor depends on the entry alone, never on this replica's data or descriptor: a
    /// replica that replays the log from its first entry does so under the range's
    /// *current* descriptor (it was created with it), so a check of the entry's epoch, or a
    /// floor raised only by what was removed, would make it skip collections the others
    /// applied and then number puts on absent keys differently (found by a chaos run: a
    /// replica added after a split replayed the older GC entries and its floor stayed
    /// behind, so the same put got another version there). Raising the floor more than the
    /// removals need is always safe. Which tombstones are removed does depend on the data,
    /// but only for keys inside the range, where every replica holds the same records at this
    /// index.
    fn apply_gc(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        entries: Vec<super::GcEntry>,
    ) -> io::Result<(CmdResponse, Option<GcApplied>)> {
        if self.shared.merging.lock().is_some() {
            return Ok((CmdResponse::Rejected("the range is frozen by a merge".into()), None));
        }
        let desc = self.shared.desc();
        let mut floor = self.shared.version_floor.load(Ordering::Acquire);
        let mut removed = Vec::new();
        for e in entries {
            floor = floor.max(e.version);
            if !desc_contains(&desc, &e.key) {
                continue;
            }
            if let Some(crate::engine::Record::Tombstone { version }) = self.engine.get_record(&e.key)?
                && version == e.version
            {
                batch.remove(&self.engine.data, e.key.clone());
                removed.push(e.key);
            }
        }
        crate::tombgc::put_floor(&self.engine, batch, self.shared.range_id, floor);
        Ok((
            CmdResponse::Collected {
                removed: removed.len() as u64,
                floor,
            },
            Some((floor, removed)),
        ))
    }

    /// Applies a split: returns the response and, on success, the right descriptor to open.
    async fn apply_split(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        split_key: Vec<u8>,
        new_range_id: u64,
        epoch_version: u64,
    ) -> io::Result<(CmdResponse, Option<SplitOutcome>)> {
        let desc = self.shared.desc();
        let epoch = desc.epoch.unwrap_or_default();
        if epoch.version != epoch_version {
            return Ok((CmdResponse::EpochNotMatch(desc.encode_to_vec()), None));
        }
        if self.shared.merging.lock().is_some() {
            return Ok((CmdResponse::Rejected("the range is frozen by a merge".into()), None));
        }
        if split_key.is_empty() || split_key <= desc.start || !desc_contains(&desc, &split_key) {
            return Ok((CmdResponse::Rejected("split key outside the range".into()), None));
        }
        if new_range_id == desc.range_id || new_range_id == 0 {
            return Ok((CmdResponse::Rejected("bad new range id".into()), None));
        }
        let Some(version) = epoch.version.checked_add(1) else {
            return Ok((CmdResponse::Rejected("range epoch version at its maximum".into()), None));
        };
        let new_epoch = RangeEpoch {
            conf_ver: epoch.conf_ver,
            version,
        };
        let mut left = desc.clone();
        left.end = split_key.clone();
        left.epoch = Some(new_epoch);
        let right = RangeDescriptor {
            range_id: new_range_id,
            start: split_key,
            end: desc.end.clone(),
            epoch: Some(new_epoch),
            replicas: desc.replicas.clone(),
        };
        let right_id = RangeId(new_range_id);
        // The right group may already exist here: initialized (it got a snapshot after a
        // lagging split) → keep it; uninitialized (created by a Raft message) → replace it.
        // The creation lock is held from here until the right range is reopened (after the
        // batch commits), so no Raft message recreates the peer and votes meanwhile.
        let mut seed = true;
        let mut guard = None;
        if let Some(node) = self.node.upgrade() {
            guard = node.lock_creation_unless_held().await;
            match node.replica(right_id) {
                Some(r) if r.shared.is_initialized() => seed = false,
                Some(_) => node.stop_replica(right_id).await,
                None => {}
            }
        }
        if seed && self.engine.meta.get(desc_key(right_id)).map_err(io_err)?.is_some() {
            seed = false;
        }
        if seed {
            // Clears the old peer's Raft state and seeds, in this batch; keeps a higher vote.
            super::log_store::seed_split_state(&self.engine, batch, right_id)?;
            let init_log = super::split_init_log_id();
            let m = StoredMembership::new(Some(init_log), self.membership.membership().clone());
            batch.insert(
                &self.engine.meta,
                applied_key(right_id),
                encode_applied(Some(init_log), m)?,
            );
            batch.insert(&self.engine.meta, desc_key(right_id), right.encode_to_vec());
            // The right half keeps the versions its keys' collected tombstones had.
            crate::tombgc::put_floor(
                &self.engine,
                batch,
                right_id,
                self.shared.version_floor.load(Ordering::Acquire),
            );
        }
        let resp = CmdResponse::Split {
            left: left.encode_to_vec(),
            right: right.encode_to_vec(),
        };
        Ok((resp, Some((right, seed, guard))))
    }

    /// Applies a CommitMerge on the target: checks its epoch and adjacency (the same answer
    /// on every replica: only the log decides), waits until the local source applied the
    /// frozen index (its data is then final; a bounded wait, after which the apply fails —
    /// never skipped: during start-up the range is reopened in the background once the node
    /// serves; while serving, the group stops and this replica stays down until the next
    /// restart, a known gap), then widens the target and
    /// retires the source in this batch. Returns the response and, when merged, (source,
    /// merged descriptor, source bytes, source keys).
    async fn apply_commit_merge(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        source: &[u8],
        frozen_index: u64,
        epoch_version: u64,
        epoch_conf_ver: u64,
    ) -> io::Result<(CmdResponse, Option<MergeApplied>)> {
        let desc = self.shared.desc();
        let e = desc.epoch.unwrap_or_default();
        if e.version != epoch_version || e.conf_ver != epoch_conf_ver {
            return Ok((CmdResponse::EpochNotMatch(desc.encode_to_vec()), None));
        }
        let Some(src) = crate::merge::decode_desc(source) else {
            return Ok((CmdResponse::Rejected("undecodable source descriptor".into()), None));
        };
        if self.shared.merging.lock().is_some()
            || desc.end.is_empty()
            || src.start != desc.end
            || src.range_id == desc.range_id
        {
            return Ok((CmdResponse::Rejected("source is not the right neighbour".into()), None));
        }
        let src_id = RangeId(src.range_id);
        if let Some(node) = self.node.upgrade() {
            let deadline = Instant::now() + node.merge_wait_bound();
            while !node.source_caught_up(src_id, self.shared.range_id, frozen_index)? {
                if Instant::now() > deadline {
                    return Err(io::Error::other(format!(
                        "merge of {src_id} into {}: the local source has not applied the frozen index {frozen_index}",
                        self.shared.range_id
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        let engine = self.engine.clone();
        let (start, end) = (src.start.clone(), src.end.clone());
        let (bytes, keys) = tokio::task::spawn_blocking(move || count_span(&engine, &start, &end))
            .await
            .map_err(io_err)??;
        let se = src.epoch.unwrap_or_default();
        let Some(version) = e.version.max(se.version).checked_add(1) else {
            return Ok((CmdResponse::Rejected("range epoch version at its maximum".into()), None));
        };
        let mut merged = desc.clone();
        merged.end = src.end.clone();
        merged.epoch = Some(RangeEpoch {
            conf_ver: e.conf_ver,
            version,
        });
        // The source is retired in this batch: a restart never reopens it, its GC (Raft
        // state only: the keys are the target's now) resumes.
        let marker = crate::gc::GcMarker {
            start: src.start.clone(),
            end: src.end.clone(),
            delete_data: false,
        };
        batch.insert(
            &self.engine.meta,
            crate::gc::gc_key(src_id),
            encode(&marker).map_err(io_err)?,
        );
        let tomb = crate::gc::Tombstone {
            conf_ver: se.conf_ver,
            version: se.version,
        };
        batch.insert(
            &self.engine.meta,
            crate::gc::tomb_key(src_id),
            encode(&tomb).map_err(io_err)?,
        );
        batch.remove(&self.engine.meta, desc_key(src_id));
        // The source's keys are the target's now, and so are the versions its collected
        // tombstones had (the frozen source applies no GC, so its floor is final).
        let floor = self
            .shared
            .version_floor
            .load(Ordering::Acquire)
            .max(crate::tombgc::load_floor(&self.engine, src_id)?);
        crate::tombgc::put_floor(&self.engine, batch, self.shared.range_id, floor);
        Ok((
            CmdResponse::Merged(merged.encode_to_vec()),
            Some((src, merged, bytes, keys, floor)),
        ))
    }

    /// The descriptor after membership `m` applies: replicas from `m`, `conf_ver` + 1.
    ///
    /// `conf_ver` must be a function of the log alone, the same on every replica. A replica
    /// that replays the log from its first entry (it has applied nothing, not even a
    /// snapshot) therefore counts from the conf_ver every range has before its first
    /// membership entry, not from the descriptor it was created with: a replica added to a
    /// live range is created with the range's *current* descriptor, and counting on from
    /// that would give it a higher conf_ver than its peers for the same log.
    fn membership_desc(&self, m: &Membership) -> RangeDescriptor {
        let mut desc = self.shared.desc();
        if self.last_applied.is_none()
            && let Some(e) = desc.epoch.as_mut()
        {
            e.conf_ver = INITIAL_CONF_VER;
        }
        let voters: std::collections::BTreeSet<u64> = m.voter_ids().collect();
        let mut replicas: Vec<Replica> = voters
            .iter()
            .map(|id| Replica {
                store_id: *id,
                role: ReplicaRole::Voter as i32,
            })
            .collect();
        for id in m.learner_ids() {
            if !voters.contains(&id) {
                replicas.push(Replica {
                    store_id: id,
                    role: ReplicaRole::Learner as i32,
                });
            }
        }
        let mut epoch = desc.epoch.unwrap_or_default();
        // Saturating: a membership entry must apply; CreateReplica refuses epochs above
        // limits::MAX_EPOCH, so this never reaches u64::MAX.
        epoch.conf_ver = epoch.conf_ver.saturating_add(1);
        desc.epoch = Some(epoch);
        desc.replicas = replicas;
        desc
    }
}

/// `conf_ver` of a range before its first membership entry: placement bootstraps range 1
/// with it (docs/dev/contracts.md); ranges made by a split start from a seeded, purged log,
/// so their replicas never replay from a first entry.
pub const INITIAL_CONF_VER: u64 = 1;

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapFile;
    type SnapshotBuilder = SnapBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Entries that are ready together are applied in one atomic batch (data + applied
        // state); split and membership entries are applied alone.
        let mut chunks = entries.ready_chunks(256);
        while let Some(items) = chunks.next().await {
            let started = Instant::now();
            self.metrics.raft_applied_entries.inc_by(items.len() as u64);
            let mut batch = self.engine.db.batch();
            let mut overlay: Overlay = HashMap::new();
            let mut replies: Vec<(ApplyResponder<TypeConfig>, CmdResponse)> = Vec::new();
            let mut dirty = false;
            for item in items {
                let (entry, responder) = item?;
                let log_id = entry.log_id();
                match entry.payload {
                    EntryPayload::Blank => {
                        self.last_applied = Some(log_id);
                        dirty = true;
                        if let Some(r) = responder {
                            replies.push((r, CmdResponse::None));
                        }
                    }
                    EntryPayload::Normal(Command::Write { key, op, condition, .. }) => {
                        let resp = self.apply_write(&mut batch, &mut overlay, key, op, condition)?;
                        self.last_applied = Some(log_id);
                        dirty = true;
                        if let Some(r) = responder {
                            replies.push((r, resp));
                        }
                    }
                    EntryPayload::Normal(Command::Batch { ops, .. }) => {
                        let resp = self.apply_batch(&mut batch, &mut overlay, ops)?;
                        self.last_applied = Some(log_id);
                        dirty = true;
                        if let Some(r) = responder {
                            replies.push((r, resp));
                        }
                    }
                    EntryPayload::Normal(Command::Ingest { records, .. }) => {
                        let resp = self.apply_ingest(&mut batch, &mut overlay, records)?;
                        self.last_applied = Some(log_id);
                        dirty = true;
                        if let Some(r) = responder {
                            replies.push((r, resp));
                        }
                    }
                    payload => {
                        if dirty {
                            let b = std::mem::replace(&mut batch, self.engine.db.batch());
                            self.commit_applied(b, &mut overlay, &mut replies)?;
                            dirty = false;
                        }
                        let mut new_desc: Option<RangeDescriptor> = None;
                        let mut split: Option<SplitOutcome> = None;
                        let mut extra = (0i64, 0i64);
                        let mut removed_self = false;
                        let mut merging_after: Option<Option<crate::merge::MergeState>> = None;
                        let mut merge_done: Option<(RangeDescriptor, RangeDescriptor)> = None;
                        let mut floor_after: Option<u64> = None;
                        let mut collected: Vec<Vec<u8>> = Vec::new();
                        let resp = match payload {
                            EntryPayload::Normal(Command::Split {
                                split_key,
                                new_range_id,
                                epoch_version,
                            }) => {
                                let (resp, s) = self
                                    .apply_split(&mut batch, split_key, new_range_id, epoch_version)
                                    .await?;
                                crate::crash_point!(crate::failpoints::MID_SPLIT);
                                if let CmdResponse::Split { left, .. } = &resp {
                                    new_desc = RangeDescriptor::decode(&left[..]).ok();
                                }
                                if let Some((right, seeded, _)) = &s {
                                    // The right half's counters: one scan of its span (the
                                    // data there is all applied: earlier entries committed).
                                    let engine = self.engine.clone();
                                    let (start, end) = (right.start.clone(), right.end.clone());
                                    let (bytes, keys) =
                                        tokio::task::spawn_blocking(move || count_span(&engine, &start, &end))
                                            .await
                                            .map_err(io_err)??;
                                    extra = (-(bytes as i64), -(keys as i64));
                                    if *seeded {
                                        let rs = RangeStats {
                                            bytes,
                                            keys,
                                            applied_index: super::SPLIT_INIT_INDEX,
                                        };
                                        batch.insert(
                                            &self.engine.meta,
                                            stats_key(RangeId(right.range_id)),
                                            encode_stats(&rs)?,
                                        );
                                    }
                                }
                                split = s;
                                resp
                            }
                            EntryPayload::Normal(Command::PrepareMerge {
                                target_id,
                                epoch_version,
                                epoch_conf_ver,
                                target_version,
                                target_conf_ver,
                            }) => {
                                let desc = self.shared.desc();
                                let e = desc.epoch.unwrap_or_default();
                                if self.shared.merging.lock().is_some() {
                                    CmdResponse::Rejected("the range is already frozen by a merge".into())
                                } else if e.version != epoch_version || e.conf_ver != epoch_conf_ver {
                                    CmdResponse::EpochNotMatch(desc.encode_to_vec())
                                } else if e.version == u64::MAX {
                                    CmdResponse::Rejected("range epoch version at its maximum".into())
                                } else {
                                    let mut frozen = desc.clone();
                                    frozen.epoch = Some(RangeEpoch {
                                        conf_ver: e.conf_ver,
                                        version: e.version + 1,
                                    });
                                    let st = crate::merge::MergeState {
                                        target_id,
                                        frozen_index: log_id.index(),
                                        target_version,
                                        target_conf_ver,
                                    };
                                    batch.insert(
                                        &self.engine.meta,
                                        crate::merge::merge_key(self.shared.range_id),
                                        crate::merge::encode_state(&st)?,
                                    );
                                    merging_after = Some(Some(st));
                                    new_desc = Some(frozen.clone());
                                    CmdResponse::Frozen {
                                        desc: frozen.encode_to_vec(),
                                        index: log_id.index(),
                                    }
                                }
                            }
                            EntryPayload::Normal(Command::RollbackMerge { target_id }) => {
                                let frozen_for =
                                    self.shared.merging.lock().as_ref().map(|m| m.target_id) == Some(target_id);
                                if frozen_for {
                                    let mut d = self.shared.desc();
                                    let mut e = d.epoch.unwrap_or_default();
                                    // Saturating: bounded by limits::MAX_EPOCH (see conf_ver).
                                    e.version = e.version.saturating_add(1);
                                    d.epoch = Some(e);
                                    batch.remove(&self.engine.meta, crate::merge::merge_key(self.shared.range_id));
                                    merging_after = Some(None);
                                    new_desc = Some(d);
                                    CmdResponse::None
                                } else {
                                    CmdResponse::Rejected("not frozen for a merge into that range".into())
                                }
                            }
                            EntryPayload::Normal(Command::CommitMerge {
                                source,
                                frozen_index,
                                epoch_version,
                                epoch_conf_ver,
                            }) => {
                                let (resp, m) = self
                                    .apply_commit_merge(
                                        &mut batch,
                                        &source,
                                        frozen_index,
                                        epoch_version,
                                        epoch_conf_ver,
                                    )
                                    .await?;
                                crate::crash_point!(crate::failpoints::MID_MERGE);
                                if let Some((src, merged, b, k, floor)) = m {
                                    new_desc = Some(merged.clone());
                                    extra = (b as i64, k as i64);
                                    merge_done = Some((src, merged));
                                    floor_after = Some(floor);
                                }
                                resp
                            }
                            EntryPayload::Normal(Command::GcTombstones { entries }) => {
                                let (resp, gc) = self.apply_gc(&mut batch, entries)?;
                                if let Some((floor, removed)) = gc {
                                    floor_after = Some(floor);
                                    collected = removed;
                                }
                                resp
                            }
                            EntryPayload::Membership(m) => {
                                // Only an entry that REMOVES this store counts: a replica
                                // replaying the log from its start also applies memberships
                                // from before it was added.
                                if let Some(node) = self.node.upgrade() {
                                    let me = node.store_id.0;
                                    let member = |m: &Membership| {
                                        m.voter_ids().any(|v| v == me) || m.learner_ids().any(|v| v == me)
                                    };
                                    removed_self = member(self.membership.membership()) && !member(&m);
                                }
                                new_desc = Some(self.membership_desc(&m));
                                self.membership = StoredMembership::new(Some(log_id), m);
                                CmdResponse::None
                            }
                            _ => CmdResponse::None,
                        };
                        self.last_applied = Some(log_id);
                        let b = std::mem::replace(&mut batch, self.engine.db.batch());
                        self.commit_applied_with(b, new_desc, &mut Overlay::new(), &mut Vec::new(), extra)?;
                        if let Some(f) = floor_after {
                            self.shared.version_floor.store(f, Ordering::Release);
                        }
                        if !collected.is_empty() {
                            self.engine.cache.invalidate(collected.iter().map(|k| &k[..]));
                            self.metrics.tombstones_collected.inc_by(collected.len() as u64);
                        }
                        if let Some(m) = merging_after {
                            *self.shared.merging.lock() = m;
                        }
                        if let Some((src, merged)) = merge_done
                            && let Some(node) = self.node.upgrade()
                        {
                            node.on_merge_applied(self.shared.range_id, src, merged);
                        }
                        if removed_self {
                            // Not destroyed here. A replica that replays the log (a store
                            // added back after it was removed) applies that old removal too,
                            // while the leader counts it as a member again; destroying it
                            // would wipe a live member's log. Placement names the replica
                            // stale once its map proves the removal (gc::verify_stale).
                            tracing::info!(range_id = %self.shared.range_id, "applied a membership without this store; waiting for placement to confirm before destroying");
                        }
                        if let Some((right, seeded, guard)) = split
                            && let Some(node) = self.node.upgrade()
                        {
                            node.on_split_applied(self.shared.range_id, right, seeded, guard).await;
                        }
                        if let Some(r) = responder {
                            r.send(resp);
                        }
                    }
                }
            }
            if dirty {
                self.commit_applied(batch, &mut overlay, &mut replies)?;
            }
            self.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapBuilder {
            engine: self.engine.clone(),
            range: self.shared.range_id,
            snap_dir: self.snap_dir.clone(),
            current: self.current.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapFile) -> Result<(), io::Error> {
        let engine = self.engine.clone();
        let range = self.shared.range_id;
        let meta2 = meta.clone();
        let path = snapshot.path.clone();
        // The whole file is checked before anything is modified (the receiving service
        // checked it too; this also covers other callers).
        let p = path.clone();
        let desc = tokio::task::spawn_blocking(move || validate_snapshot_file(&p))
            .await
            .map_err(io_err)??;
        if desc.range_id != range.0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot of another range"));
        }
        // Redo marker: the install writes several batches; if the node dies (or the install
        // fails) half-way, the next start re-runs the install from the (fsynced) file before
        // opening the range, or, if it cannot, makes the replica uninitialized.
        // The file's data was fsynced; its name must be durable too before a marker names
        // it (an fsync of a file does not make its directory entry durable under POSIX).
        if let Some(dir) = path.parent() {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || crate::engine::sync_dir(&dir))
                .await
                .map_err(io_err)??;
        }
        let marker = encode(&InstallMarker {
            path: path.to_string_lossy().into_owned(),
            meta: meta.clone(),
            start: desc.start.clone(),
            end: desc.end.clone(),
        })
        .map_err(io_err)?;
        self.shared.installing.store(true, Ordering::Release);
        self.engine.meta.insert(installing_key(range), marker).map_err(io_err)?;
        self.engine.sync().await?;
        // On failure the marker stays: the data may be half-replaced. openraft stops the
        // group on this storage error; the next start finishes or undoes the install.
        crate::crash_point!(crate::failpoints::MID_SNAPSHOT_INSTALL);
        let (desc, floor) = tokio::task::spawn_blocking(move || install_from_file(&engine, range, &meta2, snapshot))
            .await
            .map_err(io_err)??;
        self.shared.version_floor.store(floor, Ordering::Release);
        // Durable before the new state is published (and before openraft acts on it).
        self.engine.sync().await?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.shared.publish(Some(desc), *self.membership.log_id());
        self.shared.initialized.store(true, Ordering::Release);
        if let Some(l) = &meta.last_log_id {
            self.shared.applied_index.store(l.index(), Ordering::Release);
        }
        self.shared.installing.store(false, Ordering::Release);
        self.recount_stats().await?;
        replace_current(&self.current, meta.clone(), Some(path));
        // A replica bootstrapped from a checkpoint that still needed the leader's snapshot
        // (the leader's log no longer reached the checkpoint): counted as a fallback.
        if let Some(node) = self.node.upgrade() {
            node.on_snapshot_installed(range);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapFile>>, io::Error> {
        let cur = self.current.lock().clone();
        let Some((meta, path)) = cur else {
            return Ok(None);
        };
        // A file that exists and covers the range's span is sent as it is. Otherwise one is
        // written now, from the engine as it is: after a compaction that recorded only a
        // meta, or when the file was built before a split or a merge (it carries the old
        // span; sent to a store that holds the other half live, it would overlap it and be
        // refused forever). This runs on the state machine's worker, between applies, so
        // the data, the applied state and the descriptor agree; the meta sent is the one of
        // the file (at or after the recorded one), so the follower continues from there.
        if let Some(path) = path
            && snapshot_span_matches(&path, &self.shared.desc())
            && let Ok(f) = SnapFile::open(path)
        {
            return Ok(Some(openraft::storage::Snapshot { meta, snapshot: f }));
        }
        let (engine, range, dir) = (self.engine.clone(), self.shared.range_id, self.snap_dir.clone());
        let started = Instant::now();
        let (meta, path) = tokio::task::spawn_blocking(move || build_to_file(&engine, range, &dir))
            .await
            .map_err(io_err)??;
        self.metrics.snapshot_phase("build", started.elapsed());
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        tracing::info!(
            range_id = %range,
            index = ?meta.last_log_id.map(|l| l.index()),
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot file written for a follower"
        );
        replace_current(&self.current, meta.clone(), Some(path.clone()));
        let f = SnapFile::open(path)?;
        Ok(Some(openraft::storage::Snapshot { meta, snapshot: f }))
    }
}

/// Whether the snapshot file at `path` covers exactly the span of `desc` (an unreadable
/// header counts as a mismatch, so the snapshot is rebuilt).
fn snapshot_span_matches(path: &Path, desc: &RangeDescriptor) -> bool {
    let header = std::fs::File::open(path).and_then(|f| SnapReader::open(BufReader::with_capacity(4096, f)));
    match header {
        Ok(r) => r.desc.start == desc.start && r.desc.end == desc.end,
        Err(_) => false,
    }
}

pub struct SnapBuilder {
    engine: Arc<Engine>,
    range: RangeId,
    snap_dir: PathBuf,
    current: CurrentSnapshot,
    shared: Arc<RangeShared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapBuilder {
    type SnapshotData = SnapFile;

    /// Log compaction: records the applied state as the snapshot's meta, without copying
    /// the range (see [`CurrentSnapshot`]). The meta is read from a consistent engine view;
    /// the applied state it names is in the engine's journal before openraft purges any log
    /// entry it covers, so a purge that survives a crash implies the state it relies on does.
    async fn build_snapshot(&mut self) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapFile>, io::Error> {
        let (engine, range, dir) = (self.engine.clone(), self.range, self.snap_dir.clone());
        let floor = self.shared.checkpoint_floor.load(Ordering::Acquire);
        let (meta, empty) = tokio::task::spawn_blocking(move || {
            let mut meta = snapshot_meta(&engine, range)?;
            // A leader keeps its log from the range's latest checkpoint (ADR 0027): the meta
            // is recorded there, so openraft purges only up to it (minus the kept entries).
            let applied = meta.last_log_id.map_or(0, |l| l.index());
            let membership = meta.last_membership.log_id().map_or(0, |l| l.index());
            let floor_max = super::bootstrap::FLOOR_MAX_ENTRIES;
            if let Some(at) = super::bootstrap::compaction_point(applied, floor, membership, floor_max)
                && let Some(log_id) = super::bootstrap::log_id_at(&engine, range, at)?
            {
                meta.last_log_id = Some(log_id);
            }
            Ok::<_, io::Error>((meta, SnapFile::meta_only(&dir)?))
        })
        .await
        .map_err(io_err)??;
        replace_current(&self.current, meta.clone(), None);
        Ok(openraft::storage::Snapshot { meta, snapshot: empty })
    }
}

// Snapshot file format (v2):
//   "SKVSNAP2" ++ frame(descriptor) ++ (frame(key) ++ frame(record))* ++ u32::MAX
//   ++ u64 BE pair count ++ u64 BE FNV-1a checksum of every byte before the count.
// A frame is a u32 BE length then the bytes. Keys are strictly ascending and inside the
// descriptor; records are data-keyspace records (tombstones included). The whole file is
// validated before an install modifies anything.

pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn bad_snap(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad snapshot: {msg}"))
}

/// Writes the snapshot format, checksumming as it goes.
struct SnapWriter<W: Write> {
    w: W,
    hash: u64,
    count: u64,
}

impl<W: Write> SnapWriter<W> {
    /// Starts a file of `desc` with the range's version `floor` (ADR 0034) in its
    /// descriptor frame.
    fn new(w: W, desc: &RangeDescriptor, floor: u64) -> io::Result<Self> {
        let mut s = Self {
            w,
            hash: FNV_OFFSET,
            count: 0,
        };
        s.put(SNAP_MAGIC)?;
        let mut d = desc.encode_to_vec();
        crate::tombgc::append_floor(&mut d, floor);
        s.frame(&d)?;
        Ok(s)
    }
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.hash = fnv1a(self.hash, b);
        self.w.write_all(b)
    }
    fn frame(&mut self, b: &[u8]) -> io::Result<()> {
        let len = u32::try_from(b.len())
            .ok()
            .filter(|l| *l != END_FRAME)
            .ok_or_else(|| bad_snap("frame too large"))?;
        self.put(&len.to_be_bytes())?;
        self.put(b)
    }
    fn pair(&mut self, k: &[u8], v: &[u8]) -> io::Result<()> {
        self.frame(k)?;
        self.frame(v)?;
        self.count += 1;
        Ok(())
    }
    fn finish(mut self) -> io::Result<W> {
        self.put(&END_FRAME.to_be_bytes())?;
        let (count, hash) = (self.count, self.hash);
        self.w.write_all(&count.to_be_bytes())?;
        self.w.write_all(&hash.to_be_bytes())?;
        Ok(self.w)
    }
}

/// Reads and checks the snapshot format: every pair is checked as it is read (order, span,
/// record encoding) and the trailer (count, checksum, end of file) at the end.
struct SnapReader<R: Read> {
    r: R,
    hash: u64,
    count: u64,
    desc: RangeDescriptor,
    /// The range's version floor carried in the descriptor frame (0 when absent).
    floor: u64,
    last: Option<Vec<u8>>,
    done: bool,
}

impl<R: Read> SnapReader<R> {
    fn open(r: R) -> io::Result<Self> {
        let mut s = Self {
            r,
            hash: FNV_OFFSET,
            count: 0,
            desc: RangeDescriptor::default(),
            floor: 0,
            last: None,
            done: false,
        };
        let mut magic = [0u8; 8];
        s.get(&mut magic)?;
        if &magic != SNAP_MAGIC {
            return Err(bad_snap("not an skv snapshot (v2)"));
        }
        let d = s.frame()?.ok_or_else(|| bad_snap("no descriptor"))?;
        s.desc = RangeDescriptor::decode(&d[..]).map_err(|e| bad_snap(&e.to_string()))?;
        s.floor = crate::tombgc::floor_of(&d).ok_or_else(|| bad_snap("bad descriptor fields"))?;
        Ok(s)
    }
    fn get(&mut self, b: &mut [u8]) -> io::Result<()> {
        self.r.read_exact(b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => bad_snap("truncated"),
            _ => e,
        })?;
        self.hash = fnv1a(self.hash, b);
        Ok(())
    }
    /// A frame, or `None` at the end marker.
    fn frame(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        self.get(&mut len)?;
        let len = u32::from_be_bytes(len);
        if len == END_FRAME {
            return Ok(None);
        }
        if len as usize > 64 << 20 {
            return Err(bad_snap("frame too large"));
        }
        let mut b = vec![0u8; len as usize];
        self.get(&mut b)?;
        Ok(Some(b))
    }
    /// The next (key, record) pair; `None` once the trailer checked out.
    fn next_pair(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let Some(k) = self.frame()? else {
            let hash = self.hash;
            let mut t = [0u8; 16];
            self.r.read_exact(&mut t).map_err(|_| bad_snap("truncated trailer"))?;
            let mut extra = [0u8; 1];
            if self.r.read(&mut extra)? != 0 {
                return Err(bad_snap("data after the trailer"));
            }
            let (count, sum) = t.split_at(8);
            if u64::from_be_bytes(count.try_into().map_err(io_err)?) != self.count {
                return Err(bad_snap("pair count mismatch"));
            }
            if u64::from_be_bytes(sum.try_into().map_err(io_err)?) != hash {
                return Err(bad_snap("checksum mismatch"));
            }
            self.done = true;
            return Ok(None);
        };
        let v = self.frame()?.ok_or_else(|| bad_snap("key without a value"))?;
        if decode_record(&v).is_none() {
            return Err(bad_snap("bad record"));
        }
        if !desc_contains(&self.desc, &k) {
            return Err(bad_snap("key outside the descriptor"));
        }
        if self.last.as_ref().is_some_and(|l| *l >= k) {
            return Err(bad_snap("keys out of order"));
        }
        self.last = Some(k.clone());
        self.count += 1;
        Ok(Some((k, v)))
    }
}

/// Reads a whole snapshot file and checks it (format, order, span, count, checksum)
/// without touching the engine. Returns its descriptor.
pub fn validate_snapshot_file(path: &Path) -> io::Result<RangeDescriptor> {
    let mut r = SnapReader::open(BufReader::with_capacity(1 << 20, std::fs::File::open(path)?))?;
    while r.next_pair()?.is_some() {}
    Ok(r.desc)
}

/// The applied state of `range` in `snap`, as a snapshot meta.
fn applied_in(engine: &Engine, snap: &fjall::Snapshot, range: RangeId) -> io::Result<AppliedState> {
    use fjall::Readable;
    Ok(match snap.get(&engine.meta, applied_key(range)).map_err(io_err)? {
        Some(v) => decode(&v).map_err(io_err)?,
        None => AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
        },
    })
}

/// The meta of a snapshot of `range` taken now (no data copied).
fn snapshot_meta(engine: &Engine, range: RangeId) -> io::Result<SnapshotMeta> {
    let applied = applied_in(engine, &engine.db.snapshot(), range)?;
    Ok(SnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership,
    })
}

fn build_to_file(engine: &Engine, range: RangeId, dir: &Path) -> io::Result<(SnapshotMeta, PathBuf)> {
    use fjall::Readable;
    let snap = engine.db.snapshot();
    let applied = applied_in(engine, &snap, range)?;
    let desc = match snap.get(&engine.meta, desc_key(range)).map_err(io_err)? {
        Some(v) => RangeDescriptor::decode(&v[..]).map_err(io_err)?,
        None => return Err(io::Error::other("no descriptor for snapshot")),
    };
    let floor = crate::tombgc::floor_in(engine, &snap, range)?;
    std::fs::create_dir_all(dir)?;
    let idx = applied.last_applied.map(|l| l.index()).unwrap_or(0);
    let path = dir.join(format!("{}-{}-{}.snap", range.0, idx, rand::random::<u32>()));
    let tmp = path.with_extension("tmp");
    let mut w = SnapWriter::new(
        BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?),
        &desc,
        floor,
    )?;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(&desc.start, &desc.end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        w.pair(&k, &v)?;
    }
    let mut w = w.finish()?;
    w.flush()?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    crate::engine::sync_dir(dir)?;
    let meta = SnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership,
    };
    Ok((meta, path))
}

/// Commits an apply's batch. The caller stops the node on an error (fail-stop, ADR 0029):
/// fjall's journal is shared by every range, so after a failed write nothing tells which
/// of this batch's or later batches' pages reach the disk, and the entries being applied
/// are already acknowledged to nobody but committed in the log: a restart replays them.
fn commit_apply(batch: fjall::OwnedWriteBatch) -> io::Result<()> {
    fail::fail_point!(crate::failpoints::APPLY_ERROR, |_| Err(io::Error::other(
        "injected write error (failpoint storenode::apply::commit_error)"
    )));
    batch.commit().map_err(io_err)
}

/// Commits one batch of a snapshot install; a write error stops the node (fail-stop, ADR
/// 0029), as in apply.
fn commit_install(batch: fjall::OwnedWriteBatch) {
    if let Err(e) = batch.commit() {
        crate::engine::fail_stop("a snapshot install write", &e);
    }
}

fn install_from_file(
    engine: &Engine,
    range: RangeId,
    meta: &SnapshotMeta,
    snap: SnapFile,
) -> io::Result<(RangeDescriptor, u64)> {
    use fjall::Readable;
    let mut r = SnapReader::open(BufReader::with_capacity(1 << 20, snap.file))?;
    let desc = r.desc.clone();
    if desc.range_id != range.0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot of another range"));
    }
    let local = engine.db.snapshot();
    let mut local_iter = local.range::<&[u8], _>(&engine.data, data_range(&desc.start, &desc.end));
    let mut next_local = move || -> io::Result<Option<Vec<u8>>> {
        match local_iter.next() {
            None => Ok(None),
            Some(g) => Ok(Some(g.key().map_err(io_err)?.to_vec())),
        }
    };
    let mut batch = engine.db.batch();
    let mut bytes = 0usize;
    // Keys written or removed by the uncommitted batch: dropped from the value cache
    // after each commit.
    let mut touched: Vec<Vec<u8>> = Vec::new();
    let flush = |batch: &mut fjall::OwnedWriteBatch, bytes: &mut usize, touched: &mut Vec<Vec<u8>>| -> io::Result<()> {
        if *bytes >= INSTALL_BATCH_BYTES {
            commit_install(std::mem::replace(batch, engine.db.batch()));
            engine.cache.invalidate(touched.iter().map(|k| &k[..]));
            touched.clear();
            *bytes = 0;
        }
        Ok(())
    };
    let mut cur = next_local()?;
    while let Some((k, v)) = r.next_pair()? {
        // Merge join: local keys sorting before `k` are absent from the snapshot.
        while let Some(lk) = cur.take() {
            match lk.cmp(&k) {
                std::cmp::Ordering::Less => {
                    bytes += lk.len();
                    batch.remove(&engine.data, lk.clone());
                    touched.push(lk);
                    cur = next_local()?;
                }
                std::cmp::Ordering::Equal => {
                    cur = next_local()?;
                    break;
                }
                std::cmp::Ordering::Greater => {
                    cur = Some(lk);
                    break;
                }
            }
        }
        bytes += k.len() + v.len();
        batch.insert(&engine.data, k.clone(), v);
        touched.push(k);
        flush(&mut batch, &mut bytes, &mut touched)?;
    }
    while let Some(lk) = cur {
        bytes += lk.len();
        batch.remove(&engine.data, lk.clone());
        touched.push(lk);
        flush(&mut batch, &mut bytes, &mut touched)?;
        cur = next_local()?;
    }
    batch.insert(
        &engine.meta,
        applied_key(range),
        encode_applied(meta.last_log_id, meta.last_membership.clone())?,
    );
    batch.insert(&engine.meta, desc_key(range), desc.encode_to_vec());
    crate::tombgc::put_floor(engine, &mut batch, range, r.floor);
    batch.remove(&engine.meta, installing_key(range));
    commit_install(batch);
    engine.cache.invalidate(touched.iter().map(|k| &k[..]));
    Ok((desc, r.floor))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct InstallMarker {
    path: String,
    meta: SnapshotMeta,
    /// The key span the install writes (the snapshot's descriptor).
    start: Vec<u8>,
    end: Vec<u8>,
}

/// Starts an install that does not come from a local snapshot file (a bootstrap from an
/// object-storage checkpoint, ADR 0027): writes the redo marker for `[start, end)` with no
/// file, so a crash before [`finish_external_install`] makes the next start undo it
/// ([`recover_interrupted_installs`] cannot redo it and uninitializes the replica).
pub(crate) fn begin_external_install(engine: &Engine, range: RangeId, start: &[u8], end: &[u8]) -> io::Result<()> {
    let marker = encode(&InstallMarker {
        path: String::new(),
        meta: SnapshotMeta::default(),
        start: start.to_vec(),
        end: end.to_vec(),
    })
    .map_err(io_err)?;
    engine.meta.insert(installing_key(range), marker).map_err(io_err)
}

/// Ends an external install in `batch` (with its applied state and descriptor): removes
/// the marker, so the commit of that batch makes the install visible at once.
pub(crate) fn finish_external_install(engine: &Engine, batch: &mut fjall::OwnedWriteBatch, range: RangeId) {
    batch.remove(&engine.meta, installing_key(range));
}

/// Undoes a failed external install: deletes what it wrote in `[start, end)`, the applied
/// state and the Raft log of `range`, and the marker (see [`uninitialize_replica`]).
pub(crate) fn abort_external_install(engine: &Engine, range: RangeId, start: &[u8], end: &[u8]) -> io::Result<()> {
    uninitialize_replica(engine, range, Some((start.to_vec(), end.to_vec())))
}

fn installing_key(range: RangeId) -> Vec<u8> {
    let mut k = b"installing/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

/// Finishes snapshot installs interrupted by a crash or a failure (run at start, before
/// any range opens). Returns the ranges repaired. A marker that cannot be redone (file
/// gone or corrupt, marker undecodable, install error) makes that replica uninitialized
/// ([`uninitialize_replica`]) instead of failing the node start: it then waits for a new
/// snapshot from its leader.
pub fn recover_interrupted_installs(engine: &Engine) -> io::Result<Vec<RangeId>> {
    let mut markers = Vec::new();
    for g in engine.meta.prefix(b"installing/") {
        let (k, v) = g.into_inner().map_err(io_err)?;
        let Some(id) = k.get(11..19).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            continue;
        };
        markers.push((RangeId(u64::from_be_bytes(id)), v.to_vec()));
    }
    let mut done = Vec::new();
    for (range, v) in markers {
        let marker: Option<InstallMarker> = decode(&v).ok();
        let redo = || -> io::Result<()> {
            let m = marker
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "undecodable install marker"))?;
            let path = PathBuf::from(&m.path);
            let desc = validate_snapshot_file(&path)?;
            if desc.range_id != range.0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot of another range"));
            }
            install_from_file(engine, range, &m.meta, SnapFile::open(path)?).map(|_| ())
        };
        match redo() {
            Ok(()) => {
                tracing::warn!(range_id = %range, "finished a snapshot install interrupted by a crash");
                done.push(range);
            }
            Err(e) => {
                tracing::error!(range_id = %range, error = %e, "interrupted snapshot install cannot be redone: the replica becomes uninitialized");
                let span = marker.map(|m| (m.start, m.end));
                uninitialize_replica(engine, range, span)?;
            }
        }
    }
    if !done.is_empty() {
        engine.persist()?;
    }
    Ok(done)
}

/// Makes a replica uninitialized after a snapshot install that cannot be finished: its
/// data in the install's span (or, without one, in its stored descriptor when it was
/// initialized), its applied state and its Raft log, purged and committed ids are deleted;
/// its vote and descriptor stay (it must not vote twice; it reopens as a peer waiting for
/// a snapshot). The marker is removed in the last batch, so a crash here is redone.
fn uninitialize_replica(engine: &Engine, range: RangeId, span: Option<(Vec<u8>, Vec<u8>)>) -> io::Result<()> {
    use crate::engine::{TAG_VOTE, raft_key};
    let span = match span {
        Some(s) => Some(s),
        None if engine.meta.get(applied_key(range)).map_err(io_err)?.is_some() => {
            match engine.meta.get(desc_key(range)).map_err(io_err)? {
                Some(v) => RangeDescriptor::decode(&v[..]).ok().map(|d| (d.start, d.end)),
                None => None,
            }
        }
        None => None,
    };
    let mut batch = engine.db.batch();
    let mut touched: Vec<Vec<u8>> = Vec::new();
    if let Some((start, end)) = &span {
        for g in engine.data.range::<&[u8], _>(data_range(start, end)) {
            let k = g.key().map_err(io_err)?;
            touched.push(k.to_vec());
            batch.remove(&engine.data, k);
            if touched.len() >= 4096 {
                std::mem::replace(&mut batch, engine.db.batch())
                    .commit()
                    .map_err(io_err)?;
                engine.cache.invalidate(touched.iter().map(|k| &k[..]));
                touched.clear();
            }
        }
    }
    let vote = raft_key(range, TAG_VOTE);
    for g in engine.raft.prefix(range.0.to_be_bytes()) {
        let k = g.key().map_err(io_err)?;
        if k[..] != vote[..] {
            batch.remove(&engine.raft, k);
        }
    }
    batch.remove(&engine.meta, applied_key(range));
    batch.remove(&engine.meta, crate::tombgc::floor_key(range));
    batch.remove(&engine.meta, installing_key(range));
    batch.commit().map_err(io_err)?;
    engine.cache.invalidate(touched.iter().map(|k| &k[..]));
    engine.persist()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::encode_value;

    fn engine() -> (tempfile::TempDir, Arc<Engine>) {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        (dir, e)
    }

    /// An engine holding range 1 (`a`..`z`, epoch version `version`) with its descriptor and
    /// an applied state at the split-init log id; no data.
    fn seeded_range(version: u64) -> (tempfile::TempDir, Arc<Engine>, RangeDescriptor, LogId) {
        let desc = RangeDescriptor {
            range_id: 1,
            start: b"a".to_vec(),
            end: b"z".to_vec(),
            epoch: Some(RangeEpoch { conf_ver: 1, version }),
            replicas: vec![],
        };
        let log_id = crate::raft::split_init_log_id();
        let (dir, e) = engine();
        e.meta.insert(desc_key(RangeId(1)), desc.encode_to_vec()).unwrap();
        e.meta
            .insert(
                applied_key(RangeId(1)),
                encode_applied(Some(log_id), StoredMembership::default()).unwrap(),
            )
            .unwrap();
        (dir, e, desc, log_id)
    }

    fn write(sm: &StateMachine, key: &[u8], op: WriteOp, cond: Option<u64>) -> (bool, u64, bool) {
        let mut batch = sm.engine.db.batch();
        let mut overlay = HashMap::new();
        let r = sm
            .apply_write(&mut batch, &mut overlay, key.to_vec(), op, cond)
            .unwrap();
        batch.commit().unwrap();
        for (k, (rec, _)) in overlay {
            sm.engine.cache.publish(k, crate::cache::Cached::Record(rec));
        }
        match r {
            CmdResponse::Write {
                succeeded,
                version,
                existed,
            } => (succeeded, version, existed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leader_contacts_count_only_once_their_commit_index_is_applied() {
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut c = LeaderContacts::default();
        assert_eq!(c.fresh_as_of(u64::MAX), None);
        c.record(at(0), 10);
        c.record(at(100), 10); // same commit index: the newer contact replaces it
        c.record(at(200), 20);
        c.record(at(300), 30);
        // Applied everything: fresh as of the latest contact.
        assert_eq!(c.fresh_as_of(30), Some(at(300)));
        // Applying behind: the latest contact whose commit index is applied.
        assert_eq!(c.fresh_as_of(25), Some(at(200)));
        assert_eq!(c.fresh_as_of(10), Some(at(100)));
        // Behind every recent contact (a catching-up follower): none.
        assert_eq!(c.fresh_as_of(9), None);
        // A lower commit index learnt later (a new leader that has not learnt the old
        // commit yet) does not lower what must be applied: the highest learnt counts.
        c.record(at(400), 15);
        assert_eq!(c.fresh_as_of(25), Some(at(200)));
        assert_eq!(c.fresh_as_of(30), Some(at(400)));
        // Bounded memory.
        for i in 0..100u64 {
            c.record(at(500 + i), 100 + i);
        }
        assert!(c.recent.len() <= CONTACTS_KEPT);
        assert_eq!(c.fresh_as_of(199), Some(at(599)));
        assert_eq!(c.fresh_as_of(30), None);
    }

    #[test]
    fn size_and_key_counters_follow_puts_and_deletes_and_are_persisted_with_the_applied_state() {
        let (dir, e) = engine();
        let desc = RangeDescriptor {
            range_id: 1,
            ..Default::default()
        };
        let open = || {
            StateMachine::open(
                e.clone(),
                RangeShared::new(desc.clone(), true),
                Weak::new(),
                dir.path().join("snaps"),
                Metrics::new(),
            )
            .unwrap()
        };
        let mut sm = open();
        let apply = |sm: &mut StateMachine, ops: Vec<(&[u8], WriteOp)>| {
            let mut batch = sm.engine.db.batch();
            let mut overlay = HashMap::new();
            for (k, op) in ops {
                sm.apply_write(&mut batch, &mut overlay, k.to_vec(), op, None).unwrap();
            }
            sm.commit_applied(batch, &mut overlay, &mut Vec::new()).unwrap();
            sm.shared.approximate_size()
        };
        let put = |v: &[u8]| WriteOp::Put(v.to_vec());
        assert_eq!(apply(&mut sm, vec![(b"k1", put(b"abc"))]), (5, 1));
        assert_eq!(apply(&mut sm, vec![(b"k1", put(b"abcdef"))]), (8, 1));
        assert_eq!(apply(&mut sm, vec![(b"k2", put(b"x"))]), (11, 2));
        assert_eq!(apply(&mut sm, vec![(b"k1", WriteOp::Delete)]), (3, 1));
        assert_eq!(apply(&mut sm, vec![(b"k1", WriteOp::Delete)]), (3, 1));
        assert_eq!(apply(&mut sm, vec![(b"k1", put(b"z"))]), (6, 2));
        // Within one batch the overlay carries sizes too.
        assert_eq!(
            apply(
                &mut sm,
                vec![
                    (b"k3", put(b"12345")),
                    (b"k3", put(b"1")),
                    (b"k2", WriteOp::Delete),
                    (b"k3", WriteOp::Delete)
                ]
            ),
            (3, 1)
        );
        assert_eq!(crate::stats::count_span(&e, b"", b"").unwrap(), (3, 1));
        // Persisted with the applied state: a reopen reads them back without a scan.
        drop(sm);
        let sm = open();
        assert_eq!(sm.shared.approximate_size(), (3, 1));
        // Counters that do not match the applied index are recounted at open.
        e.meta
            .insert(
                stats_key(RangeId(1)),
                encode_stats(&RangeStats {
                    bytes: 999,
                    keys: 9,
                    applied_index: 7,
                })
                .unwrap(),
            )
            .unwrap();
        e.meta
            .insert(
                applied_key(RangeId(1)),
                encode_applied(Some(crate::raft::split_init_log_id()), StoredMembership::default()).unwrap(),
            )
            .unwrap();
        drop(sm);
        assert_eq!(open().shared.approximate_size(), (3, 1));
    }

    #[test]
    fn versions_survive_delete_so_a_stale_cas_cannot_match_a_new_incarnation() {
        let (dir, e) = engine();
        let desc = RangeDescriptor {
            range_id: 1,
            ..Default::default()
        };
        let sm = StateMachine::open(
            e.clone(),
            RangeShared::new(desc, true),
            Weak::new(),
            dir.path().join("snaps"),
            Metrics::new(),
        )
        .unwrap();
        let put = |v: &[u8]| WriteOp::Put(v.to_vec());
        assert_eq!(write(&sm, b"k", put(b"a"), None), (true, 1, false));
        assert_eq!(write(&sm, b"k", WriteOp::Delete, None), (true, 0, true));
        // Deleted: reads as absent, if-absent (0) matches, a stale version does not.
        assert_eq!(e.get_data(b"k").unwrap(), None);
        assert_eq!(write(&sm, b"k", put(b"x"), Some(1)), (false, 0, false));
        assert_eq!(write(&sm, b"k", WriteOp::Delete, None), (true, 0, false));
        assert_eq!(write(&sm, b"k", put(b"b"), Some(0)), (true, 2, false));
        // The old incarnation's version 1 does not match the new one (version 2).
        assert_eq!(write(&sm, b"k", put(b"stale"), Some(1)), (false, 2, true));
        assert_eq!(e.get_data(b"k").unwrap(), Some((2, b"b".to_vec())));
        assert_eq!(write(&sm, b"k", put(b"c"), Some(2)), (true, 3, true));

        // In one batch, the overlay sees the tombstone too.
        let mut batch = e.db.batch();
        let mut overlay = HashMap::new();
        sm.apply_write(&mut batch, &mut overlay, b"k".to_vec(), WriteOp::Delete, None)
            .unwrap();
        let r = sm
            .apply_write(&mut batch, &mut overlay, b"k".to_vec(), put(b"d"), Some(0))
            .unwrap();
        batch.commit().unwrap();
        assert_eq!(
            r,
            CmdResponse::Write {
                succeeded: true,
                version: 4,
                existed: false
            }
        );
    }

    /// Overflow audit (issue 14): an Ingest entry with a record version above
    /// limits::MAX_RECORD_VERSION is rejected at apply (every replica decides alike) and
    /// writes nothing; a split of a range whose epoch version is u64::MAX is rejected
    /// instead of wrapping.
    #[tokio::test]
    async fn values_that_would_overflow_are_rejected_at_apply() {
        let (dir, e) = engine();
        let desc = RangeDescriptor {
            range_id: 1,
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: u64::MAX,
            }),
            ..Default::default()
        };
        let mut sm = StateMachine::open(
            e.clone(),
            RangeShared::new(desc, true),
            Weak::new(),
            dir.path().join("snaps"),
            Metrics::new(),
        )
        .unwrap();
        let ingest = |sm: &StateMachine, version: u64| {
            let mut batch = e.db.batch();
            let mut overlay = HashMap::new();
            let r = sm
                .apply_ingest(
                    &mut batch,
                    &mut overlay,
                    vec![
                        super::super::IngestOp {
                            key: b"a".to_vec(),
                            record: encode_value(1, b"v"),
                        },
                        super::super::IngestOp {
                            key: b"b".to_vec(),
                            record: encode_value(version, b"v"),
                        },
                    ],
                )
                .unwrap();
            batch.commit().unwrap();
            for (k, (rec, _)) in overlay {
                e.cache.publish(k, crate::cache::Cached::Record(rec));
            }
            r
        };
        let r = ingest(&sm, skv_common::limits::MAX_RECORD_VERSION + 1);
        assert!(
            matches!(&r, CmdResponse::Rejected(m) if m.contains("record version")),
            "{r:?}"
        );
        assert_eq!(
            e.get_record(b"a").unwrap(),
            None,
            "nothing of a rejected ingest is written"
        );
        let r = ingest(&sm, skv_common::limits::MAX_RECORD_VERSION);
        assert_eq!(r, CmdResponse::Ingested { written: 2, skipped: 0 });
        // A put continues from the bound, far from a wrap.
        assert_eq!(
            write(&sm, b"b", WriteOp::Put(b"w".to_vec()), None),
            (true, skv_common::limits::MAX_RECORD_VERSION + 1, true)
        );

        let mut batch = e.db.batch();
        let (r, outcome) = sm.apply_split(&mut batch, b"m".to_vec(), 2, u64::MAX).await.unwrap();
        assert!(matches!(&r, CmdResponse::Rejected(m) if m.contains("maximum")), "{r:?}");
        assert!(outcome.is_none());
    }

    #[test]
    fn a_batch_applies_in_order_and_atomically_or_not_at_all() {
        let (dir, e) = engine();
        let desc = RangeDescriptor {
            range_id: 1,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            ..Default::default()
        };
        let sm = StateMachine::open(
            e.clone(),
            RangeShared::new(desc, true),
            Weak::new(),
            dir.path().join("snaps"),
            Metrics::new(),
        )
        .unwrap();
        let op = |k: &[u8], op: WriteOp, condition| BatchOp {
            key: k.to_vec(),
            op,
            condition,
        };
        let put = |v: &[u8]| WriteOp::Put(v.to_vec());
        let apply = |ops: Vec<BatchOp>| {
            let mut batch = e.db.batch();
            let mut overlay = HashMap::new();
            let r = sm.apply_batch(&mut batch, &mut overlay, ops).unwrap();
            batch.commit().unwrap();
            for (k, (rec, _)) in overlay {
                e.cache.publish(k, crate::cache::Cached::Record(rec));
            }
            r
        };
        // A key outside the range: nothing at all is written.
        let r = apply(vec![op(b"b", put(b"1"), None), op(b"x", put(b"1"), None)]);
        assert!(matches!(r, CmdResponse::KeyNotInRange(_)), "{r:?}");
        assert_eq!(e.get_record(b"b").unwrap(), None);
        // In order: later ops see earlier ones; each condition on its own.
        let r = apply(vec![
            op(b"b", put(b"1"), Some(0)),
            op(b"b", put(b"2"), Some(1)),
            op(b"b", put(b"3"), Some(1)),
            op(b"b", WriteOp::Delete, None),
            op(b"b", put(b"4"), None),
        ]);
        let w = |succeeded, version, existed| WriteOutcome {
            succeeded,
            version,
            existed,
        };
        assert_eq!(
            r,
            CmdResponse::Batch(vec![
                w(true, 1, false),
                w(true, 2, true),
                w(false, 2, true),
                w(true, 0, true),
                w(true, 3, false),
            ])
        );
        assert_eq!(e.get_data(b"b").unwrap(), Some((3, b"4".to_vec())));
    }

    #[tokio::test]
    async fn a_corrupt_snapshot_is_refused_before_anything_is_modified() {
        let r = RangeId(1);
        let desc = RangeDescriptor {
            range_id: 1,
            start: b"a".to_vec(),
            end: b"z".to_vec(),
            ..Default::default()
        };
        let (_da, a) = engine();
        a.meta.insert(desc_key(r), desc.encode_to_vec()).unwrap();
        for i in 0..100u32 {
            a.data
                .insert(format!("k{i:03}"), encode_value(1, &[b'v'; 100]))
                .unwrap();
        }
        let snap_dir = tempfile::tempdir().unwrap();
        let (meta, path) = build_to_file(&a, r, snap_dir.path()).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() * 3 / 4;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();

        let (db, b) = engine();
        b.data.insert(b"k000", encode_value(7, b"local")).unwrap();
        b.data.insert(b"b", encode_value(7, b"local-only")).unwrap();
        let shared = RangeShared::new(desc.clone(), true);
        let mut sm = StateMachine::open(
            b.clone(),
            shared.clone(),
            Weak::new(),
            db.path().join("snaps"),
            Metrics::new(),
        )
        .unwrap();
        let snap = SnapFile::open(path).unwrap();
        assert!(sm.install_snapshot(&meta, snap).await.is_err());
        // Untouched: local data, no marker, no applied state, still serving.
        assert_eq!(b.get_data(b"k000").unwrap(), Some((7, b"local".to_vec())));
        assert_eq!(b.get_data(b"b").unwrap(), Some((7, b"local-only".to_vec())));
        assert_eq!(b.get_data(b"k001").unwrap(), None);
        assert!(b.meta.get(installing_key(r)).unwrap().is_none());
        assert!(b.meta.get(applied_key(r)).unwrap().is_none());
        assert!(!shared.installing.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn compaction_copies_nothing_and_a_send_writes_the_file_once() {
        let (dir, e, desc, log_id) = seeded_range(1);
        for i in 0..100u32 {
            e.data
                .insert(format!("k{i:03}"), encode_value(u64::from(i) + 1, b"v"))
                .unwrap();
        }
        let snaps = dir.path().join("snaps");
        let mut sm = StateMachine::open(
            e.clone(),
            RangeShared::new(desc.clone(), true),
            Weak::new(),
            snaps.clone(),
            Metrics::new(),
        )
        .unwrap();
        let files = |d: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(d)
                .map(|it| {
                    it.filter_map(|x| x.ok().map(|x| x.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
                        .collect()
                })
                .unwrap_or_default()
        };

        // Compaction: the meta of the applied state, and no copy of the range.
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id));
        assert!(
            files(&snaps).is_empty(),
            "compaction wrote a snapshot file: {:?}",
            files(&snaps)
        );

        // A follower needs it: the file is written then, with every pair, and reused.
        let sent = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(sent.meta.last_log_id, Some(log_id));
        assert_eq!(validate_snapshot_file(&sent.snapshot.path).unwrap(), desc);
        assert_eq!(files(&snaps), vec![sent.snapshot.path.clone()]);
        let again = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(again.snapshot.path, sent.snapshot.path);

        // The next compaction drops the file; the next send writes a new one.
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert!(files(&snaps).is_empty());
        let third = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_ne!(third.snapshot.path, sent.snapshot.path);
        assert_eq!(files(&snaps), vec![third.snapshot.path.clone()]);
    }

    #[test]
    fn snapshot_round_trip_and_interrupted_install_is_redone() {
        let r = RangeId(1);
        // Source: two keys in range, one outside.
        let (_da, a, desc, log_id) = seeded_range(3);
        a.data.insert(b"b", encode_value(1, b"new-b")).unwrap();
        a.data.insert(b"c", encode_value(2, b"new-c")).unwrap();
        a.data.insert(b"zz", encode_value(1, b"outside")).unwrap();
        a.data.insert(b"e", crate::engine::encode_tombstone(4)).unwrap();
        let snap_dir = tempfile::tempdir().unwrap();
        let (meta, path) = build_to_file(&a, r, snap_dir.path()).unwrap();
        assert_eq!(meta.last_log_id, Some(log_id));
        assert_eq!(validate_snapshot_file(&path).unwrap(), desc);

        // Target: stale keys, one absent from the snapshot, one outside the range; a crash
        // left the redo marker behind.
        let (_db, b) = engine();
        b.data.insert(b"c", encode_value(9, b"old-c")).unwrap();
        b.data.insert(b"d", encode_value(9, b"old-d")).unwrap();
        b.data.insert(b"zz", encode_value(9, b"keep")).unwrap();
        let marker = encode(&InstallMarker {
            path: path.to_string_lossy().into_owned(),
            meta: meta.clone(),
            start: desc.start.clone(),
            end: desc.end.clone(),
        })
        .unwrap();
        b.meta.insert(installing_key(r), marker).unwrap();
        // Read (so cached) before the install: the value cache must not answer them after.
        assert_eq!(b.get_data(b"b").unwrap(), None);
        assert_eq!(b.get_data(b"c").unwrap(), Some((9, b"old-c".to_vec())));
        assert_eq!(b.get_data(b"d").unwrap(), Some((9, b"old-d".to_vec())));
        assert_eq!(recover_interrupted_installs(&b).unwrap(), vec![r]);
        assert_eq!(b.get_data(b"b").unwrap(), Some((1, b"new-b".to_vec())));
        assert_eq!(b.get_data(b"c").unwrap(), Some((2, b"new-c".to_vec())));
        assert_eq!(b.get_data(b"d").unwrap(), None);
        assert_eq!(b.get_data(b"zz").unwrap(), Some((9, b"keep".to_vec())));
        // Tombstones travel with the snapshot (versions keep rising after a delete).
        assert_eq!(
            b.get_record(b"e").unwrap(),
            Some(crate::engine::Record::Tombstone { version: 4 })
        );
        assert!(b.meta.get(installing_key(r)).unwrap().is_none());
        assert!(b.meta.get(applied_key(r)).unwrap().is_some());
        assert_eq!(b.load_descriptors().unwrap(), vec![desc.clone()]);
        // Nothing left to redo.
        assert!(recover_interrupted_installs(&b).unwrap().is_empty());

        // Any corruption of the file is caught by validation, before anything is written.
        let bytes = std::fs::read(&path).unwrap();
        let bad = snap_dir.path().join("bad.snap");
        for i in [8, 20, bytes.len() / 2, bytes.len() - 3] {
            let mut b2 = bytes.clone();
            b2[i] ^= 0x40;
            std::fs::write(&bad, &b2).unwrap();
            assert!(validate_snapshot_file(&bad).is_err(), "flip at {i} not caught");
        }
        std::fs::write(&bad, &bytes[..bytes.len() - 17]).unwrap();
        assert!(validate_snapshot_file(&bad).is_err(), "truncation not caught");
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(&bad, &longer).unwrap();
        assert!(validate_snapshot_file(&bad).is_err(), "trailing bytes not caught");

        // A marker whose file is corrupt cannot be redone: the replica becomes
        // uninitialized (data in the span, applied state and log gone; vote and descriptor
        // kept; other ranges untouched) and the node still starts.
        let vote: crate::raft::Vote = openraft::Vote::new(7, 2);
        b.raft
            .insert(
                crate::engine::raft_key(r, crate::engine::TAG_VOTE),
                encode(&vote).unwrap(),
            )
            .unwrap();
        b.raft.insert(crate::engine::log_key(r, 3), b"entry".to_vec()).unwrap();
        let mut b2 = bytes.clone();
        let mid = b2.len() / 2;
        b2[mid] ^= 0x40;
        std::fs::write(&bad, &b2).unwrap();
        let marker = encode(&InstallMarker {
            path: bad.to_string_lossy().into_owned(),
            meta: meta.clone(),
            start: desc.start.clone(),
            end: desc.end.clone(),
        })
        .unwrap();
        b.meta.insert(installing_key(r), marker).unwrap();
        // An undecodable marker of another range is handled per range too.
        b.meta
            .insert(installing_key(RangeId(2)), b"\xff\xff garbage".to_vec())
            .unwrap();
        assert!(recover_interrupted_installs(&b).unwrap().is_empty());
        assert_eq!(b.get_data(b"b").unwrap(), None);
        assert_eq!(b.get_data(b"c").unwrap(), None);
        assert_eq!(b.get_data(b"zz").unwrap(), Some((9, b"keep".to_vec())));
        assert!(b.meta.get(applied_key(r)).unwrap().is_none());
        assert!(b.meta.get(installing_key(r)).unwrap().is_none());
        assert!(b.meta.get(installing_key(RangeId(2))).unwrap().is_none());
        assert!(b.raft.get(crate::engine::log_key(r, 3)).unwrap().is_none());
        assert_eq!(crate::raft::log_store::read_vote(&b, r).unwrap(), Some(vote));
        assert_eq!(b.load_descriptors().unwrap(), vec![desc]);
    }
}
