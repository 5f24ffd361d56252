//! The replicated state machine of one range: user data in the shared `data` keyspace,
//! applied state and descriptor in `meta`, written in one atomic batch per entry.
//! Snapshots are streamed to/from files (bounded memory whatever the range size).

use super::{
    CmdResponse, Command, LogId, Membership, SnapshotMeta, StoredMembership, TypeConfig, WriteOp, decode, encode,
};
use crate::engine::{Engine, applied_key, data_range, decode_value, desc_key, encode_value, io_err};
use crate::metrics::Metrics;
use crate::node::NodeInner;
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

const SNAP_MAGIC: &[u8; 8] = b"SKVSNAP1";
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

const LOAD_SAMPLE: usize = 32;

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
        })
    }
    pub fn desc(&self) -> RangeDescriptor {
        self.desc.read().clone()
    }
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
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
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AppliedState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

pub fn encode_applied(last_applied: Option<LogId>, membership: StoredMembership) -> io::Result<Vec<u8>> {
    encode(&AppliedState {
        last_applied,
        membership,
    })
    .map_err(io_err)
}

type CurrentSnapshot = Arc<Mutex<Option<(SnapshotMeta, PathBuf)>>>;

pub struct StateMachine {
    engine: Arc<Engine>,
    shared: Arc<RangeShared>,
    node: Weak<NodeInner>,
    snap_dir: PathBuf,
    metrics: Metrics,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: CurrentSnapshot,
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
        Ok(Self {
            engine,
            shared,
            node,
            snap_dir,
            metrics,
            last_applied,
            membership,
            current: Arc::new(Mutex::new(None)),
        })
    }

    /// Commits `batch` with the applied state (and the descriptor when it changed), then
    /// publishes the new state and answers the waiting clients.
    fn commit_applied(
        &mut self,
        mut batch: fjall::OwnedWriteBatch,
        new_desc: Option<RangeDescriptor>,
        replies: &mut Vec<(ApplyResponder<TypeConfig>, CmdResponse)>,
    ) -> io::Result<()> {
        batch.insert(
            &self.engine.meta,
            applied_key(self.shared.range_id),
            encode_applied(self.last_applied, self.membership.clone())?,
        );
        if let Some(d) = &new_desc {
            batch.insert(&self.engine.meta, desc_key(self.shared.range_id), d.encode_to_vec());
        }
        batch.commit().map_err(io_err)?;
        if let Some(d) = new_desc {
            *self.shared.desc.write() = d;
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

    /// Applies one write into `batch`; `overlay` holds the versions written earlier in the
    /// same (uncommitted) batch so conditions see them.
    fn apply_write(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        overlay: &mut HashMap<Vec<u8>, Option<u64>>,
        key: Vec<u8>,
        op: WriteOp,
        condition: Option<u64>,
    ) -> io::Result<CmdResponse> {
        let desc = self.shared.desc();
        if !desc_contains(&desc, &key) {
            return Ok(CmdResponse::KeyNotInRange(desc.encode_to_vec()));
        }
        let cur_version = match overlay.get(&key) {
            Some(v) => *v,
            None => self.engine.get_data(&key)?.map(|c| c.0),
        };
        let cur = cur_version.map(|v| (v, ()));
        let cur_version = cur_version.unwrap_or(0);
        if let Some(want) = condition
            && want != cur_version
        {
            return Ok(CmdResponse::Write {
                succeeded: false,
                version: cur_version,
                existed: cur.is_some(),
            });
        }
        Ok(match op {
            WriteOp::Put(v) => {
                let version = cur_version + 1;
                overlay.insert(key.clone(), Some(version));
                batch.insert(&self.engine.data, key, encode_value(version, &v));
                CmdResponse::Write {
                    succeeded: true,
                    version,
                    existed: cur.is_some(),
                }
            }
            WriteOp::Delete => {
                if cur.is_some() {
                    overlay.insert(key.clone(), None);
                    batch.remove(&self.engine.data, key);
                }
                CmdResponse::Write {
                    succeeded: true,
                    version: 0,
                    existed: cur.is_some(),
                }
            }
        })
    }

    /// Applies a split: returns the response and, on success, the right descriptor to open.
    async fn apply_split(
        &mut self,
        batch: &mut fjall::OwnedWriteBatch,
        split_key: Vec<u8>,
        new_range_id: u64,
        epoch_version: u64,
    ) -> io::Result<(CmdResponse, Option<(RangeDescriptor, bool)>)> {
        let desc = self.shared.desc();
        let epoch = desc.epoch.unwrap_or_default();
        if epoch.version != epoch_version {
            return Ok((CmdResponse::EpochNotMatch(desc.encode_to_vec()), None));
        }
        if split_key.is_empty() || split_key <= desc.start || !desc_contains(&desc, &split_key) {
            return Ok((CmdResponse::Rejected("split key outside the range".into()), None));
        }
        if new_range_id == desc.range_id || new_range_id == 0 {
            return Ok((CmdResponse::Rejected("bad new range id".into()), None));
        }
        let new_epoch = RangeEpoch {
            conf_ver: epoch.conf_ver,
            version: epoch.version + 1,
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
        let mut seed = true;
        if let Some(node) = self.node.upgrade() {
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
            let old_vote = super::log_store::read_vote(&self.engine, right_id)?;
            super::log_store::clear_range_raft_state(&self.engine, right_id)?;
            let init = super::split_init_vote();
            let vote = match old_vote {
                Some(v) if v > init => v,
                _ => init,
            };
            super::log_store::seed_split_state(&self.engine, batch, right_id, &vote)?;
            let init_log = super::split_init_log_id();
            let m = StoredMembership::new(Some(init_log), self.membership.membership().clone());
            batch.insert(
                &self.engine.meta,
                applied_key(right_id),
                encode_applied(Some(init_log), m)?,
            );
            batch.insert(&self.engine.meta, desc_key(right_id), right.encode_to_vec());
        }
        let resp = CmdResponse::Split {
            left: left.encode_to_vec(),
            right: right.encode_to_vec(),
        };
        Ok((resp, Some((right, seed))))
    }

    fn membership_desc(&self, m: &Membership) -> RangeDescriptor {
        let mut desc = self.shared.desc();
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
        epoch.conf_ver += 1;
        desc.epoch = Some(epoch);
        desc.replicas = replicas;
        desc
    }
}

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
            let mut batch = self.engine.db.batch();
            let mut overlay: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
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
                    payload => {
                        if dirty {
                            let b = std::mem::replace(&mut batch, self.engine.db.batch());
                            self.commit_applied(b, None, &mut replies)?;
                            overlay.clear();
                            dirty = false;
                        }
                        let mut new_desc: Option<RangeDescriptor> = None;
                        let mut split: Option<(RangeDescriptor, bool)> = None;
                        let resp = match payload {
                            EntryPayload::Normal(Command::Split {
                                split_key,
                                new_range_id,
                                epoch_version,
                            }) => {
                                let (resp, s) = self
                                    .apply_split(&mut batch, split_key, new_range_id, epoch_version)
                                    .await?;
                                if let CmdResponse::Split { left, .. } = &resp {
                                    new_desc = RangeDescriptor::decode(&left[..]).ok();
                                }
                                split = s;
                                resp
                            }
                            EntryPayload::Membership(m) => {
                                new_desc = Some(self.membership_desc(&m));
                                self.membership = StoredMembership::new(Some(log_id), m);
                                CmdResponse::None
                            }
                            _ => CmdResponse::None,
                        };
                        self.last_applied = Some(log_id);
                        let b = std::mem::replace(&mut batch, self.engine.db.batch());
                        self.commit_applied(b, new_desc, &mut Vec::new())?;
                        if let Some((right, seeded)) = split
                            && let Some(node) = self.node.upgrade()
                        {
                            node.on_split_applied(self.shared.range_id, right, seeded).await;
                        }
                        if let Some(r) = responder {
                            r.send(resp);
                        }
                    }
                }
            }
            if dirty {
                self.commit_applied(batch, None, &mut replies)?;
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
        }
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: SnapFile) -> Result<(), io::Error> {
        let engine = self.engine.clone();
        let range = self.shared.range_id;
        let meta2 = meta.clone();
        let path = snapshot.path.clone();
        // Redo marker: the install writes several batches; if the node dies half-way, the
        // next start re-runs the install from the (fsynced) file before opening the range.
        let marker = encode(&InstallMarker {
            path: path.to_string_lossy().into_owned(),
            meta: meta.clone(),
        })
        .map_err(io_err)?;
        self.engine.meta.insert(installing_key(range), marker).map_err(io_err)?;
        self.engine.sync().await?;
        let res = tokio::task::spawn_blocking(move || install_from_file(&engine, range, &meta2, snapshot))
            .await
            .map_err(io_err)
            .and_then(|r| r);
        let desc = match res {
            Ok(d) => d,
            Err(e) => {
                let _ = self.engine.meta.remove(installing_key(range));
                return Err(e);
            }
        };
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        *self.shared.desc.write() = desc;
        self.shared.initialized.store(true, Ordering::Release);
        if let Some(l) = &meta.last_log_id {
            self.shared.applied_index.store(l.index(), Ordering::Release);
        }
        let old = self.current.lock().replace((meta.clone(), path.clone()));
        if let Some((_, p)) = old
            && p != path
        {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, SnapFile>>, io::Error> {
        let cur = self.current.lock().clone();
        match cur {
            None => Ok(None),
            Some((meta, path)) => match SnapFile::open(path) {
                Ok(f) => Ok(Some(openraft::storage::Snapshot { meta, snapshot: f })),
                Err(_) => Ok(None),
            },
        }
    }
}

pub struct SnapBuilder {
    engine: Arc<Engine>,
    range: RangeId,
    snap_dir: PathBuf,
    current: CurrentSnapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapBuilder {
    type SnapshotData = SnapFile;

    async fn build_snapshot(&mut self) -> Result<openraft::alias::SnapshotOf<TypeConfig, SnapFile>, io::Error> {
        let engine = self.engine.clone();
        let range = self.range;
        let dir = self.snap_dir.clone();
        let (meta, path) = tokio::task::spawn_blocking(move || build_to_file(&engine, range, &dir))
            .await
            .map_err(io_err)??;
        let old = self.current.lock().replace((meta.clone(), path.clone()));
        if let Some((_, p)) = old
            && p != path
        {
            let _ = std::fs::remove_file(p);
        }
        let f = SnapFile::open(path)?;
        Ok(openraft::storage::Snapshot { meta, snapshot: f })
    }
}

fn write_frame(w: &mut impl Write, b: &[u8]) -> io::Result<()> {
    let len = u32::try_from(b.len()).map_err(io_err)?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(b)
}

/// Reads a frame; `Ok(None)` at a clean end of file.
fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > 64 << 20 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot frame too large"));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok(Some(b))
}

fn build_to_file(engine: &Engine, range: RangeId, dir: &Path) -> io::Result<(SnapshotMeta, PathBuf)> {
    use fjall::Readable;
    let snap = engine.db.snapshot();
    let applied: AppliedState = match snap.get(&engine.meta, applied_key(range)).map_err(io_err)? {
        Some(v) => decode(&v).map_err(io_err)?,
        None => AppliedState {
            last_applied: None,
            membership: StoredMembership::default(),
        },
    };
    let desc = match snap.get(&engine.meta, desc_key(range)).map_err(io_err)? {
        Some(v) => RangeDescriptor::decode(&v[..]).map_err(io_err)?,
        None => return Err(io::Error::other("no descriptor for snapshot")),
    };
    std::fs::create_dir_all(dir)?;
    let idx = applied.last_applied.map(|l| l.index()).unwrap_or(0);
    let path = dir.join(format!("{}-{}-{}.snap", range.0, idx, rand::random::<u32>()));
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
    w.write_all(SNAP_MAGIC)?;
    write_frame(&mut w, &desc.encode_to_vec())?;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(&desc.start, &desc.end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        write_frame(&mut w, &k)?;
        write_frame(&mut w, &v)?;
    }
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    let meta = SnapshotMeta {
        last_log_id: applied.last_applied,
        last_membership: applied.membership,
    };
    Ok((meta, path))
}

/// Reads the descriptor at the head of a snapshot file.
pub fn read_snapshot_descriptor(path: &Path) -> io::Result<RangeDescriptor> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    read_header(&mut r)
}

