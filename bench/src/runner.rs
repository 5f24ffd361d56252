//! The loop: a load phase, then workers that run the workload closed-loop (next
//! operation when the last one answered) or open-loop at a target rate, a warm-up that
//! is not recorded, and a ticker that takes one sample per second.
//!
//! Open loop follows wrk2: with rate R and C workers, worker w issues its j-th operation
//! at `start + (j + w/C) * C/R`. An operation that cannot start on time (its worker is
//! still busy) starts as soon as it can, and its latency counts from its scheduled time,
//! so a stalled server shows up in the percentiles (no coordinated omission). An
//! operation whose worker was idle counts from when it was sent: tokio's timers fire up
//! to a millisecond late, and that lateness is the client's, not the server's.

use crate::cpu::{CpuReport, CpuSampler};
use crate::driver::{Driver, DriverResult, ErrorKind};
use crate::stats::{LatencySummary, Recorder, Sample, Totals};
use crate::workload::{OpGenerator, OpKind, WorkloadSpec, key_bytes, value_bytes};
use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

/// When the measured phase ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    After(Duration),
    Ops(u64),
}

/// How to run one measurement.
#[derive(Clone, Debug)]
pub struct RunPlan {
    pub spec: WorkloadSpec,
    pub concurrency: usize,
    pub stop: Stop,
    pub warmup: Duration,
    /// Open loop at this many operations per second (all workers together).
    pub rate: Option<f64>,
    pub op_timeout: Duration,
    pub seed: u64,
    pub progress: bool,
    pub cpu_pids: Vec<u32>,
}

/// What a measurement produced.
pub struct Measured {
    pub totals: Totals,
    pub series: Vec<Sample>,
    pub measured_secs: f64,
    pub started_unix_ms: u64,
    pub measure_start: Instant,
    pub cpu: Option<CpuReport>,
    pub cpu_error: Option<String>,
}

/// The open-loop schedule of one worker.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    first: Duration,
    interval: Duration,
}

impl Schedule {
    pub fn new(rate: f64, worker: usize, workers: usize) -> Self {
        let workers = workers.max(1) as f64;
        let interval = Duration::from_secs_f64(workers / rate.max(1e-9));
        Self {
            first: interval.mul_f64(worker as f64 / workers),
            interval,
        }
    }

    /// When operation `j` is due, after the start.
    pub fn offset(&self, j: u64) -> Duration {
        self.first + self.interval.mul_f64(j as f64)
    }
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const DONE: u8 = 2;

struct Control {
    phase: AtomicU8,
    claimed: AtomicU64,
    limit: Option<u64>,
}

impl Control {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }
}

/// Runs one operation; whether it found data (reads and scans).
async fn execute(d: &dyn Driver, kind: OpKind, key: &[u8], len: u32, value: &[u8]) -> DriverResult<bool> {
    match kind {
        OpKind::Read => Ok(d.get(key).await?.is_some()),
        OpKind::Update | OpKind::Insert => d.put(key, value).await.map(|_| true),
        OpKind::Scan => Ok(d.scan(key, len).await? > 0),
        OpKind::Rmw => {
            let found = d.get(key).await?.is_some();
            d.put(key, value).await?;
            Ok(found)
        }
    }
}

struct Worker {
    w: usize,
    driver: Arc<dyn Driver>,
    ops: OpGenerator,
    rng: StdRng,
    rec: Recorder,
    ctl: Arc<Control>,
    schedule: Option<(Instant, Schedule)>,
    spec: Arc<WorkloadSpec>,
    op_timeout: Duration,
}

