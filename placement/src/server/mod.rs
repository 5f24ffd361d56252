//! The gRPC `Placement` service, one file per concern:
//!
//! - this file: wiring and start, the state the concerns share, and the service's entry
//!   points, which forward to the leader when this instance follows, call the concern, and
//!   turn its [`PlacementError`](crate::error::PlacementError) into a gRPC status (only
//!   here and in `watch`, for its stream);
//! - `forward`: forwarding to the leader, clients to the leader and to storenodes;
//! - `heartbeat`: store registration, store and range heartbeats, split reports;
//! - `query`: GetRange, ScanRanges, GetStores, GetMembers, AllocIds, and the leader-memory
//!   reads of `PlacementAdmin` (range stats, store status, operators);
//! - `watch`: the WatchRanges stream;
//! - `admin`: split, leader transfer, merge/move/drain, scheduler pause;
//! - `auth`: which calls need which token (admin calls: role admin; status calls: any valid
//!   token; internal calls: none), checked here before a call runs or is forwarded;
//! - `operators`: operator execution (steps, progress, timeout, metrics);
//! - `leader`: the leader loop, the scheduler tick and operator execution.
//!
//! IDs are typed ([`RangeId`], [`StoreId`]) inside; the proto's `u64`s are read and written
//! where a request arrives or a call leaves.

mod admin;
mod auth;
mod backup;
mod forward;
mod heartbeat;
mod leader;
mod operators;
mod query;
mod watch;

pub use leader::scheduler_config;

use crate::Config;
use crate::cluster::{ApplyOutcome, Meta};
use crate::election::{self, ElectionState};
use crate::error::PlacementResult;
use crate::layout::Layout;
use crate::meta::DynMetaStore;
use crate::metrics::Metrics;
use crate::model::effective;
use crate::rangemap::Incoming;
use skv_auth::Role;
use skv_common::ids::{RangeId, StoreId};
use skv_common::service::ServiceHandle;
use skv_common::telemetry::{Readiness, serve_metrics};
use skv_proto::internal::placement_admin_client::PlacementAdminClient;
use skv_proto::internal::placement_admin_server::{PlacementAdmin, PlacementAdminServer};
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::placement_server::{Placement, PlacementServer};
use skv_proto::internal::*;
use skv_rpc::tls::PeerRole;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Largest AllocIds count.
const MAX_ALLOC: u32 = 100_000;
/// IDs reserved from the shared allocator at a time.
const ID_BLOCK: u64 = 1000;
/// How often the leader compacts the metadata store's history, and how much it keeps.
const COMPACT_EVERY_MS: u64 = 5 * 60 * 1000;
const COMPACT_KEEP_REVISIONS: i64 = 10_000;
/// Attempts of admin operations that meet routing errors.
const ADMIN_ATTEMPTS: usize = 5;

