//! Admin operations: split, leader transfer, merge, move, drain, scheduler pause.

use super::{ADMIN_ATTEMPTS, Shared};
use crate::error::{PlacementError, PlacementResult};
use crate::meta::{Op, Txn};
use crate::model::store_opt;
use crate::rangemap::Incoming;
use crate::scheduler::{Operator, Reason};
use skv_common::ids::{RangeId, StoreId};
use skv_common::keys::desc_contains;
use skv_proto::internal::routing_error::Kind as RoutingKind;
use skv_proto::internal::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tracing::Instrument;

/// Retry delay after a routing error the map was fixed from (NotLeader with a leader,
/// EpochNotMatch): the next attempt uses the fixed view at once.
const FIXED_VIEW_RETRY: Duration = Duration::from_millis(50);
/// Retry delay after any other routing error.
const ROUTING_RETRY: Duration = Duration::from_millis(300);

/// How long to wait before retrying after a storenode's routing error.
pub(super) fn routing_retry_delay(re: &RoutingError) -> Duration {
    match &re.kind {
        Some(RoutingKind::NotLeader(nl)) if nl.leader_store_id != 0 => FIXED_VIEW_RETRY,
        Some(RoutingKind::EpochNotMatch(_)) => FIXED_VIEW_RETRY,
        Some(RoutingKind::ServerBusy(b)) => Duration::from_millis(b.retry_after_ms.clamp(10, 2000)),
        _ => ROUTING_RETRY,
    }
}

/// The error of an operation on `range_id` that a storenode refused with a routing error
/// (`last`, the final one if it was retried): the range changed under it (re-read and
/// decide), or its leader was unreachable or busy (retry later).
pub(super) fn routing_refusal(range_id: RangeId, reason: String, last: Option<&RoutingError>) -> PlacementError {
    match last.and_then(|re| re.kind.as_ref()) {
        Some(RoutingKind::EpochNotMatch(_) | RoutingKind::KeyNotInRange(_)) => {
            PlacementError::EpochNotMatch { range_id, reason }
        }
        Some(RoutingKind::ServerBusy(_)) => PlacementError::RangeUnavailable {
            range_id,
            reason,
            retry_after: last.map_or(ROUTING_RETRY, routing_retry_delay),
        },
        Some(RoutingKind::NotLeader(_) | RoutingKind::RangeNotFound(_)) | None => PlacementError::RangeUnavailable {
            range_id,
            reason,
            retry_after: ROUTING_RETRY,
        },
    }
}

fn exhausted(range_id: RangeId, what: &str, last: Option<&RoutingError>) -> PlacementError {
    let reason = format!(
        "{what} did not go through in {ADMIN_ATTEMPTS} attempts: {}",
        last.map_or("", |re| re.message.as_str())
    );
    routing_refusal(range_id, reason, last)
}

pub(super) fn store_call_failed(store_id: StoreId, address: &str, e: tonic::Status) -> PlacementError {
    PlacementError::StoreUnavailable {
        store_id,
        address: address.to_string(),
        reason: e.message().to_string(),
    }
}

