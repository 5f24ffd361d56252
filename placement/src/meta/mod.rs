//! The metadata store behind placement: a small, etcd-shaped API.
//!
//! [`MetaStore`] is implemented by [`etcd::EtcdStore`] (a real etcd cluster, 3.4+) and by
//! [`embedded::EmbeddedStore`] (a single-process store persisted in `--data-dir`, for the
//! playground and one-node setups). Both follow etcd's semantics:
//!
//! - every write raises a global `revision`; each key keeps `create_revision`,
//!   `mod_revision` and `version`;
//! - a compare on a missing key sees zero revisions/version (a `Value` compare fails);
//! - `watch(start, end, from)` delivers every put/delete with `mod_revision >= from`,
//!   grouped by revision, in order;
//! - keys written with a lease are deleted when the lease expires or is revoked.
//!
//! Leader election ([`crate::election`]) is built on leases + a transaction on one key, so it
//! runs unchanged on both implementations.

pub mod embedded;
pub mod etcd;
pub mod retry;

use async_trait::async_trait;
use futures::stream::BoxStream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Errors of a metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The requested watch revision was compacted away; re-read and watch again.
    #[error("revision {0} has been compacted")]
    Compacted(i64),
    /// The lease does not exist (expired or revoked).
    #[error("lease {0} not found")]
    LeaseNotFound(i64),
    /// Any other failure (transport, I/O, decoding).
    #[error("{0}")]
    Other(String),
}

impl MetaError {
    pub fn other(e: impl std::fmt::Display) -> Self {
        MetaError::Other(e.to_string())
    }
}

pub type MetaResult<T> = Result<T, MetaError>;

/// A stored key with its revisions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// 0 when the key has no lease.
    pub lease: i64,
}

/// Result of a range read.
#[derive(Clone, Debug, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// True when more keys than `limit` matched.
    pub more: bool,
    /// The store revision the read observed.
    pub revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

impl CmpOp {
    fn holds<T: Ord + ?Sized>(self, actual: &T, expected: &T) -> bool {
        match self {
            CmpOp::Equal => actual == expected,
            CmpOp::NotEqual => actual != expected,
            CmpOp::Less => actual < expected,
            CmpOp::Greater => actual > expected,
        }
    }
}

/// What a [`Compare`] looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmpTarget {
    Value(Vec<u8>),
    ModRevision(i64),
    CreateRevision(i64),
    Version(i64),
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    /// Empty: the condition is on `key` alone. Otherwise it is on every key in
    /// `[key, range_end)` (`[0]` = to the end of the key space), as etcd's range compare:
    /// it holds when it holds for each existing key in the interval, and, if the interval
    /// is empty, when it holds for a missing key (so a `Value` compare fails).
    pub range_end: Vec<u8>,
    pub op: CmpOp,
    pub target: CmpTarget,
}

impl Compare {
    pub fn value(key: impl Into<Vec<u8>>, op: CmpOp, v: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target: CmpTarget::Value(v.into()),
        }
    }
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CmpOp, rev: i64) -> Self {
        Self {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target: CmpTarget::ModRevision(rev),
        }
    }
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CmpOp, rev: i64) -> Self {
        Self {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target: CmpTarget::CreateRevision(rev),
        }
    }
    pub fn version(key: impl Into<Vec<u8>>, op: CmpOp, v: i64) -> Self {
        Self {
            key: key.into(),
            range_end: Vec::new(),
            op,
            target: CmpTarget::Version(v),
        }
    }
    /// Applies the condition to every key in `[key, end)` instead (see [`Compare::range_end`]).
    /// E.g. "nothing in `[a, b)` was created or changed after revision `r`":
    /// `Compare::mod_revision(a, CmpOp::Less, r + 1).with_range(b)`.
    pub fn with_range(mut self, end: impl Into<Vec<u8>>) -> Self {
        self.range_end = end.into();
        self
    }
    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CmpOp::Equal, 0)
    }
    /// The key exists.
    pub fn exists(key: impl Into<Vec<u8>>) -> Self {
        Self::create_revision(key, CmpOp::Greater, 0)
    }

    /// Evaluates against the keys currently in the compared interval (for a single-key
    /// compare, the key itself or nothing), with etcd's rules.
    pub fn holds_all<'a>(&self, mut kvs: impl Iterator<Item = &'a KeyValue>) -> bool {
        match kvs.next() {
            None => self.holds(None),
            Some(first) => self.holds(Some(first)) && kvs.all(|kv| self.holds(Some(kv))),
        }
    }

    /// Evaluates against the current key (None = missing), with etcd's rules.
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        match (&self.target, kv) {
            (CmpTarget::Value(_), None) => false,
            (CmpTarget::Value(v), Some(kv)) => self.op.holds(kv.value.as_slice(), v.as_slice()),
            (CmpTarget::ModRevision(r), kv) => self.op.holds(&kv.map_or(0, |k| k.mod_revision), r),
            (CmpTarget::CreateRevision(r), kv) => self.op.holds(&kv.map_or(0, |k| k.create_revision), r),
            (CmpTarget::Version(r), kv) => self.op.holds(&kv.map_or(0, |k| k.version), r),
        }
    }
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8>, lease: i64 },
    Delete { key: Vec<u8> },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }
}