/// Milliseconds on placement's clock: the wall clock read once, when first asked, advanced by
/// the monotonic clock since. Store liveness (`last_heartbeat_ms` against
/// `--store-down-after-ms`), operator deadlines, settle times and load windows are measured on
/// it, so a step of the wall clock while placement runs (NTP, `date -s`) neither makes every
/// store look DOWN (and, past `--repair-after-secs`, rebuilds replicas of live stores) nor ends
/// an operator early; the chaos `clock` nemesis found that (ADR 0026). Times written by another
/// placement instance compare within the two machines' clock difference, as before.
fn now_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| (wall_ms(), std::time::Instant::now()));
    wall.saturating_add(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The wall clock in Unix milliseconds: for times shown to people (backup creation and
/// finish), never for durations.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// In-memory state of the leader, reset on each new term.
#[derive(Default)]
struct LeaderMem {
    /// Latest heartbeat of each store.
    stores: HashMap<StoreId, StoreInfo>,
    /// When each store record was last written to the metadata store.
    persisted_ms: HashMap<StoreId, u64>,
    /// When each store (last) came up, as seen by this leader.
    up_since: HashMap<StoreId, u64>,
    /// Last leader heartbeat per range, and its Raft term.
    leader_seen: HashMap<RangeId, u64>,
    leader_term: HashMap<RangeId, u64>,
    /// Last RangeInfo and leader term written or confirmed per range (skips no-op heartbeats).
    last_applied: HashMap<RangeId, (RangeInfo, u64)>,
    /// Ranges with an operator in flight or cooling down, until this time.
    busy_until: HashMap<RangeId, u64>,
    leader_since_ms: u64,
    /// Last etcd history compaction by this leader.
    last_compact_ms: u64,
    /// Range load from leader heartbeats (sliding window).
    load: crate::stats::LoadStats,
    /// When each range last split (both halves), as seen by this leader.
    last_split: HashMap<RangeId, u64>,
    /// Recent load splits: right half -> (left half, when).
    siblings: HashMap<RangeId, (RangeId, u64)>,
    /// Operators in flight, by (first) range.
    inflight: HashMap<RangeId, operators::InFlight>,
    /// Consecutive operator failures per range (retry backoff).
    failures: HashMap<RangeId, u32>,
    /// Merges asked for by an operator: (left, right) -> when.
    forced_merges: HashMap<(RangeId, RangeId), u64>,
    /// Last "load on one key" log line per range.
    skip_logged: HashMap<RangeId, u64>,
    /// The range map as of the last tick (descriptors), for stale replica answers.
    map_cache: Arc<Vec<RangeDescriptor>>,
    /// DRAINING stores holding no replica, as of the last tick.
    drained: Vec<StoreId>,
}

struct Shared {
    config: Config,
    meta: Meta,
    cluster_id: String,
    me: PlacementMember,
    state: tokio_watch::Receiver<ElectionState>,
    metrics: Metrics,
    paused: AtomicBool,
    mem: parking_lot::Mutex<LeaderMem>,
    ids: tokio::sync::Mutex<(u64, u64)>,
    channels: parking_lot::Mutex<HashMap<String, Channel>>,
    cancel: CancellationToken,
    guard: auth::Guard,
    /// mTLS is on: callers are admitted by their certificate's role (ADR 0022).
    tls: bool,
    /// Our certificate and the cluster CA, for the calls this instance makes.
    client_tls: Option<skv_rpc::tls::ClientTls>,
    /// `--object-store-url`: backups and restores (ADR 0028).
    objects: Option<skv_objstore::Objects>,
    backup_metrics: backup::BackupMetrics,
    /// Backups (by id) and the restore running on this instance.
    jobs: parking_lot::Mutex<std::collections::HashSet<String>>,
}

/// Starts a placement instance on an already opened metadata store.
pub async fn start_with_store(config: Config, store: DynMetaStore) -> anyhow::Result<ServiceHandle> {
    let server_tls = config.tls()?;
    // Read now: a file that does not load fails the start with its name.
    if let Some(t) = &server_tls {
        t.load()?;
    }
    let client_tls = match &server_tls {
        Some(t) => Some(skv_rpc::tls::ClientTls::load(
            t.client_ca_file.as_deref().unwrap_or(&t.cert_file),
            Some((&t.cert_file, &t.key_file)),
        )?),
        None => None,
    };
    let cancel = CancellationToken::new();
    let guard = auth::Guard::from_config(&config, cancel.child_token()).await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    if config.advertise.is_none() && addr.ip().is_unspecified() {
        tracing::warn!(%addr, "listening on a wildcard address without --advertise: other instances cannot forward here");
    }
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());
    let name = config.name.clone().unwrap_or_else(|| advertise.clone());
    let (metrics, mut registry) = Metrics::new_registry();
    let objects = match &config.object_store_url {
        None => None,
        Some(u) => {
            let url: skv_objstore::ObjectStoreUrl = u.parse()?;
            let o = skv_objstore::Objects::open(&url, skv_objstore::ObjMetrics::new()).await?;
            o.metrics.register(&mut registry);
            tracing::info!(url = %url, "backups to object storage");
            Some(o)
        }
    };
    let backup_metrics = backup::BackupMetrics::default();
    backup_metrics.register(&mut registry);
    // etcd's retry series (zeros with the embedded store, which never retries).
    store
        .client_metrics()
        .unwrap_or_default()
        .register(registry.sub_registry_with_prefix("skv_placement"));
    let layout = Layout::new(&config.etcd_prefix);
    let meta = Meta::new(store.clone(), layout.clone(), metrics.clone());
    let mut attempt = 0;
    let cluster_id = loop {
        match meta.bootstrap().await {
            Ok(id) => break id,
            Err(e) if attempt < 20 => {
                attempt += 1;
                tracing::warn!(code = %e.code(), error = %e, "bootstrap failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("bootstrap failed: {e}")),
        }
    };
    let ready = Readiness::default();
    let metrics_addr = match config.metrics_listen {
        Some(l) => Some(serve_metrics(l, Arc::new(registry), ready.clone(), cancel.clone()).await?),
        None => None,
    };
    let me = PlacementMember {
        name,
        address: advertise,
    };
    let (state_tx, state_rx) = tokio_watch::channel(ElectionState::default());
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
        guard,
        tls: server_tls.is_some(),
        client_tls,
        objects,
        backup_metrics,
        jobs: parking_lot::Mutex::new(std::collections::HashSet::new()),
    });
    let election_task = tokio::spawn(election::run(
        store,
        layout,
        me.clone(),
        config.lease_ttl_secs,
        state_tx,
        cancel.clone(),
    ));
    let leader_task = tokio::spawn(leader::leader_loop(shared.clone()));
    let admin_svc = PlacementAdminServer::new(PlacementAdminService { s: shared.clone() })
        .max_decoding_message_size(skv_common::limits::DEFAULT_MAX_MESSAGE_LEN);
    let svc = PlacementServer::new(PlacementService { s: shared })
        .max_decoding_message_size(skv_common::limits::DEFAULT_MAX_MESSAGE_LEN);
    // TLS through skv_rpc (certificates re-read every few seconds, ADR 0022), or plaintext.
    let (tls_incoming, plain_incoming) = match &server_tls {
        Some(t) => (Some(t.incoming(listener)?), None),
        None => (None, Some(skv_rpc::incoming(listener))),
    };
    ready.set(true);
    tracing::info!(%addr, name = %me.name, "placement serving");
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .add_service(svc)
            .add_service(admin_svc);
        let stop = c.clone().cancelled_owned();
        let r = match (tls_incoming, plain_incoming) {
            (Some(tls), _) => router.serve_with_incoming_shutdown(tls, stop).await,
            (None, Some(plain)) => router.serve_with_incoming_shutdown(plain, stop).await,
            (None, None) => Ok(()),
        };
        c.cancel();
        let _ = leader_task.await;
        let _ = election_task.await;
        r.map_err(anyhow::Error::from)
    });
    Ok(ServiceHandle::new(addr, metrics_addr, cancel, task))
}

