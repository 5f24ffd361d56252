//! Test harness for skv: real processes and in-process nodes on random
//! 127.0.0.1 ports, and a real etcd from the Debian `etcd-server` package.
//!
//! Every process started here is owned by a guard that kills it by PID when
//! dropped, so a failing (panicking) test leaves nothing behind.

pub mod cluster;
pub mod etcd;
pub mod metrics;
pub mod process;
pub mod s3;
pub mod workload;

pub use etcd::{Etcd, EtcdCluster};
pub use process::{ChildGuard, bin_path, free_port, output_text, repo_root, run_captured, wait_until};

/// Installs a test-friendly tracing subscriber once (respects `RUST_LOG`).
pub fn init_test_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
