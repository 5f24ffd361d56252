//! Range checkpoints in object storage (issue 11, DESIGN §8, ADR 0025).
//!
//! With `--object-store-url`, the leader of each range uploads a checkpoint of the range
//! (every key with its stored record: version, value or tombstone) read from one engine
//! snapshot at an applied index, records it in the range's manifest and prunes the
//! checkpoints it covers (`skv_objstore`). A range is due when it has none yet, or when it
//! applied entries since its last one and either `--checkpoint-interval-secs` passed or its
//! live size moved by `--checkpoint-change-bytes`. Uploads run one at a time per store, off
//! the data path: no lock is held while uploading (the engine snapshot is the only thing
//! kept), and a failed upload (object store unreachable) is logged, counted, and retried at
//! the next pass, while reads and writes go on.
//!
//! The generation of a checkpoint is the leader's Raft term: a deposed leader's objects
//! have a lower generation and its manifest write is refused (`RangeManifest::add`).

use crate::node::NodeInner;
use crate::raft::checkpoint_read::checkpoint_point;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use skv_common::RangeId;
use skv_objstore::{CheckpointHeader, Objects};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the loop looks at the ranges this store leads.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// After a failed upload, a range waits this long before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// This store's cluster's checkpoints and range manifests in object storage
/// (`clusters/<cluster_id>/...`, ADR 0025). The cluster id comes from placement's answer to
/// this store's registration, so it is unknown for a moment at start: until then no
/// checkpoint is taken and no replica is bootstrapped (never another cluster's range of the
/// same id).
#[derive(Clone, Default)]
pub struct ClusterObjects(Arc<std::sync::OnceLock<Objects>>);

impl ClusterObjects {
    /// Already scoped (`objects.cluster_id()` set), e.g. in tests.
    pub fn known(objects: Objects) -> Self {
        let c = Self::default();
        let _ = c.0.set(objects);
        c
    }

    /// The scoped store, once the cluster id is known.
    pub fn get(&self) -> Option<&Objects> {
        self.0.get()
    }

    /// Scopes `base` to `cluster_id` (placement's registration answer). A second call with
    /// another id is refused: the id of a cluster never changes.
    pub fn set(&self, base: &Objects, cluster_id: &str) -> Result<(), String> {
        let scoped = base.for_cluster(cluster_id).map_err(|e| e.to_string())?;
        match self.0.get() {
            Some(o) if o.cluster_id() == Some(cluster_id) => Ok(()),
            Some(o) => Err(format!(
                "placement answered cluster id {cluster_id}, but this store checkpoints for {}",
                o.cluster_id().unwrap_or_default()
            )),
            None => {
                let _ = self.0.set(scoped);
                tracing::info!(cluster_id, "checkpoints scoped to the cluster");
                Ok(())
            }
        }
    }
}

/// When checkpoints are taken.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointPolicy {
    pub interval: Duration,
    pub change_bytes: u64,
    /// Checkpoints kept per range besides those a backup names.
    pub keep: usize,
}

/// What the loop remembers of one range's last checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastCheckpoint {
    pub applied_index: u64,
    pub at_unix_ms: u64,
    /// The range's live bytes when it was taken.
    pub live_bytes: u64,
}

/// Whether a range is due (pure): none yet, or entries applied since the last one and the
/// interval passed or the live size moved by the change threshold.
pub fn is_due(last: Option<&LastCheckpoint>, applied: u64, live_bytes: u64, now_ms: u64, p: &CheckpointPolicy) -> bool {
    match last {
        None => applied > 0,
        Some(l) => {
            applied > l.applied_index
                && (now_ms.saturating_sub(l.at_unix_ms) >= p.interval.as_millis() as u64
                    || live_bytes.abs_diff(l.live_bytes) >= p.change_bytes)
        }
    }
}

/// Per-store checkpoint metrics (besides `skv_objstore_*`).
#[derive(Clone, Default)]
pub struct CheckpointMetrics {
    /// Age of the oldest "latest checkpoint" among the ranges this store leads.
    pub oldest_age_seconds: Gauge,
    /// Ranges this store leads that have no checkpoint yet.
    pub ranges_without: Gauge,
}

