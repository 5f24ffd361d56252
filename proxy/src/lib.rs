//! skv-proxy: the stateless client-facing gateway (DESIGN.md §7).
//!
//! It serves `skv.v1.Kv` (plus gRPC reflection of `skv.v1` only, and health),
//! authenticates every call with a JWT ([`auth`]), holds each tenant to its quotas
//! ([`quota`]), confines each tenant to its namespace ([`namespace`]), routes
//! each key to its range through a cache of the range map ([`routing`], kept fresh from
//! placement and from storenodes' routing errors), and retries what is safe to retry.
//!
//! Consistency notes: single-key operations are linearizable (the storenode leader
//! serves them). A `Scan` reads each range's part from one point (one storenode stream
//! per range, from one ReadIndex and one engine snapshot); a stream that breaks after it
//! delivered keys fails the scan with a resume hint instead of mixing points. Batches
//! make one storenode call per range (atomic within the range, not across ranges).
//! What is retried is decided in [`retry`], purely.

/// JWT verification lives in `skv-auth` (shared with placement); re-exported under its old path.
pub use skv_auth as auth;
pub mod metrics;
pub mod namespace;
pub mod quota;
pub mod retry;
pub mod router;
pub mod routing;
pub mod service;

use anyhow::Context as _;
use skv_common::service::ServiceHandle;
use skv_common::telemetry::{LogFormat, Readiness};
use skv_proto::v1::kv_server::KvServer;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::server::NamedService;

pub use router::{OUTCOME_METADATA_KEY, is_outcome_unknown};

/// Command-line and environment configuration of `skv-proxy`.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "skv-proxy", version, about = "skv client-facing proxy")]
#[command(group(
    clap::ArgGroup::new("jwt_key")
        .required(true)
        .multiple(false)
        .args(["jwt_hs256_secret_file", "jwt_public_key_file", "jwt_jwks_file", "jwt_jwks_url"])
))]
pub struct Config {
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "SKV_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Placement URLs, comma separated (http://host:port,...).
    #[arg(long, env = "SKV_PLACEMENT", value_delimiter = ',', required = true)]
    pub placement: Vec<String>,
    /// JWT keys (exactly one source), reload interval, issuer and audience.
    #[command(flatten)]
    pub jwt: auth::JwtArgs,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "SKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest value accepted, in bytes.
    #[arg(long, env = "SKV_MAX_VALUE_LEN", default_value_t = skv_common::limits::DEFAULT_MAX_VALUE_LEN)]
    pub max_value_len: usize,
    /// Largest gRPC request message decoded, in bytes.
    #[arg(long, env = "SKV_MAX_MESSAGE_LEN", default_value_t = skv_common::limits::DEFAULT_MAX_MESSAGE_LEN)]
    pub max_message_len: usize,
    /// Deadline of a request when the client sends no grpc-timeout, in milliseconds.
    #[arg(long, env = "SKV_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// Requests per second allowed per namespace (0 = unlimited); more get
    /// RESOURCE_EXHAUSTED with a `retry-after-ms` hint. Per proxy instance.
    #[arg(long, env = "SKV_TENANT_RATE_LIMIT", default_value_t = 0)]
    pub tenant_rate_limit: u32,
    /// Requests a namespace may send at once after a quiet spell (token bucket size;
    /// 0 = one second's worth, the rate limit).
    #[arg(long, env = "SKV_TENANT_RATE_BURST", default_value_t = 0)]
    pub tenant_rate_burst: u32,
    /// Concurrent requests allowed per namespace (0 = unlimited); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SKV_TENANT_MAX_CONCURRENCY", default_value_t = 1024)]
    pub tenant_max_concurrency: usize,
    /// Per-namespace overrides of the three tenant limits: the `[tenants.<namespace>]`
    /// tables of the `--config` file (`rate-limit`, `rate-burst`, `max-concurrency`).
    #[arg(skip)]
    pub tenants: BTreeMap<String, quota::TenantOverride>,
    /// Log format.
    #[arg(long, env = "SKV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export tracing spans over OTLP/gRPC to this collector URL (e.g.
    /// `http://127.0.0.1:4317`; plaintext only, `https://` is refused); off when unset (ADR 0024).
    #[arg(long, env = "SKV_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// TLS on the client port: this certificate chain (PEM; with --client-tls-key-file).
    #[arg(long, env = "SKV_CLIENT_TLS_CERT_FILE", requires = "client_tls_key_file")]
    pub client_tls_cert_file: Option<PathBuf>,
    /// The private key of --client-tls-cert-file (PEM).
    #[arg(long, env = "SKV_CLIENT_TLS_KEY_FILE", requires = "client_tls_cert_file")]
    pub client_tls_key_file: Option<PathBuf>,
    /// Clients must also present a certificate chaining to this CA (PEM); without it any
    /// client may connect (tokens still decide what it may do).
    #[arg(long, env = "SKV_CLIENT_TLS_CA_FILE", requires = "client_tls_cert_file")]
    pub client_tls_ca_file: Option<PathBuf>,
    /// mTLS inside the cluster (ADR 0022): the proxy's certificate (PEM, role proxy),
    /// presented to placement and storenodes, whose certificates must chain to
    /// --tls-ca-file. With --tls-key-file and --tls-ca-file.
    #[arg(long, env = "SKV_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of --tls-cert-file (PEM).
    #[arg(long, env = "SKV_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// The cluster CA (PEM) that placement's and storenodes' certificates must chain to.
    #[arg(long, env = "SKV_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

impl Config {
    /// Defaults for in-process use (tests, playground): listen on 127.0.0.1:0.
    pub fn new(placement: Vec<String>, jwt_hs256_secret_file: PathBuf) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            placement,
            jwt: auth::JwtArgs::hs256(jwt_hs256_secret_file),
            metrics_listen: None,
            max_value_len: skv_common::limits::DEFAULT_MAX_VALUE_LEN,
            max_message_len: skv_common::limits::DEFAULT_MAX_MESSAGE_LEN,
            request_timeout_ms: 5000,
            tenant_rate_limit: 0,
            tenant_rate_burst: 0,
            tenant_max_concurrency: 1024,
            tenants: BTreeMap::new(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            client_tls_cert_file: None,
            client_tls_key_file: None,
            client_tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
        }
    }
}

