//! Raft log storage of one range in the shared `raft` keyspace.
//! Appends are written to fjall at once (so they are readable) and acknowledged to
//! openraft only after the group-commit fsync that covers them.

use super::{Entry, LogId, TypeConfig, Vote, decode, encode};
use crate::engine::{
    Engine, TAG_COMMITTED, TAG_LOG, TAG_PURGE_FLOOR, TAG_PURGED, TAG_VOTE, io_err, log_index_of, log_key, raft_key,
};
use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use skv_common::RangeId;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    range: RangeId,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, range: RangeId) -> Self {
        Self { engine, range }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, tag: u8) -> io::Result<Option<T>> {
        match self.engine.raft.get(raft_key(self.range, tag)).map_err(io_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(&v).map_err(io_err)?)),
        }
    }

    /// Deletes the log entries in `[from, to_exclusive)` in batches of `REMOVE_CHUNK`.
    ///
    /// The batches are separate commits, so a crash can stop the deletion half-way. The
    /// direction keeps the log contiguous whatever the crash point:
    /// - `HighestFirst` (truncation of a conflicting suffix): what remains is a prefix of
    ///   the old log — never an old-term suffix after a hole (openraft's `truncate_after`
    ///   contract);
    /// - `LowestFirst` (purge, after the purged log id is recorded): what remains is a
    ///   suffix starting after a purged index. Each of its batches also records the purge
    ///   floor (every index below it is deleted), the last one `to_exclusive`.
    fn remove_logs(&self, from: u64, to_exclusive: u64, order: RemoveOrder) -> io::Result<()> {
        self.remove_logs_chunked(from, to_exclusive, order, REMOVE_CHUNK, usize::MAX)
    }

    /// [`Self::remove_logs`] with the chunk size and a cap on committed chunks (tests
    /// simulate a crash after `max_chunks` commits). Returns after the last commit.
    fn remove_logs_chunked(
        &self,
        from: u64,
        to_exclusive: u64,
        order: RemoveOrder,
        chunk: usize,
        max_chunks: usize,
    ) -> io::Result<()> {
        if from >= to_exclusive {
            return Ok(());
        }
        let lo = log_key(self.range, from);
        let hi = log_key(self.range, to_exclusive);
        let iter = self.engine.raft.range(lo..hi);
        let keys: Box<dyn Iterator<Item = fjall::Guard>> = match order {
            RemoveOrder::LowestFirst => Box::new(iter),
            RemoveOrder::HighestFirst => Box::new(iter.rev()),
        };
        let floor_key = raft_key(self.range, TAG_PURGE_FLOOR);
        let mut batch = self.engine.db.batch();
        let mut n = 0usize;
        let mut committed = 0usize;
        for g in keys {
            let k = g.key().map_err(io_err)?;
            let index = log_index_of(&k);
            batch.remove(&self.engine.raft, k);
            n += 1;
            if n >= chunk.max(1) {
                if let (RemoveOrder::LowestFirst, Some(i)) = (order, index) {
                    let floor = i.saturating_add(1);
                    batch.insert(&self.engine.raft, floor_key.clone(), encode(&floor).map_err(io_err)?);
                }
                std::mem::replace(&mut batch, self.engine.db.batch())
                    .commit()
                    .map_err(io_err)?;
                n = 0;
                committed += 1;
                if committed >= max_chunks {
                    return Ok(());
                }
            }
        }
        if order == RemoveOrder::LowestFirst {
            batch.insert(&self.engine.raft, floor_key, encode(&to_exclusive).map_err(io_err)?);
        }
        batch.commit().map_err(io_err)
    }
}

/// Commits a log append's batch (a write error stops the node: fail-stop, ADR 0029).
fn commit_append(batch: fjall::OwnedWriteBatch) -> io::Result<()> {
    fail::fail_point!(crate::failpoints::APPEND_ERROR, |_| Err(io::Error::other(
        "injected write error (failpoint storenode::log::append_error)"
    )));
    batch.commit().map_err(io_err)
}

/// Entries deleted per batch by [`LogStore::remove_logs`].
const REMOVE_CHUNK: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RemoveOrder {
    LowestFirst,
    HighestFirst,
}