impl CheckpointMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "skv_checkpoint_oldest_age_seconds",
            "Age of the oldest latest-checkpoint among the ranges this store leads",
            self.oldest_age_seconds.clone(),
        );
        r.register(
            "skv_checkpoint_ranges_without",
            "Ranges this store leads that have no checkpoint in object storage yet",
            self.ranges_without.clone(),
        );
    }
}

/// The checkpoint loop of one store.
pub struct Checkpointer {
    /// The store without a cluster scope (backups, `backups/<id>/`).
    pub objects: Objects,
    /// This cluster's checkpoints and manifests (set when placement answers).
    pub cluster: ClusterObjects,
    pub policy: CheckpointPolicy,
    pub metrics: CheckpointMetrics,
    last: HashMap<RangeId, LastCheckpoint>,
    /// Ranges whose manifest was read once (a new leader learns the last checkpoint there).
    seeded: HashMap<RangeId, ()>,
    failed_at: HashMap<RangeId, Instant>,
    /// New replicas of this store start from checkpoints (ADR 0027); set at start.
    pub bootstrapper: Option<Arc<crate::raft::bootstrap::Bootstrapper>>,
}

impl Checkpointer {
    pub fn new(objects: Objects, policy: CheckpointPolicy, metrics: CheckpointMetrics) -> Self {
        Self {
            objects,
            cluster: ClusterObjects::default(),
            policy,
            metrics,
            last: HashMap::new(),
            seeded: HashMap::new(),
            failed_at: HashMap::new(),
            bootstrapper: None,
        }
    }

