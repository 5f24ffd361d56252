//! Placement's domain types: what the decision code ([`crate::scheduler`]) works on.
//! Protobuf messages are converted into these once, where they enter (stored records,
//! heartbeats), and back where they leave (gRPC calls, stored records), so decisions never
//! compare raw `u64`s or `role == ReplicaRole::Voter as i32`.

use crate::error::PlacementError;
use skv_common::ids::{RangeId, StoreId};
use skv_proto::internal as pb;

/// A store id on the wire, where 0 means "none" (e.g. an unknown leader).
pub fn store_opt(raw: u64) -> Option<StoreId> {
    (raw != 0).then_some(StoreId(raw))
}

/// The wire form of an optional store id (0 = none).
pub fn store_raw(id: Option<StoreId>) -> u64 {
    id.map_or(0, StoreId::get)
}

/// `{conf_ver, version}` of a range; ordered as the epoch rules need it
/// ([`skv_common::keys::epoch_newer`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Epoch {
    pub conf_ver: u64,
    pub version: u64,
}

impl Epoch {
    /// The epoch every range starts with (bootstrap, initial placement).
    pub const INITIAL: Epoch = Epoch {
        conf_ver: 1,
        version: 1,
    };
}

impl From<pb::RangeEpoch> for Epoch {
    fn from(e: pb::RangeEpoch) -> Self {
        Epoch {
            conf_ver: e.conf_ver,
            version: e.version,
        }
    }
}

impl From<Epoch> for pb::RangeEpoch {
    fn from(e: Epoch) -> Self {
        pb::RangeEpoch {
            conf_ver: e.conf_ver,
            version: e.version,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Voter,
    Learner,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub store: StoreId,
    pub role: Role,
}

impl Replica {
    pub fn voter(store: StoreId) -> Self {
        Replica {
            store,
            role: Role::Voter,
        }
    }
}

/// A range's descriptor: `[start, end)` (empty end = +infinity), epoch and replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub id: RangeId,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub epoch: Epoch,
    pub replicas: Vec<Replica>,
}

impl Descriptor {
    pub fn voters(&self) -> usize {
        self.replicas.iter().filter(|r| r.role == Role::Voter).count()
    }

    pub fn has_replica_on(&self, store: StoreId) -> bool {
        self.replicas.iter().any(|r| r.store == store)
    }

    pub fn to_proto(&self) -> pb::RangeDescriptor {
        pb::RangeDescriptor {
            range_id: self.id.get(),
            start: self.start.clone(),
            end: self.end.clone(),
            epoch: Some(self.epoch.into()),
            replicas: self
                .replicas
                .iter()
                .map(|r| pb::Replica {
                    store_id: r.store.get(),
                    role: match r.role {
                        Role::Voter => pb::ReplicaRole::Voter,
                        Role::Learner => pb::ReplicaRole::Learner,
                    } as i32,
                })
                .collect(),
        }
    }
}

impl TryFrom<&pb::RangeDescriptor> for Descriptor {
    type Error = PlacementError;

