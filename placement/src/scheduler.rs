//! The scheduler's decisions. Pure: a snapshot of stores and ranges in, operators out.
//! The leader's loop ([`crate::server`]) executes them. It works on the domain types of
//! [`crate::model`]; the leader converts stored records into them once per tick.
//!
//! This milestone: initial placement of a range without replicas, up-replication to
//! min(3, up stores) voters, and re-sending `CreateReplica` to a placed range whose leader
//! has not been reported for a while (the storenode treats it as idempotent).

use crate::model::{Descriptor, Epoch, Range, Replica, Store, StoreState};
use skv_common::ids::{RangeId, StoreId};
use std::collections::{HashMap, HashSet};

/// Replication factor.
pub const REPLICAS: usize = 3;

/// Tunables.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Place the first range once this long has passed since the first store came up,
    /// even with fewer than 3 stores.
    pub initial_wait_ms: u64,
    /// A placed range whose leader has been silent this long gets CreateReplica again.
    pub leaderless_resend_ms: u64,
    /// At most this many operators per tick.
    pub max_ops_per_tick: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            initial_wait_ms: 2000,
            leaderless_resend_ms: 10_000,
            max_ops_per_tick: 8,
        }
    }
}

/// What the scheduler sees.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    /// Every known store, with `state` already computed (UP/DOWN/...).
    pub stores: Vec<Store>,
    pub ranges: Vec<Range>,
    /// When this placement instance first saw each store up (unix ms).
    pub store_up_since_ms: HashMap<StoreId, u64>,
    /// Last time a leader of each range heartbeated (unix ms).
    pub leader_seen_ms: HashMap<RangeId, u64>,
    /// When this instance became leader (unix ms).
    pub leader_since_ms: u64,
    /// Ranges with an operator in flight or cooling down: skipped.
    pub busy: HashSet<RangeId>,
}

/// One action.
#[derive(Clone, Debug, PartialEq)]
pub enum Operator {
    /// Write `desc` (the stored descriptor with these voters) if the stored record is still
    /// replica-less, then `CreateReplica` on each voter, `bootstrap=true` on the first only.
    InitialPlacement { desc: Descriptor },
    /// `CreateReplica(bootstrap=false)` on `target`, then `ChangeReplicas{ADD_VOTER target}`
    /// on the leader store.
    AddVoter {
        desc: Descriptor,
        leader: StoreId,
        target: StoreId,
    },
    /// `CreateReplica` again on every replica (`bootstrap` on the first one only if set).
    ResendCreate { desc: Descriptor, bootstrap_first: bool },
}

impl Operator {
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::InitialPlacement { .. } => "initial_placement",
            Operator::AddVoter { .. } => "add_voter",
            Operator::ResendCreate { .. } => "resend_create",
        }
    }
    pub fn range_id(&self) -> RangeId {
        self.desc().id
    }
    pub fn desc(&self) -> &Descriptor {
        match self {
            Operator::InitialPlacement { desc }
            | Operator::AddVoter { desc, .. }
            | Operator::ResendCreate { desc, .. } => desc,
        }
    }
}

