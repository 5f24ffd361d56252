//! The gRPC `Placement` service, request forwarding to the leader, and the leader's loop
//! (store liveness, the scheduler and operator execution).

use crate::Config;
use crate::cluster::{ApplyOutcome, Meta};
use crate::election::{self, ElectionState};
use crate::layout::Layout;
use crate::meta::{DynMetaStore, EventKind, MetaError, Op, Txn};
use crate::metrics::Metrics;
use crate::rangemap::Incoming;
use crate::scheduler::{self, Operator, SchedulerConfig};
use futures::StreamExt;
use prost::Message;
use skv_common::keys::desc_contains;
use skv_common::service::ServiceHandle;
use skv_common::telemetry::{Readiness, serve_metrics};
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::placement_server::{Placement, PlacementServer};
use skv_proto::internal::routing_error::Kind as RoutingKind;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::*;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Metadata key set on requests a follower forwards, so they are never forwarded twice.
const FORWARDED: &str = "skv-placement-forwarded";
/// Largest AllocIds count.
const MAX_ALLOC: u32 = 100_000;
/// IDs reserved from the shared allocator at a time.
const ID_BLOCK: u64 = 1000;
/// How often the leader compacts the metadata store's history, and how much it keeps.
const COMPACT_EVERY_MS: u64 = 5 * 60 * 1000;
const COMPACT_KEEP_REVISIONS: i64 = 10_000;
/// Attempts of admin operations that meet routing errors.
const ADMIN_ATTEMPTS: usize = 5;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn meta_status(e: MetaError) -> Status {
    Status::unavailable(format!("metadata store: {e}"))
}

/// In-memory state of the leader, reset on each new term.
#[derive(Default)]
struct LeaderMem {
    /// Latest heartbeat of each store.
    stores: HashMap<u64, StoreInfo>,
    /// When each store record was last written to the metadata store.
    persisted_ms: HashMap<u64, u64>,
    /// When each store (last) came up, as seen by this leader.
    up_since: HashMap<u64, u64>,
    /// Last leader heartbeat per range, and its Raft term.
    leader_seen: HashMap<u64, u64>,
    leader_term: HashMap<u64, u64>,
    /// Last RangeInfo and leader term written or confirmed per range (skips no-op heartbeats).
    last_applied: HashMap<u64, (RangeInfo, u64)>,
    /// Ranges with an operator in flight or cooling down, until this time.
    busy_until: HashMap<u64, u64>,
    leader_since_ms: u64,
    /// Last etcd history compaction by this leader.
    last_compact_ms: u64,
}

struct Shared {
    config: Config,
    meta: Meta,
    cluster_id: String,
    me: PlacementMember,
    state: watch::Receiver<ElectionState>,
    metrics: Metrics,
    paused: AtomicBool,
    mem: parking_lot::Mutex<LeaderMem>,
    ids: tokio::sync::Mutex<(u64, u64)>,
    channels: parking_lot::Mutex<HashMap<String, Channel>>,
    cancel: CancellationToken,
}

/// Starts a placement instance on an already opened metadata store.
pub async fn start_with_store(config: Config, store: DynMetaStore) -> anyhow::Result<ServiceHandle> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    if config.advertise.is_none() && addr.ip().is_unspecified() {
        tracing::warn!(%addr, "listening on a wildcard address without --advertise: other instances cannot forward here");
    }
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let name = config.name.clone().unwrap_or_else(|| advertise.clone());
    let (metrics, registry) = Metrics::new_registry();
    let layout = Layout::new(&config.etcd_prefix);
    let meta = Meta::new(store.clone(), layout.clone(), metrics.clone());
    let mut attempt = 0;
    let cluster_id = loop {
        match meta.bootstrap().await {
            Ok(id) => break id,
            Err(e) if attempt < 20 => {
                attempt += 1;
                tracing::warn!(error = %e, "bootstrap failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("bootstrap failed: {e}")),
        }
    };
    let cancel = CancellationToken::new();
    let ready = Readiness::default();
    let metrics_addr = match config.metrics_listen {
        Some(l) => Some(serve_metrics(l, Arc::new(registry), ready.clone(), cancel.clone()).await?),
        None => None,
    };
    let me = PlacementMember {
        name,
        address: advertise,
    };
    let (state_tx, state_rx) = watch::channel(ElectionState::default());
    let shared = Arc::new(Shared {
        config: config.clone(),
        meta,
        cluster_id,
        me: me.clone(),
        state: state_rx,
        metrics,
        paused: AtomicBool::new(false),
        mem: parking_lot::Mutex::new(LeaderMem::default()),
        ids: tokio::sync::Mutex::new((0, 0)),
        channels: parking_lot::Mutex::new(HashMap::new()),
        cancel: cancel.clone(),
    });
    let election_task = tokio::spawn(election::run(
        store,
        layout,
        me.clone(),
        config.lease_ttl_secs,
        state_tx,
        cancel.clone(),
    ));
    let leader_task = tokio::spawn(leader_loop(shared.clone()));
    let svc = PlacementServer::new(PlacementService { s: shared })
        .max_decoding_message_size(skv_common::limits::DEFAULT_MAX_MESSAGE_LEN);
    let incoming = TcpListenerStream::new(listener);
    ready.set(true);
    tracing::info!(%addr, name = %me.name, "placement serving");
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, c.clone().cancelled_owned())
            .await;
        c.cancel();
        let _ = leader_task.await;
        let _ = election_task.await;
        r.map_err(anyhow::Error::from)
    });
    Ok(ServiceHandle::new(addr, metrics_addr, cancel, task))
}

