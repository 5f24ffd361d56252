//! Merge of two adjacent ranges (ADR 0016), storenode side.
//!
//! The leader of both ranges (placement colocates them first) runs the protocol from
//! `Store.MergeRanges` (service.rs): PrepareMerge on the source (freezes it, version +1,
//! recorded in `meta: merge/<source>` in the apply batch), wait until every source voter's
//! log holds the frozen entry, CommitMerge on the target (each replica applies it only once
//! its local source applied the frozen index; the target is widened, the source retired:
//! GC marker and tombstone in the same batch, its group stopped and its Raft state deleted;
//! its keys stay, they are the target's now), then ReportMerge to placement. A merge that
//! cannot commit (the target's epoch moved) is rolled back on the source (RollbackMerge:
//! unfrozen, version +1), by the handler or later by [`resolver_loop`].

use crate::engine::io_err;
use crate::node::NodeInner;
use prost::Message;
use serde::{Deserialize, Serialize};
use skv_common::RangeId;
use skv_proto::internal::RangeDescriptor;
use std::io;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A frozen source's pending merge (persisted with its applied state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeState {
    pub target_id: u64,
    /// Log index of the PrepareMerge entry: every write of the source is at or below it.
    pub frozen_index: u64,
    /// The target's epoch when the merge was prepared: once it changes without the
    /// target covering the source, the CommitMerge (which carries it) can never apply.
    pub target_version: u64,
    pub target_conf_ver: u64,
}

pub fn merge_key(range: RangeId) -> Vec<u8> {
    let mut k = b"merge/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn encode_state(s: &MergeState) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(s).map_err(io_err)
}

pub fn load_state(engine: &crate::engine::Engine, range: RangeId) -> io::Result<Option<MergeState>> {
    match engine.meta.get(merge_key(range)).map_err(io_err)? {
        None => Ok(None),
        Some(v) => postcard::from_bytes(&v).map(Some).map_err(io_err),
    }
}

/// Whether `outer` covers every key of `inner`.
pub fn covers(outer: &RangeDescriptor, inner: &RangeDescriptor) -> bool {
    outer.start <= inner.start && (outer.end.is_empty() || (!inner.end.is_empty() && inner.end <= outer.end))
}

impl NodeInner {
    /// Called by the target's state machine once a CommitMerge applied (every replica).
    pub fn on_merge_applied(&self, target: RangeId, source: RangeDescriptor, merged: RangeDescriptor) {
        let src = RangeId(source.range_id);
        self.retired.lock().insert(src, target);
        self.metrics.merges.inc();
        tracing::info!(store_id = %self.store_id, range_id = %target, source = %src, "merge applied");
        if let Some(node) = self.arc() {
            tokio::spawn(async move {
                if let Err(e) = node.destroy_replica(src, false, "merged into its left neighbour").await {
                    tracing::warn!(range_id = %src, error = %e, "cannot retire the merged source");
                }
            });
        }
        if self.replica(target).is_some_and(|r| r.is_leader()) {
            let reporter = self.merge_reporter.read().clone();
            if let Some(rep) = reporter {
                rep(merged, source);
            }
        }
    }

    /// How long a CommitMerge apply waits for the local source to reach the frozen index:
    /// short while the node opens its ranges (the apply then fails, and the range is
    /// reopened in the background once the node serves), long afterwards.
    pub fn merge_wait_bound(&self) -> Duration {
        if self.serving.load(std::sync::atomic::Ordering::Acquire) {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(2)
        }
    }

    /// Whether the local source `src` applied the PrepareMerge at `frozen_index` for
    /// `target` (from the running replica, or from its stored state when not open).
    pub fn source_caught_up(&self, src: RangeId, target: RangeId, frozen_index: u64) -> io::Result<bool> {
        if let Some(r) = self.replica(src) {
            let applied = r.shared.applied_index.load(std::sync::atomic::Ordering::Acquire);
            let frozen = r
                .shared
                .merging
                .lock()
                .as_ref()
                .is_some_and(|m| m.target_id == target.0 && m.frozen_index == frozen_index);
            if applied >= frozen_index && frozen {
                return Ok(true);
            }
        }
        let state = load_state(&self.engine, src)?;
        let applied = crate::raft::state_machine::stored_applied_index(&self.engine, src)?;
        Ok(
            state.is_some_and(|m| m.target_id == target.0 && m.frozen_index == frozen_index)
                && applied.is_some_and(|a| a >= frozen_index),
        )
    }
}

