//! Prometheus metrics of a storenode.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a `Store` request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Answered with a routing error in the body (not applied).
    RoutingError,
    /// Answered with a gRPC status.
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::RoutingError => "routing_error",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcOutcome {
    pub rpc: &'static str,
    pub outcome: &'static str,
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
pub struct GcResult {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    /// `build` (the file written for a follower), `send` (streamed to a peer) or `receive`
    /// (streamed from a peer, checked and installed).
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollOutcome {
    pub result: &'static str,
}

type HistogramCtor = fn() -> Histogram;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

fn snapshot_histogram() -> Histogram {
    // 1 ms .. ~524 s
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Every metric the node exports. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    /// `Store` requests by method and outcome.
    pub requests: Family<RpcOutcome, Counter>,
    /// `Store` request latency by method (for Scan: until the stream is opened).
    pub request_seconds: Family<Rpc, Histogram, HistogramCtor>,
    pub proposals: Counter,
    /// Scan streams holding an engine snapshot right now.
    pub scans_open: Gauge,
    pub apply_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub leaders: Gauge,
    pub ranges: Gauge,
    /// Sums over the local replicas of their approximate live bytes and keys.
    pub replica_bytes: Gauge,
    pub replica_keys: Gauge,
    /// statvfs of the data directory, and process CPU (permille of a core), as last reported.
    pub capacity_bytes: Gauge,
    pub available_bytes: Gauge,
    pub cpu_permille: Gauge,
    /// The machine's idle CPU (thousandths of a core, a mean over about 10 s; ADR 0036).
    pub host_idle_millicpus: Gauge,
    /// Replicas stopped and destroyed (removed from their range, or retired by a merge).
    pub replicas_destroyed: Counter,
    /// Data keys and bytes (key + record) deleted by the garbage collection of replicas.
    pub gc_keys_deleted: Counter,
    pub gc_bytes_deleted: Counter,
    /// Stale-replica names from placement that local checks refused to act on.
    pub stale_refused: Counter,
    /// Merges applied on this node (as target), and merges rolled back (as source).
    pub merges: Counter,
    pub merge_rollbacks: Counter,
    /// Value cache (storenode/src/cache.rs): lookups that hit and missed, bytes held (as
    /// last sampled) and capacity.
    pub value_cache_hits: Counter,
    pub value_cache_misses: Counter,
    pub value_cache_bytes: Gauge,
    pub value_cache_capacity_bytes: Gauge,
    /// Hibernation (ADR 0018): replicas sleeping and waking (as last sampled), wakes by
    /// reason, leader polls by result, campaigns started after a wake.
    pub ranges_hibernating: Gauge,
    pub ranges_waking: Gauge,
    pub range_wakes: Family<Reason, Counter>,
    pub hibernate_polls: Family<PollOutcome, Counter>,
    pub hibernate_campaigns: Counter,
    /// Raft (issue 13): entries applied by the state machines of this node (every replica,
    /// leader or follower), time from a proposal to its apply on the leader, the apply lag
    /// (committed − applied, summed and max over the replicas, as last sampled), leaders
    /// seen to change and elections started by this node's replicas.
    pub raft_applied_entries: Counter,
    pub raft_commit_seconds: Histogram,
    pub raft_apply_lag_entries: Gauge,
    pub raft_apply_lag_max_entries: Gauge,
    pub raft_leader_changes: Counter,
    pub raft_elections: Counter,
    /// Snapshots: bytes streamed to and from peers, duration by phase.
    pub snapshot_sent_bytes: Counter,
    pub snapshot_received_bytes: Counter,
    pub snapshot_seconds: Family<Phase, Histogram, HistogramCtor>,
    /// Snapshot receives refused (ADR 0029): `too_large`, `deadline`, `stream`, `invalid`.
    pub snapshot_receives_refused: Family<Reason, Counter>,
    /// Engine: log appends made durable by one group-commit fsync, and the database's bytes
    /// on disk (journal + tables, as last sampled).
    pub group_commit_batch: Histogram,
    pub engine_disk_bytes: Gauge,
    /// Tombstone GC (ADR 0034): tombstones removed by applied GC commands on this store,
    /// and GC proposals of the ranges it leads by result (collected, rejected, failed).
    pub tombstones_collected: Counter,
    pub tombstone_gc_runs: Family<GcResult, Counter>,
    /// Raft messages for an unknown range refused because this store already holds
    /// `node::MAX_UNINITIALIZED_PEERS` uninitialized replicas.
    pub peers_refused: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram as HistogramCtor),
            proposals: Counter::default(),
            scans_open: Gauge::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            fsync_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            leaders: Gauge::default(),
            ranges: Gauge::default(),
            replica_bytes: Gauge::default(),
            replica_keys: Gauge::default(),
            capacity_bytes: Gauge::default(),
            available_bytes: Gauge::default(),
            cpu_permille: Gauge::default(),
            host_idle_millicpus: Gauge::default(),
            replicas_destroyed: Counter::default(),
            gc_keys_deleted: Counter::default(),
            gc_bytes_deleted: Counter::default(),
            stale_refused: Counter::default(),
            merges: Counter::default(),
            merge_rollbacks: Counter::default(),
            value_cache_hits: Counter::default(),
            value_cache_misses: Counter::default(),
            value_cache_bytes: Gauge::default(),
            value_cache_capacity_bytes: Gauge::default(),
            ranges_hibernating: Gauge::default(),
            ranges_waking: Gauge::default(),
            range_wakes: Family::default(),
            hibernate_polls: Family::default(),
            hibernate_campaigns: Counter::default(),
            raft_applied_entries: Counter::default(),
            raft_commit_seconds: latency_histogram(),
            raft_apply_lag_entries: Gauge::default(),
            raft_apply_lag_max_entries: Gauge::default(),
            raft_leader_changes: Counter::default(),
            raft_elections: Counter::default(),
            snapshot_sent_bytes: Counter::default(),
            snapshot_received_bytes: Counter::default(),
            snapshot_seconds: Family::new_with_constructor(snapshot_histogram as HistogramCtor),
            snapshot_receives_refused: Family::default(),
            // 1 .. 4096 appends per fsync
            group_commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            engine_disk_bytes: Gauge::default(),
            tombstones_collected: Counter::default(),
            tombstone_gc_runs: Family::default(),
            peers_refused: Counter::default(),
        };
        // Both phases exist from the start (a family is exported once a series exists).
        for phase in ["build", "send", "receive"] {
            let _ = m.snapshot_seconds.get_or_create(&Phase { phase });
        }
        for result in ["collected", "rejected", "failed"] {
            let _ = m.tombstone_gc_runs.get_or_create(&GcResult { result });
        }
        for reason in crate::raft::network::ReceiveRefusal::REASONS {
            let _ = m.snapshot_receives_refused.get_or_create(&Reason { reason });
        }
        m
    }

    pub fn range_wake(&self, reason: crate::hibernate::WakeReason) {
        self.range_wakes.get_or_create(&Reason { reason: reason.label() }).inc();
    }

    pub fn hibernate_poll(&self, result: crate::hibernate::PollResult) {
        self.hibernate_polls
            .get_or_create(&PollOutcome { result: result.label() })
            .inc();
    }

    /// Records one `Store` request.
    pub fn observe_request(&self, rpc: &'static str, outcome: Outcome, took: std::time::Duration) {
        self.requests
            .get_or_create(&RpcOutcome {
                rpc,
                outcome: outcome.label(),
            })
            .inc();
        self.request_seconds
            .get_or_create(&Rpc { rpc })
            .observe(took.as_secs_f64());
    }

    /// Records the duration of one snapshot phase (`build`, `send`, `receive`).
    pub fn snapshot_phase(&self, phase: &'static str, took: std::time::Duration) {
        self.snapshot_seconds
            .get_or_create(&Phase { phase })
            .observe(took.as_secs_f64());
    }

    pub fn register(&self, reg: &mut Registry) {
        reg.register(
            "skv_storenode_requests",
            "Store requests by method and outcome (ok, routing_error, error)",
            self.requests.clone(),
        );
        reg.register(
            "skv_storenode_request_duration_seconds",
            "Store request latency by method (Scan: until its stream opens)",
            self.request_seconds.clone(),
        );
        reg.register(
            "skv_storenode_raft_proposals",
            "Raft proposals made by this node",
            self.proposals.clone(),
        );
        reg.register(
            "skv_storenode_scans_open",
            "Scan streams holding an engine snapshot",
            self.scans_open.clone(),
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
        reg.register(
            "skv_storenode_replica_bytes",
            "Approximate live bytes (key + value) summed over the local replicas",
            self.replica_bytes.clone(),
        );
        reg.register(
            "skv_storenode_replica_keys",
            "Approximate live keys summed over the local replicas",
            self.replica_keys.clone(),
        );
        reg.register(
            "skv_storenode_capacity_bytes",
            "Size of the file system holding the data directory",
            self.capacity_bytes.clone(),
        );
        reg.register(
            "skv_storenode_available_bytes",
            "Free bytes (for non-root users) on the file system holding the data directory",
            self.available_bytes.clone(),
        );
        reg.register(
            "skv_storenode_cpu_permille",
            "Process CPU over the last heartbeat interval, in thousandths of one core",
            self.cpu_permille.clone(),
        );
        reg.register(
            "skv_storenode_host_idle_millicpus",
            "Idle CPU of the machine (all cores, /proc/stat), in thousandths of one core, mean over about 10 s",
            self.host_idle_millicpus.clone(),
        );
        reg.register(
            "skv_storenode_replicas_destroyed",
            "Replicas stopped and destroyed (removed, or retired by a merge)",
            self.replicas_destroyed.clone(),
        );
        reg.register(
            "skv_storenode_gc_deleted_keys",
            "Data keys deleted by replica garbage collection",
            self.gc_keys_deleted.clone(),
        );
        reg.register(
            "skv_storenode_gc_deleted_bytes",
            "Data bytes (key + record) deleted by replica garbage collection",
            self.gc_bytes_deleted.clone(),
        );
        reg.register(
            "skv_storenode_stale_replicas_refused",
            "Stale-replica names from placement that the local checks refused",
            self.stale_refused.clone(),
        );
        reg.register(
            "skv_storenode_merges",
            "Merges applied on this node as the target",
            self.merges.clone(),
        );
        reg.register(
            "skv_storenode_raft_peers_refused",
            "Raft messages for an unknown range refused: too many uninitialized replicas here",
            self.peers_refused.clone(),
        );
        reg.register(
            "skv_storenode_tombstones_collected",
            "Delete tombstones removed by applied GC commands on this store (ADR 0034)",
            self.tombstones_collected.clone(),
        );
        reg.register(
            "skv_storenode_tombstone_gc_runs",
            "Tombstone GC proposals of the ranges this store leads, by result",
            self.tombstone_gc_runs.clone(),
        );
        reg.register(
            "skv_storenode_merge_rollbacks",
            "Merges rolled back on this node as the source",
            self.merge_rollbacks.clone(),
        );
        reg.register(
            "skv_storenode_value_cache_hits",
            "Reads of a key's record answered by the value cache",
            self.value_cache_hits.clone(),
        );
        reg.register(
            "skv_storenode_value_cache_misses",
            "Reads of a key's record that went to the engine",
            self.value_cache_misses.clone(),
        );
        reg.register(
            "skv_storenode_value_cache_bytes",
            "Bytes held by the value cache (keys, values and per-entry overhead), as last sampled",
            self.value_cache_bytes.clone(),
        );
        reg.register(
            "skv_storenode_value_cache_capacity_bytes",
            "Capacity of the value cache (--value-cache-bytes)",
            self.value_cache_capacity_bytes.clone(),
        );
        reg.register(
            "skv_storenode_ranges_hibernating",
            "Replicas of this store whose Raft timers are off (hibernating), as last sampled",
            self.ranges_hibernating.clone(),
        );
        reg.register(
            "skv_storenode_ranges_waking",
            "Follower replicas waking up (election timer off until the leader answers), as last sampled",
            self.ranges_waking.clone(),
        );
        reg.register(
            "skv_storenode_range_wakes",
            "Hibernating replicas woken, by reason",
            self.range_wakes.clone(),
        );
        reg.register(
            "skv_storenode_hibernate_polls",
            "Hibernation polls of idle leaders, by result (slept, refused, interrupted)",
            self.hibernate_polls.clone(),
        );
        reg.register(
            "skv_storenode_hibernate_campaigns",
            "Elections started by a woken follower whose leader was down or unreachable",
            self.hibernate_campaigns.clone(),
        );
        reg.register(
            "skv_storenode_raft_applied_entries",
            "Raft log entries applied by the state machines of this node's replicas",
            self.raft_applied_entries.clone(),
        );
        reg.register(
            "skv_storenode_raft_commit_duration_seconds",
            "Time from a proposal on a leader of this node to its apply there (commit latency)",
            self.raft_commit_seconds.clone(),
        );
        reg.register(
            "skv_storenode_raft_apply_lag_entries",
            "Committed but not yet applied entries, summed over this node's replicas, as last sampled",
            self.raft_apply_lag_entries.clone(),
        );
        reg.register(
            "skv_storenode_raft_apply_lag_max_entries",
            "The largest apply lag (committed - applied) of one replica of this node, as last sampled",
            self.raft_apply_lag_max_entries.clone(),
        );
        reg.register(
            "skv_storenode_raft_leader_changes",
            "Replicas of this node that saw their range's leader move to another store",
            self.raft_leader_changes.clone(),
        );
        reg.register(
            "skv_storenode_raft_elections_started",
            "Elections (distinct terms) in which a replica of this node became a candidate",
            self.raft_elections.clone(),
        );
        reg.register(
            "skv_storenode_raft_snapshot_sent_bytes",
            "Snapshot bytes streamed to peer stores",
            self.snapshot_sent_bytes.clone(),
        );
        reg.register(
            "skv_storenode_raft_snapshot_received_bytes",
            "Snapshot bytes received from peer stores",
            self.snapshot_received_bytes.clone(),
        );
        reg.register(
            "skv_storenode_raft_snapshot_receives_refused",
            "Snapshot receives refused and their partial files deleted, by reason (too_large: past --snapshot-max-receive-bytes; deadline: not received within --snapshot-receive-timeout-secs; stream: the sender's stream failed or ended early; invalid: the file failed its checks)",
            self.snapshot_receives_refused.clone(),
        );
        reg.register(
            "skv_storenode_raft_snapshot_duration_seconds",
            "Snapshot duration by phase (build: the file for a follower; send; receive: streamed, checked and installed)",
            self.snapshot_seconds.clone(),
        );
        reg.register(
            "skv_storenode_group_commit_batch_appends",
            "Raft log appends (of every range) made durable by one group-commit fsync",
            self.group_commit_batch.clone(),
        );
        reg.register(
            "skv_storenode_engine_disk_bytes",
            "Bytes on disk of the engine (journal and tables), as last sampled",
            self.engine_disk_bytes.clone(),
        );
    }
}

