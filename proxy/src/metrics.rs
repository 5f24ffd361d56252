//! Proxy metrics (prometheus-client), served by `skv_common::telemetry::serve_metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCode {
    pub rpc: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    pub rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `loaded` or `refused` (the file changed but did not load; the old keys stay).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantReason {
    /// The namespace, or `_other` past the first labeled ones (`quota::MAX_LABELED_NAMESPACES`).
    pub namespace: String,
    pub reason: &'static str,
}

type HistogramCtor = fn() -> Histogram;

/// Every proxy series. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RpcCode, Counter>,
    pub latency: Family<Rpc, Histogram, HistogramCtor>,
    pub retries: Family<Reason, Counter>,
    pub auth_denials: Family<Reason, Counter>,
    pub tenant_refusals: Family<TenantReason, Counter>,
    pub jwt_key_reloads: Family<Outcome, Counter>,
    pub jwt_keys: Gauge,
    pub range_cache_size: Gauge,
    pub range_cache_hits: Counter,
    pub range_cache_misses: Counter,
    pub placement_errors: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    /// Creates the series and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as HistogramCtor),
            retries: Family::default(),
            auth_denials: Family::default(),
            tenant_refusals: Family::default(),
            jwt_key_reloads: Family::default(),
            jwt_keys: Gauge::default(),
            range_cache_size: Gauge::default(),
            range_cache_hits: Counter::default(),
            range_cache_misses: Counter::default(),
            placement_errors: Counter::default(),
        };
        registry.register(
            "skv_proxy_requests",
            "Client requests by RPC and gRPC status code",
            m.requests.clone(),
        );
        registry.register(
            "skv_proxy_request_duration_seconds",
            "Client request latency by RPC",
            m.latency.clone(),
        );
        registry.register(
            "skv_proxy_retries",
            "Internal retries by reason (routing errors, transport errors)",
            m.retries.clone(),
        );
        registry.register(
            "skv_proxy_auth_denials",
            "Requests refused by authentication or authorization, by reason",
            m.auth_denials.clone(),
        );
        registry.register(
            "skv_proxy_tenant_refusals",
            "Requests refused by a tenant quota, by namespace and reason (rate, concurrency)",
            m.tenant_refusals.clone(),
        );
        registry.register(
            "skv_proxy_jwt_key_reloads",
            "Changes of the JWT key file: loaded, or refused (the previous keys stay)",
            m.jwt_key_reloads.clone(),
        );
        registry.register(
            "skv_proxy_jwt_keys",
            "JWT verification keys in use (kids of the JWKS, or 1)",
            m.jwt_keys.clone(),
        );
        registry.register(
            "skv_proxy_range_cache_size",
            "Ranges in the routing cache",
            m.range_cache_size.clone(),
        );
        registry.register(
            "skv_proxy_range_cache_hits",
            "Route lookups answered by a fresh entry of the routing cache",
            m.range_cache_hits.clone(),
        );
        registry.register(
            "skv_proxy_range_cache_misses",
            "Lookups that had to ask placement",
            m.range_cache_misses.clone(),
        );
        registry.register(
            "skv_proxy_placement_errors",
            "Failed calls to placement",
            m.placement_errors.clone(),
        );
        m
    }

    /// A registry-less instance (tests).
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }

    pub fn observe(&self, rpc: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&RpcCode {
                rpc,
                code: code_name(code),
            })
            .inc();
        self.latency.get_or_create(&Rpc { rpc }).observe(elapsed.as_secs_f64());
    }

    pub fn retry(&self, reason: &'static str) {
        self.retries.get_or_create(&Reason { reason }).inc();
    }

    pub fn auth_denied(&self, reason: &'static str) {
        self.auth_denials.get_or_create(&Reason { reason }).inc();
    }

    pub fn jwt_key_reload(&self, result: &'static str) {
        self.jwt_key_reloads.get_or_create(&Outcome { result }).inc();
    }

    /// The refusal counter of one namespace label and reason (kept by the tenant's state).
    pub fn tenant_refusals(&self, namespace: String, reason: &'static str) -> Counter {
        self.tenant_refusals
            .get_or_create(&TenantReason { namespace, reason })
            .clone()
    }
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.observe("Get", tonic::Code::Ok, Duration::from_millis(1));
        m.auth_denied("expired");
        m.retry("not_leader");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(r#"skv_proxy_requests_total{rpc="Get",code="OK"} 1"#),
            "{out}"
        );
        assert!(out.contains(r#"skv_proxy_auth_denials_total{reason="expired"} 1"#));
        assert!(out.contains(r#"skv_proxy_retries_total{reason="not_leader"} 1"#));
        assert!(out.contains("skv_proxy_request_duration_seconds_bucket"));
    }
}
