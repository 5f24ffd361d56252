//! A cluster of real processes on 127.0.0.1 for chaos runs: one etcd, placement instances
//! (leader election on etcd), storenodes and proxies, each a built binary with its own port
//! and data directory, each killed by PID when dropped (testkit's `ChildGuard`).

use skv_proto::internal::placement_admin_client::PlacementAdminClient;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::{
    AdminDrainStoreRequest, AdminMergeRequest, AdminMoveReplicaRequest, AdminSplitRequest, AdminTransferLeaderRequest,
    GetMembersRequest, GetRangeRequest, GetStoresRequest, ListOperatorsRequest, OperatorInfo, RangeInfo,
    ScanRangesRequest, StoreInfo, StoreStatus, StoreStatusRequest,
};
use skv_testkit::cluster::{TEST_SECRET, admin, token};
use skv_testkit::{ChildGuard, free_port};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Errors of the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A binary is missing.
    #[error("{0} not found: run `cargo build --bins` first")]
    MissingBinary(PathBuf),
    /// A process could not be started or signalled.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// etcd did not start.
    #[error("etcd did not start: {0}")]
    Etcd(String),
    /// The cluster did not become ready in time.
    #[error("{0}")]
    NotReady(String),
    /// An admin call failed.
    #[error("{0}")]
    Admin(String),
    /// Network namespaces or iptables (the `partition` nemesis).
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// Result alias.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Shape of a [`ChaosCluster`].
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Placement instances (2 or more make leader loss survivable).
    pub placements: usize,
    /// Storenodes.
    pub storenodes: usize,
    /// Proxies (the SDK fails over between them).
    pub proxies: usize,
    /// Where `skv-placement`, `skv-storenode` and `skv-proxy` are.
    pub bin_dir: PathBuf,
    /// `FAILPOINTS` of every storenode (`name=action;...`, ADR 0029): needs binaries built
    /// with `--features skv-storenode/failpoints`. Empty: none.
    pub store_failpoints: String,
    /// `--tombstone-gc-interval-secs` of every storenode (ADR 0034; 0: no tombstone GC).
    pub tombstone_gc_secs: u64,
    /// Storenode data directories on skv-lazyfs mounts (the `slow-disk` nemesis; needs
    /// `skv-lazyfs` in `bin_dir` and FUSE).
    pub lazyfs_disks: bool,
    /// etcd members: 1, or 3 for the `etcd-member` nemesis (crate::etcd3).
    pub etcd_members: usize,
    /// Every process started under libfaketime with a clock file of its own, whose offset
    /// the `clock` nemesis changes (crate::clock; Debian's `faketime`).
    pub fake_clock: bool,
    /// Every storenode in a network namespace of its own behind a bridge, placement on the
    /// host's end of it (the `partition` nemesis; crate::netns, ADR 0031). Needs root,
    /// iproute2 and iptables.
    pub netns: bool,
}

/// Which kind of process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `skv-placement`.
    Placement,
    /// `skv-storenode`.
    Store,
    /// `skv-proxy`.
    Proxy,
}

/// One process slot: a fixed port and data directory, running or not.
pub struct Proc {
    /// `pd-0`, `store-1`, `proxy-0`.
    pub name: String,
    /// Its port.
    pub port: u16,
    /// Its address: 127.0.0.1, or its namespace's (storenodes) or the host's bridge address
    /// (placement) in a netns cluster.
    pub host: String,
    /// How many times its slot was given a fresh, empty data directory (the `drain`
    /// nemesis replaces a drained store by a new one): 0 for the first.
    pub generation: u32,
    guard: Option<ChildGuard>,
    paused: bool,
}

