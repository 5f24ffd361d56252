//! # skv storage node
//!
//! A storenode holds replicas of ranges. Every range is one openraft group; all ranges
//! of the node share ONE fjall `Database`.
//!
//! ```text
//!  gRPC (tonic, one listener)
//!  ├── Store service  (service.rs)  Get/Write/Scan(stream, scan.rs)/BatchGet/BatchWrite
//!  │                                + admin (CreateReplica, ChangeReplicas,
//!  │                                SplitRange, MergeRanges, TransferLeader, ListReplicas)
//!  └── Raft service   (service.rs)  Send (postcard openraft RPC) / SendSnapshot (chunks)
//!            │
//!  NodeInner (node.rs): RangeId → Replica { RaftGroup, RangeShared{descriptor, ..} }
//!            │
//!  raft/ (the only module naming openraft types; tests/raft_confined.rs checks it)
//!  ├── group.rs          RaftGroup: the crate's own API over one group (reads, proposals,
//!  │                     membership, leadership, stale-read rule) with its own errors/views
//!  ├── mod.rs            TypeConfig, Command/CmdResponse, split seeds
//!  ├── log_store.rs      RaftLogStorage on the `raft` keyspace; appends acked after the
//!  │                     group-commit fsync
//!  ├── state_machine.rs  apply (data + applied state + descriptor in ONE batch),
//!  │                     split, file-backed streaming snapshots
//!  └── network.rs        one tonic Channel per destination store, RaftFilter (tests)
//!            │
//!  engine.rs: fjall Database { data, raft, meta } + the log-sync thread (group commit:
//!             every pending append of every range shares one fsync)
//! ```
//!
//! ## Invariants
//! - A client is acknowledged only after its entry is committed (durable on a quorum:
//!   appends are fsynced before openraft's IO callback fires) and applied locally.
//! - Apply writes the user data, the range's applied log id and (when changed) its
//!   descriptor in one atomic fjall batch; the journal is sequential, so after a crash the
//!   applied state never runs ahead of the durable log.
//! - Versions: a key's version starts at 1 and rises by 1 per put, across deletes. A delete
//!   writes a tombstone record keeping the deleted incarnation's version (`engine::Record`);
//!   get/scan treat it as absent, a condition compares with the live version (0 when absent
//!   or deleted, so if-absent matches a tombstone), and the next put gets version + 1 — a
//!   stale CAS naming an old incarnation's version can never match a new one. Tombstones
//!   are carried in snapshots; they are never garbage-collected yet (known limit).
//! - Split is a Raft command. On apply (every replica): the left descriptor is shortened and
//!   its version +1; the right descriptor gets the same replicas; the right group's storage
//!   is pre-seeded (vote, last purged log id = (term 5, index 5), membership) in the same
//!   batch, then `Raft::new` — never `initialize()`. The old leader's node campaigns first.
//!   The seed batch also deletes the Raft state an uninitialized peer of the right range
//!   left behind and never lowers its vote (a vote not below the seed vote is kept); the
//!   node's creation lock is held from stopping that peer to reopening the range, so no
//!   message recreates it (and votes) in between.
//! - A message for an unknown range creates an uninitialized peer from the carried
//!   descriptor, only if that descriptor lists this store as a replica. A snapshot
//!   overlapping a live (initialized) local range, or another range's pending install, is
//!   refused until the split applies locally (as TiKV); check and claim of the key span are
//!   one step under a node-level lock, the claim lasting until the install committed.
//! - Reads: a linearizable read (Get, BatchGet, Scan) waits for ReadIndex, then re-checks the
//!   range: if a split applied meanwhile, a Scan answers EpochNotMatch (never a silently
//!   clamped result) and a Get of a key that moved answers KeyNotInRange. A Scan (and a
//!   BatchGet) reads ONE engine snapshot taken after the ReadIndex, and re-checks the epoch
//!   after taking it, so its whole stream is one consistent cut. A `stale_ok` read is served
//!   only by a replica whose data is at most 2 × `election_timeout_max` (2 s) old (ADR 0008):
//!   a leader acknowledged by a quorum within 2 s that applied an entry of its own term, or a
//!   follower that within 2 s accepted an AppendEntries from the leader AND has applied the
//!   commit index learnt by then; otherwise NotLeader (a follower applying behind refuses).
//! - Admin calls carry the caller's epoch: ChangeReplicas and TransferLeader are refused with
//!   EpochNotMatch unless `conf_ver` and `version` are current; a membership change is one
//!   log entry per store, proposed only while the membership is still the one the checked
//!   descriptor reflects (a Raft-core precondition), so same-epoch calls cannot both apply.
//! - Descriptor replicas follow membership: when a membership entry applies, replicas become
//!   voters + learners and `conf_ver` +1. After bootstrap the log is snapshotted and purged,
//!   so every later replica starts from a snapshot carrying the descriptor.
//! - Apply: entries that are ready together go into one atomic batch (data + applied
//!   state); split and membership entries are applied alone. Clients are answered after
//!   the batch commits.
//! - Snapshots are files under `<data-dir>/snapshots` streamed from a fjall snapshot
//!   (bounded memory); they are not kept across restarts: openraft rebuilds one on start
//!   when the log is purged. File format v2: magic, descriptor, sorted (key, record) frames,
//!   then a trailer with the pair count and an FNV-1a checksum; the whole file is validated
//!   (checksum, order, span, records) on receipt and again before an install modifies
//!   anything. Installing writes several batches under a redo marker
//!   (`meta: installing/<range>`, fsynced first) and syncs before the new state is
//!   published; on failure the marker stays. On the next start a marked install is finished
//!   from the received (fsynced) file before the range opens; if it cannot be (file gone or
//!   corrupt, marker undecodable), that replica is made uninitialized (data in the install
//!   span, applied state and Raft log deleted; vote and descriptor kept) and waits for a new
//!   snapshot — the node still starts.
//! - The Raft log is truncated highest index first (a crash mid-truncation leaves a prefix,
//!   never a hole) and purged lowest first.
//! - Raft messages are bounded: an AppendEntries carries at most ~4 MiB of entries (plus
//!   one entry): the log reader cuts openraft's replication reads by bytes
//!   (`limited_get_log_entries`), and the stream continues after the last entry sent. Each
//!   RPC's deadline fits its payload (a base plus the bytes at a conservative 2 MiB/s), so a
//!   large message is never retried whole forever for want of time.
//! - Statistics (stats.rs): each range's live bytes (key + value) and keys are kept by apply
//!   (it reads the old record anyway) and stored in `meta: stats/<range>` in the apply batch,
//!   tagged with the applied index; counters that do not match the applied index are
//!   recounted by one scan at open; a split counts the right half by one scan of its span.
//! - Replica GC (gc.rs): a replica removed by an applied membership entry, or named stale by
//!   placement with a descriptor proving it, is stopped, then an fsynced marker + tombstone
//!   replace its descriptor (never reopened), then its data in the parts of its span no live
//!   local replica covers (claimed like an install) and its Raft state are deleted.
//! - Merge (merge.rs, ADR 0016): PrepareMerge freezes the source (`meta: merge/<range>`),
//!   CommitMerge widens the target once every source voter holds the frozen entry and, on each
//!   replica, the local source applied it; the source is retired in the commit batch.
//!
//! ## Known limits
//! - A removed replica is destroyed when it applies the membership entry removing its store,
//!   or when placement names it stale with a descriptor proving it (gc.rs); openraft usually
//!   stops replicating to a removed node before it learns the entry committed, so the
//!   placement path is the one that normally fires.
//! - An uninitialized peer (created by a Raft message) is not reopened after a restart; it
//!   is recreated by the next message.
//! - Idle ranges hibernate (hibernate.rs, ADR 0018; `--raft-hibernate=true`, off by default
//!   until the elasticity e2e runs clean with it): once
//!   a leader idle for `--raft-hibernate-after-ms` has every live follower's consent, the
//!   group's Raft tick stops on every replica (no heartbeats, no election timers); a request,
//!   a proposal, a read, an admin call, a Raft message carrying work, a follower's WakeUp or
//!   a store turning DOWN/UP wakes only the ranges concerned. A sleeping range whose leader
//!   died without anyone asking for it gets a new leader only after placement reports that
//!   store DOWN (`--store-down-after-ms`, 30 s by default).
//! - Object storage (`--object-store-url`, DESIGN §8, checkpoint.rs, ADR 0025): range
//!   leaders upload checkpoints and prune them; learner bootstrap from them, backup and
//!   restore are not built yet.
//! - `--advertise` defaults to the bound address; set it when listening on 0.0.0.0.

