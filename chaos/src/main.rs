//! skv-chaos: chaos runs against a real process cluster, and replay of a recorded history.
//! See chaos/README.md.

use clap::{Parser, Subcommand};
use skv_chaos::checker::{CheckOptions, DEFAULT_MAX_STEPS_PER_KEY, check, describe};
use skv_chaos::cluster::default_bin_dir;
use skv_chaos::history::History;
use skv_chaos::nemesis::NemesisKind;
use skv_chaos::runner::{Plant, RunOptions, run};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "skv-chaos", about = "Fault injection and linearizability checking for skv")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a process cluster (etcd, 2 placement, 3 storenodes, 2 proxies on 127.0.0.1),
    /// run recording clients while faults are injected, heal, read every key back and check.
    Run(RunArgs),
    /// Check a history written by a failing run (replays the check exactly).
    Check {
        /// The JSON history.
        file: PathBuf,
        /// Search steps per key before a key is reported undecided.
        #[arg(long, default_value_t = DEFAULT_MAX_STEPS_PER_KEY)]
        check_steps: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// How long clients and faults run: `90s`, `20m`, `1h`, or seconds.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the workload's and the nemesis's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Faults, comma-separated, of kill, pause, pd-leader, split, transfer-leader, merge,
    /// slow-disk (storenodes on skv-lazyfs mounts: FUSE), proxy-kill, etcd-member (a
    /// 3-member etcd), clock (every process under libfaketime: Debian's faketime),
    /// partition (storenodes in network namespaces: root, iproute2, iptables), move, drain
    /// (both with 4 storenodes) (`none` for a calm run).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_nemesis,
        default_value = "kill,pause,pd-leader,split,transfer-leader,merge"
    )]
    nemesis: Vec<Option<NemesisKind>>,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Keys the clients share.
    #[arg(long, default_value_t = 6)]
    keys: usize,
    /// Probability that a round runs two faults at once.
    #[arg(long, default_value_t = 0.3)]
    together: f64,
    /// Where the binaries are (default: next to this one, i.e. target/debug).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where a failing run's history is written.
    #[arg(long, default_value = "target/chaos")]
    out_dir: PathBuf,
    /// Write the history even when the run is clean.
    #[arg(long)]
    write_history: bool,
    /// Record writes the SDK calls definite failures as unknown outcomes (to tell an error
    /// misclassified by the proxy or SDK from a consistency bug).
    #[arg(long)]
    distrust_failures: bool,
    /// Search steps per key before a key is reported undecided.
    #[arg(long, default_value_t = DEFAULT_MAX_STEPS_PER_KEY)]
    check_steps: u64,
    /// Plant a bug to see the checker catch it. `skip-read-index`: every storenode runs with
    /// the failpoint storenode::read::skip_read_index and half the gets go straight to a
    /// follower (binaries built with `--features skv-storenode/failpoints`). `stale-reads`:
    /// in the clients, half the reads go to any replica through `get_stale` but are recorded
    /// as linearizable.
    #[arg(long)]
    plant: Option<Plant>,
    /// FAILPOINTS for every storenode (`name=action;...`, ADR 0029; needs binaries built with
    /// `--features skv-storenode/failpoints`). Replaces the plant's failpoints: with
    /// `--plant skip-read-index`, `storenode::read::skip_read_index=off` is the control run.
    #[arg(long, default_value = "")]
    store_failpoints: String,
    /// Storenodes collect delete tombstones every this many seconds (ADR 0034); 0 turns the
    /// collection off.
    #[arg(long, default_value_t = 2)]
    tombstone_gc_secs: u64,
}

/// A `--nemesis` value: a fault kind, or `none` (no fault).
fn parse_nemesis(s: &str) -> Result<Option<NemesisKind>, String> {
    if s == "none" {
        return Ok(None);
    }
    <NemesisKind as clap::ValueEnum>::from_str(s, false).map(Some)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (say 90s, 20m or 1h)"))?;
    let per_unit: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("unknown unit in {s:?} (s, m or h)")),
    };
    let secs = n
        .checked_mul(per_unit)
        .ok_or_else(|| format!("duration too long: {s:?}"))?;
    Ok(Duration::from_secs(secs))
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,skv_chaos=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match Cli::parse().cmd {
        Cmd::Check { file, check_steps } => {
            let history: History = match std::fs::read(&file)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            let r = check(
                &history,
                &CheckOptions {
                    max_steps_per_key: check_steps,
                },
            );
            println!(
                "{} calls, {} keys, {} checked ({} unknown-outcome writes), {} steps",
                history.ops.len(),
                r.keys,
                r.ops_checked,
                r.unknown_writes,
                r.steps
            );
            for v in &r.violations {
                print!("{}", describe(v, &history));
            }
            if !r.undecided.is_empty() {
                println!("undecided keys: {:?}", r.undecided);
            }
            println!(
                "violations: {}; result: {}",
                r.violations.len(),
                if r.is_linearizable() {
                    "LINEARIZABLE"
                } else {
                    "NOT SHOWN LINEARIZABLE"
                }
            );
            if r.is_linearizable() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Run(a) => {
            let mut opts = RunOptions::new(a.bin_dir.unwrap_or_else(default_bin_dir));
            opts.duration = a.duration;
            opts.seed = a.seed;
            opts.nemeses = a.nemesis.iter().flatten().copied().collect();
            opts.nemeses.sort();
            opts.nemeses.dedup();
            opts.clients = a.clients;
            opts.keys = a.keys;
            opts.together = a.together;
            opts.out_dir = a.out_dir;
            opts.always_write_history = a.write_history;
            opts.trust_definite = !a.distrust_failures;
            opts.plant = a.plant;
            opts.cluster.store_failpoints = a.store_failpoints;
            opts.cluster.tombstone_gc_secs = a.tombstone_gc_secs;
            opts.check = CheckOptions {
                max_steps_per_key: a.check_steps,
            };
            match run(opts).await {
                Ok(summary) => {
                    println!("{summary}");
                    if summary.is_clean() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("m").is_err());
        // Too long for u64 seconds: an error, never an overflow.
        assert!(parse_duration("18446744073709551615h").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
    }
}
