//! The chaos cluster's etcd: testkit's single member, or, for the `etcd-member` nemesis, a
//! 3-member etcd on 127.0.0.1 whose members can be killed (one at a time: the majority
//! stays) and restarted on their data directories (issue 14, ADR 0026).

use crate::cluster::ClusterError;
use skv_testkit::Etcd;
use std::path::Path;

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
            EtcdRun::Members(c) => c.0.client_urls().join(","),
        }
    }

    /// PID of the (first running) member.
    pub fn pid(&self) -> u32 {
        match self {
            EtcdRun::Single(e) => e.pid(),
            EtcdRun::Members(c) => (0..c.len()).find_map(|i| c.0.pid(i)).unwrap_or(0),
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
        for i in 0..c.len() {
            if c.0.pid(i).is_none() {
                match c.start_member(i) {
                    Ok(()) => done.push(format!("restart etcd-{i}")),
                    Err(e) => done.push(format!("restart etcd-{i} failed: {e}")),
                }
            }
        }
        done
    }
}

/// A 3-member etcd (testkit's [`skv_testkit::EtcdCluster`]), with the chaos cluster's errors.
pub struct EtcdCluster(skv_testkit::EtcdCluster);

fn etcd_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Etcd(format!("{e:#}"))
}

/// Whether the etcd at `client_url` (http://127.0.0.1:PORT) says it is healthy.
pub async fn healthy(client_url: &str) -> bool {
    skv_testkit::etcd::healthy(client_url).await
}

impl EtcdCluster {
    /// Starts `n` members under `dir` and waits (up to 30 s) until every one is healthy.
    pub async fn start(n: usize, dir: &Path) -> Result<EtcdCluster, ClusterError> {
        skv_testkit::EtcdCluster::start(n, dir)
            .await
            .map(EtcdCluster)
            .map_err(etcd_err)
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Members running now.
    pub fn up(&self) -> usize {
        self.0.up()
    }

    /// Member `i`'s client URL.
    pub fn client_url(&self, i: usize) -> Option<&str> {
        self.0.client_url(i)
    }

    /// `kill -9` member `i`, unless that would leave fewer than a majority running (then an
    /// error). Returns whether it was running.
    pub fn kill(&mut self, i: usize) -> Result<bool, ClusterError> {
        self.0.kill(i).map_err(|e| ClusterError::NotReady(format!("{e:#}")))
    }

    /// Starts member `i` (again) on its data directory; a no-op when it runs.
    pub fn start_member(&mut self, i: usize) -> Result<(), ClusterError> {
        self.0.start_member(i).map_err(etcd_err)
    }
}