pub mod access;
pub mod cache;
pub mod checkpoint;
pub mod engine;
pub mod failpoints;
pub mod gc;
pub mod hibernate;
pub mod merge;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod raft;
pub mod scan;
pub mod service;
pub mod stats;
pub mod tombgc;

use anyhow::Context;
use skv_common::service::ServiceHandle;
use skv_common::telemetry::{LogFormat, Readiness};
use skv_common::{RangeId, StoreId};
use skv_proto::internal::raft_server::RaftServer;
use skv_proto::internal::store_server::StoreServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Storenode configuration (every flag also from `SKV_*` env vars where noted).
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "skv-storenode", about = "skv storage node")]
pub struct Config {
    /// gRPC listen address (Store and Raft services).
    #[arg(long, env = "SKV_LISTEN", default_value = "127.0.0.1:7100")]
    pub listen: SocketAddr,
    /// Address other nodes use to reach this one (default: the bound listen address).
    #[arg(long, env = "SKV_ADVERTISE")]
    pub advertise: Option<String>,
    /// Placement URLs, comma-separated. Empty: standalone (needs --store-id).
    #[arg(long, env = "SKV_PLACEMENT", value_delimiter = ',')]
    pub placement: Vec<String>,
    /// Data directory (fjall database and snapshots).
    #[arg(long, env = "SKV_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Store id; required without --placement.
    #[arg(long, env = "SKV_STORE_ID")]
    pub store_id: Option<u64>,
    /// Serve /metrics, /healthz, /readyz on this address.
    #[arg(long, env = "SKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "SKV_MAX_VALUE_LEN", default_value_t = skv_common::limits::DEFAULT_MAX_VALUE_LEN)]
    pub max_value_len: usize,
    /// Placement heartbeat interval.
    #[arg(long, env = "SKV_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Log format.
    #[arg(long, env = "SKV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export tracing spans over OTLP/gRPC to this collector URL (e.g.
    /// `http://127.0.0.1:4317`; plaintext only, `https://` is refused); off when unset (ADR 0024).
    #[arg(long, env = "SKV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Bytes of the value cache, which keeps hot records in memory in front of the engine
    /// (0 disables it).
    #[arg(long, env = "SKV_VALUE_CACHE_BYTES", default_value_t = cache::DEFAULT_VALUE_CACHE_BYTES)]
    pub value_cache_bytes: u64,
    /// Hibernate idle ranges: stop their Raft timers once every live replica agrees, wake
    /// them on traffic (ADR 0018). On by default; `--raft-hibernate=false` keeps every
    /// range ticking.
    #[arg(long, env = "SKV_RAFT_HIBERNATE", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub raft_hibernate: bool,
    /// How long a range must be idle (no request, proposal or read) before its leader asks
    /// its followers to hibernate, in milliseconds.
    #[arg(long, env = "SKV_RAFT_HIBERNATE_AFTER_MS", default_value_t = 3000)]
    pub raft_hibernate_after_ms: u64,
    /// Largest Raft snapshot this store receives from a peer, in bytes (ADR 0029); a larger
    /// stream is refused with RESOURCE_EXHAUSTED and its partial file deleted. Also the
    /// largest checkpoint a new replica installs from object storage (ADR 0027; past it the
    /// leader's snapshot is used). Default 2 GiB, 16 times placement's default
    /// --split-size-bytes.
    #[arg(long, env = "SKV_SNAPSHOT_MAX_RECEIVE_BYTES", default_value_t = raft::network::DEFAULT_SNAPSHOT_MAX_RECEIVE_BYTES)]
    pub snapshot_max_receive_bytes: u64,
    /// A snapshot stream from a peer must be received within this many seconds, or it is
    /// refused with DEADLINE_EXCEEDED and its partial file deleted (ADR 0029).
    #[arg(long, env = "SKV_SNAPSHOT_RECEIVE_TIMEOUT_SECS", default_value_t = raft::network::DEFAULT_SNAPSHOT_RECEIVE_TIMEOUT_SECS)]
    pub snapshot_receive_timeout_secs: u64,
    /// Build a Raft snapshot (and purge the log) every this many entries.
    #[arg(long, env = "SKV_RAFT_SNAPSHOT_LOGS", default_value_t = 10_000, hide = true)]
    pub raft_snapshot_logs: u64,
    /// mTLS inside the cluster (ADR 0022): this store's certificate (PEM, role storenode),
    /// served on the gRPC port and presented to placement and other storenodes. With
    /// --tls-key-file and --tls-ca-file; then every caller needs a certificate of the CA
    /// (Raft: storenodes; data calls: proxies; admin calls: placement). Re-read every 5 s.
    #[arg(long, env = "SKV_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file (PEM).
    #[arg(long, env = "SKV_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// The cluster CA (PEM): peers' certificates must chain to it.
    #[arg(long, env = "SKV_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Range checkpoints go here (ADR 0025): `s3://bucket/prefix` (with AWS_ENDPOINT,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP) or
    /// `file:///path` (an existing directory). Checked at start. Without it: no checkpoints.
    #[arg(long, env = "SKV_OBJECT_STORE_URL")]
    pub object_store_url: Option<String>,
    /// A led range that applied entries is checkpointed again after this many seconds
    /// (default 300). Needs --object-store-url.
    #[arg(long, env = "SKV_CHECKPOINT_INTERVAL_SECS")]
    pub checkpoint_interval_secs: Option<u64>,
    /// ... or as soon as its live size moved by this many bytes (default 64 MiB). Needs
    /// --object-store-url.
    #[arg(long, env = "SKV_CHECKPOINT_CHANGE_BYTES")]
    pub checkpoint_change_bytes: Option<u64>,
    /// A new replica of this store (a move, a repair, an up-replication) installs the range's
    /// latest checkpoint from object storage and catches up from the leader's log, instead of
    /// receiving the leader's snapshot (ADR 0027). Default true; needs --object-store-url.
    #[arg(long, env = "SKV_BOOTSTRAP_FROM_CHECKPOINTS", num_args = 0..=1, default_missing_value = "true")]
    pub bootstrap_from_checkpoints: Option<bool>,
    /// Every this many seconds, the leader of each range collects the range's delete
    /// tombstones (per range and pass: up to 10,000 in a command of at most 256 KiB) by a replicated command that raises
    /// the range's version floor (ADR 0034). 0 turns the collection off.
    #[arg(long, env = "SKV_TOMBSTONE_GC_INTERVAL_SECS", default_value_t = tombgc::DEFAULT_INTERVAL_SECS)]
    pub tombstone_gc_interval_secs: u64,
}

