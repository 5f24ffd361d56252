//! Replicas that bootstrap from object storage (issue 11, ADR 0027), with real processes:
//! etcd, placement, storenodes with `--object-store-url` on a real S3 server (s3s-fs), a
//! proxy. A replica moved to a new store installs the range's latest checkpoint and catches
//! up from the leader's log; the leader's outbound snapshot bytes
//! (`skv_storenode_raft_snapshot_sent_bytes_total`, summed over every store) are compared
//! with the same move to a store started with `--bootstrap-from-checkpoints=false`, and with
//! moves whose checkpoint is corrupt or missing (the leader's snapshot is the fallback).
//! Run with `--no-capture` to see the figures.

use futures::StreamExt;
use skv_objstore::{ObjMetrics, Objects};
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::{
    AdminMoveReplicaRequest, AdminTransferLeaderRequest, GetMembersRequest, GetStoresRequest, RangeInfo, ReplicaRole,
    ScanRangesRequest, SetSchedulerPausedRequest,
};
use skv_testkit::cluster::{ProcCluster, admin};
use skv_testkit::s3::S3Server;
use skv_testkit::{free_port, metrics, wait_until};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const URL: &str = "s3://skv/cluster";

struct Env {
    c: ProcCluster,
    s3: S3Server,
    o: Objects,
    pd: PlacementClient<Channel>,
    /// Stores killed by the test (their metrics are not read).
    down: Vec<u64>,
}

impl Env {
    async fn start(keys: usize) -> Env {
        Self::start_with(keys, &["--checkpoint-interval-secs", "2"]).await
    }

    async fn start_with(keys: usize, flags: &[&str]) -> Env {
        Self::start_full(keys, flags, &[]).await
    }

