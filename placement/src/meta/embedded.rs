//! A single-process [`MetaStore`] persisted in a directory: an in-memory ordered map with
//! etcd's revision model, made durable by an append-only log (`meta.log`, fsync per
//! commit) and a periodic snapshot (`meta.snap`). Watches are served from a bounded
//! in-memory history plus a broadcast channel. Leases live in memory only: on open, keys
//! that carried a lease are deleted (their lease cannot have survived the restart).

use super::{
    EventKind, KeyValue, MetaError, MetaResult, MetaStore, Op, RangeResult, Txn, TxnResult, WatchEvent, WatchStream,
};
use async_trait::async_trait;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const HISTORY_BATCHES: usize = 4096;
const COMPACT_AFTER_RECORDS: usize = 20_000;

/// One committed revision: the keys it changed (None = deleted).
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Record {
    revision: i64,
    changes: Vec<(Vec<u8>, Option<KeyValue>)>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: i64,
    kvs: Vec<KeyValue>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

type Batch = Arc<(i64, Vec<WatchEvent>)>;

struct Inner {
    dir: PathBuf,
    /// Holds an exclusive lock on `<dir>/LOCK` for the life of the store.
    _lock: File,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    revision: i64,
    log: File,
    log_records: usize,
    compact_after: usize,
    leases: HashMap<i64, LeaseState>,
    next_lease: i64,
    history: VecDeque<Batch>,
    /// Every revision above this one is in `history` (or later).
    history_floor: i64,
    tx: broadcast::Sender<Batch>,
}

/// Embedded metadata store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a, enough to detect a torn tail.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads frames until the end or the first torn/corrupt one.
fn read_frames(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut r = BufReader::new(f);
    loop {
        let mut hdr = [0u8; 12];
        if r.read_exact(&mut hdr).is_err() {
            break;
        }
        let len = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes")) as usize;
        let sum = u64::from_le_bytes(hdr[4..12].try_into().expect("8 bytes"));
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).is_err() || checksum(&payload) != sum {
            break;
        }
        out.push(payload);
    }
    Ok(out)
}

fn in_key_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end == [0] || end.is_empty() || key < end)
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> MetaResult<Self> {
        Self::open_with(dir, COMPACT_AFTER_RECORDS)
    }

    /// Like [`EmbeddedStore::open`], snapshotting (and truncating the log) every
    /// `compact_after` records.
    pub fn open_with(dir: impl AsRef<Path>, compact_after: usize) -> MetaResult<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(MetaError::other)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(MetaError::other)?;
        if let Err(e) = lock.try_lock() {
            return Err(MetaError::Other(format!(
                "embedded metadata store {} is in use by another process ({e})",
                dir.display()
            )));
        }
        let mut kvs = BTreeMap::new();
        let mut revision = 0;
        let snap_path = dir.join("meta.snap");
        if let Some(payload) = read_frames(&snap_path).map_err(MetaError::other)?.into_iter().next() {
            let snap: Snapshot = postcard::from_bytes(&payload).map_err(MetaError::other)?;
            revision = snap.revision;
            kvs = snap.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        }
        let log_path = dir.join("meta.log");
        let frames = read_frames(&log_path).map_err(MetaError::other)?;
        let mut valid_len = 0u64;
        let mut log_records = 0;
        for payload in &frames {
            let rec: Record = match postcard::from_bytes(payload) {
                Ok(r) => r,
                Err(_) => break,
            };
            valid_len += 12 + payload.len() as u64;
            log_records += 1;
            if rec.revision <= revision {
                continue;
            }
            revision = rec.revision;
            for (k, v) in rec.changes {
                match v {
                    Some(kv) => kvs.insert(k, kv),
                    None => kvs.remove(&k),
                };
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&log_path)
            .map_err(MetaError::other)?;
        // Drop a torn tail so that later appends follow valid records.
        log.set_len(valid_len).map_err(MetaError::other)?;
        let (tx, _) = broadcast::channel(1024);
        let mut inner = Inner {
            dir,
            _lock: lock,
            kvs,
            revision,
            log,
            log_records,
            compact_after: compact_after.max(1),
            leases: HashMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            history_floor: revision,
            tx,
        };
        // Leases do not survive a restart: drop their keys.
        let leased: Vec<Vec<u8>> = inner
            .kvs
            .values()
            .filter(|kv| kv.lease != 0)
            .map(|kv| kv.key.clone())
            .collect();
        if !leased.is_empty() {
            inner.commit(leased.into_iter().map(Op::delete).collect())?;
        }
        inner.history_floor = inner.revision;
        inner.history.clear();
        let inner = Arc::new(Mutex::new(inner));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(expire_leases(Arc::downgrade(&inner)));
        }
        Ok(Self { inner })
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.inner.lock().revision
    }
}