impl Shared {
    /// Refuses `request` unless its token allows `needed` (ADR 0021; [`auth::Guard`]). Under
    /// mTLS (ADR 0022) only admin and placement certificates may call; an admin certificate
    /// is a credential of its own, and a placement peer forwarding a call already checked it.
    fn authorize<T>(&self, request: &Request<T>, call: &'static str, needed: Role) -> Result<(), Status> {
        self.admit(request, call, auth::ADMIN_CALLERS)?;
        if self.tls {
            match skv_rpc::tls::peer_role(request) {
                Some(PeerRole::Admin) => return Ok(()),
                Some(PeerRole::Placement) if request.metadata().contains_key(forward::FORWARDED) => return Ok(()),
                _ => {}
            }
        }
        self.guard
            .check(request.metadata(), call, needed, &self.metrics)
            .map_err(Status::from)
    }

    /// Under mTLS, refuses a caller whose certificate names none of `roles` (ADR 0022).
    fn admit<T>(&self, request: &Request<T>, call: &'static str, roles: &'static [PeerRole]) -> Result<(), Status> {
        let r = skv_rpc::tls::RequireRole::new(self.tls, call, roles).admits(skv_rpc::tls::peer_role(request));
        if r.is_err() {
            self.metrics
                .auth_refusals
                .get_or_create(&Metrics::labels(&[("call", call), ("reason", "certificate_role")]))
                .inc();
        }
        r
    }

    fn is_leader(&self) -> bool {
        self.state.borrow().is_leader
    }

    /// Every store with its effective state (the leader overlays fresher heartbeats).
    async fn current_stores(&self) -> PlacementResult<Vec<StoreInfo>> {
        let mut stores = self.meta.stores().await?;
        if self.is_leader() {
            let mem = self.mem.lock();
            for s in stores.iter_mut() {
                if let Some(m) = mem.stores.get(&StoreId(s.store_id))
                    && m.last_heartbeat_ms >= s.last_heartbeat_ms
                {
                    *s = m.clone();
                }
            }
        }
        let now = now_ms();
        let down_after = self.config.store_down_after_ms;
        Ok(stores.into_iter().map(|s| effective(s, now, down_after)).collect())
    }

    /// Applies descriptors and keeps the heartbeat cache coherent.
    async fn apply(&self, incoming: &[Incoming]) -> PlacementResult<ApplyOutcome> {
        let out = self.meta.apply(incoming).await?;
        let mut mem = self.mem.lock();
        for inc in incoming {
            mem.last_applied.remove(&RangeId(inc.desc.range_id));
        }
        if matches!(out, ApplyOutcome::Applied) {
            mem.map_cache = Arc::new(Vec::new());
        }
        Ok(out)
    }
}

