//! Simulated clusters: the scheduler's operators are applied to an in-memory cluster tick
//! after tick, as if every operator succeeded at once. No I/O.

use super::*;
use crate::model::Role;

/// Keys of the simulated key space: `k` + 8 digits.
fn key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

fn key_num(k: &[u8]) -> Option<u64> {
    std::str::from_utf8(k.get(1..)?).ok()?.parse().ok()
}

pub(super) struct Sim {
    pub cfg: SchedulerConfig,
    pub snap: Snapshot,
    next_id: u64,
    /// Size of the key space: the last range ends at +infinity, treated as this key.
    pub key_space: u64,
}

impl Sim {
    /// `stores` UP stores; `ranges` ranges over `[0, key_space)` with 3 replicas each on
    /// the stores `placement(i)` chooses and the leader on the first of them.
    pub fn new(stores: u64, ranges: u64, placement: impl Fn(u64) -> [u64; 3]) -> Sim {
        let key_space = 100_000_000u64;
        let step = key_space / ranges;
        let now = 10_000_000;
        let mut snap = Snapshot {
            now_ms: now,
            leader_since_ms: now - 3_600_000,
            ..Default::default()
        };
        for s in 1..=stores {
            snap.stores.push(store(s));
            snap.store_up_since_ms.insert(StoreId(s), now - 3_600_000);
            snap.store_last_heartbeat_ms.insert(StoreId(s), now);
        }
        for i in 0..ranges {
            let id = RangeId(i + 1);
            let p = placement(i);
            snap.ranges.push(Range {
                desc: Descriptor {
                    id,
                    start: if i == 0 { vec![] } else { key(i * step) },
                    end: if i + 1 == ranges { vec![] } else { key((i + 1) * step) },
                    epoch: Epoch {
                        conf_ver: 5,
                        version: 5,
                    },
                    replicas: p.iter().map(|s| Replica::voter(StoreId(*s))).collect(),
                },
                leader: Some(StoreId(p[0])),
            });
            snap.leader_seen_ms.insert(id, now);
            snap.load.insert(
                id,
                LoadView {
                    size_bytes: 64 << 20,
                    keys: 1000,
                    window_ms: 10_000,
                    ..Default::default()
                },
            );
        }
        Sim {
            cfg: SchedulerConfig {
                max_ops_per_tick: 64,
                ..Default::default()
            },
            snap,
            next_id: 1_000_000,
            key_space,
        }
    }

    pub fn range(&self, id: RangeId) -> Option<&Range> {
        self.snap.ranges.iter().find(|r| r.desc.id == id)
    }

    fn idx(&self, id: RangeId) -> Option<usize> {
        self.snap.ranges.iter().position(|r| r.desc.id == id)
    }

    /// Sets a range's load (qps split evenly between reads and writes, sustained).
    pub fn set_load(&mut self, id: RangeId, qps: f64, size: u64, sampled: Vec<Vec<u8>>) {
        let v = self.snap.load.entry(id).or_default();
        v.read_qps = qps / 2.0;
        v.write_qps = qps / 2.0;
        v.min_sample_qps = qps;
        v.size_bytes = size;
        v.window_ms = 10_000;
        v.sampled_keys = sampled;
    }

    /// One tick: plan, apply every operator, advance the clock by 1 s. Returns the plan.
    pub fn tick(&mut self) -> Plan {
        let plan = plan(&self.cfg, &self.snap);
        for op in plan.ops.clone() {
            self.apply(op);
        }
        self.snap.now_ms += 1000;
        let now = self.snap.now_ms;
        let up: Vec<StoreId> = self
            .snap
            .stores
            .iter()
            .filter(|s| s.state != StoreState::Down)
            .map(|s| s.id)
            .collect();
        for s in up {
            self.snap.store_last_heartbeat_ms.insert(s, now);
        }
        for r in &self.snap.ranges {
            if r.leader.is_some_and(|l| self.is_alive(l)) {
                self.snap.leader_seen_ms.insert(r.desc.id, now);
            }
        }
        plan
    }

    fn is_alive(&self, s: StoreId) -> bool {
        self.snap
            .stores
            .iter()
            .any(|x| x.id == s && x.state != StoreState::Down)
    }

