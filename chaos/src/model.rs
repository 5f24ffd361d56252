//! The sequential specification of one skv key: what each operation does to the key and
//! what it must answer. Pure; used by the checker at every step of its search.

use crate::history::{Input, Observed, Output, Value};

/// The value the checker puts in the state for a write whose value no read ever saw (see
/// the checker's symmetry reduction): no read can have returned it.
pub const UNOBSERVED: Value = u64::MAX - 1;

/// One key: its stored version and, when live, its value. A fresh key has version 0 and no
/// value. A delete keeps the version (a tombstone, ADR 0008).
///
/// A put on a key that is not live gets *some* version above the stored one: the next one
/// after a tombstone, or, once the range collected tombstones (ADR 0034), one above its
/// version floor, which is at least that. So after a put on a non-live key whose answer was
/// lost, the version is known only from below (`inexact`) until a read, a condition's answer
/// or an acknowledged write shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyState {
    /// The stored version (kept across deletes); a lower bound when `inexact` (or when the
    /// key is not live: the next put may start higher).
    pub version: u64,
    /// The live value, `None` when absent or deleted.
    pub value: Option<Value>,
    /// The live version is only known to be at least `version`.
    pub inexact: bool,
}

impl KeyState {
    /// The version conditions compare with: the stored one when live, 0 otherwise (exact
    /// only when `inexact` is false).
    pub fn live_version(&self) -> u64 {
        if self.value.is_some() { self.version } else { 0 }
    }

    fn exact(version: u64, value: Option<Value>) -> KeyState {
        KeyState {
            version,
            value,
            inexact: false,
        }
    }

    /// A put of `value` answered `written` (`None`: unknown). `None` when the answer is
    /// impossible here.
    fn put(&self, value: Value, written: Option<u64>) -> Option<KeyState> {
        if self.value.is_some() && !self.inexact {
            let next = self.version.saturating_add(1);
            return match written {
                None => Some(KeyState::exact(next, Some(value))),
                Some(v) => (v == next).then(|| KeyState::exact(v, Some(value))),
            };
        }
        // Not live, or live at an unknown version: anything above what is known.
        let least = self.version.saturating_add(1);
        match written {
            None => Some(KeyState {
                version: least,
                value: Some(value),
                inexact: true,
            }),
            Some(v) => (v >= least).then(|| KeyState::exact(v, Some(value))),
        }
    }

    fn deleted(&self) -> KeyState {
        KeyState::exact(self.version, None)
    }

    /// What a get must answer in this state (for an exact one).
    pub fn read(&self) -> Option<Observed> {
        self.value.map(|value| Observed {
            value,
            version: self.version,
        })
    }

