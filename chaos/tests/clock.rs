//! The `clock` nemesis (issue 14): every process runs under libfaketime (Debian's
//! `faketime`), and one process at a time (a storenode, a proxy or a placement instance) has
//! its wall clock jumped forward and back by tens of seconds while its monotonic clock runs on.
//! 8 recording clients on 6 keys for 45 s, fixed seed: the history must be linearizable, no
//! acknowledged write lost, and the jumps must be in the timeline. Needs `cargo build --bins`,
//! etcd and faketime (scripts/test.sh installs it).

use skv_chaos::cluster::default_bin_dir;
use skv_chaos::nemesis::NemesisKind;
use skv_chaos::runner::{RunOptions, run};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_lose_nothing() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.nemeses = vec![NemesisKind::Clock];
    opts.duration = Duration::from_secs(45);
    opts.seed = 14;
    opts.calm_ms = (500, 1_500);
    opts.fault_ms = (2_000, 4_000);
    opts.out_dir = std::env::temp_dir().join("skv-chaos-clock");
    let summary = run(opts)
        .await
        .unwrap_or_else(|e| panic!("the chaos run could not run: {e}"));
    let text = summary.to_string();
    eprintln!("{text}");
    for e in summary.history.nemesis.iter().filter(|e| e.kind.starts_with("clock")) {
        eprintln!("{:>8.1}s {} {} {}", e.at as f64 / 1e9, e.kind, e.target, e.detail);
    }
    assert!(
        summary.report.violations.is_empty(),
        "linearizability violations:\n{text}"
    );
    assert!(summary.report.undecided.is_empty(), "undecided keys:\n{text}");
    assert!(summary.lost_writes.is_empty(), "acknowledged writes lost:\n{text}");
    assert!(summary.unread_keys.is_empty(), "keys not read back:\n{text}");
    assert!(summary.is_clean(), "{text}");
    // Jumps forward and back happened (two per round) and were undone.
    assert!(summary.events_ok("clock-jump") >= 4, "too few clock jumps:\n{text}");
    assert!(
        summary.events_ok("clock-restored") >= 2,
        "no clock was put back:\n{text}"
    );
    let backward = summary
        .history
        .nemesis
        .iter()
        .filter(|e| e.kind == "clock-jump" && e.detail.contains("(a jump of -"))
        .count();
    assert!(backward >= 1, "no backward jump:\n{text}");
    assert!(
        summary.ok_ops() >= 500,
        "only {} calls succeeded:\n{text}",
        summary.ok_ops()
    );
}
