//! Replica bootstrap from object-storage checkpoints (issue 11, ADR 0027).
//!
//! A store asked to create a replica it does not hold (`CreateReplica` without `bootstrap`:
//! a move, a repair, an up-replication) first installs the range's latest checkpoint from
//! object storage, with the checkpoint's exact applied state (applied log id and membership,
//! carried in the checkpoint's descriptor bytes, see [`descriptor_with_applied`]), and only
//! then starts the Raft group. openraft then starts with `last_applied = committed = L` and
//! purges its (empty) log up to `L`, so the leader's probe finds the follower's log at `L`
//! and sends entries after it. If the leader has purged past `L`, openraft sends its
//! snapshot as before (counted as the fallback `stale`). Nothing is installed when the
//! checkpoint is missing, unreadable, corrupt, of another epoch or without an applied
//! state: the replica stays uninitialized and gets the leader's snapshot.
//!
//! Safety: a checkpoint is taken by a leader at an index it applied, hence committed; a
//! learner installing it holds a prefix of the committed log. The installed membership
//! predates this store's addition, so the replica is neither voter nor learner in it and
//! never campaigns; it becomes a learner only by applying the leader's AddLearner entry.
//!
//! Crash safety: the install writes an install marker with no file first (fsynced); a crash
//! before the final batch (data, applied state, descriptor, marker removal in one commit)
//! leaves the marker, and the next start uninitializes the replica (the redo of a marker
//! without a file fails), so no half-installed state is ever opened.

use super::checkpoint_read::AppliedView;
use super::decode;
use super::state_machine::{abort_external_install, begin_external_install, finish_external_install};
use crate::engine::{Engine, TAG_VOTE, applied_key, data_range, desc_key, raft_key};
use crate::node::NodeInner;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use prost::Message;
use skv_common::RangeId;
use skv_objstore::store::hex;
use skv_objstore::{CheckpointEntry, CheckpointHeader, ObjError, Objects, RangeManifest};
use skv_proto::internal::RangeDescriptor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Protobuf field number of the applied-state extension appended to a checkpoint's
/// descriptor bytes (outside `RangeDescriptor`'s own numbers; its decoder skips it).
const APPLIED_STATE_FIELD: u64 = 100;
/// Data written per engine batch during an install.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// A snapshot installed this soon after a bootstrap counts as its fallback (`stale`).
const STALE_WINDOW: Duration = Duration::from_secs(600);
/// A checkpoint download gets this long plus [`download_deadline`]'s share per byte; past it
/// the bootstrap is undone and the leader's snapshot is used. The caller holds the node's
/// creation lock during the download (other replica creations and split applies on this
/// store wait for it), so a hung or crawling object store must not hold it for long.
const DOWNLOAD_BASE_DEADLINE: Duration = Duration::from_secs(30);
/// The slowest download rate a bootstrap accepts (bytes per second of the stored object).
const DOWNLOAD_MIN_RATE: u64 = 8 << 20;

/// How long the download of an object of `size` bytes may take (pure).
pub fn download_deadline(size: u64) -> Duration {
    DOWNLOAD_BASE_DEADLINE + Duration::from_secs(size / DOWNLOAD_MIN_RATE)
}

/// Whether a checkpoint object of `size` bytes (its manifest entry) may be downloaded under
/// the receive cap `max_bytes` (pure).
pub fn check_size(size: u64, max_bytes: u64) -> Result<(), Fallback> {
    if size > max_bytes {
        Err(Fallback::TooLarge)
    } else {
        Ok(())
    }
}

/// Adds `n` installed bytes to `installed`; refused once the total passes `max_bytes`
/// (pure; saturating, so no total wraps).
pub fn admit_installed(installed: &mut u64, n: u64, max_bytes: u64) -> Result<(), Fallback> {
    *installed = installed.saturating_add(n);
    if *installed > max_bytes {
        Err(Fallback::TooLarge)
    } else {
        Ok(())
    }
}

/// The descriptor bytes of a checkpoint: the protobuf `RangeDescriptor`, then field 100
/// (length-delimited) holding the engine's applied state at the checkpoint's index
/// (postcard: applied log id and membership). `RangeDescriptor::decode` skips the field, so
/// readers that only want the descriptor (restore) are unaffected. Then, when above 0, the
/// range's version floor (field 101, ADR 0034).
pub fn descriptor_with_applied(desc: &RangeDescriptor, applied_raw: &[u8], floor: u64) -> Vec<u8> {
    let mut b = desc.encode_to_vec();
    prost::encoding::encode_varint((APPLIED_STATE_FIELD << 3) | 2, &mut b);
    prost::encoding::encode_varint(applied_raw.len() as u64, &mut b);
    b.extend_from_slice(applied_raw);
    crate::tombgc::append_floor(&mut b, floor);
    b
}

/// What a checkpoint's descriptor bytes carry.
#[derive(Debug)]
pub struct CheckpointState {
    pub desc: RangeDescriptor,
    /// The applied state exactly as the engine stores it.
    pub applied_raw: Vec<u8>,
    pub applied_index: u64,
    pub applied_term: u64,
    /// The voters of the checkpoint's membership.
    pub voters: Vec<u64>,
    /// The range's version floor at the checkpoint (ADR 0034; 0 when absent).
    pub floor: u64,
}

/// Splits a checkpoint's descriptor bytes ([`descriptor_with_applied`]); never panics on
/// garbage. `Ok(None)`-like results are errors here: a bootstrap needs both parts.
pub fn parse_checkpoint_descriptor(bytes: &[u8]) -> Result<CheckpointState, Fallback> {
    let desc = RangeDescriptor::decode(bytes).map_err(|_| Fallback::Corrupt)?;
    let (mut applied, mut floor) = (None, 0);
    walk_fields(bytes, |field, value| match (field, value) {
        (APPLIED_STATE_FIELD, FieldValue::Bytes(v)) => applied = Some(v.to_vec()),
        (crate::tombgc::FLOOR_FIELD, FieldValue::Varint(v)) => floor = v,
        _ => {}
    })
    .map_err(|_| Fallback::Corrupt)?;
    let applied_raw = applied.ok_or(Fallback::NoAppliedState)?;
    let view: AppliedView = decode(&applied_raw).map_err(|_| Fallback::Corrupt)?;
    let last = view.last_applied.ok_or(Fallback::NoAppliedState)?;
    Ok(CheckpointState {
        desc,
        applied_raw,
        applied_index: last.index,
        applied_term: last.leader_id.term,
        voters: view.membership.membership().voter_ids().collect(),
        floor,
    })
}

