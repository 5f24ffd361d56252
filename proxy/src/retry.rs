//! The proxy's retry decision, pure: after one attempt at a storenode, what next?
//!
//! [`crate::router::Router::call`] does the I/O and asks [`decide`]; routing errors in
//! an answer's body are decided by [`crate::routing::RangeCache::on_routing_error`].
//! The rule that matters: a write is retried only when it certainly was not applied
//! (never sent, or refused before it was applied); otherwise its outcome is unknown and
//! the client is told so (ADR 0006).

use std::time::Duration;
use tonic::Code;

/// A read attempt that would leave less than this for a retry gets the whole deadline.
pub const READ_RETRY_MIN: Duration = Duration::from_millis(100);

/// What kind of request goes through the router; decides what may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Linearizable read: retried on any transport error.
    Read,
    /// Follower read allowed: retried on any transport error; success says nothing about leadership.
    StaleRead,
    /// Write: retried only when it certainly was not applied.
    Write,
}

/// What one attempt came to, when it was not an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// No answer in the attempt's time; `had_all_time` when the attempt had all the time left.
    TimedOut { had_all_time: bool },
    /// The request never reached the storenode: no connection, or the transport proves it
    /// unprocessed (`skv_rpc::never_processed`, ADR 0035).
    NotSent,
    /// The connection failed after the request was sent (a transport error, whatever
    /// code tonic gave it: h2's ENHANCE_YOUR_CALM becomes RESOURCE_EXHAUSTED).
    Broken,
    /// The storenode answered with this gRPC status.
    Failed(Code),
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try another replica (avoid this store; forget it as leader if it was).
    Retry,
    /// Give up: the caller's deadline is spent.
    DeadlineExceeded,
    /// Give up with the storenode's own code: it refused without applying anything.
    Refused(Code),
    /// Give up: a write may or may not have been applied.
    OutcomeUnknown,
}

/// Codes by which a storenode refuses a request without applying it.
pub fn definite_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::ResourceExhausted
    )
}

/// The decision after a failed attempt.
pub fn decide(kind: Kind, attempt: Attempt) -> Next {
    match (kind, attempt) {
        (_, Attempt::NotSent) => Next::Retry,
        (Kind::Write, Attempt::Broken) => Next::OutcomeUnknown,
        (_, Attempt::Broken) => Next::Retry,
        (_, Attempt::Failed(code)) if definite_refusal(code) => Next::Refused(code),
        (Kind::Write, Attempt::TimedOut { .. } | Attempt::Failed(_)) => Next::OutcomeUnknown,
        (_, Attempt::TimedOut { had_all_time: true }) => Next::DeadlineExceeded,
        (_, Attempt::TimedOut { had_all_time: false } | Attempt::Failed(_)) => Next::Retry,
    }
}

/// How long one attempt may take, given what is left of the deadline. A write gets all
/// of it (after a timeout it cannot be retried); a read keeps half back for another
/// replica, unless that would leave too little for either.
pub fn attempt_budget(kind: Kind, remaining: Duration) -> Duration {
    match kind {
        Kind::Write => remaining,
        _ if remaining > READ_RETRY_MIN * 2 => remaining / 2,
        _ => remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Attempt::*;
    use Kind::*;

    #[test]
    fn decision_table() {
        let t = |had_all_time| TimedOut { had_all_time };
        let table = [
            // kind, attempt, next
            (Read, NotSent, Next::Retry),
            (StaleRead, NotSent, Next::Retry),
            (Write, NotSent, Next::Retry),
            (Read, t(false), Next::Retry),
            (StaleRead, t(false), Next::Retry),
            (Read, t(true), Next::DeadlineExceeded),
            (StaleRead, t(true), Next::DeadlineExceeded),
            (Write, t(false), Next::OutcomeUnknown),
            (Write, t(true), Next::OutcomeUnknown),
            (Read, Broken, Next::Retry),
            (StaleRead, Broken, Next::Retry),
            (Write, Broken, Next::OutcomeUnknown),
            (Read, Failed(Code::Unavailable), Next::Retry),
            (Read, Failed(Code::Internal), Next::Retry),
            (Read, Failed(Code::Unknown), Next::Retry),
            (Write, Failed(Code::Unavailable), Next::OutcomeUnknown),
            (Write, Failed(Code::Internal), Next::OutcomeUnknown),
            (Write, Failed(Code::Cancelled), Next::OutcomeUnknown),
            (Write, Failed(Code::DeadlineExceeded), Next::OutcomeUnknown),
            (
                Read,
                Failed(Code::InvalidArgument),
                Next::Refused(Code::InvalidArgument),
            ),
            (
                Write,
                Failed(Code::InvalidArgument),
                Next::Refused(Code::InvalidArgument),
            ),
            (
                Write,
                Failed(Code::ResourceExhausted),
                Next::Refused(Code::ResourceExhausted),
            ),
            (
                Write,
                Failed(Code::FailedPrecondition),
                Next::Refused(Code::FailedPrecondition),
            ),
            (
                StaleRead,
                Failed(Code::PermissionDenied),
                Next::Refused(Code::PermissionDenied),
            ),
        ];
        for (kind, attempt, want) in table {
            assert_eq!(decide(kind, attempt), want, "{kind:?} after {attempt:?}");
        }
    }

    #[test]
    fn budgets() {
        let ms = Duration::from_millis;
        let table = [
            (Write, ms(1000), ms(1000)),
            (Write, ms(10), ms(10)),
            (Read, ms(1000), ms(500)),
            (StaleRead, ms(1000), ms(500)),
            (Read, ms(201), ms(100) + Duration::from_micros(500)),
            (Read, ms(200), ms(200)),
            (Read, ms(0), ms(0)),
        ];
        for (kind, remaining, want) in table {
            assert_eq!(
                attempt_budget(kind, remaining),
                want,
                "{kind:?} with {remaining:?} left"
            );
        }
    }
}
