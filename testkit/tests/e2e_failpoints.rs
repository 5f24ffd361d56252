//! Crash points and fail-stop on real processes (issue 14, ADR 0029): 3 storenodes, placement
//! and a proxy; store 0 is restarted with a failpoint (FAILPOINTS, or PUT /failpoints on its
//! metrics port), the cluster is driven until store 0 reaches it and exits, then store 0 is
//! restarted without it. Every test then checks that every acknowledged write reads back
//! through the proxy, and that store 0 itself converges to exactly those values (its own
//! replicas, read locally over the internal Store API), so the restarted store's range state
//! is consistent with the cluster's.
//!
//! Needs binaries built with `--features skv-storenode/failpoints` (scripts/test.sh builds
//! them so); a binary without the feature refuses FAILPOINTS and the test says so.

use skv_common::keys::namespace_prefix;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::{
    AdminMergeRequest, AdminSplitRequest, GetRangeRequest, GetStoresRequest, RequestHeader, StoreGetRequest,
};
use skv_testkit::cluster::ProcCluster;
use skv_testkit::cluster::admin;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// Exit status of a crash point (skv_storenode::failpoints::EXIT_CRASH_POINT).
const EXIT_CRASH_POINT: i32 = 86;
/// Exit status of fail-stop (skv_storenode::engine::EXIT_STORAGE_ERROR).
const EXIT_STORAGE_ERROR: i32 = 74;
const NS: &str = "fp";

