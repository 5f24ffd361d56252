//! Hibernation of idle ranges (ADR 0018) on in-process nodes: many ranges fall asleep, traffic
//! wakes only its range, reads stay linearizable, restarts change no term, a partitioned
//! sleeping leader is replaced, and sleeping ranges cost (almost) no CPU.

mod common;

use common::*;
use skv_proto::internal::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Fast hibernation for tests.
const AFTER_MS: u64 = 1000;

fn opts(hibernate_after_ms: Option<u64>) -> ClusterOpts {
    ClusterOpts {
        hibernate_after_ms,
        metrics: true,
        ..Default::default()
    }
}

/// Splits range 1 into `n` ranges at `r/001`, `r/002`, ... (ids 2..=n).
async fn make_ranges(c: &Cluster, n: u64) {
    for i in 1..n {
        let at = format!("r/{i:03}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (leader, d) = c.route(at.as_bytes(), Duration::from_secs(20)).await;
            let mut lc = c.client(leader).await;
            let r = lc
                .split_range(SplitRangeRequest {
                    header: Some(header(&d)),
                    split_key: at.as_bytes().to_vec(),
                    new_range_id: i + 1,
                })
                .await;
            if let Ok(ok) = &r
                && ok.get_ref().routing_error.is_none()
            {
                break;
            }
            c.invalidate();
            assert!(Instant::now() < deadline, "split at {at} did not succeed: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.invalidate();
    }
}

/// The sum over the live nodes of one metric (all its label sets).
async fn metric_sum(c: &Cluster, name: &str) -> f64 {
    let mut sum = 0.0;
    for id in 1..=c.n {
        let Some(h) = &c.handles[(id - 1) as usize] else {
            continue;
        };
        let Some(addr) = h.metrics_addr else { continue };
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            continue;
        };
        let req = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut body = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(name) else { continue };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                sum += v;
            }
        }
    }
    sum
}

async fn hibernating(c: &Cluster) -> u64 {
    metric_sum(c, "skv_storenode_ranges_hibernating").await as u64
}

async fn wakes(c: &Cluster) -> u64 {
    metric_sum(c, "skv_storenode_range_wakes_total").await as u64
}

async fn wait_all_asleep(c: &Cluster, replicas: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let h = hibernating(c).await;
        if h == replicas {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {h} of {replicas} replicas hibernating after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (range -> (leader, term)) as the leaders report it.
async fn leaders(c: &Cluster) -> BTreeMap<u64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for (id, r) in c.list().await {
        let d = r.descriptor.unwrap_or_default();
        if r.leader_store_id == id {
            out.insert(d.range_id, (id, r.term));
        }
    }
    out
}

/// A get on one node, no retries: Ok(found) or the routing error / status text.
async fn get_on(c: &Cluster, node: u64, d: &RangeDescriptor, key: &[u8], stale_ok: bool) -> Result<bool, String> {
    let mut cl = c.client(node).await;
    let req = StoreGetRequest {
        header: Some(header(d)),
        key: key.to_vec(),
        stale_ok,
    };
    match tokio::time::timeout(Duration::from_secs(12), cl.get(req)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(s)) => Err(format!("status {s}")),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            match r.routing_error {
                Some(e) => Err(format!("routing error {}", e.message)),
                None => Ok(r.found),
            }
        }
    }
}