impl Shared {
    fn is_leader(&self) -> bool {
        self.state.borrow().is_leader
    }

    fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut g = self.channels.lock();
        if let Some(c) = g.get(address) {
            return Ok(c.clone());
        }
        let uri = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let ch = Endpoint::from_shared(uri)
            .map_err(|e| Status::internal(format!("bad address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        g.insert(address.to_string(), ch.clone());
        Ok(ch)
    }

    /// A client to the leader. With `fresh`, the leader key is read from the metadata store
    /// instead of trusting this instance's (up to one campaign interval old) view.
    async fn leader_client(&self, fresh: bool) -> Result<(PlacementClient<Channel>, String), Status> {
        let leader = if fresh {
            election::observe_leader(&self.meta.store, &self.meta.layout)
                .await
                .map_err(meta_status)?
                .map(|(m, _)| m)
        } else {
            self.state.borrow().leader.clone()
        };
        match leader {
            Some(l) if l.address != self.me.address => Ok((PlacementClient::new(self.channel(&l.address)?), l.address)),
            _ => Err(Status::unavailable("no placement leader elected yet; retry")),
        }
    }

    fn store_client(&self, address: &str) -> Result<StoreClient<Channel>, Status> {
        Ok(StoreClient::new(self.channel(address)?))
    }

    fn effective(&self, mut s: StoreInfo, now: u64) -> StoreInfo {
        if s.state == StoreState::Up as i32 && now.saturating_sub(s.last_heartbeat_ms) > self.config.store_down_after_ms
        {
            s.state = StoreState::Down as i32;
        }
        s
    }

    /// Every store with its effective state (the leader overlays fresher heartbeats).
    async fn current_stores(&self) -> Result<Vec<StoreInfo>, Status> {
        let mut stores = self.meta.stores().await.map_err(meta_status)?;
        if self.is_leader() {
            let mem = self.mem.lock();
            for s in stores.iter_mut() {
                if let Some(m) = mem.stores.get(&s.store_id)
                    && m.last_heartbeat_ms >= s.last_heartbeat_ms
                {
                    *s = m.clone();
                }
            }
        }
        let now = now_ms();
        Ok(stores.into_iter().map(|s| self.effective(s, now)).collect())
    }

    fn persist_interval_ms(&self) -> u64 {
        (self.config.store_down_after_ms / 5).clamp(100, 5000)
    }

    async fn alloc_ids(&self, count: u64) -> Result<u64, Status> {
        let mut g = self.ids.lock().await;
        if g.1 - g.0 < count {
            let block = count.max(ID_BLOCK);
            let first = self.meta.reserve_ids(block).await.map_err(meta_status)?;
            *g = (first, first + block);
        }
        let first = g.0;
        g.0 += count;
        Ok(first)
    }

    /// Applies descriptors and keeps the heartbeat cache coherent.
    async fn apply(&self, incoming: &[Incoming]) -> Result<ApplyOutcome, Status> {
        let out = self.meta.apply(incoming).await.map_err(|e| match e {
            MetaError::Other(m) if m.starts_with("invalid range update") => Status::invalid_argument(m),
            e => meta_status(e),
        })?;
        let mut mem = self.mem.lock();
        for inc in incoming {
            mem.last_applied.remove(&inc.desc.range_id);
        }
        Ok(out)
    }

    async fn range_and_leader(&self, range_id: u64) -> Result<(RangeDescriptor, u64, String), Status> {
        let rec = self
            .meta
            .range_by_id(range_id)
            .await
            .map_err(meta_status)?
            .ok_or_else(|| Status::not_found(format!("range {range_id} not found")))?;
        let desc = rec.desc().clone();
        let leader = rec.info.leader_store_id;
        if leader == 0 {
            return Err(Status::unavailable(format!(
                "leader of range {range_id} is not known yet; retry"
            )));
        }
        let address = self
            .meta
            .get_store(leader)
            .await
            .map_err(meta_status)?
            .map(|s| s.address)
            .unwrap_or_default();
        if address.is_empty() {
            return Err(Status::unavailable(format!("address of store {leader} is not known")));
        }
        Ok((desc, leader, address))
    }

    /// Folds a storenode's routing error into the map; returns how long to wait before retrying.
    async fn absorb_routing_error(&self, desc: &RangeDescriptor, re: &RoutingError) -> Duration {
        match &re.kind {
            Some(RoutingKind::NotLeader(nl)) if nl.leader_store_id != 0 => {
                let _ = self
                    .apply(&[Incoming {
                        desc: desc.clone(),
                        leader: Some(nl.leader_store_id),
                        leader_term: None,
                    }])
                    .await;
                Duration::from_millis(50)
            }
            Some(RoutingKind::EpochNotMatch(e)) => {
                for d in &e.current {
                    let _ = self
                        .apply(&[Incoming {
                            desc: d.clone(),
                            leader: None,
                            leader_term: None,
                        }])
                        .await;
                }
                Duration::from_millis(50)
            }
            Some(RoutingKind::ServerBusy(b)) => Duration::from_millis(b.retry_after_ms.clamp(10, 2000)),
            _ => Duration::from_millis(300),
        }
    }
}

/// The `Placement` gRPC service.
#[derive(Clone)]
pub struct PlacementService {
    s: Arc<Shared>,
}

/// On a follower: forwards the request to the leader and returns its answer. If this
/// instance's view of the leader is missing or the leader is unavailable, the leader key is
/// read afresh and, only if it names another instance, the request goes there instead.
macro_rules! forward_if_follower {
    ($self:ident, $req:ident, $method:ident) => {
        if !$self.s.is_leader() {
            if $req.metadata().contains_key(FORWARDED) {
                return Err(Status::unavailable("this placement instance is not the leader"));
            }
            let inner = $req.into_inner();
            let mut tried: Option<String> = None;
            let mut fresh = false;
            loop {
                let (mut client, address) = match $self.s.leader_client(fresh).await {
                    Ok(c) => c,
                    Err(_) if !fresh => {
                        fresh = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if tried.as_deref() == Some(address.as_str()) {
                    return Err(Status::unavailable(format!(
                        "placement leader {address} is unavailable"
                    )));
                }
                $self.s.metrics.forwarded.inc();
                let mut fwd = Request::new(inner.clone());
                fwd.metadata_mut()
                    .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
                match client.$method(fwd).await {
                    Err(st) if st.code() == tonic::Code::Unavailable && !fresh => {
                        tried = Some(address);
                        fresh = true;
                    }
                    r => return r,
                }
            }
        }
    };
}

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn register_store(
        &self,
        request: Request<RegisterStoreRequest>,
    ) -> Result<Response<RegisterStoreResponse>, Status> {
        forward_if_follower!(self, request, register_store);
        let req = request.into_inner();
        if req.address.is_empty() {
            return Err(Status::invalid_argument("address is empty"));
        }
        let s = &self.s;
        let id = if req.store_id == 0 {
            s.alloc_ids(1).await?
        } else {
            req.store_id
        };
        let span = tracing::info_span!("register_store", store_id = id);
        async move {
            let existing = s.meta.get_store(id).await.map_err(meta_status)?;
            let mut info = existing.clone().unwrap_or_default();
            if info.state == StoreState::Removed as i32 {
                return Err(Status::failed_precondition(format!(
                    "store {id} was removed from the cluster"
                )));
            }
            if info.state != StoreState::Draining as i32 {
                info.state = StoreState::Up as i32;
            }
            let now = now_ms();
            info.store_id = id;
            info.address = req.address;
            info.metrics_address = req.metrics_address;
            info.capacity_bytes = req.capacity_bytes;
            info.last_heartbeat_ms = now;
            s.meta.put_store(&info).await.map_err(meta_status)?;
            {
                let mut mem = s.mem.lock();
                mem.up_since.entry(id).or_insert(now);
                mem.persisted_ms.insert(id, now);
                mem.stores.insert(id, info.clone());
            }
            tracing::info!(address = %info.address, new = existing.is_none(), "store registered");
            Ok(Response::new(RegisterStoreResponse {
                store_id: id,
                cluster_id: s.cluster_id.clone(),
            }))
        }
        .instrument(span)
        .await
    }

    async fn store_heartbeat(
        &self,
        request: Request<StoreHeartbeatRequest>,
    ) -> Result<Response<StoreHeartbeatResponse>, Status> {
        forward_if_follower!(self, request, store_heartbeat);
        let s = &self.s;
        let hb = request
            .into_inner()
            .store
            .ok_or_else(|| Status::invalid_argument("store is missing"))?;
        if hb.store_id == 0 {
            return Err(Status::invalid_argument("store_id is 0"));
        }
        s.metrics
            .heartbeats
            .get_or_create(&Metrics::label("kind", "store"))
            .inc();
        let id = hb.store_id;
        let known = s.mem.lock().stores.get(&id).cloned();
        let known =
            match known {
                Some(k) => k,
                None => s.meta.get_store(id).await.map_err(meta_status)?.ok_or_else(|| {
                    Status::failed_precondition(format!("unknown store {id}; call RegisterStore first"))
                })?,
            };
        if known.state == StoreState::Removed as i32 {
            return Err(Status::failed_precondition(format!(
                "store {id} was removed from the cluster"
            )));
        }
        let now = now_ms();
        let was_down = s.effective(known.clone(), now).state == StoreState::Down as i32;
        let mut info = known.clone();
        if !hb.address.is_empty() {
            info.address = hb.address;
        }
        if !hb.metrics_address.is_empty() {
            info.metrics_address = hb.metrics_address;
        }
        info.capacity_bytes = hb.capacity_bytes;
        info.used_bytes = hb.used_bytes;
        info.range_count = hb.range_count;
        info.leader_count = hb.leader_count;
        info.last_heartbeat_ms = now;
        if info.state == StoreState::Down as i32 {
            info.state = StoreState::Up as i32;
        }
        let persist = {
            let mut mem = s.mem.lock();
            if was_down || !mem.up_since.contains_key(&id) {
                mem.up_since.insert(id, now);
            }
            mem.stores.insert(id, info.clone());
            let last = mem.persisted_ms.get(&id).copied().unwrap_or(0);
            was_down
                || info.address != known.address
                || info.state != known.state
                || now.saturating_sub(last) >= s.persist_interval_ms()
        };
        if persist {
            s.meta.put_store(&info).await.map_err(meta_status)?;
            s.mem.lock().persisted_ms.insert(id, now);
            if was_down {
                tracing::info!(store_id = id, "store is up again");
            }
        }
        Ok(Response::new(StoreHeartbeatResponse {
            stores: s.current_stores().await?,
        }))
    }

    async fn range_heartbeat(
        &self,
        request: Request<RangeHeartbeatRequest>,
    ) -> Result<Response<RangeHeartbeatResponse>, Status> {
        forward_if_follower!(self, request, range_heartbeat);
        let s = &self.s;
        let req = request.into_inner();
        let now = now_ms();
        for report in req.ranges {
            s.metrics
                .heartbeats
                .get_or_create(&Metrics::label("kind", "range"))
                .inc();
            let Some(desc) = report.descriptor else { continue };
            let range_id = desc.range_id;
            let reported_leader = if report.leader_store_id != 0 {
                report.leader_store_id
            } else {
                req.store_id
            };
            let leader = {
                let mut mem = s.mem.lock();
                let known_term = mem.leader_term.get(&range_id).copied().unwrap_or(0);
                if report.term >= known_term {
                    mem.leader_term.insert(range_id, report.term);
                    mem.leader_seen.insert(range_id, now);
                    Some(reported_leader)
                } else {
                    None
                }
            };
            let info = RangeInfo {
                descriptor: Some(desc.clone()),
                leader_store_id: leader.unwrap_or(0),
            };
            let applied = (info, report.term);
            if leader.is_some() && s.mem.lock().last_applied.get(&range_id) == Some(&applied) {
                continue;
            }
            let span = tracing::debug_span!("range_heartbeat", range_id, store_id = req.store_id);
            let inc = Incoming {
                desc,
                leader,
                leader_term: leader.map(|_| report.term),
            };
            match s.apply(&[inc]).instrument(span).await {
                Ok(ApplyOutcome::Applied | ApplyOutcome::Unchanged) => {
                    if leader.is_some() {
                        s.mem.lock().last_applied.insert(range_id, applied);
                    }
                }
                Ok(ApplyOutcome::Stale(cur)) => {
                    tracing::debug!(range_id, current = cur.len(), "stale range heartbeat ignored");
                }
                Err(e) => tracing::warn!(range_id, error = %e, "range heartbeat not applied"),
            }
        }
        Ok(Response::new(RangeHeartbeatResponse {}))
    }

    async fn report_split(
        &self,
        request: Request<ReportSplitRequest>,
    ) -> Result<Response<ReportSplitResponse>, Status> {
        forward_if_follower!(self, request, report_split);
        let req = request.into_inner();
        let (Some(left), Some(right)) = (req.left, req.right) else {
            return Err(Status::invalid_argument("left and right are required"));
        };
        let leader = (req.leader_store_id != 0).then_some(req.leader_store_id);
        let span = tracing::info_span!("report_split", range_id = left.range_id, new_range_id = right.range_id);
        let out = self
            .s
            .apply(&[
                Incoming {
                    desc: left,
                    leader,
                    leader_term: None,
                },
                Incoming {
                    desc: right,
                    leader,
                    leader_term: None,
                },
            ])
            .instrument(span)
            .await?;
        tracing::debug!(?out, "split reported");
        Ok(Response::new(ReportSplitResponse {}))
    }

    async fn get_range(&self, request: Request<GetRangeRequest>) -> Result<Response<GetRangeResponse>, Status> {
        let key = request.into_inner().key;
        let rec = self
            .s
            .meta
            .lookup(&key)
            .await
            .map_err(meta_status)?
            .ok_or_else(|| Status::unavailable("no range holds this key yet (the map is catching up); retry"))?;
        let ids: HashSet<u64> = rec.desc().replicas.iter().map(|r| r.store_id).collect();
        let stores = self
            .s
            .current_stores()
            .await?
            .into_iter()
            .filter(|s| ids.contains(&s.store_id))
            .collect();
        Ok(Response::new(GetRangeResponse {
            range: Some(rec.info),
            stores,
        }))
    }

    async fn scan_ranges(&self, request: Request<ScanRangesRequest>) -> Result<Response<ScanRangesResponse>, Status> {
        let req = request.into_inner();
        let ranges = self
            .s
            .meta
            .scan(&req.start, &req.end, req.limit as usize)
            .await
            .map_err(meta_status)?
            .into_iter()
            .map(|r| r.info)
            .collect();
        Ok(Response::new(ScanRangesResponse {
            ranges,
            stores: self.s.current_stores().await?,
        }))
    }

    type WatchRangesStream = ReceiverStream<Result<WatchRangesResponse, Status>>;

    async fn watch_ranges(
        &self,
        _request: Request<WatchRangesRequest>,
    ) -> Result<Response<Self::WatchRangesStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let s = self.s.clone();
        tokio::spawn(watch_ranges_task(s, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_stores(&self, _request: Request<GetStoresRequest>) -> Result<Response<GetStoresResponse>, Status> {
        Ok(Response::new(GetStoresResponse {
            stores: self.s.current_stores().await?,
        }))
    }

    async fn alloc_ids(&self, request: Request<AllocIdsRequest>) -> Result<Response<AllocIdsResponse>, Status> {
        forward_if_follower!(self, request, alloc_ids);
        let count = request.into_inner().count.max(1);
        if count > MAX_ALLOC {
            return Err(Status::invalid_argument(format!("count {count} is above {MAX_ALLOC}")));
        }
        let first = self.s.alloc_ids(u64::from(count)).await?;
        Ok(Response::new(AllocIdsResponse { first, count }))
    }

    async fn get_members(&self, _request: Request<GetMembersRequest>) -> Result<Response<GetMembersResponse>, Status> {
        let s = &self.s;
        let leader = election::observe_leader(&s.meta.store, &s.meta.layout)
            .await
            .map_err(meta_status)?
            .map(|(m, _)| m);
        let members = election::members(&s.meta.store, &s.meta.layout)
            .await
            .map_err(meta_status)?;
        Ok(Response::new(GetMembersResponse {
            leader,
            members,
            cluster_id: s.cluster_id.clone(),
        }))
    }

    async fn split_range(&self, request: Request<AdminSplitRequest>) -> Result<Response<AdminSplitResponse>, Status> {
        forward_if_follower!(self, request, split_range);
        let req = request.into_inner();
        let s = &self.s;
        if req.split_key.is_empty() {
            return Err(Status::invalid_argument("split_key is empty"));
        }
        skv_common::limits::check_key(&req.split_key)?;
        let span = tracing::info_span!("admin_split", range_id = req.range_id);
        async move {
            let new_range_id = s.alloc_ids(1).await?;
            let mut last_err = String::new();
            for _ in 0..ADMIN_ATTEMPTS {
                let (desc, leader, address) = s.range_and_leader(req.range_id).await?;
                if !desc_contains(&desc, &req.split_key) || req.split_key == desc.start {
                    return Err(Status::invalid_argument(format!(
                        "split key is not strictly inside range {}",
                        req.range_id
                    )));
                }
                let mut client = s.store_client(&address)?;
                let resp = client
                    .split_range(SplitRangeRequest {
                        header: Some(RequestHeader {
                            range_id: desc.range_id,
                            epoch: desc.epoch,
                        }),
                        split_key: req.split_key.clone(),
                        new_range_id,
                    })
                    .await
                    .map_err(|e| Status::unavailable(format!("store {leader} at {address}: {}", e.message())))?
                    .into_inner();
                if let Some(re) = resp.routing_error {
                    last_err = re.message.clone();
                    let wait = s.absorb_routing_error(&desc, &re).await;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let (Some(left), Some(right)) = (resp.left, resp.right) else {
                    return Err(Status::internal("store answered the split without descriptors"));
                };
                s.apply(&[
                    Incoming {
                        desc: left.clone(),
                        leader: Some(leader),
                        leader_term: None,
                    },
                    Incoming {
                        desc: right.clone(),
                        leader: Some(leader),
                        leader_term: None,
                    },
                ])
                .await?;
                tracing::info!(new_range_id, "range split");
                return Ok(Response::new(AdminSplitResponse {
                    left: Some(left),
                    right: Some(right),
                }));
            }
            Err(Status::unavailable(format!("split did not go through: {last_err}")))
        }
        .instrument(span)
        .await
    }

    async fn transfer_leader(
        &self,
        request: Request<AdminTransferLeaderRequest>,
    ) -> Result<Response<AdminTransferLeaderResponse>, Status> {
        forward_if_follower!(self, request, transfer_leader);
        let req = request.into_inner();
        let s = &self.s;
        let mut last_err = String::new();
        for _ in 0..ADMIN_ATTEMPTS {
            let (desc, leader, address) = s.range_and_leader(req.range_id).await?;
            if !desc.replicas.iter().any(|r| r.store_id == req.to_store_id) {
                return Err(Status::failed_precondition(format!(
                    "store {} holds no replica of range {}",
                    req.to_store_id, req.range_id
                )));
            }
            if leader == req.to_store_id {
                return Ok(Response::new(AdminTransferLeaderResponse {}));
            }
            let resp = s
                .store_client(&address)?
                .transfer_leader(TransferLeaderRequest {
                    header: Some(RequestHeader {
                        range_id: desc.range_id,
                        epoch: desc.epoch,
                    }),
                    to_store_id: req.to_store_id,
                })
                .await
                .map_err(|e| Status::unavailable(format!("store {leader} at {address}: {}", e.message())))?
                .into_inner();
            match resp.routing_error {
                None => return Ok(Response::new(AdminTransferLeaderResponse {})),
                Some(re) => {
                    last_err = re.message.clone();
                    let wait = s.absorb_routing_error(&desc, &re).await;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Err(Status::unavailable(format!("transfer did not go through: {last_err}")))
    }

    async fn merge_ranges(&self, _request: Request<AdminMergeRequest>) -> Result<Response<AdminMergeResponse>, Status> {
        Err(Status::unimplemented(
            "MergeRanges is not implemented yet (milestone 2: ranges in motion)",
        ))
    }

    async fn move_replica(
        &self,
        _request: Request<AdminMoveReplicaRequest>,
    ) -> Result<Response<AdminMoveReplicaResponse>, Status> {
        Err(Status::unimplemented(
            "MoveReplica is not implemented yet (milestone 2: ranges in motion)",
        ))
    }

    async fn drain_store(
        &self,
        _request: Request<AdminDrainStoreRequest>,
    ) -> Result<Response<AdminDrainStoreResponse>, Status> {
        Err(Status::unimplemented(
            "DrainStore is not implemented yet (milestone 2: ranges in motion)",
        ))
    }

    async fn set_scheduler_paused(
        &self,
        request: Request<SetSchedulerPausedRequest>,
    ) -> Result<Response<SetSchedulerPausedResponse>, Status> {
        forward_if_follower!(self, request, set_scheduler_paused);
        let paused = request.into_inner().paused;
        let key = self.s.meta.layout.scheduler_paused();
        self.s
            .meta
            .store
            .txn(Txn::new().and_then([Op::put(key, if paused { "1" } else { "0" })]))
            .await
            .map_err(meta_status)?;
        self.s.paused.store(paused, Ordering::Release);
        tracing::info!(paused, "scheduler pause changed");
        Ok(Response::new(SetSchedulerPausedResponse {}))
    }
}

/// Feeds one WatchRanges stream: the full map, then deltas from a metadata watch.
/// Restarts with a new full message if the watch breaks (e.g. compaction).
async fn watch_ranges_task(s: Arc<Shared>, tx: mpsc::Sender<Result<WatchRangesResponse, Status>>) {
    let layout = s.meta.layout.clone();
    let (root_from, root_to) = crate::meta::prefix_range(&layout.root());
    let stores_prefix = layout.stores_prefix();
    loop {
        let (ranges, rev) = match s.meta.all_ranges().await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(meta_status(e))).await;
                return;
            }
        };
        let stores = match s.current_stores().await {
            Ok(st) => st,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut known: HashMap<Vec<u8>, u64> = ranges.iter().map(|r| (r.key.clone(), r.desc().range_id)).collect();
        let full = WatchRangesResponse {
            updated: ranges.into_iter().map(|r| r.info).collect(),
            removed_range_ids: vec![],
            stores,
            full: true,
        };
        if tx.send(Ok(full)).await.is_err() {
            return;
        }
        let mut w = match s.meta.store.watch(&root_from, &root_to, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                let _ = tx.send(Err(meta_status(e))).await;
                return;
            }
        };
        loop {
            let batch = tokio::select! {
                _ = s.cancel.cancelled() => return,
                _ = tx.closed() => return,
                b = w.next() => b,
            };
            let events = match batch {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "range watch broke; resending the full map");
                    break;
                }
                None => break,
            };
            let mut delta = WatchRangesResponse::default();
            let mut put_ids = HashSet::new();
            let mut deleted = Vec::new();
            let now = now_ms();
            for ev in events {
                if layout.range_end_of(&ev.kv.key).is_some() {
                    match ev.kind {
                        EventKind::Put => {
                            if let Ok(info) = RangeInfo::decode(ev.kv.value.as_slice())
                                && let Some(d) = &info.descriptor
                            {
                                // A record key taken over by another range (a split's right
                                // half, a merge) means the old range may be gone.
                                if let Some(old) = known.insert(ev.kv.key.clone(), d.range_id)
                                    && old != d.range_id
                                {
                                    deleted.push(old);
                                }
                                put_ids.insert(d.range_id);
                                delta.updated.push(info);
                            }
                        }
                        EventKind::Delete => {
                            if let Some(id) = known.remove(&ev.kv.key) {
                                deleted.push(id);
                            }
                        }
                    }
                } else if ev.kv.key.starts_with(&stores_prefix)
                    && ev.kind == EventKind::Put
                    && let Ok(st) = StoreInfo::decode(ev.kv.value.as_slice())
                {
                    delta.stores.push(s.effective(st, now));
                }
            }
            delta.removed_range_ids = deleted.into_iter().filter(|id| !put_ids.contains(id)).collect();
            if delta.updated.is_empty() && delta.removed_range_ids.is_empty() && delta.stores.is_empty() {
                continue;
            }
            if tx.send(Ok(delta)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the leader's duties whenever this instance leads.
async fn leader_loop(s: Arc<Shared>) {
    let mut rx = s.state.clone();
    loop {
        while !rx.borrow_and_update().is_leader {
            tokio::select! {
                _ = s.cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
        let term = s.cancel.child_token();
        *s.mem.lock() = LeaderMem {
            leader_since_ms: now_ms(),
            ..Default::default()
        };
        *s.ids.lock().await = (0, 0);
        match s.meta.store.get(&s.meta.layout.scheduler_paused()).await {
            Ok(v) => s.paused.store(v.is_some_and(|kv| kv.value == b"1"), Ordering::Release),
            Err(e) => tracing::warn!(error = %e, "cannot read the scheduler pause flag"),
        }
        s.metrics.is_leader.set(1);
        let mut tick = tokio::time::interval(Duration::from_millis(s.config.schedule_interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = s.cancel.cancelled() => break,
                r = rx.changed() => {
                    if r.is_err() || !rx.borrow_and_update().is_leader {
                        break;
                    }
                }
                _ = tick.tick() => tick_once(&s, &term).await,
            }
        }
        term.cancel();
        s.metrics.is_leader.set(0);
        if s.cancel.is_cancelled() {
            return;
        }
    }
}

/// Scheduler tunables from the flags. A placed range whose leader stays silent for
/// 20 ticks (10 s at the default 500 ms tick; at least 1 s) gets `CreateReplica` again.
pub fn scheduler_config(config: &Config) -> SchedulerConfig {
    SchedulerConfig {
        initial_wait_ms: config.initial_wait_ms,
        leaderless_resend_ms: config.schedule_interval_ms.saturating_mul(20).max(1000),
        ..Default::default()
    }
}

/// One scheduler tick on the leader.
async fn tick_once(s: &Arc<Shared>, term: &CancellationToken) {
    let now = now_ms();
    let ranges = match s.meta.all_ranges().await {
        Ok((r, rev)) => {
            maybe_compact(s, now, rev).await;
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "scheduler: cannot read the range map");
            return;
        }
    };
    let stores = match s.current_stores().await {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!(error = %e, "scheduler: cannot read stores");
            return;
        }
    };
    s.metrics.ranges.set(ranges.len() as i64);
    let up = stores.iter().filter(|x| x.state == StoreState::Up as i32).count();
    s.metrics
        .stores
        .get_or_create(&Metrics::label("state", "up"))
        .set(up as i64);
    s.metrics
        .stores
        .get_or_create(&Metrics::label("state", "down"))
        .set((stores.len() - up) as i64);
    if s.paused.load(Ordering::Acquire) {
        return;
    }
    let snap = {
        let mut mem = s.mem.lock();
        mem.busy_until.retain(|_, until| *until > now);
        for st in &stores {
            if st.state == StoreState::Up as i32 {
                mem.up_since.entry(st.store_id).or_insert(now);
            } else {
                mem.up_since.remove(&st.store_id);
            }
        }
        scheduler::Snapshot {
            now_ms: now,
            stores: stores.clone(),
            ranges: ranges.into_iter().map(|r| r.info).collect(),
            store_up_since_ms: mem.up_since.clone(),
            leader_seen_ms: mem.leader_seen.clone(),
            leader_since_ms: mem.leader_since_ms,
            busy: mem.busy_until.keys().copied().collect(),
        }
    };
    let cfg = scheduler_config(&s.config);
    for op in scheduler::schedule(&cfg, &snap) {
        let range_id = op.range_id();
        s.metrics
            .operators
            .get_or_create(&Metrics::label("kind", op.kind()))
            .inc();
        s.mem.lock().busy_until.insert(range_id, now + cfg.leaderless_resend_ms);
        let s2 = s.clone();
        let stores = stores.clone();
        let term = term.clone();
        let span = tracing::info_span!("operator", range_id, kind = op.kind());
        // After CreateReplica, give the group time to elect and heartbeat before any resend.
        let creates = !matches!(op, Operator::AddVoter { .. });
        let resend_ms = cfg.leaderless_resend_ms;
        tokio::spawn(
            async move {
                let r = tokio::select! {
                    _ = term.cancelled() => return,
                    r = execute(&s2, op, &stores) => r,
                };
                if let Err(e) = &r {
                    tracing::warn!(error = %e, "operator failed");
                }
                let settle = match (&r, creates) {
                    (_, true) => resend_ms,
                    (Ok(()), false) => 1000,
                    (Err(_), false) => 3000,
                };
                let mut mem = s2.mem.lock();
                let until = mem.busy_until.entry(range_id).or_default();
                *until = (*until).min(now_ms() + settle);
            }
            .instrument(span),
        );
    }
}

/// Keeps the metadata store's history bounded: every [`COMPACT_EVERY_MS`], the leader
/// compacts to [`COMPACT_KEEP_REVISIONS`] below the current revision.
async fn maybe_compact(s: &Shared, now: u64, revision: i64) {
    {
        let mut mem = s.mem.lock();
        if mem.last_compact_ms == 0 {
            mem.last_compact_ms = now;
        }
        if now.saturating_sub(mem.last_compact_ms) < COMPACT_EVERY_MS {
            return;
        }
        mem.last_compact_ms = now;
    }
    let target = revision - COMPACT_KEEP_REVISIONS;
    if target > 0 {
        match s.meta.store.compact(target).await {
            Ok(()) => tracing::debug!(revision = target, "metadata history compacted"),
            Err(e) => tracing::warn!(error = %e, "metadata compaction failed"),
        }
    }
}

async fn create_replica(
    s: &Shared,
    stores: &[StoreInfo],
    store_id: u64,
    desc: &RangeDescriptor,
    bootstrap: bool,
) -> anyhow::Result<()> {
    let address = stores
        .iter()
        .find(|x| x.store_id == store_id)
        .map(|x| x.address.clone())
        .ok_or_else(|| anyhow::anyhow!("store {store_id} has no known address"))?;
    s.store_client(&address)?
        .create_replica(CreateReplicaRequest {
            descriptor: Some(desc.clone()),
            bootstrap,
            stores: stores.to_vec(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("CreateReplica on store {store_id}: {}", e.message()))?;
    tracing::info!(range_id = desc.range_id, store_id, bootstrap, "replica created");
    Ok(())
}

async fn create_all(
    s: &Shared,
    stores: &[StoreInfo],
    desc: &RangeDescriptor,
    bootstrap_first: bool,
) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for (i, r) in desc.replicas.iter().enumerate() {
        if let Err(e) = create_replica(s, stores, r.store_id, desc, bootstrap_first && i == 0).await {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(errors.join("; ")))
    }
}

/// Executes one operator.
async fn execute(s: &Shared, op: Operator, stores: &[StoreInfo]) -> anyhow::Result<()> {
    match op {
        Operator::InitialPlacement { desc } => {
            if !s.meta.place_initial(&desc).await? {
                tracing::info!(range_id = desc.range_id, "range changed meanwhile; placement skipped");
                return Ok(());
            }
            tracing::info!(range_id = desc.range_id, replicas = ?desc.replicas.iter().map(|r| r.store_id).collect::<Vec<_>>(), "initial placement");
            create_all(s, stores, &desc, true).await
        }
        Operator::ResendCreate { desc, bootstrap_first } => create_all(s, stores, &desc, bootstrap_first).await,
        Operator::AddVoter { desc, leader, target } => {
            create_replica(s, stores, target, &desc, false).await?;
            let address = stores
                .iter()
                .find(|x| x.store_id == leader)
                .map(|x| x.address.clone())
                .ok_or_else(|| anyhow::anyhow!("leader store {leader} has no known address"))?;
            let resp = s
                .store_client(&address)?
                .change_replicas(ChangeReplicasRequest {
                    header: Some(RequestHeader {
                        range_id: desc.range_id,
                        epoch: desc.epoch,
                    }),
                    changes: vec![ReplicaChange {
                        store_id: target,
                        kind: replica_change::Kind::AddVoter as i32,
                    }],
                    stores: stores.iter().filter(|x| x.store_id == target).cloned().collect(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("ChangeReplicas on store {leader}: {}", e.message()))?
                .into_inner();
            if let Some(re) = resp.routing_error {
                s.absorb_routing_error(&desc, &re).await;
                anyhow::bail!("ChangeReplicas refused: {}", re.message);
            }
            if let Some(d) = resp.descriptor {
                s.apply(&[Incoming {
                    desc: d,
                    leader: Some(leader),
                    leader_term: None,
                }])
                .await?;
            }
            tracing::info!(range_id = desc.range_id, target, "voter added");
            Ok(())
        }
    }
}
