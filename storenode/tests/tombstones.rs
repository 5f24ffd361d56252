//! Tombstone GC (ADR 0034) on three real replicas over gRPC: collected tombstones raise the
//! range's version floor, a put on a collected key continues above every version its old
//! incarnation had, and the floor reaches a follower through a snapshot, both halves of a
//! split, and the target of a merge.

mod common;

use common::*;
use skv_proto::internal::*;
use std::time::Duration;

/// Puts fresh keys until one starts above version 1: the leader applied a GC that raised the
/// floor. Returns that version (the floor + 1).
async fn wait_for_floor(c: &Cluster, prefix: &str) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for i in 0u32.. {
        let v = c.put(format!("{prefix}{i:04}").as_bytes(), b"p").await;
        if v > 1 {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "no tombstone GC within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collected_tombstones_keep_versions_rising_on_every_replica() {
    let opts = ClusterOpts {
        tombstone_gc_interval_secs: Some(1),
        ..Default::default()
    };
    let mut c = Cluster::start_opts(3, 40, opts).await;
    c.bootstrap().await;
    let (leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    let f = (1..=3).find(|s| *s != leader).unwrap();
    // The follower misses everything from here: it will need a snapshot built after the GC.
    c.stop_node(f).await;

    // "hot" reaches version 50; 200 keys at version 1; then all of them are deleted.
    for _ in 0..50 {
        c.put(b"d/hot", b"h").await;
    }
    for i in 0..200u32 {
        assert_eq!(c.put(format!("d/k{i:03}").as_bytes(), b"v").await, 1);
    }
    let mut deletes = vec![delete_op(b"d/hot", None)];
    deletes.extend((0..200u32).map(|i| delete_op(format!("d/k{i:03}").as_bytes(), None)));
    for chunk in deletes.chunks(50) {
        let r = c.batch_write(chunk.to_vec()).await;
        assert!(r.iter().all(|w| w.succeeded && w.existed), "{r:?}");
    }

    // The floor is the highest collected version: 50.
    assert_eq!(wait_for_floor(&c, "probe/").await, 51);
    // A collected key starts again above every version it had: a client still holding its
    // old version 1 cannot CAS over the new incarnation.
    assert_eq!(c.put(b"d/k001", b"again").await, 51);
    let r = c.batch_write(vec![put_op(b"d/k001", b"stale", Some(1))]).await;
    assert!(!r[0].succeeded, "{r:?}");
    assert_eq!(c.get(b"d/k001").await, Some((b"again".to_vec(), 51)));
    // Deleted keys stay deleted.
    assert_eq!(c.get(b"d/k002").await, None);
    assert_eq!(c.get(b"d/hot").await, None);

    // The follower comes back and catches up by snapshot (the log was purged): it must have
    // the floor too, or it would apply the next put on a collected key at another version.
    c.start_node(f).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until("the follower catches up", Duration::from_secs(30), || async {
        c.stale_get(f, &d, b"d/k001")
            .await
            .is_some_and(|r| r.found && r.version == 51)
    })
    .await;
    assert_eq!(c.put(b"d/k003", b"after").await, 51);
    wait_until("the follower applies the put", Duration::from_secs(15), || async {
        c.stale_get(f, &d, b"d/k003").await.is_some_and(|r| r.found)
    })
    .await;
    let r = c.stale_get(f, &d, b"d/k003").await.unwrap();
    assert_eq!(r.version, 51, "the follower's version floor");

    // Both halves of a split keep the floor.
    let (left, right) = c.split(b"d/k100", 2).await;
    assert_eq!(right.start, b"d/k100".to_vec());
    assert_eq!(c.put(b"d/k050", b"l").await, 51, "left of {left:?}");
    assert_eq!(c.put(b"d/k150", b"r").await, 51, "right half");
    assert_eq!(c.put(b"d/never-written", b"n").await, 51);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_target_takes_the_sources_version_floor() {
    let opts = ClusterOpts {
        tombstone_gc_interval_secs: Some(1),
        ..Default::default()
    };
    let c = Cluster::start_opts(3, 10_000, opts).await;
    c.bootstrap().await;
    c.split(b"m", 2).await;
    // The source (right) collects a tombstone of version 30; the target (left) none.
    for _ in 0..30 {
        c.put(b"n/hot", b"h").await;
    }
    let r = c.batch_write(vec![delete_op(b"n/hot", None)]).await;
    assert!(r[0].succeeded && r[0].existed, "{r:?}");
    assert_eq!(wait_for_floor(&c, "n/probe").await, 31);
    assert_eq!(c.put(b"a/before", b"v").await, 1, "the target's floor is still 0");

    let (leader, target, source) = colocate(&c, 1, 2).await;
    let r = merge(&c, leader, &target, &source).await.unwrap();
    assert!(r.routing_error.is_none(), "{r:?}");
    // A key of the target's old span that was never written now starts above the source's
    // collected versions too (the merged range holds both spans' histories).
    assert_eq!(c.put(b"a/after", b"v").await, 31);
    assert_eq!(c.put(b"n/hot", b"back").await, 31);
    c.shutdown().await;
}

/// A replica added after a split, while the range's log still holds GC entries proposed
/// under the older descriptor, ends with the same version floor as the others: the same
/// put on a collected key gets the same version when it leads. (Here the leader sends it a
/// snapshot built after the split; the chaos run that found floors diverging, seed
/// 20261202, added a replica right at a split and moved leadership to it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_replays_the_log_after_a_split_keeps_the_same_floor() {
    let opts = ClusterOpts {
        tombstone_gc_interval_secs: Some(1),
        ..Default::default()
    };
    let c = Cluster::start_opts(4, 10_000, opts).await;
    let desc = whole_range(1..=3);
    for id in [3, 2, 1] {
        create_on(&c, id, &desc, id == 1).await;
    }
    for _ in 0..40 {
        c.put(b"d/hot", b"h").await;
    }
    assert_eq!(c.put(b"d/cold", b"c").await, 1);
    let r = c
        .batch_write(vec![delete_op(b"d/hot", None), delete_op(b"d/cold", None)])
        .await;
    assert!(r.iter().all(|w| w.succeeded && w.existed), "{r:?}");
    assert_eq!(wait_for_floor(&c, "d/probe").await, 41);

    // A split makes the range's descriptor newer than the GC entries in its log.
    c.split(b"m", 2).await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    create_on(&c, 4, &d, false).await;
    let r = c
        .client(leader)
        .await
        .change_replicas(ChangeReplicasRequest {
            header: Some(header(&d)),
            changes: vec![ReplicaChange {
                store_id: 4,
                kind: replica_change::Kind::AddVoter as i32,
            }],
            stores: c.stores(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let nd = r.descriptor.unwrap();
    c.put(b"d/marker", b"m").await;
    wait_until("store 4 caught up", Duration::from_secs(20), || async {
        c.stale_get(4, &nd, b"d/marker").await.is_some_and(|r| r.found)
    })
    .await;
    let r = c
        .client(leader)
        .await
        .transfer_leader(TransferLeaderRequest {
            header: Some(header(&nd)),
            to_store_id: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    wait_until("store 4 leads", Duration::from_secs(10), || async {
        c.leader_of(1, Duration::from_secs(5)).await.0 == 4
    })
    .await;
    // Store 4 numbers the collected key from the same floor as the others did.
    assert_eq!(c.put(b"d/cold", b"again").await, 41);
    for s in 1..=3 {
        wait_until("the others apply it", Duration::from_secs(10), || async {
            c.stale_get(s, &nd, b"d/cold").await.is_some_and(|r| r.found)
        })
        .await;
        assert_eq!(c.stale_get(s, &nd, b"d/cold").await.unwrap().version, 41, "store {s}");
    }
    c.shutdown().await;
}
