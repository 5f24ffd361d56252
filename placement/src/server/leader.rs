//! The leader's loop: store liveness bookkeeping, the scheduler tick, operator execution
//! and metadata compaction.

use super::admin::{routing_refusal, store_call_failed};
use super::{COMPACT_EVERY_MS, COMPACT_KEEP_REVISIONS, LeaderMem, Shared, now_ms};
use crate::Config;
use crate::error::{PlacementError, PlacementResult};
use crate::metrics::Metrics;
use crate::model::{Descriptor, Range, Store, StoreState};
use crate::rangemap::Incoming;
use crate::scheduler::{self, Operator, SchedulerConfig};
use skv_common::ids::StoreId;
use skv_proto::internal::{
    ChangeReplicasRequest, CreateReplicaRequest, ReplicaChange, RequestHeader, StoreInfo, replica_change,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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

/// Scheduler tunables from the flags. A placed range whose leader stays silent for
/// 20 ticks (10 s at the default 500 ms tick; at least 1 s) gets `CreateReplica` again.
pub fn scheduler_config(config: &Config) -> SchedulerConfig {
    SchedulerConfig {
        initial_wait_ms: config.initial_wait_ms,
        leaderless_resend_ms: config.schedule_interval_ms.saturating_mul(20).max(1000),
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
    let up = domain_stores.iter().filter(|x| x.state == StoreState::Up).count();
    s.metrics
        .stores
        .get_or_create(&Metrics::label("state", "up"))
        .set(up as i64);
    s.metrics
        .stores
        .get_or_create(&Metrics::label("state", "down"))
        .set((stores.len() - up) as i64);
    if s.paused.load(Ordering::Acquire) {
        return;
    }
    let snap = {
        let mut mem = s.mem.lock();
        mem.busy_until.retain(|_, until| *until > now);
        for st in &domain_stores {
            if st.state == StoreState::Up {
                mem.up_since.entry(st.id).or_insert(now);
            } else {
                mem.up_since.remove(&st.id);
            }
        }
        scheduler::Snapshot {
            now_ms: now,
            stores: domain_stores,
            ranges: domain_ranges,
            store_up_since_ms: mem.up_since.clone(),
            leader_seen_ms: mem.leader_seen.clone(),
            leader_since_ms: mem.leader_since_ms,
            busy: mem.busy_until.keys().copied().collect(),
        }
    };
    let cfg = scheduler_config(&s.config);
    for op in scheduler::schedule(&cfg, &snap) {
        let range_id = op.range_id();
        s.metrics
            .operators
            .get_or_create(&Metrics::label("kind", op.kind()))
            .inc();
        s.mem.lock().busy_until.insert(range_id, now + cfg.leaderless_resend_ms);
        let s2 = s.clone();
        let stores = stores.clone();
        let term = term.clone();
        let span = tracing::info_span!("operator", range_id = range_id.get(), kind = op.kind());
        // After CreateReplica, give the group time to elect and heartbeat before any resend.
        let creates = !matches!(op, Operator::AddVoter { .. });
        let resend_ms = cfg.leaderless_resend_ms;
        tokio::spawn(
            async move {
                let r = tokio::select! {
                    _ = term.cancelled() => return,
                    r = execute(&s2, op, &stores) => r,
                };
                // Handled here: the range cools down, then the scheduler decides again.
                if let Err(e) = &r {
                    tracing::warn!(code = %e.code(), error = %e, "operator failed");
                }
                let settle = match (&r, creates) {
                    (_, true) => resend_ms,
                    (Ok(()), false) => 1000,
                    (Err(_), false) => 3000,
                };
                let mut mem = s2.mem.lock();
                let until = mem.busy_until.entry(range_id).or_default();
                *until = (*until).min(now_ms() + settle);
            }
            .instrument(span),
        );
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

/// The address of `store_id` in the store list (the wire's address book).
fn address_of(stores: &[StoreInfo], store_id: StoreId) -> PlacementResult<String> {
    stores
        .iter()
        .find(|x| StoreId(x.store_id) == store_id && !x.address.is_empty())
        .map(|x| x.address.clone())
        .ok_or_else(|| PlacementError::StoreUnavailable {
            store_id,
            address: String::new(),
            reason: "it has no known address".into(),
        })
}

async fn create_replica(
    s: &Shared,
    stores: &[StoreInfo],
    store_id: StoreId,
    desc: &Descriptor,
    bootstrap: bool,
) -> PlacementResult<()> {
    let address = address_of(stores, store_id)?;
    s.store_client(&address)?
        .create_replica(CreateReplicaRequest {
            descriptor: Some(desc.to_proto()),
            bootstrap,
            stores: stores.to_vec(),
        })
        .await
        .map_err(|e| store_call_failed(store_id, &address, e))?;
    tracing::info!(
        range_id = desc.id.get(),
        store_id = store_id.get(),
        bootstrap,
        "replica created"
    );
    Ok(())
}

/// `CreateReplica` on every replica of `desc`; the first failure is returned, the others
/// are logged.
async fn create_all(s: &Shared, stores: &[StoreInfo], desc: &Descriptor, bootstrap_first: bool) -> PlacementResult<()> {
    let mut first_err = None;
    for (i, r) in desc.replicas.iter().enumerate() {
        if let Err(e) = create_replica(s, stores, r.store, desc, bootstrap_first && i == 0).await {
            if first_err.is_none() {
                first_err = Some(e);
            } else {
                tracing::warn!(store_id = r.store.get(), code = %e.code(), error = %e, "CreateReplica failed");
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Executes one operator.
async fn execute(s: &Shared, op: Operator, stores: &[StoreInfo]) -> PlacementResult<()> {
    match op {
        Operator::InitialPlacement { desc } => {
            if !s.meta.place_initial(&desc).await? {
                tracing::info!(range_id = desc.id.get(), "range changed meanwhile; placement skipped");
                return Ok(());
            }
            tracing::info!(range_id = desc.id.get(), replicas = ?desc.replicas.iter().map(|r| r.store.get()).collect::<Vec<_>>(), "initial placement");
            create_all(s, stores, &desc, true).await
        }
        Operator::ResendCreate { desc, bootstrap_first } => create_all(s, stores, &desc, bootstrap_first).await,
        Operator::AddVoter { desc, leader, target } => {
            create_replica(s, stores, target, &desc, false).await?;
            let address = address_of(stores, leader)?;
            let wire = desc.to_proto();
            let resp = s
                .store_client(&address)?
                .change_replicas(ChangeReplicasRequest {
                    header: Some(RequestHeader {
                        range_id: wire.range_id,
                        epoch: wire.epoch,
                    }),
                    changes: vec![ReplicaChange {
                        store_id: target.get(),
                        kind: replica_change::Kind::AddVoter as i32,
                    }],
                    stores: stores
                        .iter()
                        .filter(|x| StoreId(x.store_id) == target)
                        .cloned()
                        .collect(),
                })
                .await
                .map_err(|e| store_call_failed(leader, &address, e))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                s.absorb_routing_error(&wire, &re).await;
                let reason = format!("ChangeReplicas refused: {}", re.message);
                return Err(routing_refusal(desc.id, reason, Some(&re)));
            }
            if let Some(d) = resp.descriptor {
                s.apply(&[Incoming {
                    desc: d,
                    leader: Some(leader),
                    leader_term: None,
                }])
                .await?;
            }
            tracing::info!(range_id = desc.id.get(), target = target.get(), "voter added");
            Ok(())
        }
    }
}
