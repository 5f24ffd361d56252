use crate::RpcError;
use crate::tls::ClientTls;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Connection settings. The defaults suit traffic inside the cluster.
#[derive(Clone, Debug)]
pub struct EndpointOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval; a dead peer is noticed within `keepalive_interval + keepalive_timeout`.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Deadline of every call on the channel, when the caller sets none of its own.
    pub request_timeout: Option<Duration>,
    /// TLS to the server (and our certificate, for mTLS). With it, a bare `host:port` means
    /// `https://host:port` (an explicit `http://` URL stays plaintext); without it,
    /// `https://` is refused.
    pub tls: Option<ClientTls>,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            request_timeout: None,
            tls: None,
        }
    }
}

/// `host:port` → `http://host:port`; a URL is kept as it is.
pub fn url(addr: &str) -> String {
    url_with(addr, false)
}

/// `host:port` → `https://host:port` when `tls`, else `http://host:port`; a URL is kept.
pub fn url_with(addr: &str, tls: bool) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// An endpoint with the default [`EndpointOptions`].
pub fn endpoint(addr: &str) -> Result<Endpoint, RpcError> {
    endpoint_with(addr, &EndpointOptions::default())
}

/// Cancelled streams whose late frames HTTP/2 remembers (and ignores) per connection.
///
/// skv cancels streams as a matter of course: a scan that reached its limit, an attempt
/// that timed out. h2 remembers only 50 reset streams for 1 s by default; a DATA frame for
/// a forgotten one makes h2 reset it again and count that as a local error, and after
/// 1024 such errors it closes the whole connection with GOAWAY(ENHANCE_YOUR_CALM), failing
/// every call in flight on it (seen under YCSB-E: short scans on a busy proxy). Peers of
/// these channels are skv's own servers, so remembering more costs only memory.
const REMEMBERED_RESETS: usize = 16 * 1024;

/// An endpoint for `addr` (`host:port` or a URL). `TCP_NODELAY` is always on: skv's
/// messages are small request/response pairs, and Nagle plus delayed ACKs would add
/// ~40 ms to them.
pub fn endpoint_with(addr: &str, o: &EndpointOptions) -> Result<Endpoint, RpcError> {
    let u = url_with(addr, o.tls.is_some());
    let bad = |reason: String| RpcError::BadAddress {
        addr: u.clone(),
        reason,
    };
    let ep = Endpoint::from_shared(u.clone()).map_err(|e| bad(e.to_string()))?;
    let ep = match (&o.tls, u.starts_with("https://")) {
        (Some(tls), true) => ep.tls_config(tls.config()).map_err(|e| bad(e.to_string()))?,
        (None, false) => ep,
        (None, true) => {
            return Err(bad(
                "https:// needs the CA that signed the server's certificate (--ca-file, SKV_CA_FILE)".into(),
            ));
        }
        // Spelled out by the caller: plaintext (a TLS server refuses it at the handshake).
        (Some(_), false) => ep,
    };
    let ep = match o.request_timeout {
        Some(t) => ep.timeout(t),
        None => ep,
    };
    Ok(ep
        .http2_max_concurrent_reset_streams(REMEMBERED_RESETS)
        .connect_timeout(o.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(o.keepalive_interval)
        .keep_alive_timeout(o.keepalive_timeout)
        .keep_alive_while_idle(true))
}

/// A channel to `addr` that connects on first use (and reconnects after failures). With
/// [`EndpointOptions::tls`] and an https address, each new connection does its handshake
/// with the client TLS files as they are then (re-read at most every 5 s, ADR 0022): a
/// rotated certificate or CA is used without rebuilding the channel.
pub fn channel_with(addr: &str, o: &EndpointOptions) -> Result<Channel, RpcError> {
    let u = url_with(addr, o.tls.is_some());
    match (&o.tls, u.strip_prefix("https://")) {
        (Some(tls), Some(rest)) => {
            // tonic's own TLS would fix the configuration now: connect through ours, on an
            // http:// endpoint (so tonic adds no TLS of its own) with an https origin.
            let plain = EndpointOptions { tls: None, ..o.clone() };
            let origin: tonic::codegen::http::Uri =
                u.parse()
                    .map_err(|e: tonic::codegen::http::uri::InvalidUri| RpcError::BadAddress {
                        addr: u.clone(),
                        reason: e.to_string(),
                    })?;
            let ep = endpoint_with(&format!("http://{rest}"), &plain)?.origin(origin);
            Ok(ep.connect_with_connector_lazy(tls.files.connector()))
        }
        _ => Ok(endpoint_with(addr, o)?.connect_lazy()),
    }
}

/// A channel that connects on first use (and reconnects after failures).
pub fn lazy_channel(addr: &str) -> Result<Channel, RpcError> {
    Ok(endpoint(addr)?.connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for (input, want) in [
            ("127.0.0.1:7000", "http://127.0.0.1:7000"),
            (" 127.0.0.1:7000 ", "http://127.0.0.1:7000"),
            ("http://h:1", "http://h:1"),
            ("https://h:1", "https://h:1"),
        ] {
            assert_eq!(url(input), want, "{input}");
        }
    }

    #[test]
    fn tls_and_schemes_must_agree() {
        assert_eq!(url_with("h:1", true), "https://h:1");
        assert_eq!(url_with("http://h:1", true), "http://h:1");
        let e = endpoint("https://127.0.0.1:1").unwrap_err().to_string();
        assert!(e.contains("--ca-file"), "{e}");
    }

    #[test]
    fn bad_address_is_an_error_not_a_panic() {
        assert!(matches!(
            endpoint("http://bad host:1"),
            Err(RpcError::BadAddress { .. })
        ));
        assert!(endpoint("127.0.0.1:1").is_ok());
    }
}
