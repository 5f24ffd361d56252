//! A cluster that starts with one storenode places the first range on it, then
//! up-replicates to three voters as stores join (learner, then promotion), through
//! the real placement driver. The data survives losing the original store.

use skv_proto::internal::{GetRangeRequest, ReplicaRole};
use skv_testkit::cluster::{Cluster, ClusterOptions};
use skv_testkit::wait_until;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_grows_to_three_voters_and_survives_losing_the_first() {
    let mut cluster = Cluster::start(ClusterOptions {
        storenodes: 1,
        ..Default::default()
    })
    .await;
    let client = cluster.client("grow", "write").await;
    for i in 0..50u32 {
        client
            .put(format!("k{i:03}").into_bytes(), format!("v{i}").into_bytes())
            .await
            .unwrap();
    }
    let mut pd = cluster.placement_client().await;
    let voters = |pd: &mut skv_proto::internal::placement_client::PlacementClient<_>| {
        let mut pd = pd.clone();
        async move {
            let r = pd
                .get_range(GetRangeRequest { key: b"grow".to_vec() })
                .await
                .ok()?
                .into_inner();
            let d = r.range?.descriptor?;
            Some(
                d.replicas
                    .iter()
                    .filter(|r| r.role == ReplicaRole::Voter as i32)
                    .count(),
            )
        }
    };
    assert_eq!(voters(&mut pd).await, Some(1), "with one store the range has one voter");

    cluster.add_store().await;
    cluster.add_store().await;
    wait_until(
        "three voters after two stores joined",
        Duration::from_secs(60),
        || async {
            let mut pd = pd.clone();
            (voters(&mut pd).await == Some(3)).then_some(())
        },
    )
    .await;

    // Writes keep working, and the first store is no longer needed for a quorum.
    for i in 50..60u32 {
        client
            .put(format!("k{i:03}").into_bytes(), format!("v{i}").into_bytes())
            .await
            .unwrap();
    }
    cluster.stop_store(0).await;
    wait_until("reads with the first store gone", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.get(b"k000".to_vec()).await.ok().flatten() }
    })
    .await;
    for i in 0..60u32 {
        let got = client
            .get(format!("k{i:03}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("get k{i:03}: {e}"))
            .unwrap_or_else(|| panic!("k{i:03} lost after up-replication"));
        assert_eq!(got.value, format!("v{i}").into_bytes());
    }
    cluster.shutdown().await;
}
