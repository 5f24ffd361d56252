//! Backup and restore (issue 11, ADR 0028), run by the placement leader.
//!
//! **Backup.** `CreateBackup` writes `<p>/backups/<id>` (state running, owner = this
//! instance) and starts a task that asks the leader of every range for `BackupRange` (a
//! ReadIndex barrier, then a checkpoint at an index at least the barrier's, uploaded under
//! `backups/<id>/ranges/`). Ranges that split or merge meanwhile are backed up again, until
//! the results tile the key space ([`skv_objstore::backup`], pure). Then the record moves to
//! "finishing" by compare-and-swap, the manifest is written (the backup becomes visible), and
//! the record is deleted. A backup whose owner is gone (placement failover) is marked failed
//! by the next leader's sweep (compare-and-swap too, so exactly one of the two wins) and its
//! objects deleted; objects of a backup without manifest nor record are swept after the
//! orphan grace.
//!
//! **Restore.** `RestoreBackup` refuses a cluster that holds a restore of another backup
//! or any key (`IngestRange{check_empty}` on every range), writes `<p>/restore` (running)
//! and starts a task: every object of the backup is read and checked completely (checksum,
//! size, keys against the manifest) into a spool file before anything is ingested; then the
//! records go, in chunks of about 1 MiB, to the leader of the range holding them
//! (`IngestRange`, one Raft command each). Ingest skips records older than what a key holds,
//! so running the restore again (after a failure or a failover) ends the same.

use super::{Shared, wall_ms};
use crate::error::{PlacementError, PlacementResult};
use crate::meta::{CmpOp, Compare, Op, Txn};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use prost::Message;
use skv_common::ids::{RangeId, StoreId};
use skv_objstore::Objects;
use skv_objstore::backup::{
    BackupManifest, BackupRange, Span, add_result, backup_range_path, check_tiling, still_to_back_up, valid_backup_id,
};
use skv_objstore::store::hex;
use skv_proto::internal::store_backup_client::StoreBackupClient;
use skv_proto::internal::*;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

const RUNNING: &str = "running";
const FINISHING: &str = "finishing";
const COMPLETE: &str = "complete";
const FAILED: &str = "failed";
/// A backup gives up when no range was backed up for this long (it has no deadline as a
/// whole: a large cluster's backup takes as long as its ranges need, one at a time).
const NO_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Between two rounds of a backup that met errors or a map with gaps.
const ROUND_PAUSE: Duration = Duration::from_millis(300);
/// How often the leader sweeps backups left by a gone owner.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(5);
// Records per ingest call: at most INGEST_CHUNK_BYTES encoded, or one record (ADR 0028).
use skv_common::limits::{INGEST_CHUNK_BYTES, INGEST_COMMAND_OVERHEAD, ingest_record_cost};
/// Attempts of one ingest chunk that meets routing or store errors.
const INGEST_ATTEMPTS: usize = 60;

/// `skv_backup_*`: backup and restore runs (ADR 0028).
#[derive(Clone)]
pub struct BackupMetrics {
    /// Runs finished, by op (backup, restore) and outcome (ok, failed).
    pub runs: Family<OpOutcome, Counter>,
    pub seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// Bytes and keys of finished runs (object bytes; keys including tombstones).
    pub bytes: Family<OpLabel, Counter>,
    pub keys: Family<OpLabel, Counter>,
    /// Ranges backed up or restored (a range backed up again after a split counts twice).
    pub ranges: Family<OpLabel, Counter>,
    /// Runs in progress on this instance.
    pub running: Family<OpLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcome {
    pub op: &'static str,
    pub outcome: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 14))
}

impl Default for BackupMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            seconds: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            bytes: Family::default(),
            keys: Family::default(),
            ranges: Family::default(),
            running: Family::default(),
        }
    }
}

impl BackupMetrics {
    pub fn register(&self, r: &mut Registry) {
        // Every series exists from the start (dashboards and alerts see zeros, not nothing).
        for op in ["backup", "restore"] {
            for outcome in ["ok", "failed"] {
                let _ = self.runs.get_or_create(&OpOutcome { op, outcome });
            }
            let _ = self.seconds.get_or_create(&OpLabel { op });
            let _ = self.bytes.get_or_create(&OpLabel { op });
            let _ = self.keys.get_or_create(&OpLabel { op });
            let _ = self.ranges.get_or_create(&OpLabel { op });
            let _ = self.running.get_or_create(&OpLabel { op });
        }
        r.register(
            "skv_backup_runs",
            "Backups and restores finished, by op (backup, restore) and outcome",
            self.runs.clone(),
        );
        r.register(
            "skv_backup_duration_seconds",
            "Duration of finished backups and restores, by op",
            self.seconds.clone(),
        );
        r.register(
            "skv_backup_bytes",
            "Object bytes of finished backups and restores, by op",
            self.bytes.clone(),
        );
        r.register(
            "skv_backup_keys",
            "Keys (tombstones included) of finished backups and restores, by op",
            self.keys.clone(),
        );
        r.register(
            "skv_backup_ranges",
            "Range objects backed up or restored, by op",
            self.ranges.clone(),
        );
        r.register(
            "skv_backup_running",
            "Backups and restores running on this placement instance, by op",
            self.running.clone(),
        );
    }

    fn finished(&self, op: &'static str, ok: bool, started: Instant, bytes: u64, keys: u64) {
        let outcome = if ok { "ok" } else { "failed" };
        self.runs.get_or_create(&OpOutcome { op, outcome }).inc();
        self.seconds
            .get_or_create(&OpLabel { op })
            .observe(started.elapsed().as_secs_f64());
        if ok {
            self.bytes.get_or_create(&OpLabel { op }).inc_by(bytes);
            self.keys.get_or_create(&OpLabel { op }).inc_by(keys);
        }
    }
}

