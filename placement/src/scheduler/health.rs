//! Range health as placement sees it (issue 13): ranges short of replicas and ranges without
//! a known leader, counted each scheduler tick for `skv_placement_ranges_under_replicated`
//! and `skv_placement_ranges_leaderless`. Pure: the caller passes the tick's view.

use super::REPLICAS;
use crate::model::{Range, Role, Store, StoreState};
use skv_common::ids::StoreId;
use std::collections::HashMap;

/// Counts of one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeHealth {
    /// Ranges with fewer voters on live stores (UP or DRAINING) than wanted: [`REPLICAS`],
    /// or every non-removed store when the cluster has fewer (a one-store playground is
    /// fully replicated with one replica).
    pub under_replicated: usize,
    /// Ranges whose last known leader is unknown or on a store that is not live.
    pub leaderless: usize,
}

pub fn range_health(stores: &[Store], ranges: &[Range]) -> RangeHealth {
    let state: HashMap<StoreId, StoreState> = stores.iter().map(|s| (s.id, s.state)).collect();
    let live = |id: StoreId| matches!(state.get(&id), Some(StoreState::Up | StoreState::Draining));
    let members = stores.iter().filter(|s| s.state != StoreState::Removed).count();
    let want = REPLICAS.min(members);
    let mut h = RangeHealth::default();
    for r in ranges {
        let voters = r
            .desc
            .replicas
            .iter()
            .filter(|x| x.role == Role::Voter && live(x.store))
            .count();
        if voters < want {
            h.under_replicated += 1;
        }
        if !r.leader.is_some_and(live) {
            h.leaderless += 1;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Descriptor, Epoch, Replica};
    use skv_common::ids::RangeId;

    fn store(id: u64, state: StoreState) -> Store {
        Store {
            id: StoreId(id),
            address: format!("s{id}"),
            state,
            host_idle_millicpus: None,
        }
    }

    fn range(id: u64, voters: &[u64], learners: &[u64], leader: Option<u64>) -> Range {
        let mut replicas: Vec<Replica> = voters.iter().map(|v| Replica::voter(StoreId(*v))).collect();
        replicas.extend(learners.iter().map(|l| Replica {
            store: StoreId(*l),
            role: Role::Learner,
        }));
        Range {
            desc: Descriptor {
                id: RangeId(id),
                start: Vec::new(),
                end: Vec::new(),
                epoch: Epoch::INITIAL,
                replicas,
            },
            leader: leader.map(StoreId),
        }
    }

    #[test]
    fn counts_ranges_short_of_live_voters_and_without_a_live_leader() {
        let stores = [
            store(1, StoreState::Up),
            store(2, StoreState::Up),
            store(3, StoreState::Down),
            store(4, StoreState::Draining),
            store(5, StoreState::Removed),
        ];
        let ranges = [
            range(1, &[1, 2, 4], &[], Some(1)), // healthy: a draining store still serves
            range(2, &[1, 2, 3], &[], Some(3)), // a voter and the leader on a DOWN store
            range(3, &[1, 2], &[4], Some(2)),   // a learner does not count
            range(4, &[1, 2, 5], &[], None),    // removed store; no leader known
        ];
        assert_eq!(
            range_health(&stores, &ranges),
            RangeHealth {
                under_replicated: 3,
                leaderless: 2,
            }
        );
    }

    #[test]
    fn a_small_cluster_wants_only_as_many_replicas_as_it_has_stores() {
        let one = [store(1, StoreState::Up)];
        assert_eq!(
            range_health(&one, &[range(1, &[1], &[], Some(1))]),
            RangeHealth::default()
        );
        // Its only store down: under-replicated and leaderless.
        let down = [store(1, StoreState::Down)];
        assert_eq!(
            range_health(&down, &[range(1, &[1], &[], Some(1))]),
            RangeHealth {
                under_replicated: 1,
                leaderless: 1,
            }
        );
        assert_eq!(range_health(&[], &[]), RangeHealth::default());
    }
}
