//! Hibernation of idle ranges (ADR 0018): the pure decisions.
//!
//! A replica is `Awake` (Raft timers on), `Polling` (a leader asking its followers to sleep),
//! `Hibernating` (tick off: no election timer, no periodic heartbeat) or `Waking` (a follower
//! with its tick on but its election timer off until it heard from the leader, or a grace
//! passed). Only the leader decides to sleep ([`decide`]), with the consent of every live
//! follower ([`follower_accepts`], [`sleep_verdict`]); anything that may need the range wakes
//! it ([`Hibernation::wake`], [`message_wake`], [`StoreStates`]).
//!
//! No openraft type appears here: `raft/group.rs` copies the facts out of the Raft metrics and
//! applies the returned [`Timers`] through openraft's runtime config.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Why a range woke up (the `reason` label of `skv_storenode_range_wakes_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WakeReason {
    /// A client request routed to this replica.
    Request,
    /// A proposal on the leader.
    Write,
    /// A ReadIndex on the leader.
    Read,
    /// A membership change, leader transfer, split or merge.
    Admin,
    /// A Raft message that needs the timers (entries, a new leader, an election, a snapshot).
    RaftMessage,
    /// A follower's `WakeUp`.
    PeerWakeup,
    /// Placement reported the leader's store DOWN.
    StoreDown,
    /// Placement reported a store that was left behind (lagging) UP again.
    StoreUp,
    /// The replica (re)started.
    Start,
}

impl WakeReason {
    pub fn label(self) -> &'static str {
        match self {
            WakeReason::Request => "request",
            WakeReason::Write => "write",
            WakeReason::Read => "read",
            WakeReason::Admin => "admin",
            WakeReason::RaftMessage => "raft_message",
            WakeReason::PeerWakeup => "peer_wakeup",
            WakeReason::StoreDown => "store_down",
            WakeReason::StoreUp => "store_up",
            WakeReason::Start => "start",
        }
    }
}

/// The openraft timer switches a state wants (applied idempotently by group.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    pub tick: bool,
    pub heartbeat: bool,
    pub elect: bool,
}

impl Timers {
    pub const AWAKE: Timers = Timers {
        tick: true,
        heartbeat: true,
        elect: true,
    };
    /// Tick on (so a message from the leader is noticed), but no election before that.
    pub const WAKING: Timers = Timers {
        tick: true,
        heartbeat: true,
        elect: false,
    };
    pub const ASLEEP: Timers = Timers {
        tick: false,
        heartbeat: false,
        elect: true,
    };
}

/// A replica's hibernation state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Awake,
    /// A leader waiting for the answers of poll `round`.
    Polling {
        round: u64,
    },
    /// Timers off. On a leader, `lagging` are the voters (on DOWN stores) that did not ack.
    Hibernating {
        lagging: BTreeSet<u64>,
    },
    /// A follower whose election timer stays off until it hears from the leader or `since`
    /// is older than the grace.
    Waking {
        since: Instant,
    },
}

/// What the caller must do after a transition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// Set the timers to these (None: unchanged).
    pub timers: Option<Timers>,
    /// Leader: send a heartbeat now (renews the followers' leases).
    pub heartbeat_now: bool,
    /// Follower: send `WakeUp` to the leader (or to every voter when it is unknown).
    pub send_wakeup: bool,
    /// ... and if the leader is DOWN or unreachable, the lowest live voter campaigns at once
    /// (a wake by a request, an admin call or a store event; never at start).
    pub may_campaign: bool,
    /// Count a wake with this reason.
    pub woke: Option<WakeReason>,
    /// Waking follower whose grace ended: ask the leader whether it still leads; answer with
    /// [`Hibernation::probe_result`].
    pub probe_leader: bool,
}

/// How many times a waking follower restarts its grace because its leader answered that it
/// still leads, before it turns its election timer on anyway.
pub const MAX_PROBES: u32 = 5;

/// One replica's hibernation bookkeeping.
#[derive(Clone, Debug)]
pub struct Hibernation {
    state: State,
    /// Rounds are numbered per replica; a round's answers count only while it is current.
    round: u64,
    /// No new poll before this (after a refused or interrupted poll).
    next_poll: Option<Instant>,
    /// The last request, proposal or read on this replica.
    last_activity: Instant,
    /// Leader probes of the current waking (see [`Self::on_loop`]), and whether one is out.
    probes: u32,
    probing: bool,
}

