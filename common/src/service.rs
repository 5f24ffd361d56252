//! The handle of a running service (placement, storenode or proxy), so that
//! the playground and tests can start servers in-process on port 0 and stop them.

use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running server. Dropping it does not stop it; call [`ServiceHandle::shutdown`].
pub struct ServiceHandle {
    /// The gRPC address it listens on.
    pub addr: SocketAddr,
    /// The `/metrics`, `/healthz`, `/readyz` address, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ServiceHandle {
    /// Wraps a spawned server task that stops when `cancel` fires.
    pub fn new(
        addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        cancel: CancellationToken,
        task: JoinHandle<anyhow::Result<()>>,
    ) -> Self {
        Self {
            addr,
            metrics_addr,
            cancel,
            task,
        }
    }

    /// A token that stops the service when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the service and waits for it to finish.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await?
    }

    /// Waits until the service stops by itself (or fails).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }

    /// Whether the server task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