/// `if compares { success } else { failure }`, atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: impl IntoIterator<Item = Compare>) -> Self {
        self.compares.extend(c);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.failure.extend(ops);
        self
    }
}

/// Outcome of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it wrote nothing).
    pub revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A watch: batches of events, one batch per revision (or several revisions), in order.
pub type WatchStream = BoxStream<'static, MetaResult<Vec<WatchEvent>>>;

/// The store API placement needs. Object-safe: use it as `Arc<dyn MetaStore>`.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// One key.
    async fn get(&self, key: &[u8]) -> MetaResult<Option<KeyValue>> {
        let mut end = key.to_vec();
        end.push(0);
        Ok(self.range(key, &end, 1).await?.kvs.pop())
    }

    /// Keys in `[start, end)` in key order; `limit` 0 = no limit. `end == [0]` means
    /// "to the end of the key space" (etcd's convention).
    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> MetaResult<RangeResult>;

    /// Atomic compare-and-write.
    async fn txn(&self, txn: Txn) -> MetaResult<TxnResult>;

    /// Changes of keys in `[start, end)` from revision `from` (inclusive; 0 = from now).
    async fn watch(&self, start: &[u8], end: &[u8], from: i64) -> MetaResult<WatchStream>;

    /// Creates a lease of `ttl_secs`; returns its id.
    async fn grant_lease(&self, ttl_secs: i64) -> MetaResult<i64>;

    /// Refreshes a lease; [`MetaError::LeaseNotFound`] when it is gone.
    async fn keep_alive(&self, lease: i64) -> MetaResult<()>;

    /// Revokes a lease, deleting its keys.
    async fn revoke_lease(&self, lease: i64) -> MetaResult<()>;

    /// Discards history up to `revision` (watches from older revisions then fail with
    /// [`MetaError::Compacted`]). Already-compacted revisions are not an error.
    async fn compact(&self, revision: i64) -> MetaResult<()> {
        let _ = revision;
        Ok(())
    }

    /// A short name for logs ("etcd" or "embedded").
    fn kind(&self) -> &'static str;

    /// The client's retry series (etcd only; ADR 0032).
    fn client_metrics(&self) -> Option<MetaClientMetrics> {
        None
    }
}

type Labels = Vec<(String, String)>;

/// How a metadata store client fails over and retries (`skv_placement_meta_*`, ADR 0032).
/// Cheap to clone: every clone counts into the same series.
#[derive(Clone, Debug, Default)]
pub struct MetaClientMetrics {
    /// Attempts made again after a failed one, by call and reason
    /// ([`retry::Failure::label`]).
    pub retries: Family<Labels, Counter>,
    /// Writes whose outcome was unknown, settled by a re-read, by call and resolution
    /// (applied: reported done; not_applied: sent again).
    pub unknown_outcomes: Family<Labels, Counter>,
    /// Times calls moved on to the next etcd member.
    pub member_switches: Counter,
}

impl MetaClientMetrics {
    pub(crate) fn retry(&self, call: &str, reason: &str) {
        self.retries
            .get_or_create(&vec![("call".into(), call.into()), ("reason".into(), reason.into())])
            .inc();
    }

    pub(crate) fn unknown_outcome(&self, call: &str, resolution: &str) {
        self.unknown_outcomes
            .get_or_create(&vec![
                ("call".into(), call.into()),
                ("resolution".into(), resolution.into()),
            ])
            .inc();
    }

    /// Calls of the etcd client, and the reasons a call is tried again (every series exists
    /// from the start: the dashboard shows zeros, not "no data").
    pub const CALLS: [&'static str; 7] = [
        "range",
        "txn",
        "watch",
        "grant_lease",
        "keep_alive",
        "revoke_lease",
        "compact",
    ];
    pub const REASONS: [&'static str; 3] = ["unreachable", "no_leader", "interrupted"];

    /// Registers the series in `r` (placement's `skv_placement` sub-registry).
    pub fn register(&self, r: &mut Registry) {
        for call in Self::CALLS {
            for reason in Self::REASONS {
                let _ = self
                    .retries
                    .get_or_create(&vec![("call".into(), call.into()), ("reason".into(), reason.into())]);
            }
        }
        for resolution in ["applied", "not_applied"] {
            let _ = self.unknown_outcomes.get_or_create(&vec![
                ("call".into(), "txn".into()),
                ("resolution".into(), resolution.into()),
            ]);
        }
        r.register(
            "meta_retries",
            "Metadata store calls made again after a failed attempt, by call and reason",
            self.retries.clone(),
        );
        r.register(
            "meta_unknown_outcomes",
            "Metadata writes whose outcome was unknown, settled by a re-read, by call and resolution",
            self.unknown_outcomes.clone(),
        );
        r.register(
            "meta_member_switches",
            "Times metadata store calls moved on to the next etcd member",
            self.member_switches.clone(),
        );
    }
}

/// Shared handle.
pub type DynMetaStore = Arc<dyn MetaStore>;

/// Keys with `prefix`: `[prefix, prefix_end(prefix))`.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let end = skv_common::keys::prefix_end(prefix);
    (prefix.to_vec(), if end.is_empty() { vec![0] } else { end })
}