async fn expire_leases(inner: Weak<Mutex<Inner>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut g = inner.lock();
        let now = Instant::now();
        let expired: Vec<i64> = g
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Err(e) = g.revoke(id) {
                tracing::warn!(lease = id, error = %e, "embedded store: lease expiry failed");
            }
        }
    }
}

impl Inner {
    /// Applies `ops` as one revision, durably. Returns the new revision.
    fn commit(&mut self, ops: Vec<Op>) -> MetaResult<i64> {
        if ops.is_empty() {
            return Ok(self.revision);
        }
        let rev = self.revision + 1;
        // Work on an overlay so that a failed write leaves memory untouched.
        let mut changes: BTreeMap<Vec<u8>, Option<KeyValue>> = BTreeMap::new();
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    if lease != 0 && !self.leases.contains_key(&lease) {
                        return Err(MetaError::LeaseNotFound(lease));
                    }
                    let prev = match changes.get(&key) {
                        Some(p) => p.clone(),
                        None => self.kvs.get(&key).cloned(),
                    };
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(1, |p| p.version + 1),
                        lease,
                    };
                    events.push(WatchEvent {
                        kind: EventKind::Put,
                        kv: kv.clone(),
                    });
                    changes.insert(key, Some(kv));
                }
                Op::Delete { key } => {
                    let exists = match changes.get(&key) {
                        Some(p) => p.is_some(),
                        None => self.kvs.contains_key(&key),
                    };
                    if exists {
                        events.push(WatchEvent {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key: key.clone(),
                                value: Vec::new(),
                                create_revision: 0,
                                mod_revision: rev,
                                version: 0,
                                lease: 0,
                            },
                        });
                        changes.insert(key, None);
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok(self.revision);
        }
        let rec = Record {
            revision: rev,
            changes: changes.into_iter().collect(),
        };
        let payload = postcard::to_stdvec(&rec).map_err(MetaError::other)?;
        self.log.write_all(&frame(&payload)).map_err(MetaError::other)?;
        self.log.sync_data().map_err(MetaError::other)?;
        self.log_records += 1;
        self.revision = rev;
        for (k, v) in rec.changes {
            if let Some(old) = self.kvs.get(&k)
                && old.lease != 0
                && let Some(l) = self.leases.get_mut(&old.lease)
            {
                l.keys.remove(&k);
            }
            match v {
                Some(kv) => {
                    if kv.lease != 0
                        && let Some(l) = self.leases.get_mut(&kv.lease)
                    {
                        l.keys.insert(k.clone());
                    }
                    self.kvs.insert(k, kv);
                }
                None => {
                    self.kvs.remove(&k);
                }
            }
        }
        let batch = Arc::new((rev, events));
        self.history.push_back(batch.clone());
        while self.history.len() > HISTORY_BATCHES {
            if let Some(b) = self.history.pop_front() {
                self.history_floor = b.0;
            }
        }
        let _ = self.tx.send(batch);
        if self.log_records >= self.compact_after {
            self.compact()?;
        }
        Ok(rev)
    }

    /// Writes a snapshot and truncates the log.
    fn compact(&mut self) -> MetaResult<()> {
        let snap = Snapshot {
            revision: self.revision,
            kvs: self.kvs.values().cloned().collect(),
        };
        let payload = postcard::to_stdvec(&snap).map_err(MetaError::other)?;
        let tmp = self.dir.join("meta.snap.tmp");
        {
            let mut f = File::create(&tmp).map_err(MetaError::other)?;
            f.write_all(&frame(&payload)).map_err(MetaError::other)?;
            f.sync_all().map_err(MetaError::other)?;
        }
        std::fs::rename(&tmp, self.dir.join("meta.snap")).map_err(MetaError::other)?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.log.set_len(0).map_err(MetaError::other)?;
        self.log.sync_all().map_err(MetaError::other)?;
        self.log_records = 0;
        Ok(())
    }

    fn revoke(&mut self, id: i64) -> MetaResult<()> {
        if let Some(l) = self.leases.remove(&id) {
            let ops: Vec<Op> = l.keys.into_iter().map(Op::delete).collect();
            self.commit(ops)?;
        }
        Ok(())
    }
}

