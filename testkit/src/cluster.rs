//! Whole-system clusters for end-to-end tests.
//!
//! - [`Cluster`]: placement, storenodes and proxies in this test process, on real
//!   gRPC sockets (127.0.0.1, port 0). Nodes can be stopped and restarted on
//!   the same data dir.
//! - [`ProcCluster`]: the same topology as real OS processes started from the
//!   built binaries, so that a node can be `kill -9`ed.

use crate::etcd::{Etcd, EtcdCluster};
use crate::process::{ChildGuard, bin_path, free_port, wait_until};
use clap::Parser;
use skv_common::service::ServiceHandle;
use skv_proxy::auth::{Claims, Role, mint_hs256};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The HS256 secret every test cluster uses.
pub const TEST_SECRET: &[u8] = b"skv-test-secret-0123456789abcdef";

/// Mints a token for `ns` with `role` ("read", "write", "admin"), valid for an hour.
pub fn token(ns: &str, role: &str) -> String {
    token_with(ns, role, 3600, "skv", "skv", TEST_SECRET)
}

/// Mints a token with explicit lifetime (seconds from now; negative = expired),
/// issuer, audience and secret, with the proxy's own claims and minting code.
pub fn token_with(ns: &str, role: &str, ttl_secs: i64, iss: &str, aud: &str, secret: &[u8]) -> String {
    let role = match role {
        "read" => Role::Read,
        "write" => Role::Write,
        "admin" => Role::Admin,
        other => panic!("unknown role {other:?}"),
    };
    let mut claims = Claims::new("test", ns, role, Duration::ZERO);
    claims.nbf = claims.nbf.saturating_sub(5);
    claims.exp = claims.iat.saturating_add_signed(ttl_secs);
    claims.iss = iss.to_string();
    claims.aud = aud.to_string();
    mint_hs256(secret, &claims).unwrap_or_else(|e| panic!("mint token: {e}"))
}

/// Options for [`Cluster::start`].
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub storenodes: usize,
    pub proxies: usize,
    /// Use a real etcd (true) or placement's embedded store (false).
    pub etcd: bool,
    /// With 2 or more: a real etcd of this many members (`Cluster::etcd_cluster`), whatever
    /// `etcd` says; placement gets every member's URL.
    pub etcd_members: usize,
    pub placement_instances: usize,
    /// Extra command-line flags for every placement instance (scheduler thresholds).
    pub placement_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            storenodes: 3,
            proxies: 1,
            etcd: false,
            etcd_members: 0,
            placement_instances: 1,
            placement_args: Vec::new(),
        }
    }
}

