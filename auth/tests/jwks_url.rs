//! `--jwt-jwks-url` against a real HTTPS server on 127.0.0.1 (tokio-rustls, a development
//! CA): keys load from the URL, a rotation on the server is picked up by the reloader, an
//! http:// URL and a server of another CA are refused, and a failing server keeps the keys.

#[path = "keys/mod.rs"]
mod keys;

use skv_auth::{AuthError, Claims, KeyError, KeySource, Reload, Role, SigningKey, Verifier, mint};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Serves `body` (status 200, or 500 while it is empty) over HTTPS with `certs`' proxy
/// certificate; returns its port.
async fn serve(certs: &Path, body: Arc<parking_lot::Mutex<String>>) -> u16 {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.join("proxy.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("proxy-key.pem")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = body.lock().clone();
                let status = if text.is_empty() {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn jwks(entries: &[(&SigningKey, &str)]) -> String {
    let keys: Vec<_> = entries.iter().map(|(k, kid)| k.public_jwk(kid).unwrap()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn jwks_url_loads_rotates_and_refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    skv_rpc::certs::create(&certs, &["127.0.0.1".into()], 1, false).unwrap();
    skv_rpc::certs::create(&other, &["127.0.0.1".into()], 1, false).unwrap();
    let old = SigningKey::from_pem(keys::ec().private_pem.as_bytes()).unwrap();
    let new = SigningKey::from_pem(keys::rsa().private_pem.as_bytes()).unwrap();
    let body = Arc::new(parking_lot::Mutex::new(jwks(&[(&old, "old")])));
    let port = serve(&certs, body.clone()).await;
    let url = format!("https://127.0.0.1:{port}/.well-known/jwks.json");
    let source = KeySource::JwksUrl {
        url: url.clone(),
        ca_file: certs.join("ca.pem"),
    };
    let (v, mut reloader) = Verifier::load_async(source, "skv", "skv").await.unwrap();
    let claims = Claims::new("t", "tenant", Role::Write, Duration::from_secs(600));
    let t_old = mint(&old, Some("old"), &claims).unwrap();
    let t_new = mint(&new, Some("new"), &claims).unwrap();
    assert!(v.verify(&t_old).is_ok());
    assert_eq!(v.verify(&t_new), Err(AuthError::UnknownKey));
    assert_eq!(reloader.check(&v).await, Reload::Unchanged);
    // Rotation on the server: both, then the new one only.
    *body.lock() = jwks(&[(&old, "old"), (&new, "new")]);
    assert_eq!(reloader.check(&v).await, Reload::Loaded);
    assert!(v.verify(&t_new).is_ok() && v.verify(&t_old).is_ok());
    *body.lock() = jwks(&[(&new, "new")]);
    assert_eq!(reloader.check(&v).await, Reload::Loaded);
    assert_eq!(v.verify(&t_old), Err(AuthError::UnknownKey));
    // The server fails: the keys stay.
    body.lock().clear();
    assert_eq!(reloader.check(&v).await, Reload::Unchanged);
    assert!(v.verify(&t_new).is_ok());

    // http:// is refused before any connection.
    let e = Verifier::load_async(
        KeySource::JwksUrl {
            url: url.replace("https://", "http://"),
            ca_file: certs.join("ca.pem"),
        },
        "skv",
        "skv",
    )
    .await
    .err()
    .unwrap();
    assert!(e.to_string().contains("only https://"), "{e}");
    // A server whose certificate is not of the given CA.
    *body.lock() = jwks(&[(&new, "new")]);
    let e = Verifier::load_async(
        KeySource::JwksUrl {
            url: url.clone(),
            ca_file: other.join("ca.pem"),
        },
        "skv",
        "skv",
    )
    .await
    .err()
    .unwrap();
    println!("JWKS URL with another CA: {e}");
    assert!(
        matches!(e, KeyError::Fetch { .. }) && e.to_string().contains("TLS"),
        "{e}"
    );
    // The sync loader says what to use.
    assert!(
        Verifier::load(
            KeySource::JwksUrl {
                url,
                ca_file: certs.join("ca.pem")
            },
            "skv",
            "skv"
        )
        .is_err()
    );
}