/// Decides this tick's operators.
pub fn schedule(cfg: &SchedulerConfig, snap: &Snapshot) -> Vec<Operator> {
    let up: Vec<&Store> = snap
        .stores
        .iter()
        .filter(|s| s.state == StoreState::Up && !s.address.is_empty())
        .collect();
    let up_ids: HashSet<StoreId> = up.iter().map(|s| s.id).collect();
    // Replica count per store, kept up to date as operators are chosen.
    let mut load: HashMap<StoreId, usize> = up.iter().map(|s| (s.id, 0)).collect();
    for r in &snap.ranges {
        for rep in &r.desc.replicas {
            if let Some(c) = load.get_mut(&rep.store) {
                *c += 1;
            }
        }
    }
    let pick = |load: &HashMap<StoreId, usize>, exclude: &HashSet<StoreId>, n: usize| -> Vec<StoreId> {
        let mut c: Vec<(usize, StoreId)> = load
            .iter()
            .filter(|(id, _)| !exclude.contains(id))
            .map(|(id, n)| (*n, *id))
            .collect();
        c.sort();
        c.into_iter().take(n).map(|(_, id)| id).collect()
    };
    let earliest_up = up
        .iter()
        .filter_map(|s| snap.store_up_since_ms.get(&s.id))
        .min()
        .copied();
    let can_place_initial = up.len() >= REPLICAS
        || (!up.is_empty() && earliest_up.is_some_and(|t| snap.now_ms.saturating_sub(t) >= cfg.initial_wait_ms));
    let want = REPLICAS.min(up.len());
    let mut ops = Vec::new();
    for r in &snap.ranges {
        if ops.len() >= cfg.max_ops_per_tick {
            break;
        }
        let d = &r.desc;
        if snap.busy.contains(&d.id) {
            continue;
        }
        if d.replicas.is_empty() {
            if !can_place_initial {
                continue;
            }
            let chosen = pick(&load, &HashSet::new(), want);
            if chosen.is_empty() {
                continue;
            }
            for id in &chosen {
                *load.entry(*id).or_default() += 1;
            }
            let mut desc = d.clone();
            desc.replicas = chosen.into_iter().map(Replica::voter).collect();
            ops.push(Operator::InitialPlacement { desc });
            continue;
        }
        let fresh_leader = r.leader.filter(|_| {
            snap.leader_seen_ms
                .get(&d.id)
                .is_some_and(|t| snap.now_ms.saturating_sub(*t) < cfg.leaderless_resend_ms)
        });
        if let Some(leader) = fresh_leader {
            // A learner counts as a replica on its way in: never add past `want` in total.
            if d.voters() < want && d.replicas.len() < want {
                let have: HashSet<StoreId> = d.replicas.iter().map(|r| r.store).collect();
                if let Some(target) = pick(&load, &have, 1).into_iter().next() {
                    *load.entry(target).or_default() += 1;
                    ops.push(Operator::AddVoter {
                        desc: d.clone(),
                        leader,
                        target,
                    });
                }
            }
            continue;
        }
        // Placed but no leader heard of recently. Give heartbeats time after a failover.
        let last_seen = snap.leader_seen_ms.get(&d.id).copied().unwrap_or(0);
        let silent_for = snap.now_ms.saturating_sub(last_seen.max(snap.leader_since_ms));
        if silent_for >= cfg.leaderless_resend_ms && d.replicas.iter().any(|r| up_ids.contains(&r.store)) {
            ops.push(Operator::ResendCreate {
                desc: d.clone(),
                // Only a range that never changed since initial placement may be bootstrapped.
                bootstrap_first: d.epoch == Epoch::INITIAL,
            });
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn store(id: u64, up: bool) -> Store {
        Store {
            id: StoreId(id),
            address: format!("127.0.0.1:{}", 9000 + id),
            state: if up { StoreState::Up } else { StoreState::Down },
        }
    }

    fn range(id: u64, start: &str, end: &str, replicas: &[u64], leader: u64, epoch: (u64, u64)) -> Range {
        Range {
            desc: Descriptor {
                id: RangeId(id),
                start: start.into(),
                end: end.into(),
                epoch: Epoch {
                    conf_ver: epoch.0,
                    version: epoch.1,
                },
                replicas: replicas.iter().map(|s| Replica::voter(StoreId(*s))).collect(),
            },
            leader: crate::model::store_opt(leader),
        }
    }

    fn snap(stores: Vec<Store>, ranges: Vec<Range>) -> Snapshot {
        Snapshot {
            now_ms: 100_000,
            store_up_since_ms: stores.iter().map(|s| (s.id, 99_900)).collect(),
            stores,
            ranges,
            leader_since_ms: 50_000,
            ..Default::default()
        }
    }

    #[test]
    fn waits_for_three_stores_or_initial_wait() {
        let cfg = SchedulerConfig::default();
        let mut s = snap(
            vec![store(1, true), store(2, true)],
            vec![range(1, "", "", &[], 0, (1, 1))],
        );
        assert!(schedule(&cfg, &s).is_empty(), "2 stores, just up: wait");
        s.store_up_since_ms.insert(StoreId(1), 90_000);
        let ops = schedule(&cfg, &s);
        assert_eq!(ops.len(), 1);
        let Operator::InitialPlacement { desc } = &ops[0] else {
            panic!()
        };
        assert_eq!(desc.replicas.len(), 2);

        let s = snap(
            vec![store(1, true), store(2, true), store(3, true), store(4, true)],
            vec![range(1, "", "", &[], 0, (1, 1))],
        );
        let ops = schedule(&cfg, &s);
        let Operator::InitialPlacement { desc } = &ops[0] else {
            panic!()
        };
        assert_eq!(desc.replicas.len(), 3);
        assert_eq!(
            desc.epoch,
            Epoch {
                conf_ver: 1,
                version: 1
            }
        );
    }

    #[test]
    fn down_stores_are_never_chosen() {
        let cfg = SchedulerConfig::default();
        let s = snap(
            vec![store(1, false), store(2, true), store(3, true), store(4, true)],
            vec![range(1, "", "", &[], 0, (1, 1))],
        );
        let Operator::InitialPlacement { desc } = &schedule(&cfg, &s)[0] else {
            panic!()
        };
        assert!(desc.replicas.iter().all(|r| r.store != StoreId(1)));
    }

    #[test]
    fn up_replicates_least_loaded_store_when_leader_known() {
        let cfg = SchedulerConfig::default();
        let mut s = snap(
            vec![store(1, true), store(2, true), store(3, true), store(4, true)],
            vec![
                range(1, "", "m", &[1], 1, (2, 1)),
                range(2, "m", "", &[1, 2, 3], 1, (4, 2)),
            ],
        );
        s.leader_seen_ms.insert(RangeId(1), 99_000);
        s.leader_seen_ms.insert(RangeId(2), 99_000);
        let ops = schedule(&cfg, &s);
        assert_eq!(ops.len(), 1);
        assert_eq!(
            ops[0],
            Operator::AddVoter {
                desc: s.ranges[0].desc.clone(),
                leader: StoreId(1),
                target: StoreId(4)
            }
        );
        // A learner being promoted counts: no extra replica is added meanwhile.
        let mut with_learner = s.clone();
        with_learner.ranges[0].desc.replicas = vec![
            Replica::voter(StoreId(1)),
            Replica::voter(StoreId(2)),
            Replica {
                store: StoreId(3),
                role: Role::Learner,
            },
        ];
        assert!(schedule(&cfg, &with_learner).is_empty());
        // Busy ranges are skipped (rate limiting).
        s.busy.insert(RangeId(1));
        assert!(schedule(&cfg, &s).is_empty());
        // Without a leader report nothing is added.
        s.busy.clear();
        s.leader_seen_ms.clear();
        s.ranges[0].leader = None;
        s.ranges[1].leader = None;
        s.leader_since_ms = 99_000;
        assert!(schedule(&cfg, &s).is_empty());
    }

    #[test]
    fn resends_create_replica_to_leaderless_ranges() {
        let cfg = SchedulerConfig::default();
        let s = snap(
            vec![store(1, true), store(2, true), store(3, true)],
            vec![
                range(1, "", "m", &[1, 2, 3], 0, (1, 1)),
                range(2, "m", "", &[1, 2, 3], 0, (2, 2)),
            ],
        );
        let ops = schedule(&cfg, &s);
        assert_eq!(ops.len(), 2);
        assert!(matches!(
            &ops[0],
            Operator::ResendCreate {
                bootstrap_first: true,
                ..
            }
        ));
        assert!(matches!(
            &ops[1],
            Operator::ResendCreate {
                bootstrap_first: false,
                ..
            }
        ));
        // Right after a failover: wait for heartbeats first.
        let mut s2 = s.clone();
        s2.leader_since_ms = 95_000;
        assert!(schedule(&cfg, &s2).is_empty());
    }

    #[test]
    fn caps_operators_per_tick_and_spreads_load() {
        let cfg = SchedulerConfig {
            max_ops_per_tick: 2,
            ..Default::default()
        };
        let ranges: Vec<Range> = (0..5)
            .map(|i| range(i + 1, &format!("{i}"), &format!("{}", i + 1), &[], 0, (1, 1)))
            .collect();
        let stores: Vec<Store> = (1..=6).map(|i| store(i, true)).collect();
        let ops = schedule(&cfg, &snap(stores, ranges));
        assert_eq!(ops.len(), 2);
        let mut used: Vec<u64> = ops
            .iter()
            .flat_map(|o| match o {
                Operator::InitialPlacement { desc } => desc.replicas.iter().map(|r| r.store.get()).collect::<Vec<_>>(),
                _ => vec![],
            })
            .collect();
        used.sort();
        assert_eq!(used, vec![1, 2, 3, 4, 5, 6], "two ranges on disjoint store sets");
    }
}
