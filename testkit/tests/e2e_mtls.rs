//! Issue 12, mTLS inside the cluster with real processes and real certificates (ADR 0022):
//! placement, three storenodes and a proxy started from their binaries, each with its role's
//! certificate of one development CA (`skv_rpc::certs`).
//!
//! - Plaintext, another CA's certificate and an expired certificate are refused at the
//!   handshake of every internal port (placement and each storenode).
//! - A proxy certificate is refused by the Raft service (PERMISSION_DENIED), a proxy
//!   certificate by the storenode's admin calls, an admin certificate by its data calls, a
//!   proxy certificate by placement's RegisterStore; the right roles pass.
//! - Puts and gets flow end to end through the proxy with mTLS inside.
//! - A storenode's certificate files are replaced (new key and serial from the same CA) while
//!   a client writes: no write fails, and new handshakes see the new certificate.
//!
//! Every refusal's client error line and the rotation figures are printed (`--no-capture`).

use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::raft_client::RaftClient;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::{
    GetMembersRequest, ListReplicasRequest, RaftMessage, RegisterStoreRequest, SplitRangeRequest, StoreGetRequest,
};
use skv_rpc::tls::{ClientTls, PeerRole};
use skv_testkit::cluster::{TEST_SECRET, token};
use skv_testkit::process::{ChildGuard, bin_path, free_port};
use skv_testkit::wait_until;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

const HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

fn hosts() -> Vec<String> {
    HOSTS.iter().map(|h| h.to_string()).collect()
}

struct TlsCluster {
    dir: tempfile::TempDir,
    certs: PathBuf,
    _placement: ChildGuard,
    placement_port: u16,
    _stores: Vec<ChildGuard>,
    store_ports: Vec<u16>,
    _proxy: ChildGuard,
    proxy_port: u16,
}

fn log(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log"))).map_or(Stdio::null(), Stdio::from)
}

/// `--tls-*` flags with `cert`, `key` and the cluster CA.
fn tls_args(cmd: &mut Command, cert: &Path, key: &Path, ca: &Path) {
    cmd.arg("--tls-cert-file")
        .arg(cert)
        .arg("--tls-key-file")
        .arg(key)
        .arg("--tls-ca-file")
        .arg(ca);
}

