//! One range's Raft group behind this crate's own API (ADR 0001).
//!
//! The rest of the crate (node, services, placement client) uses [`RaftGroup`], its views
//! ([`LeaderView`], [`MembershipStamp`]), its errors ([`RaftOpError`], [`InitError`]) and
//! [`RaftConfig`]; only modules under `raft/` name openraft types, so an openraft upgrade
//! touches this directory only.

use super::log_store::LogStore;
use super::network::{NetworkFactory, RaftRpc, SnapshotHeader, Transport, wire};
use super::state_machine::{RangeShared, SnapFile, StateMachine};
use super::{CmdResponse, Command, LogId, Raft, TypeConfig};
use crate::engine::Engine;
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
            ..Default::default()
        };
        let inner = c.validate().map_err(|e| RaftConfigError(e.to_string()))?;
        Ok(Self { inner: Arc::new(inner) })
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
}

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
        let sm = StateMachine::open(p.engine.clone(), p.shared.clone(), p.node, p.snap_dir, p.metrics)
            .map_err(|e| StartError(format!("state machine of {range}: {e}")))?;
        let net = NetworkFactory {
            transport: p.transport,
            shared: p.shared,
        };
        let log = LogStore::new(p.engine, range);
        let raft = Raft::new(p.store_id.0, p.config.inner.clone(), net, log, sm)
            .await
            .map_err(|e| StartError(format!("{range}: {e}")))?;
        Ok(Self {
            raft,
            id: p.store_id,
            lag_threshold: p.config.inner.replication_lag_threshold,
        })
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
        match tokio::time::timeout(timeout, self.raft.client_write(cmd)).await {
            Err(_) => Err(RaftOpError::OutcomeUnknown("proposal timed out".into())),
            Ok(Ok(resp)) => Ok(resp.data),
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
        self.raft
            .trigger()
            .transfer_leader(to.0)
            .await
            .map_err(|e| RaftOpError::OutcomeUnknown(e.to_string()))
    }

    /// Starts an election now (the old leader's node campaigns first after a split).
    pub async fn campaign(&self) {
        let _ = self.raft.trigger().elect(false).await;
    }

    /// Bootstraps the group with `voters` (a brand-new range only).
    pub async fn initialize(&self, voters: BTreeSet<StoreId>) -> Result<(), InitError> {
        let ids: BTreeSet<u64> = voters.into_iter().map(|s| s.0).collect();
        match self.raft.initialize(ids).await {
            Ok(()) => Ok(()),
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
    pub async fn handle_rpc(&self, shared: &RangeShared, rpc: RaftRpc) -> RaftMessageResponse {
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
                let res = self.raft.append_entries(req).await;
                if from_leader && matches!(res, Ok(AppendEntriesResponse::Success)) {
                    shared.leader_contacts.lock().record(received, leader_commit);
                }
                wire(res)
            }
            RaftRpc::Vote(req) => wire(self.raft.vote(req).await),
            RaftRpc::PreVote(req) => wire(self.raft.pre_vote(req).await),
            RaftRpc::TransferLeader(req) => wire(self.raft.handle_transfer_leader(req).await),
        }
    }

    /// Installs a received (and validated) snapshot file.
    pub async fn install_snapshot(&self, header: SnapshotHeader, file: SnapFile) -> RaftMessageResponse {
        let snap = openraft::storage::Snapshot {
            meta: header.meta,
            snapshot: file,
        };
        wire(self.raft.install_full_snapshot(header.vote, snap).await)
    }
}

/// Maps a write/membership error; `OutcomeUnknown` only where the entry may have been
/// appended.
fn write_error(e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> RaftOpError {
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