    /// Ticks until a tick makes no operator (or `max` ticks); returns the ticks taken.
    pub fn run_until_quiet(&mut self, max: usize) -> Option<usize> {
        (0..max).find(|_| self.tick().ops.is_empty())
    }

    fn apply(&mut self, op: Operator) {
        let now = self.snap.now_ms;
        match op {
            Operator::Split {
                desc, key: k, reason, ..
            } => {
                let Some(i) = self.idx(desc.id) else { return };
                let r = self.snap.ranges[i].clone();
                let k = if k.is_empty() {
                    let a = key_num(&r.desc.start).unwrap_or(0);
                    let b = key_num(&r.desc.end).unwrap_or(self.key_space);
                    key(a + (b - a) / 2)
                } else {
                    k
                };
                let new_id = RangeId(self.next_id);
                self.next_id += 1;
                let mut left = r.clone();
                left.desc.end = k.clone();
                left.desc.epoch.version += 1;
                let mut right = r.clone();
                right.desc.id = new_id;
                right.desc.start = k.clone();
                right.desc.epoch = left.desc.epoch;
                self.snap.ranges[i] = left;
                self.snap.ranges.insert(i + 1, right);
                let old = self.snap.load.get(&desc.id).cloned().unwrap_or_default();
                let (lk, rk): (Vec<_>, Vec<_>) = old.sampled_keys.iter().cloned().partition(|x| *x < k);
                let n = old.sampled_keys.len().max(1) as f64;
                let lf = if old.sampled_keys.is_empty() {
                    0.5
                } else {
                    lk.len() as f64 / n
                };
                self.set_load(desc.id, old.qps() * lf, old.size_bytes / 2, lk);
                self.set_load(new_id, old.qps() * (1.0 - lf), old.size_bytes / 2, rk);
                self.snap.leader_seen_ms.insert(new_id, now);
                self.snap.last_split_ms.insert(desc.id, now);
                self.snap.last_split_ms.insert(new_id, now);
                if reason == Reason::Load {
                    self.snap.load_split_siblings.insert(new_id, desc.id);
                }
            }
            Operator::TransferLeader { desc, to, .. } => {
                let Some(i) = self.idx(desc.id) else { return };
                self.snap.ranges[i].leader = Some(to);
            }
            Operator::MoveReplica { desc, from, to, .. } => {
                let Some(i) = self.idx(desc.id) else { return };
                let r = &mut self.snap.ranges[i];
                for x in r.desc.replicas.iter_mut() {
                    if x.store == from {
                        *x = Replica::voter(to);
                    }
                }
                r.desc.epoch.conf_ver += 3;
                if r.leader == Some(from) {
                    r.leader = Some(to);
                }
            }
            Operator::AddVoter { desc, target, .. } => {
                let Some(i) = self.idx(desc.id) else { return };
                let r = &mut self.snap.ranges[i];
                r.desc.replicas.push(Replica::voter(target));
                r.desc.epoch.conf_ver += 1;
            }
            Operator::RemoveReplica { desc, store, .. } => {
                let Some(i) = self.idx(desc.id) else { return };
                let r = &mut self.snap.ranges[i];
                r.desc.replicas.retain(|x| x.store != store);
                r.desc.epoch.conf_ver += 1;
            }
            Operator::Merge { left, right, .. } => {
                let (Some(li), Some(ri)) = (self.idx(left.id), self.idx(right.id)) else {
                    return;
                };
                let rr = self.snap.ranges[ri].clone();
                let l = &mut self.snap.ranges[li];
                l.desc.end = rr.desc.end.clone();
                l.desc.epoch.version = l.desc.epoch.version.max(rr.desc.epoch.version) + 1;
                self.snap.ranges.remove(ri);
                let a = self.snap.load.remove(&right.id).unwrap_or_default();
                let b = self.snap.load.get(&left.id).cloned().unwrap_or_default();
                self.set_load(left.id, a.qps() + b.qps(), a.size_bytes + b.size_bytes, vec![]);
                self.snap.forced_merges.retain(|(x, y)| *x != left.id && *y != right.id);
            }
            Operator::InitialPlacement { .. } | Operator::ResendCreate { .. } => {}
        }
    }

    pub fn replica_counts(&self) -> HashMap<StoreId, usize> {
        let mut c: HashMap<StoreId, usize> = self.snap.stores.iter().map(|s| (s.id, 0)).collect();
        for r in &self.snap.ranges {
            for x in &r.desc.replicas {
                *c.entry(x.store).or_default() += 1;
            }
        }
        c
    }

