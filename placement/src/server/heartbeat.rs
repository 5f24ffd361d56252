//! Store registration, store and range heartbeats (load statistics, stale replicas), and
//! split and merge reports.

use super::{Shared, now_ms};
use crate::cluster::ApplyOutcome;
use crate::error::{PlacementError, PlacementResult};
use crate::metrics::Metrics;
use crate::model::{effective, store_opt, store_raw};
use crate::rangemap::Incoming;
use skv_common::ids::{RangeId, StoreId};
use skv_proto::internal::*;
use tracing::Instrument;

pub(super) async fn register_store(s: &Shared, req: RegisterStoreRequest) -> PlacementResult<RegisterStoreResponse> {
    if req.address.is_empty() {
        return Err(PlacementError::invalid("address is empty"));
    }
    let id = match store_opt(req.store_id) {
        Some(id) => id,
        None => StoreId(s.alloc_ids(1).await?),
    };
    let span = tracing::info_span!("register_store", store_id = id.get());
    async move {
        let existing = s.meta.get_store(id).await?;
        let mut info = existing.clone().unwrap_or_default();
        if info.state() == StoreState::Removed {
            return Err(PlacementError::StoreRemoved { store_id: id });
        }
        if info.state() != StoreState::Draining {
            info.set_state(StoreState::Up);
        }
        let now = now_ms();
        info.store_id = id.get();
        info.address = req.address;
        info.metrics_address = req.metrics_address;
        info.capacity_bytes = req.capacity_bytes;
        info.last_heartbeat_ms = now;
        s.meta.put_store(&info).await?;
        {
            let mut mem = s.mem.lock();
            mem.up_since.entry(id).or_insert(now);
            mem.persisted_ms.insert(id, now);
            mem.stores.insert(id, info.clone());
        }
        tracing::info!(address = %info.address, new = existing.is_none(), "store registered");
        Ok(RegisterStoreResponse {
            store_id: id.get(),
            cluster_id: s.cluster_id.clone(),
        })
    }
    .instrument(span)
    .await
}

pub(super) async fn store_heartbeat(s: &Shared, req: StoreHeartbeatRequest) -> PlacementResult<StoreHeartbeatResponse> {
    let hb = req.store.ok_or_else(|| PlacementError::invalid("store is missing"))?;
    let id = store_opt(hb.store_id).ok_or_else(|| PlacementError::invalid("store_id is 0"))?;
    s.metrics
        .heartbeats
        .get_or_create(&Metrics::label("kind", "store"))
        .inc();
    let known = s.mem.lock().stores.get(&id).cloned();
    let known = match known {
        Some(k) => k,
        None => s
            .meta
            .get_store(id)
            .await?
            .ok_or(PlacementError::StoreNotFound { store_id: id })?,
    };
    if known.state() == StoreState::Removed {
        return Err(PlacementError::StoreRemoved { store_id: id });
    }
    let now = now_ms();
    let was_down = effective(known.clone(), now, s.config.store_down_after_ms).state() == StoreState::Down;
    let mut info = known.clone();
    if !hb.address.is_empty() {
        info.address = hb.address;
    }
    if !hb.metrics_address.is_empty() {
        info.metrics_address = hb.metrics_address;
    }
    info.capacity_bytes = hb.capacity_bytes;
    info.used_bytes = hb.used_bytes;
    info.available_bytes = hb.available_bytes;
    info.cpu_permille = hb.cpu_permille;
    info.host_idle_millicpus = hb.host_idle_millicpus;
    info.range_count = hb.range_count;
    info.leader_count = hb.leader_count;
    info.last_heartbeat_ms = now;
    if info.state() == StoreState::Down {
        info.set_state(StoreState::Up);
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
        s.meta.put_store(&info).await?;
        s.mem.lock().persisted_ms.insert(id, now);
        if was_down {
            tracing::info!(store_id = id.get(), "store is up again");
        }
    }
    let stale = if req.replicas.is_empty() {
        Vec::new()
    } else {
        s.stale_replicas(id, &req.replicas).await
    };
    Ok(StoreHeartbeatResponse {
        stores: s.current_stores().await?,
        stale,
    })
}