    /// Three storenodes with `flags`, placement with `placement_flags`, `keys` keys written.
    async fn start_full(keys: usize, flags: &[&str], placement_flags: &[&str]) -> Env {
        let s3 = S3Server::start(&["skv"]);
        let mut args: Vec<String> = ["--object-store-url", URL, "--metrics-listen", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
        args.extend(flags.iter().map(|s| s.to_string()));
        let pargs = placement_flags.iter().map(|s| s.to_string()).collect();
        let c = ProcCluster::start_with_placement_args(3, true, args, s3.env(), pargs).await;
        let o = Objects::open_with_vars(&URL.parse().unwrap(), s3.env(), ObjMetrics::new())
            .await
            .unwrap_or_else(|e| panic!("open: {e}"));
        let mut pd = PlacementClient::connect(c.placement_url())
            .await
            .unwrap_or_else(|e| panic!("placement: {e}"));
        // Checkpoints live under the cluster's prefix (clusters/<cluster_id>/, ADR 0025).
        let cluster_id = pd
            .get_members(admin(GetMembersRequest {}))
            .await
            .unwrap_or_else(|e| panic!("members: {e}"))
            .into_inner()
            .cluster_id;
        let o = o.for_cluster(&cluster_id).unwrap_or_else(|e| panic!("{e}"));
        // The first range is up-replicated to three voters by the scheduler after the start:
        // pausing it before that (seen on a loaded machine) would leave a one-replica range.
        wait_until(
            "three voters with a leader on every range",
            Duration::from_secs(60),
            || {
                let mut pd = pd.clone();
                async move {
                    let ranges = pd
                        .scan_ranges(ScanRangesRequest::default())
                        .await
                        .ok()?
                        .into_inner()
                        .ranges;
                    let ok = !ranges.is_empty()
                        && ranges.iter().all(|r| {
                            r.leader_store_id != 0
                                && r.descriptor.as_ref().is_some_and(|d| {
                                    d.replicas
                                        .iter()
                                        .filter(|x| x.role == ReplicaRole::Voter as i32)
                                        .count()
                                        == 3
                                })
                        });
                    ok.then_some(())
                }
            },
        )
        .await;
        // No split, merge or balance move while the test moves replicas itself.
        pd.set_scheduler_paused(admin(SetSchedulerPausedRequest { paused: true }))
            .await
            .unwrap_or_else(|e| panic!("pause: {e}"));
        let mut env = Env {
            c,
            s3,
            o,
            pd,
            down: Vec::new(),
        };
        env.write(keys).await;
        env
    }

    /// `keys` keys of 100 bytes in batches, four writers.
    async fn write(&mut self, keys: usize) {
        let client = self.c.client("boot", "write").await;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..4 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for chunk in (0..keys).filter(|i| i / 1000 % 4 == w).collect::<Vec<_>>().chunks(1000) {
                    let pairs: Vec<(Vec<u8>, Vec<u8>)> = chunk.iter().map(|i| (key(*i), value(*i))).collect();
                    let res = client
                        .batch_put(pairs)
                        .await
                        .unwrap_or_else(|e| panic!("batch put: {e}"));
                    assert!(res.iter().all(|r| r.is_ok()), "a put of the batch failed");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap_or_else(|e| panic!("writer: {e}"));
        }
        println!("wrote {keys} keys in {:.1} s", started.elapsed().as_secs_f64());
    }

    /// The range holding the test's keys (the only one with that many keys checkpointed)
    /// once its latest checkpoint covers `keys` keys and did not change for 3 s (no entry
    /// applied since: the leader's log holds everything after it). Returns (range, path, index).
    async fn settled_checkpoint(&self, keys: u64, newer_than: u64) -> (u64, String, u64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last: Option<(u64, String, u64)> = None;
        let mut since = Instant::now();
        loop {
            assert!(
                Instant::now() < deadline,
                "no settled checkpoint of {keys} keys after index {newer_than}"
            );
            let cur = self.latest_checkpoint(keys).await.filter(|c| c.2 > newer_than);
            if cur.is_some() && cur == last {
                if since.elapsed() >= Duration::from_secs(3) {
                    return cur.unwrap_or_default();
                }
            } else {
                last = cur;
                since = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// (range, path, index) of the latest checkpoint with the most keys, at least `keys`.
    async fn latest_checkpoint(&self, keys: u64) -> Option<(u64, String, u64)> {
        let mut best: Option<(u64, String, u64, u64)> = None;
        let dir = format!(
            "{}/manifests/ranges",
            skv_objstore::cluster_prefix(self.o.cluster_id()?)
        );
        for (rel, _, _) in self.o.list(&dir).await.ok()? {
            let Ok(id) = rel
                .trim_start_matches(&format!("{dir}/"))
                .trim_end_matches(".json")
                .parse::<u64>()
            else {
                continue;
            };
            let Ok(Some(m)) = self.o.read_manifest(id).await else {
                continue;
            };
            let Some(l) = m.latest() else { continue };
            if l.key_count >= keys && best.as_ref().is_none_or(|b| l.key_count > b.3) {
                best = Some((id, l.path.clone(), l.applied_index, l.key_count));
            }
        }
        best.map(|(id, path, index, _)| (id, path, index))
    }

    async fn range(&mut self, id: u64) -> RangeInfo {
        let r = self
            .pd
            .scan_ranges(ScanRangesRequest {
                start: Vec::new(),
                end: Vec::new(),
                limit: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("scan ranges: {e}"))
            .into_inner();
        r.ranges
            .into_iter()
            .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == id))
            .unwrap_or_else(|| panic!("range {id} not in the range map"))
    }

    /// (store id, metrics address) of every store placement knows.
    async fn stores(&mut self) -> Vec<(u64, String)> {
        self.pd
            .get_stores(GetStoresRequest::default())
            .await
            .map(|r| {
                r.into_inner()
                    .stores
                    .into_iter()
                    .map(|s| (s.store_id, s.metrics_address))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn metrics_of(&mut self, store: u64) -> String {
        let addr = self
            .stores()
            .await
            .into_iter()
            .find(|(id, _)| *id == store)
            .map(|(_, a)| a)
            .unwrap_or_default();
        metrics::scrape(&addr).await.unwrap_or_default()
    }

    /// Snapshot bytes sent by every store so far.
    async fn snapshot_bytes_sent(&mut self) -> f64 {
        let mut total = 0.0;
        let down = self.down.clone();
        for (_, addr) in self.stores().await.into_iter().filter(|(id, _)| !down.contains(id)) {
            let m = metrics::scrape(&addr)
                .await
                .unwrap_or_else(|| panic!("metrics of {addr} not readable"));
            total += metrics::sum(&m, "skv_storenode_raft_snapshot_sent_bytes_total");
        }
        total
    }

    /// Snapshot bytes sent since `before`, once settled: a placement move can finish (the
    /// range map shows the new voter) before the leader's snapshot stream ends, so the total
    /// is read until it stopped moving for 2 s (and, when a snapshot is expected, moved).
    async fn sent_since(&mut self, before: f64, expect_snapshot: bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = -1.0;
        let mut since = Instant::now();
        loop {
            let v = self.snapshot_bytes_sent().await - before;
            if v != last {
                last = v;
                since = Instant::now();
            } else if since.elapsed() >= Duration::from_secs(2) && (!expect_snapshot || v > 0.0) {
                return v;
            }
            assert!(Instant::now() < deadline, "snapshot bytes did not settle ({v} B sent)");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `kill -9` the storenode process of store `id` (found by its gRPC port).
    async fn kill(&mut self, id: u64) {
        let address = self
            .pd
            .get_stores(GetStoresRequest::default())
            .await
            .unwrap_or_else(|e| panic!("stores: {e}"))
            .into_inner()
            .stores
            .into_iter()
            .find(|s| s.store_id == id)
            .map(|s| s.address)
            .unwrap_or_else(|| panic!("store {id} unknown"));
        let i = self
            .c
            .store_ports
            .iter()
            .position(|p| address.ends_with(&format!(":{p}")))
            .unwrap_or_else(|| panic!("no process listens on {address}"));
        self.c.kill_store(i);
        self.down.push(id);
    }

    /// Starts one more storenode with `extra` flags; returns its store id once registered.
    async fn add_store(&mut self, extra: &[&str]) -> u64 {
        let before: Vec<u64> = self.stores().await.into_iter().map(|(id, _)| id).collect();
        let i = self.c.stores.len();
        self.c.store_ports.push(free_port());
        self.c.stores.push(None);
        let n = self.c.store_args.len();
        self.c.store_args.extend(extra.iter().map(|s| s.to_string()));
        self.c.start_store(i);
        self.c.store_args.truncate(n);
        let pd = self.pd.clone();
        wait_until("the new store to register", Duration::from_secs(30), || {
            let mut pd = pd.clone();
            let before = before.clone();
            async move {
                let stores = pd
                    .get_stores(GetStoresRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .stores;
                stores
                    .into_iter()
                    .find(|s| !before.contains(&s.store_id) && !s.metrics_address.is_empty())
                    .map(|s| s.store_id)
            }
        })
        .await
    }

    /// Moves `range`'s replica from `from` to `to` and waits until the range map shows it;
    /// returns the seconds it took.
    async fn move_replica(&mut self, range: u64, from: u64, to: u64) -> f64 {
        let started = Instant::now();
        self.pd
            .move_replica(admin(AdminMoveReplicaRequest {
                range_id: range,
                from_store_id: from,
                to_store_id: to,
            }))
            .await
            .unwrap_or_else(|e| panic!("move {range} {from}->{to}: {e}"));
        self.wait_replaced("the move to finish", range, from, to).await;
        started.elapsed().as_secs_f64()
    }

    /// Waits until the range map shows `range` with `to` a voter, `from` gone and three
    /// replicas (a move or a repair done).
    async fn wait_replaced(&self, what: &str, range: u64, from: u64, to: u64) {
        let pd = self.pd.clone();
        wait_until(what, Duration::from_secs(60), || {
            let mut pd = pd.clone();
            async move {
                let r = pd
                    .scan_ranges(ScanRangesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .ranges
                    .into_iter()
                    .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == range))?;
                let d = r.descriptor?;
                let voter = d
                    .replicas
                    .iter()
                    .any(|x| x.store_id == to && x.role == ReplicaRole::Voter as i32);
                let gone = !d.replicas.iter().any(|x| x.store_id == from);
                (voter && gone && d.replicas.len() == 3).then_some(())
            }
        })
        .await;
    }

    /// A voter of `range` that does not lead it, outside `avoid` (the range map may show the
    /// range before its leader's first report: polled).
    async fn follower(&mut self, range: u64, avoid: &[u64]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.range(range).await;
            let d = r.descriptor.clone().unwrap_or_default();
            let found = d
                .replicas
                .iter()
                .filter(|x| x.role == ReplicaRole::Voter as i32)
                .map(|x| x.store_id)
                .find(|s| r.leader_store_id != 0 && *s != r.leader_store_id && !avoid.contains(s));
            if let Some(s) = found {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no follower of range {range} outside {avoid:?}: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes `store` the range's leader, then reads every key through the proxy (a scan is
    /// served by the leader after ReadIndex).
    async fn serves_every_key_from(&mut self, range: u64, store: u64, keys: usize) {
        let pd = self.pd.clone();
        wait_until("leadership on the new replica", Duration::from_secs(30), || {
            let mut pd = pd.clone();
            async move {
                let _ = pd
                    .transfer_leader(admin(AdminTransferLeaderRequest {
                        range_id: range,
                        to_store_id: store,
                    }))
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let r = pd
                    .scan_ranges(ScanRangesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .ranges
                    .into_iter()
                    .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == range))?;
                (r.leader_store_id == store).then_some(())
            }
        })
        .await;
        let client = self.c.client("boot", "read").await;
        let mut s = client.scan(..);
        let mut n = 0usize;
        while let Some(kv) = s.next().await {
            let kv = kv.unwrap_or_else(|e| panic!("scan: {e}"));
            if kv.key.starts_with(b"tail") {
                assert_eq!(kv.value, b"t", "value of {:?}", String::from_utf8_lossy(&kv.key));
            } else {
                assert_eq!(kv.key, key(n), "key {n}");
                assert_eq!(kv.value, value(n), "value of key {n}");
            }
            assert_eq!(kv.version, 1);
            n += 1;
        }
        assert_eq!(n, keys, "every key is served with the new replica leading");
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key{i:07}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    let mut v = format!("{i:07}-").into_bytes();
    v.resize(100, b'v');
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_replica_bootstraps_from_the_checkpoint_and_the_leader_sends_only_the_tail() {
    const KEYS: usize = 100_000;
    let started = Instant::now();
    let mut env = Env::start(KEYS).await;
    let (range, path, index) = env.settled_checkpoint(KEYS as u64, 0).await;
    println!("range {range}: checkpoint {path} at index {index}");

    // 1. The checkpoint object is corrupt: refused by its checksum, the leader's snapshot
    //    is sent instead.
    let file = env.s3.dir.path().join("skv/cluster").join(&path);
    let mut bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap_or_else(|e| panic!("write: {e}"));
    let corrupt_store = env.add_store(&[]).await;
    let from = env.follower(range, &[]).await;
    let before = env.snapshot_bytes_sent().await;
    let secs_corrupt = env.move_replica(range, from, corrupt_store).await;
    let sent_corrupt = env.sent_since(before, true).await;
    let m = env.metrics_of(corrupt_store).await;
    assert_eq!(
        metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"corrupt\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metrics::sum(&m, "skv_bootstrap_installs_total"), 0.0);

    // The move applied entries: a new, good checkpoint follows.
    let (_, path2, index2) = env.settled_checkpoint(KEYS as u64, index).await;
    println!("range {range}: checkpoint {path2} at index {index2}");

    // 2. Bootstrap: the new replica installs the checkpoint; the leader sends no snapshot.
    let boot_store = env.add_store(&[]).await;
    let from = env.follower(range, &[corrupt_store]).await;
    let before = env.snapshot_bytes_sent().await;
    let secs_boot = env.move_replica(range, from, boot_store).await;
    let sent_boot = env.sent_since(before, false).await;
    let m = env.metrics_of(boot_store).await;
    assert_eq!(metrics::sum(&m, "skv_bootstrap_installs_total"), 1.0, "{m}");
    assert!(metrics::sum(&m, "skv_bootstrap_keys_total") >= KEYS as f64, "{m}");
    let downloaded = metrics::sum(&m, "skv_bootstrap_bytes_total");
    assert_eq!(metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"stale\"}"), 0.0);

    // 3. The same move to a store with bootstrap disabled: the leader's snapshot.
    let off_store = env.add_store(&["--bootstrap-from-checkpoints=false"]).await;
    let before = env.snapshot_bytes_sent().await;
    let secs_off = env.move_replica(range, corrupt_store, off_store).await;
    let sent_off = env.sent_since(before, true).await;
    let m = env.metrics_of(off_store).await;
    assert_eq!(
        metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"disabled\"}"),
        1.0,
        "{m}"
    );

    println!(
        "leader's outbound snapshot bytes for a {KEYS}-key range: bootstrapped {sent_boot:.0} B \
         (move {secs_boot:.1} s; {downloaded:.0} B read from object storage), bootstrap disabled \
         {sent_off:.0} B (move {secs_off:.1} s), corrupt checkpoint {sent_corrupt:.0} B (move {secs_corrupt:.1} s)"
    );
    assert!(sent_off > 5_000_000.0, "the fallback sends the range ({sent_off} B)");
    assert!(
        sent_corrupt > 5_000_000.0,
        "a corrupt checkpoint falls back ({sent_corrupt} B)"
    );
    assert!(
        sent_boot < sent_off / 10.0,
        "bootstrap must send far less: {sent_boot} vs {sent_off}"
    );

    // The bootstrapped replica holds every key: it leads and serves them all.
    env.serves_every_key_from(range, boot_store, KEYS).await;
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_checkpoint_the_new_replica_gets_the_leaders_snapshot() {
    const KEYS: usize = 3_000;
    let mut env = Env::start(KEYS).await;
    let (range, _, _) = env.settled_checkpoint(KEYS as u64, 0).await;
    // The manifest goes away (a bucket emptied by hand, a lifecycle rule): no checkpoint.
    env.o
        .delete(&skv_objstore::manifest_path(
            env.o.cluster_id().unwrap_or_default(),
            range,
        ))
        .await
        .unwrap_or_else(|e| panic!("delete manifest: {e}"));
    let to = env.add_store(&[]).await;
    let from = env.follower(range, &[]).await;
    let before = env.snapshot_bytes_sent().await;
    env.move_replica(range, from, to).await;
    let sent = env.sent_since(before, true).await;
    let m = env.metrics_of(to).await;
    assert_eq!(
        metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"no_checkpoint\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(metrics::sum(&m, "skv_bootstrap_installs_total"), 0.0);
    assert!(sent > 100_000.0, "the leader sent its snapshot ({sent} B)");
    println!("no checkpoint: the leader sent {sent:.0} snapshot bytes");
    env.serves_every_key_from(range, to, KEYS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_keeps_its_log_from_the_checkpoint_so_a_learner_still_bootstraps_after_compactions() {
    const KEYS: usize = 20_000;
    // Checkpoints only by size of change (every ~1 MB of live bytes), and a log compaction
    // every 100 entries keeping 50: the 400 single writes below compact the leader's log
    // four times past the latest checkpoint. Without the purge floor, the learner's probe
    // would find the log purged past its checkpoint and get the leader's snapshot.
    let mut env = Env::start_with(
        KEYS,
        &[
            "--checkpoint-interval-secs",
            "3600",
            "--checkpoint-change-bytes",
            "1000000",
            "--raft-snapshot-logs",
            "100",
        ],
    )
    .await;
    let (range, path, index) = env.settled_checkpoint(5_000, 0).await;
    let client = env.c.client("boot", "write").await;
    for i in 0..400 {
        client
            .put(format!("tail{i:04}").into_bytes(), b"t".to_vec())
            .await
            .unwrap_or_else(|e| panic!("put: {e}"));
    }
    let (_, path2, index2) = env.settled_checkpoint(5_000, 0).await;
    assert_eq!(
        (path2, index2),
        (path.clone(), index),
        "no new checkpoint after the tail writes"
    );
    let to = env.add_store(&[]).await;
    let from = env.follower(range, &[]).await;
    let before = env.snapshot_bytes_sent().await;
    env.move_replica(range, from, to).await;
    let sent = env.sent_since(before, false).await;
    let m = env.metrics_of(to).await;
    println!("checkpoint at index {index}, 400 entries and 4 compactions later: {sent:.0} snapshot bytes sent");
    assert_eq!(metrics::sum(&m, "skv_bootstrap_installs_total"), 1.0, "{m}");
    assert_eq!(
        metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"stale\"}"),
        0.0,
        "{m}"
    );
    assert_eq!(sent, 0.0, "the learner caught up from the log");
    env.serves_every_key_from(range, to, KEYS + 400).await;
}

/// A repair bootstrapped from object storage (issue 11): four storenodes, a range of
/// 50,000 keys on three of them with a checkpoint, one of its followers killed with
/// SIGKILL; placement (`--store-down-after-ms 3000 --repair-after-secs 2`) rebuilds the
/// replica on the fourth store, which installs the checkpoint instead of receiving the
/// leader's snapshot, and serves every key once it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repaired_replica_bootstraps_from_the_checkpoint() {
    const KEYS: usize = 50_000;
    let started = Instant::now();
    let mut env = Env::start_full(
        KEYS,
        &["--checkpoint-interval-secs", "2"],
        &["--store-down-after-ms", "3000", "--repair-after-secs", "2"],
    )
    .await;
    let (range, path, index) = env.settled_checkpoint(KEYS as u64, 0).await;
    println!("range {range}: checkpoint {path} at index {index}");
    assert!(path.starts_with("clusters/"), "{path}");
    // The fourth store, while the scheduler is paused: nothing moves onto it yet.
    let spare = env.add_store(&[]).await;
    let victim = env.follower(range, &[spare]).await;
    let before = env.snapshot_bytes_sent().await;
    env.kill(victim).await;
    let killed_at = Instant::now();
    env.pd
        .set_scheduler_paused(admin(SetSchedulerPausedRequest { paused: false }))
        .await
        .unwrap_or_else(|e| panic!("unpause: {e}"));
    // Placement marks the store DOWN, then repairs the range onto the spare store.
    env.wait_replaced("the repair onto the spare store", range, victim, spare)
        .await;
    let repair_secs = killed_at.elapsed().as_secs_f64();
    let sent = env.sent_since(before, false).await;
    let m = env.metrics_of(spare).await;
    let installs = metrics::sum(&m, "skv_bootstrap_installs_total");
    let keys = metrics::sum(&m, "skv_bootstrap_keys_total");
    let downloaded = metrics::sum(&m, "skv_bootstrap_bytes_total");
    println!(
        "repair of a {KEYS}-key range after kill -9 of store {victim}: replica on store {spare} in \
         {repair_secs:.1} s (DOWN after 3 s, repair after 2 s); bootstrap installs {installs}, \
         {keys} keys, {downloaded} B read from object storage; leader's snapshot bytes {sent:.0} B"
    );
    assert!(installs >= 1.0, "the repaired replica was not bootstrapped: {m}");
    assert!(keys >= KEYS as f64, "{m}");
    assert_eq!(
        metrics::sum(&m, "skv_bootstrap_fallbacks_total{reason=\"stale\"}"),
        0.0,
        "{m}"
    );
    assert!(
        sent < 1_000_000.0,
        "the leader sent {sent} B of snapshots; a bootstrapped repair sends ~0"
    );
    // The repaired replica holds every key: it leads and serves them all.
    env.serves_every_key_from(range, spare, KEYS).await;
    println!("total {:.1} s", started.elapsed().as_secs_f64());
}
