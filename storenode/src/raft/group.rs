//! One range's Raft group behind this crate's own API (ADR 0001).
//!
//! The rest of the crate (node, services, placement client) uses [`RaftGroup`], its views
//! ([`LeaderView`], [`MembershipStamp`]), its errors ([`RaftOpError`], [`InitError`]) and
//! [`RaftConfig`]; only modules under `raft/` name openraft types, so an openraft upgrade
//! touches this directory only.

use super::log_store::LogStore;
use super::network::{HibernateRequest, HibernateResponse, NetworkFactory, RaftRpc, SnapshotHeader, Transport, wire};
use super::state_machine::{RangeShared, SnapFile, StateMachine};
use super::{CmdResponse, Command, LogId, Raft, TypeConfig};
use crate::engine::Engine;
use crate::hibernate::{self, Actions, Hibernation, LeaderFacts, MessageFacts, PollResult, Timers, WakeReason};
use crate::metrics::Metrics;
use crate::node::NodeInner;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{ChangeMembershipError, ClientWriteError, InitializeError, PreconditionFailed, RaftError};
use openraft::raft::{AppendEntriesResponse, Precondition};
use openraft::{EmptyNode, Membership, ReadPolicy};
use skv_common::StoreId;
use skv_proto::internal::RaftMessageResponse;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Raft timing and limits shared by every group of a node.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    inner: Arc<openraft::Config>,
    /// Hibernate idle ranges after this long without activity (ADR 0018); None: never.
    hibernate_after: Option<Duration>,
}

#[derive(Debug, Error)]
#[error("invalid raft config: {0}")]
pub struct RaftConfigError(String);

impl RaftConfig {
    /// Raft timing tuned for a LAN; a snapshot (and log purge) every `snapshot_logs` entries.
    pub fn new(snapshot_logs: u64) -> Result<Self, RaftConfigError> {
        let c = openraft::Config {
            cluster_name: "skv".into(),
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 256,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_logs.max(1)),
            max_in_snapshot_log_to_keep: (snapshot_logs / 2).min(1000),
            purge_batch_size: 256,
            replication_lag_threshold: snapshot_logs.max(1) * 2,
            // A follower that cannot win (partitioned, restarted, woken from hibernation with
            // an expired lease) asks first instead of bumping the term (ADR 0018).
            enable_pre_vote: Some(true),
            // Per-stage latency rings (6 x this many entries per group), kept by openraft even
            // without its `runtime-stats` feature: 144 KiB per replica at the default 1024.
            log_stage_capacity: Some(1),
            ..Default::default()
        };
        let inner = c.validate().map_err(|e| RaftConfigError(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(inner),
            hibernate_after: None,
        })
    }

    /// Enables hibernation of ranges idle for `after` (ADR 0018). Groups then start with their
    /// election timer off: a follower turns it on once it heard from its leader, or after
    /// `election_timeout_max` (so a restart never deposes a sleeping leader).
    pub fn with_hibernation(mut self, after: Option<Duration>) -> Result<Self, RaftConfigError> {
        let mut c = (*self.inner).clone();
        c.enable_elect = after.is_none();
        let inner = c.validate().map_err(|e| RaftConfigError(e.to_string()))?;
        self.inner = Arc::new(inner);
        self.hibernate_after = after;
        Ok(self)
    }

    /// openraft's configuration (for the deterministic simulation, `sim/`, which builds
    /// its groups from it with its own network).
    pub fn openraft_config(&self) -> Arc<openraft::Config> {
        self.inner.clone()
    }

    pub fn hibernate_after(&self) -> Option<Duration> {
        self.hibernate_after
    }

    /// How long a waking follower waits for its leader before its election timer runs.
    pub fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.inner.election_timeout_max)
    }

    /// How recently a replica must have heard from a quorum-backed leader (or, as leader,
    /// been acknowledged by a quorum) to serve a `stale_ok` read: 2 × the maximum election
    /// timeout (ADR 0008).
    pub fn stale_read_bound(&self) -> Duration {
        Duration::from_millis(self.inner.election_timeout_max.saturating_mul(2))
    }
}

/// Leadership as seen locally.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderView {
    pub leader: Option<StoreId>,
    pub term: u64,
}

/// The membership a descriptor's `conf_ver` was derived from (opaque). A membership change
/// carries it back so that it is proposed only while that membership is still the current
/// one (checked by the Raft core itself, so concurrent changes cannot both pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipStamp(Option<LogId>);

impl RangeShared {
    /// The descriptor and the stamp of the membership its replicas and `conf_ver` reflect.
    pub fn desc_and_stamp(&self) -> (skv_proto::internal::RangeDescriptor, MembershipStamp) {
        let (d, m) = self.desc_and_membership();
        (d, MembershipStamp(m))
    }
}

/// What to do with one store in a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    AddVoter,
    AddLearner,
    Remove,
}