/// Writes the seeded Raft state of a group born from a split into `batch`, replacing
/// whatever Raft state an uninitialized peer of that range left behind: its log and other
/// records are deleted in the SAME batch (one commit: no window where the state is cleared
/// but not seeded), and the vote is never lowered — an existing vote that does not sort
/// below the seed vote is kept (the peer may have granted it to a candidate; writing an
/// older vote over it would let it vote twice in one term).
///
/// The caller must hold the node's creation lock with the range stopped, so that no peer
/// of `range` writes its vote between this read and the batch commit.
/// Returns the vote written.
pub fn seed_split_state(engine: &Engine, batch: &mut fjall::OwnedWriteBatch, range: RangeId) -> io::Result<Vote> {
    let init = super::split_init_vote();
    let vote = match read_vote(engine, range)? {
        Some(old) if old.partial_cmp(&init) != Some(std::cmp::Ordering::Less) => old,
        _ => init,
    };
    let keep = [
        raft_key(range, TAG_VOTE),
        raft_key(range, TAG_PURGED),
        raft_key(range, TAG_COMMITTED),
    ];
    for g in engine.raft.prefix(range.0.to_be_bytes()) {
        let k = g.key().map_err(io_err)?;
        // Keys rewritten below are not also removed: one batch must not both remove and
        // insert the same key.
        if !keep.iter().any(|x| x.as_slice() == &k[..]) {
            batch.remove(&engine.raft, k);
        }
    }
    let log_id = super::split_init_log_id();
    batch.insert(&engine.raft, raft_key(range, TAG_VOTE), encode(&vote).map_err(io_err)?);
    batch.insert(
        &engine.raft,
        raft_key(range, TAG_PURGED),
        encode(&log_id).map_err(io_err)?,
    );
    batch.insert(
        &engine.raft,
        raft_key(range, TAG_COMMITTED),
        encode(&Some(log_id)).map_err(io_err)?,
    );
    Ok(vote)
}

/// Reads the stored vote of a range, if any.
pub fn read_vote(engine: &Engine, range: RangeId) -> io::Result<Option<Vote>> {
    match engine.raft.get(raft_key(range, TAG_VOTE)).map_err(io_err)? {
        None => Ok(None),
        Some(v) => Ok(Some(decode(&v).map_err(io_err)?)),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let lo = log_key(self.range, start);
        let hi = raft_key(self.range, TAG_LOG + 1);
        let mut out = Vec::new();
        for g in self.engine.raft.range(lo..hi) {
            let (k, v) = g.into_inner().map_err(io_err)?;
            let Some(idx) = log_index_of(&k) else { break };
            if !range.contains(&idx) {
                break;
            }
            let e: Entry = decode(&v).map_err(io_err)?;
            out.push(e);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(TAG_VOTE)
    }

    /// Entries for ONE AppendEntries message: `[start, end)` cut to about
    /// [`APPEND_BYTES_BUDGET`] of encoded entries (always at least one entry).
    ///
    /// This is how openraft 0.10.0-alpha.37 lets storage bound a replication payload: its
    /// replication stream (`replication/stream_state.rs`) asks for at most
    /// `max_payload_entries` entries through this method, sends what it returns as one
    /// request with `last` = the last entry returned, and continues the stream from there
    /// (no partial-success round trip, the pipeline keeps going). So the byte bound lives
    /// here, measured on the stored (postcard) bytes, which are the entries' wire size.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        self.read_bounded(start, end, APPEND_BYTES_BUDGET)
    }
}

/// Soft byte budget of the entries of one AppendEntries message (at least one entry is
/// always sent, so a message carries at most this plus one entry).
pub const APPEND_BYTES_BUDGET: usize = 4 << 20;