impl TlsCluster {
    async fn start() -> TlsCluster {
        skv_testkit::init_test_logging();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let d = dir.path();
        std::fs::write(d.join("secret"), TEST_SECRET).unwrap_or_else(|e| panic!("secret: {e}"));
        let certs = d.join("certs");
        // The CA, a certificate per role, and `<role>-expired.pem` (same key, expired).
        skv_rpc::certs::create_expired(&certs, &hosts()).unwrap_or_else(|e| panic!("certs: {e}"));
        let ca = certs.join("ca.pem");
        let placement_port = free_port();
        let placement_url = format!("https://127.0.0.1:{placement_port}");
        let mut cmd = Command::new(bin_path("skv-placement"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{placement_port}"))
            .arg("--data-dir")
            .arg(d.join("pd"))
            .arg("--initial-wait-ms")
            .arg("300")
            .arg("--schedule-interval-ms")
            .arg("200")
            .arg("--jwt-hs256-secret-file")
            .arg(d.join("secret"))
            .stdout(Stdio::null())
            .stderr(log(d, "placement"));
        tls_args(
            &mut cmd,
            &certs.join("placement.pem"),
            &certs.join("placement-key.pem"),
            &ca,
        );
        let placement = ChildGuard::spawn("placement", &mut cmd).unwrap_or_else(|e| panic!("{e}"));
        let mut stores = Vec::new();
        let mut store_ports = Vec::new();
        for i in 0..3 {
            // Each store its own copy of the storenode certificate, so one can rotate alone.
            let own = d.join(format!("store-{i}-tls"));
            std::fs::create_dir_all(&own).unwrap_or_else(|e| panic!("{e}"));
            for f in ["storenode.pem", "storenode-key.pem"] {
                std::fs::copy(certs.join(f), own.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
            }
            let port = free_port();
            let mut cmd = Command::new(bin_path("skv-storenode"));
            cmd.arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--placement")
                .arg(&placement_url)
                .arg("--data-dir")
                .arg(d.join(format!("store-{i}")))
                .arg("--heartbeat-interval-ms")
                .arg("300")
                .stdout(Stdio::null())
                .stderr(log(d, &format!("store-{i}")));
            tls_args(
                &mut cmd,
                &own.join("storenode.pem"),
                &own.join("storenode-key.pem"),
                &ca,
            );
            stores.push(ChildGuard::spawn(format!("store-{i}"), &mut cmd).unwrap_or_else(|e| panic!("{e}")));
            store_ports.push(port);
        }
        let proxy_port = free_port();
        let mut cmd = Command::new(bin_path("skv-proxy"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{proxy_port}"))
            .arg("--placement")
            .arg(&placement_url)
            .arg("--jwt-hs256-secret-file")
            .arg(d.join("secret"))
            .stdout(Stdio::null())
            .stderr(log(d, "proxy"));
        tls_args(&mut cmd, &certs.join("proxy.pem"), &certs.join("proxy-key.pem"), &ca);
        let proxy = ChildGuard::spawn("proxy", &mut cmd).unwrap_or_else(|e| panic!("{e}"));
        let c = TlsCluster {
            dir,
            certs,
            _placement: placement,
            placement_port,
            _stores: stores,
            store_ports,
            _proxy: proxy,
            proxy_port,
        };
        let client = c.client().await;
        let started = Instant::now();
        let logs = || {
            ["placement", "store-0", "store-1", "store-2", "proxy"]
                .iter()
                .map(|n| {
                    let t = std::fs::read_to_string(c.dir.path().join(format!("{n}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = t.lines().rev().take(15).collect();
                    format!("--- {n}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        loop {
            if client.put(b"ready".to_vec(), b"1".to_vec()).await.is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the mTLS cluster did not accept a write within 90 s\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("mTLS cluster writable after {:?}", started.elapsed());
        c
    }

    fn ca(&self) -> PathBuf {
        self.certs.join("ca.pem")
    }

    /// (certificate, key) of `role` in the cluster's directory.
    fn identity(&self, role: PeerRole) -> (PathBuf, PathBuf) {
        (
            self.certs.join(format!("{role}.pem")),
            self.certs.join(format!("{role}-key.pem")),
        )
    }

    async fn client(&self) -> skv::Client {
        skv::Client::builder()
            .endpoints([format!("http://127.0.0.1:{}", self.proxy_port)])
            .token(token("mtls", "write"))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect sdk: {e}"))
    }

    /// Every internal port: (name, address).
    fn internal_ports(&self) -> Vec<(String, String)> {
        let mut v = vec![("placement".to_string(), format!("127.0.0.1:{}", self.placement_port))];
        for (i, p) in self.store_ports.iter().enumerate() {
            v.push((format!("storenode {i}"), format!("127.0.0.1:{p}")));
        }
        v
    }
}

/// A channel to `addr`: plaintext when `ca` is None, else TLS trusting `ca` and presenting
/// `identity`. Every new call on a fresh channel makes a new handshake.
fn channel(addr: &str, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Channel {
    let tls = ca.map(|ca| ClientTls::load(ca, identity).unwrap_or_else(|e| panic!("client tls: {e}")));
    let url = match &tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let options = skv_rpc::EndpointOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Some(Duration::from_secs(3)),
        tls,
        ..Default::default()
    };
    skv_rpc::endpoint_with(&url, &options)
        .unwrap_or_else(|e| panic!("endpoint: {e}"))
        .connect_lazy()
}

/// The client's error line: code, message and the chain of causes, with what skv_rpc
/// makes of a TLS failure (`tls`: the channel spoke TLS).
fn error_line(s: &tonic::Status, tls: bool) -> String {
    format!("{:?}: {}", s.code(), skv_rpc::tls::explain_transport(s, tls))
}

/// One call to the port that needs no range: placement's GetMembers or a store's
/// ListReplicas.
async fn probe(name: &str, ch: Channel) -> Result<(), tonic::Status> {
    if name == "placement" {
        PlacementClient::new(ch)
            .get_members(GetMembersRequest {})
            .await
            .map(|_| ())
    } else {
        StoreClient::new(ch)
            .list_replicas(ListReplicasRequest {})
            .await
            .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_inside_the_cluster_refusals_and_rotation_under_load() {
    let c = TlsCluster::start().await;
    let ca = c.ca();
    let other = c.dir.path().join("other-ca");
    skv_rpc::certs::create(&other, &hosts(), 30, false).unwrap_or_else(|e| panic!("other CA: {e}"));
    let (admin_cert, admin_key) = c.identity(PeerRole::Admin);
    let (proxy_cert, proxy_key) = c.identity(PeerRole::Proxy);
    let (placement_cert, placement_key) = c.identity(PeerRole::Placement);
    let (store_cert, store_key) = c.identity(PeerRole::Storenode);
    let admin_expired = c.certs.join("admin-expired.pem");

    // 1. Handshake refusals at every internal port; the right certificate passes.
    for (name, addr) in c.internal_ports() {
        let plain = probe(&name, channel(&addr, None, None)).await;
        let e = plain.expect_err("plaintext must be refused");
        println!("{name}, plaintext: {}", error_line(&e, false));
        let wrong = probe(
            &name,
            channel(
                &addr,
                Some(&ca),
                Some((&other.join("admin.pem"), &other.join("admin-key.pem"))),
            ),
        )
        .await;
        let e = wrong.expect_err("another CA's certificate must be refused");
        println!("{name}, a certificate of another CA: {}", error_line(&e, true));
        let trusts_other = probe(
            &name,
            channel(&addr, Some(&other.join("ca.pem")), Some((&admin_cert, &admin_key))),
        )
        .await;
        let e = trusts_other.expect_err("a server of our CA must not pass a client trusting another");
        println!("{name}, client trusting another CA: {}", error_line(&e, true));
        let expired = probe(&name, channel(&addr, Some(&ca), Some((&admin_expired, &admin_key)))).await;
        let e = expired.expect_err("an expired certificate must be refused");
        println!("{name}, an expired certificate: {}", error_line(&e, true));
        let none = probe(&name, channel(&addr, Some(&ca), None)).await;
        let e = none.expect_err("no client certificate must be refused");
        println!("{name}, no client certificate: {}", error_line(&e, true));
        // The right role passes: placement for ListReplicas and (any role) GetMembers.
        probe(
            &name,
            channel(&addr, Some(&ca), Some((&placement_cert, &placement_key))),
        )
        .await
        .unwrap_or_else(|e| panic!("{name} with a placement certificate: {}", error_line(&e, true)));
    }

    // 2. Roles per service at a storenode.
    let store0 = format!("127.0.0.1:{}", c.store_ports[0]);
    let raft_msg = RaftMessage {
        range_id: 1,
        from_store_id: 99,
        to_store_id: 1,
        ..Default::default()
    };
    let e = RaftClient::new(channel(&store0, Some(&ca), Some((&proxy_cert, &proxy_key))))
        .send(raft_msg.clone())
        .await
        .expect_err("a proxy certificate must not reach Raft");
    println!("proxy certificate, Raft.Send: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied, "{}", error_line(&e, true));
    assert!(
        e.message().contains("a proxy certificate cannot call"),
        "{}",
        e.message()
    );
    let e = RaftClient::new(channel(&store0, Some(&ca), Some((&admin_cert, &admin_key))))
        .send(raft_msg.clone())
        .await
        .expect_err("an admin certificate must not reach Raft");
    println!("admin certificate, Raft.Send: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied);
    // A storenode certificate reaches the Raft service (the message itself is nonsense: the
    // answer may carry an error, but not a refusal of the caller).
    match RaftClient::new(channel(&store0, Some(&ca), Some((&store_cert, &store_key))))
        .send(raft_msg)
        .await
    {
        Ok(_) => {}
        Err(e) => assert_ne!(e.code(), Code::PermissionDenied, "{}", error_line(&e, true)),
    }
    let e = StoreClient::new(channel(&store0, Some(&ca), Some((&proxy_cert, &proxy_key))))
        .split_range(SplitRangeRequest::default())
        .await
        .expect_err("a proxy certificate must not call SplitRange");
    println!("proxy certificate, Store.SplitRange: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = StoreClient::new(channel(&store0, Some(&ca), Some((&admin_cert, &admin_key))))
        .get(StoreGetRequest::default())
        .await
        .expect_err("an admin certificate must not read data at a storenode");
    println!("admin certificate, Store.Get: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = StoreClient::new(channel(&store0, Some(&ca), Some((&store_cert, &store_key))))
        .get(StoreGetRequest::default())
        .await
        .expect_err("a storenode certificate must not read data at a storenode");
    println!("storenode certificate, Store.Get: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied);
    // A proxy certificate reaches the data calls (an empty request is answered, not refused
    // for its caller).
    match StoreClient::new(channel(&store0, Some(&ca), Some((&proxy_cert, &proxy_key))))
        .get(StoreGetRequest::default())
        .await
    {
        Ok(_) => {}
        Err(e) => assert_ne!(e.code(), Code::PermissionDenied, "{}", error_line(&e, true)),
    }
    let placement = format!("127.0.0.1:{}", c.placement_port);
    let e = PlacementClient::new(channel(&placement, Some(&ca), Some((&proxy_cert, &proxy_key))))
        .register_store(RegisterStoreRequest {
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .expect_err("a proxy certificate must not register a store");
    println!("proxy certificate, Placement.RegisterStore: {}", error_line(&e, true));
    assert_eq!(e.code(), Code::PermissionDenied);

    // 3. Data end to end with mTLS inside.
    let client = c.client().await;
    for i in 0..50u32 {
        client
            .put(format!("k{i:03}").into_bytes(), format!("v{i}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("put k{i:03}: {e}"));
    }
    for i in 0..50u32 {
        let got = client
            .get(format!("k{i:03}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("get k{i:03}: {e}"));
        assert_eq!(got.map(|e| e.value), Some(format!("v{i}").into_bytes()), "k{i:03}");
    }
    println!("50 puts and 50 gets through the proxy with mTLS inside: ok");

    // 4. Rotation of storenode 0's certificate while a client writes.
    let before = peer_certificate(&store0, &ca).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = client.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match client
                    .put(format!("rot{}", i % 64).into_bytes(), i.to_string().into_bytes())
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        println!("write {i} failed during rotation: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    // A prober that opens a new mTLS connection (placement certificate) per call to store 0
    // across the rotation: none may fail.
    let probes = {
        let (stop, addr, ca) = (stop.clone(), store0.clone(), ca.clone());
        let (pc, pk) = (placement_cert.clone(), placement_key.clone());
        tokio::spawn(async move {
            let (mut good, mut bad) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                match probe("store", channel(&addr, Some(&ca), Some((&pc, &pk)))).await {
                    Ok(()) => good += 1,
                    Err(e) => {
                        println!("new connection failed during rotation: {}", error_line(&e, true));
                        bad += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (good, bad)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let own = c.dir.path().join("store-0-tls");
    let staged = c.dir.path().join("store-0-new");
    skv_rpc::certs::reissue(&c.certs, &staged, PeerRole::Storenode, &hosts(), 30)
        .unwrap_or_else(|e| panic!("reissue: {e}"));
    let rotated_at = Instant::now();
    // As an operator would: the key first, then the certificate, each renamed into place.
    for f in ["storenode-key.pem", "storenode.pem"] {
        std::fs::rename(staged.join(f), own.join(f)).unwrap_or_else(|e| panic!("rename {f}: {e}"));
    }
    let after = wait_until(
        "storenode 0 to serve its new certificate",
        Duration::from_secs(20),
        || {
            let (addr, ca, before) = (store0.clone(), ca.clone(), before.clone());
            async move {
                let now = peer_certificate(&addr, &ca).await;
                (now.serial != before.serial).then_some(now)
            }
        },
    )
    .await;
    let seen_after = rotated_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap_or_else(|e| panic!("writer: {e}"));
    let (good_probes, bad_probes) = probes.await.unwrap_or_else(|e| panic!("prober: {e}"));
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "rotation of storenode 0: before serial {} (not after {}), after serial {} (not after {}); new certificate served {:?} after the rename",
        before.serial, before.not_after, after.serial, after.not_after, seen_after
    );
    println!(
        "across the rotation: {ok} writes ok, {failed} failed; {good_probes} new mTLS connections to storenode 0 ok, {bad_probes} failed"
    );
    assert_eq!(failed, 0, "writes failed during the rotation");
    assert_eq!(bad_probes, 0, "new connections failed during the rotation");
    assert!(ok > 0 && good_probes > 0, "nothing ran during the rotation");
    assert_ne!(
        before.not_after, after.not_after,
        "the new certificate has another expiry"
    );
    // After the rotation the cluster still replicates: a write and a read.
    client
        .put(b"after-rotation".to_vec(), b"yes".to_vec())
        .await
        .unwrap_or_else(|e| panic!("put after rotation: {e}"));
}

/// What a server's certificate says, as seen by a new handshake.
#[derive(Clone, Debug)]
struct Seen {
    serial: String,
    not_after: String,
}

/// Handshakes with `addr` (trusting `ca`, no client certificate needed to see the server's)
/// and reads the certificate it presents.
async fn peer_certificate(addr: &str, ca: &Path) -> Seen {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("ca: {e}")) {
        roots
            .add(c.unwrap_or_else(|e| panic!("ca: {e}")))
            .unwrap_or_else(|e| panic!("ca: {e}"));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    let name = ServerName::try_from("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
    let addr2 = addr.to_string();
    // The server asks for a client certificate and refuses the handshake without one, but
    // only after it sent its own, which rustls has verified and recorded by then.
    let der = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(&addr2).unwrap_or_else(|e| panic!("connect {addr2}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut conn = rustls::ClientConnection::new(config, name).unwrap_or_else(|e| panic!("{e}"));
        while conn.peer_certificates().is_none() {
            if conn.complete_io(&mut tcp).is_err() {
                break;
            }
        }
        conn.peer_certificates()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|| panic!("{addr} presented no certificate"));
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap_or_else(|e| panic!("parse: {e}"));
    Seen {
        serial: cert.raw_serial_as_string(),
        not_after: cert.validity().not_after.to_string(),
    }
}
