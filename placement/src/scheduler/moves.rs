//! The steps of a replica move (`Operator::MoveReplica`), decided from what placement last
//! saw of the range. Pure: the executor (`server/operators.rs`) re-reads the range (the
//! descriptor the previous step answered, or a newer one from heartbeats and refusals, and
//! the leader the range map names) before every step and asks [`next_move_step`] what to
//! do; a refused step (a stale epoch, a store that is not or no longer the leader, a
//! replica gone) is not fatal: the executor re-reads and decides again, so a step is
//! always sent to the current leader and always carries the current epoch.
//!
//! The order is the one of ADR 0015: the new replica is created and added as a learner,
//! promoted, then, if the replica to remove leads the range, leadership goes to another
//! voter first (a leader never removes itself), and only then the old replica is removed.

use crate::model::{Descriptor, Epoch, Role};
use skv_common::ids::StoreId;

/// What a move does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveStep {
    /// `CreateReplica` on the target (an uninitialized replica the learner's snapshot or
    /// checkpoint fills).
    CreateReplica,
    /// `ChangeReplicas ADD_LEARNER(to)` on `leader`.
    AddLearner { leader: StoreId },
    /// `ChangeReplicas ADD_VOTER(to)` on `leader` (catch up, joint consensus).
    Promote { leader: StoreId },
    /// `TransferLeader` from the replica being removed to `to`.
    TransferLeader { from: StoreId, to: StoreId },
    /// `ChangeReplicas REMOVE(from)` on `leader`, which is not `from`.
    RemoveOld { leader: StoreId },
    /// No usable leader is known (none, or one that is not a voter of the descriptor):
    /// re-read after a pause.
    WaitForLeader,
    /// The target is a voter and the source holds no replica: the move is done.
    Done,
}

impl MoveStep {
    /// The step's name (progress in `ListOperators`, the `step` label of retries).
    pub fn name(&self) -> &'static str {
        match self {
            MoveStep::CreateReplica => "create replica",
            MoveStep::AddLearner { .. } => "add learner",
            MoveStep::Promote { .. } => "promote (catch up, joint consensus)",
            MoveStep::TransferLeader { .. } => "transfer leader",
            MoveStep::RemoveOld { .. } => "remove old replica",
            MoveStep::WaitForLeader => "wait for a leader",
            MoveStep::Done => "done",
        }
    }

    /// Step number out of [`MOVE_STEPS`] (progress).
    pub fn number(&self) -> u32 {
        match self {
            MoveStep::CreateReplica => 1,
            MoveStep::AddLearner { .. } => 2,
            MoveStep::Promote { .. } => 3,
            MoveStep::TransferLeader { .. } | MoveStep::WaitForLeader => 4,
            MoveStep::RemoveOld { .. } | MoveStep::Done => 5,
        }
    }

    /// The `step` label of a retried step (short, bounded).
    pub fn label(&self) -> &'static str {
        match self {
            MoveStep::CreateReplica => "create",
            MoveStep::AddLearner { .. } => "add_learner",
            MoveStep::Promote { .. } => "promote",
            MoveStep::TransferLeader { .. } => "transfer_leader",
            MoveStep::RemoveOld { .. } => "remove",
            MoveStep::WaitForLeader => "wait_leader",
            MoveStep::Done => "done",
        }
    }
}

/// Steps a move shows in its progress.
pub const MOVE_STEPS: u32 = 5;

/// The next step of moving the replica on `from` to `to`, given the newest descriptor
/// placement knows (`desc`), the leader it knows (`leader`), and whether `CreateReplica`
/// on `to` already succeeded during this operator (`created`).
pub fn next_move_step(
    desc: &Descriptor,
    leader: Option<StoreId>,
    from: StoreId,
    to: StoreId,
    created: bool,
) -> MoveStep {
    let role_of = |s: StoreId| desc.replicas.iter().find(|r| r.store == s).map(|r| r.role);
    let (on_to, on_from) = (role_of(to), role_of(from));
    if on_to == Some(Role::Voter) && on_from.is_none() {
        return MoveStep::Done;
    }
    if on_to.is_none() && !created {
        return MoveStep::CreateReplica;
    }
    // Every ChangeReplicas goes to a leader that is a voter of this descriptor; a leader
    // that is not (unknown, stale, or already removed) is no place to send it.
    let Some(leader) = leader.filter(|l| role_of(*l) == Some(Role::Voter)) else {
        return MoveStep::WaitForLeader;
    };
    match on_to {
        None => MoveStep::AddLearner { leader },
        Some(Role::Learner) => MoveStep::Promote { leader },
        Some(Role::Voter) if leader == from => MoveStep::TransferLeader { from, to },
        Some(Role::Voter) => MoveStep::RemoveOld { leader },
    }
}

/// Whether `a` is at least as new as `b` (the executor keeps the newer of the descriptor a
/// step answered and the one in the range map).
pub fn newer_or_same(a: Epoch, b: Epoch) -> bool {
    a == b || skv_common::keys::epoch_newer(&a.into(), &b.into())
}

/// How long to wait before re-reading after the `n`-th (1-based) refusal in a row: 100 ms
/// doubling to 2 s. A heartbeat (1 s) or a refusal's hint usually brings the fresh state
/// within one or two waits.
pub fn retry_delay_ms(n: u32) -> u64 {
    100u64.saturating_mul(1u64 << n.saturating_sub(1).min(5)).min(2000)
}

