use super::*;
use crate::testing::MemDriver;
use crate::workload::{Distribution, WorkloadKind};

fn spec(kind: WorkloadKind) -> WorkloadSpec {
    WorkloadSpec {
        kind,
        distribution: Distribution::Uniform,
        keys: 1000,
        value_size: 8,
        key_prefix: "t/".into(),
        theta: 0.99,
        hot_fraction: 0.01,
        hot_ops: 0.9,
        scan_max: 10,
    }
}

fn plan(kind: WorkloadKind, concurrency: usize, stop: Stop) -> RunPlan {
    RunPlan {
        spec: spec(kind),
        concurrency,
        stop,
        warmup: Duration::ZERO,
        rate: None,
        op_timeout: Duration::from_secs(10),
        seed: 1,
        progress: false,
        cpu_pids: vec![],
    }
}

fn drivers(d: MemDriver) -> (Arc<MemDriver>, Vec<Arc<dyn Driver>>) {
    let d = Arc::new(d);
    (d.clone(), vec![d as Arc<dyn Driver>])
}

#[test]
fn schedule_spreads_workers_over_the_interval() {
    let s = Schedule::new(100.0, 1, 4);
    assert_eq!(s.offset(0), Duration::from_millis(10));
    assert_eq!(s.offset(2), Duration::from_millis(90));
    let s = Schedule::new(1000.0, 0, 1);
    assert_eq!(s.offset(5), Duration::from_millis(5));
}

#[tokio::test(start_paused = true)]
async fn load_writes_every_key_once() {
    let (mem, ds) = drivers(MemDriver::with_delay(Duration::from_micros(100)));
    let r = load(&ds, &spec(WorkloadKind::A), 8, 3).await.unwrap();
    assert_eq!(r.keys, 1000);
    assert_eq!(r.latency.count, 1000);
    let map = mem.map.lock();
    assert_eq!(map.len(), 1000);
    assert!(map.contains_key(&key_bytes("t/", 0)) && map.contains_key(&key_bytes("t/", 999)));
    assert!(map.values().all(|v| v.len() == 8));
}

#[tokio::test(start_paused = true)]
async fn clean_deletes_loaded_and_inserted_keys() {
    let (mem, ds) = drivers(MemDriver::default());
    load(&ds, &spec(WorkloadKind::E), 4, 1).await.unwrap();
    let m = run(&ds, &plan(WorkloadKind::E, 2, Stop::Ops(400))).await.unwrap();
    let inserted = m.totals.by_kind.get(&OpKind::Insert).map(|h| h.len()).unwrap_or(0);
    assert!(inserted > 0);
    assert_eq!(mem.map.lock().len() as u64, 1000 + inserted);
    let existed = clean(&ds, &spec(WorkloadKind::E), 10_000, 4).await.unwrap();
    assert_eq!(existed, 1000 + inserted);
    assert!(mem.map.lock().is_empty());
}

#[tokio::test(start_paused = true)]
async fn closed_loop_runs_exactly_the_op_budget() {
    let (mem, ds) = drivers(MemDriver::with_delay(Duration::from_millis(1)));
    load(&ds, &spec(WorkloadKind::A), 4, 1).await.unwrap();
    let m = run(&ds, &plan(WorkloadKind::A, 4, Stop::Ops(500))).await.unwrap();
    assert_eq!(m.totals.all().len(), 500);
    assert_eq!(m.totals.not_found, 0, "every read finds a loaded key");
    let kinds: Vec<OpKind> = m.totals.by_kind.keys().copied().collect();
    assert_eq!(kinds, vec![OpKind::Read, OpKind::Update]);
    assert_eq!(mem.calls.load(Ordering::Relaxed), 1000 + 500);
    // With a warm-up: operations in flight when it ends are not counted either.
    let mut p = plan(WorkloadKind::A, 4, Stop::Ops(300));
    p.warmup = Duration::from_millis(1500);
    let m = run(&ds, &p).await.unwrap();
    assert_eq!(m.totals.all().len(), 300);
}

