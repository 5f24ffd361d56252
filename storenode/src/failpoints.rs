//! Failpoints (issue 14, ADR 0029): TiKV's `fail` crate, compiled in only with the cargo
//! feature `failpoints` (off by default; `scripts/test.sh` builds the test binaries with it,
//! release builds and images never have it). Without the feature every `fail_point!` expands
//! to nothing.
//!
//! With the feature, failpoints are configured
//! - at start from the `FAILPOINTS` environment variable, `name=action;name=action`
//!   (fail's syntax: `return`, `panic`, `off`, `sleep(100)`, `50%return`, `1*return`, ...);
//!   a bad entry fails the start;
//! - at run time on the `--metrics-listen` port: `GET /failpoints` lists them,
//!   `PUT /failpoints/<name>` with the action as the body sets one, `DELETE` clears it.
//!
//! Without the feature, a set `FAILPOINTS` fails the start (never accepted and ignored).
//!
//! The names, where they sit and what `return` does there (the list is in ADR 0029 and
//! chaos/README.md):
//! - [`SKIP_FSYNC`]: the group-commit fsync (Raft log and engine) becomes a no-op that
//!   reports success (the power-loss test shows acknowledged writes are then lost).
//! - [`FSYNC_ERROR`]: the group-commit fsync reports an I/O error (fail-stop follows).
//! - [`APPEND_ERROR`]: a Raft log append's write reports an I/O error (fail-stop follows).
//! - [`APPLY_ERROR`]: an apply's batch commit reports an I/O error (fail-stop follows).
//! - [`SKIP_READ_INDEX`]: reads are served from local state without the ReadIndex barrier,
//!   on a follower too (the planted linearizability bug).
//! - crash points, meant for `panic` or `exit` style actions: [`AFTER_APPEND_BEFORE_FSYNC`],
//!   [`MID_APPLY`], [`MID_SPLIT`], [`MID_MERGE`], [`MID_SNAPSHOT_INSTALL`],
//!   [`MID_CHECKPOINT_UPLOAD`].

/// `return`: the group-commit fsync is skipped and reported as done.
pub const SKIP_FSYNC: &str = "storenode::log::skip_fsync";
/// `return`: the group-commit fsync fails with an I/O error.
pub const FSYNC_ERROR: &str = "storenode::log::fsync_error";
/// `return`: a Raft log append's write fails with an I/O error.
pub const APPEND_ERROR: &str = "storenode::log::append_error";
/// `return`: an apply's batch commit (the state machine's writes and applied index) fails
/// with an I/O error (fail-stop follows).
pub const APPLY_ERROR: &str = "storenode::apply::commit_error";
/// `return`: reads skip the ReadIndex barrier and followers serve them too.
pub const SKIP_READ_INDEX: &str = "storenode::read::skip_read_index";
/// After a log append is written (readable), before the fsync that makes it durable.
pub const AFTER_APPEND_BEFORE_FSYNC: &str = "storenode::log::after_append_before_fsync";
/// Inside apply: after a run of writes is built into a batch, before it commits.
pub const MID_APPLY: &str = "storenode::apply::before_commit";
/// Inside a split's apply: the batch holds both halves' descriptors and the right half's
/// seeded Raft state, not committed yet.
pub const MID_SPLIT: &str = "storenode::split::before_commit";
/// Inside a merge's commit on the target: the source's data and the widened descriptor
/// are in the batch, not committed yet.
pub const MID_MERGE: &str = "storenode::merge::before_commit";
/// Inside a snapshot install: the file is received and checked and the redo marker is
/// durable; the engine is not changed yet.
pub const MID_SNAPSHOT_INSTALL: &str = "storenode::snapshot::mid_install";
/// Inside a checkpoint upload: the object is written, the manifest does not name it yet.
pub const MID_CHECKPOINT_UPLOAD: &str = "storenode::checkpoint::mid_upload";

/// Whether [`SKIP_READ_INDEX`] is on: the read path then serves from local state without
/// ReadIndex, on any replica (a planted linearizability bug; `false` without the feature).
pub fn skip_read_index() -> bool {
    fail::fail_point!(SKIP_READ_INDEX, |_| true);
    false
}

pub use skv_common::failpoints::{EXIT_CRASH_POINT, FailpointError};

/// A crash point: with any action that returns (`return`, `50%return`, `1*return`, ...) the
/// process exits on the spot with [`EXIT_CRASH_POINT`], running no destructors and flushing
/// nothing of its own — what `kill -9` does, at a chosen instruction. A no-op without the
/// `failpoints` feature. (`panic` would only end a tokio task, not the process.)
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                $crate::failpoints::crash($name)
            }
        }
    };
}

/// Exits at crash point `name` (see [`crash_point!`]).
pub fn crash(name: &str) -> ! {
    skv_common::failpoints::crash("skv-storenode", name)
}

/// Applies `FAILPOINTS` from the environment (called once at start); refused by a binary
/// built without the feature.
pub fn setup_from_env() -> Result<(), FailpointError> {
    skv_common::failpoints::setup_from_env(cfg!(feature = "failpoints"))
}

/// Sets one failpoint.
#[cfg(feature = "failpoints")]
pub fn set(name: &str, action: &str) -> Result<(), FailpointError> {
    skv_common::failpoints::set(name, action)
}

/// The `--metrics-listen` server: `/metrics`, `/healthz`, `/readyz`, and with the feature
/// the `/failpoints` routes.
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
    ready: skv_common::telemetry::Readiness,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    #[cfg(feature = "failpoints")]
    return skv_common::telemetry::serve_metrics_with(listen, registry, ready, cancel, routes()).await;
    #[cfg(not(feature = "failpoints"))]
    skv_common::telemetry::serve_metrics(listen, registry, ready, cancel).await
}

/// The HTTP routes merged into the metrics server: `GET /failpoints`,
/// `PUT /failpoints/{name}` (body: the action), `DELETE /failpoints/{name}`.
#[cfg(feature = "failpoints")]
pub fn routes() -> axum::Router {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::routing::get;
    async fn list() -> String {
        let mut out = String::new();
        for (name, action) in fail::list() {
            out.push_str(&format!("{name}={action}\n"));
        }
        out
    }
    async fn put(Path(name): Path<String>, body: String) -> (StatusCode, String) {
        match set(&name, body.trim()) {
            Ok(()) => {
                tracing::warn!(failpoint = %name, action = %body.trim(), "failpoint set over HTTP");
                (StatusCode::OK, format!("{name}={}\n", body.trim()))
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
    async fn delete(Path(name): Path<String>) -> (StatusCode, String) {
        fail::remove(&name);
        tracing::warn!(failpoint = %name, "failpoint cleared over HTTP");
        (StatusCode::OK, format!("{name} cleared\n"))
    }
    axum::Router::new()
        .route("/failpoints", get(list))
        .route("/failpoints/{name}", axum::routing::put(put).delete(delete))
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    #[test]
    fn with_the_feature_a_failpoint_from_a_spec_is_set() {
        skv_common::failpoints::apply_spec("skv::test::unused=return", true).unwrap();
        assert!(fail::list().iter().any(|(n, _)| n == "skv::test::unused"));
        fail::remove("skv::test::unused");
    }
}