/// Backup ids: UTC time of the start plus 4 random hex digits (`20261202-093800-ab12`),
/// sortable by time.
pub fn new_backup_id(unix_ms: u64, random: u16) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{random:04x}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn objects(s: &Shared) -> PlacementResult<&Objects> {
    s.objects.as_ref().ok_or_else(|| PlacementError::FailedPrecondition {
        reason: "placement has no --object-store-url: backups need the object storage the storenodes use".into(),
    })
}

fn check_id(id: &str) -> PlacementResult<()> {
    if valid_backup_id(id) {
        Ok(())
    } else {
        Err(PlacementError::invalid("a backup id is 1 to 64 of [A-Za-z0-9_-]"))
    }
}

fn obj_err(e: skv_objstore::ObjError) -> PlacementError {
    PlacementError::ObjectStore { reason: e.to_string() }
}

/// Every backup record in the metadata store (running, finishing or failed ones).
async fn backup_records(s: &Shared) -> PlacementResult<Vec<(BackupInfo, Vec<u8>)>> {
    let prefix = s.meta.layout.backups_prefix();
    let (from, to) = crate::meta::prefix_range(&prefix);
    let r = s.meta.store.range(&from, &to, 0).await?;
    Ok(r.kvs
        .into_iter()
        .filter_map(|kv| BackupInfo::decode(kv.value.as_slice()).ok().map(|b| (b, kv.value)))
        .collect())
}

pub(super) async fn create_backup(s: &Arc<Shared>, _req: CreateBackupRequest) -> PlacementResult<CreateBackupResponse> {
    objects(s)?;
    // The record names this instance's session: the sweep of another leader decides a
    // finishing backup only once that session is gone.
    let session = match s.meta.store.get(&s.meta.layout.member(&s.me.name)).await? {
        Some(kv) if kv.lease != 0 => kv.lease,
        _ => {
            return Err(PlacementError::LeaderUnavailable {
                leader: format!("{} (its placement session is not registered yet; retry)", s.me.name),
            });
        }
    };
    let now = wall_ms();
    let info = BackupInfo {
        id: new_backup_id(now, rand::random()),
        state: RUNNING.into(),
        created_unix_ms: now,
        owner: s.me.name.clone(),
        owner_session: session,
        ..Default::default()
    };
    let key = s.meta.layout.backup(&info.id);
    let value = info.encode_to_vec();
    let t = Txn::new()
        .when([Compare::absent(key.clone())])
        .and_then([Op::put(key, value.clone())]);
    if !s.meta.store.txn(t).await?.succeeded {
        return Err(PlacementError::Conflict {
            what: format!("backup id {} taken", info.id),
        });
    }
    s.jobs.lock().insert(info.id.clone());
    let span = tracing::info_span!("backup", backup_id = %info.id);
    span.in_scope(|| tracing::info!("backup started"));
    tokio::spawn(run_backup(s.clone(), info.clone(), value).instrument(span));
    Ok(CreateBackupResponse { backup: Some(info) })
}

async fn run_backup(s: Arc<Shared>, info: BackupInfo, value: Vec<u8>) {
    let started = Instant::now();
    let running = s
        .backup_metrics
        .running
        .get_or_create(&OpLabel { op: "backup" })
        .clone();
    running.inc();
    // The record's value as this task last wrote it (running, then finishing).
    let mut value = value;
    let res = match s.objects.clone() {
        Some(objects) => backup_all(&s, &objects, &info, &mut value).await,
        None => Err("no object storage".to_string()),
    };
    running.dec();
    s.jobs.lock().remove(&info.id);
    match res {
        Ok(m) => {
            s.backup_metrics
                .finished("backup", true, started, m.total_bytes, m.total_keys);
            tracing::info!(
                ranges = m.ranges.len(),
                keys = m.total_keys,
                bytes = m.total_bytes,
                ms = started.elapsed().as_millis() as u64,
                "backup complete"
            );
        }
        Err(e) => {
            s.backup_metrics.finished("backup", false, started, 0, 0);
            tracing::warn!(error = %e, "backup failed");
            let key = s.meta.layout.backup(&info.id);
            let failed = BackupInfo {
                state: FAILED.into(),
                error: e,
                finished_unix_ms: wall_ms(),
                owner: String::new(),
                ..info.clone()
            };
            // Only over our own record (running or finishing, as this task last wrote it),
            // and its objects only then: a sweep that decided already owns the outcome.
            let t = Txn::new()
                .when([Compare::value(key.clone(), CmpOp::Equal, value)])
                .and_then([Op::put(key, failed.encode_to_vec())]);
            match s.meta.store.txn(t).await {
                Ok(r) if r.succeeded => {
                    if let Some(o) = &s.objects
                        && let Err(e) = o.delete_backup(&info.id).await
                    {
                        tracing::warn!(error = %e, "deleting the failed backup's objects failed (delete the backup again)");
                    }
                }
                Ok(_) => tracing::info!("the backup record was decided by another leader's sweep"),
                Err(e) => {
                    tracing::warn!(error = %e, "marking the backup failed: its record stays until a sweep decides it")
                }
            }
        }
    }
}

/// What one BackupRange call produced, or why the range must be tried again.
enum RangeOutcome {
    Done(BackupRange),
    Retry(String),
}

