//! Command-line flags (clap), and their translation into a workload and a run plan.

use crate::driver::{ConnectOptions, EtcdOptions, System};
use crate::result::{RunConfig, RunResult};
use crate::runner::{RunPlan, Stop};
use crate::workload::{Distribution, WorkloadKind, WorkloadSpec};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "skv-bench",
    version,
    about = "Load generator for skv: YCSB workloads side by side with etcd and Redis, scaling demos, charts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure one workload on one system (optionally loading the keys first).
    Run(RunArgs),
    /// Only write keys 0..--keys (the load phase), then prepare the system (etcd: compact, defrag).
    Load(RunArgs),
    /// Delete keys 0..--keys, and --clean-extra keys after them (workload E's inserts).
    Clean(CleanArgs),
    /// Scaling demo on skv: run a workload while recording ranges and stores each second.
    Demo(DemoArgs),
    /// Turn JSON results into a Markdown table (medians, ratios skv/etcd) and charts.
    Report(ReportArgs),
}

/// Where the systems are.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// skv proxy URLs (comma-separated).
    #[arg(
        long,
        env = "SKV_ENDPOINT",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7400"
    )]
    pub skv_endpoint: Vec<String>,
    /// JWT for skv (the playground prints one).
    #[arg(long, env = "SKV_TOKEN", hide_env_values = true, default_value = "")]
    pub skv_token: String,
    /// etcd client URLs of every member (comma-separated).
    #[arg(
        long,
        env = "SKV_BENCH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Do not compact and defragment etcd before measuring.
    #[arg(long)]
    pub no_etcd_compact: bool,
    /// Redis URL.
    #[arg(long, env = "SKV_BENCH_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Independent clients (each with its own connections); worker w uses client w % N.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
}

/// What to run and for how long.
#[derive(Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// YCSB mix: a (50/50 read/update), b (95/5), c (read only), e (95% scans, 5% inserts),
    /// f (read-modify-write), write (update only).
    #[arg(long, value_enum, default_value_t = WorkloadKind::A)]
    pub workload: WorkloadKind,
    #[arg(long, value_enum, default_value_t = Distribution::Zipfian)]
    pub distribution: Distribution,
    /// Keys in the data set (loaded as 0..keys).
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Every key starts with this.
    #[arg(long, default_value = "skv-bench/")]
    pub key_prefix: String,
    /// Zipfian exponent.
    #[arg(long, default_value_t = 0.99)]
    pub theta: f64,
    /// Hot-prefix: fraction of the keys that is hot (the first ones).
    #[arg(long, default_value_t = 0.01)]
    pub hot_fraction: f64,
    /// Hot-prefix: fraction of operations on the hot keys.
    #[arg(long, default_value_t = 0.9)]
    pub hot_ops: f64,
    /// Scans read 1..=N keys (uniform).
    #[arg(long, default_value_t = 100)]
    pub scan_max: u32,
    /// Concurrent workers (clients in flight).
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Length of the measured phase (e.g. 30s, 5m, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "30s", conflicts_with = "ops")]
    pub duration: Duration,
    /// Stop after this many measured operations instead of a duration.
    #[arg(long)]
    pub ops: Option<u64>,
    /// Run this long before measuring; nothing from it is recorded.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub warmup: Duration,
    /// Open loop at this many ops/s (all workers together); without it, closed loop.
    #[arg(long, conflicts_with = "rate_from")]
    pub rate: Option<f64>,
    /// Open loop at --rate-fraction of the ops/s in this JSON result (e.g. a saturated run).
    #[arg(long)]
    pub rate_from: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0, requires = "rate_from")]
    pub rate_fraction: f64,
    /// Write keys 0..--keys before measuring.
    #[arg(long)]
    pub load: bool,
    /// Workers of the load phase.
    #[arg(long, default_value_t = 64)]
    pub load_concurrency: usize,
    /// Deadline of one operation; later answers count as timeouts.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub op_timeout: Duration,
    /// Seed of every random choice (keys, operations, values).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// On a terminal only.
    Auto,
    Always,
    Never,
}

