//! Power loss (issue 14, ADR 0030): every storenode's data directory is a skv-lazyfs FUSE
//! mount, which holds what was not fsynced in memory. Clients write; then the plug is
//! pulled on the whole cluster at once (every storenode frozen with SIGSTOP, every lazyfs
//! drops its unsynced writes, the storenodes are killed), the filesystems are mounted again
//! on what survived, the storenodes restart, and everything is read back. Two workloads run
//! side by side: writers of unique keys (each acknowledged put must read back), and
//! recording clients on a few contended keys (get, put, CAS, delete, conditional writes)
//! whose whole history, final reads included, goes through the linearizability checker.
//!
//! - fsync working: no acknowledged write is lost, and the history is linearizable.
//! - fsync skipped (`FAILPOINTS=storenode::log::skip_fsync=return`, binaries built with
//!   `--features skv-storenode/failpoints`): acknowledged writes are lost and the checker
//!   says so, which shows the filesystem really drops what was not synced (kill -9 alone
//!   keeps the page cache, so the other kill tests would pass with every fsync removed).
//!
//! Needs /dev/fuse and root (or fusermount3), etcd, and `cargo build --bins`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skv_chaos::checker::{CheckOptions, Report, check, describe};
use skv_chaos::history::{History, Input, Op, Output};
use skv_chaos::recorder::{Recorder, RecordingClient};
use skv_chaos::runner::lost_writes;
use skv_testkit::cluster::{ProcCluster, TEST_SECRET};
use skv_testkit::{ChildGuard, Etcd, bin_path, free_port, wait_until};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const SKIP_FSYNC: &str = "storenode::log::skip_fsync=return";

/// Whether `p` is a mount point now (field 5 of /proc/self/mountinfo).
fn mounted(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4) == Some(&*want))
}

/// One skv-lazyfs process serving a storenode's data directory. Dropping it kills the
/// process by PID and detaches the mount, even when the test failed.
struct Lazy {
    guard: Option<ChildGuard>,
    backing: PathBuf,
    mnt: PathBuf,
    log: PathBuf,
}