/// One protobuf field's value, as [`walk_fields`] hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValue<'a> {
    Varint(u64),
    Fixed,
    Bytes(&'a [u8]),
}

/// Bytes that are not a sequence of protobuf fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not protobuf fields")]
pub struct NotProtobuf;

/// Calls `visit` with each (field number, value) of protobuf-encoded `bytes` (descriptor
/// bytes with skv's extension fields, [`APPLIED_STATE_FIELD`] and
/// [`crate::tombgc::FLOOR_FIELD`]); `Err` on bytes that are not protobuf fields. Never panics.
pub fn walk_fields<'a>(mut buf: &'a [u8], mut visit: impl FnMut(u64, FieldValue<'a>)) -> Result<(), NotProtobuf> {
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).map_err(|_| NotProtobuf)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = prost::encoding::decode_varint(&mut buf).map_err(|_| NotProtobuf)?;
                visit(field, FieldValue::Varint(v));
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or(NotProtobuf)?;
                visit(field, FieldValue::Fixed);
            }
            2 => {
                let n = prost::encoding::decode_varint(&mut buf).map_err(|_| NotProtobuf)?;
                let n = usize::try_from(n).map_err(|_| NotProtobuf)?;
                let v = buf.get(..n).ok_or(NotProtobuf)?;
                buf = buf.get(n..).ok_or(NotProtobuf)?;
                visit(field, FieldValue::Bytes(v));
            }
            _ => return Err(NotProtobuf),
        }
    }
    Ok(())
}

/// Why a new replica was not bootstrapped from object storage (it gets the leader's snapshot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// `--bootstrap-from-checkpoints=false`.
    Disabled,
    /// The range has no manifest or no checkpoint in it.
    NoCheckpoint,
    /// The latest checkpoint is of another range version (a split or merge since) or span.
    OtherEpoch,
    /// The manifest or the object could not be read (store unreachable, bad manifest).
    Unreadable,
    /// The object was refused by its checksums or does not match its manifest entry.
    Corrupt,
    /// The checkpoint carries no applied state (written before ADR 0027).
    NoAppliedState,
    /// A live local range or another install overlaps the span.
    Overlap,
    /// The checkpoint's membership names this store a voter: installing it could make a
    /// replica that lost its state vote again (only learners-to-be are bootstrapped).
    Member,
    /// Installed, but the leader had purged its log past the checkpoint and sent its
    /// snapshot anyway.
    Stale,
    /// The cluster id is not known yet (placement has not answered this store's
    /// registration): checkpoints are scoped by cluster, so none is looked at.
    ClusterUnknown,
    /// The manifest or the checkpoint names another cluster (defence in depth: the layout
    /// already keeps clusters apart).
    OtherCluster,
    /// The checkpoint is larger than `--snapshot-max-receive-bytes`: its manifest entry says
    /// so (nothing downloaded), or its data passed the cap while being installed (a manifest
    /// that under-states it, or data that compressed well). The same cap a snapshot from the
    /// leader meets (ADR 0029).
    TooLarge,
}

impl Fallback {
    pub const ALL: [Fallback; 12] = [
        Fallback::Disabled,
        Fallback::NoCheckpoint,
        Fallback::OtherEpoch,
        Fallback::Unreadable,
        Fallback::Corrupt,
        Fallback::NoAppliedState,
        Fallback::Overlap,
        Fallback::Member,
        Fallback::Stale,
        Fallback::ClusterUnknown,
        Fallback::OtherCluster,
        Fallback::TooLarge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Fallback::Disabled => "disabled",
            Fallback::NoCheckpoint => "no_checkpoint",
            Fallback::OtherEpoch => "other_epoch",
            Fallback::Unreadable => "unreadable",
            Fallback::Corrupt => "corrupt",
            Fallback::NoAppliedState => "no_applied_state",
            Fallback::Overlap => "overlap",
            Fallback::Member => "member",
            Fallback::Stale => "stale",
            Fallback::ClusterUnknown => "cluster_unknown",
            Fallback::OtherCluster => "other_cluster",
            Fallback::TooLarge => "too_large",
        }
    }
}

/// Whether a `CreateReplica` tries a bootstrap (pure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Not a case for it: no object storage, the first replica of a brand-new range
    /// (`initialize`), or a replica this store already holds (it has an applied state).
    NotApplicable,
    /// A case for it, refused (counted as a fallback).
    Refused(Fallback),
    Try,
}

pub fn attempt(configured: bool, enabled: bool, initialize: bool, has_applied_state: bool) -> Attempt {
    if !configured || initialize || has_applied_state {
        Attempt::NotApplicable
    } else if !enabled {
        Attempt::Refused(Fallback::Disabled)
    } else {
        Attempt::Try
    }
}

/// Picks the checkpoint to install for `desc` (pure): the manifest's latest, if it is of
/// this range, at the descriptor's range version and span, and at a real index.
pub fn choose<'a>(
    desc: &RangeDescriptor,
    manifest: Option<&'a RangeManifest>,
) -> Result<&'a CheckpointEntry, Fallback> {
    let latest = manifest.and_then(|m| m.latest()).ok_or(Fallback::NoCheckpoint)?;
    let version = desc.epoch.unwrap_or_default().version;
    if latest.range_id != desc.range_id || latest.applied_index == 0 {
        return Err(Fallback::NoCheckpoint);
    }
    if latest.epoch_version != version || latest.start_hex != hex(&desc.start) || latest.end_hex != hex(&desc.end) {
        return Err(Fallback::OtherEpoch);
    }
    Ok(latest)
}

