//! `skv-sim`: runs seeds of the deterministic simulation (ADR 0033).
//!
//! - `skv-sim --seeds 100000 [--start 0]`: that many seeds, stopping at the first failure;
//! - `skv-sim --seed N [--trace]`: one seed (replay), printing its trace hash (and trace);
//! - `--plant forget-vote|lose-log-tail`: with a deliberate bug, to see it caught;
//! - `--control`: placement's scheduler simulation instead of the Raft path.

use clap::Parser;
use skv_sim::raft::{Plant, RunConfig};
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Deterministic simulation of skv's Raft path and control plane")]
struct Args {
    /// Replay exactly this seed.
    #[arg(long, env = "SKV_SIM_SEED")]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long, env = "SKV_SIM_SEEDS", default_value_t = 100)]
    seeds: u64,
    /// First seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Plant a bug.
    #[arg(long, value_enum)]
    plant: Option<Plant>,
    /// Print every trace line of a `--seed` run.
    #[arg(long)]
    trace: bool,
    /// Simulate placement's scheduler instead of Raft.
    #[arg(long)]
    control: bool,
}

fn main() {
    let a = Args::parse();
    let seeds: Vec<u64> = match a.seed {
        Some(s) => vec![s],
        None => (a.start..a.start.saturating_add(a.seeds)).collect(),
    };
    let started = Instant::now();
    let (mut ops, mut acked, mut crashes) = (0usize, 0usize, 0u64);
    for &seed in &seeds {
        let result = if a.control {
            skv_sim::control::run(seed)
                .map(|r| {
                    format!(
                        "control seed {seed}: trace {:016x}, {} ticks, {} ops",
                        r.trace_hash, r.ticks, r.ops
                    )
                })
                .map_err(|e| e.to_string())
        } else {
            let mut cfg = RunConfig::new(seed);
            cfg.plant = a.plant;
            cfg.keep_log = a.trace;
            skv_sim::raft::run(cfg).map(|r| {
                ops += r.ops;
                acked += r.acked_writes;
                crashes += u64::from(r.crashes);
                if let Some(log) = &r.log {
                    for l in log {
                        println!("{l}");
                    }
                }
                format!(
                    "seed {seed}: trace {:016x}, {} events, {} ops ({} acknowledged writes), {} crashes, {} virtual ms",
                    r.trace_hash, r.events, r.ops, r.acked_writes, r.crashes, r.virtual_ms
                )
            })
            .map_err(|e| e.to_string())
        };
        match result {
            Ok(line) => {
                if seeds.len() == 1 {
                    println!("{line}");
                }
            }
            Err(e) => {
                eprintln!("FAILED: {e}");
                eprintln!(
                    "replay: cargo run -p skv-sim -- --seed {seed}{}{}",
                    if a.control { " --control" } else { "" },
                    a.plant
                        .map(|p| format!(
                            " --plant {}",
                            clap::ValueEnum::to_possible_value(&p)
                                .map(|v| v.get_name().to_string())
                                .unwrap_or_default()
                        ))
                        .unwrap_or_default()
                );
                std::process::exit(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} seeds passed in {secs:.1} s ({:.1} seeds/s); {ops} client calls, {acked} acknowledged writes, {crashes} crashes",
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9)
    );
}