async fn backup_all(
    s: &Shared,
    objects: &Objects,
    info: &BackupInfo,
    value: &mut Vec<u8>,
) -> Result<BackupManifest, String> {
    let mut last_progress = Instant::now();
    let mut done: Vec<(Span, BackupRange)> = Vec::new();
    let mut replaced: Vec<String> = Vec::new();
    let mut last_problem = String::new();
    loop {
        if !s.is_leader() {
            return Err("this placement instance stopped leading".into());
        }
        if last_progress.elapsed() > NO_PROGRESS_DEADLINE {
            return Err(format!(
                "no range backed up for {} s; last problem: {last_problem}",
                NO_PROGRESS_DEADLINE.as_secs()
            ));
        }
        let (ranges, _) = s.meta.all_ranges().await.map_err(|e| e.to_string())?;
        let map: Vec<(Span, RangeDescriptor, Option<StoreId>)> = ranges
            .iter()
            .map(|r| {
                let d = r.desc().clone();
                ((d.start.clone(), d.end.clone()), d, r.leader())
            })
            .collect();
        let spans: Vec<Span> = map.iter().map(|m| m.0.clone()).collect();
        let done_spans: Vec<Span> = done.iter().map(|d| d.0.clone()).collect();
        let todo: Vec<Span> = still_to_back_up(&spans, &done_spans).into_iter().cloned().collect();
        if todo.is_empty() {
            match check_tiling(&done_spans) {
                Ok(()) => break,
                Err(e) => last_problem = format!("the range map does not cover the key space yet: {e}"),
            }
        }
        let mut problem = false;
        for span in todo {
            let Some((_, desc, leader)) = map.iter().find(|m| m.0 == span) else {
                continue;
            };
            let range_id = RangeId(desc.range_id);
            let out = backup_one(s, &info.id, desc, *leader)
                .instrument(tracing::info_span!("backup_range", range_id = range_id.get()))
                .await?;
            match out {
                RangeOutcome::Done(r) => {
                    last_progress = Instant::now();
                    s.backup_metrics.ranges.get_or_create(&OpLabel { op: "backup" }).inc();
                    replaced.extend(add_result(&mut done, span, r).into_iter().map(|r| r.path));
                }
                RangeOutcome::Retry(why) => {
                    tracing::info!(range_id = range_id.get(), reason = %why, "range backed up again later");
                    last_problem = format!("range {range_id}: {why}");
                    problem = true;
                }
            }
        }
        if problem || !last_problem.is_empty() {
            last_problem.clear();
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }
    let ranges: Vec<BackupRange> = done.into_iter().map(|d| d.1).collect();
    let manifest = BackupManifest::new(&info.id, &s.cluster_id, info.created_unix_ms, ranges);
    // Finishing: only if nobody (a sweep) decided about this backup meanwhile.
    let key = s.meta.layout.backup(&info.id);
    let finishing = BackupInfo {
        state: FINISHING.into(),
        finished_unix_ms: wall_ms(),
        ..info.clone()
    };
    let finishing = finishing.encode_to_vec();
    let t = Txn::new()
        .when([Compare::value(key.clone(), CmpOp::Equal, value.clone())])
        .and_then([Op::put(key.clone(), finishing.clone())]);
    if !s.meta.store.txn(t).await.map_err(|e| e.to_string())?.succeeded {
        return Err("the backup record changed (a new placement leader failed it)".into());
    }
    *value = finishing.clone();
    objects
        .write_backup_manifest(&manifest)
        .await
        .map_err(|e| format!("writing the manifest: {e}"))?;
    // Complete: the manifest is the backup; the record goes, only if it still is our
    // finishing record. If a sweep decided meanwhile (this instance's session expired
    // while the manifest was written), the backup may have lost objects: its manifest
    // goes too, so it is never listed (ADR 0028).
    let t = Txn::new()
        .when([Compare::value(key.clone(), CmpOp::Equal, finishing)])
        .and_then([Op::delete(key)]);
    if !s.meta.store.txn(t).await.map_err(|e| e.to_string())?.succeeded {
        tracing::warn!("the backup record changed while the manifest was written: the backup is withdrawn");
        if let Err(e) = objects.delete_backup(&info.id).await {
            tracing::warn!(error = %e, "withdrawing the backup failed");
        }
        return Err("the backup record changed while the manifest was written (a new placement leader decided it); the backup was withdrawn".into());
    }
    if !replaced.is_empty()
        && let Err(e) = objects.delete_unnamed_backup_objects(&info.id, &manifest.objects).await
    {
        tracing::warn!(error = %e, "deleting replaced range objects failed");
    }
    Ok(manifest)
}

/// Backs up one range on its leader. `Err` only for what a retry cannot fix.
async fn backup_one(
    s: &Shared,
    id: &str,
    desc: &RangeDescriptor,
    leader: Option<StoreId>,
) -> Result<RangeOutcome, String> {
    let Some(leader) = leader else {
        return Ok(RangeOutcome::Retry("leader not known yet".into()));
    };
    let address = match s.meta.get_store(leader).await {
        Ok(Some(st)) => st.address,
        Ok(None) => return Ok(RangeOutcome::Retry(format!("store {leader} unknown"))),
        Err(e) => return Ok(RangeOutcome::Retry(e.to_string())),
    };
    let channel = s.long_channel(&address).map_err(|e| e.to_string())?;
    let epoch = desc.epoch.unwrap_or_default();
    let req = BackupRangeRequest {
        header: Some(RequestHeader {
            range_id: desc.range_id,
            epoch: desc.epoch,
        }),
        backup_id: id.to_string(),
        path: backup_range_path(id, desc.range_id, epoch.version),
    };
    let resp = match StoreBackupClient::new(channel).backup_range(req).await {
        Ok(r) => r.into_inner(),
        Err(st) => {
            return match st.code() {
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::Unimplemented => Err(
                    format!("store {leader} at {address} refused the backup: {}", st.message()),
                ),
                _ => Ok(RangeOutcome::Retry(format!(
                    "store {leader} at {address}: {}",
                    st.message()
                ))),
            };
        }
    };
    if let Some(re) = resp.routing_error {
        let wait = s.absorb_routing_error(desc, &re).await;
        tokio::time::sleep(wait).await;
        return Ok(RangeOutcome::Retry(re.message));
    }
    let Some(d) = resp.descriptor else {
        return Ok(RangeOutcome::Retry("answer without a descriptor".into()));
    };
    let e = d.epoch.unwrap_or_default();
    Ok(RangeOutcome::Done(BackupRange {
        range_id: d.range_id,
        path: resp.path,
        generation: resp.generation,
        conf_ver: e.conf_ver,
        epoch_version: e.version,
        barrier_index: resp.barrier_index,
        applied_index: resp.applied_index,
        applied_term: resp.applied_term,
        start_hex: hex(&d.start),
        end_hex: hex(&d.end),
        size: resp.size,
        key_count: resp.key_count,
        checksum: resp.checksum,
        created_unix_ms: resp.created_unix_ms,
    }))
}

fn complete_info(m: &BackupManifest) -> BackupInfo {
    BackupInfo {
        id: m.id.clone(),
        state: COMPLETE.into(),
        created_unix_ms: m.created_unix_ms,
        finished_unix_ms: m.finished_unix_ms,
        bytes: m.total_bytes,
        keys: m.total_keys,
        ranges: m.ranges.len() as u32,
        error: String::new(),
        owner: String::new(),
        owner_session: 0,
    }
}

pub(super) async fn list_backups(s: &Arc<Shared>, _req: ListBackupsRequest) -> PlacementResult<ListBackupsResponse> {
    let objects = objects(s)?;
    let mut out: Vec<BackupInfo> = Vec::new();
    for (id, has_manifest, _) in objects.list_backup_dirs().await.map_err(obj_err)? {
        if !has_manifest {
            continue;
        }
        match objects.read_backup_manifest(&id).await {
            Ok(Some(m)) => out.push(complete_info(&m)),
            Ok(None) => {}
            Err(e) => out.push(BackupInfo {
                id,
                state: FAILED.into(),
                error: e.to_string(),
                ..Default::default()
            }),
        }
    }
    for (mut b, _) in backup_records(s).await? {
        if out.iter().any(|o| o.id == b.id) {
            continue;
        }
        if b.state == FINISHING {
            b.state = RUNNING.into();
        }
        out.push(b);
    }
    out.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
    Ok(ListBackupsResponse { backups: out })
}

pub(super) async fn delete_backup(s: &Arc<Shared>, req: DeleteBackupRequest) -> PlacementResult<DeleteBackupResponse> {
    check_id(&req.id)?;
    let objects = objects(s)?;
    if s.jobs.lock().contains(&req.id) {
        return Err(PlacementError::FailedPrecondition {
            reason: format!("backup {} is running; delete it once it finished", req.id),
        });
    }
    let existed = objects.delete_backup(&req.id).await.map_err(obj_err)?;
    let key = s.meta.layout.backup(&req.id);
    let had_record = s.meta.store.get(&key).await?.is_some();
    s.meta.store.txn(Txn::new().and_then([Op::delete(key)])).await?;
    tracing::info!(backup_id = %req.id, existed = existed || had_record, "backup deleted");
    Ok(DeleteBackupResponse {
        existed: existed || had_record,
    })
}

/// The leader's sweep: backups whose owner is gone are decided (complete if their manifest
/// was written, else failed and their objects deleted); a restore left running by a gone
/// leader is marked failed (run it again to resume); backup objects with neither manifest
/// nor record are deleted after the orphan grace.
pub(super) async fn sweep(s: &Shared) -> PlacementResult<()> {
    let Some(objects) = &s.objects else { return Ok(()) };
    let now = wall_ms();
    let records = backup_records(s).await?;
    for (b, raw) in &records {
        if (b.state != RUNNING && b.state != FINISHING) || s.jobs.lock().contains(&b.id) {
            continue;
        }
        let key = s.meta.layout.backup(&b.id);
        // The owner lives while its placement session does (this instance's own backups
        // not in `jobs` are over).
        let owner_alive = b.state == FINISHING
            && b.owner != s.me.name
            && match s.meta.store.get(&s.meta.layout.member(&b.owner)).await? {
                Some(kv) => b.owner_session == 0 || kv.lease == b.owner_session,
                None => false,
            };
        let has_manifest = !owner_alive && objects.read_backup_manifest(&b.id).await.map_err(obj_err)?.is_some();
        match sweep_decision(&b.state, owner_alive, has_manifest) {
            SweepAction::Leave => continue,
            SweepAction::DropRecord => {
                let t = Txn::new()
                    .when([Compare::value(key.clone(), CmpOp::Equal, raw.clone())])
                    .and_then([Op::delete(key)]);
                s.meta.store.txn(t).await?;
                continue;
            }
            SweepAction::Fail => {}
        }
        let failed = BackupInfo {
            state: FAILED.into(),
            error: format!(
                "interrupted: its placement leader ({}) is gone; nothing of it is visible, take a new backup",
                b.owner
            ),
            finished_unix_ms: now,
            owner: String::new(),
            ..b.clone()
        };
        let t = Txn::new()
            .when([Compare::value(key.clone(), CmpOp::Equal, raw.clone())])
            .and_then([Op::put(key, failed.encode_to_vec())]);
        if s.meta.store.txn(t).await?.succeeded {
            tracing::warn!(backup_id = %b.id, owner = %b.owner, "backup interrupted by a placement failover: failed, objects deleted");
            objects.delete_backup(&b.id).await.map_err(obj_err)?;
        }
    }
    // Objects of backups that have neither a manifest nor a record (a crash between the
    // record's deletion and ... or a record deleted by hand), after the grace.
    let grace = skv_objstore::store::ORPHAN_GRACE.as_millis() as u64;
    for (id, has_manifest, modified) in objects.list_backup_dirs().await.map_err(obj_err)? {
        if has_manifest || records.iter().any(|(b, _)| b.id == id) || now.saturating_sub(modified) <= grace {
            continue;
        }
        tracing::warn!(backup_id = %id, "sweeping the objects of an unfinished backup");
        objects.delete_backup(&id).await.map_err(obj_err)?;
    }
    // A restore whose runner is gone.
    let key = s.meta.layout.restore();
    if let Some(kv) = s.meta.store.get(&key).await?
        && let Ok(r) = RestoreInfo::decode(kv.value.as_slice())
        && r.state == RUNNING
        && !s.jobs.lock().contains(RESTORE_JOB)
    {
        let failed = RestoreInfo {
            state: FAILED.into(),
            error: format!(
                "interrupted: its placement leader ({}) is gone; run the same restore again to finish it",
                r.owner
            ),
            owner: String::new(),
            ..r
        };
        let t = Txn::new()
            .when([Compare::value(key.clone(), CmpOp::Equal, kv.value.clone())])
            .and_then([Op::put(key, failed.encode_to_vec())]);
        s.meta.store.txn(t).await?;
    }
    Ok(())
}

/// What the sweep does with a backup record not run by this instance.
#[derive(Debug, PartialEq, Eq)]
enum SweepAction {
    /// Nothing (yet).
    Leave,
    /// The manifest is written: the backup is complete, the record goes.
    DropRecord,
    /// Marked failed, objects deleted.
    Fail,
}

/// The sweep's decision (pure). A running backup of another instance is failed at once
/// (its owner's move to "finishing" is a compare-and-swap, so one of the two wins); a
/// finishing one only once its owner's session is gone (the owner may still be writing
/// the manifest, however long that takes; it ends the record itself), then by its manifest.
fn sweep_decision(state: &str, owner_alive: bool, has_manifest: bool) -> SweepAction {
    match state {
        FINISHING if owner_alive => SweepAction::Leave,
        RUNNING | FINISHING if has_manifest => SweepAction::DropRecord,
        RUNNING | FINISHING => SweepAction::Fail,
        _ => SweepAction::Leave,
    }
}

/// The job name of the restore in [`Shared::jobs`].
const RESTORE_JOB: &str = "\u{0}restore";

async fn read_restore(s: &Shared) -> PlacementResult<Option<(RestoreInfo, Vec<u8>)>> {
    let Some(kv) = s.meta.store.get(&s.meta.layout.restore()).await? else {
        return Ok(None);
    };
    let r = RestoreInfo::decode(kv.value.as_slice())
        .map_err(|e| PlacementError::internal(format!("restore marker does not decode: {e}")))?;
    Ok(Some((r, kv.value)))
}

pub(super) async fn restore_status(
    s: &Arc<Shared>,
    _req: RestoreStatusRequest,
) -> PlacementResult<RestoreStatusResponse> {
    Ok(RestoreStatusResponse {
        restore: read_restore(s).await?.map(|r| r.0),
    })
}

pub(super) async fn restore_backup(
    s: &Arc<Shared>,
    req: RestoreBackupRequest,
) -> PlacementResult<RestoreBackupResponse> {
    check_id(&req.id)?;
    let objects = objects(s)?;
    let manifest = objects
        .read_backup_manifest(&req.id)
        .await
        .map_err(obj_err)?
        .ok_or_else(|| PlacementError::BackupNotFound { id: req.id.clone() })?;
    let key = s.meta.layout.restore();
    let current = read_restore(s).await?;
    let compare = match &current {
        Some((r, _)) if r.backup_id != req.id => {
            return Err(PlacementError::FailedPrecondition {
                reason: format!(
                    "this cluster already holds the restore of backup {} ({}): a cluster takes one restore; restore {} into a fresh cluster",
                    r.backup_id, r.state, req.id
                ),
            });
        }
        Some((r, _)) if r.state == COMPLETE || s.jobs.lock().contains(RESTORE_JOB) => {
            return Ok(RestoreBackupResponse {
                restore: Some(r.clone()),
            });
        }
        // The same backup, interrupted or failed: run it again (ingest is idempotent).
        Some((_, raw)) => Compare::value(key.clone(), CmpOp::Equal, raw.clone()),
        None => {
            check_empty(s).await?;
            Compare::absent(key.clone())
        }
    };
    let info = RestoreInfo {
        backup_id: req.id.clone(),
        state: RUNNING.into(),
        started_unix_ms: wall_ms(),
        ranges: manifest.ranges.len() as u32,
        owner: s.me.name.clone(),
        ..Default::default()
    };
    {
        let mut jobs = s.jobs.lock();
        if !jobs.insert(RESTORE_JOB.to_string()) {
            return Err(PlacementError::Conflict {
                what: "a restore is starting".into(),
            });
        }
    }
    let t = Txn::new()
        .when([compare])
        .and_then([Op::put(key, info.encode_to_vec())]);
    match s.meta.store.txn(t).await {
        Ok(r) if r.succeeded => {}
        Ok(_) => {
            s.jobs.lock().remove(RESTORE_JOB);
            return Err(PlacementError::Conflict {
                what: "the restore marker changed meanwhile; ask again".into(),
            });
        }
        Err(e) => {
            s.jobs.lock().remove(RESTORE_JOB);
            return Err(e.into());
        }
    }
    let span = tracing::info_span!("restore", backup_id = %req.id);
    span.in_scope(|| {
        tracing::info!(
            ranges = manifest.ranges.len(),
            keys = manifest.total_keys,
            "restore started"
        )
    });
    tokio::spawn(run_restore(s.clone(), info.clone(), manifest).instrument(span));
    Ok(RestoreBackupResponse { restore: Some(info) })
}

/// Refuses a cluster that holds any key (live or deleted) in any range.
async fn check_empty(s: &Shared) -> PlacementResult<()> {
    let (ranges, _) = s.meta.all_ranges().await?;
    for r in ranges {
        let range_id = r.range_id();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (desc, leader, address) = s.range_and_leader(range_id).await?;
            let resp = StoreBackupClient::new(s.channel(&address)?)
                .ingest_range(IngestRangeRequest {
                    header: Some(RequestHeader {
                        range_id: desc.range_id,
                        epoch: desc.epoch,
                    }),
                    records: vec![],
                    check_empty: true,
                })
                .await
                .map_err(|e| super::admin::store_call_failed(leader, &address, e))?
                .into_inner();
            match resp.routing_error {
                None if resp.empty => break,
                None => {
                    return Err(PlacementError::FailedPrecondition {
                        reason: format!(
                            "this cluster already holds data (range {range_id}): restore needs a fresh, empty cluster (new data directories, new etcd prefix)"
                        ),
                    });
                }
                Some(re) if attempt < 10 => {
                    let wait = s.absorb_routing_error(&desc, &re).await;
                    tokio::time::sleep(wait).await;
                }
                Some(re) => return Err(super::admin::routing_refusal(range_id, re.message.clone(), Some(&re))),
            }
        }
    }
    Ok(())
}

