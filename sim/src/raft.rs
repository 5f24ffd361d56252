//! One seeded run of the Raft path: `nodes` stores, each with one real storenode engine
//! (fjall, in a temp dir, inline sync) holding `groups` ranges; every replica is an
//! openraft `Raft` built from the storenode's type config, Raft config, log store
//! (`LogStore`) and state machine (`StateMachine`, the real apply path), connected by
//! [`crate::net`]. Clients put, CAS and read through the leader; a nemesis crashes and
//! restarts stores, cuts links and transfers leadership. Then the invariants are checked.

use crate::net::{Faults, Shared, SimNetFactory, World};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::{ReadPolicy, ServerState};
use rand::Rng;
use skv_chaos::checker::{CheckOptions, check, describe};
use skv_chaos::history::{History, Input, Observed, Op, Outcome, Output};
use skv_common::{RangeId, StoreId};
use skv_proto::internal::{RangeDescriptor, RangeEpoch, Replica};
use skv_storenode::engine::{Engine, TAG_VOTE, log_key, raft_key};
use skv_storenode::metrics::Metrics;
use skv_storenode::raft::group::write_error;
use skv_storenode::raft::log_store::LogStore;
use skv_storenode::raft::state_machine::{RangeShared, StateMachine};
use skv_storenode::raft::{CmdResponse, Command, Entry, Raft, RaftConfig, RaftOpError, WriteOp, decode};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;
use thiserror::Error;

/// A deliberate bug, to show the harness finds one (`--plant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Plant {
    /// A restarted store forgets the vote it granted (as if `save_vote` did not fsync).
    ForgetVote,
    /// A restarted store loses the last entry of each Raft log (as if appends were
    /// acknowledged before their fsync).
    LoseLogTail,
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub nodes: u64,
    pub groups: u64,
    pub clients_per_group: u32,
    pub ops_per_client: u32,
    pub plant: Option<Plant>,
    /// Keep every trace line (for `--trace`).
    pub keep_log: bool,
    /// Message drops, duplicates, lost replies and delays.
    pub faults: Faults,
    /// Crashes, restarts, partitions and leader transfers while the clients run.
    pub nemesis: bool,
}

impl RunConfig {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            groups: 2,
            clients_per_group: 2,
            ops_per_client: 12,
            plant: None,
            keep_log: false,
            faults: Faults {
                drop_pm: 20,
                dup_pm: 20,
                lose_reply_pm: 20,
                max_delay_ms: 30,
            },
            nemesis: true,
        }
    }
}

/// A passing run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub seed: u64,
    /// xxh3 of the whole event trace.
    pub trace_hash: u64,
    pub events: u64,
    pub ops: usize,
    pub acked_writes: usize,
    pub crashes: u32,
    pub virtual_ms: u64,
    pub log: Option<Vec<String>>,
}

/// Why a run failed: an invariant broke, or the harness could not run.
#[derive(Debug, Error)]
pub enum SimError {
    #[error("seed {seed}: two leaders in term {term} of {range}: {a} and {b}")]
    TwoLeaders {
        seed: u64,
        range: RangeId,
        term: u64,
        a: StoreId,
        b: StoreId,
    },
    #[error("seed {seed}: {range}: acknowledged entry {index} (term {term}) is not in the log of {store}")]
    CommittedLost {
        seed: u64,
        range: RangeId,
        store: StoreId,
        index: u64,
        term: u64,
    },
    #[error("seed {seed}: {range}: the logs of {a} and {b} differ at applied index {index}: {detail}")]
    LogsDiverge {
        seed: u64,
        range: RangeId,
        a: StoreId,
        b: StoreId,
        index: u64,
        detail: String,
    },
    #[error("seed {seed}: {range}: the state machines of {a} and {b} differ at applied index {index}")]
    StateDiverges {
        seed: u64,
        range: RangeId,
        a: StoreId,
        b: StoreId,
        index: u64,
    },
    #[error("seed {seed}: {range}: the replicas did not converge after healing ({detail})")]
    NoConvergence { seed: u64, range: RangeId, detail: String },
    #[error("seed {seed}: the client history is not linearizable: {detail}")]
    NotLinearizable { seed: u64, detail: String },
    #[error("seed {seed}: harness: {detail}")]
    Harness { seed: u64, detail: String },
}