impl Hibernation {
    /// A replica that just started: a leader (restored) is awake, a follower is waking (its
    /// election timer off, so a restart does not depose a sleeping leader).
    pub fn started(is_leader: bool, now: Instant) -> (Self, Actions) {
        let mut h = Hibernation {
            state: State::Awake,
            round: 0,
            next_poll: None,
            last_activity: now,
            probes: 0,
            probing: false,
        };
        let actions = if is_leader {
            Actions {
                timers: Some(Timers::AWAKE),
                ..Actions::default()
            }
        } else {
            h.state = State::Waking { since: now };
            Actions {
                timers: Some(Timers::WAKING),
                send_wakeup: true,
                woke: Some(WakeReason::Start),
                ..Actions::default()
            }
        };
        (h, actions)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn is_hibernating(&self) -> bool {
        matches!(self.state, State::Hibernating { .. })
    }

    pub fn is_waking(&self) -> bool {
        matches!(self.state, State::Waking { .. })
    }

    pub fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_activity)
    }

    /// The fast path of [`Self::wake`]: on an awake replica, only records the activity and
    /// returns true (no need to know the role); false when a transition is needed.
    pub fn note_if_awake(&mut self, reason: WakeReason, now: Instant) -> bool {
        if self.state != State::Awake {
            return false;
        }
        if !matches!(
            reason,
            WakeReason::StoreDown | WakeReason::StoreUp | WakeReason::PeerWakeup
        ) {
            self.last_activity = now;
        }
        true
    }

    /// Activity on this replica (a request, a proposal, a read, an admin call). Wakes it:
    /// a sleeping leader turns its timers on and heartbeats at once; a poll in progress is
    /// dropped; a sleeping follower starts waking and asks its leader to wake.
    pub fn wake(&mut self, is_leader: bool, reason: WakeReason, now: Instant) -> Actions {
        if !matches!(
            reason,
            WakeReason::StoreDown | WakeReason::StoreUp | WakeReason::PeerWakeup
        ) {
            self.last_activity = now;
        }
        match (&self.state, is_leader) {
            (State::Awake, _) => Actions::default(),
            (State::Polling { .. }, _) => {
                self.state = State::Awake;
                self.next_poll = None;
                Actions::default()
            }
            (State::Hibernating { .. }, true) => {
                self.state = State::Awake;
                Actions {
                    timers: Some(Timers::AWAKE),
                    heartbeat_now: true,
                    woke: Some(reason),
                    ..Actions::default()
                }
            }
            (State::Hibernating { .. }, false) => {
                self.state = State::Waking { since: now };
                self.probes = 0;
                // A follower woken by the leader itself needs no WakeUp back.
                let send_wakeup = reason != WakeReason::PeerWakeup;
                Actions {
                    timers: Some(Timers::WAKING),
                    send_wakeup,
                    may_campaign: send_wakeup && reason != WakeReason::Start,
                    woke: Some(reason),
                    ..Actions::default()
                }
            }
            (State::Waking { .. }, true) => {
                // Became leader meanwhile (a campaign): nothing to wait for.
                self.state = State::Awake;
                Actions {
                    timers: Some(Timers::AWAKE),
                    ..Actions::default()
                }
            }
            (State::Waking { .. }, false) => Actions::default(),
        }
    }

    /// A Raft message was handled; `kind` is what [`message_wake`] made of it.
    pub fn on_message(&mut self, is_leader: bool, kind: MessageWake, now: Instant) -> Actions {
        match kind {
            MessageWake::Stay => Actions::default(),
            // The message came from a committed leader and renewed our lease: fully awake.
            MessageWake::Renewed => match self.state {
                State::Awake => Actions::default(),
                State::Polling { .. } => {
                    self.state = State::Awake;
                    Actions::default()
                }
                State::Hibernating { .. } | State::Waking { .. } => {
                    let woke = self.is_hibernating().then_some(WakeReason::RaftMessage);
                    self.state = State::Awake;
                    Actions {
                        timers: Some(Timers::AWAKE),
                        woke,
                        ..Actions::default()
                    }
                }
            },
            // An election is going on: timers on, but a follower does not campaign itself
            // before the grace (its lease was not renewed by this message).
            MessageWake::Election => {
                if is_leader {
                    self.wake(true, WakeReason::RaftMessage, now)
                } else {
                    match self.state {
                        State::Hibernating { .. } => {
                            self.state = State::Waking { since: now };
                            self.probes = 0;
                            // Its leader (asleep, lease expired) would grant any Pre-Vote: wake
                            // it, so a live leader reasserts itself. Never campaign from here.
                            Actions {
                                timers: Some(Timers::WAKING),
                                send_wakeup: true,
                                woke: Some(WakeReason::RaftMessage),
                                ..Actions::default()
                            }
                        }
                        State::Polling { .. } => {
                            self.state = State::Awake;
                            Actions::default()
                        }
                        _ => Actions::default(),
                    }
                }
            }
        }
    }

    /// A follower accepted an AppendEntries from a committed leader.
    pub fn on_leader_contact(&mut self) -> Actions {
        if self.is_waking() {
            self.state = State::Awake;
            return Actions {
                timers: Some(Timers::AWAKE),
                ..Actions::default()
            };
        }
        Actions::default()
    }

    /// Periodic check (the node's hibernate loop): a waking replica becomes awake once the
    /// grace passed without contact.
    ///
    /// When the grace ends without contact, the follower first asks its leader whether it
    /// still leads ([`Actions::probe_leader`]): a live leader whose heartbeat was merely late
    /// (a loaded machine) must not be deposed by an election its expired lease cannot refuse.
    /// Only a leader that does not answer, or says it no longer leads, or [`MAX_PROBES`] graces
    /// in a row, turn the election timer on.
    pub fn on_loop(&mut self, now: Instant, grace: Duration) -> Actions {
        let State::Waking { since } = self.state else {
            return Actions::default();
        };
        if now.saturating_duration_since(since) < grace || self.probing {
            return Actions::default();
        }
        if self.probes < MAX_PROBES {
            self.probing = true;
            return Actions {
                probe_leader: true,
                ..Actions::default()
            };
        }
        self.state = State::Awake;
        Actions {
            timers: Some(Timers::AWAKE),
            ..Actions::default()
        }
    }

    /// The answer to a leader probe: the leader still leads (the grace restarts) or not (or
    /// no answer: the election timer turns on).
    pub fn probe_result(&mut self, still_leading: bool, now: Instant) -> Actions {
        self.probing = false;
        if !self.is_waking() {
            return Actions::default();
        }
        if still_leading {
            self.probes += 1;
            self.state = State::Waking { since: now };
            return Actions::default();
        }
        self.state = State::Awake;
        Actions {
            timers: Some(Timers::AWAKE),
            ..Actions::default()
        }
    }

    /// Restarts a waking replica's grace (once its node serves, so the leader's answer can
    /// reach it).
    pub fn rearm(&mut self, now: Instant) {
        if self.is_waking() {
            self.state = State::Waking { since: now };
        }
    }

    /// Whether a leader may start a poll now (awake, and not backing off).
    pub fn may_poll(&self, now: Instant) -> bool {
        self.state == State::Awake && self.next_poll.is_none_or(|t| now >= t)
    }

    /// The leader starts poll round `r` (returned).
    pub fn start_poll(&mut self) -> u64 {
        self.round += 1;
        self.state = State::Polling { round: self.round };
        self.round
    }

    /// The answers of round `round` are in. `verdict` is [`sleep_verdict`]'s. Returns what
    /// happened and the actions; a round that is no longer current was interrupted.
    pub fn finish_poll(
        &mut self,
        round: u64,
        verdict: Option<BTreeSet<u64>>,
        still_leader: bool,
        now: Instant,
        backoff: Duration,
    ) -> (PollResult, Actions) {
        if self.state != (State::Polling { round }) || !still_leader {
            if self.state == (State::Polling { round }) {
                self.state = State::Awake;
            }
            self.next_poll = Some(now + backoff);
            return (PollResult::Interrupted, Actions::default());
        }
        match verdict {
            Some(lagging) => {
                self.state = State::Hibernating { lagging };
                self.next_poll = None;
                (
                    PollResult::Slept,
                    Actions {
                        timers: Some(Timers::ASLEEP),
                        ..Actions::default()
                    },
                )
            }
            None => {
                self.state = State::Awake;
                self.next_poll = Some(now + backoff);
                (PollResult::Refused, Actions::default())
            }
        }
    }

    /// A follower accepted a `Hibernate`: its tick goes off.
    pub fn follower_sleeps(&mut self) -> Actions {
        self.state = State::Hibernating {
            lagging: BTreeSet::new(),
        };
        Actions {
            timers: Some(Timers::ASLEEP),
            ..Actions::default()
        }
    }

    /// Voters a sleeping leader left behind (empty unless hibernating as leader).
    pub fn lagging(&self) -> Option<&BTreeSet<u64>> {
        match &self.state {
            State::Hibernating { lagging } => Some(lagging),
            _ => None,
        }
    }
}