async fn run_restore(s: Arc<Shared>, info: RestoreInfo, manifest: BackupManifest) {
    let started = Instant::now();
    let running = s
        .backup_metrics
        .running
        .get_or_create(&OpLabel { op: "restore" })
        .clone();
    running.inc();
    let mut info = info;
    let mut marker = info.encode_to_vec();
    let res = match s.objects.clone() {
        Some(objects) => restore_all(&s, &objects, &manifest, &mut info, &mut marker).await,
        None => Err("no object storage".into()),
    };
    running.dec();
    info.finished_unix_ms = wall_ms();
    info.owner = String::new();
    match &res {
        Ok(()) => {
            info.state = COMPLETE.into();
            s.backup_metrics
                .finished("restore", true, started, manifest.total_bytes, manifest.total_keys);
            tracing::info!(
                keys = info.keys,
                bytes = info.bytes,
                ms = started.elapsed().as_millis() as u64,
                "restore complete"
            );
        }
        Err(e) => {
            info.state = FAILED.into();
            info.error = e.clone();
            s.backup_metrics.finished("restore", false, started, 0, 0);
            tracing::warn!(error = %e, "restore failed");
        }
    }
    // The outcome only over this run's own marker: a run fenced off (no longer leader,
    // marker changed) leaves the marker to the sweep or the newer run.
    if let Err(e) = write_marker(&s, &mut marker, &info).await {
        tracing::warn!(error = %e, "the restore marker was not written");
    }
    s.jobs.lock().remove(RESTORE_JOB);
}