/// A key of range `g` (ranges cut the key space at "k1", "k2", ...).
fn key_of(g: u64, i: u64) -> Vec<u8> {
    format!("k{g}/{i}").into_bytes()
}

fn descriptor(g: u64, groups: u64, nodes: u64) -> RangeDescriptor {
    RangeDescriptor {
        range_id: g,
        start: if g == 1 { vec![] } else { format!("k{g}").into_bytes() },
        end: if g == groups {
            vec![]
        } else {
            format!("k{}", g + 1).into_bytes()
        },
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas: (1..=nodes)
            .map(|s| Replica {
                store_id: s,
                ..Default::default()
            })
            .collect(),
    }
}

/// (key, stored record) pairs of a range's span.
type Records = Vec<(Vec<u8>, Vec<u8>)>;

struct NodeDisk {
    engine: Arc<Engine>,
    snap_dir: PathBuf,
}

struct Sim {
    cfg: RunConfig,
    world: Shared,
    raft_cfg: Arc<openraft::Config>,
    disks: BTreeMap<u64, NodeDisk>,
    descs: BTreeMap<u64, RangeDescriptor>,
    shared: BTreeMap<(u64, u64), Arc<RangeShared>>,
    /// First violation seen by a background checker.
    violation: Arc<parking_lot::Mutex<Option<SimError>>>,
    /// (range, term) -> the store that led it.
    leaders: Arc<parking_lot::Mutex<BTreeMap<(u64, u64), u64>>>,
    crashes: u32,
}

fn harness(seed: u64, e: impl std::fmt::Display) -> SimError {
    SimError::Harness {
        seed,
        detail: e.to_string(),
    }
}

impl Sim {
    async fn start_replica(&mut self, node: u64, g: u64) -> Result<(), SimError> {
        let seed = self.cfg.seed;
        let disk = self.disks.get(&node).ok_or_else(|| harness(seed, "no disk"))?;
        let desc = self
            .descs
            .get(&g)
            .cloned()
            .ok_or_else(|| harness(seed, "no descriptor"))?;
        let shared = RangeShared::new(desc, true);
        let sm = StateMachine::open(
            disk.engine.clone(),
            shared.clone(),
            Weak::new(),
            disk.snap_dir.clone(),
            Metrics::new(),
        )
        .map_err(|e| harness(seed, e))?;
        let log = LogStore::new(disk.engine.clone(), RangeId(g));
        let net = SimNetFactory {
            world: self.world.clone(),
            range: g,
            from: node,
        };
        let raft = Raft::new(node, self.raft_cfg.clone(), net, log, sm)
            .await
            .map_err(|e| harness(seed, e))?;
        self.shared.insert((g, node), shared);
        self.world.lock().rafts.insert((g, node), raft.clone());
        tokio::spawn(watch_leadership(
            raft,
            g,
            node,
            seed,
            self.world.clone(),
            self.leaders.clone(),
            self.violation.clone(),
        ));
        Ok(())
    }

    async fn start_node(&mut self, node: u64) -> Result<(), SimError> {
        self.world.lock().up.insert(node);
        for g in 1..=self.cfg.groups {
            self.start_replica(node, g).await?;
        }
        Ok(())
    }

    async fn crash(&mut self, node: u64) {
        let rafts: Vec<Raft> = {
            let mut w = self.world.lock();
            w.up.remove(&node);
            w.event(format_args!("crash {node}"));
            let keys: Vec<(u64, u64)> = w.rafts.keys().filter(|(_, n)| *n == node).copied().collect();
            keys.iter().filter_map(|k| w.rafts.remove(k)).collect()
        };
        for r in rafts {
            let _ = r.shutdown().await;
        }
        self.crashes += 1;
    }

