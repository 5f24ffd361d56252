//! Placement's errors, with stable codes (docs/adr/0012-placement-error-codes.md).
//!
//! Every error placement returns is a [`PlacementError`]. Its [`ErrorCode`] is stable
//! (`PD-NotLeader`, ...), grouped by what the caller does next, and travels with the gRPC
//! status in three places: the metadata key [`CODE_KEY`], the start of the message
//! (`[PD-NotLeader] ...`) for humans, and the gRPC code for generic clients. Hints travel in
//! metadata too: [`LEADER_KEY`] (the leader to go to) and [`RETRY_AFTER_KEY`]. Callers decide
//! by [`ErrorCode::of`], never by the message text.

use crate::meta::MetaError;
use skv_common::ids::{RangeId, StoreId};
use std::time::Duration;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key of the stable error code.
pub const CODE_KEY: &str = "skv-error-code";
/// Metadata key of the placement leader's address (with `PD-NotLeader`, when known).
pub const LEADER_KEY: &str = "skv-leader";
/// Metadata key of the suggested delay before a retry, in milliseconds (transient errors).
pub const RETRY_AFTER_KEY: &str = "skv-retry-after-ms";

/// How long a follower that knows no leader suggests waiting: about one campaign.
const NO_LEADER_RETRY: Duration = crate::election::CAMPAIGN_INTERVAL;
/// Transient failures of the metadata store, the leader or a store.
const TRANSIENT_RETRY: Duration = Duration::from_millis(500);
/// A compare-and-swap that kept losing: retry soon, the race is usually over.
const CONFLICT_RETRY: Duration = Duration::from_millis(50);

