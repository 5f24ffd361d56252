//! Admin operations: split, leader transfer, merge/move/drain (not yet), scheduler pause.

use super::{ADMIN_ATTEMPTS, Shared, meta_status};
use crate::meta::{Op, Txn};
use crate::rangemap::Incoming;
use skv_common::keys::desc_contains;
use skv_proto::internal::routing_error::Kind as RoutingKind;
use skv_proto::internal::*;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub(super) async fn split_range(
    s: &Shared,
    request: Request<AdminSplitRequest>,
) -> Result<Response<AdminSplitResponse>, Status> {
    let req = request.into_inner();
    if req.split_key.is_empty() {
        return Err(Status::invalid_argument("split_key is empty"));
    }
    skv_common::limits::check_key(&req.split_key)?;
    let span = tracing::info_span!("admin_split", range_id = req.range_id);
    async move {
        let new_range_id = s.alloc_ids(1).await?;
        let mut last_err = String::new();
        for _ in 0..ADMIN_ATTEMPTS {
            let (desc, leader, address) = s.range_and_leader(req.range_id).await?;
            if !desc_contains(&desc, &req.split_key) || req.split_key == desc.start {
                return Err(Status::invalid_argument(format!(
                    "split key is not strictly inside range {}",
                    req.range_id
                )));
            }
            let mut client = s.store_client(&address)?;
            let resp = client
                .split_range(SplitRangeRequest {
                    header: Some(RequestHeader {
                        range_id: desc.range_id,
                        epoch: desc.epoch,
                    }),
                    split_key: req.split_key.clone(),
                    new_range_id,
                })
                .await
                .map_err(|e| Status::unavailable(format!("store {leader} at {address}: {}", e.message())))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                last_err = re.message.clone();
                let wait = s.absorb_routing_error(&desc, &re).await;
                tokio::time::sleep(wait).await;
                continue;
            }
            let (Some(left), Some(right)) = (resp.left, resp.right) else {
                return Err(Status::internal("store answered the split without descriptors"));
            };
            s.apply(&[
                Incoming {
                    desc: left.clone(),
                    leader: Some(leader),
                    leader_term: None,
                },
                Incoming {
                    desc: right.clone(),
                    leader: Some(leader),
                    leader_term: None,
                },
            ])
            .await?;
            tracing::info!(new_range_id, "range split");
            return Ok(Response::new(AdminSplitResponse {
                left: Some(left),
                right: Some(right),
            }));
        }
        Err(Status::unavailable(format!("split did not go through: {last_err}")))
    }
    .instrument(span)
    .await
}

pub(super) async fn transfer_leader(
    s: &Shared,
    request: Request<AdminTransferLeaderRequest>,
) -> Result<Response<AdminTransferLeaderResponse>, Status> {
    let req = request.into_inner();
    let mut last_err = String::new();
    for _ in 0..ADMIN_ATTEMPTS {
        let (desc, leader, address) = s.range_and_leader(req.range_id).await?;
        if !desc.replicas.iter().any(|r| r.store_id == req.to_store_id) {
            return Err(Status::failed_precondition(format!(
                "store {} holds no replica of range {}",
                req.to_store_id, req.range_id
            )));
        }
        if leader == req.to_store_id {
            return Ok(Response::new(AdminTransferLeaderResponse {}));
        }
        let resp = s
            .store_client(&address)?
            .transfer_leader(TransferLeaderRequest {
                header: Some(RequestHeader {
                    range_id: desc.range_id,
                    epoch: desc.epoch,
                }),
                to_store_id: req.to_store_id,
            })
            .await
            .map_err(|e| Status::unavailable(format!("store {leader} at {address}: {}", e.message())))?
            .into_inner();
        match resp.routing_error {
            None => return Ok(Response::new(AdminTransferLeaderResponse {})),
            Some(re) => {
                last_err = re.message.clone();
                let wait = s.absorb_routing_error(&desc, &re).await;
                tokio::time::sleep(wait).await;
            }
        }
    }
    Err(Status::unavailable(format!("transfer did not go through: {last_err}")))
}

pub(super) async fn merge_ranges(_request: Request<AdminMergeRequest>) -> Result<Response<AdminMergeResponse>, Status> {
    Err(Status::unimplemented(
        "MergeRanges is not implemented yet (milestone 2: ranges in motion)",
    ))
}

pub(super) async fn move_replica(
    _request: Request<AdminMoveReplicaRequest>,
) -> Result<Response<AdminMoveReplicaResponse>, Status> {
    Err(Status::unimplemented(
        "MoveReplica is not implemented yet (milestone 2: ranges in motion)",
    ))
}

pub(super) async fn drain_store(
    _request: Request<AdminDrainStoreRequest>,
) -> Result<Response<AdminDrainStoreResponse>, Status> {
    Err(Status::unimplemented(
        "DrainStore is not implemented yet (milestone 2: ranges in motion)",
    ))
}

pub(super) async fn set_scheduler_paused(
    s: &Shared,
    request: Request<SetSchedulerPausedRequest>,
) -> Result<Response<SetSchedulerPausedResponse>, Status> {
    let paused = request.into_inner().paused;
    let key = s.meta.layout.scheduler_paused();
    s.meta
        .store
        .txn(Txn::new().and_then([Op::put(key, if paused { "1" } else { "0" })]))
        .await
        .map_err(meta_status)?;
    s.paused.store(paused, Ordering::Release);
    tracing::info!(paused, "scheduler pause changed");
    Ok(Response::new(SetSchedulerPausedResponse {}))
}

impl Shared {
    pub(super) async fn range_and_leader(&self, range_id: u64) -> Result<(RangeDescriptor, u64, String), Status> {
        let rec = self
            .meta
            .range_by_id(range_id)
            .await
            .map_err(meta_status)?
            .ok_or_else(|| Status::not_found(format!("range {range_id} not found")))?;
        let desc = rec.desc().clone();
        let leader = rec.info.leader_store_id;
        if leader == 0 {
            return Err(Status::unavailable(format!(
                "leader of range {range_id} is not known yet; retry"
            )));
        }
        let address = self
            .meta
            .get_store(leader)
            .await
            .map_err(meta_status)?
            .map(|s| s.address)
            .unwrap_or_default();
        if address.is_empty() {
            return Err(Status::unavailable(format!("address of store {leader} is not known")));
        }
        Ok((desc, leader, address))
    }

    /// Folds a storenode's routing error into the map; returns how long to wait before retrying.
    pub(super) async fn absorb_routing_error(&self, desc: &RangeDescriptor, re: &RoutingError) -> Duration {
        match &re.kind {
            Some(RoutingKind::NotLeader(nl)) if nl.leader_store_id != 0 => {
                let _ = self
                    .apply(&[Incoming {
                        desc: desc.clone(),
                        leader: Some(nl.leader_store_id),
                        leader_term: None,
                    }])
                    .await;
                Duration::from_millis(50)
            }
            Some(RoutingKind::EpochNotMatch(e)) => {
                for d in &e.current {
                    let _ = self
                        .apply(&[Incoming {
                            desc: d.clone(),
                            leader: None,
                            leader_term: None,
                        }])
                        .await;
                }
                Duration::from_millis(50)
            }
            Some(RoutingKind::ServerBusy(b)) => Duration::from_millis(b.retry_after_ms.clamp(10, 2000)),
            _ => Duration::from_millis(300),
        }
    }
}
