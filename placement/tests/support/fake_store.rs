//! A tiny in-process fake of the storenode's `Store` service: records the admin calls
//! placement makes and answers them plausibly (no data, no Raft).

use skv_proto::internal::store_server::{Store, StoreServer};
use skv_proto::internal::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

#[derive(Default)]
pub struct Recorded {
    pub create_replica: Vec<CreateReplicaRequest>,
    pub change_replicas: Vec<ChangeReplicasRequest>,
    pub split_range: Vec<SplitRangeRequest>,
    pub transfer_leader: Vec<TransferLeaderRequest>,
    pub merge_ranges: Vec<MergeRangesRequest>,
    /// Local descriptors by range id.
    pub ranges: HashMap<u64, RangeDescriptor>,
    /// Other fakes whose local descriptors follow this one's membership changes (as
    /// replicas of one Raft group would), e.g. so a new leader knows the latest epoch.
    pub peers: Vec<Arc<Mutex<Recorded>>>,
}

#[derive(Clone, Default)]
pub struct FakeStore {
    pub calls: Arc<Mutex<Recorded>>,
}

pub struct FakeStoreHandle {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Recorded>>,
    cancel: CancellationToken,
}

impl Drop for FakeStoreHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl FakeStore {
    /// Serves on a random 127.0.0.1 port until the handle drops.
    pub async fn spawn() -> FakeStoreHandle {
        let fake = FakeStore::default();
        let calls = fake.calls.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(StoreServer::new(fake))
                .serve_with_incoming_shutdown(skv_rpc::incoming(listener), c.cancelled_owned())
                .await;
        });
        FakeStoreHandle { addr, calls, cancel }
    }
}

fn epoch_mismatch(cur: &RangeDescriptor) -> RoutingError {
    RoutingError {
        message: "epoch not match".into(),
        kind: Some(routing_error::Kind::EpochNotMatch(EpochNotMatch {
            current: vec![cur.clone()],
        })),
    }
}

#[tonic::async_trait]
impl Store for FakeStore {
    async fn get(&self, _r: Request<StoreGetRequest>) -> Result<Response<StoreGetResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn write(&self, _r: Request<StoreWriteRequest>) -> Result<Response<StoreWriteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type ScanStream = tokio_stream::Empty<Result<StoreScanResponse, Status>>;
    async fn scan(&self, _r: Request<StoreScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn batch_get(&self, _r: Request<StoreBatchGetRequest>) -> Result<Response<StoreBatchGetResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn batch_write(
        &self,
        _r: Request<StoreBatchWriteRequest>,
    ) -> Result<Response<StoreBatchWriteResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_replica(
        &self,
        r: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        let r = r.into_inner();
        let mut g = self.calls.lock().unwrap();
        if let Some(d) = &r.descriptor {
            g.ranges.entry(d.range_id).or_insert_with(|| d.clone());
        }
        g.create_replica.push(r);
        Ok(Response::new(CreateReplicaResponse {}))
    }
    async fn change_replicas(
        &self,
        r: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let r = r.into_inner();
        let mut g = self.calls.lock().unwrap();
        g.change_replicas.push(r.clone());
        let id = r.header.as_ref().map_or(0, |h| h.range_id);
        let Some(mut d) = g.ranges.get(&id).cloned() else {
            return Ok(Response::new(ChangeReplicasResponse {
                routing_error: Some(RoutingError {
                    message: "range not found".into(),
                    kind: Some(routing_error::Kind::RangeNotFound(RangeNotFound { range_id: id })),
                }),
                descriptor: None,
            }));
        };
        if r.header.as_ref().and_then(|h| h.epoch) != d.epoch {
            return Ok(Response::new(ChangeReplicasResponse {
                routing_error: Some(epoch_mismatch(&d)),
                descriptor: None,
            }));
        }
        for c in &r.changes {
            let kind = replica_change::Kind::try_from(c.kind).unwrap_or(replica_change::Kind::AddVoter);
            let existing = d.replicas.iter().position(|x| x.store_id == c.store_id);
            match (kind, existing) {
                (replica_change::Kind::AddVoter, Some(i)) => d.replicas[i].role = ReplicaRole::Voter as i32,
                (replica_change::Kind::AddVoter, None) => d.replicas.push(Replica {
                    store_id: c.store_id,
                    role: ReplicaRole::Voter as i32,
                }),
                (replica_change::Kind::AddLearner, None) => d.replicas.push(Replica {
                    store_id: c.store_id,
                    role: ReplicaRole::Learner as i32,
                }),
                (replica_change::Kind::AddLearner, Some(_)) => {}
                (replica_change::Kind::Remove, Some(i)) => {
                    d.replicas.remove(i);
                }
                (replica_change::Kind::Remove, None) => {}
            }
        }
        let e = d.epoch.get_or_insert_default();
        e.conf_ver += 1;
        g.ranges.insert(id, d.clone());
        let peers = g.peers.clone();
        drop(g);
        for p in peers {
            p.lock().unwrap().ranges.insert(id, d.clone());
        }
        Ok(Response::new(ChangeReplicasResponse {
            routing_error: None,
            descriptor: Some(d),
        }))
    }
    async fn split_range(&self, r: Request<SplitRangeRequest>) -> Result<Response<SplitRangeResponse>, Status> {
        let r = r.into_inner();
        let mut g = self.calls.lock().unwrap();
        g.split_range.push(r.clone());
        let h = r.header.unwrap_or_default();
        let Some(cur) = g.ranges.get(&h.range_id).cloned() else {
            return Ok(Response::new(SplitRangeResponse {
                routing_error: Some(RoutingError {
                    message: "range not found".into(),
                    kind: Some(routing_error::Kind::RangeNotFound(RangeNotFound {
                        range_id: h.range_id,
                    })),
                }),
                ..Default::default()
            }));
        };
        if h.epoch.map(|e| e.version) != cur.epoch.map(|e| e.version) {
            return Ok(Response::new(SplitRangeResponse {
                routing_error: Some(epoch_mismatch(&cur)),
                ..Default::default()
            }));
        }
        let mut left = cur.clone();
        left.end = r.split_key.clone();
        left.epoch.get_or_insert_default().version += 1;
        let mut right = cur.clone();
        right.range_id = r.new_range_id;
        right.start = r.split_key;
        right.epoch = left.epoch;
        g.ranges.insert(left.range_id, left.clone());
        g.ranges.insert(right.range_id, right.clone());
        Ok(Response::new(SplitRangeResponse {
            routing_error: None,
            left: Some(left),
            right: Some(right),
        }))
    }
    async fn transfer_leader(
        &self,
        r: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.calls.lock().unwrap().transfer_leader.push(r.into_inner());
        Ok(Response::new(TransferLeaderResponse { routing_error: None }))
    }
    async fn list_replicas(&self, _r: Request<ListReplicasRequest>) -> Result<Response<ListReplicasResponse>, Status> {
        Ok(Response::new(ListReplicasResponse::default()))
    }
    async fn merge_ranges(&self, r: Request<MergeRangesRequest>) -> Result<Response<MergeRangesResponse>, Status> {
        // Recorded, then refused as a storenode without merges does.
        self.calls.lock().unwrap().merge_ranges.push(r.into_inner());
        Err(Status::unimplemented("fake"))
    }
}