/// Checks that a manifest and its chosen entry belong to cluster `own` (pure): a manifest
/// naming another cluster, or an entry whose object lies outside `clusters/<own>/`, is
/// refused. The layout keeps clusters apart already; this catches a copied or misplaced
/// manifest.
pub fn check_cluster(own: &str, manifest: &RangeManifest, entry: &CheckpointEntry) -> Result<(), Fallback> {
    if !manifest.cluster_id.is_empty() && manifest.cluster_id != own {
        return Err(Fallback::OtherCluster);
    }
    let prefix = format!("{}/", skv_objstore::cluster_prefix(own));
    if !entry.path.starts_with(&prefix) {
        return Err(Fallback::OtherCluster);
    }
    Ok(())
}

/// Checks a downloaded checkpoint's header against its manifest entry and the descriptor
/// asked for (pure), before anything is written.
pub fn check_header(
    h: &CheckpointHeader,
    entry: &CheckpointEntry,
    desc: &RangeDescriptor,
    store: u64,
) -> Result<CheckpointState, Fallback> {
    let st = parse_checkpoint_descriptor(&h.descriptor)?;
    if st.desc.range_id != desc.range_id || h.range_id != desc.range_id {
        return Err(Fallback::Corrupt);
    }
    if (st.applied_index, st.applied_term) != (h.applied_index, h.applied_term)
        || (h.applied_index, h.applied_term) != (entry.applied_index, entry.applied_term)
    {
        return Err(Fallback::Corrupt);
    }
    let v = st.desc.epoch.unwrap_or_default().version;
    if v != desc.epoch.unwrap_or_default().version || st.desc.start != desc.start || st.desc.end != desc.end {
        return Err(Fallback::OtherEpoch);
    }
    if st.desc.start != h.start || st.desc.end != h.end {
        return Err(Fallback::Corrupt);
    }
    if st.voters.contains(&store) {
        return Err(Fallback::Member);
    }
    Ok(st)
}

/// How far past the latest checkpoint a leader's log may grow before compaction purges past
/// the checkpoint anyway (a learner then gets the leader's snapshot, the `stale` fallback).
pub const FLOOR_MAX_ENTRIES: u64 = 50_000;

/// The purge floor (pure): where a leader's log compaction records its snapshot meta so that
/// the log after the range's latest checkpoint (`floor`, its applied index; 0: none known)
/// is kept for learners that bootstrap from it. `None`: compact at `applied` as usual — no
/// checkpoint, nothing applied past it, the log past it is over `max_entries` long, or the
/// membership changed after it (the meta at `floor` must carry the membership in force there).
pub fn compaction_point(applied: u64, floor: u64, membership_index: u64, max_entries: u64) -> Option<u64> {
    (floor > 0 && floor < applied && applied - floor <= max_entries && membership_index <= floor).then_some(floor)
}

/// The log id of entry `index` of `range`, if it is still in the log.
pub(crate) fn log_id_at(engine: &Engine, range: RangeId, index: u64) -> std::io::Result<Option<super::LogId>> {
    use openraft::entry::RaftEntry;
    match engine
        .raft
        .get(crate::engine::log_key(range, index))
        .map_err(crate::engine::io_err)?
    {
        None => Ok(None),
        Some(v) => {
            let e: super::Entry = decode(&v).map_err(crate::engine::io_err)?;
            Ok(Some(e.log_id()))
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// `skv_bootstrap_*` (docs/metrics.md).
#[derive(Clone)]
pub struct BootstrapMetrics {
    pub installs: Counter,
    pub bytes: Counter,
    pub keys: Counter,
    pub seconds: Histogram,
    pub fallbacks: Family<ReasonLabel, Counter>,
}

impl Default for BootstrapMetrics {
    fn default() -> Self {
        let m = Self {
            installs: Counter::default(),
            bytes: Counter::default(),
            keys: Counter::default(),
            seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            fallbacks: Family::default(),
        };
        for f in Fallback::ALL {
            let _ = m.fallbacks.get_or_create(&ReasonLabel { reason: f.label() });
        }
        m
    }
}

impl BootstrapMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "skv_bootstrap_installs",
            "New replicas installed from an object-storage checkpoint",
            self.installs.clone(),
        );
        r.register(
            "skv_bootstrap_bytes",
            "Checkpoint object bytes installed by bootstraps",
            self.bytes.clone(),
        );
        r.register("skv_bootstrap_keys", "Keys installed by bootstraps", self.keys.clone());
        r.register(
            "skv_bootstrap_duration_seconds",
            "Time to download, check and install one checkpoint",
            self.seconds.clone(),
        );
        r.register(
            "skv_bootstrap_fallbacks",
            "New replicas left to the leader's snapshot, by reason",
            self.fallbacks.clone(),
        );
    }

    fn fallback(&self, f: Fallback) {
        self.fallbacks.get_or_create(&ReasonLabel { reason: f.label() }).inc();
    }
}

/// What a bootstrap did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Installed { index: u64, keys: u64, bytes: u64 },
    Fallback(Fallback),
}

/// Bootstraps new replicas of this store from object storage.
pub struct Bootstrapper {
    /// This cluster's checkpoints (known once placement answered the registration).
    pub cluster: crate::checkpoint::ClusterObjects,
    pub enabled: bool,
    /// `--snapshot-max-receive-bytes`: the largest checkpoint (object, and data installed
    /// from it) a bootstrap takes.
    pub max_bytes: u64,
    pub metrics: BootstrapMetrics,
    /// Ranges bootstrapped recently (a snapshot install soon after is a `stale` fallback).
    recent: parking_lot::Mutex<HashMap<RangeId, Instant>>,
}

