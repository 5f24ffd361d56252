//! A recorded history: what every client asked for, when, and what it was told.
//!
//! Times are nanoseconds of one monotonic clock (the recorder's `Instant`), counted from the
//! start of the run. Values are `u64` ids: every put of a run writes a value no other put
//! writes, so a read names the write it saw. The history is plain data (serde), written as
//! JSON for a failing run and read back by `skv-chaos check` for replay.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A value written by a put: unique within a run.
pub type Value = u64;

/// What was asked. Versions are skv's per-key versions: 1 after the first write, +1 on every
/// write, kept across deletes (ADR 0008); a condition compares with the *live* version
/// (0 when the key is absent or deleted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Input {
    /// `Client::get` (linearizable).
    Get,
    /// `Client::put`.
    Put {
        /// The value written.
        value: Value,
    },
    /// `Client::put_if_version` (`version` 0 = `put_if_absent`).
    PutIfVersion {
        /// The value written.
        value: Value,
        /// The live version the key must have.
        version: u64,
    },
    /// `Client::delete`.
    Delete,
    /// `Client::delete_if_version`.
    DeleteIfVersion {
        /// The live version the key must have.
        version: u64,
    },
    /// `Client::compare_and_swap`.
    Cas {
        /// The live version the key must have (0 = absent).
        expected: u64,
        /// The value written when it matches.
        value: Value,
    },
}

impl Input {
    /// Whether the operation can change the key.
    pub fn is_write(&self) -> bool {
        !matches!(self, Input::Get)
    }

    /// The value this operation writes, if it writes one.
    pub fn written_value(&self) -> Option<Value> {
        match self {
            Input::Put { value } | Input::PutIfVersion { value, .. } | Input::Cas { value, .. } => Some(*value),
            Input::Get | Input::Delete | Input::DeleteIfVersion { .. } => None,
        }
    }

    /// The live version this operation requires, if it is conditional.
    pub fn condition(&self) -> Option<u64> {
        match self {
            Input::PutIfVersion { version, .. } | Input::DeleteIfVersion { version } => Some(*version),
            Input::Cas { expected, .. } => Some(*expected),
            Input::Get | Input::Put { .. } | Input::Delete => None,
        }
    }

    /// A short name for summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Input::Get => "get",
            Input::Put { .. } => "put",
            Input::PutIfVersion { .. } => "put_if_version",
            Input::Delete => "delete",
            Input::DeleteIfVersion { .. } => "delete_if_version",
            Input::Cas { .. } => "cas",
        }
    }
}

/// A value and its version, as a read saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Observed {
    /// The value (a put's id; [`FOREIGN_VALUE`] when the bytes were not one of ours).
    pub value: Value,
    /// The key's version.
    pub version: u64,
}

/// The value id a recorder gives bytes that no put of the run wrote (they cannot match).
pub const FOREIGN_VALUE: Value = u64::MAX;

/// What a successful call answered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Output {
    /// A get: the live value and version, or `None` when absent (or deleted).
    Read {
        /// What was read.
        found: Option<Observed>,
    },
    /// A put, a conditional put or a CAS that wrote: the key's new version.
    Written {
        /// The version the write created.
        version: u64,
    },
    /// A delete (conditional or not) that ran: whether a live value was removed.
    Deleted {
        /// Whether the key was live.
        existed: bool,
    },
    /// A conditional write whose condition did not hold; nothing was written. `current` is
    /// the live version the server reported (CAS reports it; `put_if_version` and
    /// `delete_if_version` fail with `ConditionFailed`, which does not).
    ConditionFailed {
        /// The live version at that moment, when known.
        current: Option<u64>,
    },
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum Outcome {
    /// It happened, exactly once, between invocation and completion, with this answer.
    Ok {
        /// The answer.
        output: Output,
    },
    /// It surely did not happen (the server refused it before applying; could not connect).
    Fail,
    /// It may have happened at any moment after its invocation, or never (a timeout, a
    /// connection lost mid-call, the proxy's "outcome unknown").
    Unknown,
}

/// One call of one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Index in the history (stable: used in reports).
    pub id: usize,
    /// Which client made it (a client makes one call at a time).
    pub client: u32,
    /// The key, as the client named it.
    pub key: String,
    /// What was asked.
    pub input: Input,
    /// How it ended.
    pub outcome: Outcome,
    /// Invocation time (ns since the start of the run).
    pub call: u64,
    /// Completion time (ns); for an [`Outcome::Unknown`] it is when the client gave up, and
    /// the checker treats the completion as +∞.
    pub ret: u64,
    /// The client's error message for a failed or unknown call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// The answer, when the call succeeded.
    pub fn output(&self) -> Option<&Output> {
        match &self.outcome {
            Outcome::Ok { output } => Some(output),
            Outcome::Fail | Outcome::Unknown => None,
        }
    }

    /// The outcome class as a word (`ok`, `fail`, `unknown`).
    pub fn class(&self) -> &'static str {
        match self.outcome {
            Outcome::Ok { .. } => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        }
    }
}

/// A whole run: its operations (any order; ids are indexes) and the events of the nemeses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Every call.
    pub ops: Vec<Op>,
    /// Fault injections, for the timeline (not used by the checker).
    #[serde(default)]
    pub nemesis: Vec<NemesisEvent>,
}

/// One nemesis action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisEvent {
    /// When (ns since the start of the run, the same clock as the operations).
    pub at: u64,
    /// What (`kill`, `restart`, `pause`, `resume`, `pd-leader-kill`, `split`, ...).
    pub kind: String,
    /// On what (`store-1`, `pd-0`, `r3`, ...).
    pub target: String,
    /// Whether it worked, and how.
    pub detail: String,
}

impl History {
    /// Operations grouped by key (ids kept), in id order.
    pub fn by_key(&self) -> BTreeMap<&str, Vec<&Op>> {
        let mut m: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            m.entry(op.key.as_str()).or_default().push(op);
        }
        m
    }

    /// Counts per (operation kind, outcome class).
    pub fn counts(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        let mut m = BTreeMap::new();
        for op in &self.ops {
            *m.entry((op.input.kind(), op.class())).or_default() += 1;
        }
        m
    }
}
