//! Who may call what at placement (ADR 0021).
//!
//! - Admin calls (SplitRange, TransferLeader, MergeRanges, MoveReplica, DrainStore,
//!   SetSchedulerPaused) change the cluster: they need a JWT of role `admin`.
//! - Status calls (`PlacementAdmin`: RangeStats, StoreStatus, ListOperators) read the leader's
//!   memory: any valid token (role `read` or more, any namespace).
//! - Internal calls (registration, heartbeats, reports, range map reads, the watch, ID
//!   allocation) take no token: storenodes and proxies make them, and mTLS secures them.
//!
//! The token is checked by every instance it reaches: a follower checks it before forwarding,
//! forwards the `authorization` header with the request, and the leader checks it again (the
//! forwarding marker alone is never trusted, anyone can set it).

use crate::AdminAuth;
use crate::error::{PlacementError, PlacementResult};
use crate::metrics::Metrics;
use skv_auth::{AuthError, Role, Verifier};
use skv_rpc::tls::PeerRole;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

/// Under mTLS (ADR 0022), the certificate roles each kind of call admits. A placement peer
/// is in every list: followers forward calls to the leader.
/// Registration, heartbeats, split/merge reports and ID allocation: storenodes.
pub(super) const STORE_CALLERS: &[PeerRole] = &[PeerRole::Storenode, PeerRole::Placement];
/// Range map and member reads, the watch: every component and the operator's client.
pub(super) const READERS: &[PeerRole] = &[
    PeerRole::Storenode,
    PeerRole::Proxy,
    PeerRole::Placement,
    PeerRole::Admin,
];
/// Admin and status calls: the operator's client (its certificate is a credential of its
/// own), and placement peers forwarding them.
pub(super) const ADMIN_CALLERS: &[PeerRole] = &[PeerRole::Admin, PeerRole::Placement];

/// How this instance authorizes admin and status calls.
pub(super) enum Guard {
    /// Tokens checked with these keys.
    Jwt(Arc<Verifier>),
    /// `--admin-auth=none`: everything allowed (development).
    Open,
    /// `--admin-auth=jwt` without a key: admin and status calls refused.
    Off,
}

impl Guard {
    /// The guard the config asks for; loads the keys and starts their reload task.
    pub(super) async fn from_config(config: &crate::Config, cancel: CancellationToken) -> anyhow::Result<Guard> {
        let source = config.jwt.key_source()?;
        match (config.admin_auth, source) {
            (AdminAuth::None, Some(source)) => anyhow::bail!(
                "--admin-auth=none and {} both given: drop one (a key that checks nothing would be misleading)",
                source.flag()
            ),
            (AdminAuth::None, None) => {
                tracing::warn!(
                    "--admin-auth=none: admin calls (split, move, drain, ...) are NOT authorized; development only"
                );
                Ok(Guard::Open)
            }
            (AdminAuth::Jwt, None) => {
                tracing::warn!(
                    "no JWT key (--jwt-hs256-secret-file, --jwt-public-key-file or --jwt-jwks-file): admin and status calls will be refused"
                );
                Ok(Guard::Off)
            }
            (AdminAuth::Jwt, Some(source)) => {
                let verifier = config.jwt.load(source, cancel, |_, _| {}).await?;
                Ok(Guard::Jwt(verifier))
            }
        }
    }

    /// Checks the `authorization` header of a call named `call` that needs `needed`.
    pub(super) fn check(
        &self,
        metadata: &MetadataMap,
        call: &'static str,
        needed: Role,
        metrics: &Metrics,
    ) -> PlacementResult<()> {
        let refuse = |reason: &str, e: PlacementError| {
            metrics
                .auth_refusals
                .get_or_create(&Metrics::labels(&[("call", call), ("reason", reason)]))
                .inc();
            Err(e)
        };
        match self {
            Guard::Open => Ok(()),
            Guard::Off => refuse("no_key", PlacementError::AdminAuthOff { call }),
            Guard::Jwt(verifier) => match verifier.authorize(metadata, needed) {
                Ok(claims) => {
                    if needed == Role::Admin {
                        tracing::info!(call, sub = %claims.sub, "admin call authorized");
                    }
                    Ok(())
                }
                Err(AuthError::Forbidden) => {
                    // Verified, only its role is too weak: name it.
                    let role = skv_auth::bearer_token(metadata)
                        .ok()
                        .and_then(|t| verifier.verify(t).ok())
                        .map_or("valid", |c| c.role.as_str());
                    tracing::warn!(call, role, "admin call refused: role too weak");
                    refuse(
                        "forbidden",
                        PlacementError::PermissionDenied {
                            call,
                            role,
                            needed: needed.as_str(),
                        },
                    )
                }
                Err(e) => {
                    tracing::warn!(call, reason = e.reason(), "admin call refused: no valid token");
                    refuse(e.reason(), PlacementError::Unauthenticated(e))
                }
            },
        }
    }
}
