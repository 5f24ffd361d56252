//! # skv-objstore: range checkpoints in object storage (issue 11, DESIGN §8, ADR 0025)
//!
//! - [`ObjectStoreUrl`]: `--object-store-url`, `s3://bucket/prefix` (endpoint, region, keys
//!   and allow-http from the `AWS_*` variables; path-style requests) or `file:///path`.
//! - [`Objects::open`]: builds the `object_store` backend and makes one list of the prefix,
//!   so a wrong URL, a missing bucket or bad credentials is one error at start;
//!   [`Objects::for_cluster`] scopes it to one cluster's checkpoints and range manifests.
//! - [`format`]: the checkpoint object format (docs/objstore-format.md), pure encoder and
//!   checking reader.
//! - [`manifest`]: range manifests and the retention decision (pure).
//! - [`Objects::upload_checkpoint`] / [`Objects::commit_checkpoint`] /
//!   [`Objects::read_checkpoint`]: the I/O, with metrics ([`ObjMetrics`]) and a `tracing`
//!   span per upload carrying `range_id`.
//!
//! Object layout under the prefix:
//! `clusters/<cluster>/snapshots/<range>/<generation>/<index>.snap` (zero-padded to 20
//! digits), `clusters/<cluster>/manifests/ranges/<range>.json` (range ids restart at 1 in
//! every cluster, so each cluster has its own), `backups/<id>/manifest.json` (shared: a new
//! cluster lists and restores them).

pub mod backup;
pub mod format;
pub mod manifest;
pub mod metrics;
pub mod store;
pub mod url;

pub use format::{CheckpointHeader, Entry, FormatError, Summary};
pub use manifest::{CheckpointEntry, RangeManifest, RetentionPlan, plan_retention};
pub use metrics::ObjMetrics;
pub use store::{
    EntrySink, ObjError, Objects, OpenError, checkpoint_path, cluster_prefix, manifest_path, valid_cluster_id,
};
pub use url::{ObjectStoreUrl, UrlError};
