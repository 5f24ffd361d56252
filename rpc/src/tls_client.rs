//! Client TLS that follows its files (ADR 0022): a connector for tonic channels that opens
//! TCP (TCP_NODELAY), then a rustls handshake (aws-lc-rs) with the configuration built from
//! the CA, certificate and key files as they are now. The files are re-read when a new
//! connection is opened and the last read is older than [`RELOAD_EVERY`]; changed bytes that
//! load replace the configuration, bytes that do not load keep the previous one (logged).
//! Open connections keep the certificate they were made with.

use crate::tls::{TlsError, read_cert, read_key};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::codegen::http::Uri;

/// How old the last read of the files may be when a connection opens.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// The files' bytes (CA, and certificate and key when we present one).
type Snapshot = (Vec<u8>, Option<(Vec<u8>, Vec<u8>)>);

struct State {
    bytes: Snapshot,
    config: Arc<rustls::ClientConfig>,
    checked: Instant,
    refused: Option<Snapshot>,
}

/// The files of a [`crate::tls::ClientTls`] and the configuration built from them, shared
/// by every clone.
#[derive(Clone)]
pub(crate) struct Files {
    ca_file: PathBuf,
    identity: Option<(PathBuf, PathBuf)>,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.identity.as_ref().map(|(c, _)| c))
            .finish()
    }
}

impl Files {
    pub(crate) fn load(ca_file: &Path, identity: Option<(&Path, &Path)>) -> Result<Files, TlsError> {
        let identity = identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf()));
        let bytes = snapshot(ca_file, identity.as_ref())?;
        let config = build(ca_file, identity.as_ref(), &bytes)?;
        Ok(Files {
            ca_file: ca_file.to_path_buf(),
            identity,
            state: Arc::new(Mutex::new(State {
                bytes,
                config,
                checked: Instant::now(),
                refused: None,
            })),
        })
    }

    /// The configuration for a new connection, re-reading the files if the last read is
    /// older than `every`.
    async fn current(&self, every: Duration) -> Arc<rustls::ClientConfig> {
        let stale = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.checked.elapsed() < every {
                return st.config.clone();
            }
            st.checked = Instant::now();
            st.config.clone()
        };
        let (ca, id) = (self.ca_file.clone(), self.identity.clone());
        let read = tokio::task::spawn_blocking(move || snapshot(&ca, id.as_ref())).await;
        let Ok(Ok(bytes)) = read else {
            return stale; // a file missing mid-rename: keep the previous, try again later
        };
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if bytes == st.bytes || st.refused.as_ref() == Some(&bytes) {
            return st.config.clone();
        }
        match build(&self.ca_file, self.identity.as_ref(), &bytes) {
            Ok(c) => {
                st.config = c;
                st.bytes = bytes;
                st.refused = None;
                tracing::info!(ca = %self.ca_file.display(), "client TLS files reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "client TLS files changed but do not load; keeping the previous ones");
                st.refused = Some(bytes);
            }
        }
        st.config.clone()
    }

    /// A connector for tonic that uses these files.
    pub(crate) fn connector(&self) -> Connector {
        Connector {
            files: self.clone(),
            every: RELOAD_EVERY,
        }
    }
}

fn snapshot(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> Result<Snapshot, TlsError> {
    let id = match identity {
        Some((c, k)) => Some((read_cert(c)?, read_key(k)?)),
        None => None,
    };
    Ok((read_cert(ca)?, id))
}

fn build(
    ca_file: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
    s: &Snapshot,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&s.0) {
        let c = c.map_err(|e| invalid(ca_file, e.to_string()))?;
        roots.add(c).map_err(|e| invalid(ca_file, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Tonic(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (identity, &s.1) {
        (Some((cert_file, key_file)), Some((cert, key))) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<_, _>>()
                .map_err(|e| invalid(cert_file, e.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(key_file, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(cert_file, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// tonic's connector: TCP with TCP_NODELAY, then TLS with the files' current configuration.
#[derive(Clone)]
pub(crate) struct Connector {
    files: Files,
    every: Duration,
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Io, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (files, every) = (self.files.clone(), self.every);
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
            let config = files.current(every).await;
            let tls = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("TLS handshake with {host}:{port} timed out"),
                )
            })?
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {host}:{port} failed: {e}")))?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

impl Connector {
    #[cfg(all(test, feature = "dev-certs"))]
    pub(crate) fn with_reload_every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }
}

#[cfg(all(test, feature = "dev-certs"))]
mod tests {
    use super::*;
    use crate::tls::{PeerRole, ServerTls};
    use tokio_stream::StreamExt as _;
    use tonic::codegen::Service as _;

    /// The client presents a certificate replaced on disk on its next connection, without
    /// being rebuilt.
    #[tokio::test]
    async fn a_rotated_client_certificate_is_presented_on_new_connections() {
        let dir = std::env::temp_dir().join(format!("skv-tls-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let hosts = vec!["127.0.0.1".to_string()];
        crate::certs::create(&dir, &hosts, 30, false).unwrap();
        let server = ServerTls {
            cert_file: dir.join("placement.pem"),
            key_file: dir.join("placement-key.pem"),
            client_ca_file: Some(dir.join("ca.pem")),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = server.incoming(listener).unwrap();
        let own = dir.join("client");
        std::fs::create_dir_all(&own).unwrap();
        for f in ["admin.pem", "admin-key.pem"] {
            std::fs::copy(dir.join(f), own.join(f)).unwrap();
        }
        let files = Files::load(
            &dir.join("ca.pem"),
            Some((&own.join("admin.pem"), &own.join("admin-key.pem"))),
        )
        .unwrap();
        let mut connector = files.connector().with_reload_every(Duration::ZERO);
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let mut seen = Vec::new();
        for round in 0..2 {
            if round == 1 {
                // Rotate: a new certificate and key of the same CA, renamed into place.
                let staged = dir.join("staged");
                crate::certs::reissue(&dir, &staged, PeerRole::Admin, &hosts, 7).unwrap();
                for f in ["admin-key.pem", "admin.pem"] {
                    std::fs::rename(staged.join(f), own.join(f)).unwrap();
                }
            }
            let _client = connector.call(uri.clone()).await.unwrap();
            let accepted = incoming.next().await.unwrap().unwrap();
            let der = accepted.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec();
            assert_eq!(crate::tls::role_of_der(&der), Some(PeerRole::Admin));
            seen.push(der);
        }
        assert_ne!(
            seen[0], seen[1],
            "the second connection must present the rotated certificate"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
