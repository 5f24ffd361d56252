//! `skv-bench report`: many JSON results (scenarios × systems × rounds) into one
//! Markdown table with medians over rounds, ratios skv/etcd, and comparison charts.

use crate::chart::{self, Line};
use crate::result::RunResult;
use anyhow::Result;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The medians of one scenario on one system.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub label: String,
    pub system: String,
    pub rounds: usize,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_per_1000: Option<f64>,
    pub errors: u64,
    /// Open-loop target rate (median), if the scenario was run open loop.
    pub rate: Option<f64>,
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn system_rank(s: &str) -> (usize, String) {
    let r = ["skv", "etcd", "redis"].iter().position(|x| *x == s).unwrap_or(3);
    (r, s.to_string())
}

/// The runs of one system in one scenario.
type SystemRuns<'a> = (String, Vec<&'a RunResult>);

/// Scenarios in order of first appearance; systems skv, etcd, redis, then others.
fn grouped(results: &[RunResult]) -> Vec<(String, Vec<SystemRuns<'_>>)> {
    let mut labels: Vec<String> = Vec::new();
    let mut by: BTreeMap<(String, (usize, String)), Vec<&RunResult>> = BTreeMap::new();
    for r in results {
        if !labels.contains(&r.label) {
            labels.push(r.label.clone());
        }
        by.entry((r.label.clone(), system_rank(&r.system))).or_default().push(r);
    }
    labels
        .into_iter()
        .map(|l| {
            let systems = by
                .iter()
                .filter(|((label, _), _)| *label == l)
                .map(|((_, (_, sys)), runs)| (sys.clone(), runs.clone()))
                .collect();
            (l, systems)
        })
        .collect()
}

pub fn rows(results: &[RunResult]) -> Vec<Row> {
    let mut out = Vec::new();
    for (label, systems) in grouped(results) {
        for (system, runs) in systems {
            let m = |f: &dyn Fn(&RunResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let cpu: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.cpu.as_ref())
                .map(|c| c.cpu_s_per_1000_ops)
                .collect();
            out.push(Row {
                label: label.clone(),
                system,
                rounds: runs.len(),
                ops_per_sec: m(&|r| r.ops_per_sec),
                p50_us: m(&|r| r.all().p50_us as f64),
                p99_us: m(&|r| r.all().p99_us as f64),
                p999_us: m(&|r| r.all().p999_us as f64),
                cpu_per_1000: (!cpu.is_empty()).then(|| median(cpu)),
                errors: runs.iter().map(|r| r.error_count).sum(),
                rate: {
                    let rates: Vec<f64> = runs.iter().filter_map(|r| r.config.rate).collect();
                    (!rates.is_empty()).then(|| median(rates))
                },
            });
        }
    }
    out
}

/// `12,345`.
pub fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(us: f64) -> String {
    let v = us / 1000.0;
    if v < 10.0 { format!("{v:.2}") } else { format!("{v:.1}") }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// A file-name-safe form of a scenario label.
pub fn slug(label: &str) -> String {
    let mut s = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').to_string()
}

/// The Markdown: preamble, the table, the ratios, then the charts (paths as given).
pub fn markdown(rows: &[Row], charts: &[(String, String, String)], preamble: &str) -> String {
    let mut md = String::new();
    md.push_str(preamble.trim_end());
    md.push_str("\n\n## Results\n\nMedians over rounds. Latency in ms, all operations of the scenario together; CPU is server CPU-seconds per 1000 operations (every process of the system, from /proc).\n\n");
    md.push_str("| scenario | system | ops/s | p50 | p99 | p99.9 | CPU-s/1000 ops | rounds | errors |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let cpu = r.cpu_per_1000.map(|c| format!("{c:.3}")).unwrap_or_else(|| "–".into());
        let system = match r.rate {
            Some(rate) => format!("{} (open loop at {}/s)", r.system, thousands(rate)),
            None => r.system.clone(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.label,
            system,
            thousands(r.ops_per_sec),
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.p999_us),
            cpu,
            r.rounds,
            r.errors
        );
    }
    md.push_str("\n## skv / etcd\n\nAbove 1× is better for ops/s; below 1× is better for latency and CPU.\n\n");
    md.push_str("| scenario | ops/s | p50 | p99 | p99.9 | CPU/op |\n|---|---:|---:|---:|---:|---:|\n");
    let find = |label: &str, sys: &str| rows.iter().find(|r| r.label == label && r.system == sys);
    let mut seen = Vec::new();
    for r in rows {
        if seen.contains(&r.label) {
            continue;
        }
        seen.push(r.label.clone());
        if let (Some(s), Some(e)) = (find(&r.label, "skv"), find(&r.label, "etcd")) {
            let cpu = match (s.cpu_per_1000, e.cpu_per_1000) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                r.label,
                ratio(s.ops_per_sec, e.ops_per_sec),
                ratio(s.p50_us, e.p50_us),
                ratio(s.p99_us, e.p99_us),
                ratio(s.p999_us, e.p999_us),
                cpu
            );
        }
    }
    if !charts.is_empty() {
        md.push_str("\n## Charts\n\nFor each scenario, the round with the median throughput of each system: throughput and p99 per second, and latency by percentile.\n");
        for (label, ts, cdf) in charts {
            let _ = write!(
                md,
                "\n### {label}\n\n![{label}: throughput and p99]({ts})\n![{label}: latency by percentile]({cdf})\n"
            );
        }
    }
    md
}

