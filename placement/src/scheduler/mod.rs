//! The scheduler's decisions. Pure: a snapshot of stores, ranges and their load in,
//! operators out; no I/O, no clock. The leader's loop ([`crate::server`]) executes them.
//! It works on the domain types of [`crate::model`]; the leader converts stored records into
//! them once per tick. The rules (thresholds, the no-ping-pong rule, operator steps) are in
//! docs/adr/0015-scheduler-rules.md.
//!
//! One tick, in priority order, at most one operator per range and `max_ops_per_tick` in all:
//! 1. placement: initial placement, up-replication, `CreateReplica` resends, leftover
//!    learners and extra voters of interrupted moves ([`schedule`] below);
//! 2. [`repair`]: replicas on stores DOWN for longer than `repair_after_ms`, and drains;
//! 3. [`split`]: by size and by sustained load;
//! 4. [`balance`]: spreading the halves of load splits, then merges ([`merge`]), then
//!    leader (count and load) and replica count balance.

mod balance;
pub mod health;
mod merge;
pub mod moves;
mod repair;
#[cfg(test)]
mod sim;
mod split;

use crate::model::{Descriptor, Epoch, Range, Replica, Role, Store, StoreState};
use crate::stats::LoadView;
use skv_common::ids::{RangeId, StoreId};
use std::collections::{BTreeMap, HashMap, HashSet};

pub use split::{SKIP_NO_IDLE_CPU, SKIP_SINGLE_KEY, idle_cpu_for_a_split, load_split_key};

/// Replication factor.
pub const REPLICAS: usize = 3;

/// Tunables (the flags of `skv-placement`, see `crate::Config`).
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Place the first range once this long has passed since the first store came up,
    /// even with fewer than 3 stores.
    pub initial_wait_ms: u64,
    /// A placed range whose leader has been silent this long gets CreateReplica again.
    pub leaderless_resend_ms: u64,
    /// At most this many operators per tick.
    pub max_ops_per_tick: usize,
    /// Split a range larger than this (at its size median, chosen by the leader).
    pub split_size_bytes: u64,
    /// Split a range above this many read+write ops/s ...
    pub split_qps_threshold: f64,
    /// ... sustained for this long (also the statistics window) ...
    pub split_qps_window_ms: u64,
    /// ... while some UP store's machine has at least this much idle CPU (thousandths of
    /// a core) to take half of the range's work; 0 = split by load whatever the CPU
    /// (ADR 0036). Stores that do not report their idle CPU count as having it.
    pub split_min_idle_millicpus: u64,
    /// Merge two adjacent ranges whose combined size is below this (and combined load
    /// below `split_qps_threshold / 2`).
    pub merge_size_bytes: u64,
    /// No merge of a range that split less than this long ago.
    pub merge_cooldown_ms: u64,
    /// Rebuild replicas of a store DOWN for this long (0 = never).
    pub repair_after_ms: u64,
    /// A store silent this long is DOWN (repair counts from then).
    pub store_down_after_ms: u64,
    /// Learners (snapshots) being added to one store at a time, at most.
    pub max_snapshots_per_store: usize,
    /// Relative tolerance of count and load balance (0.05 = 5% of the mean).
    pub balance_tolerance: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            initial_wait_ms: 2000,
            leaderless_resend_ms: 10_000,
            max_ops_per_tick: 8,
            split_size_bytes: 128 << 20,
            split_qps_threshold: 2500.0,
            split_qps_window_ms: 10_000,
            split_min_idle_millicpus: 1000,
            merge_size_bytes: 32 << 20,
            merge_cooldown_ms: 600_000,
            repair_after_ms: 300_000,
            store_down_after_ms: 30_000,
            max_snapshots_per_store: 2,
            balance_tolerance: 0.05,
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
    /// Last heartbeat of each store (unix ms): repair counts DOWN time from it.
    pub store_last_heartbeat_ms: HashMap<StoreId, u64>,
    /// Last time a leader of each range heartbeated (unix ms).
    pub leader_seen_ms: HashMap<RangeId, u64>,
    /// When this instance became leader (unix ms).
    pub leader_since_ms: u64,
    /// Ranges with an operator in flight or cooling down: skipped.
    pub busy: HashSet<RangeId>,
    /// Load of each range (ranges without a report are absent).
    pub load: HashMap<RangeId, LoadView>,
    /// When each range was last split (both halves), as seen by this leader.
    pub last_split_ms: HashMap<RangeId, u64>,
    /// Recent load splits: right half -> left half, to be served by different stores.
    pub load_split_siblings: HashMap<RangeId, RangeId>,
    /// Learners being added (snapshots in flight) per target store.
    pub snapshots_in_flight: HashMap<StoreId, usize>,
    /// Merges an operator asked for (left, right): thresholds and cooldown do not apply.
    pub forced_merges: Vec<(RangeId, RangeId)>,
}

