//! What every clean-run test of skv-chaos checks, once.

use skv_chaos::runner::{RunOptions, RunSummary, run};

/// Runs `opts` and prints the summary; returns it and its text. Panics if the run could not
/// run at all.
pub async fn run_printed(opts: RunOptions) -> (RunSummary, String) {
    let summary = run(opts)
        .await
        .unwrap_or_else(|e| panic!("the chaos run could not run: {e}"));
    let text = summary.to_string();
    eprintln!("{text}");
    (summary, text)
}

/// Runs `opts`, prints the summary, and asserts the run is clean: no linearizability
/// violation, no undecided key, no acknowledged write lost, every key read back. Returns the
/// summary and its text (for the test's own assertions about faults and progress).
pub async fn run_clean(opts: RunOptions) -> (RunSummary, String) {
    let (summary, text) = run_printed(opts).await;
    assert!(
        summary.report.violations.is_empty(),
        "linearizability violations:\n{text}"
    );
    assert!(summary.report.undecided.is_empty(), "undecided keys:\n{text}");
    assert!(summary.lost_writes.is_empty(), "acknowledged writes lost:\n{text}");
    assert!(summary.unread_keys.is_empty(), "keys not read back:\n{text}");
    assert!(summary.is_clean(), "{text}");
    (summary, text)
}
