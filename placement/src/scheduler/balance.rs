//! Spreading the halves of a load split, and leader/replica balance.
//!
//! The no-ping-pong rule: every balance move strictly lowers a sum of squares, so no later
//! move can undo it while the measured load stays the same:
//! - a replica moves from store A to store B only if `replicas(A) - replicas(B) >= 2` (and
//!   above the tolerance): afterwards A still has at least as many as B;
//! - a leader moves by count only if `leaders(A) - leaders(B) >= 2` (and above the
//!   tolerance), and never makes the leader load of B exceed what A is left with;
//! - a leader moves by load (`q` ops/s) only if `load(B) + q <= load(A) - q`, A is above the
//!   mean by more than the tolerance, and the move leaves the leader counts within tolerance.
//!
//! Count moves with a cold range leave the load unchanged; load moves lower the load sum of
//! squares; so a sequence of moves on a fixed load is finite: the operator count converges to
//! 0 (tested over hundreds of ticks in `sim`).

use super::{Operator, Reason, Tick};
use crate::model::{Range, Role};
use skv_common::ids::{RangeId, StoreId};
use std::collections::{HashMap, HashSet};

/// Stores each range must avoid (as leader or replica): the leader store of its sibling
/// from a recent load split, so the two halves stay on different stores.
fn anti_affinity(t: &Tick) -> HashMap<RangeId, StoreId> {
    let by_id: HashMap<RangeId, &Range> = t.snap.ranges.iter().map(|r| (r.desc.id, r)).collect();
    let mut avoid = HashMap::new();
    for (right, left) in &t.snap.load_split_siblings {
        let (Some(r), Some(l)) = (by_id.get(right), by_id.get(left)) else {
            continue;
        };
        if let Some(ll) = l.leader {
            avoid.insert(*right, ll);
        }
        if let Some(rl) = r.leader
            && Some(rl) != l.leader
        {
            avoid.insert(*left, rl);
        }
    }
    avoid
}

/// After a load split: the right half's leader leaves the left half's leader store, then
/// the right half's replica there moves to another store.
pub(super) fn spread(t: &mut Tick) {
    let snap = t.snap;
    let by_id: HashMap<RangeId, &Range> = snap.ranges.iter().map(|r| (r.desc.id, r)).collect();
    let mut pairs: Vec<(RangeId, RangeId)> = snap.load_split_siblings.iter().map(|(a, b)| (*a, *b)).collect();
    pairs.sort();
    for (right, left) in pairs {
        if t.full() {
            return;
        }
        let (Some(r), Some(l)) = (by_id.get(&right), by_id.get(&left)) else {
            continue;
        };
        if t.used.contains(&right) {
            continue;
        }
        let (Some(rl), Some(ll)) = (t.live_leader(r), t.live_leader(l)) else {
            continue;
        };
        if rl == ll {
            let to = r
                .desc
                .replicas
                .iter()
                .filter(|x| x.role == Role::Voter && x.store != ll && t.is_up(x.store))
                .map(|x| x.store)
                .min_by(|a, b| {
                    let ka = (
                        t.leader_qps.get(a).copied().unwrap_or(0.0),
                        t.leaders.get(a).copied().unwrap_or(0),
                    );
                    let kb = (
                        t.leader_qps.get(b).copied().unwrap_or(0.0),
                        t.leaders.get(b).copied().unwrap_or(0),
                    );
                    ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
                });
            if let Some(to) = to {
                t.push(Operator::TransferLeader {
                    desc: r.desc.clone(),
                    from: rl,
                    to,
                    reason: Reason::Spread,
                });
            }
            continue;
        }
        if r.desc.has_replica_on(ll)
            && let Some(to) = t.pick_target(&r.desc, &[ll])
        {
            t.push(Operator::MoveReplica {
                desc: r.desc.clone(),
                leader: rl,
                from: ll,
                to,
                reason: Reason::Spread,
            });
        }
    }
}

fn tolerance(t: &Tick, total: f64, n: usize) -> f64 {
    let mean = if n == 0 { 0.0 } else { total / n as f64 };
    (mean * t.cfg.balance_tolerance).max(1.0)
}