    pub fn leader_counts(&self) -> HashMap<StoreId, usize> {
        let mut c: HashMap<StoreId, usize> = self.snap.stores.iter().map(|s| (s.id, 0)).collect();
        for r in &self.snap.ranges {
            if let Some(l) = r.leader {
                *c.entry(l).or_default() += 1;
            }
        }
        c
    }

    /// Invariants that hold after every tick.
    pub fn check(&self) {
        let mut prev_end: Option<Vec<u8>> = None;
        for r in &self.snap.ranges {
            let d = &r.desc;
            let stores: HashSet<StoreId> = d.replicas.iter().map(|x| x.store).collect();
            assert_eq!(
                stores.len(),
                d.replicas.len(),
                "range {} has two replicas on a store",
                d.id
            );
            assert!(d.replicas.len() >= 3, "range {} lost a replica: {:?}", d.id, d.replicas);
            assert!(
                r.leader.is_none_or(|l| d.has_replica_on(l)),
                "range {} led from outside",
                d.id
            );
            if let Some(p) = &prev_end {
                assert_eq!(p, &d.start, "the map has a hole or an overlap at range {}", d.id);
            }
            prev_end = Some(d.end.clone());
        }
    }
}

fn store(id: u64) -> Store {
    Store {
        id: StoreId(id),
        address: format!("127.0.0.1:{}", 9000 + id),
        state: StoreState::Up,
        host_idle_millicpus: None,
    }
}

fn spread3(n: u64) -> impl Fn(u64) -> [u64; 3] {
    move |i| [i % n + 1, (i + 1) % n + 1, (i + 2) % n + 1]
}

fn spread_of(c: &HashMap<StoreId, usize>, only: impl Fn(StoreId) -> bool) -> (usize, usize) {
    let v: Vec<usize> = c.iter().filter(|(s, _)| only(**s)).map(|(_, n)| *n).collect();
    (
        v.iter().copied().min().unwrap_or(0),
        v.iter().copied().max().unwrap_or(0),
    )
}

#[test]
fn balanced_cluster_is_left_alone() {
    let mut sim = Sim::new(100, 3000, spread3(100));
    assert_eq!(sim.run_until_quiet(1), Some(0), "nothing to do on a balanced cluster");
}

#[test]
fn hot_range_splits_at_the_load_median_then_halves_are_spread() {
    let mut sim = Sim::new(10, 100, spread3(10));
    let hot = RangeId(50);
    let d = sim.range(hot).unwrap().desc.clone();
    let (a, _) = (key_num(&d.start).unwrap(), ());
    // Load on 10 keys of the range, evenly: the split lands on the 6th.
    let sampled: Vec<Vec<u8>> = (0..10).flat_map(|i| vec![key(a + 100 * i); 5]).collect();
    sim.set_load(hot, 12_500.0, 1 << 20, sampled);
    let plan = sim.tick();
    let split = plan
        .ops
        .iter()
        .find(|o| matches!(o, Operator::Split { .. }))
        .expect("a split");
    let Operator::Split { key: k, reason, .. } = split else {
        unreachable!()
    };
    assert_eq!((k.clone(), *reason), (key(a + 500), Reason::Load));
    // Not split again within the window, whatever the load says.
    let right = *sim.snap.load_split_siblings.keys().next().unwrap();
    sim.set_load(hot, 12_500.0, 1 << 20, vec![key(a), key(a + 1)]);
    let plan = sim.tick();
    assert!(!plan.ops.iter().any(|o| matches!(o, Operator::Split { .. })));
    // The halves end up led by different stores, and the right half has no replica on
    // the left half's leader store.
    for _ in 0..20 {
        sim.tick();
        sim.check();
    }
    let (l, r) = (sim.range(hot).unwrap(), sim.range(right).unwrap());
    assert_ne!(l.leader, r.leader);
    assert!(!r.desc.has_replica_on(l.leader.unwrap()));
}

