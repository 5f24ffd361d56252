//! The consistent read point of an object-store checkpoint (issue 11, `crate::checkpoint`):
//! one fjall snapshot gives the range's applied log id, its descriptor and its data at the
//! same instant, because apply writes all three in one atomic batch (the Raft snapshot
//! build in `state_machine.rs` reads the same way).

use super::{LogId, StoredMembership, decode};
use crate::engine::{Engine, applied_key, desc_key, io_err};
use fjall::Readable;
use prost::Message;
use skv_common::RangeId;
use skv_proto::internal::RangeDescriptor;
use std::io;

/// Mirrors the state machine's applied state (postcard, field order is the format; the
/// test below decodes what `state_machine::encode_applied` writes).
#[derive(serde::Deserialize)]
pub(crate) struct AppliedView {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

/// A range at one applied index, read from one engine snapshot.
pub struct CheckpointPoint {
    pub snap: fjall::Snapshot,
    pub applied_index: u64,
    pub applied_term: u64,
    pub desc: RangeDescriptor,
    /// The applied state as the engine stores it (applied log id and membership): carried in
    /// the checkpoint so a learner bootstrapped from it starts at exactly this state (ADR 0027).
    pub applied_raw: Vec<u8>,
    /// The range's version floor at the same instant (ADR 0034).
    pub floor: u64,
}

/// Takes an engine snapshot and reads `range`'s point in it. `None` when the range has no
/// descriptor or applied state there, or a snapshot install is in progress on it.
pub fn checkpoint_point(engine: &Engine, range: RangeId) -> io::Result<Option<CheckpointPoint>> {
    let snap = engine.db.snapshot();
    let mut installing = b"installing/".to_vec();
    installing.extend_from_slice(&range.0.to_be_bytes());
    if snap.get(&engine.meta, installing).map_err(io_err)?.is_some() {
        return Ok(None);
    }
    let Some(a) = snap.get(&engine.meta, applied_key(range)).map_err(io_err)? else {
        return Ok(None);
    };
    let applied: AppliedView = decode(&a).map_err(io_err)?;
    let Some(last) = applied.last_applied else {
        return Ok(None);
    };
    let Some(d) = snap.get(&engine.meta, desc_key(range)).map_err(io_err)? else {
        return Ok(None);
    };
    let desc = RangeDescriptor::decode(&d[..]).map_err(io_err)?;
    let floor = crate::tombgc::floor_in(engine, &snap, range)?;
    Ok(Some(CheckpointPoint {
        snap,
        applied_index: last.index,
        applied_term: last.leader_id.term,
        desc,
        applied_raw: a.to_vec(),
        floor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_applied_view_decodes_what_the_state_machine_writes() {
        let l = super::super::split_init_log_id();
        let b = super::super::state_machine::encode_applied(Some(l), StoredMembership::default()).unwrap();
        let v: AppliedView = decode(&b).unwrap();
        assert_eq!(v.last_applied, Some(l));
    }
}
