//! The result of one run, as written to `--json-out` and read back by `report`.

use crate::cpu::CpuReport;
use crate::demo::Event;
use crate::runner::{LoadReport, Measured};
use crate::stats::{LatencySummary, Sample, cdf_points, error_names};
use crate::workload::WorkloadSpec;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The settings of a run that matter to read its numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub spec: WorkloadSpec,
    pub concurrency: usize,
    pub connections: usize,
    /// Open-loop target (ops/s); `None` = closed loop.
    pub rate: Option<f64>,
    /// `"30s"` or `"10000 ops"`.
    pub stop: String,
    pub warmup_secs: f64,
    pub op_timeout_secs: f64,
    pub seed: u64,
}

/// One measured run of one system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The scenario's name (`--label`), shared by the systems measured side by side.
    pub label: String,
    pub system: String,
    #[serde(default)]
    pub round: Option<u32>,
    pub started_unix_ms: u64,
    pub config: RunConfig,
    pub measured_secs: f64,
    /// Successful operations in the measured phase.
    pub ops: u64,
    pub ops_per_sec: f64,
    pub error_count: u64,
    pub errors: BTreeMap<String, u64>,
    /// Reads that found no value (a load phase was skipped?).
    pub not_found: u64,
    /// Per operation kind, and `"all"`.
    pub latency: BTreeMap<String, LatencySummary>,
    pub cpu: Option<CpuReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    pub series: Vec<Sample>,
    /// Per operation kind and `"all"`: `(latency µs, quantile)` points.
    pub cdf: BTreeMap<String, Vec<(u64, f64)>>,
    /// Scaling demo: range and store changes seen during the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Event>,
}

impl RunResult {
    pub fn new(label: String, system: &str, config: RunConfig, m: Measured, load: Option<LoadReport>) -> Self {
        let all = m.totals.all();
        let mut latency = BTreeMap::new();
        let mut cdf = BTreeMap::new();
        latency.insert("all".to_string(), LatencySummary::of(&all));
        cdf.insert("all".to_string(), cdf_points(&all));
        for (k, h) in &m.totals.by_kind {
            latency.insert(k.name().to_string(), LatencySummary::of(h));
            cdf.insert(k.name().to_string(), cdf_points(h));
        }
        let ops = all.len();
        let error_count = m.totals.errors.values().sum();
        Self {
            label,
            system: system.to_string(),
            round: None,
            started_unix_ms: m.started_unix_ms,
            config,
            measured_secs: m.measured_secs,
            ops,
            ops_per_sec: if m.measured_secs > 0.0 {
                ops as f64 / m.measured_secs
            } else {
                0.0
            },
            error_count,
            errors: error_names(&m.totals.errors),
            not_found: m.totals.not_found,
            latency,
            cpu: m.cpu,
            cpu_error: m.cpu_error,
            load,
            series: m.series,
            cdf,
            events: Vec::new(),
        }
    }

    /// Latency of all operations together.
    pub fn all(&self) -> LatencySummary {
        self.latency.get("all").cloned().unwrap_or_default()
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// A few human lines for stdout.
    pub fn summary(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out = format!(
            "{} [{}]: {:.0} ops/s over {:.1}s ({} ops, {} errors",
            self.label, self.system, self.ops_per_sec, self.measured_secs, self.ops, self.error_count
        );
        if self.not_found > 0 {
            out.push_str(&format!(", {} reads found nothing", self.not_found));
        }
        out.push_str(")\n");
        for (kind, l) in &self.latency {
            out.push_str(&format!(
                "  {kind:<7} n={:<9} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms\n",
                l.count,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us)
            ));
        }
        for (kind, n) in &self.errors {
            out.push_str(&format!("  error {kind}: {n}\n"));
        }
        if let Some(c) = &self.cpu {
            out.push_str(&format!(
                "  server CPU {:.2} s ({:.2} cores), {:.4} CPU-s per 1000 ops\n",
                c.cpu_seconds, c.cores, c.cpu_s_per_1000_ops
            ));
        }
        if let Some(e) = &self.cpu_error {
            out.push_str(&format!("  server CPU not measured: {e}\n"));
        }
        out
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::workload::{Distribution, WorkloadKind};

    /// A result with the given numbers, for tests of reports and charts.
    pub fn sample_result(label: &str, system: &str, ops_per_sec: f64, p99_us: u64) -> RunResult {
        let spec = WorkloadSpec {
            kind: WorkloadKind::A,
            distribution: Distribution::Zipfian,
            keys: 100,
            value_size: 8,
            key_prefix: "b/".into(),
            theta: 0.99,
            hot_fraction: 0.01,
            hot_ops: 0.9,
            scan_max: 10,
        };
        let lat = LatencySummary {
            count: 10,
            mean_us: 100.0,
            p50_us: p99_us / 4,
            p90_us: p99_us / 2,
            p99_us,
            p999_us: p99_us * 2,
            max_us: p99_us * 3,
        };
        RunResult {
            label: label.into(),
            system: system.into(),
            round: Some(1),
            started_unix_ms: 0,
            config: RunConfig {
                spec,
                concurrency: 4,
                connections: 1,
                rate: None,
                stop: "3s".into(),
                warmup_secs: 0.0,
                op_timeout_secs: 10.0,
                seed: 1,
            },
            measured_secs: 3.0,
            ops: (ops_per_sec * 3.0) as u64,
            ops_per_sec,
            error_count: 0,
            errors: BTreeMap::new(),
            not_found: 0,
            latency: [("all".to_string(), lat)].into_iter().collect(),
            cpu: Some(crate::cpu::report(&[1], 300, 100, (ops_per_sec * 3.0) as u64, 3.0)),
            cpu_error: None,
            load: None,
            series: (1..=3)
                .map(|t| Sample {
                    t: t as f64,
                    ops_per_sec: ops_per_sec + t as f64,
                    errors: 0,
                    p50_us: p99_us / 4,
                    p99_us,
                    max_us: p99_us * 3,
                    ranges: Some(1 + (t as u64 > 2) as u64),
                    stores: Some(3),
                })
                .collect(),
            cdf: [(
                "all".to_string(),
                vec![(10, 0.0), (100, 0.5), (p99_us, 0.99), (p99_us * 3, 1.0)],
            )]
            .into_iter()
            .collect(),
            events: Vec::new(),
        }
    }

    #[test]
    fn json_round_trips_and_summary_names_the_numbers() {
        let r = sample_result("write c=1", "skv", 1234.0, 2000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/r.json");
        r.write_json(&path).unwrap();
        assert_eq!(RunResult::read_json(&path).unwrap(), r);
        let s = r.summary();
        assert!(s.contains("1234 ops/s") && s.contains("p99 2.000 ms"), "{s}");
        assert!(RunResult::read_json(&dir.path().join("missing.json")).is_err());
    }
}