/// How long a source may stay frozen before the resolver drives its merge on.
pub const REDRIVE_AFTER: Duration = Duration::from_secs(20);

/// Finishes or undoes merges left half-way (their driver died, a leader changed): for each
/// frozen source this node leads, if the local target's epoch moved away from the one
/// recorded at PrepareMerge without the target covering the source (and the source was not
/// retired here), proposes RollbackMerge; if the target is unchanged, led here too, and the
/// source has been frozen for [`REDRIVE_AFTER`], drives the merge on (wait, CommitMerge).
/// Every 2 s until `cancel`.
pub async fn resolver_loop(svc: crate::service::StoreService, cancel: CancellationToken) {
    let node = svc.node.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut frozen_since: std::collections::HashMap<RangeId, std::time::Instant> = Default::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        frozen_since.retain(|id, _| node.replica(*id).is_some_and(|r| r.shared.merging.lock().is_some()));
        for r in node.replicas() {
            let Some(st) = r.shared.merging.lock().clone() else {
                continue;
            };
            let src = r.shared.range_id;
            let since = *frozen_since.entry(src).or_insert_with(std::time::Instant::now);
            if node.retired.lock().contains_key(&src) || node.gc_pending(src) {
                continue;
            }
            let Some(t) = node.replica(RangeId(st.target_id)) else {
                continue;
            };
            if !t.shared.is_initialized() {
                continue;
            }
            let td = t.shared.desc();
            let te = td.epoch.unwrap_or_default();
            if covers(&td, &r.shared.desc()) {
                // The local target absorbed it without applying the CommitMerge here (it
                // installed a snapshot of the merged range): retire the source, keys kept.
                if let Some(n) = node.arc()
                    && let Err(e) = n.destroy_replica(src, false, "absorbed by the target's snapshot").await
                {
                    tracing::warn!(range_id = %src, error = %e, "cannot retire the merged source");
                }
                continue;
            }
            if !r.is_leader() {
                continue;
            }
            if te.version == st.target_version && te.conf_ver == st.target_conf_ver {
                if since.elapsed() >= REDRIVE_AFTER && t.is_leader() {
                    tracing::info!(store_id = %node.store_id, range_id = %src, target = st.target_id, "driving a pending merge on");
                    if let Err(e) = svc.resume_merge(td, r.shared.desc()).await {
                        tracing::info!(range_id = %src, error = %e, "pending merge not finished yet");
                    }
                }
                continue;
            }
            tracing::warn!(store_id = %node.store_id, range_id = %src, target = st.target_id, "merge can no longer commit (target epoch moved); rolling back");
            let cmd = crate::raft::Command::RollbackMerge {
                target_id: st.target_id,
            };
            match r.raft.propose(cmd, Duration::from_secs(10)).await {
                Ok(crate::raft::CmdResponse::None) => {
                    node.metrics.merge_rollbacks.inc();
                }
                Ok(other) => tracing::info!(range_id = %src, ?other, "merge rollback not applied"),
                Err(e) => tracing::warn!(range_id = %src, error = %e, "merge rollback failed; retrying"),
            }
        }
    }
}

/// Decodes a prost descriptor carried in a command.
pub fn decode_desc(b: &[u8]) -> Option<RangeDescriptor> {
    RangeDescriptor::decode(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(start: &[u8], end: &[u8]) -> RangeDescriptor {
        RangeDescriptor {
            start: start.to_vec(),
            end: end.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn coverage() {
        assert!(covers(&d(b"a", b"z"), &d(b"b", b"c")));
        assert!(covers(&d(b"a", b""), &d(b"b", b"")));
        assert!(covers(&d(b"a", b""), &d(b"b", b"c")));
        assert!(!covers(&d(b"a", b"z"), &d(b"b", b"")));
        assert!(!covers(&d(b"c", b"z"), &d(b"b", b"d")));
        assert!(covers(&d(b"a", b"m"), &d(b"a", b"m")));
    }
}