pub(super) async fn range_heartbeat(s: &Shared, req: RangeHeartbeatRequest) -> PlacementResult<RangeHeartbeatResponse> {
    let now = now_ms();
    let from_store = StoreId(req.store_id);
    for report in req.ranges {
        s.metrics
            .heartbeats
            .get_or_create(&Metrics::label("kind", "range"))
            .inc();
        let Some(desc) = report.descriptor else { continue };
        let range_id = RangeId(desc.range_id);
        if let Some(load) = &report.load {
            let version = desc.epoch.map_or(0, |e| e.version);
            let window = s.config.split_qps_window_ms();
            s.mem.lock().load.add(range_id, version, now, window, load);
        }
        let reported_leader = store_opt(report.leader_store_id).unwrap_or(from_store);
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
            leader_store_id: store_raw(leader),
        };
        let applied = (info, report.term);
        if leader.is_some() && s.mem.lock().last_applied.get(&range_id) == Some(&applied) {
            continue;
        }
        let span = tracing::debug_span!("range_heartbeat", range_id = range_id.get(), store_id = req.store_id);
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
                tracing::debug!(
                    range_id = range_id.get(),
                    current = cur.len(),
                    "stale range heartbeat ignored"
                );
            }
            // Handled here: the next heartbeat reports the range again.
            Err(e) => {
                tracing::warn!(range_id = range_id.get(), code = %e.code(), error = %e, "range heartbeat not applied")
            }
        }
    }
    Ok(RangeHeartbeatResponse {})
}

pub(super) async fn report_split(s: &Shared, req: ReportSplitRequest) -> PlacementResult<ReportSplitResponse> {
    let (Some(left), Some(right)) = (req.left, req.right) else {
        return Err(PlacementError::invalid("left and right are required"));
    };
    let leader = store_opt(req.leader_store_id);
    let (left_c, right_c) = (left.clone(), right.clone());
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
    if matches!(out, ApplyOutcome::Applied) {
        s.record_split(&left_c, &right_c);
    }
    tracing::debug!(?out, "split reported");
    Ok(ReportSplitResponse {})
}

pub(super) async fn report_merge(s: &Shared, req: ReportMergeRequest) -> PlacementResult<ReportMergeResponse> {
    let (Some(merged), Some(source)) = (req.merged, req.source) else {
        return Err(PlacementError::invalid("merged and source are required"));
    };
    let span = tracing::info_span!(
        "report_merge",
        range_id = merged.range_id,
        source_range_id = source.range_id,
        store_id = req.leader_store_id
    );
    s.record_merge(merged, &source, store_opt(req.leader_store_id))
        .instrument(span)
        .await?;
    Ok(ReportMergeResponse {})
}

/// Whether `merged` is a valid result of merging `source` into another range: it covers the
/// source's interval, has another id, and a higher version.
fn merge_shape_ok(merged: &RangeDescriptor, source: &RangeDescriptor) -> Result<(), String> {
    if merged.range_id == source.range_id || merged.range_id == 0 || source.range_id == 0 {
        return Err("merged and source must be two different ranges".into());
    }
    let covers_start = merged.start <= source.start;
    let covers_end = merged.end.is_empty() || (!source.end.is_empty() && source.end <= merged.end);
    if !covers_start || !covers_end {
        return Err(format!(
            "range {} does not cover range {}",
            merged.range_id, source.range_id
        ));
    }
    let (mv, sv) = (
        merged.epoch.map_or(0, |e| e.version),
        source.epoch.map_or(0, |e| e.version),
    );
    if mv <= sv {
        return Err(format!("merged version {mv} is not above the source's {sv}"));
    }
    Ok(())
}

impl Shared {
    /// Remembers when the halves of a split were made (merge cooldown, no re-split within
    /// the window).
    pub(super) fn record_split(&self, left: &RangeDescriptor, right: &RangeDescriptor) {
        let now = now_ms();
        let mut mem = self.mem.lock();
        mem.last_split.insert(RangeId(left.range_id), now);
        mem.last_split.insert(RangeId(right.range_id), now);
    }

