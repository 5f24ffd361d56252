//! Typed errors of the skv client.

use std::error::Error as StdError;
use std::time::Duration;
use tonic::{Code, Status};

/// The metadata key with which the proxy marks an UNAVAILABLE answer whose
/// write may or may not have been applied.
pub const OUTCOME_METADATA_KEY: &str = "skv-outcome";
/// The value of [`OUTCOME_METADATA_KEY`] that means "outcome unknown".
pub const OUTCOME_UNKNOWN: &str = "unknown";

/// The metadata key with which the proxy says, on a RESOURCE_EXHAUSTED answer (a
/// tenant quota), how many milliseconds to wait before trying again. The client waits
/// that long before its retry.
pub const RETRY_AFTER_METADATA_KEY: &str = "retry-after-ms";
/// Longest `retry-after-ms` the client honours; a longer hint is cut to this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The server's retry hint of a RESOURCE_EXHAUSTED status, if any.
pub(crate) fn retry_after(status: &Status) -> Option<Duration> {
    if status.code() != Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_METADATA_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a call can fail with.
///
/// Use [`Error::is_retryable`] to decide whether repeating the same call is
/// safe. The client already retries retryable errors (and fails over to other
/// proxies) within its timeout, so seeing one means the retries ran out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The token is missing, malformed, expired or not signed by a key the proxy trusts.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but its role does not allow this call.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request is malformed (empty or oversized key, oversized value, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A conditional write did not match (`put_if_version`, `put_if_absent`, ...).
    #[error("condition failed: {0}")]
    ConditionFailed(String),
    /// A write may or may not have been applied: the connection or the
    /// cluster failed after the request left. Read the key to find out.
    /// Never retried automatically.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// No proxy could serve the call (retryable).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The call's deadline passed. For a write the outcome is unknown.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// A quota or rate limit was hit (retryable after a pause).
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A typed view could not encode or decode a key or a value.
    #[error("decode: {0}")]
    Decode(String),
    /// A transport failure after which the request may have reached the server.
    #[error("transport: {0}")]
    Transport(String),
    /// The client was configured wrongly (no endpoint, a bad URL, a bad token).
    #[error("configuration: {0}")]
    Config(String),
    /// Any other gRPC status.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Other(Box<Status>),
}

impl Error {
    /// Whether repeating the same call is safe and may succeed.
    ///
    /// True for [`Error::Unavailable`], [`Error::Transport`] and
    /// [`Error::ResourceExhausted`]. [`Error::OutcomeUnknown`] and
    /// [`Error::DeadlineExceeded`] are not: a write may have been applied.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Transport(_) | Error::ResourceExhausted(_)
        )
    }

    /// The gRPC code this error corresponds to.
    pub fn code(&self) -> Code {
        match self {
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::InvalidArgument(_) | Error::Config(_) => Code::InvalidArgument,
            Error::ConditionFailed(_) => Code::FailedPrecondition,
            Error::OutcomeUnknown(_) | Error::Unavailable(_) | Error::Transport(_) => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Decode(_) => Code::DataLoss,
            Error::Other(s) => s.code(),
        }
    }

    /// Maps a gRPC status as the server (or tonic) produced it, without
    /// knowing whether the call was a write. See [`Error::from_status_for`].
    pub fn from_status(status: Status) -> Self {
        Self::from_status_for(status, false)
    }

    /// Maps a gRPC status. `write` says whether the call could have changed
    /// data: then a transport failure after the request may have reached the server (not
    /// one that proves it unprocessed, ADR 0035) and a client-side timeout become
    /// [`Error::OutcomeUnknown`].
    pub fn from_status_for(status: Status, write: bool) -> Self {
        let msg = status.message().to_string();
        // Provably never processed (whatever code tonic gave it: hyper's canceled is
        // CANCELLED, a graceful GOAWAY INTERNAL): nothing was applied.
        if classify_source(&status) == Origin::Connect {
            return Error::Unavailable(msg);
        }
        match status.code() {
            Code::Unauthenticated => Error::Unauthenticated(msg),
            Code::PermissionDenied => Error::PermissionDenied(msg),
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(msg),
            Code::FailedPrecondition => Error::ConditionFailed(msg),
            Code::ResourceExhausted => Error::ResourceExhausted(msg),
            Code::DeadlineExceeded => Error::DeadlineExceeded(msg),
            Code::Cancelled if is_timeout(&status) => Error::DeadlineExceeded(msg),
            Code::Unavailable if outcome_unknown(&status) => Error::OutcomeUnknown(msg),
            Code::Unavailable => match classify_source(&status) {
                Origin::Server | Origin::Connect => Error::Unavailable(msg),
                Origin::Transport if write => Error::OutcomeUnknown(format!("connection failed mid-call: {msg}")),
                Origin::Transport => Error::Transport(msg),
            },
            Code::Unknown | Code::Internal if classify_source(&status) == Origin::Transport => {
                if write {
                    Error::OutcomeUnknown(format!("connection failed mid-call: {msg}"))
                } else {
                    Error::Transport(msg)
                }
            }
            _ => Error::Other(Box::new(status)),
        }
    }
}