/// The metrics address this store registers with placement (read by `skvctl top` and
/// anything that discovers scrape targets from placement): the bound address, or, when it is
/// bound to a wildcard (`0.0.0.0`, `[::]`, as in containers), its port on the host of
/// `advertise` (`host:port` or `[v6]:port`, optionally with a scheme).
pub fn advertised_address(bound: std::net::SocketAddr, advertise: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let adv = advertise
        .split_once("://")
        .map_or(advertise, |(_, rest)| rest)
        .trim_end_matches('/');
    let host = match adv.rsplit_once(':') {
        // `[::1]:7100` or `host:7100`; a bare v6 address without port has several colons.
        Some((h, port)) if port.parse::<u16>().is_ok() && (h.starts_with('[') || !h.contains(':')) => h,
        _ => adv,
    };
    if host.is_empty() {
        return bound.to_string();
    }
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{host}:{}", bound.port())
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_metrics_address_takes_the_advertised_host() {
        let any: std::net::SocketAddr = "0.0.0.0:7101".parse().unwrap();
        assert_eq!(advertised_address(any, "storenode-1:7100"), "storenode-1:7101");
        assert_eq!(advertised_address(any, "http://10.0.0.5:7100/"), "10.0.0.5:7101");
        assert_eq!(advertised_address(any, "[fd00::5]:7100"), "[fd00::5]:7101");
        assert_eq!(advertised_address(any, "fd00::5"), "[fd00::5]:7101");
        assert_eq!(advertised_address(any, "storenode-1"), "storenode-1:7101");
        // Nothing better known: the bound address.
        assert_eq!(advertised_address(any, ""), "0.0.0.0:7101");
        let v6any: std::net::SocketAddr = "[::]:9".parse().unwrap();
        assert_eq!(advertised_address(v6any, "s2:1"), "s2:9");
        // A concrete bound address is kept.
        let lo: std::net::SocketAddr = "127.0.0.1:7101".parse().unwrap();
        assert_eq!(advertised_address(lo, "storenode-1:7100"), "127.0.0.1:7101");
    }

    #[test]
    fn snapshot_phases_exist_before_any_snapshot() {
        let m = Metrics::new();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("skv_storenode_raft_snapshot_duration_seconds_count{phase=\"build\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("skv_storenode_raft_snapshot_duration_seconds_count{phase=\"send\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("skv_storenode_raft_snapshot_duration_seconds_count{phase=\"receive\"} 0"),
            "{out}"
        );
        assert!(out.contains("skv_storenode_raft_applied_entries_total 0"), "{out}");
    }
}
