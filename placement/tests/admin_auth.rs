//! Admin authorization at placement (ADR 0021), over real gRPC against in-process placement
//! instances: every admin call needs a token of role admin (read and write tokens get
//! PERMISSION_DENIED, a missing or invalid one UNAUTHENTICATED), status calls any valid
//! token, internal calls none; a follower checks the token and forwards it, and the leader
//! checks it again; an instance without a key refuses admin calls (`PD-AdminAuthOff`).

use skv_auth::{Claims, Role, mint_hs256};
use skv_common::service::ServiceHandle;
use skv_placement::error::ErrorCode;
use skv_placement::{AdminAuth, Config};
use skv_proto::internal::placement_admin_client::PlacementAdminClient;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::*;
use skv_testkit::{Etcd, wait_until};
use std::path::Path;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const SECRET: &[u8] = b"placement-admin-auth-test-secret-0123456789";

fn token(role: Role) -> String {
    mint_hs256(
        SECRET,
        &Claims::new("tester", "tenant-a", role, Duration::from_secs(600)),
    )
    .unwrap()
}

fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn config(dir: &Path, etcd: Vec<String>) -> Config {
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let mut c = Config::for_test(dir, etcd, "/skv/admin-auth");
    c.admin_auth = AdminAuth::Jwt;
    c.jwt = skv_auth::JwtArgs::hs256(secret);
    c.initial_wait_ms = 300;
    c
}

fn channel(h: &ServiceHandle) -> Channel {
    skv_rpc::lazy_channel(&h.addr.to_string()).unwrap()
}

fn ok<T>(r: Result<tonic::Response<T>, Status>) -> Result<(), Status> {
    r.map(|_| ())
}

/// Calls every admin call once with `token` (on ranges and stores that do not exist: an
/// authorized call then fails for that reason, never for its token).
async fn admin_calls(ch: Channel, token: Option<&str>) -> Vec<(&'static str, Result<(), Status>)> {
    let mut c = PlacementClient::new(ch);
    vec![
        (
            "SplitRange",
            ok(c.split_range(req(
                AdminSplitRequest {
                    range_id: 999,
                    split_key: b"k".to_vec(),
                },
                token,
            ))
            .await),
        ),
        (
            "TransferLeader",
            ok(c.transfer_leader(req(
                AdminTransferLeaderRequest {
                    range_id: 999,
                    to_store_id: 7,
                },
                token,
            ))
            .await),
        ),
        (
            "MergeRanges",
            ok(c.merge_ranges(req(
                AdminMergeRequest {
                    left_range_id: 998,
                    right_range_id: 999,
                },
                token,
            ))
            .await),
        ),
        (
            "MoveReplica",
            ok(c.move_replica(req(
                AdminMoveReplicaRequest {
                    range_id: 999,
                    from_store_id: 7,
                    to_store_id: 8,
                },
                token,
            ))
            .await),
        ),
        (
            "DrainStore",
            ok(c.drain_store(req(AdminDrainStoreRequest { store_id: 999 }, token))
                .await),
        ),
        (
            "SetSchedulerPaused",
            ok(
                c.set_scheduler_paused(req(SetSchedulerPausedRequest { paused: false }, token))
                    .await,
            ),
        ),
    ]
}

async fn status_calls(ch: Channel, token: Option<&str>) -> Vec<(&'static str, Result<(), Status>)> {
    let mut c = PlacementAdminClient::new(ch);
    vec![
        (
            "RangeStats",
            c.range_stats(req(RangeStatsRequest {}, token)).await.map(|_| ()),
        ),
        (
            "StoreStatus",
            c.store_status(req(StoreStatusRequest {}, token)).await.map(|_| ()),
        ),
        (
            "ListOperators",
            c.list_operators(req(ListOperatorsRequest {}, token)).await.map(|_| ()),
        ),
    ]
}

fn auth_code(st: &Status) -> bool {
    matches!(
        ErrorCode::of(st),
        Some(ErrorCode::Unauthenticated | ErrorCode::PermissionDenied | ErrorCode::AdminAuthOff)
    ) || matches!(st.code(), Code::Unauthenticated | Code::PermissionDenied)
}

