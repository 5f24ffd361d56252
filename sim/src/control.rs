//! The control plane under a seeded event stream: placement's pure scheduler
//! (`skv_placement::scheduler::plan`) plans each tick over simulated stores and ranges; its
//! operators are checked, then applied as if they succeeded. Events between ticks: a store
//! fails (DOWN), comes back, joins, drains; a range's load or size shifts (splits follow).
//!
//! Invariants, checked on every operator: it never adds a replica (or moves one) to a store
//! that is not UP, never removes a replica so that fewer than a quorum of the range's
//! replicas remain on live stores, never puts two replicas of a range on one store. After
//! the events stop, the cluster converges: the scheduler goes quiet with every range on
//! three UP stores. A merge must join adjacent ranges on the same stores.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skv_common::{RangeId, StoreId};
use skv_placement::model::{Descriptor, Epoch, Range, Replica, Store, StoreState};
use skv_placement::scheduler::{Operator, SchedulerConfig, Snapshot, plan};
use skv_placement::stats::LoadView;
use std::collections::BTreeSet;
use thiserror::Error;
use xxhash_rust::xxh3::Xxh3;

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control seed {seed}, tick {tick}: {what} onto {store}, which is {state:?}")]
    BadTarget {
        seed: u64,
        tick: u64,
        what: &'static str,
        store: StoreId,
        state: Option<StoreState>,
    },
    #[error("control seed {seed}, tick {tick}: removing {store} from {range} leaves {live} live of {left} replicas")]
    BelowQuorum {
        seed: u64,
        tick: u64,
        range: RangeId,
        store: StoreId,
        live: usize,
        left: usize,
    },
    #[error("control seed {seed}, tick {tick}: {range} has two replicas on {store}")]
    Doubled {
        seed: u64,
        tick: u64,
        range: RangeId,
        store: StoreId,
    },
    #[error("control seed {seed}, tick {tick}: merge of {left} and {right}, which are not adjacent on the same stores")]
    BadMerge {
        seed: u64,
        tick: u64,
        left: RangeId,
        right: RangeId,
    },
    #[error("control seed {seed}: no convergence after the events stopped: {detail}")]
    NoConvergence { seed: u64, detail: String },
}

pub struct ControlReport {
    pub trace_hash: u64,
    pub ticks: u64,
    pub ops: u64,
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

struct Ctl {
    seed: u64,
    cfg: SchedulerConfig,
    snap: Snapshot,
    rng: StdRng,
    trace: Xxh3,
    next_id: u64,
    tick: u64,
    ops: u64,
    /// The last tick's first operators (for the error).
    last_ops: Vec<String>,
}

impl Ctl {
    fn state(&self, s: StoreId) -> Option<StoreState> {
        self.snap.stores.iter().find(|x| x.id == s).map(|x| x.state)
    }

    fn live(&self, s: StoreId) -> bool {
        self.state(s)
            .is_some_and(|st| st != StoreState::Down && st != StoreState::Removed)
    }

    fn event(&mut self, e: String) {
        self.trace.update(format!("{} {e}\n", self.tick).as_bytes());
    }

    fn add_store(&mut self, id: u64) {
        let now = self.snap.now_ms;
        self.snap.stores.push(Store {
            id: StoreId(id),
            address: format!("sim:{id}"),
            state: StoreState::Up,
            // Not measured in the simulation: load splits are decided as without the
            // idle-CPU rule (ADR 0036).
            host_idle_millicpus: None,
        });
        self.snap.store_up_since_ms.insert(StoreId(id), now);
        self.snap.store_last_heartbeat_ms.insert(StoreId(id), now);
    }

    fn set_state(&mut self, s: StoreId, st: StoreState) {
        if let Some(x) = self.snap.stores.iter_mut().find(|x| x.id == s) {
            x.state = st;
        }
        if st == StoreState::Up {
            self.snap.store_up_since_ms.insert(s, self.snap.now_ms);
        }
    }

    fn check_target(&self, what: &'static str, s: StoreId) -> Result<(), ControlError> {
        let state = self.state(s);
        if state != Some(StoreState::Up) {
            return Err(ControlError::BadTarget {
                seed: self.seed,
                tick: self.tick,
                what,
                store: s,
                state,
            });
        }
        Ok(())
    }

