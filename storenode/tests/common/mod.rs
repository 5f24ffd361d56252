//! In-process storenode cluster for tests: real gRPC on 127.0.0.1, a RaftFilter to
//! partition nodes, and a tiny router that follows routing errors.
#![allow(dead_code)]

use parking_lot::Mutex;
use skv_common::service::ServiceHandle;
use skv_common::{RangeId, StoreId};
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::*;
use skv_storenode::{Config, FilterAction, RaftFilter, StartOptions};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Drops messages between chosen store pairs (directional).
#[derive(Default)]
pub struct Partition {
    blocked: Mutex<HashSet<(u64, u64)>>,
}

impl Partition {
    /// Cuts `id` off from every other store, both directions.
    pub fn isolate(&self, id: u64, n: u64) {
        let mut b = self.blocked.lock();
        for o in 1..=n {
            if o != id {
                b.insert((id, o));
                b.insert((o, id));
            }
        }
    }
    pub fn heal(&self) {
        self.blocked.lock().clear();
    }
}

impl RaftFilter for Partition {
    fn check(&self, from: StoreId, to: StoreId, _range: RangeId) -> FilterAction {
        if self.blocked.lock().contains(&(from.0, to.0)) {
            FilterAction::Drop
        } else {
            FilterAction::Pass
        }
    }
}

pub struct Cluster {
    pub n: u64,
    pub dirs: Vec<tempfile::TempDir>,
    pub handles: Vec<Option<ServiceHandle>>,
    pub addrs: Vec<SocketAddr>,
    pub filter: Arc<Partition>,
    pub snapshot_logs: u64,
    pub max_value_len: usize,
    /// Last known (leader, descriptor) per range, refreshed on routing errors.
    routes: Mutex<Vec<(u64, RangeDescriptor)>>,
    /// Placement URL the nodes heartbeat to (a fake in tests), every 100 ms.
    pub placement: Option<String>,
    pub opts: ClusterOpts,
}

/// Node options of a test cluster beyond the defaults of `Config::for_test`.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    /// `--raft-hibernate-after-ms`; None: `--raft-hibernate=false`.
    pub hibernate_after_ms: Option<u64>,
    /// Serve /metrics on a loopback port (`ServiceHandle::metrics_addr`).
    pub metrics: bool,
    /// `--tombstone-gc-interval-secs` (None: the default).
    pub tombstone_gc_interval_secs: Option<u64>,
}

/// Hibernation off, as the storenode's default (ADR 0018); the hibernation tests turn it on.
impl Default for ClusterOpts {
    fn default() -> Self {
        Self {
            hibernate_after_ms: None,
            metrics: false,
            tombstone_gc_interval_secs: None,
        }
    }
}

pub fn init_logs() {
    skv_common::telemetry::init_logging(skv_common::telemetry::LogFormat::Text);
}

impl Cluster {
    pub async fn start(n: u64, snapshot_logs: u64) -> Self {
        Self::start_with_placement(n, snapshot_logs, None).await
    }

    /// [`Self::start`], with the nodes heartbeating to `placement` (a fake) when given.
    pub async fn start_with_placement(n: u64, snapshot_logs: u64, placement: Option<String>) -> Self {
        Self::start_full(n, snapshot_logs, placement, ClusterOpts::default()).await
    }

    /// [`Self::start`] with node options.
    pub async fn start_opts(n: u64, snapshot_logs: u64, opts: ClusterOpts) -> Self {
        Self::start_full(n, snapshot_logs, None, opts).await
    }

    /// [`Self::start`] with a placement URL (see [`Self::start_with_placement`]) and node options.
    pub async fn start_full(n: u64, snapshot_logs: u64, placement: Option<String>, opts: ClusterOpts) -> Self {
        init_logs();
        let mut c = Cluster {
            n,
            dirs: Vec::new(),
            handles: Vec::new(),
            addrs: Vec::new(),
            filter: Arc::new(Partition::default()),
            snapshot_logs,
            max_value_len: 64 * 1024,
            routes: Mutex::new(Vec::new()),
            placement,
            opts,
        };
        for _ in 0..n {
            c.dirs.push(tempfile::tempdir().expect("tempdir"));
            c.handles.push(None);
            c.addrs.push("127.0.0.1:0".parse().expect("addr"));
        }
        for id in 1..=n {
            c.start_node(id).await;
        }
        c
    }

