//! The thin layer over openraft: type config, storage adapters, network, and
//! [`group::RaftGroup`], the crate's own API over one range's group. Everything that names
//! an openraft type lives under this module, so an openraft upgrade touches only here
//! (ADR 0001; `tests/raft_confined.rs` keeps it so).

pub mod bootstrap;
pub mod checkpoint_read;
pub mod group;
pub mod log_store;
pub mod network;
pub mod runtime;
pub mod state_machine;
pub mod watch;

pub use group::{
    ChangeKind, GroupParts, InitError, LeaderView, MembershipStamp, RaftConfig, RaftConfigError, RaftGroup, RaftOpError,
};

use serde::{Deserialize, Serialize};

/// One operation of a write command.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum WriteOp {
    Put(#[serde(with = "serde_bytes")] Vec<u8>),
    Delete,
}

/// One write of a [`Command::Batch`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchOp {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: WriteOp,
    /// Applies only if the key's live version equals this (0 = absent), as `Command::Write`.
    pub condition: Option<u64>,
}

/// The application command replicated by Raft, stored in the Raft log (postcard).
///
/// Byte fields are (de)serialized as bytes (`serde_bytes`), not as a sequence of `u8`:
/// postcard writes both as a varint length and the raw bytes, so the format is the same,
/// but serde's sequence path visits every byte (about 6% of a storenode's CPU under puts).
///
/// On-disk compatibility: postcard encodes an enum as its variant index (a varint) followed
/// by the fields, so the variant index is the format version of a log entry. Variants are
/// append-only: never reorder, remove or change the fields of an existing variant; add a
/// new variant at the end instead (as `Batch` was, after `Write` and `Split`). Entries
/// written by an older node (`Write` = 0, `Split` = 1) therefore apply unchanged after an
/// upgrade. An older node cannot decode a newer variant: every replica of a range must run
/// a version that knows `Batch` before a `BatchWrite` is sent to that range.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Writes one key. `epoch_version` is the range version the proposer checked against;
    /// the apply re-checks the key bounds, so a write racing a split cannot land in the wrong range.
    Write {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        op: WriteOp,
        condition: Option<u64>,
        epoch_version: u64,
    },
    /// Splits the range at `split_key`; the right half becomes `new_range_id`.
    Split {
        #[serde(with = "serde_bytes")]
        split_key: Vec<u8>,
        new_range_id: u64,
        epoch_version: u64,
    },
    /// Several writes to one range, applied in order in ONE atomic engine batch: a later op
    /// sees the earlier ones (two ops on one key behave as if applied one after the other).
    /// Each op's condition is checked on its own. If any key is outside the range at apply
    /// (a split applied after the proposal), nothing is written.
    Batch { ops: Vec<BatchOp>, epoch_version: u64 },
    /// Merge, on the source: freezes this range for a merge into `target_id` (no write
    /// applies after it; version +1). `epoch_*` is the source epoch the proposer checked,
    /// `target_*` the target's, recorded to decide a rollback later (ADR 0016).
    PrepareMerge {
        target_id: u64,
        epoch_version: u64,
        epoch_conf_ver: u64,
        target_version: u64,
        target_conf_ver: u64,
    },
    /// Merge, on the target: absorbs `source` (prost-encoded descriptor as frozen) once the
    /// local source replica applied `frozen_index`; the target's epoch must still be
    /// `epoch_*`.
    CommitMerge {
        #[serde(with = "serde_bytes")]
        source: Vec<u8>,
        frozen_index: u64,
        epoch_version: u64,
        epoch_conf_ver: u64,
    },
    /// Merge, on the source: unfreezes it (version +1) after a merge that cannot commit.
    RollbackMerge { target_id: u64 },
    /// Restore (ADR 0028): writes stored records (version and value, or tombstone) as
    /// given, each unless the key already holds a newer version; every key must be in the
    /// range at apply (else nothing is written). Applied like a batch.
    Ingest { records: Vec<IngestOp>, epoch_version: u64 },
    /// Tombstone GC (ADR 0034): raises the range's version floor to the highest version
    /// named (whatever is removed: the floor is a function of the log alone), and removes
    /// each named tombstone that is still exactly that tombstone (key and version) and
    /// inside the range. Refused on a range frozen by a merge.
    GcTombstones { entries: Vec<GcEntry> },
}