/// Why an operator was chosen (a metric label and a log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Size,
    Load,
    Repair,
    Drain,
    Spread,
    Colocate,
    LeaderCount,
    LeaderLoad,
    ReplicaCount,
    Cleanup,
    Admin,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Load => "load",
            Reason::Repair => "repair",
            Reason::Drain => "drain",
            Reason::Spread => "spread",
            Reason::Colocate => "colocate",
            Reason::LeaderCount => "leader_count",
            Reason::LeaderLoad => "leader_load",
            Reason::ReplicaCount => "replica_count",
            Reason::Cleanup => "cleanup",
            Reason::Admin => "admin",
        }
    }
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
    /// `SplitRange` on the leader; an empty `key` lets the leader pick its size median.
    Split {
        desc: Descriptor,
        leader: StoreId,
        key: Vec<u8>,
        reason: Reason,
    },
    /// `TransferLeader` from `from` (the current leader) to `to`.
    TransferLeader {
        desc: Descriptor,
        from: StoreId,
        to: StoreId,
        reason: Reason,
    },
    /// CreateReplica on `to`, ADD_LEARNER, ADD_VOTER (promotion once caught up), a leader
    /// transfer away from `from` if it leads, then REMOVE `from`.
    MoveReplica {
        desc: Descriptor,
        leader: StoreId,
        from: StoreId,
        to: StoreId,
        reason: Reason,
    },
    /// `ChangeReplicas{REMOVE store}` on the leader (a leftover learner or extra voter).
    RemoveReplica {
        desc: Descriptor,
        leader: StoreId,
        store: StoreId,
        reason: Reason,
    },
    /// `Store.MergeRanges` on `leader` (leads both): `right` is merged into `left`.
    Merge {
        left: Descriptor,
        right: Descriptor,
        leader: StoreId,
        forced: bool,
    },
}

impl Operator {
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::InitialPlacement { .. } => "initial_placement",
            Operator::AddVoter { .. } => "add_voter",
            Operator::ResendCreate { .. } => "resend_create",
            Operator::Split { .. } => "split",
            Operator::TransferLeader { .. } => "transfer_leader",
            Operator::MoveReplica { .. } => "move",
            Operator::RemoveReplica { .. } => "remove_replica",
            Operator::Merge { .. } => "merge",
        }
    }
    pub fn range_id(&self) -> RangeId {
        self.desc().id
    }
    /// Every range the operator touches (a merge: both).
    pub fn range_ids(&self) -> Vec<RangeId> {
        match self {
            Operator::Merge { left, right, .. } => vec![left.id, right.id],
            o => vec![o.range_id()],
        }
    }
    pub fn desc(&self) -> &Descriptor {
        match self {
            Operator::InitialPlacement { desc }
            | Operator::AddVoter { desc, .. }
            | Operator::ResendCreate { desc, .. }
            | Operator::Split { desc, .. }
            | Operator::TransferLeader { desc, .. }
            | Operator::MoveReplica { desc, .. }
            | Operator::RemoveReplica { desc, .. } => desc,
            Operator::Merge { left, .. } => left,
        }
    }
    /// The store a learner (snapshot) is added to, if any.
    pub fn snapshot_target(&self) -> Option<StoreId> {
        match self {
            Operator::AddVoter { target, .. } => Some(*target),
            Operator::MoveReplica { to, .. } => Some(*to),
            _ => None,
        }
    }
    pub fn reason(&self) -> &'static str {
        match self {
            Operator::Split { reason, .. }
            | Operator::TransferLeader { reason, .. }
            | Operator::MoveReplica { reason, .. }
            | Operator::RemoveReplica { reason, .. } => reason.as_str(),
            Operator::Merge { forced: true, .. } => "admin",
            Operator::Merge { .. } => "cold",
            _ => "placement",
        }
    }
    /// A one-line description for logs and `skvctl operators`.
    pub fn describe(&self) -> String {
        match self {
            Operator::InitialPlacement { desc } => format!("place on {}", stores_of(desc)),
            Operator::AddVoter { target, .. } => format!("add a voter on store {target}"),
            Operator::ResendCreate { desc, .. } => format!("CreateReplica again on {}", stores_of(desc)),
            Operator::Split { key, reason, .. } if key.is_empty() => {
                format!("split at the size median ({})", reason.as_str())
            }
            Operator::Split { key, reason, .. } => format!("split at 0x{} ({})", hex(key), reason.as_str()),
            Operator::TransferLeader { from, to, reason, .. } => {
                format!("leader store {from} -> store {to} ({})", reason.as_str())
            }
            Operator::MoveReplica { from, to, reason, .. } => {
                format!("replica store {from} -> store {to} ({})", reason.as_str())
            }
            Operator::RemoveReplica { store, reason, .. } => {
                format!("remove the replica on store {store} ({})", reason.as_str())
            }
            Operator::Merge { right, leader, .. } => format!("merge range {} into it on store {leader}", right.id),
        }
    }
}