    async fn restart(&mut self, node: u64) -> Result<(), SimError> {
        if let (Some(p), Some(d)) = (self.cfg.plant, self.disks.get(&node)) {
            for g in 1..=self.cfg.groups {
                plant_on_restart(p, &d.engine, RangeId(g)).map_err(|e| harness(self.cfg.seed, e))?;
            }
        }
        self.world.lock().event(format_args!("restart {node}"));
        self.start_node(node).await
    }

    /// The data of range `g` on `node`'s engine, as (key, stored record) pairs.
    fn span_data(&self, node: u64, g: u64) -> Result<Records, SimError> {
        let seed = self.cfg.seed;
        let (Some(d), Some(desc)) = (self.disks.get(&node), self.descs.get(&g)) else {
            return Err(harness(seed, "unknown node or range"));
        };
        let mut out = Vec::new();
        for kv in d.engine.data.range(desc.start.clone()..) {
            let (k, v) = kv.into_inner().map_err(|e| harness(seed, e))?;
            if !desc.end.is_empty() && k[..] >= desc.end[..] {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Replicas of one range that applied the same index must hold the same data.
    fn check_states(&self) -> Result<(), SimError> {
        let seed = self.cfg.seed;
        for g in 1..=self.cfg.groups {
            let mut by_index: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for n in 1..=self.cfg.nodes {
                if let Some(s) = self.shared.get(&(g, n)) {
                    let i = s.applied_index.load(std::sync::atomic::Ordering::Acquire);
                    by_index.entry(i).or_default().push(n);
                }
            }
            for (index, nodes) in by_index {
                let Some((&first, rest)) = nodes.split_first() else {
                    continue;
                };
                let a = self.span_data(first, g)?;
                for &b in rest {
                    if self.span_data(b, g)? != a {
                        return Err(SimError::StateDiverges {
                            seed,
                            range: RangeId(g),
                            a: StoreId(first),
                            b: StoreId(b),
                            index,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// The planted bugs' damage, done to a stopped store's engine before it restarts.
fn plant_on_restart(p: Plant, engine: &Engine, range: RangeId) -> std::io::Result<()> {
    let io = |e: fjall::Error| std::io::Error::other(e.to_string());
    match p {
        Plant::ForgetVote => engine.raft.remove(raft_key(range, TAG_VOTE)).map_err(io),
        Plant::LoseLogTail => {
            let last = engine
                .raft
                .prefix(raft_key(range, skv_storenode::engine::TAG_LOG))
                .next_back();
            if let Some(g) = last {
                let k = g.key().map_err(io)?;
                engine.raft.remove(k).map_err(io)?;
            }
            Ok(())
        }
    }
}

/// Records every (term, leader) a replica reports; two leaders of one term is a violation.
async fn watch_leadership(
    raft: Raft,
    g: u64,
    node: u64,
    seed: u64,
    world: Shared,
    leaders: Arc<parking_lot::Mutex<BTreeMap<(u64, u64), u64>>>,
    violation: Arc<parking_lot::Mutex<Option<SimError>>>,
) {
    let mut rx = raft.metrics();
    loop {
        let (state, term) = {
            let m = rx.borrow_watched();
            (m.state, m.current_term)
        };
        if state == ServerState::Leader {
            let mut l = leaders.lock();
            match l.get(&(g, term)) {
                None => {
                    l.insert((g, term), node);
                    world.lock().event(format_args!("r{g} leader {node} term {term}"));
                }
                Some(&other) if other != node => {
                    let mut v = violation.lock();
                    if v.is_none() {
                        *v = Some(SimError::TwoLeaders {
                            seed,
                            range: RangeId(g),
                            term,
                            a: StoreId(other),
                            b: StoreId(node),
                        });
                    }
                }
                Some(_) => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// One client call's result.
struct Call {
    outcome: Outcome,
    error: Option<String>,
    /// An acknowledged write: its (range, log index, term).
    acked: Option<(u64, u64, u64)>,
}

fn fail_call(e: impl std::fmt::Display) -> Call {
    Call {
        outcome: Outcome::Fail,
        error: Some(e.to_string()),
        acked: None,
    }
}

fn unknown_call(e: impl std::fmt::Display) -> Call {
    Call {
        outcome: Outcome::Unknown,
        error: Some(e.to_string()),
        acked: None,
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(3);

async fn write_call(raft: &Raft, g: u64, key: Vec<u8>, input: &Input) -> Call {
    let (op, condition) = match input {
        Input::Put { value } => (WriteOp::Put(value.to_be_bytes().to_vec()), None),
        Input::Cas { expected, value } => (WriteOp::Put(value.to_be_bytes().to_vec()), Some(*expected)),
        Input::Delete => (WriteOp::Delete, None),
        _ => return fail_call("not a simulated write"),
    };
    let cmd = Command::Write {
        key,
        op,
        condition,
        epoch_version: 1,
    };
    match tokio::time::timeout(CALL_TIMEOUT, raft.client_write(cmd)).await {
        Err(_) => unknown_call("proposal timed out"),
        Ok(Err(e)) => match write_error(e) {
            // skv's own reading of the error: NotLeader means nothing was proposed.
            e @ (RaftOpError::NotLeader { .. } | RaftOpError::Rejected(_) | RaftOpError::Busy(_)) => fail_call(e),
            e => unknown_call(e),
        },
        Ok(Ok(resp)) => {
            let acked = Some((g, resp.log_id.index, resp.log_id.leader_id.term));
            let output = match resp.data {
                CmdResponse::Write {
                    succeeded: true,
                    version,
                    existed,
                } => match input {
                    Input::Delete => Output::Deleted { existed },
                    _ => Output::Written { version },
                },
                CmdResponse::Write { succeeded: false, .. } => Output::ConditionFailed { current: None },
                other => return unknown_call(format!("unexpected answer {other:?}")),
            };
            Call {
                outcome: Outcome::Ok { output },
                error: None,
                acked,
            }
        }
    }
}

async fn read_call(raft: &Raft, engine: &Engine, key: &[u8]) -> Call {
    match tokio::time::timeout(CALL_TIMEOUT, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
        Err(_) => fail_call("read index timed out"),
        Ok(Err(e)) => fail_call(e),
        Ok(Ok(_)) => match engine.get_data(key) {
            Err(e) => fail_call(e),
            Ok(found) => {
                let found = found.map(|(version, v)| Observed {
                    value: <[u8; 8]>::try_from(&v[..]).map_or(skv_chaos::history::FOREIGN_VALUE, u64::from_be_bytes),
                    version,
                });
                Call {
                    outcome: Outcome::Ok {
                        output: Output::Read { found },
                    },
                    error: None,
                    acked: None,
                }
            }
        },
    }
}

/// Shared by the client tasks.
struct ClientCtx {
    world: Shared,
    engines: BTreeMap<u64, Arc<Engine>>,
    nodes: u64,
    ops: usize,
    next_value: parking_lot::Mutex<u64>,
    history: parking_lot::Mutex<Vec<Op>>,
    acked: parking_lot::Mutex<Vec<(u64, u64, u64)>>,
}

async fn client(ctx: Arc<ClientCtx>, id: u32, g: u64) {
    let mut leader_hint: Option<u64> = None;
    for _ in 0..ctx.ops {
        let (pause, key_i, pick, node_pick) = {
            let mut w = ctx.world.lock();
            let pause = w.rng.random_range(0..80u64);
            let key_i = w.rng.random_range(0..2u64);
            let pick = w.rng.random_range(0..100u32);
            let node_pick = w.rng.random_range(1..=ctx.nodes);
            (pause, key_i, pick, node_pick)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let key = key_of(g, key_i);
        let input = {
            let mut v = ctx.next_value.lock();
            *v += 1;
            match pick {
                0..40 => Input::Get,
                40..70 => Input::Put { value: *v },
                70..95 => Input::Cas {
                    expected: u64::from(pick % 3),
                    value: *v,
                },
                _ => Input::Delete,
            }
        };
        let node = leader_hint.unwrap_or(node_pick);
        let (raft, call_ns) = {
            let w = ctx.world.lock();
            (w.rafts.get(&(g, node)).cloned(), w.now_ns())
        };
        let call = match (&raft, ctx.engines.get(&node)) {
            (None, _) | (_, None) => fail_call("store down"),
            (Some(r), Some(engine)) => {
                if matches!(input, Input::Get) {
                    read_call(r, engine, &key).await
                } else {
                    write_call(r, g, key.clone(), &input).await
                }
            }
        };
        // Follow the leader the replica names; forget it when the call did not work.
        leader_hint = match (&raft, &call.outcome) {
            (Some(r), Outcome::Ok { .. }) if r.is_leader() => Some(node),
            (Some(r), _) => r.current_leader().await.filter(|l| *l != node),
            _ => None,
        };
        let mut w = ctx.world.lock();
        let ret = w.now_ns();
        w.event(format_args!(
            "client {id} r{g} {} {:?} {:?} on {node}",
            input.kind(),
            call.outcome,
            call.error
        ));
        drop(w);
        if let Some(a) = call.acked {
            ctx.acked.lock().push(a);
        }
        let mut h = ctx.history.lock();
        let op_id = h.len();
        h.push(Op {
            id: op_id,
            client: id,
            key: String::from_utf8_lossy(&key).into_owned(),
            input,
            outcome: call.outcome,
            call: call_ns,
            ret,
            error: call.error,
        });
    }
}

fn dir_root() -> Option<&'static Path> {
    let shm = Path::new("/dev/shm");
    shm.is_dir().then_some(shm)
}

/// Runs one seed on a fresh current-thread runtime with a paused clock.
pub fn run(cfg: RunConfig) -> Result<RunReport, SimError> {
    let seed = cfg.seed;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| harness(seed, e))?;
    skv_storenode::raft::runtime::seed_thread_rng(Some(seed));
    let tmp = match dir_root() {
        Some(root) => tempfile::Builder::new().prefix("skv-sim-").tempdir_in(root),
        None => tempfile::Builder::new().prefix("skv-sim-").tempdir(),
    }
    .map_err(|e| harness(seed, e))?;
    let r = rt.block_on(run_async(cfg, tmp.path()));
    drop(rt);
    skv_storenode::raft::runtime::seed_thread_rng(None);
    r
}

async fn run_async(cfg: RunConfig, dir: &Path) -> Result<RunReport, SimError> {
    let world: Shared = Arc::new(parking_lot::Mutex::new(World::new(cfg.seed, cfg.faults, cfg.keep_log)));
    let r = run_world(cfg, dir, world.clone()).await;
    if r.is_err()
        && let Some(log) = &world.lock().log
    {
        // The trace of a failing run (`--trace`): printed here, as no report carries it.
        for l in log {
            println!("{l}");
        }
    }
    r
}

async fn run_world(cfg: RunConfig, dir: &Path, world: Shared) -> Result<RunReport, SimError> {
    let seed = cfg.seed;
    let raft_cfg = RaftConfig::new(1_000_000)
        .map_err(|e| harness(seed, e))?
        .openraft_config();
    let mut disks = BTreeMap::new();
    for n in 1..=cfg.nodes {
        let d = dir.join(format!("s{n}"));
        let engine = Engine::open_inline_sync(&d, Metrics::new()).map_err(|e| harness(seed, e))?;
        disks.insert(
            n,
            NodeDisk {
                engine,
                snap_dir: d.join("snap"),
            },
        );
    }
    let descs = (1..=cfg.groups)
        .map(|g| (g, descriptor(g, cfg.groups, cfg.nodes)))
        .collect();
    let mut sim = Sim {
        cfg: cfg.clone(),
        world: world.clone(),
        raft_cfg,
        disks,
        descs,
        shared: BTreeMap::new(),
        violation: Arc::new(parking_lot::Mutex::new(None)),
        leaders: Arc::new(parking_lot::Mutex::new(BTreeMap::new())),
        crashes: 0,
    };
    for n in 1..=cfg.nodes {
        sim.start_node(n).await?;
    }
    let voters: BTreeSet<u64> = (1..=cfg.nodes).collect();
    for g in 1..=cfg.groups {
        let r = world.lock().rafts.get(&(g, 1)).cloned();
        if let Some(r) = r {
            r.initialize(voters.clone()).await.map_err(|e| harness(seed, e))?;
        }
    }
    let ctx = Arc::new(ClientCtx {
        world: world.clone(),
        engines: sim.disks.iter().map(|(n, d)| (*n, d.engine.clone())).collect(),
        nodes: cfg.nodes,
        ops: cfg.ops_per_client as usize,
        next_value: parking_lot::Mutex::new(0),
        history: parking_lot::Mutex::new(Vec::new()),
        acked: parking_lot::Mutex::new(Vec::new()),
    });
    let mut clients = Vec::new();
    let mut id = 0;
    for g in 1..=cfg.groups {
        for _ in 0..cfg.clients_per_group {
            clients.push(tokio::spawn(client(ctx.clone(), id, g)));
            id += 1;
        }
    }
    // The nemesis runs on this task until every client is done.
    let mut down: Option<u64> = None;
    while !clients.iter().all(|c| c.is_finished()) {
        let (wait, action, node, g) = {
            let mut w = world.lock();
            let wait = w.rng.random_range(50..400u64);
            let action = w.rng.random_range(0..100u32);
            let node = w.rng.random_range(1..=cfg.nodes);
            let g = w.rng.random_range(1..=cfg.groups);
            (wait, action, node, g)
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let action = if cfg.nemesis { action } else { 99 };
        match (action, down) {
            (0..20, None) => {
                sim.crash(node).await;
                down = Some(node);
            }
            (0..40, Some(n)) => {
                sim.restart(n).await?;
                down = None;
            }
            (40..55, _) => {
                let mut w = world.lock();
                let other = node % cfg.nodes + 1;
                w.cut.insert((node, other));
                w.cut.insert((other, node));
                w.event(format_args!("cut {node}<->{other}"));
            }
            (55..70, _) => {
                let mut w = world.lock();
                w.cut.clear();
                w.event(format_args!("heal"));
            }
            (70..80, _) => {
                let leader = {
                    let w = world.lock();
                    (1..=cfg.nodes).find_map(|n| w.rafts.get(&(g, n)).filter(|r| r.is_leader()).cloned())
                };
                if let Some(l) = leader {
                    world.lock().event(format_args!("r{g} transfer to {node}"));
                    let _ = l.trigger().transfer_leader(node).await;
                }
            }
            _ => {}
        }
        sim.check_states()?;
        if let Some(v) = sim.violation.lock().take() {
            return Err(v);
        }
    }
    // Heal: every store up, every link back; then the replicas must converge.
    {
        let mut w = world.lock();
        w.cut.clear();
        w.event(format_args!("heal all"));
    }
    if let Some(n) = down.take() {
        sim.restart(n).await?;
    }
    converge(&sim).await?;
    sim.check_states()?;
    if let Some(v) = sim.violation.lock().take() {
        return Err(v);
    }
    check_logs(&sim, &ctx.acked.lock())?;
    let history = History {
        ops: std::mem::take(&mut *ctx.history.lock()),
        nemesis: Vec::new(),
    };
    let report = check(&history, &CheckOptions::default());
    if !report.is_linearizable() {
        let detail = report
            .violations
            .first()
            .map(|v| describe(v, &history))
            .unwrap_or_else(|| format!("undecided keys: {:?}", report.undecided));
        return Err(SimError::NotLinearizable { seed, detail });
    }
    let rafts: Vec<Raft> = world.lock().rafts.values().cloned().collect();
    for r in rafts {
        let _ = r.shutdown().await;
    }
    let w = world.lock();
    Ok(RunReport {
        seed,
        trace_hash: w.trace_hash(),
        events: w.events,
        ops: history.ops.len(),
        acked_writes: ctx.acked.lock().len(),
        crashes: sim.crashes,
        virtual_ms: w.now_ms(),
        log: w.log.clone(),
    })
}

/// Waits (virtual time) until, at one instant, every range has a leader and every replica
/// applied the leader's last log index (so nothing is in flight), twice in a row.
async fn converge(sim: &Sim) -> Result<(), SimError> {
    let seed = sim.cfg.seed;
    let mut settled = 0;
    let mut failing = (RangeId(0), String::new());
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut all = true;
        for g in 1..=sim.cfg.groups {
            let applied: Vec<u64> = (1..=sim.cfg.nodes)
                .map(|n| {
                    sim.shared
                        .get(&(g, n))
                        .map_or(0, |s| s.applied_index.load(std::sync::atomic::Ordering::Acquire))
                })
                .collect();
            let leader_last = {
                let w = sim.world.lock();
                (1..=sim.cfg.nodes).find_map(|n| {
                    w.rafts
                        .get(&(g, n))
                        .filter(|r| r.is_leader())
                        .map(|r| r.metrics().borrow_watched().last_log_index.unwrap_or(0))
                })
            };
            let ok = leader_last.is_some_and(|last| applied.iter().all(|a| *a == last));
            if !ok {
                all = false;
                failing = (
                    RangeId(g),
                    format!("applied {applied:?}, leader's last log index {leader_last:?}"),
                );
            }
        }
        settled = if all { settled + 1 } else { 0 };
        if settled >= 2 {
            return Ok(());
        }
    }
    Err(SimError::NoConvergence {
        seed,
        range: failing.0,
        detail: failing.1,
    })
}

/// Every acknowledged write is in every replica's log at its index, and the logs agree
/// up to the applied index.
fn check_logs(sim: &Sim, acked: &[(u64, u64, u64)]) -> Result<(), SimError> {
    let seed = sim.cfg.seed;
    for g in 1..=sim.cfg.groups {
        let mut logs: BTreeMap<u64, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
        for (n, d) in &sim.disks {
            let mut log = BTreeMap::new();
            let range = RangeId(g);
            for kv in d
                .engine
                .raft
                .range(log_key(range, 0)..raft_key(range, skv_storenode::engine::TAG_LOG + 1))
            {
                let (k, v) = kv.into_inner().map_err(|e| harness(seed, e))?;
                let Some(i) = skv_storenode::engine::log_index_of(&k) else {
                    continue;
                };
                log.insert(i, v.to_vec());
            }
            logs.insert(*n, log);
        }
        for &(rg, index, term) in acked.iter().filter(|a| a.0 == g) {
            for (n, log) in &logs {
                let found = log
                    .get(&index)
                    .and_then(|b| decode::<Entry>(b).ok())
                    .is_some_and(|e| e.log_id.leader_id.term == term);
                if !found {
                    return Err(SimError::CommittedLost {
                        seed,
                        range: RangeId(rg),
                        store: StoreId(*n),
                        index,
                        term,
                    });
                }
            }
        }
        let applied = sim
            .shared
            .get(&(g, 1))
            .map_or(0, |s| s.applied_index.load(std::sync::atomic::Ordering::Acquire));
        let Some((&first, a)) = logs.iter().next() else {
            continue;
        };
        for (n, b) in logs.iter().skip(1) {
            for i in 1..=applied {
                if a.get(&i) != b.get(&i) {
                    let show = |e: Option<&Vec<u8>>| match e.map(|b| decode::<Entry>(b)) {
                        None => "none".to_string(),
                        Some(Ok(e)) => format!("{e}"),
                        Some(Err(e)) => format!("undecodable: {e}"),
                    };
                    return Err(SimError::LogsDiverge {
                        seed,
                        range: RangeId(g),
                        a: StoreId(first),
                        b: StoreId(*n),
                        index: i,
                        detail: format!(
                            "{} vs {}; applied {:?}; last log indexes {:?}",
                            show(a.get(&i)),
                            show(b.get(&i)),
                            (1..=sim.cfg.nodes)
                                .map(|n| sim
                                    .shared
                                    .get(&(g, n))
                                    .map(|s| s.applied_index.load(std::sync::atomic::Ordering::Acquire)))
                                .collect::<Vec<_>>(),
                            logs.values().map(|l| l.keys().next_back().copied()).collect::<Vec<_>>()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}