/// Why a Raft operation failed. Every variant but `OutcomeUnknown` means nothing was
/// proposed (or nothing of it can apply).
#[derive(Debug, Error)]
pub enum RaftOpError {
    #[error("not the leader")]
    NotLeader { leader: Option<StoreId> },
    /// The membership is no longer the stamped one (another change went first).
    #[error("the membership changed since it was read")]
    StaleMembership,
    /// Not now: a membership change is in progress, or the leader has not committed an entry
    /// of its own term yet. Retry shortly.
    #[error("busy: {0}")]
    Busy(String),
    /// The request cannot apply (it would empty the membership, a joint config is pending...).
    #[error("rejected: {0}")]
    Rejected(String),
    /// A read could not be confirmed (ReadIndex timed out).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// It may or may not have been applied (timeout, leader change after the proposal,
    /// partial membership change).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

/// Why `initialize` did not bootstrap the group.
#[derive(Debug, Error)]
pub enum InitError {
    /// The group already has a log or a vote (bootstrapped before, or contacted by peers).
    #[error("already initialized or contacted: {0}")]
    AlreadyInitialized(String),
    /// This store is not a voter of the initial membership.
    #[error("this store is not one of the initial voters: {0}")]
    NotAVoter(String),
    #[error("initialize failed: {0}")]
    Failed(String),
}

#[derive(Debug, Error)]
#[error("raft group start failed: {0}")]
pub struct StartError(String);

/// What a group needs to start.
pub struct GroupParts {
    pub store_id: StoreId,
    pub config: RaftConfig,
    pub engine: Arc<Engine>,
    pub shared: Arc<RangeShared>,
    pub node: Weak<NodeInner>,
    pub snap_dir: PathBuf,
    pub metrics: Metrics,
    pub transport: Arc<Transport>,
}

/// One range's Raft group. Cheap to clone.
#[derive(Clone)]
pub struct RaftGroup {
    raft: Raft,
    id: StoreId,
    lag_threshold: u64,
    hib: Arc<HibCell>,
}

/// A group's hibernation (ADR 0018): the pure state of `crate::hibernate` and what applying
/// its actions needs.
struct HibCell {
    /// None: hibernation disabled, the timers are never touched.
    after: Option<Duration>,
    grace: Duration,
    /// openraft's leader lease (`election_timeout_max`), in ms.
    lease_ms: u64,
    state: parking_lot::Mutex<Hibernation>,
    /// Proposals, reads and admin calls in flight on this replica.
    inflight: std::sync::atomic::AtomicU64,
    transport: Arc<Transport>,
    shared: Arc<RangeShared>,
    metrics: Metrics,
    node: Weak<NodeInner>,
}

/// Counts one operation in flight while alive.
struct Inflight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Inflight<'a> {
    fn new(c: &'a std::sync::atomic::AtomicU64) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long a control message (Hibernate, WakeUp) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_millis(1000);

/// Plain values copied out of the metrics channel (whose borrow blocks the Raft core).
struct Status {
    leader: Option<u64>,
    term: u64,
    last_applied: Option<LogId>,
    snapshot: Option<u64>,
    quorum_acked: Option<Duration>,
}

impl RaftGroup {
    /// Opens the state machine and the log of `parts.shared`'s range and starts its group.
    pub async fn start(p: GroupParts) -> Result<Self, StartError> {
        let range = p.shared.range_id;
        let sm = StateMachine::open(
            p.engine.clone(),
            p.shared.clone(),
            p.node.clone(),
            p.snap_dir,
            p.metrics.clone(),
        )
        .map_err(|e| StartError(format!("state machine of {range}: {e}")))?;
        let net = NetworkFactory {
            transport: p.transport.clone(),
            shared: p.shared.clone(),
            metrics: p.metrics.clone(),
        };
        let metrics = p.metrics;
        let log = LogStore::new(p.engine, range);
        let raft = Raft::new(p.store_id.0, p.config.inner.clone(), net, log, sm)
            .await
            .map_err(|e| StartError(format!("{range}: {e}")))?;
        tokio::spawn(watch_leadership(raft.server_metrics(), metrics.clone()));
        let (state, actions) = Hibernation::started(raft.is_leader(), std::time::Instant::now());
        let g = Self {
            raft,
            id: p.store_id,
            lag_threshold: p.config.inner.replication_lag_threshold,
            hib: Arc::new(HibCell {
                after: p.config.hibernate_after,
                grace: p.config.election_timeout_max(),
                lease_ms: p.config.inner.election_timeout_max,
                state: parking_lot::Mutex::new(state),
                inflight: std::sync::atomic::AtomicU64::new(0),
                transport: p.transport,
                shared: p.shared,
                metrics,
                node: p.node,
            }),
        };
        if g.hib.after.is_some() {
            g.apply_timers(actions.timers);
            g.after_actions(actions);
        }
        Ok(g)
    }

    fn status(&self) -> Status {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        Status {
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied,
            snapshot: m.snapshot.map(|l| l.index),
            quorum_acked: m.last_quorum_acked.as_ref().map(|t| openraft::Instant::elapsed(&**t)),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.is_leader()
    }

    /// Entries this replica knows committed but has not applied yet.
    pub fn apply_lag(&self) -> u64 {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let committed = m.local_committed.as_ref().map_or(0, |l| l.index);
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        committed.saturating_sub(applied)
    }

    pub fn leader_view(&self) -> LeaderView {
        let s = self.status();
        LeaderView {
            leader: s.leader.map(StoreId),
            term: s.term,
        }
    }

    fn not_leader(&self) -> RaftOpError {
        RaftOpError::NotLeader {
            leader: self.leader_view().leader,
        }
    }

    /// Whether this replica may serve a `stale_ok` read: only if its data is no older than
    /// `bound` (plus one network delay). ADR 0008:
    /// - never during a snapshot install;
    /// - as leader: a quorum acknowledged it within `bound` (a sole voter is its own quorum),
    ///   so no other leader acknowledged anything since, and it applied an entry of its own
    ///   term (the blank entry of its election), so every write an earlier leader
    ///   acknowledged is applied here (it acknowledges its own writes only after applying);
    /// - as follower: it knows a leader and, within `bound`, accepted an AppendEntries whose
    ///   commit index (the highest learnt by then) it has applied — its data then holds every
    ///   write acknowledged before that contact ([`super::state_machine::LeaderContacts`]).
    ///   A follower in contact but applying behind refuses.
    pub fn stale_read_allowed(&self, shared: &RangeShared, bound: Duration) -> bool {
        if shared.installing.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let s = self.status();
        if self.is_leader() {
            let own_term_applied = s.last_applied.is_some_and(|l| l.leader_id.term == s.term);
            if !own_term_applied {
                return false;
            }
            // A sole voter is its own quorum (openraft records no acknowledgement then).
            let mut voters = self.raft.voter_ids();
            if voters.next() == Some(self.id.0) && voters.next().is_none() {
                return true;
            }
            return s.quorum_acked.is_some_and(|age| age <= bound);
        }
        if s.leader.is_none() {
            return false;
        }
        let applied = shared.applied_index.load(std::sync::atomic::Ordering::Acquire);
        let contact = shared.leader_contacts.lock().fresh_as_of(applied);
        contact.is_some_and(|t| t.elapsed() <= bound)
    }

    /// ReadIndex: returns once this replica, as leader confirmed by a quorum, has applied
    /// everything committed when the read arrived.
    pub async fn read_index(&self, timeout: Duration) -> Result<(), RaftOpError> {
        let _inflight = Inflight::new(&self.hib.inflight);
        self.touch(WakeReason::Read);
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => Err(RaftOpError::Unavailable("read index timed out".into())),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let leader = e
                    .forward_to_leader()
                    .and_then(|f| f.leader_id)
                    .map(StoreId)
                    .or(self.leader_view().leader);
                Err(RaftOpError::NotLeader { leader })
            }
        }
    }

    /// Proposes `cmd`; returns its apply result once committed and applied here.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> Result<CmdResponse, RaftOpError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let _inflight = Inflight::new(&self.hib.inflight);
        self.touch(WakeReason::Write);
        self.ensure_lease(timeout).await;
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.raft.client_write(cmd)).await {
            Err(_) => Err(RaftOpError::OutcomeUnknown("proposal timed out".into())),
            Ok(Ok(resp)) => {
                // client_write returns once the entry is committed and applied here.
                self.hib
                    .metrics
                    .raft_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(resp.data)
            }
            Ok(Err(e)) => Err(write_error(e)),
        }
    }

    /// Changes the membership, one store after the other, each change one log entry
    /// (single-server changes, as TiKV's ChangePeer; openraft checks the transition and that
    /// the leader committed an entry of its own term first). The first proposal is made only
    /// if the effective membership is still the one `expected` names — checked by the Raft
    /// core, so of two concurrent calls with the same stamp at most one proposes. Adding a
    /// voter first adds it as a learner and waits for it to catch up.
    ///
    /// Errors before the first entry was appended mean nothing changed; after it, the change
    /// is partial and the error is `OutcomeUnknown`.
    pub async fn change_replicas(
        &self,
        changes: &[(StoreId, ChangeKind)],
        expected: MembershipStamp,
        timeout: Duration,
    ) -> Result<(), RaftOpError> {
        let _inflight = Inflight::new(&self.hib.inflight);
        self.touch(WakeReason::Admin);
        self.ensure_lease(timeout).await;
        let work = async {
            let mut stamp = expected.0;
            let mut proposed = false;
            for &(target, kind) in changes {
                let r = self.change_one(target, kind, &mut stamp, &mut proposed).await;
                if let Err(e) = r {
                    return Err(match e {
                        e @ RaftOpError::OutcomeUnknown(_) => e,
                        e if proposed => RaftOpError::OutcomeUnknown(format!(
                            "membership change partly applied before: {e}; refresh and retry"
                        )),
                        e => e,
                    });
                }
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, work).await {
            Err(_) => Err(RaftOpError::OutcomeUnknown(
                "membership change timed out; refresh the descriptor and retry".into(),
            )),
            Ok(r) => r,
        }
    }

    async fn change_one(
        &self,
        target: StoreId,
        kind: ChangeKind,
        stamp: &mut Option<LogId>,
        proposed: &mut bool,
    ) -> Result<(), RaftOpError> {
        let t = target.0;
        // The metrics may not show the entry this call just appended yet.
        let _ = self
            .raft
            .wait(Some(Duration::from_secs(2)))
            .metrics(|m| *m.membership_config.log_id() >= *stamp, "membership metrics")
            .await;
        let (current_id, current) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (*m.membership_config.log_id(), m.membership_config.membership().clone())
        };
        if current_id != *stamp {
            // The metrics lag the core, or another change went first: the core would refuse
            // the stamp anyway; tell which.
            return Err(if current_id > *stamp {
                RaftOpError::StaleMembership
            } else {
                RaftOpError::Busy("membership view not up to date yet".into())
            });
        }
        let configs = current.get_joint_config();
        let [voters] = configs.as_slice() else {
            return Err(RaftOpError::Rejected("a joint membership is pending".into()));
        };
        let mut voters = voters.clone();
        let mut nodes: BTreeMap<u64, EmptyNode> = current.nodes().map(|(id, n)| (*id, n.clone())).collect();
        match kind {
            ChangeKind::AddLearner | ChangeKind::AddVoter => {
                if voters.contains(&t) {
                    return Ok(());
                }
                if let std::collections::btree_map::Entry::Vacant(e) = nodes.entry(t) {
                    e.insert(EmptyNode::new());
                    self.append_membership(vec![voters.clone()], nodes.clone(), stamp, proposed)
                        .await?;
                }
                if kind == ChangeKind::AddLearner {
                    return Ok(());
                }
                self.wait_line_rate(t).await;
                voters.insert(t);
                self.append_membership(vec![voters], nodes, stamp, proposed).await
            }
            ChangeKind::Remove => {
                if !nodes.contains_key(&t) {
                    return Ok(());
                }
                voters.remove(&t);
                nodes.remove(&t);
                self.append_membership(vec![voters], nodes, stamp, proposed).await
            }
        }
    }

    /// Appends one membership entry if the effective membership is still `stamp`; on success
    /// `stamp` becomes the new entry's log id.
    async fn append_membership(
        &self,
        configs: Vec<BTreeSet<u64>>,
        nodes: BTreeMap<u64, EmptyNode>,
        stamp: &mut Option<LogId>,
        proposed: &mut bool,
    ) -> Result<(), RaftOpError> {
        let m = Membership::new(configs, nodes).map_err(|e| RaftOpError::Rejected(e.to_string()))?;
        let pre = Precondition::LastMembershipLogId {
            last_membership_log_id: *stamp,
        };
        match self
            .raft
            .append_membership(m, openraft::EntryPayload::Blank, [pre])
            .await
        {
            Ok(resp) => {
                *stamp = Some(resp.log_id);
                *proposed = true;
                Ok(())
            }
            Err(RaftError::APIError(ClientWriteError::PreconditionFailed(
                PreconditionFailed::LastMembershipLogIdMismatch { .. },
            ))) => Err(RaftOpError::StaleMembership),
            Err(e) => Err(write_error(e)),
        }
    }

    /// Waits until the leader's replication to learner `target` is within the lag threshold
    /// (as openraft's blocking `add_learner`), or this node stopped leading.
    async fn wait_line_rate(&self, target: u64) {
        let lag = self.lag_threshold;
        let _ = self
            .raft
            .wait(None)
            .metrics(
                |m| {
                    let Some(repl) = &m.replication else {
                        return true; // no longer leader: the next step will say so
                    };
                    match repl.get(&target) {
                        Some(matched) => {
                            let next = |i: Option<u64>| i.map_or(0, |i| i + 1);
                            next(m.last_log_index).saturating_sub(next(matched.map(|l| l.index))) <= lag
                        }
                        None => false,
                    }
                },
                "learner catches up",
            )
            .await;
    }

    /// Waits (up to `timeout`) until this node leads, has applied `index`, and every other
    /// voter's log matches the leader's up to `index` (durable there: appends are
    /// acknowledged after their fsync). Returns whether that happened. A merge proposes its
    /// CommitMerge only then, so every replica of the source holds the frozen entry.
    pub async fn wait_replicated(&self, index: u64, timeout: Duration) -> bool {
        let me = self.id.0;
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| {
                    let Some(repl) = &m.replication else {
                        return false;
                    };
                    m.last_applied.as_ref().is_some_and(|l| l.index >= index)
                        && m.membership_config.membership().voter_ids().all(|v| {
                            v == me
                                || repl
                                    .get(&v)
                                    .is_some_and(|matched| matched.as_ref().is_some_and(|l| l.index >= index))
                        })
                },
                "replicated to every voter",
            )
            .await
            .is_ok()
    }

    /// The voters and the learners of the effective membership.
    pub fn voters_and_learners(&self) -> (BTreeSet<u64>, BTreeSet<u64>) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let learners: BTreeSet<u64> = mem.learner_ids().filter(|l| !voters.contains(l)).collect();
        (voters, learners)
    }

    /// Asks this leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: StoreId) -> Result<(), RaftOpError> {
        let _inflight = Inflight::new(&self.hib.inflight);
        self.touch(WakeReason::Admin);
        // A leader that is handing over stops heartbeating and proposing; if the handover
        // fails, only the followers' election timers end that state. Sleeping followers have
        // them off: wake them (they start waking, and elect after the grace if need be).
        self.wake_followers();
        self.raft
            .trigger()
            .transfer_leader(to.0)
            .await
            .map_err(|e| RaftOpError::OutcomeUnknown(e.to_string()))
    }

    /// Starts an election now (the old leader's node campaigns first after a split).
    pub async fn campaign(&self) {
        self.mark_awake();
        let _ = self.raft.trigger().elect(false).await;
    }

    /// Bootstraps the group with `voters` (a brand-new range only).
    pub async fn initialize(&self, voters: BTreeSet<StoreId>) -> Result<(), InitError> {
        let ids: BTreeSet<u64> = voters.into_iter().map(|s| s.0).collect();
        match self.raft.initialize(ids).await {
            Ok(()) => {
                // The new group elects itself through its election timer.
                self.mark_awake();
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                Err(InitError::AlreadyInitialized(e.to_string()))
            }
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => Err(InitError::NotAVoter(e.to_string())),
            Err(e) => Err(InitError::Failed(e.to_string())),
        }
    }

    /// After bootstrap: once leader and the first entries applied, snapshot and purge the log
    /// so every later replica starts from a snapshot carrying the descriptor (keeps
    /// descriptors identical on all replicas). Gives up quietly after 30 s.
    pub async fn compact_after_bootstrap(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::time::Instant::now() > deadline {
                return;
            }
            let s = self.status();
            let applied = if s.leader != Some(self.id.0) {
                None
            } else {
                s.last_applied.map(|l| l.index)
            };
            if let Some(idx) = applied
                && idx >= 1
            {
                if self.raft.trigger().snapshot().await.is_err() {
                    return;
                }
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                while tokio::time::Instant::now() < until {
                    if self.status().snapshot.is_some_and(|s| s >= idx) {
                        let _ = self.raft.trigger().purge_log(idx).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }

    /// Handles one Raft message from a peer; records leader contacts for stale reads.
    /// Hibernation (ADR 0018) is checked after openraft handled the message, so a wake that
    /// turns the election timer on finds the lease the message renewed.
    ///
    /// `sender_applied` is the sender's applied index when it sent the message (0: not
    /// given). openraft can resend an old AppendEntries whose `leader_commit` lags far behind
    /// the leader (seen: 56 against 153, to a follower that had just restarted); every write
    /// the leader acknowledged before sending is at most its applied index, so a contact
    /// counts the larger of the two (ADR 0008).
    pub async fn handle_rpc(&self, shared: &RangeShared, rpc: RaftRpc, sender_applied: u64) -> RaftMessageResponse {
        match rpc {
            RaftRpc::Append(req) => {
                let received = Instant::now();
                // A contact counts only from a leader that has committed an entry of its
                // own term: before that, its commit index may not yet cover writes its
                // predecessor acknowledged (ADR 0008).
                let from_leader = req.vote.is_committed()
                    && req
                        .leader_commit
                        .is_some_and(|l| l.leader_id.term == req.vote.leader_id.term);
                let leader_commit = req.leader_commit.map_or(0, |l| l.index);
                let contact_commit = leader_commit.max(sender_applied);
                let entries = req.entries.len();
                // Only an entry-less append needs it (one with entries wakes anyway).
                let other_vote = self.hibernation_enabled() && req.entries.is_empty() && {
                    let m = self.raft.metrics();
                    let v = m.borrow_watched().vote;
                    v != req.vote
                };
                let res = self.raft.append_entries(req).await;
                let accepted = matches!(res, Ok(AppendEntriesResponse::Success));
                if from_leader && accepted {
                    shared.leader_contacts.lock().record(received, contact_commit);
                    if self.hibernation_enabled() {
                        self.transition(|h| h.on_leader_contact());
                    }
                }
                self.after_message(MessageFacts::Append {
                    entries,
                    other_vote,
                    leader_commit,
                    applied_index: shared.applied_index.load(std::sync::atomic::Ordering::Acquire),
                    accepted,
                });
                wire(res)
            }
            RaftRpc::Vote(req) => {
                let r = wire(self.raft.vote(req).await);
                self.after_message(MessageFacts::Vote);
                r
            }
            RaftRpc::PreVote(req) => {
                let r = wire(self.raft.pre_vote(req).await);
                self.after_message(MessageFacts::PreVote);
                r
            }
            RaftRpc::TransferLeader(req) => {
                let r = wire(self.raft.handle_transfer_leader(req).await);
                self.after_message(MessageFacts::TransferLeader);
                r
            }
            RaftRpc::Hibernate(req) => wire::<_, String>(Ok(self.on_hibernate(req))),
            RaftRpc::WakeUp { .. } => {
                self.touch(WakeReason::PeerWakeup);
                // The answer says whether this replica leads (a waking follower's probe).
                wire::<_, String>(Ok(self.is_leader()))
            }
        }
    }

    /// Installs a received (and validated) snapshot file.
    pub async fn install_snapshot(&self, header: SnapshotHeader, file: SnapFile) -> RaftMessageResponse {
        let snap = openraft::storage::Snapshot {
            meta: header.meta,
            snapshot: file,
        };
        let r = wire(self.raft.install_full_snapshot(header.vote, snap).await);
        self.after_message(MessageFacts::Snapshot);
        r
    }
}

/// Counts leader changes and elections of one group from openraft's server metrics, which
/// change only on a vote, a state, a leader or a membership change (never per entry). Ends
/// when the group shuts down (the sender is dropped).
async fn watch_leadership(
    mut rx: openraft::alias::WatchReceiverOf<TypeConfig, openraft::metrics::RaftServerMetrics<TypeConfig>>,
    metrics: Metrics,
) {
    let mut tracker = LeadershipTracker::default();
    loop {
        let (leader, candidate_term) = {
            let m = rx.borrow_watched();
            let term = m.vote.leader_id.term;
            (
                m.current_leader,
                (m.state == openraft::ServerState::Candidate).then_some(term),
            )
        };
        let (changed, elected) = tracker.observe(leader, candidate_term);
        if changed {
            metrics.raft_leader_changes.inc();
        }
        if elected {
            metrics.raft_elections.inc();
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What [`watch_leadership`] remembers between two observations. Pure, so it is table-tested.
#[derive(Default)]
struct LeadershipTracker {
    /// The last leader known (an unknown leader in between is not a change).
    last_leader: Option<u64>,
    /// The last term in which this replica was seen a candidate.
    last_candidate_term: u64,
}

impl LeadershipTracker {
    /// Returns (the leader moved to another store, a new election was started here).
    fn observe(&mut self, leader: Option<u64>, candidate_term: Option<u64>) -> (bool, bool) {
        let changed = match (self.last_leader, leader) {
            (Some(a), Some(b)) => a != b,
            _ => false,
        };
        if leader.is_some() {
            self.last_leader = leader;
        }
        let elected = match candidate_term {
            Some(t) if t > self.last_candidate_term => {
                self.last_candidate_term = t;
                true
            }
            _ => false,
        };
        (changed, elected)
    }
}

fn log_pos(l: &LogId) -> hibernate::LogPos {
    (l.leader_id.term, l.leader_id.node_id, l.index)
}

fn vote_pos(v: &super::Vote) -> hibernate::VotePos {
    (v.leader_id.term, v.leader_id.node_id, v.committed)
}

/// Hibernation (ADR 0018): the pure decisions are in `crate::hibernate`; this applies them
/// through openraft's runtime switches (`tick`, `heartbeat`, `elect`) and triggers. Raft
/// safety is untouched: every message is still handled, only timers are switched.
impl RaftGroup {
    pub fn hibernation_enabled(&self) -> bool {
        self.hib.after.is_some()
    }

    /// (hibernating, waking), for the gauges.
    pub fn hibernation_gauges(&self) -> (bool, bool) {
        let st = self.hib.state.lock();
        (st.is_hibernating(), st.is_waking())
    }

    pub fn is_hibernating(&self) -> bool {
        self.hib.state.lock().is_hibernating()
    }

    fn apply_timers(&self, t: Option<Timers>) {
        let Some(t) = t else { return };
        let rc = self.raft.runtime_config();
        rc.heartbeat(t.heartbeat);
        rc.elect(t.elect);
        rc.tick(t.tick);
    }

    /// The asynchronous part of a transition's actions.
    fn after_actions(&self, a: Actions) {
        if let Some(r) = a.woke {
            self.hib.metrics.range_wake(r);
        }
        if a.heartbeat_now {
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let _ = raft.trigger().heartbeat().await;
            });
        }
        if a.probe_leader {
            let g = self.clone();
            tokio::spawn(async move {
                let leading = g.probe_leader().await;
                g.transition(|h| h.probe_result(leading, Instant::now()));
            });
        }
        if a.send_wakeup {
            let g = self.clone();
            let start = a.woke == Some(WakeReason::Start);
            let may_campaign = a.may_campaign;
            tokio::spawn(async move { g.send_wakeups(start, may_campaign).await });
        }
    }

    /// Runs one transition of the state; the timers are switched under the state lock, so
    /// concurrent transitions reach openraft in their order.
    fn transition(&self, f: impl FnOnce(&mut Hibernation) -> Actions) {
        if self.hib.after.is_none() {
            return;
        }
        let a = {
            let mut st = self.hib.state.lock();
            let a = f(&mut st);
            self.apply_timers(a.timers);
            a
        };
        self.after_actions(a);
    }

    /// Activity on this replica: wakes it if it sleeps (see `Hibernation::wake`).
    pub fn touch(&self, reason: WakeReason) {
        if self.hib.after.is_none() || self.hib.state.lock().note_if_awake(reason, Instant::now()) {
            return;
        }
        let is_leader = self.is_leader();
        self.transition(|h| h.wake(is_leader, reason, Instant::now()));
    }

    /// A store changed state (placement's view); wakes this replica if the pure rule says so.
    pub fn on_store_event(&self, e: hibernate::StoreEvent) {
        if self.hib.after.is_none() {
            return;
        }
        let is_leader = self.is_leader();
        let leader = self.leader_view().leader.map(|s| s.0);
        let wakes = hibernate::store_event_wakes(e, is_leader, leader, self.hib.state.lock().state());
        if wakes {
            let reason = match e {
                hibernate::StoreEvent::Down(_) => WakeReason::StoreDown,
                hibernate::StoreEvent::Up(_) => WakeReason::StoreUp,
            };
            self.transition(|h| {
                let mut a = h.wake(is_leader, reason, Instant::now());
                // A waking follower whose leader went DOWN asks (and campaigns) again.
                a.send_wakeup |= !is_leader;
                a.may_campaign |= !is_leader;
                a.woke = Some(reason);
                a
            });
        }
    }

    /// openraft refuses proposals from a leader whose quorum acknowledgement is older than
    /// its lease (`ensure_writable_leader_handler`: ForwardToLeader, reason LeaseExpired),
    /// which is the state of a leader that slept. So before proposing, a leader whose last
    /// quorum ack is older than half the lease runs one ReadIndex round (a heartbeat a quorum
    /// answers), which renews it. An awake leader (heartbeats every 100 ms) skips this.
    async fn ensure_lease(&self, timeout: Duration) {
        if self.hib.after.is_none() {
            return; // no hibernation: the leader's heartbeats keep its lease
        }
        let stale = self
            .status()
            .quorum_acked
            .is_none_or(|age| age >= Duration::from_millis(self.hib.lease_ms / 2));
        if stale && self.is_leader() {
            let _ = tokio::time::timeout(timeout, self.raft.ensure_linearizable(ReadPolicy::ReadIndex)).await;
        }
    }

    /// Sends `WakeUp` to every other voter (fire and forget): a sleeping follower starts
    /// waking, so its election timer runs again after the grace.
    fn wake_followers(&self) {
        if self.hib.after.is_none() {
            return;
        }
        let (voters, _) = self.voters_and_learners();
        let me = self.id.0;
        let range = self.hib.shared.range_id;
        for v in voters.into_iter().filter(|v| *v != me) {
            let transport = self.hib.transport.clone();
            tokio::spawn(async move {
                let rpc = RaftRpc::WakeUp { from: me };
                let _ = transport
                    .send_control::<bool>(StoreId(v), range, &rpc, CONTROL_TIMEOUT)
                    .await;
            });
        }
    }

    /// Marks a freshly bootstrapped group awake (it must elect itself).
    pub fn mark_awake(&self) {
        self.transition(|h| h.on_leader_contact());
    }

    /// What a leader's decision to sleep is made of, copied out of the Raft metrics.
    pub fn hibernation_facts(&self) -> LeaderFacts {
        let merging = self.hib.shared.merging.lock().is_some();
        let installing = self.hib.shared.installing.load(std::sync::atomic::Ordering::Acquire);
        let inflight = self.hib.inflight.load(std::sync::atomic::Ordering::Acquire);
        let idle_for = self.hib.state.lock().idle_for(Instant::now());
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let learners: BTreeSet<u64> = mem.learner_ids().filter(|l| !voters.contains(l)).collect();
        let matched = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect())
            .unwrap_or_default();
        LeaderFacts {
            me: self.id.0,
            is_leader: m.state.is_leader(),
            own_term_applied: m.last_applied.is_some_and(|l| l.leader_id.term == m.current_term),
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            joint: mem.get_joint_config().len() > 1,
            voters,
            learners,
            matched,
            merging,
            installing,
            inflight,
            idle_for,
        }
    }

    /// One pass of the node's hibernate loop over this replica: a waking follower whose grace
    /// passed turns its election timer on; an idle leader polls its followers and sleeps if
    /// every live one agrees. Returns the poll's result, if one ran.
    pub async fn hibernate_pass(&self, down: &BTreeSet<u64>) -> Option<PollResult> {
        let after = self.hib.after?;
        let grace = self.hib.grace;
        self.transition(|h| h.on_loop(Instant::now(), grace));
        if !self.is_leader() || !self.hib.state.lock().may_poll(Instant::now()) {
            return None;
        }
        let facts = self.hibernation_facts();
        if hibernate::decide(&facts, down, after).is_err() {
            return None;
        }
        let (vote, last_log_id) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.vote, m.last_applied)
        };
        let round = {
            let mut st = self.hib.state.lock();
            if !st.may_poll(Instant::now()) {
                return None;
            }
            st.start_poll()
        };
        let targets = hibernate::poll_targets(self.id.0, &facts.voters, down);
        let range = self.hib.shared.range_id;
        let asks = targets.iter().map(|&t| {
            let rpc = RaftRpc::Hibernate(HibernateRequest {
                round,
                vote,
                last_log_id,
            });
            async move {
                let r = self
                    .hib
                    .transport
                    .send_control::<HibernateResponse>(StoreId(t), range, &rpc, CONTROL_TIMEOUT)
                    .await;
                (t, r.is_ok_and(|r| r.accepted))
            }
        });
        let acks: BTreeSet<u64> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(t, ok)| ok.then_some(t))
            .collect();
        let verdict = hibernate::sleep_verdict(self.id.0, &facts.voters, &acks, down);
        let still_leader = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            m.state.is_leader() && m.vote == vote && m.last_log_index == facts.last_log_index
        };
        let mut result = PollResult::Interrupted;
        self.transition(|h| {
            let (r, a) = h.finish_poll(round, verdict, still_leader, Instant::now(), after);
            result = r;
            a
        });
        self.hib.metrics.hibernate_poll(result);
        Some(result)
    }

    /// A leader's `Hibernate`: accepted (and the tick turned off) only if this follower is in
    /// exactly the leader's state (`crate::hibernate::follower_accepts`).
    fn on_hibernate(&self, req: HibernateRequest) -> HibernateResponse {
        let Some(after) = self.hib.after else {
            return HibernateResponse { accepted: false };
        };
        let merging = self.hib.shared.merging.lock().is_some();
        let installing = self.hib.shared.installing.load(std::sync::atomic::Ordering::Acquire);
        let applied_index = self.hib.shared.applied_index.load(std::sync::atomic::Ordering::Acquire);
        let (is_leader, vote, last_log) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            // The metrics carry the last log index only; the applied log id is the last log
            // id exactly when both indexes agree (otherwise no match is possible).
            let last_log = match (m.last_applied, m.last_log_index) {
                (Some(a), Some(i)) if a.index == i => Some(log_pos(&a)),
                (None, None) => None,
                (_, i) => Some((u64::MAX, u64::MAX, i.unwrap_or(u64::MAX))),
            };
            (m.state.is_leader(), vote_pos(&m.vote), last_log)
        };
        let ask = hibernate::HibernateAsk {
            vote: vote_pos(&req.vote),
            last_log: req.last_log_id.as_ref().map(log_pos),
        };
        let mut accepted = false;
        self.transition(|h| {
            let facts = hibernate::FollowerFacts {
                is_leader,
                vote,
                last_log,
                applied_index,
                installing,
                merging,
                recently_active: h.idle_for(Instant::now()) < after,
            };
            match hibernate::follower_accepts(&facts, &ask) {
                Ok(()) => {
                    accepted = true;
                    h.follower_sleeps()
                }
                Err(why) => {
                    tracing::trace!(range_id = %self.hib.shared.range_id, ?why, round = req.round, "hibernate refused");
                    Actions::default()
                }
            }
        });
        HibernateResponse { accepted }
    }

    /// A woken follower asks its leader to wake (every other voter when the leader is not
    /// known, and always at start). If the leader is DOWN or cannot be reached, the lowest
    /// live voter other than it campaigns at once (with Pre-Vote); the others wait for their
    /// grace. Start never campaigns: a restart must not depose a sleeping leader.
    async fn send_wakeups(&self, start: bool, may_campaign: bool) {
        let me = self.id.0;
        if start {
            // Right after `Raft::new` the metrics may not show the membership yet, and the
            // leader's answer (a heartbeat) needs this node to serve: wait for both, then
            // restart the grace.
            let _ = self
                .raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(
                    |m| m.membership_config.membership().voter_ids().next().is_some(),
                    "membership known",
                )
                .await;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self
                .hib
                .node
                .upgrade()
                .is_some_and(|n| n.serving.load(std::sync::atomic::Ordering::Acquire))
            {
                if Instant::now() > deadline || self.hib.node.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.transition(|h| {
                h.rearm(Instant::now());
                Actions::default()
            });
        }
        let down = self.hib.transport.down_stores();
        let (voters, _) = self.voters_and_learners();
        let leader = self.leader_view().leader.map(|s| s.0).filter(|l| *l != me);
        let targets: Vec<u64> = match leader {
            Some(l) if !start => vec![l],
            _ => voters.iter().copied().filter(|v| *v != me).collect(),
        };
        let range = self.hib.shared.range_id;
        let sends = targets.iter().filter(|t| !down.contains(t)).map(|&t| async move {
            if !may_campaign {
                self.hib.transport.pace_wakeup().await;
            }
            let rpc = RaftRpc::WakeUp { from: me };
            let r = self
                .hib
                .transport
                .send_control::<bool>(StoreId(t), range, &rpc, CONTROL_TIMEOUT)
                .await;
            (t, r.is_ok())
        });
        let results = futures::future::join_all(sends).await;
        if !may_campaign || !voters.contains(&me) {
            return;
        }
        let reached_leader = leader.is_some_and(|l| results.iter().any(|(t, ok)| *t == l && *ok));
        if reached_leader || self.is_leader() {
            return;
        }
        if hibernate::campaigns_now(me, &voters, leader, &down) {
            tracing::info!(store_id = %self.id, range_id = %range, ?leader, "leader unreachable after a wake: campaigning (pre-vote)");
            self.hib.metrics.hibernate_campaigns.inc();
            let _ = self.raft.trigger().elect(true).await;
        }
    }

    /// Whether the leader this follower knows answers a WakeUp saying it still leads.
    async fn probe_leader(&self) -> bool {
        let me = self.id.0;
        let Some(leader) = self.leader_view().leader.map(|s| s.0).filter(|l| *l != me) else {
            return false;
        };
        if self.hib.transport.down_stores().contains(&leader) {
            return false;
        }
        let rpc = RaftRpc::WakeUp { from: me };
        self.hib
            .transport
            .send_control::<bool>(StoreId(leader), self.hib.shared.range_id, &rpc, CONTROL_TIMEOUT)
            .await
            .unwrap_or(false)
    }

    /// What a handled Raft message means for hibernation.
    fn after_message(&self, facts: MessageFacts) {
        if self.hib.after.is_none() {
            return;
        }
        let kind = hibernate::message_wake(facts);
        if kind == hibernate::MessageWake::Stay {
            return;
        }
        let is_leader = self.is_leader();
        self.transition(|h| h.on_message(is_leader, kind, Instant::now()));
    }
}

