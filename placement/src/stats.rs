//! Range load statistics kept in the leader's memory (never in the metadata store): each
//! range leader's heartbeat adds one sample, and the load is computed over a sliding window
//! (`--split-qps-window-secs`). Pure: the caller passes the time.
//!
//! A range's window restarts when its descriptor's version changes (a split or a merge), so
//! the halves of a split start cold and are not split again before a whole window of their
//! own load has been seen.

use skv_common::ids::RangeId;
use skv_proto::internal as pb;
use std::collections::{HashMap, VecDeque};

/// Sampled keys kept per range (the most recent ones across the window).
pub const MAX_SAMPLED_KEYS: usize = 512;

/// One heartbeat's load report.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    at_ms: u64,
    interval_ms: u64,
    reads: u64,
    writes: u64,
    read_bytes: u64,
    written_bytes: u64,
}

/// The load of one range over the window.
#[derive(Clone, Debug, Default)]
pub struct RangeLoadWindow {
    /// The descriptor version the samples belong to.
    version: u64,
    samples: VecDeque<Sample>,
    pub size_bytes: u64,
    pub keys: u64,
    /// The most recent sampled keys (oldest first).
    pub sampled_keys: VecDeque<Vec<u8>>,
}

/// What the scheduler and the admin views read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadView {
    pub size_bytes: u64,
    pub keys: u64,
    pub read_qps: f64,
    pub write_qps: f64,
    pub read_bytes_per_sec: f64,
    pub write_bytes_per_sec: f64,
    /// Milliseconds of reporting intervals in the window.
    pub window_ms: u64,
    /// The lowest read+write qps of any single sample in the window (0 when empty): the
    /// load was above this for the whole window.
    pub min_sample_qps: f64,
    pub sampled_keys: Vec<Vec<u8>>,
}

impl LoadView {
    pub fn qps(&self) -> f64 {
        self.read_qps + self.write_qps
    }
}

impl RangeLoadWindow {
    /// Adds one report; samples older than `window_ms` are dropped.
    pub fn add(&mut self, version: u64, now_ms: u64, window_ms: u64, load: &pb::RangeLoad) {
        if version != self.version {
            *self = RangeLoadWindow {
                version,
                ..Default::default()
            };
        }
        self.size_bytes = load.approximate_size_bytes;
        self.keys = load.approximate_keys;
        if load.interval_ms > 0 {
            self.samples.push_back(Sample {
                at_ms: now_ms,
                interval_ms: load.interval_ms,
                reads: load.reads,
                writes: load.writes,
                read_bytes: load.read_bytes,
                written_bytes: load.written_bytes,
            });
        }
        for k in &load.sampled_keys {
            self.sampled_keys.push_back(k.clone());
        }
        while self.sampled_keys.len() > MAX_SAMPLED_KEYS {
            self.sampled_keys.pop_front();
        }
        self.expire(now_ms, window_ms);
    }

    fn expire(&mut self, now_ms: u64, window_ms: u64) {
        while let Some(front) = self.samples.front() {
            if now_ms.saturating_sub(front.at_ms) >= window_ms {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        if self.samples.is_empty() {
            self.sampled_keys.clear();
        }
    }

    /// The load as of `now_ms`.
    pub fn view(&self, now_ms: u64, window_ms: u64) -> LoadView {
        let live: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| now_ms.saturating_sub(s.at_ms) < window_ms)
            .collect();
        // Saturating sums: the counts come from storenodes' heartbeats (any u64).
        let covered: u64 = live.iter().fold(0u64, |a, s| a.saturating_add(s.interval_ms));
        let per_sec = |f: fn(&Sample) -> u64| -> f64 {
            if covered == 0 {
                0.0
            } else {
                live.iter().fold(0u64, |a, s| a.saturating_add(f(s))) as f64 * 1000.0 / covered as f64
            }
        };
        let min_sample_qps = live
            .iter()
            .map(|s| s.reads.saturating_add(s.writes) as f64 * 1000.0 / s.interval_ms.max(1) as f64)
            .fold(None, |m: Option<f64>, q| Some(m.map_or(q, |m| m.min(q))))
            .unwrap_or(0.0);
        LoadView {
            size_bytes: self.size_bytes,
            keys: self.keys,
            read_qps: per_sec(|s| s.reads),
            write_qps: per_sec(|s| s.writes),
            read_bytes_per_sec: per_sec(|s| s.read_bytes),
            write_bytes_per_sec: per_sec(|s| s.written_bytes),
            window_ms: covered,
            min_sample_qps,
            sampled_keys: if live.is_empty() {
                Vec::new()
            } else {
                self.sampled_keys.iter().cloned().collect()
            },
        }
    }
}

/// Every range's window.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    ranges: HashMap<RangeId, RangeLoadWindow>,
}