struct Harness {
    c: ProcCluster,
    client: skv::Client,
    acked: BTreeMap<String, Vec<u8>>,
    next: u64,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Vec::new()).await
    }

    /// [`Self::start`] with extra flags for every storenode.
    async fn start_with(store_args: Vec<String>) -> Harness {
        let c = ProcCluster::start_with(3, false, store_args, Vec::new()).await;
        let client = c.client(NS, "write").await;
        let mut h = Harness {
            c,
            client,
            acked: BTreeMap::new(),
            next: 0,
        };
        // Acknowledged before any fault.
        for _ in 0..20 {
            assert!(h.write_one().await, "a write before the fault failed");
        }
        h
    }

    /// One put of a fresh value on one of 40 keys; remembers it when acknowledged.
    async fn write_one(&mut self) -> bool {
        self.next += 1;
        let key = format!("k{:02}", self.next % 40);
        let value = format!("v{}", self.next).into_bytes();
        match tokio::time::timeout(Duration::from_secs(10), self.client.put(key.clone(), value.clone())).await {
            Ok(Ok(_)) => {
                self.acked.insert(key, value);
                true
            }
            // Failed or unknown: the key's last acknowledged value may or may not be replaced.
            // A later acknowledged write of the key settles it; one without is dropped from
            // the check (its outcome is unknown).
            _ => {
                self.acked.remove(&key);
                false
            }
        }
    }

    /// Restarts store 0 (kill -9, then start) with `env` and `args` added.
    fn restart_store0(&mut self, env: &[(&str, &str)], args: &[String]) {
        let (saved_env, saved_args) = (self.c.store_env.clone(), self.c.store_args.clone());
        self.c.kill_store(0);
        self.c
            .store_env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.c.store_args.extend(args.iter().cloned());
        self.c.start_store(0);
        self.c.store_env = saved_env;
        self.c.store_args = saved_args;
    }

    /// The exit status of store 0 if it has exited.
    fn store0_exit(&mut self) -> Option<i32> {
        let g = self.c.stores[0].as_mut()?;
        let status = g.child_mut()?.try_wait().ok()??;
        self.c.stores[0] = None;
        Some(status.code().unwrap_or(-1))
    }

    /// Drives writes until store 0 exits (up to `within`); returns its exit code.
    async fn write_until_store0_exits(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(code) = self.store0_exit() {
                return code;
            }
            self.write_one().await;
        }
        panic!(
            "store 0 did not stop within {within:?}; its log:\n{}",
            tail(&self.c.read_log("store-0"))
        );
    }

    async fn wait_store0_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(code) = self.store0_exit() {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "store 0 did not stop within {within:?}; its log:\n{}",
            tail(&self.c.read_log("store-0"))
        );
    }

    /// Restarts store 0 without failpoints, writes more, and checks every acknowledged
    /// write through the proxy and on store 0's own replicas.
    async fn recover_and_check(&mut self) {
        self.c.start_store(0);
        self.recover_and_check_without_restart().await;
    }

    /// [`Self::recover_and_check`] with store 0 already running.
    async fn recover_and_check_without_restart(&mut self) {
        let mut ok = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ok < 20 && Instant::now() < deadline {
            if self.write_one().await {
                ok += 1;
            }
        }
        assert!(ok >= 20, "the cluster did not take writes again after the restart");
        let reader = self.c.client(NS, "read").await;
        for (k, v) in &self.acked {
            let got = reader
                .get(k.clone())
                .await
                .unwrap_or_else(|e| panic!("read {k} after the restart: {e}"));
            assert_eq!(
                got.map(|e| e.value),
                Some(v.clone()),
                "acknowledged write of {k} lost or replaced"
            );
        }
        self.store0_converges().await;
        assert!(
            self.store0_exit().is_none(),
            "store 0 stopped again after the restart:\n{}",
            tail(&self.c.read_log("store-0"))
        );
    }

    /// Store 0's own replicas serve every acknowledged value (local reads, polled until
    /// it has caught up).
    async fn store0_converges(&self) {
        let prefix = namespace_prefix(NS.as_bytes()).unwrap_or_else(|| panic!("bad namespace"));
        let store0 = format!("127.0.0.1:{}", self.c.store_ports[0]);
        let mut pd = PlacementClient::connect(self.c.placement_url())
            .await
            .unwrap_or_else(|e| panic!("placement: {e}"));
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut store = StoreClient::connect(format!("http://{store0}"))
            .await
            .unwrap_or_else(|e| panic!("store 0: {e}"));
        for (k, v) in &self.acked {
            let key = [prefix.as_slice(), k.as_bytes()].concat();
            let mut last = String::new();
            loop {
                assert!(
                    Instant::now() < deadline,
                    "store 0 never served {k} = {:?} (last: {last})",
                    String::from_utf8_lossy(v)
                );
                let range = pd
                    .get_range(admin(GetRangeRequest { key: key.clone() }))
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().range)
                    .and_then(|r| r.descriptor);
                if let Some(d) = range {
                    let r = store
                        .get(StoreGetRequest {
                            header: Some(RequestHeader {
                                range_id: d.range_id,
                                epoch: d.epoch,
                            }),
                            key: key.clone(),
                            stale_ok: true,
                        })
                        .await;
                    match r.map(|r| r.into_inner()) {
                        Ok(g) if g.routing_error.is_none() && g.found && g.value == *v => break,
                        Ok(g) => last = format!("found {} value {:?} {:?}", g.found, g.value, g.routing_error),
                        Err(e) => last = e.to_string(),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The range holding `key` of the namespace: (range id, its store ids). Placement's
    /// answers that carry a retry hint (its map catching up right after a split or a restart,
    /// a leader change) are retried for up to 30 s; any other error, or one that lasts, fails.
    async fn range_of(&self, key: &str) -> (u64, Vec<u64>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_range_of(key).await {
                Ok(r) => return r,
                Err(e)
                    if (e.contains("PD-KeyNotCovered") || e.contains("PD-NotLeader")) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("range of {key}: {e}"),
            }
        }
    }

    /// [`Self::range_of`], or why placement did not answer.
    async fn try_range_of(&self, key: &str) -> Result<(u64, Vec<u64>), String> {
        let prefix = namespace_prefix(NS.as_bytes()).unwrap_or_else(|| panic!("bad namespace"));
        let mut pd = PlacementClient::connect(self.c.placement_url())
            .await
            .map_err(|e| e.to_string())?;
        let d = pd
            .get_range(admin(GetRangeRequest {
                key: [prefix.as_slice(), key.as_bytes()].concat(),
            }))
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .range
            .and_then(|r| r.descriptor)
            .ok_or_else(|| format!("no range for {key}"))?;
        Ok((d.range_id, d.replicas.iter().map(|r| r.store_id).collect()))
    }

    async fn split_at(&self, key: &str) -> Result<(), String> {
        let prefix = namespace_prefix(NS.as_bytes()).unwrap_or_else(|| panic!("bad namespace"));
        let (range_id, _) = self.try_range_of(key).await?;
        let mut pd = PlacementClient::connect(self.c.placement_url())
            .await
            .map_err(|e| e.to_string())?;
        pd.split_range(admin(AdminSplitRequest {
            range_id,
            split_key: [prefix.as_slice(), key.as_bytes()].concat(),
        }))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// Whether store 0 holds a replica of the range of `key`.
    async fn store0_has(&self, key: &str) -> bool {
        let mut pd = PlacementClient::connect(self.c.placement_url())
            .await
            .unwrap_or_else(|e| panic!("placement: {e}"));
        let stores = pd
            .get_stores(admin(GetStoresRequest {}))
            .await
            .unwrap_or_else(|e| panic!("GetStores: {e}"))
            .into_inner()
            .stores;
        let me = format!("127.0.0.1:{}", self.c.store_ports[0]);
        let Some(id) = stores.iter().find(|s| s.address == me).map(|s| s.store_id) else {
            return false;
        };
        self.range_of(key).await.1.contains(&id)
    }

    fn assert_log(&self, needle: &str) {
        let log = self.c.read_log("store-0");
        assert!(
            log.contains(needle),
            "store 0's log does not say {needle:?}:\n{}",
            tail(&log)
        );
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The failpoint refusal of a binary built without the feature, as a clear failure.
fn assert_failpoints_compiled_in(h: &Harness) {
    let log = h.c.read_log("store-0");
    assert!(
        !log.contains("built without the `failpoints` feature"),
        "the storenode binary has no failpoints: build with `cargo build --bins --features skv-storenode/failpoints`"
    );
}

/// A minimal HTTP/1.1 request to 127.0.0.1:`port`; returns the status line and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect :{port}: {e}"));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap_or_else(|e| panic!("write: {e}"));
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Runs a write-path crash point on store 0 and checks recovery.
async fn crash_on_writes(point: &str) {
    let mut h = Harness::start().await;
    let spec = format!("{point}=return");
    h.restart_store0(&[("FAILPOINTS", spec.as_str())], &[]);
    let code = h.write_until_store0_exits(Duration::from_secs(60)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_CRASH_POINT, "store 0 exit code");
    h.assert_log(&format!("crash point {point} reached"));
    h.recover_and_check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_log_append_and_fsync_loses_no_acknowledged_write() {
    crash_on_writes("storenode::log::after_append_before_fsync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_apply_loses_no_acknowledged_write() {
    crash_on_writes("storenode::apply::before_commit").await;
}

/// Fail-stop (ADR 0029): an fsync error, injected over HTTP at run time, stops the store
/// with status 74 and the cause in its log; restarted, it serves every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_error_stops_the_storenode_and_a_restart_serves_every_acknowledged_write() {
    let mut h = Harness::start().await;
    let port = skv_testkit::free_port();
    h.restart_store0(&[], &["--metrics-listen".into(), format!("127.0.0.1:{port}")]);
    // Store 0 back in service (it holds a replica of every range: 3 stores, 3 replicas).
    let mut ok = 0;
    while ok < 10 {
        if h.write_one().await {
            ok += 1;
        }
    }
    // The writes may all have gone to the other stores' leaders: wait until the restarted
    // process serves its metrics port before setting the failpoint through it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "store 0's metrics port :{port} never opened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bad = http(port, "PUT", "/failpoints/storenode::log::fsync_error", "notanaction(");
    assert!(bad.starts_with("HTTP/1.1 400"), "a bad action must be refused: {bad}");
    let set = http(port, "PUT", "/failpoints/storenode::log::fsync_error", "return");
    assert!(
        set.starts_with("HTTP/1.1 200"),
        "PUT /failpoints (binaries built with --features skv-storenode/failpoints?): {set}"
    );
    let code = h.write_until_store0_exits(Duration::from_secs(30)).await;
    assert_eq!(code, EXIT_STORAGE_ERROR, "store 0 exit code");
    h.assert_log("fatal storage error in the group-commit fsync");
    h.assert_log("injected fsync error");
    h.recover_and_check().await;
}

/// Fail-stop on a write error of the Raft log (FAILPOINTS at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_write_error_stops_the_storenode() {
    let mut h = Harness::start().await;
    h.restart_store0(&[("FAILPOINTS", "storenode::log::append_error=return")], &[]);
    let code = h.write_until_store0_exits(Duration::from_secs(60)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_STORAGE_ERROR, "store 0 exit code");
    h.assert_log("fatal storage error in a Raft log append");
    h.recover_and_check().await;
}

/// Fail-stop on a write error of the state machine (an apply's batch commit): the store
/// exits with 74 rather than stopping only the Raft groups that hit it, and restarted it
/// replays the committed entries and serves every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_write_error_stops_the_storenode() {
    let mut h = Harness::start().await;
    h.restart_store0(&[("FAILPOINTS", "storenode::apply::commit_error=return")], &[]);
    let code = h.write_until_store0_exits(Duration::from_secs(60)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_STORAGE_ERROR, "store 0 exit code");
    h.assert_log("fatal storage error in a Raft apply (the state machine's batch commit)");
    h.assert_log("injected write error (failpoint storenode::apply::commit_error)");
    h.recover_and_check().await;
}

/// A crash while applying a split (the batch with both halves built, not committed): the
/// restarted store replays the split and serves both halves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_split_recovers_both_halves() {
    let mut h = Harness::start().await;
    assert!(h.store0_has("k20").await, "store 0 must hold the range");
    h.restart_store0(&[("FAILPOINTS", "storenode::split::before_commit=return")], &[]);
    for _ in 0..10 {
        h.write_one().await;
    }
    // The split commits on the other two replicas (a quorum) and store 0 dies applying it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.split_at("k20").await.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let code = h.wait_store0_exit(Duration::from_secs(30)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_CRASH_POINT, "store 0 exit code");
    h.assert_log("crash point storenode::split::before_commit reached");
    h.recover_and_check().await;
    let (left, _) = h.range_of("k00").await;
    let (right, _) = h.range_of("k20").await;
    assert_ne!(left, right, "the split did not happen");
}

/// A crash while committing a merge on the target: the restarted store replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_merge_recovers_the_merged_range() {
    let mut h = Harness::start().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.split_at("k20").await.is_err() {
        assert!(Instant::now() < deadline, "the split before the merge did not happen");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (left, _) = h.range_of("k00").await;
    let (right, _) = h.range_of("k20").await;
    assert_ne!(left, right);
    h.restart_store0(&[("FAILPOINTS", "storenode::merge::before_commit=return")], &[]);
    for _ in 0..10 {
        h.write_one().await;
    }
    let mut pd = PlacementClient::connect(h.c.placement_url())
        .await
        .unwrap_or_else(|e| panic!("placement: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = pd
            .merge_ranges(admin(AdminMergeRequest {
                left_range_id: left,
                right_range_id: right,
            }))
            .await;
        if r.is_ok() || h.store0_exit_peek() {
            break;
        }
        assert!(Instant::now() < deadline, "the merge was refused: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let code = h.wait_store0_exit(Duration::from_secs(30)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_CRASH_POINT, "store 0 exit code");
    h.assert_log("crash point storenode::merge::before_commit reached");
    h.recover_and_check().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.range_of("k00").await.0 != h.range_of("k20").await.0 {
        assert!(Instant::now() < deadline, "the merge never completed in the range map");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A crash while installing a snapshot (file received and checked, redo marker durable,
/// engine untouched): store 0 is down while the others write past a log compaction, so it
/// needs the leader's snapshot; it dies installing it and, restarted, finishes or redoes the
/// install and serves every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_snapshot_install_recovers() {
    // A log compaction every 20 entries (purged in batches of 256): a store that missed 600
    // writes needs a snapshot.
    let mut h = Harness::start_with(vec!["--raft-snapshot-logs".into(), "20".into()]).await;
    h.c.kill_store(0);
    let mut ok = 0;
    while ok < 600 {
        if h.write_one().await {
            ok += 1;
        }
    }
    h.restart_store0(&[("FAILPOINTS", "storenode::snapshot::mid_install=return")], &[]);
    let code = h.write_until_store0_exits(Duration::from_secs(60)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_CRASH_POINT, "store 0 exit code");
    h.assert_log("crash point storenode::snapshot::mid_install reached");
    h.recover_and_check().await;
}

impl Harness {
    /// Restarts placement (kill -9, then start on its data dir) with `FAILPOINTS`.
    fn restart_placement_with_failpoints(&mut self, spec: &str) {
        if let Some(mut g) = self.c.placement.take() {
            g.kill();
        }
        let log = std::fs::File::create(self.c.dir.path().join("placement-fp.log"))
            .map(std::process::Stdio::from)
            .unwrap_or_else(|_| std::process::Stdio::null());
        let mut cmd = std::process::Command::new(skv_testkit::bin_path("skv-placement"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.c.placement_port))
            .arg("--data-dir")
            .arg(self.c.dir.path().join("pd"))
            .arg("--initial-wait-ms")
            .arg("300")
            .arg("--schedule-interval-ms")
            .arg("200")
            .arg("--jwt-hs256-secret-file")
            .arg(self.c.dir.path().join("secret"))
            .env("FAILPOINTS", spec)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        self.c.placement =
            Some(skv_testkit::ChildGuard::spawn("placement", &mut cmd).unwrap_or_else(|e| panic!("{e}")));
    }

    /// Waits for placement to exit; its exit code.
    async fn wait_placement_exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let status = self
                .c
                .placement
                .as_mut()
                .and_then(|g| g.child_mut())
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(st) = status {
                self.c.placement = None;
                return st.code().unwrap_or(-1);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "placement did not stop within {within:?}: {}",
            tail(&self.c.read_log("placement-fp"))
        );
    }

    /// Every range of the map, in key order: they tile the key space (no gap, no overlap).
    async fn assert_range_map_tiles(&self) {
        let mut pd = PlacementClient::connect(self.c.placement_url())
            .await
            .unwrap_or_else(|e| panic!("placement: {e}"));
        let ranges = pd
            .scan_ranges(admin(skv_proto::internal::ScanRangesRequest::default()))
            .await
            .unwrap_or_else(|e| panic!("ScanRanges: {e}"))
            .into_inner()
            .ranges;
        let descs: Vec<_> = ranges.into_iter().filter_map(|r| r.descriptor).collect();
        assert!(!descs.is_empty());
        assert!(descs[0].start.is_empty(), "the map does not start at the empty key");
        for w in descs.windows(2) {
            assert_eq!(
                w[0].end, w[1].start,
                "gap or overlap between r{} and r{}",
                w[0].range_id, w[1].range_id
            );
        }
        assert!(
            descs.last().is_some_and(|d| d.end.is_empty()),
            "the map does not end at +inf"
        );
    }
}

/// Placement dies just before (or just after) writing a split into the range map; restarted,
/// it learns the split from the storenodes (the source of truth), the map tiles the key
/// space with both halves, and every acknowledged write reads back.
async fn placement_crash_around_range_map_txn(point: &str) {
    let mut h = Harness::start().await;
    h.restart_placement_with_failpoints(&format!("{point}=return"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The split is applied by the storenodes; placement crashes recording it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = h.split_at("k20").await.is_ok();
        let exited = h.placement_exited();
        if done || exited {
            break;
        }
        assert!(Instant::now() < deadline, "the split was never accepted");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.expect_placement_crash(point).await;
    h.c.start_placement();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = match (h.try_range_of("k00").await, h.try_range_of("k20").await) {
            (Ok(a), Ok(b)) => a.0 != b.0,
            _ => false,
        };
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "placement never learned the split");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.assert_range_map_tiles().await;
    let mut ok = 0;
    while ok < 10 {
        if h.write_one().await {
            ok += 1;
        }
    }
    h.recover_and_check_without_restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_crash_before_the_range_map_txn_of_a_split_recovers() {
    placement_crash_around_range_map_txn("placement::range_map::before_split_txn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_crash_after_the_range_map_txn_of_a_split_recovers() {
    placement_crash_around_range_map_txn("placement::range_map::after_split_txn").await;
}

impl Harness {
    /// Whether placement has exited, without reaping it.
    fn placement_exited(&mut self) -> bool {
        self.c
            .placement
            .as_mut()
            .and_then(|g| g.child_mut())
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits for placement to exit at crash point `point`: exit code 74 and the point named
    /// in its log (a binary without the failpoints feature is named as the cause).
    async fn expect_placement_crash(&mut self, point: &str) {
        let code = self.wait_placement_exit(Duration::from_secs(30)).await;
        let log = self.c.read_log("placement-fp");
        assert!(
            !log.contains("built without the `failpoints` feature"),
            "the placement binary has no failpoints: build with --features skv-placement/failpoints"
        );
        assert_eq!(code, EXIT_CRASH_POINT, "placement exit code: {}", tail(&log));
        assert!(log.contains(&format!("crash point {point} reached")), "{}", tail(&log));
    }

    /// Whether store 0 has exited, without reaping it.
    fn store0_exit_peek(&mut self) -> bool {
        self.c.stores[0]
            .as_mut()
            .and_then(|g| g.child_mut())
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }
}

/// Placement dies just before (or just after) writing a merge into the range map (the widened
/// descriptor that deletes the absorbed range's record), after the storenodes committed it;
/// restarted, it learns the merge from the storenodes, the map tiles the key space, and every
/// acknowledged write reads back.
async fn placement_crash_around_merge_txn(point: &str) {
    let mut h = Harness::start().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.split_at("k20").await.is_err() {
        assert!(Instant::now() < deadline, "the split before the merge did not happen");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (left, _) = h.range_of("k00").await;
    let (right, _) = h.range_of("k20").await;
    assert_ne!(left, right);
    h.restart_placement_with_failpoints(&format!("{point}=return"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..10 {
        h.write_one().await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let exited = h.placement_exited();
        if exited {
            break;
        }
        let r = match PlacementClient::connect(h.c.placement_url()).await {
            Ok(mut pd) => pd
                .merge_ranges(admin(AdminMergeRequest {
                    left_range_id: left,
                    right_range_id: right,
                }))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(Instant::now() < deadline, "placement never reached {point}: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.expect_placement_crash(point).await;
    // Writes go on while placement is down (the proxy follows the storenodes' answers).
    for _ in 0..10 {
        h.write_one().await;
    }
    h.c.start_placement();
    // The storenodes merged before placement recorded it: restarted, placement learns it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let merged = match (h.try_range_of("k00").await, h.try_range_of("k20").await) {
            (Ok(a), Ok(b)) => a.0 == b.0,
            _ => false,
        };
        if merged {
            break;
        }
        assert!(Instant::now() < deadline, "placement never learned the merge");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(h.range_of("k00").await.0, left, "the merged range keeps the left id");
    h.assert_range_map_tiles().await;
    h.recover_and_check_without_restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_crash_before_the_range_map_txn_of_a_merge_recovers() {
    placement_crash_around_merge_txn("placement::range_map::before_merge_txn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_crash_after_the_range_map_txn_of_a_merge_recovers() {
    placement_crash_around_merge_txn("placement::range_map::after_merge_txn").await;
}

impl Harness {
    /// Store 0's id (by its address in placement's store list).
    async fn store0_id(&self) -> Option<u64> {
        let mut pd = PlacementClient::connect(self.c.placement_url()).await.ok()?;
        let stores = pd
            .get_stores(admin(GetStoresRequest {}))
            .await
            .ok()?
            .into_inner()
            .stores;
        let me = format!("127.0.0.1:{}", self.c.store_ports[0]);
        stores.iter().find(|s| s.address == me).map(|s| s.store_id)
    }
}

/// Every checkpoint the cluster's manifests name, each read in full (every block's and the
/// object's checksum checked): (range id, applied index, keys) of each.
async fn named_checkpoints_read_whole(o: &skv_objstore::Objects) -> Vec<(u64, u64, u64)> {
    let dir = format!(
        "{}/manifests/ranges",
        skv_objstore::cluster_prefix(o.cluster_id().unwrap_or_else(|| panic!("unscoped objects")))
    );
    let mut out = Vec::new();
    for (rel, _, _) in o.list(&dir).await.unwrap_or_else(|e| panic!("list manifests: {e}")) {
        let Ok(id) = rel
            .trim_start_matches(&format!("{dir}/"))
            .trim_end_matches(".json")
            .parse::<u64>()
        else {
            continue;
        };
        let Some(m) = o
            .read_manifest(id)
            .await
            .unwrap_or_else(|e| panic!("manifest {id}: {e}"))
        else {
            continue;
        };
        for c in &m.checkpoints {
            let mut keys = 0u64;
            o.read_checkpoint(c, |block| {
                keys += block.len() as u64;
                Ok(())
            })
            .await
            .unwrap_or_else(|e| panic!("the manifest of range {id} names {} and it does not read: {e}", c.path));
            assert_eq!(keys, c.key_count, "{}: keys read vs the manifest's count", c.path);
            out.push((id, c.applied_index, keys));
        }
    }
    out
}

/// A crash between a checkpoint's upload and its manifest write: store 0 leads the range and
/// dies with the object written and no manifest naming it. Every manifest still names only
/// whole objects (each read back with its checksums), the restarted store leads again and
/// records a newer checkpoint, and every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_checkpoint_upload_leaves_no_manifest_naming_it_and_the_next_checkpoint_succeeds() {
    let objects_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = format!("file://{}", objects_dir.path().display());
    let mut h = Harness::start_with(
        ["--object-store-url", url.as_str(), "--checkpoint-interval-secs", "1"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let parsed: skv_objstore::ObjectStoreUrl = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    let o = skv_objstore::Objects::open(&parsed, skv_objstore::ObjMetrics::new())
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    let cluster_id = PlacementClient::connect(h.c.placement_url())
        .await
        .unwrap_or_else(|e| panic!("placement: {e}"))
        .get_members(admin(skv_proto::internal::GetMembersRequest {}))
        .await
        .unwrap_or_else(|e| panic!("members: {e}"))
        .into_inner()
        .cluster_id;
    let o = o.for_cluster(&cluster_id).unwrap_or_else(|e| panic!("{e}"));
    let before = wait_until_some("a first checkpoint", Duration::from_secs(60), || async {
        let n = named_checkpoints_read_whole(&o).await;
        (!n.is_empty()).then_some(n)
    })
    .await;
    let first_index = before.iter().map(|c| c.1).max().unwrap_or(0);

    h.restart_store0(&[("FAILPOINTS", "storenode::checkpoint::mid_upload=return")], &[]);
    // Make store 0 lead the range and give it changes to checkpoint, until it dies.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !h.store0_exit_peek() {
        assert!(
            Instant::now() < deadline,
            "store 0 never reached the crash point:\n{}",
            tail(&h.c.read_log("store-0"))
        );
        if let (Some(id), Ok((range_id, _))) = (h.store0_id().await, h.try_range_of("k00").await)
            && let Ok(mut pd) = PlacementClient::connect(h.c.placement_url()).await
        {
            let _ = pd
                .transfer_leader(admin(skv_proto::internal::AdminTransferLeaderRequest {
                    range_id,
                    to_store_id: id,
                }))
                .await;
        }
        for _ in 0..5 {
            h.write_one().await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let code = h.wait_store0_exit(Duration::from_secs(5)).await;
    assert_failpoints_compiled_in(&h);
    assert_eq!(code, EXIT_CRASH_POINT, "store 0 exit code");
    h.assert_log("crash point storenode::checkpoint::mid_upload reached");
    // The object store holds the uploaded object, and no manifest names it: every named
    // checkpoint reads back whole.
    let snaps: Vec<String> = o
        .list("")
        .await
        .unwrap_or_else(|e| panic!("list: {e}"))
        .into_iter()
        .map(|(p, _, _)| p)
        .filter(|p| p.ends_with(".snap"))
        .collect();
    let after_crash = named_checkpoints_read_whole(&o).await;
    println!("after the crash: {} objects, named {after_crash:?}", snaps.len());
    assert!(
        snaps.len() > after_crash.len(),
        "the crashed upload left no object: {snaps:?} vs named {after_crash:?}"
    );

    h.recover_and_check().await;
    // The next checkpoint (of whichever store leads now) is recorded and reads back.
    let crash_index = after_crash.iter().map(|c| c.1).max().unwrap_or(0);
    for _ in 0..20 {
        h.write_one().await;
    }
    let later = wait_until_some("a checkpoint newer than the crash", Duration::from_secs(60), || async {
        let n = named_checkpoints_read_whole(&o).await;
        n.iter().any(|c| c.1 > crash_index).then_some(n)
    })
    .await;
    println!("checkpoints: first at index {first_index}, at the crash {crash_index}, later {later:?}");
}

/// Polls `f` every 300 ms until it gives a value (up to `within`).
async fn wait_until_some<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