#[test]
fn load_on_one_key_is_never_split_and_is_reported() {
    let mut sim = Sim::new(5, 10, spread3(5));
    let d = sim.range(RangeId(3)).unwrap().desc.clone();
    sim.set_load(RangeId(3), 9000.0, 1 << 20, vec![d.start.clone(); 50]);
    let plan = sim.tick();
    assert!(plan.ops.iter().all(|o| !matches!(o, Operator::Split { .. })));
    assert_eq!(plan.split_skipped, vec![(RangeId(3), SKIP_SINGLE_KEY)]);
    // A load below the threshold for part of the window: not sustained, no split.
    let mut sim = Sim::new(5, 10, spread3(5));
    sim.set_load(RangeId(3), 9000.0, 1 << 20, vec![key(1), key(2), key(3)]);
    sim.snap.load.get_mut(&RangeId(3)).unwrap().min_sample_qps = 100.0;
    assert!(sim.tick().ops.iter().all(|o| !matches!(o, Operator::Split { .. })));
}

#[test]
fn a_hot_range_is_not_split_while_every_machine_is_busy_and_a_large_one_still_is() {
    // Three stores on one busy 2-core machine (the playground under a benchmark): each
    // reports the machine's 0.3 idle cores.
    let mut sim = Sim::new(3, 2, spread3(3));
    for s in &mut sim.snap.stores {
        s.host_idle_millicpus = Some(300);
    }
    let d = sim.range(RangeId(1)).unwrap().desc.clone();
    let a = key_num(&d.start).unwrap_or(0);
    let sampled: Vec<Vec<u8>> = (0..10).map(|i| key(a + 100 * i)).collect();
    sim.set_load(RangeId(1), 12_500.0, 1 << 20, sampled.clone());
    // Size still splits: it bounds snapshots and recovery, whatever the CPU.
    sim.set_load(RangeId(2), 0.0, 1 << 30, vec![]);
    let plan = sim.tick();
    let splits: Vec<(RangeId, Reason)> = plan
        .ops
        .iter()
        .filter_map(|o| match o {
            Operator::Split { desc, reason, .. } => Some((desc.id, *reason)),
            _ => None,
        })
        .collect();
    assert_eq!(splits, vec![(RangeId(2), Reason::Size)]);
    assert_eq!(plan.split_skipped, vec![(RangeId(1), SKIP_NO_IDLE_CPU)]);
    // A machine with a core idle joins (store 3 moved to one): the hot range splits.
    sim.snap.stores[2].host_idle_millicpus = Some(1500);
    sim.set_load(RangeId(1), 12_500.0, 1 << 20, sampled);
    let plan = sim.tick();
    assert!(
        plan.ops
            .iter()
            .any(|o| matches!(o, Operator::Split { desc, reason: Reason::Load, .. } if desc.id == RangeId(1))),
        "{:?}",
        plan.ops
    );
    assert!(plan.split_skipped.is_empty());
}

#[test]
fn large_ranges_split_by_size_with_the_leader_choosing_the_key() {
    let mut sim = Sim::new(6, 20, spread3(6));
    sim.set_load(RangeId(7), 0.0, 300 << 20, vec![]);
    let plan = sim.tick();
    assert!(plan.ops.iter().any(|o| matches!(
        o,
        Operator::Split { key, reason: Reason::Size, .. } if key.is_empty() && o.range_id() == RangeId(7)
    )));
}

#[test]
fn skewed_cluster_converges_within_tolerance_and_stops() {
    // 100 stores, 1000 ranges all on stores 1..=10.
    let mut sim = Sim::new(100, 1000, spread3(10));
    let ticks = sim.run_until_quiet(400).expect("converges");
    sim.check();
    let (lo, hi) = spread_of(&sim.replica_counts(), |_| true);
    assert!(hi - lo <= 2, "replicas per store {lo}..{hi} after {ticks} ticks");
    let (lo, hi) = spread_of(&sim.leader_counts(), |_| true);
    assert!(hi - lo <= 2, "leaders per store {lo}..{hi}");
    // And stays quiet: no ping-pong.
    for _ in 0..50 {
        assert!(sim.tick().ops.is_empty());
    }
}

#[test]
fn no_ping_pong_with_uneven_load_over_200_ticks() {
    let mut sim = Sim::new(30, 600, spread3(30));
    // Uneven but stable load: a few warm ranges (below the split threshold).
    for i in 0..600u64 {
        let q = match i % 7 {
            0 => 1200.0,
            1 => 300.0,
            _ => 0.0,
        };
        sim.set_load(RangeId(i + 1), q, 10 << 20, vec![]);
    }
    sim.cfg.merge_size_bytes = 0;
    let mut counts = Vec::new();
    for _ in 0..200 {
        counts.push(sim.tick().ops.len());
        sim.check();
    }
    assert!(counts[150..].iter().all(|n| *n == 0), "operators per tick: {counts:?}");
}