impl Lazy {
    fn start(backing: &Path, mnt: &Path, log: &Path) -> Lazy {
        std::fs::create_dir_all(mnt).unwrap_or_else(|e| panic!("mkdir {}: {e}", mnt.display()));
        let logf = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut cmd = Command::new(bin_path("skv-lazyfs"));
        cmd.arg("--backing")
            .arg(backing)
            .arg("--mount")
            .arg(mnt)
            .stdout(Stdio::null())
            .stderr(Stdio::from(logf));
        let guard = ChildGuard::spawn("skv-lazyfs", &mut cmd).unwrap_or_else(|e| panic!("skv-lazyfs: {e}"));
        let mut l = Lazy {
            guard: Some(guard),
            backing: backing.to_path_buf(),
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !mounted(mnt) {
            if let Some(g) = l.guard.as_mut()
                && let Some(st) = g.wait_timeout(Duration::from_millis(50))
            {
                panic!(
                    "skv-lazyfs exited ({st}) before mounting {}: {}",
                    mnt.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not mounted after 15 s: {}",
                mnt.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        l
    }

    /// SIGUSR1: drop every unsynced write now; waits until the process says it did.
    fn pull_plug(&self) {
        let g = self.guard.as_ref().unwrap_or_else(|| panic!("lazyfs not running"));
        g.signal("USR1").unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .contains("power loss: dropped")
        {
            assert!(Instant::now() < deadline, "lazyfs did not report the power loss");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes the power loss dropped, from the process's log line.
    fn dropped_bytes(&self) -> u64 {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| l.split("power loss: dropped ").nth(1))
            .filter_map(|r| r.split(' ').next()?.parse().ok())
            .next_back()
            .unwrap_or(0)
    }

    /// SIGTERM: unmount and exit (its storenode must be dead: open files keep it busy).
    fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            let _ = g.signal("TERM");
            if g.wait_timeout(Duration::from_secs(10)).is_none() {
                g.kill();
            }
        }
        detach(&self.mnt);
    }
}

fn detach(mnt: &Path) {
    if mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    if mounted(mnt) {
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(mnt).status();
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        // Only a mount this guard still owns: after `stop`, the same mount point may
        // already serve the next (rebooted) filesystem.
        if let Some(mut g) = self.guard.take() {
            g.kill();
            detach(&self.mnt);
        }
    }
}

/// What a run found after the power loss.
#[derive(Debug, Default)]
struct Outcome {
    acked: usize,
    /// Read back with the acknowledged value.
    intact: usize,
    /// Read back as absent, or with another value.
    lost: Vec<String>,
    /// Could not be read within the time allowed.
    unreadable: usize,
    dropped_bytes: u64,
    /// The contended keys' history (final reads included) and its check.
    history: History,
    report: Report,
    /// Acknowledged writes of the contended keys that the final reads contradict.
    contended_lost: Vec<String>,
}

/// Contended keys of the recorded workload.
const KEYS: [&str; 4] = ["c0", "c1", "c2", "c3"];
/// A key only the test writes, once, just before the power loss: its acknowledged put is
/// the key's last write whatever the contended clients were doing, so its loss is certain
/// to show in the checked history when nothing is synced.
const SENTINEL: &str = "sentinel";

/// One recording client: random operations on the contended keys until told to stop;
/// conditions mostly name the version it saw last, so some succeed.
async fn contended_loop(c: RecordingClient, seed: u64, stop: Arc<AtomicBool>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashMap<usize, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let k = rng.random_range(0..KEYS.len());
        let guess = seen.get(&k).copied().unwrap_or(0);
        let value = c.recorder().fresh_value();
        let input = match rng.random_range(0..100) {
            0..35 => Input::Get,
            35..60 => Input::Put { value },
            60..80 => Input::Cas { expected: guess, value },
            80..88 => Input::Delete,
            88..94 => Input::PutIfVersion { value, version: guess },
            _ => Input::DeleteIfVersion { version: guess },
        };
        let op = c.invoke(KEYS[k], input).await;
        match op.output() {
            Some(Output::Read { found }) => {
                seen.insert(k, found.map_or(0, |f| f.version));
            }
            Some(Output::Written { version }) => {
                seen.insert(k, *version);
            }
            Some(Output::Deleted { .. }) => {
                seen.insert(k, 0);
            }
            Some(Output::ConditionFailed { current: Some(v) }) => {
                seen.insert(k, *v);
            }
            Some(Output::ConditionFailed { current: None }) => {}
            None => tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await,
        }
    }
}

/// Starts storenode `i` on its (mounted) data directory, with `env`.
fn start_store(c: &mut ProcCluster, i: usize, env: &[(&str, &str)]) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.path().join(format!("store-{i}.log")))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin_path("skv-storenode"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{}", c.store_ports[i]))
        .arg("--placement")
        .arg(c.placement_url())
        .arg("--data-dir")
        .arg(c.dir.path().join(format!("store-{i}")))
        .arg("--heartbeat-interval-ms")
        .arg("300")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    c.stores[i] = Some(ChildGuard::spawn(format!("store-{i}"), &mut cmd).unwrap_or_else(|e| panic!("{e}")));
}

async fn wait_writable(c: &ProcCluster, what: &str, timeout: Duration) -> bool {
    let client = c.client("healthcheck", "write").await;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let put = tokio::time::timeout(
            Duration::from_secs(3),
            client.put(b"ready".to_vec(), what.as_bytes().to_vec()),
        );
        if let Ok(Ok(_)) = put.await {
            return true;
        }
        // A store that exited (a bad FAILPOINTS, a binary without the feature) ends the wait.
        for (i, s) in c.stores.iter().enumerate() {
            let log = c.read_log(&format!("store-{i}"));
            assert!(
                s.is_some() && !log.contains("without the `failpoints` feature"),
                "storenode {i} cannot start: {log}\n(build the binaries with \
                 `cargo build --bins --features skv-storenode/failpoints`)"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The whole scenario; `skip_fsync` turns the group-commit fsync off after setup.
async fn run(skip_fsync: bool) -> Outcome {
    skv_testkit::init_test_logging();
    let mut dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    if std::env::var_os("SKV_KEEP_TEST_DIR").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    std::fs::write(dir.path().join("secret"), TEST_SECRET).unwrap_or_else(|e| panic!("secret: {e}"));
    let etcd = Etcd::start().await;
    let mut c = ProcCluster {
        dir,
        etcd: Some(etcd),
        placement: None,
        placement_port: free_port(),
        stores: Vec::new(),
        store_ports: Vec::new(),
        proxy: None,
        proxy_port: free_port(),
        store_args: Vec::new(),
        store_env: Vec::new(),
        placement_args: Vec::new(),
    };
    let root = c.dir.path().to_path_buf();
    // Declared after `c`, so dropped first: the mounts go before the tempdir does.
    let mut fs: Vec<Lazy> = (0..3)
        .map(|i| {
            Lazy::start(
                &root.join(format!("backing-{i}")),
                &root.join(format!("store-{i}")),
                &root.join(format!("lazyfs-{i}.log")),
            )
        })
        .collect();

    c.start_placement();
    for i in 0..3 {
        c.store_ports.push(free_port());
        c.stores.push(None);
        start_store(&mut c, i, &[]);
    }
    c.start_proxy();
    assert!(
        wait_writable(&c, "setup", Duration::from_secs(60)).await,
        "the cluster on lazyfs never took a write: {}",
        c.read_log("store-0")
    );

    if skip_fsync {
        // Everything so far is durable (fsync works). From here on the storenodes skip the
        // group-commit fsync: restart them with the failpoint.
        for i in 0..3 {
            c.kill_store(i);
        }
        for i in 0..3 {
            start_store(&mut c, i, &[("FAILPOINTS", SKIP_FSYNC)]);
        }
        assert!(
            wait_writable(&c, "failpoint on", Duration::from_secs(60)).await,
            "the cluster did not come back with the failpoint: {}",
            c.read_log("store-0")
        );
    }

    // Concurrent writers, each on its own connection, record what was acknowledged.
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = c.client("power", "write").await;
        let (acked, stop) = (acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("w{w}-{i:06}"), format!("v{w}:{i}"));
                let put = client.put(k.clone().into_bytes(), v.clone().into_bytes());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), put).await {
                    acked.lock().await.insert(k, v);
                }
                i += 1;
            }
        }));
    }
    // Recording clients on the contended keys. A write the SDK calls a definite failure is
    // recorded as unknown: this test is about durability, not about error classes.
    let rec = Recorder::new(false);
    let mut contended = Vec::new();
    for id in 0..4u32 {
        let rc = rec.client(c.client("power", "write").await, id);
        contended.push(tokio::spawn(contended_loop(rc, 30 + u64::from(id), stop.clone())));
    }
    // Writes flow for a while; the plug is pulled while they still do.
    wait_until("1000 acknowledged writes", Duration::from_secs(40), || {
        let acked = acked.clone();
        async move { (acked.lock().await.len() >= 1000).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let sentinel_client = rec.client(c.client("power", "write").await, 98);
    let sentinel = sentinel_client
        .invoke(
            SENTINEL,
            Input::Put {
                value: rec.fresh_value(),
            },
        )
        .await;
    assert!(
        sentinel.output().is_some(),
        "the sentinel put was not acknowledged: {:?}",
        sentinel.error
    );
    // A canary on each mount, besides the storenodes' own files: one file fsynced, one not.
    // Whatever moment the plug is pulled at, the second must be gone afterwards.
    for l in &fs {
        std::fs::write(l.mnt.join("canary-unsynced"), b"unsynced").unwrap_or_else(|e| panic!("canary: {e}"));
        let mut f = std::fs::File::create(l.mnt.join("canary-synced")).unwrap_or_else(|e| panic!("canary: {e}"));
        std::io::Write::write_all(&mut f, b"synced").unwrap_or_else(|e| panic!("canary: {e}"));
        f.sync_all().unwrap_or_else(|e| panic!("canary: {e}"));
    }
    // Pull the plug on everything at once: freeze every storenode (nothing more is sent
    // or acknowledged), drop every filesystem's unsynced writes, then kill the storenodes.
    for s in c.stores.iter().flatten() {
        s.signal("STOP").unwrap_or_else(|e| panic!("{e}"));
    }
    let n_at_stop = acked.lock().await.len();
    for l in &fs {
        l.pull_plug();
    }
    let dropped_bytes = fs.iter().map(Lazy::dropped_bytes).sum();
    for i in 0..3 {
        c.kill_store(i);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let acked = acked.lock().await.clone();
    eprintln!(
        "power loss: {} writes acknowledged ({n_at_stop} when the storenodes froze), {dropped_bytes} unsynced bytes dropped",
        acked.len()
    );

    // Reboot: mount the filesystems again on what survived, restart the storenodes
    // (without failpoints), read every acknowledged write.
    for (i, l) in fs.iter_mut().enumerate() {
        l.stop();
        *l = Lazy::start(
            &l.backing.clone(),
            &l.mnt.clone(),
            &root.join(format!("lazyfs-{i}-reboot.log")),
        );
    }
    for l in &fs {
        assert_eq!(
            std::fs::read(l.mnt.join("canary-synced")).ok().as_deref(),
            Some(&b"synced"[..]),
            "the fsynced canary did not survive the power loss"
        );
        assert!(
            !l.mnt.join("canary-unsynced").exists(),
            "the unsynced canary survived the power loss: the filesystem kept unsynced data"
        );
    }
    for i in 0..3 {
        start_store(&mut c, i, &[]);
    }
    let writable = wait_writable(&c, "rebooted", Duration::from_secs(if skip_fsync { 20 } else { 60 })).await;
    assert!(
        writable || skip_fsync,
        "the cluster did not come back after the power loss: {}",
        c.read_log("store-0")
    );

    let client = c.client("power", "read").await;
    let mut out = Outcome {
        acked: acked.len(),
        dropped_bytes,
        ..Outcome::default()
    };
    let read_deadline = Instant::now() + Duration::from_secs(if skip_fsync { 15 } else { 40 });
    for (k, v) in &acked {
        let mut verdict = None;
        while verdict.is_none() && Instant::now() < read_deadline {
            match tokio::time::timeout(Duration::from_secs(3), client.get(k.clone().into_bytes())).await {
                Ok(Ok(Some(e))) if e.value == v.as_bytes() => verdict = Some(true),
                Ok(Ok(_)) => verdict = Some(false),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        match verdict {
            Some(true) => out.intact += 1,
            Some(false) => out.lost.push(k.clone()),
            None => out.unreadable += 1,
        }
    }
    eprintln!(
        "after the reboot: {} acknowledged, {} intact, {} lost, {} unreadable",
        out.acked,
        out.intact,
        out.lost.len(),
        out.unreadable
    );
    // The contended clients end their last calls (those in flight at the power loss end
    // as failures or complete on the rebooted cluster), then each key is read until a
    // read succeeds, and the whole history is checked.
    for t in contended {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let reader = rec.client(c.client("power", "read").await, 99);
    let mut final_reads: HashMap<String, Op> = HashMap::new();
    let final_deadline = Instant::now() + Duration::from_secs(if skip_fsync { 15 } else { 40 });
    for k in KEYS.into_iter().chain([SENTINEL]) {
        while Instant::now() < final_deadline {
            let op = reader.invoke(k, Input::Get).await;
            if op.output().is_some() {
                final_reads.insert(k.to_string(), op);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    out.history = History {
        ops: rec.ops(),
        nemesis: Vec::new(),
    };
    out.report = check(&out.history, &CheckOptions::default());
    out.contended_lost = lost_writes(&out.history.ops, &final_reads);
    let answered = out
        .history
        .ops
        .iter()
        .filter(|o| o.input.is_write() && o.output().is_some())
        .count();
    eprintln!(
        "contended keys: {} calls ({answered} writes answered), {} of {} keys read back, {} violations, {} undecided, {} acknowledged writes lost",
        out.history.ops.len(),
        final_reads.len(),
        KEYS.len() + 1,
        out.report.violations.len(),
        out.report.undecided.len(),
        out.contended_lost.len()
    );
    for i in 0..3 {
        c.kill_store(i);
    }
    for l in fs.iter_mut() {
        l.stop();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_loses_no_acknowledged_write() {
    let started = Instant::now();
    let out = run(false).await;
    assert!(out.acked >= 1000, "only {} writes acknowledged", out.acked);
    assert!(
        out.dropped_bytes > 0,
        "the power loss dropped nothing: the test would not see a missing fsync"
    );
    assert!(
        out.lost.is_empty() && out.unreadable == 0,
        "acknowledged writes lost in a power loss with fsync on: {} lost (first: {:?}), {} unreadable",
        out.lost.len(),
        out.lost.iter().take(5).collect::<Vec<_>>(),
        out.unreadable
    );
    assert_eq!(out.intact, out.acked);
    assert!(
        out.history.ops.len() > 100,
        "the contended workload made only {} calls",
        out.history.ops.len()
    );
    let described: Vec<String> = out
        .report
        .violations
        .iter()
        .map(|v| describe(v, &out.history))
        .collect();
    assert!(
        out.report.is_linearizable(),
        "the history across the power loss is not linearizable:\n{}\nundecided: {:?}",
        described.join("\n"),
        out.report.undecided
    );
    assert!(
        out.contended_lost.is_empty(),
        "acknowledged writes of contended keys lost: {:?}",
        out.contended_lost
    );
    eprintln!(
        "fsync on: 0 of {} acknowledged writes lost, {} contended calls linearizable, {:?}",
        out.acked,
        out.history.ops.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_with_fsync_skipped_loses_acknowledged_writes() {
    let started = Instant::now();
    let out = run(true).await;
    assert!(out.acked >= 1000, "only {} writes acknowledged", out.acked);
    // With the group-commit fsync skipped, nothing written after the failpoint went on was
    // synced, so the power loss takes every write of the workload: all of them must be
    // gone (absent), not merely some.
    assert!(
        !out.lost.is_empty(),
        "no acknowledged write was lost with fsync skipped: the filesystem kept unsynced data \
         ({} intact, {} unreadable)",
        out.intact,
        out.unreadable
    );
    assert_eq!(
        out.intact, 0,
        "{} acknowledged writes survived although none was fsynced",
        out.intact
    );
    // The checker sees it too: the sentinel's acknowledged put (the key's only write) is
    // gone, so its history has no linearization, and the plain lost-write check names it.
    // (Contended keys are caught too unless their last acknowledged write was a delete.)
    assert!(
        out.report.violations.iter().any(|v| v.key == SENTINEL),
        "the checker did not flag the lost sentinel write; violations on {:?}",
        out.report.violations.iter().map(|v| &v.key).collect::<Vec<_>>()
    );
    assert!(
        out.contended_lost
            .iter()
            .any(|l| l.starts_with(&format!("key {SENTINEL}:"))),
        "the lost sentinel write was not reported: {:?}",
        out.contended_lost
    );
    eprintln!(
        "contended keys: {} violations, {} lost writes, e.g. {:?}",
        out.report.violations.len(),
        out.contended_lost.len(),
        out.contended_lost.first()
    );
    eprintln!(
        "fsync skipped: {} of {} acknowledged writes lost ({} unreadable), {:?}",
        out.lost.len(),
        out.acked,
        out.unreadable,
        started.elapsed()
    );
}
