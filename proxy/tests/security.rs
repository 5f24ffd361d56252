//! Issue 12 at the proxy, over real sockets: JWT keys (RS256, ES256, JWKS rotation by
//! `kid` without a restart, algorithm confusion, short HS256 secrets refused at start by
//! the real binary) and tenant quotas (one tenant flooding while another keeps its
//! latency; per-namespace overrides from the `--config` file of the real binary).
//!
//! The cluster behind the proxy is the fake one of `tests/fake` (in-memory storenodes),
//! so the latencies printed are the proxy's own, not a storenode's.

mod fake;
#[path = "../../auth/tests/keys/mod.rs"]
mod keys;

use fake::{Options, req};
use skv_proto::v1::kv_client::KvClient;
use skv_proto::v1::*;
use skv_proxy::auth::{Claims, Role, SigningKey, mint, mint_hs256};
use skv_proxy::quota::{RETRY_AFTER_METADATA_KEY, TenantOverride};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

fn claims(ns: &str) -> Claims {
    Claims::new("test", ns, Role::Write, Duration::from_secs(600))
}

fn signer(pem: &str) -> SigningKey {
    SigningKey::from_pem(pem.as_bytes()).unwrap()
}

fn jwks(entries: &[(&SigningKey, &str)]) -> String {
    let keys: Vec<_> = entries.iter().map(|(k, kid)| k.public_jwk(kid).unwrap()).collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// Writes `text` to `path` the way an operator should: a temporary file renamed into place.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn put(c: &mut KvClient<Channel>, token: &str, key: &[u8]) -> Result<u64, tonic::Status> {
    c.put(req(
        PutRequest {
            key: key.to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        },
        token,
    ))
    .await
    .map(|r| r.into_inner().version)
}

