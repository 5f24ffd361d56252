//! The faults of issue 14's third round (ADR 0031): network partitions between storenodes
//! (iptables in their network namespaces, crate::netns), and replica moves and store drains
//! through placement's admin API while the clients run. The loop that schedules them is
//! nemesis.rs's.

use crate::cluster::ChaosCluster;
use crate::nemesis::{Ctx, NemesisKind, result_text};
use crate::netns::{Shape, plan};
use rand::Rng;
use rand::rngs::StdRng;
use skv_proto::internal::{StoreInfo, StoreState};
use std::time::Duration;
use tokio::time::Instant;

/// How long a move may take before its event says FAILED.
const MOVE_WAIT: Duration = Duration::from_secs(30);
/// How long a drain may take (every replica of the store moved) before its event says FAILED.
const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// How long the fresh store that replaces a drained one has to register.
const REGISTER_WAIT: Duration = Duration::from_secs(20);

pub(crate) async fn fault(ctx: &Ctx, kind: NemesisKind, rng: &mut StdRng, hold: Duration, round: u64) {
    match kind {
        NemesisKind::Partition => partition(ctx, rng, hold, round).await,
        NemesisKind::Move => move_replica(ctx, rng, round).await,
        NemesisKind::Drain => drain(ctx, rng, round).await,
        _ => ctx.event(kind.name(), "-", format!("round {round}: not a fault of topology.rs")),
    }
}

/// One partition: the shapes in turn (majority/minority, bridge, one-way), held for `hold`,
/// then every rule removed.
async fn partition(ctx: &Ctx, rng: &mut StdRng, hold: Duration, round: u64) {
    let done = ctx.count_events("partition");
    let shape = Shape::ALL[done % Shape::ALL.len()];
    // Half the time the cut-off (or sending) side is the leader of a workload key's range.
    let leader = ctx.maybe_leader_store(rng).await;
    let n = ctx.cluster.lock().await.stores.len();
    let p = {
        let mut busy = ctx.busy.lock();
        let mut free: Vec<usize> = (0..n).filter(|i| !busy.contains(i)).collect();
        if let Some(l) = leader.filter(|l| free.contains(l)) {
            free = vec![l];
        }
        let p = plan(shape, n, &free, rng);
        if let Some(p) = &p {
            busy.extend(p.isolated.iter().copied());
        }
        p
    };
    let Some(p) = p else {
        ctx.event(
            "partition",
            shape.name(),
            format!(
                "round {round}: FAILED: no {} of {n} storenodes with a free one",
                shape.name()
            ),
        );
        return;
    };
    let r = {
        let c = ctx.cluster.lock().await;
        match c.netns() {
            Some(net) => net.apply(&p.rules).map_err(|e| e.to_string()),
            None => Err("the storenodes are not in network namespaces".to_string()),
        }
    };
    ctx.event(
        "partition",
        shape.name(),
        result_text(r.map(|()| {
            format!(
                "round {round}: {}{}; {} DROP rules for {hold:?}",
                p.text,
                match leader {
                    Some(l) if p.isolated.contains(&l) => format!(" (store-{l} leads a workload key's range)"),
                    _ => String::new(),
                },
                p.rules.len()
            )
        })),
    );
    tokio::time::sleep(hold).await;
    let r = {
        let c = ctx.cluster.lock().await;
        match c.netns() {
            Some(net) => net.heal().map_err(|e| e.to_string()),
            None => Err("no namespaces".to_string()),
        }
    };
    ctx.event(
        "partition-healed",
        shape.name(),
        result_text(r.map(|k| format!("removed {k} DROP rules"))),
    );
    let mut busy = ctx.busy.lock();
    for i in &p.isolated {
        busy.remove(i);
    }
}

fn is_up(s: &StoreInfo) -> bool {
    s.state() == StoreState::Up
}

fn slot_name(c: &ChaosCluster, stores: &[StoreInfo], id: u64) -> String {
    c.store_index(stores, id)
        .map(|i| format!("store-{i}"))
        .unwrap_or_else(|| "store-?".into())
}

