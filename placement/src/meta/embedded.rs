//! A single-process [`MetaStore`] persisted in a directory: an in-memory ordered map with
//! etcd's revision model, made durable in a [fjall](https://docs.rs/fjall) database in
//! `<dir>/db`. The storage engine is fjall's; this module only decides what to write:
//!
//! - keyspace `kv`: store key → the postcard-encoded [`KeyValue`] (value, create/mod
//!   revision, version, lease) of every live key;
//! - keyspace `meta`: `revision` → the store revision (i64, big-endian).
//!
//! Each committed revision is ONE atomic fjall write batch (the keys it put or deleted plus
//! the new revision) persisted with [`PersistMode::SyncAll`] before the transaction returns
//! and before memory, watchers or callers see it. A failed write leaves memory untouched
//! (fjall then refuses further writes: the store fails stopped). On open, every key and the
//! revision are loaded back into memory; a record that does not decode is an error from
//! [`EmbeddedStore::open`], never a panic.
//!
//! Watches are served from a bounded in-memory history plus a broadcast channel, so a watch
//! cannot start from a revision committed before the last open (it gets
//! [`MetaError::Compacted`]). Leases live in memory only: on open, keys that carried a lease
//! are deleted (their lease cannot have survived the restart). An exclusive lock on
//! `<dir>/LOCK` keeps a second process out.

use super::{
    EventKind, KeyValue, MetaError, MetaResult, MetaStore, Op, RangeResult, Txn, TxnResult, WatchEvent, WatchStream,
};
use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

const HISTORY_BATCHES: usize = 4096;
/// Key of the store revision in the `meta` keyspace.
const REVISION_KEY: &[u8] = b"revision";
/// fjall's limit on key length.
const MAX_KEY_LEN: usize = u16::MAX as usize;
/// Block cache of the fjall database. Reads are served from memory, fjall is read only on open.
const CACHE_BYTES: u64 = 4 << 20;
/// Files of the former home-made persistence; their presence means an unmigrated store.
const LEGACY_FILES: [&str; 2] = ["meta.log", "meta.snap"];

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

type Batch = Arc<(i64, Vec<WatchEvent>)>;

/// Field order matters: the database is dropped (closed) before `LOCK` is released.
struct Inner {
    db: Database,
    /// Store key → postcard [`KeyValue`].
    kv: Keyspace,
    /// [`REVISION_KEY`] → revision.
    meta: Keyspace,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    revision: i64,
    leases: HashMap<i64, LeaseState>,
    next_lease: i64,
    history: VecDeque<Batch>,
    /// Every revision above this one is in `history` (or later).
    history_floor: i64,
    tx: broadcast::Sender<Batch>,
    /// Holds an exclusive lock on `<dir>/LOCK` for the life of the store.
    _lock: File,
}

/// Embedded metadata store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
}

fn in_key_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end == [0] || end.is_empty() || key < end)
}

fn corrupt(dir: &Path, what: impl std::fmt::Display) -> MetaError {
    MetaError::Other(format!("embedded metadata store {}: {what}", dir.display()))
}

