//! Recording clients: every call through the SDK becomes an [`Op`] with its invocation and
//! completion on one monotonic clock, its answer, and its outcome class.
//!
//! Outcome classes follow the SDK's error contract (`skv::Error`): a conditional write's
//! `ConditionFailed` is an answer; `OutcomeUnknown`, `DeadlineExceeded` (for a write, the
//! client gave up waiting) and transport or unrecognised failures of a write are unknown;
//! a refusal the server sent (`Unavailable` without the proxy's "outcome unknown" mark,
//! quotas, auth, bad arguments) or a failure to connect is a definite failure: the write
//! did not happen. A failed read is left out either way (it observed nothing).

use crate::history::{FOREIGN_VALUE, Input, Observed, Op, Outcome, Output, Value};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Collects the calls of every client of a run.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    next_value: AtomicU64,
    trust_definite: bool,
}

impl Recorder {
    /// A recorder whose clock starts now. With `trust_definite` false, a write the SDK calls
    /// a definite failure is recorded as unknown (to tell a misclassified error from a
    /// consistency bug when a run fails).
    pub fn new(trust_definite: bool) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            next_value: AtomicU64::new(1),
            trust_definite,
        })
    }

    /// Nanoseconds since the recorder started (monotonic).
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A value no other put of this run writes.
    pub fn fresh_value(&self) -> Value {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    /// Every call so far, ids in order.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().clone()
    }

    /// How many calls were recorded.
    pub fn len(&self) -> usize {
        self.ops.lock().len()
    }

    /// No call recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, mut op: Op) -> usize {
        let mut ops = self.ops.lock();
        op.id = ops.len();
        ops.push(op);
        ops.len() - 1
    }

    /// A client that records into this recorder as client `id`.
    pub fn client(self: &Arc<Self>, client: skv::Client, id: u32) -> RecordingClient {
        RecordingClient {
            client,
            rec: self.clone(),
            id,
        }
    }
}

/// The bytes a put writes for value `v`.
pub fn encode_value(v: Value) -> Vec<u8> {
    format!("chaos-{v}").into_bytes()
}

/// The value id of bytes read back; [`FOREIGN_VALUE`] when no put of a run wrote them.
pub fn decode_value(bytes: &[u8]) -> Value {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.strip_prefix("chaos-"))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|v| *v < crate::model::UNOBSERVED)
        .unwrap_or(FOREIGN_VALUE)
}

/// The outcome class of a failed call (see the module doc).
pub fn classify(err: &skv::Error, input: &Input) -> Outcome {
    use skv::Error as E;
    if !input.is_write() {
        return match err {
            E::DeadlineExceeded(_) | E::OutcomeUnknown(_) | E::Transport(_) | E::Other(_) => Outcome::Unknown,
            _ => Outcome::Fail,
        };
    }
    match err {
        E::ConditionFailed(_) if input.condition().is_some() => Outcome::Ok {
            output: Output::ConditionFailed { current: None },
        },
        E::Unavailable(_)
        | E::ResourceExhausted(_)
        | E::Unauthenticated(_)
        | E::PermissionDenied(_)
        | E::InvalidArgument(_)
        | E::Config(_)
        | E::Decode(_) => Outcome::Fail,
        // OutcomeUnknown, DeadlineExceeded, Transport, Other, and anything added later.
        _ => Outcome::Unknown,
    }
}

/// An SDK client whose every call is recorded. One call at a time per client.
#[derive(Clone)]
pub struct RecordingClient {
    client: skv::Client,
    rec: Arc<Recorder>,
    id: u32,
}