/// Where results go.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Scenario name shared by the systems compared (default: from the workload).
    #[arg(long)]
    pub label: Option<String>,
    /// Round number, recorded in the JSON (reports take medians over rounds).
    #[arg(long)]
    pub round: Option<u32>,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write PNG charts (throughput and p99 per second, latency CDF) into this folder.
    #[arg(long)]
    pub charts_dir: Option<PathBuf>,
    /// Server PIDs whose CPU (utime+stime from /proc) is reported per 1000 ops.
    #[arg(long, value_delimiter = ',')]
    pub cpu_pids: Vec<u32>,
    /// A progress line per second on stderr.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[arg(long, value_enum, default_value_t = System::Skv)]
    pub system: System,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CleanArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Also delete this many keys after --keys (inserted by workload E).
    #[arg(long, default_value_t = 100_000)]
    pub clean_extra: u64,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Placement URL (for the range and store counts).
    #[arg(long, env = "SKV_PLACEMENT", default_value = "http://127.0.0.1:7000")]
    pub placement: String,
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// The Markdown file to write.
    #[arg(long, default_value = "docs/bench/RESULTS.md")]
    pub out: PathBuf,
    /// Write comparison charts here (Markdown links are relative to --out's folder).
    #[arg(long)]
    pub charts_dir: Option<PathBuf>,
    /// Text put before the tables (date, machine, versions).
    #[arg(long)]
    pub preamble: Option<PathBuf>,
    /// JSON results from `run --json-out`.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
}

/// `500ms`, `30s`, `5m`, `1h`, or plain seconds (`30`, `0.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a duration: {s:?}"))
}

impl WorkloadArgs {
    pub fn spec(&self) -> WorkloadSpec {
        WorkloadSpec {
            kind: self.workload,
            distribution: self.distribution,
            keys: self.keys,
            value_size: self.value_size,
            key_prefix: self.key_prefix.clone(),
            theta: self.theta,
            hot_fraction: self.hot_fraction,
            hot_ops: self.hot_ops,
            scan_max: self.scan_max,
        }
    }