/// A spool file of checked records, deleted on drop.
struct Spool {
    path: std::path::PathBuf,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn restore_all(
    s: &Shared,
    objects: &Objects,
    manifest: &BackupManifest,
    info: &mut RestoreInfo,
    marker: &mut Vec<u8>,
) -> Result<(), String> {
    // 1. Every object read and checked completely before anything is ingested.
    let dir = std::env::temp_dir();
    let mut spools: Vec<Spool> = Vec::with_capacity(manifest.ranges.len());
    for r in &manifest.ranges {
        let path = dir.join(format!(
            "skv-restore-{}-{}-{:020}.spool",
            std::process::id(),
            manifest.id,
            r.range_id
        ));
        let spool = Spool { path: path.clone() };
        let file = std::fs::File::create(&path).map_err(|e| format!("spool file {}: {e}", path.display()))?;
        let mut w = BufWriter::new(file);
        objects
            .read_backup_range(r, |block| {
                for e in block {
                    let (kl, vl) = spool_lengths(e.key.len(), e.value.len())?;
                    w.write_all(&kl)
                        .and_then(|_| w.write_all(&e.key))
                        .and_then(|_| w.write_all(&vl))
                        .and_then(|_| w.write_all(&e.value))
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            })
            .await
            .map_err(|e| {
                format!(
                    "backup object {} (range {}) refused: {e}; nothing was restored",
                    r.path, r.range_id
                )
            })?;
        w.flush().map_err(|e| e.to_string())?;
        spools.push(spool);
    }
    tracing::info!(objects = spools.len(), "every backup object checked");
    // 2. Ingest, range object after range object.
    let mut map = RouteMap::load(s).await.map_err(|e| e.to_string())?;
    for (r, spool) in manifest.ranges.iter().zip(&spools) {
        fence(s)?;
        let file = std::fs::File::open(&spool.path).map_err(|e| e.to_string())?;
        let mut rd = BufReader::new(file);
        let mut chunk: Vec<IngestRecord> = Vec::new();
        let mut chunk_bytes = INGEST_COMMAND_OVERHEAD;
        let (mut keys, mut written) = (0u64, 0u64);
        while let Some((key, record)) = next_record(&mut rd)? {
            // A chunk goes to one range: flush when this record would make its encoded
            // command larger than INGEST_CHUNK_BYTES (a chunk is that or one record, which
            // both fit the storenode's bound, one Raft entry) or when the key leaves the
            // range of the chunk's first key.
            let cost = ingest_record_cost(key.len(), record.len());
            if let Some(first) = chunk.first()
                && (chunk_flush(chunk_bytes, cost) || !map.same_range(&first.key, &key))
            {
                fence(s)?;
                written += ingest_chunk(s, &mut map, std::mem::take(&mut chunk)).await?;
                chunk_bytes = INGEST_COMMAND_OVERHEAD;
            }
            chunk_bytes += cost;
            keys += 1;
            chunk.push(IngestRecord { key, record });
        }
        if !chunk.is_empty() {
            fence(s)?;
            written += ingest_chunk(s, &mut map, chunk).await?;
        }
        info.ranges_done += 1;
        info.keys += keys;
        info.bytes += r.size;
        s.backup_metrics.ranges.get_or_create(&OpLabel { op: "restore" }).inc();
        tracing::info!(range_id = r.range_id, keys, written, "range object restored");
        // Progress, only over this run's own marker (a sweep or a newer run stops us).
        write_marker(s, marker, info).await?;
    }
    Ok(())
}

/// Whether a chunk of `chunk_bytes` encoded bytes is sent before a record of `cost` joins
/// it (pure; the chunk is not empty): when the record would take it over the bound.
fn chunk_flush(chunk_bytes: usize, cost: usize) -> bool {
    chunk_bytes.saturating_add(cost) > INGEST_CHUNK_BYTES
}

/// Stops a restore run whose instance stopped leading (a new leader's sweep fails the
/// marker; running the restore again resumes it).
fn fence(s: &Shared) -> Result<(), String> {
    if s.is_leader() {
        Ok(())
    } else {
        Err("this placement instance stopped leading; run the restore again".into())
    }
}

/// Writes the restore marker `info` over `marker` (the value this run last wrote) by
/// compare-and-swap: a run whose marker was changed meanwhile (failed by a new leader's
/// sweep, or taken over by a newer run) stops and writes nothing more.
async fn write_marker(s: &Shared, marker: &mut Vec<u8>, info: &RestoreInfo) -> Result<(), String> {
    let key = s.meta.layout.restore();
    let value = info.encode_to_vec();
    let t = Txn::new()
        .when([Compare::value(key.clone(), CmpOp::Equal, marker.clone())])
        .and_then([Op::put(key, value.clone())]);
    match s.meta.store.txn(t).await {
        Ok(r) if r.succeeded => {
            *marker = value;
            Ok(())
        }
        Ok(_) => Err(MARKER_CHANGED.into()),
        // Unknown outcome: what the marker holds now tells (ours, or still what we had).
        Err(e) => match s.meta.store.get(&s.meta.layout.restore()).await {
            Ok(Some(kv)) if kv.value == value => {
                *marker = value;
                Ok(())
            }
            Ok(Some(kv)) if kv.value == *marker => Err(format!("writing the restore marker: {e}")),
            Ok(_) => Err(MARKER_CHANGED.into()),
            Err(e2) => Err(format!("writing the restore marker: {e}; reading it: {e2}")),
        },
    }
}

const MARKER_CHANGED: &str = "the restore marker changed (a new placement leader took the restore over)";

/// A key and its stored record.
type KeyRecord = (Vec<u8>, Vec<u8>);

/// The spool's length prefixes of a key and a record: a key above the internal key limit
/// or a record too long for its u32 prefix is refused, never truncated (a truncated prefix
/// would misframe every later record).
fn spool_lengths(key: usize, record: usize) -> Result<([u8; 4], [u8; 4]), String> {
    if key == 0 || key > skv_common::limits::MAX_INTERNAL_KEY_LEN {
        return Err(format!(
            "a key of {key} bytes (the limit is {})",
            skv_common::limits::MAX_INTERNAL_KEY_LEN
        ));
    }
    let k = u32::try_from(key).map_err(|_| format!("a key of {key} bytes"))?;
    let r = u32::try_from(record).map_err(|_| format!("a record of {record} bytes"))?;
    Ok((k.to_le_bytes(), r.to_le_bytes()))
}

fn next_record(rd: &mut impl Read) -> Result<Option<KeyRecord>, String> {
    let mut len = [0u8; 4];
    match rd.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let mut key = vec![0u8; u32::from_le_bytes(len) as usize];
    rd.read_exact(&mut key).map_err(|e| e.to_string())?;
    rd.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut value = vec![0u8; u32::from_le_bytes(len) as usize];
    rd.read_exact(&mut value).map_err(|e| e.to_string())?;
    Ok(Some((key, value)))
}

/// The range map as the restore routes by it: descriptors sorted by start, with their
/// leaders' addresses.
struct RouteMap {
    ranges: Vec<(RangeDescriptor, Option<(StoreId, String)>)>,
}

impl RouteMap {
    async fn load(s: &Shared) -> PlacementResult<Self> {
        let (ranges, _) = s.meta.all_ranges().await?;
        let stores = s.meta.stores().await?;
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let leader = r.leader().and_then(|l| {
                stores
                    .iter()
                    .find(|st| st.store_id == l.get())
                    .map(|st| (l, st.address.clone()))
            });
            out.push((r.desc().clone(), leader));
        }
        out.sort_by(|a, b| a.0.start.cmp(&b.0.start));
        Ok(Self { ranges: out })
    }

    fn find(&self, key: &[u8]) -> Option<&(RangeDescriptor, Option<(StoreId, String)>)> {
        self.ranges
            .iter()
            .find(|(d, _)| skv_common::keys::desc_contains(d, key))
    }

    fn same_range(&self, a: &[u8], b: &[u8]) -> bool {
        match (self.find(a), self.find(b)) {
            (Some(x), Some(y)) => x.0.range_id == y.0.range_id,
            _ => false,
        }
    }
}

/// Sends one chunk (keys of one range, as the map says) to its range's leader; on a
/// routing or store error re-reads the map and sends again, split by the new map.
async fn ingest_chunk(s: &Shared, map: &mut RouteMap, chunk: Vec<IngestRecord>) -> Result<u64, String> {
    let mut pending = vec![chunk];
    let mut written = 0u64;
    let mut attempts = 0usize;
    let mut last = String::new();
    while let Some(mut part) = pending.pop() {
        let Some(first) = part.first() else { continue };
        let Some((desc, leader)) = map.find(&first.key).cloned() else {
            last = "the range map does not cover a key yet".into();
            attempts += 1;
            if attempts > INGEST_ATTEMPTS {
                return Err(format!("ingest gave up: {last}"));
            }
            tokio::time::sleep(ROUND_PAUSE).await;
            *map = RouteMap::load(s).await.map_err(|e| e.to_string())?;
            pending.push(part);
            continue;
        };
        // Only the records of this range; the rest goes back to the queue.
        let cut = part
            .iter()
            .position(|r| !skv_common::keys::desc_contains(&desc, &r.key))
            .unwrap_or(part.len());
        let rest = part.split_off(cut);
        if !rest.is_empty() {
            pending.push(rest);
        }
        let outcome: Result<IngestRangeResponse, String> = match &leader {
            None => Err(format!("range {} has no known leader yet", desc.range_id)),
            Some((id, address)) => match s.long_channel(address) {
                Err(e) => Err(e.to_string()),
                Ok(ch) => StoreBackupClient::new(ch)
                    .ingest_range(IngestRangeRequest {
                        header: Some(RequestHeader {
                            range_id: desc.range_id,
                            epoch: desc.epoch,
                        }),
                        records: part.clone(),
                        check_empty: false,
                    })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|st| match st.code() {
                        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                            format!("FATAL store {id}: {}", st.message())
                        }
                        _ => format!("store {id} at {address}: {}", st.message()),
                    }),
            },
        };
        match outcome {
            Ok(resp) if resp.routing_error.is_none() => {
                written += resp.written;
                continue;
            }
            Ok(resp) => {
                if let Some(re) = resp.routing_error {
                    let wait = s.absorb_routing_error(&desc, &re).await;
                    last = re.message;
                    tokio::time::sleep(wait).await;
                }
            }
            Err(e) if e.starts_with("FATAL ") => return Err(e.trim_start_matches("FATAL ").to_string()),
            Err(e) => {
                last = e;
                tokio::time::sleep(ROUND_PAUSE).await;
            }
        }
        attempts += 1;
        if attempts > INGEST_ATTEMPTS {
            return Err(format!("ingest gave up after {INGEST_ATTEMPTS} attempts: {last}"));
        }
        *map = RouteMap::load(s).await.map_err(|e| e.to_string())?;
        pending.push(part);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finishing_backup_is_decided_only_once_its_owner_is_gone() {
        // The owner may still be writing the manifest, however long: left alone.
        assert_eq!(sweep_decision(FINISHING, true, false), SweepAction::Leave);
        // Owner gone: the manifest decides.
        assert_eq!(sweep_decision(FINISHING, false, true), SweepAction::DropRecord);
        assert_eq!(sweep_decision(FINISHING, false, false), SweepAction::Fail);
        // A running backup of another instance cannot finish any more (compare-and-swap).
        assert_eq!(sweep_decision(RUNNING, false, false), SweepAction::Fail);
        assert_eq!(sweep_decision(RUNNING, false, true), SweepAction::DropRecord);
        // Failed records stay for `backup list` until deleted.
        assert_eq!(sweep_decision(FAILED, false, false), SweepAction::Leave);
        assert_eq!(sweep_decision(FAILED, false, true), SweepAction::Leave);
    }