impl Config {
    /// A config for tests: loopback port 0, standalone with `store_id`.
    pub fn for_test(data_dir: PathBuf, store_id: u64) -> Self {
        Self {
            listen: "127.0.0.1:0"
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
            advertise: None,
            placement: Vec::new(),
            data_dir,
            store_id: Some(store_id),
            metrics_listen: None,
            max_value_len: skv_common::limits::DEFAULT_MAX_VALUE_LEN,
            heartbeat_interval_ms: 1000,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            value_cache_bytes: cache::DEFAULT_VALUE_CACHE_BYTES,
            // Standalone unit tests keep every range ticking (storenode/tests choose it per
            // test); servers started from flags get the flag's default (on).
            raft_hibernate: false,
            raft_hibernate_after_ms: 3000,
            raft_snapshot_logs: 10_000,
            snapshot_max_receive_bytes: raft::network::DEFAULT_SNAPSHOT_MAX_RECEIVE_BYTES,
            snapshot_receive_timeout_secs: raft::network::DEFAULT_SNAPSHOT_RECEIVE_TIMEOUT_SECS,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            object_store_url: None,
            checkpoint_interval_secs: None,
            checkpoint_change_bytes: None,
            bootstrap_from_checkpoints: None,
            tombstone_gc_interval_secs: tombgc::DEFAULT_INTERVAL_SECS,
        }
    }

