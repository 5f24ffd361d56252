//! Backups (issue 11, ADR 0028): the backup manifest, the coverage decision (pure), and the
//! I/O on `backups/<id>/`.
//!
//! A backup is the set of objects `backups/<id>/ranges/<range>-<epoch version>.snap` (range
//! checkpoints in the format of docs/objstore-format.md, uploaded by the range leaders) and
//! `backups/<id>/manifest.json`, written last: a backup exists only once its manifest does.
//! The manifest names every object with its size, key count, checksum, span and Raft index
//! (its `objects` list is what retention reads: [`crate::manifest::BackupObjects`]).

use crate::manifest::CheckpointEntry;
use crate::store::{BACKUPS_PREFIX, EntrySink, ObjError, Objects, hex};
use crate::{CheckpointHeader, Summary};
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::time::Instant;
use tracing::Instrument;

/// Version of the backup manifest JSON this build writes and reads.
pub const BACKUP_FORMAT: u32 = 1;

/// One range of a backup: a checkpoint object and where it sits in the key space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRange {
    pub range_id: u64,
    pub path: String,
    pub generation: u64,
    pub conf_ver: u64,
    pub epoch_version: u64,
    /// The range leader's applied index after the ReadIndex barrier the backup took.
    pub barrier_index: u64,
    /// The checkpoint's applied index (at least `barrier_index`).
    pub applied_index: u64,
    pub applied_term: u64,
    /// Hex of the span's start and end (empty end: +infinity).
    pub start_hex: String,
    pub end_hex: String,
    pub size: u64,
    pub key_count: u64,
    /// The object's xxh3 (16 hex digits).
    pub checksum: String,
    pub created_unix_ms: u64,
}

impl BackupRange {
    pub fn start(&self) -> Vec<u8> {
        unhex(&self.start_hex).unwrap_or_default()
    }
    pub fn end(&self) -> Vec<u8> {
        unhex(&self.end_hex).unwrap_or_default()
    }

    /// The checkpoint entry that [`Objects::read_checkpoint`] checks the object against.
    pub fn checkpoint_entry(&self) -> CheckpointEntry {
        CheckpointEntry {
            path: self.path.clone(),
            range_id: self.range_id,
            generation: self.generation,
            conf_ver: self.conf_ver,
            epoch_version: self.epoch_version,
            applied_index: self.applied_index,
            applied_term: self.applied_term,
            start_hex: self.start_hex.clone(),
            end_hex: self.end_hex.clone(),
            size: self.size,
            key_count: self.key_count,
            checksum: self.checksum.clone(),
            created_unix_ms: self.created_unix_ms,
        }
    }
}

/// `backups/<id>/manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub id: String,
    /// The cluster it was taken from (its etcd `cluster_id`).
    pub cluster_id: String,
    /// When the backup began: every write acknowledged before this is in it.
    pub created_unix_ms: u64,
    pub finished_unix_ms: u64,
    /// Every object of the backup (retention keeps these, ADR 0025).
    pub objects: Vec<String>,
    /// Sorted by start key; their spans tile the whole key space.
    pub ranges: Vec<BackupRange>,
    pub total_bytes: u64,
    pub total_keys: u64,
}

impl BackupManifest {
    /// Builds the manifest of `ranges` (which must tile the key space: [`check_tiling`]).
    pub fn new(id: &str, cluster_id: &str, created_unix_ms: u64, mut ranges: Vec<BackupRange>) -> Self {
        ranges.sort_by_key(|r| r.start());
        Self {
            format: BACKUP_FORMAT,
            id: id.to_string(),
            cluster_id: cluster_id.to_string(),
            created_unix_ms,
            finished_unix_ms: crate::store::now_ms(),
            objects: ranges.iter().map(|r| r.path.clone()).collect(),
            total_bytes: ranges.iter().map(|r| r.size).sum(),
            total_keys: ranges.iter().map(|r| r.key_count).sum(),
            ranges,
        }
    }
}

