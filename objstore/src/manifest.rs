//! Range manifests and the retention decision (pure: no I/O).
//!
//! A range's manifest (`clusters/<cluster>/manifests/ranges/<range>.json`) lists its checkpoints. A checkpoint
//! object is written first and becomes visible only once the manifest names it; an object
//! that no manifest names is an orphan (an upload that crashed before its manifest write),
//! swept after a grace period. Retention keeps the newest checkpoint, and any older one a
//! backup manifest still names.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Version of the manifest JSON this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// One checkpoint as a manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    /// Object path relative to the store's prefix.
    pub path: String,
    pub range_id: u64,
    pub generation: u64,
    pub conf_ver: u64,
    pub epoch_version: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    /// Hex of the span's start and end (empty end: +infinity).
    pub start_hex: String,
    pub end_hex: String,
    pub size: u64,
    pub key_count: u64,
    /// The whole-object xxh3 from the trailer, hex.
    pub checksum: String,
    pub created_unix_ms: u64,
}

impl CheckpointEntry {
    /// Order of coverage: a later Raft index covers an earlier one (same range).
    fn order(&self) -> (u64, u64) {
        (self.applied_index, self.generation)
    }
}

/// The checkpoints of one range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeManifest {
    pub format: u32,
    pub range_id: u64,
    /// The cluster that writes this manifest (its etcd `cluster_id`); empty in manifests
    /// written before checkpoints were scoped by cluster.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    /// Highest generation (leader term) that ever wrote this manifest: a writer of a lower
    /// generation is a deposed leader and must not write it.
    pub generation: u64,
    /// Oldest first.
    pub checkpoints: Vec<CheckpointEntry>,
}

impl RangeManifest {
    pub fn new(range_id: u64) -> Self {
        Self {
            format: MANIFEST_FORMAT,
            range_id,
            cluster_id: String::new(),
            generation: 0,
            checkpoints: Vec::new(),
        }
    }

    /// The newest checkpoint.
    pub fn latest(&self) -> Option<&CheckpointEntry> {
        self.checkpoints.iter().max_by_key(|c| c.order())
    }

    /// Adds `entry` (kept sorted oldest first); refused when a newer generation already
    /// wrote this manifest or the entry belongs to another range.
    pub fn add(&mut self, entry: CheckpointEntry) -> Result<(), ManifestError> {
        if entry.range_id != self.range_id {
            return Err(ManifestError::OtherRange {
                manifest: self.range_id,
                entry: entry.range_id,
            });
        }
        if entry.generation < self.generation {
            return Err(ManifestError::Superseded {
                ours: entry.generation,
                theirs: self.generation,
            });
        }
        self.generation = entry.generation;
        self.checkpoints.retain(|c| c.path != entry.path);
        self.checkpoints.push(entry);
        self.checkpoints.sort_by_key(|c| c.order());
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("generation {ours} is older than the manifest's {theirs}: a newer leader writes this range")]
    Superseded { ours: u64, theirs: u64 },
    #[error("entry of range {entry} in the manifest of range {manifest}")]
    OtherRange { manifest: u64, entry: u64 },
}

/// A backup's manifest, as far as retention needs it: the objects it names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupObjects {
    pub id: String,
    pub objects: Vec<String>,
}

/// What retention decided for one range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPlan {
    /// The manifest to write (before any deletion).
    pub manifest: RangeManifest,
    /// Objects to delete once that manifest is written.
    pub delete: Vec<String>,
}

/// Keeps the newest `keep` checkpoints (at least 1) and every checkpoint a backup names;
/// the others leave the manifest and their objects are deleted.
pub fn plan_retention(manifest: &RangeManifest, pinned: &BTreeSet<String>, keep: usize) -> RetentionPlan {
    let keep = keep.max(1);
    let n = manifest.checkpoints.len();
    let mut kept = manifest.clone();
    kept.checkpoints.sort_by_key(|c| c.order());
    let mut delete = Vec::new();
    kept.checkpoints = kept
        .checkpoints
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| {
            if i + keep >= n || pinned.contains(&c.path) {
                Some(c)
            } else {
                delete.push(c.path);
                None
            }
        })
        .collect();
    RetentionPlan { manifest: kept, delete }
}