    /// The snapshot receive bounds; 0 is refused (it would refuse every snapshot).
    pub fn snapshot_receive_limits(&self) -> anyhow::Result<raft::network::ReceiveLimits> {
        if self.snapshot_max_receive_bytes == 0 || self.snapshot_receive_timeout_secs == 0 {
            anyhow::bail!("--snapshot-max-receive-bytes and --snapshot-receive-timeout-secs must be at least 1");
        }
        Ok(raft::network::ReceiveLimits {
            max_bytes: self.snapshot_max_receive_bytes,
            timeout: Duration::from_secs(self.snapshot_receive_timeout_secs),
        })
    }

    /// mTLS settings, if the three `--tls-*` flags are given (all or none).
    pub fn tls(&self) -> Result<Option<skv_rpc::tls::ServerTls>, skv_rpc::tls::TlsError> {
        skv_rpc::tls::ServerTls::from_flags(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            self.tls_ca_file.as_deref(),
            ["--tls-cert-file", "--tls-key-file", "--tls-ca-file"],
        )
    }
}

/// How often the hibernate loop visits the awake replicas (ADR 0018).
const HIBERNATE_LOOP_EVERY: Duration = Duration::from_millis(500);

/// What a test filter decides for one Raft message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAction {
    Pass,
    Drop,
    Delay(Duration),
}