impl RecordingClient {
    /// This client's id in the history.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The recorder (for fresh values).
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.rec
    }

    /// Runs `input` on `key` through the SDK and records it. Returns the recorded call.
    pub async fn invoke(&self, key: &str, input: Input) -> Op {
        self.invoke_inner(key, input, false).await
    }

    /// **A planted bug, for showing that the checker catches it:** reads `key` with
    /// `get_stale` (any replica, no ReadIndex: a follower answers from what it has applied)
    /// but records it as a linearizable `get`. `skv-chaos run --plant stale-reads`.
    pub async fn planted_stale_get(&self, key: &str) -> Op {
        self.invoke_inner(key, Input::Get, true).await
    }

    /// Records a linearizable `get` of `key` made by `read` (not through the SDK: the
    /// follower reads of [`crate::direct`]); an error is a failed read (observed nothing).
    pub async fn record_read<F>(&self, key: &str, read: F) -> Op
    where
        F: std::future::Future<Output = Result<Option<Observed>, String>>,
    {
        let call = self.rec.now();
        let result = read.await;
        let ret = self.rec.now();
        let (outcome, error) = match result {
            Ok(found) => (
                Outcome::Ok {
                    output: Output::Read { found },
                },
                None,
            ),
            Err(e) => (Outcome::Fail, Some(e)),
        };
        let mut op = Op {
            id: 0,
            client: self.id,
            key: key.to_string(),
            input: Input::Get,
            outcome,
            call,
            ret,
            error,
        };
        op.id = self.rec.push(op.clone());
        op
    }

    async fn invoke_inner(&self, key: &str, input: Input, stale: bool) -> Op {
        let c = &self.client;
        let call = self.rec.now();
        let result: skv::Result<Output> = match &input {
            Input::Get if stale => c.get_stale(key).await.map(|e| Output::Read {
                found: e.map(|e| Observed {
                    value: decode_value(&e.value),
                    version: e.version,
                }),
            }),
            Input::Get => c.get(key).await.map(|e| Output::Read {
                found: e.map(|e| Observed {
                    value: decode_value(&e.value),
                    version: e.version,
                }),
            }),
            Input::Put { value } => c
                .put(key, encode_value(*value))
                .await
                .map(|version| Output::Written { version }),
            Input::PutIfVersion { value, version } => c
                .put_if_version(key, *version, encode_value(*value))
                .await
                .map(|version| Output::Written { version }),
            Input::Delete => c.delete(key).await.map(|existed| Output::Deleted { existed }),
            Input::DeleteIfVersion { version } => c
                .delete_if_version(key, *version)
                .await
                .map(|existed| Output::Deleted { existed }),
            Input::Cas { expected, value } => {
                c.compare_and_swap(key, *expected, encode_value(*value))
                    .await
                    .map(|o| match o {
                        skv::CasOutcome::Swapped { version } => Output::Written { version },
                        skv::CasOutcome::Mismatch { current_version } => Output::ConditionFailed {
                            current: Some(current_version),
                        },
                    })
            }
        };
        let ret = self.rec.now();
        let (outcome, error) = match result {
            Ok(output) => (Outcome::Ok { output }, None),
            Err(e) => {
                let mut o = classify(&e, &input);
                if o == Outcome::Fail && input.is_write() && !self.rec.trust_definite {
                    o = Outcome::Unknown;
                }
                (o, Some(e.to_string()))
            }
        };
        let mut op = Op {
            id: 0,
            client: self.id,
            key: key.to_string(),
            input,
            outcome,
            call,
            ret,
            error,
        };
        op.id = self.rec.push(op.clone());
        op
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_foreign_bytes_are_marked() {
        assert_eq!(decode_value(&encode_value(42)), 42);
        assert_eq!(decode_value(b"42"), FOREIGN_VALUE);
        assert_eq!(decode_value(b"chaos-x"), FOREIGN_VALUE);
        assert_eq!(decode_value(&encode_value(u64::MAX - 1)), FOREIGN_VALUE);
    }

    #[test]
    fn outcome_classes_follow_the_sdk_contract() {
        let put = Input::Put { value: 1 };
        let cas = Input::Cas { expected: 1, value: 1 };
        let e = |f: fn(String) -> skv::Error| f("x".into());
        assert_eq!(classify(&e(skv::Error::OutcomeUnknown), &put), Outcome::Unknown);
        assert_eq!(classify(&e(skv::Error::DeadlineExceeded), &put), Outcome::Unknown);
        assert_eq!(classify(&e(skv::Error::Transport), &put), Outcome::Unknown);
        assert_eq!(classify(&e(skv::Error::Unavailable), &put), Outcome::Fail);
        assert_eq!(classify(&e(skv::Error::ResourceExhausted), &put), Outcome::Fail);
        assert_eq!(classify(&e(skv::Error::ConditionFailed), &put), Outcome::Unknown);
        assert_eq!(
            classify(&e(skv::Error::ConditionFailed), &cas),
            Outcome::Ok {
                output: Output::ConditionFailed { current: None }
            }
        );
        assert_eq!(
            classify(&e(skv::Error::DeadlineExceeded), &Input::Get),
            Outcome::Unknown
        );
        assert_eq!(classify(&e(skv::Error::Unavailable), &Input::Get), Outcome::Fail);
    }
}