    fn idx(&self, id: RangeId) -> Option<usize> {
        self.snap.ranges.iter().position(|r| r.desc.id == id)
    }

    /// Checks `op`, then applies it as if it succeeded.
    fn apply(&mut self, op: Operator) -> Result<(), ControlError> {
        self.ops += 1;
        self.event(format!("{op:?}"));
        match op {
            Operator::AddVoter { desc, target, .. } => {
                self.check_target("add voter", target)?;
                let Some(i) = self.idx(desc.id) else { return Ok(()) };
                if self.snap.ranges[i].desc.has_replica_on(target) {
                    return Err(ControlError::Doubled {
                        seed: self.seed,
                        tick: self.tick,
                        range: desc.id,
                        store: target,
                    });
                }
                let r = &mut self.snap.ranges[i];
                r.desc.replicas.push(Replica::voter(target));
                r.desc.epoch.conf_ver += 1;
            }
            Operator::MoveReplica { desc, from, to, .. } => {
                self.check_target("move replica", to)?;
                let Some(i) = self.idx(desc.id) else { return Ok(()) };
                if self.snap.ranges[i].desc.has_replica_on(to) {
                    return Err(ControlError::Doubled {
                        seed: self.seed,
                        tick: self.tick,
                        range: desc.id,
                        store: to,
                    });
                }
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
            Operator::RemoveReplica { desc, store, .. } => {
                let Some(i) = self.idx(desc.id) else { return Ok(()) };
                let left: Vec<StoreId> = self.snap.ranges[i]
                    .desc
                    .replicas
                    .iter()
                    .map(|x| x.store)
                    .filter(|s| *s != store)
                    .collect();
                let live = left.iter().filter(|s| self.live(**s)).count();
                if live < left.len() / 2 + 1 || live < 2 {
                    return Err(ControlError::BelowQuorum {
                        seed: self.seed,
                        tick: self.tick,
                        range: desc.id,
                        store,
                        live,
                        left: left.len(),
                    });
                }
                let r = &mut self.snap.ranges[i];
                r.desc.replicas.retain(|x| x.store != store);
                r.desc.epoch.conf_ver += 1;
                if r.leader == Some(store) {
                    r.leader = r.desc.replicas.first().map(|x| x.store);
                }
            }
            Operator::TransferLeader { desc, to, .. } => {
                if !self.live(to) {
                    return Err(ControlError::BadTarget {
                        seed: self.seed,
                        tick: self.tick,
                        what: "leader transfer",
                        store: to,
                        state: self.state(to),
                    });
                }
                if let Some(i) = self.idx(desc.id) {
                    self.snap.ranges[i].leader = Some(to);
                }
            }
            Operator::Split { desc, key: k, .. } => {
                let Some(i) = self.idx(desc.id) else { return Ok(()) };
                let r = self.snap.ranges[i].clone();
                let k = if k.is_empty() {
                    let num = |b: &[u8], d: u64| {
                        std::str::from_utf8(b.get(1..).unwrap_or_default())
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(d)
                    };
                    let a = num(&r.desc.start, 0);
                    let b = num(&r.desc.end, 100_000_000);
                    if b - a < 2 {
                        return Ok(());
                    }
                    key(a + (b - a) / 2)
                } else {
                    k
                };
                let new_id = RangeId(self.next_id);
                self.next_id += 1;
                let mut left = r.clone();
                left.desc.end = k.clone();
                left.desc.epoch.version += 1;
                let mut right = r;
                right.desc.id = new_id;
                right.desc.start = k;
                right.desc.epoch = left.desc.epoch;
                self.snap.ranges[i] = left;
                self.snap.ranges.insert(i + 1, right);
                let old = self.snap.load.get(&desc.id).cloned().unwrap_or_default();
                let half = LoadView {
                    size_bytes: old.size_bytes / 2,
                    keys: old.keys / 2,
                    window_ms: old.window_ms,
                    ..Default::default()
                };
                self.snap.load.insert(desc.id, half.clone());
                self.snap.load.insert(new_id, half);
                self.snap.leader_seen_ms.insert(new_id, self.snap.now_ms);
                self.snap.last_split_ms.insert(desc.id, self.snap.now_ms);
                self.snap.last_split_ms.insert(new_id, self.snap.now_ms);
            }
            Operator::Merge { left, right, .. } => {
                let (Some(li), Some(ri)) = (self.idx(left.id), self.idx(right.id)) else {
                    return Ok(());
                };
                let stores = |i: usize| -> BTreeSet<StoreId> {
                    self.snap.ranges[i].desc.replicas.iter().map(|x| x.store).collect()
                };
                if stores(li) != stores(ri) || self.snap.ranges[li].desc.end != self.snap.ranges[ri].desc.start {
                    return Err(ControlError::BadMerge {
                        seed: self.seed,
                        tick: self.tick,
                        left: left.id,
                        right: right.id,
                    });
                }
                let rr = self.snap.ranges.remove(ri);
                let li = if ri < li { li - 1 } else { li };
                let l = &mut self.snap.ranges[li];
                l.desc.end = rr.desc.end;
                l.desc.epoch.version = l.desc.epoch.version.max(rr.desc.epoch.version) + 1;
                let a = self.snap.load.remove(&right.id).unwrap_or_default();
                let b = self.snap.load.entry(left.id).or_default();
                b.size_bytes += a.size_bytes;
                b.keys += a.keys;
                b.read_qps += a.read_qps;
                b.write_qps += a.write_qps;
            }
            // (Re)creates: nothing to model (every range exists from the start).
            Operator::InitialPlacement { .. } | Operator::ResendCreate { .. } => {}
        }
        Ok(())
    }

    fn tick_once(&mut self) -> Result<usize, ControlError> {
        let p = plan(&self.cfg, &self.snap);
        let n = p.ops.len();
        self.last_ops = p.ops.iter().take(3).map(|o| format!("{o:?}")).collect();
        for op in p.ops {
            self.apply(op)?;
        }
        for s in p.drained {
            self.set_state(s, StoreState::Removed);
            self.event(format!("drained {s}"));
        }
        self.snap.now_ms += 1000;
        self.tick += 1;
        let now = self.snap.now_ms;
        let alive: Vec<StoreId> = self
            .snap
            .stores
            .iter()
            .filter(|s| s.state != StoreState::Down && s.state != StoreState::Removed)
            .map(|s| s.id)
            .collect();
        for s in &alive {
            self.snap.store_last_heartbeat_ms.insert(*s, now);
        }
        // A range whose leader died elects another live replica.
        for r in self.snap.ranges.iter_mut() {
            if r.leader.is_none_or(|l| !alive.contains(&l)) {
                r.leader = r.desc.replicas.iter().map(|x| x.store).find(|s| alive.contains(s));
            }
            if r.leader.is_some() {
                self.snap.leader_seen_ms.insert(r.desc.id, now);
            }
        }
        Ok(n)
    }

    /// One seeded event between ticks.
    fn random_event(&mut self) {
        let roll = self.rng.random_range(0..100u32);
        let ids: Vec<StoreId> = self.snap.stores.iter().map(|s| s.id).collect();
        let s = ids[self.rng.random_range(0..ids.len())];
        let up = self.snap.stores.iter().filter(|x| x.state == StoreState::Up).count();
        let down = self.snap.stores.iter().filter(|x| x.state == StoreState::Down).count();
        match roll {
            // At most one store DOWN at once, and never below 4 UP (3 replicas + a spare).
            0..6 if down == 0 && up > 4 && self.state(s) == Some(StoreState::Up) => {
                self.set_state(s, StoreState::Down);
                self.event(format!("store {s} down"));
            }
            6..14 if self.state(s) == Some(StoreState::Down) => {
                self.set_state(s, StoreState::Up);
                self.snap.store_last_heartbeat_ms.insert(s, self.snap.now_ms);
                self.event(format!("store {s} back"));
            }
            14..17 if self.snap.stores.len() < 12 => {
                let id = self.snap.stores.iter().map(|x| x.id.0).max().unwrap_or(0) + 1;
                self.add_store(id);
                self.event(format!("store s{id} joins"));
            }
            17..19 if up > 4 && down == 0 && self.state(s) == Some(StoreState::Up) => {
                self.set_state(s, StoreState::Draining);
                self.event(format!("store {s} drains"));
            }
            19..40 => {
                let i = self.rng.random_range(0..self.snap.ranges.len());
                let id = self.snap.ranges[i].desc.id;
                let size = self.rng.random_range(1..300u64) << 20;
                let qps = self.rng.random_range(0..100u32) as f64;
                let v = self.snap.load.entry(id).or_default();
                v.size_bytes = size;
                v.read_qps = qps / 2.0;
                v.write_qps = qps / 2.0;
                v.window_ms = 10_000;
                self.event(format!("load {id} {size} {qps}"));
            }
            _ => {}
        }
    }
}

/// One seeded control-plane run: 6 stores and 8 ranges, 300 ticks with events, then up to
/// 900 ticks to converge (60 in a row without an operator).
pub fn run(seed: u64) -> Result<ControlReport, ControlError> {
    let mut c = Ctl {
        seed,
        cfg: SchedulerConfig {
            repair_after_ms: 20_000,
            store_down_after_ms: 5_000,
            max_ops_per_tick: 8,
            ..Default::default()
        },
        snap: Snapshot {
            now_ms: 10_000_000,
            leader_since_ms: 10_000_000 - 3_600_000,
            ..Default::default()
        },
        rng: StdRng::seed_from_u64(seed),
        trace: Xxh3::new(),
        next_id: 1000,
        tick: 0,
        ops: 0,
        last_ops: Vec::new(),
    };
    for s in 1..=6 {
        c.add_store(s);
        c.snap.store_up_since_ms.insert(StoreId(s), c.snap.now_ms - 3_600_000);
    }
    let n = 8u64;
    for i in 0..n {
        let id = RangeId(i + 1);
        let stores = [i % 6 + 1, (i + 1) % 6 + 1, (i + 2) % 6 + 1];
        c.snap.ranges.push(Range {
            desc: Descriptor {
                id,
                start: if i == 0 { vec![] } else { key(i * 100_000_000 / n) },
                end: if i + 1 == n {
                    vec![]
                } else {
                    key((i + 1) * 100_000_000 / n)
                },
                epoch: Epoch {
                    conf_ver: 5,
                    version: 5,
                },
                replicas: stores.iter().map(|s| Replica::voter(StoreId(*s))).collect(),
            },
            leader: Some(StoreId(stores[0])),
        });
        c.snap.leader_seen_ms.insert(id, c.snap.now_ms);
        c.snap.load.insert(
            id,
            LoadView {
                size_bytes: 64 << 20,
                keys: 1000,
                window_ms: 10_000,
                ..Default::default()
            },
        );
    }
    for _ in 0..300 {
        c.random_event();
        c.tick_once()?;
    }
    // Events stop; DOWN stores stay down. The scheduler must go quiet with every range on
    // three UP stores.
    // Quiet: 60 ticks in a row without an operator (longer than the repair delay).
    let mut calm = 0;
    for _ in 0..900 {
        calm = if c.tick_once()? == 0 { calm + 1 } else { 0 };
        if calm >= 60 {
            break;
        }
    }
    let quiet = calm >= 60;
    let up: BTreeSet<StoreId> = c
        .snap
        .stores
        .iter()
        .filter(|s| s.state == StoreState::Up)
        .map(|s| s.id)
        .collect();
    let bad: Vec<String> = c
        .snap
        .ranges
        .iter()
        .filter(|r| r.desc.replicas.len() != 3 || r.desc.replicas.iter().any(|x| !up.contains(&x.store)))
        .map(|r| format!("{}: {:?}", r.desc.id, r.desc.replicas))
        .collect();
    if !quiet || !bad.is_empty() {
        return Err(ControlError::NoConvergence {
            seed,
            detail: format!(
                "quiet {quiet}, ranges not on 3 UP stores: {bad:?}, last operators: {:?}",
                c.last_ops
            ),
        });
    }
    Ok(ControlReport {
        trace_hash: c.trace.digest(),
        ticks: c.tick,
        ops: c.ops,
    })
}
