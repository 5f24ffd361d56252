//! One HTTPS GET of a JWKS (`--jwt-jwks-url`): hyper's HTTP/1 client over tokio-rustls on
//! aws-lc-rs, the server checked against `--jwt-jwks-ca-file` (no system roots are built
//! in: name the bundle to trust, e.g. /etc/ssl/certs/ca-certificates.crt). Plain HTTP is
//! refused: whoever could change the answer would hand out every tenant.

use crate::{KeyError, MAX_KEY_FILE_LEN};
use http_body_util::{BodyExt as _, Empty, Limited};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Connect, handshake, request and body, each at most this long.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

fn fail(url: &str, reason: impl Into<String>) -> KeyError {
    KeyError::Fetch {
        url: url.to_string(),
        reason: reason.into(),
    }
}

/// Checks that `url` is an https URL with a host; returns (host, port, path and query).
pub(crate) fn parse(url: &str) -> Result<(String, u16, String), KeyError> {
    let uri: http::Uri = url.parse().map_err(|e| fail(url, format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(fail(
            url,
            "only https:// is accepted (keys fetched in plaintext could be replaced on the way)",
        ));
    }
    let host = uri.host().ok_or_else(|| fail(url, "no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
    Ok((host, port, path))
}

/// The rustls client configuration trusting the certificates of `ca_file`.
pub(crate) fn tls_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, KeyError> {
    let pem = crate::read_key_file(ca_file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| crate::invalid(ca_file, format!("not a PEM certificate bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| crate::invalid(ca_file, format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(crate::invalid(ca_file, "holds no certificate"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KeyError::Unusable(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// GETs `url` (at most [`MAX_KEY_FILE_LEN`] bytes of body, status 200 only).
pub(crate) async fn get(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, KeyError> {
    tokio::time::timeout(FETCH_TIMEOUT, get_inner(url, tls))
        .await
        .map_err(|_| fail(url, format!("no answer within {FETCH_TIMEOUT:?}")))?
}

async fn get_inner(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, KeyError> {
    let (host, port, path) = parse(url)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| fail(url, format!("connecting: {e}")))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| fail(url, format!("host name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| fail(url, format!("TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| fail(url, format!("HTTP: {e}")))?;
    let conn = tokio::spawn(conn);
    let authority = if port == 443 { host } else { format!("{host}:{port}") };
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "skv")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| fail(url, format!("request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(url, format!("HTTP: {e}")))?;
    if response.status() != http::StatusCode::OK {
        conn.abort();
        return Err(fail(url, format!("HTTP status {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_KEY_FILE_LEN as usize)
        .collect()
        .await
        .map_err(|e| fail(url, format!("body (at most {MAX_KEY_FILE_LEN} bytes): {e}")))?;
    conn.abort();
    Ok(body.to_bytes().to_vec())
}
