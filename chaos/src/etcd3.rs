//! The chaos cluster's etcd: testkit's single member, or, for the `etcd-member` nemesis, a
//! 3-member etcd on 127.0.0.1 whose members can be killed (one at a time: the majority
//! stays) and restarted on their data directories (issue 14, ADR 0026).

use crate::cluster::ClusterError;
use skv_testkit::{ChildGuard, Etcd, free_port};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The etcd of a chaos cluster.
pub enum EtcdRun {
    /// testkit's single member.
    Single(Etcd),
    /// A 3-member cluster.
    Members(EtcdCluster),
}

impl EtcdRun {
    /// Starts one member (testkit) or, with `members` >= 3, a 3-member cluster whose data
    /// and logs go under `dir`.
    pub async fn start(members: usize, dir: &Path) -> Result<EtcdRun, ClusterError> {
        if members >= 3 {
            return Ok(EtcdRun::Members(EtcdCluster::start(3, dir).await?));
        }
        // testkit's Etcd panics when it cannot start; in a task, that is an error here.
        tokio::spawn(Etcd::start())
            .await
            .map(EtcdRun::Single)
            .map_err(|e| ClusterError::Etcd(e.to_string()))
    }

    /// Every client URL, comma-separated (placement's `--etcd`).
    pub fn client_urls(&self) -> String {
        match self {
            EtcdRun::Single(e) => e.client_url.clone(),
            EtcdRun::Members(c) => c
                .members
                .iter()
                .map(|m| m.client_url.clone())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// PID of the (first running) member.
    pub fn pid(&self) -> u32 {
        match self {
            EtcdRun::Single(e) => e.pid(),
            EtcdRun::Members(c) => c
                .members
                .iter()
                .find_map(|m| m.guard.as_ref().map(ChildGuard::pid))
                .unwrap_or(0),
        }
    }

    /// The 3-member cluster, if this is one.
    pub fn members(&mut self) -> Option<&mut EtcdCluster> {
        match self {
            EtcdRun::Single(_) => None,
            EtcdRun::Members(c) => Some(c),
        }
    }

    /// Restarts every member that is down; returns what it did.
    pub fn heal(&mut self) -> Vec<String> {
        let Some(c) = self.members() else { return Vec::new() };
        let mut done = Vec::new();
        for i in 0..c.members.len() {
            if c.members[i].guard.is_none() {
                match c.start_member(i) {
                    Ok(()) => done.push(format!("restart etcd-{i}")),
                    Err(e) => done.push(format!("restart etcd-{i} failed: {e}")),
                }
            }
        }
        done
    }
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data: PathBuf,
    log: PathBuf,
    guard: Option<ChildGuard>,
}

/// A 3-member etcd, each member killed by PID on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
}

fn etcd_bin() -> Result<PathBuf, ClusterError> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| ClusterError::Etcd("etcd not found: install Debian's etcd-server".into()))
}

/// Whether the etcd at `client_url` (http://127.0.0.1:PORT) says it is healthy (GET
/// /health: it has a leader and can serve).
pub async fn healthy(client_url: &str) -> bool {
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
    /// Starts `n` members under `dir` and waits (up to 30 s) until every one is healthy.
    pub async fn start(n: usize, dir: &Path) -> Result<EtcdCluster, ClusterError> {
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
                    return Err(ClusterError::Etcd(format!("{} not healthy after 30 s: {tail}", m.name)));
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

    /// `kill -9` member `i`, unless that would leave fewer than a majority running (then an
    /// error). Returns whether it was running.
    pub fn kill(&mut self, i: usize) -> Result<bool, ClusterError> {
        let majority = self.members.len() / 2 + 1;
        let up = self.up();
        let m = self
            .members
            .get_mut(i)
            .ok_or_else(|| ClusterError::NotReady(format!("no etcd member {i}")))?;
        let Some(mut g) = m.guard.take() else { return Ok(false) };
        if up <= majority {
            m.guard = Some(g);
            return Err(ClusterError::NotReady(format!(
                "only {up} etcd members run: killing {} would lose the majority",
                m.name
            )));
        }
        g.kill();
        Ok(true)
    }

    /// Starts member `i` (again) on its data directory; a no-op when it runs. A restarted
    /// member rejoins from its data directory (the initial-cluster flags are then ignored).
    pub fn start_member(&mut self, i: usize) -> Result<(), ClusterError> {
        let bin = etcd_bin()?;
        let initial = self.initial_cluster.clone();
        let m = self
            .members
            .get_mut(i)
            .ok_or_else(|| ClusterError::NotReady(format!("no etcd member {i}")))?;
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
            .arg("skv-chaos")
            .arg("--log-level")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(log);
        let guard = ChildGuard::spawn(m.name.clone(), &mut cmd).map_err(|source| ClusterError::Io {
            what: format!("start {}", m.name),
            source,
        })?;
        m.guard = Some(guard);
        Ok(())
    }
}
