//! Raft transport: every range's messages to a store share one tonic `Channel`
//! (one HTTP/2 connection). openraft RPCs are postcard-encoded into `RaftMessage.payload`;
//! snapshots are streamed with `SendSnapshot` in 1 MiB chunks. The test `RaftFilter`
//! is applied here, on the sending side.

use super::state_machine::{RangeShared, SnapFile};
use super::{TypeConfig, Vote, decode, encode};
use crate::{FilterAction, RaftFilter};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, OptionalSend};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use skv_common::{RangeId, StoreId};
use skv_proto::internal::raft_client::RaftClient;
use skv_proto::internal::{RaftMessage, SnapshotChunk};
use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

pub const SNAPSHOT_CHUNK: usize = 1 << 20;

// Byte-bounded AppendEntries.
//
// openraft 0.10.0-alpha.37 builds each replication request from
// `RaftLogReader::limited_get_log_entries(start, start + max_payload_entries)` and streams
// the requests through `RaftNetworkV2::stream_append` (here the default sequential adapter
// over `append_entries`). Our log reader cuts that read at `APPEND_BYTES_BUDGET` bytes
// (`log_store.rs`), so every message is bounded by bytes as well as by entries, and the
// stream simply continues after the last entry sent. (The other hook, answering
// `PartialSuccess` for a truncated request, also works but stops the pipeline and starts a
// new stream session for every message; `PayloadTooLarge`, 0.9's error for "split this
// request", no longer exists in this version.)
//
// openraft gives every replication request the same budget, `heartbeat_interval` (100 ms
// here), whatever it carries; a ~4 MiB message cannot be encoded, sent, decoded, appended
// and fsynced in 100 ms by a debug build on a busy machine, and a request that times out is
// resent whole, forever. So the transport sets its own deadline from the payload: a base
// plus the time to move the bytes at a conservative throughput (see `rpc_deadline`).
// openraft does not cut a replication stream at `hard_ttl` (its docs: not a limit on a
// stream's lifetime), so this deadline is the one that applies.

/// Throughput assumed when sizing an RPC deadline: far below a LAN or a release build, and
/// still met by a debug build on a busy 2-core machine.
pub const CONSERVATIVE_BYTES_PER_SEC: u64 = 2 << 20;
/// Smallest deadline of an AppendEntries, with entries or without (a heartbeat, a commit
/// index update): openraft's follower answers any accepted append only once its log is
/// flushed (`Condition::IOFlushed` on the last accepted log I/O), so even an empty one
/// waits for the fsync of the entries before it. A shorter deadline (openraft's 75 ms)
/// failed healthy followers whose fsync ran long: the leader dropped the replication
/// session and started another, resending what was in flight.
pub const APPEND_BASE: Duration = Duration::from_millis(500);

/// The deadline of one Raft RPC: openraft's budget (`soft_ttl`, which it says transports
/// should enforce), raised to [`APPEND_BASE`] for an AppendEntries, plus `payload_bytes` at
/// [`CONSERVATIVE_BYTES_PER_SEC`]. A full message (~4 MiB) gets ~2.5 s.
pub fn rpc_deadline(soft_ttl: Duration, payload_bytes: usize, is_append: bool) -> Duration {
    let base = if is_append { soft_ttl.max(APPEND_BASE) } else { soft_ttl };
    let micros = (payload_bytes as u64).saturating_mul(1_000_000) / CONSERVATIVE_BYTES_PER_SEC;
    base + Duration::from_micros(micros)
}

/// An openraft RPC on the wire, or one of our hibernation control messages (ADR 0018).
///
/// postcard encodes the variant index first: variants are append-only. A node that does not
/// know a newer variant answers "bad raft payload", which the sender takes as a refusal (a
/// range simply stays awake during a rolling upgrade).
#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Leader -> follower: sleep if you are exactly where I am. Answer: [`HibernateResponse`].
    Hibernate(HibernateRequest),
    /// Follower -> leader: wake up (turn your timers on and heartbeat). Answer: `()`.
    WakeUp {
        from: u64,
    },
}