fn read_header(r: &mut impl Read) -> io::Result<RangeDescriptor> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != SNAP_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not an skv snapshot"));
    }
    let d = read_frame(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated snapshot"))?;
    RangeDescriptor::decode(&d[..]).map_err(io_err)
}

fn install_from_file(
    engine: &Engine,
    range: RangeId,
    meta: &SnapshotMeta,
    snap: SnapFile,
) -> io::Result<RangeDescriptor> {
    use fjall::Readable;
    let mut r = BufReader::with_capacity(1 << 20, snap.file);
    let desc = read_header(&mut r)?;
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
    let flush = |batch: &mut fjall::OwnedWriteBatch, bytes: &mut usize| -> io::Result<()> {
        if *bytes >= INSTALL_BATCH_BYTES {
            std::mem::replace(batch, engine.db.batch()).commit().map_err(io_err)?;
            *bytes = 0;
        }
        Ok(())
    };
    let mut cur = next_local()?;
    while let Some(k) = read_frame(&mut r)? {
        let v = read_frame(&mut r)?.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated snapshot"))?;
        if decode_value(&v).is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad value in snapshot"));
        }
        // Merge join: local keys sorting before `k` are absent from the snapshot.
        while let Some(lk) = cur.take() {
            match lk.cmp(&k) {
                std::cmp::Ordering::Less => {
                    bytes += lk.len();
                    batch.remove(&engine.data, lk);
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
        batch.insert(&engine.data, k, v);
        flush(&mut batch, &mut bytes)?;
    }
    while let Some(lk) = cur {
        bytes += lk.len();
        batch.remove(&engine.data, lk);
        flush(&mut batch, &mut bytes)?;
        cur = next_local()?;
    }
    batch.insert(
        &engine.meta,
        applied_key(range),
        encode_applied(meta.last_log_id, meta.last_membership.clone())?,
    );
    batch.insert(&engine.meta, desc_key(range), desc.encode_to_vec());
    batch.remove(&engine.meta, installing_key(range));
    batch.commit().map_err(io_err)?;
    Ok(desc)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct InstallMarker {
    path: String,
    meta: SnapshotMeta,
}

fn installing_key(range: RangeId) -> Vec<u8> {
    let mut k = b"installing/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

/// Finishes snapshot installs interrupted by a crash (run at start, before any range opens).
/// Returns the ranges repaired.
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
        let m: InstallMarker = decode(&v).map_err(io_err)?;
        match SnapFile::open(PathBuf::from(&m.path)) {
            Ok(f) => {
                install_from_file(engine, range, &m.meta, f)?;
                tracing::warn!(range_id = %range, "finished a snapshot install interrupted by a crash");
                done.push(range);
            }
            Err(e) => {
                tracing::error!(range_id = %range, error = %e, "interrupted snapshot install cannot be redone: the file is gone");
            }
        }
    }
    Ok(done)
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

    #[test]
    fn snapshot_round_trip_and_interrupted_install_is_redone() {
        let r = RangeId(1);
        let desc = RangeDescriptor {
            range_id: 1,
            start: b"a".to_vec(),
            end: b"z".to_vec(),
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 3,
            }),
            replicas: vec![],
        };
        let log_id = crate::raft::split_init_log_id();
        // Source: two keys in range, one outside.
        let (_da, a) = engine();
        a.meta.insert(desc_key(r), desc.encode_to_vec()).unwrap();
        a.meta
            .insert(
                applied_key(r),
                encode_applied(Some(log_id), StoredMembership::default()).unwrap(),
            )
            .unwrap();
        a.data.insert(b"b", encode_value(1, b"new-b")).unwrap();
        a.data.insert(b"c", encode_value(2, b"new-c")).unwrap();
        a.data.insert(b"zz", encode_value(1, b"outside")).unwrap();
        let snap_dir = tempfile::tempdir().unwrap();
        let (meta, path) = build_to_file(&a, r, snap_dir.path()).unwrap();
        assert_eq!(meta.last_log_id, Some(log_id));
        assert_eq!(read_snapshot_descriptor(&path).unwrap(), desc);

        // Target: stale keys, one absent from the snapshot, one outside the range; a crash
        // left the redo marker behind.
        let (_db, b) = engine();
        b.data.insert(b"c", encode_value(9, b"old-c")).unwrap();
        b.data.insert(b"d", encode_value(9, b"old-d")).unwrap();
        b.data.insert(b"zz", encode_value(9, b"keep")).unwrap();
        let marker = encode(&InstallMarker {
            path: path.to_string_lossy().into_owned(),
            meta: meta.clone(),
        })
        .unwrap();
        b.meta.insert(installing_key(r), marker).unwrap();
        assert_eq!(recover_interrupted_installs(&b).unwrap(), vec![r]);
        assert_eq!(b.get_data(b"b").unwrap(), Some((1, b"new-b".to_vec())));
        assert_eq!(b.get_data(b"c").unwrap(), Some((2, b"new-c".to_vec())));
        assert_eq!(b.get_data(b"d").unwrap(), None);
        assert_eq!(b.get_data(b"zz").unwrap(), Some((9, b"keep".to_vec())));
        assert!(b.meta.get(installing_key(r)).unwrap().is_none());
        assert!(b.meta.get(applied_key(r)).unwrap().is_some());
        assert_eq!(b.load_descriptors().unwrap(), vec![desc]);
        // Nothing left to redo.
        assert!(recover_interrupted_installs(&b).unwrap().is_empty());
    }
}