/// Moves a workload key's range's replica (the leader's half the time) to an UP store
/// that does not hold the range, and waits until placement's range map shows it there.
async fn move_replica(ctx: &Ctx, rng: &mut StdRng, round: u64) {
    let keys = &ctx.opts().internal_keys;
    if keys.is_empty() {
        return;
    }
    let key = keys[rng.random_range(0..keys.len())].clone();
    let plan = {
        let c = ctx.cluster.lock().await;
        match c.range_of(&key).await {
            Ok((range, stores)) => match range.descriptor {
                Some(desc) => {
                    let held: Vec<u64> = desc.replicas.iter().map(|r| r.store_id).collect();
                    let targets: Vec<u64> = stores
                        .iter()
                        .filter(|s| is_up(s) && !held.contains(&s.store_id))
                        .map(|s| s.store_id)
                        .collect();
                    if held.is_empty() || targets.is_empty() {
                        Err(format!(
                            "r{}: no UP store without a replica (replicas on {held:?}; a move needs a 4th store)",
                            desc.range_id
                        ))
                    } else {
                        let from = if range.leader_store_id != 0 && rng.random_bool(0.5) {
                            range.leader_store_id
                        } else {
                            held[rng.random_range(0..held.len())]
                        };
                        let to = targets[rng.random_range(0..targets.len())];
                        let text = format!(
                            "s{from} ({}{}) -> s{to} ({})",
                            slot_name(&c, &stores, from),
                            if from == range.leader_store_id {
                                ", the leader"
                            } else {
                                ""
                            },
                            slot_name(&c, &stores, to)
                        );
                        match c.move_replica(desc.range_id, from, to).await {
                            Ok(()) => Ok((desc.range_id, from, to, text)),
                            Err(e) => Err(format!("r{} {text}: {e}", desc.range_id)),
                        }
                    }
                }
                None => Err("range without descriptor".into()),
            },
            Err(e) => Err(e.to_string()),
        }
    };
    let (range_id, from, to, text) = match plan {
        Ok(x) => x,
        Err(e) => {
            ctx.event("move", "-", format!("round {round}: FAILED: {e}"));
            return;
        }
    };
    let target = format!("r{range_id}");
    ctx.event("move", &target, format!("round {round}: {text} started"));
    let started = Instant::now();
    let mut last = String::new();
    // Other operators seen on the range meanwhile (the scheduler may move it too), and
    // how many polls in a row found no admin move on it.
    let mut others: Vec<String> = Vec::new();
    let mut gone = 0;
    while started.elapsed() < MOVE_WAIT {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ranges, ops) = {
            let c = ctx.cluster.lock().await;
            (c.ranges().await, c.operators().await)
        };
        if let Ok(ops) = ops {
            let on: Vec<_> = ops.iter().filter(|o| o.range_id == range_id).collect();
            for o in &on {
                let d = format!("{} {} {}", o.origin, o.kind, o.description);
                if o.origin != "admin" && !others.contains(&d) {
                    others.push(d);
                }
            }
            let mine = on.iter().any(|o| o.origin == "admin" && o.kind.contains("move"));
            gone = if mine { 0 } else { gone + 1 };
        }
        let seen = if others.is_empty() {
            String::new()
        } else {
            format!("; other operators on r{range_id}: {}", others.join(", "))
        };
        match ranges {
            Ok(all) => {
                let d = all
                    .iter()
                    .filter_map(|r| r.descriptor.as_ref())
                    .find(|d| d.range_id == range_id);
                match d {
                    Some(d) => {
                        let held: Vec<u64> = d.replicas.iter().map(|r| r.store_id).collect();
                        if held.contains(&to) && !held.contains(&from) {
                            ctx.event(
                                "moved",
                                &target,
                                format!(
                                    "placement shows r{range_id} on {held:?} (s{to} in place of s{from}) after {:.1?}{seen}",
                                    started.elapsed()
                                ),
                            );
                            return;
                        }
                        last = format!("replicas {held:?}{seen}");
                        // The admin operator ended (failed or overtaken) without the move.
                        if gone >= 6 {
                            ctx.event(
                                "moved",
                                &target,
                                format!(
                                    "FAILED: s{from} -> s{to}: the admin operator ended without the move after {:.1?}: {last}",
                                    started.elapsed()
                                ),
                            );
                            return;
                        }
                    }
                    // Split or merged meanwhile: the move of that range is moot.
                    None => last = format!("r{range_id} is gone from the range map (merged)"),
                }
            }
            Err(e) => last = e.to_string(),
        }
    }
    ctx.event(
        "moved",
        &target,
        format!("FAILED: s{from} -> s{to} not done after {MOVE_WAIT:?}: {last}"),
    );
}