impl Bootstrapper {
    pub fn new(
        cluster: crate::checkpoint::ClusterObjects,
        enabled: bool,
        max_bytes: u64,
        metrics: BootstrapMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            enabled,
            max_bytes,
            metrics,
            recent: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    /// A snapshot was installed on `range`: a fallback if it was bootstrapped recently.
    pub fn on_snapshot_installed(&self, range: RangeId) {
        let mut recent = self.recent.lock();
        recent.retain(|_, t| t.elapsed() < STALE_WINDOW);
        if recent.remove(&range).is_some() {
            self.metrics.fallback(Fallback::Stale);
            tracing::info!(range_id = %range, "bootstrapped replica still got the leader's snapshot (its log was purged past the checkpoint)");
        }
    }

    /// Installs the latest checkpoint of `desc`'s range into the engine, if one fits; the
    /// caller holds the node's creation lock and opens the replica afterwards (initialized
    /// when this returns `Installed`).
    pub async fn bootstrap(&self, node: &NodeInner, desc: &RangeDescriptor) -> Outcome {
        let range = RangeId(desc.range_id);
        let span = tracing::info_span!("bootstrap", range_id = %range, store_id = %node.store_id);
        let started = Instant::now();
        let out = if self.enabled {
            self.bootstrap_inner(node, desc).instrument(span.clone()).await
        } else {
            Outcome::Fallback(Fallback::Disabled)
        };
        let _e = span.enter();
        match out {
            Outcome::Installed { index, keys, bytes } => {
                self.metrics.installs.inc();
                self.metrics.bytes.inc_by(bytes);
                self.metrics.keys.inc_by(keys);
                self.metrics.seconds.observe(started.elapsed().as_secs_f64());
                {
                    let mut recent = self.recent.lock();
                    recent.retain(|_, t| t.elapsed() < STALE_WINDOW);
                    recent.insert(range, Instant::now());
                }
                tracing::info!(
                    index,
                    keys,
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "replica bootstrapped from a checkpoint"
                );
            }
            Outcome::Fallback(f) => {
                self.metrics.fallback(f);
                tracing::info!(
                    reason = f.label(),
                    "no bootstrap from object storage: the leader's snapshot is used"
                );
            }
        }
        out
    }

    async fn bootstrap_inner(&self, node: &NodeInner, desc: &RangeDescriptor) -> Outcome {
        let range = RangeId(desc.range_id);
        let Some(objects) = self.cluster.get() else {
            return Outcome::Fallback(Fallback::ClusterUnknown);
        };
        let own = objects.cluster_id().unwrap_or_default();
        let manifest = match objects.read_manifest(range.0).await {
            Ok(m) => m,
            Err(e @ ObjError::OtherCluster { .. }) => {
                tracing::warn!(error = %e, "range manifest of another cluster under this cluster's prefix");
                return Outcome::Fallback(Fallback::OtherCluster);
            }
            Err(e) => {
                tracing::warn!(error = %e, "range manifest not readable");
                return Outcome::Fallback(Fallback::Unreadable);
            }
        };
        let entry = match choose(desc, manifest.as_ref()) {
            Ok(e) => e.clone(),
            Err(f) => return Outcome::Fallback(f),
        };
        if let Some(m) = &manifest
            && let Err(f) = check_cluster(own, m, &entry)
        {
            return Outcome::Fallback(f);
        }
        if let Err(f) = check_size(entry.size, self.max_bytes) {
            tracing::warn!(path = %entry.path, size = entry.size, max_bytes = self.max_bytes, "checkpoint larger than --snapshot-max-receive-bytes: not downloaded");
            return Outcome::Fallback(f);
        }
        let Ok(_claim) = node.claim_install(range, &desc.start, &desc.end) else {
            return Outcome::Fallback(Fallback::Overlap);
        };
        let engine = node.engine.clone();
        match install(&engine, objects, &entry, desc, node.store_id.0, self.max_bytes).await {
            Ok((keys, bytes)) => Outcome::Installed {
                index: entry.applied_index,
                keys,
                bytes,
            },
            Err(f) => {
                if let Err(e) = abort_external_install(&engine, range, &desc.start, &desc.end) {
                    tracing::error!(error = %e, "undoing a failed bootstrap failed; the next start undoes it");
                }
                Outcome::Fallback(f)
            }
        }
    }
}

/// Downloads, checks and installs `entry` under the install marker; returns (keys, bytes).
async fn install(
    engine: &Arc<Engine>,
    objects: &Objects,
    entry: &CheckpointEntry,
    desc: &RangeDescriptor,
    store: u64,
    max_bytes: u64,
) -> Result<(u64, u64), Fallback> {
    let range = RangeId(desc.range_id);
    let io = |e: std::io::Error| {
        tracing::warn!(error = %e, "bootstrap install failed");
        Fallback::Unreadable
    };
    begin_external_install(engine, range, &desc.start, &desc.end).map_err(io)?;
    engine.sync().await.map_err(io)?;
    // Leftovers in the span (none expected: no live range overlaps it) are removed first.
    {
        let mut batch = engine.db.batch();
        let mut touched = Vec::new();
        for g in engine.data.range::<&[u8], _>(data_range(&desc.start, &desc.end)) {
            let k = g.key().map_err(|e| io(crate::engine::io_err(e)))?;
            batch.remove(&engine.data, k.to_vec());
            touched.push(k.to_vec());
        }
        batch.commit().map_err(|e| io(crate::engine::io_err(e)))?;
        engine.cache.invalidate(touched.iter().map(|k| &k[..]));
    }
    let mut state: Option<CheckpointState> = None;
    let mut header_refusal: Option<Fallback> = None;
    let mut installed = 0u64;
    let mut size_refusal: Option<Fallback> = None;
    let mut batch = engine.db.batch();
    let mut pending = 0usize;
    let mut touched: Vec<Vec<u8>> = Vec::new();
    let deadline = download_deadline(entry.size);
    let read = tokio::time::timeout(
        deadline,
        objects.read_checkpoint_with_header(
            entry,
            |h| match check_header(h, entry, desc, store) {
                Ok(s) => {
                    state = Some(s);
                    Ok(())
                }
                Err(f) => {
                    header_refusal = Some(f);
                    Err(format!("refused for bootstrap: {}", f.label()))
                }
            },
            |block| {
                for e in block {
                    let n = e.key.len() + e.value.len();
                    if let Err(f) = admit_installed(&mut installed, n as u64, max_bytes) {
                        size_refusal = Some(f);
                        return Err(format!(
                            "refused for bootstrap: more than {max_bytes} bytes of data (--snapshot-max-receive-bytes)"
                        ));
                    }
                    pending += n;
                    batch.insert(&engine.data, e.key.clone(), e.value);
                    touched.push(e.key);
                }
                if pending >= INSTALL_BATCH_BYTES {
                    std::mem::replace(&mut batch, engine.db.batch())
                        .commit()
                        .map_err(|e| e.to_string())?;
                    engine.cache.invalidate(touched.iter().map(|k| &k[..]));
                    touched.clear();
                    pending = 0;
                }
                Ok(())
            },
        ),
    )
    .await;
    // Dropping the read on the deadline is safe: what it committed is under the install
    // marker, and the caller undoes it (abort_external_install).
    let Ok(read) = read else {
        tracing::warn!(path = %entry.path, size = entry.size, deadline_s = deadline.as_secs(), "checkpoint download passed its deadline");
        return Err(Fallback::Unreadable);
    };
    let summary = match read {
        Ok(s) => s,
        Err(e) => {
            drop(batch);
            tracing::warn!(path = %entry.path, error = %e, "checkpoint refused for bootstrap");
            return Err(header_refusal.or(size_refusal).unwrap_or(match e {
                ObjError::Store { .. } => Fallback::Unreadable,
                _ => Fallback::Corrupt,
            }));
        }
    };
    let st = state.ok_or(Fallback::Corrupt)?;
    // Everything in one last batch: the rest of the data, the applied state and descriptor
    // of the checkpoint, no stale counters or Raft log of an older incarnation (the vote is
    // kept: a replica never votes twice in a term), and the marker's removal.
    let vote = raft_key(range, TAG_VOTE);
    for g in engine.raft.prefix(range.0.to_be_bytes()) {
        let k = g.key().map_err(|e| io(crate::engine::io_err(e)))?;
        if k[..] != vote[..] {
            batch.remove(&engine.raft, k);
        }
    }
    batch.remove(&engine.meta, crate::stats::stats_key(range));
    batch.insert(&engine.meta, applied_key(range), st.applied_raw.clone());
    batch.insert(&engine.meta, desc_key(range), st.desc.encode_to_vec());
    crate::tombgc::put_floor(engine, &mut batch, range, st.floor);
    finish_external_install(engine, &mut batch, range);
    batch.commit().map_err(|e| io(crate::engine::io_err(e)))?;
    engine.cache.invalidate(touched.iter().map(|k| &k[..]));
    engine.sync().await.map_err(io)?;
    Ok((summary.entries, summary.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skv_proto::internal::RangeEpoch;

    fn desc(version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: 9,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            epoch: Some(RangeEpoch { conf_ver: 3, version }),
            replicas: Vec::new(),
        }
    }

    fn applied_raw(index: u64, term: u64) -> Vec<u8> {
        let l = openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term, node_id: 2 }, index);
        let voters: std::collections::BTreeSet<u64> = [2, 3].into_iter().collect();
        let m =
            super::super::StoredMembership::new(Some(l), super::super::Membership::new_with_defaults(vec![voters], []));
        super::super::state_machine::encode_applied(Some(l), m).unwrap()
    }

