//! MergeRanges (ADR 0016): the target (left) absorbs its right neighbour on every replica.
mod common;

use common::*;
use skv_proto::internal::*;
use std::time::Duration;

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
    c.split(b"m", 2).await;
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
    c.split(b"m", 2).await;
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
    // With a source replica down the merge cannot commit (every source replica must hold the
    // frozen entry): it has not answered with a merge, and the leader still holds both ranges
    // with the target's span unchanged.
    if let Some(Ok(resp)) = &first {
        assert!(
            resp.merged.is_none() || resp.routing_error.is_some(),
            "merged within {:?} with a source replica down: {resp:?}",
            started.elapsed()
        );
    }
    let on_leader: Vec<RangeDescriptor> = c
        .list()
        .await
        .into_iter()
        .filter(|(s, _)| *s == leader)
        .filter_map(|(_, r)| r.descriptor)
        .collect();
    assert!(
        on_leader.iter().any(|d| d.range_id == ds.range_id),
        "the source is gone while a source replica is down: {on_leader:?}"
    );
    assert!(
        on_leader.iter().any(|d| d.range_id == dt.range_id && d.end == dt.end),
        "the target widened while a source replica is down: {on_leader:?}"
    );
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
    c.split(b"m", 2).await;
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

/// The expected contents: key -> value (None: deleted, must not be found).
type Model = std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Polls `f` until it returns Ok or the deadline passes; then fails with its last error.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A single write sent to `node` for the range `d`, no retry.
async fn write_to(c: &Cluster, node: u64, d: &RangeDescriptor, key: &[u8], value: Option<&[u8]>) -> StoreWriteResponse {
    let op = match value {
        Some(v) => store_write_request::Op::Put(v.to_vec()),
        None => store_write_request::Op::Delete(true),
    };
    c.client(node)
        .await
        .write(StoreWriteRequest {
            header: Some(header(d)),
            key: key.to_vec(),
            op: Some(op),
            condition: None,
        })
        .await
        .expect("write rpc")
        .into_inner()
}

/// The descriptors `node` holds, by range id.
async fn descriptors(c: &Cluster, node: u64) -> Vec<RangeDescriptor> {
    let mut d: Vec<RangeDescriptor> = c
        .client(node)
        .await
        .list_replicas(ListReplicasRequest {})
        .await
        .expect("list replicas")
        .into_inner()
        .replicas
        .into_iter()
        .filter_map(|r| r.descriptor)
        .collect();
    d.sort_by_key(|d| d.range_id);
    d
}

/// Every key of `want` read locally on `node` through the range of `ranges` holding it:
/// the expected value, and deleted keys absent.
async fn serves_model(c: &Cluster, node: u64, ranges: &[RangeDescriptor], want: &Model) -> Result<(), String> {
    for (k, v) in want {
        let (ks, vs) = (String::from_utf8_lossy(k), v.as_deref().map(String::from_utf8_lossy));
        let d = ranges
            .iter()
            .find(|d| skv_common::keys::desc_contains(d, k))
            .ok_or_else(|| format!("no range holds {ks}"))?;
        let r = c
            .stale_get(node, d, k)
            .await
            .ok_or_else(|| format!("s{node}: get {ks} failed"))?;
        if let Some(e) = r.routing_error {
            return Err(format!("s{node}: get {ks} on r{}: {e:?}", d.range_id));
        }
        let got = r.found.then_some(r.value);
        if &got != v {
            let got = got.as_deref().map(String::from_utf8_lossy);
            return Err(format!("s{node}: {ks} = {got:?} on r{}, want {vs:?}", d.range_id));
        }
    }
    Ok(())
}

/// A linearizable scan of each range on its leader returns exactly the live keys of
/// `want` in it (nothing lost, nothing resurrected, nothing unexpected).
async fn scan_matches(c: &Cluster, want: &Model) -> Result<(), String> {
    let mut got = Vec::new();
    for (node, r) in c.list().await {
        let d = r.descriptor.unwrap_or_default();
        if r.leader_store_id != node {
            continue;
        }
        let s = c.scan(node, &d, &d.start, &d.end, 0).await.map_err(|e| e.to_string())?;
        if let Some(e) = s.routing_error {
            return Err(format!("scan of r{} on s{node}: {e:?}", d.range_id));
        }
        got.extend(s.kvs.into_iter().map(|kv| (kv.key, kv.value)));
    }
    got.sort();
    let live: Vec<(Vec<u8>, Vec<u8>)> = want
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
        .collect();
    if got != live {
        let show = |v: &[(Vec<u8>, Vec<u8>)], other: &[(Vec<u8>, Vec<u8>)]| {
            v.iter()
                .filter(|p| !other.contains(p))
                .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(k), String::from_utf8_lossy(v)))
                .collect::<Vec<_>>()
        };
        return Err(format!(
            "scan differs: unexpected {:?}, missing {:?}",
            show(&got, &live),
            show(&live, &got)
        ));
    }
    Ok(())
}