/// A put on one node, no retries: Ok(version) or the routing error / status text.
async fn put_on(c: &Cluster, node: u64, d: &RangeDescriptor, key: &[u8], value: &[u8]) -> Result<u64, String> {
    let mut cl = c.client(node).await;
    let req = StoreWriteRequest {
        header: Some(header(d)),
        key: key.to_vec(),
        op: Some(store_write_request::Op::Put(value.to_vec())),
        condition: None,
    };
    match tokio::time::timeout(Duration::from_secs(12), cl.write(req)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(s)) => Err(format!("status {s}")),
        Ok(Ok(r)) => {
            let r = r.into_inner();
            match r.routing_error {
                Some(e) => Err(format!("routing error {}", e.message)),
                None => Ok(r.version),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_ranges_sleep_and_traffic_wakes_only_its_range() {
    const RANGES: u64 = 50;
    let c = Cluster::start_opts(3, 10_000, opts(Some(AFTER_MS))).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    make_ranges(&c, RANGES).await;
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(60)).await;

    // A write wakes its range only (the leader by the request, the two followers by the
    // entry), and the range falls asleep again. The sleeping leader's lease has expired: the
    // write must still succeed at the first attempt (no NotLeader naming itself).
    let key = b"r/017/x";
    let before = wakes(&c).await;
    let (leader, d) = c.route(key, Duration::from_secs(5)).await;
    let t = Instant::now();
    assert_eq!(put_on(&c, leader, &d, key, b"v1").await, Ok(1));
    eprintln!("first write on a sleeping leader took {:?}", t.elapsed());
    let mut min = u64::MAX;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        min = min.min(hibernating(&c).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(min < 3 * RANGES, "the written range never showed awake");
    assert!(min >= 3 * RANGES - 3, "more than one range woke: {min} hibernating");
    let woke = wakes(&c).await - before;
    assert!((1..=3).contains(&woke), "{woke} wakes for one write");
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(20)).await;

    // A linearizable read on a sleeping range succeeds (a fresh quorum round confirms it),
    // and wakes its leader only: the followers answer the heartbeat without waking.
    let before = wakes(&c).await;
    assert_eq!(c.get(key).await.map(|(v, _)| v), Some(b"v1".to_vec()));
    let woke = wakes(&c).await - before;
    assert_eq!(woke, 1, "a read woke more than the leader");
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(20)).await;

    // A stale read on a sleeping leader falls back to ReadIndex instead of refusing.
    let (leader, d) = c.route(key, Duration::from_secs(5)).await;
    assert_eq!(get_on(&c, leader, &d, key, true).await, Ok(true));

    // No term changed while sleeping.
    let terms = leaders(&c).await;
    assert_eq!(terms.len() as u64, RANGES);
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(20)).await;
    assert_eq!(leaders(&c).await, terms);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_changes_no_term() {
    const RANGES: u64 = 20;
    let mut c = Cluster::start_opts(3, 10_000, opts(Some(AFTER_MS))).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    make_ranges(&c, RANGES).await;
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(60)).await;
    let before = leaders(&c).await;
    assert_eq!(before.len() as u64, RANGES);
    // Node 2 leads some ranges (restored as leader) and follows the others (waking: it asks
    // the leaders to wake instead of electing).
    c.restart_node(2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(30)).await;
    let after = leaders(&c).await;
    for (range, (leader, term)) in &before {
        let (l2, t2) = after.get(range).copied().unwrap_or_default();
        assert_eq!(
            t2, *term,
            "r{range}: term changed across a restart (leader {leader} -> {l2})"
        );
    }
    // The restarted node serves: a write to a range it leads and one it follows.
    for i in [1u64, 7, 13] {
        let key = format!("r/{i:03}/k");
        c.put(key.as_bytes(), b"v").await;
        assert!(c.get(key.as_bytes()).await.is_some());
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_sleeping_leader_is_replaced_on_a_request() {
    const RANGES: u64 = 5;
    let c = Cluster::start_opts(3, 10_000, opts(Some(AFTER_MS))).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    make_ranges(&c, RANGES).await;
    let key = b"r/003/k";
    c.put(key, b"v").await;
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(60)).await;

    let (old, d) = c.route(key, Duration::from_secs(5)).await;
    let old_term = leaders(&c).await[&d.range_id].1;
    c.filter.isolate(old, c.n);
    // Nobody notices while nothing happens.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leaders(&c).await[&d.range_id], (old, old_term));

    // A request at a follower wakes it; its WakeUp cannot reach the leader, so the range
    // elects a new leader among the two others.
    let follower = (1..=c.n).find(|id| *id != old).unwrap_or(1);
    let started = Instant::now();
    let r = get_on(&c, follower, &d, key, false).await;
    assert!(r.is_err(), "a follower served a linearizable read: {r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let new = loop {
        let new = c.list().await.into_iter().find(|(id, r)| {
            *id != old && r.leader_store_id == *id && r.descriptor.as_ref().map(|d| d.range_id) == Some(d.range_id)
        });
        if let Some((id, r)) = new {
            assert!(r.term > old_term);
            break id;
        }
        assert!(Instant::now() < deadline, "no new leader within 5 s of the request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("new leader s{new} after {:?}", started.elapsed());
    assert_ne!(new, old);
    // The old leader cannot confirm a read any more (no quorum answers its heartbeat).
    let t = Instant::now();
    let r = get_on(&c, old, &d, key, false).await;
    assert!(r.is_err(), "the partitioned old leader served a linearizable read");
    // It gives up after the leader lease (1 s), not the 10 s proposal timeout.
    eprintln!("old leader's read refused after {:?}: {r:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // The new leader serves, and the old one rejoins as a follower once healed.
    c.invalidate();
    assert!(c.get(key).await.is_some());
    c.filter.heal();
    c.put(key, b"v2").await;
    assert_eq!(c.get(key).await.map(|(v, _)| v), Some(b"v2".to_vec()));
    c.shutdown().await;
}

/// utime + stime of this process, in seconds.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Process CPU (cores) of 3 in-process nodes holding `ranges` idle ranges, over `window`,
/// once every replica sleeps (or, without hibernation, once the splits settled).
async fn idle_cpu(ranges: u64, hibernate: bool, window: Duration) -> f64 {
    let c = Cluster::start_opts(3, 10_000, opts(hibernate.then_some(AFTER_MS))).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    let rss0 = rss_kib();
    make_ranges(&c, ranges).await;
    if hibernate {
        wait_all_asleep(&c, 3 * ranges, Duration::from_secs(90)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let t0 = Instant::now();
    let c0 = process_cpu_seconds();
    tokio::time::sleep(window).await;
    let cores = (process_cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    let asleep = hibernating(&c).await;
    let per_replica = rss_kib().saturating_sub(rss0) / (3 * (ranges - 1)).max(1);
    eprintln!(
        "{ranges} idle ranges, hibernation {hibernate}: {cores:.3} cores over {window:?} ({asleep} replicas hibernating); RSS +{per_replica} KiB per added replica"
    );
    c.shutdown().await;
    cores
}

/// The CPU bound of the idle test: without hibernation this many ranges take several times
/// more (see `awake_idle_ranges_exceed_the_bound`).
const IDLE_RANGES: u64 = 60;
const IDLE_CPU_BOUND: f64 = 0.1;

/// `SKV_TEST_IDLE_RANGES` overrides the range count of the two CPU tests (to measure larger
/// counts by hand; the bound is only meaningful at the default).
fn idle_ranges() -> u64 {
    std::env::var("SKV_TEST_IDLE_RANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 2)
        .unwrap_or(IDLE_RANGES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hibernated_idle_ranges_use_little_cpu() {
    let n = idle_ranges();
    let cores = idle_cpu(n, true, Duration::from_secs(5)).await;
    if n != IDLE_RANGES {
        return;
    }
    assert!(
        cores < IDLE_CPU_BOUND,
        "{IDLE_RANGES} hibernated ranges used {cores:.3} cores (bound {IDLE_CPU_BOUND})"
    );
}

/// The same measurement without hibernation, to show the bound means something.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn awake_idle_ranges_exceed_the_bound() {
    let n = idle_ranges();
    let cores = idle_cpu(n, false, Duration::from_secs(5)).await;
    if n != IDLE_RANGES {
        return;
    }
    assert!(
        cores > IDLE_CPU_BOUND,
        "{IDLE_RANGES} awake ranges used only {cores:.3} cores (bound {IDLE_CPU_BOUND})"
    );
}

/// A placement that answers store heartbeats with the store states a test sets (and
/// nothing else): enough to drive the storenode's store events.
#[derive(Clone, Default)]
struct StatesPlacement(Arc<parking_lot::Mutex<BTreeMap<u64, bool>>>);

type R<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl skv_proto::internal::placement_server::Placement for StatesPlacement {
    async fn register_store(&self, r: tonic::Request<RegisterStoreRequest>) -> R<RegisterStoreResponse> {
        Ok(tonic::Response::new(RegisterStoreResponse {
            store_id: r.into_inner().store_id,
            cluster_id: "c".into(),
        }))
    }
    async fn store_heartbeat(&self, _: tonic::Request<StoreHeartbeatRequest>) -> R<StoreHeartbeatResponse> {
        let stores = self
            .0
            .lock()
            .iter()
            .map(|(id, down)| StoreInfo {
                store_id: *id,
                state: if *down { StoreState::Down } else { StoreState::Up } as i32,
                ..Default::default()
            })
            .collect();
        Ok(tonic::Response::new(StoreHeartbeatResponse {
            stores,
            stale: Vec::new(),
        }))
    }
    async fn range_heartbeat(&self, _: tonic::Request<RangeHeartbeatRequest>) -> R<RangeHeartbeatResponse> {
        Ok(tonic::Response::new(RangeHeartbeatResponse {}))
    }
    async fn report_split(&self, _: tonic::Request<ReportSplitRequest>) -> R<ReportSplitResponse> {
        Ok(tonic::Response::new(ReportSplitResponse {}))
    }
    async fn report_merge(&self, _: tonic::Request<ReportMergeRequest>) -> R<ReportMergeResponse> {
        Ok(tonic::Response::new(ReportMergeResponse {}))
    }
    async fn get_range(&self, _: tonic::Request<GetRangeRequest>) -> R<GetRangeResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn scan_ranges(&self, _: tonic::Request<ScanRangesRequest>) -> R<ScanRangesResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    type WatchRangesStream = futures::stream::Empty<Result<WatchRangesResponse, tonic::Status>>;
    async fn watch_ranges(&self, _: tonic::Request<WatchRangesRequest>) -> R<Self::WatchRangesStream> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn get_stores(&self, _: tonic::Request<GetStoresRequest>) -> R<GetStoresResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn alloc_ids(&self, _: tonic::Request<AllocIdsRequest>) -> R<AllocIdsResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn get_members(&self, _: tonic::Request<GetMembersRequest>) -> R<GetMembersResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn split_range(&self, _: tonic::Request<AdminSplitRequest>) -> R<AdminSplitResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn transfer_leader(&self, _: tonic::Request<AdminTransferLeaderRequest>) -> R<AdminTransferLeaderResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn merge_ranges(&self, _: tonic::Request<AdminMergeRequest>) -> R<AdminMergeResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn move_replica(&self, _: tonic::Request<AdminMoveReplicaRequest>) -> R<AdminMoveReplicaResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn drain_store(&self, _: tonic::Request<AdminDrainStoreRequest>) -> R<AdminDrainStoreResponse> {
        Err(tonic::Status::unimplemented(""))
    }
    async fn set_scheduler_paused(
        &self,
        _: tonic::Request<SetSchedulerPausedRequest>,
    ) -> R<SetSchedulerPausedResponse> {
        Err(tonic::Status::unimplemented(""))
    }
}

/// Without any traffic, a sleeping range whose leader died keeps sleeping until placement
/// reports that store DOWN; then only the ranges it led elect a new leader, and the others
/// keep their terms.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_sleeping_leader_is_replaced_once_placement_reports_it_down() {
    const RANGES: u64 = 6;
    let fake = StatesPlacement::default();
    for id in 1..=3 {
        fake.0.lock().insert(id, false);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let paddr = listener.local_addr().expect("addr");
    let svc = skv_proto::internal::placement_server::PlacementServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let mut c = Cluster::start_full(3, 10_000, Some(format!("http://{paddr}")), opts(Some(AFTER_MS))).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    make_ranges(&c, RANGES).await;
    // Spread leadership so the dead store leads some ranges and follows others.
    for r in [2u64, 4, 6] {
        let (leader, d) = c.leader_of(r, Duration::from_secs(10)).await;
        let to = if leader == 3 { 2 } else { 3 };
        let mut lc = c.client(leader).await;
        let _ = lc
            .transfer_leader(TransferLeaderRequest {
                header: Some(header(&d)),
                to_store_id: to,
            })
            .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    wait_all_asleep(&c, 3 * RANGES, Duration::from_secs(60)).await;
    let before = leaders(&c).await;
    let dead = 3u64;
    let led_by_dead: Vec<u64> = before
        .iter()
        .filter(|(_, (l, _))| *l == dead)
        .map(|(r, _)| *r)
        .collect();
    assert!(
        !led_by_dead.is_empty() && led_by_dead.len() < RANGES as usize,
        "{before:?}"
    );

    c.stop_node(dead).await;
    // Nothing happens without traffic or news.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = leaders(&c).await;
    for r in &led_by_dead {
        assert!(!quiet.contains_key(r), "r{r} elected without a reason: {quiet:?}");
    }
    // Placement reports the store DOWN: the sleeping followers of the ranges it led wake
    // and elect; the other ranges stay asleep with their terms.
    let campaigns = metric_sum(&c, "skv_storenode_hibernate_campaigns_total").await;
    fake.0.lock().insert(dead, true);
    let t = Instant::now();
    let deadline = t + Duration::from_secs(5);
    loop {
        let now = leaders(&c).await;
        if led_by_dead.iter().all(|r| now.contains_key(r)) {
            break;
        }
        assert!(Instant::now() < deadline, "no new leaders within 5 s of DOWN: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{} ranges re-elected {:?} after DOWN", led_by_dead.len(), t.elapsed());
    assert!(metric_sum(&c, "skv_storenode_hibernate_campaigns_total").await > campaigns);
    let after = leaders(&c).await;
    for (r, lt) in &before {
        if !led_by_dead.contains(r) {
            assert_eq!(after.get(r), Some(lt), "r{r} changed although its leader lives");
        }
    }
    // Everything serves, and falls asleep again with the DOWN store left behind.
    for i in 1..RANGES {
        let key = format!("r/{i:03}/k");
        c.put(key.as_bytes(), b"v").await;
    }
    wait_all_asleep(&c, 2 * RANGES, Duration::from_secs(30)).await;
    c.shutdown().await;
}