/// The `Placement` gRPC service.
#[derive(Clone)]
pub struct PlacementService {
    s: Arc<Shared>,
}

/// The answer of a concern, as gRPC: the response, or the error's status with its code.
fn reply<T>(r: PlacementResult<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

/// Writes and admin calls run on the leader: a follower forwards them ([`forward::to_leader`]).
macro_rules! on_leader {
    ($self:ident, $request:ident, $method:ident, $concern:expr, admin) => {
        if $self.s.is_leader() {
            reply($concern(&$self.s, $request.into_inner()).await)
        } else {
            forward::to_leader(&$self.s, $request, |ch, r| async move {
                PlacementAdminClient::new(ch).$method(r).await
            })
            .await
        }
    };
    ($self:ident, $request:ident, $method:ident, $concern:expr) => {
        if $self.s.is_leader() {
            reply($concern(&$self.s, $request.into_inner()).await)
        } else {
            forward::to_leader(&$self.s, $request, |ch, r| async move {
                PlacementClient::new(ch).$method(r).await
            })
            .await
        }
    };
}

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn register_store(
        &self,
        request: Request<RegisterStoreRequest>,
    ) -> Result<Response<RegisterStoreResponse>, Status> {
        self.s.admit(&request, "RegisterStore", auth::STORE_CALLERS)?;
        on_leader!(self, request, register_store, heartbeat::register_store)
    }

    async fn store_heartbeat(
        &self,
        request: Request<StoreHeartbeatRequest>,
    ) -> Result<Response<StoreHeartbeatResponse>, Status> {
        self.s.admit(&request, "StoreHeartbeat", auth::STORE_CALLERS)?;
        on_leader!(self, request, store_heartbeat, heartbeat::store_heartbeat)
    }

    async fn range_heartbeat(
        &self,
        request: Request<RangeHeartbeatRequest>,
    ) -> Result<Response<RangeHeartbeatResponse>, Status> {
        self.s.admit(&request, "RangeHeartbeat", auth::STORE_CALLERS)?;
        on_leader!(self, request, range_heartbeat, heartbeat::range_heartbeat)
    }

    async fn report_split(
        &self,
        request: Request<ReportSplitRequest>,
    ) -> Result<Response<ReportSplitResponse>, Status> {
        self.s.admit(&request, "ReportSplit", auth::STORE_CALLERS)?;
        on_leader!(self, request, report_split, heartbeat::report_split)
    }

    async fn report_merge(
        &self,
        request: Request<ReportMergeRequest>,
    ) -> Result<Response<ReportMergeResponse>, Status> {
        self.s.admit(&request, "ReportMerge", auth::STORE_CALLERS)?;
        on_leader!(self, request, report_merge, heartbeat::report_merge)
    }

    async fn get_range(&self, request: Request<GetRangeRequest>) -> Result<Response<GetRangeResponse>, Status> {
        self.s.admit(&request, "GetRange", auth::READERS)?;
        reply(query::get_range(&self.s, request.into_inner()).await)
    }

    async fn scan_ranges(&self, request: Request<ScanRangesRequest>) -> Result<Response<ScanRangesResponse>, Status> {
        self.s.admit(&request, "ScanRanges", auth::READERS)?;
        reply(query::scan_ranges(&self.s, request.into_inner()).await)
    }

    type WatchRangesStream = ReceiverStream<Result<WatchRangesResponse, Status>>;

    async fn watch_ranges(
        &self,
        request: Request<WatchRangesRequest>,
    ) -> Result<Response<Self::WatchRangesStream>, Status> {
        self.s.admit(&request, "WatchRanges", auth::READERS)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(watch::watch_ranges_task(self.s.clone(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_stores(&self, request: Request<GetStoresRequest>) -> Result<Response<GetStoresResponse>, Status> {
        self.s.admit(&request, "GetStores", auth::READERS)?;
        reply(query::get_stores(&self.s).await)
    }

    async fn alloc_ids(&self, request: Request<AllocIdsRequest>) -> Result<Response<AllocIdsResponse>, Status> {
        self.s.admit(&request, "AllocIds", auth::STORE_CALLERS)?;
        on_leader!(self, request, alloc_ids, query::alloc_ids)
    }

    async fn get_members(&self, request: Request<GetMembersRequest>) -> Result<Response<GetMembersResponse>, Status> {
        self.s.admit(&request, "GetMembers", auth::READERS)?;
        reply(query::get_members(&self.s).await)
    }

    async fn split_range(&self, request: Request<AdminSplitRequest>) -> Result<Response<AdminSplitResponse>, Status> {
        self.s.authorize(&request, "SplitRange", Role::Admin)?;
        on_leader!(self, request, split_range, admin::split_range)
    }

    async fn transfer_leader(
        &self,
        request: Request<AdminTransferLeaderRequest>,
    ) -> Result<Response<AdminTransferLeaderResponse>, Status> {
        self.s.authorize(&request, "TransferLeader", Role::Admin)?;
        on_leader!(self, request, transfer_leader, admin::transfer_leader)
    }

    async fn merge_ranges(&self, request: Request<AdminMergeRequest>) -> Result<Response<AdminMergeResponse>, Status> {
        self.s.authorize(&request, "MergeRanges", Role::Admin)?;
        on_leader!(self, request, merge_ranges, admin::merge_ranges)
    }

    async fn move_replica(
        &self,
        request: Request<AdminMoveReplicaRequest>,
    ) -> Result<Response<AdminMoveReplicaResponse>, Status> {
        self.s.authorize(&request, "MoveReplica", Role::Admin)?;
        on_leader!(self, request, move_replica, admin::move_replica)
    }

    async fn drain_store(
        &self,
        request: Request<AdminDrainStoreRequest>,
    ) -> Result<Response<AdminDrainStoreResponse>, Status> {
        self.s.authorize(&request, "DrainStore", Role::Admin)?;
        on_leader!(self, request, drain_store, admin::drain_store)
    }

    async fn set_scheduler_paused(
        &self,
        request: Request<SetSchedulerPausedRequest>,
    ) -> Result<Response<SetSchedulerPausedResponse>, Status> {
        self.s.authorize(&request, "SetSchedulerPaused", Role::Admin)?;
        on_leader!(self, request, set_scheduler_paused, admin::set_scheduler_paused)
    }
}

/// The `PlacementAdmin` gRPC service: what lives in the leader's memory.
#[derive(Clone)]
pub struct PlacementAdminService {
    s: Arc<Shared>,
}

#[tonic::async_trait]
impl PlacementAdmin for PlacementAdminService {
    async fn range_stats(&self, request: Request<RangeStatsRequest>) -> Result<Response<RangeStatsResponse>, Status> {
        self.s.authorize(&request, "RangeStats", Role::Read)?;
        on_leader!(self, request, range_stats, query::range_stats, admin)
    }

    async fn store_status(
        &self,
        request: Request<StoreStatusRequest>,
    ) -> Result<Response<StoreStatusResponse>, Status> {
        self.s.authorize(&request, "StoreStatus", Role::Read)?;
        on_leader!(self, request, store_status, query::store_status, admin)
    }

    async fn list_operators(
        &self,
        request: Request<ListOperatorsRequest>,
    ) -> Result<Response<ListOperatorsResponse>, Status> {
        self.s.authorize(&request, "ListOperators", Role::Read)?;
        on_leader!(self, request, list_operators, query::list_operators, admin)
    }

    async fn create_backup(
        &self,
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<CreateBackupResponse>, Status> {
        self.s.authorize(&request, "CreateBackup", Role::Admin)?;
        on_leader!(self, request, create_backup, backup::create_backup, admin)
    }

    async fn list_backups(
        &self,
        request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        self.s.authorize(&request, "ListBackups", Role::Admin)?;
        on_leader!(self, request, list_backups, backup::list_backups, admin)
    }

    async fn delete_backup(
        &self,
        request: Request<DeleteBackupRequest>,
    ) -> Result<Response<DeleteBackupResponse>, Status> {
        self.s.authorize(&request, "DeleteBackup", Role::Admin)?;
        on_leader!(self, request, delete_backup, backup::delete_backup, admin)
    }

    async fn restore_backup(
        &self,
        request: Request<RestoreBackupRequest>,
    ) -> Result<Response<RestoreBackupResponse>, Status> {
        self.s.authorize(&request, "RestoreBackup", Role::Admin)?;
        on_leader!(self, request, restore_backup, backup::restore_backup, admin)
    }

    async fn restore_status(
        &self,
        request: Request<RestoreStatusRequest>,
    ) -> Result<Response<RestoreStatusResponse>, Status> {
        self.s.authorize(&request, "RestoreStatus", Role::Admin)?;
        on_leader!(self, request, restore_status, backup::restore_status, admin)
    }
}