    fn entry(index: u64, version: u64) -> CheckpointEntry {
        CheckpointEntry {
            path: "p".into(),
            range_id: 9,
            generation: 4,
            conf_ver: 3,
            epoch_version: version,
            applied_index: index,
            applied_term: 4,
            start_hex: hex(b"a"),
            end_hex: hex(b"m"),
            size: 1,
            key_count: 1,
            checksum: "0".into(),
            created_unix_ms: 1,
        }
    }

    fn manifest(entries: Vec<CheckpointEntry>) -> RangeManifest {
        let mut m = RangeManifest::new(9);
        for e in entries {
            m.add(e).unwrap();
        }
        m
    }

    #[test]
    fn the_applied_state_round_trips_through_the_descriptor_bytes_and_restore_still_decodes_them() {
        let raw = applied_raw(1234, 4);
        let b = descriptor_with_applied(&desc(2), &raw, 0);
        // A reader that only wants the descriptor (restore) decodes it unchanged.
        assert_eq!(RangeDescriptor::decode(&b[..]).unwrap(), desc(2));
        let st = parse_checkpoint_descriptor(&b).unwrap();
        assert_eq!((st.applied_index, st.applied_term), (1234, 4));
        assert_eq!(st.applied_raw, raw);
        assert_eq!(st.desc, desc(2));
        assert_eq!(st.floor, 0);
        // The version floor (ADR 0034) rides along when above 0.
        let with_floor = descriptor_with_applied(&desc(2), &raw, 77);
        assert_eq!(RangeDescriptor::decode(&with_floor[..]).unwrap(), desc(2));
        let st = parse_checkpoint_descriptor(&with_floor).unwrap();
        assert_eq!((st.applied_index, st.floor), (1234, 77));
        // Without the extension (an older checkpoint): no bootstrap.
        assert_eq!(
            parse_checkpoint_descriptor(&desc(2).encode_to_vec()).err(),
            Some(Fallback::NoAppliedState)
        );
        // Garbage never panics.
        for cut in 0..b.len() {
            let _ = parse_checkpoint_descriptor(&b[..cut]);
        }
        assert!(parse_checkpoint_descriptor(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_download_deadline_grows_with_the_object_but_is_bounded_for_small_ones() {
        assert_eq!(download_deadline(0), DOWNLOAD_BASE_DEADLINE);
        assert_eq!(download_deadline(1 << 20), DOWNLOAD_BASE_DEADLINE);
        // A 1 GiB checkpoint may take 30 s + 128 s.
        assert_eq!(
            download_deadline(1 << 30),
            DOWNLOAD_BASE_DEADLINE + Duration::from_secs(128)
        );
    }

    #[test]
    fn bootstrap_is_tried_only_for_a_new_replica_with_object_storage() {
        assert_eq!(
            attempt(false, true, false, false),
            Attempt::NotApplicable,
            "no object store"
        );
        assert_eq!(
            attempt(true, true, true, false),
            Attempt::NotApplicable,
            "a new range initializes"
        );
        assert_eq!(
            attempt(true, true, false, true),
            Attempt::NotApplicable,
            "already holds the range"
        );
        assert_eq!(attempt(true, false, false, false), Attempt::Refused(Fallback::Disabled));
        assert_eq!(attempt(true, true, false, false), Attempt::Try);
    }

    #[test]
    fn the_latest_checkpoint_is_chosen_only_at_the_same_range_version_and_span() {
        assert_eq!(choose(&desc(2), None).err(), Some(Fallback::NoCheckpoint));
        assert_eq!(
            choose(&desc(2), Some(&manifest(vec![]))).err(),
            Some(Fallback::NoCheckpoint)
        );
        let m = manifest(vec![entry(100, 2), entry(200, 2)]);
        assert_eq!(choose(&desc(2), Some(&m)).unwrap().applied_index, 200);
        // A split or merge since the checkpoint: its span is not the range's any more.
        assert_eq!(choose(&desc(3), Some(&m)).err(), Some(Fallback::OtherEpoch));
        let mut other_span = desc(2);
        other_span.end = b"z".to_vec();
        assert_eq!(choose(&other_span, Some(&m)).err(), Some(Fallback::OtherEpoch));
        // A membership change since (conf_ver) does not matter: the log replays it.
        let mut newer_conf = desc(2);
        newer_conf.epoch = Some(RangeEpoch {
            conf_ver: 7,
            version: 2,
        });
        assert!(choose(&newer_conf, Some(&m)).is_ok());
    }

    #[test]
    fn a_header_must_match_its_entry_and_the_descriptor_asked_for() {
        let e = entry(200, 2);
        let h = |index: u64, raw_index: u64, version: u64| CheckpointHeader {
            range_id: 9,
            generation: 4,
            conf_ver: 3,
            epoch_version: version,
            applied_index: index,
            applied_term: 4,
            created_unix_ms: 1,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            descriptor: descriptor_with_applied(&desc(version), &applied_raw(raw_index, 4), 0),
        };
        assert_eq!(
            check_header(&h(200, 200, 2), &e, &desc(2), 1).unwrap().applied_index,
            200
        );
        assert_eq!(
            check_header(&h(200, 199, 2), &e, &desc(2), 1).err(),
            Some(Fallback::Corrupt)
        );
        assert_eq!(
            check_header(&h(201, 201, 2), &e, &desc(2), 1).err(),
            Some(Fallback::Corrupt)
        );
        assert_eq!(
            check_header(&h(200, 200, 3), &e, &desc(2), 1).err(),
            Some(Fallback::OtherEpoch)
        );
        // A checkpoint whose membership makes this store (2) a voter is not installed.
        assert_eq!(
            check_header(&h(200, 200, 2), &e, &desc(2), 2).err(),
            Some(Fallback::Member)
        );
        let mut no_state = h(200, 200, 2);
        no_state.descriptor = desc(2).encode_to_vec();
        assert_eq!(
            check_header(&no_state, &e, &desc(2), 1).err(),
            Some(Fallback::NoAppliedState)
        );
    }

    #[test]
    fn a_leader_keeps_its_log_from_the_checkpoint_within_the_cap() {
        let cap = 1000;
        assert_eq!(compaction_point(500, 0, 1, cap), None, "no checkpoint known");
        assert_eq!(compaction_point(500, 400, 1, cap), Some(400));
        assert_eq!(compaction_point(400, 400, 1, cap), None, "nothing applied past it");
        assert_eq!(compaction_point(1400, 400, 1, cap), Some(400), "at the cap");
        assert_eq!(compaction_point(1401, 400, 1, cap), None, "past the cap: purge anyway");
        assert_eq!(
            compaction_point(500, 400, 450, cap),
            None,
            "membership changed after it"
        );
        assert_eq!(compaction_point(500, 400, 400, cap), Some(400));
    }

    fn test_node(dir: &std::path::Path) -> Arc<NodeInner> {
        let engine = Engine::open(dir, crate::metrics::Metrics::new()).unwrap();
        NodeInner::new(
            skv_common::StoreId(1),
            engine,
            crate::raft::network::Transport::new(skv_common::StoreId(1), None, 1 << 20),
            crate::raft::raft_config(100).unwrap(),
            dir.join("snaps"),
            crate::metrics::Metrics::new(),
        )
    }

    /// Uploads and commits a checkpoint of range 9 (`[a, m)`, version 2) with `n` keys.
    async fn checkpoint(o: &Objects, n: usize) -> CheckpointEntry {
        let h = CheckpointHeader {
            range_id: 9,
            generation: 4,
            conf_ver: 3,
            epoch_version: 2,
            applied_index: 200,
            applied_term: 4,
            created_unix_ms: 1,
            start: b"a".to_vec(),
            end: b"m".to_vec(),
            descriptor: descriptor_with_applied(&desc(2), &applied_raw(200, 4), 0),
        };
        let e = o
            .upload_checkpoint(h, move |sink| {
                for i in 0..n {
                    sink.push(format!("b{i:05}").as_bytes(), &crate::engine::encode_value(1, b"v"))?;
                }
                Ok(())
            })
            .await
            .unwrap();
        o.commit_checkpoint(e.clone(), 1).await.unwrap();
        e
    }

    #[tokio::test]
    async fn a_checkpoint_is_installed_with_its_applied_state_and_a_corrupt_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let objdir = tempfile::tempdir().unwrap();
        let url: skv_objstore::ObjectStoreUrl = format!("file://{}", objdir.path().display()).parse().unwrap();
        let o = Objects::open(&url, skv_objstore::ObjMetrics::new())
            .await
            .unwrap()
            .for_cluster("c1")
            .unwrap();
        let node = test_node(dir.path());
        let b = Bootstrapper::new(
            crate::checkpoint::ClusterObjects::known(o.clone()),
            true,
            u64::MAX,
            BootstrapMetrics::default(),
        );
        let e = checkpoint(&o, 5000).await;

        // Installed: every key, the applied state and the descriptor, no marker.
        let out = b.bootstrap(&node, &desc(2)).await;
        assert_eq!(
            out,
            Outcome::Installed {
                index: 200,
                keys: 5000,
                bytes: e.size
            }
        );
        let engine = &node.engine;
        assert!(engine.data.get(b"b04999").unwrap().is_some());
        assert_eq!(
            engine.meta.get(applied_key(RangeId(9))).unwrap().map(|v| v.to_vec()),
            Some(applied_raw(200, 4))
        );
        assert!(engine.meta.get(desc_key(RangeId(9))).unwrap().is_some());
        assert!(
            super::super::state_machine::recover_interrupted_installs(engine)
                .unwrap()
                .is_empty()
        );
        assert_eq!(b.metrics.installs.get(), 1);

        // A corrupt object on another store: refused, and the span is left empty.
        let dir2 = tempfile::tempdir().unwrap();
        let node2 = test_node(dir2.path());
        let path = objdir.path().join(&e.path);
        let mut bytes = std::fs::read(&path).unwrap();
        let last_block = bytes.len() - 100;
        bytes[last_block] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let out = b.bootstrap(&node2, &desc(2)).await;
        assert_eq!(out, Outcome::Fallback(Fallback::Corrupt));
        let e2 = &node2.engine;
        assert_eq!(e2.data.iter().count(), 0, "nothing of the refused checkpoint stays");
        assert!(e2.meta.get(applied_key(RangeId(9))).unwrap().is_none());
        assert!(
            super::super::state_machine::recover_interrupted_installs(e2)
                .unwrap()
                .is_empty()
        );

        // Another range version (a split since): not even downloaded.
        let dir3 = tempfile::tempdir().unwrap();
        let node3 = test_node(dir3.path());
        assert_eq!(
            b.bootstrap(&node3, &desc(3)).await,
            Outcome::Fallback(Fallback::OtherEpoch)
        );
        node.stop_all().await;
    }

    #[test]
    fn a_checkpoint_of_another_cluster_is_refused() {
        let mut e = entry(200, 2);
        e.path = format!("{}/snapshots/9/4/200.snap", skv_objstore::cluster_prefix("c1"));
        let mut m = manifest(vec![e.clone()]);
        assert_eq!(
            check_cluster("c1", &m, &e),
            Ok(()),
            "legacy manifest without an id, own path"
        );
        m.cluster_id = "c1".into();
        assert_eq!(check_cluster("c1", &m, &e), Ok(()));
        assert_eq!(
            check_cluster("c2", &m, &e),
            Err(Fallback::OtherCluster),
            "manifest of c1"
        );
        m.cluster_id = String::new();
        assert_eq!(
            check_cluster("c2", &m, &e),
            Err(Fallback::OtherCluster),
            "object under c1"
        );
        // A prefix of the id is not the id.
        assert_eq!(check_cluster("c", &m, &e), Err(Fallback::OtherCluster));
        e.path = "snapshots/9/4/200.snap".into();
        assert_eq!(
            check_cluster("c1", &m, &e),
            Err(Fallback::OtherCluster),
            "unscoped layout"
        );
    }

    /// Two clusters on one file:// URL, both with a range 9 at the same version and span:
    /// cluster B never reads or installs A's checkpoint, even with A's manifest copied under
    /// B's prefix; without a known cluster id nothing is tried.
    #[tokio::test]
    async fn a_bootstrap_never_installs_another_clusters_checkpoint_on_the_same_url() {
        let objdir = tempfile::tempdir().unwrap();
        let url: skv_objstore::ObjectStoreUrl = format!("file://{}", objdir.path().display()).parse().unwrap();
        let base = Objects::open(&url, skv_objstore::ObjMetrics::new()).await.unwrap();
        let a = base.for_cluster("aaaa").unwrap();
        let b = base.for_cluster("bbbb").unwrap();
        let ea = checkpoint(&a, 100).await;

        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        let unknown = Bootstrapper::new(
            crate::checkpoint::ClusterObjects::default(),
            true,
            u64::MAX,
            BootstrapMetrics::default(),
        );
        assert_eq!(
            unknown.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::ClusterUnknown)
        );
        let bb = Bootstrapper::new(
            crate::checkpoint::ClusterObjects::known(b.clone()),
            true,
            u64::MAX,
            BootstrapMetrics::default(),
        );
        assert_eq!(
            bb.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::NoCheckpoint)
        );
        // A's manifest copied under B's prefix: refused by its cluster id.
        let to = objdir.path().join(skv_objstore::manifest_path("bbbb", 9));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(objdir.path().join(skv_objstore::manifest_path("aaaa", 9)), &to).unwrap();
        assert_eq!(
            bb.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::OtherCluster)
        );
        // The same without its id (an old manifest): refused by the object's path.
        let text = std::fs::read_to_string(&to).unwrap();
        assert!(text.contains("\"cluster_id\": \"aaaa\","), "{text}");
        std::fs::write(&to, text.replace("\"cluster_id\": \"aaaa\",", "")).unwrap();
        assert_eq!(
            bb.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::OtherCluster)
        );
        assert_eq!(
            node.engine.data.iter().count(),
            0,
            "nothing of A's checkpoint installed"
        );
        assert_eq!(a.metrics.downloads.get(), 0, "A's object never downloaded");
        assert_eq!(bb.metrics.installs.get(), 0);
        // A itself installs it.
        let ba = Bootstrapper::new(
            crate::checkpoint::ClusterObjects::known(a),
            true,
            u64::MAX,
            BootstrapMetrics::default(),
        );
        assert!(matches!(
            ba.bootstrap(&node, &desc(2)).await,
            Outcome::Installed { keys: 100, .. }
        ));
        assert!(ea.path.starts_with("clusters/aaaa/"));
        node.stop_all().await;
    }

    #[test]
    fn a_bootstrap_interrupted_before_its_last_batch_is_undone_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        let r = RangeId(9);
        engine.data.insert(b"zz-other-range", b"x").unwrap();
        begin_external_install(&engine, r, b"a", b"m").unwrap();
        // Blocks written by the download, then the process dies before the last batch.
        engine
            .data
            .insert(b"b00001", crate::engine::encode_value(1, b"v"))
            .unwrap();
        engine
            .data
            .insert(b"c00002", crate::engine::encode_value(1, b"v"))
            .unwrap();
        engine.persist().unwrap();
        drop(engine);
        let engine = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        assert!(
            engine.data.get(b"b00001").unwrap().is_some(),
            "the half install survived the crash"
        );
        assert!(
            engine.meta.prefix(b"installing/").next().is_some(),
            "and so did its marker"
        );
        // The next start cannot redo it (no file) and uninitializes the replica.
        let redone = super::super::state_machine::recover_interrupted_installs(&engine).unwrap();
        assert!(redone.is_empty());
        assert!(engine.data.get(b"b00001").unwrap().is_none());
        assert!(engine.data.get(b"c00002").unwrap().is_none());
        assert!(
            engine.data.get(b"zz-other-range").unwrap().is_some(),
            "outside the span"
        );
        assert!(engine.meta.get(applied_key(r)).unwrap().is_none());
        // The marker is gone: a second start has nothing to do.
        assert!(
            super::super::state_machine::recover_interrupted_installs(&engine)
                .unwrap()
                .is_empty()
        );
        assert!(engine.meta.prefix(b"installing/").next().is_none());
    }

    #[test]
    fn the_size_cap_refuses_a_larger_object_and_a_total_that_passes_it_without_wrapping() {
        assert_eq!(check_size(1000, 1000), Ok(()));
        assert_eq!(check_size(1001, 1000), Err(Fallback::TooLarge));
        assert_eq!(check_size(u64::MAX, u64::MAX - 1), Err(Fallback::TooLarge));
        let mut total = 0;
        assert_eq!(admit_installed(&mut total, 600, 1000), Ok(()));
        assert_eq!(admit_installed(&mut total, 400, 1000), Ok(()));
        assert_eq!(admit_installed(&mut total, 1, 1000), Err(Fallback::TooLarge));
        let mut near = u64::MAX - 1;
        assert_eq!(admit_installed(&mut near, 10, u64::MAX - 1), Err(Fallback::TooLarge));
        assert_eq!(near, u64::MAX, "saturates, never wraps to a small total");
    }

    /// A checkpoint over --snapshot-max-receive-bytes is not downloaded (its manifest says
    /// so) and leaves the replica to the leader's snapshot with reason `too_large`; one whose
    /// manifest under-states it is refused once the installed data passes the cap, and
    /// nothing of it stays.
    #[tokio::test]
    async fn a_checkpoint_over_the_receive_cap_falls_back_to_the_snapshot() {
        let objdir = tempfile::tempdir().unwrap();
        let url: skv_objstore::ObjectStoreUrl = format!("file://{}", objdir.path().display()).parse().unwrap();
        let o = Objects::open(&url, skv_objstore::ObjMetrics::new())
            .await
            .unwrap()
            .for_cluster("c1")
            .unwrap();
        let e = checkpoint(&o, 5000).await;
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        let capped = |max| {
            Bootstrapper::new(
                crate::checkpoint::ClusterObjects::known(o.clone()),
                true,
                max,
                BootstrapMetrics::default(),
            )
        };
        // The manifest's size is over the cap: refused before any download.
        let b = capped(e.size - 1);
        assert_eq!(
            b.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::TooLarge)
        );
        assert_eq!(o.metrics.downloads.get(), 0, "nothing downloaded");
        assert_eq!(
            b.metrics
                .fallbacks
                .get_or_create(&ReasonLabel { reason: "too_large" })
                .get(),
            1
        );
        // The object fits (its LZ4 blocks compress the repeated values) but its data does
        // not: refused while installing, and the span is left empty.
        let data_bytes = 5000 * (6 + crate::engine::encode_value(1, b"v").len() as u64);
        assert!(e.size < data_bytes, "object {} B, data {data_bytes} B", e.size);
        let b = capped(data_bytes - 1);
        assert_eq!(
            b.bootstrap(&node, &desc(2)).await,
            Outcome::Fallback(Fallback::TooLarge)
        );
        assert_eq!(
            node.engine.data.iter().count(),
            0,
            "nothing of the refused checkpoint stays"
        );
        assert!(node.engine.meta.get(applied_key(RangeId(9))).unwrap().is_none());
        assert!(
            super::super::state_machine::recover_interrupted_installs(&node.engine)
                .unwrap()
                .is_empty()
        );
        // At the cap exactly: installed.
        let b = capped(data_bytes.max(e.size));
        assert!(matches!(
            b.bootstrap(&node, &desc(2)).await,
            Outcome::Installed { keys: 5000, .. }
        ));
        node.stop_all().await;
    }

    #[test]
    fn every_fallback_has_a_distinct_label() {
        let mut labels: Vec<_> = Fallback::ALL.iter().map(|f| f.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Fallback::ALL.len());
    }
}
