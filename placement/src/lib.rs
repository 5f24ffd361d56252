//! skv placement driver: cluster metadata in etcd (or an embedded store), leader
//! election, store and range heartbeats, the range map with a watch, ID allocation,
//! admin operations and the scheduler.
//!
//! - [`meta`]: the [`meta::MetaStore`] trait, [`meta::etcd::EtcdStore`], [`meta::embedded::EmbeddedStore`].
//! - [`layout`]: the key layout under `--etcd-prefix` (documented there).
//! - [`model`]: domain types (descriptors with typed IDs, roles, store states) the decisions
//!   work on; protobuf messages are converted into them once.
//! - [`rangemap`]: pure epoch rules for range map updates.
//! - [`scheduler`]: pure scheduling decisions (placement, repair, drain, split, merge,
//!   balance; docs/adr/0015-scheduler-rules.md).
//! - [`stats`]: range load over a sliding window, from leader heartbeats (memory only).
//! - [`election`]: leader election on leases.
//! - [`cluster`]: typed metadata operations (bootstrap, CAS updates, allocator).
//! - [`error`]: [`error::PlacementError`] and its stable codes (`PD-NotLeader`, ...).
//! - [`server`]: the gRPC `Placement` service, forwarding, the leader loop.
//!
//! ## Behaviour
//! - Run 1 or 3+ instances against one etcd (same `--etcd-prefix`), or one instance on the
//!   embedded store. The first instance to start bootstraps the cluster (one CAS on
//!   `<prefix>/cluster_id`), whatever the number starting at once.
//! - One instance leads ([`election`]). Followers answer reads (GetRange, ScanRanges,
//!   WatchRanges, GetStores, GetMembers) from the metadata store and forward every write and
//!   admin call to the leader (`<prefix>/leader` holds its address; set `--advertise` when
//!   listening on a wildcard address). A follower that does not know the leader answers
//!   `PD-NotLeader` (UNAVAILABLE, with `skv-retry-after-ms`), which callers retry.
//! - Every error is a [`error::PlacementError`]; its stable code travels in the status's
//!   `skv-error-code` metadata (docs/adr/0012-placement-error-codes.md).
//! - Failover: a clean shutdown revokes the leader lease, another instance leads within one
//!   campaign interval (~0.2 s); a crashed leader is replaced after its lease expires
//!   (`--lease-ttl-secs`, default 3 s: measured ~3.3 s).
//! - Range map writes go through [`rangemap::plan_update`] and a CAS transaction, so the map
//!   never goes backwards, even with two leaders.
//! - Only the leader keeps in-memory state (latest store heartbeats, range leader terms,
//!   range load, split times, operators in flight and their cooldowns); a new leader
//!   rebuilds it from heartbeats (so it splits by load only after one window of heartbeats,
//!   and merges only after one merge cooldown). `PlacementAdmin` (RangeStats, StoreStatus,
//!   ListOperators) reads it; followers forward those calls to the leader. Store records are
//!   persisted on registration, on state/address change and at most every
//!   `store_down_after / 5` (clamped to 0.1..5 s) otherwise, so followers judge liveness too.

pub mod cluster;
pub mod election;
pub mod error;
pub mod failpoints;
pub mod layout;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod rangemap;
pub mod scheduler;
pub mod server;
pub mod stats;

