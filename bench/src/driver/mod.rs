//! One trait for every system under test, so that one loop measures them all with the
//! same keys and values.

mod etcd;
mod redis;
mod skv;

pub use self::etcd::{EtcdDriver, EtcdOptions};
pub use self::redis::RedisDriver;
pub use self::skv::SkvDriver;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The systems skv-bench can drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// skv through the Rust SDK (crate `skv`) and its proxies.
    Skv,
    /// etcd through `etcd-client` (gets are linearizable, etcd's default).
    Etcd,
    /// Redis through the `redis` crate (tokio, one multiplexed connection per client).
    Redis,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Skv => "skv",
            System::Etcd => "etcd",
            System::Redis => "redis",
        }
    }
}

/// Why an operation failed, as counted in the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// No server could serve it (retryable).
    Unavailable,
    /// The operation's deadline passed (skv-bench's `--op-timeout` or the client's).
    Timeout,
    /// A write that may or may not have been applied.
    OutcomeUnknown,
    /// The connection failed.
    Transport,
    /// The server refused it (bad argument, auth, quota, ...).
    Rejected,
    /// Anything else.
    Other,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::Transport => "transport",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Other => "other",
        }
    }
}

/// A failed operation or connection.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", kind.name())]
pub struct DriverError {
    pub kind: ErrorKind,
    pub message: String,
}

impl DriverError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

pub type DriverResult<T> = Result<T, DriverError>;

/// A key-value store under test. Keys are full keys (with skv-bench's prefix); a scan
/// stays below the end of that prefix.
#[async_trait]
pub trait Driver: Send + Sync {
    /// A linearizable read; `None` when the key is absent.
    async fn get(&self, key: &[u8]) -> DriverResult<Option<Vec<u8>>>;
    /// A durable write.
    async fn put(&self, key: &[u8], value: &[u8]) -> DriverResult<()>;
    /// Deletes a key; whether it existed.
    async fn delete(&self, key: &[u8]) -> DriverResult<bool>;
    /// Reads up to `limit` keys in key order from `start`; how many it read.
    async fn scan(&self, start: &[u8], limit: u32) -> DriverResult<usize>;
    /// Called after loading and before measuring (etcd: compact and defragment).
    async fn prepare(&self) -> DriverResult<()> {
        Ok(())
    }
}

/// Where the systems are and how to talk to them.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    pub skv_endpoints: Vec<String>,
    pub skv_token: String,
    pub etcd: EtcdOptions,
    pub redis_url: String,
    /// The bench's key prefix: scans stop at its end.
    pub key_prefix: String,
    /// Redis: keep a sorted-set index of keys so that scans are ordered (needed by
    /// workload E; it adds a ZADD to every put).
    pub redis_ordered_index: bool,
    /// Deadline of one call inside the client (skv's SDK retries within it).
    pub op_timeout: Duration,
}

/// Opens `connections` independent clients (each with its own connections).
pub async fn connect(system: System, o: &ConnectOptions, connections: usize) -> DriverResult<Vec<Arc<dyn Driver>>> {
    let mut out: Vec<Arc<dyn Driver>> = Vec::with_capacity(connections);
    for _ in 0..connections.max(1) {
        let d: Arc<dyn Driver> = match system {
            System::Skv => Arc::new(SkvDriver::connect(o).await?),
            System::Etcd => Arc::new(EtcdDriver::connect(&o.etcd, &o.key_prefix).await?),
            System::Redis => Arc::new(RedisDriver::connect(o).await?),
        };
        out.push(d);
    }
    Ok(out)
}

pub use skv_common::keys::prefix_end;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        for (prefix, end) in [
            (&b"bench/"[..], &b"bench0"[..]),
            (b"a\xff", b"b"),
            (b"\xff\xff", b""),
            (b"", b""),
        ] {
            assert_eq!(prefix_end(prefix), end.to_vec(), "{prefix:?}");
        }
    }

    #[test]
    fn error_kinds_have_distinct_names() {
        let kinds = [
            ErrorKind::Unavailable,
            ErrorKind::Timeout,
            ErrorKind::OutcomeUnknown,
            ErrorKind::Transport,
            ErrorKind::Rejected,
            ErrorKind::Other,
        ];
        let names: std::collections::HashSet<_> = kinds.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), kinds.len());
        assert_eq!(
            DriverError::new(ErrorKind::Timeout, "slow").to_string(),
            "timeout: slow"
        );
    }
}