    fn config(&self, id: u64) -> Config {
        let i = (id - 1) as usize;
        let mut cfg = Config::for_test(self.dirs[i].path().to_path_buf(), id);
        cfg.listen = self.addrs[i];
        cfg.raft_snapshot_logs = self.snapshot_logs;
        cfg.max_value_len = self.max_value_len;
        cfg.raft_hibernate = self.opts.hibernate_after_ms.is_some();
        if let Some(ms) = self.opts.hibernate_after_ms {
            cfg.raft_hibernate_after_ms = ms;
        }
        if let Some(s) = self.opts.tombstone_gc_interval_secs {
            cfg.tombstone_gc_interval_secs = s;
        }
        if self.opts.metrics {
            cfg.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
        }
        if let Some(p) = &self.placement {
            cfg.placement = vec![p.clone()];
            cfg.heartbeat_interval_ms = 100;
        }
        cfg
    }

    pub async fn start_node(&mut self, id: u64) {
        let i = (id - 1) as usize;
        let opts = StartOptions {
            raft_filter: Some(self.filter.clone()),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let h = loop {
            match skv_storenode::start_with(self.config(id), opts.clone()).await {
                Ok(h) => break h,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("start s{id} failed, retrying: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("start s{id}: {e:#}"),
            }
        };
        self.addrs[i] = h.addr;
        self.handles[i] = Some(h);
    }

    pub async fn stop_node(&mut self, id: u64) {
        self.invalidate();
        if let Some(h) = self.handles[(id - 1) as usize].take() {
            h.shutdown().await.expect("shutdown");
        }
    }

    pub async fn restart_node(&mut self, id: u64) {
        self.stop_node(id).await;
        self.start_node(id).await;
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.handles[(id - 1) as usize].is_some()
    }

    pub fn stores(&self) -> Vec<StoreInfo> {
        (1..=self.n)
            .map(|id| StoreInfo {
                store_id: id,
                address: self.addrs[(id - 1) as usize].to_string(),
                ..Default::default()
            })
            .collect()
    }

    pub async fn client(&self, id: u64) -> StoreClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addrs[(id - 1) as usize]))
            .expect("uri")
            .connect_lazy();
        StoreClient::new(ch)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20)
    }

    /// Creates range 1 = ["", "") on every node with voters 1..=n (bootstrap on node 1).
    pub async fn bootstrap(&self) {
        let desc = whole_range(1..=self.n);
        for id in (1..=self.n).rev() {
            let mut c = self.client(id).await;
            c.create_replica(CreateReplicaRequest {
                descriptor: Some(desc.clone()),
                bootstrap: id == 1,
                stores: self.stores(),
            })
            .await
            .expect("create replica");
        }
    }

    /// Replicas as seen by every live node.
    pub async fn list(&self) -> Vec<(u64, ReplicaStatus)> {
        let mut out = Vec::new();
        for id in 1..=self.n {
            if !self.is_up(id) {
                continue;
            }
            let mut c = self.client(id).await;
            let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), c.list_replicas(ListReplicasRequest {})).await
            else {
                continue;
            };
            for rep in r.into_inner().replicas {
                out.push((id, rep));
            }
        }
        out
    }

    /// The node that leads `range` (and says so itself), with its descriptor.
    pub async fn leader_of(&self, range: u64, timeout: Duration) -> (u64, RangeDescriptor) {
        let deadline = Instant::now() + timeout;
        loop {
            for (id, r) in self.list().await {
                let d = r.descriptor.clone().unwrap_or_default();
                if d.range_id == range && r.leader_store_id == id {
                    return (id, d);
                }
            }
            assert!(Instant::now() < deadline, "no leader for r{range} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Forgets cached routes (after a routing error).
    pub fn invalidate(&self) {
        self.routes.lock().clear();
    }

    /// The leader of the range holding `key`: from the cache, else by asking the nodes.
    pub async fn route(&self, key: &[u8], timeout: Duration) -> (u64, RangeDescriptor) {
        if let Some(r) = self
            .routes
            .lock()
            .iter()
            .find(|(_, d)| skv_common::keys::desc_contains(d, key))
        {
            return r.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut found = None;
            let mut routes = Vec::new();
            for (id, r) in self.list().await {
                let d = r.descriptor.clone().unwrap_or_default();
                if r.leader_store_id == id {
                    if skv_common::keys::desc_contains(&d, key) {
                        found = Some((id, d.clone()));
                    }
                    routes.push((id, d));
                }
            }
            if let Some(f) = found {
                *self.routes.lock() = routes;
                return f;
            }
            assert!(Instant::now() < deadline, "no leader for key {key:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Splits the range holding `at` there (retrying routing errors for up to 20 s); the
    /// right half gets `new_id`. Returns (left, right).
    pub async fn split(&self, at: &[u8], new_id: u64) -> (RangeDescriptor, RangeDescriptor) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (leader, d) = self.route(at, Duration::from_secs(10)).await;
            let r = self
                .client(leader)
                .await
                .split_range(SplitRangeRequest {
                    header: Some(header(&d)),
                    split_key: at.to_vec(),
                    new_range_id: new_id,
                })
                .await;
            self.invalidate();
            if let Ok(r) = r {
                let r = r.into_inner();
                if r.routing_error.is_none()
                    && let (Some(l), Some(rt)) = (r.left, r.right)
                {
                    return (l, rt);
                }
            }
            assert!(Instant::now() < deadline, "split did not succeed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Puts with retries on routing errors. Returns the new version.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (id, d) = self.route(key, Duration::from_secs(20)).await;
            let mut c = self.client(id).await;
            let req = StoreWriteRequest {
                header: Some(header(&d)),
                key: key.to_vec(),
                op: Some(store_write_request::Op::Put(value.to_vec())),
                condition: None,
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.write(req)).await {
                let r = r.into_inner();
                if r.routing_error.is_none() {
                    assert!(r.succeeded);
                    return r.version;
                }
            }
            self.invalidate();
            assert!(Instant::now() < deadline, "put {key:?} did not succeed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Linearizable get with retries.
    pub async fn get(&self, key: &[u8]) -> Option<(Vec<u8>, u64)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (id, d) = self.route(key, Duration::from_secs(20)).await;
            let mut c = self.client(id).await;
            let req = StoreGetRequest {
                header: Some(header(&d)),
                key: key.to_vec(),
                stale_ok: false,
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.get(req)).await {
                let r = r.into_inner();
                if r.routing_error.is_none() {
                    return r.found.then_some((r.value, r.version));
                }
            }
            self.invalidate();
            assert!(Instant::now() < deadline, "get {key:?} did not succeed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Local (stale) read on a given node and range.
    pub async fn stale_get(&self, node: u64, d: &RangeDescriptor, key: &[u8]) -> Option<StoreGetResponse> {
        let mut c = self.client(node).await;
        let req = StoreGetRequest {
            header: Some(header(d)),
            key: key.to_vec(),
            stale_ok: true,
        };
        match tokio::time::timeout(Duration::from_secs(2), c.get(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            _ => None,
        }
    }

    /// A scan on `node`, collected.
    pub async fn scan(
        &self,
        node: u64,
        d: &RangeDescriptor,
        start: &[u8],
        end: &[u8],
        limit: u32,
    ) -> Result<ScanResult, tonic::Status> {
        let mut c = self.client(node).await;
        scan_all(
            &mut c,
            StoreScanRequest {
                header: Some(header(d)),
                start: start.to_vec(),
                end: end.to_vec(),
                limit,
            },
        )
        .await
    }

    /// A batch write with retries on routing errors (routed by the first key). Returns one
    /// result per op.
    pub async fn batch_write(&self, ops: Vec<StoreWriteOp>) -> Vec<StoreWriteResult> {
        let first = ops.first().map(|o| o.key.clone()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (id, d) = self.route(&first, Duration::from_secs(20)).await;
            let mut c = self.client(id).await;
            let req = StoreBatchWriteRequest {
                header: Some(header(&d)),
                ops: ops.clone(),
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.batch_write(req)).await {
                let r = r.into_inner();
                if r.routing_error.is_none() {
                    assert_eq!(r.results.len(), ops.len());
                    return r.results;
                }
            }
            self.invalidate();
            assert!(Instant::now() < deadline, "batch write did not succeed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A linearizable batch get with retries (routed by the first key).
    pub async fn batch_get(&self, keys: &[&[u8]]) -> Vec<StoreGetResult> {
        let first = keys.first().map(|k| k.to_vec()).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (id, d) = self.route(&first, Duration::from_secs(20)).await;
            let mut c = self.client(id).await;
            let req = StoreBatchGetRequest {
                header: Some(header(&d)),
                keys: keys.iter().map(|k| k.to_vec()).collect(),
                stale_ok: false,
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.batch_get(req)).await {
                let r = r.into_inner();
                if r.routing_error.is_none() {
                    assert_eq!(r.results.len(), keys.len());
                    return r.results;
                }
            }
            self.invalidate();
            assert!(Instant::now() < deadline, "batch get did not succeed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for id in 1..=self.n {
            self.stop_node(id).await;
        }
    }
}

/// A streaming scan's answer, collected: the routing error (then the only message), or
/// every pair in order.
#[derive(Debug, Default)]
pub struct ScanResult {
    pub routing_error: Option<RoutingError>,
    pub kvs: Vec<StoreKv>,
    pub messages: usize,
}

impl ScanResult {
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.kvs.iter().map(|kv| kv.key.clone()).collect()
    }
    pub fn kind(&self) -> Option<&routing_error::Kind> {
        self.routing_error.as_ref().and_then(|e| e.kind.as_ref())
    }
}

/// Sends a scan and reads its whole stream. A routing error must be the first and only
/// message; a stream that ends with an error status returns that status.
pub async fn scan_all(c: &mut StoreClient<Channel>, req: StoreScanRequest) -> Result<ScanResult, tonic::Status> {
    let mut stream = c.scan(req).await?.into_inner();
    let mut out = ScanResult::default();
    while let Some(m) = stream.message().await? {
        out.messages += 1;
        if let Some(e) = m.routing_error {
            assert_eq!(out.messages, 1, "a routing error after data");
            assert!(m.kvs.is_empty(), "a routing error with data");
            out.routing_error = Some(e);
            assert!(stream.message().await?.is_none(), "a message after a routing error");
            return Ok(out);
        }
        assert!(!m.kvs.is_empty(), "an empty scan message");
        out.kvs.extend(m.kvs);
    }
    Ok(out)
}

/// Both ranges led by one store (transfers the source's leadership if needed); returns
/// (leader, target descriptor, source descriptor).
pub async fn colocate(c: &Cluster, target: u64, source: u64) -> (u64, RangeDescriptor, RangeDescriptor) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (lt, dt) = c.leader_of(target, Duration::from_secs(10)).await;
        let (ls, ds) = c.leader_of(source, Duration::from_secs(10)).await;
        if lt == ls {
            return (lt, dt, ds);
        }
        let _ = c
            .client(ls)
            .await
            .transfer_leader(TransferLeaderRequest {
                header: Some(header(&ds)),
                to_store_id: lt,
            })
            .await;
        assert!(std::time::Instant::now() < deadline, "leaders not colocated");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn merge(
    c: &Cluster,
    leader: u64,
    target: &RangeDescriptor,
    source: &RangeDescriptor,
) -> Result<MergeRangesResponse, tonic::Status> {
    c.client(leader)
        .await
        .merge_ranges(MergeRangesRequest {
            header: Some(header(target)),
            source: Some(source.clone()),
        })
        .await
        .map(|r| r.into_inner())
}

/// CreateReplica of `desc` on store `id` (bootstrap: the first replica of a new range).
pub async fn create_on(c: &Cluster, id: u64, desc: &RangeDescriptor, bootstrap: bool) {
    c.client(id)
        .await
        .create_replica(CreateReplicaRequest {
            descriptor: Some(desc.clone()),
            bootstrap,
            stores: c.stores(),
        })
        .await
        .expect("create replica");
}

/// A put op of a batch write.
pub fn put_op(key: &[u8], value: &[u8], condition: Option<u64>) -> StoreWriteOp {
    StoreWriteOp {
        key: key.to_vec(),
        op: Some(store_write_op::Op::Put(value.to_vec())),
        condition: condition.map(|v| Condition {
            kind: Some(condition::Kind::VersionEquals(v)),
        }),
    }
}

/// A delete op of a batch write.
pub fn delete_op(key: &[u8], condition: Option<u64>) -> StoreWriteOp {
    StoreWriteOp {
        key: key.to_vec(),
        op: Some(store_write_op::Op::Delete(true)),
        condition: condition.map(|v| Condition {
            kind: Some(condition::Kind::VersionEquals(v)),
        }),
    }
}

pub fn header(d: &RangeDescriptor) -> RequestHeader {
    RequestHeader {
        range_id: d.range_id,
        epoch: d.epoch,
    }
}

/// Range 1 = ["", "") at its initial epoch (conf_ver 1, version 1) with these voters,
/// as placement bootstraps it.
pub fn whole_range(voters: impl IntoIterator<Item = u64>) -> RangeDescriptor {
    RangeDescriptor {
        range_id: 1,
        start: vec![],
        end: vec![],
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas: voters
            .into_iter()
            .map(|id| Replica {
                store_id: id,
                role: ReplicaRole::Voter as i32,
            })
            .collect(),
    }
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
