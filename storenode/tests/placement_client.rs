//! The storenode's placement client against a fake placement server.
mod common;

use common::*;
use parking_lot::Mutex;
use skv_proto::internal::placement_server::{Placement, PlacementServer};
use skv_proto::internal::*;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Seen {
    registers: Vec<RegisterStoreRequest>,
    store_heartbeats: Vec<StoreHeartbeatRequest>,
    range_heartbeats: Vec<RangeHeartbeatRequest>,
    splits: Vec<ReportSplitRequest>,
    merges: Vec<ReportMergeRequest>,
    /// What to answer each store in `StoreHeartbeatResponse.stale`.
    stale: std::collections::HashMap<u64, Vec<StaleReplica>>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Seen>>);

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Placement for Fake {
    async fn register_store(&self, r: Request<RegisterStoreRequest>) -> R<RegisterStoreResponse> {
        let r = r.into_inner();
        let id = if r.store_id == 0 { 42 } else { r.store_id };
        self.0.lock().registers.push(r);
        Ok(Response::new(RegisterStoreResponse {
            store_id: id,
            cluster_id: "c".into(),
        }))
    }
    async fn store_heartbeat(&self, r: Request<StoreHeartbeatRequest>) -> R<StoreHeartbeatResponse> {
        let r = r.into_inner();
        let me = r.store.clone().unwrap_or_default();
        let stale = self.0.lock().stale.get(&me.store_id).cloned().unwrap_or_default();
        self.0.lock().store_heartbeats.push(r);
        Ok(Response::new(StoreHeartbeatResponse {
            stores: vec![
                me,
                StoreInfo {
                    store_id: 7,
                    address: "127.0.0.1:1".into(),
                    ..Default::default()
                },
            ],
            stale,
        }))
    }
    async fn range_heartbeat(&self, r: Request<RangeHeartbeatRequest>) -> R<RangeHeartbeatResponse> {
        self.0.lock().range_heartbeats.push(r.into_inner());
        Ok(Response::new(RangeHeartbeatResponse {}))
    }
    async fn report_split(&self, r: Request<ReportSplitRequest>) -> R<ReportSplitResponse> {
        self.0.lock().splits.push(r.into_inner());
        Ok(Response::new(ReportSplitResponse {}))
    }
    async fn report_merge(&self, r: Request<ReportMergeRequest>) -> R<ReportMergeResponse> {
        self.0.lock().merges.push(r.into_inner());
        Ok(Response::new(ReportMergeResponse {}))
    }
    async fn get_range(&self, _: Request<GetRangeRequest>) -> R<GetRangeResponse> {
        Err(Status::unimplemented(""))
    }
    async fn scan_ranges(&self, _: Request<ScanRangesRequest>) -> R<ScanRangesResponse> {
        Err(Status::unimplemented(""))
    }
    type WatchRangesStream = futures::stream::Empty<Result<WatchRangesResponse, Status>>;
    async fn watch_ranges(&self, _: Request<WatchRangesRequest>) -> R<Self::WatchRangesStream> {
        Err(Status::unimplemented(""))
    }
    async fn get_stores(&self, _: Request<GetStoresRequest>) -> R<GetStoresResponse> {
        Err(Status::unimplemented(""))
    }
    async fn alloc_ids(&self, _: Request<AllocIdsRequest>) -> R<AllocIdsResponse> {
        Err(Status::unimplemented(""))
    }
    async fn get_members(&self, _: Request<GetMembersRequest>) -> R<GetMembersResponse> {
        Err(Status::unimplemented(""))
    }
    async fn split_range(&self, _: Request<AdminSplitRequest>) -> R<AdminSplitResponse> {
        Err(Status::unimplemented(""))
    }
    async fn transfer_leader(&self, _: Request<AdminTransferLeaderRequest>) -> R<AdminTransferLeaderResponse> {
        Err(Status::unimplemented(""))
    }
    async fn merge_ranges(&self, _: Request<AdminMergeRequest>) -> R<AdminMergeResponse> {
        Err(Status::unimplemented(""))
    }
    async fn move_replica(&self, _: Request<AdminMoveReplicaRequest>) -> R<AdminMoveReplicaResponse> {
        Err(Status::unimplemented(""))
    }
    async fn drain_store(&self, _: Request<AdminDrainStoreRequest>) -> R<AdminDrainStoreResponse> {
        Err(Status::unimplemented(""))
    }
    async fn set_scheduler_paused(&self, _: Request<SetSchedulerPausedRequest>) -> R<SetSchedulerPausedResponse> {
        Err(Status::unimplemented(""))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_heartbeats_and_reports_splits() {
    init_logs();
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = listener.local_addr().unwrap();
    let svc = PlacementServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = skv_storenode::Config::for_test(dir.path().to_path_buf(), 0);
    cfg.store_id = None;
    cfg.placement = vec![format!("http://{paddr}")];
    cfg.heartbeat_interval_ms = 50;
    let h = skv_storenode::start(cfg.clone()).await.unwrap();
    let addr = h.addr;
    assert_eq!(fake.0.lock().registers[0].store_id, 0);
    assert_eq!(fake.0.lock().registers[0].address, addr.to_string());

    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut sc = skv_proto::internal::store_client::StoreClient::new(ch);
    let desc = RangeDescriptor {
        range_id: 1,
        start: vec![],
        end: vec![],
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas: vec![skv_proto::internal::Replica {
            store_id: 42,
            role: ReplicaRole::Voter as i32,
        }],
    };
    sc.create_replica(CreateReplicaRequest {
        descriptor: Some(desc),
        bootstrap: true,
        stores: vec![],
    })
    .await
    .unwrap();
    assert_eq!(
        sc.list_replicas(ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .store_id,
        42
    );
    wait_until("range heartbeat from the leader", Duration::from_secs(10), || async {
        fake.0.lock().range_heartbeats.iter().any(|r| {
            r.store_id == 42
                && r.ranges
                    .iter()
                    .any(|x| x.leader_store_id == 42 && x.descriptor.as_ref().is_some_and(|d| d.range_id == 1))
        })
    })
    .await;
    assert!(fake.0.lock().store_heartbeats.iter().any(|s| {
        s.store
            .as_ref()
            .is_some_and(|s| s.store_id == 42 && s.address == addr.to_string())
    }));

    // Split on the leader: placement hears about it.
    let d = loop {
        let reps = sc
            .list_replicas(ListReplicasRequest {})
            .await
            .unwrap()
            .into_inner()
            .replicas;
        let r = &reps[0];
        if r.leader_store_id == 42 {
            break r.descriptor.clone().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r = sc
        .split_range(SplitRangeRequest {
            header: Some(header(&d)),
            split_key: b"m".to_vec(),
            new_range_id: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    wait_until("report split", Duration::from_secs(5), || async {
        fake.0
            .lock()
            .splits
            .iter()
            .any(|s| s.right.as_ref().is_some_and(|r| r.range_id == 2 && r.start == b"m") && s.leader_store_id == 42)
    })
    .await;
    h.shutdown().await.unwrap();

    // Restart: the id comes from the data dir and is re-registered.
    let h = skv_storenode::start(cfg).await.unwrap();
    wait_until("re-register with the known id", Duration::from_secs(5), || async {
        fake.0.lock().registers.iter().any(|r| r.store_id == 42)
    })
    .await;
    h.shutdown().await.unwrap();
}

/// Whether `store` lists a replica of `range`.
async fn holds(c: &Cluster, store: u64, range: u64) -> bool {
    c.list()
        .await
        .into_iter()
        .any(|(s, r)| s == store && r.descriptor.is_some_and(|d| d.range_id == range))
}

/// A fake placement server on a random port.
async fn start_fake() -> (Fake, String) {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let paddr = listener.local_addr().unwrap();
    let svc = PlacementServer::new(fake.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (fake, format!("http://{paddr}"))
}

/// Store heartbeats carry disk, CPU and every replica; range heartbeats carry the size
/// and key count kept by apply. A replica removed by ChangeReplicas is destroyed once
/// placement names it stale with a descriptor that proves it (an unproven name is
/// ignored): its data and Raft state leave that store, the others keep theirs, and a
/// restart does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_in_heartbeats_and_a_removed_replica_is_garbage_collected() {
    let (fake, url) = start_fake().await;
    let mut c = Cluster::start_with_placement(3, 10_000, Some(url)).await;
    c.bootstrap().await;
    for i in 0..50u32 {
        c.put(format!("g{i:02}").as_bytes(), &[b'v'; 100]).await;
    }
    c.put(b"g00", &[b'w'; 50]).await; // overwrite: -100 + 50 bytes, same key count
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let want_bytes = 50 * (3 + 100) - 50;
    wait_until(
        "range heartbeat with size and keys",
        Duration::from_secs(10),
        || async {
            fake.0.lock().range_heartbeats.iter().rev().take(3).any(|r| {
                r.ranges.iter().any(|x| {
                    x.load
                        .as_ref()
                        .is_some_and(|l| l.approximate_keys == 50 && l.approximate_size_bytes == want_bytes)
                })
            })
        },
    )
    .await;
    wait_until(
        "store heartbeats with disk and replicas",
        Duration::from_secs(10),
        || async {
            let seen = fake.0.lock();
            (1..=3u64).all(|id| {
                seen.store_heartbeats.iter().any(|h| {
                    h.store.as_ref().is_some_and(|s| {
                        s.store_id == id && s.capacity_bytes > 0 && s.available_bytes > 0 && s.used_bytes > 0
                    }) && h.replicas.iter().any(|r| r.range_id == 1)
                })
            })
        },
    )
    .await;

    let victim = (1..=3u64).find(|s| *s != leader).unwrap();
    let keeper = (1..=3u64).find(|s| *s != leader && *s != victim).unwrap();
    // Unproven: placement's descriptor still lists the store. Ignored.
    fake.0.lock().stale.insert(
        keeper,
        vec![StaleReplica {
            range_id: 1,
            current: Some(d.clone()),
        }],
    );
    let r = c
        .client(leader)
        .await
        .change_replicas(ChangeReplicasRequest {
            header: Some(header(&d)),
            changes: vec![ReplicaChange {
                store_id: victim,
                kind: replica_change::Kind::Remove as i32,
            }],
            stores: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let nd = r.descriptor.unwrap();
    fake.0.lock().stale.insert(
        victim,
        vec![StaleReplica {
            range_id: 1,
            current: Some(nd.clone()),
        }],
    );
    wait_until("the removed replica is gone", Duration::from_secs(10), || async {
        !holds(&c, victim, 1).await
    })
    .await;
    // A read there is refused (no range), never served from leftover data.
    let r = c.stale_get(victim, &nd, b"g01").await.unwrap();
    assert!(
        matches!(
            r.routing_error.as_ref().and_then(|e| e.kind.as_ref()),
            Some(routing_error::Kind::RangeNotFound(_))
        ),
        "{r:?}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(holds(&c, keeper, 1).await, "an unproven stale name destroyed a replica");
    fake.0.lock().stale.clear();

    // The victim's store holds nothing of the range any more.
    c.stop_node(victim).await;
    {
        let dir = c.dirs[(victim - 1) as usize].path();
        let e = skv_storenode::engine::Engine::open(dir, skv_storenode::metrics::Metrics::new()).unwrap();
        assert_eq!(e.data.iter().count(), 0, "data keys left on the removed store");
        assert_eq!(e.raft.prefix(1u64.to_be_bytes()).count(), 0, "raft state left");
        assert!(e.meta.prefix(b"gc/").next().is_none(), "GC marker left");
        assert!(e.load_descriptors().unwrap().is_empty());
        e.stop_syncer();
    }
    c.start_node(victim).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!holds(&c, victim, 1).await, "a destroyed replica was reopened");
    // The others keep everything.
    for i in 0..50u32 {
        assert!(c.get(format!("g{i:02}").as_bytes()).await.is_some());
    }
    wait_until("the keeper still has the data", Duration::from_secs(10), || async {
        c.stale_get(keeper, &nd, b"g49").await.is_some_and(|r| r.found)
    })
    .await;
    c.shutdown().await;
}

/// After a split each half reports its own size and key count; a merge adds them back
/// up and is reported to placement with the merged and the retired descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_halves_and_merges_report_their_sizes() {
    let (fake, url) = start_fake().await;
    let c = Cluster::start_with_placement(3, 10_000, Some(url)).await;
    c.bootstrap().await;
    for i in 0..40u32 {
        c.put(format!("s{i:02}").as_bytes(), &[b'v'; 97]).await; // 100 bytes per key
    }
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let r = c
        .client(leader)
        .await
        .split_range(SplitRangeRequest {
            header: Some(header(&d)),
            split_key: b"s10".to_vec(),
            new_range_id: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let sizes = |range: u64| {
        let seen = fake.0.lock();
        seen.range_heartbeats
            .iter()
            .rev()
            .flat_map(|h| h.ranges.iter())
            .find(|x| x.descriptor.as_ref().is_some_and(|d| d.range_id == range))
            .and_then(|x| x.load.as_ref().map(|l| (l.approximate_size_bytes, l.approximate_keys)))
    };
    wait_until("both halves report their sizes", Duration::from_secs(10), || async {
        sizes(1) == Some((1000, 10)) && sizes(2) == Some((3000, 30))
    })
    .await;

    // Colocate the leaders, then merge.
    let (leader, dt, ds) = loop {
        let (lt, dt) = c.leader_of(1, Duration::from_secs(10)).await;
        let (ls, ds) = c.leader_of(2, Duration::from_secs(10)).await;
        if lt == ls {
            break (lt, dt, ds);
        }
        let _ = c
            .client(ls)
            .await
            .transfer_leader(TransferLeaderRequest {
                header: Some(header(&ds)),
                to_store_id: lt,
            })
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let r = c
        .client(leader)
        .await
        .merge_ranges(MergeRangesRequest {
            header: Some(header(&dt)),
            source: Some(ds.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let merged = r.merged.unwrap();
    wait_until("report merge", Duration::from_secs(5), || async {
        fake.0.lock().merges.iter().any(|m| {
            m.merged.as_ref() == Some(&merged)
                && m.source.as_ref().is_some_and(|s| s.range_id == 2 && s.start == b"s10")
                && m.leader_store_id == leader
        })
    })
    .await;
    wait_until("the merged range reports the sum", Duration::from_secs(10), || async {
        sizes(1) == Some((4000, 40))
    })
    .await;
    c.shutdown().await;
}
