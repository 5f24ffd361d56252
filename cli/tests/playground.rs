//! End to end: the real `skvctl` binary runs `playground` as a child process;
//! `skvctl put/get/scan` talk to it with the printed `export` line; SIGINT stops
//! it with exit code 0; a second run on the same data dir still has the data,
//! and the first run's token still works.
#![cfg(all(unix, feature = "servers"))]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_skvctl");

/// A running playground; killed by PID when dropped (on test failure too).
struct Playground {
    child: Option<Child>,
    endpoint: String,
    token: String,
    placement: String,
    ca_file: Option<String>,
    /// SKV_CLIENT_CERT_FILE and SKV_CLIENT_KEY_FILE (`--tls`: the admin certificate).
    client_cert: Option<(String, String)>,
}

impl Playground {
    fn start(dir: &Path, base: u16) -> Self {
        Self::start_with(dir, base, &[])
    }

    fn start_with(dir: &Path, base: u16, extra: &[&str]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "playground",
            "--storenodes",
            "3",
            "--port-base",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        clear_skv_env(&mut cmd);
        let mut child = cmd.spawn().expect("spawning skvctl playground");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut pg = Playground {
            child: Some(child),
            endpoint: String::new(),
            token: String::new(),
            placement: String::new(),
            ca_file: None,
            client_cert: None,
        };
        // Read stdout on a thread (and keep draining it so the child never blocks).
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("[playground] {line}");
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(150);
        let export = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("export ") => break line,
                Ok(_) => {}
                Err(_) => panic!("no export line from the playground within 150 s (or it exited)"),
            }
        };
        let exports: Vec<&str> = export.lines().filter(|l| l.starts_with("export ")).collect();
        assert_eq!(exports.len(), 1);
        let (mut cert, mut key) = (None, None);
        for part in export.trim_start_matches("export ").split_whitespace() {
            let (k, v) = part.split_once('=').expect("NAME=value");
            match k {
                "SKV_ENDPOINT" => pg.endpoint = v.to_string(),
                "SKV_TOKEN" => pg.token = v.to_string(),
                "SKV_PLACEMENT" => pg.placement = v.to_string(),
                "SKV_CA_FILE" => pg.ca_file = Some(v.to_string()),
                "SKV_CLIENT_CERT_FILE" => cert = Some(v.to_string()),
                "SKV_CLIENT_KEY_FILE" => key = Some(v.to_string()),
                other => panic!("unexpected variable {other} in {export:?}"),
            }
        }
        assert!(!pg.endpoint.is_empty() && !pg.token.is_empty() && !pg.placement.is_empty());
        pg.client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            other => panic!("a client certificate without its key (or the reverse): {other:?}"),
        };
        pg
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs `skvctl ARGS` against this playground (with `token`).
    fn ctl(&self, token: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        clear_skv_env(&mut cmd);
        cmd.args(args)
            .env("SKV_ENDPOINT", &self.endpoint)
            .env("SKV_TOKEN", token)
            .env("SKV_PLACEMENT", &self.placement);
        if let Some(ca) = &self.ca_file {
            cmd.env("SKV_CA_FILE", ca);
        }
        if let Some((c, k)) = &self.client_cert {
            cmd.env("SKV_CLIENT_CERT_FILE", c).env("SKV_CLIENT_KEY_FILE", k);
        }
        cmd.output().expect("running skvctl")
    }

    /// SIGINT by PID, then waits for the exit.
    fn interrupt(mut self) -> ExitStatus {
        let pid = self.pid();
        let ok = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success(), "kill -INT {pid} failed");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the playground") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the playground did not exit within 60 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Playground {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn clear_skv_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("SKV_")) {
            cmd.env_remove(k);
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// A port base whose every port of the playground's plan (3 storenodes) is free now.
fn free_port_base() -> u16 {
    let offsets: Vec<u16> = [0u16, 1, 11, 12, 13, 111, 112, 113, 400, 401].to_vec();
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
    for i in 0..200u64 {
        // Below Linux's ephemeral range (32768+), so outgoing connections do not take them.
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

#[test]
fn playground_serves_stops_cleanly_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base();

    // First run: write some data.
    let pg = Playground::start(dir.path(), base);
    let first_token = pg.token.clone();
    ok(pg.ctl(&first_token, &["put", "greeting", "hello world"]), "put");
    ok(pg.ctl(&first_token, &["put", "fruit/apple", "red"]), "put");
    ok(pg.ctl(&first_token, &["put", "fruit/banana", "yellow"]), "put");
    assert_eq!(
        ok(pg.ctl(&first_token, &["get", "greeting"]), "get").trim_end(),
        "hello world"
    );
    let json = ok(
        pg.ctl(&first_token, &["--output", "json", "get", "fruit/apple"]),
        "get json",
    );
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["value"], "red");
    assert_eq!(v["version"], 1);
    let scan = ok(
        pg.ctl(&first_token, &["--output", "json", "scan", "--prefix", "fruit/"]),
        "scan",
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(scan.trim()).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["key"], "fruit/apple");
    // A missing key: exit code 1.
    assert_eq!(pg.ctl(&first_token, &["get", "nope"]).status.code(), Some(1));
    // Admin commands reach placement.
    let ranges = ok(pg.ctl(&first_token, &["--output", "json", "ranges"]), "ranges");
    let ranges: Vec<serde_json::Value> = serde_json::from_str(ranges.trim()).unwrap();
    assert!(!ranges.is_empty());
    let stores = ok(pg.ctl(&first_token, &["--output", "json", "stores"]), "stores");
    let stores: Vec<serde_json::Value> = serde_json::from_str(stores.trim()).unwrap();
    assert_eq!(stores.len(), 3);

    let status = pg.interrupt();
    assert!(status.success(), "first run exited with {status}");

    // Second run on the same dir: the data is back, and the old token still works.
    let pg = Playground::start(dir.path(), base);
    assert_eq!(
        ok(pg.ctl(&pg.token, &["get", "greeting"]), "get after restart").trim_end(),
        "hello world"
    );
    assert_eq!(
        ok(pg.ctl(&first_token, &["get", "fruit/banana"]), "get with old token").trim_end(),
        "yellow"
    );
    ok(pg.ctl(&pg.token, &["put", "greeting", "again"]), "put after restart");
    let json = ok(pg.ctl(&pg.token, &["--output", "json", "get", "greeting"]), "get json");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["version"], 2);
    let status = pg.interrupt();
    assert!(status.success(), "second run exited with {status}");
}