/// An in-process cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub etcd: Option<Etcd>,
    /// The multi-member etcd of `ClusterOptions::etcd_members`.
    pub etcd_cluster: Option<EtcdCluster>,
    pub placements: Vec<Option<ServiceHandle>>,
    pub stores: Vec<Option<ServiceHandle>>,
    pub proxies: Vec<Option<ServiceHandle>>,
    secret_file: PathBuf,
    placement_args: Vec<String>,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Cluster {
    /// Starts placement, storenodes and proxies and waits until a write goes through.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        crate::init_test_logging();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, TEST_SECRET).unwrap_or_else(|e| panic!("write secret: {e}"));
        let etcd_cluster = if opts.etcd_members >= 2 {
            let c = EtcdCluster::start(opts.etcd_members, &dir.path().join("etcd"))
                .await
                .unwrap_or_else(|e| panic!("start a {}-member etcd: {e:#}", opts.etcd_members));
            Some(c)
        } else {
            None
        };
        let etcd = if opts.etcd && etcd_cluster.is_none() {
            Some(Etcd::start().await)
        } else {
            None
        };
        let mut c = Cluster {
            dir,
            etcd,
            etcd_cluster,
            placements: Vec::new(),
            stores: Vec::new(),
            proxies: Vec::new(),
            secret_file,
            placement_args: opts.placement_args.clone(),
        };
        for i in 0..opts.placement_instances.max(1) {
            let h = c.start_placement(i).await;
            c.placements.push(Some(h));
        }
        for i in 0..opts.storenodes {
            let h = c.start_store(i).await;
            c.stores.push(Some(h));
        }
        for i in 0..opts.proxies.max(1) {
            let h = c.start_proxy(i).await;
            c.proxies.push(Some(h));
        }
        c.wait_writable().await;
        c
    }

    async fn start_placement(&self, i: usize) -> ServiceHandle {
        let mut args = vec![
            "skv-placement".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            s(&self.dir.path().join(format!("pd-{i}"))),
            "--initial-wait-ms".into(),
            "300".into(),
            "--schedule-interval-ms".into(),
            "200".into(),
            // Admin calls need an admin token of the test secret (cluster::admin).
            "--jwt-hs256-secret-file".into(),
            s(&self.secret_file),
        ];
        if let Some(e) = &self.etcd {
            args.push("--etcd".into());
            args.push(e.client_url.clone());
        }
        if let Some(c) = &self.etcd_cluster {
            args.push("--etcd".into());
            args.push(c.client_urls().join(","));
        }
        args.extend(self.placement_args.iter().cloned());
        let cfg = skv_placement::Config::try_parse_from(args).unwrap_or_else(|e| panic!("placement config: {e}"));
        skv_placement::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("start placement: {e:#}"))
    }

    /// Comma-separated URLs of the running placement instances.
    pub fn placement_urls(&self) -> String {
        self.placements
            .iter()
            .flatten()
            .map(|h| format!("http://{}", h.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn start_store(&self, i: usize) -> ServiceHandle {
        self.start_store_on(i, "127.0.0.1:0".to_string()).await
    }

    async fn start_store_on(&self, i: usize, listen: String) -> ServiceHandle {
        let args = vec![
            "skv-storenode".to_string(),
            "--listen".into(),
            listen,
            "--placement".into(),
            self.placement_urls(),
            "--data-dir".into(),
            s(&self.dir.path().join(format!("store-{i}"))),
            "--heartbeat-interval-ms".into(),
            "300".into(),
        ];
        let cfg = skv_storenode::Config::try_parse_from(args).unwrap_or_else(|e| panic!("storenode config: {e}"));
        skv_storenode::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("start storenode: {e:#}"))
    }

    async fn start_proxy(&self, _i: usize) -> ServiceHandle {
        let args = vec![
            "skv-proxy".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--placement".into(),
            self.placement_urls(),
            "--jwt-hs256-secret-file".into(),
            s(&self.secret_file),
        ];
        let cfg = skv_proxy::Config::try_parse_from(args).unwrap_or_else(|e| panic!("proxy config: {e}"));
        skv_proxy::start(cfg)
            .await
            .unwrap_or_else(|e| panic!("start proxy: {e:#}"))
    }

    /// `http://addr` of proxy `i`.
    pub fn proxy_url(&self, i: usize) -> String {
        match self.proxies.get(i).and_then(|p| p.as_ref()) {
            Some(h) => format!("http://{}", h.addr),
            None => panic!("proxy {i} is not running"),
        }
    }

    /// URLs of every running proxy.
    pub fn proxy_urls(&self) -> Vec<String> {
        self.proxies
            .iter()
            .flatten()
            .map(|h| format!("http://{}", h.addr))
            .collect()
    }

    /// An SDK client for namespace `ns` with `role`, connected to every running proxy.
    pub async fn client(&self, ns: &str, role: &str) -> skv::Client {
        skv::Client::builder()
            .endpoints(self.proxy_urls())
            .token(token(ns, role))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect sdk: {e}"))
    }

    /// Waits until a put and a get round-trip through proxy 0 (up to 30 s).
    pub async fn wait_writable(&self) {
        let client = self.client("healthcheck", "write").await;
        wait_until("the cluster to accept writes", Duration::from_secs(30), || {
            let client = client.clone();
            async move {
                match client.put(b"ready".to_vec(), b"1".to_vec()).await {
                    Ok(_) => client.get(b"ready".to_vec()).await.ok().flatten().map(|_| ()),
                    Err(_) => None,
                }
            }
        })
        .await;
    }

    /// Stops storenode `i` (its data dir is kept).
    pub async fn stop_store(&mut self, i: usize) {
        if let Some(h) = self.stores.get_mut(i).and_then(|s| s.take()) {
            let _ = h.shutdown().await;
        }
    }

    /// Restarts storenode `i` on its old data dir (new port is fine: it re-registers).
    pub async fn restart_store(&mut self, i: usize) {
        self.stop_store(i).await;
        let h = self.start_store(i).await;
        self.stores[i] = Some(h);
    }

    /// Starts one more storenode (a new data dir); returns its index.
    pub async fn add_store(&mut self) -> usize {
        let i = self.stores.len();
        let h = self.start_store(i).await;
        self.stores.push(Some(h));
        i
    }

    /// Stops placement instance `i`.
    pub async fn stop_placement(&mut self, i: usize) {
        if let Some(h) = self.placements.get_mut(i).and_then(|s| s.take()) {
            let _ = h.shutdown().await;
        }
    }

    /// Stops proxy `i`.
    pub async fn stop_proxy(&mut self, i: usize) {
        if let Some(h) = self.proxies.get_mut(i).and_then(|s| s.take()) {
            let _ = h.shutdown().await;
        }
    }

    /// A placement admin client on the first running instance.
    pub async fn placement_client(
        &self,
    ) -> skv_proto::internal::placement_client::PlacementClient<tonic::transport::Channel> {
        let url = self
            .placements
            .iter()
            .flatten()
            .map(|h| format!("http://{}", h.addr))
            .next()
            .unwrap_or_else(|| panic!("no placement running"));
        skv_proto::internal::placement_client::PlacementClient::connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect placement: {e}"))
    }

    /// Stops everything (proxies, storenodes, placement).
    pub async fn shutdown(mut self) {
        for p in self.proxies.iter_mut() {
            if let Some(h) = p.take() {
                let _ = h.shutdown().await;
            }
        }
        for p in self.stores.iter_mut() {
            if let Some(h) = p.take() {
                let _ = h.shutdown().await;
            }
        }
        for p in self.placements.iter_mut() {
            if let Some(h) = p.take() {
                let _ = h.shutdown().await;
            }
        }
    }
}

/// A cluster of real OS processes (the built binaries), each killed by PID on drop.
pub struct ProcCluster {
    pub dir: tempfile::TempDir,
    pub etcd: Option<Etcd>,
    pub placement: Option<ChildGuard>,
    pub placement_port: u16,
    pub stores: Vec<Option<ChildGuard>>,
    pub store_ports: Vec<u16>,
    pub proxy: Option<ChildGuard>,
    pub proxy_port: u16,
    /// Extra flags and environment of every storenode (`--object-store-url` and `AWS_*`).
    pub store_args: Vec<String>,
    pub store_env: Vec<(String, String)>,
    /// Extra flags of placement (e.g. `--repair-after-secs`).
    pub placement_args: Vec<String>,
}

impl ProcCluster {
    /// Starts placement (embedded or etcd), `n` storenodes and one proxy as processes.
    pub async fn start(n: usize, use_etcd: bool) -> ProcCluster {
        Self::start_with(n, use_etcd, Vec::new(), Vec::new()).await
    }

    /// [`Self::start`] with extra storenode flags and environment variables.
    pub async fn start_with(
        n: usize,
        use_etcd: bool,
        store_args: Vec<String>,
        store_env: Vec<(String, String)>,
    ) -> ProcCluster {
        Self::start_with_placement_args(n, use_etcd, store_args, store_env, Vec::new()).await
    }

    /// [`Self::start_with`] with extra placement flags too.
    pub async fn start_with_placement_args(
        n: usize,
        use_etcd: bool,
        store_args: Vec<String>,
        store_env: Vec<(String, String)>,
        placement_args: Vec<String>,
    ) -> ProcCluster {
        crate::init_test_logging();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::fs::write(dir.path().join("secret"), TEST_SECRET).unwrap_or_else(|e| panic!("secret: {e}"));
        let etcd = if use_etcd { Some(Etcd::start().await) } else { None };
        let mut c = ProcCluster {
            dir,
            etcd,
            placement: None,
            placement_port: free_port(),
            stores: Vec::new(),
            store_ports: Vec::new(),
            proxy: None,
            proxy_port: free_port(),
            store_args,
            store_env,
            placement_args,
        };
        c.start_placement();
        for i in 0..n {
            let port = free_port();
            c.store_ports.push(port);
            c.stores.push(None);
            c.start_store(i);
        }
        c.start_proxy();
        let client = c.client("healthcheck", "write").await;
        wait_until("the process cluster to accept writes", Duration::from_secs(60), || {
            let client = client.clone();
            async move { client.put(b"ready".to_vec(), b"1".to_vec()).await.ok() }
        })
        .await;
        c
    }

    fn log(&self, name: &str) -> Stdio {
        match std::fs::File::create(self.dir.path().join(format!("{name}.log"))) {
            Ok(f) => Stdio::from(f),
            Err(_) => Stdio::null(),
        }
    }

    /// Starts (or restarts) the placement process.
    pub fn start_placement(&mut self) {
        let mut cmd = Command::new(bin_path("skv-placement"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.placement_port))
            .arg("--data-dir")
            .arg(self.dir.path().join("pd"))
            .arg("--initial-wait-ms")
            .arg("300")
            .arg("--schedule-interval-ms")
            .arg("200")
            .arg("--jwt-hs256-secret-file")
            .arg(self.dir.path().join("secret"))
            .args(&self.placement_args)
            .stdout(Stdio::null())
            .stderr(self.log("placement"));
        if let Some(e) = &self.etcd {
            cmd.arg("--etcd").arg(&e.client_url);
        }
        self.placement = Some(ChildGuard::spawn("placement", &mut cmd).unwrap_or_else(|e| panic!("{e}")));
    }

    /// `http://127.0.0.1:PORT` of placement.
    pub fn placement_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.placement_port)
    }

    /// Starts (or restarts) storenode `i` on its port and data dir.
    pub fn start_store(&mut self, i: usize) {
        let mut cmd = Command::new(bin_path("skv-storenode"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.store_ports[i]))
            .arg("--placement")
            .arg(self.placement_url())
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("store-{i}")))
            .arg("--heartbeat-interval-ms")
            .arg("300")
            .args(&self.store_args)
            .envs(self.store_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(self.log(&format!("store-{i}")));
        self.stores[i] = Some(ChildGuard::spawn(format!("store-{i}"), &mut cmd).unwrap_or_else(|e| panic!("{e}")));
    }

    /// `kill -9` storenode `i`.
    pub fn kill_store(&mut self, i: usize) {
        if let Some(mut g) = self.stores[i].take() {
            g.kill();
        }
    }

    /// Starts the proxy process.
    pub fn start_proxy(&mut self) {
        let mut cmd = Command::new(bin_path("skv-proxy"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.proxy_port))
            .arg("--placement")
            .arg(self.placement_url())
            .arg("--jwt-hs256-secret-file")
            .arg(self.dir.path().join("secret"))
            .stdout(Stdio::null())
            .stderr(self.log("proxy"));
        self.proxy = Some(ChildGuard::spawn("proxy", &mut cmd).unwrap_or_else(|e| panic!("{e}")));
    }

    /// An SDK client on the proxy.
    pub async fn client(&self, ns: &str, role: &str) -> skv::Client {
        skv::Client::builder()
            .endpoints([format!("http://127.0.0.1:{}", self.proxy_port)])
            .token(token(ns, role))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect sdk: {e}"))
    }

    /// The content of a process's log file, for failure messages.
    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// `msg` with an admin token of the test secret: what placement's admin calls need (ADR 0021).