    /// Replaces the target's and the source's records by the widened target (one guarded
    /// transaction: the merged descriptor overlaps both and must be newer than both), and
    /// forgets the source's statistics. The source's id is retired: its record is deleted,
    /// and a replica of it reported later is named stale ([`crate::rangemap::stale_replicas`]).
    pub(super) async fn record_merge(
        &self,
        merged: RangeDescriptor,
        source: &RangeDescriptor,
        leader: Option<StoreId>,
    ) -> PlacementResult<()> {
        merge_shape_ok(&merged, source).map_err(PlacementError::invalid)?;
        let target = RangeId(merged.range_id);
        let out = self
            .apply(&[Incoming {
                desc: merged,
                leader,
                leader_term: None,
            }])
            .await?;
        match out {
            ApplyOutcome::Stale(cur) => {
                tracing::info!(current = cur.len(), "merge report older than the map; ignored");
            }
            _ => {
                let mut mem = self.mem.lock();
                let src = RangeId(source.range_id);
                mem.load.remove(src);
                mem.load.remove(target);
                mem.last_split.remove(&src);
                mem.siblings.remove(&src);
                mem.siblings.remove(&target);
                mem.forced_merges.retain(|(l, r), _| *l != src && *r != src);
                tracing::info!(source_range_id = src.get(), "merge recorded");
            }
        }
        Ok(())
    }

    /// The stale replicas among those a store reported ([`crate::rangemap::stale_replicas`]),
    /// judged against the map as of the last scheduler tick, or read now if this leader
    /// changed the map since (or just took over). An old map only makes the answer more
    /// conservative.
    async fn stale_replicas(&self, store: StoreId, reported: &[RangeDescriptor]) -> Vec<StaleReplica> {
        let mut map = self.mem.lock().map_cache.clone();
        if map.is_empty() {
            match self.meta.all_ranges().await {
                Ok((r, _)) => {
                    map = std::sync::Arc::new(r.iter().map(|x| x.desc().clone()).collect());
                    self.mem.lock().map_cache = map.clone();
                }
                Err(e) => {
                    tracing::warn!(code = %e.code(), error = %e, "cannot read the range map for stale replicas");
                    return Vec::new();
                }
            }
        }
        // A range with an operator in flight, or one that finished moments ago, may be adding
        // this very store back: the cached map can predate that, and destroying the replica
        // then would wipe a live member. Those ranges are judged on a later heartbeat.
        let now = now_ms();
        let settling: std::collections::HashSet<u64> = {
            let mem = self.mem.lock();
            mem.inflight
                .keys()
                .map(|r| r.get())
                .chain(mem.busy_until.iter().filter(|(_, t)| **t > now).map(|(r, _)| r.get()))
                .collect()
        };
        let out: Vec<StaleReplica> = crate::rangemap::stale_replicas(store, reported, &map)
            .into_iter()
            .filter(|(range_id, current)| !settling.contains(range_id) && !settling.contains(&current.range_id))
            .map(|(range_id, current)| {
                tracing::info!(
                    range_id,
                    store_id = store.get(),
                    current_range_id = current.range_id,
                    "replica named stale"
                );
                StaleReplica {
                    range_id,
                    current: Some(current),
                }
            })
            .collect();
        self.metrics.stale_replicas.inc_by(out.len() as u64);
        out
    }

    pub(super) fn persist_interval_ms(&self) -> u64 {
        (self.config.store_down_after_ms / 5).clamp(100, 5000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64, start: &str, end: &str, version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.into(),
            end: end.into(),
            epoch: Some(RangeEpoch { conf_ver: 1, version }),
            replicas: vec![],
        }
    }

    #[test]
    fn merge_reports_are_checked() {
        assert!(merge_shape_ok(&d(1, "", "z", 5), &d(2, "m", "z", 4)).is_ok());
        assert!(merge_shape_ok(&d(1, "", "", 5), &d(2, "m", "", 4)).is_ok());
        assert!(
            merge_shape_ok(&d(1, "", "z", 4), &d(2, "m", "z", 4)).is_err(),
            "not newer"
        );
        assert!(
            merge_shape_ok(&d(1, "", "n", 5), &d(2, "m", "z", 4)).is_err(),
            "not covered"
        );
        assert!(
            merge_shape_ok(&d(1, "", "z", 5), &d(2, "m", "", 4)).is_err(),
            "not covered"
        );
        assert!(
            merge_shape_ok(&d(2, "", "z", 5), &d(2, "m", "z", 4)).is_err(),
            "same id"
        );
    }
}
