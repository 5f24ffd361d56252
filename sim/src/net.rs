//! The simulated network: every Raft message goes through [`World`], which decides from the
//! run's one seeded RNG whether it is dropped, how long it takes, whether it is delivered
//! twice and whether its answer is lost; partitions and crashed stores drop it. Messages
//! are encoded and decoded with the storenode's wire codec (`RaftRpc`, postcard) on the
//! way, as over gRPC.

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, OptionalSend};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skv_storenode::raft::network::RaftRpc;
use skv_storenode::raft::state_machine::SnapFile;
use skv_storenode::raft::{Raft, TypeConfig, Vote, decode, encode};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use xxhash_rust::xxh3::Xxh3;

/// Fault rates of the network, per mille, and the delay bound.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub drop_pm: u32,
    pub dup_pm: u32,
    pub lose_reply_pm: u32,
    pub max_delay_ms: u64,
}

/// Everything the simulated processes share: the RNG, the links, the Raft handles of the
/// running replicas, and the event trace.
pub struct World {
    pub rng: StdRng,
    pub faults: Faults,
    /// Stores whose process runs.
    pub up: BTreeSet<u64>,
    /// Directed links that drop everything (partitions).
    pub cut: BTreeSet<(u64, u64)>,
    /// Running replicas: (range, store) -> handle.
    pub rafts: BTreeMap<(u64, u64), Raft>,
    trace: Xxh3,
    pub events: u64,
    /// Every event, when asked for (`--trace`).
    pub log: Option<Vec<String>>,
    start: tokio::time::Instant,
}

pub type Shared = Arc<Mutex<World>>;

impl World {
    pub fn new(seed: u64, faults: Faults, keep_log: bool) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            faults,
            up: BTreeSet::new(),
            cut: BTreeSet::new(),
            rafts: BTreeMap::new(),
            trace: Xxh3::new(),
            events: 0,
            log: keep_log.then(Vec::new),
            start: tokio::time::Instant::now(),
        }
    }

    /// Virtual milliseconds since the start of the run.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Virtual nanoseconds since the start of the run.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Adds an event (stamped with the virtual time) to the trace.
    pub fn event(&mut self, what: std::fmt::Arguments<'_>) {
        let line = format!("{} {what}", self.now_ms());
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
        self.events += 1;
        if let Some(l) = &mut self.log {
            l.push(line);
        }
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace.digest()
    }

    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.rng.random_range(0..1000) < per_mille
    }

    fn link_ok(&self, from: u64, to: u64) -> bool {
        self.up.contains(&from) && self.up.contains(&to) && !self.cut.contains(&(from, to))
    }
}

/// What happens to one message.
struct Fate {
    delay: Duration,
    dropped: bool,
    duplicated: bool,
    reply_lost: bool,
}

fn unreachable(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
}

pub struct SimNetFactory {
    pub world: Shared,
    pub range: u64,
    pub from: u64,
}

impl RaftNetworkFactory<TypeConfig> for SimNetFactory {
    type Network = SimNetwork;

    async fn new_client(&mut self, target: u64, _node: &openraft::EmptyNode) -> SimNetwork {
        SimNetwork {
            world: self.world.clone(),
            range: self.range,
            from: self.from,
            to: target,
        }
    }
}

pub struct SimNetwork {
    world: Shared,
    range: u64,
    from: u64,
    to: u64,
}

fn kind(rpc: &RaftRpc) -> String {
    match rpc {
        RaftRpc::Append(a) => format!("append[{}]", a.entries.len()),
        RaftRpc::Vote(_) => "vote".into(),
        RaftRpc::PreVote(_) => "prevote".into(),
        RaftRpc::TransferLeader(_) => "transfer".into(),
        RaftRpc::Hibernate(_) => "hibernate".into(),
        RaftRpc::WakeUp { .. } => "wakeup".into(),
    }
}

/// Hands one encoded message to the replica `raft` and returns its encoded answer.
async fn handle(raft: &Raft, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let rpc: RaftRpc = decode(bytes).map_err(|e| e.to_string())?;
    let enc = |r: Result<Vec<u8>, postcard::Error>| r.map_err(|e| e.to_string());
    match rpc {
        RaftRpc::Append(r) => enc(encode(&raft.append_entries(r).await.map_err(|e| e.to_string())?)),
        RaftRpc::Vote(r) => enc(encode(&raft.vote(r).await.map_err(|e| e.to_string())?)),
        RaftRpc::PreVote(r) => enc(encode(&raft.pre_vote(r).await.map_err(|e| e.to_string())?)),
        RaftRpc::TransferLeader(r) => enc(encode(
            &raft.handle_transfer_leader(r).await.map_err(|e| e.to_string())?,
        )),
        RaftRpc::Hibernate(_) | RaftRpc::WakeUp { .. } => Err("no hibernation in the simulation".into()),
    }
}

impl SimNetwork {
    async fn call<T: serde::de::DeserializeOwned>(&self, rpc: RaftRpc) -> Result<T, RPCError<TypeConfig>> {
        let bytes = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.to_string()))))?;
        let fate = {
            let mut w = self.world.lock();
            let max = w.faults.max_delay_ms.max(1);
            let delay = Duration::from_millis(w.rng.random_range(1..=max));
            let dropped = !w.link_ok(self.from, self.to) || {
                let p = w.faults.drop_pm;
                w.chance(p)
            };
            let p = w.faults.dup_pm;
            let duplicated = w.chance(p);
            let p = w.faults.lose_reply_pm;
            let reply_lost = w.chance(p);
            w.event(format_args!(
                "r{} {}->{} {} +{}ms{}{}{}",
                self.range,
                self.from,
                self.to,
                kind(&rpc),
                delay.as_millis(),
                if dropped { " drop" } else { "" },
                if duplicated { " dup" } else { "" },
                if reply_lost { " lost-reply" } else { "" },
            ));
            Fate {
                delay,
                dropped,
                duplicated,
                reply_lost,
            }
        };
        tokio::time::sleep(fate.delay).await;
        if fate.dropped {
            return Err(unreachable("dropped"));
        }
        let target = {
            let w = self.world.lock();
            if !w.link_ok(self.from, self.to) {
                None
            } else {
                w.rafts.get(&(self.range, self.to)).cloned()
            }
        };
        let Some(raft) = target else {
            return Err(unreachable("target down or cut off"));
        };
        let answer = handle(&raft, &bytes).await.map_err(unreachable)?;
        if fate.duplicated {
            // The copy arrives after the original; its answer goes nowhere.
            let _ = handle(&raft, &bytes).await;
        }
        tokio::time::sleep(fate.delay / 2).await;
        if fate.reply_lost || !self.world.lock().link_ok(self.to, self.from) {
            return Err(unreachable("reply lost"));
        }
        decode(&answer).map_err(unreachable)
    }
}

impl RaftNetworkV2<TypeConfig> for SimNetwork {
    type SnapshotData = SnapFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::Append(rpc)).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::Vote(rpc)).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::PreVote(rpc)).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::TransferLeader(req)).await
    }

    /// Logs are never purged in the simulation, so no replica needs a snapshot.
    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapFile>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(Unreachable::new(&AnyError::error(
            "no snapshots in the simulation",
        ))))
    }
}