/// The stable code of an error. Adding one is fine; renaming or reusing one is a breaking
/// change (clients match on these strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    NotLeader,
    LeaderUnavailable,
    MetaUnavailable,
    Conflict,
    RangeNotFound,
    RangeUnavailable,
    KeyNotCovered,
    EpochNotMatch,
    StoreNotFound,
    StoreRemoved,
    StoreUnavailable,
    NotAReplica,
    InvalidArgument,
    Unimplemented,
    Internal,
    Unauthenticated,
    PermissionDenied,
    AdminAuthOff,
    BackupNotFound,
    FailedPrecondition,
    ObjectStore,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::NotLeader,
        ErrorCode::LeaderUnavailable,
        ErrorCode::MetaUnavailable,
        ErrorCode::Conflict,
        ErrorCode::RangeNotFound,
        ErrorCode::RangeUnavailable,
        ErrorCode::KeyNotCovered,
        ErrorCode::EpochNotMatch,
        ErrorCode::StoreNotFound,
        ErrorCode::StoreRemoved,
        ErrorCode::StoreUnavailable,
        ErrorCode::NotAReplica,
        ErrorCode::InvalidArgument,
        ErrorCode::Unimplemented,
        ErrorCode::Internal,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::AdminAuthOff,
        ErrorCode::BackupNotFound,
        ErrorCode::FailedPrecondition,
        ErrorCode::ObjectStore,
    ];

    /// The stable string, e.g. `PD-NotLeader`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotLeader => "PD-NotLeader",
            ErrorCode::LeaderUnavailable => "PD-LeaderUnavailable",
            ErrorCode::MetaUnavailable => "PD-MetaUnavailable",
            ErrorCode::Conflict => "PD-Conflict",
            ErrorCode::RangeNotFound => "PD-RangeNotFound",
            ErrorCode::RangeUnavailable => "PD-RangeUnavailable",
            ErrorCode::KeyNotCovered => "PD-KeyNotCovered",
            ErrorCode::EpochNotMatch => "PD-EpochNotMatch",
            ErrorCode::StoreNotFound => "PD-StoreNotFound",
            ErrorCode::StoreRemoved => "PD-StoreRemoved",
            ErrorCode::StoreUnavailable => "PD-StoreUnavailable",
            ErrorCode::NotAReplica => "PD-NotAReplica",
            ErrorCode::InvalidArgument => "PD-InvalidArgument",
            ErrorCode::Unimplemented => "PD-Unimplemented",
            ErrorCode::Internal => "PD-Internal",
            ErrorCode::Unauthenticated => "PD-Unauthenticated",
            ErrorCode::PermissionDenied => "PD-PermissionDenied",
            ErrorCode::AdminAuthOff => "PD-AdminAuthOff",
            ErrorCode::BackupNotFound => "PD-BackupNotFound",
            ErrorCode::FailedPrecondition => "PD-FailedPrecondition",
            ErrorCode::ObjectStore => "PD-ObjectStore",
        }
    }

    /// The gRPC code a status with this error carries.
    pub const fn grpc(self) -> Code {
        match self {
            ErrorCode::NotLeader
            | ErrorCode::LeaderUnavailable
            | ErrorCode::MetaUnavailable
            | ErrorCode::RangeUnavailable
            | ErrorCode::KeyNotCovered
            | ErrorCode::StoreUnavailable => Code::Unavailable,
            ErrorCode::Conflict | ErrorCode::EpochNotMatch => Code::Aborted,
            ErrorCode::RangeNotFound => Code::NotFound,
            ErrorCode::StoreNotFound | ErrorCode::StoreRemoved | ErrorCode::NotAReplica => Code::FailedPrecondition,
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::AdminAuthOff => Code::FailedPrecondition,
            ErrorCode::BackupNotFound => Code::NotFound,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::ObjectStore => Code::Unavailable,
        }
    }

    /// The code for its stable string.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The code a placement status carries in its metadata (None: not from placement, e.g.
    /// a transport error).
    pub fn of(status: &Status) -> Option<ErrorCode> {
        ErrorCode::parse(status.metadata().get(CODE_KEY)?.to_str().ok()?)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every error of the placement service, by what the caller does next
/// (the table is in docs/adr/0012-placement-error-codes.md).
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// This instance cannot serve the write; go to `leader` (or, if unknown, retry).
    #[error("this placement instance is not the leader{}", leader.as_deref().map(|l| format!("; the leader is {l}")).unwrap_or_else(|| "; no leader is known yet".into()))]
    NotLeader { leader: Option<String> },
    /// The leader did not answer the forwarded request.
    #[error("placement leader {leader} is unavailable")]
    LeaderUnavailable { leader: String },
    /// The metadata store (etcd or embedded) failed; nothing was decided.
    #[error("metadata store: {0}")]
    MetaUnavailable(#[from] MetaError),
    /// A compare-and-swap kept losing to concurrent updates.
    #[error("concurrent updates: {what}")]
    Conflict { what: String },
    #[error("range {range_id} not found")]
    RangeNotFound { range_id: RangeId },
    /// The range's leader is not known yet, or kept refusing; retry after `retry_after`.
    #[error("range {range_id} is unavailable: {reason}")]
    RangeUnavailable {
        range_id: RangeId,
        reason: String,
        retry_after: Duration,
    },
    /// The range map does not cover the key yet (it is catching up).
    #[error("no range holds this key yet (the map is catching up)")]
    KeyNotCovered,
    /// The range changed (split, merge) while the admin operation ran; re-read and decide.
    #[error("range {range_id} changed meanwhile: {reason}")]
    EpochNotMatch { range_id: RangeId, reason: String },
    #[error("unknown store {store_id}; call RegisterStore first")]
    StoreNotFound { store_id: StoreId },
    #[error("store {store_id} was removed from the cluster")]
    StoreRemoved { store_id: StoreId },
    /// A storenode could not be reached or failed the call.
    #[error("store {store_id}{}: {reason}", if address.is_empty() { String::new() } else { format!(" at {address}") })]
    StoreUnavailable {
        store_id: StoreId,
        address: String,
        reason: String,
    },
    #[error("store {store_id} holds no replica of range {range_id}")]
    NotAReplica { range_id: RangeId, store_id: StoreId },
    #[error("{reason}")]
    InvalidArgument { reason: String },
    #[error("{what} is not implemented yet (milestone 2: ranges in motion)")]
    Unimplemented { what: &'static str },
    /// A bug or corrupt metadata: retrying does not help.
    #[error("{reason}")]
    Internal { reason: String },
    /// An admin or status call without a valid token (missing, malformed, expired, bad
    /// signature, unknown kid, ...). Carries the reason only, never the token.
    #[error(
        "{0}; placement's admin and status calls need `authorization: Bearer <jwt>` (skvctl: --token or SKV_TOKEN)"
    )]
    Unauthenticated(skv_auth::AuthError),
    /// A valid token whose role does not allow the call (`needed`).
    #[error("a {role} token cannot call {call}: it needs role {needed}")]
    PermissionDenied {
        call: &'static str,
        role: &'static str,
        needed: &'static str,
    },
    /// This instance was started without a JWT key, so it can authorize no admin call.
    #[error(
        "{call} refused: this placement has no JWT key to check admin tokens with; start it with \
         --jwt-hs256-secret-file, --jwt-public-key-file or --jwt-jwks-file (or, for development \
         only, --admin-auth=none)"
    )]
    AdminAuthOff { call: &'static str },
    /// No backup of this id has a manifest (ADR 0028).
    #[error("no backup {id} (no manifest in the object store)")]
    BackupNotFound { id: String },
    /// The cluster is not in a state the call needs (a restore into a cluster with data,
    /// a backup call without object storage, ...).
    #[error("{reason}")]
    FailedPrecondition { reason: String },
    /// The object store failed (unreachable, refused, a bad manifest).
    #[error("object store: {reason}")]
    ObjectStore { reason: String },
}

