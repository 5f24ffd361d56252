//! The planted bug of issue 14, end to end: half the clients' reads are served by any
//! replica without ReadIndex (`get_stale`) but recorded as linearizable gets, on a real
//! process cluster with no fault at all. A follower answers from what it has applied, which
//! trails the leader's acknowledgements by a heartbeat, so the checker must find stale reads
//! (and nothing else: no write is lost). Needs `cargo build --bins` and etcd.

use skv_chaos::cluster::default_bin_dir;
use skv_chaos::history::Input;
use skv_chaos::runner::{Plant, RunOptions, run};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reads_without_read_index_are_caught() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.duration = Duration::from_secs(20);
    opts.seed = 3;
    opts.nemeses = Vec::new();
    opts.plant = Some(Plant::StaleReads);
    opts.out_dir = std::env::temp_dir().join("skv-chaos-planted");
    let summary = run(opts)
        .await
        .unwrap_or_else(|e| panic!("the chaos run could not run: {e}"));
    let text = summary.to_string();
    eprintln!("{text}");
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