/// Drains a store (placement moves every replica away), waits until placement says it is
/// drained, then replaces it: the process is stopped and a fresh store (empty data
/// directory, new store id) starts in its slot, so the next drain again finds 3 other UP
/// stores. A drain needs 4 UP stores: 3 replicas must fit elsewhere.
async fn drain(ctx: &Ctx, rng: &mut StdRng, round: u64) {
    let picked = {
        let c = ctx.cluster.lock().await;
        // Replicas per store: a store that holds some is drained first (a store without
        // any is drained at once and shows little).
        let holding: Vec<u64> = match c.store_status().await {
            Ok(st) => st.iter().filter(|s| s.replicas > 0).map(|s| s.store_id).collect(),
            Err(_) => Vec::new(),
        };
        match c.stores_info().await {
            Ok(stores) => {
                let up: Vec<&StoreInfo> = stores.iter().filter(|s| is_up(s)).collect();
                if up.len() < 4 {
                    Err(format!(
                        "{} UP stores: a drain needs 4 (3 replicas must fit on the others)",
                        up.len()
                    ))
                } else {
                    let mut busy = ctx.busy.lock();
                    let mut free: Vec<(usize, u64)> = up
                        .iter()
                        .filter_map(|s| c.store_index(&stores, s.store_id).map(|i| (i, s.store_id)))
                        .filter(|(i, _)| !busy.contains(i))
                        .collect();
                    if free.iter().any(|(_, id)| holding.contains(id)) {
                        free.retain(|(_, id)| holding.contains(id));
                    }
                    if free.is_empty() {
                        Err("no free storenode".to_string())
                    } else {
                        let (i, id) = free[rng.random_range(0..free.len())];
                        busy.insert(i);
                        Ok((i, id, stores.iter().map(|s| s.store_id).collect::<Vec<u64>>()))
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let (i, id, known) = match picked {
        Ok(x) => x,
        Err(e) => {
            ctx.event("drain", "-", format!("round {round}: FAILED: {e}"));
            return;
        }
    };
    let name = format!("store-{i}");
    let replicas_before = replicas_of(ctx, id).await;
    let r = ctx.cluster.lock().await.drain_store(id).await;
    ctx.event(
        "drain",
        &name,
        result_text(r.map(|()| {
            format!(
                "round {round}: s{id} DRAINING, it holds {} replicas",
                replicas_before.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
            )
        })),
    );
    let started = Instant::now();
    let mut left = None;
    let drained = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = ctx.cluster.lock().await.store_status().await;
        if let Ok(all) = status
            && let Some(s) = all.iter().find(|s| s.store_id == id)
        {
            if s.drained {
                break true;
            }
            left = Some(s.replicas);
        }
        if started.elapsed() >= DRAIN_WAIT {
            break false;
        }
    };
    if !drained {
        ctx.event(
            "drained",
            &name,
            format!(
                "FAILED: s{id} still holds {} replicas after {DRAIN_WAIT:?}; it stays DRAINING",
                left.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
            ),
        );
        ctx.busy.lock().remove(&i);
        return;
    }
    ctx.event(
        "drained",
        &name,
        format!("s{id} holds no replica after {:.1?}", started.elapsed()),
    );
    let r = ctx.cluster.lock().await.replace_store(i);
    let r = match r {
        Ok(()) => wait_new_store(ctx, i, &known).await,
        Err(e) => Err(e.to_string()),
    };
    ctx.event(
        "replace",
        &name,
        result_text(r.map(|new| format!("s{id} stopped; a fresh store in its slot registered as s{new}"))),
    );
    ctx.busy.lock().remove(&i);
}

async fn replicas_of(ctx: &Ctx, id: u64) -> Option<u64> {
    let all = ctx.cluster.lock().await.store_status().await.ok()?;
    all.iter().find(|s| s.store_id == id).map(|s| s.replicas)
}

/// Waits until a store id not in `known` registers from slot `i`; returns it.
async fn wait_new_store(ctx: &Ctx, i: usize, known: &[u64]) -> Result<u64, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < REGISTER_WAIT {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let c = ctx.cluster.lock().await;
        match c.stores_info().await {
            Ok(stores) => {
                if let Some(s) = stores
                    .iter()
                    .find(|s| !known.contains(&s.store_id) && c.store_index(&stores, s.store_id) == Some(i))
                {
                    return Ok(s.store_id);
                }
                last = format!("{} stores known", stores.len());
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "no new store registered from store-{i} within {REGISTER_WAIT:?} ({last})"
    ))
}