pub type PlacementResult<T> = Result<T, PlacementError>;

impl PlacementError {
    pub fn invalid(reason: impl Into<String>) -> Self {
        PlacementError::InvalidArgument { reason: reason.into() }
    }

    pub fn internal(reason: impl std::fmt::Display) -> Self {
        PlacementError::Internal {
            reason: reason.to_string(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            PlacementError::NotLeader { .. } => ErrorCode::NotLeader,
            PlacementError::LeaderUnavailable { .. } => ErrorCode::LeaderUnavailable,
            PlacementError::MetaUnavailable(_) => ErrorCode::MetaUnavailable,
            PlacementError::Conflict { .. } => ErrorCode::Conflict,
            PlacementError::RangeNotFound { .. } => ErrorCode::RangeNotFound,
            PlacementError::RangeUnavailable { .. } => ErrorCode::RangeUnavailable,
            PlacementError::KeyNotCovered => ErrorCode::KeyNotCovered,
            PlacementError::EpochNotMatch { .. } => ErrorCode::EpochNotMatch,
            PlacementError::StoreNotFound { .. } => ErrorCode::StoreNotFound,
            PlacementError::StoreRemoved { .. } => ErrorCode::StoreRemoved,
            PlacementError::StoreUnavailable { .. } => ErrorCode::StoreUnavailable,
            PlacementError::NotAReplica { .. } => ErrorCode::NotAReplica,
            PlacementError::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            PlacementError::Unimplemented { .. } => ErrorCode::Unimplemented,
            PlacementError::Internal { .. } => ErrorCode::Internal,
            PlacementError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            PlacementError::PermissionDenied { .. } => ErrorCode::PermissionDenied,
            PlacementError::AdminAuthOff { .. } => ErrorCode::AdminAuthOff,
            PlacementError::BackupNotFound { .. } => ErrorCode::BackupNotFound,
            PlacementError::FailedPrecondition { .. } => ErrorCode::FailedPrecondition,
            PlacementError::ObjectStore { .. } => ErrorCode::ObjectStore,
        }
    }

    /// When to retry, for errors a retry can fix (None: retrying the same request is useless
    /// or, for `PD-NotLeader` with a leader, go to that leader now).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            PlacementError::NotLeader { leader: None } => Some(NO_LEADER_RETRY),
            PlacementError::LeaderUnavailable { .. }
            | PlacementError::MetaUnavailable(_)
            | PlacementError::StoreUnavailable { .. }
            | PlacementError::ObjectStore { .. } => Some(TRANSIENT_RETRY),
            PlacementError::KeyNotCovered => Some(NO_LEADER_RETRY),
            PlacementError::Conflict { .. } => Some(CONFLICT_RETRY),
            PlacementError::RangeUnavailable { retry_after, .. } => Some(*retry_after),
            PlacementError::NotLeader { leader: Some(_) }
            | PlacementError::RangeNotFound { .. }
            | PlacementError::EpochNotMatch { .. }
            | PlacementError::StoreNotFound { .. }
            | PlacementError::StoreRemoved { .. }
            | PlacementError::NotAReplica { .. }
            | PlacementError::InvalidArgument { .. }
            | PlacementError::Unimplemented { .. }
            | PlacementError::Internal { .. }
            | PlacementError::Unauthenticated(_)
            | PlacementError::PermissionDenied { .. }
            | PlacementError::AdminAuthOff { .. }
            | PlacementError::BackupNotFound { .. }
            | PlacementError::FailedPrecondition { .. } => None,
        }
    }

    /// The placement leader to send the request to (`PD-NotLeader`).
    pub fn leader_hint(&self) -> Option<&str> {
        match self {
            PlacementError::NotLeader { leader } => leader.as_deref(),
            _ => None,
        }
    }
}

