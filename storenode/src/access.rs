//! Which certificate roles may make which storenode call under mTLS (ADR 0022).
//!
//! - `Raft` (`Send`, `SendSnapshot`): other storenodes only. A proxy or placement
//!   certificate that could send Raft messages could forge votes and log entries.
//! - `Store` data calls (`Get`, `Write`, `Scan`, `BatchGet`, `BatchWrite`): proxies only.
//!   Nothing else in skv reads or writes user data through a storenode; the proxy is where
//!   tokens and namespaces are checked, so a direct data call must come from one.
//! - `Store` admin calls (`CreateReplica`, `ChangeReplicas`, `SplitRange`,
//!   `TransferLeader`, `MergeRanges`): placement only (the storenode never decides them
//!   alone, and an operator goes through placement, which checks the admin token).
//! - `ListReplicas` (read-only: what this store holds): placement and admin (diagnostics).
//! - `StoreBackup` (`BackupRange`, `IngestRange`): placement only (backups and restores).
//!
//! A method this table does not know (a newer caller) is refused to every role.

use skv_rpc::tls::PeerRole;

const PROXY: &[PeerRole] = &[PeerRole::Proxy];
const PLACEMENT: &[PeerRole] = &[PeerRole::Placement];
const PLACEMENT_OR_ADMIN: &[PeerRole] = &[PeerRole::Placement, PeerRole::Admin];
const STORENODE: &[PeerRole] = &[PeerRole::Storenode];
const NOBODY: &[PeerRole] = &[];

/// The roles allowed to call a method of `skv.internal.v1.Store`.
pub fn store_callers(method: &str) -> &'static [PeerRole] {
    match method {
        "Get" | "Write" | "Scan" | "BatchGet" | "BatchWrite" => PROXY,
        "CreateReplica" | "ChangeReplicas" | "SplitRange" | "TransferLeader" | "MergeRanges" => PLACEMENT,
        "ListReplicas" => PLACEMENT_OR_ADMIN,
        _ => NOBODY,
    }
}

/// The roles allowed to call a method of `skv.internal.v1.StoreBackup` (ADR 0028):
/// placement only (it runs backups and restores; a restore writes user data, so no other
/// role may).
pub fn backup_callers(method: &str) -> &'static [PeerRole] {
    match method {
        "BackupRange" | "IngestRange" => PLACEMENT,
        _ => NOBODY,
    }
}

/// The roles allowed to call a method of `skv.internal.v1.Raft`.
pub fn raft_callers(method: &str) -> &'static [PeerRole] {
    match method {
        "Send" | "SendSnapshot" => STORENODE,
        _ => NOBODY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_method_has_callers() {
        // The methods of store.proto; a new one must be added to the table.
        for m in [
            "Get",
            "Write",
            "Scan",
            "BatchGet",
            "BatchWrite",
            "CreateReplica",
            "ChangeReplicas",
            "SplitRange",
            "TransferLeader",
            "MergeRanges",
            "ListReplicas",
        ] {
            assert!(!store_callers(m).is_empty(), "{m}");
            assert!(!store_callers(m).contains(&PeerRole::Storenode), "{m}");
        }
        assert!(store_callers("Nope").is_empty());
        assert_eq!(backup_callers("BackupRange"), &[PeerRole::Placement]);
        assert_eq!(backup_callers("IngestRange"), &[PeerRole::Placement]);
        assert!(backup_callers("Get").is_empty());
        assert_eq!(raft_callers("Send"), &[PeerRole::Storenode]);
        assert!(raft_callers("Nope").is_empty());
    }
}