/// Why a set of backed-up spans is not the whole key space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TilingError {
    #[error("no range backed up")]
    Empty,
    #[error("keys from {from_hex:?} to {to_hex:?} are not covered (empty = end of key space)")]
    Gap { from_hex: String, to_hex: String },
    #[error("ranges overlap at {at_hex:?}")]
    Overlap { at_hex: String },
}

/// Whether spans `[start, end)` (empty end = +infinity) tile the whole key space exactly:
/// sorted by start, the first starts at "", each starts where the previous ends, the last
/// ends at +infinity.
pub fn check_tiling(spans: &[Span]) -> Result<(), TilingError> {
    let mut s: Vec<&Span> = spans.iter().collect();
    s.sort_by(|a, b| a.0.cmp(&b.0));
    let Some(first) = s.first() else {
        return Err(TilingError::Empty);
    };
    if !first.0.is_empty() {
        return Err(TilingError::Gap {
            from_hex: String::new(),
            to_hex: hex(&first.0),
        });
    }
    let mut end: &[u8] = &first.1;
    for r in &s[1..] {
        if end.is_empty() {
            return Err(TilingError::Overlap { at_hex: hex(&r.0) });
        }
        match r.0.as_slice().cmp(end) {
            Ordering::Greater => {
                return Err(TilingError::Gap {
                    from_hex: hex(end),
                    to_hex: hex(&r.0),
                });
            }
            Ordering::Less => return Err(TilingError::Overlap { at_hex: hex(&r.0) }),
            Ordering::Equal => end = &r.1,
        }
    }
    if !end.is_empty() {
        return Err(TilingError::Gap {
            from_hex: hex(end),
            to_hex: String::new(),
        });
    }
    Ok(())
}

/// A key span `[start, end)`, empty end = +infinity.
pub type Span = (Vec<u8>, Vec<u8>);

fn overlaps(a: &Span, b: &Span) -> bool {
    // a.start < b.end && b.start < a.end (a start is a key, never +infinity)
    let before = |start: &[u8], end: &[u8]| end.is_empty() || start < end;
    before(&a.0, &b.1) && before(&b.0, &a.1)
}

/// Adds a newly backed-up span to `done` (pure): every earlier result it overlaps is
/// dropped (the range split or merged meanwhile; the new one is as recent and covers its
/// own span), and the new one is kept. Returns the paths of the dropped results.
pub fn add_result<T>(done: &mut Vec<(Span, T)>, span: Span, item: T) -> Vec<T> {
    let mut dropped = Vec::new();
    let mut kept = Vec::with_capacity(done.len() + 1);
    for (s, t) in done.drain(..) {
        if overlaps(&s, &span) {
            dropped.push(t);
        } else {
            kept.push((s, t));
        }
    }
    kept.push((span, item));
    *done = kept;
    dropped
}

/// Which spans of the current range map still need a backup (pure): those without a result
/// of exactly that span.
pub fn still_to_back_up<'a>(map: &'a [Span], done: &[Span]) -> Vec<&'a Span> {
    map.iter().filter(|m| !done.contains(m)).collect()
}

pub fn backup_dir(id: &str) -> String {
    format!("{BACKUPS_PREFIX}/{id}")
}

pub fn backup_manifest_path(id: &str) -> String {
    format!("{BACKUPS_PREFIX}/{id}/manifest.json")
}

/// The object of one range in a backup (the epoch version makes a retry after a split or
/// merge a new object).
pub fn backup_range_path(id: &str, range_id: u64, epoch_version: u64) -> String {
    format!("{BACKUPS_PREFIX}/{id}/ranges/{range_id:020}-{epoch_version:020}.snap")
}

