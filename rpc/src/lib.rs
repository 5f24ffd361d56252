//! How skv components and clients talk gRPC, in one place (issue 8: one shared client layer).
//!
//! - [`endpoint`] / [`lazy_channel`]: the only way skv builds a tonic channel (connect
//!   timeout, `TCP_NODELAY`, HTTP/2 keepalive, TLS from [`EndpointOptions::tls`]).
//! - [`tls`]: server and client TLS from PEM files (rustls, aws-lc-rs), the role a peer's
//!   certificate names, and the interceptor that admits only some roles.
//! - [`Backoff`]: bounded exponential backoff with full jitter; the jitter is passed in, so
//!   the schedule is a pure function that tests can table.
//! - [`incoming`]: how every skv server accepts connections (`TCP_NODELAY` on).
//! - [`never_processed`]: whether a failed call provably never reached the server, so a
//!   write may be retried (connect errors, hyper's canceled, REFUSED_STREAM, a graceful GOAWAY).
//! - [`PlacementMembers`]: the one client of the placement service. It tries each member
//!   in turn, the last good one first, each try bounded and all under the caller's deadline.
//!
//! This crate depends on no server crate, so the SDK can use it too.

mod backoff;
#[cfg(feature = "dev-certs")]
pub mod certs;
mod endpoint;
mod placement;
mod role_gate;
mod server;
mod timeout;
pub mod tls;
pub(crate) mod tls_client;
mod tls_incoming;
mod unprocessed;

pub use backoff::Backoff;
pub use endpoint::{EndpointOptions, channel_with, endpoint, endpoint_with, lazy_channel, url, url_with};
pub use placement::PlacementMembers;
pub use server::incoming;
pub use timeout::parse_grpc_timeout;
pub use unprocessed::{never_processed, never_processed_cause, tls_refused_cause};

/// Errors of this crate. A bad address is a configuration error: report it, don't retry.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("bad address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("no endpoint given")]
    NoEndpoints,
}