use skv_common::service::ServiceHandle;
use skv_common::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// `skv-placement` flags (each also from its `SKV_*` environment variable).
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "skv-placement", version, about = "skv placement driver")]
pub struct Config {
    /// gRPC listen address (port 0 = any).
    #[arg(long, env = "SKV_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Address other instances and clients use to reach this one (default: the bound address).
    #[arg(long, env = "SKV_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory of the embedded metadata store (used when --etcd is empty).
    #[arg(long, env = "SKV_DATA_DIR", default_value = "skv-placement-data")]
    pub data_dir: PathBuf,
    /// etcd endpoints, comma-separated. Empty = the embedded single-node store.
    #[arg(long, env = "SKV_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "SKV_ETCD_PREFIX", default_value = "/skv/default")]
    pub etcd_prefix: String,
    /// Member name (default: the advertised address).
    #[arg(long, env = "SKV_NAME")]
    pub name: Option<String>,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, env = "SKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A store silent longer than this is DOWN.
    #[arg(long, env = "SKV_STORE_DOWN_AFTER_MS", default_value_t = 30_000)]
    pub store_down_after_ms: u64,
    /// Place the first range after this long with fewer than 3 stores.
    #[arg(long, env = "SKV_INITIAL_WAIT_MS", default_value_t = 2000)]
    pub initial_wait_ms: u64,
    /// Scheduler tick. A placed range whose leader has been silent for 20 ticks (10 s by
    /// default) gets CreateReplica again.
    #[arg(long, env = "SKV_SCHEDULE_INTERVAL_MS", default_value_t = 500)]
    pub schedule_interval_ms: u64,
    /// TTL of the leader lease: a crashed leader is replaced after at most about this long.
    #[arg(long, env = "SKV_LEASE_TTL_SECS", default_value_t = 3)]
    pub lease_ttl_secs: u64,
    /// Log format.
    #[arg(long, env = "SKV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export tracing spans over OTLP/gRPC to this collector URL (e.g.
    /// `http://127.0.0.1:4317`; plaintext only, `https://` is refused); off when unset (ADR 0024).
    #[arg(long, env = "SKV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Split a range larger than this many bytes (at its size median; 0 = never).
    #[arg(long, env = "SKV_SPLIT_SIZE_BYTES", default_value_t = 128 << 20)]
    pub split_size_bytes: u64,
    /// Split a range serving more than this many reads+writes per second ... (0 = never)
    #[arg(long, env = "SKV_SPLIT_QPS_THRESHOLD", default_value_t = 2500)]
    pub split_qps_threshold: u64,
    /// ... for this long, at the median of its sampled load (also the statistics window) ...
    #[arg(long, env = "SKV_SPLIT_QPS_WINDOW_SECS", default_value_t = 10)]
    pub split_qps_window_secs: u64,
    /// ... while some store's machine has at least this many CPU cores idle (a ~10 s mean
    /// the stores report) to take half of the work; 0 = split by load whatever the CPU
    /// (ADR 0036).
    #[arg(long, env = "SKV_SPLIT_MIN_IDLE_CPUS", default_value_t = 1.0, value_parser = parse_cpus)]
    pub split_min_idle_cpus: f64,
    /// Merge two adjacent ranges whose combined size is below this (and combined load below
    /// half the split threshold; 0 = never).
    #[arg(long, env = "SKV_MERGE_SIZE_BYTES", default_value_t = 32 << 20)]
    pub merge_size_bytes: u64,
    /// A range never merges within this long of its split.
    #[arg(long, env = "SKV_MERGE_COOLDOWN_SECS", default_value_t = 600)]
    pub merge_cooldown_secs: u64,
    /// Rebuild the replicas of a store DOWN for this long on other stores (0 = never).
    #[arg(long, env = "SKV_REPAIR_AFTER_SECS", default_value_t = 300)]
    pub repair_after_secs: u64,
    /// Learners (snapshots) being added to one store at a time, at most.
    #[arg(long, env = "SKV_MAX_SNAPSHOTS_PER_STORE", default_value_t = 2)]
    pub max_snapshots_per_store: usize,
    /// JWT keys that admin tokens are checked with (the proxy's flags, same meaning). With
    /// none, admin and status calls are refused (`PD-AdminAuthOff`) unless `--admin-auth=none`.
    #[command(flatten)]
    pub jwt: skv_auth::JwtArgs,
    /// `jwt`: admin calls need a token of role admin, status calls any valid token (ADR 0021).
    /// `none`: no check at all, for development on a trusted machine only; refused together
    /// with a JWT key flag.
    #[arg(long, env = "SKV_ADMIN_AUTH", value_enum, default_value_t = AdminAuth::Jwt)]
    pub admin_auth: AdminAuth,
    /// mTLS (ADR 0022): this instance's certificate (PEM, role placement), served to its
    /// callers and presented to the instances and storenodes it calls. With
    /// --tls-key-file and --tls-ca-file; then every caller needs a certificate of the CA.
    #[arg(long, env = "SKV_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file (PEM).
    #[arg(long, env = "SKV_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// The cluster CA (PEM) that callers' and servers' certificates must chain to.
    #[arg(long, env = "SKV_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// TLS to etcd: the CA (PEM) etcd's certificate must chain to (https:// --etcd URLs).
    #[arg(long, env = "SKV_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// The certificate placement presents to etcd, when etcd asks for one
    /// (--client-cert-auth). With --etcd-key-file and --etcd-ca-file.
    #[arg(long, env = "SKV_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,
    /// The private key of --etcd-cert-file (PEM).
    #[arg(long, env = "SKV_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,
    /// Object storage of the cluster's backups (issue 11, ADR 0028): the storenodes'
    /// `--object-store-url` (`s3://bucket/prefix` with the `AWS_*` variables, or
    /// `file:///path`, an existing directory). Checked at start. Without it, backup and
    /// restore calls are refused.
    #[arg(long, env = "SKV_OBJECT_STORE_URL")]
    pub object_store_url: Option<String>,
}

