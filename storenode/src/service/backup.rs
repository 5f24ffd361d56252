//! The `StoreBackup` service (issue 11, ADR 0028): backup of one range into object storage,
//! and ingest of a backup's records during a restore. Placement calls both, on the range
//! leader; under mTLS only placement may (`access::backup_callers`).
//!
//! - `BackupRange`: a ReadIndex barrier on the leader (every write committed before the
//!   call is then applied here), then a checkpoint read from one engine snapshot (applied
//!   index, descriptor and data at one point, `raft::checkpoint_read`) whose applied index
//!   is at least the barrier's, uploaded to `backups/<id>/ranges/...` (checkpoint retention
//!   never touches that prefix).
//! - `IngestRange`: one Raft command (`Command::Ingest`) writing the records as given, each
//!   unless the key holds a newer version ([`ingest_wins`]), so a restore run twice ends
//!   the same.

use super::{Fail, StoreError, StoreService, respond};
use crate::raft::checkpoint_read::checkpoint_point;
use crate::raft::{CmdResponse, Command, IngestOp};
use fjall::Readable;
use prost::Message;
use skv_common::keys::desc_contains;
use skv_common::limits;
use skv_objstore::backup::{backup_range_path, valid_backup_id};
use skv_objstore::{CheckpointHeader, Objects};
use skv_proto::internal::store_backup_server::StoreBackup;
use skv_proto::internal::*;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

/// Whether an ingested record of `incoming` version replaces what the key holds (pure):
/// always when the key is absent; otherwise unless the key already holds a newer version
/// (a write made after the restore began). An equal version is the same record again.
pub fn ingest_wins(current: Option<u64>, incoming: u64) -> bool {
    current.is_none_or(|c| c <= incoming)
}

/// Encoded size of `Command::Ingest` with these (key, record) lengths, an upper bound (pure).
pub fn ingest_encoded_len(records: impl IntoIterator<Item = (usize, usize)>) -> usize {
    records.into_iter().fold(limits::INGEST_COMMAND_OVERHEAD, |n, (k, r)| {
        n.saturating_add(limits::ingest_record_cost(k, r))
    })
}

/// Whether an ingest of `encoded` bytes ([`ingest_encoded_len`]) fits one Raft entry (pure):
/// at most what any Store request may be ([`limits::max_store_message`] of
/// --max-value-len), the bound the Raft transport's message limit is made of.
pub fn ingest_size_ok(encoded: usize, max_value_len: usize) -> bool {
    encoded <= limits::max_store_message(max_value_len)
}

/// Largest IngestRange request (placement sends chunks of [`limits::INGEST_CHUNK_BYTES`]).
pub const MAX_INGEST_MESSAGE: usize = 16 << 20;

/// The `StoreBackup` gRPC service: the store's handlers plus its object storage.
#[derive(Clone)]
pub struct BackupService {
    pub store: StoreService,
    /// `--object-store-url`; without it BackupRange is refused.
    pub objects: Option<Objects>,
}

