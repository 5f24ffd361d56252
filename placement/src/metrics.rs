//! Placement's Prometheus series.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// All series of one placement instance (cheap to clone).
#[derive(Clone, Default)]
pub struct Metrics {
    pub is_leader: Gauge,
    pub stores: Family<Labels, Gauge>,
    pub ranges: Gauge,
    /// Operators finished, by kind and result (ok, failed, timeout, epoch_changed).
    pub operators: Family<Labels, Counter>,
    /// Operators in flight, by kind.
    pub operators_in_flight: Family<Labels, Gauge>,
    /// Load splits not made, by reason (single_key).
    pub split_skipped: Family<Labels, Counter>,
    /// Stale replicas named in store heartbeat answers.
    pub stale_replicas: Counter,
    pub heartbeats: Family<Labels, Counter>,
    pub meta_txn_failures: Counter,
    pub meta_errors: Counter,
    pub forwarded: Counter,
    pub stale_updates: Counter,
    /// Admin and status calls refused by authorization, by call and reason (ADR 0021).
    pub auth_refusals: Family<Labels, Counter>,
}

impl Metrics {
    /// Registers every series into a new registry.
    pub fn new_registry() -> (Self, Registry) {
        let m = Self::default();
        let mut r = Registry::with_prefix("skv_placement");
        r.register(
            "is_leader",
            "1 when this instance is the placement leader",
            m.is_leader.clone(),
        );
        r.register("stores", "Stores by state", m.stores.clone());
        r.register(
            "ranges",
            "Ranges in the map (as of the last scheduler tick)",
            m.ranges.clone(),
        );
        r.register(
            "operators",
            "Operators finished, by kind and result",
            m.operators.clone(),
        );
        r.register(
            "operators_in_flight",
            "Operators in flight, by kind",
            m.operators_in_flight.clone(),
        );
        r.register(
            "split_skipped",
            "Load splits not made, by reason",
            m.split_skipped.clone(),
        );
        r.register(
            "stale_replicas",
            "Replicas named stale in store heartbeat answers",
            m.stale_replicas.clone(),
        );
        r.register(
            "heartbeats",
            "Heartbeats received, by kind (store, range)",
            m.heartbeats.clone(),
        );
        r.register(
            "meta_txn_failures",
            "Metadata transactions whose compares failed (concurrent change)",
            m.meta_txn_failures.clone(),
        );
        r.register("meta_errors", "Metadata store errors", m.meta_errors.clone());
        r.register("forwarded", "Requests forwarded to the leader", m.forwarded.clone());
        r.register(
            "stale_updates",
            "Range updates refused as stale",
            m.stale_updates.clone(),
        );
        r.register(
            "auth_refusals",
            "Admin and status calls refused by authorization, by call and reason",
            m.auth_refusals.clone(),
        );
        (m, r)
    }

    pub fn label(k: &str, v: &str) -> Labels {
        vec![(k.to_string(), v.to_string())]
    }

    pub fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}