/// How a poll ended (the `result` label of `skv_storenode_hibernate_polls_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollResult {
    Slept,
    Refused,
    Interrupted,
}

impl PollResult {
    pub fn label(self) -> &'static str {
        match self {
            PollResult::Slept => "slept",
            PollResult::Refused => "refused",
            PollResult::Interrupted => "interrupted",
        }
    }
}

/// A leader's view, copied out of the Raft metrics and the range state.
#[derive(Clone, Debug)]
pub struct LeaderFacts {
    pub me: u64,
    pub is_leader: bool,
    /// The last applied entry is of the leader's own term.
    pub own_term_applied: bool,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    pub joint: bool,
    /// Matched log index per replication target (the leader's replication metrics).
    pub matched: BTreeMap<u64, Option<u64>>,
    pub merging: bool,
    pub installing: bool,
    /// Proposals, reads and admin calls in flight.
    pub inflight: u64,
    pub idle_for: Duration,
}

/// Why a leader does not poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stay {
    NotLeader,
    NoOwnTermEntry,
    NotAllApplied,
    Learners,
    Joint,
    FollowerBehind(u64),
    Merging,
    Installing,
    Inflight,
    RecentlyActive,
}

/// Whether an awake leader should ask its followers to sleep.
pub fn decide(f: &LeaderFacts, down: &BTreeSet<u64>, after: Duration) -> Result<(), Stay> {
    if !f.is_leader {
        return Err(Stay::NotLeader);
    }
    if !f.own_term_applied {
        return Err(Stay::NoOwnTermEntry);
    }
    if f.last_applied_index != f.last_log_index {
        return Err(Stay::NotAllApplied);
    }
    if !f.learners.is_empty() {
        return Err(Stay::Learners);
    }
    if f.joint {
        return Err(Stay::Joint);
    }
    for &v in &f.voters {
        if v == f.me || down.contains(&v) {
            continue;
        }
        let matched = f.matched.get(&v).copied().flatten();
        if matched != f.last_log_index {
            return Err(Stay::FollowerBehind(v));
        }
    }
    if f.merging {
        return Err(Stay::Merging);
    }
    if f.installing {
        return Err(Stay::Installing);
    }
    if f.inflight > 0 {
        return Err(Stay::Inflight);
    }
    if f.idle_for < after {
        return Err(Stay::RecentlyActive);
    }
    Ok(())
}