#[test]
fn store_down_is_repaired_after_repair_after() {
    let mut sim = Sim::new(8, 200, spread3(8));
    sim.cfg.repair_after_ms = 60_000;
    let dead = StoreId(3);
    sim.snap.stores.iter_mut().find(|s| s.id == dead).unwrap().state = StoreState::Down;
    // Move leaders away as a real cluster would (the surviving replicas elect).
    for r in sim.snap.ranges.iter_mut() {
        if r.leader == Some(dead) {
            r.leader = r.desc.replicas.iter().map(|x| x.store).find(|s| *s != dead);
        }
    }
    // Not before the store has been DOWN for repair_after.
    sim.tick();
    assert!(sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(dead)));
    sim.snap.now_ms += 30_000 + 60_000;
    sim.run_until_quiet(300).expect("converges");
    sim.check();
    assert!(!sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(dead)));
    // repair_after = 0 disables repair.
    let mut sim = Sim::new(8, 50, spread3(8));
    sim.cfg.repair_after_ms = 0;
    sim.snap.stores[0].state = StoreState::Down;
    sim.snap.now_ms += 10_000_000;
    for _ in 0..20 {
        sim.tick();
    }
    assert!(sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(StoreId(1))));
}

#[test]
fn new_stores_get_their_share_without_a_command() {
    let mut sim = Sim::new(3, 300, spread3(3));
    for s in 4..=5 {
        sim.snap.stores.push(store(s));
        sim.snap.store_last_heartbeat_ms.insert(StoreId(s), sim.snap.now_ms);
    }
    sim.run_until_quiet(500).expect("converges");
    sim.check();
    let rc = sim.replica_counts();
    let lc = sim.leader_counts();
    for s in 4..=5 {
        assert!(rc[&StoreId(s)] >= 170, "store {s} has {} replicas", rc[&StoreId(s)]);
        assert!(lc[&StoreId(s)] >= 55, "store {s} leads {}", lc[&StoreId(s)]);
    }
}

#[test]
fn drained_store_empties_leaders_first_and_is_reported() {
    let mut sim = Sim::new(6, 120, spread3(6));
    let d = StoreId(2);
    sim.snap.stores.iter_mut().find(|s| s.id == d).unwrap().state = StoreState::Draining;
    let first = sim.tick();
    // Leaders leave first; no move of a range it leads before its leader moved.
    for op in &first.ops {
        if let Operator::MoveReplica { from, leader, .. } = op
            && *from == d
        {
            assert_ne!(*leader, d);
        }
    }
    assert!(first.drained.is_empty());
    sim.run_until_quiet(500).expect("converges");
    sim.check();
    assert!(!sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(d)));
    assert_eq!(plan(&sim.cfg, &sim.snap).drained, vec![d]);
}

#[test]
fn snapshots_per_store_are_limited() {
    let mut sim = Sim::new(4, 200, spread3(3));
    sim.cfg.max_ops_per_tick = 1000;
    let plan = sim.tick();
    let to4 = plan
        .ops
        .iter()
        .filter(|o| o.snapshot_target() == Some(StoreId(4)))
        .count();
    assert_eq!(to4, 2);
    sim.snap.snapshots_in_flight.insert(StoreId(4), 2);
    assert!(
        super::plan(&sim.cfg, &sim.snap)
            .ops
            .iter()
            .all(|o| o.snapshot_target() != Some(StoreId(4)))
    );
}

#[test]
fn cold_ranges_are_colocated_aligned_and_merged() {
    let mut sim = Sim::new(9, 60, spread3(9));
    // Ranges 10..=20 are cold and small; the rest are warm.
    for i in 1..=60u64 {
        let (q, size) = if (10..=20).contains(&i) {
            (1.0, 1 << 20)
        } else {
            (2000.0, 100 << 20)
        };
        sim.set_load(RangeId(i), q, size, vec![]);
    }
    // One of them split recently: it is left alone during the cooldown.
    sim.snap.last_split_ms.insert(RangeId(20), sim.snap.now_ms);
    let before = sim.snap.ranges.len();
    sim.run_until_quiet(300).expect("converges");
    sim.check();
    let after = sim.snap.ranges.len();
    // 10..=19 merge into one range (11 MiB < 32 MiB); 20 is cooling down.
    assert_eq!(before - after, 9, "{before} -> {after}");
    assert!(sim.range(RangeId(10)).is_some() && sim.range(RangeId(20)).is_some());
}

