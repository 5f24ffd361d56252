//! The sequential specification of one skv key: what each operation does to the key and
//! what it must answer. Pure; used by the checker at every step of its search.

use crate::history::{Input, Observed, Output, Value};

/// The value the checker puts in the state for a write whose value no read ever saw (see
/// the checker's symmetry reduction): no read can have returned it.
pub const UNOBSERVED: Value = u64::MAX - 1;

/// One key: its stored version and, when live, its value. A fresh key has version 0 and no
/// value. A delete keeps the version (a tombstone, ADR 0008); the next put continues from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeyState {
    /// The stored version (kept across deletes).
    pub version: u64,
    /// The live value, `None` when absent or deleted.
    pub value: Option<Value>,
}

impl KeyState {
    /// The version conditions compare with: the stored one when live, 0 otherwise.
    pub fn live_version(&self) -> u64 {
        if self.value.is_some() { self.version } else { 0 }
    }

    fn written(&self, value: Value) -> KeyState {
        KeyState {
            version: self.version.saturating_add(1),
            value: Some(value),
        }
    }

    fn deleted(&self) -> KeyState {
        KeyState {
            version: self.version,
            value: None,
        }
    }

    /// What a get must answer in this state.
    pub fn read(&self) -> Option<Observed> {
        self.value.map(|value| Observed {
            value,
            version: self.version,
        })
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value {
            Some(UNOBSERVED) => write!(f, "live, version {}, a value no read saw", self.version),
            Some(v) => write!(f, "live, version {}, value {v}", self.version),
            None if self.version == 0 => write!(f, "absent (never written)"),
            None => write!(f, "deleted (tombstone at version {})", self.version),
        }
    }
}

/// Applies `input` to `state`. `output` is what the call answered, or `None` when its outcome
/// is unknown (then any answer is accepted and a conditional write applies if its condition
/// holds). Returns the next state, or `None` when the answer is impossible in this state.
pub fn step(state: &KeyState, input: &Input, output: Option<&Output>) -> Option<KeyState> {
    let live = state.live_version();
    match input {
        Input::Get => match output {
            None => Some(*state),
            Some(Output::Read { found }) => (state.read() == *found).then_some(*state),
            Some(_) => None,
        },
        Input::Put { value } => written(state.written(*value), output),
        Input::PutIfVersion { value, version: want } | Input::Cas { expected: want, value } => {
            if *want == live {
                written(state.written(*value), output)
            } else {
                condition_failed(state, live, output)
            }
        }
        Input::Delete => deleted(state, output),
        Input::DeleteIfVersion { version: want } => {
            if *want == live {
                deleted(state, output)
            } else {
                condition_failed(state, live, output)
            }
        }
    }
}

fn written(next: KeyState, output: Option<&Output>) -> Option<KeyState> {
    match output {
        None => Some(next),
        Some(Output::Written { version }) if *version == next.version => Some(next),
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

fn condition_failed(state: &KeyState, live: u64, output: Option<&Output>) -> Option<KeyState> {
    match output {
        None => Some(*state),
        Some(Output::ConditionFailed { current }) if current.is_none_or(|c| c == live) => Some(*state),
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
    }

    #[test]
    fn conditions_compare_the_live_version() {
        let s = KeyState {
            version: 4,
            value: None,
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