impl Worker {
    async fn run(mut self) {
        let mut j = 0u64;
        loop {
            let phase = self.ctl.phase();
            if phase == DONE {
                return;
            }
            if let (MEASURE, Some(limit)) = (phase, self.ctl.limit)
                && self.ctl.claimed.fetch_add(1, Ordering::AcqRel) >= limit
            {
                return;
            }
            let op = self.ops.next(&mut self.rng);
            let value = match op.kind {
                OpKind::Update | OpKind::Insert | OpKind::Rmw => value_bytes(&mut self.rng, self.spec.value_size),
                _ => Vec::new(),
            };
            let key = key_bytes(&self.spec.key_prefix, op.key);
            let start = match &self.schedule {
                Some((t0, s)) => {
                    let at = *t0 + s.offset(j);
                    j += 1;
                    if Instant::now() < at {
                        // On time: latency counts from the send, so the timer's own
                        // lateness (tokio's timers tick in milliseconds) is not counted.
                        tokio::time::sleep_until(at).await;
                        Instant::now()
                    } else {
                        // Behind schedule (this worker was busy): count from when the
                        // operation was due, waiting included.
                        at
                    }
                }
                None => Instant::now(),
            };
            let fut = execute(&*self.driver, op.kind, &key, op.scan_len, &value);
            let res = tokio::time::timeout(self.op_timeout, fut).await;
            let latency = start.elapsed();
            match self.ctl.phase() {
                DONE => return,
                // Begun in the warm-up, ended after it: belongs to neither.
                now if now != phase => continue,
                _ => {}
            }
            let mut s = self.rec.shard(self.w).lock();
            match res {
                Ok(Ok(found)) => {
                    s.ok(op.kind, latency);
                    if !found && matches!(op.kind, OpKind::Read | OpKind::Rmw) {
                        s.not_found();
                    }
                }
                Ok(Err(e)) => s.error(e.kind),
                Err(_) => s.error(ErrorKind::Timeout),
            }
        }
    }
}

/// Whether progress lines go to stderr by default (only on a terminal).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn progress_line(phase: &str, s: &Sample) {
    eprintln!(
        "[{:>6.1}s] {phase:<8} {:>10.0} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}",
        s.t,
        s.ops_per_sec,
        s.p50_us as f64 / 1000.0,
        s.p99_us as f64 / 1000.0,
        s.errors
    );
}