impl Proc {
    /// Whether the process is running (paused counts as running).
    pub fn is_up(&self) -> bool {
        self.guard.is_some()
    }
    /// Whether it is stopped by SIGSTOP.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

/// The running cluster.
pub struct ChaosCluster {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    etcd: crate::etcd3::EtcdRun,
    bin_dir: PathBuf,
    store_failpoints: String,
    tombstone_gc_secs: u64,
    /// Processes run under libfaketime (`clock` nemesis).
    fake_clock: bool,
    /// Placement instances.
    pub placements: Vec<Proc>,
    /// Storenodes.
    pub stores: Vec<Proc>,
    /// Proxies.
    pub proxies: Vec<Proc>,
    /// The storenodes' lazyfs disks, if any (last: dropped after every process).
    disks: Option<crate::disk::Disks>,
    /// The network namespaces of a netns cluster (dropped after every process).
    net: Option<crate::netns::Netns>,
}

/// The directory of the running executable's target profile (`target/debug`), where
/// `cargo build --bins` puts the binaries; test binaries live one level down, in `deps/`.
pub fn default_bin_dir() -> PathBuf {
    let mut dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

impl ChaosCluster {
    /// Starts etcd, placement, storenodes and proxies, and waits (up to 120 s) until a write
    /// and a read go through a proxy.
    pub async fn start(spec: &ClusterSpec) -> Result<ChaosCluster> {
        for b in ["skv-placement", "skv-storenode", "skv-proxy"] {
            let p = spec.bin_dir.join(b);
            if !p.exists() {
                return Err(ClusterError::MissingBinary(p));
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("skv-chaos-")
            .tempdir()
            .map_err(|source| ClusterError::Io {
                what: "temp dir".into(),
                source,
            })?;
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("secret"), TEST_SECRET).map_err(|source| ClusterError::Io {
            what: "write the JWT secret".into(),
            source,
        })?;
        let net = if spec.netns {
            let left = crate::netns::remove_leftovers();
            if !left.is_empty() {
                tracing::warn!(?left, "deleted what killed chaos runs left");
            }
            Some(crate::netns::Netns::create(spec.storenodes)?)
        } else {
            None
        };
        let etcd = crate::etcd3::EtcdRun::start(spec.etcd_members, &path).await?;
        let slot = |name: String, host: String| Proc {
            name,
            port: free_port(),
            host,
            generation: 0,
            guard: None,
            paused: false,
        };
        let local = || "127.0.0.1".to_string();
        let pd_host = net.as_ref().map(|n| n.host_ip()).unwrap_or_else(local);
        let mut c = ChaosCluster {
            dir: Some(dir),
            path,
            etcd,
            bin_dir: spec.bin_dir.clone(),
            store_failpoints: spec.store_failpoints.clone(),
            tombstone_gc_secs: spec.tombstone_gc_secs,
            fake_clock: spec.fake_clock,
            placements: (0..spec.placements.max(1))
                .map(|i| slot(format!("pd-{i}"), pd_host.clone()))
                .collect(),
            stores: (0..spec.storenodes)
                .map(|i| {
                    let host = net.as_ref().map(|n| n.store_ip(i)).unwrap_or_else(local);
                    slot(format!("store-{i}"), host)
                })
                .collect(),
            proxies: (0..spec.proxies.max(1))
                .map(|i| slot(format!("proxy-{i}"), local()))
                .collect(),
            disks: None,
            net,
        };
        if spec.lazyfs_disks {
            c.disks = Some(crate::disk::Disks::start(&c.bin_dir, c.stores.len(), &c.path)?);
        }
        for i in 0..c.placements.len() {
            c.start_proc(Role::Placement, i)?;
        }
        for i in 0..c.stores.len() {
            c.start_proc(Role::Store, i)?;
        }
        if !c.store_failpoints.is_empty() {
            // A binary built without the feature refuses FAILPOINTS and exits at once.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            for p in &mut c.stores {
                let exited = p
                    .guard
                    .as_mut()
                    .and_then(|g| g.child_mut())
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    p.guard = None;
                    let log = std::fs::read_to_string(c.path.join(format!("{}.log", p.name))).unwrap_or_default();
                    let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                    return Err(ClusterError::NotReady(format!(
                        "{} exited ({status}) with FAILPOINTS={:?}: {tail} (build the binaries with \
                         `cargo build --bins --features skv-storenode/failpoints`)",
                        p.name, c.store_failpoints
                    )));
                }
            }
        }
        for i in 0..c.proxies.len() {
            c.start_proc(Role::Proxy, i)?;
        }
        c.wait_writable(Duration::from_secs(120)).await?;
        Ok(c)
    }

    /// The directory with every process's data and log (`<name>.log`).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Tombstones the storenodes removed (ADR 0034), summed from the `removed=` field of
    /// their "tombstones collected" log lines (every store's log, every generation; each
    /// leader logs the GCs it proposed).
    pub fn tombstones_collected(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("store-") && name.ends_with(".log")) {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            n += text
                .lines()
                .filter(|l| l.contains("tombstones collected"))
                .map(strip_ansi)
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("removed=").and_then(|v| v.parse::<u64>().ok()))
                })
                .sum::<u64>();
        }
        n
    }

    /// The clock file of process `i` of `role` when the processes run under libfaketime
    /// (`clock` nemesis), and its PID when it runs.
    pub fn clock_of(&self, role: Role, i: usize) -> Option<(PathBuf, Option<u32>)> {
        if !self.fake_clock {
            return None;
        }
        let p = self.procs(role).get(i)?;
        let file = self.path.join(format!("{}.clock", p.name));
        Some((file, p.guard.as_ref().map(ChildGuard::pid)))
    }

    /// Keeps the directory after the cluster is dropped (for a failing run's logs).
    pub fn keep_dir(&mut self) -> PathBuf {
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
        self.path.clone()
    }

    /// PID of etcd.
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.pid()
    }

    fn procs(&self, role: Role) -> &Vec<Proc> {
        match role {
            Role::Placement => &self.placements,
            Role::Store => &self.stores,
            Role::Proxy => &self.proxies,
        }
    }

    fn procs_mut(&mut self, role: Role) -> &mut Vec<Proc> {
        match role {
            Role::Placement => &mut self.placements,
            Role::Store => &mut self.stores,
            Role::Proxy => &mut self.proxies,
        }
    }

    /// The process `i` of `role`.
    pub fn proc(&self, role: Role, i: usize) -> Option<&Proc> {
        self.procs(role).get(i)
    }

    /// Comma-separated placement URLs.
    pub fn placement_urls(&self) -> String {
        self.placements.iter().map(Proc::url).collect::<Vec<_>>().join(",")
    }

    /// The proxies' URLs.
    pub fn proxy_urls(&self) -> Vec<String> {
        self.proxies.iter().map(Proc::url).collect()
    }

    /// Starts process `i` of `role` (again) on its port and data directory. A no-op when it
    /// runs.
    pub fn start_proc(&mut self, role: Role, i: usize) -> Result<()> {
        let Some(p) = self.procs(role).get(i) else {
            return Err(ClusterError::NotReady(format!("no {role:?} {i}")));
        };
        if p.is_up() {
            return Ok(());
        }
        let (name, port, generation) = (p.name.clone(), p.port, p.generation);
        let listen = format!("{}:{port}", p.host);
        let secret = self.path.join("secret");
        let mut cmd = match role {
            Role::Placement => {
                let mut cmd = Command::new(self.bin_dir.join("skv-placement"));
                cmd.arg("--listen")
                    .arg(&listen)
                    .arg("--name")
                    .arg(&name)
                    .arg("--data-dir")
                    .arg(self.path.join(&name))
                    .arg("--etcd")
                    .arg(self.etcd.client_urls())
                    .arg("--initial-wait-ms")
                    .arg("300")
                    .arg("--schedule-interval-ms")
                    .arg("300")
                    .arg("--jwt-hs256-secret-file")
                    .arg(&secret);
                cmd
            }
            Role::Store => {
                let bin = self.bin_dir.join("skv-storenode");
                let mut cmd = match &self.net {
                    // `ip netns exec` execs the binary: the PID stays the storenode's.
                    Some(net) => {
                        let mut c = Command::new("ip");
                        c.arg("netns").arg("exec").arg(net.store_ns(i)).arg(&bin);
                        c
                    }
                    None => Command::new(&bin),
                };
                let data_dir = match self.disks.as_ref().and_then(|d| d.data_dir(i)) {
                    Some(mnt) => mnt.to_path_buf(),
                    None => self.path.join(&name),
                };
                // A replaced store (drain nemesis) starts empty: a new store id.
                let data_dir = match generation {
                    0 => data_dir,
                    g => data_dir.join(format!("gen-{g}")),
                };
                cmd.arg("--listen")
                    .arg(&listen)
                    .arg("--placement")
                    .arg(self.placement_urls())
                    .arg("--data-dir")
                    .arg(data_dir)
                    .arg("--heartbeat-interval-ms")
                    .arg("300")
                    // Deleted keys' tombstones are collected every few seconds (ADR 0034), so
                    // runs also check GC against kills, partitions, splits and merges.
                    .arg("--tombstone-gc-interval-secs")
                    .arg(self.tombstone_gc_secs.to_string());
                if !self.store_failpoints.is_empty() {
                    cmd.env("FAILPOINTS", &self.store_failpoints);
                }
                cmd
            }
            Role::Proxy => {
                let mut cmd = Command::new(self.bin_dir.join("skv-proxy"));
                cmd.arg("--listen")
                    .arg(&listen)
                    .arg("--placement")
                    .arg(self.placement_urls())
                    .arg("--jwt-hs256-secret-file")
                    .arg(&secret);
                cmd
            }
        };
        if self.fake_clock {
            crate::clock::prepare(&mut cmd, &self.path.join(format!("{name}.clock")))?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path.join(format!("{name}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        cmd.stdout(Stdio::null()).stderr(log);
        let guard = ChildGuard::spawn(name.clone(), &mut cmd).map_err(|source| ClusterError::Io {
            what: format!("start {name}"),
            source,
        })?;
        if let Some(p) = self.procs_mut(role).get_mut(i) {
            p.guard = Some(guard);
            p.paused = false;
        }
        Ok(())
    }

    /// `kill -9` process `i` of `role` (a paused one too). Returns whether it was running.
    pub fn kill(&mut self, role: Role, i: usize) -> bool {
        match self.procs_mut(role).get_mut(i) {
            Some(p) => {
                let was = p.guard.is_some();
                if let Some(mut g) = p.guard.take() {
                    g.kill();
                }
                p.paused = false;
                was
            }
            None => false,
        }
    }

    /// SIGSTOP (`stop` true) or SIGCONT process `i` of `role`.
    pub fn pause(&mut self, role: Role, i: usize, stop: bool) -> Result<()> {
        let Some(p) = self.procs_mut(role).get_mut(i) else {
            return Err(ClusterError::NotReady(format!("no {role:?} {i}")));
        };
        let Some(g) = p.guard.as_ref() else {
            return Err(ClusterError::NotReady(format!("{} is not running", p.name)));
        };
        g.signal(if stop { "STOP" } else { "CONT" })
            .map_err(|source| ClusterError::Io {
                what: format!("signal {}", p.name),
                source,
            })?;
        p.paused = stop;
        Ok(())
    }

    /// The etcd (its members, for the `etcd-member` nemesis).
    pub fn etcd_mut(&mut self) -> &mut crate::etcd3::EtcdRun {
        &mut self.etcd
    }

    /// The storenodes' lazyfs disks (runs with `slow-disk`).
    pub fn disks(&self) -> Option<&crate::disk::Disks> {
        self.disks.as_ref()
    }

    /// Resumes every paused process and starts every stopped one. Returns what it did.
    pub fn heal(&mut self) -> Vec<String> {
        let mut done = self.disks.as_ref().map(|d| d.heal()).unwrap_or_default();
        done.extend(self.etcd.heal());
        if self.fake_clock {
            done.extend(crate::clock::reset_all(&self.path));
        }
        if let Some(net) = &self.net {
            match net.heal() {
                Ok(0) => {}
                Ok(n) => done.push(format!("removed {n} iptables DROP rules of a partition")),
                Err(e) => done.push(format!("partition heal failed: {e}")),
            }
        }
        for role in [Role::Placement, Role::Store, Role::Proxy] {
            for i in 0..self.procs(role).len() {
                let (paused, up, name) = {
                    let p = &self.procs(role)[i];
                    (p.paused, p.is_up(), p.name.clone())
                };
                if paused && self.pause(role, i, false).is_ok() {
                    done.push(format!("resume {name}"));
                }
                if !up {
                    match self.start_proc(role, i) {
                        Ok(()) => done.push(format!("restart {name}")),
                        Err(e) => done.push(format!("restart {name} failed: {e}")),
                    }
                }
            }
        }
        done
    }

    /// An SDK client for namespace `ns` (role write) over every proxy.
    pub async fn client(&self, ns: &str, timeout: Duration, attempt_timeout: Duration) -> Result<skv::Client> {
        skv::Client::builder()
            .endpoints(self.proxy_urls())
            .token(token(ns, "write"))
            .timeout(timeout)
            .attempt_timeout(attempt_timeout)
            .connect()
            .await
            .map_err(|e| ClusterError::NotReady(format!("sdk: {e}")))
    }

    /// Waits until a put and a get round-trip through the proxies.
    pub async fn wait_writable(&self, within: Duration) -> Result<()> {
        let client = self
            .client("healthcheck", Duration::from_secs(5), Duration::from_secs(2))
            .await?;
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            match client.put("ready", "1").await {
                Ok(_) => match client.get("ready").await {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) => last = "read back nothing".into(),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(ClusterError::NotReady(format!(
            "the cluster did not accept writes within {within:?} (last error: {last}); logs in {}",
            self.path.display()
        )))
    }

    /// A channel to the first running, unpaused placement instance that accepts one.
    async fn pd_channel(&self) -> Result<tonic::transport::Channel> {
        let mut last = String::from("no placement instance is running");
        for p in self.placements.iter().filter(|p| p.is_up() && !p.is_paused()) {
            let ep = match tonic::transport::Endpoint::from_shared(p.url()) {
                Ok(ep) => ep
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(10)),
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match ep.connect().await {
                Ok(ch) => return Ok(ch),
                Err(e) => last = format!("{}: {e}", p.name),
            }
        }
        Err(ClusterError::Admin(last))
    }

    async fn pd(&self) -> Result<PlacementClient<tonic::transport::Channel>> {
        Ok(PlacementClient::new(self.pd_channel().await?))
    }

    /// Index of the placement leader, as the instances report it.
    pub async fn placement_leader(&self) -> Result<Option<usize>> {
        let mut pd = self.pd().await?;
        let r = pd
            .get_members(admin(GetMembersRequest {}))
            .await
            .map_err(|e| ClusterError::Admin(format!("GetMembers: {}", e.message())))?
            .into_inner();
        let Some(leader) = r.leader else { return Ok(None) };
        Ok(self
            .placements
            .iter()
            .position(|p| p.name == leader.name || leader.address.ends_with(&format!(":{}", p.port))))
    }

    /// The range holding internal key `key`, and the stores.
    pub async fn range_of(&self, key: &[u8]) -> Result<(RangeInfo, Vec<StoreInfo>)> {
        let mut pd = self.pd().await?;
        let r = pd
            .get_range(admin(GetRangeRequest { key: key.to_vec() }))
            .await
            .map_err(|e| ClusterError::Admin(format!("GetRange: {}", e.message())))?
            .into_inner();
        let range = r
            .range
            .ok_or_else(|| ClusterError::Admin("GetRange: no range".into()))?;
        let stores = pd
            .get_stores(admin(GetStoresRequest {}))
            .await
            .map_err(|e| ClusterError::Admin(format!("GetStores: {}", e.message())))?
            .into_inner()
            .stores;
        Ok((range, stores))
    }

    /// Every range.
    pub async fn ranges(&self) -> Result<Vec<RangeInfo>> {
        let mut pd = self.pd().await?;
        Ok(pd
            .scan_ranges(admin(ScanRangesRequest::default()))
            .await
            .map_err(|e| ClusterError::Admin(format!("ScanRanges: {}", e.message())))?
            .into_inner()
            .ranges)
    }

    /// Splits range `range_id` at internal key `key`.
    pub async fn split(&self, range_id: u64, key: &[u8]) -> Result<String> {
        let mut pd = self.pd().await?;
        let r = pd
            .split_range(admin(AdminSplitRequest {
                range_id,
                split_key: key.to_vec(),
            }))
            .await
            .map_err(|e| ClusterError::Admin(format!("split r{range_id}: {}", e.message())))?
            .into_inner();
        Ok(format!(
            "r{range_id} -> r{} + r{}",
            r.left.map(|d| d.range_id).unwrap_or(0),
            r.right.map(|d| d.range_id).unwrap_or(0)
        ))
    }

    /// Moves the leadership of `range_id` to store `to`.
    pub async fn transfer_leader(&self, range_id: u64, to: u64) -> Result<()> {
        let mut pd = self.pd().await?;
        pd.transfer_leader(admin(AdminTransferLeaderRequest {
            range_id,
            to_store_id: to,
        }))
        .await
        .map_err(|e| ClusterError::Admin(format!("transfer r{range_id} to s{to}: {}", e.message())))?;
        Ok(())
    }

    /// Merges two adjacent ranges.
    pub async fn merge(&self, left: u64, right: u64) -> Result<()> {
        let mut pd = self.pd().await?;
        pd.merge_ranges(admin(AdminMergeRequest {
            left_range_id: left,
            right_range_id: right,
        }))
        .await
        .map_err(|e| ClusterError::Admin(format!("merge r{left} + r{right}: {}", e.message())))?;
        Ok(())
    }

    /// The network namespaces (a netns cluster only).
    pub fn netns(&self) -> Option<&crate::netns::Netns> {
        self.net.as_ref()
    }

    /// Starts a move operator: range `range_id`'s replica on store `from` to store `to`.
    pub async fn move_replica(&self, range_id: u64, from: u64, to: u64) -> Result<()> {
        let mut pd = self.pd().await?;
        pd.move_replica(admin(AdminMoveReplicaRequest {
            range_id,
            from_store_id: from,
            to_store_id: to,
        }))
        .await
        .map_err(|e| ClusterError::Admin(format!("move r{range_id} s{from} -> s{to}: {}", e.message())))?;
        Ok(())
    }

    /// Marks store `store_id` DRAINING.
    pub async fn drain_store(&self, store_id: u64) -> Result<()> {
        let mut pd = self.pd().await?;
        pd.drain_store(admin(AdminDrainStoreRequest { store_id }))
            .await
            .map_err(|e| ClusterError::Admin(format!("drain s{store_id}: {}", e.message())))?;
        Ok(())
    }

    /// Every store as placement's leader sees it (replicas, leaders, drained).
    pub async fn store_status(&self) -> Result<Vec<StoreStatus>> {
        let mut pd = self.pd_admin().await?;
        pd.store_status(admin(StoreStatusRequest {}))
            .await
            .map(|r| r.into_inner().stores)
            .map_err(|e| ClusterError::Admin(format!("StoreStatus: {}", e.message())))
    }

    /// The operators placement's leader runs now.
    pub async fn operators(&self) -> Result<Vec<OperatorInfo>> {
        let mut pd = self.pd_admin().await?;
        pd.list_operators(admin(ListOperatorsRequest {}))
            .await
            .map(|r| r.into_inner().operators)
            .map_err(|e| ClusterError::Admin(format!("ListOperators: {}", e.message())))
    }

    async fn pd_admin(&self) -> Result<PlacementAdminClient<tonic::transport::Channel>> {
        Ok(PlacementAdminClient::new(self.pd_channel().await?))
    }

    /// Every store placement knows.
    pub async fn stores_info(&self) -> Result<Vec<StoreInfo>> {
        let mut pd = self.pd().await?;
        Ok(pd
            .get_stores(admin(GetStoresRequest {}))
            .await
            .map_err(|e| ClusterError::Admin(format!("GetStores: {}", e.message())))?
            .into_inner()
            .stores)
    }

    /// Stops storenode `i` and starts a fresh one in its slot (same address, a new empty
    /// data directory, so a new store id): what an operator does after a drain.
    pub fn replace_store(&mut self, i: usize) -> Result<()> {
        self.kill(Role::Store, i);
        match self.stores.get_mut(i) {
            Some(p) => p.generation += 1,
            None => return Err(ClusterError::NotReady(format!("no storenode {i}"))),
        }
        self.start_proc(Role::Store, i)
    }

    /// Index (in `stores`) of the storenode with store id `id`, by its address.
    pub fn store_index(&self, stores: &[StoreInfo], id: u64) -> Option<usize> {
        let addr = &stores.iter().find(|s| s.store_id == id)?.address;
        let port: u16 = addr.rsplit(':').next()?.parse().ok()?;
        self.stores.iter().position(|p| p.port == port)
    }
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`, as the storenodes' text logs
/// carry them).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ansi_colours_are_stripped_from_log_lines() {
        let l = "\u{1b}[2m:\u{1b}[0m tombstones collected \u{1b}[3mremoved\u{1b}[0m\u{1b}[2m=\u{1b}[0m12 x";
        assert_eq!(super::strip_ansi(l), ": tombstones collected removed=12 x");
    }
}
