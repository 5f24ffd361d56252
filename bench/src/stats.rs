//! Measurement: HDR histograms per operation kind, error counts by kind, a series of
//! per-second samples, and the summaries written to JSON.
//!
//! Workers record into a few shards (each behind its own mutex, so locks are rarely
//! contended); once a second the ticker takes every shard's interval histogram to make
//! one sample, and at the end the shards' totals are merged. Latencies are in
//! microseconds, 3 significant digits, up to one hour (an open-loop backlog can grow).
//! Only successful operations go into latency histograms; failures are counted by kind.

use crate::driver::ErrorKind;
use crate::workload::OpKind;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const MAX_US: u64 = 3_600_000_000;
const SIGFIG: u8 = 3;

/// An empty latency histogram (µs).
pub fn new_histogram() -> Histogram<u64> {
    // Bounds and sigfig are constants that hdrhistogram accepts (1 <= 3600e6, sigfig 3).
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).unwrap_or_else(|_| unreachable!("constant bounds are valid"))
}

fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u128::from(MAX_US)) as u64).max(1)
}

/// What one shard has recorded.
pub struct Shard {
    totals: [Option<Histogram<u64>>; 5],
    interval: Histogram<u64>,
    interval_errors: u64,
    errors: BTreeMap<ErrorKind, u64>,
    not_found: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Self {
            totals: Default::default(),
            interval: new_histogram(),
            interval_errors: 0,
            errors: BTreeMap::new(),
            not_found: 0,
        }
    }
}

impl Shard {
    pub fn ok(&mut self, kind: OpKind, latency: Duration) {
        let us = micros(latency);
        self.totals[kind.index()]
            .get_or_insert_with(new_histogram)
            .saturating_record(us);
        self.interval.saturating_record(us);
    }

    pub fn error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_default() += 1;
        self.interval_errors += 1;
    }

    /// A read that found no value (not an error; a sign of a missing load phase).
    pub fn not_found(&mut self) {
        self.not_found += 1;
    }
}

/// The shards of one run.
#[derive(Clone)]
pub struct Recorder {
    shards: Arc<Vec<Mutex<Shard>>>,
}

impl Recorder {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: Arc::new((0..shards.max(1)).map(|_| Mutex::new(Shard::default())).collect()),
        }
    }

    /// The shard worker `w` records into.
    pub fn shard(&self, w: usize) -> &Mutex<Shard> {
        &self.shards[w % self.shards.len()]
    }

    /// Forgets everything (the end of the warm-up).
    pub fn reset(&self) {
        for s in self.shards.iter() {
            *s.lock() = Shard::default();
        }
    }

    /// Takes the interval since the last call: (latencies of successes, errors).
    pub fn take_interval(&self) -> (Histogram<u64>, u64) {
        let mut h = new_histogram();
        let mut errors = 0;
        for s in self.shards.iter() {
            let mut s = s.lock();
            let _ = h.add(&s.interval);
            s.interval.reset();
            errors += std::mem::take(&mut s.interval_errors);
        }
        (h, errors)
    }

    /// Merges every shard's totals.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in self.shards.iter() {
            let s = s.lock();
            for k in OpKind::ALL {
                if let Some(h) = &s.totals[k.index()] {
                    let _ = t.by_kind.entry(k).or_insert_with(new_histogram).add(h);
                }
            }
            for (kind, n) in &s.errors {
                *t.errors.entry(*kind).or_default() += n;
            }
            t.not_found += s.not_found;
        }
        t
    }
}

/// Everything recorded in a run.
#[derive(Default)]
pub struct Totals {
    pub by_kind: BTreeMap<OpKind, Histogram<u64>>,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub not_found: u64,
}

impl Totals {
    pub fn all(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in self.by_kind.values() {
            let _ = all.add(h);
        }
        all
    }
}

/// Latency percentiles of one operation kind, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// One second of a run (or the last, shorter interval).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since measuring started, at the end of this interval.
    pub t: f64,
    /// Successful operations per second in this interval.
    pub ops_per_sec: f64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Scaling demo: ranges and stores placement knew of at that second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stores: Option<u64>,
}