/// Maps a write/membership error; `OutcomeUnknown` only where the entry may have been
/// appended.
/// What a failed `client_write` means to a caller (public for the simulation, `sim/`).
pub fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> RaftOpError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => RaftOpError::NotLeader {
            leader: f.leader_id.map(StoreId),
        },
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => {
            RaftOpError::OutcomeUnknown("leader changed".into())
        }
        RaftError::APIError(ClientWriteError::PreconditionFailed(p)) => RaftOpError::Rejected(p.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
            ChangeMembershipError::InProgress(_) | ChangeMembershipError::UncommittedLeaderLog(_) => {
                RaftOpError::Busy(c.to_string())
            }
            other => RaftOpError::Rejected(other.to_string()),
        },
        other => RaftOpError::OutcomeUnknown(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::LeadershipTracker;

    #[test]
    fn leader_changes_and_elections_are_counted_once_each() {
        let mut t = LeadershipTracker::default();
        // A new group learns its first leader: not a change.
        assert_eq!(t.observe(None, None), (false, false));
        assert_eq!(t.observe(Some(1), None), (false, false));
        // The same leader seen again (a membership change): nothing.
        assert_eq!(t.observe(Some(1), None), (false, false));
        // This replica campaigns in term 2 (seen twice: one election), leader unknown meanwhile.
        assert_eq!(t.observe(None, Some(2)), (false, true));
        assert_eq!(t.observe(None, Some(2)), (false, false));
        // It wins: the leader moved from store 1 to this one (store 3).
        assert_eq!(t.observe(Some(3), None), (true, false));
        // Another election in a higher term, won by store 1 again.
        assert_eq!(t.observe(None, Some(4)), (false, true));
        assert_eq!(t.observe(Some(1), None), (true, false));
    }
}
