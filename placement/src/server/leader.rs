//! The leader's loop: store liveness bookkeeping, the scheduler tick, operator execution
//! and metadata compaction.

use super::operators::{self, SIBLINGS_KEEP_MS};
use super::{COMPACT_EVERY_MS, COMPACT_KEEP_REVISIONS, LeaderMem, Shared, now_ms};
use crate::Config;
use crate::metrics::Metrics;
use crate::model::{Range, Store, StoreState};
use crate::scheduler::{self, SchedulerConfig};
use skv_common::ids::{RangeId, StoreId};
use skv_proto::internal::StoreInfo;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the leader's duties whenever this instance leads.
pub(super) async fn leader_loop(s: Arc<Shared>) {
    let mut rx = s.state.clone();
    loop {
        while !rx.borrow_and_update().is_leader {
            tokio::select! {
                _ = s.cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
        let term = s.cancel.child_token();
        *s.mem.lock() = LeaderMem {
            leader_since_ms: now_ms(),
            ..Default::default()
        };
        *s.ids.lock().await = (0, 0);
        match s.meta.store.get(&s.meta.layout.scheduler_paused()).await {
            Ok(v) => s.paused.store(v.is_some_and(|kv| kv.value == b"1"), Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "cannot read the scheduler pause flag"),
        }
        s.metrics.is_leader.set(1);
        // Backups and a restore left by a gone leader (ADR 0028), swept while this term lasts.
        if s.objects.is_some() {
            let (s2, t2) = (s.clone(), term.clone());
            tokio::spawn(async move {
                loop {
                    if let Err(e) = super::backup::sweep(&s2).await {
                        tracing::warn!(error = %e, "backup sweep failed");
                    }
                    tokio::select! {
                        _ = t2.cancelled() => return,
                        _ = tokio::time::sleep(super::backup::SWEEP_EVERY) => {}
                    }
                }
            });
        }
        let mut tick = tokio::time::interval(Duration::from_millis(s.config.schedule_interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = s.cancel.cancelled() => break,
                r = rx.changed() => {
                    if r.is_err() || !rx.borrow_and_update().is_leader {
                        break;
                    }
                }
                _ = tick.tick() => tick_once(&s, &term).await,
            }
        }
        term.cancel();
        s.metrics.is_leader.set(0);
        if s.cancel.is_cancelled() {
            return;
        }
    }
}

/// How long a merge an operator asked for is pursued.
const FORCED_MERGE_KEEP_MS: u64 = 10 * 60 * 1000;
/// "Load on one key" is logged at most this often per range.
const SKIP_LOG_EVERY_MS: u64 = 60_000;

/// Scheduler tunables from the flags. A placed range whose leader stays silent for
/// 20 ticks (10 s at the default 500 ms tick; at least 1 s) gets `CreateReplica` again.
pub fn scheduler_config(config: &Config) -> SchedulerConfig {
    SchedulerConfig {
        initial_wait_ms: config.initial_wait_ms,
        leaderless_resend_ms: config.schedule_interval_ms.saturating_mul(20).max(1000),
        split_size_bytes: config.split_size_bytes,
        split_qps_threshold: config.split_qps_threshold as f64,
        split_qps_window_ms: config.split_qps_window_ms(),
        split_min_idle_millicpus: config.split_min_idle_millicpus(),
        merge_size_bytes: config.merge_size_bytes,
        merge_cooldown_ms: config.merge_cooldown_secs.saturating_mul(1000),
        repair_after_ms: config.repair_after_secs.saturating_mul(1000),
        store_down_after_ms: config.store_down_after_ms,
        max_snapshots_per_store: config.max_snapshots_per_store,
        ..Default::default()
    }
}

/// The scheduler's view of the stores and ranges read this tick. A record that does not
/// convert (an unknown enum value from a newer version, a corrupt record) is left out, so
/// the scheduler never acts on what it cannot read.
fn domain_view(stores: &[StoreInfo], ranges: &[crate::rangemap::StoredRange]) -> (Vec<Store>, Vec<Range>) {
    let stores = stores
        .iter()
        .filter_map(|st| match Store::try_from(st) {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!(store_id = st.store_id, error = %e, "scheduler: store record skipped");
                None
            }
        })
        .collect();
    let ranges = ranges
        .iter()
        .filter_map(|r| match Range::try_from(&r.info) {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!(range_id = r.range_id().get(), error = %e, "scheduler: range record skipped");
                None
            }
        })
        .collect();
    (stores, ranges)
}

/// One scheduler tick on the leader.
async fn tick_once(s: &Arc<Shared>, term: &CancellationToken) {
    let started = std::time::Instant::now();
    s.metrics.scheduler_ticks.inc();
    tick_inner(s, term).await;
    s.metrics
        .scheduler_tick_seconds
        .observe(started.elapsed().as_secs_f64());
}