/// Refusals a move tolerates in a row before it gives up (each one followed by a re-read);
/// any step that goes through resets the count. With [`retry_delay_ms`] that is about 25 s
/// of a range without a usable leader.
pub const MOVE_MAX_REFUSALS: u32 = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Replica;
    use skv_common::ids::RangeId;

    fn s(n: u64) -> StoreId {
        StoreId(n)
    }

    fn desc(conf_ver: u64, replicas: &[(u64, Role)]) -> Descriptor {
        Descriptor {
            id: RangeId(1),
            start: vec![],
            end: vec![],
            epoch: Epoch { conf_ver, version: 1 },
            replicas: replicas
                .iter()
                .map(|(st, role)| Replica {
                    store: s(*st),
                    role: *role,
                })
                .collect(),
        }
    }

    use Role::{Learner, Voter};

    /// The leader's own replica is moved: the steps, each decided from the state the
    /// previous one left, end with the leadership on another voter before the removal.
    #[test]
    fn moving_the_leaders_replica_transfers_leadership_before_the_removal() {
        let (from, to) = (s(1), s(4));
        let d0 = desc(1, &[(1, Voter), (2, Voter), (3, Voter)]);
        assert_eq!(
            next_move_step(&d0, Some(from), from, to, false),
            MoveStep::CreateReplica
        );
        assert_eq!(
            next_move_step(&d0, Some(from), from, to, true),
            MoveStep::AddLearner { leader: from }
        );
        let d1 = desc(2, &[(1, Voter), (2, Voter), (3, Voter), (4, Learner)]);
        assert_eq!(
            next_move_step(&d1, Some(from), from, to, true),
            MoveStep::Promote { leader: from }
        );
        let d2 = desc(3, &[(1, Voter), (2, Voter), (3, Voter), (4, Voter)]);
        assert_eq!(
            next_move_step(&d2, Some(from), from, to, true),
            MoveStep::TransferLeader { from, to }
        );
        // Right after the transfer the new leader is not known yet: wait, do not send the
        // removal to the old leader (it would remove itself) or to nobody.
        assert_eq!(next_move_step(&d2, None, from, to, true), MoveStep::WaitForLeader);
        // The transfer did not take (the old leader still leads): transfer again.
        assert_eq!(
            next_move_step(&d2, Some(from), from, to, true),
            MoveStep::TransferLeader { from, to }
        );
        // Another voter won the election instead of the target: it removes the old one.
        assert_eq!(
            next_move_step(&d2, Some(s(2)), from, to, true),
            MoveStep::RemoveOld { leader: s(2) }
        );
        assert_eq!(
            next_move_step(&d2, Some(to), from, to, true),
            MoveStep::RemoveOld { leader: to }
        );
        let d3 = desc(4, &[(2, Voter), (3, Voter), (4, Voter)]);
        assert_eq!(next_move_step(&d3, Some(to), from, to, true), MoveStep::Done);
        // The removal applied but its answer was lost (the old store already dropped the
        // range: "range not found"): the fresh descriptor says done, whoever leads.
        assert_eq!(next_move_step(&d3, None, from, to, true), MoveStep::Done);
        assert_eq!(next_move_step(&d3, Some(from), from, to, true), MoveStep::Done);
    }

    #[test]
    fn a_follower_replica_is_removed_on_the_leader_without_a_transfer() {
        let (from, to, leader) = (s(2), s(4), s(1));
        let d = desc(3, &[(1, Voter), (2, Voter), (3, Voter), (4, Voter)]);
        assert_eq!(
            next_move_step(&d, Some(leader), from, to, true),
            MoveStep::RemoveOld { leader }
        );
    }

    #[test]
    fn a_leader_that_is_no_voter_of_the_descriptor_is_not_used() {
        let (from, to) = (s(1), s(4));
        // A stale leader (the old store, already removed) and a learner are no leaders.
        let d = desc(4, &[(2, Voter), (3, Voter), (4, Learner)]);
        assert_eq!(next_move_step(&d, Some(from), from, to, true), MoveStep::WaitForLeader);
        assert_eq!(next_move_step(&d, Some(to), from, to, true), MoveStep::WaitForLeader);
        assert_eq!(
            next_move_step(&d, Some(s(2)), from, to, true),
            MoveStep::Promote { leader: s(2) }
        );
        // A store that is no replica at all.
        let d = desc(1, &[(1, Voter), (2, Voter), (3, Voter)]);
        assert_eq!(next_move_step(&d, Some(s(9)), from, to, true), MoveStep::WaitForLeader);
    }

    #[test]
    fn a_learner_lost_meanwhile_is_added_again_without_a_second_create() {
        let (from, to) = (s(1), s(4));
        let d = desc(5, &[(1, Voter), (2, Voter), (3, Voter)]);
        assert_eq!(
            next_move_step(&d, Some(s(2)), from, to, true),
            MoveStep::AddLearner { leader: s(2) }
        );
    }

    #[test]
    fn the_newer_descriptor_wins_and_retries_back_off_to_a_cap() {
        let e = |c, v| Epoch {
            conf_ver: c,
            version: v,
        };
        assert!(newer_or_same(e(2, 1), e(1, 1)));
        assert!(newer_or_same(e(1, 1), e(1, 1)));
        assert!(newer_or_same(e(1, 2), e(1, 1)));
        assert!(!newer_or_same(e(1, 1), e(2, 1)));
        assert!(!newer_or_same(e(1, 1), e(1, 2)));
        let d: Vec<u64> = (1..=8).map(retry_delay_ms).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        let total: u64 = (1..=MOVE_MAX_REFUSALS).map(retry_delay_ms).sum();
        assert!((15_000..=40_000).contains(&total), "{total}");
    }
}
