//! Operator execution on the leader: a registry of the operators in flight (one per range,
//! with progress, listed by `ListOperators`), a timeout, metrics by kind and result, and the
//! steps of each operator against the storenodes. Every storenode call carries the epoch of
//! the descriptor the previous step returned; a routing error is folded into the range map
//! and ends the operator (the scheduler decides again from the refreshed map).

use super::admin::{routing_refusal, routing_retry_delay, store_call_failed};
use super::{ADMIN_ATTEMPTS, LeaderMem, Shared, now_ms};
use crate::error::{ErrorCode, PlacementError, PlacementResult};
use crate::metrics::Metrics;
use crate::model::{Descriptor, store_opt};
use crate::rangemap::Incoming;
use crate::scheduler::moves::{MOVE_MAX_REFUSALS, MoveStep, newer_or_same, next_move_step, retry_delay_ms};
use crate::scheduler::{Operator, Reason};
use skv_common::ids::{RangeId, StoreId};
use skv_proto::internal::routing_error::Kind as RoutingKind;
use skv_proto::internal::*;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// An operator taking longer than this is abandoned (the range is then re-examined).
pub(super) const OPERATOR_TIMEOUT: Duration = Duration::from_secs(300);
/// Retry backoff of a range whose operator failed: 3 s, doubling, at most 5 min.
const FAIL_BACKOFF_MS: u64 = 3000;
const FAIL_BACKOFF_MAX_MS: u64 = 300_000;
/// How long a finished operator's range is left alone so heartbeats show its effect (and
/// a late heartbeat of a deposed leader cannot trigger a second move): 2.5 storenode
/// heartbeat intervals.
const SETTLE_MS: u64 = 2500;
/// Load-split siblings are kept apart for this long.
pub(super) const SIBLINGS_KEEP_MS: u64 = 30 * 60 * 1000;

/// One operator in flight.
#[derive(Clone, Debug)]
pub(super) struct InFlight {
    pub kind: &'static str,
    pub description: String,
    pub step: u32,
    pub steps: u32,
    pub step_name: &'static str,
    pub started_ms: u64,
    pub origin: &'static str,
    /// Store receiving a learner (snapshot), while that step runs.
    pub snapshot_target: Option<StoreId>,
    /// Other ranges the operator holds (a merge: the right range).
    pub also: Vec<RangeId>,
}

impl InFlight {
    pub fn to_proto(&self, range_id: RangeId) -> OperatorInfo {
        OperatorInfo {
            range_id: range_id.get(),
            kind: self.kind.to_string(),
            description: self.description.clone(),
            step: self.step,
            steps: self.steps,
            step_name: self.step_name.to_string(),
            started_ms: self.started_ms,
            origin: self.origin.to_string(),
        }
    }
}

fn steps_of(op: &Operator) -> (u32, &'static str) {
    match op {
        Operator::InitialPlacement { .. } => (2, "write placement"),
        Operator::AddVoter { .. } => (2, "create replica"),
        Operator::ResendCreate { .. } => (1, "create replicas"),
        Operator::Split { .. } => (2, "split on the leader"),
        Operator::TransferLeader { .. } => (1, "transfer leader"),
        Operator::MoveReplica { .. } => (crate::scheduler::moves::MOVE_STEPS, "create replica"),
        Operator::RemoveReplica { .. } => (1, "remove replica"),
        Operator::Merge { .. } => (2, "merge on the leader"),
    }
}

/// Whether any of `ids` has an operator in flight.
fn held(mem: &LeaderMem, ids: &[RangeId]) -> bool {
    ids.iter()
        .any(|id| mem.inflight.contains_key(id) || mem.inflight.values().any(|f| f.also.contains(id)))
}

/// Result label of a finished operator.
fn result_label(r: &Result<PlacementResult<()>, tokio::time::error::Elapsed>) -> &'static str {
    match r {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) if e.code() == ErrorCode::EpochNotMatch => "epoch_changed",
        Ok(Err(_)) => "failed",
        Err(_) => "timeout",
    }
}

