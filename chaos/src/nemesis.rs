//! Faults: which ones exist, and the loop that injects them in turn and together.

use crate::cluster::{ChaosCluster, Role};
use crate::history::NemesisEvent;
use crate::recorder::Recorder;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum NemesisKind {
    /// `kill -9` a storenode, restart it on its data directory a few seconds later.
    Kill,
    /// SIGSTOP a storenode, SIGCONT it a few seconds later.
    Pause,
    /// `kill -9` the placement leader, restart it a few seconds later.
    PdLeader,
    /// Split the range of one of the workload's keys at that key (admin API).
    Split,
    /// Move the leadership of a workload key's range to another replica (admin API).
    TransferLeader,
    /// Merge a workload key's range with its right neighbour (admin API).
    Merge,
    /// Make one storenode's disk slow (every write and fsync delayed) for a few seconds; the
    /// storenodes then run on skv-lazyfs mounts (crate::disk).
    SlowDisk,
    /// `kill -9` one of the proxies, restart it a few seconds later.
    ProxyKill,
    /// `kill -9` one member of a 3-member etcd (never two: the majority stays), restart it
    /// on its data directory a few seconds later.
    EtcdMember,
    /// Jump one process's wall clock (a storenode, a proxy or placement) forward and back by
    /// tens of seconds for a few seconds, its monotonic clock untouched; every process then
    /// runs under libfaketime (crate::clock).
    Clock,
    /// Cut storenodes from each other with iptables in their network namespaces, a few
    /// seconds: majority/minority (the minority sometimes cut from placement and the proxies
    /// too), bridge, one-way, in turn (crate::netns); the storenodes then run in namespaces.
    Partition,
    /// Move a workload key's range's replica to a store that does not hold it (admin
    /// API) and wait until placement shows it there; runs with 4 storenodes.
    Move,
    /// Drain a storenode (admin API) until it holds no replica, then replace it by a fresh
    /// store in its slot; runs with 4 storenodes.
    Drain,
}

impl NemesisKind {
    /// Every kind.
    pub const ALL: [NemesisKind; 13] = [
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::PdLeader,
        NemesisKind::Split,
        NemesisKind::TransferLeader,
        NemesisKind::Merge,
        NemesisKind::SlowDisk,
        NemesisKind::ProxyKill,
        NemesisKind::EtcdMember,
        NemesisKind::Partition,
        NemesisKind::Move,
        NemesisKind::Drain,
        NemesisKind::Clock,
    ];

    /// The faults of a run that names none (`skv-chaos run` without `--nemesis`, and
    /// `RunOptions::new`): the first six. `slow-disk` (FUSE mounts), `proxy-kill` and
    /// `etcd-member` (a 3-member etcd) are chosen by name, so the measured CI short run keeps its plan.
    pub const DEFAULT: [NemesisKind; 6] = [
        NemesisKind::Kill,
        NemesisKind::Pause,
        NemesisKind::PdLeader,
        NemesisKind::Split,
        NemesisKind::TransferLeader,
        NemesisKind::Merge,
    ];

    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            NemesisKind::Kill => "kill",
            NemesisKind::Pause => "pause",
            NemesisKind::PdLeader => "pd-leader",
            NemesisKind::Split => "split",
            NemesisKind::TransferLeader => "transfer-leader",
            NemesisKind::Merge => "merge",
            NemesisKind::SlowDisk => "slow-disk",
            NemesisKind::ProxyKill => "proxy-kill",
            NemesisKind::EtcdMember => "etcd-member",
            NemesisKind::Clock => "clock",
            NemesisKind::Partition => "partition",
            NemesisKind::Move => "move",
            NemesisKind::Drain => "drain",
        }
    }
}

/// Timing of the nemesis loop.
#[derive(Clone, Debug)]
pub struct NemesisOptions {
    /// Which faults.
    pub kinds: Vec<NemesisKind>,
    /// Seed of its choices (targets, durations, pairs).
    pub seed: u64,
    /// Calm between two rounds: uniform in this range (ms).
    pub calm_ms: (u64, u64),
    /// How long a process stays down or paused (ms).
    pub fault_ms: (u64, u64),
    /// Probability that a round runs two different faults at once.
    pub together: f64,
    /// The workload's keys as internal keys (namespace prefix + key), for the range faults.
    pub internal_keys: Vec<Vec<u8>>,
}

/// Everything the nemesis did, shared with the runner.
pub type Events = Arc<Mutex<Vec<NemesisEvent>>>;

pub(crate) struct Ctx {
    pub(crate) cluster: Arc<tokio::sync::Mutex<ChaosCluster>>,
    rec: Arc<Recorder>,
    events: Events,
    /// Storenodes a fault is using right now (two faults at once pick different ones).
    pub(crate) busy: Mutex<HashSet<usize>>,
    opts: NemesisOptions,
}

impl Ctx {
    pub(crate) fn event(&self, kind: &str, target: &str, detail: impl Into<String>) {
        let e = NemesisEvent {
            at: self.rec.now(),
            kind: kind.to_string(),
            target: target.to_string(),
            detail: detail.into(),
        };
        tracing::info!(at = e.at as f64 / 1e9, kind, target, detail = %e.detail, "nemesis");
        self.events.lock().push(e);
    }

