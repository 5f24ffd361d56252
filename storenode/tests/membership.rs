mod common;

use common::*;
use skv_proto::internal::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_and_remove_replicas_and_transfer_leader() {
    let c = Cluster::start(4, 10_000).await;
    // Range 1 on stores 1..=3 only.
    let desc = whole_range(1..=3);
    for id in [3, 2, 1] {
        create_on(&c, id, &desc, id == 1).await;
    }
    // CreateReplica is idempotent.
    create_on(&c, 1, &desc, true).await;
    for i in 0..20u32 {
        c.put(format!("m{i:02}").as_bytes(), b"v").await;
    }
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;

    // Add store 4: CreateReplica (not bootstrap) then ADD_VOTER on the leader.
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
    assert_eq!(nd.replicas.len(), 4);
    assert!(nd.replicas.iter().all(|r| r.role == ReplicaRole::Voter as i32));
    assert!(nd.epoch.unwrap().conf_ver > d.epoch.unwrap().conf_ver);
    wait_until("store 4 has the data", Duration::from_secs(15), || async {
        c.stale_get(4, &nd, b"m19").await.is_some_and(|r| r.found)
    })
    .await;
    // Every replica converges to the same descriptor.
    wait_until("descriptors converge", Duration::from_secs(10), || async {
        let l = c.list().await;
        l.len() == 4 && l.iter().all(|(_, r)| r.descriptor.as_ref() == Some(&nd))
    })
    .await;

    // Transfer leadership to store 4.
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

    // Remove store 3.
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    let r = c
        .client(leader)
        .await
        .change_replicas(ChangeReplicasRequest {
            header: Some(header(&d)),
            changes: vec![ReplicaChange {
                store_id: 3,
                kind: replica_change::Kind::Remove as i32,
            }],
            stores: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.routing_error.is_none(), "{r:?}");
    let nd = r.descriptor.unwrap();
    assert_eq!(nd.replicas.len(), 3);
    assert!(nd.replicas.iter().all(|r| r.store_id != 3));
    c.put(b"after-remove", b"v").await;
    assert!(c.get(b"m00").await.is_some());

    // A follower answers ChangeReplicas with NotLeader.
    let f = (1..=4).find(|f| *f != leader && *f != 3).unwrap();
    let r = c
        .client(f)
        .await
        .change_replicas(ChangeReplicasRequest {
            header: Some(header(&nd)),
            changes: vec![],
            stores: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.routing_error.and_then(|e| e.kind),
        Some(routing_error::Kind::NotLeader(_))
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_served() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = skv_storenode::Config::for_test(dir.path().to_path_buf(), 1);
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let h = skv_storenode::start(cfg).await.unwrap();
    let maddr = h.metrics_addr.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(maddr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.contains("skv_storenode_log_fsync_seconds"), "{out}");
    assert!(out.contains("skv_storenode_range_count"));
    h.shutdown().await.unwrap();
    // The data dir can be reopened at once (clean shutdown releases the engine).
    let cfg = skv_storenode::Config::for_test(dir.path().to_path_buf(), 1);
    let h = skv_storenode::start(cfg).await.unwrap();
    h.shutdown().await.unwrap();
    // A different store id on the same dir is refused.
    let cfg = skv_storenode::Config::for_test(dir.path().to_path_buf(), 2);
    assert!(skv_storenode::start(cfg).await.is_err());
}

/// Placement's order: CreateReplica(bootstrap) on the first store before the others exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bootstrap_first_then_other_replicas() {
    let c = Cluster::start(3, 10_000).await;
    let desc = whole_range(1..=3);
    create_on(&c, 1, &desc, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    create_on(&c, 2, &desc, false).await;
    create_on(&c, 3, &desc, false).await;
    c.put(b"x", b"1").await;
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    for id in 1..=3 {
        wait_until("replica has the data", Duration::from_secs(10), || async {
            c.stale_get(id, &d, b"x").await.is_some_and(|r| r.found)
        })
        .await;
    }
    wait_until("descriptors converge", Duration::from_secs(10), || async {
        let l = c.list().await;
        l.len() == 3 && l.iter().all(|(_, r)| r.descriptor.as_ref() == Some(&d))
    })
    .await;
    c.shutdown().await;
}

/// Placement's growth path: one voter, then ADD_VOTER one store at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_from_one_voter_to_three() {
    let c = Cluster::start(3, 10_000).await;
    let desc = whole_range([1]);
    create_on(&c, 1, &desc, true).await;
    for i in 0..10u32 {
        c.put(format!("g{i}").as_bytes(), b"v").await;
    }
    for new in [2u64, 3] {
        let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
        create_on(&c, new, &d, false).await;
        let r = c
            .client(leader)
            .await
            .change_replicas(ChangeReplicasRequest {
                header: Some(header(&d)),
                changes: vec![ReplicaChange {
                    store_id: new,
                    kind: replica_change::Kind::AddVoter as i32,
                }],
                stores: c.stores(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.routing_error.is_none(), "{r:?}");
        assert_eq!(r.descriptor.unwrap().replicas.len() as u64, new);
    }
    let (_, d) = c.leader_of(1, Duration::from_secs(10)).await;
    wait_until("descriptors converge", Duration::from_secs(10), || async {
        let l = c.list().await;
        l.len() == 3 && l.iter().all(|(_, r)| r.descriptor.as_ref() == Some(&d))
    })
    .await;
    for id in 1..=3 {
        wait_until("replica has the data", Duration::from_secs(10), || async {
            c.stale_get(id, &d, b"g9").await.is_some_and(|r| r.found)
        })
        .await;
    }
    c.shutdown().await;
}

async fn change(
    c: &Cluster,
    leader: u64,
    d: &RangeDescriptor,
    store: u64,
    kind: replica_change::Kind,
) -> ChangeReplicasResponse {
    c.client(leader)
        .await
        .change_replicas(ChangeReplicasRequest {
            header: Some(header(d)),
            changes: vec![ReplicaChange {
                store_id: store,
                kind: kind as i32,
            }],
            stores: c.stores(),
        })
        .await
        .expect("change replicas")
        .into_inner()
}

fn voters(d: &RangeDescriptor) -> Vec<u64> {
    let mut v: Vec<u64> = d
        .replicas
        .iter()
        .filter(|r| r.role == ReplicaRole::Voter as i32)
        .map(|r| r.store_id)
        .collect();
    v.sort();
    v
}

/// ChangeReplicas and TransferLeader carry the caller's epoch: a call made with an epoch the
/// range has moved past is refused with EpochNotMatch (carrying the current descriptor) and
/// changes nothing; of two concurrent calls with the same epoch, at most one applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_or_concurrent_admin_calls_are_refused() {
    let c = Cluster::start(5, 10_000).await;
    let desc = whole_range(1..=3);
    for id in [3, 2, 1] {
        create_on(&c, id, &desc, id == 1).await;
    }
    c.put(b"x", b"1").await;
    let (leader, d) = c.leader_of(1, Duration::from_secs(10)).await;
    create_on(&c, 4, &d, false).await;
    let r = change(&c, leader, &d, 4, replica_change::Kind::AddVoter).await;
    assert!(r.routing_error.is_none(), "{r:?}");
    let nd = r.descriptor.unwrap();
    assert_eq!(voters(&nd), vec![1, 2, 3, 4]);

    // `d` is stale now (older conf_ver): a membership change with it is refused...
    let r = change(&c, leader, &d, 2, replica_change::Kind::Remove).await;
    match r.routing_error.and_then(|e| e.kind) {
        Some(routing_error::Kind::EpochNotMatch(e)) => assert_eq!(e.current.first(), Some(&nd)),
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    // ... and so is a leader transfer.
    let to = (1..=4).find(|s| *s != leader).unwrap();
    let r = c
        .client(leader)
        .await
        .transfer_leader(TransferLeaderRequest {
            header: Some(header(&d)),
            to_store_id: to,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(
            r.routing_error.and_then(|e| e.kind),
            Some(routing_error::Kind::EpochNotMatch(_))
        ),
        "stale transfer not refused"
    );
    // A stale split version is refused the same way.
    let mut old_version = nd.clone();
    old_version.epoch = Some(RangeEpoch {
        conf_ver: nd.epoch.unwrap().conf_ver,
        version: 0,
    });
    let r = change(&c, leader, &old_version, 2, replica_change::Kind::Remove).await;
    assert!(matches!(
        r.routing_error.and_then(|e| e.kind),
        Some(routing_error::Kind::EpochNotMatch(_))
    ));
    // Nothing of it applied: still 4 voters, same leader, same descriptor everywhere.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (l2, cur) = c.leader_of(1, Duration::from_secs(5)).await;
    assert_eq!(l2, leader);
    assert_eq!(cur, nd);

    // Two concurrent changes with the same (current) epoch: add store 5, remove store 4.
    create_on(&c, 5, &nd, false).await;
    let (a, b) = tokio::join!(
        change(&c, leader, &nd, 5, replica_change::Kind::AddVoter),
        change(&c, leader, &nd, 4, replica_change::Kind::Remove),
    );
    let ok = |r: &ChangeReplicasResponse| r.routing_error.is_none();
    assert!(ok(&a) != ok(&b), "exactly one must apply: {a:?} / {b:?}");
    let loser = if ok(&a) { &b } else { &a };
    assert!(
        matches!(
            loser.routing_error.as_ref().and_then(|e| e.kind.as_ref()),
            Some(routing_error::Kind::EpochNotMatch(_) | routing_error::Kind::ServerBusy(_))
        ),
        "{loser:?}"
    );
    let want = if ok(&a) { vec![1, 2, 3, 4, 5] } else { vec![1, 2, 3] };
    wait_until(
        "descriptors converge on one change",
        Duration::from_secs(15),
        || async {
            let (_, d) = c.leader_of(1, Duration::from_secs(5)).await;
            voters(&d) == want && d.replicas.len() == want.len()
        },
    )
    .await;
    c.put(b"after", b"1").await;
    c.shutdown().await;
}
