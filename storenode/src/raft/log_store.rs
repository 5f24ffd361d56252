//! Raft log storage of one range in the shared `raft` keyspace.
//! Appends are written to fjall at once (so they are readable) and acknowledged to
//! openraft only after the group-commit fsync that covers them.

use super::{Entry, LogId, TypeConfig, Vote, decode, encode};
use crate::engine::{Engine, TAG_COMMITTED, TAG_LOG, TAG_PURGED, TAG_VOTE, io_err, log_index_of, log_key, raft_key};
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

    fn remove_logs(&self, from: u64, to_exclusive: u64) -> io::Result<()> {
        let lo = log_key(self.range, from);
        let hi = log_key(self.range, to_exclusive);
        let mut batch = self.engine.db.batch();
        let mut n = 0usize;
        for g in self.engine.raft.range(lo..hi) {
            let k = g.key().map_err(io_err)?;
            batch.remove(&self.engine.raft, k);
            n += 1;
            if n >= 1024 {
                std::mem::replace(&mut batch, self.engine.db.batch())
                    .commit()
                    .map_err(io_err)?;
                n = 0;
            }
        }
        batch.commit().map_err(io_err)
    }
}

/// Writes the seeded Raft state of a group born from a split into `batch`.
pub fn seed_split_state(
    engine: &Engine,
    batch: &mut fjall::OwnedWriteBatch,
    range: RangeId,
    vote: &Vote,
) -> io::Result<()> {
    let log_id = super::split_init_log_id();
    batch.insert(&engine.raft, raft_key(range, TAG_VOTE), encode(vote).map_err(io_err)?);
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
    Ok(())
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
        self.engine
            .raft
            .insert(raft_key(self.range, TAG_VOTE), encode(vote).map_err(io_err)?)
            .map_err(io_err)?;
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
        batch.commit().map_err(io_err)?;
        self.engine.after_sync(Box::new(move |r| callback.io_completed(r)));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        self.remove_logs(from, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.engine
            .raft
            .insert(raft_key(self.range, TAG_PURGED), encode(&log_id).map_err(io_err)?)
            .map_err(io_err)?;
        self.remove_logs(0, log_id.index() + 1)
    }
}

/// Deletes every Raft record of a range (used when an uninitialized peer is replaced).
pub fn clear_range_raft_state(engine: &Engine, range: RangeId) -> io::Result<()> {
    let mut batch = engine.db.batch();
    for g in engine.raft.prefix(range.0.to_be_bytes()) {
        let k = g.key().map_err(io_err)?;
        batch.remove(&engine.raft, k);
    }
    batch.commit().map_err(io_err)
}