pub fn admin<T>(msg: T) -> tonic::Request<T> {
    with_token(msg, Some(&token("admin", "admin")))
}

/// Wraps a message in a request carrying `authorization: Bearer <tok>` (or no token).
pub fn with_token<T>(msg: T, tok: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = tok {
        match tonic::metadata::MetadataValue::try_from(format!("Bearer {t}")) {
            Ok(v) => {
                r.metadata_mut().insert("authorization", v);
            }
            Err(e) => panic!("token is not valid metadata: {e}"),
        }
    }
    r
}

/// A raw `skv.v1.Kv` client on `url` with large message limits (to test the server's).
pub async fn kv_client(url: &str) -> skv_proto::v1::kv_client::KvClient<tonic::transport::Channel> {
    skv_proto::v1::kv_client::KvClient::connect(url.to_string())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Scans the whole namespace of `tok` through `kv`, returning (key, value) in stream order.
pub async fn scan_all(
    kv: &mut skv_proto::v1::kv_client::KvClient<tonic::transport::Channel>,
    tok: &str,
    start: &[u8],
    end: &[u8],
    limit: u32,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, tonic::Status> {
    let req = skv_proto::v1::ScanRequest {
        start: start.to_vec(),
        end: end.to_vec(),
        limit,
    };
    let mut stream = kv.scan(with_token(req, Some(tok))).await?.into_inner();
    let mut out = Vec::new();
    while let Some(page) = stream.message().await? {
        out.extend(page.kvs.into_iter().map(|kv| (kv.key, kv.value)));
    }
    Ok(out)
}
