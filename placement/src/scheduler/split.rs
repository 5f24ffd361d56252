//! Split by size and by sustained load.

use super::{Operator, Reason, Tick};
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

/// Chooses splits; returns the load splits skipped and why.
pub(super) fn splits(t: &mut Tick) -> Vec<(RangeId, &'static str)> {
    let mut skipped = Vec::new();
    let cfg = t.cfg;
    let snap = t.snap;
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
                Some(key) => t.push(Operator::Split {
                    desc: d.clone(),
                    leader,
                    key,
                    reason: Reason::Load,
                }),
                None => skipped.push((d.id, "single_key")),
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
