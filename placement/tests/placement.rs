//! Placement service tests: real etcd processes, in-process placement instances (and
//! placement processes for the crash test), fake storenodes.

mod support;

use futures::StreamExt;
use skv_common::service::ServiceHandle;
use skv_placement::Config;
use skv_placement::error::{ErrorCode, LEADER_KEY};
use skv_placement::layout::Layout;
use skv_placement::meta::DynMetaStore;
use skv_placement::meta::etcd::EtcdStore;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::*;
use skv_testkit::{ChildGuard, Etcd, wait_until};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::fake_store::FakeStore;
use tonic::transport::Channel;

const PREFIX: &str = "/skv/test";

fn cfg(etcd: &Etcd) -> Config {
    let mut c = Config::for_test(std::env::temp_dir(), vec![etcd.client_url.clone()], PREFIX);
    c.schedule_interval_ms = 100;
    c.initial_wait_ms = 300;
    c
}

async fn client(addr: impl std::fmt::Display) -> PlacementClient<Channel> {
    let ch = skv_rpc::lazy_channel(&addr.to_string()).expect("a valid test address");
    PlacementClient::new(ch)
}

async fn leader_addr(c: &mut PlacementClient<Channel>) -> Option<String> {
    let m = c.get_members(GetMembersRequest {}).await.ok()?.into_inner();
    m.leader.map(|l| l.address)
}

/// Starts `n` instances concurrently and waits for one leader.
async fn start_n(etcd: &Etcd, n: usize, tweak: impl Fn(&mut Config)) -> Vec<ServiceHandle> {
    let mut c = cfg(etcd);
    tweak(&mut c);
    let handles = futures::future::join_all((0..n).map(|_| skv_placement::start(c.clone()))).await;
    let handles: Vec<ServiceHandle> = handles.into_iter().map(|h| h.expect("start placement")).collect();
    find_leader(&handles).await;
    handles
}

async fn find_leader(handles: &[ServiceHandle]) -> usize {
    let c = client(handles[0].addr).await;
    let addr = wait_until("leader", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { leader_addr(&mut c).await }
    })
    .await;
    handles
        .iter()
        .position(|h| h.addr.to_string() == addr)
        .expect("leader is one of ours")
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