/// `playground --tls`: the export line gives an https endpoint and SKV_CA_FILE; put and get
/// go through TLS with that CA; a plaintext client, or one without the CA, is refused; the
/// admin commands (to placement, plaintext inside) still work as printed.
#[test]
fn playground_tls_serves_https_with_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base();
    let pg = Playground::start_with(dir.path(), base, &["--tls"]);
    assert!(pg.endpoint.starts_with("https://"), "{}", pg.endpoint);
    let ca = pg.ca_file.clone().expect("SKV_CA_FILE in the export line");
    assert!(Path::new(&ca).exists(), "{ca}");
    // mTLS inside: placement is https and asks for a certificate; the export line hands
    // skvctl the admin one.
    assert!(pg.placement.starts_with("https://"), "{}", pg.placement);
    let (cert, _) = pg.client_cert.clone().expect("SKV_CLIENT_CERT_FILE in the export line");
    assert!(cert.ends_with("admin.pem"), "{cert}");
    ok(pg.ctl(&pg.token, &["put", "secure", "yes"]), "put over https");
    assert_eq!(
        ok(pg.ctl(&pg.token, &["get", "secure"]), "get over https").trim_end(),
        "yes"
    );
    ok(pg.ctl(&pg.token, &["--output", "json", "ranges"]), "ranges");
    ok(pg.ctl(&pg.token, &["scheduler", "pause"]), "admin command");
    ok(pg.ctl(&pg.token, &["scheduler", "resume"]), "admin command");

    // Without the CA file, https is refused before connecting.
    let mut cmd = Command::new(BIN);
    clear_skv_env(&mut cmd);
    let out = cmd
        .args(["get", "secure"])
        .env("SKV_ENDPOINT", &pg.endpoint)
        .env("SKV_TOKEN", &pg.token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("https without SKV_CA_FILE: {}", err.trim());
    assert!(!out.status.success() && err.contains("--ca-file"), "{err}");
    // Plaintext to the TLS port.
    let mut cmd = Command::new(BIN);
    clear_skv_env(&mut cmd);
    let out = cmd
        .args(["--timeout", "3s", "get", "secure"])
        .env("SKV_ENDPOINT", pg.endpoint.replace("https://", "http://"))
        .env("SKV_TOKEN", &pg.token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("plaintext to the https port: {}", err.trim());
    assert!(!out.status.success(), "{err}");
    // A CA file of another CA.
    let other = dir.path().join("other-certs");
    let made = Command::new(BIN)
        .args(["certs", "create", "--dir"])
        .arg(&other)
        .args(["--hosts", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let mut cmd = Command::new(BIN);
    clear_skv_env(&mut cmd);
    let out = cmd
        .args(["--timeout", "3s", "get", "secure"])
        .env("SKV_ENDPOINT", &pg.endpoint)
        .env("SKV_TOKEN", &pg.token)
        .env("SKV_CA_FILE", other.join("ca.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("https trusting another CA: {}", err.trim());
    assert!(!out.status.success(), "{err}");
    // Placement without a client certificate: refused at the handshake.
    let mut cmd = Command::new(BIN);
    clear_skv_env(&mut cmd);
    let out = cmd
        .args(["--timeout", "3s", "stores"])
        .env("SKV_PLACEMENT", &pg.placement)
        .env("SKV_TOKEN", &pg.token)
        .env("SKV_CA_FILE", &ca)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("placement without a client certificate: {}", err.trim());
    assert!(!out.status.success(), "{err}");
    // The storenodes serve TLS inside: a plaintext skvctl aimed at a storenode's port as if it
    // were a proxy fails (it is the mTLS port, and a proxy role is needed for data calls).
    let store_port = base + 11;
    let mut cmd = Command::new(BIN);
    clear_skv_env(&mut cmd);
    let out = cmd
        .args(["--timeout", "3s", "get", "secure"])
        .env("SKV_ENDPOINT", format!("http://127.0.0.1:{store_port}"))
        .env("SKV_TOKEN", &pg.token)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("plaintext to a storenode's port: {}", err.trim());
    assert!(!out.status.success(), "{err}");
    let status = pg.interrupt();
    assert!(status.success(), "exited with {status}");
}