impl From<skv_common::limits::InputError> for PlacementError {
    fn from(e: skv_common::limits::InputError) -> Self {
        PlacementError::invalid(e.to_string())
    }
}

impl From<PlacementError> for Status {
    fn from(e: PlacementError) -> Status {
        let code = e.code();
        let mut md = MetadataMap::new();
        md.insert(CODE_KEY, MetadataValue::from_static(code.as_str()));
        if let Some(d) = e.retry_after() {
            md.insert(RETRY_AFTER_KEY, MetadataValue::from(d.as_millis() as u64));
        }
        // An address that is not a valid header value is left out of the metadata (the
        // message still names it).
        if let Some(v) = e.leader_hint().and_then(|l| l.parse().ok()) {
            md.insert(LEADER_KEY, v);
        }
        Status::with_metadata(code.grpc(), format!("[{code}] {e}"), md)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn range_unavailable() -> PlacementError {
        PlacementError::RangeUnavailable {
            range_id: RangeId(3),
            reason: "busy".into(),
            retry_after: Duration::from_millis(70),
        }
    }

    /// One line of the mapping table: the error, its code, gRPC code, retry hint (ms) and
    /// leader hint.
    type Line = (PlacementError, &'static str, Code, Option<u64>, Option<&'static str>);

    #[test]
    fn mapping_table() {
        let ms = |n: u64| Some(n);
        let table: Vec<Line> = vec![
            (
                PlacementError::NotLeader {
                    leader: Some("10.0.0.1:7000".into()),
                },
                "PD-NotLeader",
                Code::Unavailable,
                None,
                Some("10.0.0.1:7000"),
            ),
            (
                PlacementError::NotLeader { leader: None },
                "PD-NotLeader",
                Code::Unavailable,
                ms(200),
                None,
            ),
            (
                PlacementError::LeaderUnavailable { leader: "l:1".into() },
                "PD-LeaderUnavailable",
                Code::Unavailable,
                ms(500),
                None,
            ),
            (
                PlacementError::from(MetaError::Other("etcd down".into())),
                "PD-MetaUnavailable",
                Code::Unavailable,
                ms(500),
                None,
            ),
            (
                PlacementError::Conflict { what: "cas".into() },
                "PD-Conflict",
                Code::Aborted,
                ms(50),
                None,
            ),
            (
                PlacementError::RangeNotFound { range_id: RangeId(4) },
                "PD-RangeNotFound",
                Code::NotFound,
                None,
                None,
            ),
            (
                range_unavailable(),
                "PD-RangeUnavailable",
                Code::Unavailable,
                ms(70),
                None,
            ),
            (
                PlacementError::KeyNotCovered,
                "PD-KeyNotCovered",
                Code::Unavailable,
                ms(200),
                None,
            ),
            (
                PlacementError::EpochNotMatch {
                    range_id: RangeId(1),
                    reason: "split".into(),
                },
                "PD-EpochNotMatch",
                Code::Aborted,
                None,
                None,
            ),
            (
                PlacementError::StoreNotFound { store_id: StoreId(9) },
                "PD-StoreNotFound",
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                PlacementError::StoreRemoved { store_id: StoreId(9) },
                "PD-StoreRemoved",
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                PlacementError::StoreUnavailable {
                    store_id: StoreId(2),
                    address: "s:1".into(),
                    reason: "refused".into(),
                },
                "PD-StoreUnavailable",
                Code::Unavailable,
                ms(500),
                None,
            ),
            (
                PlacementError::NotAReplica {
                    range_id: RangeId(1),
                    store_id: StoreId(5),
                },
                "PD-NotAReplica",
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                PlacementError::invalid("split_key is empty"),
                "PD-InvalidArgument",
                Code::InvalidArgument,
                None,
                None,
            ),
            (
                PlacementError::Unimplemented { what: "MergeRanges" },
                "PD-Unimplemented",
                Code::Unimplemented,
                None,
                None,
            ),
            (
                PlacementError::internal("undecodable record"),
                "PD-Internal",
                Code::Internal,
                None,
                None,
            ),
            (
                PlacementError::Unauthenticated(skv_auth::AuthError::Missing),
                "PD-Unauthenticated",
                Code::Unauthenticated,
                None,
                None,
            ),
            (
                PlacementError::PermissionDenied {
                    call: "SplitRange",
                    role: "write",
                    needed: "admin",
                },
                "PD-PermissionDenied",
                Code::PermissionDenied,
                None,
                None,
            ),
            (
                PlacementError::AdminAuthOff { call: "SplitRange" },
                "PD-AdminAuthOff",
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                PlacementError::BackupNotFound { id: "b1".into() },
                "PD-BackupNotFound",
                Code::NotFound,
                None,
                None,
            ),
            (
                PlacementError::FailedPrecondition {
                    reason: "cluster holds data".into(),
                },
                "PD-FailedPrecondition",
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                PlacementError::ObjectStore {
                    reason: "unreachable".into(),
                },
                "PD-ObjectStore",
                Code::Unavailable,
                ms(500),
                None,
            ),
        ];
        let mut seen = HashSet::new();
        for (err, code, grpc, retry_ms, leader) in table {
            let line = format!("{err:?}");
            assert_eq!(err.code().as_str(), code, "{line}");
            assert_eq!(err.code().grpc(), grpc, "{line}");
            assert_eq!(err.retry_after().map(|d| d.as_millis() as u64), retry_ms, "{line}");
            assert_eq!(err.leader_hint(), leader, "{line}");
            seen.insert(err.code());
            let text = err.to_string();
            let st = Status::from(err);
            assert_eq!(st.code(), grpc, "{line}");
            assert_eq!(ErrorCode::of(&st), Some(ErrorCode::parse(code).unwrap()), "{line}");
            assert_eq!(st.message(), format!("[{code}] {text}"), "{line}");
            let md = |k: &str| st.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
            assert_eq!(md(RETRY_AFTER_KEY), retry_ms.map(|n| n.to_string()), "{line}");
            assert_eq!(md(LEADER_KEY).as_deref(), leader, "{line}");
        }
        assert_eq!(seen.len(), ErrorCode::ALL.len(), "every code is in the table");
    }

    #[test]
    fn codes_are_unique_stable_strings() {
        let strs: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(strs.len(), ErrorCode::ALL.len());
        for c in ErrorCode::ALL {
            assert!(c.as_str().starts_with("PD-"), "{c}");
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
        }
        assert_eq!(ErrorCode::parse("PD-Nope"), None);
        // A status not from placement (transport error) has no code.
        assert_eq!(ErrorCode::of(&Status::unavailable("connection refused")), None);
    }

    #[test]
    fn a_leader_address_that_is_no_header_value_stays_in_the_message_only() {
        let st = Status::from(PlacementError::NotLeader {
            leader: Some("bad\naddress".into()),
        });
        assert_eq!(ErrorCode::of(&st), Some(ErrorCode::NotLeader));
        assert!(st.metadata().get(LEADER_KEY).is_none());
    }
}
