//! Reads of the metadata (GetRange, ScanRanges, GetStores, GetMembers) and ID allocation.

use super::{ID_BLOCK, MAX_ALLOC, Shared, now_ms};
use crate::election;
use crate::error::{PlacementError, PlacementResult};
use skv_common::ids::StoreId;
use skv_proto::internal::*;
use std::collections::{BTreeMap, HashSet};

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

fn window_ms(s: &Shared) -> u64 {
    s.config.split_qps_window_ms()
}

/// Load of every range the leader has statistics for.
pub(super) async fn range_stats(s: &Shared, _req: RangeStatsRequest) -> PlacementResult<RangeStatsResponse> {
    let views = s.mem.lock().load.view(now_ms(), window_ms(s));
    let mut stats: Vec<RangeStats> = views
        .into_iter()
        .map(|(id, v)| RangeStats {
            range_id: id.get(),
            size_bytes: v.size_bytes,
            keys: v.keys,
            read_qps: v.read_qps,
            write_qps: v.write_qps,
            read_bytes_per_sec: v.read_bytes_per_sec,
            write_bytes_per_sec: v.write_bytes_per_sec,
            window_ms: v.window_ms,
        })
        .collect();
    stats.sort_by_key(|x| x.range_id);
    Ok(RangeStatsResponse { stats })
}

/// Replica and leader counts per store from the range map, and whether a DRAINING store is
/// drained.
pub(super) async fn store_status(s: &Shared, _req: StoreStatusRequest) -> PlacementResult<StoreStatusResponse> {
    let (ranges, _) = s.meta.all_ranges().await?;
    let stores = s.current_stores().await?;
    let views = s.mem.lock().load.view(now_ms(), window_ms(s));
    let mut by: BTreeMap<u64, StoreStatus> = stores
        .iter()
        .map(|x| {
            (
                x.store_id,
                StoreStatus {
                    store_id: x.store_id,
                    ..Default::default()
                },
            )
        })
        .collect();
    for r in &ranges {
        for rep in &r.desc().replicas {
            by.entry(rep.store_id).or_default().replicas += 1;
        }
        if let Some(l) = r.leader() {
            let e = by.entry(l.get()).or_default();
            e.leaders += 1;
            e.leader_qps += views.get(&r.range_id()).map_or(0.0, |v| v.qps());
        }
    }
    for x in &stores {
        if let Some(e) = by.get_mut(&x.store_id) {
            e.drained = x.state() == StoreState::Draining && e.replicas == 0;
        }
    }
    Ok(StoreStatusResponse {
        stores: by
            .into_iter()
            .map(|(id, mut v)| {
                v.store_id = id;
                v
            })
            .collect(),
    })
}

/// The operators in flight.
pub(super) async fn list_operators(s: &Shared, _req: ListOperatorsRequest) -> PlacementResult<ListOperatorsResponse> {
    let mem = s.mem.lock();
    let mut operators: Vec<OperatorInfo> = mem.inflight.iter().map(|(id, f)| f.to_proto(*id)).collect();
    operators.sort_by_key(|o| (o.started_ms, o.range_id));
    Ok(ListOperatorsResponse { operators })
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