    #[test]
    fn a_restore_chunk_stays_within_the_ingest_bound() {
        let mut chunk = INGEST_COMMAND_OVERHEAD;
        let mut sizes = Vec::new();
        let mut n = 0;
        for i in 0..10_000usize {
            let cost = ingest_record_cost(i % 300 + 1, (i * 7919) % 40_000 + 9);
            if n > 0 && chunk_flush(chunk, cost) {
                sizes.push(chunk);
                chunk = INGEST_COMMAND_OVERHEAD;
                n = 0;
            }
            chunk += cost;
            n += 1;
        }
        assert!(sizes.len() > 10);
        assert!(sizes.iter().all(|&c| c <= INGEST_CHUNK_BYTES), "{sizes:?}");
        // A record alone larger than the bound is a chunk of its own.
        assert!(chunk_flush(INGEST_COMMAND_OVERHEAD + 10, INGEST_CHUNK_BYTES));
        assert!(!chunk_flush(
            INGEST_COMMAND_OVERHEAD,
            INGEST_CHUNK_BYTES - INGEST_COMMAND_OVERHEAD
        ));
    }

    #[test]
    fn backup_ids_name_the_utc_start_and_sort_by_it() {
        // 2026-12-02 09:38:00 UTC.
        assert_eq!(new_backup_id(1_796_204_280_000, 0xab12), "20261202-093800-ab12");
        assert_eq!(new_backup_id(0, 1), "19700101-000000-0001");
        // 2024-02-29 23:59:59 (leap day).
        assert_eq!(new_backup_id(1_709_251_199_000, 0), "20240229-235959-0000");
        assert!(new_backup_id(1_000_000_000_000, 0xffff) < new_backup_id(1_000_000_001_000, 0));
        assert!(valid_backup_id(&new_backup_id(wall_ms(), rand::random())));
    }