/// Decides the fate of each outgoing Raft message (tests partition/drop/delay traffic).
pub trait RaftFilter: Send + Sync {
    fn check(&self, from: StoreId, to: StoreId, range: RangeId) -> FilterAction;
}

/// Options of [`start_with`] beyond the command line.
#[derive(Clone, Default)]
pub struct StartOptions {
    pub raft_filter: Option<Arc<dyn RaftFilter>>,
}

/// Opens the object store of `--object-store-url` (one check: a wrong URL, a missing
/// bucket or bad credentials fails the start) and registers its metrics.
async fn open_checkpoints(
    config: &Config,
    registry: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Option<checkpoint::Checkpointer>> {
    // Registered with or without object storage, so dashboards find the series everywhere.
    let bm = raft::bootstrap::BootstrapMetrics::default();
    bm.register(registry);
    let om = skv_objstore::ObjMetrics::new();
    om.register(registry);
    let cm = checkpoint::CheckpointMetrics::default();
    cm.register(registry);
    let Some(u) = &config.object_store_url else {
        if config.checkpoint_interval_secs.is_some() || config.checkpoint_change_bytes.is_some() {
            anyhow::bail!("--checkpoint-interval-secs and --checkpoint-change-bytes need --object-store-url");
        }
        if config.bootstrap_from_checkpoints.is_some() {
            anyhow::bail!("--bootstrap-from-checkpoints needs --object-store-url");
        }
        return Ok(None);
    };
    if config.checkpoint_interval_secs == Some(0) || config.checkpoint_change_bytes == Some(0) {
        anyhow::bail!("--checkpoint-interval-secs and --checkpoint-change-bytes must be at least 1");
    }
    // A value that cannot fit a checkpoint block would fail its range's checkpoints forever.
    skv_objstore::format::check_max_value_len(config.max_value_len)
        .map_err(|e| anyhow::anyhow!("--max-value-len {} with --object-store-url: {e}", config.max_value_len))?;
    let url: skv_objstore::ObjectStoreUrl = u.parse()?;
    let objects = skv_objstore::Objects::open(&url, om).await?;
    let policy = checkpoint::CheckpointPolicy {
        interval: Duration::from_secs(config.checkpoint_interval_secs.unwrap_or(300)),
        change_bytes: config.checkpoint_change_bytes.unwrap_or(64 << 20),
        keep: 1,
    };
    let enabled = config.bootstrap_from_checkpoints.unwrap_or(true);
    tracing::info!(url = %url, ?policy, bootstrap = enabled, "range checkpoints to object storage");
    let mut c = checkpoint::Checkpointer::new(objects, policy, cm);
    // Checkpoints and manifests are scoped by the cluster id placement answers with (ADR 0025).
    c.bootstrapper = Some(raft::bootstrap::Bootstrapper::new(
        c.cluster.clone(),
        enabled,
        config.snapshot_max_receive_bytes,
        bm,
    ));
    Ok(Some(c))
}

fn placement_configured(config: &Config) -> bool {
    config.placement.iter().any(|u| !u.trim().is_empty())
}

/// Starts a storenode; returns once it listens.
pub async fn start(config: Config) -> anyhow::Result<ServiceHandle> {
    start_with(config, StartOptions::default()).await
}

/// Starts a storenode with extra options (the Raft transport filter).
pub async fn start_with(config: Config, opts: StartOptions) -> anyhow::Result<ServiceHandle> {
    let server_tls = config.tls()?;
    let receive_limits = config.snapshot_receive_limits()?;
    // mTLS (ADR 0022): what this store presents to placement and to other stores.
    let client_tls = match &server_tls {
        Some(t) => Some(skv_rpc::tls::ClientTls::load(
            t.client_ca_file.as_deref().unwrap_or(&t.cert_file),
            Some((&t.cert_file, &t.key_file)),
        )?),
        None => None,
    };
    let cancel = CancellationToken::new();
    // Stops whatever was spawned if start fails half-way.
    let start_guard = cancel.clone().drop_guard();
    let metrics = metrics::Metrics::new();
    let engine = engine::Engine::open_with(&config.data_dir, metrics.clone(), config.value_cache_bytes)
        .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| addr.to_string());

    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let checkpointer = open_checkpoints(&config, &mut registry).await?;
    let backup_objects = checkpointer.as_ref().map(|c| c.objects.clone());
    // Set from placement's registration answer: checkpoints wait for it.
    let cluster_scope = checkpointer.as_ref().map(|c| (c.objects.clone(), c.cluster.clone()));
    let scope_to = |scope: &Option<(skv_objstore::Objects, checkpoint::ClusterObjects)>, id: &str| {
        if let Some((base, cell)) = scope
            && let Err(e) = cell.set(base, id)
        {
            tracing::error!(error = %e, "checkpoints and bootstraps stay off");
        }
    };
    if cluster_scope.is_some() && placement_configured(&config) {
        tracing::info!("checkpoints start once placement answers with the cluster id");
    } else if cluster_scope.is_some() {
        tracing::warn!("--object-store-url without --placement: no cluster id, so no checkpoint or bootstrap");
    }
    let ready = Readiness::default();
    let metrics_addr = match config.metrics_listen {
        Some(l) => Some(failpoints::serve_metrics(l, Arc::new(registry), ready.clone(), cancel.clone()).await?),
        None => None,
    };
    // Registered with placement: a routable address, never 0.0.0.0 (issue 13).
    let metrics_address = metrics_addr
        .map(|a| metrics::advertised_address(a, &advertise))
        .unwrap_or_default();

    let placement_urls: Vec<String> = config
        .placement
        .iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let placement = if placement_urls.is_empty() {
        None
    } else {
        Some(placement::Placement::with_tls(&placement_urls, client_tls.clone())?)
    };
    let local_id = engine.load_store_id()?;
    let store_id = match (&placement, local_id, config.store_id) {
        (_, Some(local), Some(flag)) if local.0 != flag => {
            anyhow::bail!("data dir belongs to store {local}, but --store-id is {flag}")
        }
        (_, Some(local), _) => local,
        (None, None, Some(flag)) => StoreId(flag),
        (None, None, None) => anyhow::bail!("--store-id is required without --placement"),
        (Some(p), None, flag) => {
            let (id, cluster) = p
                .register(flag.map(StoreId), advertise.clone(), metrics_address.clone(), &cancel)
                .await?;
            scope_to(&cluster_scope, &cluster);
            id
        }
    };
    if store_id.0 == 0 {
        anyhow::bail!("store id 0 is reserved");
    }
    if local_id != Some(store_id) {
        engine.save_store_id(store_id)?;
    }
    if let (Some(p), Some(_)) = (&placement, local_id) {
        // Known id: serve at once, re-register in the background.
        let p = p.clone();
        let (adv, m, c) = (advertise.clone(), metrics_address.clone(), cancel.clone());
        let scope = cluster_scope.clone();
        tokio::spawn(async move {
            if let Ok((_, cluster)) = p.register(Some(store_id), adv, m, &c).await {
                scope_to(&scope, &cluster);
            }
        });
    }

    // A Store request: one value, or a client's batch plus the namespace prefix the proxy
    // added to every key (a BatchWrite becomes one log entry of about this size).
    let max_message = skv_common::limits::max_store_message(config.max_value_len);
    // One AppendEntries carries up to the byte budget plus one entry.
    let raft_message = raft::log_store::APPEND_BYTES_BUDGET + 2 * max_message;
    let transport = raft::network::Transport::new(store_id, opts.raft_filter.clone(), raft_message);
    transport.set_address(store_id, &advertise);
    transport.set_tls(client_tls);
    let hibernate_after = config
        .raft_hibernate
        .then(|| Duration::from_millis(config.raft_hibernate_after_ms.max(1)));
    let raft_config = raft::raft_config(config.raft_snapshot_logs)?.with_hibernation(hibernate_after)?;
    let node = node::NodeInner::new(
        store_id,
        engine.clone(),
        transport,
        raft_config,
        config.data_dir.join("snapshots"),
        metrics.clone(),
    );
    if let Some(c) = &checkpointer {
        *node.bootstrapper.write() = c.bootstrapper.clone();
    }
    if let Some(p) = &placement {
        let p = p.clone();
        let reporter: node::SplitReporter = Arc::new(move |l, r| {
            let p = p.clone();
            tokio::spawn(async move { p.report_split(l, r, store_id).await });
        });
        *node.split_reporter.write() = Some(reporter);
    }
    if let Some(p) = &placement {
        let p = p.clone();
        let reporter: node::MergeReporter = Arc::new(move |merged, source| {
            let p = p.clone();
            tokio::spawn(async move { p.report_merge(merged, source, store_id).await });
        });
        *node.merge_reporter.write() = Some(reporter);
    }
    node.load().await?;
    node.resume_gc()?;

    // A batch read returns up to what the proxy lets a client ask for in one batch.
    let max_response = (max_message.max(skv_common::limits::DEFAULT_MAX_MESSAGE_LEN) * 2)
        .max(skv_common::limits::MAX_BATCH_RESPONSE_BYTES + 1024 * 1024);
    let store_svc = service::StoreService {
        node: node.clone(),
        max_value_len: config.max_value_len,
        max_response_len: max_response,
    };
    let resolver_svc = store_svc.clone();
    let backup_svc = service::backup::BackupService {
        store: store_svc.clone(),
        objects: backup_objects,
    };
    let raft_svc = service::RaftService {
        node: node.clone(),
        receive_limits,
    };
    // Under mTLS each call admits only the roles that make it (ADR 0022).
    let gated = server_tls.is_some();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(skv_rpc::tls::RoleGate::new(
            StoreServer::new(store_svc)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_response),
            gated,
            access::store_callers,
        ))
        .add_service(skv_rpc::tls::RoleGate::new(
            skv_proto::internal::store_backup_server::StoreBackupServer::new(backup_svc)
                .max_decoding_message_size(service::backup::MAX_INGEST_MESSAGE)
                .max_encoding_message_size(max_response),
            gated,
            access::backup_callers,
        ))
        .add_service(skv_rpc::tls::RoleGate::new(
            RaftServer::new(raft_svc)
                .max_decoding_message_size(raft_message)
                .max_encoding_message_size(raft_message),
            gated,
            access::raft_callers,
        ));
    // TLS through skv_rpc (certificates re-read every few seconds, ADR 0022), or plaintext.
    let (tls_incoming, plain_incoming) = match &server_tls {
        Some(t) => (Some(t.incoming(listener)?), None),
        None => (None, Some(skv_rpc::incoming(listener))),
    };

    // Background: gauges and placement heartbeats.
    {
        let node = node.clone();
        let c = cancel.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    // Off the runtime's threads: `refresh_gauges` asks fjall for its disk
                    // space, which waits for fjall's journal lock, held through every journal
                    // fsync and rotation (up to ~160 ms seen during memtable flushes: a
                    // runtime thread of two stalled; write-path-profile.md section 8).
                    _ = t.tick() => {
                        let n = node.clone();
                        let _ = tokio::task::spawn_blocking(move || n.refresh_gauges()).await;
                    }
                }
            }
        });
    }
    if let Some(p) = placement.clone() {
        tokio::spawn(placement::heartbeat_loop(
            p,
            node.clone(),
            advertise.clone(),
            metrics_address.clone(),
            config.data_dir.clone(),
            Duration::from_millis(config.heartbeat_interval_ms.max(10)),
            cancel.clone(),
        ));
    }

    tokio::spawn(merge::resolver_loop(resolver_svc, cancel.clone()));
    if hibernate_after.is_some() {
        tokio::spawn(node.clone().hibernate_loop(HIBERNATE_LOOP_EVERY, cancel.clone()));
    }
    tokio::spawn(node.clone().reopen_deferred(cancel.clone()));
    if let Some(c) = checkpointer {
        tokio::spawn(c.run(node.clone(), cancel.clone()));
    }
    if config.tombstone_gc_interval_secs > 0 {
        tokio::spawn(tombgc::run(
            node.clone(),
            Duration::from_secs(config.tombstone_gc_interval_secs),
            cancel.clone(),
        ));
    }
    node.serving.store(true, std::sync::atomic::Ordering::Release);
    start_guard.disarm();
    ready.set(true);
    tracing::info!(store_id = %store_id, %addr, "storenode listening");
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        let stop = c.cancelled_owned();
        let res = match (tls_incoming, plain_incoming) {
            (Some(tls), _) => server.serve_with_incoming_shutdown(tls, stop).await,
            (None, Some(plain)) => server.serve_with_incoming_shutdown(plain, stop).await,
            (None, None) => Ok(()),
        };
        node.stop_all().await;
        drop(node);
        // Wait for straggling tasks to drop their engine handles so the directory can be
        // reopened in-process (tests restart nodes on the same data dir).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&engine) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        engine.stop_syncer();
        drop(engine);
        res.map_err(anyhow::Error::from)
    });
    Ok(ServiceHandle::new(addr, metrics_addr, cancel, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from(["skv-storenode", "--data-dir", "/tmp/x", "--store-id", "4"]).unwrap();
        assert_eq!(c.listen.port(), 7100);
        assert!(c.placement.is_empty());
        assert_eq!(c.store_id, Some(4));
        assert_eq!(c.max_value_len, skv_common::limits::DEFAULT_MAX_VALUE_LEN);
        assert_eq!(c.heartbeat_interval_ms, 1000);
        assert!(c.raft_hibernate);
        assert_eq!(c.raft_hibernate_after_ms, 3000);
        let on = Config::try_parse_from(["skv-storenode", "--data-dir", "/tmp/x", "--raft-hibernate"]).unwrap();
        assert!(on.raft_hibernate);
        let off = Config::try_parse_from([
            "skv-storenode",
            "--data-dir",
            "/tmp/x",
            "--raft-hibernate=false",
            "--raft-hibernate-after-ms",
            "500",
        ])
        .unwrap();
        assert!(!off.raft_hibernate);
        assert_eq!(off.raft_hibernate_after_ms, 500);
        let c = Config::try_parse_from([
            "skv-storenode",
            "--data-dir",
            "/tmp/x",
            "--placement",
            "http://a:1,http://b:2",
            "--log-format",
            "json",
            "--listen",
            "0.0.0.0:9",
        ])
        .unwrap();
        assert_eq!(c.placement, vec!["http://a:1".to_string(), "http://b:2".to_string()]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(Config::try_parse_from(["skv-storenode"]).is_err());
    }

    #[tokio::test]
    async fn a_max_value_len_over_the_checkpoint_block_limit_is_refused_with_object_storage() {
        let dir = tempfile::tempdir().unwrap();
        let objects = tempfile::tempdir().unwrap();
        let mut c = Config::for_test(dir.path().to_path_buf(), 1);
        c.object_store_url = Some(format!("file://{}", objects.path().display()));
        c.max_value_len = skv_objstore::format::max_value_limit() + 1;
        let err = start(c.clone())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("--max-value-len"), "{err}");
        // The largest value that fits starts.
        c.max_value_len = skv_objstore::format::max_value_limit();
        let h = start(c).await.unwrap();
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn store_id_is_required_without_placement() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::for_test(dir.path().to_path_buf(), 1);
        c.store_id = None;
        assert!(start(c).await.is_err());
    }
}