    fn try_from(d: &pb::RangeDescriptor) -> Result<Self, PlacementError> {
        let epoch = d
            .epoch
            .ok_or_else(|| PlacementError::invalid(format!("range {} has no epoch", d.range_id)))?;
        let replicas = d
            .replicas
            .iter()
            .map(|r| {
                let role = match pb::ReplicaRole::try_from(r.role) {
                    Ok(pb::ReplicaRole::Voter) => Role::Voter,
                    Ok(pb::ReplicaRole::Learner) => Role::Learner,
                    Err(_) => {
                        return Err(PlacementError::invalid(format!(
                            "range {}: unknown replica role {}",
                            d.range_id, r.role
                        )));
                    }
                };
                Ok(Replica {
                    store: StoreId(r.store_id),
                    role,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Descriptor {
            id: RangeId(d.range_id),
            start: d.start.clone(),
            end: d.end.clone(),
            epoch: epoch.into(),
            replicas,
        })
    }
}

/// A range as the range map knows it: descriptor and last known leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub desc: Descriptor,
    pub leader: Option<StoreId>,
}

impl TryFrom<&pb::RangeInfo> for Range {
    type Error = PlacementError;

    fn try_from(r: &pb::RangeInfo) -> Result<Self, PlacementError> {
        let d = r
            .descriptor
            .as_ref()
            .ok_or_else(|| PlacementError::invalid("range record without descriptor"))?;
        Ok(Range {
            desc: d.try_into()?,
            leader: store_opt(r.leader_store_id),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreState {
    Up,
    Down,
    Draining,
    Removed,
}

impl From<pb::StoreState> for StoreState {
    fn from(s: pb::StoreState) -> Self {
        match s {
            pb::StoreState::Up => StoreState::Up,
            pb::StoreState::Down => StoreState::Down,
            pb::StoreState::Draining => StoreState::Draining,
            pb::StoreState::Removed => StoreState::Removed,
        }
    }
}

/// A store as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    pub id: StoreId,
    pub address: String,
    /// The effective state (liveness already applied, see [`is_down`]).
    pub state: StoreState,
    /// Idle CPU of the store's machine, thousandths of a core (a ~10 s mean, as last
    /// reported); `None` when the store does not measure it.
    pub host_idle_millicpus: Option<u64>,
}

impl TryFrom<&pb::StoreInfo> for Store {
    type Error = PlacementError;

    fn try_from(s: &pb::StoreInfo) -> Result<Self, PlacementError> {
        let state = pb::StoreState::try_from(s.state)
            .map_err(|_| PlacementError::invalid(format!("store {}: unknown state {}", s.store_id, s.state)))?;
        Ok(Store {
            id: StoreId(s.store_id),
            address: s.address.clone(),
            state: state.into(),
            host_idle_millicpus: s.host_idle_millicpus,
        })
    }
}

/// Store liveness: an UP store silent for longer than `down_after_ms` is DOWN.
pub fn is_down(last_heartbeat_ms: u64, now_ms: u64, down_after_ms: u64) -> bool {
    now_ms.saturating_sub(last_heartbeat_ms) > down_after_ms
}

/// A store record with its effective state: UP turns DOWN after `down_after_ms` of silence.
pub fn effective(mut s: pb::StoreInfo, now_ms: u64, down_after_ms: u64) -> pb::StoreInfo {
    if s.state() == pb::StoreState::Up && is_down(s.last_heartbeat_ms, now_ms, down_after_ms) {
        s.set_state(pb::StoreState::Down);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_and_bad_input_is_an_error() {
        let p = pb::RangeDescriptor {
            range_id: 7,
            start: b"a".to_vec(),
            end: vec![],
            epoch: Some(pb::RangeEpoch {
                conf_ver: 2,
                version: 3,
            }),
            replicas: vec![
                pb::Replica {
                    store_id: 1,
                    role: pb::ReplicaRole::Voter as i32,
                },
                pb::Replica {
                    store_id: 2,
                    role: pb::ReplicaRole::Learner as i32,
                },
            ],
        };
        let d = Descriptor::try_from(&p).unwrap();
        assert_eq!(d.id, RangeId(7));
        assert_eq!(
            d.epoch,
            Epoch {
                conf_ver: 2,
                version: 3
            }
        );
        assert_eq!(d.voters(), 1);
        assert!(d.has_replica_on(StoreId(2)) && !d.has_replica_on(StoreId(3)));
        assert_eq!(d.to_proto(), p);
        let mut no_epoch = p.clone();
        no_epoch.epoch = None;
        assert!(Descriptor::try_from(&no_epoch).is_err());
        let mut bad_role = p;
        bad_role.replicas[0].role = 9;
        assert!(Descriptor::try_from(&bad_role).is_err());
        assert!(Range::try_from(&pb::RangeInfo::default()).is_err());
        assert!(
            Store::try_from(&pb::StoreInfo {
                state: 42,
                ..Default::default()
            })
            .is_err()
        );
        assert_eq!((store_opt(0), store_opt(4)), (None, Some(StoreId(4))));
        assert_eq!((store_raw(None), store_raw(Some(StoreId(4)))), (0, 4));
    }

    #[test]
    fn liveness() {
        // (last heartbeat, now, down after, down?)
        for (last, now, after, down) in [
            (1000, 1000, 30, false),
            (1000, 1030, 30, false),
            (1000, 1031, 30, true),
            (2000, 1000, 30, false), // a clock step back is not silence
        ] {
            assert_eq!(is_down(last, now, after), down, "{last} {now} {after}");
        }
        let up = pb::StoreInfo {
            last_heartbeat_ms: 1000,
            ..Default::default()
        };
        assert_eq!(effective(up.clone(), 2000, 500).state(), pb::StoreState::Down);
        assert_eq!(effective(up, 1200, 500).state(), pb::StoreState::Up);
        let draining = pb::StoreInfo {
            state: pb::StoreState::Draining as i32,
            ..Default::default()
        };
        assert_eq!(effective(draining, 99_999, 1).state(), pb::StoreState::Draining);
    }
}