    #[test]
    fn backup_series_exist_from_the_start_beside_the_placement_ones() {
        let (_, mut registry) = crate::metrics::Metrics::new_registry();
        BackupMetrics::default().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for want in [
            "skv_placement_is_leader 0",
            "skv_backup_runs_total{op=\"backup\",outcome=\"ok\"} 0",
            "skv_backup_runs_total{op=\"restore\",outcome=\"failed\"} 0",
            "skv_backup_duration_seconds_bucket{le=\"0.1\",op=\"restore\"} 0",
            "skv_backup_running{op=\"backup\"} 0",
            "skv_backup_keys_total{op=\"restore\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn the_spool_format_reads_back_what_was_written() {
        let mut buf = Vec::new();
        for (k, v) in [(&b"a"[..], &b"xyz"[..]), (b"bb", b"")] {
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        let mut r = &buf[..];
        assert_eq!(next_record(&mut r), Ok(Some((b"a".to_vec(), b"xyz".to_vec()))));
        assert_eq!(next_record(&mut r), Ok(Some((b"bb".to_vec(), vec![]))));
        assert_eq!(next_record(&mut r), Ok(None));
        let mut cut = &buf[..3];
        assert_eq!(next_record(&mut cut), Ok(None));
        let mut cut = &buf[..6];
        assert!(next_record(&mut cut).is_err());
    }

    #[test]
    fn spool_lengths_refuse_what_a_u32_prefix_would_truncate() {
        assert_eq!(spool_lengths(3, 9), Ok((3u32.to_le_bytes(), 9u32.to_le_bytes())));
        assert!(spool_lengths(0, 1).is_err(), "an empty key");
        assert!(spool_lengths(skv_common::limits::MAX_INTERNAL_KEY_LEN + 1, 1).is_err());
        let big = usize::try_from(u64::from(u32::MAX) + 1).unwrap();
        assert!(
            spool_lengths(3, big).is_err(),
            "a record past u32::MAX is refused, not wrapped to 0"
        );
    }
}