fn check_key(key: &[u8]) -> MetaResult<()> {
    if key.is_empty() {
        return Err(MetaError::Other("key is empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(MetaError::Other(format!(
            "key of {} bytes exceeds the limit of {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

/// Reads the stored revision and every stored key, checking that they are consistent.
fn load(dir: &Path, kv: &Keyspace, meta: &Keyspace) -> MetaResult<(i64, BTreeMap<Vec<u8>, KeyValue>)> {
    let revision = match meta.get(REVISION_KEY).map_err(|e| corrupt(dir, e))? {
        None => 0,
        Some(v) => {
            let b = <[u8; 8]>::try_from(&v[..])
                .map_err(|_| corrupt(dir, format!("stored revision has {} bytes, expected 8", v.len())))?;
            i64::from_be_bytes(b)
        }
    };
    if revision < 0 {
        return Err(corrupt(dir, format!("negative stored revision {revision}")));
    }
    let mut kvs = BTreeMap::new();
    for g in kv.iter() {
        let (k, v) = g.into_inner().map_err(|e| corrupt(dir, e))?;
        let rec: KeyValue = postcard::from_bytes(&v)
            .map_err(|e| corrupt(dir, format!("undecodable record for key {:?}: {e}", k.as_ref())))?;
        let sane = rec.key.as_slice() == k.as_ref()
            && 0 < rec.create_revision
            && rec.create_revision <= rec.mod_revision
            && rec.mod_revision <= revision
            && rec.version > 0;
        if !sane {
            return Err(corrupt(
                dir,
                format!(
                    "inconsistent record for key {:?} at store revision {revision}: {rec:?}",
                    k.as_ref()
                ),
            ));
        }
        kvs.insert(rec.key.clone(), rec);
    }
    Ok((revision, kvs))
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> MetaResult<Self> {
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
        // Starting empty next to the old format's files would silently lose the metadata.
        if let Some(f) = LEGACY_FILES.iter().find(|f| dir.join(f).exists()) {
            return Err(corrupt(
                &dir,
                format!("holds `{f}` of an older, unsupported on-disk format; refusing to open"),
            ));
        }
        let db = Database::builder(dir.join("db"))
            .cache_size(CACHE_BYTES)
            .worker_threads(1)
            .open()
            .map_err(|e| corrupt(&dir, e))?;
        let kv = db
            .keyspace("kv", KeyspaceCreateOptions::default)
            .map_err(|e| corrupt(&dir, e))?;
        let meta = db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(|e| corrupt(&dir, e))?;
        let (revision, kvs) = load(&dir, &kv, &meta)?;
        let (tx, _) = broadcast::channel(1024);
        let mut inner = Inner {
            db,
            kv,
            meta,
            kvs,
            revision,
            leases: HashMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            history_floor: revision,
            tx,
            _lock: lock,
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

    /// Runs `f` on the locked state on tokio's blocking pool: a commit fsyncs, and must
    /// not stall the async workers (in the playground they also serve storenodes and the proxy).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner) -> MetaResult<T> + Send + 'static,
    ) -> MetaResult<T> {
        run_blocking(self.inner.clone(), f).await
    }
}

async fn run_blocking<T: Send + 'static>(
    inner: Arc<Mutex<Inner>>,
    f: impl FnOnce(&mut Inner) -> MetaResult<T> + Send + 'static,
) -> MetaResult<T> {
    tokio::task::spawn_blocking(move || f(&mut inner.lock()))
        .await
        .map_err(|e| MetaError::Other(format!("embedded store task failed: {e}")))?
}

async fn expire_leases(inner: Weak<Mutex<Inner>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        if !inner.lock().leases.values().any(|l| l.deadline <= now) {
            continue;
        }
        // Revoking deletes the lease's keys: a durable commit, so off the async workers.
        let r = run_blocking(inner, move |g| {
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
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "embedded store: lease expiry task failed");
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
                    check_key(&key)?;
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
                    check_key(&key)?;
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
        // One atomic batch per revision, synced to disk before anyone sees the revision.
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for (k, v) in &changes {
            match v {
                Some(kv) => {
                    let rec = postcard::to_stdvec(kv).map_err(MetaError::other)?;
                    if u32::try_from(rec.len()).is_err() {
                        return Err(MetaError::Other(format!("value of {} bytes is too large", rec.len())));
                    }
                    batch.insert(&self.kv, k.as_slice(), rec);
                }
                None => batch.remove(&self.kv, k.as_slice()),
            }
        }
        batch.insert(&self.meta, REVISION_KEY, rev.to_be_bytes());
        batch.commit().map_err(MetaError::other)?;
        self.revision = rev;
        for (k, v) in changes {
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
        Ok(rev)
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
        self.blocking(move |g| {
            let ok = txn.compares.iter().all(|c| {
                if c.range_end.is_empty() {
                    c.holds(g.kvs.get(&c.key))
                } else {
                    c.holds_all(
                        g.kvs
                            .range(c.key.clone()..)
                            .map(|(_, kv)| kv)
                            .take_while(|kv| in_key_range(&kv.key, &c.key, &c.range_end)),
                    )
                }
            });
            let ops = if ok { txn.success } else { txn.failure };
            let revision = g.commit(ops)?;
            Ok(TxnResult {
                succeeded: ok,
                revision,
            })
        })
        .await
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
        self.blocking(move |g| g.revoke(lease)).await
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &EmbeddedStore, k: &str, v: &str) -> i64 {
        s.inner.lock().commit(vec![Op::put(k, v)]).expect("commit")
    }

    /// Writes `key → value` straight into fjall (as a bad disk or a bug would).
    fn tamper(dir: &Path, keyspace: &str, key: &[u8], value: &[u8]) {
        let db = Database::builder(dir.join("db")).open().expect("open fjall");
        let ks = db.keyspace(keyspace, KeyspaceCreateOptions::default).expect("keyspace");
        ks.insert(key, value).expect("insert");
        db.persist(PersistMode::SyncAll).expect("persist");
    }

    fn fresh_store() -> (tempfile::TempDir, std::path::PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("meta");
        let s = EmbeddedStore::open(&dir).expect("open");
        put(&s, "/a", "1");
        put(&s, "/b", "2");
        (tmp, dir)
    }

    #[test]
    fn reopens_with_every_key_and_the_revision() {
        let (_tmp, dir) = fresh_store();
        let s = EmbeddedStore::open(&dir).expect("reopen");
        let g = s.inner.lock();
        assert_eq!(g.revision, 2);
        assert_eq!(g.kvs.len(), 2);
        assert_eq!(g.kvs[b"/b".as_slice()].mod_revision, 2);
    }

    #[test]
    fn undecodable_record_is_an_error_from_open() {
        let (_tmp, dir) = fresh_store();
        tamper(&dir, "kv", b"/a", &[0xff; 3]);
        let err = EmbeddedStore::open(&dir).err().expect("open must fail");
        assert!(err.to_string().contains("undecodable"), "{err}");
    }

    #[test]
    fn record_under_the_wrong_key_is_an_error_from_open() {
        let (_tmp, dir) = fresh_store();
        let s = EmbeddedStore::open(&dir).expect("reopen");
        let rec = postcard::to_stdvec(&s.inner.lock().kvs[b"/a".as_slice()]).expect("encode");
        drop(s);
        tamper(&dir, "kv", b"/z", &rec);
        assert!(EmbeddedStore::open(&dir).is_err());
    }

    #[test]
    fn record_newer_than_the_revision_is_an_error_from_open() {
        let (_tmp, dir) = fresh_store();
        tamper(&dir, "meta", REVISION_KEY, &1i64.to_be_bytes());
        assert!(EmbeddedStore::open(&dir).is_err());
    }

    #[test]
    fn malformed_revision_is_an_error_from_open() {
        let (_tmp, dir) = fresh_store();
        tamper(&dir, "meta", REVISION_KEY, b"abc");
        let err = EmbeddedStore::open(&dir).err().expect("open must fail");
        assert!(err.to_string().contains("revision"), "{err}");
    }

    #[test]
    fn legacy_log_is_refused_rather_than_ignored() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("meta.log"), b"old").expect("write");
        assert!(EmbeddedStore::open(tmp.path()).is_err());
    }

    #[test]
    fn empty_key_is_rejected_without_writing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(tmp.path()).expect("open");
        let mut g = s.inner.lock();
        assert!(g.commit(vec![Op::put("/x", "1"), Op::put("", "v")]).is_err());
        assert!(g.commit(vec![Op::delete("")]).is_err());
        assert!(g.commit(vec![Op::put(vec![b'k'; MAX_KEY_LEN + 1], "v")]).is_err());
        assert_eq!((g.revision, g.kvs.len()), (0, 0));
    }
}
