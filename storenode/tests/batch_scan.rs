//! Streaming scans from one consistent point, BatchGet and BatchWrite.
mod common;

use common::*;
use skv_proto::internal::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tonic::Code;

fn filler(i: u32) -> Vec<u8> {
    format!("m{i:04}").into_bytes()
}

/// A writer keeps `a` and `z` equal by writing both in one BatchWrite; scans that stream
/// the range slowly (the writer changes both keys many times during one scan) must always
/// see them equal: the whole stream comes from one snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scan_sees_one_point_while_a_writer_changes_keys() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    // ~1500 keys between `a` and `z`: several scan messages.
    for chunk in 0..15u32 {
        let ops = (chunk * 100..(chunk + 1) * 100)
            .map(|i| put_op(&filler(i), &[b'f'; 200], None))
            .collect();
        c.batch_write(ops).await;
    }
    c.batch_write(vec![put_op(b"a", b"0", None), put_op(b"z", b"0", None)])
        .await;

    let c = Arc::new(c);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop, rounds) = (c.clone(), stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut i = 1u64;
            while !stop.load(Ordering::Relaxed) {
                let v = i.to_string().into_bytes();
                let r = c
                    .batch_write(vec![put_op(b"a", &v, None), put_op(b"z", &v, None)])
                    .await;
                assert!(r.iter().all(|r| r.succeeded), "{r:?}");
                // Both ops of one batch get consecutive-in-batch versions of their own keys.
                assert_eq!(r[0].version, r[1].version, "{r:?}");
                rounds.store(i, Ordering::Relaxed);
                i += 1;
            }
        })
    };

    let mut max_during = 0;
    for round in 0..6 {
        let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
        let mut lc = c.client(leader).await;
        let before = rounds.load(Ordering::Relaxed);
        let mut stream = lc
            .scan(StoreScanRequest {
                header: Some(header(&d)),
                start: vec![],
                end: vec![],
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut kvs = Vec::new();
        let mut messages = 0;
        while let Some(m) = stream.message().await.unwrap() {
            assert!(m.routing_error.is_none(), "{m:?}");
            messages += 1;
            kvs.extend(m.kvs);
            // Read slowly: the writer commits several rounds during one scan.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let during = rounds.load(Ordering::Relaxed) - before;
        max_during = max_during.max(during);
        assert_eq!(kvs.len(), 1502, "round {round}");
        assert!(messages > 1, "the scan should take several messages");
        assert!(kvs.windows(2).all(|w| w[0].key < w[1].key), "keys out of order");
        let a = kvs.first().unwrap();
        let z = kvs.last().unwrap();
        assert_eq!((a.key.as_slice(), z.key.as_slice()), (&b"a"[..], &b"z"[..]));
        assert_eq!(
            (a.value.clone(), a.version),
            (z.value.clone(), z.version),
            "round {round}: a mix of two points (writer did {during} rounds meanwhile)"
        );
        eprintln!(
            "round {round}: a = z = {:?}; writer rounds during the scan: {during}",
            a.value
        );
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    // The writer really changed `a` and `z` while scans were streaming.
    assert!(max_during > 0, "the writer made no progress during any scan");
    let Ok(c) = Arc::try_unwrap(c) else {
        panic!("cluster still shared")
    };
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_write_with_conditions_and_duplicate_keys_then_batch_get() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    let r = c
        .batch_write(vec![
            put_op(b"k1", b"a", Some(0)), // absent: applies, v1
            put_op(b"k1", b"b", Some(1)), // sees the op before: v2
            put_op(b"k1", b"c", Some(1)), // stale: refused, current is 2
            put_op(b"k2", b"x", Some(5)), // absent: refused
            delete_op(b"k1", None),       // deletes v2
            put_op(b"k1", b"d", Some(0)), // deleted = absent: applies, v3
            delete_op(b"k3", None),       // absent: nothing to delete
            put_op(b"k4", b"e", None),    // unconditional
            delete_op(b"k4", Some(1)),    // conditional delete of the op before
        ])
        .await;
    let got: Vec<(bool, u64, bool)> = r.iter().map(|r| (r.succeeded, r.version, r.existed)).collect();
    assert_eq!(
        got,
        vec![
            (true, 1, false),
            (true, 2, true),
            (false, 2, true),
            (false, 0, false),
            (true, 0, true),
            (true, 3, false),
            (true, 0, false),
            (true, 1, false),
            (true, 0, true),
        ]
    );
    assert_eq!(c.get(b"k1").await, Some((b"d".to_vec(), 3)));
    assert_eq!(c.get(b"k2").await, None);
    assert_eq!(c.get(b"k4").await, None);

    // BatchGet: request order, duplicates, missing keys.
    c.put(b"k5", b"five").await;
    let r = c.batch_get(&[b"k5", b"k1", b"missing", b"k4", b"k1"]).await;
    let got: Vec<(bool, Vec<u8>, u64)> = r.iter().map(|r| (r.found, r.value.clone(), r.version)).collect();
    assert_eq!(
        got,
        vec![
            (true, b"five".to_vec(), 1),
            (true, b"d".to_vec(), 3),
            (false, vec![], 0),
            (false, vec![], 0),
            (true, b"d".to_vec(), 3),
        ]
    );
    // A later batch continues the versions.
    let r = c
        .batch_write(vec![put_op(b"k1", b"e", Some(3)), put_op(b"k5", b"5", None)])
        .await;
    assert_eq!((r[0].succeeded, r[0].version), (true, 4));
    assert_eq!((r[1].succeeded, r[1].version, r[1].existed), (true, 2, true));

    // A follower serves a stale BatchGet once caught up.
    let (leader, d) = c.leader_of(1, Duration::from_secs(5)).await;
    let f = (1..=3).find(|f| *f != leader).unwrap();
    wait_until("stale batch get on a follower", Duration::from_secs(10), || async {
        let mut fc = c.client(f).await;
        let r = fc
            .batch_get(StoreBatchGetRequest {
                header: Some(header(&d)),
                keys: vec![b"k1".to_vec(), b"k5".to_vec()],
                stale_ok: true,
            })
            .await
            .unwrap()
            .into_inner();
        r.routing_error.is_none() && r.results.len() == 2 && r.results[0].version == 4 && r.results[1].value == b"5"
    })
    .await;
    c.shutdown().await;
}

fn kind(r: Option<RoutingError>) -> Option<routing_error::Kind> {
    r.and_then(|e| e.kind)
}

/// Split at "m" while a scan of the whole range is being streamed: the scan finishes from its
/// snapshot (complete, pre-split); a scan, batch get or batch write routed with the old epoch,
/// or naming a key that moved, is refused with a routing error and applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scans_and_batches_across_a_split() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    let keys: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| format!("{}{i:04}", if i < 500 { "c" } else { "p" }).into_bytes())
        .collect();
    for chunk in keys.chunks(250) {
        c.batch_write(chunk.iter().map(|k| put_op(k, b"v", None)).collect())
            .await;
    }
    let (leader, old) = c.leader_of(1, Duration::from_secs(10)).await;
    let mut lc = c.client(leader).await;
    let mut stream = lc
        .scan(StoreScanRequest {
            header: Some(header(&old)),
            start: vec![],
            end: vec![],
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.routing_error.is_none());
    let r = lc
        .split_range(SplitRangeRequest {
            header: Some(header(&old)),
            split_key: b"m".to_vec(),
            new_range_id: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let left = r.left.unwrap();
    let mut got: Vec<Vec<u8>> = first.kvs.into_iter().map(|kv| kv.key).collect();
    while let Some(m) = stream.message().await.unwrap() {
        assert!(m.routing_error.is_none());
        got.extend(m.kvs.into_iter().map(|kv| kv.key));
    }
    assert_eq!(got, keys, "the in-flight scan is its snapshot's, complete");

    // Old epoch: EpochNotMatch with both halves, as the only message.
    let r = c.scan(leader, &old, b"", b"", 0).await.unwrap();
    assert_eq!(r.messages, 1);
    match r.kind() {
        Some(routing_error::Kind::EpochNotMatch(e)) => {
            let ids: Vec<u64> = e.current.iter().map(|d| d.range_id).collect();
            assert_eq!(ids, vec![1, 2]);
        }
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    // Current epoch: the left half only.
    let r = c.scan(leader, &left, b"", b"", 0).await.unwrap();
    assert_eq!(r.keys(), keys[..500].to_vec());
    // A scan past the range end is refused, not clamped.
    let r = c.scan(leader, &left, b"a", b"z", 0).await.unwrap();
    assert!(matches!(r.kind(), Some(routing_error::Kind::KeyNotInRange(_))), "{r:?}");

    // BatchWrite: one key moved to range 2 → KeyNotInRange, nothing applied.
    let r = lc
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&left)),
            ops: vec![put_op(b"a-new", b"1", None), put_op(b"x-new", b"1", None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.is_empty());
    assert!(matches!(kind(r.routing_error), Some(routing_error::Kind::KeyNotInRange(k)) if k.key == b"x-new"),);
    // Old epoch → EpochNotMatch, nothing applied.
    let r = lc
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&old)),
            ops: vec![put_op(b"a-new", b"1", None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        kind(r.routing_error),
        Some(routing_error::Kind::EpochNotMatch(_))
    ));
    assert_eq!(c.get(b"a-new").await, None);
    assert_eq!(c.get(b"x-new").await, None);
    // A follower → NotLeader.
    let f = (1..=3).find(|f| *f != leader).unwrap();
    let r = c
        .client(f)
        .await
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&left)),
            ops: vec![put_op(b"a-new", b"1", None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(kind(r.routing_error), Some(routing_error::Kind::NotLeader(_))));
    assert_eq!(c.get(b"a-new").await, None);
    // Unknown range.
    let mut unknown = left.clone();
    unknown.range_id = 77;
    let r = lc
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&unknown)),
            ops: vec![put_op(b"a-new", b"1", None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        kind(r.routing_error),
        Some(routing_error::Kind::RangeNotFound(_))
    ));

    // BatchGet: a moved key, an old epoch.
    let get = |d: &RangeDescriptor, keys: &[&[u8]]| StoreBatchGetRequest {
        header: Some(header(d)),
        keys: keys.iter().map(|k| k.to_vec()).collect(),
        stale_ok: false,
    };
    let r = lc
        .batch_get(get(&left, &[b"c0001", b"p0600"]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.results.is_empty());
    assert!(matches!(kind(r.routing_error), Some(routing_error::Kind::KeyNotInRange(k)) if k.key == b"p0600"));
    let r = lc.batch_get(get(&old, &[b"c0001"])).await.unwrap().into_inner();
    assert!(matches!(
        kind(r.routing_error),
        Some(routing_error::Kind::EpochNotMatch(_))
    ));
    let r = lc
        .batch_get(get(&left, &[b"c0001", b"c0002"]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none());
    assert!(r.results.iter().all(|g| g.found && g.value == b"v"));

    // Bad input: INVALID_ARGUMENT, nothing applied.
    let too_big = vec![0u8; c.max_value_len + 1];
    let e = lc
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&left)),
            ops: vec![put_op(b"a-new", b"1", None), put_op(b"a-big", &too_big, None)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = lc
        .batch_write(StoreBatchWriteRequest {
            header: Some(header(&left)),
            ops: vec![StoreWriteOp {
                key: b"a-new".to_vec(),
                op: None,
                condition: None,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = lc.batch_get(get(&left, &[b"c0001", b""])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(c.get(b"a-new").await, None);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_rpcs_have_request_metrics() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = skv_storenode::Config::for_test(dir.path().to_path_buf(), 1);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = skv_storenode::start(cfg).await.unwrap();
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect_lazy();
    let mut sc = skv_proto::internal::store_client::StoreClient::new(ch);
    // Unknown range: routing errors, counted per method.
    let hdr = Some(RequestHeader {
        range_id: 9,
        epoch: None,
    });
    let r = sc
        .batch_get(StoreBatchGetRequest {
            header: hdr,
            keys: vec![b"k".to_vec()],
            stale_ok: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_some());
    let r = sc
        .batch_write(StoreBatchWriteRequest {
            header: hdr,
            ops: vec![put_op(b"k", b"v", None)],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_some());
    let r = scan_all(
        &mut sc,
        StoreScanRequest {
            header: hdr,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(r.kind(), Some(routing_error::Kind::RangeNotFound(_))));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.metrics_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    for rpc in ["batch_get", "batch_write", "scan"] {
        let line = format!("skv_storenode_requests_total{{rpc=\"{rpc}\",outcome=\"routing_error\"}} 1");
        assert!(out.contains(&line), "{line} missing in:\n{out}");
        assert!(
            out.contains(&format!(
                "skv_storenode_request_duration_seconds_count{{rpc=\"{rpc}\"}} 1"
            )),
            "{out}"
        );
    }
    h.shutdown().await.unwrap();
}