/// The voters a leader asks in a poll: every other voter not on a DOWN store.
pub fn poll_targets(me: u64, voters: &BTreeSet<u64>, down: &BTreeSet<u64>) -> Vec<u64> {
    voters
        .iter()
        .copied()
        .filter(|v| *v != me && !down.contains(v))
        .collect()
}

/// After a poll: `Some(lagging)` if the leader may sleep. Every voter but the leader must
/// have acked, except voters on DOWN stores, which may be missing if the acks and the leader
/// still form a quorum; the missing ones are returned as `lagging`.
pub fn sleep_verdict(
    me: u64,
    voters: &BTreeSet<u64>,
    acks: &BTreeSet<u64>,
    down: &BTreeSet<u64>,
) -> Option<BTreeSet<u64>> {
    let mut lagging = BTreeSet::new();
    let mut yes = usize::from(voters.contains(&me));
    for &v in voters {
        if v == me {
            continue;
        }
        if acks.contains(&v) {
            yes += 1;
        } else if down.contains(&v) {
            lagging.insert(v);
        } else {
            return None;
        }
    }
    (yes > voters.len() / 2).then_some(lagging)
}

/// A log id as plain values: (term, leader node, index).
pub type LogPos = (u64, u64, u64);
/// A vote as plain values: (term, node, committed).
pub type VotePos = (u64, u64, bool);

/// A follower's view when a `Hibernate` arrives.
#[derive(Clone, Debug)]
pub struct FollowerFacts {
    pub is_leader: bool,
    pub vote: VotePos,
    pub last_log: Option<LogPos>,
    pub applied_index: u64,
    pub installing: bool,
    pub merging: bool,
    /// A request was routed to this replica within `hibernate_after` (it serves reads).
    pub recently_active: bool,
}

/// What the leader states in a `Hibernate`.
#[derive(Clone, Debug)]
pub struct HibernateAsk {
    pub vote: VotePos,
    pub last_log: Option<LogPos>,
}

/// Why a follower refuses to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    IsLeader,
    OtherVote,
    LogDiffers,
    NotApplied,
    Installing,
    Merging,
    Active,
}

/// Whether a follower agrees to sleep: it follows the sender's committed vote, holds exactly
/// the sender's last log id and applied it, is not installing a snapshot, not in a merge,
/// and serves no requests of its own.
pub fn follower_accepts(f: &FollowerFacts, ask: &HibernateAsk) -> Result<(), Refusal> {
    if f.is_leader {
        return Err(Refusal::IsLeader);
    }
    if !ask.vote.2 || f.vote != ask.vote {
        return Err(Refusal::OtherVote);
    }
    if f.last_log != ask.last_log {
        return Err(Refusal::LogDiffers);
    }
    let need = ask.last_log.map_or(0, |l| l.2);
    if f.applied_index < need {
        return Err(Refusal::NotApplied);
    }
    if f.installing {
        return Err(Refusal::Installing);
    }
    if f.merging {
        return Err(Refusal::Merging);
    }
    if f.recently_active {
        return Err(Refusal::Active);
    }
    Ok(())
}

/// What a handled Raft message means for a sleeping replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageWake {
    /// A heartbeat (or ReadIndex round) of our own leader at our commit: keep sleeping.
    Stay,
    /// From a committed leader, with work or news (entries, commit ahead, a new leader, a
    /// snapshot): the lease is renewed, wake fully.
    Renewed,
    /// Vote, PreVote, TransferLeader, a refused AppendEntries: an election (or a stale leader)
    /// is around; the follower wakes its own leader, whose heartbeat settles it.
    Election,
}

/// A Raft message as seen by [`message_wake`].
#[derive(Clone, Copy, Debug)]
pub enum MessageFacts {
    Append {
        entries: usize,
        /// The request's vote differs from ours before it was handled.
        other_vote: bool,
        leader_commit: u64,
        applied_index: u64,
        accepted: bool,
    },
    Vote,
    PreVote,
    TransferLeader,
    Snapshot,
}

