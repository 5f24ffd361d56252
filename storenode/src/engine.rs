//! The node's single fjall `Database` and its three keyspaces, the key layouts,
//! and the group-commit syncer that makes Raft log appends durable.
//!
//! - `data`: user key → `[version u64 BE][value]`. No range prefix: a split moves no data.
//! - `raft`: `[range_id BE][tag][..]` → log entries (`tag 1`, then index BE), vote (`2`),
//!   last purged log id (`3`), committed log id (`4`).
//! - `meta`: `store_id`, `desc/<range BE>` (prost `RangeDescriptor`),
//!   `applied/<range BE>` (postcard applied state), `addr/<store BE>` (address book).

use crate::cache::{Cached, ValueCache};
use crate::metrics::Metrics;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message;
use skv_common::{RangeId, StoreId};
use skv_proto::internal::RangeDescriptor;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

/// A unit of durability: invoked after the fsync that covers every write made before it was queued.
pub type SyncCallback = Box<dyn FnOnce(io::Result<()>) + Send>;

pub const TAG_LOG: u8 = 1;
pub const TAG_VOTE: u8 = 2;
pub const TAG_PURGED: u8 = 3;
pub const TAG_COMMITTED: u8 = 4;
/// Every log index below the stored value was deleted by a purge (written with each purge
/// batch): the next purge starts there instead of scanning from index 0 over the
/// tombstones of every earlier purge.
pub const TAG_PURGE_FLOOR: u8 = 5;

/// The node's storage engine.
pub struct Engine {
    pub db: Database,
    pub data: Keyspace,
    pub raft: Keyspace,
    pub meta: Keyspace,
    /// Hot records of `data`; every change of `data` must go through it (cache.rs).
    pub cache: ValueCache,
    syncer: parking_lot::Mutex<Option<mpsc::Sender<SyncCallback>>>,
    sync_thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// [`Self::open_inline_sync`]: no syncer thread; `after_sync` runs its callback at once.
    inline_sync: bool,
}

pub fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Exit status of a storenode that stopped on a storage error (fail-stop, ADR 0029):
/// EX_IOERR of sysexits.h.
pub const EXIT_STORAGE_ERROR: i32 = 74;

/// Stops the process after a storage error it must not survive (fail-stop, ADR 0029): an
/// fsync or write error of the Raft log or the engine leaves the node not knowing what is
/// durable, and retrying an fsync after an error can report success for pages the kernel
/// dropped (PostgreSQL's "fsyncgate"), so the node stops as etcd and PostgreSQL do. Logs
/// the cause at error level and exits with [`EXIT_STORAGE_ERROR`]; a restart recovers from
/// what the journal holds, and the other replicas carry on meanwhile.
pub fn fail_stop(what: &str, err: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %err, "fatal storage error in {what}: stopping the storenode (fail-stop)");
    eprintln!("skv-storenode: fatal storage error in {what}: {err}; stopping (fail-stop)");
    std::process::exit(EXIT_STORAGE_ERROR)
}

/// fsyncs the directory `dir`, so that the names it holds (files created, renamed into or
/// removed from it) are durable: an fsync of a file does not, under POSIX, make its entry
/// in the parent durable. A directory that cannot be opened is an error for the caller; a
/// failed fsync stops the node (fail-stop, ADR 0029: the kernel may have dropped the entries
/// it reported, and retrying cannot tell).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let f = std::fs::File::open(dir)?;
    if let Err(e) = f.sync_all() {
        fail_stop(&format!("an fsync of the directory {}", dir.display()), &e);
    }
    Ok(())
}

/// `create_dir_all` whose new directories survive a power loss: fsyncs the parent of each
/// directory it created (an existing tree is left alone).
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// The memtable size skv's draws are centred on: fjall 3.1's default, copied here (fjall
/// has no getter for it). The simulation's engines use it as is.
pub const DEFAULT_MEMTABLE_BYTES: u64 = 64 * 1024 * 1024;

/// A memtable size drawn uniformly from 3/4 to 5/4 of [`DEFAULT_MEMTABLE_BYTES`] (ADR 0037).
fn jittered_memtable_bytes() -> u64 {
    let base = DEFAULT_MEMTABLE_BYTES;
    base / 4 * 3 + rand::random_range(0..=base / 2)
}

/// The group-commit fsync of every keyspace (Raft log and engine), with its failpoints.
fn persist_all(db: &Database) -> io::Result<()> {
    fail::fail_point!(crate::failpoints::SKIP_FSYNC, |_| Ok(()));
    fail::fail_point!(crate::failpoints::FSYNC_ERROR, |_| Err(io::Error::other(
        "injected fsync error (failpoint storenode::log::fsync_error)"
    )));
    db.persist(PersistMode::SyncAll).map_err(io_err)
}