    /// The state once it is known that the live version is `v` (`None` if it cannot be).
    fn pinned(&self, v: u64) -> Option<KeyState> {
        match (self.value, self.inexact) {
            (Some(_), true) if v >= self.version => Some(KeyState::exact(v, self.value)),
            (Some(_), false) if v == self.version => Some(*self),
            _ => None,
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.inexact { "at least " } else { "" };
        match self.value {
            Some(UNOBSERVED) => write!(f, "live, version {at}{}, a value no read saw", self.version),
            Some(v) => write!(f, "live, version {at}{}, value {v}", self.version),
            None if self.version == 0 => write!(f, "absent (never written)"),
            None => write!(f, "deleted (tombstone at version {})", self.version),
        }
    }
}

/// Applies `input` to `state`. `output` is what the call answered, or `None` when its outcome
/// is unknown (then any answer is accepted and a conditional write applies if its condition
/// can hold: the checker may also leave an unknown call out, which covers "it did not").
/// Returns the next state, or `None` when the answer is impossible in this state.
pub fn step(state: &KeyState, input: &Input, output: Option<&Output>) -> Option<KeyState> {
    match input {
        Input::Get => match output {
            None => Some(*state),
            Some(Output::Read { found: None }) => state.value.is_none().then_some(*state),
            Some(Output::Read { found: Some(o) }) if state.value == Some(o.value) => state.pinned(o.version),
            Some(_) => None,
        },
        Input::Put { value } => written(state, *value, output),
        Input::PutIfVersion { value, version: want } | Input::Cas { expected: want, value } => {
            match condition(state, *want) {
                Some(true) => written(&held_state(state, *want), *value, output),
                Some(false) => condition_failed(state, *want, output),
                // The live version is known only from below and `want` is not below it.
                None => match output {
                    Some(Output::ConditionFailed { .. }) => condition_failed(state, *want, output),
                    _ => written(&held_state(state, *want), *value, output),
                },
            }
        }
        Input::Delete => deleted(state, output),
        Input::DeleteIfVersion { version: want } => match condition(state, *want) {
            Some(true) => deleted(state, output),
            Some(false) => condition_failed(state, *want, output),
            None => match output {
                Some(Output::ConditionFailed { .. }) => condition_failed(state, *want, output),
                _ => deleted(&held_state(state, *want), output),
            },
        },
    }
}

/// Whether a condition on version `want` holds; `None` when the state cannot tell (live at
/// a version known only to be at least one that is not above `want`).
fn condition(state: &KeyState, want: u64) -> Option<bool> {
    match (state.value, state.inexact) {
        (Some(_), true) if want >= state.version => None,
        (Some(_), true) => Some(false),
        _ => Some(want == state.live_version()),
    }
}

/// The state in which a condition on `want` held (the live version is `want`).
fn held_state(state: &KeyState, want: u64) -> KeyState {
    if state.value.is_some() {
        KeyState::exact(want, state.value)
    } else {
        *state
    }
}

fn written(state: &KeyState, value: Value, output: Option<&Output>) -> Option<KeyState> {
    match output {
        None => state.put(value, None),
        Some(Output::Written { version }) => state.put(value, Some(*version)),
        Some(_) => None,
    }
}

fn deleted(state: &KeyState, output: Option<&Output>) -> Option<KeyState> {
    match output {
        None => Some(state.deleted()),
        Some(Output::Deleted { existed }) if *existed == state.value.is_some() => Some(state.deleted()),
        Some(_) => None,
    }
}

/// A condition on `want` that failed: the state is unchanged, except that an answer naming
/// the current version pins it.
fn condition_failed(state: &KeyState, want: u64, output: Option<&Output>) -> Option<KeyState> {
    match output {
        None | Some(Output::ConditionFailed { current: None }) => Some(*state),
        Some(Output::ConditionFailed { current: Some(c) }) if *c != want => {
            if state.value.is_none() {
                (*c == 0).then_some(*state)
            } else {
                state.pinned(*c)
            }
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(value: Value, version: u64) -> Output {
        Output::Read {
            found: Some(Observed { value, version }),
        }
    }

    #[test]
    fn versions_rise_across_deletes() {
        let s0 = KeyState::default();
        let s1 = step(&s0, &Input::Put { value: 7 }, Some(&Output::Written { version: 1 })).unwrap();
        assert_eq!(step(&s1, &Input::Get, Some(&read(7, 1))), Some(s1));
        assert_eq!(step(&s1, &Input::Get, Some(&read(7, 2))), None);
        let s2 = step(&s1, &Input::Delete, Some(&Output::Deleted { existed: true })).unwrap();
        assert_eq!(step(&s2, &Input::Get, Some(&Output::Read { found: None })), Some(s2));
        assert_eq!(
            step(&s2, &Input::Delete, Some(&Output::Deleted { existed: true })),
            None
        );
        assert_eq!(
            step(&s2, &Input::Put { value: 8 }, Some(&Output::Written { version: 1 })),
            None
        );
        let s3 = step(&s2, &Input::Put { value: 8 }, Some(&Output::Written { version: 2 })).unwrap();
        assert_eq!(s3.read(), Some(Observed { value: 8, version: 2 }));
        // Once the tombstone was collected (ADR 0034) the put starts at the range's floor + 1:
        // any version above the deleted one, never one at or below it.
        let s3 = step(&s2, &Input::Put { value: 8 }, Some(&Output::Written { version: 40 })).unwrap();
        assert_eq!(s3.read(), Some(Observed { value: 8, version: 40 }));
        // A live key's next put is exactly one up.
        assert_eq!(
            step(&s3, &Input::Put { value: 9 }, Some(&Output::Written { version: 42 })),
            None
        );
    }

    #[test]
    fn a_lost_put_on_a_deleted_key_is_pinned_by_what_comes_later() {
        let deleted = KeyState {
            version: 5,
            value: None,
            inexact: false,
        };
        // The put's answer was lost: live, version 6 or more.
        let s = step(&deleted, &Input::Put { value: 3 }, None).unwrap();
        assert_eq!((s.version, s.value, s.inexact), (6, Some(3), true));
        assert_eq!(step(&s, &Input::Get, Some(&read(3, 5))), None);
        let pinned = step(&s, &Input::Get, Some(&read(3, 30))).unwrap();
        assert_eq!(pinned, KeyState::exact(30, Some(3)));
        assert_eq!(step(&s, &Input::Get, Some(&Output::Read { found: None })), None);
        // A following put is one up from the true version, which its answer shows.
        assert_eq!(
            step(&s, &Input::Put { value: 4 }, Some(&Output::Written { version: 31 })),
            Some(KeyState::exact(31, Some(4)))
        );
        assert_eq!(
            step(&s, &Input::Put { value: 4 }, Some(&Output::Written { version: 6 })),
            None
        );
        // A condition below the known bound fails for sure; at or above it, it may hold.
        let cas2 = Input::Cas { expected: 2, value: 9 };
        assert_eq!(step(&s, &cas2, Some(&Output::Written { version: 3 })), None);
        assert_eq!(step(&s, &cas2, None), Some(s));
        let cas30 = Input::Cas { expected: 30, value: 9 };
        assert_eq!(
            step(&s, &cas30, Some(&Output::Written { version: 31 })),
            Some(KeyState::exact(31, Some(9)))
        );
        assert_eq!(
            step(&s, &cas30, Some(&Output::ConditionFailed { current: Some(12) })),
            Some(KeyState::exact(12, Some(3)))
        );
        assert_eq!(
            step(&s, &cas30, Some(&Output::ConditionFailed { current: Some(30) })),
            None
        );
        assert_eq!(step(&s, &cas30, None), Some(KeyState::exact(31, Some(9))));
        let del = Input::DeleteIfVersion { version: 8 };
        assert_eq!(
            step(&s, &del, Some(&Output::Deleted { existed: true })),
            Some(KeyState::exact(8, None))
        );
    }

    #[test]
    fn conditions_compare_the_live_version() {
        let s = KeyState {
            version: 4,
            value: None,
            inexact: false,
        };
        // A tombstone at 4 matches expected 0, not 4.
        let cas0 = Input::Cas { expected: 0, value: 9 };
        assert_eq!(
            step(&s, &cas0, Some(&Output::Written { version: 5 })).map(|s| s.read()),
            Some(Some(Observed { value: 9, version: 5 }))
        );
        let cas4 = Input::Cas { expected: 4, value: 9 };
        assert_eq!(step(&s, &cas4, Some(&Output::Written { version: 5 })), None);
        assert_eq!(
            step(&s, &cas4, Some(&Output::ConditionFailed { current: Some(0) })),
            Some(s)
        );
        assert_eq!(
            step(&s, &cas4, Some(&Output::ConditionFailed { current: Some(4) })),
            None
        );
        // Unknown outcome: applies when the condition holds, else nothing.
        assert_eq!(step(&s, &cas4, None), Some(s));
        assert_eq!(step(&s, &cas0, None).map(|s| s.version), Some(5));
        let del = Input::DeleteIfVersion { version: 3 };
        assert_eq!(
            step(&s, &del, Some(&Output::ConditionFailed { current: None })),
            Some(s)
        );
        assert_eq!(step(&s, &del, Some(&Output::Deleted { existed: false })), None);
    }
}
