//! End-to-end routing: the data path survives a placement outage, a split
//! during scans keeps results complete and ordered, and the SDK fails over
//! between proxies.

use skv_proto::internal::{AdminSplitRequest, GetRangeRequest};
use skv_proto::v1::*;
use skv_testkit::cluster::{Cluster, ClusterOptions, kv_client, scan_all, token, with_token};
use std::time::{Duration, Instant};

fn put(key: &[u8], value: &[u8]) -> PutRequest {
    PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        if_version: None,
        if_absent: false,
    }
}

#[tokio::test]
async fn versions_cas_delete_and_scan_semantics() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut kv = kv_client(&cluster.proxy_url(0)).await;
    let t = token("sem", "write");

    // CAS with expected_version 0 = only if absent.
    let r = kv
        .compare_and_swap(with_token(
            CompareAndSwapRequest {
                key: b"c".to_vec(),
                expected_version: 0,
                value: b"1".to_vec(),
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
    assert_eq!(r.version, 1);
    let r = kv
        .compare_and_swap(with_token(
            CompareAndSwapRequest {
                key: b"c".to_vec(),
                expected_version: 0,
                value: b"2".to_vec(),
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded, "CAS on a present key with expected 0 must fail");
    assert_eq!(r.version, 1, "a failed CAS reports the current version");
    let r = kv
        .compare_and_swap(with_token(
            CompareAndSwapRequest {
                key: b"c".to_vec(),
                expected_version: 1,
                value: b"2".to_vec(),
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
    assert_eq!(r.version, 2);

    // Conditional put: a mismatch is FAILED_PRECONDITION and writes nothing.
    let mut p = put(b"c", b"3");
    p.if_version = Some(1);
    let err = kv.put(with_token(p, Some(&t))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let g = kv
        .get(with_token(
            GetRequest {
                key: b"c".to_vec(),
                stale_ok: false,
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.found, g.value.as_slice(), g.version), (true, &b"2"[..], 2));

    // Delete reports whether it removed something.
    let d = kv
        .delete(with_token(
            DeleteRequest {
                key: b"c".to_vec(),
                if_version: None,
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(d.deleted);
    let d = kv
        .delete(with_token(
            DeleteRequest {
                key: b"c".to_vec(),
                if_version: None,
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!d.deleted);
    let g = kv
        .get(with_token(
            GetRequest {
                key: b"c".to_vec(),
                stale_ok: false,
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!g.found);

    // Scan bounds and limit.
    for i in 0..20u32 {
        kv.put(with_token(put(format!("s{i:02}").as_bytes(), b"v"), Some(&t)))
            .await
            .unwrap();
    }
    let got = scan_all(&mut kv, &t, b"s05", b"s10", 0).await.unwrap();
    let keys: Vec<String> = got
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(keys, (5..10).map(|i| format!("s{i:02}")).collect::<Vec<_>>());
    let got = scan_all(&mut kv, &t, b"s", b"", 3).await.unwrap();
    assert_eq!(got.len(), 3);

    // Batches: one result per op, in request order.
    let bw = kv
        .batch_write(with_token(
            BatchWriteRequest {
                ops: vec![
                    WriteOp {
                        key: b"b1".to_vec(),
                        op: Some(write_op::Op::Put(b"x".to_vec())),
                    },
                    WriteOp {
                        key: b"b2".to_vec(),
                        op: Some(write_op::Op::Put(b"y".to_vec())),
                    },
                    WriteOp {
                        key: b"s00".to_vec(),
                        op: Some(write_op::Op::Delete(DeleteMarker {})),
                    },
                ],
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bw.results.len(), 3);
    assert!(bw.results.iter().all(|r| r.code == 0), "{:?}", bw.results);
    let bg = kv
        .batch_get(with_token(
            BatchGetRequest {
                keys: vec![b"b2".to_vec(), b"nope".to_vec(), b"b1".to_vec(), b"s00".to_vec()],
            },
            Some(&t),
        ))
        .await
        .unwrap()
        .into_inner();
    let found: Vec<bool> = bg.results.iter().map(|r| r.found).collect();
    assert_eq!(found, vec![true, false, true, false]);
    assert_eq!(bg.results[0].value, b"y");
    cluster.shutdown().await;
}

#[tokio::test]
async fn data_path_survives_placement_outage() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let mut kv = kv_client(&cluster.proxy_url(0)).await;
    let t = token("pd-down", "write");
    for i in 0..20u32 {
        kv.put(with_token(put(format!("k{i}").as_bytes(), b"before"), Some(&t)))
            .await
            .unwrap();
    }
    cluster.stop_placement(0).await;
    // Keep writing and reading for a while with placement gone.
    let until = Instant::now() + Duration::from_secs(4);
    let mut n = 0u32;
    while Instant::now() < until {
        let key = format!("after{n}");
        kv.put(with_token(put(key.as_bytes(), b"v"), Some(&t)))
            .await
            .unwrap_or_else(|e| panic!("put {key} with placement down: {e:?}"));
        let g = kv
            .get(with_token(
                GetRequest {
                    key: key.into_bytes(),
                    stale_ok: false,
                },
                Some(&t),
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(g.found);
        n += 1;
    }
    assert!(n > 10, "only {n} writes in 4 s with placement down");
    let all = scan_all(&mut kv, &t, b"", b"", 0).await.unwrap();
    assert_eq!(all.len() as u32, 20 + n);
    cluster.shutdown().await;
}

#[tokio::test]
async fn split_during_scans_keeps_results_complete_and_ordered() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut kv = kv_client(&cluster.proxy_url(0)).await;
    let t = token("split", "write");
    let n = 600u32;
    for i in 0..n {
        kv.put(with_token(
            put(format!("key{i:05}").as_bytes(), format!("v{i}").as_bytes()),
            Some(&t),
        ))
        .await
        .unwrap();
    }
    let expect: Vec<Vec<u8>> = (0..n).map(|i| format!("key{i:05}").into_bytes()).collect();

    // Scanner: scan the whole namespace again and again while splits happen.
    let url = cluster.proxy_url(0);
    let tt = t.clone();
    let expect2 = expect.clone();
    let scanner = tokio::spawn(async move {
        let mut kv = kv_client(&url).await;
        let mut scans = 0;
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            let got = scan_all(&mut kv, &tt, b"", b"", 0).await.expect("scan during split");
            let keys: Vec<Vec<u8>> = got.into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys.len(), expect2.len(), "scan {scans} lost or duplicated keys");
            assert_eq!(keys, expect2, "scan {scans} out of order or wrong keys");
            scans += 1;
        }
        scans
    });

    // Splits at three points inside the namespace. The internal key is
    // u16-BE(len ns) ++ ns ++ user key.
    let mut pd = cluster.placement_client().await;
    let ns_prefix = {
        let mut p = (b"split".len() as u16).to_be_bytes().to_vec();
        p.extend_from_slice(b"split");
        p
    };
    for at in ["key00150", "key00300", "key00450"] {
        let mut split_key = ns_prefix.clone();
        split_key.extend_from_slice(at.as_bytes());
        let range = pd
            .get_range(GetRangeRequest { key: split_key.clone() })
            .await
            .unwrap()
            .into_inner();
        let range_id = range
            .range
            .and_then(|r| r.descriptor)
            .map(|d| d.range_id)
            .expect("range for key");
        let r = pd
            .split_range(skv_testkit::cluster::admin(AdminSplitRequest {
                range_id,
                split_key: split_key.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        let (l, rr) = (r.left.expect("left"), r.right.expect("right"));
        assert_eq!(l.end, split_key);
        assert_eq!(rr.start, split_key);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let scans = scanner.await.unwrap();
    assert!(scans >= 2, "only {scans} scans ran");
    // And every key is still readable with the right value.
    for i in (0..n).step_by(37) {
        let g = kv
            .get(with_token(
                GetRequest {
                    key: format!("key{i:05}").into_bytes(),
                    stale_ok: false,
                },
                Some(&t),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(g.value, format!("v{i}").into_bytes());
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn sdk_fails_over_between_proxies() {
    let mut cluster = Cluster::start(ClusterOptions {
        proxies: 2,
        ..Default::default()
    })
    .await;
    let client = cluster.client("failover", "write").await;
    for i in 0..10u32 {
        client.put(format!("k{i}").into_bytes(), b"v".to_vec()).await.unwrap();
    }
    cluster.stop_proxy(0).await;
    for i in 10..30u32 {
        client
            .put(format!("k{i}").into_bytes(), b"v".to_vec())
            .await
            .unwrap_or_else(|e| panic!("put k{i} after proxy 0 died: {e}"));
    }
    for i in 0..30u32 {
        assert!(
            client.get(format!("k{i}").into_bytes()).await.unwrap().is_some(),
            "k{i} missing"
        );
    }
    cluster.shutdown().await;
}
