//! The `clock` nemesis (issue 14): every process runs under libfaketime (Debian's
//! `faketime`), and one process at a time (a storenode, a proxy or a placement instance) has
//! its wall clock jumped forward and back by tens of seconds while its monotonic clock runs on.
//! 8 recording clients on 6 keys for 45 s, fixed seed: the history must be linearizable, no
//! acknowledged write lost, and the jumps must be in the timeline. Needs `cargo build --bins`,
//! etcd and faketime (scripts/test.sh installs it).

use skv_chaos::cluster::default_bin_dir;
use skv_chaos::nemesis::NemesisKind;
use skv_chaos::runner::RunOptions;
use std::time::Duration;

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_lose_nothing() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.nemeses = vec![NemesisKind::Clock];
    opts.duration = Duration::from_secs(45);
    opts.seed = 14;
    opts.calm_ms = (500, 1_500);
    opts.fault_ms = (2_000, 4_000);
    opts.out_dir = std::env::temp_dir().join("skv-chaos-clock");
    let (summary, text) = support::run_clean(opts).await;
    for e in summary.history.nemesis.iter().filter(|e| e.kind.starts_with("clock")) {
        eprintln!("{:>8.1}s {} {} {}", e.at as f64 / 1e9, e.kind, e.target, e.detail);
    }
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

/// Placement measures store liveness on its own clock: a wall-clock step of the placement
/// leader (forward by more than `--store-down-after-ms`, 30 s by default, then back) must not
/// report any live store DOWN. Before placement's clock was anchored to the monotonic clock,
/// the forward jump made every store DOWN until its next heartbeat (and, held longer than
/// `--repair-after-secs`, would have rebuilt replicas of live stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_clock_jump_marks_no_store_down() {
    use skv_chaos::cluster::{ChaosCluster, ClusterSpec, Role};
    use skv_proto::internal::StoreState;
    let spec = ClusterSpec {
        placements: 1,
        storenodes: 3,
        proxies: 1,
        bin_dir: default_bin_dir(),
        store_failpoints: String::new(),
        tombstone_gc_secs: 2,
        lazyfs_disks: false,
        etcd_members: 1,
        fake_clock: true,
        netns: false,
    };
    let cluster = ChaosCluster::start(&spec)
        .await
        .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    cluster
        .wait_writable(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("the cluster is not writable: {e}"));
    let (file, pid) = cluster
        .clock_of(Role::Placement, 0)
        .unwrap_or_else(|| panic!("placement has no clock file"));
    assert!(pid.is_some(), "placement is not running");
    let up = |stores: &[skv_proto::internal::StoreInfo]| stores.iter().filter(|s| s.state() == StoreState::Up).count();
    let before = cluster.stores_info().await.unwrap_or_else(|e| panic!("GetStores: {e}"));
    assert_eq!(up(&before), 3, "not every store is UP before the jump: {before:?}");

    // Jump forward by 90 s, watch for 4 s (several heartbeat periods), then back by 90 s
    // (to -90 s from the true time), watch again, then restore.
    let mut polls = 0;
    for offset in [90i64, -90] {
        skv_chaos::clock::write_offset(&file, offset).unwrap_or_else(|e| panic!("clock file: {e}"));
        let until = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < until {
            let stores = cluster.stores_info().await.unwrap_or_else(|e| panic!("GetStores: {e}"));
            polls += 1;
            assert_eq!(
                up(&stores),
                3,
                "a store is not UP {polls} polls after placement's clock moved by {offset} s: {stores:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    skv_chaos::clock::write_offset(&file, 0).unwrap_or_else(|e| panic!("clock file: {e}"));
    assert!(polls >= 40, "too few polls ({polls}) to have watched the jumps");
    eprintln!("placement's clock jumped +90 s and -90 s; {polls} polls saw every store UP");
}
