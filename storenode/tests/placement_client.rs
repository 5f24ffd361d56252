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
            stale: Vec::new(),
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
    async fn report_merge(&self, _: Request<ReportMergeRequest>) -> R<ReportMergeResponse> {
        Err(Status::unimplemented(""))
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
