//! Real processes: `kill -9` of the leader's storenode while clients write.
//! A new leader must serve within a few seconds and no acknowledged write may be lost.

use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::{GetRangeRequest, GetStoresRequest};
use skv_testkit::cluster::ProcCluster;
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
