//! gRPC services: `Store` (data access and admin on ranges) and `Raft` (transport).

pub mod backup;

use crate::hibernate::WakeReason;
use crate::node::{NodeInner, Replica};
use crate::raft::network::{RaftRpc, ReceiveRefusal, SnapshotHeader};
use crate::raft::state_machine::{SnapFile, validate_snapshot_file};
use crate::raft::{BatchOp, ChangeKind, CmdResponse, Command, MembershipStamp, RaftOpError, WriteOp, WriteOutcome};
use crate::scan::{ScanCursor, ScanStream};
use futures::StreamExt;
use prost::Message;
use skv_common::keys::{cmp_end, desc_contains, in_range};
use skv_common::limits;
use skv_common::{RangeId, StoreId};
use skv_proto::internal::raft_server::Raft as RaftSvc;
use skv_proto::internal::store_server::Store;
use skv_proto::internal::*;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// How long a proposal or a ReadIndex may wait before the outcome is reported unknown.
const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(10);
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request on a range was refused; becomes a `RoutingError` in the response body.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("range {0} not found")]
    RangeNotFound(RangeId),
    #[error("not leader of range {range}")]
    NotLeader {
        range: RangeId,
        leader: Option<StoreId>,
        address: Option<String>,
    },
    #[error("epoch does not match")]
    EpochNotMatch { current: Vec<RangeDescriptor> },
    #[error("key not in range")]
    KeyNotInRange { key: Vec<u8>, desc: RangeDescriptor },
    #[error("server busy")]
    ServerBusy { retry_after_ms: u64 },
}

impl From<StoreError> for RoutingError {
    fn from(e: StoreError) -> Self {
        use routing_error::Kind;
        let message = e.to_string();
        let kind = match e {
            StoreError::RangeNotFound(r) => Kind::RangeNotFound(RangeNotFound { range_id: r.0 }),
            StoreError::NotLeader { range, leader, address } => Kind::NotLeader(NotLeader {
                range_id: range.0,
                leader_store_id: leader.map(|s| s.0).unwrap_or(0),
                leader_address: address.unwrap_or_default(),
            }),
            StoreError::EpochNotMatch { current } => Kind::EpochNotMatch(EpochNotMatch { current }),
            StoreError::KeyNotInRange { key, desc } => Kind::KeyNotInRange(KeyNotInRange {
                key,
                descriptor: Some(desc),
            }),
            StoreError::ServerBusy { retry_after_ms } => Kind::ServerBusy(ServerBusy { retry_after_ms }),
        };
        RoutingError {
            message,
            kind: Some(kind),
        }
    }
}

/// A handler failure: a routing error (in the body) or a gRPC status.
enum Fail {
    Route(Box<StoreError>),
    Status(Status),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Route(Box::new(e))
    }
}
impl From<Status> for Fail {
    fn from(s: Status) -> Self {
        Fail::Status(s)
    }
}
impl From<limits::InputError> for Fail {
    fn from(e: limits::InputError) -> Self {
        Fail::Status(e.into())
    }
}

/// Turns a handler result into a response, routing errors in the body.
fn respond<T, F>(r: Result<T, Fail>, set: F) -> Result<Response<T>, Status>
where
    T: Default,
    F: FnOnce(&mut T, RoutingError),
{
    match r {
        Ok(t) => Ok(Response::new(t)),
        Err(Fail::Route(e)) => {
            let mut t = T::default();
            set(&mut t, (*e).into());
            Ok(Response::new(t))
        }
        Err(Fail::Status(s)) => Err(s),
    }
}

/// Whether an admin request (membership change, leader transfer) was routed with the
/// range's current epoch: both `conf_ver` (membership) and `version` (splits) must match. A
/// stale call (its caller did not see a change) is refused rather than applied on top.
fn admin_epoch_matches(want: RangeEpoch, current: &RangeDescriptor) -> bool {
    current.epoch.unwrap_or_default() == want
}

/// Why a scan cannot be served after its ReadIndex wait.
#[derive(Debug, PartialEq, Eq)]
enum ScanRecheck {
    /// The range's epoch version changed (a split applied) since the request was routed.
    EpochChanged,
    /// The start key is no longer in the range.
    OutOfRange,
}

/// Re-checks a scan against the descriptor current after the ReadIndex wait and returns
/// the exclusive end to scan to (the request end, or the range end when the request is
/// open-ended). The epoch version must still be the one the request was routed with.
fn scan_end_after_read_index(
    start: &[u8],
    end: &[u8],
    want_version: u64,
    desc: &RangeDescriptor,
) -> Result<Vec<u8>, ScanRecheck> {
    if desc.epoch.unwrap_or_default().version != want_version {
        return Err(ScanRecheck::EpochChanged);
    }
    if !in_range(start, &desc.start, &desc.end) && start != desc.start.as_slice() {
        return Err(ScanRecheck::OutOfRange);
    }
    // Same version: the range has the bounds the request was checked against, so this
    // only turns an open end into the range end.
    Ok(
        if end.is_empty() || cmp_end(end, &desc.end) == std::cmp::Ordering::Greater {
            desc.end.clone()
        } else {
            end.to_vec()
        },
    )
}

#[derive(Clone)]
pub struct StoreService {
    pub node: Arc<NodeInner>,
    pub max_value_len: usize,
    /// Largest response body this service may send (its max encoding message size).
    pub max_response_len: usize,
}

/// Converts a request's write (key, op, condition) into a command op, with the checks of a
/// single write: key and value sizes, op present.
fn write_op(
    key: Vec<u8>,
    op: Option<WriteOp>,
    condition: Option<Condition>,
    max_value_len: usize,
) -> Result<BatchOp, Fail> {
    limits::check_internal_key(&key)?;
    let op = op.ok_or_else(|| Status::invalid_argument("missing op"))?;
    if let WriteOp::Put(v) = &op {
        limits::check_value(v, max_value_len)?;
    }
    let condition = condition
        .and_then(|c| c.kind)
        .map(|condition::Kind::VersionEquals(v)| v);
    Ok(BatchOp { key, op, condition })
}

fn op_bytes(o: &BatchOp) -> usize {
    o.key.len()
        + match &o.op {
            WriteOp::Put(v) => v.len(),
            WriteOp::Delete => 0,
        }
}

impl StoreService {
    fn span(&self, name: &'static str, header: Option<&RequestHeader>) -> tracing::Span {
        let range_id = header.map(|h| h.range_id).unwrap_or(0);
        tracing::debug_span!("store", op = name, store_id = %self.node.store_id, range_id)
    }

