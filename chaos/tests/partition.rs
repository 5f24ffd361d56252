//! Network partitions (issue 14, ADR 0031): the storenodes in network namespaces behind a
//! bridge, cut from each other with iptables DROP rules.
//!
//! - `rules_cut_what_the_plan_says`: real namespaces, listeners and TCP connects, no skv:
//!   a majority/minority plan cuts the minority from the majority and from the host, leaves
//!   the majority connected, heal reconnects, and nothing is left after drop.
//! - `partitions_keep_the_majority_available_and_lose_nothing`: a chaos run (3 storenodes,
//!   8 clients on 6 keys, 55 s) with majority/minority, bridge and one-way partitions in
//!   turn: linearizable, no acknowledged write lost, and writes succeed while a minority is
//!   cut off.
//!
//! Needs root, iproute2 and iptables (scripts/test.sh installs them), python3 for the
//! first test's listeners, `cargo build --bins` and etcd for the second.

use rand::SeedableRng;
use rand::rngs::StdRng;
use skv_chaos::cluster::default_bin_dir;
use skv_chaos::nemesis::NemesisKind;
use skv_chaos::netns::{Netns, Peer, Shape, plan};
use skv_chaos::runner::RunOptions;
use skv_testkit::ChildGuard;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether a TCP connection from storenode `from`'s namespace to `ip:port` opens within 1 s.
fn connects(net: &Netns, from: usize, ip: &str, port: u16) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &net.store_ns(from), "timeout", "1", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{ip}/{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn listen_in(net: &Netns, i: usize, port: u16) -> ChildGuard {
    let script = format!(
        "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('{}',{port}))\ns.listen(64)\ntime.sleep(120)",
        net.store_ip(i)
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &net.store_ns(i), "python3", "-c", &script]);
    ChildGuard::spawn(format!("listener-{i}"), &mut cmd).unwrap_or_else(|e| panic!("python3 listener: {e}"))
}

mod support;