/// A CPU count: a finite number, 0 or more.
fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1e6).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a CPU count (a number, 0 or more, e.g. 1 or 0.5)")),
    }
}

/// How placement authorizes admin and status calls (`--admin-auth`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminAuth {
    /// A JWT checked with the `--jwt-*` key: role admin for changes, any role for status.
    Jwt,
    /// No check (development only).
    None,
}

impl Config {
    /// mTLS settings, if the three `--tls-*` flags are given (all or none).
    pub fn tls(&self) -> Result<Option<skv_rpc::tls::ServerTls>, skv_rpc::tls::TlsError> {
        skv_rpc::tls::ServerTls::from_flags(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            self.tls_ca_file.as_deref(),
            ["--tls-cert-file", "--tls-key-file", "--tls-ca-file"],
        )
    }

    /// `--split-min-idle-cpus` in thousandths of a core.
    pub fn split_min_idle_millicpus(&self) -> u64 {
        (self.split_min_idle_cpus * 1000.0).round() as u64
    }

    /// The load window in milliseconds (at least 1 s), one value for the statistics and the
    /// scheduler alike.
    pub fn split_qps_window_ms(&self) -> u64 {
        self.split_qps_window_secs.saturating_mul(1000).max(1000)
    }

    /// A config for tests: port 0 on 127.0.0.1, everything else default, except that admin
    /// calls are not authorized (`--admin-auth=none`): tests of authorization set a key.
    pub fn for_test(data_dir: impl Into<PathBuf>, etcd: Vec<String>, prefix: &str) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            advertise: None,
            data_dir: data_dir.into(),
            etcd,
            etcd_prefix: prefix.to_string(),
            name: None,
            metrics_listen: None,
            store_down_after_ms: 30_000,
            initial_wait_ms: 2000,
            schedule_interval_ms: 500,
            lease_ttl_secs: 3,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            split_size_bytes: 128 << 20,
            split_qps_threshold: 2500,
            split_qps_window_secs: 10,
            split_min_idle_cpus: 1.0,
            merge_size_bytes: 32 << 20,
            merge_cooldown_secs: 600,
            repair_after_secs: 300,
            max_snapshots_per_store: 2,
            jwt: skv_auth::JwtArgs::default(),
            admin_auth: AdminAuth::None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            object_store_url: None,
        }
    }
}

/// Opens the metadata store the config names: etcd, or the embedded store in
/// `<data-dir>/meta`.
pub async fn open_meta_store(config: &Config) -> anyhow::Result<meta::DynMetaStore> {
    let endpoints: Vec<String> = config
        .etcd
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        if config.etcd_ca_file.is_some() || config.etcd_cert_file.is_some() || config.etcd_key_file.is_some() {
            anyhow::bail!(
                "--etcd-ca-file, --etcd-cert-file and --etcd-key-file need --etcd (the embedded store has no TLS)"
            );
        }
        let s = meta::embedded::EmbeddedStore::open(config.data_dir.join("meta"))?;
        Ok(Arc::new(s))
    } else {
        let tls = skv_rpc::tls::ClientTls::from_flags(
            config.etcd_ca_file.as_deref(),
            config.etcd_cert_file.as_deref(),
            config.etcd_key_file.as_deref(),
            ["--etcd-ca-file", "--etcd-cert-file", "--etcd-key-file"],
        )?
        .map(|t| t.config());
        // etcd may still be starting (compose, k8s): retry for a while.
        let mut attempt = 0;
        loop {
            match meta::etcd::EtcdStore::connect_with_tls(&endpoints, tls.clone()).await {
                Ok(s) => return Ok(Arc::new(s)),
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing::warn!(error = %e, ?endpoints, "etcd not reachable yet; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("cannot connect to etcd {endpoints:?}: {e}")),
            }
        }
    }
}

