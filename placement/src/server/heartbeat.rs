//! Store registration, store and range heartbeats, and split reports.

use super::{Shared, meta_status, now_ms};
use crate::cluster::ApplyOutcome;
use crate::metrics::Metrics;
use crate::rangemap::Incoming;
use skv_proto::internal::*;
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub(super) async fn register_store(
    s: &Shared,
    request: Request<RegisterStoreRequest>,
) -> Result<Response<RegisterStoreResponse>, Status> {
    let req = request.into_inner();
    if req.address.is_empty() {
        return Err(Status::invalid_argument("address is empty"));
    }
    let id = if req.store_id == 0 {
        s.alloc_ids(1).await?
    } else {
        req.store_id
    };
    let span = tracing::info_span!("register_store", store_id = id);
    async move {
        let existing = s.meta.get_store(id).await.map_err(meta_status)?;
        let mut info = existing.clone().unwrap_or_default();
        if info.state == StoreState::Removed as i32 {
            return Err(Status::failed_precondition(format!(
                "store {id} was removed from the cluster"
            )));
        }
        if info.state != StoreState::Draining as i32 {
            info.state = StoreState::Up as i32;
        }
        let now = now_ms();
        info.store_id = id;
        info.address = req.address;
        info.metrics_address = req.metrics_address;
        info.capacity_bytes = req.capacity_bytes;
        info.last_heartbeat_ms = now;
        s.meta.put_store(&info).await.map_err(meta_status)?;
        {
            let mut mem = s.mem.lock();
            mem.up_since.entry(id).or_insert(now);
            mem.persisted_ms.insert(id, now);
            mem.stores.insert(id, info.clone());
        }
        tracing::info!(address = %info.address, new = existing.is_none(), "store registered");
        Ok(Response::new(RegisterStoreResponse {
            store_id: id,
            cluster_id: s.cluster_id.clone(),
        }))
    }
    .instrument(span)
    .await
}

pub(super) async fn store_heartbeat(
    s: &Shared,
    request: Request<StoreHeartbeatRequest>,
) -> Result<Response<StoreHeartbeatResponse>, Status> {
    let hb = request
        .into_inner()
        .store
        .ok_or_else(|| Status::invalid_argument("store is missing"))?;
    if hb.store_id == 0 {
        return Err(Status::invalid_argument("store_id is 0"));
    }
    s.metrics
        .heartbeats
        .get_or_create(&Metrics::label("kind", "store"))
        .inc();
    let id = hb.store_id;
    let known = s.mem.lock().stores.get(&id).cloned();
    let known = match known {
        Some(k) => k,
        None => s
            .meta
            .get_store(id)
            .await
            .map_err(meta_status)?
            .ok_or_else(|| Status::failed_precondition(format!("unknown store {id}; call RegisterStore first")))?,
    };
    if known.state == StoreState::Removed as i32 {
        return Err(Status::failed_precondition(format!(
            "store {id} was removed from the cluster"
        )));
    }
    let now = now_ms();
    let was_down = s.effective(known.clone(), now).state == StoreState::Down as i32;
    let mut info = known.clone();
    if !hb.address.is_empty() {
        info.address = hb.address;
    }
    if !hb.metrics_address.is_empty() {
        info.metrics_address = hb.metrics_address;
    }
    info.capacity_bytes = hb.capacity_bytes;
    info.used_bytes = hb.used_bytes;
    info.range_count = hb.range_count;
    info.leader_count = hb.leader_count;
    info.last_heartbeat_ms = now;
    if info.state == StoreState::Down as i32 {
        info.state = StoreState::Up as i32;
    }
    let persist = {
        let mut mem = s.mem.lock();
        if was_down || !mem.up_since.contains_key(&id) {
            mem.up_since.insert(id, now);
        }
        mem.stores.insert(id, info.clone());
        let last = mem.persisted_ms.get(&id).copied().unwrap_or(0);
        was_down
            || info.address != known.address
            || info.state != known.state
            || now.saturating_sub(last) >= s.persist_interval_ms()
    };
    if persist {
        s.meta.put_store(&info).await.map_err(meta_status)?;
        s.mem.lock().persisted_ms.insert(id, now);
        if was_down {
            tracing::info!(store_id = id, "store is up again");
        }
    }
    Ok(Response::new(StoreHeartbeatResponse {
        stores: s.current_stores().await?,
    }))
}

pub(super) async fn range_heartbeat(
    s: &Shared,
    request: Request<RangeHeartbeatRequest>,
) -> Result<Response<RangeHeartbeatResponse>, Status> {
    let req = request.into_inner();
    let now = now_ms();
    for report in req.ranges {
        s.metrics
            .heartbeats
            .get_or_create(&Metrics::label("kind", "range"))
            .inc();
        let Some(desc) = report.descriptor else { continue };
        let range_id = desc.range_id;
        let reported_leader = if report.leader_store_id != 0 {
            report.leader_store_id
        } else {
            req.store_id
        };
        let leader = {
            let mut mem = s.mem.lock();
            let known_term = mem.leader_term.get(&range_id).copied().unwrap_or(0);
            if report.term >= known_term {
                mem.leader_term.insert(range_id, report.term);
                mem.leader_seen.insert(range_id, now);
                Some(reported_leader)
            } else {
                None
            }
        };
        let info = RangeInfo {
            descriptor: Some(desc.clone()),
            leader_store_id: leader.unwrap_or(0),
        };
        let applied = (info, report.term);
        if leader.is_some() && s.mem.lock().last_applied.get(&range_id) == Some(&applied) {
            continue;
        }
        let span = tracing::debug_span!("range_heartbeat", range_id, store_id = req.store_id);
        let inc = Incoming {
            desc,
            leader,
            leader_term: leader.map(|_| report.term),
        };
        match s.apply(&[inc]).instrument(span).await {
            Ok(ApplyOutcome::Applied | ApplyOutcome::Unchanged) => {
                if leader.is_some() {
                    s.mem.lock().last_applied.insert(range_id, applied);
                }
            }
            Ok(ApplyOutcome::Stale(cur)) => {
                tracing::debug!(range_id, current = cur.len(), "stale range heartbeat ignored");
            }
            Err(e) => tracing::warn!(range_id, error = %e, "range heartbeat not applied"),
        }
    }
    Ok(Response::new(RangeHeartbeatResponse {}))
}

pub(super) async fn report_split(
    s: &Shared,
    request: Request<ReportSplitRequest>,
) -> Result<Response<ReportSplitResponse>, Status> {
    let req = request.into_inner();
    let (Some(left), Some(right)) = (req.left, req.right) else {
        return Err(Status::invalid_argument("left and right are required"));
    };
    let leader = (req.leader_store_id != 0).then_some(req.leader_store_id);
    let span = tracing::info_span!("report_split", range_id = left.range_id, new_range_id = right.range_id);
    let out = s
        .apply(&[
            Incoming {
                desc: left,
                leader,
                leader_term: None,
            },
            Incoming {
                desc: right,
                leader,
                leader_term: None,
            },
        ])
        .instrument(span)
        .await?;
    tracing::debug!(?out, "split reported");
    Ok(Response::new(ReportSplitResponse {}))
}

impl Shared {
    pub(super) fn persist_interval_ms(&self) -> u64 {
        (self.config.store_down_after_ms / 5).clamp(100, 5000)
    }
}
