//! `skv-placement`: the placement driver binary.

/// mimalloc instead of glibc malloc: ADR 0017 (allocation was ~20% of server CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: skv_placement::Config = skv_common::config::parse();
    // Logs, and spans over OTLP with --otlp-endpoint (flushed when `_otel` drops).
    let _otel = skv_otel::init(config.log_format, config.otlp_endpoint.as_deref(), "skv-placement")?;
    // FAILPOINTS (ADR 0029): applied with the `failpoints` feature, refused without it.
    skv_placement::failpoints::setup_from_env()?;
    let handle = skv_placement::start(config).await?;
    tracing::info!(addr = %handle.addr, "skv-placement listening");
    let signal = skv_common::service::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => {
                tracing::info!("shutting down");
                return handle.shutdown().await;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if handle.is_finished() {
                    // Stopped by itself: surface its error.
                    return handle.wait().await;
                }
            }
        }
    }
}