impl Config {
    /// The one key source the flags name.
    pub fn key_source(&self) -> anyhow::Result<auth::KeySource> {
        match self.jwt.key_source() {
            Ok(Some(source)) => Ok(source),
            _ => anyhow::bail!(
                "exactly one of --jwt-hs256-secret-file, --jwt-public-key-file, --jwt-jwks-file or --jwt-jwks-url is required"
            ),
        }
    }

    /// The proxy's mTLS to placement and storenodes, if the three `--tls-*` flags are given.
    pub fn internal_tls(&self) -> anyhow::Result<Option<skv_rpc::tls::ClientTls>> {
        let flags = skv_rpc::tls::ServerTls::from_flags(
            self.tls_cert_file.as_deref(),
            self.tls_key_file.as_deref(),
            self.tls_ca_file.as_deref(),
            ["--tls-cert-file", "--tls-key-file", "--tls-ca-file"],
        )?;
        Ok(match flags {
            Some(t) => Some(skv_rpc::tls::ClientTls::load(
                t.client_ca_file.as_deref().unwrap_or(&t.cert_file),
                Some((&t.cert_file, &t.key_file)),
            )?),
            None => None,
        })
    }

    /// TLS of the client port, if its flags are given.
    pub fn client_tls(&self) -> anyhow::Result<Option<skv_rpc::tls::ServerTls>> {
        match (&self.client_tls_cert_file, &self.client_tls_key_file) {
            (None, None) if self.client_tls_ca_file.is_some() => {
                anyhow::bail!("--client-tls-ca-file needs --client-tls-cert-file and --client-tls-key-file")
            }
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(skv_rpc::tls::ServerTls {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: self.client_tls_ca_file.clone(),
            })),
            _ => anyhow::bail!("--client-tls-cert-file and --client-tls-key-file go together"),
        }
    }

    /// The limits every namespace gets unless the config file overrides them.
    pub fn tenant_limits(&self) -> quota::TenantLimits {
        quota::TenantLimits {
            rate: self.tenant_rate_limit,
            burst: self.tenant_rate_burst,
            max_concurrency: self.tenant_max_concurrency,
        }
    }
}

/// The descriptors of the public API (`skv.v1`) only: reflection at the proxy can neither
/// list nor describe the internal services (Store, Raft, Placement).
fn public_descriptor_set() -> anyhow::Result<prost_types::FileDescriptorSet> {
    use prost::Message as _;
    let mut set = prost_types::FileDescriptorSet::decode(skv_proto::FILE_DESCRIPTOR_SET)
        .context("decoding the embedded descriptor set")?;
    set.file.retain(|f| f.package() == "skv.v1");
    anyhow::ensure!(!set.file.is_empty(), "the embedded descriptor set has no skv.v1 file");
    Ok(set)
}

