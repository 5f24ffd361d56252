//! A tiny fake cluster for end-to-end tests of the proxy over real gRPC sockets:
//! one fake placement and N fake storenodes sharing one in-memory "truth".
//!
//! The truth (ranges, leaders, data) is what storenodes answer from; placement
//! serves its own, possibly stale, view so tests can check that the proxy learns
//! from routing errors without placement.

#![allow(dead_code, clippy::result_large_err)]

use parking_lot::Mutex;
use skv_proto::internal::placement_server::{Placement, PlacementServer};
use skv_proto::internal::store_server::{Store, StoreServer};
use skv_proto::internal::*;
use skv_proxy::auth::{Claims, Role, mint_hs256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

#[derive(Default)]
pub struct Truth {
    /// Sorted by start.
    pub ranges: Vec<RangeDescriptor>,
    pub leaders: HashMap<u64, u64>,
    pub data: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    pub addrs: HashMap<u64, String>,
}

impl Truth {
    fn range_by_id(&self, id: u64) -> Option<&RangeDescriptor> {
        self.ranges.iter().find(|r| r.range_id == id)
    }

    /// Splits the range holding `at`: the left keeps its id, the right gets `new_id`.
    pub fn split(&mut self, at: &[u8], new_id: u64) {
        let i = self
            .ranges
            .iter()
            .position(|r| skv_common::keys::desc_contains(r, at))
            .expect("range for split key");
        let left = &mut self.ranges[i];
        assert_ne!(left.start.as_slice(), at);
        let mut epoch = left.epoch.unwrap();
        epoch.version += 1;
        left.epoch = Some(epoch);
        let right = RangeDescriptor {
            range_id: new_id,
            start: at.to_vec(),
            end: left.end.clone(),
            epoch: Some(epoch),
            replicas: left.replicas.clone(),
        };
        left.end = at.to_vec();
        let leader = self.leaders[&left.range_id];
        self.leaders.insert(new_id, leader);
        self.ranges.insert(i + 1, right);
    }
}

pub fn desc(id: u64, start: &[u8], end: &[u8], version: u64, stores: &[u64]) -> RangeDescriptor {
    RangeDescriptor {
        range_id: id,
        start: start.to_vec(),
        end: end.to_vec(),
        epoch: Some(RangeEpoch { conf_ver: 1, version }),
        replicas: stores
            .iter()
            .map(|s| Replica {
                store_id: *s,
                role: ReplicaRole::Voter as i32,
            })
            .collect(),
    }
}

#[derive(Default)]
pub struct Shared {
    pub truth: Mutex<Truth>,
    /// What placement says (may lag the truth).
    pub placement_ranges: Mutex<Vec<RangeInfo>>,
    pub placement_stores: Mutex<Vec<StoreInfo>>,
    pub hang_writes: AtomicBool,
    /// The next N reads on the leader fail with UNAVAILABLE (a transport-level error).
    pub unavailable_reads: AtomicUsize,
    pub write_attempts: AtomicUsize,
    pub not_leader_answers: AtomicUsize,
    pub epoch_errors: AtomicUsize,
    pub scan_calls: AtomicUsize,
    /// Largest page a fake store returns (0 = as asked).
    pub scan_page_cap: AtomicU32,
    /// After this many scan pages, split at these keys (ids from 100).
    pub split_after_pages: Mutex<Option<(usize, Vec<Vec<u8>>)>>,
    pub placement_calls: AtomicUsize,
    /// The next scan stream fails after its first message (a leader lost mid-stream).
    pub break_scan_after_first: AtomicBool,
    /// Store calls of BatchGet/BatchWrite (one per range and round).
    pub batch_calls: AtomicUsize,
    /// Ids for ranges created by simulated splits (from 100).
    pub next_range_id: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Placement's view := the truth.
    pub fn sync_placement(&self) {
        let t = self.truth.lock();
        *self.placement_ranges.lock() = t
            .ranges
            .iter()
            .map(|d| RangeInfo {
                descriptor: Some(d.clone()),
                leader_store_id: t.leaders[&d.range_id],
            })
            .collect();
    }
}

fn routing(kind: routing_error::Kind) -> Option<RoutingError> {
    Some(RoutingError {
        message: "fake".into(),
        kind: Some(kind),
    })
}

pub struct FakeStore {
    pub id: u64,
    pub shared: Arc<Shared>,
}

impl FakeStore {
    /// Routing checks as a storenode does them. Returns the descriptor on success.
    fn check(&self, header: Option<RequestHeader>, key: Option<&[u8]>) -> Result<RangeDescriptor, RoutingError> {
        let t = self.shared.truth.lock();
        let h = header.unwrap_or_default();
        let Some(d) = t.range_by_id(h.range_id).cloned() else {
            return Err(routing(routing_error::Kind::RangeNotFound(RangeNotFound {
                range_id: h.range_id,
            }))
            .unwrap());
        };
        let leader = t.leaders[&d.range_id];
        if leader != self.id {
            self.shared.not_leader_answers.fetch_add(1, Ordering::SeqCst);
            return Err(routing(routing_error::Kind::NotLeader(NotLeader {
                range_id: d.range_id,
                leader_store_id: leader,
                leader_address: t.addrs.get(&leader).cloned().unwrap_or_default(),
            }))
            .unwrap());
        }
        if h.epoch.unwrap_or_default().version != d.epoch.unwrap().version {
            self.shared.epoch_errors.fetch_add(1, Ordering::SeqCst);
            return Err(routing(routing_error::Kind::EpochNotMatch(EpochNotMatch {
                current: t.ranges.clone(),
            }))
            .unwrap());
        }
        if let Some(k) = key
            && !skv_common::keys::desc_contains(&d, k)
        {
            return Err(routing(routing_error::Kind::KeyNotInRange(KeyNotInRange {
                key: k.to_vec(),
                descriptor: Some(d),
            }))
            .unwrap());
        }
        Ok(d)
    }
}

#[tonic::async_trait]
impl Store for FakeStore {
    async fn get(&self, request: Request<StoreGetRequest>) -> Result<Response<StoreGetResponse>, Status> {
        let r = request.into_inner();
        let check = self.check(r.header, Some(&r.key));
        if check.is_ok()
            && self
                .shared
                .unavailable_reads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Status::unavailable("fake: read index timed out"));
        }
        if let Err(e) = check {
            return Ok(Response::new(StoreGetResponse {
                routing_error: Some(e),
                ..Default::default()
            }));
        }
        let t = self.shared.truth.lock();
        Ok(Response::new(match t.data.get(&r.key) {
            Some((v, ver)) => StoreGetResponse {
                routing_error: None,
                found: true,
                value: v.clone(),
                version: *ver,
            },
            None => StoreGetResponse::default(),
        }))
    }

    async fn write(&self, request: Request<StoreWriteRequest>) -> Result<Response<StoreWriteResponse>, Status> {
        let r = request.into_inner();
        if let Err(e) = self.check(r.header, Some(&r.key)) {
            return Ok(Response::new(StoreWriteResponse {
                routing_error: Some(e),
                ..Default::default()
            }));
        }
        self.shared.write_attempts.fetch_add(1, Ordering::SeqCst);
        if self.shared.hang_writes.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let mut t = self.shared.truth.lock();
        let current = t.data.get(&r.key).map(|(_, v)| *v).unwrap_or(0);
        if let Some(Condition {
            kind: Some(condition::Kind::VersionEquals(v)),
        }) = r.condition
            && v != current
        {
            return Ok(Response::new(StoreWriteResponse {
                routing_error: None,
                succeeded: false,
                version: current,
                existed: current != 0,
            }));
        }
        Ok(Response::new(match r.op {
            Some(store_write_request::Op::Put(v)) => {
                t.data.insert(r.key, (v, current + 1));
                StoreWriteResponse {
                    routing_error: None,
                    succeeded: true,
                    version: current + 1,
                    existed: current != 0,
                }
            }
            _ => {
                let existed = t.data.remove(&r.key).is_some();
                StoreWriteResponse {
                    routing_error: None,
                    succeeded: true,
                    version: 0,
                    existed,
                }
            }
        }))
    }

    type ScanStream = Pin<Box<dyn futures::Stream<Item = Result<StoreScanResponse, Status>> + Send>>;

    /// Like a storenode: every key from one point (one lock of the truth), streamed in
    /// messages of at most `scan_page_cap` keys; a routing error is the only message.
    async fn scan(&self, request: Request<StoreScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        let r = request.into_inner();
        let one = |m: StoreScanResponse| -> Result<Response<Self::ScanStream>, Status> {
            Ok(Response::new(Box::pin(futures::stream::iter([Ok(m)]))))
        };
        let d = match self.check(r.header, None) {
            Ok(d) => d,
            Err(e) => {
                return one(StoreScanResponse {
                    routing_error: Some(e),
                    ..Default::default()
                });
            }
        };
        if !skv_common::keys::desc_contains(&d, &r.start)
            || (!r.end.is_empty() && skv_common::keys::cmp_end(&r.end, &d.end) == std::cmp::Ordering::Greater)
        {
            return one(StoreScanResponse {
                routing_error: routing(routing_error::Kind::KeyNotInRange(KeyNotInRange {
                    key: r.start.clone(),
                    descriptor: Some(d),
                })),
                ..Default::default()
            });
        }
        let calls = self.shared.scan_calls.fetch_add(1, Ordering::SeqCst) + 1;
        let cap = self.shared.scan_page_cap.load(Ordering::SeqCst);
        let chunk = if cap == 0 { 256 } else { cap as usize };
        let limit = if r.limit == 0 { usize::MAX } else { r.limit as usize };
        let end = if r.end.is_empty() { d.end.clone() } else { r.end.clone() };
        let mut t = self.shared.truth.lock();
        let kvs: Vec<StoreKv> = t
            .data
            .range(r.start.clone()..)
            .take_while(|(k, _)| end.is_empty() || **k < end)
            .take(limit)
            .map(|(k, (v, ver))| StoreKv {
                key: k.clone(),
                value: v.clone(),
                version: *ver,
            })
            .collect();
        // Simulated split right after this stream's point was taken.
        let mut split = self.shared.split_after_pages.lock();
        if let Some((after, keys)) = split.as_ref()
            && calls >= *after
        {
            for k in keys {
                let id = 100 + self.shared.next_range_id.fetch_add(1, Ordering::SeqCst);
                t.split(k, id);
            }
            *split = None;
        }
        let mut messages: Vec<Result<StoreScanResponse, Status>> = kvs
            .chunks(chunk)
            .map(|c| {
                Ok(StoreScanResponse {
                    routing_error: None,
                    kvs: c.to_vec(),
                })
            })
            .collect();
        if self.shared.break_scan_after_first.swap(false, Ordering::SeqCst) {
            messages.truncate(1);
            messages.push(Err(Status::unavailable("fake: leadership lost mid-stream")));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn batch_get(
        &self,
        request: Request<StoreBatchGetRequest>,
    ) -> Result<Response<StoreBatchGetResponse>, Status> {
        let r = request.into_inner();
        self.shared.batch_calls.fetch_add(1, Ordering::SeqCst);
        for k in &r.keys {
            if let Err(e) = self.check(r.header, Some(k)) {
                return Ok(Response::new(StoreBatchGetResponse {
                    routing_error: Some(e),
                    results: vec![],
                }));
            }
        }
        let t = self.shared.truth.lock();
        let results = r
            .keys
            .iter()
            .map(|k| match t.data.get(k) {
                Some((v, ver)) => StoreGetResult {
                    found: true,
                    value: v.clone(),
                    version: *ver,
                },
                None => StoreGetResult::default(),
            })
            .collect();
        Ok(Response::new(StoreBatchGetResponse {
            routing_error: None,
            results,
        }))
    }

    async fn batch_write(
        &self,
        request: Request<StoreBatchWriteRequest>,
    ) -> Result<Response<StoreBatchWriteResponse>, Status> {
        let r = request.into_inner();
        self.shared.batch_calls.fetch_add(1, Ordering::SeqCst);
        for op in &r.ops {
            if let Err(e) = self.check(r.header, Some(&op.key)) {
                return Ok(Response::new(StoreBatchWriteResponse {
                    routing_error: Some(e),
                    results: vec![],
                }));
            }
        }
        self.shared.write_attempts.fetch_add(1, Ordering::SeqCst);
        if self.shared.hang_writes.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let mut t = self.shared.truth.lock();
        let results = r
            .ops
            .into_iter()
            .map(|op| {
                let current = t.data.get(&op.key).map(|(_, v)| *v).unwrap_or(0);
                match op.op {
                    Some(store_write_op::Op::Put(v)) => {
                        t.data.insert(op.key, (v, current + 1));
                        StoreWriteResult {
                            succeeded: true,
                            version: current + 1,
                            existed: current != 0,
                        }
                    }
                    _ => StoreWriteResult {
                        succeeded: true,
                        version: 0,
                        existed: t.data.remove(&op.key).is_some(),
                    },
                }
            })
            .collect();
        Ok(Response::new(StoreBatchWriteResponse {
            routing_error: None,
            results,
        }))
    }

    async fn create_replica(
        &self,
        _: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn change_replicas(
        &self,
        _: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn split_range(&self, _: Request<SplitRangeRequest>) -> Result<Response<SplitRangeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn transfer_leader(
        &self,
        _: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_replicas(&self, _: Request<ListReplicasRequest>) -> Result<Response<ListReplicasResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn merge_ranges(&self, _: Request<MergeRangesRequest>) -> Result<Response<MergeRangesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

pub struct FakePlacement {
    pub shared: Arc<Shared>,
}

type WatchStream = Pin<Box<dyn futures::Stream<Item = Result<WatchRangesResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Placement for FakePlacement {
    async fn register_store(
        &self,
        _: Request<RegisterStoreRequest>,
    ) -> Result<Response<RegisterStoreResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn store_heartbeat(
        &self,
        _: Request<StoreHeartbeatRequest>,
    ) -> Result<Response<StoreHeartbeatResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn range_heartbeat(
        &self,
        _: Request<RangeHeartbeatRequest>,
    ) -> Result<Response<RangeHeartbeatResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn report_split(&self, _: Request<ReportSplitRequest>) -> Result<Response<ReportSplitResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn report_merge(&self, _: Request<ReportMergeRequest>) -> Result<Response<ReportMergeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_range(&self, request: Request<GetRangeRequest>) -> Result<Response<GetRangeResponse>, Status> {
        self.shared.placement_calls.fetch_add(1, Ordering::SeqCst);
        let key = request.into_inner().key;
        let range = self
            .shared
            .placement_ranges
            .lock()
            .iter()
            .find(|r| skv_common::keys::desc_contains(r.descriptor.as_ref().unwrap(), &key))
            .cloned();
        Ok(Response::new(GetRangeResponse {
            range,
            stores: self.shared.placement_stores.lock().clone(),
        }))
    }
    async fn scan_ranges(&self, _: Request<ScanRangesRequest>) -> Result<Response<ScanRangesResponse>, Status> {
        self.shared.placement_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(ScanRangesResponse {
            ranges: self.shared.placement_ranges.lock().clone(),
            stores: self.shared.placement_stores.lock().clone(),
        }))
    }

    type WatchRangesStream = WatchStream;

    async fn watch_ranges(&self, _: Request<WatchRangesRequest>) -> Result<Response<WatchStream>, Status> {
        let first = WatchRangesResponse {
            updated: self.shared.placement_ranges.lock().clone(),
            removed_range_ids: vec![],
            stores: self.shared.placement_stores.lock().clone(),
            full: true,
        };
        let s = futures::StreamExt::chain(futures::stream::iter([Ok(first)]), futures::stream::pending());
        Ok(Response::new(Box::pin(s)))
    }
    async fn get_stores(&self, _: Request<GetStoresRequest>) -> Result<Response<GetStoresResponse>, Status> {
        self.shared.placement_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(GetStoresResponse {
            stores: self.shared.placement_stores.lock().clone(),
        }))
    }
    async fn alloc_ids(&self, _: Request<AllocIdsRequest>) -> Result<Response<AllocIdsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_members(&self, _: Request<GetMembersRequest>) -> Result<Response<GetMembersResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn split_range(&self, _: Request<AdminSplitRequest>) -> Result<Response<AdminSplitResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn transfer_leader(
        &self,
        _: Request<AdminTransferLeaderRequest>,
    ) -> Result<Response<AdminTransferLeaderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn merge_ranges(&self, _: Request<AdminMergeRequest>) -> Result<Response<AdminMergeResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn move_replica(
        &self,
        _: Request<AdminMoveReplicaRequest>,
    ) -> Result<Response<AdminMoveReplicaResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn drain_store(
        &self,
        _: Request<AdminDrainStoreRequest>,
    ) -> Result<Response<AdminDrainStoreResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn set_scheduler_paused(
        &self,
        _: Request<SetSchedulerPausedRequest>,
    ) -> Result<Response<SetSchedulerPausedResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A server builder, with TLS as `role` when `tls` names a certificate directory.
fn builder(tls: Option<&std::path::Path>, role: &str) -> tonic::transport::Server {
    let b = tonic::transport::Server::builder();
    match tls {
        None => b,
        Some(dir) => {
            let t = skv_rpc::tls::ServerTls {
                cert_file: dir.join(format!("{role}.pem")),
                key_file: dir.join(format!("{role}-key.pem")),
                client_ca_file: Some(dir.join("ca.pem")),
            };
            b.tls_config(t.load().unwrap()).unwrap()
        }
    }
}

/// Only the proxy's certificate, when TLS is on.
fn proxy_only(tls: bool, service: &'static str) -> skv_rpc::tls::RequireRole {
    skv_rpc::tls::RequireRole::new(tls, service, &[skv_rpc::tls::PeerRole::Proxy])
}

async fn serve(router: tonic::transport::server::Router, cancel: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let _ = router
            .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
            .await;
    });
    addr
}

/// A running fake cluster plus a proxy in front of it.
pub struct Cluster {
    pub shared: Arc<Shared>,
    pub placement_cancel: CancellationToken,
    pub store_cancels: HashMap<u64, CancellationToken>,
    pub placement_addr: SocketAddr,
    pub proxy: skv_common::service::ServiceHandle,
    pub _dir: tempfile::TempDir,
}

pub struct Options {
    /// Store ids to run.
    pub stores: Vec<u64>,
    /// Initial ranges (truth == placement view) and leaders.
    pub ranges: Vec<(RangeDescriptor, u64)>,
    /// Extra store records (e.g. dead addresses) to advertise.
    pub extra_stores: Vec<StoreInfo>,
    pub tweak: fn(&mut skv_proxy::Config),
    /// mTLS inside (ADR 0022): a directory made by `skv_rpc::certs::create`; the fake
    /// storenodes and placement serve TLS with their role's certificate and admit only the
    /// proxy's, and the proxy gets `--tls-*` with its own.
    pub tls: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            stores: vec![1, 2, 3],
            ranges: vec![(desc(1, b"", b"", 1, &[1, 2, 3]), 1)],
            extra_stores: vec![],
            tweak: |_| {},
            tls: None,
        }
    }
}

