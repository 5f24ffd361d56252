//! End-to-end through a real cluster: JWT checks and namespace isolation over gRPC.

use skv_proto::v1::*;
use skv_testkit::cluster::{Cluster, ClusterOptions, TEST_SECRET, kv_client, scan_all, token, token_with, with_token};
use tonic::Code;

fn get(key: &[u8]) -> GetRequest {
    GetRequest {
        key: key.to_vec(),
        stale_ok: false,
    }
}

fn put(key: &[u8], value: &[u8]) -> PutRequest {
    PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        if_version: None,
        if_absent: false,
    }
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn auth_and_namespaces_end_to_end() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut kv = kv_client(&cluster.proxy_url(0)).await;

    // A valid write token works; the version starts at 1 and rises.
    let a = token("tenant-a", "write");
    let v1 = kv
        .put(with_token(put(b"k", b"a1"), Some(&a)))
        .await
        .unwrap()
        .into_inner()
        .version;
    let v2 = kv
        .put(with_token(put(b"k", b"a2"), Some(&a)))
        .await
        .unwrap()
        .into_inner()
        .version;
    assert_eq!((v1, v2), (1, 2));

    // Denials: no token, garbage, wrong secret, expired, wrong iss/aud, alg=none.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let none_alg = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&format!(
            r#"{{"sub":"x","ns":"tenant-a","role":"admin","iat":{now},"nbf":{now},"exp":{},"iss":"skv","aud":"skv"}}"#,
            now + 3600
        ))
    );
    let bad: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("garbage", Some("not-a-jwt".into())),
        (
            "wrong secret",
            Some(token_with(
                "tenant-a",
                "write",
                3600,
                "skv",
                "skv",
                b"another-secret-another-secret!!",
            )),
        ),
        (
            "expired",
            Some(token_with("tenant-a", "write", -3600, "skv", "skv", TEST_SECRET)),
        ),
        (
            "wrong issuer",
            Some(token_with("tenant-a", "write", 3600, "evil", "skv", TEST_SECRET)),
        ),
        (
            "wrong audience",
            Some(token_with("tenant-a", "write", 3600, "skv", "other", TEST_SECRET)),
        ),
        ("alg=none", Some(none_alg)),
    ];
    for (what, tok) in &bad {
        let err = kv.get(with_token(get(b"k"), tok.as_deref())).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(
            !err.message().contains("ey"),
            "{what}: error must not echo the token: {}",
            err.message()
        );
    }

    // A read token can read but not write.
    let ra = token("tenant-a", "read");
    let got = kv.get(with_token(get(b"k"), Some(&ra))).await.unwrap().into_inner();
    assert!(got.found);
    assert_eq!(got.value, b"a2");
    let err = kv.put(with_token(put(b"k", b"x"), Some(&ra))).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = kv
        .delete(with_token(
            DeleteRequest {
                key: b"k".to_vec(),
                if_version: None,
            },
            Some(&ra),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Namespaces: tenant b cannot see tenant a's key, by get or by scan, and its own
    // writes to the same user key do not touch a's.
    let b = token("tenant-b", "write");
    assert!(
        !kv.get(with_token(get(b"k"), Some(&b)))
            .await
            .unwrap()
            .into_inner()
            .found
    );
    kv.put(with_token(put(b"k", b"b1"), Some(&b))).await.unwrap();
    // Keys that look like another namespace's encoded prefix stay inside b's namespace.
    let mut tricky = vec![0u8, 8];
    tricky.extend_from_slice(b"tenant-a");
    tricky.extend_from_slice(b"k");
    kv.put(with_token(put(&tricky, b"escape?"), Some(&b))).await.unwrap();
    let a_view = kv.get(with_token(get(b"k"), Some(&a))).await.unwrap().into_inner();
    assert_eq!(a_view.value, b"a2", "tenant b overwrote tenant a");
    let keys: Vec<Vec<u8>> = scan_all(&mut kv, &b, b"", b"", 0)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "scan results must be in key order");
    let mut expect = vec![b"k".to_vec(), tricky.clone()];
    expect.sort();
    assert_eq!(keys, expect, "tenant b's scan must show exactly its own keys");
    let a_keys: Vec<Vec<u8>> = scan_all(&mut kv, &a, b"", b"", 0)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(a_keys, vec![b"k".to_vec()], "tenant a sees only its own key");

    // Input limits: empty key, key over 4096 bytes, value over 1 MiB.
    let err = kv.put(with_token(put(b"", b"v"), Some(&a))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = kv.get(with_token(get(&vec![b'x'; 4097]), Some(&a))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(kv.put(with_token(put(&vec![b'x'; 4096], b"v"), Some(&a))).await.is_ok());
    let err = kv
        .put(with_token(put(b"big", &vec![0u8; (1 << 20) + 1]), Some(&a)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{err:?}"
    );
    // A frame far over the message limit is refused, and the proxy still serves.
    let err = kv
        .put(with_token(put(b"huge", &vec![0u8; 8 << 20]), Some(&a)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(
        kv.get(with_token(get(b"k"), Some(&a)))
            .await
            .unwrap()
            .into_inner()
            .found
    );

    cluster.shutdown().await;
}
