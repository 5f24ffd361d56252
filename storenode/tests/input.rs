mod common;

use common::*;
use skv_proto::internal::raft_client::RaftClient;
use skv_proto::internal::*;
use std::time::Duration;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_clean_errors() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let mut lc = c.client(leader).await;
    let put = |key: Vec<u8>, value: Vec<u8>, d: &RangeDescriptor| StoreWriteRequest {
        header: Some(header(d)),
        key,
        op: Some(store_write_request::Op::Put(value)),
        condition: None,
    };
    let e = lc.write(put(vec![], b"v".to_vec(), &d)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = lc.write(put(vec![b'k'; 5000], b"v".to_vec(), &d)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = lc
        .write(put(b"k".to_vec(), vec![0; 64 * 1024 + 1], &d))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = lc
        .get(StoreGetRequest {
            header: Some(header(&d)),
            key: vec![],
            stale_ok: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Exactly at the limit is fine.
    let r = lc
        .write(put(b"big".to_vec(), vec![7; 64 * 1024], &d))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);

    // Unknown range and stale epoch are routing errors in the body.
    let mut bad = d.clone();
    bad.range_id = 99;
    let r = lc
        .get(StoreGetRequest {
            header: Some(header(&bad)),
            key: b"k".to_vec(),
            stale_ok: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.routing_error.and_then(|e| e.kind),
        Some(routing_error::Kind::RangeNotFound(_))
    ));
    let mut stale = d.clone();
    stale.epoch = Some(RangeEpoch {
        conf_ver: 1,
        version: 0,
    });
    let r = lc
        .write(put(b"k".to_vec(), b"v".to_vec(), &stale))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.routing_error.and_then(|e| e.kind),
        Some(routing_error::Kind::EpochNotMatch(_))
    ));

    // Garbage on the Raft transport: an error in the body, no panic.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", c.addrs[(leader - 1) as usize]))
        .unwrap()
        .connect_lazy();
    let mut rc = RaftClient::new(ch);
    let r = rc
        .send(RaftMessage {
            range_id: 1,
            from_store_id: 2,
            to_store_id: leader,
            descriptor: None,
            payload: vec![0xff, 0x13, 0x37, 0x00, 0x42],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.error.is_empty());
    let r = rc
        .send(RaftMessage {
            range_id: 1,
            from_store_id: 2,
            to_store_id: 77,
            descriptor: None,
            payload: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.error.is_empty());
    let chunks = vec![SnapshotChunk {
        header: None,
        data: vec![1, 2, 3],
        last: true,
    }];
    let r = rc.send_snapshot(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    assert!(!r.error.is_empty());
    let chunks = vec![SnapshotChunk {
        header: Some(RaftMessage {
            range_id: 1,
            from_store_id: 2,
            to_store_id: leader,
            descriptor: None,
            payload: vec![9; 10],
            ..Default::default()
        }),
        data: vec![1, 2, 3],
        last: true,
    }];
    let r = rc.send_snapshot(tokio_stream::iter(chunks)).await.unwrap().into_inner();
    assert!(!r.error.is_empty());

    // The node is still healthy.
    assert_eq!(c.put(b"still", b"ok").await, 1);
    c.shutdown().await;
}

/// Values from the network that later arithmetic would overflow are refused with
/// INVALID_ARGUMENT (issue 14): a restore record at a version a put would wrap, a replica
/// descriptor whose epoch a split or membership change would wrap. Values at the bound pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_that_would_overflow_are_refused() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", c.addrs[(leader - 1) as usize]))
        .unwrap()
        .connect_lazy();
    let mut bc = store_backup_client::StoreBackupClient::new(ch);
    let record = |version: u64| {
        let mut r = version.to_be_bytes().to_vec();
        r.extend_from_slice(b"v");
        r
    };
    // The stored record format: 8-byte big-endian version, then the value.
    assert_eq!(
        record(7),
        skv_storenode::engine::encode_value(7, b"v"),
        "the test's record encoding"
    );
    let ingest = |key: &[u8], version: u64| IngestRangeRequest {
        header: Some(header(&d)),
        records: vec![IngestRecord {
            key: key.to_vec(),
            record: record(version),
        }],
        check_empty: false,
    };
    // The highest version a live record can encode (the top bit marks tombstones): a put
    // on it would store version 2^63, which the encoding wraps to 0.
    let e = bc.ingest_range(ingest(b"ov-max", (1u64 << 63) - 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("record version"), "{}", e.message());
    let max = skv_common::limits::MAX_RECORD_VERSION;
    let e = bc.ingest_range(ingest(b"ov-over", max + 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // At the bound: ingested, and a put on it continues from it.
    let r = bc.ingest_range(ingest(b"ov-at", max)).await.unwrap().into_inner();
    assert_eq!(r.written, 1, "{r:?}");
    assert_eq!(c.put(b"ov-at", b"next").await, max + 1);

    // A replica descriptor whose epoch a later increment would wrap.
    let mut sc = c.client(leader).await;
    for epoch in [
        RangeEpoch {
            conf_ver: 1,
            version: u64::MAX,
        },
        RangeEpoch {
            conf_ver: u64::MAX,
            version: 1,
        },
    ] {
        let mut desc = d.clone();
        desc.range_id = 4242;
        desc.start = b"zz-ov".to_vec();
        desc.end = Vec::new();
        desc.epoch = Some(epoch);
        let e = sc
            .create_replica(CreateReplicaRequest {
                descriptor: Some(desc),
                bootstrap: true,
                stores: Vec::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("epoch"), "{}", e.message());
    }
    // The node is still healthy.
    assert_eq!(c.put(b"still", b"ok").await, 1);
    c.shutdown().await;
}

/// Concurrent compare-and-set increments: every success bumps the version by exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conditional_writes_are_serialized() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut lc = c.client(leader).await;
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = 0u64;
            for _ in 0..25 {
                let cur = lc
                    .get(StoreGetRequest {
                        header: Some(header(&d)),
                        key: b"counter".to_vec(),
                        stale_ok: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let v = if cur.found { cur.version } else { 0 };
                let r = lc
                    .write(StoreWriteRequest {
                        header: Some(header(&d)),
                        key: b"counter".to_vec(),
                        op: Some(store_write_request::Op::Put(v.to_string().into_bytes())),
                        condition: Some(Condition {
                            kind: Some(condition::Kind::VersionEquals(v)),
                        }),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.succeeded {
                    assert_eq!(r.version, v + 1);
                    wins += 1;
                } else {
                    assert!(r.version > v);
                }
            }
            wins
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += t.await.unwrap();
    }
    let (_, version) = c.get(b"counter").await.unwrap();
    assert_eq!(version, wins);
    c.shutdown().await;
}