pub async fn start(opts: Options) -> Cluster {
    start_with(opts, |_| {}).await
}

/// [`start`], then `configure` changes the proxy's config (after `opts.tweak`); it may
/// capture (key files of the test, for example).
pub async fn start_with(opts: Options, configure: impl FnOnce(&mut skv_proxy::Config)) -> Cluster {
    let shared = Arc::new(Shared::default());
    let mut store_cancels = HashMap::new();
    let mut stores = Vec::new();
    for id in &opts.stores {
        let cancel = CancellationToken::new();
        let router = builder(opts.tls.as_deref(), "storenode").add_service(StoreServer::with_interceptor(
            FakeStore {
                id: *id,
                shared: shared.clone(),
            },
            proxy_only(opts.tls.is_some(), "skv.internal.v1.Store"),
        ));
        let addr = serve(router, cancel.clone()).await;
        store_cancels.insert(*id, cancel);
        shared.truth.lock().addrs.insert(*id, addr.to_string());
        stores.push(StoreInfo {
            store_id: *id,
            address: addr.to_string(),
            ..Default::default()
        });
    }
    stores.extend(opts.extra_stores.iter().cloned());
    {
        let mut t = shared.truth.lock();
        for (d, leader) in &opts.ranges {
            t.leaders.insert(d.range_id, *leader);
            t.ranges.push(d.clone());
        }
    }
    *shared.placement_stores.lock() = stores;
    shared.sync_placement();
    let placement_cancel = CancellationToken::new();
    let placement_addr = serve(
        builder(opts.tls.as_deref(), "placement").add_service(PlacementServer::with_interceptor(
            FakePlacement { shared: shared.clone() },
            proxy_only(opts.tls.is_some(), "skv.internal.v1.Placement"),
        )),
        placement_cancel.clone(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, [SECRET, b"\n"].concat()).unwrap();
    let placement_url = match &opts.tls {
        Some(_) => placement_addr.to_string(),
        None => format!("http://{placement_addr}"),
    };
    let mut config = skv_proxy::Config::new(vec![placement_url], secret);
    if let Some(dir) = &opts.tls {
        config.tls_cert_file = Some(dir.join("proxy.pem"));
        config.tls_key_file = Some(dir.join("proxy-key.pem"));
        config.tls_ca_file = Some(dir.join("ca.pem"));
    }
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    (opts.tweak)(&mut config);
    configure(&mut config);
    let proxy = skv_proxy::start(config).await.unwrap();
    Cluster {
        shared,
        placement_cancel,
        store_cancels,
        placement_addr,
        proxy,
        _dir: dir,
    }
}

impl Cluster {
    pub async fn client(&self) -> skv_proto::v1::kv_client::KvClient<tonic::transport::Channel> {
        skv_proto::v1::kv_client::KvClient::connect(format!("http://{}", self.proxy.addr))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }

    pub async fn metrics(&self) -> String {
        self.http_get("/metrics").await
    }

    pub async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.proxy.metrics_addr.unwrap())
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}

pub fn token(ns: &str, role: Role) -> String {
    mint_hs256(SECRET, &Claims::new("test", ns, role, Duration::from_secs(600))).unwrap()
}

pub fn req<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// Counter handy for tests that need unique values.
pub static SEQ: AtomicUsize = AtomicUsize::new(0);
