//! The planted bug of issue 14, end to end: half the clients' reads are served by any
//! replica without ReadIndex (`get_stale`) but recorded as linearizable gets, on a real
//! process cluster with no fault at all. A follower answers from what it has applied, which
//! trails the leader's acknowledgements by a heartbeat, so the checker must find stale reads
//! (and nothing else: no write is lost). Needs `cargo build --bins` and etcd.

mod support;

use skv_chaos::cluster::default_bin_dir;
use skv_chaos::history::Input;
use skv_chaos::runner::{Plant, RunOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_without_read_index_are_caught() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.duration = Duration::from_secs(20);
    opts.seed = 3;
    opts.nemeses = Vec::new();
    opts.plant = Some(Plant::StaleReads);
    opts.out_dir = std::env::temp_dir().join("skv-chaos-planted");
    let (summary, text) = support::run_printed(opts).await;
    assert!(
        !summary.report.violations.is_empty(),
        "the planted stale reads were not caught:\n{text}"
    );
    assert!(!summary.is_clean());
    let by_id: std::collections::HashMap<usize, &skv_chaos::history::Op> =
        summary.history.ops.iter().map(|o| (o.id, o)).collect();
    assert!(
        summary
            .report
            .violations
            .iter()
            .any(|v| by_id[&v.stuck].input == Input::Get),
        "no violation stuck at a read:\n{text}"
    );
    assert!(summary.lost_writes.is_empty(), "{text}");
    assert!(
        summary.history_file.as_ref().is_some_and(|p| p.exists()),
        "no history written:\n{text}"
    );
    // A failing run keeps its files for a human; this one failed on purpose.
    if let Some(dir) = &summary.kept_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some(file) = &summary.history_file {
        let _ = std::fs::remove_file(file);
    }
}

/// The planted bug as a server failpoint (ADR 0029): every storenode runs with
/// `storenode::read::skip_read_index`, and half the clients' gets go straight to a follower
/// over the internal Store API (`skv_chaos::direct`). The servers serve them from local
/// state without ReadIndex; the checker must find stale reads. The control run sends the
/// same follower reads with the failpoint off: the followers refuse them (NotLeader), and
/// the run is clean. Needs binaries built with `--features skv-storenode/failpoints`
/// (scripts/test.sh builds them so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_failpoint_skipping_read_index_is_caught_and_the_control_run_is_clean() {
    let bin_dir = std::env::var_os("SKV_FAILPOINT_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(default_bin_dir);
    let opts = |control: bool| {
        let mut o = RunOptions::new(bin_dir.clone());
        o.duration = Duration::from_secs(12);
        o.seed = 5;
        o.nemeses = Vec::new();
        o.plant = Some(Plant::SkipReadIndex);
        if control {
            o.cluster.store_failpoints = "storenode::read::skip_read_index=off".into();
        }
        o.out_dir = std::env::temp_dir().join("skv-chaos-planted");
        o
    };
    let (planted, text) = support::run_printed(opts(false)).await;
    let by_id: std::collections::HashMap<usize, &skv_chaos::history::Op> =
        planted.history.ops.iter().map(|o| (o.id, o)).collect();
    assert!(
        planted
            .report
            .violations
            .iter()
            .any(|v| by_id[&v.stuck].input == Input::Get),
        "reads without ReadIndex at followers were not caught:\n{text}"
    );
    assert!(planted.lost_writes.is_empty(), "{text}");
    for p in [&planted.kept_dir, &planted.history_file].into_iter().flatten() {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }

    // Clean (every check of run_clean), and the refusals show the failpoint was there.
    let (control, text) = support::run_clean(opts(true)).await;
    let refused = control
        .history
        .ops
        .iter()
        .filter(|o| {
            o.error
                .as_deref()
                .is_some_and(|e| e.starts_with("follower read refused"))
        })
        .count();
    assert!(refused > 0, "no follower read was refused in the control run:\n{text}");
    assert!(control.is_clean(), "the control run is not clean:\n{text}");
}