#[tokio::test(start_paused = true)]
async fn warmup_is_run_but_not_recorded() {
    let (mem, ds) = drivers(MemDriver::with_delay(Duration::from_millis(10)));
    let mut p = plan(WorkloadKind::C, 1, Stop::After(Duration::from_secs(3)));
    p.warmup = Duration::from_secs(2);
    let m = run(&ds, &p).await.unwrap();
    let ops = m.totals.all().len();
    assert!((295..=301).contains(&ops), "measured {ops}");
    assert!(mem.calls.load(Ordering::Relaxed) >= 495, "warm-up ran");
    assert_eq!(m.series.len(), 3, "{:?}", m.series);
    assert!((m.measured_secs - 3.0).abs() < 0.05);
    assert!(m.series.iter().all(|s| (s.ops_per_sec - 100.0).abs() <= 2.0));
    assert_eq!(m.totals.not_found, ops, "nothing was loaded");
}

#[tokio::test(start_paused = true)]
async fn open_loop_meets_its_rate_on_a_fast_server() {
    let (_mem, ds) = drivers(MemDriver::with_delay(Duration::from_millis(1)));
    let mut p = plan(WorkloadKind::Write, 4, Stop::After(Duration::from_secs(5)));
    p.rate = Some(200.0);
    let m = run(&ds, &p).await.unwrap();
    let ops = m.totals.all().len() as f64;
    assert!((ops - 1000.0).abs() <= 10.0, "ops {ops}");
    let lat = LatencySummary::of(&m.totals.all());
    assert!(lat.p99_us < 2_000, "{lat:?}");
}

/// A server slower than the target rate: latencies are counted from the schedule, so
/// they grow with the backlog instead of staying at the service time.
#[tokio::test(start_paused = true)]
async fn open_loop_counts_latency_from_the_schedule() {
    let (_mem, ds) = drivers(MemDriver::with_delay(Duration::from_millis(20)));
    let closed = run(&ds, &plan(WorkloadKind::Write, 1, Stop::After(Duration::from_secs(2))))
        .await
        .unwrap();
    let c = LatencySummary::of(&closed.totals.all());
    assert!((19_000..=21_500).contains(&c.p99_us), "closed {c:?}");
    let mut p = plan(WorkloadKind::Write, 1, Stop::After(Duration::from_secs(2)));
    p.rate = Some(100.0);
    let open = run(&ds, &p).await.unwrap();
    let o = LatencySummary::of(&open.totals.all());
    assert!(o.p99_us > 500_000, "open {o:?}");
    assert!(open.totals.all().len() <= 101, "the server sets the pace");
}

#[tokio::test(start_paused = true)]
async fn errors_and_timeouts_are_counted_by_kind() {
    let mut d = MemDriver::with_delay(Duration::from_millis(1));
    d.fail_every = Some(10);
    let (_mem, ds) = drivers(d);
    let m = run(&ds, &plan(WorkloadKind::Write, 2, Stop::Ops(200))).await.unwrap();
    let errors = m.totals.errors.get(&ErrorKind::Unavailable).copied().unwrap_or(0);
    assert_eq!(m.totals.all().len() + errors, 200);
    assert_eq!(errors, 20);

    let (_mem, ds) = drivers(MemDriver::with_delay(Duration::from_millis(100)));
    let mut p = plan(WorkloadKind::C, 1, Stop::Ops(5));
    p.op_timeout = Duration::from_millis(30);
    let m = run(&ds, &p).await.unwrap();
    assert_eq!(m.totals.errors.get(&ErrorKind::Timeout), Some(&5));
    assert_eq!(m.totals.all().len(), 0);
}

#[tokio::test(start_paused = true)]
async fn scans_and_read_modify_writes_run() {
    let (_mem, ds) = drivers(MemDriver::default());
    load(&ds, &spec(WorkloadKind::E), 2, 1).await.unwrap();
    let m = run(&ds, &plan(WorkloadKind::E, 2, Stop::Ops(300))).await.unwrap();
    assert!(m.totals.by_kind.contains_key(&OpKind::Scan));
    let m = run(&ds, &plan(WorkloadKind::F, 2, Stop::Ops(300))).await.unwrap();
    assert!(m.totals.by_kind.contains_key(&OpKind::Rmw));
    assert_eq!(m.totals.not_found, 0);
    assert!(run(&[], &plan(WorkloadKind::A, 1, Stop::Ops(1))).await.is_err());
}