/// Whether every replica of the range is on an UP store (balance leaves others alone).
fn healthy(t: &Tick, r: &Range) -> bool {
    r.desc
        .replicas
        .iter()
        .all(|x| t.is_up(x.store) && x.role == Role::Voter)
}

/// Leader balance: by count, then by load.
pub(super) fn leaders(t: &mut Tick, merging: &HashSet<RangeId>) {
    let avoid = anti_affinity(t);
    let n = t.targets.len();
    if n < 2 {
        return;
    }
    let snap = t.snap;
    let mut led_by: HashMap<StoreId, Vec<&Range>> = HashMap::new();
    for r in &snap.ranges {
        if let Some(l) = r.leader {
            led_by.entry(l).or_default().push(r);
        }
    }
    // By count: from the store with the most leaders, its coldest ranges first.
    loop {
        if t.full() {
            return;
        }
        let total: i64 = t.targets.iter().map(|s| t.leaders.get(s).copied().unwrap_or(0)).sum();
        let tol = tolerance(t, total as f64, n);
        let mut srcs: Vec<StoreId> = t.targets.clone();
        srcs.sort_by_key(|s| (std::cmp::Reverse(t.leaders.get(s).copied().unwrap_or(0)), *s));
        let mut chosen = None;
        let min_lc = t
            .targets
            .iter()
            .map(|s| t.leaders.get(s).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        'src: for src in srcs {
            let lc_src = t.leaders.get(&src).copied().unwrap_or(0);
            let d = (lc_src - min_lc) as f64;
            if d < 2.0 || d <= tol {
                // Sorted by count: no later source does better.
                break;
            }
            let mut led: Vec<&Range> = led_by
                .get(&src)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .copied()
                .filter(|r| !t.used.contains(&r.desc.id) && !merging.contains(&r.desc.id))
                .filter(|r| healthy(t, r) && t.live_leader(r).is_some())
                .collect();
            led.sort_by(|a, b| {
                t.qps(a.desc.id)
                    .partial_cmp(&t.qps(b.desc.id))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.desc.id.cmp(&b.desc.id))
            });
            for r in led {
                let q = t.qps(r.desc.id);
                let best = r
                    .desc
                    .replicas
                    .iter()
                    .map(|x| x.store)
                    .filter(|s| *s != src && avoid.get(&r.desc.id) != Some(s))
                    .filter(|s| {
                        let lc = t.leaders.get(s).copied().unwrap_or(0);
                        let d = (lc_src - lc) as f64;
                        let load_ok = q <= 0.0
                            || t.leader_qps.get(s).copied().unwrap_or(0.0) + q
                                <= t.leader_qps.get(&src).copied().unwrap_or(0.0) - q;
                        d >= 2.0 && d > tol && load_ok
                    })
                    .min_by_key(|s| (t.leaders.get(s).copied().unwrap_or(0), *s));
                if let Some(to) = best {
                    chosen = Some((r.desc.clone(), src, to));
                    break 'src;
                }
            }
        }
        let Some((desc, from, to)) = chosen else { break };
        t.push(Operator::TransferLeader {
            desc,
            from,
            to,
            reason: Reason::LeaderCount,
        });
    }
    // By load: from the hottest store, if it is above the mean by more than the tolerance.
    loop {
        if t.full() {
            return;
        }
        let total: f64 = t
            .targets
            .iter()
            .map(|s| t.leader_qps.get(s).copied().unwrap_or(0.0))
            .sum();
        if total <= 0.0 {
            return;
        }
        let mean = total / n as f64;
        let lc_total: i64 = t.targets.iter().map(|s| t.leaders.get(s).copied().unwrap_or(0)).sum();
        let lc_tol = tolerance(t, lc_total as f64, n);
        let Some(src) = t.targets.iter().copied().max_by(|a, b| {
            let la = t.leader_qps.get(a).copied().unwrap_or(0.0);
            let lb = t.leader_qps.get(b).copied().unwrap_or(0.0);
            la.partial_cmp(&lb).unwrap_or(std::cmp::Ordering::Equal).then(b.cmp(a))
        }) else {
            return;
        };
        let l_src = t.leader_qps.get(&src).copied().unwrap_or(0.0);
        if l_src <= mean * (1.0 + t.cfg.balance_tolerance.max(0.1)) {
            return;
        }
        let lc_src = t.leaders.get(&src).copied().unwrap_or(0);
        let mut led: Vec<&Range> = led_by
            .get(&src)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|r| !t.used.contains(&r.desc.id) && !merging.contains(&r.desc.id))
            .filter(|r| healthy(t, r) && t.live_leader(r).is_some() && t.qps(r.desc.id) > 0.0)
            .collect();
        // The hottest range that fits.
        led.sort_by(|a, b| {
            t.qps(b.desc.id)
                .partial_cmp(&t.qps(a.desc.id))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.desc.id.cmp(&b.desc.id))
        });
        let mut chosen = None;
        for r in led {
            let q = t.qps(r.desc.id);
            let to = r
                .desc
                .replicas
                .iter()
                .map(|x| x.store)
                .filter(|s| *s != src && avoid.get(&r.desc.id) != Some(s))
                .filter(|s| {
                    let l = t.leader_qps.get(s).copied().unwrap_or(0.0);
                    let lc = t.leaders.get(s).copied().unwrap_or(0);
                    l + q <= l_src - q && ((lc + 1) - (lc_src - 1)) as f64 <= lc_tol
                })
                .min_by(|a, b| {
                    let la = t.leader_qps.get(a).copied().unwrap_or(0.0);
                    let lb = t.leader_qps.get(b).copied().unwrap_or(0.0);
                    la.partial_cmp(&lb).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(b))
                });
            if let Some(to) = to {
                chosen = Some((r.desc.clone(), to));
                break;
            }
        }
        let Some((desc, to)) = chosen else { return };
        t.push(Operator::TransferLeader {
            desc,
            from: src,
            to,
            reason: Reason::LeaderLoad,
        });
    }
}