async fn tick_inner(s: &Arc<Shared>, term: &CancellationToken) {
    let now = now_ms();
    let ranges = match s.meta.all_ranges().await {
        Ok((r, rev)) => {
            maybe_compact(s, now, rev).await;
            r
        }
        Err(e) => {
            tracing::warn!(code = %e.code(), error = %e, "scheduler: cannot read the range map");
            return;
        }
    };
    let stores = match s.current_stores().await {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!(code = %e.code(), error = %e, "scheduler: cannot read stores");
            return;
        }
    };
    s.metrics.ranges.set(ranges.len() as i64);
    let (domain_stores, domain_ranges) = domain_view(&stores, &ranges);
    let health = scheduler::health::range_health(&domain_stores, &domain_ranges);
    s.metrics.ranges_under_replicated.set(health.under_replicated as i64);
    s.metrics.ranges_leaderless.set(health.leaderless as i64);
    for state in [
        StoreState::Up,
        StoreState::Down,
        StoreState::Draining,
        StoreState::Removed,
    ] {
        let n = domain_stores.iter().filter(|x| x.state == state).count();
        let label = match state {
            StoreState::Up => "up",
            StoreState::Down => "down",
            StoreState::Draining => "draining",
            StoreState::Removed => "removed",
        };
        s.metrics
            .stores
            .get_or_create(&Metrics::label("state", label))
            .set(n as i64);
    }
    let cfg = scheduler_config(&s.config);
    let window_ms = cfg.split_qps_window_ms.max(1000);
    let snap = {
        let mut mem = s.mem.lock();
        mem.map_cache = Arc::new(ranges.iter().map(|r| r.desc().clone()).collect());
        mem.busy_until.retain(|_, until| *until > now);
        let live: std::collections::HashSet<RangeId> = domain_ranges.iter().map(|r| r.desc.id).collect();
        mem.load.retain(|id| live.contains(&id));
        mem.last_split
            .retain(|id, at| live.contains(id) && now.saturating_sub(*at) < 24 * 3_600_000);
        mem.siblings
            .retain(|r, (l, at)| live.contains(r) && live.contains(l) && now.saturating_sub(*at) < SIBLINGS_KEEP_MS);
        mem.forced_merges.retain(|(l, r), at| {
            live.contains(l) && live.contains(r) && now.saturating_sub(*at) < FORCED_MERGE_KEEP_MS
        });
        mem.failures.retain(|id, _| live.contains(id));
        // Fed by heartbeats naming any range id (a merged-away range, a misbehaving store):
        // kept only for ranges in the map (a range made since this tick's read re-enters
        // with its next heartbeat).
        mem.leader_seen.retain(|id, _| live.contains(id));
        mem.leader_term.retain(|id, _| live.contains(id));
        mem.last_applied.retain(|id, _| live.contains(id));
        mem.skip_logged.retain(|id, _| live.contains(id));
        for st in &domain_stores {
            if st.state == StoreState::Up {
                mem.up_since.entry(st.id).or_insert(now);
            } else {
                mem.up_since.remove(&st.id);
            }
        }
        let mut busy: std::collections::HashSet<RangeId> = mem.busy_until.keys().copied().collect();
        let mut snapshots: HashMap<StoreId, usize> = HashMap::new();
        for (id, f) in &mem.inflight {
            busy.insert(*id);
            busy.extend(f.also.iter().copied());
            if let Some(t) = f.snapshot_target {
                *snapshots.entry(t).or_default() += 1;
            }
        }
        scheduler::Snapshot {
            now_ms: now,
            stores: domain_stores,
            ranges: domain_ranges,
            store_up_since_ms: mem.up_since.clone(),
            store_last_heartbeat_ms: stores
                .iter()
                .map(|x| (StoreId(x.store_id), x.last_heartbeat_ms))
                .collect(),
            leader_seen_ms: mem.leader_seen.clone(),
            leader_since_ms: mem.leader_since_ms,
            busy,
            load: mem.load.view(now, window_ms),
            last_split_ms: mem.last_split.clone(),
            load_split_siblings: mem.siblings.iter().map(|(r, (l, _))| (*r, *l)).collect(),
            snapshots_in_flight: snapshots,
            forced_merges: mem.forced_merges.keys().copied().collect(),
        }
    };
    let mut plan = scheduler::plan(&cfg, &snap);
    s.mem.lock().drained = plan.drained.clone();
    if s.paused.load(Ordering::Acquire) {
        // Paused: only what an operator asked for (merges) goes on.
        plan.ops.retain(|op| {
            matches!(op, scheduler::Operator::Merge { forced: true, .. })
                || op
                    .range_ids()
                    .iter()
                    .any(|id| snap.forced_merges.iter().any(|(l, r)| l == id || r == id))
        });
        plan.split_skipped.clear();
    }
    for (range_id, reason) in &plan.split_skipped {
        s.metrics
            .split_skipped
            .get_or_create(&Metrics::label("reason", reason))
            .inc();
        let mut mem = s.mem.lock();
        let last = mem.skip_logged.get(range_id).copied().unwrap_or(0);
        if now.saturating_sub(last) >= SKIP_LOG_EVERY_MS {
            mem.skip_logged.insert(*range_id, now);
            let why = if *reason == scheduler::SKIP_NO_IDLE_CPU {
                "no store's machine has idle CPU for half of its load"
            } else {
                "its load is on one key"
            };
            tracing::info!(range_id = range_id.get(), reason, "hot range not split: {why}");
        }
    }
    for op in plan.ops {
        let range_id = op.range_id();
        if let Err(e) = operators::launch(s, op, "scheduler", stores.clone(), term.clone()) {
            tracing::debug!(range_id = range_id.get(), code = %e.code(), error = %e, "operator not started");
        }
    }
}

/// Keeps the metadata store's history bounded: every [`COMPACT_EVERY_MS`], the leader
/// compacts to [`COMPACT_KEEP_REVISIONS`] below the current revision.
async fn maybe_compact(s: &Shared, now: u64, revision: i64) {
    {
        let mut mem = s.mem.lock();
        if mem.last_compact_ms == 0 {
            mem.last_compact_ms = now;
        }
        if now.saturating_sub(mem.last_compact_ms) < COMPACT_EVERY_MS {
            return;
        }
        mem.last_compact_ms = now;
    }
    let target = revision - COMPACT_KEEP_REVISIONS;
    if target > 0 {
        match s.meta.store.compact(target).await {
            Ok(()) => tracing::debug!(revision = target, "metadata history compacted"),
            Err(e) => tracing::warn!(error = %e, "metadata compaction failed"),
        }
    }
}
