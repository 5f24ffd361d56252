//! Real processes: `kill -9` of the leader's storenode while clients write, and of the
//! leader of a range whose replicas all sleep (ADR 0018). A new leader must serve within a
//! few seconds and no acknowledged write may be lost.

use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::{GetRangeRequest, GetStoresRequest};
use skv_testkit::cluster::ProcCluster;
use skv_testkit::metrics::{scrape, sum};
use skv_testkit::wait_until;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Index (in `c.stores`) of the process holding the leader of the range for `key`.
async fn leader_index(c: &ProcCluster, key: &[u8]) -> Option<usize> {
    let mut pd = PlacementClient::connect(c.placement_url()).await.ok()?;
    let r = pd
        .get_range(GetRangeRequest { key: key.to_vec() })
        .await
        .ok()?
        .into_inner();
    let leader = r.range?.leader_store_id;
    if leader == 0 {
        return None;
    }
    let stores = pd.get_stores(GetStoresRequest {}).await.ok()?.into_inner().stores;
    let addr = stores.into_iter().find(|s| s.store_id == leader)?.address;
    let port: u16 = addr.rsplit(':').next()?.parse().ok()?;
    c.store_ports.iter().position(|p| *p == port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leader_loses_no_acknowledged_write() {
    let mut c = ProcCluster::start(3, false).await;
    let client = c.client("chaos", "write").await;

    // Writers record every acknowledged write: key -> value.
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("w{w}-{i:06}"), format!("{w}:{i}"));
                if client.put(k.clone().into_bytes(), v.clone().into_bytes()).await.is_ok() {
                    acked.lock().await.insert(k, v);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The internal key of user key "w0-..." in namespace "chaos".
    let mut probe = (5u16).to_be_bytes().to_vec();
    probe.extend_from_slice(b"chaosw0");
    let victim = wait_until("a known leader", Duration::from_secs(10), || leader_index(&c, &probe)).await;
    let before = acked.lock().await.len();
    let killed_at = Instant::now();
    c.kill_store(victim);

    // Time until writes are acknowledged again (measured and printed; the bound only stops a
    // hung test: 20 s was passed once on a CI machine saturated by parallel cluster tests).
    wait_until("writes after kill -9", Duration::from_secs(60), || {
        let acked = acked.clone();
        async move {
            let n = acked.lock().await.len();
            (n > before + 20).then_some(())
        }
    })
    .await;
    let failover = killed_at.elapsed();
    eprintln!("write availability restored {failover:?} after kill -9 of the leader's storenode");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Bring the node back and check every acknowledged write.
    c.start_store(victim);
    let acked = acked.lock().await.clone();
    assert!(acked.len() > 100, "only {} writes acknowledged", acked.len());
    for (k, v) in &acked {
        let got = client
            .get(k.clone().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("get {k}: {e}"));
        let got = got.unwrap_or_else(|| panic!("acknowledged write {k} lost"));
        assert_eq!(
            &got.value[..],
            v.as_bytes(),
            "acknowledged write {k} has the wrong value"
        );
    }
    assert!(failover < Duration::from_secs(15), "failover took {failover:?}");
}

/// Every storenode's (index in `c.stores`, metrics address), from placement (the stores
/// listen for metrics on port 0).
async fn metrics_addrs(c: &ProcCluster) -> Option<Vec<(usize, String)>> {
    let mut pd = PlacementClient::connect(c.placement_url()).await.ok()?;
    let stores = pd.get_stores(GetStoresRequest {}).await.ok()?.into_inner().stores;
    let mut out = Vec::new();
    for s in stores {
        let port: u16 = s.address.rsplit(':').next()?.parse().ok()?;
        let i = c.store_ports.iter().position(|p| *p == port)?;
        if s.metrics_address.is_empty() {
            return None;
        }
        out.push((i, s.metrics_address));
    }
    (out.len() == c.store_ports.len()).then_some(out)
}

/// Hibernation is on by default (ADR 0018): a range whose every replica sleeps loses its
/// leader's storenode to `kill -9`. Nothing ticks on the followers, so only traffic can
/// wake them: the next write must wake them, one must be elected and serve it, and every
/// write acknowledged before the kill must read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_sleeping_ranges_leader_loses_nothing_and_the_range_serves_again() {
    let args = ["--metrics-listen", "127.0.0.1:0", "--raft-hibernate-after-ms", "1000"];
    let mut c = ProcCluster::start_with(3, false, args.iter().map(|a| a.to_string()).collect(), Vec::new()).await;
    let client = c.client("sleepy", "write").await;
    let mut acked = BTreeMap::new();
    for i in 0..300 {
        let (k, v) = (format!("k{i:04}"), format!("v{i}"));
        client
            .put(k.clone().into_bytes(), v.clone().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {k} on a healthy cluster: {e}"));
        acked.insert(k, v);
    }

    // Every replica of every store asleep: the gauge of sleeping replicas equals the
    // store's replica count on all three.
    let addrs = wait_until("every store's metrics address", Duration::from_secs(30), || {
        metrics_addrs(&c)
    })
    .await;
    let slept = Instant::now();
    wait_until("every replica to hibernate", Duration::from_secs(60), || {
        let addrs = addrs.clone();
        async move {
            for (_, a) in &addrs {
                let m = scrape(a).await?;
                let (held, asleep) = (
                    sum(&m, "skv_storenode_range_count"),
                    sum(&m, "skv_storenode_ranges_hibernating"),
                );
                if held < 1.0 || asleep < held {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    eprintln!("every replica hibernating {:?} after the last write", slept.elapsed());

    // The cluster holds one range (300 small puts split nothing): its leader is the store
    // whose metrics say it leads one, read from the stores themselves, not from placement.
    let mut leaders = Vec::new();
    for (i, a) in &addrs {
        let m = scrape(a).await.unwrap_or_else(|| panic!("metrics of store {i}"));
        assert_eq!(sum(&m, "skv_storenode_range_count"), 1.0, "store {i} holds one replica");
        if sum(&m, "skv_storenode_leader_count") >= 1.0 {
            leaders.push(*i);
        }
    }
    assert_eq!(leaders.len(), 1, "one leader of the one range: {leaders:?}");
    let victim = leaders[0];
    let killed_at = Instant::now();
    c.kill_store(victim);

    // The first write after the kill lands on a sleeping range with a dead leader.
    wait_until(
        "a write on the sleeping range after kill -9",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { client.put(b"k-after".to_vec(), b"woken".to_vec()).await.ok() }
        },
    )
    .await;
    let served = killed_at.elapsed();
    // How it was elected: at once by the lowest live voter when waking found the leader
    // unreachable (ADR 0018), else by a resumed election timer.
    let mut campaigns = 0.0;
    for (i, a) in addrs.iter().filter(|(i, _)| *i != victim) {
        let m = scrape(a).await.unwrap_or_else(|| panic!("metrics of store {i}"));
        campaigns += sum(&m, "skv_storenode_hibernate_campaigns_total");
    }
    eprintln!(
        "sleeping range served a write {served:?} after kill -9 of its leader's storenode ({campaigns} immediate campaigns)"
    );
    acked.insert("k-after".into(), "woken".into());

    for (k, v) in &acked {
        let got = client
            .get(k.clone().into_bytes())
            .await
            .unwrap_or_else(|e| panic!("get {k}: {e}"))
            .unwrap_or_else(|| panic!("acknowledged write {k} lost"));
        assert_eq!(
            &got.value[..],
            v.as_bytes(),
            "acknowledged write {k} has the wrong value"
        );
    }
    assert!(
        served < Duration::from_secs(15),
        "the sleeping range took {served:?} to serve again"
    );
}