/// Registers `op` and runs it in the background. Refused if one of its ranges already has
/// an operator in flight.
pub(super) fn launch(
    s: &Arc<Shared>,
    op: Operator,
    origin: &'static str,
    stores: Vec<StoreInfo>,
    term: CancellationToken,
) -> PlacementResult<()> {
    let ids = op.range_ids();
    let range_id = op.range_id();
    let kind = op.kind();
    let (steps, first) = steps_of(&op);
    {
        let mut mem = s.mem.lock();
        if held(&mem, &ids) {
            return Err(PlacementError::RangeUnavailable {
                range_id,
                reason: "another operator is in flight on it".into(),
                retry_after: Duration::from_secs(1),
            });
        }
        mem.inflight.insert(
            range_id,
            InFlight {
                kind,
                description: op.describe(),
                step: 1,
                steps,
                step_name: first,
                started_ms: now_ms(),
                origin,
                snapshot_target: None,
                also: ids.iter().copied().filter(|i| *i != range_id).collect(),
            },
        );
    }
    s.metrics
        .operators_in_flight
        .get_or_create(&Metrics::label("kind", kind))
        .inc();
    s.metrics
        .operators_started
        .get_or_create(&Metrics::labels(&[("kind", kind), ("origin", origin)]))
        .inc();
    let store_id = match &op {
        Operator::MoveReplica { to, .. } => to.get(),
        Operator::TransferLeader { to, .. } => to.get(),
        Operator::AddVoter { target, .. } => target.get(),
        Operator::RemoveReplica { store, .. } => store.get(),
        Operator::Split { leader, .. } | Operator::Merge { leader, .. } => leader.get(),
        _ => 0,
    };
    let span = tracing::info_span!(
        "operator",
        range_id = range_id.get(),
        store_id,
        kind,
        reason = op.reason(),
        origin
    );
    tracing::info!(parent: &span, description = %op.describe(), "operator started");
    // After CreateReplica, give the group time to elect and heartbeat before any resend.
    let creates = matches!(op, Operator::InitialPlacement { .. } | Operator::ResendCreate { .. });
    let s2 = s.clone();
    tokio::spawn(
        async move {
            let r = tokio::select! {
                _ = term.cancelled() => {
                    finish(&s2, range_id, &ids, kind, "cancelled", 0);
                    return;
                }
                r = tokio::time::timeout(OPERATOR_TIMEOUT, execute(&s2, op, &stores)) => r,
            };
            let label = result_label(&r);
            let settle = match &r {
                _ if creates => s2.leaderless_resend_ms(),
                Ok(Ok(())) => SETTLE_MS,
                _ => {
                    let n = {
                        let mut mem = s2.mem.lock();
                        let n = mem.failures.entry(range_id).or_default();
                        *n = n.saturating_add(1);
                        *n
                    };
                    FAIL_BACKOFF_MS
                        .saturating_mul(1u64 << (n.saturating_sub(1)).min(10))
                        .min(FAIL_BACKOFF_MAX_MS)
                }
            };
            match &r {
                Ok(Ok(())) => {
                    s2.mem.lock().failures.remove(&range_id);
                    tracing::info!("operator done");
                }
                Ok(Err(e)) => tracing::warn!(code = %e.code(), error = %e, retry_in_ms = settle, "operator failed"),
                Err(_) => tracing::warn!(retry_in_ms = settle, "operator timed out"),
            }
            finish(&s2, range_id, &ids, kind, label, settle);
        }
        .instrument(span),
    );
    Ok(())
}

fn finish(s: &Shared, range_id: RangeId, ids: &[RangeId], kind: &'static str, result: &str, settle_ms: u64) {
    s.metrics
        .operators_in_flight
        .get_or_create(&Metrics::label("kind", kind))
        .dec();
    s.metrics
        .operators
        .get_or_create(&Metrics::labels(&[("kind", kind), ("result", result)]))
        .inc();
    let mut mem = s.mem.lock();
    if let Some(f) = mem.inflight.remove(&range_id) {
        let ms = now_ms().saturating_sub(f.started_ms);
        s.metrics
            .operator_seconds
            .get_or_create(&Metrics::label("kind", kind))
            .observe(ms as f64 / 1000.0);
    }
    let until = now_ms() + settle_ms;
    for id in ids {
        mem.busy_until.insert(*id, until);
    }
}

impl Shared {
    /// Records the step an operator on `range_id` is at.
    fn progress(&self, range_id: RangeId, step: u32, name: &'static str, snapshot_target: Option<StoreId>) {
        if let Some(f) = self.mem.lock().inflight.get_mut(&range_id) {
            f.step = step;
            f.step_name = name;
            f.snapshot_target = snapshot_target;
        }
        tracing::debug!(range_id = range_id.get(), step, name, "operator step");
    }

