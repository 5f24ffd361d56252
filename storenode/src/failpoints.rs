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

/// Exit status of a process stopped by a crash point.
pub const EXIT_CRASH_POINT: i32 = 86;

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
    eprintln!("skv-storenode: crash point {name} reached: exiting");
    std::process::exit(EXIT_CRASH_POINT)
}

/// Errors of the failpoint configuration.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    #[error("FAILPOINTS is set but this binary was built without the `failpoints` feature")]
    NotCompiledIn,
    #[error("FAILPOINTS entry {0:?} is not name=action")]
    Syntax(String),
    #[error("failpoint {name}: bad action {action:?}: {reason}")]
    Action {
        name: String,
        action: String,
        reason: String,
    },
}

/// Splits a `FAILPOINTS` value into (name, action) pairs; pure.
pub fn parse_spec(spec: &str) -> Result<Vec<(String, String)>, FailpointError> {
    let mut out = Vec::new();
    for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, action)) = part.split_once('=') else {
            return Err(FailpointError::Syntax(part.to_string()));
        };
        let (name, action) = (name.trim(), action.trim());
        if name.is_empty() || action.is_empty() {
            return Err(FailpointError::Syntax(part.to_string()));
        }
        out.push((name.to_string(), action.to_string()));
    }
    Ok(out)
}

/// Applies `FAILPOINTS` from the environment (called once at start).
pub fn setup_from_env() -> Result<(), FailpointError> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    apply_spec(&spec)
}

#[cfg(not(feature = "failpoints"))]
fn apply_spec(spec: &str) -> Result<(), FailpointError> {
    if parse_spec(spec)?.is_empty() {
        return Ok(());
    }
    Err(FailpointError::NotCompiledIn)
}

#[cfg(feature = "failpoints")]
fn apply_spec(spec: &str) -> Result<(), FailpointError> {
    for (name, action) in parse_spec(spec)? {
        set(&name, &action)?;
        tracing::warn!(failpoint = %name, %action, "failpoint set from FAILPOINTS");
    }
    Ok(())
}

/// Sets one failpoint.
#[cfg(feature = "failpoints")]
pub fn set(name: &str, action: &str) -> Result<(), FailpointError> {
    fail::cfg(name, action).map_err(|reason| FailpointError::Action {
        name: name.to_string(),
        action: action.to_string(),
        reason,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_spec("a::b=return; c=50%panic(x) ;").unwrap(),
            vec![
                ("a::b".to_string(), "return".to_string()),
                ("c".to_string(), "50%panic(x)".to_string())
            ]
        );
        assert!(parse_spec("").unwrap().is_empty());
        assert!(matches!(parse_spec("nameonly"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("=return"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("a="), Err(FailpointError::Syntax(_))));
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_a_spec_is_refused_not_ignored() {
        assert!(matches!(apply_spec("x=return"), Err(FailpointError::NotCompiledIn)));
        assert!(apply_spec(" ; ").is_ok());
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn with_the_feature_a_bad_action_is_refused() {
        assert!(matches!(
            apply_spec("skv::test::unused=notanaction"),
            Err(FailpointError::Action { .. })
        ));
        apply_spec("skv::test::unused=return").unwrap();
        assert!(fail::list().iter().any(|(n, _)| n == "skv::test::unused"));
        fail::remove("skv::test::unused");
    }
}