    /// Runs one request handler in its span and records the per-method request metrics
    /// (count by outcome, latency).
    async fn run<T>(
        &self,
        rpc: &'static str,
        span: tracing::Span,
        fut: impl std::future::Future<Output = Result<T, Fail>>,
    ) -> Result<T, Fail> {
        let started = std::time::Instant::now();
        let r = fut.instrument(span).await;
        let outcome = match &r {
            Ok(_) => crate::metrics::Outcome::Ok,
            Err(Fail::Route(_)) => crate::metrics::Outcome::RoutingError,
            Err(Fail::Status(_)) => crate::metrics::Outcome::Error,
        };
        self.node.metrics.observe_request(rpc, outcome, started.elapsed());
        r
    }

    fn not_leader(&self, range: RangeId, leader: Option<StoreId>) -> StoreError {
        let leader = leader.filter(|l| *l != self.node.store_id);
        StoreError::NotLeader {
            range,
            address: leader.and_then(|l| self.node.transport.address(l)),
            leader,
        }
    }

    /// Finds the replica and checks the header epoch.
    fn route(&self, header: Option<&RequestHeader>) -> Result<(Arc<Replica>, RangeDescriptor), Fail> {
        let header = header.ok_or_else(|| Status::invalid_argument("missing header"))?;
        let id = RangeId(header.range_id);
        let r = self.replica_or_retired(id)?;
        if !r.shared.is_initialized() {
            return Err(StoreError::RangeNotFound(id).into());
        }
        // Any request may need the range: wake it if it sleeps (ADR 0018).
        self.node.touch(&r, WakeReason::Request);
        let desc = r.shared.desc();
        let want = header.epoch.unwrap_or_default().version;
        let have = desc.epoch.unwrap_or_default().version;
        if want != have {
            return Err(StoreError::EpochNotMatch {
                current: self.node.current_descriptors(&desc, want),
            }
            .into());
        }
        // After the epoch: a caller with an old view gets the descriptors it needs, not a
        // ServerBusy it would retry for the whole merge.
        Self::check_not_frozen(&r)?;
        Ok((r, desc))
    }

    /// The local replica of `id`; for a range retired by a merge, EpochNotMatch with the
    /// range that absorbed it (so the caller re-routes); else RangeNotFound.
    fn replica_or_retired(&self, id: RangeId) -> Result<Arc<Replica>, Fail> {
        if let Some(r) = self.node.replica(id)
            && !self.node.gc_pending(id)
        {
            return Ok(r);
        }
        let target = self.node.retired.lock().get(&id).copied();
        if let Some(t) = target.and_then(|t| self.node.replica(t)) {
            let d = t.shared.desc();
            return Err(StoreError::EpochNotMatch {
                current: self.node.current_descriptors(&d, 0),
            }
            .into());
        }
        Err(StoreError::RangeNotFound(id).into())
    }

    /// A range frozen by a merge admits no request until the merge commits (it is then
    /// retired) or rolls back.
    fn check_not_frozen(r: &Replica) -> Result<(), Fail> {
        if r.shared.merging.lock().is_some() {
            return Err(StoreError::ServerBusy { retry_after_ms: 50 }.into());
        }
        Ok(())
    }

    /// Whether a `stale_ok` read may be served here (ADR 0008, [`crate::raft::RaftGroup::stale_read_allowed`]).
    /// Otherwise the caller gets NotLeader and goes to the leader (a partitioned or lagging
    /// replica must not serve arbitrarily old data).
    fn may_serve_stale(&self, r: &Replica) -> bool {
        r.raft
            .stale_read_allowed(&r.shared, self.node.raft_config.stale_read_bound())
    }

    async fn read_index(&self, r: &Replica) -> Result<(), Fail> {
        r.raft
            .read_index(PROPOSAL_TIMEOUT)
            .await
            .map_err(|e| self.op_error(r, e))
    }

    async fn propose(&self, r: &Replica, cmd: Command) -> Result<CmdResponse, Fail> {
        if !r.is_leader() {
            return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
        }
        self.node.metrics.proposals.inc();
        r.raft
            .propose(cmd, PROPOSAL_TIMEOUT)
            .await
            .map_err(|e| self.op_error(r, e))
    }

    /// Maps a Raft operation error: routing errors only where nothing was applied (ADR 0006).
    fn op_error(&self, r: &Replica, e: RaftOpError) -> Fail {
        let id = r.shared.range_id;
        match e {
            RaftOpError::NotLeader { leader } => self.not_leader(id, leader).into(),
            RaftOpError::StaleMembership => {
                let (desc, _) = r.shared.desc_and_stamp();
                let want = desc.epoch.unwrap_or_default().version;
                StoreError::EpochNotMatch {
                    current: self.node.current_descriptors(&desc, want),
                }
                .into()
            }
            RaftOpError::Busy(_) => StoreError::ServerBusy { retry_after_ms: 100 }.into(),
            RaftOpError::Rejected(m) => Status::failed_precondition(m).into(),
            RaftOpError::Unavailable(m) => Status::unavailable(m).into(),
            RaftOpError::OutcomeUnknown(m) => Status::unavailable(format!("write outcome unknown: {m}")).into(),
        }
    }

    fn decode_resp(&self, resp: CmdResponse) -> Result<CmdResponse, Fail> {
        match resp {
            CmdResponse::KeyNotInRange(d) => {
                let desc = RangeDescriptor::decode(&d[..]).unwrap_or_default();
                Err(StoreError::EpochNotMatch {
                    current: self.node.current_descriptors(&desc, 0),
                }
                .into())
            }
            CmdResponse::EpochNotMatch(d) => {
                let desc = RangeDescriptor::decode(&d[..]).unwrap_or_default();
                Err(StoreError::EpochNotMatch {
                    current: self.node.current_descriptors(&desc, 0),
                }
                .into())
            }
            CmdResponse::Rejected(m) => Err(Status::invalid_argument(m).into()),
            other => Ok(other),
        }
    }

    async fn get(&self, req: StoreGetRequest) -> Result<StoreGetResponse, Fail> {
        limits::check_internal_key(&req.key)?;
        let (r, desc) = self.route(req.header.as_ref())?;
        if !desc_contains(&desc, &req.key) {
            return Err(StoreError::KeyNotInRange { key: req.key, desc }.into());
        }
        // A stale read is served locally when ADR 0008 allows it; else a follower refuses
        // it, and a leader whose quorum contact aged (it slept, ADR 0018) confirms it with a
        // ReadIndex round rather than answering NotLeader naming itself.
        if !(crate::failpoints::skip_read_index() || req.stale_ok && self.may_serve_stale(&r)) {
            if req.stale_ok && !r.is_leader() {
                return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
            }
            self.read_index(&r).await?;
            let desc = r.shared.desc();
            if !desc_contains(&desc, &req.key) {
                return Err(StoreError::KeyNotInRange { key: req.key, desc }.into());
            }
        }
        let v = self
            .node
            .engine
            .get_data(&req.key)
            .map_err(|e| Status::internal(e.to_string()))?;
        r.shared
            .record_read(&req.key, req.key.len() + v.as_ref().map(|x| x.1.len()).unwrap_or(0));
        Ok(match v {
            Some((version, value)) => StoreGetResponse {
                routing_error: None,
                found: true,
                value,
                version,
            },
            None => StoreGetResponse::default(),
        })
    }