impl LoadStats {
    pub fn add(&mut self, id: RangeId, version: u64, now_ms: u64, window_ms: u64, load: &pb::RangeLoad) {
        self.ranges.entry(id).or_default().add(version, now_ms, window_ms, load);
    }

    /// Forgets a range (merged away).
    pub fn remove(&mut self, id: RangeId) {
        self.ranges.remove(&id);
    }

    /// Keeps only the ranges in `live`.
    pub fn retain(&mut self, live: impl Fn(RangeId) -> bool) {
        self.ranges.retain(|id, _| live(*id));
    }

    pub fn view(&self, now_ms: u64, window_ms: u64) -> HashMap<RangeId, LoadView> {
        self.ranges
            .iter()
            .map(|(id, w)| (*id, w.view(now_ms, window_ms)))
            .collect()
    }

    pub fn get(&self, id: RangeId, now_ms: u64, window_ms: u64) -> Option<LoadView> {
        self.ranges.get(&id).map(|w| w.view(now_ms, window_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(reads: u64, writes: u64, interval_ms: u64, keys: &[&str]) -> pb::RangeLoad {
        pb::RangeLoad {
            reads,
            writes,
            read_bytes: reads * 10,
            written_bytes: writes * 100,
            approximate_size_bytes: 4096,
            approximate_keys: 40,
            sampled_keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
            interval_ms,
        }
    }

    /// Heartbeat counts are any u64 a storenode sends: sums saturate, never overflow.
    #[test]
    fn huge_reported_counts_saturate_instead_of_overflowing() {
        let mut w = RangeLoadWindow::default();
        let win = 10_000;
        let mut l = load(0, 0, u64::MAX, &["a"]);
        l.reads = u64::MAX;
        l.writes = u64::MAX;
        l.read_bytes = u64::MAX;
        w.add(1, 1000, win, &l);
        w.add(1, 2000, win, &l);
        let v = w.view(2000, win);
        assert_eq!(v.window_ms, u64::MAX, "interval sum saturates");
        assert!(v.read_qps.is_finite() && v.read_qps > 0.0, "{}", v.read_qps);
        assert!(v.min_sample_qps.is_finite() && v.min_sample_qps > 0.0);
    }

    #[test]
    fn sliding_window_rates_and_reset_on_new_version() {
        let mut w = RangeLoadWindow::default();
        let win = 10_000;
        // 10 heartbeats of 1 s: 1000 reads + 500 writes each.
        for i in 0..10 {
            w.add(1, 1000 * (i + 1), win, &load(1000, 500, 1000, &["a"]));
        }
        let v = w.view(10_000, win);
        assert_eq!((v.read_qps, v.write_qps), (1000.0, 500.0));
        assert_eq!(v.read_bytes_per_sec, 10_000.0);
        assert_eq!(v.write_bytes_per_sec, 50_000.0);
        assert_eq!(v.window_ms, 10_000);
        assert_eq!(v.min_sample_qps, 1500.0);
        assert_eq!((v.size_bytes, v.keys), (4096, 40));
        assert_eq!(v.sampled_keys.len(), 10);
        // A quiet heartbeat lowers the minimum; old samples expire.
        w.add(1, 11_000, win, &load(0, 0, 1000, &[]));
        let v = w.view(11_000, win);
        assert_eq!(v.min_sample_qps, 0.0);
        assert_eq!(v.window_ms, 10_000, "the first sample fell out");
        // Silence: after the window nothing is left.
        let v = w.view(30_000, win);
        assert_eq!((v.qps(), v.window_ms), (0.0, 0));
        assert!(v.sampled_keys.is_empty());
        // A new version (split/merge) starts over.
        w.add(2, 31_000, win, &load(10, 0, 1000, &[]));
        let v = w.view(31_000, win);
        assert_eq!((v.read_qps, v.window_ms), (10.0, 1000));
    }

    #[test]
    fn sampled_keys_are_bounded() {
        let mut w = RangeLoadWindow::default();
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i:04}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        w.add(1, 1000, 10_000, &load(1, 1, 1000, &refs));
        let v = w.view(1000, 10_000);
        assert_eq!(v.sampled_keys.len(), MAX_SAMPLED_KEYS);
        assert_eq!(v.sampled_keys.last().map(Vec::as_slice), Some(&b"k0999"[..]));
    }
}
