//! TLS termination for skv's servers with certificate reload (ADR 0022): the connections of
//! [`crate::incoming`] go through a rustls handshake (aws-lc-rs) with the configuration in
//! force at that moment; a task re-reads the certificate, key and CA files every
//! [`RELOAD_EVERY`] and, when their bytes changed and they load, swaps the configuration for
//! the next handshakes. Connections already open keep theirs. A change that does not load
//! keeps the previous configuration (logged once per distinct content). tonic exposes the
//! peer's certificates of these streams to the services (`Request::peer_certs`).

use crate::tls::{ServerTls, TlsError, read_cert, read_key};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

/// How often the files are re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Refused handshakes logged per [`REFUSAL_LOG_WINDOW`] and listener; past that they are
/// counted and summed up in one line when the window ends (a port scan or a misconfigured
/// client retrying in a loop must not flood the log).
const REFUSAL_LOG_BURST: u32 = 10;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// The files' bytes, to notice a change.
type Snapshot = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

impl ServerTls {
    fn snapshot(&self) -> Result<Snapshot, TlsError> {
        let ca = match &self.client_ca_file {
            Some(p) => Some(read_cert(p)?),
            None => None,
        };
        Ok((read_cert(&self.cert_file)?, read_key(&self.key_file)?, ca))
    }

    fn rustls_config(&self, s: &Snapshot) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let invalid = |path: &std::path::Path, reason: String| TlsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&s.0)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(&self.cert_file, e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&s.1).map_err(|e| invalid(&self.key_file, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Tonic(e.to_string()))?;
        let builder = match (&self.client_ca_file, &s.2) {
            (Some(path), Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(ca) {
                    let c = c.map_err(|e| invalid(path, e.to_string()))?;
                    roots.add(c).map_err(|e| invalid(path, e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| invalid(path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid(&self.cert_file, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The TLS connections accepted on `listener` (through [`crate::incoming`]), with the
    /// files re-read every [`RELOAD_EVERY`]. Fails at once if the files do not load. The
    /// listener closes when the returned stream is dropped.
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
    ) -> Result<ReceiverStream<io::Result<TlsStream<TcpStream>>>, TlsError> {
        self.incoming_every(listener, RELOAD_EVERY)
    }

    /// [`ServerTls::incoming`] with another reload interval (tests).
    pub fn incoming_every(
        &self,
        listener: tokio::net::TcpListener,
        reload_every: Duration,
    ) -> Result<ReceiverStream<io::Result<TlsStream<TcpStream>>>, TlsError> {
        let mut last = self.snapshot()?;
        let current = Arc::new(parking_lot_free::Slot::new(self.rustls_config(&last)?));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut tcp = crate::incoming(listener);
        let files = self.clone();
        {
            let (current, tx) = (current.clone(), tx.clone());
            tokio::spawn(async move {
                let mut refused: Option<Snapshot> = None;
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(reload_every) => {}
                    }
                    let files2 = files.clone();
                    let Ok(Ok(snap)) = tokio::task::spawn_blocking(move || files2.snapshot()).await else {
                        continue; // a file missing mid-rename: try again next time
                    };
                    if snap == last || refused.as_ref() == Some(&snap) {
                        continue;
                    }
                    match files.rustls_config(&snap) {
                        Ok(c) => {
                            current.set(c);
                            last = snap;
                            refused = None;
                            tracing::info!(cert = %files.cert_file.display(), "TLS certificate reloaded");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones");
                            refused = Some(snap);
                        }
                    }
                }
            });
        }
        let refusals = Arc::new(std::sync::Mutex::new(LogBudget::new(
            REFUSAL_LOG_BURST,
            REFUSAL_LOG_WINDOW,
        )));
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = tx.closed() => return,
                    c = tcp.next() => c,
                };
                let stream = match conn {
                    Some(Ok(s)) => s,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "accept failed");
                        continue;
                    }
                    None => return,
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(current.get());
                let tx = tx.clone();
                let refusals = refusals.clone();
                tokio::spawn(async move {
                    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    let refused = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timed out".to_string(),
                    };
                    // Named so that an operator sees why a peer cannot connect (plaintext,
                    // another CA, an expired or missing certificate); a few lines per window,
                    // then a count.
                    let verdict = match refusals.lock() {
                        Ok(mut b) => b.admit(std::time::Instant::now()),
                        Err(p) => p.into_inner().admit(std::time::Instant::now()),
                    };
                    match verdict {
                        Admit::Log { suppressed_before: 0 } => {
                            tracing::info!(%peer, error = %refused, "TLS handshake refused")
                        }
                        Admit::Log { suppressed_before } => tracing::info!(
                            %peer,
                            error = %refused,
                            suppressed_before,
                            "TLS handshake refused ({suppressed_before} more were refused and not logged in the previous minute)"
                        ),
                        Admit::Suppress => {}
                    }
                });
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// What [`LogBudget::admit`] decided for one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Log it, and say how many were suppressed in the windows before it.
    Log { suppressed_before: u64 },
    /// Count it, do not log it.
    Suppress,
}

/// At most `burst` log lines per `window` (pure; the caller passes the clock). Suppressed
/// events are counted and reported with the next line that is logged.
#[derive(Debug)]
pub struct LogBudget {
    burst: u32,
    window: Duration,
    window_start: Option<std::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogBudget {
    pub fn new(burst: u32, window: Duration) -> Self {
        LogBudget {
            burst,
            window,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    pub fn admit(&mut self, now: std::time::Instant) -> Admit {
        let fresh = match self.window_start {
            None => true,
            Some(start) => now.saturating_duration_since(start) >= self.window,
        };
        if fresh {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            let suppressed_before = std::mem::take(&mut self.suppressed);
            Admit::Log { suppressed_before }
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            Admit::Suppress
        }
    }
}

/// The configuration in force, swapped whole by the reload task.
mod parking_lot_free {
    use std::sync::{Arc, RwLock};

    pub(super) struct Slot<T>(RwLock<Arc<T>>);

    impl<T> Slot<T> {
        pub(super) fn new(v: Arc<T>) -> Self {
            Slot(RwLock::new(v))
        }

        pub(super) fn get(&self) -> Arc<T> {
            match self.0.read() {
                Ok(g) => g.clone(),
                Err(p) => p.into_inner().clone(),
            }
        }

        pub(super) fn set(&self, v: Arc<T>) {
            match self.0.write() {
                Ok(mut g) => *g = v,
                Err(p) => *p.into_inner() = v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Admit, LogBudget};
    use std::time::{Duration, Instant};

    #[test]
    fn a_flood_of_refusals_logs_a_burst_then_a_count() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(3, Duration::from_secs(60));
        let first: Vec<Admit> = (0..1000).map(|i| b.admit(t0 + Duration::from_millis(i))).collect();
        assert_eq!(first.iter().filter(|a| matches!(a, Admit::Log { .. })).count(), 3);
        assert!(first[..3].iter().all(|a| *a == Admit::Log { suppressed_before: 0 }));
        // The next window logs again and reports the 997 it dropped.
        assert_eq!(
            b.admit(t0 + Duration::from_secs(61)),
            Admit::Log { suppressed_before: 997 }
        );
        assert_eq!(
            b.admit(t0 + Duration::from_secs(62)),
            Admit::Log { suppressed_before: 0 }
        );
    }

    #[test]
    fn a_quiet_server_logs_every_refusal() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(3, Duration::from_secs(60));
        for i in 0..20u64 {
            assert_eq!(
                b.admit(t0 + Duration::from_secs(i * 30)),
                Admit::Log { suppressed_before: 0 },
                "refusal {i}"
            );
        }
    }
}