async fn shutdown_all(handles: Vec<ServiceHandle>) {
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), h.shutdown()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_race_three_instances_one_cluster() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 3, |_| {}).await;
    let mut ids = Vec::new();
    for h in &handles {
        let m = client(h.addr)
            .await
            .get_members(GetMembersRequest {})
            .await
            .unwrap()
            .into_inner();
        ids.push(m.cluster_id.clone());
        assert_eq!(m.members.len(), 3, "every instance registered as a member");
    }
    assert!(ids.iter().all(|i| i == &ids[0] && i.len() == 32), "{ids:?}");
    let scan = client(handles[1].addr)
        .await
        .scan_ranges(ScanRangesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scan.ranges.len(), 1);
    let d = scan.ranges[0].descriptor.clone().unwrap();
    assert_eq!((d.range_id, d.start.len(), d.end.len()), (1, 0, 0));
    assert_eq!(
        d.epoch,
        Some(RangeEpoch {
            conf_ver: 1,
            version: 1
        })
    );
    // Straight from etcd: exactly one cluster id and one range record.
    let store: DynMetaStore = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.client_url))
            .await
            .unwrap(),
    );
    let l = Layout::new(PREFIX);
    let (from, to) = l.ranges_bounds();
    assert_eq!(store.range(&from, &to, 0).await.unwrap().kvs.len(), 1);
    assert_eq!(
        String::from_utf8(store.get(&l.cluster_id()).await.unwrap().unwrap().value).unwrap(),
        ids[0]
    );
    // Exactly one instance considers itself leader: all agree on the leader key.
    let mut leaders = Vec::new();
    for h in &handles {
        leaders.push(leader_addr(&mut client(h.addr).await).await.unwrap());
    }
    assert!(leaders.iter().all(|l| l == &leaders[0]));
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_after_clean_shutdown() {
    let etcd = Etcd::start().await;
    let mut handles = start_n(&etcd, 3, |_| {}).await;
    let li = find_leader(&handles).await;
    let old = handles.remove(li);
    let old_addr = old.addr.to_string();
    let t0 = Instant::now();
    old.shutdown().await.unwrap();
    let c = client(handles[0].addr).await;
    let new = wait_until("a new leader", Duration::from_secs(10), || {
        let mut c = c.clone();
        let old_addr = old_addr.clone();
        async move { leader_addr(&mut c).await.filter(|a| a != &old_addr) }
    })
    .await;
    let took = t0.elapsed();
    eprintln!("MEASURED clean leader failover: {took:?} (new leader {new})");
    assert!(took < Duration::from_secs(10));
    // The new leader serves writes, and the follower forwards to it (a follower may answer
    // UNAVAILABLE for one campaign interval while it learns the new leader).
    let r = wait_until("AllocIds after failover", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move { c.alloc_ids(AllocIdsRequest { count: 5 }).await.ok() }
    })
    .await
    .into_inner();
    assert_eq!(r.count, 5);
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_after_crash_of_leader_process() {
    let etcd = Etcd::start().await;
    let bin = env!("CARGO_BIN_EXE_skv-placement");
    let mut procs: Vec<(String, ChildGuard)> = (0..3)
        .map(|i| {
            let addr = format!("127.0.0.1:{}", skv_testkit::free_port());
            let args = vec![
                "--listen".to_string(),
                addr.clone(),
                "--etcd".to_string(),
                etcd.client_url.clone(),
                "--etcd-prefix".to_string(),
                PREFIX.to_string(),
                "--name".to_string(),
                format!("p{i}"),
                "--lease-ttl-secs".to_string(),
                "3".to_string(),
            ];
            let mut cmd = std::process::Command::new(bin);
            cmd.args(&args)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let guard = ChildGuard::spawn(format!("placement-{i}"), &mut cmd).expect("spawn skv-placement");
            (addr, guard)
        })
        .collect();
    let mut c = client(&procs[0].0).await;
    let leader = wait_until("a leader among the processes", Duration::from_secs(20), || {
        let mut c = c.clone();
        async move { leader_addr(&mut c).await }
    })
    .await;
    let li = procs.iter().position(|p| p.0 == leader).unwrap();
    let t0 = Instant::now();
    procs[li].1.kill();
    let survivor = procs.iter().find(|p| p.0 != leader).unwrap().0.clone();
    c = client(&survivor).await;
    let new = wait_until("a new leader after the crash", Duration::from_secs(15), || {
        let mut c = c.clone();
        let leader = leader.clone();
        async move { leader_addr(&mut c).await.filter(|a| a != &leader) }
    })
    .await;
    let took = t0.elapsed();
    eprintln!("MEASURED crash leader failover (SIGKILL, lease TTL 3 s): {took:?} (new leader {new})");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_cas_refuses_stale_updates() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 1, |_| {}).await;
    let mut c = client(handles[0].addr).await;
    let hb = |d: RangeDescriptor, leader: u64, term: u64| RangeHeartbeatRequest {
        store_id: leader,
        ranges: vec![RangeReport {
            descriptor: Some(d),
            leader_store_id: leader,
            term,
            load: None,
        }],
    };
    c.range_heartbeat(hb(desc(1, "", "", 2, 1, &[1, 2, 3]), 1, 1))
        .await
        .unwrap();
    let got = c
        .get_range(GetRangeRequest { key: b"k".to_vec() })
        .await
        .unwrap()
        .into_inner();
    let info = got.range.unwrap();
    assert_eq!(info.descriptor.unwrap().epoch.unwrap().conf_ver, 2);
    assert_eq!(info.leader_store_id, 1);
    // A stale descriptor (older conf_ver) is refused.
    c.range_heartbeat(hb(desc(1, "", "", 1, 1, &[1]), 2, 5)).await.unwrap();
    let d = c
        .get_range(GetRangeRequest { key: b"k".to_vec() })
        .await
        .unwrap()
        .into_inner()
        .range
        .unwrap()
        .descriptor
        .unwrap();
    assert_eq!(d.epoch.unwrap().conf_ver, 2);
    assert_eq!(d.replicas.len(), 3);
    // A split, then a stale report of the pre-split range: refused.
    c.report_split(ReportSplitRequest {
        left: Some(desc(1, "", "m", 2, 2, &[1, 2, 3])),
        right: Some(desc(9, "m", "", 2, 2, &[1, 2, 3])),
        leader_store_id: 1,
    })
    .await
    .unwrap();
    c.range_heartbeat(hb(desc(1, "", "", 3, 1, &[1, 2, 3]), 1, 9))
        .await
        .unwrap();
    let scan = c.scan_ranges(ScanRangesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<u64> = scan
        .ranges
        .iter()
        .map(|r| r.descriptor.as_ref().unwrap().range_id)
        .collect();
    assert_eq!(ids, vec![1, 9]);
    let z = c
        .get_range(GetRangeRequest { key: b"z".to_vec() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(z.range.unwrap().descriptor.unwrap().range_id, 9);
    // Scan bounds: only ranges overlapping [a, b).
    let part = c
        .scan_ranges(ScanRangesRequest {
            start: b"a".to_vec(),
            end: b"b".to_vec(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(part.ranges.len(), 1);
    // Two writers racing with updates of random epochs: the map ends at the newest one.
    let store: DynMetaStore = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.client_url))
            .await
            .unwrap(),
    );
    let metas: Vec<_> = (0..2)
        .map(|_| {
            skv_placement::cluster::Meta::new(
                store.clone(),
                Layout::new(PREFIX),
                skv_placement::metrics::Metrics::default(),
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for (w, m) in metas.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let conf_ver = 3 + (i * 7 + w as u64 * 13) % 20;
                let d = desc(9, "m", "", conf_ver, 2, &[1, 2, 3]);
                m.apply(&[skv_placement::rangemap::Incoming {
                    desc: d,
                    leader: None,
                    leader_term: None,
                }])
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let z = c
        .get_range(GetRangeRequest { key: b"z".to_vec() })
        .await
        .unwrap()
        .into_inner();
    let max = (0..20u64)
        .flat_map(|i| [3 + (i * 7) % 20, 3 + (i * 7 + 13) % 20])
        .max()
        .unwrap();
    assert_eq!(z.range.unwrap().descriptor.unwrap().epoch.unwrap().conf_ver, max);
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_on_follower_sees_split() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 2, |_| {}).await;
    let li = find_leader(&handles).await;
    let follower = &handles[1 - li];
    let mut c = client(follower.addr).await;
    let mut w = c.watch_ranges(WatchRangesRequest {}).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.full);
    assert_eq!(first.updated.len(), 1);
    // ReportSplit through the follower (forwarded to the leader).
    c.report_split(ReportSplitRequest {
        left: Some(desc(1, "", "m", 1, 2, &[])),
        right: Some(desc(7, "m", "", 1, 2, &[])),
        leader_store_id: 0,
    })
    .await
    .unwrap();
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!m.full);
        for r in m.updated {
            let d = r.descriptor.unwrap();
            seen.insert(d.range_id, d);
        }
    }
    assert_eq!(seen[&1].end, b"m");
    assert_eq!(seen[&7].start, b"m");
    assert!(seen[&7].end.is_empty());
    // A merged descriptor reported by a heartbeat: range 7 disappears from the map.
    c.range_heartbeat(RangeHeartbeatRequest {
        store_id: 3,
        ranges: vec![RangeReport {
            descriptor: Some(desc(1, "", "", 1, 3, &[])),
            leader_store_id: 3,
            term: 1,
            load: None,
        }],
    })
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.removed_range_ids, vec![7]);
    assert_eq!(m.updated.len(), 1);
    let merged = m.updated[0].clone();
    assert_eq!(merged.leader_store_id, 3);
    assert!(merged.descriptor.unwrap().end.is_empty());
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_goes_down_after_silence_and_comes_back() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 2, |c| c.store_down_after_ms = 600).await;
    let li = find_leader(&handles).await;
    let mut c = client(handles[1 - li].addr).await; // via the follower
    let id = c
        .register_store(RegisterStoreRequest {
            store_id: 0,
            address: "127.0.0.1:1".into(),
            metrics_address: String::new(),
            capacity_bytes: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .store_id;
    assert!(id >= 2);
    let state = |c: PlacementClient<Channel>| async move {
        let mut c = c;
        let s = c.get_stores(GetStoresRequest {}).await.unwrap().into_inner().stores;
        s.into_iter().find(|s| s.store_id == id).unwrap().state
    };
    let hb = StoreHeartbeatRequest {
        store: Some(StoreInfo {
            store_id: id,
            address: "127.0.0.1:1".into(),
            used_bytes: 10,
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = c.store_heartbeat(hb.clone()).await.unwrap().into_inner();
    assert_eq!(resp.stores.len(), 1);
    assert_eq!(state(c.clone()).await, StoreState::Up as i32);
    let t0 = Instant::now();
    wait_until("store DOWN", Duration::from_secs(5), || {
        let c = c.clone();
        async move { (state(c).await == StoreState::Down as i32).then_some(()) }
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(400));
    c.store_heartbeat(hb).await.unwrap();
    assert_eq!(state(c.clone()).await, StoreState::Up as i32);
    // The leader's view agrees.
    assert_eq!(state(client(handles[li].addr).await).await, StoreState::Up as i32);
    // Unknown stores must register first.
    let err = c
        .store_heartbeat(StoreHeartbeatRequest {
            store: Some(StoreInfo {
                store_id: 999_999,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(ErrorCode::of(&err), Some(ErrorCode::StoreNotFound), "{err:?}");
    assert!(err.message().starts_with("[PD-StoreNotFound] "), "{err:?}");
    shutdown_all(handles).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_places_range_on_three_fake_stores() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 1, |c| c.initial_wait_ms = 60_000).await;
    let mut c = client(handles[0].addr).await;
    let fakes = vec![
        FakeStore::spawn().await,
        FakeStore::spawn().await,
        FakeStore::spawn().await,
    ];
    let mut ids = Vec::new();
    for f in &fakes {
        ids.push(register(&mut c, f.addr).await);
    }
    let total = || {
        fakes
            .iter()
            .map(|f| f.calls.lock().unwrap().create_replica.len())
            .sum::<usize>()
    };
    wait_until("3 CreateReplica calls", Duration::from_secs(10), || async {
        (total() >= 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(total(), 3, "exactly one CreateReplica per store");
    let calls: Vec<CreateReplicaRequest> = fakes
        .iter()
        .flat_map(|f| f.calls.lock().unwrap().create_replica.clone())
        .collect();
    assert_eq!(
        calls.iter().filter(|c| c.bootstrap).count(),
        1,
        "bootstrap on exactly one store"
    );
    let d = calls[0].descriptor.clone().unwrap();
    assert!(calls.iter().all(|c| c.descriptor.as_ref() == Some(&d)));
    let mut placed: Vec<u64> = d.replicas.iter().map(|r| r.store_id).collect();
    placed.sort();
    let reg_ids = ids.clone();
    ids.sort();
    assert_eq!(placed, ids);
    assert!(calls.iter().all(|c| c.stores.len() >= 3));
    // The bootstrap call went to the first voter.
    let first = d.replicas[0].store_id;
    let fi = reg_ids.iter().position(|i| *i == first).unwrap();
    assert!(fakes[fi].calls.lock().unwrap().create_replica[0].bootstrap);
    // The map has the voters now.
    let r = c
        .get_range(GetRangeRequest { key: b"a".to_vec() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.range.unwrap().descriptor.unwrap().replicas.len(), 3);
    assert_eq!(r.stores.len(), 3);
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_up_replicates_and_admin_split_uses_leader_store() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 1, |c| c.initial_wait_ms = 200).await;
    let mut c = client(handles[0].addr).await;
    let f1 = FakeStore::spawn().await;
    let s1 = register(&mut c, f1.addr).await;
    // One store, after initial_wait: placed alone, with bootstrap.
    wait_until("initial placement on one store", Duration::from_secs(10), || async {
        let g = f1.calls.lock().unwrap();
        g.create_replica.first().cloned()
    })
    .await;
    let cr = f1.calls.lock().unwrap().create_replica[0].clone();
    assert!(cr.bootstrap);
    let d = cr.descriptor.unwrap();
    assert_eq!(d.replicas.len(), 1);
    // The store reports leadership (conf_ver bumped by the initial membership).
    let mut d2 = d.clone();
    d2.epoch.as_mut().unwrap().conf_ver += 1;
    f1.calls.lock().unwrap().ranges.insert(1, d2.clone());
    let report = RangeHeartbeatRequest {
        store_id: s1,
        ranges: vec![RangeReport {
            descriptor: Some(d2.clone()),
            leader_store_id: s1,
            term: 1,
            load: None,
        }],
    };
    c.range_heartbeat(report.clone()).await.unwrap();
    // A second store joins: CreateReplica(bootstrap=false) on it, ADD_VOTER on the leader.
    let f2 = FakeStore::spawn().await;
    let s2 = register(&mut c, f2.addr).await;
    let cc = wait_until("ChangeReplicas on the leader", Duration::from_secs(10), || {
        let r = report.clone();
        let mut c = c.clone();
        let f1c = f1.calls.clone();
        async move {
            let _ = c.range_heartbeat(r).await;
            f1c.lock().unwrap().change_replicas.first().cloned()
        }
    })
    .await;
    assert_eq!(cc.changes[0].store_id, s2);
    assert_eq!(cc.changes[0].kind, replica_change::Kind::AddVoter as i32);
    let cr2 = f2.calls.lock().unwrap().create_replica[0].clone();
    assert!(!cr2.bootstrap);
    // Placement records the descriptor ChangeReplicas answered with.
    let info = wait_until("two voters in the map", Duration::from_secs(5), || {
        let mut c = c.clone();
        async move {
            let r = c
                .get_range(GetRangeRequest { key: b"q".to_vec() })
                .await
                .ok()?
                .into_inner();
            r.range
                .filter(|i| i.descriptor.as_ref().is_some_and(|d| d.replicas.len() == 2))
        }
    })
    .await;
    assert_eq!(info.leader_store_id, s1);
    // Admin split: goes to the leader store with the map's epoch; both halves land in the map.
    let split = c
        .split_range(AdminSplitRequest {
            range_id: 1,
            split_key: b"m".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    let (l, rr) = (split.left.unwrap(), split.right.unwrap());
    assert_eq!(
        (l.end.as_slice(), rr.start.as_slice()),
        (b"m".as_slice(), b"m".as_slice())
    );
    let got = c
        .get_range(GetRangeRequest { key: b"x".to_vec() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.range.unwrap().descriptor.unwrap().range_id, rr.range_id);
    // Transfer leader is forwarded to the leader store.
    c.transfer_leader(AdminTransferLeaderRequest {
        range_id: 1,
        to_store_id: s2,
    })
    .await
    .unwrap();
    assert_eq!(f1.calls.lock().unwrap().transfer_leader.len(), 1);
    // Refusals carry codes that say what to do next, and nothing reaches a store.
    let splits = f1.calls.lock().unwrap().split_range.len();
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<ErrorCode> {
        r.err().and_then(|e| ErrorCode::of(&e))
    }
    let no_replica = c
        .transfer_leader(AdminTransferLeaderRequest {
            range_id: 1,
            to_store_id: 999_999,
        })
        .await;
    assert_eq!(code(no_replica), Some(ErrorCode::NotAReplica));
    let outside = c
        .split_range(AdminSplitRequest {
            range_id: 1,
            split_key: b"x".to_vec(),
        })
        .await;
    assert_eq!(code(outside), Some(ErrorCode::InvalidArgument));
    let missing = c
        .split_range(AdminSplitRequest {
            range_id: 999_999,
            split_key: b"x".to_vec(),
        })
        .await;
    assert_eq!(code(missing), Some(ErrorCode::RangeNotFound));
    assert_eq!(f1.calls.lock().unwrap().transfer_leader.len(), 1);
    assert_eq!(f1.calls.lock().unwrap().split_range.len(), splits);
    // A merge is queued for adjacent ranges given left first; anything else is refused.
    let wrong_order = c
        .merge_ranges(AdminMergeRequest {
            left_range_id: rr.range_id,
            right_range_id: 1,
        })
        .await;
    assert_eq!(code(wrong_order), Some(ErrorCode::InvalidArgument));
    let unknown = c
        .merge_ranges(AdminMergeRequest {
            left_range_id: 1,
            right_range_id: 999_999,
        })
        .await;
    assert_eq!(code(unknown), Some(ErrorCode::RangeNotFound));
    c.merge_ranges(AdminMergeRequest {
        left_range_id: 1,
        right_range_id: rr.range_id,
    })
    .await
    .unwrap();
    c.set_scheduler_paused(SetSchedulerPausedRequest { paused: true })
        .await
        .unwrap();
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alloc_ids_unique_across_leader_and_follower() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 2, |_| {}).await;
    let mut seen = std::collections::HashSet::new();
    for h in &handles {
        let mut c = client(h.addr).await;
        for _ in 0..5 {
            let r = c.alloc_ids(AllocIdsRequest { count: 300 }).await.unwrap().into_inner();
            for id in r.first..r.first + u64::from(r.count) {
                assert!(id >= 2);
                assert!(seen.insert(id), "id {id} handed out twice");
            }
        }
    }
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_placement_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::for_test(dir.path(), vec![], "/skv/default");
    c.schedule_interval_ms = 100;
    let h = skv_placement::start(c.clone()).await.unwrap();
    let mut pc = client(h.addr).await;
    wait_until("embedded leader", Duration::from_secs(10), || {
        let mut pc = pc.clone();
        async move { leader_addr(&mut pc).await }
    })
    .await;
    let cluster = pc
        .get_members(GetMembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .cluster_id;
    let id = register(&mut pc, "127.0.0.1:1".parse().unwrap()).await;
    pc.report_split(ReportSplitRequest {
        left: Some(desc(1, "", "k", 1, 2, &[])),
        right: Some(desc(50, "k", "", 1, 2, &[])),
        leader_store_id: 0,
    })
    .await
    .unwrap();
    h.shutdown().await.unwrap();
    // Same data dir, new port.
    let h = skv_placement::start(c).await.unwrap();
    let mut pc = client(h.addr).await;
    let m = pc.get_members(GetMembersRequest {}).await.unwrap().into_inner();
    assert_eq!(m.cluster_id, cluster);
    let scan = pc.scan_ranges(ScanRangesRequest::default()).await.unwrap().into_inner();
    let ids: Vec<u64> = scan
        .ranges
        .iter()
        .map(|r| r.descriptor.as_ref().unwrap().range_id)
        .collect();
    assert_eq!(ids, vec![1, 50]);
    assert!(scan.stores.iter().any(|s| s.store_id == id));
    // The embedded store elects this single instance.
    wait_until("embedded leader after restart", Duration::from_secs(10), || {
        let mut pc = pc.clone();
        let me = h.addr.to_string();
        async move { leader_addr(&mut pc).await.filter(|a| *a == me) }
    })
    .await;
    // New ids never collide with the ones handed out before the restart.
    let r = pc.alloc_ids(AllocIdsRequest { count: 1 }).await.unwrap().into_inner();
    assert!(r.first > id);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::for_test(dir.path(), vec![], "/skv/default");
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c.schedule_interval_ms = 50;
    let h = skv_placement::start(c).await.unwrap();
    let maddr = h.metrics_addr.unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(maddr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    wait_until("is_leader 1 and a range count", Duration::from_secs(10), || async {
        let m = get("/metrics").await;
        (m.contains("skv_placement_is_leader 1") && m.contains("skv_placement_ranges 1")).then_some(())
    })
    .await;
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bootstraps_create_one_cluster() {
    let etcd = Etcd::start().await;
    let store: DynMetaStore = Arc::new(
        EtcdStore::connect(std::slice::from_ref(&etcd.client_url))
            .await
            .unwrap(),
    );
    let metas: Vec<_> = (0..8)
        .map(|_| {
            skv_placement::cluster::Meta::new(
                store.clone(),
                Layout::new("/skv/race"),
                skv_placement::metrics::Metrics::default(),
            )
        })
        .collect();
    let ids = futures::future::join_all(metas.iter().map(|m| m.bootstrap())).await;
    let ids: Vec<String> = ids.into_iter().map(|r| r.unwrap()).collect();
    assert!(ids.iter().all(|i| i == &ids[0]));
    let (ranges, _) = metas[0].all_ranges().await.unwrap();
    assert_eq!(ranges.len(), 1);
    assert_eq!(ranges[0].desc().range_id, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_never_forwards_a_forwarded_request() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 2, |_| {}).await;
    let li = find_leader(&handles).await;
    let mut c = client(handles[1 - li].addr).await;
    let mut req = tonic::Request::new(AllocIdsRequest { count: 1 });
    req.metadata_mut()
        .insert("skv-placement-forwarded", "1".parse().unwrap());
    let e = c.alloc_ids(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    // It says where the leader is, in the metadata, so the caller goes there.
    assert_eq!(ErrorCode::of(&e), Some(ErrorCode::NotLeader), "{e:?}");
    let hint = e.metadata().get(LEADER_KEY).and_then(|v| v.to_str().ok());
    assert_eq!(hint, Some(handles[li].addr.to_string().as_str()));
    // Reads are served locally by the follower.
    c.get_range(GetRangeRequest { key: b"x".to_vec() }).await.unwrap();
    c.get_stores(GetStoresRequest {}).await.unwrap();
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_scheduler_issues_no_operators_until_resumed() {
    let etcd = Etcd::start().await;
    let handles = start_n(&etcd, 2, |_| {}).await;
    let li = find_leader(&handles).await;
    // Pause through the follower (forwarded to the leader).
    let mut c = client(handles[1 - li].addr).await;
    c.set_scheduler_paused(SetSchedulerPausedRequest { paused: true })
        .await
        .unwrap();
    let fakes = vec![
        FakeStore::spawn().await,
        FakeStore::spawn().await,
        FakeStore::spawn().await,
    ];
    for f in &fakes {
        register(&mut c, f.addr).await;
    }
    let total = || {
        fakes
            .iter()
            .map(|f| f.calls.lock().unwrap().create_replica.len())
            .sum::<usize>()
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(total(), 0, "paused: nothing placed");
    // The pause survives a leader change.
    let mut handles = handles;
    let old = handles.remove(li);
    old.shutdown().await.unwrap();
    let mut c = client(handles[0].addr).await;
    let me = handles[0].addr.to_string();
    wait_until("the survivor leads", Duration::from_secs(10), || {
        let mut c = c.clone();
        let me = me.clone();
        async move { leader_addr(&mut c).await.filter(|a| *a == me) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(total(), 0, "still paused after failover");
    c.set_scheduler_paused(SetSchedulerPausedRequest { paused: false })
        .await
        .unwrap();
    wait_until("placement after resume", Duration::from_secs(10), || async {
        (total() == 3).then_some(())
    })
    .await;
    shutdown_all(handles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaderless_range_gets_create_replica_again_until_a_leader_reports() {
    let etcd = Etcd::start().await;
    // 100 ms ticks: a range without a leader report for 2 s gets CreateReplica again.
    let handles = start_n(&etcd, 1, |c| c.schedule_interval_ms = 100).await;
    let mut c = client(handles[0].addr).await;
    let fakes = vec![
        FakeStore::spawn().await,
        FakeStore::spawn().await,
        FakeStore::spawn().await,
    ];
    let mut ids = Vec::new();
    for f in &fakes {
        ids.push(register(&mut c, f.addr).await);
    }
    let total = || {
        fakes
            .iter()
            .map(|f| f.calls.lock().unwrap().create_replica.len())
            .sum::<usize>()
    };
    wait_until("initial placement", Duration::from_secs(10), || async {
        (total() == 3).then_some(())
    })
    .await;
    let t0 = Instant::now();
    // Keep the stores alive but report no range leader.
    wait_until("CreateReplica re-sent", Duration::from_secs(10), || {
        let mut c = c.clone();
        let ids = ids.clone();
        let fakes = &fakes;
        async move {
            for (f, id) in fakes.iter().zip(&ids) {
                c.store_heartbeat(StoreHeartbeatRequest {
                    store: Some(StoreInfo {
                        store_id: *id,
                        address: f.addr.to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .ok()?;
            }
            (total() >= 6).then_some(())
        }
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "not before the silence threshold"
    );
    let all: Vec<CreateReplicaRequest> = fakes
        .iter()
        .flat_map(|f| f.calls.lock().unwrap().create_replica.clone())
        .collect();
    // Still the pristine epoch: the first voter gets bootstrap=true again (idempotent there).
    assert_eq!(all.iter().filter(|r| r.bootstrap).count(), 2);
    // Once a leader reports, the resends stop.
    let d = all[0].descriptor.clone().unwrap();
    let mut d2 = d.clone();
    d2.epoch.as_mut().unwrap().conf_ver = 2;
    let leader = d.replicas[0].store_id;
    c.range_heartbeat(RangeHeartbeatRequest {
        store_id: leader,
        ranges: vec![RangeReport {
            descriptor: Some(d2.clone()),
            leader_store_id: leader,
            term: 1,
            load: None,
        }],
    })
    .await
    .unwrap();
    let before = total();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.range_heartbeat(RangeHeartbeatRequest {
            store_id: leader,
            ranges: vec![RangeReport {
                descriptor: Some(d2.clone()),
                leader_store_id: leader,
                term: 1,
                load: None,
            }],
        })
        .await
        .unwrap();
    }
    assert_eq!(total(), before, "no resend while the leader reports");
    shutdown_all(handles).await;
}
