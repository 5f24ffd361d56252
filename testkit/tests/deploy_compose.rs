//! The Docker images of deploy/docker and the cluster of deploy/compose, for real
//! (issue 13): `deploy/docker/build.sh` builds the images FROM scratch from the binaries
//! this test runs next to (target/debug after scripts/test.sh's `cargo build --bins`), then
//! `docker-compose` starts deploy/compose/docker-compose.yml (etcd, 3 placement,
//! 3 storenodes, 2 proxies, Prometheus) with its ports published on random 127.0.0.1
//! ports, and the test:
//! - mints a token from the proxies' secret with the host's `skvctl token mint`;
//! - writes through proxy-1 with the host's `skvctl put` (SKV_ENDPOINT on the published
//!   port) and reads it back through proxy-2 with `skvctl get`;
//! - writes and reads with the `skvctl` image on the compose network (service names);
//! - lists the stores through placement (SKV_PLACEMENT): 3 up;
//! - gets 200 from /healthz and /readyz (the Kubernetes probes) of every skv container's
//!   metrics port, at its address on the compose network;
//! - replaces the storenode-1 container by a new one on another address (as Kubernetes
//!   replaces a pod): writes go on meanwhile, and the new one rejoins, catches up and leads;
//! - waits until the compose Prometheus (deploy/prometheus/prometheus.yml, whose targets
//!   are the compose service names) scrapes every target, and has loaded every alert rule.
//!
//! Grafana is in the compose file only under the `grafana` profile: its image cannot be
//! built here (no Debian package) nor pulled (no registry), so this test leaves it out.
//! The test fails (never skips) when docker or docker-compose is missing.

use skv_testkit::bin_path;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PROJECT: &str = "skv-deploy-test";
const TAG: &str = "deploy-test";
/// A container that takes a stopped storenode's address, so that its successor gets another.
const IP_TAKER: &str = "skv-deploy-test-ip-taker";

use skv_testkit::repo_root;

use skv_testkit::run_captured as run;

use skv_testkit::output_text as text;

/// `docker-compose` with this test's project, file and environment.
struct Compose {
    file: PathBuf,
    secret: PathBuf,
    _dir: tempfile::TempDir,
}

impl Compose {
    fn cmd(&self) -> Command {
        let mut c = Command::new("docker-compose");
        c.arg("-p")
            .arg(PROJECT)
            .arg("-f")
            .arg(&self.file)
            .env("SKV_IMAGE_TAG", TAG)
            .env("SKV_JWT_SECRET_FILE", &self.secret)
            .env("SKV_PROXY1_PUBLISH", "127.0.0.1:")
            .env("SKV_PROXY2_PUBLISH", "127.0.0.1:")
            .env("SKV_PLACEMENT1_PUBLISH", "127.0.0.1:")
            .env("SKV_PROMETHEUS_PUBLISH", "127.0.0.1:");
        c
    }

    fn down(&self) {
        let _ = run(self.cmd().args(["down", "-v", "--remove-orphans", "-t", "5"]));
    }

    /// `127.0.0.1:PORT` that `service`'s container `port` is published on.
    fn port(&self, service: &str, port: u16) -> String {
        let o = run(self.cmd().args(["port", service, &port.to_string()]));
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(
            o.status.success() && s.starts_with("127.0.0.1:"),
            "docker-compose port {service} {port}: {}",
            text(&o)
        );
        s
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let o = run(self.cmd().args(["logs", "--no-color", "--tail", "25"]));
            eprintln!("compose logs:\n{}", text(&o));
        }
        let _ = run(Command::new("docker").args(["rm", "-f", IP_TAKER]));
        self.down();
        let images = [
            "skv-placement",
            "skv-storenode",
            "skv-proxy",
            "skvctl",
            "skv-etcd",
            "skv-prometheus",
        ];
        let _ = run(Command::new("docker")
            .arg("rmi")
            .args(images.iter().map(|i| format!("{i}:{TAG}"))));
    }
}

fn need(tool: &str, install: &str) {
    let ok = Command::new(tool)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "`{tool} version` failed: this test needs {tool} ({install})");
}