#[async_trait]
impl MetaStore for EmbeddedStore {
    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> MetaResult<RangeResult> {
        let g = self.inner.lock();
        let mut kvs = Vec::new();
        let mut more = false;
        for (k, kv) in g.kvs.range(start.to_vec()..) {
            if !in_key_range(k, start, end) {
                break;
            }
            if limit > 0 && kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(kv.clone());
        }
        Ok(RangeResult {
            kvs,
            more,
            revision: g.revision,
        })
    }

    async fn txn(&self, txn: Txn) -> MetaResult<TxnResult> {
        let mut g = self.inner.lock();
        let ok = txn.compares.iter().all(|c| c.holds(g.kvs.get(&c.key)));
        let ops = if ok { txn.success } else { txn.failure };
        let revision = g.commit(ops)?;
        Ok(TxnResult {
            succeeded: ok,
            revision,
        })
    }

    async fn watch(&self, start: &[u8], end: &[u8], from: i64) -> MetaResult<WatchStream> {
        let g = self.inner.lock();
        let from = if from <= 0 { g.revision + 1 } else { from };
        if from <= g.history_floor {
            return Err(MetaError::Compacted(g.history_floor));
        }
        let past: Vec<Batch> = g.history.iter().filter(|b| b.0 >= from).cloned().collect();
        let rx = g.tx.subscribe();
        drop(g);
        let (start, end) = (start.to_vec(), end.to_vec());
        let live = tokio_stream::wrappers::BroadcastStream::new(rx).map(|r| {
            r.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)| {
                MetaError::Other(format!("watcher lagged by {n} batches"))
            })
        });
        let s = futures::stream::iter(past.into_iter().map(Ok))
            .chain(live)
            .filter_map(move |r| {
                let out = match r {
                    Err(e) => Some(Err(e)),
                    Ok(b) if b.0 < from => None,
                    Ok(b) => {
                        let evs: Vec<WatchEvent> =
                            b.1.iter()
                                .filter(|e| in_key_range(&e.kv.key, &start, &end))
                                .cloned()
                                .collect();
                        (!evs.is_empty()).then_some(Ok(evs))
                    }
                };
                futures::future::ready(out)
            });
        Ok(Box::pin(s))
    }

    async fn grant_lease(&self, ttl_secs: i64) -> MetaResult<i64> {
        let mut g = self.inner.lock();
        let id = g.next_lease;
        g.next_lease += 1;
        let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
        g.leases.insert(
            id,
            LeaseState {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> MetaResult<()> {
        let mut g = self.inner.lock();
        match g.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(())
            }
            None => Err(MetaError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: i64) -> MetaResult<()> {
        self.inner.lock().revoke(lease)
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}