pub fn message_wake(m: MessageFacts) -> MessageWake {
    match m {
        MessageFacts::Append {
            entries,
            other_vote,
            leader_commit,
            applied_index,
            accepted,
        } => {
            if entries > 0 || other_vote || leader_commit > applied_index {
                if accepted {
                    MessageWake::Renewed
                } else {
                    MessageWake::Election
                }
            } else {
                MessageWake::Stay
            }
        }
        MessageFacts::Vote | MessageFacts::PreVote | MessageFacts::TransferLeader => MessageWake::Election,
        MessageFacts::Snapshot => MessageWake::Renewed,
    }
}

/// Whether a waking follower that cannot reach its leader campaigns at once: only the lowest
/// voter that is neither the (dead) leader nor on a DOWN store, so woken followers do not
/// split the vote; the others wait for the grace.
pub fn campaigns_now(me: u64, voters: &BTreeSet<u64>, leader: Option<u64>, down: &BTreeSet<u64>) -> bool {
    voters.iter().copied().find(|v| Some(*v) != leader && !down.contains(v)) == Some(me)
}

/// A store's state change, from placement's store list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    Down(u64),
    Up(u64),
}

/// The last state placement reported per store.
#[derive(Default, Debug)]
pub struct StoreStates {
    down: HashMap<u64, bool>,
}

impl StoreStates {
    /// Records the new states (store, is DOWN); returns the changes. A store seen for the
    /// first time is an event only if it is DOWN.
    pub fn update(&mut self, states: impl IntoIterator<Item = (u64, bool)>) -> Vec<StoreEvent> {
        let mut out = Vec::new();
        for (id, is_down) in states {
            let before = self.down.insert(id, is_down);
            match (before, is_down) {
                (Some(false) | None, true) => out.push(StoreEvent::Down(id)),
                (Some(true), false) => out.push(StoreEvent::Up(id)),
                _ => {}
            }
        }
        out
    }

    pub fn down(&self) -> BTreeSet<u64> {
        self.down.iter().filter(|(_, d)| **d).map(|(id, _)| *id).collect()
    }
}