pub(super) async fn split_range(s: &Shared, req: AdminSplitRequest) -> PlacementResult<AdminSplitResponse> {
    if req.split_key.is_empty() {
        return Err(PlacementError::invalid("split_key is empty"));
    }
    skv_common::limits::check_key(&req.split_key)?;
    let range_id = RangeId(req.range_id);
    let span = tracing::info_span!("admin_split", range_id = range_id.get());
    async move {
        let new_range_id = RangeId(s.alloc_ids(1).await?);
        let mut last: Option<RoutingError> = None;
        for _ in 0..ADMIN_ATTEMPTS {
            let (desc, leader, address) = s.range_and_leader(range_id).await?;
            if !desc_contains(&desc, &req.split_key) || req.split_key == desc.start {
                return Err(PlacementError::invalid(format!(
                    "split key is not strictly inside range {}",
                    range_id.get()
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
                    new_range_id: new_range_id.get(),
                })
                .await
                .map_err(|e| store_call_failed(leader, &address, e))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                let wait = s.absorb_routing_error(&desc, &re).await;
                last = Some(re);
                tokio::time::sleep(wait).await;
                continue;
            }
            let (Some(left), Some(right)) = (resp.left, resp.right) else {
                return Err(PlacementError::internal(format!(
                    "store {leader} answered the split without descriptors"
                )));
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
            s.record_split(&left, &right);
            tracing::info!(new_range_id = new_range_id.get(), "range split");
            return Ok(AdminSplitResponse {
                left: Some(left),
                right: Some(right),
            });
        }
        Err(exhausted(range_id, "split", last.as_ref()))
    }
    .instrument(span)
    .await
}

pub(super) async fn transfer_leader(
    s: &Shared,
    req: AdminTransferLeaderRequest,
) -> PlacementResult<AdminTransferLeaderResponse> {
    let range_id = RangeId(req.range_id);
    let to = StoreId(req.to_store_id);
    let mut last: Option<RoutingError> = None;
    for _ in 0..ADMIN_ATTEMPTS {
        let (desc, leader, address) = s.range_and_leader(range_id).await?;
        if !desc.replicas.iter().any(|r| StoreId(r.store_id) == to) {
            return Err(PlacementError::NotAReplica { range_id, store_id: to });
        }
        if leader == to {
            return Ok(AdminTransferLeaderResponse {});
        }
        let resp = s
            .store_client(&address)?
            .transfer_leader(TransferLeaderRequest {
                header: Some(RequestHeader {
                    range_id: desc.range_id,
                    epoch: desc.epoch,
                }),
                to_store_id: to.get(),
            })
            .await
            .map_err(|e| store_call_failed(leader, &address, e))?
            .into_inner();
        match resp.routing_error {
            None => return Ok(AdminTransferLeaderResponse {}),
            Some(re) => {
                let wait = s.absorb_routing_error(&desc, &re).await;
                last = Some(re);
                tokio::time::sleep(wait).await;
            }
        }
    }
    Err(exhausted(range_id, "transfer", last.as_ref()))
}

/// Queues a merge of two adjacent ranges: the scheduler colocates them, aligns their
/// leaders and merges (thresholds and cooldown do not apply; it goes on while the scheduler
/// is paused). Answers once queued; `skvctl operators` shows the steps.
pub(super) async fn merge_ranges(s: &Shared, req: AdminMergeRequest) -> PlacementResult<AdminMergeResponse> {
    let (l, r) = (RangeId(req.left_range_id), RangeId(req.right_range_id));
    let (ranges, _) = s.meta.all_ranges().await?;
    let find = |id: RangeId| {
        ranges
            .iter()
            .find(|x| x.range_id() == id)
            .map(|x| x.desc().clone())
            .ok_or(PlacementError::RangeNotFound { range_id: id })
    };
    let (left, right) = (find(l)?, find(r)?);
    if left.end.is_empty() || left.end != right.start {
        return Err(PlacementError::invalid(format!(
            "range {l} is not immediately left of range {r} (give the left one first)"
        )));
    }
    s.mem.lock().forced_merges.insert((l, r), super::now_ms());
    tracing::info!(range_id = l.get(), source_range_id = r.get(), "merge queued");
    Ok(AdminMergeResponse { merged: None })
}

/// Starts a move operator: learner on `to`, promotion, leader transfer if `from` leads,
/// removal of `from`. Answers once started; `skvctl operators` shows its progress.
pub(super) async fn move_replica(
    s: &Arc<Shared>,
    req: AdminMoveReplicaRequest,
) -> PlacementResult<AdminMoveReplicaResponse> {
    let range_id = RangeId(req.range_id);
    let (from, to) = (StoreId(req.from_store_id), StoreId(req.to_store_id));
    if from == to {
        return Err(PlacementError::invalid("from and to are the same store"));
    }
    let rec = s
        .meta
        .range_by_id(range_id)
        .await?
        .ok_or(PlacementError::RangeNotFound { range_id })?;
    let desc = crate::model::Descriptor::try_from(rec.desc())?;
    if !desc.has_replica_on(from) {
        return Err(PlacementError::NotAReplica {
            range_id,
            store_id: from,
        });
    }
    if desc.has_replica_on(to) {
        return Err(PlacementError::invalid(format!(
            "store {to} already holds range {range_id}"
        )));
    }
    let stores = s.current_stores().await?;
    let target = stores
        .iter()
        .find(|x| StoreId(x.store_id) == to)
        .ok_or(PlacementError::StoreNotFound { store_id: to })?;
    if target.state() != StoreState::Up {
        return Err(PlacementError::StoreUnavailable {
            store_id: to,
            address: target.address.clone(),
            reason: format!("it is {:?}, not UP", target.state()),
        });
    }
    let leader = rec.leader().ok_or_else(|| PlacementError::RangeUnavailable {
        range_id,
        reason: "its leader is not known yet".into(),
        retry_after: Duration::from_millis(500),
    })?;
    let op = Operator::MoveReplica {
        desc,
        leader,
        from,
        to,
        reason: Reason::Admin,
    };
    super::operators::launch(s, op, "admin", stores, s.cancel.child_token())?;
    Ok(AdminMoveReplicaResponse {})
}

/// Marks a store DRAINING in its stored record (so it survives a placement failover); the
/// scheduler moves its leaders, then its replicas, away. `GetStores`/`skvctl stores` show
/// it drained once it holds none.
pub(super) async fn drain_store(s: &Shared, req: AdminDrainStoreRequest) -> PlacementResult<AdminDrainStoreResponse> {
    let store_id = StoreId(req.store_id);
    let mut info = s
        .meta
        .get_store(store_id)
        .await?
        .ok_or(PlacementError::StoreNotFound { store_id })?;
    if info.state() == StoreState::Removed {
        return Err(PlacementError::StoreRemoved { store_id });
    }
    if let Some(m) = s.mem.lock().stores.get(&store_id)
        && m.last_heartbeat_ms >= info.last_heartbeat_ms
    {
        info = m.clone();
    }
    info.set_state(StoreState::Draining);
    s.meta.put_store(&info).await?;
    s.mem.lock().stores.insert(store_id, info);
    tracing::info!(store_id = store_id.get(), "store draining");
    Ok(AdminDrainStoreResponse {})
}

pub(super) async fn set_scheduler_paused(
    s: &Shared,
    req: SetSchedulerPausedRequest,
) -> PlacementResult<SetSchedulerPausedResponse> {
    let paused = req.paused;
    let key = s.meta.layout.scheduler_paused();
    s.meta
        .store
        .txn(Txn::new().and_then([Op::put(key, if paused { "1" } else { "0" })]))
        .await?;
    s.paused.store(paused, Ordering::Release);
    tracing::info!(paused, "scheduler pause changed");
    Ok(SetSchedulerPausedResponse {})
}

/// How long an admin call waits for a range's leader to be known before refusing.
const LEADER_WAIT: Duration = Duration::from_secs(3);

impl Shared {
    /// The stored descriptor of a range, its leader and the leader's address (waiting up to
    /// [`LEADER_WAIT`] for the leader to be known).
    pub(super) async fn range_and_leader(
        &self,
        range_id: RangeId,
    ) -> PlacementResult<(RangeDescriptor, StoreId, String)> {
        // A range just created (the first one of a new cluster, a split's right half) has
        // no leader in the map until its first range heartbeat (about a second): wait for it
        // a little rather than refusing the admin call at once.
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let rec = loop {
            let rec = self
                .meta
                .range_by_id(range_id)
                .await?
                .ok_or(PlacementError::RangeNotFound { range_id })?;
            if rec.leader().is_some() || tokio::time::Instant::now() >= deadline {
                break rec;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let desc = rec.desc().clone();
        let leader = rec.leader().ok_or_else(|| PlacementError::RangeUnavailable {
            range_id,
            reason: "its leader is not known yet".into(),
            retry_after: Duration::from_millis(500),
        })?;
        let address = self
            .meta
            .get_store(leader)
            .await?
            .map(|s| s.address)
            .unwrap_or_default();
        if address.is_empty() {
            return Err(PlacementError::StoreUnavailable {
                store_id: leader,
                address,
                reason: "its address is not known".into(),
            });
        }
        Ok((desc, leader, address))
    }

    /// Folds a storenode's routing error into the map; returns how long to wait before retrying.
    pub(super) async fn absorb_routing_error(&self, desc: &RangeDescriptor, re: &RoutingError) -> Duration {
        // Best effort: a failed update leaves the map as it was, and the retry meets the same
        // routing error again.
        match &re.kind {
            Some(RoutingKind::NotLeader(nl)) => {
                if let Some(leader) = store_opt(nl.leader_store_id) {
                    let _ = self
                        .apply(&[Incoming {
                            desc: desc.clone(),
                            leader: Some(leader),
                            leader_term: None,
                        }])
                        .await;
                }
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
            }
            _ => {}
        }
        routing_retry_delay(re)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn re(kind: Option<RoutingKind>) -> RoutingError {
        RoutingError {
            message: "m".into(),
            kind,
        }
    }

    fn not_leader(leader: u64) -> Option<RoutingKind> {
        Some(RoutingKind::NotLeader(NotLeader {
            range_id: 1,
            leader_store_id: leader,
            leader_address: String::new(),
        }))
    }

    fn busy(ms: u64) -> Option<RoutingKind> {
        Some(RoutingKind::ServerBusy(ServerBusy { retry_after_ms: ms }))
    }

    #[test]
    fn retry_delay_after_routing_errors() {
        // (routing error, delay ms)
        let table = [
            (not_leader(3), 50),
            (not_leader(0), 300),
            (Some(RoutingKind::EpochNotMatch(EpochNotMatch { current: vec![] })), 50),
            (busy(700), 700),
            (busy(0), 10),
            (busy(60_000), 2000),
            (Some(RoutingKind::RangeNotFound(RangeNotFound { range_id: 1 })), 300),
            (None, 300),
        ];
        for (kind, ms) in table {
            let e = re(kind);
            assert_eq!(routing_retry_delay(&e), Duration::from_millis(ms), "{e:?}");
        }
    }

    #[test]
    fn exhausted_admin_attempts_map_to_codes() {
        let epoch = Some(RoutingKind::EpochNotMatch(EpochNotMatch { current: vec![] }));
        let key = Some(RoutingKind::KeyNotInRange(KeyNotInRange::default()));
        let gone = Some(RoutingKind::RangeNotFound(RangeNotFound { range_id: 1 }));
        // (last routing error, code, retry after ms)
        let table = [
            (Some(re(epoch)), ErrorCode::EpochNotMatch, None),
            (Some(re(key)), ErrorCode::EpochNotMatch, None),
            (Some(re(busy(800))), ErrorCode::RangeUnavailable, Some(800)),
            (Some(re(not_leader(2))), ErrorCode::RangeUnavailable, Some(300)),
            (Some(re(gone)), ErrorCode::RangeUnavailable, Some(300)),
            (None, ErrorCode::RangeUnavailable, Some(300)),
        ];
        for (last, code, retry) in table {
            let e = exhausted(RangeId(4), "split", last.as_ref());
            assert_eq!(e.code(), code, "{last:?}");
            assert_eq!(e.retry_after().map(|d| d.as_millis() as u64), retry, "{last:?}");
        }
    }
}