impl Engine {
    /// Opens (or creates) the database at `dir` with the default value cache, and starts
    /// the group-commit syncer thread.
    pub fn open(dir: &Path, metrics: Metrics) -> anyhow::Result<Arc<Self>> {
        Self::open_with(dir, metrics, crate::cache::DEFAULT_VALUE_CACHE_BYTES)
    }

    /// [`Self::open`] with a value cache of `value_cache_bytes` (0: none).
    pub fn open_with(dir: &Path, metrics: Metrics, value_cache_bytes: u64) -> anyhow::Result<Arc<Self>> {
        Self::build(dir, metrics, value_cache_bytes, false)
    }

    /// The deterministic simulation's engine (`sim/`, ADR 0033): no value cache and no
    /// syncer thread. [`Self::after_sync`] flushes the journal to the OS (no fsync) and runs
    /// the callback at once, on the caller's task, so a paused-clock single-thread runtime
    /// sees durability without another thread racing it. What it models is a process crash
    /// (the OS keeps what was written), not a power loss. Never used by the storenode binary.
    pub fn open_inline_sync(dir: &Path, metrics: Metrics) -> anyhow::Result<Arc<Self>> {
        Self::build(dir, metrics, 0, true)
    }

    fn build(dir: &Path, metrics: Metrics, value_cache_bytes: u64, inline_sync: bool) -> anyhow::Result<Arc<Self>> {
        create_dir_all_durable(dir)?;
        let cache = ValueCache::new(value_cache_bytes, metrics.clone());
        let db = Database::builder(dir.join("db")).open()?;
        // fjall fsyncs inside `db/` but not the directory that holds it: without this, a
        // power loss right after the first start could drop the `db` entry (strict POSIX).
        sync_dir(dir)?;
        // A memtable size is drawn on every open, but fjall uses it only when it creates a
        // keyspace, and reads back the stored one afterwards: each engine keeps the size
        // drawn at its creation, so replicas that share a machine and receive the same
        // writes rarely flush in the same second (ADR 0037). The simulation keeps the
        // base size, so that its runs stay reproducible.
        let memtable = if inline_sync {
            DEFAULT_MEMTABLE_BYTES
        } else {
            jittered_memtable_bytes()
        };
        let keyspace_opts = || KeyspaceCreateOptions::default().max_memtable_size(memtable);
        let data = db.keyspace("data", keyspace_opts)?;
        let raft = db.keyspace("raft", keyspace_opts)?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let (syncer, sync_thread) = if inline_sync {
            (None, None)
        } else {
            let (tx, rx) = mpsc::channel::<SyncCallback>();
            let sync_db = db.clone();
            let th = std::thread::Builder::new()
                .name("skv-log-sync".into())
                .spawn(move || sync_loop(sync_db, rx, metrics))?;
            (Some(tx), Some(th))
        };
        Ok(Arc::new(Self {
            db,
            data,
            raft,
            meta,
            cache,
            syncer: parking_lot::Mutex::new(syncer),
            sync_thread: parking_lot::Mutex::new(sync_thread),
            inline_sync,
        }))
    }