/// Whether a store event wakes one replica: DOWN wakes only sleeping (or waking) followers
/// whose leader is that store; UP wakes only sleeping leaders that left that store behind.
pub fn store_event_wakes(e: StoreEvent, is_leader: bool, leader: Option<u64>, state: &State) -> bool {
    match e {
        StoreEvent::Down(s) => {
            !is_leader && leader == Some(s) && matches!(state, State::Hibernating { .. } | State::Waking { .. })
        }
        StoreEvent::Up(s) => is_leader && matches!(state, State::Hibernating { lagging } if lagging.contains(&s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One change of a table-driven test.
    type Change<T> = Box<dyn Fn(&mut T)>;

    fn set(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    fn idle_leader() -> LeaderFacts {
        LeaderFacts {
            me: 1,
            is_leader: true,
            own_term_applied: true,
            last_log_index: Some(10),
            last_applied_index: Some(10),
            voters: set(&[1, 2, 3]),
            learners: BTreeSet::new(),
            joint: false,
            matched: [(1, Some(10)), (2, Some(10)), (3, Some(10))].into_iter().collect(),
            merging: false,
            installing: false,
            inflight: 0,
            idle_for: Duration::from_secs(5),
        }
    }

    const AFTER: Duration = Duration::from_secs(3);

    #[test]
    fn decide_polls_only_when_every_precondition_holds() {
        let none = BTreeSet::new();
        assert_eq!(decide(&idle_leader(), &none, AFTER), Ok(()));
        let cases: Vec<(Change<LeaderFacts>, Stay)> = vec![
            (Box::new(|f| f.is_leader = false), Stay::NotLeader),
            (Box::new(|f| f.own_term_applied = false), Stay::NoOwnTermEntry),
            (Box::new(|f| f.last_applied_index = Some(9)), Stay::NotAllApplied),
            (Box::new(|f| f.last_log_index = Some(11)), Stay::NotAllApplied),
            (Box::new(|f| f.learners = set(&[4])), Stay::Learners),
            (Box::new(|f| f.joint = true), Stay::Joint),
            (
                Box::new(|f| {
                    f.matched.insert(3, Some(9));
                }),
                Stay::FollowerBehind(3),
            ),
            (
                Box::new(|f| {
                    f.matched.insert(2, None);
                }),
                Stay::FollowerBehind(2),
            ),
            (
                Box::new(|f| {
                    f.matched.remove(&2);
                }),
                Stay::FollowerBehind(2),
            ),
            (Box::new(|f| f.merging = true), Stay::Merging),
            (Box::new(|f| f.installing = true), Stay::Installing),
            (Box::new(|f| f.inflight = 1), Stay::Inflight),
            (
                Box::new(|f| f.idle_for = Duration::from_millis(2999)),
                Stay::RecentlyActive,
            ),
        ];
        for (change, want) in cases {
            let mut f = idle_leader();
            change(&mut f);
            assert_eq!(decide(&f, &none, AFTER), Err(want));
        }
        // A follower on a DOWN store may lag.
        let mut f = idle_leader();
        f.matched.insert(3, Some(2));
        assert_eq!(decide(&f, &set(&[3]), AFTER), Ok(()));
        assert_eq!(poll_targets(1, &f.voters, &set(&[3])), vec![2]);
        // A single voter needs nobody.
        let mut f = idle_leader();
        f.voters = set(&[1]);
        f.matched = [(1, Some(10))].into_iter().collect();
        assert_eq!(decide(&f, &none, AFTER), Ok(()));
        assert!(poll_targets(1, &f.voters, &none).is_empty());
        assert_eq!(sleep_verdict(1, &f.voters, &none, &none), Some(BTreeSet::new()));
    }

    #[test]
    fn sleeping_needs_every_live_ack_and_a_quorum() {
        let v3 = set(&[1, 2, 3]);
        let none = BTreeSet::new();
        assert_eq!(sleep_verdict(1, &v3, &set(&[2, 3]), &none), Some(BTreeSet::new()));
        // One live follower missing: stay awake.
        assert_eq!(sleep_verdict(1, &v3, &set(&[2]), &none), None);
        assert_eq!(sleep_verdict(1, &v3, &BTreeSet::new(), &none), None);
        // Missing but DOWN, and the acks plus the leader are a quorum: sleep, 3 lagging.
        assert_eq!(sleep_verdict(1, &v3, &set(&[2]), &set(&[3])), Some(set(&[3])));
        // Two of three DOWN: no quorum, stay awake.
        assert_eq!(sleep_verdict(1, &v3, &BTreeSet::new(), &set(&[2, 3])), None);
        // Five voters: two DOWN is fine, three is not.
        let v5 = set(&[1, 2, 3, 4, 5]);
        assert_eq!(sleep_verdict(1, &v5, &set(&[2, 3]), &set(&[4, 5])), Some(set(&[4, 5])));
        assert_eq!(sleep_verdict(1, &v5, &set(&[2]), &set(&[3, 4, 5])), None);
        // A DOWN store that acked anyway is not lagging.
        assert_eq!(sleep_verdict(1, &v3, &set(&[2, 3]), &set(&[3])), Some(BTreeSet::new()));
    }

    #[test]
    fn a_wake_during_a_poll_drops_the_round() {
        let now = Instant::now();
        let (mut h, a) = Hibernation::started(true, now);
        assert_eq!(a.timers, Some(Timers::AWAKE));
        assert!(h.may_poll(now));
        assert!(h.note_if_awake(WakeReason::Request, now));
        let r = h.start_poll();
        assert!(!h.may_poll(now));
        assert!(
            !h.note_if_awake(WakeReason::Write, now),
            "a poll must be interrupted by wake()"
        );
        let a = h.wake(true, WakeReason::Write, now);
        assert_eq!(a, Actions::default(), "polling timers are the awake ones");
        assert_eq!(h.state(), &State::Awake);
        let backoff = Duration::from_secs(3);
        let (res, a) = h.finish_poll(r, Some(BTreeSet::new()), true, now, backoff);
        assert_eq!(res, PollResult::Interrupted);
        assert_eq!(a.timers, None);
        assert_eq!(h.state(), &State::Awake);
        assert!(!h.may_poll(now) && h.may_poll(now + backoff));
        // A new round, refused: awake, backing off.
        let r = h.start_poll();
        let (res, _) = h.finish_poll(r, None, true, now, backoff);
        assert_eq!(res, PollResult::Refused);
        assert_eq!(h.state(), &State::Awake);
        // An old round's answer does not count for the current one.
        let later = now + backoff;
        let r2 = h.start_poll();
        let (res, _) = h.finish_poll(r2 - 1, Some(BTreeSet::new()), true, later, backoff);
        assert_eq!(res, PollResult::Interrupted);
        // Lost leadership meanwhile: interrupted.
        let r3 = h.start_poll();
        let (res, _) = h.finish_poll(r3, Some(BTreeSet::new()), false, later, backoff);
        assert_eq!(res, PollResult::Interrupted);
        // Accepted: asleep; a read wakes it with a heartbeat at once.
        let r4 = h.start_poll();
        let (res, a) = h.finish_poll(r4, Some(set(&[3])), true, later, backoff);
        assert_eq!(res, PollResult::Slept);
        assert_eq!(a.timers, Some(Timers::ASLEEP));
        assert_eq!(h.lagging(), Some(&set(&[3])));
        let a = h.wake(true, WakeReason::Read, later);
        assert_eq!(a.timers, Some(Timers::AWAKE));
        assert!(a.heartbeat_now && !a.send_wakeup);
        assert_eq!(a.woke, Some(WakeReason::Read));
        assert_eq!(h.idle_for(later), Duration::ZERO);
    }

    fn follower() -> FollowerFacts {
        FollowerFacts {
            is_leader: false,
            vote: (4, 1, true),
            last_log: Some((4, 1, 10)),
            applied_index: 10,
            installing: false,
            merging: false,
            recently_active: false,
        }
    }

    #[test]
    fn follower_accept_and_refuse_table() {
        let ask = HibernateAsk {
            vote: (4, 1, true),
            last_log: Some((4, 1, 10)),
        };
        assert_eq!(follower_accepts(&follower(), &ask), Ok(()));
        let cases: Vec<(Change<FollowerFacts>, Refusal)> = vec![
            (Box::new(|f| f.is_leader = true), Refusal::IsLeader),
            (Box::new(|f| f.vote = (5, 2, true)), Refusal::OtherVote),
            (Box::new(|f| f.vote = (4, 1, false)), Refusal::OtherVote),
            (Box::new(|f| f.last_log = Some((4, 1, 9))), Refusal::LogDiffers),
            (Box::new(|f| f.last_log = Some((3, 2, 10))), Refusal::LogDiffers),
            (Box::new(|f| f.last_log = Some((4, 1, 11))), Refusal::LogDiffers),
            (Box::new(|f| f.applied_index = 9), Refusal::NotApplied),
            (Box::new(|f| f.installing = true), Refusal::Installing),
            (Box::new(|f| f.merging = true), Refusal::Merging),
            (Box::new(|f| f.recently_active = true), Refusal::Active),
        ];
        for (change, want) in cases {
            let mut f = follower();
            change(&mut f);
            assert_eq!(follower_accepts(&f, &ask), Err(want));
        }
        // A vote that is not committed is no leader's.
        let uncommitted = HibernateAsk {
            vote: (4, 1, false),
            last_log: Some((4, 1, 10)),
        };
        let mut f = follower();
        f.vote = (4, 1, false);
        assert_eq!(follower_accepts(&f, &uncommitted), Err(Refusal::OtherVote));
        // Accepting turns the tick off.
        let (mut h, _) = Hibernation::started(false, Instant::now());
        assert_eq!(h.follower_sleeps().timers, Some(Timers::ASLEEP));
        assert!(h.is_hibernating());
    }

    #[test]
    fn message_wake_table() {
        let append = |entries, other_vote, leader_commit, accepted| MessageFacts::Append {
            entries,
            other_vote,
            leader_commit,
            applied_index: 10,
            accepted,
        };
        // A heartbeat or ReadIndex round of our own leader at our commit: stay asleep.
        assert_eq!(message_wake(append(0, false, 10, true)), MessageWake::Stay);
        assert_eq!(message_wake(append(0, false, 9, true)), MessageWake::Stay);
        // Entries, another leader, or a commit we have not applied: wake.
        assert_eq!(message_wake(append(1, false, 10, true)), MessageWake::Renewed);
        assert_eq!(message_wake(append(0, true, 10, true)), MessageWake::Renewed);
        assert_eq!(message_wake(append(0, false, 11, true)), MessageWake::Renewed);
        // Refused (a conflict, a stale leader): timers on, no campaign before the grace.
        assert_eq!(message_wake(append(1, false, 10, false)), MessageWake::Election);
        assert_eq!(message_wake(MessageFacts::Vote), MessageWake::Election);
        assert_eq!(message_wake(MessageFacts::PreVote), MessageWake::Election);
        assert_eq!(message_wake(MessageFacts::TransferLeader), MessageWake::Election);
        assert_eq!(message_wake(MessageFacts::Snapshot), MessageWake::Renewed);

        let now = Instant::now();
        let asleep = || {
            let (mut h, _) = Hibernation::started(false, now);
            h.follower_sleeps();
            h
        };
        let mut h = asleep();
        assert_eq!(h.on_message(false, MessageWake::Stay, now), Actions::default());
        assert!(h.is_hibernating());
        let a = h.on_message(false, MessageWake::Renewed, now);
        assert_eq!(a.timers, Some(Timers::AWAKE));
        assert_eq!(a.woke, Some(WakeReason::RaftMessage));
        assert_eq!(h.state(), &State::Awake);
        let mut h = asleep();
        let a = h.on_message(false, MessageWake::Election, now);
        assert_eq!(a.timers, Some(Timers::WAKING));
        assert!(a.send_wakeup && !a.may_campaign);
        assert!(h.is_waking());
        // A sleeping leader asked for a vote wakes fully and heartbeats.
        let (mut l, _) = Hibernation::started(true, now);
        let r = l.start_poll();
        l.finish_poll(r, Some(BTreeSet::new()), true, now, AFTER);
        let a = l.on_message(true, MessageWake::Election, now);
        assert_eq!(a.timers, Some(Timers::AWAKE));
        assert!(a.heartbeat_now);
    }

    #[test]
    fn waking_becomes_awake_on_contact_or_after_the_grace() {
        let now = Instant::now();
        let grace = Duration::from_secs(1);
        // Start: waking, WakeUp sent, election timer off.
        let (mut h, a) = Hibernation::started(false, now);
        assert_eq!(a.timers, Some(Timers::WAKING));
        assert!(a.send_wakeup && !a.may_campaign, "a restart never campaigns at once");
        assert_eq!(a.woke, Some(WakeReason::Start));
        assert_eq!(h.on_loop(now + Duration::from_millis(999), grace), Actions::default());
        h.rearm(now + Duration::from_millis(999));
        assert!(!h.on_loop(now + grace, grace).probe_leader, "the grace restarted");
        assert_eq!(h.on_leader_contact().timers, Some(Timers::AWAKE));
        assert_eq!(h.state(), &State::Awake);
        assert_eq!(h.on_leader_contact(), Actions::default());
        // Sleeping follower woken by a request: waking, WakeUp; after the grace, awake.
        h.follower_sleeps();
        let a = h.wake(false, WakeReason::Request, now);
        assert_eq!(a.timers, Some(Timers::WAKING));
        assert!(a.send_wakeup && a.may_campaign && !a.heartbeat_now);
        assert_eq!(h.wake(false, WakeReason::Request, now), Actions::default());
        // The grace ends: first the leader is asked; it still leads, so the grace restarts,
        // up to MAX_PROBES times; a leader that does not answer turns the timer on.
        let mut t = now + grace;
        for _ in 0..MAX_PROBES {
            let a = h.on_loop(t, grace);
            assert!(a.probe_leader && a.timers.is_none());
            assert_eq!(h.on_loop(t, grace), Actions::default(), "one probe at a time");
            assert_eq!(h.probe_result(true, t), Actions::default());
            assert!(h.is_waking());
            t += grace;
        }
        assert_eq!(
            h.on_loop(t, grace).timers,
            Some(Timers::AWAKE),
            "at most MAX_PROBES graces"
        );
        h.follower_sleeps();
        h.wake(false, WakeReason::Request, now);
        assert!(h.on_loop(now + grace, grace).probe_leader);
        assert_eq!(h.probe_result(false, now + grace).timers, Some(Timers::AWAKE));
        // Woken by the leader's WakeUp: no WakeUp back.
        h.follower_sleeps();
        assert!(!h.wake(false, WakeReason::PeerWakeup, now).send_wakeup);
        // A waking replica that became leader is awake.
        assert_eq!(h.wake(true, WakeReason::Write, now).timers, Some(Timers::AWAKE));

        // Only the lowest live voter other than the leader campaigns at once.
        let v = set(&[1, 2, 3]);
        let none = BTreeSet::new();
        assert!(campaigns_now(2, &v, Some(1), &none));
        assert!(!campaigns_now(3, &v, Some(1), &none));
        assert!(campaigns_now(3, &v, Some(1), &set(&[2])));
        assert!(campaigns_now(1, &v, None, &none));
        assert!(!campaigns_now(2, &v, None, &none));
        assert!(campaigns_now(1, &v, Some(3), &none));
    }

    #[test]
    fn store_events_pick_only_ranges_led_there_or_left_behind() {
        let mut s = StoreStates::default();
        assert_eq!(s.update([(1, false), (2, false), (3, true)]), vec![StoreEvent::Down(3)]);
        assert_eq!(s.update([(1, false), (2, false), (3, true)]), vec![]);
        assert_eq!(
            s.update([(1, true), (3, false)]),
            vec![StoreEvent::Down(1), StoreEvent::Up(3)]
        );
        assert_eq!(s.down(), set(&[1]));

        let asleep = State::Hibernating {
            lagging: BTreeSet::new(),
        };
        let waking = State::Waking { since: Instant::now() };
        // DOWN: sleeping (or waking) followers whose leader is there.
        assert!(store_event_wakes(StoreEvent::Down(1), false, Some(1), &asleep));
        assert!(store_event_wakes(StoreEvent::Down(1), false, Some(1), &waking));
        assert!(!store_event_wakes(StoreEvent::Down(1), false, Some(2), &asleep));
        assert!(!store_event_wakes(StoreEvent::Down(1), false, Some(1), &State::Awake));
        assert!(!store_event_wakes(StoreEvent::Down(2), true, Some(1), &asleep));
        // UP: only sleeping leaders that left that store behind.
        let left = State::Hibernating { lagging: set(&[3]) };
        assert!(store_event_wakes(StoreEvent::Up(3), true, Some(1), &left));
        assert!(!store_event_wakes(StoreEvent::Up(2), true, Some(1), &left));
        assert!(!store_event_wakes(StoreEvent::Up(3), true, Some(1), &asleep));
        assert!(!store_event_wakes(StoreEvent::Up(3), false, Some(1), &left));
    }
}