/// Like [`Error::from_status_for`], naming the endpoint in the message when
/// the failure happened on the client's side (no connection, broken stream).
pub(crate) fn from_status_at(status: Status, write: bool, endpoint: &str) -> Error {
    if classify_source(&status) == Origin::Server {
        return Error::from_status_for(status, write);
    }
    match Error::from_status_for(status, write) {
        Error::Unavailable(m) => Error::Unavailable(format!("{endpoint}: {m}")),
        Error::Transport(m) => Error::Transport(format!("{endpoint}: {m}")),
        Error::OutcomeUnknown(m) => Error::OutcomeUnknown(format!("{endpoint}: {m}")),
        Error::DeadlineExceeded(m) => Error::DeadlineExceeded(format!("{endpoint}: {m}")),
        other => other,
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::from_status(status)
    }
}

/// Whether the proxy marked this status as "the write may have been applied".
fn outcome_unknown(status: &Status) -> bool {
    if let Some(v) = status.metadata().get(OUTCOME_METADATA_KEY)
        && v.to_str().is_ok_and(|s| s.eq_ignore_ascii_case(OUTCOME_UNKNOWN))
    {
        return true;
    }
    let m = status.message().to_ascii_lowercase();
    m.contains("outcome unknown") || m.contains("unknown outcome")
}

