//! Whether a failed call provably never reached the server's handler, so that a write
//! may be retried without risking a double apply (ADR 0035).
//!
//! gRPC's own clients retry such calls transparently (gRFC A6, "transparent retries"):
//! the connection could not be made; the request was still queued on a connection that
//! closed before sending it (hyper's "canceled"); or the server refused the stream
//! (`REFUSED_STREAM`) or announced with a graceful `GOAWAY` that it will not process
//! streams above the last one it accepted (RFC 9113 §8.7: those "are guaranteed not to
//! have been processed"). A stopping skv server sends exactly that `GOAWAY`, so a write
//! caught by a store's or a proxy's graceful stop is retried elsewhere instead of
//! coming back as "outcome unknown".
//!
//! Anything else that the transport raised (a reset after the request left, a broken
//! connection, a timeout) says nothing about whether the server applied it.

use std::error::Error as StdError;
use tonic::Status;

/// True when `status` was made by the client's transport and its cause chain proves the
/// request was never processed by the server. A status the server sent is never
/// "unprocessed" here: what it means is the caller's to decide from its code.
pub fn never_processed(status: &Status) -> bool {
    StdError::source(status).is_some_and(never_processed_cause)
}

/// The same judgement over an error and its cause chain (etcd-client's transport errors).
pub fn never_processed_cause(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if unprocessed_cause(e) {
            return true;
        }
        cur = e.source();
    }
    false
}

/// How rustls displays `AlertReceived` and `InvalidCertificate`.
const TLS_REFUSAL_TEXTS: [&str; 2] = ["received fatal alert: ", "invalid peer certificate: "];

/// True when the cause chain holds a TLS refusal: the peer's TLS alert (it refused our
/// certificate, or wanted one we did not present) or our rejection of its certificate.
/// Configuration, not weather: sending the call again gets the same answer, so callers
/// report it at once instead of retrying (placement's etcd client).
pub fn tls_refused_cause(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<tokio_rustls::rustls::Error>() {
            return matches!(
                t,
                tokio_rustls::rustls::Error::AlertReceived(_) | tokio_rustls::rustls::Error::InvalidCertificate(_)
            );
        }
        // io::Error's `source` skips the error it wraps (tokio-rustls wraps rustls' there).
        // tonic's TLS connector keeps only rustls' text ("received fatal alert: …",
        // "invalid peer certificate: …"; pinned by a test below), so the text is read too.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if tls_refused_cause(inner) {
                return true;
            }
            let text = inner.to_string();
            if TLS_REFUSAL_TEXTS.iter().any(|p| text.starts_with(p)) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// One link of a cause chain, judged alone.
fn unprocessed_cause(e: &(dyn StdError + 'static)) -> bool {
    if e.is::<tonic::ConnectError>() {
        return true;
    }
    if let Some(h) = e.downcast_ref::<hyper::Error>() {
        // hyper marks "canceled" only requests that were never written to a connection
        // (queued when it closed, or the connection was not ready).
        return h.is_canceled();
    }
    if let Some(h) = e.downcast_ref::<h2::Error>() {
        return match h.reason() {
            Some(h2::Reason::REFUSED_STREAM) => true,
            // A graceful GOAWAY (NO_ERROR) fails only the streams above its last stream
            // id with this error; an error GOAWAY applies to streams that may have run.
            Some(h2::Reason::NO_ERROR) => h.is_go_away() && h.is_remote(),
            _ => false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(e: impl StdError + Send + Sync + 'static) -> Status {
        Status::from_error(Box::new(e))
    }

    #[test]
    fn a_tls_refusal_is_found_through_io_errors_and_nothing_else_is() {
        use tokio_rustls::rustls::{AlertDescription, CertificateError, Error as TlsError};
        let io = |e: TlsError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let refused = transport(io(TlsError::AlertReceived(AlertDescription::CertificateRequired)));
        assert!(StdError::source(&refused).is_some_and(tls_refused_cause));
        let bad_cert = io(TlsError::InvalidCertificate(CertificateError::UnknownIssuer));
        assert!(tls_refused_cause(&bad_cert));
        for other in [
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"),
            io(TlsError::DecryptError),
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not tls"),
        ] {
            assert!(!tls_refused_cause(&other), "{other}");
        }
        // A refusal is not "never processed": the rule for retrying stays the caller's.
        assert!(!never_processed(&refused));
        // Only rustls' text survives tonic's connector: the texts are rustls' Display.
        let alert = TlsError::AlertReceived(AlertDescription::BadCertificate).to_string();
        let cert = TlsError::InvalidCertificate(CertificateError::Expired).to_string();
        assert!(alert.starts_with(TLS_REFUSAL_TEXTS[0]), "{alert}");
        assert!(cert.starts_with(TLS_REFUSAL_TEXTS[1]), "{cert}");
        let as_text = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        assert!(tls_refused_cause(&as_text));
    }

    #[test]
    fn refused_streams_and_connect_errors_were_never_processed() {
        assert!(never_processed(&transport(h2::Error::from(h2::Reason::REFUSED_STREAM))));
        let connect = tonic::ConnectError(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert!(never_processed(&transport(connect)));
    }

    #[test]
    fn resets_and_broken_connections_may_have_been_processed() {
        // The server sent these: what they mean is the code's business, not the transport's.
        assert!(!never_processed(&Status::unavailable("connection reset")));
        assert!(!never_processed(&Status::cancelled("operation was canceled")));
        // A reset after the request left: CANCEL, INTERNAL_ERROR, and a NO_ERROR reset
        // that is not a GOAWAY.
        for r in [h2::Reason::CANCEL, h2::Reason::INTERNAL_ERROR, h2::Reason::NO_ERROR] {
            assert!(!never_processed(&transport(h2::Error::from(r))), "{r:?}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        assert!(!never_processed(&transport(io)));
    }
}
