//! `skv-storenode`: parse flags, start, wait for a signal, shut down.

/// mimalloc instead of glibc malloc: ADR 0017 (allocation was ~20% of server CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: skv_storenode::Config = skv_common::config::parse();
    // Logs, and spans over OTLP with --otlp-endpoint (flushed when `_otel` drops).
    let _otel = skv_otel::init(config.log_format, config.otlp_endpoint.as_deref(), "skv-storenode")?;
    // FAILPOINTS (ADR 0029): applied with the `failpoints` feature, refused without it.
    skv_storenode::failpoints::setup_from_env()?;
    let handle = skv_storenode::start(config).await?;
    skv_common::service::shutdown_signal().await;
    handle.shutdown().await
}