/// One tombstone named by a [`Command::GcTombstones`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub version: u64,
}

/// One record of a [`Command::Ingest`]: the engine's stored record bytes of `key`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IngestOp {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub record: Vec<u8>,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Write { key, .. } => write!(f, "write({} bytes key)", key.len()),
            Command::Split { new_range_id, .. } => write!(f, "split(r{new_range_id})"),
            Command::Batch { ops, .. } => write!(f, "batch({} ops)", ops.len()),
            Command::PrepareMerge { target_id, .. } => write!(f, "prepare_merge(into r{target_id})"),
            Command::CommitMerge { frozen_index, .. } => write!(f, "commit_merge(frozen at {frozen_index})"),
            Command::RollbackMerge { target_id } => write!(f, "rollback_merge(r{target_id})"),
            Command::Ingest { records, .. } => write!(f, "ingest({} records)", records.len()),
            Command::GcTombstones { entries, .. } => write!(f, "gc_tombstones({} keys)", entries.len()),
        }
    }
}

/// The result of applying a command.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum CmdResponse {
    #[default]
    None,
    Write {
        succeeded: bool,
        version: u64,
        existed: bool,
    },
    /// Split applied: prost-encoded left and right descriptors.
    Split { left: Vec<u8>, right: Vec<u8> },
    /// The key is outside the range (it moved in a split): prost-encoded current descriptor.
    KeyNotInRange(Vec<u8>),
    /// The proposal's epoch version is stale: prost-encoded current descriptor.
    EpochNotMatch(Vec<u8>),
    /// The command was refused (bad split key etc.).
    Rejected(String),
    /// A batch applied: one outcome per op, in order.
    Batch(Vec<WriteOutcome>),
    /// PrepareMerge applied: the frozen source descriptor and the entry's log index.
    Frozen { desc: Vec<u8>, index: u64 },
    /// CommitMerge applied: the widened target descriptor.
    Merged(Vec<u8>),
    /// Ingest applied: records written and records skipped (the key held a newer version).
    Ingested { written: u64, skipped: u64 },
    /// GcTombstones applied: tombstones removed and the range's version floor after it.
    Collected { removed: u64, floor: u64 },
}

/// The outcome of one write, as `StoreWriteResponse`'s fields of the same names.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct WriteOutcome {
    pub succeeded: bool,
    pub version: u64,
    pub existed: bool,
}

openraft::declare_raft_types!(
    /// openraft type configuration for skv range groups. NodeId = store id.
    pub TypeConfig:
        D = Command,
        R = CmdResponse,
        NodeId = u64,
        Node = openraft::EmptyNode,
        AsyncRuntime = runtime::SkvRuntime,
);

pub type Raft = openraft::Raft<TypeConfig, state_machine::StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type Membership = openraft::Membership<u64, openraft::EmptyNode>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Raft timing tuned for a LAN (see [`RaftConfig::new`]).
pub fn raft_config(snapshot_logs: u64) -> Result<RaftConfig, RaftConfigError> {
    RaftConfig::new(snapshot_logs)
}

/// The seeded log id of a group born from a split (as TiKV's RAFT_INIT_LOG_INDEX).
pub const SPLIT_INIT_TERM: u64 = 5;
pub const SPLIT_INIT_INDEX: u64 = 5;

pub fn split_init_log_id() -> LogId {
    openraft::LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term: SPLIT_INIT_TERM,
            node_id: 0,
        },
        SPLIT_INIT_INDEX,
    )
}

pub fn split_init_vote() -> Vote {
    let mut v = openraft::Vote::new(SPLIT_INIT_TERM, 0);
    v.committed = true;
    v
}

