//! Reads of the metadata (GetRange, ScanRanges, GetStores, GetMembers) and ID allocation.

use super::{ID_BLOCK, MAX_ALLOC, Shared};
use crate::election;
use crate::error::{PlacementError, PlacementResult};
use skv_common::ids::StoreId;
use skv_proto::internal::*;
use std::collections::HashSet;

pub(super) async fn get_range(s: &Shared, req: GetRangeRequest) -> PlacementResult<GetRangeResponse> {
    let rec = s.meta.lookup(&req.key).await?.ok_or(PlacementError::KeyNotCovered)?;
    let ids: HashSet<StoreId> = rec.desc().replicas.iter().map(|r| StoreId(r.store_id)).collect();
    let stores = s
        .current_stores()
        .await?
        .into_iter()
        .filter(|s| ids.contains(&StoreId(s.store_id)))
        .collect();
    Ok(GetRangeResponse {
        range: Some(rec.info),
        stores,
    })
}

pub(super) async fn scan_ranges(s: &Shared, req: ScanRangesRequest) -> PlacementResult<ScanRangesResponse> {
    let ranges = s
        .meta
        .scan(&req.start, &req.end, req.limit as usize)
        .await?
        .into_iter()
        .map(|r| r.info)
        .collect();
    Ok(ScanRangesResponse {
        ranges,
        stores: s.current_stores().await?,
    })
}

pub(super) async fn get_stores(s: &Shared) -> PlacementResult<GetStoresResponse> {
    Ok(GetStoresResponse {
        stores: s.current_stores().await?,
    })
}

pub(super) async fn get_members(s: &Shared) -> PlacementResult<GetMembersResponse> {
    let leader = election::observe_leader(&s.meta.store, &s.meta.layout)
        .await?
        .map(|(m, _)| m);
    let members = election::members(&s.meta.store, &s.meta.layout).await?;
    Ok(GetMembersResponse {
        leader,
        members,
        cluster_id: s.cluster_id.clone(),
    })
}

pub(super) async fn alloc_ids(s: &Shared, req: AllocIdsRequest) -> PlacementResult<AllocIdsResponse> {
    let count = req.count.max(1);
    if count > MAX_ALLOC {
        return Err(PlacementError::invalid(format!("count {count} is above {MAX_ALLOC}")));
    }
    let first = s.alloc_ids(u64::from(count)).await?;
    Ok(AllocIdsResponse { first, count })
}

impl Shared {
    /// `count` ids from the shared RangeId/StoreId allocator (raw: the caller types them).
    pub(super) async fn alloc_ids(&self, count: u64) -> PlacementResult<u64> {
        let mut g = self.ids.lock().await;
        if g.1 - g.0 < count {
            let block = count.max(ID_BLOCK);
            let first = self.meta.reserve_ids(block).await?;
            *g = (first, first + block);
        }
        let first = g.0;
        g.0 += count;
        Ok(first)
    }
}
