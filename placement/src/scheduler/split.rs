//! Split by size and by sustained load.

use super::{Operator, Reason, Tick};
use crate::model::{Store, StoreState};
use skv_common::ids::RangeId;

/// The key that halves the sampled load of `[start, end)`: among the distinct sampled keys
/// strictly inside the range (every key but the smallest sampled one, so neither half is
/// empty of load and the key is never the range's start), the one that makes the sampled
/// load below it closest to the load at or above it. `None` when the load is one key.
pub fn load_split_key(start: &[u8], end: &[u8], sampled: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut keys: Vec<&[u8]> = sampled
        .iter()
        .map(Vec::as_slice)
        .filter(|k| *k >= start && (end.is_empty() || *k < end))
        .collect();
    keys.sort();
    let n = keys.len();
    let mut best: Option<(usize, &[u8])> = None;
    for i in 1..n {
        if keys[i] == keys[i - 1] || keys[i] <= start {
            continue;
        }
        // i samples below keys[i], n - i at or above.
        let diff = i.abs_diff(n - i);
        if best.is_none_or(|(d, _)| diff < d) {
            best = Some((diff, keys[i]));
        }
    }
    best.map(|(_, k)| k.to_vec())
}

/// Why a load split was not made (the `reason` label of `split_skipped`).
pub const SKIP_SINGLE_KEY: &str = "single_key";
pub const SKIP_NO_IDLE_CPU: &str = "no_idle_cpu";

/// Whether a load split could put half of a range's work on idle CPU: some UP store's
/// machine reports at least `min_idle` thousandths of a core idle, or does not report at
/// all (ADR 0036). The halves then run in parallel on that CPU, through leader balance on
/// another store or on the leader's own machine. When every machine is busy, a split only
/// adds per-range cost (Raft groups, heartbeats, smaller apply batches) to CPU that is
/// already used up. `min_idle == 0` turns the check off.
pub fn idle_cpu_for_a_split(stores: &[Store], min_idle: u64) -> bool {
    min_idle == 0
        || stores
            .iter()
            .filter(|s| s.state == StoreState::Up)
            .any(|s| s.host_idle_millicpus.is_none_or(|idle| idle >= min_idle))
}

/// Chooses splits; returns the load splits skipped and why.
pub(super) fn splits(t: &mut Tick) -> Vec<(RangeId, &'static str)> {
    let mut skipped = Vec::new();
    let cfg = t.cfg;
    let snap = t.snap;
    let idle_cpu = idle_cpu_for_a_split(&snap.stores, cfg.split_min_idle_millicpus);
    for r in &snap.ranges {
        if t.full() {
            break;
        }
        let d = &r.desc;
        if t.used.contains(&d.id) || d.replicas.is_empty() {
            continue;
        }
        let Some(leader) = t.live_leader(r) else { continue };
        let Some(load) = snap.load.get(&d.id) else { continue };
        // Never split a range again within the window after it split.
        let recently = snap
            .last_split_ms
            .get(&d.id)
            .is_some_and(|at| snap.now_ms.saturating_sub(*at) < cfg.split_qps_window_ms);
        if recently {
            continue;
        }
        if cfg.split_size_bytes > 0 && load.size_bytes > cfg.split_size_bytes {
            t.push(Operator::Split {
                desc: d.clone(),
                leader,
                key: Vec::new(),
                reason: Reason::Size,
            });
            continue;
        }
        // Sustained: the window is (nearly) covered and every sample in it was above.
        let covered = load.window_ms.saturating_mul(10) >= cfg.split_qps_window_ms.saturating_mul(9);
        if cfg.split_qps_threshold > 0.0 && covered && load.min_sample_qps > cfg.split_qps_threshold {
            match load_split_key(&d.start, &d.end, &load.sampled_keys) {
                Some(_) if !idle_cpu => skipped.push((d.id, SKIP_NO_IDLE_CPU)),
                Some(key) => t.push(Operator::Split {
                    desc: d.clone(),
                    leader,
                    key,
                    reason: Reason::Load,
                }),
                None => skipped.push((d.id, SKIP_SINGLE_KEY)),
            }
        }
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ks(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|k| k.as_bytes().to_vec()).collect()
    }

    fn store(id: u64, state: StoreState, idle: Option<u64>) -> Store {
        Store {
            id: skv_common::ids::StoreId(id),
            address: format!("s{id}"),
            state,
            host_idle_millicpus: idle,
        }
    }

    #[test]
    fn a_load_split_needs_a_machine_with_idle_cpu() {
        use StoreState::{Down, Up};
        // (stores as (state, idle), min_idle, split allowed)
        type Stores = Vec<(StoreState, Option<u64>)>;
        let table: Vec<(Stores, u64, bool)> = vec![
            // One 2-core machine under load (the playground): nowhere to put half the work.
            (vec![(Up, Some(300)), (Up, Some(300)), (Up, Some(300))], 1000, false),
            // A store on a machine with a core idle can take a half.
            (vec![(Up, Some(100)), (Up, Some(100)), (Up, Some(1000))], 1000, true),
            // ... unless it is down.
            (vec![(Up, Some(100)), (Up, Some(100)), (Down, Some(4000))], 1000, false),
            // A store that does not report counts as idle (older storenodes, no /proc).
            (vec![(Up, Some(100)), (Up, None)], 1000, true),
            // The check is off.
            (vec![(Up, Some(0)), (Up, Some(0))], 0, true),
            // No store at all: nothing to split onto.
            (vec![], 1000, false),
        ];
        for (stores, min_idle, want) in table {
            let s: Vec<Store> = stores
                .iter()
                .enumerate()
                .map(|(i, (st, idle))| store(i as u64 + 1, *st, *idle))
                .collect();
            assert_eq!(idle_cpu_for_a_split(&s, min_idle), want, "{stores:?} {min_idle}");
        }
    }

    #[test]
    fn load_split_key_halves_the_sampled_load() {
        // (start, end, samples, key)
        let table: Vec<(&str, &str, Vec<&str>, Option<&str>)> = vec![
            ("", "", vec!["a", "b", "c", "d"], Some("c")),
            ("", "", vec!["a", "a", "a", "b", "c", "d"], Some("b")),
            // All the load on one key: no split.
            ("", "", vec!["k", "k", "k"], None),
            ("", "", vec![], None),
            // The start key itself is never chosen (the left half would be empty).
            ("k", "", vec!["k", "k", "k", "k", "z"], Some("z")),
            ("k", "", vec!["k", "k", "k"], None),
            // Samples outside the range (reported before a split) are ignored.
            ("b", "d", vec!["a", "a", "a", "b", "c", "e", "e"], Some("c")),
            // 90% on one key: the split isolates it as well as it can.
            ("", "", vec!["a"; 9].into_iter().chain(["b"]).collect(), Some("b")),
        ];
        for (start, end, samples, want) in table {
            let got = load_split_key(start.as_bytes(), end.as_bytes(), &ks(&samples));
            assert_eq!(got.as_deref(), want.map(str::as_bytes), "{start:?} {end:?} {samples:?}");
            if let Some(k) = got {
                assert!(k.as_slice() > start.as_bytes());
                assert!(end.is_empty() || k.as_slice() < end.as_bytes());
            }
        }
    }
}