#[test]
fn rules_cut_what_the_plan_says() {
    skv_chaos::netns::available().unwrap_or_else(|e| panic!("network namespaces and iptables are needed: {e}"));
    let net = Netns::create(3).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = net.namespaces().to_vec();
    assert_eq!(names.len(), 4, "a bridge namespace and three storenode namespaces");
    let port = 7345;
    let _l: Vec<ChildGuard> = (0..3).map(|i| listen_in(&net, i, port)).collect();
    // The host end: a listener on the host's bridge address.
    let host = std::net::TcpListener::bind((net.host_ip().as_str(), 0)).unwrap_or_else(|e| panic!("{e}"));
    let host_port = host.local_addr().map(|a| a.port()).unwrap_or(0);
    let all_up = || {
        (0..3).all(|a| {
            (0..3)
                .filter(|b| *b != a)
                .all(|b| connects(&net, a, &net.store_ip(b), port))
        }) && (0..3).all(|a| connects(&net, a, &net.host_ip(), host_port))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !all_up() {
        assert!(
            std::time::Instant::now() < deadline,
            "the namespaces never all reached each other"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // From the host namespace to a storenode too (what placement and the proxies do).
    assert!(std::net::TcpStream::connect((net.store_ip(1).as_str(), port)).is_ok());

    // A minority cut from the majority and (some seed) from the host.
    let p = (0..64)
        .filter_map(|seed| plan(Shape::Minority, 3, &[0], &mut StdRng::seed_from_u64(seed)))
        .find(|p| p.rules.iter().any(|r| r.peer == Peer::Host))
        .unwrap_or_else(|| panic!("no plan cuts the minority from the host"));
    assert_eq!(p.isolated, vec![0]);
    net.apply(&p.rules).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(net.rules_in_force().unwrap_or(0), p.rules.len());
    assert!(!connects(&net, 0, &net.store_ip(1), port), "0 -> 1 still open");
    assert!(!connects(&net, 0, &net.store_ip(2), port), "0 -> 2 still open");
    assert!(!connects(&net, 1, &net.store_ip(0), port), "1 -> 0 still open");
    assert!(!connects(&net, 0, &net.host_ip(), host_port), "0 -> host still open");
    assert!(connects(&net, 1, &net.store_ip(2), port), "the majority lost itself");
    assert!(
        connects(&net, 2, &net.host_ip(), host_port),
        "the majority lost the host"
    );
    assert!(
        std::net::TcpStream::connect_timeout(
            &format!("{}:{port}", net.store_ip(0))
                .parse()
                .unwrap_or_else(|e| panic!("{e}")),
            Duration::from_secs(1)
        )
        .is_err(),
        "the host still reaches the minority"
    );

    // A bridge: the two halves do not see each other, the bridge sees both.
    assert_eq!(net.heal().unwrap_or(0), p.rules.len());
    let b = plan(Shape::Bridge, 3, &[1], &mut StdRng::seed_from_u64(3)).unwrap_or_else(|| panic!("no bridge"));
    net.apply(&b.rules).unwrap_or_else(|e| panic!("{e}"));
    assert!(!connects(&net, 0, &net.store_ip(2), port), "the halves still meet");
    assert!(connects(&net, 1, &net.store_ip(0), port) && connects(&net, 1, &net.store_ip(2), port));

    // Heal removes every rule and the traffic flows again.
    assert_eq!(net.heal().unwrap_or(0), b.rules.len());
    assert_eq!(net.rules_in_force().unwrap_or(usize::MAX), 0);
    assert!(all_up(), "healed, yet something is still cut");

    drop(_l);
    drop(net);
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for n in &names {
        assert!(!left.contains(n.as_str()), "{n} left after drop:\n{left}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_keep_the_majority_available_and_lose_nothing() {
    let mut opts = RunOptions::new(default_bin_dir());
    opts.nemeses = vec![NemesisKind::Partition];
    opts.duration = Duration::from_secs(55);
    opts.seed = 31;
    opts.calm_ms = (1_500, 3_000);
    opts.fault_ms = (5_000, 8_000);
    opts.together = 0.0;
    opts.out_dir = std::env::temp_dir().join("skv-chaos-partition");
    let (summary, text) = support::run_clean(opts).await;
    // Every shape happened and was healed.
    for shape in ["majority-minority", "bridge", "one-way"] {
        assert!(
            summary
                .history
                .nemesis
                .iter()
                .any(|e| e.kind == "partition" && e.target == shape && !e.detail.contains("FAILED")),
            "no {shape} partition:\n{text}"
        );
    }
    assert!(
        summary.events_ok("partition-healed") >= 3 && summary.events("partition-healed") == summary.events("partition"),
        "a partition was not healed:\n{text}"
    );
    // The majority side stays available: writes succeed while a minority is cut off.
    let windows = summary.fault_windows("partition", "|", "partition-healed");
    let minority: Vec<(u64, u64)> = summary
        .fault_windows("partition", "", "partition-healed")
        .into_iter()
        .filter(|(from, _)| {
            summary
                .history
                .nemesis
                .iter()
                .any(|e| e.at == *from && e.target == "majority-minority")
        })
        .collect();
    assert!(!windows.is_empty() && !minority.is_empty(), "{text}");
    for w in &minority {
        let (reads, writes) = summary.ok_ops_within(*w);
        eprintln!(
            "majority/minority partition {:.1}s..{:.1}s: {reads} reads and {writes} writes ok",
            w.0 as f64 / 1e9,
            w.1 as f64 / 1e9
        );
        assert!(
            writes > 0,
            "no write succeeded during the partition {w:?} (the majority side must stay available):\n{text}"
        );
    }
    assert!(
        summary.ok_ops() >= 500,
        "only {} calls succeeded:\n{text}",
        summary.ok_ops()
    );
}
