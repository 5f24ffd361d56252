//! `skv-proxy`: parse flags, start the proxy, run until SIGINT/SIGTERM.

/// mimalloc instead of glibc malloc: ADR 0017 (allocation was ~20% of server CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mut config, file): (skv_proxy::Config, _) = skv_common::config::parse_with_sections(&["tenants"]);
    // Logs, and spans over OTLP with --otlp-endpoint (flushed when `_otel` drops).
    let _otel = skv_otel::init(config.log_format, config.otlp_endpoint.as_deref(), "skv-proxy")?;
    if let Some(file) = file {
        config.tenants = skv_proxy::quota::load_overrides(&file)?;
    }
    let handle = skv_proxy::start(config).await?;
    skv_common::service::shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await
}