/// The run of each system with the median throughput, per scenario.
fn median_runs(results: &[RunResult]) -> Vec<(String, Vec<&RunResult>)> {
    grouped(results)
        .into_iter()
        .map(|(label, systems)| {
            let picked = systems
                .into_iter()
                .filter_map(|(_, mut runs)| {
                    runs.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
                    runs.get(runs.len() / 2).copied()
                })
                .collect();
            (label, picked)
        })
        .collect()
}

/// Writes the comparison charts into `charts_dir` and the Markdown to `out`.
pub fn write(results: &[RunResult], out: &Path, charts_dir: Option<&Path>, preamble: &str) -> Result<()> {
    anyhow::ensure!(!results.is_empty(), "no results to report");
    let mut charts = Vec::new();
    if let Some(dir) = charts_dir {
        std::fs::create_dir_all(dir)?;
        let out_dir = out.parent().unwrap_or(Path::new(""));
        for (label, runs) in median_runs(results) {
            let s = slug(&label);
            let ts = dir.join(format!("{s}-timeseries.png"));
            let cdf = dir.join(format!("{s}-cdf.png"));
            let series: Vec<Line<'_, _>> = runs
                .iter()
                .map(|r| Line {
                    name: &r.system,
                    points: &r.series,
                })
                .collect();
            chart::timeseries(&ts, &format!("{label}: throughput and p99 per second"), &series, &[])?;
            let empty = Vec::new();
            let curves: Vec<Line<'_, _>> = runs
                .iter()
                .map(|r| Line {
                    name: &r.system,
                    points: r.cdf.get("all").unwrap_or(&empty),
                })
                .collect();
            chart::cdf(&cdf, &format!("{label}: latency by percentile"), &curves)?;
            let rel = |p: &Path| p.strip_prefix(out_dir).unwrap_or(p).to_string_lossy().into_owned();
            charts.push((label, rel(&ts), rel(&cdf)));
        }
    }
    let md = markdown(&rows(results), &charts, preamble);
    std::fs::write(out, md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::tests::sample_result;

    #[test]
    fn medians_and_helpers() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(slug("YCSB-A zipf, c=64"), "ycsb-a-zipf-c-64");
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(3.0, 0.0), "–");
    }

    #[test]
    fn table_has_medians_per_system_and_ratios() {
        let mut results = Vec::new();
        for (ops, p99) in [(1000.0, 2000), (3000.0, 4000), (2000.0, 3000)] {
            results.push(sample_result("write c=64", "etcd", ops / 2.0, p99 * 2));
            results.push(sample_result("write c=64", "skv", ops, p99));
        }
        results.push(sample_result("write c=64", "redis", 9000.0, 500));
        let mut open = sample_result("read c=1", "skv", 100.0, 1000);
        open.config.rate = Some(1500.0);
        results.push(open);
        let rows = rows(&results);
        let order: Vec<(&str, &str)> = rows.iter().map(|r| (r.label.as_str(), r.system.as_str())).collect();
        assert_eq!(
            order,
            vec![
                ("write c=64", "skv"),
                ("write c=64", "etcd"),
                ("write c=64", "redis"),
                ("read c=1", "skv")
            ]
        );
        assert_eq!(
            (rows[0].ops_per_sec, rows[0].p99_us, rows[0].rounds),
            (2000.0, 3000.0, 3)
        );
        let md = markdown(&rows, &[], "# Bench\nmachine: test");
        assert!(md.starts_with("# Bench\nmachine: test"));
        assert!(md.contains("| write c=64 | skv | 2,000 | 0.75 | 3.00 | 6.00 |"), "{md}");
        assert!(md.contains("| write c=64 | 2.00× | 0.50× | 0.50× | 0.50× |"), "{md}");
        assert!(md.contains("| read c=1 | skv (open loop at 1,500/s) | 100 |"), "{md}");
        let ratios = md.split("## skv / etcd").nth(1).unwrap_or_default();
        assert!(ratios.contains("| write c=64 |"));
        assert!(!ratios.contains("read c=1"), "no etcd row, no ratio");
    }

    #[test]
    fn writes_markdown_with_chart_links() {
        let dir = tempfile::tempdir().unwrap();
        let results = vec![
            sample_result("YCSB A", "skv", 1000.0, 2000),
            sample_result("YCSB A", "etcd", 900.0, 2500),
        ];
        let out = dir.path().join("RESULTS.md");
        write(&results, &out, Some(dir.path()), "# R").unwrap();
        let md = std::fs::read_to_string(&out).unwrap();
        assert!(
            md.contains("](ycsb-a-timeseries.png)") && md.contains("](ycsb-a-cdf.png)"),
            "{md}"
        );
        assert!(dir.path().join("ycsb-a-timeseries.png").exists());
        assert!(write(&[], &out, None, "").is_err());
    }
}
