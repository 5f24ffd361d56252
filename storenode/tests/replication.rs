mod common;

use common::*;
use skv_proto::internal::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_and_reads() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    for i in 0..30u32 {
        let v = c.put(format!("k{i:03}").as_bytes(), format!("v{i}").as_bytes()).await;
        assert_eq!(v, 1);
    }
    assert_eq!(c.put(b"k000", b"again").await, 2);
    assert_eq!(c.get(b"k000").await, Some((b"again".to_vec(), 2)));
    assert_eq!(c.get(b"missing").await, None);

    // Conditional writes.
    let mut lc = c.client(leader).await;
    let d = {
        let (_, d2) = c.leader_of(1, Duration::from_secs(5)).await;
        assert_eq!(d2.range_id, d.range_id);
        d2
    };
    let cond = |v| {
        Some(Condition {
            kind: Some(condition::Kind::VersionEquals(v)),
        })
    };
    let r = lc
        .write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"k001".to_vec(),
            op: Some(store_write_request::Op::Put(b"x".to_vec())),
            condition: cond(7),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.succeeded && r.version == 1, "{r:?}");
    let r = lc
        .write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"k001".to_vec(),
            op: Some(store_write_request::Op::Put(b"x".to_vec())),
            condition: cond(1),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded && r.version == 2, "{r:?}");
    let r = lc
        .write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"new".to_vec(),
            op: Some(store_write_request::Op::Put(b"n".to_vec())),
            condition: cond(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded && r.version == 1, "{r:?}");
    // Delete.
    let r = lc
        .write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"new".to_vec(),
            op: Some(store_write_request::Op::Delete(true)),
            condition: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded && r.existed && r.version == 0, "{r:?}");
    assert_eq!(c.get(b"new").await, None);

    // Scan with limit and `more` (the stream ends after `limit` keys; "more" = a key follows).
    let r = scan_all(
        &mut lc,
        StoreScanRequest {
            header: Some(header(&d)),
            start: b"k".to_vec(),
            end: b"k010".to_vec(),
            limit: 5,
        },
    )
    .await
    .unwrap();
    assert!(r.routing_error.is_none());
    assert_eq!(r.kvs.len(), 5);
    let more = |r: &ScanResult| {
        let mut after = r.kvs.last().map(|kv| kv.key.clone()).unwrap_or_default();
        after.push(0);
        after
    };
    let rest = c.scan(leader, &d, &more(&r), b"k010", 1).await.unwrap();
    assert!(!rest.kvs.is_empty());
    assert_eq!(r.kvs[0].key, b"k000");
    let r = scan_all(
        &mut lc,
        StoreScanRequest {
            header: Some(header(&d)),
            start: b"k".to_vec(),
            end: b"k010".to_vec(),
            limit: 100,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.kvs.len(), 10);
    let rest = c.scan(leader, &d, &more(&r), b"k010", 1).await.unwrap();
    assert!(rest.kvs.is_empty());
    // Limit 0 = no limit.
    let r = c.scan(leader, &d, b"k", b"k010", 0).await.unwrap();
    assert_eq!(r.kvs.len(), 10);

    // Followers: NotLeader with the leader's address; stale reads converge.
    for f in (1..=3).filter(|f| *f != leader) {
        let mut fc = c.client(f).await;
        let r = fc
            .get(StoreGetRequest {
                header: Some(header(&d)),
                key: b"k002".to_vec(),
                stale_ok: false,
            })
            .await
            .unwrap()
            .into_inner();
        match r.routing_error.and_then(|e| e.kind) {
            Some(routing_error::Kind::NotLeader(nl)) => {
                assert_eq!(nl.leader_store_id, leader);
                assert_eq!(nl.leader_address, c.addrs[(leader - 1) as usize].to_string());
            }
            other => panic!("expected NotLeader, got {other:?}"),
        }
        wait_until("follower catch-up", Duration::from_secs(10), || async {
            c.stale_get(f, &d, b"k029")
                .await
                .is_some_and(|r| r.found && r.value == b"v29")
        })
        .await;
    }

    // Descriptor follows the membership (3 voters) on every node.
    for (_, r) in c.list().await {
        let d = r.descriptor.unwrap();
        assert_eq!(d.replicas.len(), 3);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_stop_elects_new_leader_without_losing_writes() {
    let mut c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    for i in 0..20u32 {
        c.put(format!("a{i}").as_bytes(), b"v").await;
    }
    let stopping = Instant::now();
    c.stop_node(leader).await;
    let stopped = Instant::now();
    let (new_leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    eprintln!(
        "MEASURE new leader {:?} after the old one stopped ({:?} including its shutdown)",
        stopped.elapsed(),
        stopping.elapsed()
    );
    assert_ne!(new_leader, leader);
    for i in 0..20u32 {
        assert!(c.get(format!("a{i}").as_bytes()).await.is_some(), "lost a{i}");
    }
    c.put(b"after", b"x").await;
    // The old leader comes back as a follower and catches up.
    c.start_node(leader).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until("old leader catch-up", Duration::from_secs(15), || async {
        c.stale_get(leader, &d, b"after").await.is_some_and(|r| r.found)
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_restart_catches_up_from_log_and_snapshot() {
    let mut c = Cluster::start(3, 40).await;
    c.bootstrap().await;
    let (leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    let f = (1..=3).find(|f| *f != leader).unwrap();

    // From the log: a few writes while down.
    c.stop_node(f).await;
    for i in 0..5u32 {
        c.put(format!("log{i}").as_bytes(), b"v").await;
    }
    c.start_node(f).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until("catch-up from log", Duration::from_secs(15), || async {
        c.stale_get(f, &d, b"log4").await.is_some_and(|r| r.found)
    })
    .await;

    // From a snapshot: many writes while down (the leader snapshots and purges its log).
    c.stop_node(f).await;
    for i in 0..200u32 {
        c.put(format!("snap{i:03}").as_bytes(), format!("{i}").as_bytes()).await;
    }
    c.start_node(f).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until("catch-up from snapshot", Duration::from_secs(20), || async {
        c.stale_get(f, &d, b"snap199").await.is_some_and(|r| r.found)
    })
    .await;
    for i in (0..200u32).step_by(17) {
        let r = c.stale_get(f, &d, format!("snap{i:03}").as_bytes()).await.unwrap();
        assert!(r.found && r.value == format!("{i}").as_bytes());
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_minority_leader_cannot_ack() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (old, d) = c.leader_of(1, Duration::from_secs(10)).await;
    c.put(b"before", b"1").await;
    c.filter.isolate(old, 3);

    let mut oc = c.client(old).await;
    let w = tokio::time::timeout(
        Duration::from_secs(3),
        oc.write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"minority".to_vec(),
            op: Some(store_write_request::Op::Put(b"x".to_vec())),
            condition: None,
        }),
    )
    .await;
    let acked = matches!(&w, Ok(Ok(r)) if r.get_ref().routing_error.is_none() && r.get_ref().succeeded);
    assert!(!acked, "minority leader acked a write: {w:?}");
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        oc.get(StoreGetRequest {
            header: Some(header(&d)),
            key: b"before".to_vec(),
            stale_ok: false,
        }),
    )
    .await;
    let served = matches!(&r, Ok(Ok(g)) if g.get_ref().routing_error.is_none());
    assert!(!served, "minority leader served a linearizable read: {r:?}");

    // The majority elects a leader and accepts writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let mut found = None;
        for (id, r) in c.list().await {
            if id != old && r.leader_store_id == id {
                found = Some(id);
            }
        }
        if let Some(f) = found {
            break f;
        }
        assert!(Instant::now() < deadline, "majority did not elect");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_ne!(new, old);
    let (_, nd) = c.leader_of(1, Duration::from_secs(5)).await;
    let mut nc = c.client(new).await;
    let r = nc
        .write(StoreWriteRequest {
            header: Some(header(&nd)),
            key: b"majority".to_vec(),
            op: Some(store_write_request::Op::Put(b"y".to_vec())),
            condition: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded, "{r:?}");

    c.filter.heal();
    wait_until("old leader converges", Duration::from_secs(15), || async {
        c.stale_get(old, &nd, b"majority").await.is_some_and(|r| r.found)
    })
    .await;
    // The write sent to the minority leader either never applied or applied once everywhere.
    let v = c.get(b"minority").await;
    assert!(v.is_none() || v.unwrap().1 == 1);
    c.shutdown().await;
}

/// Large values: a lagging follower catches up through bounded AppendEntries messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_values_catch_up_in_bounded_messages() {
    let mut c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, _) = c.leader_of(1, Duration::from_secs(10)).await;
    let f = (1..=3).find(|f| *f != leader).unwrap();
    c.stop_node(f).await;
    let value = vec![b'v'; 60 * 1024];
    for i in 0..150u32 {
        c.put(format!("big{i:03}").as_bytes(), &value).await;
    }
    c.start_node(f).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until(
        "follower catches up on 9 MB of values",
        Duration::from_secs(20),
        || async {
            c.stale_get(f, &d, b"big149")
                .await
                .is_some_and(|r| r.found && r.value.len() == 60 * 1024)
        },
    )
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_refused_by_a_replica_cut_off_from_the_leader() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    c.put(b"k", b"v").await;
    let f = (1..=3).find(|f| *f != leader).unwrap();
    wait_until("follower serves a stale read", Duration::from_secs(10), || async {
        c.stale_get(f, &d, b"k")
            .await
            .is_some_and(|r| r.found && r.routing_error.is_none())
    })
    .await;
    c.filter.isolate(f, 3);
    // Past the bound (2 × election timeout max = 2 s), the cut-off follower refuses.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c.stale_get(f, &d, b"k").await.expect("answer");
    assert!(!r.found, "{r:?}");
    assert!(
        matches!(
            r.routing_error.as_ref().and_then(|e| e.kind.as_ref()),
            Some(routing_error::Kind::NotLeader(_))
        ),
        "{r:?}"
    );
    c.filter.heal();
    wait_until("follower serves stale reads again", Duration::from_secs(15), || async {
        c.stale_get(f, &d, b"k").await.is_some_and(|r| r.found)
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_on_a_leader_stay_served_while_it_has_a_quorum() {
    // A sole voter is its own quorum; a 3-voter leader is acked by heartbeats. Both keep
    // serving stale reads after an idle period longer than the bound.
    for n in [1, 3] {
        let c = Cluster::start(n, 10_000).await;
        c.bootstrap().await;
        let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
        c.put(b"k", b"v").await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let r = c.stale_get(leader, &d, b"k").await.expect("answer");
        assert!(r.found && r.routing_error.is_none(), "n={n}: {r:?}");
        c.shutdown().await;
    }
}

/// ADR 0008: a follower in contact with its leader but applying behind (here: catching up on
/// 9 MB after a restart) must not serve a stale read of data older than that contact. Every
/// answer during the catch-up is NotLeader or the newest value, never the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_reads_refused_while_a_follower_applies_behind_its_leader() {
    let mut c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let f = (1..=3).find(|f| *f != leader).unwrap();
    c.put(b"marker", b"old").await;
    wait_until("follower serves the old marker", Duration::from_secs(10), || async {
        c.stale_get(f, &d, b"marker")
            .await
            .is_some_and(|r| r.routing_error.is_none() && r.value == b"old")
    })
    .await;
    c.stop_node(f).await;
    let value = vec![b'v'; 60 * 1024];
    for i in 0..150u32 {
        c.put(format!("big{i:03}").as_bytes(), &value).await;
    }
    c.put(b"marker", b"new").await;
    c.start_node(f).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        assert!(Instant::now() < deadline, "follower never served the new marker");
        let Some(r) = c.stale_get(f, &d, b"marker").await else {
            continue;
        };
        match r.routing_error.as_ref().and_then(|e| e.kind.as_ref()) {
            Some(routing_error::Kind::NotLeader(_)) => refused += 1,
            None => {
                assert!(
                    r.found && r.value == b"new",
                    "stale read of data older than the contact: {r:?}"
                );
                break;
            }
            other => panic!("unexpected routing error {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 0, "the follower was never seen catching up");
    eprintln!("refused {refused} stale reads while catching up");
    c.shutdown().await;
}

/// The value cache (cache.rs) is kept by apply on every replica. A follower cut off while
/// the leader overwrites and deletes keys it holds in its cache catches up (from the log:
/// openraft keeps it for a lagging follower); its reads must then answer the new records,
/// never the cached ones. (A snapshot install over cached keys is checked in
/// state_machine's `snapshot_round_trip_and_interrupted_install_is_redone`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_follower_serves_the_new_records_not_the_cached_ones() {
    let c = Cluster::start(3, 40).await;
    c.bootstrap().await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let f = (1..=3).find(|f| *f != leader).unwrap();
    for i in 0..10u32 {
        c.put(format!("hot{i}").as_bytes(), b"old").await;
    }
    // The follower has applied (so cached) and read (so hit) every old record.
    for i in 0..10u32 {
        let key = format!("hot{i}");
        wait_until("the follower reads the old record", Duration::from_secs(10), || async {
            c.stale_get(f, &d, key.as_bytes())
                .await
                .is_some_and(|r| r.found && r.value == b"old")
        })
        .await;
    }
    c.filter.isolate(f, 3);
    for i in 0..10u32 {
        c.put(format!("hot{i}").as_bytes(), b"new").await;
    }
    let mut lc = c.client(leader).await;
    let (_, d) = c.leader_of(1, Duration::from_secs(5)).await;
    let del = lc
        .write(StoreWriteRequest {
            header: Some(header(&d)),
            key: b"hot5".to_vec(),
            op: Some(store_write_request::Op::Delete(Default::default())),
            condition: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(del.routing_error.is_none() && del.succeeded);
    for i in 0..200u32 {
        c.put(format!("fill{i:03}").as_bytes(), b"v").await;
    }
    c.filter.heal();
    wait_until("the follower catches up", Duration::from_secs(20), || async {
        c.stale_get(f, &d, b"fill199").await.is_some_and(|r| r.found)
    })
    .await;
    for i in 0..10u32 {
        let r = c.stale_get(f, &d, format!("hot{i}").as_bytes()).await.unwrap();
        if i == 5 {
            assert!(!r.found, "hot5 was deleted, the follower still serves {:?}", r.value);
        } else {
            assert!(
                r.found && r.value == b"new",
                "hot{i}: the follower serves {:?} (found {})",
                String::from_utf8_lossy(&r.value),
                r.found
            );
        }
    }
    c.shutdown().await;
}
