//! End-to-end tests of the proxy's gRPC surface against a fake placement + fake
//! storenodes (tests/fake). The lead's testkit runs the real cluster.

mod fake;

use base64::Engine;
use fake::{Options, desc, req, token};
use futures::StreamExt;
use skv_proto::internal::StoreInfo;
use skv_proto::v1::*;
use skv_proxy::auth::{Claims, Role, mint_hs256};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::Code;

async fn put(c: &mut kv_client::KvClient<tonic::transport::Channel>, t: &str, k: &[u8], v: &[u8]) -> u64 {
    c.put(req(
        PutRequest {
            key: k.to_vec(),
            value: v.to_vec(),
            ..Default::default()
        },
        t,
    ))
    .await
    .unwrap()
    .into_inner()
    .version
}

async fn scan_all(
    c: &mut kv_client::KvClient<tonic::transport::Channel>,
    t: &str,
    start: &[u8],
    end: &[u8],
    limit: u32,
) -> Result<Vec<KeyValue>, tonic::Status> {
    let mut s = c
        .scan(req(
            ScanRequest {
                start: start.to_vec(),
                end: end.to_vec(),
                limit,
            },
            t,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend(m?.kvs);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_operations() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    assert_eq!(put(&mut c, &t, b"a", b"1").await, 1);
    assert_eq!(put(&mut c, &t, b"a", b"2").await, 2);
    let g = c
        .get(req(
            GetRequest {
                key: b"a".to_vec(),
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(g.found);
    assert_eq!(g.value, b"2");
    assert_eq!(g.version, 2);
    let g = c
        .get(req(
            GetRequest {
                key: b"missing".to_vec(),
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!g.found);

    // Conditional put.
    let e = c
        .put(req(
            PutRequest {
                key: b"a".to_vec(),
                value: b"x".to_vec(),
                if_version: Some(1),
                if_absent: false,
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .put(req(
            PutRequest {
                key: b"a".to_vec(),
                value: b"x".to_vec(),
                if_version: None,
                if_absent: true,
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let v = c
        .put(req(
            PutRequest {
                key: b"a".to_vec(),
                value: b"3".to_vec(),
                if_version: Some(2),
                if_absent: false,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner()
        .version;
    assert_eq!(v, 3);

    // CAS.
    let r = c
        .compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"a".to_vec(),
                expected_version: 1,
                value: b"c".to_vec(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded);
    assert_eq!(r.version, 3);
    let r = c
        .compare_and_swap(req(
            CompareAndSwapRequest {
                key: b"new".to_vec(),
                expected_version: 0,
                value: b"c".to_vec(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
    assert_eq!(r.version, 1);

    // Delete.
    let d = c
        .delete(req(
            DeleteRequest {
                key: b"new".to_vec(),
                if_version: None,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted);
    let d = c
        .delete(req(
            DeleteRequest {
                key: b"new".to_vec(),
                if_version: None,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!d.deleted);
    let e = c
        .delete(req(
            DeleteRequest {
                key: b"a".to_vec(),
                if_version: Some(9),
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Stored keys carry the namespace prefix.
    let keys: Vec<Vec<u8>> = cl.shared.truth.lock().data.keys().cloned().collect();
    assert_eq!(keys, vec![b"\x00\x04acmea".to_vec()]);

    assert!(cl.http_get("/readyz").await.starts_with("HTTP/1.1 200"));
    let m = cl.metrics().await;
    assert!(m.contains(r#"skv_proxy_requests_total{rpc="Put",code="OK"}"#), "{m}");
    assert!(m.contains("skv_proxy_request_duration_seconds_bucket"));
    assert!(m.contains("skv_proxy_range_cache_size 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_denials_over_grpc() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let get = |t: Option<String>| {
        let mut r = tonic::Request::new(GetRequest {
            key: b"k".to_vec(),
            stale_ok: false,
        });
        if let Some(t) = t {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    };
    // No token.
    assert_eq!(c.get(get(None)).await.unwrap_err().code(), Code::Unauthenticated);
    // Malformed.
    assert_eq!(
        c.get(get(Some("Bearer not-a-jwt".into()))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        c.get(get(Some("Basic dXNlcjpwdw==".into()))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let base = Claims::new("t", "acme", Role::Admin, Duration::from_secs(600));
    let mut expired = base.clone();
    expired.exp = now - 3600;
    let mut wrong_iss = base.clone();
    wrong_iss.iss = "evil".into();
    let mut wrong_aud = base.clone();
    wrong_aud.aud = "evil".into();
    let mut future = base.clone();
    future.nbf = now + 3600;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&serde_json::to_string(&base).unwrap())
    );
    let bad_sig = mint_hs256(b"some-other-secret-some-other-secret", &base).unwrap();
    for (what, tok) in [
        ("expired", mint_hs256(fake::SECRET, &expired).unwrap()),
        ("issuer", mint_hs256(fake::SECRET, &wrong_iss).unwrap()),
        ("audience", mint_hs256(fake::SECRET, &wrong_aud).unwrap()),
        ("nbf", mint_hs256(fake::SECRET, &future).unwrap()),
        ("alg=none", alg_none),
        ("signature", bad_sig),
    ] {
        let e = c.get(get(Some(format!("Bearer {tok}")))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}");
        assert!(!e.message().contains(&tok), "the token must not be echoed");
    }
    // A read token cannot write, but can read.
    let ro = token("acme", Role::Read);
    let e = c
        .put(req(
            PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            },
            &ro,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .batch_write(req(
            BatchWriteRequest {
                ops: vec![WriteOp {
                    key: b"k".to_vec(),
                    op: Some(write_op::Op::Delete(DeleteMarker {})),
                }],
            },
            &ro,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        c.get(req(
            GetRequest {
                key: b"k".to_vec(),
                stale_ok: false
            },
            &ro
        ))
        .await
        .is_ok()
    );
    assert_eq!(cl.shared.write_attempts.load(Ordering::SeqCst), 0);

    let m = cl.metrics().await;
    for reason in [
        "missing",
        "malformed",
        "expired",
        "wrong_issuer",
        "wrong_audience",
        "not_yet_valid",
        "bad_algorithm",
        "bad_signature",
        "forbidden",
    ] {
        assert!(
            m.contains(&format!("skv_proxy_auth_denials_total{{reason=\"{reason}\"}}")),
            "{reason} missing in\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_isolation() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let a = token("a", Role::Write);
    let b = token("b", Role::Write);
    let ab = token("ab", Role::Write);
    put(&mut c, &a, b"secret", b"A").await;
    put(&mut c, &a, b"bsecret", b"A2").await;
    put(&mut c, &b, b"x", b"B").await;
    put(&mut c, &ab, b"y", b"AB").await;
    // b cannot see a's key, even by guessing the prefix of another tenant.
    for (tok, key) in [
        (&b, &b"secret"[..]),
        (&ab, b"secret"),
        (&ab, b"secret"),
        (&b, b"\x00\x01asecret"),
    ] {
        let g = c
            .get(req(
                GetRequest {
                    key: key.to_vec(),
                    stale_ok: false,
                },
                tok,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(!g.found);
    }
    // Full scans see only their own keys, without prefix.
    let kvs = scan_all(&mut c, &a, b"", b"", 0).await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![b"bsecret".to_vec(), b"secret".to_vec()]);
    let kvs = scan_all(&mut c, &b, b"", b"", 0).await.unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].key, b"x");
    let kvs = scan_all(&mut c, &ab, b"", b"", 0).await.unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].key, b"y");
    // Scans with hostile bounds stay inside.
    let kvs = scan_all(&mut c, &b, b"\x00", b"\xff\xff\xff", 0).await.unwrap();
    assert_eq!(kvs.len(), 1);
    // Reversed bounds: empty.
    assert!(scan_all(&mut c, &a, b"z", b"a", 0).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_client::ServerReflectionClient};

    let cl = fake::start(Options::default()).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", cl.proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = HealthClient::new(ch.clone());
    for service in ["", "skv.v1.Kv"] {
        let s = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut r = ServerReflectionClient::new(ch.clone());
    let reqs = futures::stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]);
    let mut resp = r.server_reflection_info(reqs).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected {msg:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"skv.v1.Kv"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("skv.internal")), "{names:?}");
    // The descriptor for the service is served.
    let reqs = futures::stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("skv.v1.Kv".into())),
    }]);
    let mut resp = r.server_reflection_info(reqs).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    assert!(matches!(
        msg.message_response,
        Some(MessageResponse::FileDescriptorResponse(_))
    ));
    // The internal services cannot be described either.
    for symbol in [
        "skv.internal.v1.Store",
        "skv.internal.v1.Raft",
        "skv.internal.v1.Placement",
    ] {
        let reqs = futures::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        }]);
        let mut resp = r.server_reflection_info(reqs).await.unwrap().into_inner();
        match resp.next().await.unwrap() {
            Err(s) => assert_eq!(s.code(), tonic::Code::NotFound, "{symbol}: {s:?}"),
            Ok(m) => assert!(
                matches!(m.message_response, Some(MessageResponse::ErrorResponse(_))),
                "{symbol}: {m:?}"
            ),
        }
    }

    // v1alpha too.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut r = alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let reqs = futures::stream::iter([alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(alpha::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    }]);
    let mut resp = r.server_reflection_info(reqs).await.unwrap().into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) = msg.message_response
    else {
        panic!("unexpected {msg:?}")
    };
    assert!(list.service.iter().any(|s| s.name == "skv.v1.Kv"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_limits_and_oversized_frames() {
    let cl = fake::start(Options {
        tweak: |c| c.max_value_len = 1000,
        ..Default::default()
    })
    .await;
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    let put_req = |k: Vec<u8>, v: Vec<u8>| {
        req(
            PutRequest {
                key: k,
                value: v,
                ..Default::default()
            },
            &t,
        )
    };
    for (k, v) in [
        (vec![], b"v".to_vec()),
        (vec![b'k'; 4097], b"v".to_vec()),
        (b"k".to_vec(), vec![0; 1001]),
    ] {
        assert_eq!(c.put(put_req(k, v)).await.unwrap_err().code(), Code::InvalidArgument);
    }
    assert!(c.put(put_req(vec![b'k'; 4096], vec![0; 1000])).await.is_ok());
    let e = c
        .get(req(
            GetRequest {
                key: vec![],
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .batch_get(req(
            BatchGetRequest {
                keys: vec![b"ok".to_vec(), vec![]],
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A frame above --max-message-len (1 MiB + 64 KiB): refused, no panic.
    let e = c.put(put_req(b"big".to_vec(), vec![7; 3 << 20])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(cl.shared.write_attempts.load(Ordering::SeqCst), 1);
    // The proxy keeps serving.
    assert!(c.put(put_req(b"after".to_vec(), b"v".to_vec())).await.is_ok());
    assert!(!cl.proxy.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_outcome_unknown_is_not_retried() {
    let cl = fake::start(Options {
        tweak: |c| c.request_timeout_ms = 300,
        ..Default::default()
    })
    .await;
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    put(&mut c, &t, b"k", b"v").await;
    cl.shared.hang_writes.store(true, Ordering::SeqCst);
    let before = cl.shared.write_attempts.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let e = c
        .put(req(
            PutRequest {
                key: b"k".to_vec(),
                value: b"v2".to_vec(),
                ..Default::default()
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("outcome unknown"), "{e:?}");
    assert_eq!(e.metadata().get(skv_proxy::OUTCOME_METADATA_KEY).unwrap(), "unknown");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        cl.shared.write_attempts.load(Ordering::SeqCst),
        before + 1,
        "sent exactly once"
    );

    // Conditional write, with the client's own deadline (grpc-timeout).
    let mut r = req(
        CompareAndSwapRequest {
            key: b"k".to_vec(),
            expected_version: 1,
            value: b"v3".to_vec(),
        },
        &t,
    );
    r.set_timeout(Duration::from_millis(400));
    let e = c.compare_and_swap(r).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("outcome unknown"));
    assert_eq!(cl.shared.write_attempts.load(Ordering::SeqCst), before + 2);

    // In a batch: a per-operation result.
    let r = c
        .batch_write(req(
            BatchWriteRequest {
                ops: vec![WriteOp {
                    key: b"k".to_vec(),
                    op: Some(write_op::Op::Put(b"x".to_vec())),
                }],
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].code, Code::Unavailable as i32);
    assert!(r.results[0].message.contains("outcome unknown"));

    // Reads still work meanwhile.
    let g = c
        .get(req(
            GetRequest {
                key: b"k".to_vec(),
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(g.found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_not_leader_and_learns_leader() {
    let cl = fake::start(Options::default()).await;
    // Placement believes store 1 leads; the truth is store 3.
    cl.shared.truth.lock().leaders.insert(1, 3);
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    assert_eq!(put(&mut c, &t, b"k", b"v").await, 1);
    let nl = cl.shared.not_leader_answers.load(Ordering::SeqCst);
    assert_eq!(nl, 1);
    // The leader hint sticks: no more NotLeader.
    for i in 0..5u8 {
        put(&mut c, &t, &[b'k', i], b"v").await;
    }
    assert_eq!(cl.shared.not_leader_answers.load(Ordering::SeqCst), nl);
    assert!(
        cl.metrics()
            .await
            .contains(r#"skv_proxy_retries_total{reason="not_leader"} 1"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_retry_transport_errors() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    put(&mut c, &t, b"k", b"v").await;
    // The leader fails twice; the followers point back at it; the read still succeeds.
    cl.shared.unavailable_reads.store(2, Ordering::SeqCst);
    let g = c
        .get(req(
            GetRequest {
                key: b"k".to_vec(),
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(g.found);
    assert_eq!(cl.shared.unavailable_reads.load(Ordering::SeqCst), 0);
    assert!(
        cl.metrics()
            .await
            .contains(r#"skv_proxy_retries_total{reason="transport"} 2"#)
    );
    // Follower reads (stale_ok) work too, even when followers refuse them.
    for _ in 0..10 {
        let g = c
            .get(req(
                GetRequest {
                    key: b"k".to_vec(),
                    stale_ok: true,
                },
                &t,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(g.found);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_write_is_retried_elsewhere() {
    // A store that is advertised but dead (its port is closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let cl = fake::start(Options {
        stores: vec![1],
        ranges: vec![(desc(1, b"", b"", 1, &[9, 1]), 9)],
        extra_stores: vec![StoreInfo {
            store_id: 9,
            address: dead_addr.to_string(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    // The truth: store 1 leads now.
    cl.shared.truth.lock().leaders.insert(1, 1);
    let mut c = cl.client().await;
    let t = token("acme", Role::Write);
    assert_eq!(put(&mut c, &t, b"k", b"v").await, 1);
    assert_eq!(cl.shared.write_attempts.load(Ordering::SeqCst), 1);
    assert!(
        cl.metrics()
            .await
            .contains(r#"skv_proxy_retries_total{reason="connect"}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_continues_across_a_split_without_placement() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let t = token("s", Role::Write);
    let n = 120usize;
    for i in 0..n {
        put(&mut c, &t, format!("key{i:04}").as_bytes(), format!("v{i}").as_bytes()).await;
    }
    // Placement goes away; the proxy must learn the split from the storenode.
    cl.placement_cancel.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ns = skv_proxy::namespace::Namespace::new(b"s").unwrap();
    cl.shared.scan_page_cap.store(7, Ordering::SeqCst);
    // The range splits right after the first stream took its point: that stream is
    // still served whole (one range, one point), and the proxy's cache is now stale.
    *cl.shared.split_after_pages.lock() = Some((1, vec![ns.encode(b"key0050"), ns.encode(b"key0090")]));
    let want: Vec<String> = (0..n).map(|i| format!("key{i:04}")).collect();
    let kvs = scan_all(&mut c, &t, b"", b"", 0).await.unwrap();
    let keys: Vec<String> = kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, want);
    assert_eq!(cl.shared.truth.lock().ranges.len(), 3);
    assert_eq!(cl.shared.epoch_errors.load(Ordering::SeqCst), 0);
    // The next scan meets the split (EpochNotMatch) and learns it from the storenode.
    let kvs = scan_all(&mut c, &t, b"", b"", 0).await.unwrap();
    let keys: Vec<String> = kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, want);
    assert!(cl.shared.epoch_errors.load(Ordering::SeqCst) >= 1);

    // Again, now fanning out over the three known ranges, with more splits mid-scan.
    let kvs = scan_all(&mut c, &t, b"", b"", 0).await.unwrap();
    assert_eq!(kvs.len(), n);
    cl.shared.scan_calls.store(0, Ordering::SeqCst);
    *cl.shared.split_after_pages.lock() = Some((2, vec![ns.encode(b"key0020"), ns.encode(b"key0070")]));
    let kvs = scan_all(&mut c, &t, b"", b"", 0).await.unwrap();
    let keys: Vec<String> = kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, want);
    assert_eq!(cl.shared.truth.lock().ranges.len(), 5);
    let kvs = scan_all(&mut c, &t, b"", b"", 1000).await.unwrap();
    assert_eq!(kvs.len(), n);

    // Limits across ranges, and bounded scans.
    let kvs = scan_all(&mut c, &t, b"key0040", b"", 30).await.unwrap();
    assert_eq!(kvs.len(), 30);
    assert_eq!(kvs[0].key, b"key0040");
    assert_eq!(kvs[29].key, b"key0069");
    let kvs = scan_all(&mut c, &t, b"key0085", b"key0095", 0).await.unwrap();
    assert_eq!(kvs.len(), 10);
    // Point operations keep working with placement down.
    assert_eq!(put(&mut c, &t, b"key0100", b"z").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_stream_that_breaks_is_never_resumed_at_another_point() {
    let cl = fake::start(Options::default()).await;
    let mut c = cl.client().await;
    let t = token("i", Role::Write);
    for i in 0..20 {
        put(&mut c, &t, format!("k{i:02}").as_bytes(), b"v").await;
    }
    cl.shared.scan_page_cap.store(5, Ordering::SeqCst);
    cl.shared.break_scan_after_first.store(true, Ordering::SeqCst);
    let mut s = c
        .scan(req(
            ScanRequest {
                start: vec![],
                end: vec![],
                limit: 0,
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let err = loop {
        match s.next().await {
            Some(Ok(m)) => got.extend(m.kvs.into_iter().map(|kv| kv.key)),
            Some(Err(e)) => break e,
            None => panic!("a broken range stream must end the scan with an error"),
        }
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("resume after it"), "{}", err.message());
    assert!(
        err.message().contains("k04"),
        "names the last key returned: {}",
        err.message()
    );
    // Every key up to the one named was delivered before the error.
    let want: Vec<Vec<u8>> = (0..5).map(|i| format!("k{i:02}").into_bytes()).collect();
    assert_eq!(got, want);
    // Without the break the same scan is whole, from one point.
    assert_eq!(scan_all(&mut c, &t, b"", b"", 0).await.unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_request_order_across_ranges() {
    let cl = fake::start(Options {
        ranges: vec![
            (desc(1, b"", b"\x00\x01bm", 1, &[1, 2, 3]), 1),
            (desc(2, b"\x00\x01bm", b"", 1, &[1, 2, 3]), 2),
        ],
        ..Default::default()
    })
    .await;
    let mut c = cl.client().await;
    let t = token("b", Role::Write);
    let keys: Vec<Vec<u8>> = ["z", "a", "q", "b", "n"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let r = c
        .batch_write(req(
            BatchWriteRequest {
                ops: keys
                    .iter()
                    .map(|k| WriteOp {
                        key: k.clone(),
                        op: Some(write_op::Op::Put(k.clone())),
                    })
                    .chain([WriteOp {
                        key: b"absent".to_vec(),
                        op: Some(write_op::Op::Delete(DeleteMarker {})),
                    }])
                    .collect(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 6);
    assert!(r.results[..5].iter().all(|w| w.code == 0 && w.version == 1));
    assert_eq!((r.results[5].code, r.results[5].version), (0, 0));
    // One storenode call per range, not one per key.
    assert_eq!(cl.shared.batch_calls.swap(0, Ordering::SeqCst), 2);
    let mut ask = keys.clone();
    ask.insert(2, b"missing".to_vec());
    let r = c
        .batch_get(req(BatchGetRequest { keys: ask.clone() }, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), ask.len());
    assert_eq!(cl.shared.batch_calls.swap(0, Ordering::SeqCst), 2);
    for (k, g) in ask.iter().zip(&r.results) {
        if k == b"missing" {
            assert!(!g.found);
        } else {
            assert!(g.found);
            assert_eq!(&g.value, k);
        }
    }
    // Several operations on one key apply in request order.
    let r = c
        .batch_write(req(
            BatchWriteRequest {
                ops: vec![
                    WriteOp {
                        key: b"dup".to_vec(),
                        op: Some(write_op::Op::Put(b"1".to_vec())),
                    },
                    WriteOp {
                        key: b"other".to_vec(),
                        op: Some(write_op::Op::Put(b"o".to_vec())),
                    },
                    WriteOp {
                        key: b"dup".to_vec(),
                        op: Some(write_op::Op::Put(b"2".to_vec())),
                    },
                    WriteOp {
                        key: b"dup".to_vec(),
                        op: Some(write_op::Op::Delete(DeleteMarker {})),
                    },
                ],
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i32, u64)> = r.results.iter().map(|w| (w.code, w.version)).collect();
    assert_eq!(got, vec![(0, 1), (0, 1), (0, 2), (0, 1)]);
    c.delete(req(
        DeleteRequest {
            key: b"other".to_vec(),
            if_version: None,
        },
        &t,
    ))
    .await
    .unwrap();
    // Both ranges were used.
    let kvs = scan_all(&mut c, &t, b"", b"", 0).await.unwrap();
    assert_eq!(kvs.len(), 5);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_concurrency_limit() {
    let cl = fake::start(Options {
        tweak: |c| {
            c.tenant_max_concurrency = 1;
            c.request_timeout_ms = 3000;
        },
        ..Default::default()
    })
    .await;
    let t = token("busy", Role::Write);
    let other = token("calm", Role::Write);
    cl.shared.hang_writes.store(true, Ordering::SeqCst);
    let mut c1 = cl.client().await;
    let t1 = t.clone();
    let hung = tokio::spawn(async move {
        c1.put(req(
            PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            },
            &t1,
        ))
        .await
    });
    // Wait until the hung write holds the tenant's only slot (it reached the store).
    let t0 = std::time::Instant::now();
    while cl.shared.write_attempts.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut c = cl.client().await;
    let e = c
        .get(req(
            GetRequest {
                key: b"k".to_vec(),
                stale_ok: false,
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    // Another tenant is not affected.
    assert!(
        c.get(req(
            GetRequest {
                key: b"k".to_vec(),
                stale_ok: false,
            },
            &other,
        ))
        .await
        .is_ok()
    );
    let r = hung.await.unwrap();
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_sources_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("k.pem");
    std::fs::write(&pem, "x").unwrap();
    let mut config = skv_proxy::Config::new(vec!["http://127.0.0.1:1".into()], pem.clone());
    config.jwt.jwt_hs256_secret_file = None;
    config.jwt.jwt_public_key_file = Some(pem.clone());
    let e = skv_proxy::start(config.clone()).await.err().unwrap();
    assert!(e.to_string().contains("not an RSA or P-256 EC public key"), "{e}");
    config.jwt.jwt_public_key_file = None;
    config.jwt.jwt_jwks_file = Some(pem);
    let e = skv_proxy::start(config).await.err().unwrap();
    assert!(e.to_string().contains("not a JWKS"), "{e}");

    use clap::Parser;
    assert!(skv_proxy::Config::try_parse_from(["skv-proxy", "--placement", "http://a:1"]).is_err());
    assert!(
        skv_proxy::Config::try_parse_from([
            "skv-proxy",
            "--placement",
            "http://a:1",
            "--jwt-hs256-secret-file",
            "s",
            "--jwt-jwks-file",
            "j"
        ])
        .is_err()
    );
    let c = skv_proxy::Config::try_parse_from([
        "skv-proxy",
        "--placement",
        "http://a:1,http://b:2",
        "--jwt-hs256-secret-file",
        "s",
    ])
    .unwrap();
    assert_eq!(c.placement.len(), 2);
    assert_eq!(c.listen.port(), 7400);
    assert_eq!(c.request_timeout_ms, 5000);
}