impl BackupService {
    async fn backup_range(&self, req: BackupRangeRequest) -> Result<BackupRangeResponse, Fail> {
        let objects = self.objects.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this storenode has no --object-store-url: backups need object storage on every storenode",
            )
        })?;
        if !valid_backup_id(&req.backup_id) {
            return Err(Status::invalid_argument("backup_id must be 1 to 64 of [A-Za-z0-9_-]").into());
        }
        let header = req
            .header
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("missing header"))?;
        let want_version = header.epoch.unwrap_or_default().version;
        let expected = backup_range_path(&req.backup_id, header.range_id, want_version);
        if req.path != expected {
            return Err(Status::invalid_argument(format!("path must be {expected}")).into());
        }
        let (r, _) = self.store.route(Some(header))?;
        let range = r.shared.range_id;
        if !r.is_leader() {
            return Err(self.store.not_leader(range, r.leader_view().leader).into());
        }
        // The barrier: once it returns, everything committed before the call is applied.
        self.store.read_index(&r).await?;
        let barrier = r.shared.applied_index.load(Ordering::Acquire);
        let term = r.leader_view().term;
        let engine = self.store.node.engine.clone();
        let point = tokio::task::spawn_blocking(move || checkpoint_point(&engine, range))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("reading range {range}: {e}")))?
            .ok_or_else(|| Status::unavailable(format!("range {range} is being installed; retry")))?;
        let epoch = point.desc.epoch.unwrap_or_default();
        if epoch.version != want_version {
            // A split or merge applied after the barrier: the caller re-reads the map.
            return Err(StoreError::EpochNotMatch {
                current: self.store.node.current_descriptors(&point.desc, want_version),
            }
            .into());
        }
        if point.applied_index < barrier {
            return Err(Status::internal(format!(
                "range {range}: snapshot at index {} below the barrier {barrier}",
                point.applied_index
            ))
            .into());
        }
        let created = skv_objstore::store::now_ms();
        let hdr = CheckpointHeader {
            range_id: range.0,
            generation: term,
            conf_ver: epoch.conf_ver,
            epoch_version: epoch.version,
            applied_index: point.applied_index,
            applied_term: point.applied_term,
            created_unix_ms: created,
            start: point.desc.start.clone(),
            end: point.desc.end.clone(),
            descriptor: point.desc.encode_to_vec(),
        };
        let engine = self.store.node.engine.clone();
        let (start, end) = (point.desc.start.clone(), point.desc.end.clone());
        let snap = point.snap;
        let entry = objects
            .upload_backup_range(&expected, hdr, move |sink| {
                for g in snap.range::<&[u8], _>(&engine.data, crate::engine::data_range(&start, &end)) {
                    let (k, v) = g.into_inner().map_err(|e| e.to_string())?;
                    sink.push(&k, &v)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| Status::unavailable(format!("backup upload of range {range}: {e}")))?;
        tracing::info!(
            backup_id = %req.backup_id,
            barrier,
            index = entry.applied_index,
            bytes = entry.size,
            keys = entry.key_count,
            "range backed up"
        );
        Ok(BackupRangeResponse {
            routing_error: None,
            descriptor: Some(point.desc),
            barrier_index: barrier,
            applied_index: entry.applied_index,
            applied_term: entry.applied_term,
            path: entry.path,
            size: entry.size,
            key_count: entry.key_count,
            checksum: entry.checksum,
            generation: entry.generation,
            created_unix_ms: created,
        })
    }

    async fn ingest_range(&self, req: IngestRangeRequest) -> Result<IngestRangeResponse, Fail> {
        let (r, desc) = self.store.route(req.header.as_ref())?;
        let range = r.shared.range_id;
        if req.check_empty {
            if !r.is_leader() {
                return Err(self.store.not_leader(range, r.leader_view().leader).into());
            }
            self.store.read_index(&r).await?;
            let engine = self.store.node.engine.clone();
            let d = r.shared.desc();
            // A range that collected tombstones (version floor above 0, ADR 0034) held data:
            // not a fresh range to restore into, even if every key is gone now.
            let collected = r.shared.version_floor.load(std::sync::atomic::Ordering::Acquire) > 0;
            let empty = !collected
                && tokio::task::spawn_blocking(move || {
                    let snap = engine.db.snapshot();
                    snap.range::<&[u8], _>(&engine.data, crate::engine::data_range(&d.start, &d.end))
                        .next()
                        .is_none()
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            return Ok(IngestRangeResponse {
                empty,
                ..Default::default()
            });
        }
        if req.records.is_empty() {
            return Err(Status::invalid_argument("no records").into());
        }
        let encoded = ingest_encoded_len(req.records.iter().map(|r| (r.key.len(), r.record.len())));
        if !ingest_size_ok(encoded, self.store.max_value_len) {
            return Err(Status::invalid_argument(format!(
                "{} records of {encoded} encoded bytes: one ingest is at most {} bytes (one Raft entry)",
                req.records.len(),
                limits::max_store_message(self.store.max_value_len)
            ))
            .into());
        }
        let mut records = Vec::with_capacity(req.records.len());
        for rec in req.records {
            if rec.record.len() > self.store.max_value_len + 8 {
                return Err(Status::invalid_argument(format!(
                    "a record of {} bytes is over --max-value-len {}",
                    rec.record.len(),
                    self.store.max_value_len
                ))
                .into());
            }
            limits::check_internal_key(&rec.key)?;
            let Some(decoded) = crate::engine::decode_record(&rec.record) else {
                return Err(Status::invalid_argument(
                    "a record is not a stored record (version ++ value, or a tombstone)",
                )
                .into());
            };
            limits::check_record_version(decoded.version())?;
            if !desc_contains(&desc, &rec.key) {
                return Err(StoreError::KeyNotInRange { key: rec.key, desc }.into());
            }
            records.push(IngestOp {
                key: rec.key,
                record: rec.record,
            });
        }
        let n = records.len();
        let resp = self
            .store
            .propose(
                &r,
                Command::Ingest {
                    records,
                    epoch_version: desc.epoch.unwrap_or_default().version,
                },
            )
            .await?;
        match self.store.decode_resp(resp)? {
            CmdResponse::Ingested { written, skipped } => {
                tracing::debug!(records = n, written, skipped, "ingested");
                Ok(IngestRangeResponse {
                    routing_error: None,
                    written,
                    skipped,
                    empty: false,
                })
            }
            other => Err(Status::internal(format!("unexpected ingest result {other:?}")).into()),
        }
    }
}

#[tonic::async_trait]
impl StoreBackup for BackupService {
    async fn backup_range(
        &self,
        request: Request<BackupRangeRequest>,
    ) -> Result<Response<BackupRangeResponse>, Status> {
        let req = request.into_inner();
        let span = self.store.span("BackupRange", req.header.as_ref());
        let r = self.store.run("BackupRange", span, self.backup_range(req)).await;
        respond(r, |t, e| t.routing_error = Some(e))
    }

    async fn ingest_range(
        &self,
        request: Request<IngestRangeRequest>,
    ) -> Result<Response<IngestRangeResponse>, Status> {
        let req = request.into_inner();
        let span = self.store.span("IngestRange", req.header.as_ref());
        let r = self.store.run("IngestRange", span, self.ingest_range(req)).await;
        respond(r, |t, e| t.routing_error = Some(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ingest_fits_one_raft_entry() {
        let mib = 1 << 20;
        let cap = limits::max_store_message(mib);
        assert!(ingest_size_ok(cap, mib));
        assert!(!ingest_size_ok(cap + 1, mib));
        // Many small records: the per-record encoding overhead counts.
        let small = vec![(10usize, 20usize); cap / 30];
        assert!(ingest_encoded_len(small.iter().copied()) > cap);
        assert!(!ingest_size_ok(ingest_encoded_len(small.iter().copied()), mib));
        // One maximal record of any --max-value-len fits.
        for max in [1024, mib, 8 * mib] {
            let one = ingest_encoded_len([(limits::MAX_INTERNAL_KEY_LEN, max + 8)]);
            assert!(ingest_size_ok(one, max), "{max}");
        }
    }

    #[test]
    fn the_ingest_bound_is_at_least_the_encoded_command() {
        let records: Vec<IngestOp> = (0..300usize)
            .map(|i| IngestOp {
                key: vec![b'k'; i % 200 + 1],
                record: vec![7; (i * 37) % 70_000 + 9],
            })
            .collect();
        let bound = ingest_encoded_len(records.iter().map(|r| (r.key.len(), r.record.len())));
        let cmd = Command::Ingest {
            records,
            epoch_version: u64::MAX,
        };
        let Ok(bytes) = crate::raft::encode(&cmd) else {
            panic!("encoding failed");
        };
        assert!(bytes.len() <= bound, "{} > {bound}", bytes.len());
        assert!(bound - bytes.len() < 300 * 10 + 16);
    }

    #[test]
    fn an_ingested_record_never_replaces_a_newer_version() {
        assert!(ingest_wins(None, 1));
        assert!(ingest_wins(Some(3), 3), "the same record again");
        assert!(ingest_wins(Some(2), 3));
        assert!(!ingest_wins(Some(4), 3), "written after the restore began");
    }
}