/// Polls `f` every 50 ms until it is true, for at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_tokens_accepted() {
    for (pair, alg) in [(keys::rsa(), "RS256"), (keys::ec(), "ES256")] {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("public.pem");
        std::fs::write(&public, &pair.public_pem).unwrap();
        let cl = fake::start_with(Options::default(), |c| {
            c.jwt.jwt_hs256_secret_file = None;
            c.jwt.jwt_public_key_file = Some(public.clone());
        })
        .await;
        let mut c = cl.client().await;
        let key = signer(&pair.private_pem);
        let token = mint(&key, None, &claims("acme")).unwrap();
        assert_eq!(put(&mut c, &token, b"k").await.unwrap(), 1, "{alg}");
        // The HS256 token of the test secret is outside this proxy's allow-list.
        let e = put(&mut c, &fake::token("acme", Role::Write), b"k").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{alg}");
        println!("{alg}: accepted; an HS256 token: {:?}: {}", e.code(), e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_confusion_refused() {
    // The proxy trusts an RSA public key; the attacker knows it (it is public) and signs
    // an admin token with HS256 using the key's bytes as the shared secret.
    let dir = tempfile::tempdir().unwrap();
    let pair = keys::rsa();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, &pair.public_pem).unwrap();
    let cl = fake::start_with(Options::default(), |c| {
        c.jwt.jwt_hs256_secret_file = None;
        c.jwt.jwt_public_key_file = Some(public.clone());
    })
    .await;
    let mut c = cl.client().await;
    let mut admin = claims("victim");
    admin.role = Role::Admin;
    let forged = mint_hs256(pair.public_pem.as_bytes(), &admin).unwrap();
    let e = put(&mut c, &forged, b"k").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("algorithm"), "{}", e.message());
    println!(
        "alg confusion (HS256 signed with the RS256 public key): {:?}: {}",
        e.code(),
        e.message()
    );
    // The genuine RS256 token works.
    let good = mint(&signer(&pair.private_pem), None, &admin).unwrap();
    assert!(put(&mut c, &good, b"k").await.is_ok());
    let m = cl.metrics().await;
    assert!(
        m.contains(r#"skv_proxy_auth_denials_total{reason="bad_algorithm"} 1"#),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_without_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let old = signer(&keys::rsa().private_pem);
    let new = signer(&keys::ec().private_pem);
    replace_file(&file, &jwks(&[(&old, "2026-11")]));
    let cl = fake::start_with(Options::default(), |c| {
        c.jwt.jwt_hs256_secret_file = None;
        c.jwt.jwt_jwks_file = Some(file.clone());
        c.jwt.jwt_key_reload_ms = 200;
    })
    .await;
    let old_token = mint(&old, Some("2026-11"), &claims("acme")).unwrap();
    let new_token = mint(&new, Some("2026-12"), &claims("acme")).unwrap();
    let mut c = cl.client().await;
    assert!(put(&mut c, &old_token, b"k").await.is_ok());
    let e = put(&mut c, &new_token, b"k").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    println!("new kid before the rotation: {:?}: {}", e.code(), e.message());

    // Clients on the old key keep writing through the whole overlap.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let mut c = cl.client().await;
        let token = old_token.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match put(&mut c, &token, b"old").await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("old-key writer failed during the overlap: {e:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // Overlap: both kids in the file, no restart.
    replace_file(&file, &jwks(&[(&old, "2026-11"), (&new, "2026-12")]));
    eventually(Duration::from_secs(5), "the new kid is accepted", || {
        let mut c = c.clone();
        let t = new_token.clone();
        async move { put(&mut c, &t, b"k").await.is_ok() }
    })
    .await;
    // A broken file in the middle keeps the current keys.
    replace_file(&file, "{\"keys\": [");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(put(&mut c, &new_token, b"k").await.is_ok());
    assert!(put(&mut c, &old_token, b"k").await.is_ok());
    replace_file(&file, &jwks(&[(&old, "2026-11"), (&new, "2026-12")]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("overlap: old-key writer {ok} ok, {failed} failed");
    assert!(ok > 10, "{ok}");
    assert_eq!(failed, 0, "no request may fail during the overlap");

    // The old kid leaves the file: refused from the next reload on (it was cached).
    replace_file(&file, &jwks(&[(&new, "2026-12")]));
    eventually(Duration::from_secs(5), "the old kid is refused", || {
        let mut c = c.clone();
        let t = old_token.clone();
        async move { put(&mut c, &t, b"k").await.is_err() }
    })
    .await;
    let e = put(&mut c, &old_token, b"k").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("key id unknown"), "{}", e.message());
    println!("old kid after it left the JWKS: {:?}: {}", e.code(), e.message());
    assert!(put(&mut c, &new_token, b"k").await.is_ok());
    // Three loads (overlap, the same again after the broken file, new only), one refusal.
    let m = cl.metrics().await;
    assert!(
        m.contains(r#"skv_proxy_jwt_key_reloads_total{result="loaded"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"skv_proxy_jwt_key_reloads_total{result="refused"} 1"#),
        "{m}"
    );
    assert!(m.contains("skv_proxy_jwt_keys 1"), "{m}");
}

/// A child process killed (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn proxy_binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_skv-proxy"));
    cmd.env("RUST_BACKTRACE", "0").env_remove("RUST_LIB_BACKTRACE");
    // Nothing from the test's environment may configure the child.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SKV_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn short_hs256_secret_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "only-31-bytes-of-secret-0123456\n").unwrap();
    let out = proxy_binary()
        .args(["--listen", "127.0.0.1:0", "--placement", "http://127.0.0.1:1"])
        .arg("--jwt-hs256-secret-file")
        .arg(&secret)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is 31 bytes; at least 32 are required"), "{stderr}");
    println!("skv-proxy with a 31-byte secret: {}", stderr.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_overrides_one_tenant() {
    // The real binary, no cluster behind it: admitted requests fail fast (no ranges),
    // refused ones are RESOURCE_EXHAUSTED before any routing.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, fake::SECRET).unwrap();
    let config = dir.path().join("proxy.toml");
    let (port, metrics_port) = (free_port(), free_port());
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"127.0.0.1:{metrics_port}\"\n\
             placement = [\"http://127.0.0.1:1\"]\njwt-hs256-secret-file = {secret:?}\n\
             request-timeout-ms = 100\ntenant-rate-limit = 1000\n\
             [tenants.tiny]\nrate-limit = 1\nrate-burst = 2\n"
        ),
    )
    .unwrap();
    let _proc = Proc(
        proxy_binary()
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    let mut c = loop {
        match KvClient::connect(endpoint.clone()).await {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(20) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("skv-proxy did not start: {e}"),
        }
    };
    let get = |c: &mut KvClient<Channel>, ns: &str| {
        let mut c = c.clone();
        let t = fake::token(ns, Role::Read);
        async move {
            c.get(req(
                GetRequest {
                    key: b"k".to_vec(),
                    stale_ok: false,
                },
                &t,
            ))
            .await
        }
    };
    let mut exhausted = Vec::new();
    for _ in 0..6 {
        if let Err(e) = get(&mut c, "tiny").await
            && e.code() == Code::ResourceExhausted
        {
            exhausted.push(e);
        }
    }
    assert!(exhausted.len() >= 3, "tiny: rate 1/s, burst 2: {exhausted:?}");
    let e = &exhausted[0];
    let hint: u64 = e
        .metadata()
        .get(RETRY_AFTER_METADATA_KEY)
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&hint), "{hint}");
    println!(
        "tenant over its config-file limit: {:?}: {} (retry-after-ms: {hint})",
        e.code(),
        e.message()
    );
    // The default (1000/s) applies to everyone else.
    for _ in 0..6 {
        if let Err(e) = get(&mut c, "other").await {
            assert_ne!(e.code(), Code::ResourceExhausted, "{e:?}");
        }
    }
    let metrics = reqwest_like_get(metrics_port, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "skv_proxy_tenant_refusals_total{{namespace=\"tiny\",reason=\"rate\"}} {}",
            exhausted.len()
        )),
        "{metrics}"
    );
    assert!(!metrics.contains("namespace=\"other\",reason=\"rate\"} 1"), "{metrics}");
}

async fn reqwest_like_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `calm` does `n` sequential put+get pairs, one every `pace`; returns the latencies and
/// the errors.
async fn calm_run(
    mut c: KvClient<Channel>,
    token: String,
    n: usize,
    pace: Duration,
) -> (Vec<Duration>, Vec<tonic::Status>) {
    let mut lat = Vec::with_capacity(n * 2);
    let mut errors = Vec::new();
    for i in 0..n {
        let key = format!("calm/{i}").into_bytes();
        let t = Instant::now();
        match put(&mut c, &token, &key).await {
            Ok(_) => lat.push(t.elapsed()),
            Err(e) => errors.push(e),
        }
        let t = Instant::now();
        match c
            .get(req(
                GetRequest {
                    key: key.clone(),
                    stale_ok: false,
                },
                &token,
            ))
            .await
        {
            Ok(_) => lat.push(t.elapsed()),
            Err(e) => errors.push(e),
        }
        tokio::time::sleep(pace).await;
    }
    lat.sort();
    (lat, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_floods_the_other_keeps_its_latency() {
    const NOISY_RATE: u32 = 200;
    const NOISY_BURST: u32 = 50;
    let cl = fake::start_with(Options::default(), |c| {
        c.tenants.insert(
            "noisy".into(),
            TenantOverride {
                rate_limit: Some(NOISY_RATE),
                rate_burst: Some(NOISY_BURST),
                max_concurrency: Some(64),
            },
        );
    })
    .await;
    let calm = fake::token("calm", Role::Write);
    let noisy = fake::token("noisy", Role::Write);
    let (n, pace) = (300, Duration::from_millis(2));

    // Baseline: calm alone.
    let (base, errors) = calm_run(cl.client().await, calm.clone(), n, pace).await;
    assert!(errors.is_empty(), "{errors:?}");

    // Flood: 4 connections of `noisy` sending as fast as they can, while calm runs again.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, exhausted, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let hint_seen = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for f in 0..4 {
        let (stop, ok, exhausted, other, hint_seen) = (
            stop.clone(),
            ok.clone(),
            exhausted.clone(),
            other.clone(),
            hint_seen.clone(),
        );
        let mut c = cl.client().await;
        let token = noisy.clone();
        flooders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match put(&mut c, &token, format!("noisy/{f}/{i}").as_bytes()).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        if e.metadata().get(RETRY_AFTER_METADATA_KEY).is_some() {
                            hint_seen.store(true, Ordering::Relaxed);
                        }
                        exhausted.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let (flooded, errors) = calm_run(cl.client().await, calm.clone(), n, pace).await;
    let secs = t0.elapsed().as_secs_f64();
    let flood_secs = secs + 0.2;
    stop.store(true, Ordering::SeqCst);
    for f in flooders {
        f.await.unwrap();
    }
    let (ok, exhausted, other) = (
        ok.load(Ordering::SeqCst),
        exhausted.load(Ordering::SeqCst),
        other.load(Ordering::SeqCst),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "calm alone:        {} requests, p50 {:.3} ms, p99 {:.3} ms",
        base.len(),
        ms(percentile(&base, 0.5)),
        ms(percentile(&base, 0.99))
    );
    println!(
        "calm during flood: {} requests, {} errors, p50 {:.3} ms, p99 {:.3} ms",
        flooded.len(),
        errors.len(),
        ms(percentile(&flooded, 0.5)),
        ms(percentile(&flooded, 0.99))
    );
    println!(
        "noisy over {flood_secs:.1} s: {ok} ok ({:.0}/s; limit {NOISY_RATE}/s, burst {NOISY_BURST}), {exhausted} RESOURCE_EXHAUSTED ({:.0}/s), {other} other errors",
        ok as f64 / flood_secs,
        exhausted as f64 / flood_secs
    );
    assert!(errors.is_empty(), "calm must see no error: {errors:?}");
    assert_eq!(flooded.len(), 2 * n);
    assert!(exhausted > 0 && hint_seen.load(Ordering::SeqCst));
    assert_eq!(other, 0);
    // The bucket lets through at most burst + rate × time (plus a little timing slack).
    let allowed = f64::from(NOISY_BURST) + f64::from(NOISY_RATE) * (flood_secs + 0.5);
    assert!((ok as f64) <= allowed, "noisy got {ok} through, more than {allowed:.0}");
    // Loose on purpose (2 shared cores): calm is never starved.
    assert!(percentile(&flooded, 0.99) < Duration::from_millis(500));
    let m = cl.metrics().await;
    assert!(
        m.contains(&format!(
            "skv_proxy_tenant_refusals_total{{namespace=\"noisy\",reason=\"rate\"}} {exhausted}"
        )),
        "{m}"
    );
    assert!(!m.contains("namespace=\"calm\",reason=\"rate\"} 1"), "{m}");
}

/// A channel to the proxy over TLS, trusting `ca` (and presenting `identity`, if any).
async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<KvClient<Channel>, String> {
    let tls = skv_rpc::tls::ClientTls::load(ca, identity).map_err(|e| e.to_string())?;
    let options = skv_rpc::EndpointOptions {
        tls: Some(tls),
        ..Default::default()
    };
    let ch = skv_rpc::endpoint_with(&format!("https://{addr}"), &options)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    Ok(KvClient::new(ch))
}

/// Issue 12, TLS at the proxy's client port (ADR 0022): a client that trusts the CA puts
/// and gets over https; a plaintext client and one trusting another CA are refused at the
/// handshake; with --client-tls-ca-file a client without a certificate is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    skv_rpc::certs::create(&certs, &["127.0.0.1".into()], 1, false).unwrap();
    skv_rpc::certs::create(&other, &["127.0.0.1".into()], 1, false).unwrap();
    let cl = fake::start_with(Options::default(), |c| {
        c.client_tls_cert_file = Some(certs.join("proxy.pem"));
        c.client_tls_key_file = Some(certs.join("proxy-key.pem"));
    })
    .await;
    let token = fake::token("acme", Role::Write);
    let mut c = tls_client(cl.proxy.addr, &certs.join("ca.pem"), None).await.unwrap();
    assert_eq!(put(&mut c, &token, b"tls").await.unwrap(), 1);
    let got = c
        .get(req(
            GetRequest {
                key: b"tls".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, b"v");
    println!("https with the CA: put and get ok");

    // Plaintext to the TLS port.
    let mut plain = cl.client().await;
    let e = put(&mut plain, &token, b"x").await.unwrap_err();
    println!("plaintext to the TLS port: {:?}: {}", e.code(), e.message());
    // The TLS server answers the plaintext HTTP/2 preface with a TLS alert and closes: no call
    // goes through. Depending on when the close reaches hyper, the client sees a broken frame
    // (Internal/Unknown), an unavailable connection, or a connection that was never ready
    // (Cancelled).
    assert!(
        matches!(
            e.code(),
            Code::Unavailable | Code::Internal | Code::Unknown | Code::Cancelled
        ),
        "{e:?}"
    );
    // A client that trusts another CA does not accept the proxy's certificate.
    let e = tls_client(cl.proxy.addr, &other.join("ca.pem"), None)
        .await
        .err()
        .unwrap();
    println!("https trusting another CA: {e}");
    assert!(e.contains("InvalidCertificate"), "{e}");

    // Client certificates required: none, or one from another CA, is refused.
    let cl = fake::start_with(Options::default(), |c| {
        c.client_tls_cert_file = Some(certs.join("proxy.pem"));
        c.client_tls_key_file = Some(certs.join("proxy-key.pem"));
        c.client_tls_ca_file = Some(certs.join("ca.pem"));
    })
    .await;
    let refused = |r: Result<KvClient<Channel>, String>| async move {
        match r {
            Err(e) => e,
            Ok(mut c) => put(&mut c, &fake::token("acme", Role::Write), b"x")
                .await
                .err()
                .map(|e| format!("{:?}: {}", e.code(), e.message()))
                .unwrap_or_else(|| "accepted".into()),
        }
    };
    let e = refused(tls_client(cl.proxy.addr, &certs.join("ca.pem"), None).await).await;
    println!("no client certificate: {e}");
    assert_ne!(e, "accepted");
    let e = refused(
        tls_client(
            cl.proxy.addr,
            &certs.join("ca.pem"),
            Some((&other.join("admin.pem"), &other.join("admin-key.pem"))),
        )
        .await,
    )
    .await;
    println!("a client certificate of another CA: {e}");
    assert_ne!(e, "accepted");
    let mut c = tls_client(
        cl.proxy.addr,
        &certs.join("ca.pem"),
        Some((&certs.join("admin.pem"), &certs.join("admin-key.pem"))),
    )
    .await
    .unwrap();
    assert!(put(&mut c, &token, b"mtls").await.is_ok());
}

/// mTLS inside (ADR 0022) from the proxy's side: with `--tls-*`, the proxy reaches
/// placement and storenodes (fakes serving TLS that admit only proxy certificates) with its
/// certificate; with a storenode's certificate, or one of another CA, it reaches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_presents_its_certificate_inside() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    skv_rpc::certs::create(&certs, &["127.0.0.1".into()], 1, false).unwrap();
    skv_rpc::certs::create(&other, &["127.0.0.1".into()], 1, false).unwrap();
    let token = fake::token("acme", Role::Write);
    let cl = fake::start(Options {
        tls: Some(certs.clone()),
        ..Default::default()
    })
    .await;
    let mut c = cl.client().await;
    let mut ok = false;
    for _ in 0..50 {
        if put(&mut c, &token, b"inside").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "put through an mTLS placement and storenode");
    println!("proxy certificate inside: put ok");

    for (what, cert_dir, role) in [
        ("a storenode certificate", &certs, "storenode"),
        ("a proxy certificate of another CA", &other, "proxy"),
    ] {
        let (cert_dir, role) = (cert_dir.clone(), role.to_string());
        let cl = fake::start_with(
            Options {
                tls: Some(certs.clone()),
                ..Default::default()
            },
            move |c| {
                c.tls_cert_file = Some(cert_dir.join(format!("{role}.pem")));
                c.tls_key_file = Some(cert_dir.join(format!("{role}-key.pem")));
            },
        )
        .await;
        let mut c = cl.client().await;
        let e = put(&mut c, &token, b"inside").await.unwrap_err();
        println!("proxy with {what}: {:?}: {}", e.code(), e.message());
    }
}

/// Certificate rotation without a restart (ADR 0022): the proxy's client-port certificate
/// files are replaced (by one of another CA); within a reload interval new connections get
/// the new certificate, while a connection opened before keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_certificate_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, live) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("live"));
    skv_rpc::certs::create(&a, &["127.0.0.1".into()], 1, false).unwrap();
    skv_rpc::certs::create(&b, &["127.0.0.1".into()], 1, false).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &Path| {
        for f in ["proxy.pem", "proxy-key.pem"] {
            let tmp = live.join(format!("{f}.tmp"));
            std::fs::copy(from.join(f), &tmp).unwrap();
            std::fs::rename(&tmp, live.join(f)).unwrap();
        }
    };
    install(&a);
    let (cert, key) = (live.join("proxy.pem"), live.join("proxy-key.pem"));
    let cl = fake::start_with(Options::default(), move |c| {
        c.client_tls_cert_file = Some(cert);
        c.client_tls_key_file = Some(key);
    })
    .await;
    let token = fake::token("acme", Role::Write);
    let mut before = tls_client(cl.proxy.addr, &a.join("ca.pem"), None).await.unwrap();
    assert!(put(&mut before, &token, b"k").await.is_ok());
    assert!(tls_client(cl.proxy.addr, &b.join("ca.pem"), None).await.is_err());
    // Load across the rotation: a writer on a connection opened before, and one that opens
    // a new connection per write trusting both CAs (what clients do during a CA rollover).
    let both = dir.path().join("both-ca.pem");
    std::fs::write(
        &both,
        [
            std::fs::read(a.join("ca.pem")).unwrap(),
            std::fs::read(b.join("ca.pem")).unwrap(),
        ]
        .concat(),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for fresh in [false, true] {
        let (stop, ok, failed, token, addr, both) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            token.clone(),
            cl.proxy.addr,
            both.clone(),
        );
        let mut held = before.clone();
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = if fresh {
                    match tls_client(addr, &both, None).await {
                        Ok(mut c) => put(&mut c, &token, b"load").await.map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    }
                } else {
                    put(&mut held, &token, b"load").await.map_err(|e| e.to_string())
                };
                match r {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("write failed during the rotation: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    install(&b);
    let t0 = Instant::now();
    loop {
        if let Ok(mut c) = tls_client(cl.proxy.addr, &b.join("ca.pem"), None).await
            && put(&mut c, &token, b"k").await.is_ok()
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the new certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("new certificate served {:?} after the files changed", t0.elapsed());
    let e = tls_client(cl.proxy.addr, &a.join("ca.pem"), None).await.err().unwrap();
    assert!(e.contains("InvalidCertificate"), "{e}");
    // The connection opened before the rotation still works.
    assert!(put(&mut before, &token, b"k").await.is_ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("writes during the rotation: {ok} ok, {failed} failed");
    assert!(ok > 50, "{ok}");
    assert_eq!(failed, 0);
}