impl Sample {
    pub fn of(t: f64, interval_secs: f64, h: &Histogram<u64>, errors: u64) -> Self {
        let s = LatencySummary::of(h);
        Self {
            t,
            ops_per_sec: if interval_secs > 0.0 {
                h.len() as f64 / interval_secs
            } else {
                0.0
            },
            errors,
            p50_us: s.p50_us,
            p99_us: s.p99_us,
            max_us: s.max_us,
            ranges: None,
            stores: None,
        }
    }
}

/// Points of the latency distribution for a CDF chart: `(latency µs, quantile)`, with
/// quantiles denser towards the tail (`1 - 10^-x` for x in 0..5 by 0.02, then the max).
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(u64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<(u64, f64)> = (0..=250)
        .map(|i| {
            let q = 1.0 - 10f64.powf(-(i as f64) / 50.0);
            (h.value_at_quantile(q), q)
        })
        .collect();
    out.push((h.max(), 1.0));
    out.dedup_by(|b, a| a.0 == b.0 && (b.1 - a.1).abs() < 1e-12);
    out
}

/// Error counts keyed by name, for JSON.
pub fn error_names(errors: &BTreeMap<ErrorKind, u64>) -> BTreeMap<String, u64> {
    errors.iter().map(|(k, n)| (k.name().to_string(), *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_into_percentiles_per_kind() {
        let r = Recorder::new(4);
        for i in 1..=1000u64 {
            r.shard(i as usize).lock().ok(OpKind::Read, Duration::from_micros(i));
        }
        r.shard(0).lock().ok(OpKind::Update, Duration::from_millis(50));
        r.shard(1).lock().error(ErrorKind::Timeout);
        r.shard(2).lock().error(ErrorKind::Timeout);
        r.shard(3).lock().not_found();
        let t = r.totals();
        let read = LatencySummary::of(&t.by_kind[&OpKind::Read]);
        assert_eq!(read.count, 1000);
        assert!((499..=501).contains(&read.p50_us), "{read:?}");
        assert!((989..=991).contains(&read.p99_us), "{read:?}");
        assert!((999..=1001).contains(&read.max_us));
        let upd = LatencySummary::of(&t.by_kind[&OpKind::Update]);
        assert_eq!((upd.count, upd.p50_us / 1000), (1, 50));
        assert_eq!(t.all().len(), 1001);
        assert_eq!(error_names(&t.errors).get("timeout"), Some(&2));
        assert_eq!(t.not_found, 1);
    }

    #[test]
    fn intervals_are_taken_once_and_reset_forgets() {
        let r = Recorder::new(2);
        r.shard(0).lock().ok(OpKind::Read, Duration::from_micros(100));
        r.shard(1).lock().error(ErrorKind::Unavailable);
        let (h, e) = r.take_interval();
        assert_eq!((h.len(), e), (1, 1));
        let (h, e) = r.take_interval();
        assert_eq!((h.len(), e), (0, 0));
        assert_eq!(r.totals().all().len(), 1, "totals survive interval takes");
        r.reset();
        assert_eq!(r.totals().all().len(), 0);
        assert!(r.totals().errors.is_empty());
    }

    #[test]
    fn samples_and_cdf_points() {
        let mut h = new_histogram();
        for i in 1..=100u64 {
            h.record(i * 10).unwrap();
        }
        let s = Sample::of(2.0, 0.5, &h, 3);
        assert_eq!((s.ops_per_sec, s.errors), (200.0, 3));
        assert!((495..=505).contains(&s.p50_us));
        let pts = cdf_points(&h);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1), "monotone");
        assert_eq!(pts.last().map(|p| p.1), Some(1.0));
        assert!(pts.last().map(|p| p.0).is_some_and(|v| (999..=1001).contains(&v)));
        assert!(cdf_points(&new_histogram()).is_empty());
        // Huge or zero latencies are clamped, not lost.
        let r = Recorder::new(1);
        r.shard(0).lock().ok(OpKind::Read, Duration::from_secs(100_000));
        r.shard(0).lock().ok(OpKind::Read, Duration::ZERO);
        assert_eq!(r.totals().all().len(), 2);
    }
}
