//! Repair (replicas on stores DOWN for longer than `repair_after_ms`) and drain (every
//! replica off a DRAINING store, leaders first).

use super::{Operator, Reason, Tick};
use crate::model::{Role, StoreState};
use skv_common::ids::StoreId;

/// Whether `s` has been DOWN long enough for its replicas to be rebuilt elsewhere.
fn repairable(t: &Tick, s: StoreId) -> bool {
    if t.cfg.repair_after_ms == 0 || t.state.get(&s) != Some(&StoreState::Down) {
        return false;
    }
    let last = t.snap.store_last_heartbeat_ms.get(&s).copied().unwrap_or(0);
    let down_since = last.saturating_add(t.cfg.store_down_after_ms);
    t.snap.now_ms.saturating_sub(down_since) >= t.cfg.repair_after_ms
}

pub(super) fn repair_and_drain(t: &mut Tick) {
    let snap = t.snap;
    for r in &snap.ranges {
        if t.full() {
            return;
        }
        let d = &r.desc;
        if t.used.contains(&d.id) || d.replicas.is_empty() {
            continue;
        }
        let Some(leader) = t.live_leader(r) else { continue };
        // Repair first: the range is one failure closer to losing its quorum.
        if let Some(dead) = d
            .replicas
            .iter()
            .map(|x| x.store)
            .find(|s| *s != leader && repairable(t, *s))
        {
            if let Some(to) = t.pick_target(d, &[]) {
                t.push(Operator::MoveReplica {
                    desc: d.clone(),
                    leader,
                    from: dead,
                    to,
                    reason: Reason::Repair,
                });
            }
            continue;
        }
        let draining = |s: StoreId| t.state.get(&s) == Some(&StoreState::Draining);
        let Some(from) = d.replicas.iter().map(|x| x.store).find(|s| draining(*s)) else {
            continue;
        };
        if from == leader {
            // Leaders leave first: to the UP voter with the fewest leaders.
            let to = d
                .replicas
                .iter()
                .filter(|x| x.role == Role::Voter && x.store != from && t.is_up(x.store))
                .map(|x| x.store)
                .min_by_key(|s| (t.leaders.get(s).copied().unwrap_or(0), *s));
            if let Some(to) = to {
                t.push(Operator::TransferLeader {
                    desc: d.clone(),
                    from,
                    to,
                    reason: Reason::Drain,
                });
                continue;
            }
        }
        if let Some(to) = t.pick_target(d, &[]) {
            t.push(Operator::MoveReplica {
                desc: d.clone(),
                leader,
                from,
                to,
                reason: Reason::Drain,
            });
        }
    }
}
