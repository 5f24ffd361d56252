//! `skv-proxy`: parse flags, start the proxy, run until SIGINT/SIGTERM.

/// mimalloc instead of glibc malloc: ADR 0017 (allocation was ~20% of server CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: skv_proxy::Config = skv_common::config::parse();
    skv_common::telemetry::init_logging(config.log_format);
    let handle = skv_proxy::start(config).await?;
    skv_common::service::shutdown_signal().await;
    tracing::info!("shutting down");
    handle.shutdown().await
}
