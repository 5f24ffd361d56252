//! Merge of small, cold, adjacent ranges: colocate (move replicas of the right range onto
//! the left's stores), align leaders (the right's leader moves to the left's), then merge.
//! One step per pair per tick; the ranges of a pair in progress are left alone by balance.

use super::{Operator, Reason, Tick};
use crate::model::{Range, Role};
use skv_common::ids::{RangeId, StoreId};
use std::collections::{BTreeSet, HashSet};

fn voter_set(r: &Range) -> Option<BTreeSet<StoreId>> {
    if r.desc.replicas.iter().any(|x| x.role != Role::Voter) {
        return None;
    }
    Some(r.desc.replicas.iter().map(|x| x.store).collect())
}

/// Whether `l` and `r` (adjacent) qualify for an automatic merge.
fn cold_pair(t: &Tick, l: &Range, r: &Range) -> bool {
    let cfg = t.cfg;
    let snap = t.snap;
    let (Some(a), Some(b)) = (snap.load.get(&l.desc.id), snap.load.get(&r.desc.id)) else {
        return false;
    };
    // A split this leader did not see (before it took over) may be recent: the cooldown
    // counts from the later of the last known split and the start of this leadership.
    let cooled = |id: RangeId| {
        let since = snap
            .last_split_ms
            .get(&id)
            .copied()
            .unwrap_or(0)
            .max(snap.leader_since_ms);
        snap.now_ms.saturating_sub(since) >= cfg.merge_cooldown_ms
    };
    cfg.merge_size_bytes > 0
        && a.size_bytes.saturating_add(b.size_bytes) < cfg.merge_size_bytes
        && a.qps() + b.qps() < cfg.split_qps_threshold / 2.0
        && cooled(l.desc.id)
        && cooled(r.desc.id)
}

/// Chooses merge steps; returns every range of a pair being merged (balance skips them).
pub(super) fn merges(t: &mut Tick) -> HashSet<RangeId> {
    let snap = t.snap;
    let mut merging = HashSet::new();
    let mut order: Vec<&Range> = snap.ranges.iter().filter(|r| !r.desc.replicas.is_empty()).collect();
    order.sort_by(|a, b| a.desc.start.cmp(&b.desc.start));
    let forced: HashSet<(RangeId, RangeId)> = snap.forced_merges.iter().copied().collect();
    let mut i = 0;
    while i + 1 < order.len() {
        let (l, r) = (order[i], order[i + 1]);
        i += 1;
        if l.desc.end.is_empty() || l.desc.end != r.desc.start {
            continue;
        }
        let is_forced = forced.contains(&(l.desc.id, r.desc.id));
        if !is_forced && !cold_pair(t, l, r) {
            continue;
        }
        if merging.contains(&l.desc.id) {
            continue;
        }
        // The pair is taken, whatever happens this tick.
        merging.insert(l.desc.id);
        merging.insert(r.desc.id);
        i += 1;
        if t.full() || t.used.contains(&l.desc.id) || t.used.contains(&r.desc.id) {
            continue;
        }
        let (Some(ll), Some(rl)) = (t.live_leader(l), t.live_leader(r)) else {
            continue;
        };
        let (Some(ls), Some(rs)) = (voter_set(l), voter_set(r)) else {
            continue;
        };
        if ls.len() != rs.len() {
            continue;
        }
        if ls != rs {
            // Colocate: one replica of the right range onto a store of the left one. Not
            // from the right's leader store if another choice exists.
            let to = ls.difference(&rs).copied().find(|s| t.is_up(*s) && t.can_snapshot(*s));
            let mut from: Vec<StoreId> = rs.difference(&ls).copied().collect();
            from.sort_by_key(|s| (*s == rl, *s));
            if let (Some(to), Some(from)) = (to, from.first().copied()) {
                t.push(Operator::MoveReplica {
                    desc: r.desc.clone(),
                    leader: rl,
                    from,
                    to,
                    reason: Reason::Colocate,
                });
            }
            continue;
        }
        if ll != rl {
            t.push(Operator::TransferLeader {
                desc: r.desc.clone(),
                from: rl,
                to: ll,
                reason: Reason::Colocate,
            });
            continue;
        }
        t.push(Operator::Merge {
            left: l.desc.clone(),
            right: r.desc.clone(),
            leader: ll,
            forced: is_forced,
        });
    }
    merging
}
