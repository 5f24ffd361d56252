//! Placement's Prometheus series.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;
type HistogramCtor = fn() -> Histogram;

fn operator_histogram() -> Histogram {
    // 10 ms .. ~1.5 h
    Histogram::new(exponential_buckets(0.01, 2.0, 20))
}

/// All series of one placement instance (cheap to clone).
#[derive(Clone)]
pub struct Metrics {
    pub is_leader: Gauge,
    pub stores: Family<Labels, Gauge>,
    pub ranges: Gauge,
    /// Operators finished, by kind and result (ok, failed, timeout, epoch_changed).
    pub operators: Family<Labels, Counter>,
    /// Operators in flight, by kind.
    pub operators_in_flight: Family<Labels, Gauge>,
    /// Operator steps refused and retried from a re-read range, by kind and step (a move's
    /// removal sent while leadership was moving, a stale epoch, ...).
    pub operator_step_retries: Family<Labels, Counter>,
    /// Load splits not made, by reason (single_key, no_idle_cpu).
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
    /// Scheduler ticks run by the leader, and how long each took.
    pub scheduler_ticks: Counter,
    pub scheduler_tick_seconds: Histogram,
    /// Operators started, by kind and origin (scheduler, admin).
    pub operators_started: Family<Labels, Counter>,
    /// Operator duration (start to finish, whatever the result), by kind.
    pub operator_seconds: Family<Labels, Histogram, HistogramCtor>,
    /// Ranges short of live voters, and ranges without a live leader, as of the last tick
    /// (`scheduler::health`).
    pub ranges_under_replicated: Gauge,
    pub ranges_leaderless: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            is_leader: Gauge::default(),
            stores: Family::default(),
            ranges: Gauge::default(),
            operators: Family::default(),
            operators_in_flight: Family::default(),
            operator_step_retries: Family::default(),
            split_skipped: Family::default(),
            stale_replicas: Counter::default(),
            heartbeats: Family::default(),
            meta_txn_failures: Counter::default(),
            meta_errors: Counter::default(),
            forwarded: Counter::default(),
            stale_updates: Counter::default(),
            auth_refusals: Family::default(),
            scheduler_ticks: Counter::default(),
            // 100 µs .. ~6.5 s
            scheduler_tick_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
            operators_started: Family::default(),
            operator_seconds: Family::new_with_constructor(operator_histogram as HistogramCtor),
            ranges_under_replicated: Gauge::default(),
            ranges_leaderless: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every series into a new registry.
    pub fn new_registry() -> (Self, Registry) {
        let m = Self::default();
        // Every reason exported from the start at 0, so that a dashboard or alert on them
        // finds the series before the first skip.
        for reason in [crate::scheduler::SKIP_SINGLE_KEY, crate::scheduler::SKIP_NO_IDLE_CPU] {
            let _ = m.split_skipped.get_or_create(&Self::label("reason", reason));
        }
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("skv_placement");
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
            "operator_step_retries",
            "Operator steps refused and retried from a re-read range, by kind and step",
            m.operator_step_retries.clone(),
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
        r.register(
            "scheduler_ticks",
            "Scheduler ticks run by this instance as leader",
            m.scheduler_ticks.clone(),
        );
        r.register(
            "scheduler_tick_duration_seconds",
            "Time of one scheduler tick (reading the map and stores, planning, launching)",
            m.scheduler_tick_seconds.clone(),
        );
        r.register(
            "operators_started",
            "Operators started, by kind and origin (scheduler, admin)",
            m.operators_started.clone(),
        );
        r.register(
            "operator_duration_seconds",
            "Operator duration from start to finish (any result), by kind",
            m.operator_seconds.clone(),
        );
        r.register(
            "ranges_under_replicated",
            "Ranges with fewer voters on live stores than wanted, as of the last scheduler tick",
            m.ranges_under_replicated.clone(),
        );
        r.register(
            "ranges_leaderless",
            "Ranges whose last known leader is unknown or not on a live store, as of the last scheduler tick",
            m.ranges_leaderless.clone(),
        );
        (m, root)
    }

    pub fn label(k: &str, v: &str) -> Labels {
        vec![(k.to_string(), v.to_string())]
    }

    pub fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}