/// Checkpoint objects of a range that no manifest names and that are older than `grace_ms`
/// (uploads that died before their manifest write). Objects inside the grace may be an
/// upload whose manifest write is still to come.
pub fn orphans(
    listed: &[(String, u64)],
    manifest: &RangeManifest,
    pinned: &BTreeSet<String>,
    now_ms: u64,
    grace_ms: u64,
) -> Vec<String> {
    let named: BTreeSet<&str> = manifest.checkpoints.iter().map(|c| c.path.as_str()).collect();
    listed
        .iter()
        .filter(|(p, modified_ms)| {
            !named.contains(p.as_str()) && !pinned.contains(p) && now_ms.saturating_sub(*modified_ms) > grace_ms
        })
        .map(|(p, _)| p.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, generation: u64) -> CheckpointEntry {
        CheckpointEntry {
            path: format!("snapshots/1/{generation}/{index}.snap"),
            range_id: 1,
            generation,
            conf_ver: 1,
            epoch_version: 1,
            applied_index: index,
            applied_term: generation,
            start_hex: String::new(),
            end_hex: String::new(),
            size: 10,
            key_count: 1,
            checksum: "0".into(),
            created_unix_ms: index,
        }
    }

    #[test]
    fn newer_checkpoints_cover_older_ones_except_pinned() {
        let mut m = RangeManifest::new(1);
        for (i, g) in [(10, 1), (20, 1), (30, 2), (40, 2)] {
            m.add(entry(i, g)).unwrap();
        }
        let pinned: BTreeSet<String> = [entry(20, 1).path].into();
        let plan = plan_retention(&m, &pinned, 1);
        let kept: Vec<u64> = plan.manifest.checkpoints.iter().map(|c| c.applied_index).collect();
        assert_eq!(kept, vec![20, 40]);
        assert_eq!(plan.delete, vec![entry(10, 1).path, entry(30, 2).path]);
        assert_eq!(plan.manifest.latest().map(|c| c.applied_index), Some(40));
        // Once the backup is gone, the pinned one goes too.
        let plan = plan_retention(&plan.manifest, &BTreeSet::new(), 1);
        assert_eq!(plan.delete, vec![entry(20, 1).path]);
        assert_eq!(plan.manifest.checkpoints.len(), 1);
        // keep = 2 keeps the two newest.
        let plan = plan_retention(&m, &BTreeSet::new(), 2);
        assert_eq!(plan.delete.len(), 2);
    }

    #[test]
    fn a_deposed_leader_cannot_write_and_ranges_do_not_mix() {
        let mut m = RangeManifest::new(1);
        m.add(entry(50, 4)).unwrap();
        assert_eq!(
            m.add(entry(60, 3)),
            Err(ManifestError::Superseded { ours: 3, theirs: 4 })
        );
        let mut other = entry(70, 5);
        other.range_id = 2;
        assert!(matches!(m.add(other), Err(ManifestError::OtherRange { .. })));
        assert_eq!(m.checkpoints.len(), 1);
        let back: RangeManifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn orphans_are_unnamed_unpinned_and_past_the_grace() {
        let mut m = RangeManifest::new(1);
        m.add(entry(10, 1)).unwrap();
        let listed = vec![
            (entry(10, 1).path, 0),
            ("snapshots/1/1/5.snap".to_string(), 0),
            ("snapshots/1/1/7.snap".to_string(), 0),
            ("snapshots/1/2/90.snap".to_string(), 9_500),
        ];
        let pinned: BTreeSet<String> = ["snapshots/1/1/7.snap".to_string()].into();
        assert_eq!(
            orphans(&listed, &m, &pinned, 10_000, 1_000),
            vec!["snapshots/1/1/5.snap".to_string()]
        );
    }
}
