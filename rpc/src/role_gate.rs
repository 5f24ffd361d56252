//! Per-call role checks in front of a whole gRPC service (ADR 0022).
//!
//! [`crate::tls::RequireRole`] is a tonic interceptor: it sees the request's metadata and
//! the peer's certificates but not which method is called, so one service whose methods
//! belong to different callers (the storenode's `Store`: data calls from proxies, admin
//! calls from placement) needs this instead. [`RoleGate`] wraps a service, reads the method
//! from the request path (`/package.Service/Method`) and the peer's certificate from the
//! connection (tonic puts it in the request's extensions), and answers PERMISSION_DENIED
//! itself when the certificate's role is not among those the policy allows for that method.

use crate::tls::{PeerRole, RequireRole, role_of_der};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The roles allowed to call `method` (the last segment of the path, e.g. `Get`).
pub type RolePolicy = fn(method: &str) -> &'static [PeerRole];

/// A service behind a role check (see the module's documentation). Disabled (no TLS), it
/// admits everyone: there is no certificate to check.
#[derive(Clone)]
pub struct RoleGate<S> {
    inner: S,
    enabled: bool,
    policy: RolePolicy,
}

impl<S> RoleGate<S> {
    pub fn new(inner: S, enabled: bool, policy: RolePolicy) -> Self {
        RoleGate { inner, enabled, policy }
    }
}

impl<S: NamedService> NamedService for RoleGate<S> {
    const NAME: &'static str = S::NAME;
}

/// The role named by the certificate of the connection a request came on.
fn role_of_request<B>(req: &http::Request<B>) -> Option<PeerRole> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())?;
    role_of_der(certs.first()?.as_ref())
}

/// The decision for one request path: `Err` with the refusal.
fn decide(
    enabled: bool,
    policy: RolePolicy,
    service: &'static str,
    path: &str,
    role: Option<PeerRole>,
) -> Result<(), tonic::Status> {
    if !enabled {
        return Ok(());
    }
    let method = path.rsplit('/').next().unwrap_or_default();
    let allowed = policy(method);
    // The refusal names the method: "a proxy certificate cannot call
    // skv.internal.v1.Store/CreateReplica (allowed: placement)".
    let call = service;
    RequireRole::new(true, call, allowed)
        .admits(role)
        .map_err(|s| tonic::Status::permission_denied(s.message().replacen(call, &format!("{call}/{method}"), 1)))
}

impl<S> Service<http::Request<Body>> for RoleGate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + NamedService,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match decide(
            self.enabled,
            self.policy,
            S::NAME,
            req.uri().path(),
            role_of_request(&req),
        ) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => {
                tracing::debug!(path = %req.uri().path(), refusal = %status.message(), "call refused by certificate role");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_policy(method: &str) -> &'static [PeerRole] {
        match method {
            "Get" => &[PeerRole::Proxy],
            _ => &[PeerRole::Placement],
        }
    }

    #[test]
    fn decides_by_method_and_role() {
        let svc = "skv.internal.v1.Store";
        assert!(
            decide(
                true,
                store_policy,
                svc,
                "/skv.internal.v1.Store/Get",
                Some(PeerRole::Proxy)
            )
            .is_ok()
        );
        let e = decide(
            true,
            store_policy,
            svc,
            "/skv.internal.v1.Store/SplitRange",
            Some(PeerRole::Proxy),
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.message(),
            "a proxy certificate cannot call skv.internal.v1.Store/SplitRange (allowed: placement)"
        );
        assert!(decide(true, store_policy, svc, "/skv.internal.v1.Store/Get", None).is_err());
        assert!(decide(false, store_policy, svc, "/skv.internal.v1.Store/SplitRange", None).is_ok());
    }
}
