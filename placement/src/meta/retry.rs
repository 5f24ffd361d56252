//! When a failed etcd call is tried again, and how (issue 14, ADR 0032). Pure: the etcd
//! store ([`super::etcd`]) classifies each failure and asks [`decide`] what to do next.
//!
//! The rule, as etcd's own Go client (clientv3's retry interceptor) has it: a call whose
//! request never left this process may always be sent again, to another member; a call that
//! may have reached etcd is sent again only if running it twice cannot do harm.
//!
//! - Reads (a range read, a transaction without writes, a keep-alive, a lease's TTL, a
//!   revoke, a compaction, opening a watch) are idempotent: sent again after any transient
//!   failure.
//! - A guarded write (a transaction with compares) is sent again as is: its compares are
//!   evaluated again on the fresh attempt, so if the lost attempt applied, they fail (every
//!   guarded transaction placement runs compares a key it writes), and the caller, as after
//!   any lost compare, re-reads and decides again. It is never reported applied on faith.
//! - An unguarded write whose outcome is unknown is re-read, not re-applied: if every key it
//!   writes already holds what it would write, it is reported applied; otherwise it is sent
//!   again.
//! - A lease grant whose outcome is unknown is sent again: the lease the lost attempt may
//!   have created holds no key and expires after its TTL.

use std::time::Duration;

/// What a failed attempt says about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The request never reached etcd: the member could not be connected to, or the
    /// transport proves the call unprocessed (ADR 0035).
    NotSent,
    /// The member answered that it has no leader (etcd refuses before it proposes anything).
    NoLeader,
    /// The request may have reached etcd and been applied: the connection broke mid-call,
    /// the attempt timed out, etcd timed out its proposal or lost its leader meanwhile, or it
    /// was overloaded.
    Interrupted,
    /// Anything else (a bad request, a missing lease, a compacted revision): final.
    Permanent,
}

impl Failure {
    /// The `reason` label of `skv_placement_meta_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::NotSent => "unreachable",
            Failure::NoLeader => "no_leader",
            Failure::Interrupted => "interrupted",
            Failure::Permanent => "permanent",
        }
    }

    /// Whether the request certainly did not apply.
    pub fn not_applied(self) -> bool {
        matches!(self, Failure::NotSent | Failure::NoLeader)
    }
}

/// Classifies a gRPC failure from etcd by its code and message, and whether the transport
/// proves the request never reached etcd (`skv_rpc::never_processed`: no connection, a
/// refused stream, a graceful GOAWAY; ADR 0035).
pub fn classify(code: tonic::Code, message: &str, never_processed: bool) -> Failure {
    use tonic::Code as C;
    if never_processed {
        return Failure::NotSent;
    }
    match code {
        // etcd's ErrGRPCNoLeader ("etcdserver: no leader") is answered before a proposal.
        C::Unavailable if message.contains("no leader") => Failure::NoLeader,
        // Unknown and Internal: h2 resets and broken connections (tonic maps them so).
        C::Unavailable
        | C::DeadlineExceeded
        | C::Cancelled
        | C::Unknown
        | C::Internal
        | C::Aborted
        | C::ResourceExhausted => Failure::Interrupted,
        _ => Failure::Permanent,
    }
}

/// The kind of call, as far as sending it again goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Idempotent: any read, a keep-alive, a revoke, a compaction, opening a watch.
    Read,
    /// A transaction with compares and writes.
    GuardedWrite,
    /// A transaction with writes and no compare.
    UnguardedWrite,
    /// A lease grant.
    Grant,
}

