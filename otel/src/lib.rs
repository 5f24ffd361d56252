//! OTLP export of the servers' `tracing` spans (issue 13, ADR 0024).
//!
//! [`init`] replaces [`skv_common::telemetry::init_logging`] in the server binaries: the
//! same log output (text or JSON, `RUST_LOG`), plus, when `--otlp-endpoint` is set, a
//! `tracing-opentelemetry` layer that sends spans over OTLP/gRPC (tonic, the workspace's
//! 0.14) to a collector, in batches from a background thread. Off by default: without an
//! endpoint nothing of OpenTelemetry runs.
//!
//! What is exported: spans of skv's own crates (targets `skv*`) at DEBUG and above, so the
//! per-request spans are there (`kv` at the proxy with `rpc`, `tenant` and `namespace`;
//! `store_call` at the proxy and `store` at the storenode with `range_id` and `store_id`;
//! placement's `operator`, `admin_split`, `range_heartbeat`, ... with `range_id` and
//! `store_id`), and events at INFO and above as span events. `SKV_OTLP_FILTER` (an
//! `EnvFilter` string) replaces that choice. Spans are not propagated between processes
//! (no `traceparent` on internal calls yet): each process's spans form their own traces.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use skv_common::telemetry::LogFormat;
use std::time::Duration;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("--otlp-endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

/// Keeps the exporter alive; [`OtelGuard::shutdown`] (or drop) flushes the spans not sent yet.
#[must_use = "spans are exported while the guard lives"]
pub struct OtelGuard {
    provider: Option<SdkTracerProvider>,
}

impl OtelGuard {
    /// Sends what is queued (bounded by the exporter's timeout) and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "OTLP exporter shutdown");
        }
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for OtelGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks an `--otlp-endpoint`: an `http://` URL with a host. `https://` is refused: the
/// exporter is built without TLS (ADR 0024), so it would drop every span; credentials in
/// the URL are refused (the endpoint is logged).
pub fn check_endpoint(endpoint: &str) -> Result<(), OtelError> {
    let bad = |shown: &str, reason: &str| OtelError::Endpoint {
        endpoint: shown.to_string(),
        reason: reason.to_string(),
    };
    if endpoint.starts_with("https://") {
        return Err(bad(
            endpoint,
            "https is not supported yet: the OTLP exporter is built without TLS (ADR 0024); use a plaintext http:// collector on a trusted network",
        ));
    }
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| bad(endpoint, "must start with http://"))?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.contains('@') {
        return Err(bad("http://<redacted>", "no credentials in the endpoint URL"));
    }
    if host.is_empty() || host.starts_with(':') {
        return Err(bad(endpoint, "has no host"));
    }
    Ok(())
}

/// The filter of the OTLP layer: `SKV_OTLP_FILTER`, or skv's spans at DEBUG and every
/// event at INFO.
fn otel_filter() -> tracing_subscriber::EnvFilter {
    match std::env::var("SKV_OTLP_FILTER") {
        Ok(f) if !f.trim().is_empty() => tracing_subscriber::EnvFilter::new(f),
        _ => tracing_subscriber::EnvFilter::new(
            "info,skv_proxy=debug,skv_storenode=debug,skv_placement=debug,openraft=warn,fjall=warn,lsm_tree=warn,h2=warn",
        ),
    }
}

/// Installs the global subscriber: logs as [`skv_common::telemetry::init_logging`] does,
/// and, with an endpoint, OTLP export of spans under `service_name` (`skv-proxy`, ...).
/// Must run inside a Tokio runtime when `endpoint` is set (the tonic client needs one).
/// Calling it when a subscriber is already installed keeps that one (and exports nothing).
pub fn init(format: LogFormat, endpoint: Option<&str>, service_name: &'static str) -> Result<OtelGuard, OtelError> {
    let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
        skv_common::telemetry::init_logging(format);
        return Ok(OtelGuard { provider: None });
    };
    check_endpoint(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("skv");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(otel_filter());
    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,fjall=warn,lsm_tree=warn,h2=warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(log_filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(log_filter).boxed(),
    };
    if tracing_subscriber::registry().with(fmt).with(otel).try_init().is_err() {
        let _ = provider.shutdown();
        return Ok(OtelGuard { provider: None });
    }
    tracing::info!(endpoint, service_name, "exporting spans over OTLP");
    Ok(OtelGuard {
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_urls_with_a_host() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("http://collector.example:4317/").is_ok());
        for bad in [
            "127.0.0.1:4317",
            "grpc://x:1",
            "http://",
            "http://:4317",
            "",
            // No TLS in the exporter: refused rather than accepted and silently dropped.
            "https://collector.example:4317/",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad} accepted");
        }
        let e = check_endpoint("http://user:hunter2secret@collector:4317")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.is_empty() && !e.contains("hunter2secret"), "{e:?}");
    }
}