/// Encodes an openraft message for the wire.
pub fn encode<T: Serialize>(t: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(t)
}

/// Decodes an openraft message from the wire; never panics on garbage.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_with_postcard() {
        let c = Command::Write {
            key: b"k".to_vec(),
            op: WriteOp::Put(vec![1, 2, 3]),
            condition: Some(4),
            epoch_version: 2,
        };
        let b = encode(&c).unwrap();
        assert_eq!(decode::<Command>(&b).unwrap(), c);
        assert!(decode::<Command>(&[0xff, 0xff, 0xff]).is_err());
        let v = split_init_vote();
        let back: Vote = decode(&encode(&v).unwrap()).unwrap();
        assert_eq!(back, v);
        let l = split_init_log_id();
        let back: LogId = decode(&encode(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }

    /// Log entries written before `Batch` existed must decode unchanged (the variant index
    /// is the format version). These bytes are what an older node wrote.
    #[test]
    fn old_log_commands_still_decode_and_batch_is_a_new_variant() {
        let old_write = [0u8, 1, b'k', 0, 3, 1, 2, 3, 1, 4, 2];
        assert_eq!(
            decode::<Command>(&old_write).unwrap(),
            Command::Write {
                key: b"k".to_vec(),
                op: WriteOp::Put(vec![1, 2, 3]),
                condition: Some(4),
                epoch_version: 2,
            }
        );
        // And new nodes write the same bytes (byte fields go through serde_bytes).
        let again = Command::Write {
            key: b"k".to_vec(),
            op: WriteOp::Put(vec![1, 2, 3]),
            condition: Some(4),
            epoch_version: 2,
        };
        assert_eq!(encode(&again).unwrap(), old_write);
        let old_delete = [0u8, 1, b'k', 1, 0, 7];
        assert_eq!(
            decode::<Command>(&old_delete).unwrap(),
            Command::Write {
                key: b"k".to_vec(),
                op: WriteOp::Delete,
                condition: None,
                epoch_version: 7,
            }
        );
        let old_split = [1u8, 1, b'm', 2, 1];
        let split = Command::Split {
            split_key: b"m".to_vec(),
            new_range_id: 2,
            epoch_version: 1,
        };
        assert_eq!(encode(&split).unwrap(), old_split);
        assert_eq!(
            decode::<Command>(&old_split).unwrap(),
            Command::Split {
                split_key: b"m".to_vec(),
                new_range_id: 2,
                epoch_version: 1,
            }
        );
        let b = Command::Batch {
            ops: vec![
                BatchOp {
                    key: b"a".to_vec(),
                    op: WriteOp::Put(b"1".to_vec()),
                    condition: Some(0),
                },
                BatchOp {
                    key: b"a".to_vec(),
                    op: WriteOp::Delete,
                    condition: None,
                },
            ],
            epoch_version: 3,
        };
        let bytes = encode(&b).unwrap();
        assert_eq!(bytes[0], 2, "Batch is variant 2, after Write and Split");
        assert_eq!(decode::<Command>(&bytes).unwrap(), b);
        // The merge commands follow, in this order (append-only).
        let merge_cmds = [
            Command::PrepareMerge {
                target_id: 1,
                epoch_version: 2,
                epoch_conf_ver: 3,
                target_version: 4,
                target_conf_ver: 5,
            },
            Command::CommitMerge {
                source: vec![1, 2],
                frozen_index: 9,
                epoch_version: 2,
                epoch_conf_ver: 3,
            },
            Command::RollbackMerge { target_id: 1 },
        ];
        for (i, c) in merge_cmds.into_iter().enumerate() {
            let bytes = encode(&c).unwrap();
            assert_eq!(bytes[0] as usize, 3 + i, "{c}");
            assert_eq!(decode::<Command>(&bytes).unwrap(), c);
        }
    }

    #[test]
    fn config_is_valid() {
        assert!(raft_config(10).is_ok());
        assert!(raft_config(0).is_ok());
    }
}