    /// Events of `kind` so far.
    pub(crate) fn count_events(&self, kind: &str) -> usize {
        self.events.lock().iter().filter(|e| e.kind == kind).count()
    }

    pub(crate) fn opts(&self) -> &NemesisOptions {
        &self.opts
    }

    /// Half the time the index of the storenode that leads a random workload key's range (a
    /// fault aimed at a leader), else (or when placement does not answer) `None`.
    pub(crate) async fn maybe_leader_store(&self, rng: &mut StdRng) -> Option<usize> {
        let keys = &self.opts.internal_keys;
        // The coin is drawn first, whatever the keys, so that a seed replays the same draws.
        if !rng.random_bool(0.5) || keys.is_empty() {
            return None;
        }
        let key = &keys[rng.random_range(0..keys.len())];
        let c = self.cluster.lock().await;
        let (range, stores) = c.range_of(key).await.ok()?;
        c.store_index(&stores, range.leader_store_id)
    }
}

/// Runs rounds of faults until `until`, then returns (every fault it started is undone
/// before it returns; the runner heals again anyway).
pub async fn run(
    cluster: Arc<tokio::sync::Mutex<ChaosCluster>>,
    rec: Arc<Recorder>,
    events: Events,
    opts: NemesisOptions,
    until: Instant,
) {
    if opts.kinds.is_empty() {
        tokio::time::sleep_until(until).await;
        return;
    }
    let mut rng = StdRng::seed_from_u64(opts.seed ^ 0x006e_656d_6573_6973);
    let ctx = Arc::new(Ctx {
        cluster,
        rec,
        events,
        busy: Mutex::new(HashSet::new()),
        opts,
    });
    let mut round = 0u64;
    loop {
        let calm = rng.random_range(ctx.opts.calm_ms.0..=ctx.opts.calm_ms.1.max(ctx.opts.calm_ms.0));
        tokio::time::sleep(Duration::from_millis(calm)).await;
        if Instant::now() + Duration::from_millis(ctx.opts.fault_ms.1) >= until {
            break;
        }
        round += 1;
        let kinds = &ctx.opts.kinds;
        // In turn first (every kind once, in order), then at random, sometimes two at once.
        let in_turn = (round as usize) <= kinds.len();
        let first = if in_turn {
            kinds[round as usize - 1]
        } else {
            kinds[rng.random_range(0..kinds.len())]
        };
        let mut picked = vec![first];
        if !in_turn && kinds.len() > 1 && rng.random_bool(ctx.opts.together.clamp(0.0, 1.0)) {
            let others: Vec<NemesisKind> = kinds.iter().copied().filter(|k| *k != first).collect();
            picked.push(others[rng.random_range(0..others.len())]);
        }
        let mut tasks = Vec::new();
        for kind in picked {
            let ctx = ctx.clone();
            let seed = rng.random::<u64>();
            tasks.push(tokio::spawn(async move { fault(&ctx, kind, seed, round).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

async fn fault(ctx: &Ctx, kind: NemesisKind, seed: u64, round: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let hold =
        Duration::from_millis(rng.random_range(ctx.opts.fault_ms.0..=ctx.opts.fault_ms.1.max(ctx.opts.fault_ms.0)));
    match kind {
        NemesisKind::Kill | NemesisKind::Pause => {
            // Half the time the leader of a workload key's range, else any storenode.
            let leader = ctx.maybe_leader_store(&mut rng).await;
            let n = ctx.cluster.lock().await.stores.len();
            let Some(i) = pick_store(ctx, &mut rng, n, leader) else {
                ctx.event(kind.name(), "-", format!("round {round}: no free storenode"));
                return;
            };
            let name = format!("store-{i}");
            if kind == NemesisKind::Kill {
                let was = ctx.cluster.lock().await.kill(Role::Store, i);
                ctx.event(
                    "kill",
                    &name,
                    format!(
                        "round {round}: kill -9{} (was running: {was}), down {hold:?}",
                        leader_note(leader, i)
                    ),
                );
                tokio::time::sleep(hold).await;
                let r = ctx.cluster.lock().await.start_proc(Role::Store, i);
                ctx.event("restart", &name, result_text(r.map(|()| "restarted".to_string())));
            } else {
                let r = ctx.cluster.lock().await.pause(Role::Store, i, true);
                ctx.event(
                    "pause",
                    &name,
                    result_text(r.map(|()| format!("round {round}: SIGSTOP{} for {hold:?}", leader_note(leader, i)))),
                );
                tokio::time::sleep(hold).await;
                let r = ctx.cluster.lock().await.pause(Role::Store, i, false);
                ctx.event("resume", &name, result_text(r.map(|()| "SIGCONT".to_string())));
            }
            ctx.busy.lock().remove(&i);
        }
        NemesisKind::PdLeader => {
            let leader = ctx.cluster.lock().await.placement_leader().await;
            let i = match leader {
                Ok(Some(i)) => i,
                Ok(None) => {
                    ctx.event(
                        "pd-leader-kill",
                        "-",
                        format!("round {round}: no placement leader right now"),
                    );
                    return;
                }
                Err(e) => {
                    ctx.event("pd-leader-kill", "-", format!("round {round}: leader unknown: {e}"));
                    return;
                }
            };
            let name = format!("pd-{i}");
            let was = ctx.cluster.lock().await.kill(Role::Placement, i);
            ctx.event(
                "pd-leader-kill",
                &name,
                format!("round {round}: kill -9 the leader (was running: {was}), down {hold:?}"),
            );
            tokio::time::sleep(hold).await;
            let r = ctx.cluster.lock().await.start_proc(Role::Placement, i);
            ctx.event("restart", &name, result_text(r.map(|()| "restarted".to_string())));
        }
        NemesisKind::SlowDisk | NemesisKind::ProxyKill | NemesisKind::EtcdMember => {
            crate::faults::fault(ctx, kind, &mut rng, hold, round).await
        }
        NemesisKind::Clock => crate::clock::fault(ctx, &mut rng, hold, round).await,
        NemesisKind::Partition | NemesisKind::Move | NemesisKind::Drain => {
            crate::topology::fault(ctx, kind, &mut rng, hold, round).await
        }
        NemesisKind::Split | NemesisKind::TransferLeader | NemesisKind::Merge => {
            let keys = &ctx.opts.internal_keys;
            if keys.is_empty() {
                return;
            }
            let key = keys[rng.random_range(0..keys.len())].clone();
            let name = kind.name();
            let c = ctx.cluster.lock().await;
            let (range, stores) = match c.range_of(&key).await {
                Ok(x) => x,
                Err(e) => {
                    drop(c);
                    ctx.event(name, "-", format!("round {round}: {e}"));
                    return;
                }
            };
            let Some(desc) = range.descriptor.clone() else {
                drop(c);
                ctx.event(name, "-", format!("round {round}: range without descriptor"));
                return;
            };
            let target = format!("r{}", desc.range_id);
            let r = match kind {
                NemesisKind::Split if desc.start == key => Ok(format!("already starts at {}", printable(&key))),
                NemesisKind::Split => c
                    .split(desc.range_id, &key)
                    .await
                    .map(|s| format!("at {}: {s}", printable(&key))),
                NemesisKind::TransferLeader => {
                    let others: Vec<u64> = desc
                        .replicas
                        .iter()
                        .map(|r| r.store_id)
                        .filter(|s| *s != range.leader_store_id)
                        .collect();
                    if others.is_empty() {
                        Ok("no other replica".to_string())
                    } else {
                        let to = others[rng.random_range(0..others.len())];
                        let idx = c.store_index(&stores, to);
                        c.transfer_leader(desc.range_id, to).await.map(|()| {
                            format!(
                                "from s{} to s{to} (store-{})",
                                range.leader_store_id,
                                idx.map(|i| i.to_string()).unwrap_or_else(|| "?".into())
                            )
                        })
                    }
                }
                _ => match c.ranges().await {
                    // With the right neighbour, or the left one for the last range.
                    Ok(all) => {
                        let descs: Vec<_> = all.into_iter().filter_map(|r| r.descriptor).collect();
                        let right = descs.iter().find(|d| !desc.end.is_empty() && d.start == desc.end);
                        let left = descs.iter().find(|d| !desc.start.is_empty() && d.end == desc.start);
                        match (right, left) {
                            (Some(r), _) => c
                                .merge(desc.range_id, r.range_id)
                                .await
                                .map(|()| format!("r{} + r{}", desc.range_id, r.range_id)),
                            (None, Some(l)) => c
                                .merge(l.range_id, desc.range_id)
                                .await
                                .map(|()| format!("r{} + r{}", l.range_id, desc.range_id)),
                            (None, None) => Ok("the only range: nothing to merge with".to_string()),
                        }
                    }
                    Err(e) => Err(e),
                },
            };
            drop(c);
            ctx.event(name, &target, format!("round {round}: {}", result_text(r)));
        }
    }
}

fn leader_note(leader: Option<usize>, i: usize) -> &'static str {
    if leader == Some(i) { " a range leader" } else { "" }
}

/// A storenode no other fault is using: `prefer` if it is free, else a random free one.
pub(crate) fn pick_store(ctx: &Ctx, rng: &mut StdRng, n: usize, prefer: Option<usize>) -> Option<usize> {
    let mut busy = ctx.busy.lock();
    if let Some(p) = prefer.filter(|p| *p < n && !busy.contains(p)) {
        busy.insert(p);
        return Some(p);
    }
    let free: Vec<usize> = (0..n).filter(|i| !busy.contains(i)).collect();
    if free.is_empty() {
        return None;
    }
    let i = free[rng.random_range(0..free.len())];
    busy.insert(i);
    Some(i)
}

pub(crate) fn result_text<E: std::fmt::Display>(r: Result<String, E>) -> String {
    match r {
        Ok(s) => s,
        Err(e) => format!("FAILED: {e}"),
    }
}

/// A key for event text: printable bytes as they are, the rest escaped.
pub fn printable(key: &[u8]) -> String {
    key.iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}