    /// Runs until `cancel`.
    pub async fn run(mut self, node: Arc<NodeInner>, cancel: CancellationToken) {
        let mut t = tokio::time::interval(PASS_EVERY);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = t.tick() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.pass(&node) => {}
            }
        }
    }

    /// One pass over the ranges this store leads: uploads those due, one at a time.
    pub async fn pass(&mut self, node: &Arc<NodeInner>) {
        let Some(objects) = self.cluster.get().cloned() else {
            tracing::debug!("cluster id not known yet (placement has not answered); no checkpoint");
            return;
        };
        let now = skv_objstore::store::now_ms();
        let mut oldest = 0u64;
        let mut without = 0i64;
        let led: Vec<_> = node
            .replicas()
            .into_iter()
            .filter(|r| r.is_leader() && r.shared.is_initialized())
            .collect();
        // A set, not a Vec: the lookups below run once per replica, and a store can hold
        // tens of thousands (a Vec made this pass quadratic: 10,000 idle ranges spent ~20%
        // of the playground's CPU here, docs/bench/idle-ranges.md).
        let led_ids: HashSet<RangeId> = led.iter().map(|r| r.shared.range_id).collect();
        self.last.retain(|id, _| led_ids.contains(id));
        self.seeded.retain(|id, _| led_ids.contains(id));
        // A range led again later starts without the old failure's wait.
        self.failed_at.retain(|id, _| led_ids.contains(id));
        // The purge floor (ADR 0027): a leader keeps its log from the range's latest
        // checkpoint; a replica that does not lead keeps none.
        for r in node.replicas() {
            let floor = if led_ids.contains(&r.shared.range_id) {
                self.last.get(&r.shared.range_id).map_or(0, |l| l.applied_index)
            } else {
                0
            };
            r.shared
                .checkpoint_floor
                .store(floor, std::sync::atomic::Ordering::Release);
        }
        for r in led {
            let range = r.shared.range_id;
            if !self.seeded.contains_key(&range) {
                match objects.read_manifest(range.0).await {
                    Ok(m) => {
                        if let Some(l) = m.as_ref().and_then(|m| m.latest()) {
                            self.last.insert(
                                range,
                                LastCheckpoint {
                                    applied_index: l.applied_index,
                                    at_unix_ms: l.created_unix_ms,
                                    live_bytes: r.shared.approximate_size().0,
                                },
                            );
                        }
                        self.seeded.insert(range, ());
                    }
                    Err(e) => {
                        tracing::debug!(range_id = %range, error = %e, "checkpoint manifest not readable");
                    }
                }
            }
            let retry_wait = self.failed_at.get(&range).is_some_and(|t| t.elapsed() < RETRY_AFTER);
            let applied = r.shared.applied_index.load(std::sync::atomic::Ordering::Acquire);
            let live = r.shared.approximate_size().0;
            let due = self.seeded.contains_key(&range)
                && !retry_wait
                && r.shared.merging.lock().is_none()
                && is_due(self.last.get(&range), applied, live, now, &self.policy);
            if due {
                let term = r.leader_view().term;
                match self.checkpoint_range(&objects, node, range, term).await {
                    Ok(Some(l)) => {
                        self.last.insert(range, l);
                        self.failed_at.remove(&range);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(range_id = %range, error = %e, "checkpoint failed; retried later");
                        self.failed_at.insert(range, Instant::now());
                    }
                }
            }
            match self.last.get(&range) {
                Some(l) => oldest = oldest.max(now.saturating_sub(l.at_unix_ms) / 1000),
                None => without += 1,
            }
        }
        self.metrics.oldest_age_seconds.set(oldest as i64);
        self.metrics.ranges_without.set(without);
    }

    /// Uploads, records and prunes one checkpoint of `range`.
    async fn checkpoint_range(
        &self,
        objects: &Objects,
        node: &Arc<NodeInner>,
        range: RangeId,
        term: u64,
    ) -> Result<Option<LastCheckpoint>, String> {
        let engine = node.engine.clone();
        let point = tokio::task::spawn_blocking(move || checkpoint_point(&engine, range))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(point) = point else { return Ok(None) };
        let live_bytes = node.replica(range).map(|r| r.shared.approximate_size().0).unwrap_or(0);
        let epoch = point.desc.epoch.unwrap_or_default();
        let header = CheckpointHeader {
            range_id: range.0,
            generation: term,
            conf_ver: epoch.conf_ver,
            epoch_version: epoch.version,
            applied_index: point.applied_index,
            applied_term: point.applied_term,
            created_unix_ms: skv_objstore::store::now_ms(),
            start: point.desc.start.clone(),
            end: point.desc.end.clone(),
            // The descriptor with the exact applied state appended (a learner bootstraps from it).
            descriptor: crate::raft::bootstrap::descriptor_with_applied(&point.desc, &point.applied_raw, point.floor),
        };
        let at = header.created_unix_ms;
        let engine = node.engine.clone();
        let (start, end) = (point.desc.start.clone(), point.desc.end.clone());
        let snap = point.snap;
        let entry = objects
            .upload_checkpoint(header, move |sink| {
                use fjall::Readable;
                for g in snap.range::<&[u8], _>(&engine.data, crate::engine::data_range(&start, &end)) {
                    let (k, v) = g.into_inner().map_err(|e| e.to_string())?;
                    sink.push(&k, &v)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
        let (index, size, keys) = (entry.applied_index, entry.size, entry.key_count);
        crate::crash_point!(crate::failpoints::MID_CHECKPOINT_UPLOAD);
        let (_, deleted) = objects
            .commit_checkpoint(entry, self.policy.keep)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(range_id = %range, index, bytes = size, keys, pruned = deleted.len(), "checkpoint recorded");
        Ok(Some(LastCheckpoint {
            applied_index: index,
            at_unix_ms: at,
            live_bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_when_none_yet_or_changed_and_old_or_big() {
        let p = CheckpointPolicy {
            interval: Duration::from_secs(60),
            change_bytes: 1000,
            keep: 1,
        };
        assert!(!is_due(None, 0, 0, 0, &p), "nothing applied yet");
        assert!(is_due(None, 5, 0, 0, &p));
        let l = LastCheckpoint {
            applied_index: 10,
            at_unix_ms: 1_000,
            live_bytes: 5_000,
        };
        assert!(!is_due(Some(&l), 10, 5_000, 1_000_000, &p), "nothing applied since");
        assert!(!is_due(Some(&l), 11, 5_100, 2_000, &p), "young and small change");
        assert!(is_due(Some(&l), 11, 5_100, 61_000, &p), "interval passed");
        assert!(is_due(Some(&l), 11, 6_000, 2_000, &p), "grew by the threshold");
        assert!(is_due(Some(&l), 11, 4_000, 2_000, &p), "shrank by the threshold");
    }
}
