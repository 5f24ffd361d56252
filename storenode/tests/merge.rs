//! MergeRanges (ADR 0016): the target (left) absorbs its right neighbour on every replica.
mod common;

use common::*;
use skv_proto::internal::*;
use std::time::Duration;

async fn split(c: &Cluster, at: &[u8], new_id: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (leader, d) = c.route(at, Duration::from_secs(10)).await;
        let r = c
            .client(leader)
            .await
            .split_range(SplitRangeRequest {
                header: Some(header(&d)),
                split_key: at.to_vec(),
                new_range_id: new_id,
            })
            .await;
        if r.is_ok_and(|r| r.into_inner().routing_error.is_none()) {
            c.invalidate();
            return;
        }
        c.invalidate();
        assert!(std::time::Instant::now() < deadline, "split did not succeed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Both ranges led by one store (transfers the source's leadership if needed); returns
/// (leader, target descriptor, source descriptor).
async fn colocate(c: &Cluster, target: u64, source: u64) -> (u64, RangeDescriptor, RangeDescriptor) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (lt, dt) = c.leader_of(target, Duration::from_secs(10)).await;
        let (ls, ds) = c.leader_of(source, Duration::from_secs(10)).await;
        if lt == ls {
            return (lt, dt, ds);
        }
        let _ = c
            .client(ls)
            .await
            .transfer_leader(TransferLeaderRequest {
                header: Some(header(&ds)),
                to_store_id: lt,
            })
            .await;
        assert!(std::time::Instant::now() < deadline, "leaders not colocated");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn merge(
    c: &Cluster,
    leader: u64,
    target: &RangeDescriptor,
    source: &RangeDescriptor,
) -> Result<MergeRangesResponse, tonic::Status> {
    c.client(leader)
        .await
        .merge_ranges(MergeRangesRequest {
            header: Some(header(target)),
            source: Some(source.clone()),
        })
        .await
        .map(|r| r.into_inner())
}

fn keys() -> Vec<Vec<u8>> {
    (0..30u32)
        .flat_map(|i| [format!("a{i:02}"), format!("n{i:02}")])
        .map(String::into_bytes)
        .collect()
}

async fn load(c: &Cluster) {
    for k in keys() {
        c.put(&k, &k).await;
    }
}

/// Every key is readable through the merged range on every replica, and range 2 is gone.
async fn check_merged(c: &Cluster, merged: &RangeDescriptor) {
    for k in keys() {
        assert_eq!(c.get(&k).await.map(|(v, _)| v), Some(k.clone()));
    }
    for node in 1..=c.n {
        wait_until("merged range on every replica", Duration::from_secs(20), || async {
            let mut all = true;
            for k in [b"a00".as_slice(), b"a29", b"n00", b"n29"] {
                all &= c.stale_get(node, merged, k).await.is_some_and(|r| r.found);
            }
            all
        })
        .await;
    }
    wait_until("the source is retired everywhere", Duration::from_secs(20), || async {
        let l = c.list().await;
        l.len() == c.n as usize
            && l.iter()
                .all(|(_, r)| r.descriptor.as_ref().is_some_and(|d| d.range_id == 1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_two_ranges_with_data_and_refuse_stale_epochs() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    load(&c).await;
    split(&c, b"m", 2).await;
    let (leader, dt, ds) = colocate(&c, 1, 2).await;
    assert_eq!(dt.end, b"m");

    // A stale source epoch is refused with the current descriptor; nothing is frozen.
    let mut stale = ds.clone();
    stale.epoch = Some(RangeEpoch {
        conf_ver: ds.epoch.unwrap().conf_ver,
        version: ds.epoch.unwrap().version - 1,
    });
    let r = merge(&c, leader, &dt, &stale).await.unwrap();
    match r.routing_error.and_then(|e| e.kind) {
        Some(routing_error::Kind::EpochNotMatch(e)) => assert!(e.current.iter().any(|d| d == &ds)),
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    // A stale target epoch too.
    let mut stale_t = dt.clone();
    stale_t.epoch = Some(RangeEpoch {
        conf_ver: dt.epoch.unwrap().conf_ver,
        version: 1,
    });
    let r = merge(&c, leader, &stale_t, &ds).await.unwrap();
    assert!(matches!(
        r.routing_error.and_then(|e| e.kind),
        Some(routing_error::Kind::EpochNotMatch(_))
    ));
    // Not the right neighbour (the source cannot merge into itself either).
    assert!(merge(&c, leader, &ds, &ds).await.is_err());
    c.put(b"n99", b"still writable").await;

    let r = merge(&c, leader, &dt, &ds).await.unwrap();
    assert!(r.routing_error.is_none(), "{r:?}");
    let merged = r.merged.unwrap();
    assert_eq!(merged.range_id, 1);
    assert_eq!((merged.start.as_slice(), merged.end.as_slice()), (&b""[..], &b""[..]));
    let v = |d: &RangeDescriptor| d.epoch.unwrap().version;
    assert_eq!(v(&merged), v(&dt).max(v(&ds) + 1) + 1);
    check_merged(&c, &merged).await;
    assert_eq!(c.get(b"n99").await.map(|(v, _)| v), Some(b"still writable".to_vec()));

    // The retired range answers with the range that absorbed it.
    let r = c
        .client(leader)
        .await
        .get(StoreGetRequest {
            header: Some(header(&ds)),
            key: b"n01".to_vec(),
            stale_ok: false,
        })
        .await
        .unwrap()
        .into_inner();
    match r.routing_error.and_then(|e| e.kind) {
        Some(routing_error::Kind::EpochNotMatch(e)) => assert_eq!(e.current.first(), Some(&merged)),
        other => panic!("expected EpochNotMatch with the merged range, got {other:?}"),
    }
    // Writes after the merge land in the merged range.
    c.put(b"n50", b"after").await;
    assert_eq!(c.get(b"n50").await.map(|(v, _)| v), Some(b"after".to_vec()));
    c.shutdown().await;
}

/// A follower restarts while the merge runs: the merge either completes or is rolled back
/// (then retried); either way no key is lost and every replica ends with the merged range.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_racing_a_follower_restart() {
    let mut c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    load(&c).await;
    split(&c, b"m", 2).await;
    let (leader, dt, ds) = colocate(&c, 1, 2).await;
    let follower = (1..=3u64).find(|s| *s != leader).unwrap();
    // The follower goes down, the merge starts (it cannot finish without the follower:
    // every source replica must hold the frozen entry), the follower comes back.
    c.stop_node(follower).await;
    let started = std::time::Instant::now();
    let first = {
        let c2 = &c;
        let m = merge(c2, leader, &dt, &ds);
        tokio::pin!(m);
        tokio::select! {
            r = &mut m => Some(r),
            _ = tokio::time::sleep(Duration::from_millis(1500)) => None,
        }
    };
    assert!(first.is_none() || started.elapsed() >= Duration::from_millis(1));
    c.start_node(follower).await;
    // Retry with fresh descriptors until it is merged.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let merged = loop {
        let l = c.list().await;
        if let Some((_, r)) = l.iter().find(|(s, r)| {
            *s == leader
                && r.descriptor
                    .as_ref()
                    .is_some_and(|d| d.range_id == 1 && d.end.is_empty())
        }) {
            break r.descriptor.clone().unwrap();
        }
        let (leader, dt, ds) = colocate(&c, 1, 2).await;
        if let Ok(r) = merge(&c, leader, &dt, &ds).await
            && let Some(m) = r.merged
        {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "merge never succeeded");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    check_merged(&c, &merged).await;
    // And after a restart of that follower, it still holds the merged range only.
    c.restart_node(follower).await;
    check_merged(&c, &merged).await;
    c.shutdown().await;
}

/// The leader of both ranges restarts while the merge runs: afterwards (retrying with fresh
/// descriptors; a frozen source may be driven on or rolled back) the ranges end merged,
/// with every key on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_racing_a_leader_restart() {
    let mut c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    load(&c).await;
    split(&c, b"m", 2).await;
    let (leader, dt, ds) = colocate(&c, 1, 2).await;
    {
        let m = merge(&c, leader, &dt, &ds);
        tokio::pin!(m);
        tokio::select! {
            _ = &mut m => {}
            _ = tokio::time::sleep(Duration::from_millis(3)) => {}
        }
    }
    c.restart_node(leader).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let merged = loop {
        let l = c.list().await;
        if let Some((_, r)) = l.iter().find(|(s, r)| {
            r.leader_store_id == *s
                && r.descriptor
                    .as_ref()
                    .is_some_and(|d| d.range_id == 1 && d.end.is_empty())
        }) {
            break r.descriptor.clone().unwrap();
        }
        // Both ranges still there and led by one store: (re)try the merge. (A source being
        // retired may still be listed for a moment; then only wait.)
        let led = |id: u64| {
            l.iter()
                .find(|(s, r)| r.leader_store_id == *s && r.descriptor.as_ref().is_some_and(|d| d.range_id == id))
                .map(|(s, r)| (*s, r.descriptor.clone().unwrap()))
        };
        if let (Some((lt, dt)), Some((ls, ds))) = (led(1), led(2)) {
            if lt == ls {
                if let Ok(r) = merge(&c, lt, &dt, &ds).await
                    && let Some(m) = r.merged
                {
                    break m;
                }
            } else {
                let _ = c
                    .client(ls)
                    .await
                    .transfer_leader(TransferLeaderRequest {
                        header: Some(header(&ds)),
                        to_store_id: lt,
                    })
                    .await;
            }
        }
        assert!(std::time::Instant::now() < deadline, "merge never succeeded");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    check_merged(&c, &merged).await;
    c.shutdown().await;
}