fn hex(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

fn stores_of(d: &Descriptor) -> String {
    d.replicas
        .iter()
        .map(|r| r.store.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The scheduler's answer for one tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub ops: Vec<Operator>,
    /// Load splits not made, and why ([`SKIP_SINGLE_KEY`], [`SKIP_NO_IDLE_CPU`]): logged and
    /// counted by the caller.
    pub split_skipped: Vec<(RangeId, &'static str)>,
    /// DRAINING stores that hold no replica any more.
    pub drained: Vec<StoreId>,
}

/// Decides this tick's operators.
pub fn schedule(cfg: &SchedulerConfig, snap: &Snapshot) -> Vec<Operator> {
    plan(cfg, snap).ops
}

/// Mutable bookkeeping of one tick: what the chosen operators will change.
pub(crate) struct Tick<'a> {
    pub cfg: &'a SchedulerConfig,
    pub snap: &'a Snapshot,
    pub ops: Vec<Operator>,
    /// Ranges that already got an operator this tick (or are busy).
    pub used: HashSet<RangeId>,
    /// Replica and leader counts of each store (every known store), as they will be.
    pub replicas: HashMap<StoreId, i64>,
    pub leaders: HashMap<StoreId, i64>,
    /// Read+write qps of the ranges each store leads, as it will be.
    pub leader_qps: HashMap<StoreId, f64>,
    pub snapshots: HashMap<StoreId, usize>,
    /// Stores that may receive replicas and leaders: UP, with an address.
    pub targets: Vec<StoreId>,
    pub state: HashMap<StoreId, StoreState>,
}

impl<'a> Tick<'a> {
    fn new(cfg: &'a SchedulerConfig, snap: &'a Snapshot) -> Self {
        let state: HashMap<StoreId, StoreState> = snap.stores.iter().map(|s| (s.id, s.state)).collect();
        let mut targets: Vec<StoreId> = snap
            .stores
            .iter()
            .filter(|s| s.state == StoreState::Up && !s.address.is_empty())
            .map(|s| s.id)
            .collect();
        targets.sort();
        let mut replicas: HashMap<StoreId, i64> = snap.stores.iter().map(|s| (s.id, 0)).collect();
        let mut leaders = replicas.clone();
        let mut leader_qps: HashMap<StoreId, f64> = snap.stores.iter().map(|s| (s.id, 0.0)).collect();
        for r in &snap.ranges {
            for rep in &r.desc.replicas {
                *replicas.entry(rep.store).or_default() += 1;
            }
            if let Some(l) = r.leader {
                *leaders.entry(l).or_default() += 1;
                *leader_qps.entry(l).or_default() += snap.load.get(&r.desc.id).map_or(0.0, LoadView::qps);
            }
        }
        Tick {
            cfg,
            snap,
            ops: Vec::new(),
            used: snap.busy.clone(),
            replicas,
            leaders,
            leader_qps,
            snapshots: snap.snapshots_in_flight.clone(),
            targets,
            state,
        }
    }

    pub fn full(&self) -> bool {
        self.ops.len() >= self.cfg.max_ops_per_tick
    }

    pub fn is_up(&self, s: StoreId) -> bool {
        self.state.get(&s) == Some(&StoreState::Up)
    }

    pub fn qps(&self, id: RangeId) -> f64 {
        self.snap.load.get(&id).map_or(0.0, LoadView::qps)
    }

    /// The range's leader if it heartbeated recently (operators need a live leader).
    pub fn live_leader(&self, r: &Range) -> Option<StoreId> {
        r.leader.filter(|_| {
            self.snap
                .leader_seen_ms
                .get(&r.desc.id)
                .is_some_and(|t| self.snap.now_ms.saturating_sub(*t) < self.cfg.leaderless_resend_ms)
        })
    }

    /// Whether a learner may be added to `s` now (per-store snapshot limit).
    pub fn can_snapshot(&self, s: StoreId) -> bool {
        self.snapshots.get(&s).copied().unwrap_or(0) < self.cfg.max_snapshots_per_store
    }

    /// The UP store with the fewest replicas that holds none of `d`'s, may take a
    /// snapshot and is not in `avoid`.
    pub fn pick_target(&self, d: &Descriptor, avoid: &[StoreId]) -> Option<StoreId> {
        self.targets
            .iter()
            .copied()
            .filter(|s| !d.has_replica_on(*s) && !avoid.contains(s) && self.can_snapshot(*s))
            .min_by_key(|s| (self.replicas.get(s).copied().unwrap_or(0), *s))
    }

    /// Records `op` and what it changes.
    pub fn push(&mut self, op: Operator) {
        for id in op.range_ids() {
            self.used.insert(id);
        }
        let q = self.qps(op.range_id());
        match &op {
            Operator::MoveReplica { from, to, leader, .. } => {
                *self.replicas.entry(*from).or_default() -= 1;
                *self.replicas.entry(*to).or_default() += 1;
                *self.snapshots.entry(*to).or_default() += 1;
                if leader == from {
                    *self.leaders.entry(*from).or_default() -= 1;
                    *self.leaders.entry(*to).or_default() += 1;
                    *self.leader_qps.entry(*from).or_default() -= q;
                    *self.leader_qps.entry(*to).or_default() += q;
                }
            }
            Operator::TransferLeader { from, to, .. } => {
                *self.leaders.entry(*from).or_default() -= 1;
                *self.leaders.entry(*to).or_default() += 1;
                *self.leader_qps.entry(*from).or_default() -= q;
                *self.leader_qps.entry(*to).or_default() += q;
            }
            Operator::AddVoter { target, .. } => {
                *self.replicas.entry(*target).or_default() += 1;
                *self.snapshots.entry(*target).or_default() += 1;
            }
            Operator::RemoveReplica { store, .. } => {
                *self.replicas.entry(*store).or_default() -= 1;
            }
            Operator::InitialPlacement { desc } => {
                for r in &desc.replicas {
                    *self.replicas.entry(r.store).or_default() += 1;
                }
            }
            _ => {}
        }
        self.ops.push(op);
    }
}

/// Decides this tick's operators, with what the caller logs and reports.
pub fn plan(cfg: &SchedulerConfig, snap: &Snapshot) -> Plan {
    let mut t = Tick::new(cfg, snap);
    placement(&mut t);
    repair::repair_and_drain(&mut t);
    let split_skipped = split::splits(&mut t);
    balance::spread(&mut t);
    let merging = merge::merges(&mut t);
    balance::leaders(&mut t, &merging);
    balance::replicas(&mut t, &merging);
    let mut held: BTreeMap<StoreId, usize> = BTreeMap::new();
    for r in &snap.ranges {
        for rep in &r.desc.replicas {
            *held.entry(rep.store).or_default() += 1;
        }
    }
    let drained = snap
        .stores
        .iter()
        .filter(|s| s.state == StoreState::Draining && !held.contains_key(&s.id))
        .map(|s| s.id)
        .collect();
    Plan {
        ops: t.ops,
        split_skipped,
        drained,
    }
}

/// Initial placement, up-replication, resends, and the cleanup of interrupted moves.
fn placement(t: &mut Tick) {
    let snap = t.snap;
    let cfg = t.cfg;
    let up: Vec<StoreId> = t.targets.clone();
    let up_ids: HashSet<StoreId> = up.iter().copied().collect();
    let pick = |t: &Tick, exclude: &HashSet<StoreId>, n: usize| -> Vec<StoreId> {
        let mut c: Vec<(i64, StoreId)> = up
            .iter()
            .filter(|id| !exclude.contains(id))
            .map(|id| (t.replicas.get(id).copied().unwrap_or(0), *id))
            .collect();
        c.sort();
        c.into_iter().take(n).map(|(_, id)| id).collect()
    };
    let earliest_up = up.iter().filter_map(|s| snap.store_up_since_ms.get(s)).min().copied();
    let can_place_initial = up.len() >= REPLICAS
        || (!up.is_empty() && earliest_up.is_some_and(|x| snap.now_ms.saturating_sub(x) >= cfg.initial_wait_ms));
    let want = REPLICAS.min(up.len());
    for r in &snap.ranges {
        if t.full() {
            break;
        }
        let d = &r.desc;
        if t.used.contains(&d.id) {
            continue;
        }
        if d.replicas.is_empty() {
            if !can_place_initial {
                continue;
            }
            let chosen = pick(t, &HashSet::new(), want);
            if chosen.is_empty() {
                continue;
            }
            let mut desc = d.clone();
            desc.replicas = chosen.into_iter().map(Replica::voter).collect();
            t.push(Operator::InitialPlacement { desc });
            continue;
        }
        if let Some(leader) = t.live_leader(r) {
            // A learner counts as a replica on its way in: never add past `want` in total.
            // A leftover learner while voters are missing: promote it (CreateReplica is
            // idempotent, ADD_VOTER on a learner waits for it to catch up).
            if d.voters() < want
                && let Some(l) = d.replicas.iter().find(|x| x.role == Role::Learner)
            {
                let target = l.store;
                t.push(Operator::AddVoter {
                    desc: d.clone(),
                    leader,
                    target,
                });
                continue;
            }
            if d.voters() < want && d.replicas.len() < want {
                let have: HashSet<StoreId> = d.replicas.iter().map(|r| r.store).collect();
                let cand: Vec<StoreId> = pick(t, &have, up.len())
                    .into_iter()
                    .filter(|s| t.can_snapshot(*s))
                    .collect();
                if let Some(target) = cand.into_iter().next() {
                    t.push(Operator::AddVoter {
                        desc: d.clone(),
                        leader,
                        target,
                    });
                }
                continue;
            }
            // Leftovers of an interrupted move (no operator in flight: `used` excludes busy
            // ranges): a learner, or a voter too many.
            if let Some(l) = d.replicas.iter().find(|x| x.role == Role::Learner && x.store != leader) {
                let store = l.store;
                t.push(Operator::RemoveReplica {
                    desc: d.clone(),
                    leader,
                    store,
                    reason: Reason::Cleanup,
                });
                continue;
            }
            if d.voters() > REPLICAS {
                // The one on a store that is not UP first, else the one on the fullest store.
                let victim = d
                    .replicas
                    .iter()
                    .filter(|x| x.store != leader)
                    .max_by_key(|x| {
                        (
                            !t.is_up(x.store),
                            t.replicas.get(&x.store).copied().unwrap_or(0),
                            x.store,
                        )
                    })
                    .map(|x| x.store);
                if let Some(store) = victim {
                    t.push(Operator::RemoveReplica {
                        desc: d.clone(),
                        leader,
                        store,
                        reason: Reason::Cleanup,
                    });
                }
            }
            continue;
        }
        // Placed but no leader heard of recently. Give heartbeats time after a failover.
        let last_seen = snap.leader_seen_ms.get(&d.id).copied().unwrap_or(0);
        let silent_for = snap.now_ms.saturating_sub(last_seen.max(snap.leader_since_ms));
        if silent_for >= cfg.leaderless_resend_ms && d.replicas.iter().any(|r| up_ids.contains(&r.store)) {
            t.push(Operator::ResendCreate {
                desc: d.clone(),
                // Only a range that never changed since initial placement may be bootstrapped.
                bootstrap_first: d.epoch == Epoch::INITIAL,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(id: u64, up: bool) -> Store {
        Store {
            id: StoreId(id),
            address: format!("127.0.0.1:{}", 9000 + id),
            state: if up { StoreState::Up } else { StoreState::Down },
            host_idle_millicpus: None,
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
                range(2, "m", "", &[1, 2, 3], 2, (4, 2)),
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
        // A learner left over (no operator in flight) counts: it is promoted, no extra
        // replica is added.
        let mut with_learner = s.clone();
        with_learner.ranges[0].desc.replicas = vec![
            Replica::voter(StoreId(1)),
            Replica::voter(StoreId(2)),
            Replica {
                store: StoreId(3),
                role: Role::Learner,
            },
        ];
        let ops = schedule(&cfg, &with_learner);
        assert!(
            matches!(ops.first(), Some(Operator::AddVoter { target, .. }) if *target == StoreId(3)),
            "{ops:?}"
        );
        // Busy ranges are skipped (rate limiting).
        s.busy.insert(RangeId(1));
        s.busy.insert(RangeId(2));
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
