//! Prometheus metrics of a storenode.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric the node exports. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    pub proposals: Counter,
    pub apply_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub leaders: Gauge,
    pub ranges: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            proposals: Counter::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            leaders: Gauge::default(),
            ranges: Gauge::default(),
        }
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "skv_storenode_raft_proposals",
            "Raft proposals made by this node",
            self.proposals.clone(),
        );
        reg.register(
            "skv_storenode_apply_seconds",
            "Time to apply a batch of committed entries",
            self.apply_seconds.clone(),
        );
        reg.register(
            "skv_storenode_log_fsync_seconds",
            "Time of one group-commit fsync of the Raft log",
            self.fsync_seconds.clone(),
        );
        reg.register(
            "skv_storenode_leader_count",
            "Ranges led by this node",
            self.leaders.clone(),
        );
        reg.register(
            "skv_storenode_range_count",
            "Replicas held by this node",
            self.ranges.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
