//! Elasticity through the placement service, against real etcd and fake storenodes: load
//! splits, drains, merges (reported and asked for), stale replicas.

mod support;

use skv_common::service::ServiceHandle;
use skv_placement::Config;
use skv_proto::internal::placement_admin_client::PlacementAdminClient;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::*;
use skv_testkit::{Etcd, wait_until};
use std::time::Duration;
use support::fake_store::{FakeStore, FakeStoreHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const PREFIX: &str = "/skv/elastic";

async fn start(etcd: &Etcd, tweak: impl Fn(&mut Config)) -> ServiceHandle {
    let mut c = Config::for_test(std::env::temp_dir(), vec![etcd.client_url.clone()], PREFIX);
    c.schedule_interval_ms = 100;
    c.initial_wait_ms = 60_000;
    tweak(&mut c);
    let h = skv_placement::start(c).await.expect("start placement");
    let pc = client(h.addr);
    wait_until("leader", Duration::from_secs(10), || {
        let mut pc = pc.clone();
        async move { pc.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader }
    })
    .await;
    h
}

fn client(addr: std::net::SocketAddr) -> PlacementClient<Channel> {
    PlacementClient::new(skv_rpc::lazy_channel(&addr.to_string()).expect("a valid test address"))
}

fn admin(addr: std::net::SocketAddr) -> PlacementAdminClient<Channel> {
    PlacementAdminClient::new(skv_rpc::lazy_channel(&addr.to_string()).expect("a valid test address"))
}

async fn register(c: &mut PlacementClient<Channel>, addr: std::net::SocketAddr) -> u64 {
    let id = c
        .register_store(RegisterStoreRequest {
            store_id: 0,
            address: addr.to_string(),
            metrics_address: String::new(),
            capacity_bytes: 1 << 30,
        })
        .await
        .unwrap()
        .into_inner()
        .store_id;
    c.store_heartbeat(StoreHeartbeatRequest {
        store: Some(StoreInfo {
            store_id: id,
            address: addr.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    id
}

/// `n` fake stores registered; waits for the first range to be placed on 3 of them.
/// Returns the fakes, their ids, and the placed descriptor.
async fn cluster(c: &mut PlacementClient<Channel>, n: usize) -> (Vec<FakeStoreHandle>, Vec<u64>, RangeDescriptor) {
    let mut fakes = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let f = FakeStore::spawn().await;
        ids.push(register(c, f.addr).await);
        fakes.push(f);
    }
    let d = wait_until("initial placement", Duration::from_secs(10), || async {
        fakes
            .iter()
            .find_map(|f| f.calls.lock().unwrap().create_replica.first().cloned())
            .and_then(|cr| cr.descriptor)
    })
    .await;
    (fakes, ids, d)
}

/// Sends, every 100 ms until cancelled, the range heartbeat of the fake leader `leader`
/// for range `range_id` (its current local descriptor) with `load`.
fn heartbeats(
    c: PlacementClient<Channel>,
    fake: std::sync::Arc<std::sync::Mutex<support::fake_store::Recorded>>,
    leader: u64,
    range_id: u64,
    load: Option<RangeLoad>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut c = c;
        while !s.is_cancelled() {
            let d = fake.lock().unwrap().ranges.get(&range_id).cloned();
            if let Some(d) = d {
                let _ = c
                    .range_heartbeat(RangeHeartbeatRequest {
                        store_id: leader,
                        ranges: vec![RangeReport {
                            descriptor: Some(d),
                            leader_store_id: leader,
                            term: 1,
                            load: load.clone(),
                        }],
                    })
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_range_is_split_at_the_median_of_its_sampled_load() {
    let etcd = Etcd::start().await;
    let h = start(&etcd, |c| {
        c.split_qps_threshold = 1000;
        c.split_qps_window_secs = 1;
        c.initial_wait_ms = 200;
    })
    .await;
    let mut c = client(h.addr);
    let (fakes, ids, d) = cluster(&mut c, 3).await;
    let leader = d.replicas[0].store_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    // 10,000 ops/s on four keys, the load evenly spread: the median is "c".
    let load = RangeLoad {
        reads: 600,
        writes: 400,
        read_bytes: 60_000,
        written_bytes: 40_000,
        approximate_size_bytes: 1 << 20,
        approximate_keys: 1000,
        sampled_keys: ["a", "b", "c", "d"].iter().map(|k| k.as_bytes().to_vec()).collect(),
        interval_ms: 100,
    };
    let stop = heartbeats(c.clone(), fakes[li].calls.clone(), leader, d.range_id, Some(load));
    let split = wait_until("a load split on the leader", Duration::from_secs(15), || async {
        fakes[li].calls.lock().unwrap().split_range.first().cloned()
    })
    .await;
    stop.cancel();
    assert_eq!(split.split_key, b"c".to_vec());
    assert_eq!(split.header.as_ref().map(|h| h.range_id), Some(d.range_id));
    // Only the leader was asked.
    for (i, f) in fakes.iter().enumerate() {
        if i != li {
            assert!(f.calls.lock().unwrap().split_range.is_empty());
        }
    }
    // The halves are in the map (placement writes it after the split call returns: polled),
    // and the statistics show the load.
    let ranges = wait_until("both halves in the range map", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c
                .scan_ranges(ScanRangesRequest::default())
                .await
                .ok()?
                .into_inner()
                .ranges;
            (r.len() >= 2).then_some(r)
        }
    })
    .await;
    assert_eq!(ranges.len(), 2);
    let stats = admin(h.addr)
        .range_stats(RangeStatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .stats;
    let st = stats.iter().find(|s| s.range_id == d.range_id);
    assert!(
        st.is_some_and(|s| s.size_bytes == 1 << 20 && s.keys == 1000),
        "{stats:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}

/// Store heartbeats of `ids` (fakes at `fakes`) reporting `idle` thousandths of a core idle.
async fn report_idle_cpu(c: &mut PlacementClient<Channel>, fakes: &[FakeStoreHandle], ids: &[u64], idle: u64) {
    for (f, id) in fakes.iter().zip(ids) {
        c.store_heartbeat(StoreHeartbeatRequest {
            store: Some(StoreInfo {
                store_id: *id,
                address: f.addr.to_string(),
                host_idle_millicpus: Some(idle),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// ADR 0036: while every store reports its machine busy (less than `--split-min-idle-cpus`
/// idle), a hot range is not split by load; once a store reports a core idle, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_range_waits_for_a_machine_with_idle_cpu_before_splitting() {
    let etcd = Etcd::start().await;
    let h = start(&etcd, |c| {
        c.split_qps_threshold = 1000;
        c.split_qps_window_secs = 1;
        c.initial_wait_ms = 200;
    })
    .await;
    let mut c = client(h.addr);
    let (fakes, ids, d) = cluster(&mut c, 3).await;
    report_idle_cpu(&mut c, &fakes, &ids, 200).await;
    let leader = d.replicas[0].store_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let load = RangeLoad {
        reads: 600,
        writes: 400,
        approximate_size_bytes: 1 << 20,
        approximate_keys: 1000,
        sampled_keys: ["a", "b", "c", "d"].iter().map(|k| k.as_bytes().to_vec()).collect(),
        interval_ms: 100,
        ..Default::default()
    };
    let stop = heartbeats(c.clone(), fakes[li].calls.clone(), leader, d.range_id, Some(load));
    // 10,000 ops/s for 4 windows (40 scheduler ticks): no split while the machines are busy.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for f in &fakes {
        assert!(
            f.calls.lock().unwrap().split_range.is_empty(),
            "split while no CPU was idle"
        );
    }
    report_idle_cpu(&mut c, &fakes[2..], &ids[2..], 1500).await;
    let split = wait_until(
        "a load split once a machine has idle CPU",
        Duration::from_secs(15),
        || async { fakes[li].calls.lock().unwrap().split_range.first().cloned() },
    )
    .await;
    stop.cancel();
    assert_eq!(split.split_key, b"c".to_vec());
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_store_replicas_are_moved_learner_first() {
    let etcd = Etcd::start().await;
    let h = start(&etcd, |c| c.initial_wait_ms = 200).await;
    let mut c = client(h.addr);
    let (fakes, ids, d) = cluster(&mut c, 3).await;
    let leader = d.replicas[0].store_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let stop = heartbeats(c.clone(), fakes[li].calls.clone(), leader, d.range_id, None);
    // A fourth store joins; then a follower's store is drained.
    let f4 = FakeStore::spawn().await;
    let s4 = register(&mut c, f4.addr).await;
    let drained = d.replicas[1].store_id;
    c.drain_store(AdminDrainStoreRequest { store_id: drained })
        .await
        .unwrap();
    let removed = wait_until("REMOVE of the drained store", Duration::from_secs(20), || async {
        let g = fakes[li].calls.lock().unwrap();
        g.change_replicas
            .iter()
            .any(|cr| cr.changes[0].kind == replica_change::Kind::Remove as i32)
            .then(|| g.change_replicas.clone())
    })
    .await;
    stop.cancel();
    let steps: Vec<(u64, i32)> = removed
        .iter()
        .map(|cr| (cr.changes[0].store_id, cr.changes[0].kind))
        .collect();
    assert_eq!(
        steps,
        vec![
            (s4, replica_change::Kind::AddLearner as i32),
            (s4, replica_change::Kind::AddVoter as i32),
            (drained, replica_change::Kind::Remove as i32),
        ]
    );
    // Each step carried the epoch the previous one answered.
    for w in removed.windows(2) {
        let (a, b) = (w[0].header.unwrap().epoch.unwrap(), w[1].header.unwrap().epoch.unwrap());
        assert_eq!(b.conf_ver, a.conf_ver + 1);
    }
    assert!(
        !f4.calls.lock().unwrap().create_replica.is_empty(),
        "the new replica was created first"
    );
    // The store is DRAINING in its record, then reported drained.
    let st = wait_until("drained", Duration::from_secs(10), || async {
        let s = admin(h.addr)
            .store_status(StoreStatusRequest {})
            .await
            .ok()?
            .into_inner();
        s.stores.into_iter().find(|x| x.store_id == drained && x.drained)
    })
    .await;
    assert_eq!(st.replicas, 0);
    let stores = c.get_stores(GetStoresRequest {}).await.unwrap().into_inner().stores;
    let rec = stores.iter().find(|s| s.store_id == drained).unwrap();
    assert_eq!(rec.state(), StoreState::Draining);
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn desc(id: u64, start: &str, end: &str, conf_ver: u64, version: u64, stores: &[u64]) -> RangeDescriptor {
    RangeDescriptor {
        range_id: id,
        start: start.as_bytes().to_vec(),
        end: end.as_bytes().to_vec(),
        epoch: Some(RangeEpoch { conf_ver, version }),
        replicas: stores
            .iter()
            .map(|s| Replica {
                store_id: *s,
                role: ReplicaRole::Voter as i32,
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_merge_updates_the_map_and_names_the_source_stale() {
    let etcd = Etcd::start().await;
    // The scheduler never places anything here: no stores come up in time.
    let h = start(&etcd, |_| {}).await;
    let mut c = client(h.addr);
    c.report_split(ReportSplitRequest {
        left: Some(desc(1, "", "m", 2, 2, &[7, 8, 9])),
        right: Some(desc(2, "m", "", 2, 2, &[7, 8, 9])),
        leader_store_id: 7,
    })
    .await
    .unwrap();
    // Malformed reports are refused: not newer, not covering.
    for (merged, source) in [
        (desc(1, "", "", 2, 2, &[7, 8, 9]), desc(2, "m", "", 2, 2, &[7, 8, 9])),
        (desc(1, "", "q", 2, 3, &[7, 8, 9]), desc(2, "m", "", 2, 2, &[7, 8, 9])),
    ] {
        let e = c
            .report_merge(ReportMergeRequest {
                merged: Some(merged),
                source: Some(source),
                leader_store_id: 7,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
    c.report_merge(ReportMergeRequest {
        merged: Some(desc(1, "", "", 2, 3, &[7, 8, 9])),
        source: Some(desc(2, "m", "", 2, 2, &[7, 8, 9])),
        leader_store_id: 7,
    })
    .await
    .unwrap();
    let ranges = c
        .scan_ranges(ScanRangesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .ranges;
    assert_eq!(ranges.len(), 1);
    let only = ranges[0].descriptor.clone().unwrap();
    assert_eq!(
        (only.range_id, only.end.is_empty(), only.epoch.unwrap().version),
        (1, true, 3)
    );
    assert_eq!(ranges[0].leader_store_id, 7);
    let got = c
        .get_range(GetRangeRequest { key: b"x".to_vec() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.range.unwrap().descriptor.unwrap().range_id, 1);
    // A replayed (older) report changes nothing.
    c.report_split(ReportSplitRequest {
        left: Some(desc(1, "", "m", 2, 2, &[7, 8, 9])),
        right: Some(desc(2, "m", "", 2, 2, &[7, 8, 9])),
        leader_store_id: 7,
    })
    .await
    .unwrap();
    assert_eq!(
        c.scan_ranges(ScanRangesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .ranges
            .len(),
        1
    );
    // A store still holding the source replica hears it is stale, with the range covering it.
    let f = FakeStore::spawn().await;
    let sid = register(&mut c, f.addr).await;
    let resp = c
        .store_heartbeat(StoreHeartbeatRequest {
            store: Some(StoreInfo {
                store_id: sid,
                address: f.addr.to_string(),
                ..Default::default()
            }),
            replicas: vec![
                desc(2, "m", "", 2, 2, &[sid, 8, 9]),
                desc(1, "", "", 2, 3, &[sid, 8, 9]),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.stale.len(), 1, "{:?}", resp.stale);
    assert_eq!(resp.stale[0].range_id, 2);
    assert_eq!(resp.stale[0].current.as_ref().map(|d| d.range_id), Some(1));
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_merge_reaches_the_leader_and_an_unimplemented_merge_is_not_retried_at_once() {
    let etcd = Etcd::start().await;
    let h = start(&etcd, |c| {
        c.initial_wait_ms = 200;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut c = client(h.addr);
    let (fakes, ids, d) = cluster(&mut c, 3).await;
    let leader = d.replicas[0].store_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let stop = heartbeats(c.clone(), fakes[li].calls.clone(), leader, d.range_id, None);
    wait_until("leader known", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c
                .get_range(GetRangeRequest { key: b"a".to_vec() })
                .await
                .ok()?
                .into_inner();
            (r.range?.leader_store_id == leader).then_some(())
        }
    })
    .await;
    let split = c
        .split_range(AdminSplitRequest {
            range_id: d.range_id,
            split_key: b"m".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let right = split.right.unwrap();
    let stop_r = heartbeats(c.clone(), fakes[li].calls.clone(), leader, right.range_id, None);
    c.merge_ranges(AdminMergeRequest {
        left_range_id: d.range_id,
        right_range_id: right.range_id,
    })
    .await
    .unwrap();
    // Same stores, same leader: the merge goes straight to the leader of the left range.
    let m = wait_until("MergeRanges on the leader", Duration::from_secs(10), || async {
        fakes[li].calls.lock().unwrap().merge_ranges.first().cloned()
    })
    .await;
    assert_eq!(m.header.as_ref().map(|h| h.range_id), Some(d.range_id));
    assert_eq!(m.source.as_ref().map(|s| s.range_id), Some(right.range_id));
    // UNIMPLEMENTED: failed, counted, and not retried at once (backoff).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fakes[li].calls.lock().unwrap().merge_ranges.len(), 1);
    let ops = admin(h.addr)
        .list_operators(ListOperatorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .operators;
    assert!(ops.iter().all(|o| o.kind != "merge"), "{ops:?}");
    let metrics = scrape(h.metrics_addr.unwrap()).await;
    assert!(
        metrics.contains(r#"skv_placement_operators_total{kind="merge",result="failed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"skv_placement_operators_in_flight{kind="merge"} 0"#),
        "{metrics}"
    );
    stop.cancel();
    stop_r.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_move_off_the_leader_transfers_leadership_before_removal() {
    let etcd = Etcd::start().await;
    let h = start(&etcd, |c| c.initial_wait_ms = 200).await;
    let mut c = client(h.addr);
    let (mut fakes, mut ids, d) = cluster(&mut c, 3).await;
    let f4 = FakeStore::spawn().await;
    ids.push(register(&mut c, f4.addr).await);
    fakes.push(f4);
    // The fakes follow each other's membership changes, as replicas of one group.
    let all: Vec<_> = fakes.iter().map(|f| f.calls.clone()).collect();
    for f in &fakes {
        let mut g = f.calls.lock().unwrap();
        g.peers = all
            .iter()
            .filter(|p| !std::sync::Arc::ptr_eq(p, &f.calls))
            .cloned()
            .collect();
        g.ranges.insert(d.range_id, d.clone());
    }
    let leader = d.replicas[0].store_id;
    let li = ids.iter().position(|i| *i == leader).unwrap();
    let stop = heartbeats(c.clone(), fakes[li].calls.clone(), leader, d.range_id, None);
    wait_until("leader known", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let r = c
                .get_range(GetRangeRequest { key: b"a".to_vec() })
                .await
                .ok()?
                .into_inner();
            (r.range?.leader_store_id == leader).then_some(())
        }
    })
    .await;
    stop.cancel();
    let s4 = ids[3];
    // Refusals first: not a replica, already there, unknown range.
    for (range_id, from, to, code) in [
        (d.range_id, s4, leader, tonic::Code::FailedPrecondition),
        (d.range_id, leader, d.replicas[1].store_id, tonic::Code::InvalidArgument),
        (999_999, leader, s4, tonic::Code::NotFound),
    ] {
        let e = c
            .move_replica(AdminMoveReplicaRequest {
                range_id,
                from_store_id: from,
                to_store_id: to,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    c.move_replica(AdminMoveReplicaRequest {
        range_id: d.range_id,
        from_store_id: leader,
        to_store_id: s4,
    })
    .await
    .unwrap();
    let remove = wait_until("REMOVE on the new leader", Duration::from_secs(20), || async {
        fakes[3].calls.lock().unwrap().change_replicas.first().cloned()
    })
    .await;
    assert_eq!(
        (remove.changes[0].store_id, remove.changes[0].kind),
        (leader, replica_change::Kind::Remove as i32)
    );
    let on_old: Vec<(u64, i32)> = fakes[li]
        .calls
        .lock()
        .unwrap()
        .change_replicas
        .iter()
        .map(|cr| (cr.changes[0].store_id, cr.changes[0].kind))
        .collect();
    assert_eq!(
        on_old,
        vec![
            (s4, replica_change::Kind::AddLearner as i32),
            (s4, replica_change::Kind::AddVoter as i32)
        ]
    );
    let t = fakes[li].calls.lock().unwrap().transfer_leader.clone();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to_store_id, s4);
    // The map shows the new replica set.
    let got = wait_until("map updated", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            let r = c
                .get_range(GetRangeRequest { key: b"a".to_vec() })
                .await
                .ok()?
                .into_inner();
            let d = r.range?.descriptor?;
            (!d.replicas.iter().any(|x| x.store_id == leader)).then_some(d)
        }
    })
    .await;
    assert!(got.replicas.iter().any(|x| x.store_id == s4));
    let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
}
