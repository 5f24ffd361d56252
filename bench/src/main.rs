//! skv-bench: the load generator. See docs/bench/README.md.

mod args;
mod chart;
mod cpu;
mod demo;
mod driver;
mod report;
mod result;
mod runner;
mod stats;
#[cfg(test)]
mod testing;
mod workload;
mod zipf;

use anyhow::{Context, Result};
use args::{CleanArgs, Cli, Command, DemoArgs, OutputArgs, ReportArgs, RunArgs};
use chart::Line;
use clap::Parser;
use driver::{Driver, System};
use result::RunResult;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Command::Run(a) => run(a).await,
        Command::Load(a) => load_only(a).await,
        Command::Clean(a) => clean(a).await,
        Command::Demo(a) => demo(a).await,
        Command::Report(a) => report(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(system: System, a: &args::Target, w: &args::WorkloadArgs) -> Result<Vec<Arc<dyn Driver>>> {
    driver::connect(system, &a.connect_options(w), a.connections)
        .await
        .with_context(|| format!("connecting to {}", system.name()))
}

/// Loads the keys if asked, then prepares the system for measuring.
async fn load_phase(
    system: System,
    drivers: &[Arc<dyn Driver>],
    w: &args::WorkloadArgs,
) -> Result<Option<runner::LoadReport>> {
    let report = if w.load {
        eprintln!(
            "loading {} keys of {} bytes into {} ({} workers)",
            w.keys,
            w.value_size,
            system.name(),
            w.load_concurrency
        );
        let r = runner::load(drivers, &w.spec(), w.load_concurrency, w.seed).await?;
        eprintln!(
            "loaded in {:.1}s ({:.0} keys/s, p99 {:.2} ms)",
            r.secs,
            r.ops_per_sec,
            r.latency.p99_us as f64 / 1000.0
        );
        Some(r)
    } else {
        None
    };
    if let Some(d) = drivers.first() {
        d.prepare()
            .await
            .with_context(|| format!("preparing {}", system.name()))?;
    }
    Ok(report)
}

async fn load_only(mut a: RunArgs) -> Result<()> {
    a.workload.load = true;
    // Redis: index the keys as they are loaded, so that any later workload E run can
    // scan them whatever --workload this load was given.
    let mut o = a.target.connect_options(&a.workload);
    o.redis_ordered_index = true;
    let drivers = driver::connect(a.system, &o, a.target.connections)
        .await
        .with_context(|| format!("connecting to {}", a.system.name()))?;
    load_phase(a.system, &drivers, &a.workload).await?;
    Ok(())
}

async fn clean(a: CleanArgs) -> Result<()> {
    let r = a.run;
    let mut o = r.target.connect_options(&r.workload);
    o.redis_ordered_index = true; // also drop keys from the scan index, if a run made one
    let drivers = driver::connect(r.system, &o, r.target.connections).await?;
    let n = runner::clean(&drivers, &r.workload.spec(), a.clean_extra, r.workload.load_concurrency).await?;
    println!("deleted {n} keys from {}", r.system.name());
    Ok(())
}

/// Writes the result's JSON and its own charts, as the output flags ask.
fn save(r: &RunResult, out: &OutputArgs) -> Result<()> {
    if let Some(path) = &out.json_out {
        r.write_json(path)?;
    }
    if let Some(dir) = &out.charts_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let base = format!("{}-{}", report::slug(&r.label), r.system);
        chart::timeseries(
            &dir.join(format!("{base}-timeseries.png")),
            &format!("{} [{}]: throughput and p99 per second", r.label, r.system),
            &[Line {
                name: &r.system,
                points: &r.series,
            }],
            &r.events,
        )?;
        let curves: Vec<Line<'_, _>> = r.cdf.iter().map(|(kind, points)| Line { name: kind, points }).collect();
        chart::cdf(
            &dir.join(format!("{base}-cdf.png")),
            &format!("{} [{}]: latency by percentile", r.label, r.system),
            &curves,
        )?;
    }
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let plan = a.workload.plan(&a.output, runner::stderr_is_terminal())?;
    let drivers = connect(a.system, &a.target, &a.workload).await?;
    let load = load_phase(a.system, &drivers, &a.workload).await?;
    let label = a
        .output
        .label
        .clone()
        .unwrap_or_else(|| a.workload.default_label(plan.rate));
    eprintln!("measuring {label} on {}", a.system.name());
    let m = runner::run(&drivers, &plan).await?;
    let mut r = RunResult::new(
        label,
        a.system.name(),
        args::run_config(&plan, a.target.connections),
        m,
        load,
    );
    r.round = a.output.round;
    print!("{}", r.summary());
    save(&r, &a.output)?;
    anyhow::ensure!(r.ops > 0, "no operation succeeded");
    Ok(())
}

async fn demo(a: DemoArgs) -> Result<()> {
    let plan = a.workload.plan(&a.output, runner::stderr_is_terminal())?;
    let placement = demo::placement_client(&a.placement)?;
    let t0 = tokio::time::Instant::now();
    let poller = demo::Poller::start(placement, t0);
    let drivers = connect(System::Skv, &a.target, &a.workload).await?;
    let load = load_phase(System::Skv, &drivers, &a.workload).await?;
    let label = a
        .output
        .label
        .clone()
        .unwrap_or_else(|| format!("demo {}", a.workload.default_label(plan.rate)));
    eprintln!("scaling demo: {label}; placement {}", a.placement);
    let m = runner::run(&drivers, &plan).await?;
    let polls = poller.finish(m.measure_start);
    let mut r = RunResult::new(label, "skv", args::run_config(&plan, a.target.connections), m, load);
    r.round = a.output.round;
    demo::attach_counts(&mut r.series, &polls);
    r.events = demo::events(&polls);
    print!("{}", r.summary());
    if polls.is_empty() {
        println!("  placement never answered: no range or store counts");
    }
    for e in &r.events {
        println!("  t={:>6.1}s {}: {}", e.t, e.kind, e.detail);
    }
    save(&r, &a.output)?;
    anyhow::ensure!(r.ops > 0, "no operation succeeded");
    Ok(())
}

fn report(a: ReportArgs) -> Result<()> {
    let results = a
        .results
        .iter()
        .map(|p| RunResult::read_json(p))
        .collect::<Result<Vec<_>>>()?;
    let preamble = match &a.preamble {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => "# skv-bench results".to_string(),
    };
    report::write(&results, &a.out, a.charts_dir.as_deref(), &preamble)?;
    println!(
        "wrote {} ({} results){}",
        a.out.display(),
        results.len(),
        a.charts_dir
            .as_deref()
            .map(|d: &Path| format!(", charts in {}", d.display()))
            .unwrap_or_default()
    );
    Ok(())
}