    pub(super) fn leaderless_resend_ms(&self) -> u64 {
        self.config.schedule_interval_ms.saturating_mul(20).max(1000)
    }
}

/// The address of `store_id` in the store list (the wire's address book).
pub(super) fn address_of(stores: &[StoreInfo], store_id: StoreId) -> PlacementResult<String> {
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

fn header(d: &RangeDescriptor) -> Option<RequestHeader> {
    Some(RequestHeader {
        range_id: d.range_id,
        epoch: d.epoch,
    })
}

async fn create_replica(
    s: &Shared,
    stores: &[StoreInfo],
    store_id: StoreId,
    desc: &RangeDescriptor,
    bootstrap: bool,
) -> PlacementResult<()> {
    let address = address_of(stores, store_id)?;
    s.store_client(&address)?
        .create_replica(CreateReplicaRequest {
            descriptor: Some(desc.clone()),
            bootstrap,
            stores: stores.to_vec(),
        })
        .await
        .map_err(|e| store_call_failed(store_id, &address, e))?;
    tracing::info!(
        range_id = desc.range_id,
        store_id = store_id.get(),
        bootstrap,
        "replica created"
    );
    Ok(())
}

/// `CreateReplica` on every replica of `desc`; the first failure is returned, the others
/// are logged.
async fn create_all(s: &Shared, stores: &[StoreInfo], desc: &Descriptor, bootstrap_first: bool) -> PlacementResult<()> {
    let wire = desc.to_proto();
    let mut first_err = None;
    for (i, r) in desc.replicas.iter().enumerate() {
        if let Err(e) = create_replica(s, stores, r.store, &wire, bootstrap_first && i == 0).await {
            if first_err.is_none() {
                first_err = Some(e);
            } else {
                tracing::warn!(store_id = r.store.get(), code = %e.code(), error = %e, "CreateReplica failed");
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Folds a routing error into the map and returns the operator's error.
async fn refused(s: &Shared, desc: &RangeDescriptor, what: &str, re: &RoutingError) -> PlacementError {
    s.absorb_routing_error(desc, re).await;
    routing_refusal(
        RangeId(desc.range_id),
        format!("{what} refused: {}", re.message),
        Some(re),
    )
}

/// One `ChangeReplicas` on `leader`; the descriptor it answers is applied and returned.
/// `NotLeader` with a hint is followed (a few times), e.g. right after a leader transfer,
/// unless the hint names `avoid`.
async fn change(
    s: &Shared,
    stores: &[StoreInfo],
    mut leader: StoreId,
    desc: &RangeDescriptor,
    store: StoreId,
    kind: replica_change::Kind,
    avoid: Option<StoreId>,
) -> PlacementResult<RangeDescriptor> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let address = address_of(stores, leader)?;
        let resp = s
            .long_store_client(&address)?
            .change_replicas(ChangeReplicasRequest {
                header: header(desc),
                changes: vec![ReplicaChange {
                    store_id: store.get(),
                    kind: kind as i32,
                }],
                stores: stores
                    .iter()
                    .filter(|x| StoreId(x.store_id) == store)
                    .cloned()
                    .collect(),
            })
            .await
            .map_err(|e| store_call_failed(leader, &address, e))?
            .into_inner();
        if let Some(re) = resp.routing_error {
            let hint = match &re.kind {
                // A hint naming the store that just refused is no hint.
                // Nor is one naming `avoid` (a move never sends the removal of the leader's
                // replica to that leader: it transfers leadership first).
                Some(RoutingKind::NotLeader(nl)) => {
                    store_opt(nl.leader_store_id).filter(|l| *l != leader && Some(*l) != avoid)
                }
                Some(RoutingKind::ServerBusy(_)) => Some(leader),
                _ => None,
            };
            if let Some(next) = hint.filter(|_| attempt < ADMIN_ATTEMPTS) {
                s.absorb_routing_error(desc, &re).await;
                leader = next;
                tokio::time::sleep(routing_retry_delay(&re)).await;
                continue;
            }
            return Err(refused(s, desc, "ChangeReplicas", &re).await);
        }
        let d = resp.descriptor.ok_or_else(|| {
            PlacementError::internal(format!("store {leader} answered ChangeReplicas without a descriptor"))
        })?;
        s.apply(&[Incoming {
            desc: d.clone(),
            leader: Some(leader),
            leader_term: None,
        }])
        .await?;
        return Ok(d);
    }
}

async fn transfer(
    s: &Shared,
    stores: &[StoreInfo],
    desc: &RangeDescriptor,
    from: StoreId,
    to: StoreId,
) -> PlacementResult<()> {
    let address = address_of(stores, from)?;
    let resp = s
        .store_client(&address)?
        .transfer_leader(TransferLeaderRequest {
            header: header(desc),
            to_store_id: to.get(),
        })
        .await
        .map_err(|e| store_call_failed(from, &address, e))?
        .into_inner();
    if let Some(re) = resp.routing_error {
        return Err(refused(s, desc, "TransferLeader", &re).await);
    }
    // Route later calls to the new leader at once; its heartbeat confirms it with a term.
    let _ = s
        .apply(&[Incoming {
            desc: desc.clone(),
            leader: Some(to),
            leader_term: None,
        }])
        .await;
    Ok(())
}

/// Executes one operator.
async fn execute(s: &Shared, op: Operator, stores: &[StoreInfo]) -> PlacementResult<()> {
    let range_id = op.range_id();
    match op {
        Operator::InitialPlacement { desc } => {
            if !s.meta.place_initial(&desc).await? {
                tracing::info!("range changed meanwhile; placement skipped");
                return Ok(());
            }
            s.progress(range_id, 2, "create replicas", None);
            create_all(s, stores, &desc, true).await
        }
        Operator::ResendCreate { desc, bootstrap_first } => create_all(s, stores, &desc, bootstrap_first).await,
        Operator::AddVoter { desc, leader, target } => {
            let wire = desc.to_proto();
            s.progress(range_id, 1, "create replica", Some(target));
            create_replica(s, stores, target, &wire, false).await?;
            s.progress(range_id, 2, "add voter (learner, catch up, promote)", Some(target));
            change(s, stores, leader, &wire, target, replica_change::Kind::AddVoter, None).await?;
            tracing::info!(target = target.get(), "voter added");
            Ok(())
        }
        Operator::Split {
            desc,
            leader,
            key,
            reason,
        } => {
            let wire = desc.to_proto();
            let new_range_id = RangeId(s.alloc_ids(1).await?);
            let address = address_of(stores, leader)?;
            let resp = s
                .store_client(&address)?
                .split_range(SplitRangeRequest {
                    header: header(&wire),
                    split_key: key,
                    new_range_id: new_range_id.get(),
                })
                .await
                .map_err(|e| store_call_failed(leader, &address, e))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                return Err(refused(s, &wire, "SplitRange", &re).await);
            }
            let (Some(left), Some(right)) = (resp.left, resp.right) else {
                return Err(PlacementError::internal(format!(
                    "store {leader} answered the split without descriptors"
                )));
            };
            s.progress(range_id, 2, "record the halves", None);
            let now = now_ms();
            {
                let mut mem = s.mem.lock();
                mem.last_split.insert(RangeId(left.range_id), now);
                mem.last_split.insert(RangeId(right.range_id), now);
                if reason == Reason::Load {
                    mem.siblings
                        .insert(RangeId(right.range_id), (RangeId(left.range_id), now));
                }
            }
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
            tracing::info!(new_range_id = right.range_id, split_key = %right.start.escape_ascii(), "range split");
            Ok(())
        }
        Operator::TransferLeader { desc, from, to, .. } => transfer(s, stores, &desc.to_proto(), from, to).await,
        Operator::RemoveReplica {
            desc, leader, store, ..
        } => {
            change(
                s,
                stores,
                leader,
                &desc.to_proto(),
                store,
                replica_change::Kind::Remove,
                Some(store),
            )
            .await?;
            tracing::info!(removed = store.get(), "replica removed");
            Ok(())
        }
        Operator::MoveReplica {
            desc, leader, from, to, ..
        } => run_move(s, stores, desc, leader, from, to).await,
        Operator::Merge {
            left, right, leader, ..
        } => {
            let (lw, rw) = (left.to_proto(), right.to_proto());
            let address = address_of(stores, leader)?;
            let resp = s
                .long_store_client(&address)?
                .merge_ranges(MergeRangesRequest {
                    header: header(&lw),
                    source: Some(rw.clone()),
                })
                .await
                .map_err(|e| store_call_failed(leader, &address, e))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                return Err(refused(s, &lw, "MergeRanges", &re).await);
            }
            let merged = resp.merged.ok_or_else(|| {
                PlacementError::internal(format!("store {leader} answered MergeRanges without a descriptor"))
            })?;
            s.progress(range_id, 2, "record the merged range", None);
            s.record_merge(merged, &rw, Some(leader)).await?;
            tracing::info!(source = right.id.get(), "ranges merged");
            Ok(())
        }
    }
}

/// Pause after a leader transfer before the next step: the target campaigns at once, and
/// the removal that follows is then usually taken by it on the first try.
const TRANSFER_SETTLE_MS: u64 = 250;

/// Whether a failed move step is worth a re-read and another decision: the range changed
/// (stale epoch), its leader moved or is unknown, a replica is gone, a store did not answer.
fn retriable(e: &PlacementError) -> bool {
    matches!(
        e.code(),
        ErrorCode::EpochNotMatch | ErrorCode::RangeUnavailable | ErrorCode::StoreUnavailable
    )
}

/// Moves the replica on `from` to `to` (ADR 0015 "Moves"): before every step the range is
/// re-read (the newer of the descriptor the last step answered and the range map's, and
/// the map's leader, which heartbeats and refusals keep current) and
/// [`next_move_step`] decides; a refused step is retried from the re-read state
/// ([`MOVE_MAX_REFUSALS`] in a row at most), so each `ChangeReplicas` goes to the current
/// leader with the current epoch, and the leader's own replica is removed only after the
/// leadership moved to another voter.
async fn run_move(
    s: &Shared,
    stores: &[StoreInfo],
    desc: Descriptor,
    leader: StoreId,
    from: StoreId,
    to: StoreId,
) -> PlacementResult<()> {
    let range_id = desc.id;
    let mut cur = desc;
    let mut leader = Some(leader);
    let mut created = false;
    let mut refusals = 0u32;
    loop {
        let step = next_move_step(&cur, leader, from, to, created);
        let receiving = matches!(
            step,
            MoveStep::CreateReplica | MoveStep::AddLearner { .. } | MoveStep::Promote { .. }
        )
        .then_some(to);
        s.progress(range_id, step.number(), step.name(), receiving);
        let wire = cur.to_proto();
        let r = match step {
            MoveStep::Done => {
                tracing::info!(from = from.get(), to = to.get(), "replica moved");
                return Ok(());
            }
            MoveStep::CreateReplica => create_replica(s, stores, to, &wire, false).await.map(|()| {
                created = true;
                None
            }),
            MoveStep::AddLearner { leader } => {
                change(s, stores, leader, &wire, to, replica_change::Kind::AddLearner, None)
                    .await
                    .map(Some)
            }
            MoveStep::Promote { leader } => change(s, stores, leader, &wire, to, replica_change::Kind::AddVoter, None)
                .await
                .map(Some),
            MoveStep::TransferLeader { from, to } => {
                let r = transfer(s, stores, &wire, from, to).await;
                if r.is_ok() {
                    tokio::time::sleep(Duration::from_millis(TRANSFER_SETTLE_MS)).await;
                }
                r.map(|()| None)
            }
            MoveStep::RemoveOld { leader } => {
                change(s, stores, leader, &wire, from, replica_change::Kind::Remove, Some(from))
                    .await
                    .map(Some)
            }
            MoveStep::WaitForLeader => Err(PlacementError::RangeUnavailable {
                range_id,
                reason: format!("no leader among the voters of range {range_id} is known"),
                retry_after: Duration::from_millis(retry_delay_ms(1)),
            }),
        };
        match r {
            Ok(answered) => {
                refusals = 0;
                if let Some(d) = answered
                    && let Ok(d) = Descriptor::try_from(&d)
                    && newer_or_same(d.epoch, cur.epoch)
                {
                    cur = d;
                }
            }
            Err(e) if retriable(&e) && refusals < MOVE_MAX_REFUSALS => {
                refusals += 1;
                s.metrics
                    .operator_step_retries
                    .get_or_create(&Metrics::labels(&[("kind", "move"), ("step", step.label())]))
                    .inc();
                let wait = retry_delay_ms(refusals);
                tracing::info!(
                    step = step.name(),
                    code = %e.code(),
                    error = %e,
                    refusals,
                    retry_in_ms = wait,
                    "move step refused; re-reading the range"
                );
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(e) => return Err(e),
        }
        // Re-read: the range map holds what heartbeats and refusals brought since.
        if let Some(rec) = s.meta.range_by_id(range_id).await? {
            if let Ok(d) = Descriptor::try_from(rec.desc())
                && newer_or_same(d.epoch, cur.epoch)
            {
                cur = d;
            }
            leader = rec.leader();
        }
    }
}
