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
                tokio::spawn(async move {
                    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        // Named so that an operator sees why a peer cannot connect (plaintext,
                        // another CA, an expired or missing certificate); one line per refusal.
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(ReceiverStream::new(rx))
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