impl Call {
    /// What a transaction is.
    pub fn of_txn(compares: usize, writes: usize) -> Call {
        match (compares, writes) {
            (_, 0) => Call::Read,
            (0, _) => Call::UnguardedWrite,
            _ => Call::GuardedWrite,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Send the call again (to the next member) after `wait`.
    Retry { wait: Duration },
    /// Re-read what the write would have written before deciding (after `wait`).
    Resolve { wait: Duration },
    /// Give up: return the error.
    Fail,
}

/// The next step after `failure` of `call`, `elapsed` into a call allowed `deadline` in all,
/// with `wait` the backoff's next wait.
pub fn decide(call: Call, failure: Failure, elapsed: Duration, deadline: Duration, wait: Duration) -> Next {
    if failure == Failure::Permanent || elapsed.saturating_add(wait) >= deadline {
        return Next::Fail;
    }
    match call {
        Call::Read | Call::GuardedWrite | Call::Grant => Next::Retry { wait },
        Call::UnguardedWrite if failure.not_applied() => Next::Retry { wait },
        Call::UnguardedWrite => Next::Resolve { wait },
    }
}

/// How long the etcd store keeps trying, and how long one attempt may take.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Time for a call, all attempts included.
    pub deadline: Duration,
    /// Time for one attempt (a member that hangs is left after this).
    pub attempt_timeout: Duration,
    /// First and largest backoff between attempts (full jitter, `skv_rpc::Backoff`).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            // An etcd leader election after its leader is killed takes 1-3 s; a client of
            // placement (skvctl, storenode, proxy) waits longer than this for an answer.
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const S: Duration = Duration::from_secs(1);
    const W: Duration = Duration::from_millis(100);

    #[test]
    fn failures_are_classified_by_what_they_say_about_the_request() {
        let table = [
            (
                Code::Unavailable,
                "tcp connect error: Connection refused",
                true,
                Failure::NotSent,
            ),
            (Code::Unavailable, "etcdserver: no leader", false, Failure::NoLeader),
            (
                Code::Unavailable,
                "etcdserver: leader changed",
                false,
                Failure::Interrupted,
            ),
            (
                Code::Unavailable,
                "error reading a body from connection",
                false,
                Failure::Interrupted,
            ),
            (
                Code::Unknown,
                "h2 protocol error: connection reset",
                false,
                Failure::Interrupted,
            ),
            (Code::Internal, "h2 protocol error", false, Failure::Interrupted),
            (
                Code::DeadlineExceeded,
                "etcdserver: request timed out",
                false,
                Failure::Interrupted,
            ),
            (
                Code::ResourceExhausted,
                "etcdserver: too many requests",
                false,
                Failure::Interrupted,
            ),
            (
                Code::NotFound,
                "etcdserver: requested lease not found",
                false,
                Failure::Permanent,
            ),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
                false,
                Failure::Permanent,
            ),
            (
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
                false,
                Failure::Permanent,
            ),
            (
                Code::PermissionDenied,
                "etcdserver: permission denied",
                false,
                Failure::Permanent,
            ),
        ];
        for (code, msg, connect, want) in table {
            assert_eq!(classify(code, msg, connect), want, "{code:?} {msg}");
        }
    }

    #[test]
    fn a_transaction_is_a_read_a_guarded_or_an_unguarded_write() {
        assert_eq!(Call::of_txn(0, 0), Call::Read);
        assert_eq!(Call::of_txn(2, 0), Call::Read);
        assert_eq!(Call::of_txn(0, 1), Call::UnguardedWrite);
        assert_eq!(Call::of_txn(1, 3), Call::GuardedWrite);
    }

    #[test]
    fn what_is_sent_again_and_what_is_re_read() {
        use Failure::*;
        let retry = Next::Retry { wait: W };
        let resolve = Next::Resolve { wait: W };
        let table = [
            (Call::Read, NotSent, retry),
            (Call::Read, Interrupted, retry),
            (Call::GuardedWrite, NotSent, retry),
            (Call::GuardedWrite, NoLeader, retry),
            // A fresh attempt re-evaluates the compares: never applied twice.
            (Call::GuardedWrite, Interrupted, retry),
            (Call::UnguardedWrite, NotSent, retry),
            (Call::UnguardedWrite, NoLeader, retry),
            // Outcome unknown: re-read, not re-applied.
            (Call::UnguardedWrite, Interrupted, resolve),
            (Call::Grant, Interrupted, retry),
            (Call::Read, Permanent, Next::Fail),
            (Call::GuardedWrite, Permanent, Next::Fail),
            (Call::UnguardedWrite, Permanent, Next::Fail),
        ];
        for (call, failure, want) in table {
            assert_eq!(decide(call, failure, S, 10 * S, W), want, "{call:?} {failure:?}");
        }
    }

    #[test]
    fn nothing_is_tried_past_the_deadline() {
        assert_eq!(decide(Call::Read, Failure::NotSent, 10 * S - W, 10 * S, W), Next::Fail);
        assert_eq!(
            decide(Call::Read, Failure::NotSent, 10 * S - 2 * W, 10 * S, W),
            Next::Retry { wait: W }
        );
    }
}