/// Starts the proxy: binds `config.listen` (and `--metrics-listen`), loads the range
/// map from placement (best effort, it keeps following the watch), and serves until
/// the returned handle is shut down.
pub async fn start(config: Config) -> anyhow::Result<ServiceHandle> {
    let client_tls = config.client_tls()?;
    // Read before anything starts: a bad file fails the start with its name.
    if let Some(t) = &client_tls {
        t.load()?;
    }
    let internal_tls = config.internal_tls()?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    let cancel = CancellationToken::new();
    let verifier = {
        let metrics = metrics.clone();
        config
            .jwt
            .load(config.key_source()?, cancel.child_token(), move |r, v| match r {
                auth::Reload::Loaded => {
                    metrics.jwt_key_reload("loaded");
                    metrics.jwt_keys.set(v.key_ids().len() as i64);
                }
                auth::Reload::Refused => metrics.jwt_key_reload("refused"),
                auth::Reload::Unchanged => {}
            })
            .await?
    };
    let public = public_descriptor_set()?;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(public.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("skv.v1.Kv")
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    anyhow::ensure!(config.max_value_len > 0, "--max-value-len must be positive");
    anyhow::ensure!(config.max_message_len > 0, "--max-message-len must be positive");
    if config.max_message_len < config.max_value_len + skv_common::limits::MAX_KEY_LEN {
        tracing::warn!(
            max_message_len = config.max_message_len,
            max_value_len = config.max_value_len,
            "--max-message-len is smaller than the largest key plus value; large puts will be refused"
        );
    }
    anyhow::ensure!(config.request_timeout_ms > 0, "--request-timeout-ms must be positive");

    metrics.jwt_keys.set(verifier.key_ids().len() as i64);
    let internal = skv_rpc::EndpointOptions {
        tls: internal_tls,
        ..Default::default()
    };
    let placement = skv_rpc::PlacementMembers::with_options(&config.placement, &internal)?;
    let router = Arc::new(router::Router::with_store_options(placement, metrics.clone(), internal));
    let quotas = quota::Quotas::new(config.tenant_limits(), config.tenants.clone(), metrics.clone());

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let ready = Readiness::default();
    let metrics_addr = match config.metrics_listen {
        Some(m) => Some(
            skv_common::telemetry::serve_metrics(m, Arc::new(registry), ready.clone(), cancel.clone())
                .await
                .with_context(|| format!("binding metrics on {m}"))?,
        ),
        None => None,
    };

    router.initial_load(Duration::from_secs(1)).await;
    tokio::spawn(router.clone().run_watch(cancel.child_token()));
    // Ready (for /readyz) once the proxy knows at least one range.
    {
        let router = router.clone();
        let ready = ready.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            while router.cached_ranges() == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            ready.set(true);
        });
    }

    let kv = service::KvService::new(
        router,
        verifier,
        metrics,
        quotas,
        service::ServiceLimits {
            max_value_len: config.max_value_len,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        },
    );
    let kv = KvServer::new(kv)
        .max_decoding_message_size(config.max_message_len)
        .max_encoding_message_size(usize::MAX);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<KvServer<service::KvService>>().await;
    {
        let cancel = cancel.clone();
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            reporter.set_not_serving::<KvServer<service::KvService>>().await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        });
    }

    // TLS through skv_rpc (certificates re-read every few seconds, ADR 0022), or plaintext.
    let (tls_incoming, plain_incoming) = match &client_tls {
        Some(t) => (Some(t.incoming(listener).context("TLS on the client port")?), None),
        None => (None, Some(skv_rpc::incoming(listener))),
    };
    let shutdown = cancel.clone().cancelled_owned();
    let router = tonic::transport::Server::builder()
        // Notice dead clients (and release their tenant slots) on idle connections.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(OversizeAsResourceExhausted(kv))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let task = tokio::spawn(async move {
        match (tls_incoming, plain_incoming) {
            (Some(tls), _) => router.serve_with_incoming_shutdown(tls, shutdown).await,
            (None, Some(plain)) => router.serve_with_incoming_shutdown(plain, shutdown).await,
            (None, None) => Ok(()),
        }
        .context("proxy gRPC server")?;
        Ok(())
    });
    tracing::info!(%addr, metrics = ?metrics_addr, tls = client_tls.is_some(), client_certificates = client_tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()), "skv-proxy listening");
    Ok(ServiceHandle::new(addr, metrics_addr, cancel, task))
}

/// Rewrites tonic's OUT_OF_RANGE answer to a request message over the decode limit
/// into RESOURCE_EXHAUSTED (what the gRPC spec asks for). The Kv service itself never
/// answers OUT_OF_RANGE, so every such status comes from the codec.
#[derive(Clone)]
struct OversizeAsResourceExhausted<S>(S);

impl<S: NamedService> NamedService for OversizeAsResourceExhausted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for OversizeAsResourceExhausted<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            let out_of_range = (tonic::Code::OutOfRange as i32).to_string();
            if resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
            {
                let code = (tonic::Code::ResourceExhausted as i32).to_string();
                if let Ok(v) = http::HeaderValue::from_str(&code) {
                    resp.headers_mut().insert("grpc-status", v);
                }
            }
            Ok(resp)
        })
    }
}