    /// Queues `cb` to run after the next fsync. Every write committed (to the OS) before this
    /// call is durable when `cb` runs. Concurrent callers share one fsync (group commit).
    pub fn after_sync(&self, cb: SyncCallback) {
        if self.inline_sync {
            cb(self.db.persist(PersistMode::Buffer).map_err(io_err));
            return;
        }
        let tx = self.syncer.lock().clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(cb)) = tx.send(cb) {
                    cb(Err(io::Error::other("log syncer stopped")));
                }
            }
            None => cb(Err(io::Error::other("log syncer stopped"))),
        }
    }

    /// Stops the syncer thread after a final fsync (shutdown path).
    pub fn stop_syncer(&self) {
        drop(self.syncer.lock().take());
        if let Some(th) = self.sync_thread.lock().take() {
            let _ = th.join();
        }
        if let Err(e) = self.db.persist(PersistMode::SyncAll) {
            // At shutdown: nothing is acknowledged after it, the journal replays at the next
            // start; say so instead of dropping the error.
            tracing::error!(error = %e, "the final fsync at shutdown failed");
        }
    }

    /// Waits until every write made so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.await.map_err(|_| io::Error::other("log syncer stopped"))?
    }

    // ---- meta helpers ----

    pub fn load_store_id(&self) -> io::Result<Option<StoreId>> {
        Ok(self
            .meta
            .get(b"store_id")
            .map_err(io_err)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(|b| StoreId(u64::from_be_bytes(b))))
    }

    pub fn save_store_id(&self, id: StoreId) -> io::Result<()> {
        self.meta.insert(b"store_id", id.0.to_be_bytes()).map_err(io_err)?;
        self.persist()
    }

    /// fsyncs every keyspace now (outside the group commit: snapshot installs, the store
    /// id); honours the fsync failpoints as the group commit does.
    ///
    /// A failed fsync stops the node (fail-stop, ADR 0029) instead of returning: fjall's
    /// journal is shared by every range, so after a failed fsync a later one could report
    /// success for pages the kernel dropped and acknowledge other ranges' writes that are
    /// not durable. The `Result` stays for the callers' signatures; it is always `Ok`.
    pub fn persist(&self) -> io::Result<()> {
        if let Err(e) = persist_all(&self.db) {
            fail_stop("an fsync of the engine (outside the group commit)", &e);
        }
        Ok(())
    }

    pub fn load_descriptors(&self) -> io::Result<Vec<RangeDescriptor>> {
        let mut out = Vec::new();
        for g in self.meta.prefix(b"desc/") {
            let (_, v) = g.into_inner().map_err(io_err)?;
            out.push(RangeDescriptor::decode(&v[..]).map_err(io_err)?);
        }
        Ok(out)
    }

    pub fn load_addresses(&self) -> io::Result<Vec<(StoreId, String)>> {
        let mut out = Vec::new();
        for g in self.meta.prefix(b"addr/") {
            let (k, v) = g.into_inner().map_err(io_err)?;
            let Ok(b) = <[u8; 8]>::try_from(&k[5..]) else { continue };
            out.push((StoreId(u64::from_be_bytes(b)), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    pub fn save_address(&self, id: StoreId, addr: &str) -> io::Result<()> {
        self.meta.insert(addr_key(id), addr.as_bytes()).map_err(io_err)
    }

    /// Live value of a user key: (version, value). A tombstone reads as absent.
    pub fn get_data(&self, key: &[u8]) -> io::Result<Option<(u64, Vec<u8>)>> {
        Ok(match self.get_record(key)? {
            Some(Record::Live { version, value }) => Some((version, value)),
            _ => None,
        })
    }

    /// Stored record of a user key, tombstones included; through the value cache.
    pub fn get_record(&self, key: &[u8]) -> io::Result<Option<Record>> {
        match self.cache.lookup(key) {
            Ok(hit) => Ok(hit.into_record()),
            Err(ticket) => {
                let rec = self.data.get(key).map_err(io_err)?.and_then(|v| decode_record(&v));
                if self.cache.enabled() {
                    self.cache.fill(key, ticket, Cached::from(rec.clone()));
                }
                Ok(rec)
            }
        }
    }
}

fn sync_loop(db: Database, rx: mpsc::Receiver<SyncCallback>, metrics: Metrics) {
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let started = Instant::now();
        let res = persist_all(&db);
        metrics.fsync_seconds.observe(started.elapsed().as_secs_f64());
        metrics.group_commit_batch.observe(pending.len() as f64);
        if let Err(e) = res {
            // Nobody is told "durable" after a failed fsync, and nothing retries it.
            fail_stop("the group-commit fsync (Raft log and engine)", &e);
        }
        for cb in pending {
            cb(Ok(()));
        }
    }
}

pub fn raft_key(range: RangeId, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.extend_from_slice(&range.0.to_be_bytes());
    k.push(tag);
    k
}

pub fn log_key(range: RangeId, index: u64) -> Vec<u8> {
    let mut k = raft_key(range, TAG_LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub fn log_index_of(key: &[u8]) -> Option<u64> {
    key.get(9..17)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

pub fn desc_key(range: RangeId) -> Vec<u8> {
    let mut k = b"desc/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn applied_key(range: RangeId) -> Vec<u8> {
    let mut k = b"applied/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn addr_key(store: StoreId) -> Vec<u8> {
    let mut k = b"addr/".to_vec();
    k.extend_from_slice(&store.0.to_be_bytes());
    k
}

/// Marks a tombstone in the version field of a stored record (versions stay below 2^63).
const TOMBSTONE_BIT: u64 = 1 << 63;

/// A stored record of the `data` keyspace: `version (8 bytes BE) ++ value`, or, for a
/// deleted key, `(version | 1 << 63) (8 bytes BE)` alone — a tombstone keeping the version
/// of the deleted incarnation so the next put continues from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Live { version: u64, value: Vec<u8> },
    Tombstone { version: u64 },
}

impl Record {
    /// The stored version (of the live value or of the deleted one).
    pub fn version(&self) -> u64 {
        match self {
            Record::Live { version, .. } | Record::Tombstone { version } => *version,
        }
    }
    pub fn is_live(&self) -> bool {
        matches!(self, Record::Live { .. })
    }
}

pub fn encode_value(version: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&(version & !TOMBSTONE_BIT).to_be_bytes());
    v.extend_from_slice(value);
    v
}

pub fn encode_tombstone(version: u64) -> Vec<u8> {
    (version | TOMBSTONE_BIT).to_be_bytes().to_vec()
}

/// Decodes any stored record; `None` for garbage.
pub fn decode_record(v: &[u8]) -> Option<Record> {
    let b = <[u8; 8]>::try_from(v.get(..8)?).ok()?;
    let raw = u64::from_be_bytes(b);
    if raw & TOMBSTONE_BIT != 0 {
        return (v.len() == 8).then_some(Record::Tombstone {
            version: raw & !TOMBSTONE_BIT,
        });
    }
    Some(Record::Live {
        version: raw,
        value: v[8..].to_vec(),
    })
}

/// Decodes a live value: (version, value). `None` for a tombstone or garbage.
pub fn decode_value(v: &[u8]) -> Option<(u64, Vec<u8>)> {
    match decode_record(v)? {
        Record::Live { version, value } => Some((version, value)),
        Record::Tombstone { .. } => None,
    }
}

/// Exclusive upper bound for a range end (empty = +infinity).
pub fn data_range<'a>(start: &'a [u8], end: &'a [u8]) -> (std::ops::Bound<&'a [u8]>, std::ops::Bound<&'a [u8]>) {
    use std::ops::Bound;
    let hi = if end.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(end)
    };
    (Bound::Included(start), hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtable_sizes_are_drawn_within_a_quarter_of_the_default_and_differ() {
        let draws: Vec<u64> = (0..200).map(|_| jittered_memtable_bytes()).collect();
        let (lo, hi) = (DEFAULT_MEMTABLE_BYTES / 4 * 3, DEFAULT_MEMTABLE_BYTES / 4 * 5);
        assert!(draws.iter().all(|b| (lo..=hi).contains(b)), "{draws:?}");
        // Spread over the range, not a constant: 200 draws span more than half of it. (That
        // build() hands the draw to the `data` and `raft` keyspaces is not checked here:
        // fjall has no getter for a keyspace's memtable size.)
        let spread = draws.iter().max().unwrap() - draws.iter().min().unwrap();
        assert!(spread > (hi - lo) / 2, "spread {spread}");
    }

    #[test]
    fn a_new_data_dir_tree_is_created_and_its_directories_synced() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/data");
        create_dir_all_durable(&dir).unwrap();
        assert!(dir.is_dir());
        // Existing trees are fine, and the engine opens (and syncs) a fresh nested dir.
        create_dir_all_durable(&dir).unwrap();
        let e = Engine::open(&root.path().join("x/y"), Metrics::new()).unwrap();
        assert!(root.path().join("x/y/db").is_dir());
        drop(e);
        assert!(sync_dir(&root.path().join("missing")).is_err());
    }

    #[test]
    fn key_layouts_sort_by_range_then_index() {
        let a = log_key(RangeId(1), 2);
        let b = log_key(RangeId(1), 10);
        let c = log_key(RangeId(2), 0);
        assert!(a < b && b < c);
        assert_eq!(log_index_of(&b), Some(10));
        assert_eq!(log_index_of(b"short"), None);
        assert!(raft_key(RangeId(1), TAG_LOG) < a);
        assert!(a < raft_key(RangeId(1), TAG_VOTE));
    }

    #[test]
    fn values_round_trip_and_garbage_is_refused() {
        let v = encode_value(7, b"hello");
        assert_eq!(decode_value(&v), Some((7, b"hello".to_vec())));
        assert_eq!(decode_value(b"short"), None);
        let t = encode_tombstone(7);
        assert_eq!(decode_record(&t), Some(Record::Tombstone { version: 7 }));
        assert_eq!(decode_value(&t), None);
        assert_eq!(
            decode_record(&v),
            Some(Record::Live {
                version: 7,
                value: b"hello".to_vec()
            })
        );
        let mut bad = t.clone();
        bad.push(1);
        assert_eq!(decode_record(&bad), None);
    }

    #[tokio::test]
    async fn group_commit_sync_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        assert_eq!(e.load_store_id().unwrap(), None);
        e.save_store_id(StoreId(3)).unwrap();
        e.save_address(StoreId(2), "127.0.0.1:1").unwrap();
        let mut waits = Vec::new();
        for _ in 0..16 {
            let e = e.clone();
            waits.push(tokio::spawn(async move { e.sync().await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
        e.stop_syncer();
        assert!(e.sync().await.is_err());
        assert_eq!(e.load_store_id().unwrap(), Some(StoreId(3)));
        assert_eq!(
            e.load_addresses().unwrap(),
            vec![(StoreId(2), "127.0.0.1:1".to_string())]
        );
    }
}
