//! Reads of the metadata (GetRange, ScanRanges, GetStores, GetMembers) and ID allocation.

use super::{ID_BLOCK, MAX_ALLOC, Shared, meta_status};
use crate::election;
use skv_proto::internal::*;
use std::collections::HashSet;
use tonic::{Request, Response, Status};

pub(super) async fn get_range(
    s: &Shared,
    request: Request<GetRangeRequest>,
) -> Result<Response<GetRangeResponse>, Status> {
    let key = request.into_inner().key;
    let rec = s
        .meta
        .lookup(&key)
        .await
        .map_err(meta_status)?
        .ok_or_else(|| Status::unavailable("no range holds this key yet (the map is catching up); retry"))?;
    let ids: HashSet<u64> = rec.desc().replicas.iter().map(|r| r.store_id).collect();
    let stores = s
        .current_stores()
        .await?
        .into_iter()
        .filter(|s| ids.contains(&s.store_id))
        .collect();
    Ok(Response::new(GetRangeResponse {
        range: Some(rec.info),
        stores,
    }))
}

pub(super) async fn scan_ranges(
    s: &Shared,
    request: Request<ScanRangesRequest>,
) -> Result<Response<ScanRangesResponse>, Status> {
    let req = request.into_inner();
    let ranges = s
        .meta
        .scan(&req.start, &req.end, req.limit as usize)
        .await
        .map_err(meta_status)?
        .into_iter()
        .map(|r| r.info)
        .collect();
    Ok(Response::new(ScanRangesResponse {
        ranges,
        stores: s.current_stores().await?,
    }))
}

pub(super) async fn get_stores(
    s: &Shared,
    _request: Request<GetStoresRequest>,
) -> Result<Response<GetStoresResponse>, Status> {
    Ok(Response::new(GetStoresResponse {
        stores: s.current_stores().await?,
    }))
}

pub(super) async fn get_members(
    s: &Shared,
    _request: Request<GetMembersRequest>,
) -> Result<Response<GetMembersResponse>, Status> {
    let leader = election::observe_leader(&s.meta.store, &s.meta.layout)
        .await
        .map_err(meta_status)?
        .map(|(m, _)| m);
    let members = election::members(&s.meta.store, &s.meta.layout)
        .await
        .map_err(meta_status)?;
    Ok(Response::new(GetMembersResponse {
        leader,
        members,
        cluster_id: s.cluster_id.clone(),
    }))
}

pub(super) async fn alloc_ids(
    s: &Shared,
    request: Request<AllocIdsRequest>,
) -> Result<Response<AllocIdsResponse>, Status> {
    let count = request.into_inner().count.max(1);
    if count > MAX_ALLOC {
        return Err(Status::invalid_argument(format!("count {count} is above {MAX_ALLOC}")));
    }
    let first = s.alloc_ids(u64::from(count)).await?;
    Ok(Response::new(AllocIdsResponse { first, count }))
}

impl Shared {
    pub(super) async fn alloc_ids(&self, count: u64) -> Result<u64, Status> {
        let mut g = self.ids.lock().await;
        if g.1 - g.0 < count {
            let block = count.max(ID_BLOCK);
            let first = self.meta.reserve_ids(block).await.map_err(meta_status)?;
            *g = (first, first + block);
        }
        let first = g.0;
        g.0 += count;
        Ok(first)
    }
}