fn assert_refused(calls: &[(&str, Result<(), Status>)], code: Code, pd: ErrorCode) {
    for (name, r) in calls {
        let st = r.as_ref().err().unwrap_or_else(|| panic!("{name} was accepted"));
        assert_eq!(st.code(), code, "{name}: {st:?}");
        assert_eq!(ErrorCode::of(st), Some(pd), "{name}: {st:?}");
        println!("{name}: {:?}: {}", st.code(), st.message());
    }
}

/// Every call passed the check and reached the leader's logic: the scheduler switch
/// succeeds, and the others (on ranges and stores that do not exist) fail for that reason,
/// never for the token nor for a leader that could not be reached.
fn assert_authorized(calls: &[(&str, Result<(), Status>)]) {
    for (name, r) in calls {
        match r {
            Ok(()) => {}
            Err(st) if *name == "SetSchedulerPaused" => panic!("{name} failed: {st:?}"),
            Err(st) => {
                assert!(!auth_code(st), "{name} refused for its token: {st:?}");
                assert!(
                    !matches!(st.code(), Code::Unavailable | Code::Unknown | Code::Internal),
                    "{name} did not reach the leader's logic: {st:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn admin_calls_need_an_admin_token() {
    skv_testkit::init_test_logging();
    let dir = tempfile::tempdir().unwrap();
    let pd = skv_placement::start(config(dir.path(), vec![])).await.unwrap();
    let ch = channel(&pd);

    // Internal calls (storenodes, proxies) take no token until mTLS (ADR 0021).
    let mut c = PlacementClient::new(ch.clone());
    wait_until("a placement leader", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader }
    })
    .await;
    c.get_stores(GetStoresRequest {}).await.unwrap();
    c.scan_ranges(ScanRangesRequest::default()).await.unwrap();
    c.alloc_ids(AllocIdsRequest { count: 1 }).await.unwrap();

    // No token, a token of another key, an expired one: UNAUTHENTICATED, admin and status.
    let other = mint_hs256(
        b"not-the-placement-secret-0123456789abcdef",
        &Claims::new("x", "tenant-a", Role::Admin, Duration::from_secs(600)),
    )
    .unwrap();
    let mut expired = Claims::new("x", "tenant-a", Role::Admin, Duration::ZERO);
    expired.exp = expired.exp.saturating_sub(3600);
    let expired = mint_hs256(SECRET, &expired).unwrap();
    for bad in [None, Some("not.a.jwt"), Some(other.as_str()), Some(expired.as_str())] {
        assert_refused(
            &admin_calls(ch.clone(), bad).await,
            Code::Unauthenticated,
            ErrorCode::Unauthenticated,
        );
        assert_refused(
            &status_calls(ch.clone(), bad).await,
            Code::Unauthenticated,
            ErrorCode::Unauthenticated,
        );
    }
    // Read and write tokens: PERMISSION_DENIED on every admin call, status calls allowed.
    for role in [Role::Read, Role::Write] {
        let t = token(role);
        let calls = admin_calls(ch.clone(), Some(&t)).await;
        assert_refused(&calls, Code::PermissionDenied, ErrorCode::PermissionDenied);
        for (name, r) in &calls {
            let msg = r.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
            assert!(
                msg.contains(role.as_str()) && msg.contains(name) && msg.contains("admin"),
                "{msg}"
            );
        }
        for (name, r) in status_calls(ch.clone(), Some(&t)).await {
            r.unwrap_or_else(|e| panic!("{name} with a {} token: {e:?}", role.as_str()));
        }
    }
    // An admin token: every call gets past authorization.
    let admin = token(Role::Admin);
    assert_authorized(&admin_calls(ch.clone(), Some(&admin)).await);
    for (name, r) in status_calls(ch.clone(), Some(&admin)).await {
        r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    pd.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_key_admin_calls_are_refused_and_none_needs_no_key() {
    skv_testkit::init_test_logging();
    let dir = tempfile::tempdir().unwrap();
    // --admin-auth=jwt (the default) without a key: refused with a clear error, whatever token.
    let mut c = config(dir.path(), vec![]);
    c.jwt = skv_auth::JwtArgs::default();
    let pd = skv_placement::start(c.clone()).await.unwrap();
    let calls = admin_calls(channel(&pd), Some(&token(Role::Admin))).await;
    assert_refused(&calls, Code::FailedPrecondition, ErrorCode::AdminAuthOff);
    for (_, r) in &calls {
        let msg = r.as_ref().err().map(|s| s.message().to_string()).unwrap_or_default();
        assert!(
            msg.contains("--jwt-hs256-secret-file") && msg.contains("--admin-auth=none"),
            "{msg}"
        );
    }
    assert_refused(
        &status_calls(channel(&pd), None).await,
        Code::FailedPrecondition,
        ErrorCode::AdminAuthOff,
    );
    pd.shutdown().await.unwrap();

    // --admin-auth=none: no check (development).
    c.admin_auth = AdminAuth::None;
    let pd = skv_placement::start(c.clone()).await.unwrap();
    let pc = PlacementClient::new(channel(&pd));
    wait_until("a placement leader", Duration::from_secs(10), || {
        let mut c = pc.clone();
        async move { c.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader }
    })
    .await;
    assert_authorized(&admin_calls(channel(&pd), None).await);
    pd.shutdown().await.unwrap();

    // --admin-auth=none together with a key is a contradiction: refused at start.
    let mut both = config(dir.path(), vec![]);
    both.admin_auth = AdminAuth::None;
    let e = skv_placement::start(both).await.err().expect("refused");
    assert!(e.to_string().contains("--admin-auth=none"), "{e:#}");
}

#[tokio::test]
async fn a_follower_checks_the_token_and_the_leader_checks_it_again() {
    skv_testkit::init_test_logging();
    let etcd = Etcd::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut handles = Vec::new();
    for d in &dirs {
        handles.push(
            skv_placement::start(config(d.path(), vec![etcd.client_url.clone()]))
                .await
                .unwrap(),
        );
    }
    let leader = wait_until("a placement leader", Duration::from_secs(10), || {
        let mut c = PlacementClient::new(channel(&handles[0]));
        async move { c.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader }
    })
    .await;
    let follower = handles
        .iter()
        .find(|h| h.addr.to_string() != leader.address)
        .expect("a follower");
    let ch = channel(follower);
    assert_refused(
        &admin_calls(ch.clone(), Some(&token(Role::Write))).await,
        Code::PermissionDenied,
        ErrorCode::PermissionDenied,
    );
    assert_refused(
        &admin_calls(ch.clone(), None).await,
        Code::Unauthenticated,
        ErrorCode::Unauthenticated,
    );
    // Forwarded with its token, the admin call reaches the leader and passes there too.
    let admin = token(Role::Admin);
    assert_authorized(&admin_calls(ch.clone(), Some(&admin)).await);
    for (name, r) in status_calls(ch.clone(), Some(&admin)).await {
        r.unwrap_or_else(|e| panic!("{name} through the follower: {e:?}"));
    }
    // The forwarding marker is no way around the check: the leader verifies the token itself.
    let mut c = PlacementClient::new(channel(
        handles
            .iter()
            .find(|h| h.addr.to_string() == leader.address)
            .expect("the leader"),
    ));
    let mut r = req(SetSchedulerPausedRequest { paused: true }, None);
    r.metadata_mut().insert("skv-placement-forwarded", "1".parse().unwrap());
    let st = c.set_scheduler_paused(r).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    for h in handles {
        h.shutdown().await.unwrap();
    }
}

/// A channel to `h` over TLS trusting `ca`, presenting `role`'s certificate from `certs`
/// (None: no client certificate). Connects now, so a refused handshake is an error here.
async fn tls_channel(h: &ServiceHandle, ca: &Path, certs: &Path, role: Option<&str>) -> Result<Channel, String> {
    // `admin-expired` is admin's key under an expired certificate.
    let cert = role.map(|r| {
        (
            certs.join(format!("{r}.pem")),
            certs.join(format!("{}-key.pem", r.trim_end_matches("-expired"))),
        )
    });
    let tls = skv_rpc::tls::ClientTls::load(ca, cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
        .map_err(|e| e.to_string())?;
    let options = skv_rpc::EndpointOptions {
        tls: Some(tls),
        ..Default::default()
    };
    skv_rpc::endpoint_with(&h.addr.to_string(), &options)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))
}

/// mTLS at placement (ADR 0022): plaintext, no client certificate and another CA's
/// certificate are refused at the handshake; a proxy certificate may read the range map
/// but not register a store nor call an admin call (even with an admin token); an admin
/// certificate is a credential of its own (no token needed); a storenode certificate may
/// heartbeat.
#[tokio::test]
async fn mtls_admits_callers_by_the_role_in_their_certificate() {
    skv_testkit::init_test_logging();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let other = dir.path().join("other");
    skv_rpc::certs::create_expired(&certs, &["127.0.0.1".into()]).unwrap();
    skv_rpc::certs::create(&other, &["127.0.0.1".into()], 1, false).unwrap();
    let mut c = config(dir.path(), vec![]);
    c.tls_cert_file = Some(certs.join("placement.pem"));
    c.tls_key_file = Some(certs.join("placement-key.pem"));
    c.tls_ca_file = Some(certs.join("ca.pem"));
    let pd = skv_placement::start(c).await.unwrap();
    let ca = certs.join("ca.pem");

    // Plaintext.
    let e = PlacementClient::new(channel(&pd))
        .get_members(GetMembersRequest {})
        .await
        .unwrap_err();
    println!("plaintext to placement's TLS port: {:?}: {}", e.code(), e.message());
    // No client certificate, then a certificate of another CA: the handshake fails (the
    // server refuses; the client may only notice on its first call).
    for (what, ch) in [
        ("no client certificate", tls_channel(&pd, &ca, &certs, None).await),
        // Same key and CA as the admin certificate accepted below: only its validity differs.
        (
            "an expired admin certificate of the cluster CA",
            tls_channel(&pd, &ca, &certs, Some("admin-expired")).await,
        ),
        (
            "a client certificate of another CA",
            tls_channel(&pd, &ca, &other, Some("admin")).await,
        ),
    ] {
        let e = match ch {
            Err(e) => e,
            Ok(ch) => {
                let st = PlacementClient::new(ch)
                    .get_members(GetMembersRequest {})
                    .await
                    .expect_err("refused");
                format!("{:?}: {}", st.code(), st.message())
            }
        };
        println!("{what}: {e}");
    }
    // Trusting another CA: our client refuses placement's certificate.
    let e = tls_channel(&pd, &other.join("ca.pem"), &other, Some("admin"))
        .await
        .expect_err("refused");
    println!("client trusting another CA: {e}");
    assert!(e.contains("InvalidCertificate"), "{e}");

    // A proxy certificate: reads yes, registration and admin calls no.
    let proxy = tls_channel(&pd, &ca, &certs, Some("proxy")).await.unwrap();
    let mut pc = PlacementClient::new(proxy.clone());
    wait_until("a placement leader", Duration::from_secs(10), || {
        let mut pc = pc.clone();
        async move { pc.get_members(GetMembersRequest {}).await.ok()?.into_inner().leader }
    })
    .await;
    pc.get_stores(GetStoresRequest {}).await.unwrap();
    let st = pc
        .register_store(RegisterStoreRequest {
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    println!("proxy certificate, RegisterStore: {:?}: {}", st.code(), st.message());
    let calls = admin_calls(proxy.clone(), Some(&token(Role::Admin))).await;
    for (name, r) in &calls {
        let st = r
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{name} accepted from a proxy"));
        assert_eq!(st.code(), Code::PermissionDenied, "{name}: {st:?}");
        assert!(st.message().contains("a proxy certificate cannot call"), "{st:?}");
    }
    println!(
        "proxy certificate with an admin token, SplitRange: {}",
        calls[0]
            .1
            .as_ref()
            .err()
            .map(|s| s.message().to_string())
            .unwrap_or_default()
    );
    // An admin certificate: admin and status calls, no token needed.
    let admin = tls_channel(&pd, &ca, &certs, Some("admin")).await.unwrap();
    assert_authorized(&admin_calls(admin.clone(), None).await);
    for (name, r) in status_calls(admin.clone(), None).await {
        r.unwrap_or_else(|e| panic!("{name} with an admin certificate: {e:?}"));
    }
    // A storenode certificate may register (the answer is about the store, not the caller).
    let store = tls_channel(&pd, &ca, &certs, Some("storenode")).await.unwrap();
    let r = PlacementClient::new(store)
        .register_store(RegisterStoreRequest {
            address: "127.0.0.1:1".into(),
            ..Default::default()
        })
        .await;
    if let Err(st) = &r {
        assert_ne!(st.code(), Code::PermissionDenied, "{st:?}");
    }
    pd.shutdown().await.unwrap();
}
