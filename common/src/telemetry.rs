//! Logging (`tracing`, text or JSON) and the metrics/health HTTP endpoint
//! (`/metrics` in Prometheus text via `prometheus-client`, `/healthz`, `/readyz`).

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;

/// Log output format, `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global `tracing` subscriber. `RUST_LOG` overrides the default
/// filter (`info`). Calling it twice is harmless.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,fjall=warn,lsm_tree=warn,h2=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Readiness flag flipped by the service once it can serve.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct MetricsState {
    registry: Arc<Registry>,
    ready: Readiness,
}

async fn metrics(State(s): State<MetricsState>) -> impl IntoResponse {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut body = String::new();
    // The process families and build info, read now (ADR 0024), then the component's own.
    let mut process = Registry::default();
    crate::process_metrics::register_process(&mut process);
    crate::process_metrics::register_build_info(&mut process);
    let encoded = encode_registry(&mut body, &process)
        .and_then(|()| encode_registry(&mut body, &s.registry))
        .and_then(|()| encode_eof(&mut body));
    match encoded {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn readyz(State(s): State<MetricsState>) -> impl IntoResponse {
    if s.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until `cancel`.
/// Returns the bound address (useful with port 0).
pub async fn serve_metrics(
    listen: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    serve_metrics_with(listen, registry, ready, cancel, Router::new()).await
}

/// [`serve_metrics`] plus the routes of `extra` (the storenode's `/failpoints` in builds
/// with failpoints, ADR 0029).
pub async fn serve_metrics_with(
    listen: SocketAddr,
    registry: Arc<Registry>,
    ready: Readiness,
    cancel: CancellationToken,
    extra: Router,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(MetricsState { registry, ready })
        .merge(extra);
    tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let mut reg = Registry::default();
        let c: Counter = Counter::default();
        reg.register("skv_test_things", "Things", c.clone());
        c.inc();
        let ready = Readiness::default();
        let cancel = CancellationToken::new();
        let addr = serve_metrics(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(reg),
            ready.clone(),
            cancel.clone(),
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let m = get("/metrics").await;
        assert!(m.contains("skv_test_things_total 1"), "{m}");
        assert!(m.contains("process_resident_memory_bytes "), "{m}");
        assert!(m.contains("skv_build_info{"), "{m}");
        assert!(m.trim_end().ends_with("# EOF"), "{m}");
        assert_eq!(m.matches("# EOF").count(), 1, "{m}");
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        cancel.cancel();
    }
}