/// Replica count balance: from the store with the most replicas to the one with the
/// fewest, never a leader's replica (leader balance moves those first).
pub(super) fn replicas(t: &mut Tick, merging: &HashSet<RangeId>) {
    let avoid = anti_affinity(t);
    let n = t.targets.len();
    if n < 2 {
        return;
    }
    let snap = t.snap;
    loop {
        if t.full() {
            return;
        }
        let total: i64 = t.targets.iter().map(|s| t.replicas.get(s).copied().unwrap_or(0)).sum();
        let tol = tolerance(t, total as f64, n);
        let mut srcs: Vec<StoreId> = t.targets.clone();
        srcs.sort_by_key(|s| (std::cmp::Reverse(t.replicas.get(s).copied().unwrap_or(0)), *s));
        let mut chosen = None;
        'src: for src in srcs {
            let c_src = t.replicas.get(&src).copied().unwrap_or(0);
            let min_other = t
                .targets
                .iter()
                .filter(|s| **s != src)
                .map(|s| t.replicas.get(s).copied().unwrap_or(0))
                .min()
                .unwrap_or(c_src);
            let d = (c_src - min_other) as f64;
            if d < 2.0 || d <= tol {
                // Sorted by count: no later source does better.
                break;
            }
            for r in &snap.ranges {
                let id = r.desc.id;
                if !r.desc.has_replica_on(src)
                    || t.used.contains(&id)
                    || merging.contains(&id)
                    || !healthy(t, r)
                    || r.leader == Some(src)
                {
                    continue;
                }
                let Some(leader) = t.live_leader(r) else { continue };
                let avoid_s: Vec<StoreId> = avoid.get(&id).copied().into_iter().collect();
                let Some(to) = t.pick_target(&r.desc, &avoid_s) else {
                    continue;
                };
                let dd = (c_src - t.replicas.get(&to).copied().unwrap_or(0)) as f64;
                if dd >= 2.0 && dd > tol {
                    chosen = Some((r.desc.clone(), leader, src, to));
                    break 'src;
                }
            }
        }
        let Some((desc, leader, from, to)) = chosen else { return };
        t.push(Operator::MoveReplica {
            desc,
            leader,
            from,
            to,
            reason: Reason::ReplicaCount,
        });
    }
}