    async fn write(&self, req: StoreWriteRequest) -> Result<StoreWriteResponse, Fail> {
        let op = req.op.map(|o| match o {
            store_write_request::Op::Put(v) => WriteOp::Put(v),
            store_write_request::Op::Delete(_) => WriteOp::Delete,
        });
        let o = write_op(req.key, op, req.condition, self.max_value_len)?;
        let (r, desc) = self.route(req.header.as_ref())?;
        if !desc_contains(&desc, &o.key) {
            return Err(StoreError::KeyNotInRange { key: o.key, desc }.into());
        }
        r.shared.record_write(&o.key, op_bytes(&o));
        let cmd = Command::Write {
            key: o.key,
            op: o.op,
            condition: o.condition,
            epoch_version: desc.epoch.unwrap_or_default().version,
        };
        let resp = self.propose(&r, cmd).await?;
        match self.decode_resp(resp)? {
            CmdResponse::Write {
                succeeded,
                version,
                existed,
            } => Ok(StoreWriteResponse {
                routing_error: None,
                succeeded,
                version,
                existed,
            }),
            other => Err(Status::internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    /// Scan, first phase: route, check the bounds, ReadIndex. Nothing is read yet.
    async fn scan_prepare(&self, req: &StoreScanRequest) -> Result<Arc<Replica>, Fail> {
        let (r, desc) = self.route(req.header.as_ref())?;
        let start_ok = req.start.as_slice() >= desc.start.as_slice() && (desc.end.is_empty() || req.start < desc.end);
        let end_ok =
            !req.end.is_empty() && cmp_end(&req.end, &desc.end) != std::cmp::Ordering::Greater || req.end.is_empty();
        if !start_ok || !end_ok {
            return Err(StoreError::KeyNotInRange {
                key: req.start.clone(),
                desc,
            }
            .into());
        }
        self.read_index(&r).await?;
        Ok(r)
    }

    /// Scan, second phase: take ONE engine snapshot, THEN re-check the range. Epochs only
    /// grow, and a split publishes the shortened descriptor before any other range can write
    /// into the span it gave away, so a check that passes after the snapshot was taken proves
    /// the snapshot was taken while this replica still owned the whole span: the scan is a
    /// consistent cut at a point after the ReadIndex. If a split applied after the ReadIndex,
    /// the answer is EpochNotMatch — never a silently truncated or stale result.
    fn scan_open(&self, r: &Replica, req: &StoreScanRequest) -> Result<ScanCursor, Fail> {
        let snap = self.node.engine.db.snapshot();
        if r.shared.installing.load(std::sync::atomic::Ordering::Acquire) {
            // Lost leadership and is installing a snapshot: the data may be half-replaced.
            return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
        }
        let want = req.header.as_ref().and_then(|h| h.epoch).unwrap_or_default().version;
        let desc = r.shared.desc();
        let end = scan_end_after_read_index(&req.start, &req.end, want, &desc).map_err(|e| match e {
            ScanRecheck::EpochChanged => StoreError::EpochNotMatch {
                current: self.node.current_descriptors(&desc, want),
            },
            ScanRecheck::OutOfRange => StoreError::KeyNotInRange {
                key: req.start.clone(),
                desc: desc.clone(),
            },
        })?;
        Ok(ScanCursor::new(
            &self.node.engine,
            snap,
            req.start.clone(),
            end,
            req.limit,
        ))
    }

    async fn batch_get(&self, req: StoreBatchGetRequest) -> Result<StoreBatchGetResponse, Fail> {
        for k in &req.keys {
            limits::check_internal_key(k)?;
        }
        let (r, desc) = self.route(req.header.as_ref())?;
        let outside = |desc: &RangeDescriptor| req.keys.iter().find(|k| !desc_contains(desc, k)).cloned();
        if let Some(key) = outside(&desc) {
            return Err(StoreError::KeyNotInRange { key, desc }.into());
        }
        // As `get`: stale locally when allowed, else a follower refuses, a leader confirms.
        if !(crate::failpoints::skip_read_index() || req.stale_ok && self.may_serve_stale(&r)) {
            if req.stale_ok && !r.is_leader() {
                return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
            }
            self.read_index(&r).await?;
        }
        // One snapshot for all keys, then the range re-check (as a scan does).
        let snap = self.node.engine.db.snapshot();
        if r.shared.installing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
        }
        let desc = r.shared.desc();
        if let Some(key) = outside(&desc) {
            return Err(StoreError::KeyNotInRange { key, desc }.into());
        }
        let engine = self.node.engine.clone();
        let keys = req.keys;
        let budget = self.max_response_len;
        let read = tokio::task::spawn_blocking(move || -> Result<(Vec<Vec<u8>>, Vec<StoreGetResult>), Status> {
            use fjall::Readable;
            let mut out = Vec::with_capacity(keys.len());
            let mut bytes = 0usize;
            for k in &keys {
                let v = snap
                    .get(&engine.data, k)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .and_then(|v| crate::engine::decode_value(&v));
                out.push(match v {
                    Some((version, value)) => {
                        bytes += value.len() + 16;
                        StoreGetResult {
                            found: true,
                            value,
                            version,
                        }
                    }
                    None => StoreGetResult::default(),
                });
                if bytes > budget {
                    return Err(Status::resource_exhausted(format!(
                        "batch get result exceeds {budget} bytes; ask for fewer keys"
                    )));
                }
            }
            Ok((keys, out))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        let (keys, results) = read;
        for (k, res) in keys.iter().zip(&results) {
            r.shared.record_read(k, k.len() + res.value.len());
        }
        Ok(StoreBatchGetResponse {
            routing_error: None,
            results,
        })
    }

    async fn batch_write(&self, req: StoreBatchWriteRequest) -> Result<StoreBatchWriteResponse, Fail> {
        let mut ops = Vec::with_capacity(req.ops.len());
        for o in req.ops {
            let op = o.op.map(|x| match x {
                store_write_op::Op::Put(v) => WriteOp::Put(v),
                store_write_op::Op::Delete(_) => WriteOp::Delete,
            });
            ops.push(write_op(o.key, op, o.condition, self.max_value_len)?);
        }
        let (r, desc) = self.route(req.header.as_ref())?;
        // Every key is checked before anything is proposed: a routing error means nothing
        // was applied.
        if let Some(o) = ops.iter().find(|o| !desc_contains(&desc, &o.key)) {
            return Err(StoreError::KeyNotInRange {
                key: o.key.clone(),
                desc,
            }
            .into());
        }
        if ops.is_empty() {
            return Ok(StoreBatchWriteResponse::default());
        }
        for o in &ops {
            r.shared.record_write(&o.key, op_bytes(o));
        }
        let n = ops.len();
        let cmd = Command::Batch {
            ops,
            epoch_version: desc.epoch.unwrap_or_default().version,
        };
        match self.decode_resp(self.propose(&r, cmd).await?)? {
            CmdResponse::Batch(outcomes) if outcomes.len() == n => Ok(StoreBatchWriteResponse {
                routing_error: None,
                results: outcomes
                    .into_iter()
                    .map(
                        |WriteOutcome {
                             succeeded,
                             version,
                             existed,
                         }| StoreWriteResult {
                            succeeded,
                            version,
                            existed,
                        },
                    )
                    .collect(),
            }),
            other => Err(Status::internal(format!("unexpected apply result {other:?}")).into()),
        }
    }

    /// The replica of an admin request, which must be this range's leader and whose epoch
    /// (`conf_ver` and `version`) must be the current one; with the descriptor and the stamp
    /// of the membership it reflects, read together.
    fn admin_route(
        &self,
        header: Option<&RequestHeader>,
    ) -> Result<(Arc<Replica>, RangeDescriptor, MembershipStamp), Fail> {
        let header = header.ok_or_else(|| Status::invalid_argument("missing header"))?;
        let id = RangeId(header.range_id);
        let r = self.replica_or_retired(id)?;
        if !r.shared.is_initialized() {
            return Err(StoreError::RangeNotFound(id).into());
        }
        self.node.touch(&r, WakeReason::Admin);
        // (A range frozen by a merge may still move its leadership, so that a merge left
        // half-way can be colocated and driven on; other admin calls check it.)
        // Only the leader's descriptor is authoritative for membership (a follower's may lag).
        if !r.is_leader() {
            return Err(self.not_leader(id, r.leader_view().leader).into());
        }
        let (desc, stamp) = r.shared.desc_and_stamp();
        let want = header.epoch.unwrap_or_default();
        if !admin_epoch_matches(want, &desc) {
            return Err(StoreError::EpochNotMatch {
                current: self.node.current_descriptors(&desc, want.version),
            }
            .into());
        }
        Ok((r, desc, stamp))
    }

    async fn change_replicas(&self, req: ChangeReplicasRequest) -> Result<ChangeReplicasResponse, Fail> {
        let mut changes = Vec::with_capacity(req.changes.len());
        for c in &req.changes {
            let kind =
                replica_change::Kind::try_from(c.kind).map_err(|_| Status::invalid_argument("bad change kind"))?;
            let kind = match kind {
                replica_change::Kind::AddVoter => ChangeKind::AddVoter,
                replica_change::Kind::AddLearner => ChangeKind::AddLearner,
                replica_change::Kind::Remove => ChangeKind::Remove,
            };
            changes.push((StoreId(c.store_id), kind));
        }
        let (r, desc, stamp) = self.admin_route(req.header.as_ref())?;
        Self::check_not_frozen(&r)?;
        self.node
            .record_addresses(&req.stores)
            .map_err(|e| Status::internal(e.to_string()))?;
        // The epoch check above is against the applied descriptor; the stamp makes the Raft
        // core propose only while the effective membership is still the one that descriptor
        // reflects, so two calls with the same epoch (even on two successive leaders) cannot
        // both apply. A learner catching up by snapshot may take a while; never hang.
        match r.raft.change_replicas(&changes, stamp, MEMBERSHIP_TIMEOUT).await {
            Ok(()) => {}
            Err(RaftOpError::StaleMembership) => {
                // Another change went first. Not applied: EpochNotMatch once it shows in the
                // descriptor, ServerBusy (retry shortly) while it is still being applied.
                let now = r.shared.desc();
                if now.epoch == desc.epoch {
                    return Err(StoreError::ServerBusy { retry_after_ms: 100 }.into());
                }
                let want = desc.epoch.unwrap_or_default().version;
                return Err(StoreError::EpochNotMatch {
                    current: self.node.current_descriptors(&now, want),
                }
                .into());
            }
            Err(e) => return Err(self.op_error(&r, e)),
        }
        Ok(ChangeReplicasResponse {
            routing_error: None,
            descriptor: Some(r.shared.desc()),
        })
    }

    async fn transfer_leader(&self, req: TransferLeaderRequest) -> Result<TransferLeaderResponse, Fail> {
        let (r, _, _) = self.admin_route(req.header.as_ref())?;
        r.raft
            .transfer_leader(StoreId(req.to_store_id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(TransferLeaderResponse::default())
    }

    /// MergeRanges (ADR 0016): on the leader of both ranges; the target (left) absorbs the
    /// source (right neighbour). Runs as its own task: a caller that goes away does not
    /// stop it half-way.
    async fn merge(&self, req: MergeRangesRequest) -> Result<MergeRangesResponse, Fail> {
        let me = self.clone();
        tokio::spawn(async move { me.merge_inner(req).await })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Drives on a merge whose source is frozen for `target` (resolver): the same path as a
    /// MergeRanges call that finds the source already frozen.
    pub async fn resume_merge(&self, target: RangeDescriptor, source: RangeDescriptor) -> Result<(), String> {
        let req = MergeRangesRequest {
            header: Some(RequestHeader {
                range_id: target.range_id,
                epoch: target.epoch,
            }),
            source: Some(source),
        };
        match self.merge_inner(req).await {
            Ok(r) if r.merged.is_some() => Ok(()),
            Ok(_) => Err("no merged descriptor".into()),
            Err(Fail::Route(e)) => Err(e.to_string()),
            Err(Fail::Status(s)) => Err(s.to_string()),
        }
    }

    async fn merge_inner(&self, req: MergeRangesRequest) -> Result<MergeRangesResponse, Fail> {
        let want_src = req
            .source
            .ok_or_else(|| Status::invalid_argument("missing source descriptor"))?;
        let _driver = self.node.merge_lock.lock().await;
        let (t, tdesc, _) = self.admin_route(req.header.as_ref())?;
        Self::check_not_frozen(&t)?;
        if want_src.range_id == tdesc.range_id {
            return Err(Status::invalid_argument("a range cannot merge with itself").into());
        }
        let te = tdesc.epoch.unwrap_or_default();
        let src_id = RangeId(want_src.range_id);
        // A merge into this target prepared earlier (its caller went away, or a leader
        // changed) is driven on from its frozen state.
        let resume = self.node.replica(src_id).and_then(|r| {
            let m = r.shared.merging.lock().clone()?;
            (m.target_id == tdesc.range_id && m.target_version == te.version && m.target_conf_ver == te.conf_ver)
                .then_some((r, m))
        });
        // Rolling back is only safe when no CommitMerge for this freeze can still apply: a
        // resumed merge may have proposed one before (outcome unknown), so it only rolls back
        // when the target refused the commit (its epoch moved: no such commit can apply).
        let resumed = resume.is_some();
        let (s, sdesc, frozen, index) = if let Some((s, m)) = resume {
            if !s.is_leader() {
                return Err(self.not_leader(src_id, s.leader_view().leader).into());
            }
            let d = s.shared.desc();
            let enc = d.encode_to_vec();
            (s, d, enc, m.frozen_index)
        } else {
            let src_header = RequestHeader {
                range_id: want_src.range_id,
                epoch: want_src.epoch,
            };
            let (s, sdesc, _) = self.admin_route(Some(&src_header))?;
            if tdesc.end.is_empty() || tdesc.end != sdesc.start {
                return Err(Status::failed_precondition(format!(
                    "range {} is not the right neighbour of range {}",
                    sdesc.range_id, tdesc.range_id
                ))
                .into());
            }
            let (tv, tl) = t.raft.voters_and_learners();
            let (sv, sl) = s.raft.voters_and_learners();
            if tv != sv || !tl.is_empty() || !sl.is_empty() {
                return Err(Status::failed_precondition(
                    "both ranges must have the same voters and no learners (colocate them first)",
                )
                .into());
            }
            let se = sdesc.epoch.unwrap_or_default();
            let prepare = Command::PrepareMerge {
                target_id: tdesc.range_id,
                epoch_version: se.version,
                epoch_conf_ver: se.conf_ver,
                target_version: te.version,
                target_conf_ver: te.conf_ver,
            };
            match self.decode_resp(self.propose(&s, prepare).await?)? {
                CmdResponse::Frozen { desc, index } => (s, sdesc, desc, index),
                other => return Err(Status::internal(format!("unexpected apply result {other:?}")).into()),
            }
        };
        let (tid, sid) = (tdesc.range_id, sdesc.range_id);
        let rollback = |why: String| {
            let s = s.clone();
            async move {
                if self.node.retired.lock().contains_key(&RangeId(sid)) {
                    return why; // absorbed after all (by a concurrent call): nothing to undo
                }
                tracing::warn!(store_id = %self.node.store_id, range_id = tid, source = sid, why, "merge rolled back");
                let cmd = Command::RollbackMerge { target_id: tid };
                if let Ok(CmdResponse::None) = s.raft.propose(cmd, PROPOSAL_TIMEOUT).await {
                    self.node.metrics.merge_rollbacks.inc();
                }
                why
            }
        };
        // Every voter of the source holds the frozen entry (durably) before the target
        // commits: each replica's CommitMerge then only waits for its local apply.
        if !s.raft.wait_replicated(index, PROPOSAL_TIMEOUT).await {
            if resumed {
                return Err(Status::unavailable(
                    "merge pending: the source's replicas have not all received the PrepareMerge yet",
                )
                .into());
            }
            let why = rollback("the source's replicas did not all receive the PrepareMerge".into()).await;
            return Err(Status::unavailable(format!("merge not done: {why}")).into());
        }
        let commit = Command::CommitMerge {
            source: frozen,
            frozen_index: index,
            epoch_version: te.version,
            epoch_conf_ver: te.conf_ver,
        };
        match t.raft.propose(commit, PROPOSAL_TIMEOUT).await {
            Ok(CmdResponse::Merged(m)) => Ok(MergeRangesResponse {
                routing_error: None,
                merged: Some(
                    RangeDescriptor::decode(&m[..])
                        .map_err(|e| Status::internal(format!("merged descriptor does not decode: {e}")))?,
                ),
            }),
            Ok(CmdResponse::EpochNotMatch(_)) | Ok(CmdResponse::Rejected(_)) => {
                // Refused by every replica (the same log). If the target moved because it
                // absorbed the source already (a concurrent call for the same merge), that
                // is the answer; otherwise the merge can never commit: undo it.
                let now = t.shared.desc();
                if crate::merge::covers(&now, &sdesc) || self.node.retired.lock().contains_key(&RangeId(sid)) {
                    return Ok(MergeRangesResponse {
                        routing_error: None,
                        merged: Some(now),
                    });
                }
                rollback("the target changed before the commit".into()).await;
                let d = t.shared.desc();
                Err(StoreError::EpochNotMatch {
                    current: self.node.current_descriptors(&d, te.version),
                }
                .into())
            }
            Ok(other) => Err(Status::internal(format!("unexpected apply result {other:?}")).into()),
            Err(RaftOpError::NotLeader { .. }) | Err(RaftOpError::Busy(_)) | Err(RaftOpError::Rejected(_))
                if !resumed =>
            {
                // Not proposed: undo.
                let why = rollback("the target's CommitMerge could not be proposed".into()).await;
                Err(Status::unavailable(format!("merge not done: {why}")).into())
            }
            Err(e) => {
                // It may still commit: the source stays frozen; the resolver rolls it back
                // if the target's epoch moves without absorbing it.
                Err(self.op_error(&t, e))
            }
        }
    }

    async fn split(&self, mut req: SplitRangeRequest) -> Result<SplitRangeResponse, Fail> {
        if req.new_range_id == 0 {
            return Err(Status::invalid_argument("new_range_id must be set").into());
        }
        if req.split_key.is_empty() {
            // Split by size: the leader picks the key that halves the range's live bytes.
            let (r, desc) = self.route(req.header.as_ref())?;
            if !r.is_leader() {
                return Err(self.not_leader(r.shared.range_id, r.leader_view().leader).into());
            }
            let engine = self.node.engine.clone();
            let (start, end) = (desc.start.clone(), desc.end.clone());
            let key = tokio::task::spawn_blocking(move || crate::stats::size_median_key(&engine, &start, &end))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
            req.split_key = key.ok_or_else(|| {
                Status::failed_precondition(format!(
                    "range {} holds fewer than 2 keys: no split key halves it",
                    desc.range_id
                ))
            })?;
        }
        limits::check_internal_key(&req.split_key)?;
        let (r, desc) = self.route(req.header.as_ref())?;
        if !desc_contains(&desc, &req.split_key) || req.split_key == desc.start {
            return Err(StoreError::KeyNotInRange {
                key: req.split_key,
                desc,
            }
            .into());
        }
        if self.node.replica(RangeId(req.new_range_id)).is_some() {
            return Err(Status::already_exists("new range id already in use").into());
        }
        let cmd = Command::Split {
            split_key: req.split_key,
            new_range_id: req.new_range_id,
            epoch_version: desc.epoch.unwrap_or_default().version,
        };
        match self.decode_resp(self.propose(&r, cmd).await?)? {
            CmdResponse::Split { left, right } => Ok(SplitRangeResponse {
                routing_error: None,
                left: RangeDescriptor::decode(&left[..]).ok(),
                right: RangeDescriptor::decode(&right[..]).ok(),
            }),
            other => Err(Status::internal(format!("unexpected apply result {other:?}")).into()),
        }
    }
}

#[tonic::async_trait]
impl Store for StoreService {
    async fn get(&self, request: Request<StoreGetRequest>) -> Result<Response<StoreGetResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("get", req.header.as_ref());
        respond(self.run("get", span, self.get(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    async fn write(&self, request: Request<StoreWriteRequest>) -> Result<Response<StoreWriteResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("write", req.header.as_ref());
        respond(self.run("write", span, self.write(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    type ScanStream = ScanStream;

    async fn scan(&self, request: Request<StoreScanRequest>) -> Result<Response<ScanStream>, Status> {
        let arrived = tokio::time::Instant::now();
        let deadline = crate::scan::deadline(request.metadata(), arrived);
        let req = request.into_inner();
        let span = self.span("scan", req.header.as_ref());
        let opened = async {
            let r = self.scan_prepare(&req).await?;
            let cursor = self.scan_open(&r, &req)?;
            // A scan counts as one read of its start key in the load sample.
            r.shared.record_read(&req.start, 0);
            Ok(cursor)
        };
        let r = self.run("scan", span, opened).await;
        match r {
            Ok(cursor) => Ok(Response::new(crate::scan::stream(
                cursor,
                deadline,
                self.node.metrics.scans_open.clone(),
            ))),
            Err(Fail::Route(e)) => Ok(Response::new(crate::scan::routing_error_stream((*e).into()))),
            Err(Fail::Status(s)) => Err(s),
        }
    }

    async fn batch_get(
        &self,
        request: Request<StoreBatchGetRequest>,
    ) -> Result<Response<StoreBatchGetResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("batch_get", req.header.as_ref());
        respond(self.run("batch_get", span, self.batch_get(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    async fn batch_write(
        &self,
        request: Request<StoreBatchWriteRequest>,
    ) -> Result<Response<StoreBatchWriteResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("batch_write", req.header.as_ref());
        respond(self.run("batch_write", span, self.batch_write(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    async fn create_replica(
        &self,
        request: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        let req = request.into_inner();
        let desc = req
            .descriptor
            .ok_or_else(|| Status::invalid_argument("missing descriptor"))?;
        if desc.range_id == 0 {
            return Err(Status::invalid_argument("range id 0"));
        }
        if let Some(e) = &desc.epoch {
            limits::check_epoch(e.version, e.conf_ver)?;
        }
        self.node
            .record_addresses(&req.stores)
            .map_err(|e| Status::internal(e.to_string()))?;
        let span = tracing::info_span!("create_replica", store_id = %self.node.store_id, range_id = desc.range_id);
        self.node
            .create_replica(desc, req.bootstrap)
            .instrument(span)
            .await
            .map_err(|e| match e {
                crate::node::CreateReplicaError::NoVoter
                | crate::node::CreateReplicaError::Init(crate::raft::InitError::NotAVoter(_)) => {
                    Status::invalid_argument(e.to_string())
                }
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(CreateReplicaResponse {}))
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("change_replicas", req.header.as_ref());
        respond(
            self.run("change_replicas", span, self.change_replicas(req)).await,
            |t, e| t.routing_error = Some(e),
        )
    }

    async fn split_range(&self, request: Request<SplitRangeRequest>) -> Result<Response<SplitRangeResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("split_range", req.header.as_ref());
        respond(self.run("split_range", span, self.split(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("transfer_leader", req.header.as_ref());
        respond(
            self.run("transfer_leader", span, self.transfer_leader(req)).await,
            |t, e| t.routing_error = Some(e),
        )
    }

    async fn merge_ranges(
        &self,
        request: Request<MergeRangesRequest>,
    ) -> Result<Response<MergeRangesResponse>, Status> {
        let req = request.into_inner();
        let span = self.span("merge_ranges", req.header.as_ref());
        respond(self.run("merge_ranges", span, self.merge(req)).await, |t, e| {
            t.routing_error = Some(e)
        })
    }

    async fn list_replicas(
        &self,
        _request: Request<ListReplicasRequest>,
    ) -> Result<Response<ListReplicasResponse>, Status> {
        let replicas = self
            .node
            .replicas()
            .into_iter()
            .map(|r| {
                let v = r.leader_view();
                ReplicaStatus {
                    descriptor: Some(r.shared.desc()),
                    leader_store_id: v.leader.map_or(0, |s| s.0),
                    term: v.term,
                    applied_index: r.shared.applied_index.load(std::sync::atomic::Ordering::Acquire),
                }
            })
            .collect();
        Ok(Response::new(ListReplicasResponse {
            store_id: self.node.store_id.0,
            replicas,
        }))
    }
}

#[derive(Clone)]
pub struct RaftService {
    pub node: Arc<NodeInner>,
    /// Bounds of a snapshot receive (size cap, deadline; ADR 0029).
    pub receive_limits: crate::raft::network::ReceiveLimits,
}

fn wire_err(e: impl Into<String>) -> Response<RaftMessageResponse> {
    Response::new(RaftMessageResponse {
        payload: Vec::new(),
        error: e.into(),
    })
}

impl RaftService {
    /// Counts and logs a refused snapshot receive; the status its sender gets.
    fn refuse_snapshot(&self, range: RangeId, e: ReceiveRefusal) -> Status {
        self.node
            .metrics
            .snapshot_receives_refused
            .get_or_create(&crate::metrics::Reason { reason: e.reason() })
            .inc();
        tracing::warn!(store_id = %self.node.store_id, range_id = %range, error = %e, "snapshot receive refused");
        e.status()
    }

    async fn peer(&self, msg: &RaftMessage) -> Result<Arc<Replica>, String> {
        if msg.to_store_id != self.node.store_id.0 {
            return Err(format!(
                "message for store {} reached store {}",
                msg.to_store_id, self.node.store_id
            ));
        }
        let id = RangeId(msg.range_id);
        self.node
            .get_or_create_peer(id, msg.descriptor.clone(), StoreId(msg.from_store_id))
            .await
            .ok_or_else(|| format!("range {id} not found"))
    }
}

#[tonic::async_trait]
impl RaftSvc for RaftService {
    async fn send(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessageResponse>, Status> {
        let msg = request.into_inner();
        let rpc = match RaftRpc::decode(&msg.payload) {
            Ok(r) => r,
            Err(e) => return Ok(wire_err(format!("bad raft payload: {e}"))),
        };
        // A hibernation control message is for an existing replica only.
        let r = if rpc.is_control() {
            match self.node.replica(RangeId(msg.range_id)) {
                Some(r) if msg.to_store_id == self.node.store_id.0 => r,
                _ => return Ok(wire_err(format!("range {} not found", msg.range_id))),
            }
        } else {
            match self.peer(&msg).await {
                Ok(r) => r,
                Err(e) => return Ok(wire_err(e)),
            }
        };
        Ok(Response::new(
            r.raft.handle_rpc(&r.shared, rpc, msg.sender_applied_index).await,
        ))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessageResponse>, Status> {
        let mut stream = request.into_inner();
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => return Err(s),
            None => return Ok(wire_err("empty snapshot stream")),
        };
        let Some(msg) = first.header else {
            return Ok(wire_err("first snapshot chunk has no header"));
        };
        let header = match SnapshotHeader::decode(&msg.payload) {
            Ok(h) => h,
            Err(e) => return Ok(wire_err(format!("bad snapshot header: {e}"))),
        };
        // At most MAX_SNAPSHOT_RECEIVES streams at once (each may hold up to the receive cap
        // on disk): more is refused before anything is created or written; the sender retries.
        let Ok(_receiving) = self.node.snapshot_receives.clone().try_acquire_owned() else {
            let e = ReceiveRefusal::Busy(crate::node::MAX_SNAPSHOT_RECEIVES);
            return Err(self.refuse_snapshot(RangeId(msg.range_id), e));
        };
        let r = match self.peer(&msg).await {
            Ok(r) => r,
            Err(e) => return Ok(wire_err(e)),
        };
        let id = r.shared.range_id;
        let started = std::time::Instant::now();
        // Early refusal from the sender's descriptor, before streaming the data.
        if let Some(d) = msg.descriptor.as_ref()
            && let Some(other) = self.node.overlapping_live(id, &d.start, &d.end)
        {
            tracing::info!(store_id = %self.node.store_id, range_id = %id, overlapping = %other, "refusing overlapping snapshot until the split applies");
            return Ok(wire_err(format!("snapshot of {id} overlaps live range {other}")));
        }
        if let Err(e) = tokio::fs::create_dir_all(&self.node.snap_dir).await {
            return Ok(wire_err(e.to_string()));
        }
        let path = self
            .node
            .snap_dir
            .join(format!("{}-recv-{}.snap", id.0, rand::random::<u64>()));
        let limits = self.receive_limits;
        let receive = async {
            use tokio::io::AsyncWriteExt;
            let stream_err = |e: std::io::Error| ReceiveRefusal::Stream(e.to_string());
            let mut f = tokio::fs::File::create(&path).await.map_err(stream_err)?;
            let mut received = limits.admit(0, first.data.len())?;
            f.write_all(&first.data).await.map_err(stream_err)?;
            self.node
                .metrics
                .snapshot_received_bytes
                .inc_by(first.data.len() as u64);
            let mut last = first.last;
            while !last {
                match stream.next().await {
                    Some(Ok(c)) => {
                        received = limits.admit(received, c.data.len())?;
                        f.write_all(&c.data).await.map_err(stream_err)?;
                        self.node.metrics.snapshot_received_bytes.inc_by(c.data.len() as u64);
                        last = c.last;
                    }
                    Some(Err(s)) => return Err(ReceiveRefusal::Stream(s.to_string())),
                    None => return Err(ReceiveRefusal::Stream("snapshot stream ended early".into())),
                }
            }
            f.sync_all().await.map_err(stream_err)?;
            Ok(())
        };
        let result = match tokio::time::timeout(limits.timeout, receive).await {
            Ok(r) => r,
            Err(_) => Err(ReceiveRefusal::Deadline(limits.timeout)),
        };
        if let Err(e) = result {
            // No partial file is left behind, whatever ended the receive.
            let _ = tokio::fs::remove_file(&path).await;
            return Err(self.refuse_snapshot(id, e));
        }
        let p2 = path.clone();
        // The whole file is checked (checksum, order, span) before anything is installed.
        let desc = match tokio::task::spawn_blocking(move || validate_snapshot_file(&p2)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = tokio::fs::remove_file(&path).await;
                let e = ReceiveRefusal::Invalid(e.to_string());
                self.node
                    .metrics
                    .snapshot_receives_refused
                    .get_or_create(&crate::metrics::Reason { reason: e.reason() })
                    .inc();
                return Ok(wire_err(e.to_string()));
            }
            Err(e) => return Ok(wire_err(e.to_string())),
        };
        if desc.range_id != id.0 {
            let _ = tokio::fs::remove_file(&path).await;
            return Ok(wire_err("snapshot of another range"));
        }
        // As TiKV: refuse a snapshot overlapping a live local range (until the split
        // applies) or another range's pending install. The claim is held until the install
        // committed (or failed).
        let _claim = match self.node.claim_install(id, &desc.start, &desc.end) {
            Ok(c) => c,
            Err(other) => {
                tracing::info!(store_id = %self.node.store_id, range_id = %id, overlapping = %other, "refusing overlapping snapshot until the split applies");
                let _ = tokio::fs::remove_file(&path).await;
                return Ok(wire_err(format!(
                    "snapshot of {id} overlaps live range or pending install of {other}"
                )));
            }
        };
        let file = match SnapFile::open(path.clone()) {
            Ok(f) => f,
            Err(e) => return Ok(wire_err(e.to_string())),
        };
        let resp = r.raft.install_snapshot(header, file).await;
        self.node.metrics.snapshot_phase("receive", started.elapsed());
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(start: &[u8], end: &[u8], version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: 1,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch: Some(RangeEpoch { conf_ver: 1, version }),
            replicas: vec![],
        }
    }

    /// The streaming scan has no `more` flag any more (the stream ends after `limit` keys or
    /// at the end); "more" is now "a live pair follows the last one returned".
    #[test]
    fn scan_skips_tombstones_and_sets_more_only_for_live_pairs() {
        use crate::engine::{encode_tombstone, encode_value};
        let dir = tempfile::tempdir().unwrap();
        let e = crate::engine::Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        e.data.insert(b"a", encode_value(1, b"1")).unwrap();
        e.data.insert(b"b", encode_tombstone(3)).unwrap();
        e.data.insert(b"c", encode_value(2, b"2")).unwrap();
        e.data.insert(b"d", encode_tombstone(1)).unwrap();
        struct R {
            kvs: Vec<StoreKv>,
            more: bool,
        }
        let scan_live = |start: &[u8], end: &[u8], limit: u32| -> R {
            let mut c = ScanCursor::new(&e, e.db.snapshot(), start.to_vec(), end.to_vec(), limit);
            let mut kvs = Vec::new();
            while let Some(chunk) = c.next_chunk().unwrap() {
                kvs.extend(chunk);
            }
            // A live pair after the last one returned, within the bounds?
            let after = kvs.last().map(|kv| {
                let mut k = kv.key.clone();
                k.push(0);
                k
            });
            let mut rest = ScanCursor::new(&e, e.db.snapshot(), after.unwrap_or(start.to_vec()), end.to_vec(), 0);
            let more = limit != 0 && rest.next_chunk().unwrap().is_some_and(|c| !c.is_empty());
            R { kvs, more }
        };
        let keys = |r: &R| r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>();
        let r = scan_live(b"", b"", 10);
        assert_eq!(keys(&r), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(!r.more);
        // Limit 2 is reached by the last live pair; only tombstones follow: no `more`.
        let r = scan_live(b"", b"", 2);
        assert_eq!(keys(&r), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(!r.more);
        let r = scan_live(b"", b"", 1);
        assert_eq!(keys(&r), vec![b"a".to_vec()]);
        assert!(r.more);
        let r = scan_live(b"b", b"d", 1);
        assert_eq!(keys(&r), vec![b"c".to_vec()]);
        assert!(!r.more);
    }

    /// A one-voter node with range 1 = ["", +inf) bootstrapped, and its Store service.
    async fn single_node(dir: &std::path::Path) -> (Arc<NodeInner>, StoreService) {
        let engine = crate::engine::Engine::open(dir, crate::metrics::Metrics::new()).unwrap();
        let node = NodeInner::new(
            StoreId(1),
            engine,
            crate::raft::network::Transport::new(StoreId(1), None, 1 << 20),
            crate::raft::raft_config(10_000).unwrap(),
            dir.join("snaps"),
            crate::metrics::Metrics::new(),
        );
        let d = RangeDescriptor {
            range_id: 1,
            start: vec![],
            end: vec![],
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            }),
            replicas: vec![skv_proto::internal::Replica {
                store_id: 1,
                role: ReplicaRole::Voter as i32,
            }],
        };
        node.create_replica(d, true).await.unwrap();
        let svc = StoreService {
            node: node.clone(),
            max_value_len: 1 << 20,
            max_response_len: 8 << 20,
        };
        (node, svc)
    }

    fn current_header(node: &NodeInner, range: u64) -> RequestHeader {
        let d = node.replica(RangeId(range)).unwrap().shared.desc();
        RequestHeader {
            range_id: range,
            epoch: d.epoch,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_split_applied_between_read_index_and_snapshot_refuses_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let (node, svc) = single_node(dir.path()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for k in [b"a", b"k", b"x"] {
            loop {
                let req = StoreWriteRequest {
                    header: Some(current_header(&node, 1)),
                    key: k.to_vec(),
                    op: Some(store_write_request::Op::Put(b"v".to_vec())),
                    condition: None,
                };
                if svc.write(req).await.is_ok() {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "no leader");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let req = StoreScanRequest {
            header: Some(current_header(&node, 1)),
            start: vec![],
            end: vec![],
            limit: 0,
        };
        let read = |mut c: ScanCursor| {
            let mut keys = Vec::new();
            while let Some(kvs) = c.next_chunk().unwrap() {
                keys.extend(kvs.into_iter().map(|kv| kv.key));
            }
            keys
        };
        // No split: the scan opens and reads every key.
        let Ok(r) = svc.scan_prepare(&req).await else {
            panic!("prepare failed")
        };
        let Ok(c) = svc.scan_open(&r, &req) else {
            panic!("open failed")
        };
        assert_eq!(read(c), vec![b"a".to_vec(), b"k".to_vec(), b"x".to_vec()]);

        // ReadIndex passes, then a split applies, then the snapshot is taken: refused.
        let Ok(r) = svc.scan_prepare(&req).await else {
            panic!("prepare failed")
        };
        let split = svc
            .split(SplitRangeRequest {
                header: Some(current_header(&node, 1)),
                split_key: b"m".to_vec(),
                new_range_id: 2,
            })
            .await;
        assert!(split.is_ok_and(|s| s.left.is_some_and(|l| l.end == b"m")));
        match svc.scan_open(&r, &req) {
            Err(Fail::Route(e)) => match *e {
                StoreError::EpochNotMatch { current } => {
                    let ids: Vec<u64> = current.iter().map(|d| d.range_id).collect();
                    assert_eq!(ids, vec![1, 2]);
                }
                other => panic!("expected EpochNotMatch, got {other:?}"),
            },
            Err(Fail::Status(s)) => panic!("expected EpochNotMatch, got {s:?}"),
            Ok(c) => panic!("a scan after the split was served: {:?}", read(c)),
        }
        node.stop_all().await;
    }

    #[test]
    fn admin_requests_need_the_current_epoch() {
        let cur = desc(b"a", b"m", 3);
        let e = |conf_ver, version| RangeEpoch { conf_ver, version };
        assert!(admin_epoch_matches(e(1, 3), &cur));
        // Older membership, older split, both, or a made-up newer one: refused.
        assert!(!admin_epoch_matches(e(0, 3), &cur));
        assert!(!admin_epoch_matches(e(1, 2), &cur));
        assert!(!admin_epoch_matches(e(0, 2), &cur));
        assert!(!admin_epoch_matches(e(2, 3), &cur));
        assert!(!admin_epoch_matches(RangeEpoch::default(), &cur));
    }

    #[test]
    fn scan_after_read_index_refuses_a_split_that_applied_meanwhile() {
        // Routed against [a, +inf) version 1; a split at "m" applied during ReadIndex.
        let after_split = desc(b"a", b"m", 2);
        assert_eq!(
            scan_end_after_read_index(b"b", b"", 1, &after_split),
            Err(ScanRecheck::EpochChanged)
        );
        assert_eq!(
            scan_end_after_read_index(b"b", b"z", 1, &after_split),
            Err(ScanRecheck::EpochChanged)
        );
        // Unchanged epoch: an open end becomes the range end; a bounded end is kept.
        let same = desc(b"a", b"m", 2);
        assert_eq!(scan_end_after_read_index(b"b", b"", 2, &same), Ok(b"m".to_vec()));
        assert_eq!(scan_end_after_read_index(b"b", b"c", 2, &same), Ok(b"c".to_vec()));
        assert_eq!(scan_end_after_read_index(b"a", b"", 2, &same), Ok(b"m".to_vec()));
        assert_eq!(
            scan_end_after_read_index(b"x", b"", 2, &same),
            Err(ScanRecheck::OutOfRange)
        );
    }
}