/// Runs the plan's workload against `drivers` (worker w uses driver `w % len`).
pub async fn run(drivers: &[Arc<dyn Driver>], plan: &RunPlan) -> Result<Measured> {
    anyhow::ensure!(!drivers.is_empty(), "no driver");
    anyhow::ensure!(plan.concurrency >= 1, "--concurrency must be at least 1");
    if let Some(r) = plan.rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be positive");
    }
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rec = Recorder::new(plan.concurrency.min(16));
    let ctl = Arc::new(Control {
        phase: AtomicU8::new(if plan.warmup.is_zero() { MEASURE } else { WARMUP }),
        claimed: AtomicU64::new(0),
        limit: match plan.stop {
            Stop::Ops(n) => Some(n),
            Stop::After(_) => None,
        },
    });
    let spec = Arc::new(plan.spec.clone());
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..plan.concurrency {
        let worker = Worker {
            w,
            driver: drivers[w % drivers.len()].clone(),
            ops: OpGenerator::new(&spec, w as u64, plan.concurrency as u64)?,
            rng: StdRng::seed_from_u64(plan.seed.wrapping_mul(0x9E37_79B9).wrapping_add(w as u64)),
            rec: rec.clone(),
            ctl: ctl.clone(),
            schedule: plan.rate.map(|r| (t0, Schedule::new(r, w, plan.concurrency))),
            spec: spec.clone(),
            op_timeout: plan.op_timeout,
        };
        set.spawn(worker.run());
    }
    let mut all_done = tokio::spawn(async move { while set.join_next().await.is_some() {} });

    // Warm-up: run, show progress, record nothing.
    if !plan.warmup.is_zero() {
        let mut tick = tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let end = t0 + plan.warmup;
        let mut last = t0;
        while Instant::now() < end {
            tokio::select! {
                _ = tick.tick() => {
                    let (h, e) = rec.take_interval();
                    let now = Instant::now();
                    let s = Sample::of(now.duration_since(t0).as_secs_f64(), now.duration_since(last).as_secs_f64(), &h, e);
                    last = now;
                    if plan.progress { progress_line("warm-up", &s); }
                }
                _ = tokio::time::sleep_until(end) => {}
            }
        }
        rec.reset();
        ctl.phase.store(MEASURE, Ordering::Release);
    }

    let measure_start = Instant::now();
    let (sampler, mut cpu_error) = match CpuSampler::start(&plan.cpu_pids) {
        Ok(s) => (Some(s).filter(|_| !plan.cpu_pids.is_empty()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut series = Vec::new();
    let mut tick = tokio::time::interval_at(measure_start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last = measure_start;
    let mut workers_done = false;
    loop {
        if let Stop::After(d) = plan.stop
            && measure_start.elapsed() >= d
        {
            break;
        }
        let deadline = match plan.stop {
            Stop::After(d) => measure_start + d,
            Stop::Ops(_) => measure_start + Duration::from_secs(365 * 86_400),
        };
        tokio::select! {
            _ = tick.tick() => {
                let (h, e) = rec.take_interval();
                let now = Instant::now();
                let s = Sample::of(now.duration_since(measure_start).as_secs_f64(), now.duration_since(last).as_secs_f64(), &h, e);
                last = now;
                if plan.progress { progress_line("measure", &s); }
                series.push(s);
            }
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut all_done => { workers_done = true; break; }
        }
    }
    ctl.phase.store(DONE, Ordering::Release);
    let end = Instant::now();
    let measured_secs = end.duration_since(measure_start).as_secs_f64();
    let (h, e) = rec.take_interval();
    let tail = end.duration_since(last).as_secs_f64();
    if h.len() + e > 0 && tail > 0.05 {
        series.push(Sample::of(measured_secs, tail, &h, e));
    }
    let totals = rec.totals();
    let ops = totals.all().len();
    let cpu = match sampler.map(|s| s.finish(ops, measured_secs)) {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            cpu_error = Some(e.to_string());
            None
        }
        None => None,
    };
    if !workers_done {
        // Workers stop after their operation in flight, bounded by --op-timeout.
        let _ = tokio::time::timeout(plan.op_timeout + Duration::from_secs(5), &mut all_done).await;
    }
    Ok(Measured {
        totals,
        series,
        measured_secs,
        started_unix_ms,
        measure_start,
        cpu,
        cpu_error,
    })
}

/// What the load phase did.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoadReport {
    pub keys: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    pub latency: LatencySummary,
}

/// Writes keys `0..spec.keys` with `concurrency` workers (each put retried up to 3
/// times); fails if a key could not be written.
pub async fn load(
    drivers: &[Arc<dyn Driver>],
    spec: &WorkloadSpec,
    concurrency: usize,
    seed: u64,
) -> Result<LoadReport> {
    anyhow::ensure!(!drivers.is_empty(), "no driver");
    let rec = Recorder::new(concurrency.min(16));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    let workers = concurrency.max(1) as u64;
    for w in 0..workers {
        let driver = drivers[w as usize % drivers.len()].clone();
        let spec = spec.clone();
        let rec = rec.clone();
        set.spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x10AD ^ w);
            let mut i = w;
            while i < spec.keys {
                let key = key_bytes(&spec.key_prefix, i);
                let value = value_bytes(&mut rng, spec.value_size);
                let mut tries = 0;
                loop {
                    let start = Instant::now();
                    match driver.put(&key, &value).await {
                        Ok(()) => {
                            rec.shard(w as usize).lock().ok(OpKind::Insert, start.elapsed());
                            break;
                        }
                        Err(e) if tries < 3 => {
                            tries += 1;
                            rec.shard(w as usize).lock().error(e.kind);
                            tokio::time::sleep(Duration::from_millis(50 << tries)).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e).context(format!("loading key {i}"))),
                    }
                }
                i += workers;
            }
            Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a load worker panicked")??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let all = rec.totals().all();
    Ok(LoadReport {
        keys: spec.keys,
        secs,
        ops_per_sec: spec.keys as f64 / secs.max(1e-9),
        latency: LatencySummary::of(&all),
    })
}

/// Deletes keys `0..keys` and the keys workload E may have inserted after them
/// (`keys..keys + extra`); how many existed.
pub async fn clean(drivers: &[Arc<dyn Driver>], spec: &WorkloadSpec, extra: u64, concurrency: usize) -> Result<u64> {
    anyhow::ensure!(!drivers.is_empty(), "no driver");
    let total = spec.keys + extra;
    let workers = concurrency.max(1) as u64;
    let mut set = JoinSet::new();
    for w in 0..workers {
        let driver = drivers[w as usize % drivers.len()].clone();
        let prefix = spec.key_prefix.clone();
        set.spawn(async move {
            let mut existed = 0u64;
            let mut i = w;
            while i < total {
                let key = key_bytes(&prefix, i);
                if driver.delete(&key).await.with_context(|| format!("deleting key {i}"))? {
                    existed += 1;
                }
                i += workers;
            }
            anyhow::Ok(existed)
        });
    }
    let mut existed = 0;
    while let Some(r) = set.join_next().await {
        existed += r.context("a clean worker panicked")??;
    }
    Ok(existed)
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
