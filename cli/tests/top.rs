//! `skvctl top` against a real playground (3 storenodes, child process): while writes run,
//! `top --once --output json` shows the placement leader, the ranges, every store UP with
//! its leaders and its request rate and p99 read from its `/metrics`, and the table output
//! names every store.
#![cfg(all(unix, feature = "servers"))]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_skvctl");

/// The playground child; killed by PID when dropped.
struct Playground {
    child: Child,
    env: Vec<(String, String)>,
}

impl Drop for Playground {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn clear_skv_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("SKV_")) {
            cmd.env_remove(k);
        }
    }
}

/// A port base whose every port of the playground's plan (3 storenodes) is free now.
fn free_port_base() -> u16 {
    let offsets = [0u16, 1, 11, 12, 13, 111, 112, 113, 400, 401];
    let seed = u64::from(std::process::id())
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    for i in 0..200u64 {
        let base = 20_000 + ((seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i * 977)) % 12_000) as u16;
        if offsets
            .iter()
            .all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port base found");
}

impl Playground {
    fn start(dir: &std::path::Path) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "playground",
            "--storenodes",
            "3",
            "--port-base",
            &free_port_base().to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        clear_skv_env(&mut cmd);
        let mut child = cmd.spawn().expect("spawning skvctl playground");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut pg = Playground { child, env: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(150);
        let export = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("export ") => break line,
                Ok(_) => {}
                Err(_) => panic!("no export line from the playground within 150 s"),
            }
        };
        for part in export.trim_start_matches("export ").split_whitespace() {
            let (k, v) = part.split_once('=').expect("NAME=value");
            pg.env.push((k.to_string(), v.to_string()));
        }
        assert!(pg.env.iter().any(|(k, _)| k == "SKV_PLACEMENT"), "{export}");
        pg
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        clear_skv_env(&mut cmd);
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.output().expect("running skvctl")
    }
}

fn ok(o: Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {out}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

#[test]
fn top_once_shows_stores_leaders_rates_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Arc::new(Playground::start(dir.path()));
    ok(pg.ctl(&["put", "warm", "up"]), "put");

    // Writes keep running while top takes its two scrapes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pg, stop) = (pg.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                ok(pg.ctl(&["put", &format!("top-{n}"), "v"]), "put");
                n += 1;
            }
            n
        })
    };
    let json = ok(
        pg.ctl(&["--output", "json", "top", "--once", "--interval", "3s"]),
        "top --once --output json",
    );
    let text = ok(pg.ctl(&["top", "--once", "--interval", "500ms"]), "top --once");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("writer thread");
    assert!(writes > 0);

    let f: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert!(f["placement_leader"].is_string(), "{f}");
    assert!(f["ranges"].as_u64().unwrap_or(0) >= 1, "{f}");
    assert_eq!(f["stores_up"], 3, "{f}");
    let stores = f["stores"].as_array().cloned().unwrap_or_default();
    assert_eq!(stores.len(), 3, "{f}");
    let leaders: u64 = stores.iter().map(|s| s["leaders"].as_u64().unwrap_or(0)).sum();
    assert!(leaders >= 1, "no leader in {f}");
    for s in &stores {
        assert_eq!(s["state"], "up", "{s}");
        assert!(s["ranges"].as_u64().unwrap_or(0) >= 1, "{s}");
        // Every store's /metrics was scraped twice.
        assert!(s["requests_per_sec"].is_number(), "{s}");
        assert!(s["cpu_percent"].is_number(), "{s}");
    }
    // The writes were measured: requests at the stores, and a p99.
    assert!(f["requests_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{f}");
    let p99 = f["p99_ms"].as_f64().unwrap_or(-1.0);
    assert!(p99 > 0.0 && p99 < 10_000.0, "p99 {p99} in {f}");
    assert!(f["operators"].is_array(), "{f}");

    assert!(text.contains("placement leader:"), "{text}");
    assert!(
        text.contains("STORE") && text.contains("LEADERS") && text.contains("P99 MS"),
        "{text}"
    );
    for id in stores.iter().filter_map(|s| s["id"].as_u64()) {
        assert!(text.contains(&format!("s{id} ")), "store s{id} missing in\n{text}");
    }
}