fn busy(r: &Option<RoutingError>) -> bool {
    matches!(
        r.as_ref().and_then(|e| e.kind.as_ref()),
        Some(routing_error::Kind::ServerBusy(_))
    )
}

/// One follower is cut off (every Raft message to and from it dropped) while the merge
/// runs. The PrepareMerge commits without it, but the CommitMerge needs every source voter
/// to hold the frozen entry, so the merge must not commit while the partition lasts: the
/// source is frozen (reads and writes refused, nothing applied), then rolled back (writable
/// again, nothing lost, no deleted key back). After healing, the partitioned replica catches
/// up (it applies the freeze and the rollback: same descriptors as the others) and serves
/// every key; the merge retried then completes on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_interrupted_by_a_partition() {
    let c = Cluster::start(3, 10_000).await;
    c.bootstrap().await;
    load(&c).await;
    c.split(b"m", 2).await;
    let mut want: Model = keys().into_iter().map(|k| (k.clone(), Some(k))).collect();
    // Deleted and overwritten keys on both sides of the split, before the merge.
    for k in [&b"a05"[..], b"n05"] {
        let r = c.batch_write(vec![delete_op(k, None)]).await;
        assert!(r[0].succeeded && r[0].existed, "{k:?}: {r:?}");
        want.insert(k.to_vec(), None);
    }
    for k in [&b"a07"[..], b"n07"] {
        c.put(k, b"v2").await;
        want.insert(k.to_vec(), Some(b"v2".to_vec()));
    }
    let (leader, dt, ds) = colocate(&c, 1, 2).await;
    assert_eq!((dt.end.as_slice(), ds.start.as_slice()), (&b"m"[..], &b"m"[..]));
    let cut = (1..=3u64).find(|s| *s != leader).unwrap();
    eventually("every replica applied the split", Duration::from_secs(10), || async {
        for node in 1..=3 {
            let d = descriptors(&c, node).await;
            if d != vec![dt.clone(), ds.clone()] {
                return Err(format!("s{node} holds {d:?}"));
            }
        }
        Ok(())
    })
    .await;
    let other = (1..=3u64).find(|s| *s != leader && *s != cut).unwrap();
    let v = |d: &RangeDescriptor| d.epoch.unwrap().version;

    c.filter.isolate(cut, 3);
    // The cut-off replica soon stops serving even stale reads (no fresh leader contact).
    eventually(
        "the partitioned replica refuses stale reads",
        Duration::from_secs(10),
        || async {
            match c.stale_get(cut, &ds, b"n01").await {
                Some(r) if r.routing_error.is_some() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    let started = std::time::Instant::now();
    let merging = {
        let mut mc = c.client(leader).await;
        let req = MergeRangesRequest {
            header: Some(header(&dt)),
            source: Some(ds.clone()),
        };
        tokio::spawn(async move { mc.merge_ranges(req).await.map(|r| r.into_inner()) })
    };
    // The PrepareMerge applies on the leader (a quorum without the cut-off replica): the
    // source's version goes up by one and it admits nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let frozen = loop {
        let d = descriptors(&c, leader).await;
        if let Some(d) = d.iter().find(|d| d.range_id == 2 && v(d) == v(&ds) + 1) {
            break d.clone();
        }
        assert!(std::time::Instant::now() < deadline, "the source was not frozen: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((frozen.start.as_slice(), frozen.end.as_slice()), (&b"m"[..], &b""[..]));
    assert!(!merging.is_finished(), "the merge returned while the source is frozen");
    // Writes and reads on the frozen source are refused, at its current epoch too.
    let w = write_to(&c, leader, &frozen, b"n10", Some(b"while frozen")).await;
    assert!(
        busy(&w.routing_error) && !w.succeeded,
        "write on the frozen source: {w:?}"
    );
    let w = write_to(&c, leader, &frozen, b"n12", None).await;
    assert!(
        busy(&w.routing_error) && !w.succeeded,
        "delete on the frozen source: {w:?}"
    );
    let g = c.stale_get(leader, &frozen, b"n01").await.unwrap();
    assert!(busy(&g.routing_error), "read on the frozen source: {g:?}");
    // Neither follower accepts a write for the source either.
    for (node, d) in [(other, &frozen), (cut, &ds)] {
        let w = write_to(&c, node, d, b"n10", Some(b"while frozen")).await;
        assert!(w.routing_error.is_some() && !w.succeeded, "write on s{node}: {w:?}");
    }
    // The target is not frozen: it keeps taking writes.
    c.put(b"a40", b"during the merge").await;
    want.insert(b"a40".to_vec(), Some(b"during the merge".to_vec()));

    // The cut-off replica never receives the PrepareMerge, so the merge cannot commit while
    // the partition lasts: it is rolled back.
    let r = merging.await.expect("merge task");
    let took = started.elapsed();
    let status = r.expect_err("merge committed while a source replica lacked the frozen entry");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("merge not done"), "{status:?}");
    eprintln!("merge under partition refused after {took:?}: {}", status.message());
    // Rolled back cleanly on the leader: the target untouched, the source unfrozen at the
    // next version with the same bounds.
    let d = descriptors(&c, leader).await;
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[0], dt, "the target changed");
    let rolled = d[1].clone();
    assert_eq!(
        (rolled.range_id, rolled.start.as_slice(), rolled.end.as_slice()),
        (2, &b"m"[..], &b""[..])
    );
    assert_eq!(v(&rolled), v(&ds) + 2);
    assert_eq!(rolled.replicas, ds.replicas);
    // The writes refused while frozen did not apply, and the source is writable again.
    let g = c.stale_get(leader, &rolled, b"n10").await.unwrap();
    assert!(g.routing_error.is_none() && g.found && g.value == b"n10", "{g:?}");
    let w = write_to(&c, leader, &rolled, b"n10", Some(b"after the rollback")).await;
    assert!(
        w.routing_error.is_none() && w.succeeded,
        "write after the rollback: {w:?}"
    );
    want.insert(b"n10".to_vec(), Some(b"after the rollback".to_vec()));
    let w = write_to(&c, leader, &rolled, b"n12", None).await;
    assert!(
        w.routing_error.is_none() && w.succeeded && w.existed,
        "delete after the rollback: {w:?}"
    );
    want.insert(b"n12".to_vec(), None);
    c.invalidate();
    eventually("a scan of both ranges", Duration::from_secs(10), || {
        scan_matches(&c, &want)
    })
    .await;
    // The cut-off replica still has the old source: it missed the freeze and the rollback.
    assert_eq!(descriptors(&c, cut).await, vec![dt.clone(), ds.clone()]);

    // Heal: the cut-off replica applies the freeze and the rollback, then agrees with the
    // leaders on every descriptor and serves every key, deleted ones absent.
    c.filter.heal();
    let healed = std::time::Instant::now();
    eventually(
        "every replica agrees with the leaders' descriptors",
        Duration::from_secs(20),
        || async {
            let (_, l1) = c.leader_of(1, Duration::from_secs(10)).await;
            let (_, l2) = c.leader_of(2, Duration::from_secs(10)).await;
            if (l1.clone(), l2.clone()) != (dt.clone(), rolled.clone()) {
                return Err(format!("leaders hold {l1:?} {l2:?}"));
            }
            for node in 1..=3 {
                let d = descriptors(&c, node).await;
                if d != vec![l1.clone(), l2.clone()] {
                    return Err(format!("s{node} holds {d:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
    let split_ranges = [dt.clone(), rolled.clone()];
    for node in [cut, other, leader] {
        eventually(
            &format!("s{node} serves every key after the heal"),
            Duration::from_secs(20),
            || serves_model(&c, node, &split_ranges, &want),
        )
        .await;
    }
    eprintln!("partitioned replica converged {:?} after the heal", healed.elapsed());

    // With everyone reachable the merge (retried with fresh descriptors) completes.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (merged, used_t, used_s) = loop {
        let (l, t, s) = colocate(&c, 1, 2).await;
        if let Ok(r) = merge(&c, l, &t, &s).await
            && let Some(m) = r.merged
        {
            break (m, t, s);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "merge never succeeded after the heal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (merged.range_id, merged.start.as_slice(), merged.end.as_slice()),
        (1, &b""[..], &b""[..])
    );
    assert_eq!(v(&merged), v(&used_t).max(v(&used_s) + 1) + 1);
    eventually(
        "every replica holds the merged range only",
        Duration::from_secs(20),
        || async {
            for node in 1..=3 {
                let d = descriptors(&c, node).await;
                if d != vec![merged.clone()] {
                    return Err(format!("s{node} holds {d:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
    for node in [cut, other, leader] {
        eventually(
            &format!("s{node} serves every key through the merged range"),
            Duration::from_secs(20),
            || serves_model(&c, node, std::slice::from_ref(&merged), &want),
        )
        .await;
    }
    // Writes to the source's keys now land in the merged range; the old source is refused.
    c.invalidate();
    c.put(b"n10", b"after the merge").await;
    want.insert(b"n10".to_vec(), Some(b"after the merge".to_vec()));
    assert_eq!(c.route(b"n10", Duration::from_secs(5)).await.1.range_id, 1);
    for node in 1..=3 {
        let w = write_to(&c, node, &rolled, b"n11", Some(b"to the retired source")).await;
        assert!(
            matches!(
                w.routing_error.as_ref().and_then(|e| e.kind.as_ref()),
                Some(routing_error::Kind::EpochNotMatch(_) | routing_error::Kind::RangeNotFound(_))
            ) && !w.succeeded,
            "s{node}: {w:?}"
        );
    }
    eventually("a scan of the merged range", Duration::from_secs(10), || {
        scan_matches(&c, &want)
    })
    .await;
    for node in 1..=3 {
        serves_model(&c, node, std::slice::from_ref(&merged), &want)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.shutdown().await;
}
