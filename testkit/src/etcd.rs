//! A real etcd (the Debian `etcd-server` binary) in a temp dir, on random ports.

use crate::process::{ChildGuard, free_port};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running single-member etcd, killed by PID on drop.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`
    pub client_url: String,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers. Panics with a hint when the
    /// binary is missing (the README's test command installs it).
    pub async fn start() -> Etcd {
        Self::start_inner(None).await
    }

    /// Starts etcd serving clients over TLS with `certs`' storenode certificate (any role's
    /// certificate names 127.0.0.1) and requiring client certificates of `certs/ca.pem`
    /// (`--client-cert-auth`); `client_url` is then `https://`. Made by
    /// `skv_rpc::certs::create` (feature `dev-certs`).
    pub async fn start_tls(certs: &std::path::Path) -> Etcd {
        Self::start_inner(Some(certs)).await
    }

    async fn start_inner(certs: Option<&std::path::Path>) -> Etcd {
        let bin = which_etcd();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let scheme = if certs.is_some() { "https" } else { "http" };
        let probe_opts = certs.map(|c| {
            let read = |name: &str| std::fs::read(c.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
                    .identity(etcd_client::Identity::from_pem(
                        read("placement.pem"),
                        read("placement-key.pem"),
                    )),
            )
        });
        for _attempt in 0..3 {
            let (cp, pp) = (free_port(), free_port());
            let client_url = format!("{scheme}://127.0.0.1:{cp}");
            let peer_url = format!("http://127.0.0.1:{pp}");
            let data = dir.path().join(format!("data-{cp}"));
            let mut cmd = Command::new(&bin);
            cmd.arg("--name")
                .arg("default")
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(format!("default={peer_url}"))
                .arg("--log-level")
                .arg("error")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(c) = certs {
                cmd.arg("--cert-file")
                    .arg(c.join("storenode.pem"))
                    .arg("--key-file")
                    .arg(c.join("storenode-key.pem"))
                    .arg("--trusted-ca-file")
                    .arg(c.join("ca.pem"))
                    .arg("--client-cert-auth");
            }
            let mut guard = ChildGuard::spawn("etcd", &mut cmd).unwrap_or_else(|e| panic!("spawn etcd: {e}"));
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(mut c) = etcd_client::Client::connect([client_url.as_str()], probe_opts.clone()).await
                    && c.get("health-probe", None).await.is_ok()
                {
                    return Etcd {
                        client_url,
                        guard,
                        _dir: dir,
                    };
                }
                if guard.wait_timeout(Duration::from_millis(1)).is_some() {
                    break; // exited (port race): try other ports
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            guard.kill();
        }
        panic!("etcd did not become ready");
    }

    /// The PID of the etcd process.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

fn which_etcd() -> String {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("etcd not found: install Debian's etcd-server (the README's test command does)");
}

/// A 3-member (or n-member) etcd on 127.0.0.1 whose members can be killed one at a time (the
/// majority stays) and restarted on their data directories. Each member is killed by PID on
/// drop. Used by placement's failover test (`tests/e2e_etcd.rs`) and skv-chaos's
/// `etcd-member` fault.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: Option<tempfile::TempDir>,
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
    guard: Option<ChildGuard>,
}

/// Whether the etcd at `client_url` (http://127.0.0.1:PORT) says it is healthy (GET
/// /health: it has a leader and can serve).
pub async fn healthy(client_url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(addr) = client_url.strip_prefix("http://") else {
        return false;
    };
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf).contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(true))
    )
}

impl EtcdCluster {
    /// Starts `n` members in a temporary directory (removed on drop) and waits until every
    /// one is healthy.
    pub async fn start_temp(n: usize) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::tempdir()?;
        let mut c = Self::start(n, dir.path()).await?;
        c._dir = Some(dir);
        Ok(c)
    }

    /// Starts `n` members whose data and logs go under `dir` and waits (up to 30 s) until
    /// every one is healthy.
    pub async fn start(n: usize, dir: &std::path::Path) -> anyhow::Result<EtcdCluster> {
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("etcd-{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                data: dir.join(format!("etcd-{i}")),
                log: dir.join(format!("etcd-{i}.log")),
                guard: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            _dir: None,
        };
        for i in 0..n {
            c.start_member(i)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in &c.members {
            while !healthy(&m.client_url).await {
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    anyhow::bail!("{} not healthy after 30 s: {tail}", m.name);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(c)
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members running now.
    pub fn up(&self) -> usize {
        self.members.iter().filter(|m| m.guard.is_some()).count()
    }

    /// Member `i`'s client URL.
    pub fn client_url(&self, i: usize) -> Option<&str> {
        self.members.get(i).map(|m| m.client_url.as_str())
    }

    /// Every client URL.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// PID of member `i`, when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.guard.as_ref().map(ChildGuard::pid)
    }

    /// `kill -9` member `i`, unless that would leave fewer than a majority running (then an
    /// error). Returns whether it was running.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<bool> {
        let majority = self.members.len() / 2 + 1;
        let up = self.up();
        let Some(m) = self.members.get_mut(i) else {
            anyhow::bail!("no etcd member {i}");
        };
        let Some(mut g) = m.guard.take() else { return Ok(false) };
        if up <= majority {
            m.guard = Some(g);
            anyhow::bail!("only {up} etcd members run: killing {} would lose the majority", m.name);
        }
        g.kill();
        Ok(true)
    }

    /// Starts member `i` (again) on its data directory; a no-op when it runs. A restarted
    /// member rejoins from its data directory (the initial-cluster flags are then ignored).
    pub fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        let bin = which_etcd();
        let initial = self.initial_cluster.clone();
        let Some(m) = self.members.get_mut(i) else {
            anyhow::bail!("no etcd member {i}");
        };
        if m.guard.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .arg("--listen-client-urls")
            .arg(&m.client_url)
            .arg("--advertise-client-urls")
            .arg(&m.client_url)
            .arg("--listen-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&m.peer_url)
            .arg("--initial-cluster")
            .arg(&initial)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("skv-test")
            .arg("--log-level")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(log);
        let guard =
            ChildGuard::spawn(m.name.clone(), &mut cmd).map_err(|e| anyhow::anyhow!("start {}: {e}", m.name))?;
        m.guard = Some(guard);
        Ok(())
    }
}