impl LogStore {
    /// The entries of `[start, end)` from `start` on, stopping before the one that would take
    /// the encoded total past `budget` (the first entry is always included).
    fn read_bounded(&self, start: u64, end: u64, budget: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let mut bytes = 0usize;
        for g in self
            .engine
            .raft
            .range(log_key(self.range, start)..log_key(self.range, end))
        {
            let (_, v) = g.into_inner().map_err(io_err)?;
            if !out.is_empty() && bytes + v.len() > budget {
                break;
            }
            bytes += v.len();
            out.push(decode::<Entry>(&v).map_err(io_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = self.get_meta(TAG_PURGED)?;
        let last = self.engine.raft.prefix(raft_key(self.range, TAG_LOG)).next_back();
        let last_log_id = match last {
            None => purged,
            Some(g) => {
                let (_, v) = g.into_inner().map_err(io_err)?;
                let e: Entry = decode(&v).map_err(io_err)?;
                Some(e.log_id())
            }
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        if let Err(e) = self
            .engine
            .raft
            .insert(raft_key(self.range, TAG_VOTE), encode(vote).map_err(io_err)?)
        {
            crate::engine::fail_stop("a Raft vote write", &e);
        }
        self.engine.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.engine
            .raft
            .insert(raft_key(self.range, TAG_COMMITTED), encode(&committed).map_err(io_err)?)
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(TAG_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = self.engine.db.batch();
        for e in entries {
            batch.insert(
                &self.engine.raft,
                log_key(self.range, e.index()),
                encode(&e).map_err(io_err)?,
            );
        }
        if let Err(e) = commit_append(batch) {
            crate::engine::fail_stop("a Raft log append", &e);
        }
        crate::crash_point!(crate::failpoints::AFTER_APPEND_BEFORE_FSYNC);
        self.engine.after_sync(Box::new(move |r| callback.io_completed(r)));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.remove_logs(from, u64::MAX, RemoveOrder::HighestFirst)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.engine
            .raft
            .insert(raft_key(self.range, TAG_PURGED), encode(&log_id).map_err(io_err)?)
            .map_err(io_err)?;
        // From the floor the previous purge left, not from 0: an LSM range scan from 0 steps
        // over the tombstone of every entry ever purged that compaction has not dropped yet,
        // so each purge cost more than the last (writes slowed down run after run).
        let floor: u64 = self.get_meta(TAG_PURGE_FLOOR)?.unwrap_or(0);
        self.remove_logs(floor, log_id.index() + 1, RemoveOrder::LowestFirst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn entry(term: u64, index: u64) -> Entry {
        let log_id = openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 }, index);
        Entry::new_blank(log_id)
    }

    fn indexes(s: &LogStore) -> Vec<u64> {
        s.engine
            .raft
            .prefix(raft_key(s.range, TAG_LOG))
            .map(|g| log_index_of(&g.key().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn interrupted_truncation_never_leaves_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        let s = LogStore::new(e.clone(), RangeId(7));
        for i in 1..=10 {
            e.raft
                .insert(log_key(s.range, i), encode(&entry(1, i)).unwrap())
                .unwrap();
        }
        // truncate_after(3) "crashes" after one chunk of 2 deletions: the remaining log
        // must still be contiguous (1..=8), not 1..=3 then an old suffix after a hole.
        s.remove_logs_chunked(4, u64::MAX, RemoveOrder::HighestFirst, 2, 1)
            .unwrap();
        assert_eq!(indexes(&s), (1..=8).collect::<Vec<_>>());
        // Purge interrupted: the remaining log is a contiguous suffix.
        s.remove_logs_chunked(0, 6, RemoveOrder::LowestFirst, 2, 1).unwrap();
        assert_eq!(indexes(&s), (3..=8).collect::<Vec<_>>());
        // Uninterrupted truncation removes the whole suffix.
        s.remove_logs(5, u64::MAX, RemoveOrder::HighestFirst).unwrap();
        assert_eq!(indexes(&s), vec![3, 4]);
    }

    #[tokio::test]
    async fn a_purge_starts_at_the_floor_the_last_one_left() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        let mut s = LogStore::new(e.clone(), RangeId(7));
        let floor = |s: &LogStore| s.get_meta::<u64>(TAG_PURGE_FLOOR).unwrap();
        for i in 1..=10 {
            e.raft
                .insert(log_key(s.range, i), encode(&entry(1, i)).unwrap())
                .unwrap();
        }
        assert_eq!(floor(&s), None);
        // A purge "crashing" after its first chunk of 2 records how far it got.
        s.remove_logs_chunked(0, 6, RemoveOrder::LowestFirst, 2, 1).unwrap();
        assert_eq!(indexes(&s), (3..=10).collect::<Vec<_>>());
        assert_eq!(floor(&s), Some(3));
        // The next purge resumes there and ends with the floor past its last index.
        s.purge(entry(1, 6).log_id()).await.unwrap();
        assert_eq!(indexes(&s), (7..=10).collect::<Vec<_>>());
        assert_eq!(floor(&s), Some(7));
        // An entry below the floor is not looked at: the scan starts at the floor (this
        // one is planted; a purge never leaves one behind).
        e.raft
            .insert(log_key(s.range, 2), encode(&entry(1, 2)).unwrap())
            .unwrap();
        s.purge(entry(1, 8).log_id()).await.unwrap();
        assert_eq!(indexes(&s), vec![2, 9, 10]);
        assert_eq!(floor(&s), Some(9));
        // Truncations do not move the floor.
        s.remove_logs(10, u64::MAX, RemoveOrder::HighestFirst).unwrap();
        assert_eq!(floor(&s), Some(9));
    }

    #[test]
    fn replication_reads_are_bounded_by_bytes_with_at_least_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        let s = LogStore::new(e.clone(), RangeId(7));
        let big = |i: u64| {
            let log_id = openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term: 1, node_id: 1 }, i);
            Entry::new_normal(
                log_id,
                crate::raft::Command::Write {
                    key: format!("k{i}").into_bytes(),
                    op: crate::raft::WriteOp::Put(vec![7; 100 * 1024]),
                    condition: None,
                    epoch_version: 1,
                },
            )
        };
        for i in 1..=100 {
            e.raft.insert(log_key(s.range, i), encode(&big(i)).unwrap()).unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut reader = s.clone();
        // 100 entries of ~100 KiB, asked for all of them: about 4 MiB come back.
        let got = rt.block_on(reader.limited_get_log_entries(1, 101)).unwrap();
        let bytes: usize = got.iter().map(|e| encode(e).unwrap().len()).sum();
        assert!(got.len() >= 30 && got.len() < 100, "{}", got.len());
        assert!(bytes <= APPEND_BYTES_BUDGET, "{bytes}");
        assert_eq!(got.first().map(|e| e.index()), Some(1));
        assert_eq!(got.last().map(|e| e.index()), Some(got.len() as u64));
        // The requested end still bounds it; a budget below one entry still gives one.
        let got = rt.block_on(reader.limited_get_log_entries(5, 8)).unwrap();
        assert_eq!(got.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![5, 6, 7]);
        let got = s.read_bounded(10, 101, 10).unwrap();
        assert_eq!(got.iter().map(|e| e.index()).collect::<Vec<_>>(), vec![10]);
        assert!(s.read_bounded(10, 10, 10).unwrap().is_empty());
    }

    #[test]
    fn split_seed_clears_old_state_in_its_batch_and_never_lowers_the_vote() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        let r = RangeId(9);
        // An uninitialized peer granted a vote at term 6 and holds stray entries.
        let granted: Vote = openraft::Vote::new(6, 3);
        e.raft.insert(raft_key(r, TAG_VOTE), encode(&granted).unwrap()).unwrap();
        for i in 1..=3 {
            e.raft.insert(log_key(r, i), encode(&entry(6, i)).unwrap()).unwrap();
        }
        let mut batch = e.db.batch();
        assert_eq!(seed_split_state(&e, &mut batch, r).unwrap(), granted);
        // Nothing is cleared before the seed batch commits.
        assert_eq!(indexes(&LogStore::new(e.clone(), r)), vec![1, 2, 3]);
        batch.commit().unwrap();
        assert_eq!(read_vote(&e, r).unwrap(), Some(granted));
        assert!(indexes(&LogStore::new(e.clone(), r)).is_empty());
        let purged: LogId = decode(&e.raft.get(raft_key(r, TAG_PURGED)).unwrap().unwrap()).unwrap();
        assert_eq!(purged, crate::raft::split_init_log_id());

        // A lower vote (or none) gets the seed vote.
        let r2 = RangeId(10);
        let low: Vote = openraft::Vote::new(2, 3);
        e.raft.insert(raft_key(r2, TAG_VOTE), encode(&low).unwrap()).unwrap();
        let mut batch = e.db.batch();
        assert_eq!(
            seed_split_state(&e, &mut batch, r2).unwrap(),
            crate::raft::split_init_vote()
        );
        batch.commit().unwrap();
        assert_eq!(read_vote(&e, r2).unwrap(), Some(crate::raft::split_init_vote()));
        let r3 = RangeId(11);
        let mut batch = e.db.batch();
        assert_eq!(
            seed_split_state(&e, &mut batch, r3).unwrap(),
            crate::raft::split_init_vote()
        );
    }
}