/// A backup id is what placement generates: ASCII letters, digits, `-` and `_`, at most
/// 64 characters, so it is one path segment.
pub fn valid_backup_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Objects {
    /// Uploads a range checkpoint to `rel` (a backup's object): as a checkpoint upload
    /// (streamed, multipart past one part), but at a path that checkpoint retention never
    /// touches.
    pub async fn upload_backup_range<F>(
        &self,
        rel: &str,
        header: CheckpointHeader,
        produce: F,
    ) -> Result<CheckpointEntry, ObjError>
    where
        F: FnOnce(&mut EntrySink) -> Result<(), String> + Send + 'static,
    {
        let span = tracing::info_span!("backup_upload", range_id = header.range_id, path = %rel);
        let started = Instant::now();
        let res = self.upload_inner(header, rel, produce).instrument(span.clone()).await;
        match &res {
            Ok(e) => {
                self.metrics.uploads.inc();
                self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
                span.in_scope(|| tracing::info!(bytes = e.size, keys = e.key_count, "backup object uploaded"));
            }
            Err(err) => {
                self.metrics.failed("upload");
                span.in_scope(|| tracing::warn!(error = %err, "backup object upload failed"));
            }
        }
        res
    }

    /// Writes a backup's manifest: from now on the backup exists.
    pub async fn write_backup_manifest(&self, m: &BackupManifest) -> Result<(), ObjError> {
        self.put_json(&backup_manifest_path(&m.id), m).await
    }

    /// The manifest of backup `id`, if it exists.
    pub async fn read_backup_manifest(&self, id: &str) -> Result<Option<BackupManifest>, ObjError> {
        let rel = backup_manifest_path(id);
        let Some(bytes) = self.get_small(&rel).await? else {
            return Ok(None);
        };
        let m: BackupManifest = serde_json::from_slice(&bytes).map_err(|e| ObjError::BadManifest {
            path: rel.clone(),
            reason: e.to_string(),
        })?;
        if m.format != BACKUP_FORMAT || m.id != id {
            return Err(ObjError::BadManifest {
                path: rel,
                reason: format!("backup {} format {}", m.id, m.format),
            });
        }
        Ok(Some(m))
    }

    /// Every backup id that has objects under `backups/`, with whether it has a manifest
    /// and the newest modification time of its objects.
    pub async fn list_backup_dirs(&self) -> Result<Vec<(String, bool, u64)>, ObjError> {
        let mut out: Vec<(String, bool, u64)> = Vec::new();
        for (rel, _, modified) in self.list(BACKUPS_PREFIX).await? {
            let Some(rest) = rel.strip_prefix(&format!("{BACKUPS_PREFIX}/")) else {
                continue;
            };
            let Some((id, tail)) = rest.split_once('/') else {
                continue;
            };
            match out.last_mut() {
                Some(last) if last.0 == id => {
                    last.1 |= tail == "manifest.json";
                    last.2 = last.2.max(modified);
                }
                _ => out.push((id.to_string(), tail == "manifest.json", modified)),
            }
        }
        Ok(out)
    }

    /// Deletes a backup: its manifest first (it stops being visible and restorable), then
    /// every object under `backups/<id>/`. Absent is fine. Returns whether anything was there.
    pub async fn delete_backup(&self, id: &str) -> Result<bool, ObjError> {
        let listed = self.list(&backup_dir(id)).await?;
        let manifest = backup_manifest_path(id);
        self.delete(&manifest).await?;
        for (rel, _, _) in &listed {
            if *rel != manifest {
                self.delete(rel).await?;
            }
        }
        Ok(!listed.is_empty())
    }

    /// Deletes the objects under `backups/<id>/ranges/` that `keep` does not name (uploads a
    /// retry replaced).
    pub async fn delete_unnamed_backup_objects(&self, id: &str, keep: &[String]) -> Result<usize, ObjError> {
        let mut n = 0;
        for (rel, _, _) in self.list(&format!("{}/ranges", backup_dir(id))).await? {
            if !keep.contains(&rel) {
                self.delete(&rel).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reads and checks one range object of a backup completely (header, every block, the
    /// trailer, and size, key count and checksum against the manifest entry), handing each
    /// block to `each`. What `each` got is usable only once this returns `Ok`.
    pub async fn read_backup_range(
        &self,
        r: &BackupRange,
        each: impl FnMut(Vec<crate::format::Entry>) -> Result<(), String>,
    ) -> Result<Summary, ObjError> {
        self.read_checkpoint(&r.checkpoint_entry(), each).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(a: &str, b: &str) -> (Vec<u8>, Vec<u8>) {
        (a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    #[test]
    fn tiling_needs_the_whole_key_space_without_gaps_or_overlaps() {
        assert_eq!(check_tiling(&[]), Err(TilingError::Empty));
        assert_eq!(check_tiling(&[sp("", "")]), Ok(()));
        assert_eq!(check_tiling(&[sp("m", ""), sp("", "m")]), Ok(()));
        assert!(matches!(check_tiling(&[sp("a", "")]), Err(TilingError::Gap { .. })));
        assert!(matches!(
            check_tiling(&[sp("", "k"), sp("m", "")]),
            Err(TilingError::Gap { .. })
        ));
        assert!(matches!(check_tiling(&[sp("", "m")]), Err(TilingError::Gap { .. })));
        assert!(matches!(
            check_tiling(&[sp("", "n"), sp("m", "")]),
            Err(TilingError::Overlap { .. })
        ));
        assert!(matches!(
            check_tiling(&[sp("", ""), sp("m", "")]),
            Err(TilingError::Overlap { .. })
        ));
    }

    #[test]
    fn a_range_that_split_or_merged_during_the_backup_is_backed_up_again() {
        // Backed up [,m) and [m,); then [m,) split at t: the map shows [m,t) and [t,).
        let mut done: Vec<(Span, &str)> = Vec::new();
        assert!(add_result(&mut done, sp("", "m"), "a").is_empty());
        assert!(add_result(&mut done, sp("m", ""), "b").is_empty());
        let map = vec![sp("", "m"), sp("m", "t"), sp("t", "")];
        let spans: Vec<_> = done.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(still_to_back_up(&map, &spans), vec![&sp("m", "t"), &sp("t", "")]);
        assert_eq!(add_result(&mut done, sp("m", "t"), "c"), vec!["b"]);
        assert!(add_result(&mut done, sp("t", ""), "d").is_empty());
        let spans: Vec<_> = done.iter().map(|(s, _)| s.clone()).collect();
        assert!(still_to_back_up(&map, &spans).is_empty());
        assert_eq!(check_tiling(&spans), Ok(()));
        // Then [,m) and [m,t) merged: one new result replaces both.
        let mut dropped = add_result(&mut done, sp("", "t"), "e");
        dropped.sort();
        assert_eq!(dropped, vec!["a", "c"]);
        let spans: Vec<_> = done.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(check_tiling(&spans), Ok(()));
    }

    #[test]
    fn ids_are_one_path_segment_and_hex_round_trips() {
        assert!(valid_backup_id("20261202-093800-ab12"));
        for bad in ["", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!valid_backup_id(bad), "{bad}");
        }
        assert_eq!(unhex(&hex(b"\x00\xffab")), Some(b"\x00\xffab".to_vec()));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(
            backup_range_path("x", 7, 2),
            "backups/x/ranges/00000000000000000007-00000000000000000002.snap"
        );
    }

    #[test]
    fn the_manifest_names_its_objects_for_retention() {
        let r = |id: u64, a: &str, b: &str| BackupRange {
            range_id: id,
            path: backup_range_path("b1", id, 1),
            generation: 1,
            conf_ver: 1,
            epoch_version: 1,
            barrier_index: 5,
            applied_index: 6,
            applied_term: 1,
            start_hex: hex(a.as_bytes()),
            end_hex: hex(b.as_bytes()),
            size: 100,
            key_count: 10,
            checksum: "00".into(),
            created_unix_ms: 1,
        };
        let m = BackupManifest::new("b1", "c", 1, vec![r(2, "m", ""), r(1, "", "m")]);
        assert_eq!(m.ranges[0].range_id, 1);
        assert_eq!((m.total_bytes, m.total_keys), (200, 20));
        let json = serde_json::to_string(&m).unwrap();
        let pins: crate::manifest::BackupObjects = serde_json::from_str(&json).unwrap();
        assert_eq!(pins.objects, m.objects);
        let back: BackupManifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