fn is_timeout(status: &Status) -> bool {
    let mut src: Option<&(dyn StdError + 'static)> = status.source();
    while let Some(e) = src {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        src = e.source();
    }
    status.message() == "Timeout expired"
}

#[derive(Debug, PartialEq, Eq)]
enum Origin {
    /// The server sent this status: the request was processed and refused.
    Server,
    /// The request never reached the server: no connection, or the transport proves it
    /// unprocessed (`skv_rpc::never_processed`).
    Connect,
    /// The client failed after connecting: the request may have been processed.
    Transport,
}

fn classify_source(status: &Status) -> Origin {
    if status.source().is_none() {
        return Origin::Server;
    }
    // No connection, queued on a connection that closed, refused stream, graceful GOAWAY
    // (a stopping proxy): never processed, so even a write may go to another proxy.
    if skv_rpc::never_processed(status) {
        return Origin::Connect;
    }
    Origin::Transport
}

/// Whether the failure happened on the client's side (no connection, a
/// broken stream, a local timeout) rather than being an answer of the server.
pub(crate) fn client_side_failure(status: &Status) -> bool {
    classify_source(status) != Origin::Server
}

/// Whether a status is worth retrying on another proxy, and whether that is
/// safe for a write: only when the request surely was not applied.
pub(crate) fn should_retry(status: &Status, write: bool) -> bool {
    if classify_source(status) == Origin::Connect {
        return true;
    }
    match status.code() {
        Code::Unavailable if outcome_unknown(status) => false,
        Code::Unavailable => match classify_source(status) {
            Origin::Server | Origin::Connect => true,
            Origin::Transport => !write,
        },
        Code::ResourceExhausted => classify_source(status) == Origin::Server,
        Code::Unknown | Code::Internal => !write && classify_source(status) == Origin::Transport,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn maps_codes() {
        assert!(matches!(
            Error::from(Status::unauthenticated("x")),
            Error::Unauthenticated(m) if m == "x"
        ));
        assert!(matches!(
            Error::from(Status::permission_denied("x")),
            Error::PermissionDenied(_)
        ));
        assert!(matches!(
            Error::from(Status::invalid_argument("x")),
            Error::InvalidArgument(_)
        ));
        assert!(matches!(
            Error::from(Status::failed_precondition("x")),
            Error::ConditionFailed(_)
        ));
        assert!(matches!(
            Error::from(Status::resource_exhausted("x")),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            Error::from(Status::deadline_exceeded("x")),
            Error::DeadlineExceeded(_)
        ));
        assert!(matches!(Error::from(Status::unavailable("x")), Error::Unavailable(_)));
        let e = Error::from(Status::not_found("admin thing"));
        assert!(matches!(&e, Error::Other(s) if s.code() == Code::NotFound));
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.to_string(), "NotFound: admin thing");
    }

    #[test]
    fn retry_after_hint() {
        let mut s = Status::resource_exhausted("over quota");
        assert_eq!(retry_after(&s), None);
        s.metadata_mut()
            .insert(RETRY_AFTER_METADATA_KEY, MetadataValue::from_static("250"));
        assert_eq!(retry_after(&s), Some(Duration::from_millis(250)));
        s.metadata_mut()
            .insert(RETRY_AFTER_METADATA_KEY, MetadataValue::from_static("999999999"));
        assert_eq!(retry_after(&s), Some(MAX_RETRY_AFTER));
        s.metadata_mut()
            .insert(RETRY_AFTER_METADATA_KEY, MetadataValue::from_static("soon"));
        assert_eq!(retry_after(&s), None);
        let mut u = Status::unavailable("x");
        u.metadata_mut()
            .insert(RETRY_AFTER_METADATA_KEY, MetadataValue::from_static("5"));
        assert_eq!(retry_after(&u), None);
    }

    #[test]
    fn outcome_unknown_by_metadata_or_message() {
        let mut s = Status::unavailable("leader lost");
        s.metadata_mut()
            .insert(OUTCOME_METADATA_KEY, MetadataValue::from_static("unknown"));
        assert!(!should_retry(&s, true));
        assert!(!should_retry(&s, false));
        let e = Error::from(s);
        assert!(matches!(e, Error::OutcomeUnknown(_)));
        assert!(!e.is_retryable());
        assert_eq!(e.code(), Code::Unavailable);

        let s = Status::unavailable("write outcome unknown: raft leader changed");
        assert!(matches!(Error::from(s), Error::OutcomeUnknown(_)));
    }

    #[test]
    fn retryability() {
        assert!(Error::Unavailable(String::new()).is_retryable());
        assert!(Error::Transport(String::new()).is_retryable());
        assert!(Error::ResourceExhausted(String::new()).is_retryable());
        assert!(!Error::OutcomeUnknown(String::new()).is_retryable());
        assert!(!Error::DeadlineExceeded(String::new()).is_retryable());
        assert!(!Error::ConditionFailed(String::new()).is_retryable());
        assert!(!Error::Unauthenticated(String::new()).is_retryable());
        // A server-sent UNAVAILABLE (not applied) is safe to retry even for writes.
        assert!(should_retry(&Status::unavailable("no leader"), true));
        assert!(!should_retry(&Status::failed_precondition("x"), false));
        assert!(!should_retry(&Status::invalid_argument("x"), false));
    }

    #[test]
    fn connect_vs_midflight_transport() {
        let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )))));
        assert_eq!(connect.code(), Code::Unavailable);
        assert!(should_retry(&connect, true));
        assert!(matches!(Error::from_status_for(connect, true), Error::Unavailable(_)));

        // A status the server sent (no source): the request was refused, not applied.
        let sent = Status::from_error(Box::new(Status::unavailable("no leader")));
        assert!(should_retry(&sent, true));
        // A client-side failure that does not prove the call unprocessed: may have been applied.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let mut with_src = Status::from_error(Box::new(io));
        assert_eq!(with_src.code(), Code::Unknown);
        assert!(!should_retry(&with_src, true));
        assert!(should_retry(&with_src, false));
        with_src = Status::from_error(Box::new(std::io::Error::other("boom")));
        assert!(matches!(
            Error::from_status_for(with_src, true),
            Error::OutcomeUnknown(_)
        ));
    }

    #[test]
    fn a_refused_stream_was_never_processed_so_even_a_write_is_retried() {
        // h2's REFUSED_STREAM (a stopping proxy refuses new streams): tonic makes it
        // UNAVAILABLE with the h2 error as its source (ADR 0035).
        let refused = Status::from_error(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        assert!(should_retry(&refused, true));
        assert!(matches!(Error::from_status_for(refused, true), Error::Unavailable(_)));
        // A stream the server reset with CANCEL after it left: it may have been applied.
        let reset = Status::from_error(Box::new(h2::Error::from(h2::Reason::CANCEL)));
        assert!(!should_retry(&reset, true));
        assert!(!matches!(Error::from_status_for(reset, true), Error::Unavailable(_)));
    }

    #[test]
    fn client_timeout_is_deadline() {
        let s = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(s.code(), Code::Cancelled);
        assert!(matches!(Error::from(s), Error::DeadlineExceeded(_)));
    }
}
