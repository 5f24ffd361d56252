//! The faults added to `skv-chaos run` in issue 14's second round: a slow disk (the
//! storenodes on skv-lazyfs mounts, one of them slowed for a few seconds per round), a
//! proxy kill -9 and restart (the clients use both proxies) and an etcd member kill -9 and
//! restart (a 3-member etcd; placement is given all 3 client URLs). 8 recording clients on
//! 6 keys for 50 s, fixed seed: the history must be linearizable, no acknowledged write lost, and
//! each fault must be in the timeline. Needs `cargo build --bins` (skv-lazyfs too), etcd
//! and FUSE (/dev/fuse and root or fusermount3; scripts/test.sh installs fuse3).

use skv_chaos::cluster::default_bin_dir;
use skv_chaos::nemesis::NemesisKind;
use skv_chaos::runner::RunOptions;
use std::time::Duration;

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_disk_proxy_kill_and_etcd_member_loss_lose_nothing() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.nemeses = vec![NemesisKind::SlowDisk, NemesisKind::ProxyKill, NemesisKind::EtcdMember];
    opts.duration = Duration::from_secs(50);
    opts.seed = 26;
    opts.calm_ms = (1_000, 2_000);
    opts.fault_ms = (2_000, 4_000);
    opts.out_dir = std::env::temp_dir().join("skv-chaos-nemeses");
    let (summary, text) = support::run_clean(opts).await;
    // Each fault happened, and was undone.
    assert!(summary.events_ok("slow-disk") >= 1, "no disk was slowed:\n{text}");
    assert!(
        summary.events_ok("disk-restored") >= 1,
        "no slowed disk was restored:\n{text}"
    );
    assert!(summary.events_ok("proxy-kill") >= 1, "no proxy was killed:\n{text}");
    assert!(
        summary.events_ok("etcd-member-kill") >= 1,
        "no etcd member was killed:\n{text}"
    );
    // A proxy and an etcd member at least.
    assert!(summary.events_ok("restart") >= 2, "no restart:\n{text}");
    assert!(
        summary.ok_ops() >= 500,
        "only {} calls succeeded:\n{text}",
        summary.ok_ops()
    );
}