/// `skvctl ARGS` on the host with `env`.
fn skvctl(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(bin_path("skvctl"));
    c.args(args).env_remove("SKV_OUTPUT");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("timed out after {timeout:?} waiting for {what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// GET http://ADDR/PATH with std networking (HTTP/1.0): (status, body).
fn http_get_status(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP body in {buf:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn http_get(addr: &str, path: &str) -> Result<String, String> {
    match http_get_status(addr, path)? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("HTTP {status}: {body}")),
    }
}

#[test]
fn docker_images_and_compose_cluster_serve_skvctl_put_and_get() {
    let started = Instant::now();
    need("docker", "Docker Engine");
    need("docker-compose", "apt-get install docker-compose");
    let root = repo_root();

    // The images, from the binaries next to this test (target/<profile>/).
    let bin_dir = bin_path("skv-proxy")
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("no binary dir"));
    let profile = bin_dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or_else(|| panic!("no profile in {}", bin_dir.display()))
        .to_string();
    let target_dir = bin_dir.parent().unwrap_or_else(|| panic!("no target dir"));
    let o = run(Command::new(root.join("deploy/docker/build.sh"))
        .args(["--profile", &profile, "--tag", TAG, "--target-dir"])
        .arg(target_dir));
    let out = text(&o);
    assert!(o.status.success(), "deploy/docker/build.sh failed:\n{out}");
    for image in [
        "skv-placement",
        "skv-storenode",
        "skv-proxy",
        "skvctl",
        "skv-etcd",
        "skv-prometheus",
    ] {
        assert!(
            out.contains(&format!("built {image}:{TAG}")),
            "no {image} image:\n{out}"
        );
    }
    eprintln!("images built in {:?}:\n{out}", started.elapsed());
    // FROM scratch: an image holds the program, the libraries ldd names, the loader and a
    // few files of build.sh; no shell, no package manager.
    let o = run(Command::new("sh").arg("-c").arg(format!(
        "id=$(docker create skv-proxy:{TAG}) && docker export \"$id\" | tar -t; r=$?; docker rm \"$id\" >/dev/null; exit $r"
    )));
    let files: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_string)
        .collect();
    assert!(o.status.success(), "docker export: {}", text(&o));
    for f in ["usr/local/bin/skv-proxy", "lib64/ld-linux-x86-64.so.2", "etc/passwd"] {
        assert!(files.iter().any(|x| x == f), "skv-proxy image lacks {f}: {files:?}");
    }
    assert!(
        !files
            .iter()
            .any(|x| x.ends_with("bin/sh") || x.contains("apt") || x.contains("dpkg")),
        "skv-proxy image is not minimal: {files:?}"
    );
    assert!(
        files.len() < 30,
        "skv-proxy image holds {} files: {files:?}",
        files.len()
    );

    // The cluster.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let secret = dir.path().join("jwt-secret");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::fs::write(&secret, format!("deploy-test-secret-{nanos:040}\n")).unwrap_or_else(|e| panic!("secret: {e}"));
    {
        use std::os::unix::fs::PermissionsExt;
        // Read by uid 65532 inside the proxy containers.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
    }
    let compose = Compose {
        file: root.join("deploy/compose/docker-compose.yml"),
        secret: secret.clone(),
        _dir: dir,
    };
    // Leftovers of an interrupted run.
    let _ = run(Command::new("docker").args(["rm", "-f", IP_TAKER]));
    compose.down();
    let o = run(compose.cmd().args(["up", "-d"]));
    assert!(o.status.success(), "docker-compose up failed:\n{}", text(&o));
    let proxy1 = compose.port("proxy-1", 7400);
    let proxy2 = compose.port("proxy-2", 7400);
    let placement = compose.port("placement-1", 7000);
    let prometheus = compose.port("prometheus", 9090);

    // A token from the proxies' secret, as the README says.
    let o = skvctl(
        &[],
        &[
            "token",
            "mint",
            "--secret-file",
            &secret.display().to_string(),
            "--ns",
            "default",
            "--role",
            // admin: the test also moves a leader (placement's admin calls need it, ADR 0021)
            "admin",
        ],
    );
    assert!(o.status.success(), "skvctl token mint: {}", text(&o));
    let tok = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(tok.split('.').count() == 3, "not a JWT: {tok:?}");

    // put through proxy-1 (retried until the cluster has placed its first range).
    let ep1 = format!("http://{proxy1}");
    let ep2 = format!("http://{proxy2}");
    let pd = format!("http://{placement}");
    poll("skvctl put through proxy-1", Duration::from_secs(90), || {
        let o = skvctl(
            &[("SKV_ENDPOINT", &ep1), ("SKV_TOKEN", &tok)],
            &["put", "hello", "compose"],
        );
        o.status.success().then_some(()).ok_or_else(|| text(&o))
    });
    let o = skvctl(&[("SKV_ENDPOINT", &ep2), ("SKV_TOKEN", &tok)], &["get", "hello"]);
    assert!(o.status.success(), "skvctl get through proxy-2: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "compose", "{}", text(&o));

    // The skvctl image on the compose network, by service names.
    let network = format!("{}_default", PROJECT.replace('-', ""));
    let net_exists = run(Command::new("docker").args(["network", "inspect", &network]))
        .status
        .success();
    let network = if net_exists {
        network
    } else {
        format!("{PROJECT}_default")
    };
    let in_net = |args: &[&str]| {
        run(Command::new("docker")
            .args(["run", "--rm", "--network", &network])
            .args(["-e", "SKV_ENDPOINT=http://proxy-1:7400,http://proxy-2:7400"])
            .args(["-e", &format!("SKV_TOKEN={tok}")])
            .args(["-e", "SKV_PLACEMENT=http://placement-2:7000"])
            .arg(format!("skvctl:{TAG}"))
            .args(args))
    };
    let o = in_net(&["put", "from-container", "yes"]);
    assert!(o.status.success(), "skvctl image put: {}", text(&o));
    let o = in_net(&["get", "hello"]);
    assert!(o.status.success(), "skvctl image get: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "compose", "{}", text(&o));
    let o = skvctl(
        &[("SKV_ENDPOINT", &ep1), ("SKV_TOKEN", &tok)],
        &["get", "from-container"],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "yes", "{}", text(&o));
    let o = in_net(&["status"]);
    assert!(o.status.success(), "skvctl image status: {}", text(&o));

    // Placement, through SKV_PLACEMENT: three stores up.
    let stores = poll("3 stores up", Duration::from_secs(30), || {
        let o = skvctl(&[("SKV_PLACEMENT", &pd)], &["--output", "json", "stores"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))?;
        let up = v
            .as_array()
            .map(|a| a.iter().filter(|s| s["state"] == "up").count())
            .unwrap_or(0);
        (up == 3).then_some(v).ok_or_else(|| text(&o))
    });
    eprintln!("stores: {stores}");

    // /healthz and /readyz (the Kubernetes probes) answer 200 on every skv container's
    // metrics port, reached at the container's address on the compose network.
    for (service, port) in [
        ("placement-1", 7001),
        ("placement-2", 7001),
        ("placement-3", 7001),
        ("storenode-1", 7101),
        ("storenode-2", 7101),
        ("storenode-3", 7101),
        ("proxy-1", 7401),
        ("proxy-2", 7401),
    ] {
        let o = run(compose.cmd().args(["ps", "-q", service]));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(!id.is_empty(), "no container for {service}: {}", text(&o));
        let o = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ]));
        let ip = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(!ip.is_empty(), "no address for {service}: {}", text(&o));
        let addr = format!("{ip}:{port}");
        for path in ["/healthz", "/readyz"] {
            poll(&format!("{service} {path}"), Duration::from_secs(30), || {
                http_get(&addr, path).map(|_| ())
            });
        }
    }

    // The compose Prometheus scrapes every service by its compose name, with every rule.
    let rules_declared = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim().starts_with("- alert:"))
        .count();
    assert!(
        rules_declared > 0,
        "no alert rule found in deploy/prometheus/alerts.yml"
    );
    poll(
        "the compose Prometheus to scrape all 10 targets",
        Duration::from_secs(60),
        || {
            let body = http_get(&prometheus, "/api/v1/targets")?;
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
            let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            let up: Vec<String> = targets
                .iter()
                .filter(|t| t["health"] == "up")
                .map(|t| t["labels"]["instance"].as_str().unwrap_or("?").to_string())
                .collect();
            (targets.len() == 10 && up.len() == 10)
                .then_some(())
                .ok_or_else(|| format!("{} targets, up: {up:?}", targets.len()))
        },
    );
    let body = http_get(&prometheus, "/api/v1/rules").unwrap_or_else(|e| panic!("rules: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("rules: {e}: {body}"));
    let loaded: usize = v["data"]["groups"]
        .as_array()
        .map(|g| g.iter().map(|g| g["rules"].as_array().map_or(0, Vec::len)).sum())
        .unwrap_or(0);
    assert_eq!(loaded, rules_declared, "the compose Prometheus loaded {loaded} rules");

    // A storenode container is replaced by a new one on another address (as a Kubernetes
    // pod is): writes go on without it, and the new container, on the same volume, rejoins
    // under its name, catches up and can lead.
    let ip_of = |service: &str| {
        let o = run(compose.cmd().args(["ps", "-q", service]));
        let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let o = run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let old_ip = ip_of("storenode-1");
    let o = run(compose.cmd().args(["rm", "-s", "-f", "storenode-1"]));
    assert!(o.status.success(), "docker-compose rm storenode-1: {}", text(&o));
    // Another container takes the freed address.
    let o = run(Command::new("docker")
        .args(["run", "-d", "--rm", "--name", IP_TAKER, "--network", &network])
        .arg(format!("skv-etcd:{TAG}"))
        .args(["--data-dir", "/tmp/etcd"]));
    assert!(o.status.success(), "docker run {IP_TAKER}: {}", text(&o));
    poll("a write with storenode-1 gone", Duration::from_secs(30), || {
        let o = skvctl(
            &[("SKV_ENDPOINT", &ep1), ("SKV_TOKEN", &tok)],
            &["put", "while-away", "ok"],
        );
        o.status.success().then_some(()).ok_or_else(|| text(&o))
    });
    let o = run(compose.cmd().args(["up", "-d", "storenode-1"]));
    assert!(o.status.success(), "docker-compose up storenode-1: {}", text(&o));
    let new_ip = ip_of("storenode-1");
    assert_ne!(old_ip, new_ip, "storenode-1 came back on its old address");
    let store_id = poll("storenode-1 up again", Duration::from_secs(30), || {
        let o = skvctl(&[("SKV_PLACEMENT", &pd)], &["--output", "json", "stores"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))?;
        let stores = v.as_array().cloned().unwrap_or_default();
        let up = stores.iter().filter(|s| s["state"] == "up").count();
        let id = stores
            .iter()
            .find(|s| s["address"] == "storenode-1:7100")
            .and_then(|s| s["id"].as_u64());
        match id {
            Some(id) if up == 3 && stores.len() == 3 => Ok(id),
            _ => Err(text(&o)),
        }
    });
    let o = skvctl(&[("SKV_PLACEMENT", &pd)], &["--output", "json", "ranges"]);
    let ranges: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("ranges: {e}: {}", text(&o)));
    let ranges = ranges.as_array().cloned().unwrap_or_default();
    assert!(!ranges.is_empty(), "skvctl ranges listed no range: {}", text(&o));
    for r in ranges {
        let id = r["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("range without id: {r}"))
            .to_string();
        poll(
            &format!("range {id} led by the new storenode-1"),
            Duration::from_secs(30),
            || {
                let o = skvctl(
                    &[("SKV_PLACEMENT", &pd), ("SKV_TOKEN", &tok)],
                    &["transfer-leader", &id, "--to", &store_id.to_string()],
                );
                o.status.success().then_some(()).ok_or_else(|| text(&o))
            },
        );
    }
    for (k, v) in [("hello", "compose"), ("while-away", "ok")] {
        let o = poll(&format!("get {k} after the move"), Duration::from_secs(20), || {
            let o = skvctl(&[("SKV_ENDPOINT", &ep2), ("SKV_TOKEN", &tok)], &["get", k]);
            o.status.success().then_some(o).ok_or_else(|| "get failed".to_string())
        });
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), v, "{}", text(&o));
    }
    eprintln!("compose test done in {:?}", started.elapsed());
}