impl RaftRpc {
    /// Whether this is a hibernation control message (never creates a peer).
    pub fn is_control(&self) -> bool {
        matches!(self, RaftRpc::Hibernate(_) | RaftRpc::WakeUp { .. })
    }
}

/// Poll round `round` of a leader whose committed vote is `vote` and whose last (applied)
/// log id is `last_log_id`.
#[derive(Clone, Serialize, Deserialize)]
pub struct HibernateRequest {
    pub round: u64,
    pub vote: Vote,
    pub last_log_id: Option<super::LogId>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct HibernateResponse {
    pub accepted: bool,
}

/// Bounds of one snapshot receive (ADR 0029): `--snapshot-max-receive-bytes` and
/// `--snapshot-receive-timeout-secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveLimits {
    pub max_bytes: u64,
    pub timeout: Duration,
}

/// 2 GiB: 16 times placement's default split size (128 MiB), so a range that grew well
/// past its split point still moves, while a runaway or hostile stream cannot fill the disk.
pub const DEFAULT_SNAPSHOT_MAX_RECEIVE_BYTES: u64 = 2 << 30;
/// 10 minutes: 2 GiB at under 4 MB/s.
pub const DEFAULT_SNAPSHOT_RECEIVE_TIMEOUT_SECS: u64 = 600;

impl Default for ReceiveLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_SNAPSHOT_MAX_RECEIVE_BYTES,
            timeout: Duration::from_secs(DEFAULT_SNAPSHOT_RECEIVE_TIMEOUT_SECS),
        }
    }
}

/// Why a snapshot receive was refused (its partial file is deleted).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveRefusal {
    #[error(
        "snapshot larger than the receive cap: {received} bytes received, cap {cap} (--snapshot-max-receive-bytes)"
    )]
    TooLarge { received: u64, cap: u64 },
    #[error("snapshot not received within {0:?} (--snapshot-receive-timeout-secs)")]
    Deadline(Duration),
    #[error("snapshot stream failed: {0}")]
    Stream(String),
    #[error("bad snapshot: {0}")]
    Invalid(String),
    #[error("{0} snapshot receives already under way on this store; retry later")]
    Busy(usize),
}

