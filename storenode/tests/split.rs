mod common;

use common::*;
use skv_proto::internal::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_under_concurrent_writes() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    c.leader_of(1, Duration::from_secs(10)).await;
    let c = Arc::new(c);
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let c = c.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) || i < 20 {
                let key = format!("k{}{:04}", w * 2, i);
                c.put(key.as_bytes(), key.as_bytes()).await;
                acked.push(key);
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (left, right) = c.split(b"k4", 2).await;
    assert_eq!(left.end, b"k4");
    assert_eq!(right.start, b"k4");
    assert_eq!(left.epoch.unwrap().version, 2);
    assert_eq!(right.epoch.unwrap().version, 2);
    assert_eq!(right.replicas.len(), 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let Ok(c) = Arc::try_unwrap(c) else {
        panic!("writers still hold the cluster")
    };
    c.leader_of(1, Duration::from_secs(10)).await;
    c.leader_of(2, Duration::from_secs(10)).await;
    for k in &acked {
        assert_eq!(
            c.get(k.as_bytes()).await.map(|v| v.0),
            Some(k.as_bytes().to_vec()),
            "lost {k}"
        );
    }
    // A request with the old epoch gets EpochNotMatch carrying both halves.
    let (l1, _) = c.leader_of(1, Duration::from_secs(5)).await;
    let mut lc = c.client(l1).await;
    let old = RangeDescriptor {
        range_id: 1,
        epoch: Some(RangeEpoch {
            conf_ver: 1,
            version: 1,
        }),
        ..Default::default()
    };
    let r = lc
        .get(StoreGetRequest {
            header: Some(header(&old)),
            key: b"k0".to_vec(),
            stale_ok: false,
        })
        .await
        .unwrap()
        .into_inner();
    match r.routing_error.and_then(|e| e.kind) {
        Some(routing_error::Kind::EpochNotMatch(e)) => {
            let ids: Vec<u64> = e.current.iter().map(|d| d.range_id).collect();
            assert_eq!(ids, vec![1, 2]);
        }
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    // Survives a full restart.
    let mut c = c;
    for id in 1..=3 {
        c.restart_node(id).await;
    }
    c.leader_of(1, Duration::from_secs(15)).await;
    c.leader_of(2, Duration::from_secs(15)).await;
    for k in acked.iter().step_by(7) {
        assert_eq!(
            c.get(k.as_bytes()).await.map(|v| v.0),
            Some(k.as_bytes().to_vec()),
            "lost {k} after restart"
        );
    }
    c.put(b"k9-after", b"x").await;
    c.put(b"a-after", b"x").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_with_partitioned_replica_converges() {
    // Small snapshot threshold: the isolated replica must catch up by snapshot,
    // exercising the "refuse an overlapping snapshot until the split applies" path.
    let c = Cluster::start(3, 20).await;
    c.bootstrap().await;
    let (leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    let lagger = (1..=3).find(|f| *f != leader).unwrap();
    for i in 0..10u32 {
        c.put(format!("a{i:03}").as_bytes(), b"1").await;
    }
    c.filter.isolate(lagger, 3);
    let (_, right) = c.split(b"m", 2).await;
    for i in 0..60u32 {
        c.put(format!("a{i:03}").as_bytes(), b"2").await;
        c.put(format!("z{i:03}").as_bytes(), b"2").await;
    }
    let (_, d1) = c.leader_of(1, Duration::from_secs(10)).await;
    let (_, d2) = c.leader_of(2, Duration::from_secs(10)).await;
    assert_eq!(d2.start, right.start);
    c.filter.heal();
    wait_until(
        "lagging replica converges on both ranges",
        Duration::from_secs(25),
        || async {
            let a = c.stale_get(lagger, &d1, b"a059").await;
            let z = c.stale_get(lagger, &d2, b"z059").await;
            a.is_some_and(|r| r.routing_error.is_none() && r.found && r.value == b"2")
                && z.is_some_and(|r| r.routing_error.is_none() && r.found && r.value == b"2")
        },
    )
    .await;
    // The lagger holds both halves with the split bounds.
    let mut lc = c.client(lagger).await;
    let reps = lc
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner()
        .replicas;
    let mut descs: Vec<_> = reps.into_iter().map(|r| r.descriptor.unwrap()).collect();
    descs.sort_by_key(|d| d.range_id);
    assert_eq!(descs.len(), 2);
    assert_eq!(descs[0].end, b"m");
    assert_eq!(descs[1].start, b"m");
    c.shutdown().await;
}

/// An empty split key: the leader splits at the key that halves the range by size, and
/// refuses a range with fewer than 2 keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_split_key_splits_at_the_size_median() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let ask = |d: RangeDescriptor, new_id: u64| {
        let c = &c;
        async move {
            c.client(leader)
                .await
                .split_range(SplitRangeRequest {
                    header: Some(header(&d)),
                    split_key: Vec::new(),
                    new_range_id: new_id,
                })
                .await
        }
    };
    // Empty range, then one key: refused, nothing changes.
    let r = ask(d.clone(), 2).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::FailedPrecondition, "{r:?}");
    c.put(b"k0", &[b'v'; 100]).await;
    let r = ask(d.clone(), 2).await.unwrap_err();
    assert_eq!(r.code(), tonic::Code::FailedPrecondition, "{r:?}");
    // Ten equal keys: the sixth starts the right half (five on each side).
    for i in 1..10u32 {
        c.put(format!("k{i}").as_bytes(), &[b'v'; 100]).await;
    }
    let r = ask(d.clone(), 2).await.unwrap().into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    assert_eq!(r.left.unwrap().end, b"k5");
    assert_eq!(r.right.unwrap().start, b"k5");
    c.shutdown().await;
}