/// Starts a placement instance; returns once it listens.
pub async fn start(config: Config) -> anyhow::Result<ServiceHandle> {
    let store = open_meta_store(&config).await?;
    server::start_with_store(config, store).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[tokio::test]
    async fn a_bad_object_store_url_fails_the_start_with_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::for_test(dir.path().join("pd"), vec![], "/t");
        c.object_store_url = Some(format!("file://{}/missing", dir.path().display()));
        let err = start(c.clone())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("does not exist"), "{err}");
        c.object_store_url = Some("ftp://host/x".into());
        let err = start(c.clone())
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("is not supported"), "{err}");
        // An existing directory starts.
        let objects = tempfile::tempdir().unwrap();
        c.object_store_url = Some(format!("file://{}", objects.path().display()));
        let h = start(c).await.unwrap();
        h.shutdown().await.unwrap();
    }

    #[test]
    fn flags_and_defaults() {
        let c = Config::try_parse_from([
            "skv-placement",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            "http://127.0.0.1:2379,http://127.0.0.1:2380",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(c.etcd.len(), 2);
        assert_eq!(c.etcd_prefix, "/skv/default");
        assert_eq!(c.store_down_after_ms, 30_000);
        assert_eq!(c.initial_wait_ms, 2000);
        assert_eq!(c.schedule_interval_ms, 500);
        assert_eq!(c.lease_ttl_secs, 3);
        assert_eq!(
            (c.split_size_bytes, c.split_qps_threshold, c.split_qps_window_secs),
            (128 << 20, 2500, 10)
        );
        assert_eq!(c.split_min_idle_millicpus(), 1000);
        assert_eq!((c.merge_size_bytes, c.merge_cooldown_secs), (32 << 20, 600));
        assert_eq!((c.repair_after_secs, c.max_snapshots_per_store), (300, 2));
        let t = Config::try_parse_from([
            "skv-placement",
            "--split-size-bytes",
            "1000",
            "--split-qps-threshold",
            "10",
            "--split-qps-window-secs",
            "2",
            "--split-min-idle-cpus",
            "0.25",
            "--merge-size-bytes",
            "500",
            "--merge-cooldown-secs",
            "5",
            "--repair-after-secs",
            "0",
            "--max-snapshots-per-store",
            "4",
        ])
        .unwrap();
        let sc = server::scheduler_config(&t);
        assert_eq!(
            (sc.split_size_bytes, sc.split_qps_threshold, sc.split_qps_window_ms),
            (1000, 10.0, 2000)
        );
        assert_eq!(
            (sc.merge_size_bytes, sc.merge_cooldown_ms, sc.repair_after_ms),
            (500, 5000, 0)
        );
        assert_eq!(sc.max_snapshots_per_store, 4);
        assert_eq!(sc.split_min_idle_millicpus, 250);
        for bad in ["-1", "NaN", "inf", "x", ""] {
            assert!(
                Config::try_parse_from(["skv-placement", "--split-min-idle-cpus", bad]).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(c.listen.port(), 0);
        let d = Config::try_parse_from(["skv-placement"]).unwrap();
        assert!(d.etcd.is_empty());
        assert_eq!(d.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(d.admin_auth, AdminAuth::Jwt);
        assert_eq!(d.jwt.key_source().unwrap(), None);
        let j = Config::try_parse_from(["skv-placement", "--jwt-jwks-file", "/k.json", "--admin-auth", "jwt"]).unwrap();
        assert_eq!(
            j.jwt.key_source().unwrap(),
            Some(skv_auth::KeySource::Jwks("/k.json".into()))
        );
        assert!(
            Config::try_parse_from([
                "skv-placement",
                "--jwt-jwks-file",
                "/k",
                "--jwt-hs256-secret-file",
                "/s"
            ])
            .is_err()
        );
        assert!(Config::try_parse_from(["skv-placement", "--admin-auth", "maybe"]).is_err());
    }
}