impl ReceiveRefusal {
    /// The metric labels, in order.
    pub const REASONS: [&'static str; 5] = ["too_large", "deadline", "stream", "invalid", "busy"];

    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Deadline(_) => "deadline",
            Self::Stream(_) => "stream",
            Self::Invalid(_) => "invalid",
            Self::Busy(_) => "busy",
        }
    }

    /// The status the sender gets.
    pub fn status(&self) -> tonic::Status {
        match self {
            Self::TooLarge { .. } | Self::Busy(_) => tonic::Status::resource_exhausted(self.to_string()),
            Self::Deadline(_) => tonic::Status::deadline_exceeded(self.to_string()),
            Self::Stream(_) => tonic::Status::aborted(self.to_string()),
            Self::Invalid(_) => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

impl ReceiveLimits {
    /// Admits a chunk of `len` bytes after `received` bytes: the new total, or the refusal
    /// when it would pass the cap (checked before the chunk is written). Pure.
    pub fn admit(&self, received: u64, len: usize) -> Result<u64, ReceiveRefusal> {
        let total = received.saturating_add(len as u64);
        if total > self.max_bytes {
            return Err(ReceiveRefusal::TooLarge {
                received: total,
                cap: self.max_bytes,
            });
        }
        Ok(total)
    }
}

/// The first chunk of a snapshot stream.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote,
    pub meta: super::SnapshotMeta,
}

/// Responses are `Result<T, String>`: the error is the remote's Raft error text.
pub type WireResult<T> = Result<T, String>;

/// Encodes a local Raft result as the response to a peer.
pub fn wire<T: Serialize, E: std::fmt::Display>(r: Result<T, E>) -> skv_proto::internal::RaftMessageResponse {
    let w: WireResult<T> = r.map_err(|e| e.to_string());
    match encode(&w) {
        Ok(payload) => skv_proto::internal::RaftMessageResponse {
            payload,
            error: String::new(),
        },
        Err(e) => skv_proto::internal::RaftMessageResponse {
            payload: Vec::new(),
            error: e.to_string(),
        },
    }
}

impl RaftRpc {
    /// Decodes a peer's message; never panics on garbage.
    pub fn decode(payload: &[u8]) -> Result<Self, postcard::Error> {
        decode(payload)
    }
}

impl SnapshotHeader {
    /// Decodes the header of a snapshot stream; never panics on garbage.
    pub fn decode(payload: &[u8]) -> Result<Self, postcard::Error> {
        decode(payload)
    }
}

/// Connections and the address book, shared by all ranges of the node.
pub struct Transport {
    pub local: StoreId,
    addrs: RwLock<HashMap<StoreId, String>>,
    channels: RwLock<HashMap<StoreId, (String, Channel)>>,
    filter: Option<Arc<dyn RaftFilter>>,
    max_message: usize,
    /// Stores placement last reported DOWN (hibernation decisions, ADR 0018).
    down: RwLock<std::collections::BTreeSet<u64>>,
    /// When the next start-up WakeUp may be sent (a node-wide pace).
    next_wakeup: parking_lot::Mutex<tokio::time::Instant>,
    /// mTLS to other stores (ADR 0022): the cluster CA and this store's certificate.
    tls: RwLock<Option<skv_rpc::tls::ClientTls>>,
}

/// Start-up WakeUps a node sends per second at most (ADR 0018).
pub const STARTUP_WAKEUPS_PER_SEC: u64 = 2000;

impl Transport {
    pub fn new(local: StoreId, filter: Option<Arc<dyn RaftFilter>>, max_message: usize) -> Arc<Self> {
        Arc::new(Self {
            local,
            addrs: RwLock::new(HashMap::new()),
            channels: RwLock::new(HashMap::new()),
            filter,
            max_message,
            down: RwLock::new(Default::default()),
            next_wakeup: parking_lot::Mutex::new(tokio::time::Instant::now()),
            tls: RwLock::new(None),
        })
    }

    /// Talks mTLS to other stores from now on (set before any message is sent).
    pub fn set_tls(&self, tls: Option<skv_rpc::tls::ClientTls>) {
        *self.tls.write() = tls;
        self.channels.write().clear();
    }

    pub fn set_down_stores(&self, down: std::collections::BTreeSet<u64>) {
        *self.down.write() = down;
    }

    pub fn down_stores(&self) -> std::collections::BTreeSet<u64> {
        self.down.read().clone()
    }

    /// Waits for this node's next start-up WakeUp slot ([`STARTUP_WAKEUPS_PER_SEC`]).
    pub async fn pace_wakeup(&self) {
        let slot = {
            let mut next = self.next_wakeup.lock();
            let now = tokio::time::Instant::now();
            let slot = (*next).max(now);
            *next = slot + Duration::from_micros(1_000_000 / STARTUP_WAKEUPS_PER_SEC);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Sends a hibernation control message of `range` to store `to` (no descriptor: a control
    /// message never creates a replica) and decodes the answer.
    pub async fn send_control<T: serde::de::DeserializeOwned>(
        &self,
        to: StoreId,
        range: RangeId,
        rpc: &RaftRpc,
        timeout: Duration,
    ) -> Result<T, String> {
        self.filter(to, range).await?;
        let payload = encode(rpc).map_err(|e| e.to_string())?;
        let mut client = self.client(to)?;
        let msg = RaftMessage {
            range_id: range.0,
            from_store_id: self.local.0,
            to_store_id: to.0,
            descriptor: None,
            payload,
            sender_applied_index: 0,
        };
        let resp = match tokio::time::timeout(timeout, client.send(msg)).await {
            Err(_) => return Err(format!("control message timed out after {timeout:?}")),
            Ok(Err(status)) => return Err(status.message().to_string()),
            Ok(Ok(r)) => r.into_inner(),
        };
        if !resp.error.is_empty() {
            return Err(resp.error);
        }
        let r: WireResult<T> = decode(&resp.payload).map_err(|e| e.to_string())?;
        r
    }

    /// Records a store address; returns true when it changed.
    pub fn set_address(&self, id: StoreId, addr: &str) -> bool {
        let mut a = self.addrs.write();
        if a.get(&id).map(String::as_str) == Some(addr) {
            return false;
        }
        a.insert(id, addr.to_string());
        true
    }

    pub fn address(&self, id: StoreId) -> Option<String> {
        self.addrs.read().get(&id).cloned()
    }

    fn channel(&self, to: StoreId) -> Result<Channel, String> {
        let addr = self.address(to).ok_or_else(|| format!("no address for store {to}"))?;
        if let Some((a, c)) = self.channels.read().get(&to)
            && *a == addr
        {
            return Ok(c.clone());
        }
        let options = skv_rpc::EndpointOptions {
            connect_timeout: Duration::from_millis(500),
            tls: self.tls.read().clone(),
            ..skv_rpc::EndpointOptions::default()
        };
        let ch = skv_rpc::channel_with(&addr, &options).map_err(|e| e.to_string())?;
        self.channels.write().insert(to, (addr, ch.clone()));
        Ok(ch)
    }

    fn client(&self, to: StoreId) -> Result<RaftClient<Channel>, String> {
        Ok(RaftClient::new(self.channel(to)?)
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message))
    }

    /// Applies the test filter: `Err` when the message must be dropped.
    async fn filter(&self, to: StoreId, range: RangeId) -> Result<(), String> {
        if let Some(f) = &self.filter {
            match f.check(self.local, to, range) {
                FilterAction::Pass => {}
                FilterAction::Drop => return Err("dropped by filter".into()),
                FilterAction::Delay(d) => tokio::time::sleep(d).await,
            }
        }
        Ok(())
    }
}

/// Creates per-target clients for one range.
pub struct NetworkFactory {
    pub transport: Arc<Transport>,
    pub shared: Arc<RangeShared>,
    pub metrics: crate::metrics::Metrics,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: u64, _node: &openraft::EmptyNode) -> Self::Network {
        Network {
            transport: self.transport.clone(),
            shared: self.shared.clone(),
            target: StoreId(target),
            metrics: self.metrics.clone(),
        }
    }
}

pub struct Network {
    transport: Arc<Transport>,
    shared: Arc<RangeShared>,
    target: StoreId,
    metrics: crate::metrics::Metrics,
}

fn unreachable(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
}

impl Network {
    fn message(&self, payload: Vec<u8>) -> RaftMessage {
        RaftMessage {
            range_id: self.shared.range_id.0,
            from_store_id: self.transport.local.0,
            to_store_id: self.target.0,
            descriptor: Some(self.shared.desc()),
            payload,
            // Read now, at every (re)send: openraft may resend an old payload whose
            // `leader_commit` is far behind (ADR 0008).
            sender_applied_index: self.shared.applied_index.load(std::sync::atomic::Ordering::Acquire),
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        rpc: &RaftRpc,
        option: &RPCOption,
    ) -> Result<T, RPCError<TypeConfig>> {
        self.transport
            .filter(self.target, self.shared.range_id)
            .await
            .map_err(unreachable)?;
        let payload = encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        let deadline = rpc_deadline(option.soft_ttl(), payload.len(), matches!(rpc, RaftRpc::Append(_)));
        let mut client = self.transport.client(self.target).map_err(unreachable)?;
        let fut = client.send(self.message(payload));
        let resp = match tokio::time::timeout(deadline, fut).await {
            Err(_) => return Err(unreachable(format!("raft rpc timed out after {deadline:?}"))),
            Ok(Err(status)) => return Err(unreachable(status.message())),
            Ok(Ok(r)) => r.into_inner(),
        };
        if !resp.error.is_empty() {
            return Err(unreachable(resp.error));
        }
        let r: WireResult<T> = decode(&resp.payload).map_err(unreachable)?;
        r.map_err(unreachable)
    }
}

impl RaftNetworkV2<TypeConfig> for Network {
    type SnapshotData = SnapFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Already bounded by bytes when it was read from the log (see the top of this file).
        self.call(&RaftRpc::Append(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&RaftRpc::Vote(rpc), &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&RaftRpc::PreVote(rpc), &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&RaftRpc::TransferLeader(req), &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let un = |e: String| StreamingError::Unreachable(Unreachable::new(&AnyError::error(e)));
        self.transport
            .filter(self.target, self.shared.range_id)
            .await
            .map_err(un)?;
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta.clone(),
        };
        let payload = encode(&header).map_err(|e| un(e.to_string()))?;
        let first = SnapshotChunk {
            header: Some(self.message(payload)),
            data: Vec::new(),
            last: false,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(2);
        let mut file = snapshot.snapshot.file;
        let started = std::time::Instant::now();
        let sent = self.metrics.snapshot_sent_bytes.clone();
        // Read the file on a blocking thread, one chunk at a time (bounded memory).
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if tx.blocking_send(first).is_err() {
                return Ok(());
            }
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let mut n = 0;
                while n < buf.len() {
                    let r = file.read(&mut buf[n..])?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                buf.truncate(n);
                sent.inc_by(n as u64);
                let last = n < SNAPSHOT_CHUNK;
                if tx
                    .blocking_send(SnapshotChunk {
                        header: None,
                        data: buf,
                        last,
                    })
                    .is_err()
                {
                    return Ok(());
                }
                if last {
                    return Ok(());
                }
            }
        });
        let mut client = self.transport.client(self.target).map_err(un)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let resp = tokio::select! {
            r = client.send_snapshot(stream) => r,
            c = cancel => return Err(StreamingError::Closed(c)),
        };
        let _ = reader.await;
        let resp = resp.map_err(|s| un(s.message().to_string()))?.into_inner();
        if !resp.error.is_empty() {
            return Err(un(resp.error));
        }
        let r: WireResult<SnapshotResponse<TypeConfig>> = decode(&resp.payload).map_err(|e| un(e.to_string()))?;
        self.metrics.snapshot_phase("send", started.elapsed());
        r.map_err(un)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_receives_are_capped_before_the_chunk_is_written() {
        let l = ReceiveLimits {
            max_bytes: 10,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(l.admit(0, 4), Ok(4));
        assert_eq!(l.admit(4, 6), Ok(10));
        assert_eq!(l.admit(10, 1), Err(ReceiveRefusal::TooLarge { received: 11, cap: 10 }));
        assert_eq!(
            l.admit(u64::MAX, usize::MAX),
            Err(ReceiveRefusal::TooLarge {
                received: u64::MAX,
                cap: 10
            })
        );
        assert_eq!(
            l.admit(0, 11).unwrap_err().status().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            ReceiveRefusal::Deadline(l.timeout).status().code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(ReceiveRefusal::REASONS.contains(&ReceiveRefusal::Stream("x".into()).reason()));
        assert!(ReceiveRefusal::REASONS.contains(&ReceiveRefusal::Invalid("x".into()).reason()));
        assert_eq!(ReceiveLimits::default().max_bytes, 2 << 30);
    }

    #[test]
    fn deadlines_fit_the_payload() {
        let ttl = Duration::from_millis(75);
        // Votes (and anything but an append) keep openraft's budget.
        assert_eq!(rpc_deadline(ttl, 200, false), ttl + Duration::from_micros(95));
        // Appends, empty ones too: at least APPEND_BASE, plus the bytes at the conservative
        // throughput.
        assert_eq!(rpc_deadline(ttl, 0, true), APPEND_BASE);
        assert_eq!(rpc_deadline(ttl, 200, true), APPEND_BASE + Duration::from_micros(95));
        let full = rpc_deadline(ttl, crate::raft::log_store::APPEND_BYTES_BUDGET, true);
        assert_eq!(full, APPEND_BASE + Duration::from_secs(2));
        // One maximal value (1 MiB) alone still gets its own time.
        assert!(rpc_deadline(ttl, 1 << 20, true) >= Duration::from_millis(999));
        // A larger openraft budget is kept.
        assert_eq!(rpc_deadline(Duration::from_secs(3), 0, true), Duration::from_secs(3));
    }
}

/// Snapshot receive bounds on a real storenode over gRPC on 127.0.0.1 (ADR 0029).
#[cfg(test)]
mod receive_tests {
    use super::*;
    use skv_proto::internal::raft_client::RaftClient;
    use skv_proto::internal::{RaftMessage, RangeDescriptor, RangeEpoch, Replica, ReplicaRole, SnapshotChunk};

    fn header_chunk(store: u64) -> SnapshotChunk {
        let header = SnapshotHeader {
            vote: openraft::Vote::new(3, 2),
            meta: openraft::SnapshotMeta::default(),
        };
        SnapshotChunk {
            header: Some(RaftMessage {
                range_id: 77,
                from_store_id: 2,
                to_store_id: store,
                descriptor: Some(RangeDescriptor {
                    range_id: 77,
                    start: b"zz".to_vec(),
                    end: Vec::new(),
                    epoch: Some(RangeEpoch {
                        conf_ver: 1,
                        version: 1,
                    }),
                    replicas: [store, 2]
                        .map(|store_id| Replica {
                            store_id,
                            role: ReplicaRole::Voter as i32,
                        })
                        .to_vec(),
                }),
                payload: encode(&header).unwrap_or_default(),
                sender_applied_index: 0,
            }),
            data: Vec::new(),
            last: false,
        }
    }

    fn receive_files(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir.join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("-recv-"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn refused(text: &str, reason: &str) -> u64 {
        let prefix = format!("skv_storenode_raft_snapshot_receives_refused_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    async fn metrics_text(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_and_slow_snapshot_streams_are_refused_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::Config::for_test(dir.path().to_path_buf(), 1);
        config.snapshot_max_receive_bytes = 1000;
        config.snapshot_receive_timeout_secs = 1;
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        let h = crate::start(config).await.unwrap();
        let metrics = h.metrics_addr.unwrap();
        let mut client = RaftClient::connect(format!("http://{}", h.addr)).await.unwrap();

        // Oversized: 3 chunks of 600 bytes against a 1000-byte cap.
        let chunks = vec![
            header_chunk(1),
            SnapshotChunk {
                header: None,
                data: vec![1; 600],
                last: false,
            },
            SnapshotChunk {
                header: None,
                data: vec![2; 600],
                last: false,
            },
            SnapshotChunk {
                header: None,
                data: vec![3; 600],
                last: true,
            },
        ];
        let err = client
            .send_snapshot(tokio_stream::iter(chunks))
            .await
            .expect_err("an oversized snapshot must be refused");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("--snapshot-max-receive-bytes"), "{err:?}");
        assert!(receive_files(dir.path()).is_empty(), "{:?}", receive_files(dir.path()));

        // Slow: the header and one chunk, then nothing (the stream stays open).
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(header_chunk(1)).await.unwrap();
        tx.send(SnapshotChunk {
            header: None,
            data: vec![1; 100],
            last: false,
        })
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let err = client
            .send_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("a stalled snapshot must be refused");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
        drop(tx);
        assert!(receive_files(dir.path()).is_empty(), "{:?}", receive_files(dir.path()));

        let text = metrics_text(metrics).await;
        assert_eq!(refused(&text, "too_large"), 1, "{text}");
        assert_eq!(refused(&text, "deadline"), 1, "{text}");
        h.shutdown().await.unwrap();
    }

    #[test]
    fn zero_receive_bounds_are_refused() {
        let mut c = crate::Config::for_test(std::path::PathBuf::from("/nonexistent"), 1);
        c.snapshot_max_receive_bytes = 0;
        assert!(c.snapshot_receive_limits().is_err());
        c.snapshot_max_receive_bytes = 1;
        c.snapshot_receive_timeout_secs = 0;
        assert!(c.snapshot_receive_limits().is_err());
        c.snapshot_receive_timeout_secs = 1;
        assert!(c.snapshot_receive_limits().is_ok());
    }
}