    /// The open-loop rate, from --rate or --rate-from × --rate-fraction.
    pub fn rate(&self) -> Result<Option<f64>> {
        match (&self.rate, &self.rate_from) {
            (Some(r), _) => Ok(Some(*r)),
            (None, Some(path)) => {
                let base = RunResult::read_json(path)?;
                let r = base.ops_per_sec * self.rate_fraction;
                anyhow::ensure!(r > 0.0, "{} has no throughput to take a rate from", path.display());
                Ok(Some(r))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn stop(&self) -> Stop {
        match self.ops {
            Some(n) => Stop::Ops(n),
            None => Stop::After(self.duration),
        }
    }

    pub fn plan(&self, output: &OutputArgs, progress_default: bool) -> Result<RunPlan> {
        Ok(RunPlan {
            spec: self.spec(),
            concurrency: self.concurrency,
            stop: self.stop(),
            warmup: self.warmup,
            rate: self.rate().context("--rate-from")?,
            op_timeout: self.op_timeout,
            seed: self.seed,
            progress: match output.progress {
                Progress::Auto => progress_default,
                Progress::Always => true,
                Progress::Never => false,
            },
            cpu_pids: output.cpu_pids.clone(),
        })
    }

    /// The default scenario label: `ycsb-a zipfian c=16` (plus the rate when open loop).
    pub fn default_label(&self, rate: Option<f64>) -> String {
        let w = match self.workload {
            WorkloadKind::Write => "write".to_string(),
            k => format!("ycsb-{}", format!("{k:?}").to_lowercase()),
        };
        let d = match self.distribution {
            Distribution::Uniform => "uniform",
            Distribution::Zipfian => "zipfian",
            Distribution::HotPrefix => "hot-prefix",
        };
        let mut label = format!("{w} {d} c={}", self.concurrency);
        if let Some(r) = rate {
            label.push_str(&format!(" @{r:.0}/s"));
        }
        label
    }
}

pub fn run_config(plan: &RunPlan, connections: usize) -> RunConfig {
    RunConfig {
        spec: plan.spec.clone(),
        concurrency: plan.concurrency,
        connections,
        rate: plan.rate,
        stop: match plan.stop {
            Stop::After(d) => format!("{}s", d.as_secs_f64()),
            Stop::Ops(n) => format!("{n} ops"),
        },
        warmup_secs: plan.warmup.as_secs_f64(),
        op_timeout_secs: plan.op_timeout.as_secs_f64(),
        seed: plan.seed,
    }
}

impl Target {
    pub fn connect_options(&self, w: &WorkloadArgs) -> ConnectOptions {
        ConnectOptions {
            skv_endpoints: self
                .skv_endpoint
                .iter()
                .filter(|s| !s.trim().is_empty())
                .cloned()
                .collect(),
            skv_token: self.skv_token.clone(),
            etcd: EtcdOptions {
                endpoints: self.etcd_endpoints.clone(),
                compact: !self.no_etcd_compact,
            },
            redis_url: self.redis_url.clone(),
            key_prefix: w.key_prefix.clone(),
            redis_ordered_index: w.workload.has_scans(),
            op_timeout: w.op_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("skv-bench").chain(args.iter().copied()))
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("30s", 30_000),
            ("500ms", 500),
            ("5m", 300_000),
            ("1h", 3_600_000),
            ("2", 2_000),
            ("0.5s", 500),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for bad in ["", "s", "10x", "-1s", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_flags_make_a_plan() {
        let cli = parse(&[
            "run",
            "--system",
            "etcd",
            "--workload",
            "e",
            "--distribution",
            "uniform",
            "-c",
            "8",
            "--ops",
            "200",
            "--warmup",
            "0s",
            "--rate",
            "500",
            "--cpu-pids",
            "1,2",
            "--etcd-endpoints",
            "http://a:1,http://b:2",
        ])
        .unwrap();
        let Command::Run(a) = cli.cmd else { panic!("not run") };
        assert_eq!(a.system, System::Etcd);
        let plan = a.workload.plan(&a.output, false).unwrap();
        assert_eq!(plan.stop, Stop::Ops(200));
        assert_eq!(
            (plan.rate, plan.concurrency, plan.warmup),
            (Some(500.0), 8, Duration::ZERO)
        );
        assert_eq!(plan.cpu_pids, vec![1, 2]);
        assert!(!plan.progress);
        let o = a.target.connect_options(&a.workload);
        assert_eq!(o.etcd.endpoints.len(), 2);
        assert!(o.redis_ordered_index, "workload E scans");
        assert_eq!(a.workload.default_label(plan.rate), "ycsb-e uniform c=8 @500/s");
        assert_eq!(run_config(&plan, 1).stop, "200 ops");
    }

    #[test]
    fn conflicting_or_bad_flags_are_refused() {
        assert!(parse(&["run", "--duration", "5s", "--ops", "10"]).is_err());
        assert!(parse(&["run", "--rate", "5", "--rate-from", "x.json"]).is_err());
        assert!(parse(&["run", "--rate-fraction", "0.7"]).is_err(), "needs --rate-from");
        assert!(parse(&["run", "--workload", "z"]).is_err());
        assert!(parse(&["report"]).is_err(), "report needs results");
    }

    #[test]
    fn rate_from_a_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sat.json");
        crate::result::tests::sample_result("w", "skv", 1000.0, 100)
            .write_json(&path)
            .unwrap();
        let p = path.to_string_lossy().into_owned();
        let cli = parse(&["run", "--rate-from", &p, "--rate-fraction", "0.7"]).unwrap();
        let Command::Run(a) = cli.cmd else { panic!("not run") };
        let r = a.workload.rate().unwrap().unwrap();
        assert!((r - 700.0).abs() < 1e-9);
        let cli = parse(&["run", "--rate-from", "/nonexistent.json"]).unwrap();
        let Command::Run(a) = cli.cmd else { panic!("not run") };
        assert!(a.workload.rate().is_err());
    }
}
