//! Backup and restore (issue 11, ADR 0028).

use super::Shared;
use crate::error::{PlacementError, PlacementResult};
use skv_proto::internal::*;

pub(super) async fn create_backup(_s: &Shared, _req: CreateBackupRequest) -> PlacementResult<CreateBackupResponse> {
    Err(PlacementError::Unimplemented { what: "backup" })
}
pub(super) async fn list_backups(_s: &Shared, _req: ListBackupsRequest) -> PlacementResult<ListBackupsResponse> {
    Err(PlacementError::Unimplemented { what: "backup" })
}
pub(super) async fn delete_backup(_s: &Shared, _req: DeleteBackupRequest) -> PlacementResult<DeleteBackupResponse> {
    Err(PlacementError::Unimplemented { what: "backup" })
}
pub(super) async fn restore_backup(_s: &Shared, _req: RestoreBackupRequest) -> PlacementResult<RestoreBackupResponse> {
    Err(PlacementError::Unimplemented { what: "backup" })
}
pub(super) async fn restore_status(_s: &Shared, _req: RestoreStatusRequest) -> PlacementResult<RestoreStatusResponse> {
    Err(PlacementError::Unimplemented { what: "backup" })
}