#[test]
fn forced_merge_ignores_thresholds() {
    let mut sim = Sim::new(6, 10, spread3(6));
    for i in 1..=10u64 {
        sim.set_load(RangeId(i), 5000.0, 1 << 30, vec![]);
    }
    sim.cfg.split_size_bytes = 0;
    sim.cfg.split_qps_threshold = 0.0;
    sim.snap.forced_merges.push((RangeId(4), RangeId(5)));
    sim.run_until_quiet(50).expect("converges");
    sim.check();
    assert!(sim.range(RangeId(5)).is_none());
    assert_eq!(sim.snap.ranges.len(), 9);
}

#[test]
fn learner_leftovers_and_extra_voters_are_cleaned_up() {
    let mut sim = Sim::new(5, 3, spread3(5));
    sim.snap.ranges[0].desc.replicas.push(Replica {
        store: StoreId(5),
        role: Role::Learner,
    });
    sim.snap.ranges[1].desc.replicas.push(Replica::voter(StoreId(1)));
    let ops = sim.tick().ops;
    assert!(ops.contains(&Operator::RemoveReplica {
        desc: ops[0].desc().clone(),
        leader: StoreId(1),
        store: StoreId(5),
        reason: Reason::Cleanup
    }));
    assert!(
        ops.iter()
            .any(|o| matches!(o, Operator::RemoveReplica { .. } if o.range_id() == RangeId(2)))
    );
}

#[test]
fn large_cluster_with_a_dead_a_new_a_draining_store_and_a_hot_range_converges() {
    // 300 stores, 3000 ranges; at once: store 7 dies, store 12 drains, store 301 joins, and
    // range 1500 gets hot on many keys.
    let mut sim = Sim::new(300, 3000, spread3(300));
    sim.cfg.repair_after_ms = 1000;
    sim.cfg.max_ops_per_tick = 200;
    let (dead, draining, new) = (StoreId(7), StoreId(12), StoreId(301));
    for s in sim.snap.stores.iter_mut() {
        if s.id == dead {
            s.state = StoreState::Down;
        }
        if s.id == draining {
            s.state = StoreState::Draining;
        }
    }
    for r in sim.snap.ranges.iter_mut() {
        if r.leader == Some(dead) {
            r.leader = r.desc.replicas.iter().map(|x| x.store).find(|s| *s != dead);
        }
    }
    sim.snap.stores.push(store(301));
    sim.snap.store_last_heartbeat_ms.insert(new, sim.snap.now_ms);
    sim.snap.store_last_heartbeat_ms.insert(dead, sim.snap.now_ms - 60_000);
    let hot = RangeId(1500);
    let a = key_num(&sim.range(hot).unwrap().desc.start).unwrap();
    // 4000 ops/s: one split makes two halves under the threshold.
    sim.set_load(hot, 4000.0, 1 << 20, (0..100).map(|i| key(a + i)).collect());
    let ticks = sim.run_until_quiet(600).expect("converges");
    sim.check();
    assert!(!sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(dead)));
    assert!(!sim.snap.ranges.iter().any(|r| r.desc.has_replica_on(draining)));
    assert_eq!(plan(&sim.cfg, &sim.snap).drained, vec![draining]);
    assert!(sim.snap.ranges.len() > 3000, "the hot range split");
    let rc = sim.replica_counts();
    let live = |s: StoreId| s != dead && s != draining;
    let (lo, hi) = spread_of(&rc, live);
    assert!(hi - lo <= 2, "replicas per store {lo}..{hi} after {ticks} ticks");
    assert!(rc[&new] >= lo);
    for i in 0..50 {
        let ops = sim.tick().ops;
        assert!(
            ops.is_empty(),
            "tick {i}: {:?}",
            ops.iter().map(|o| (o.kind(), o.describe())).collect::<Vec<_>>()
        );
    }
}
