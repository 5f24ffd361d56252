//! The whole system on a real etcd with three placement instances: bootstrap,
//! writes through the proxy, and the data path while the placement leader is killed.

use skv_proto::internal::GetMembersRequest;
use skv_proto::v1::*;
use skv_testkit::cluster::{Cluster, ClusterOptions, kv_client, token, with_token};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_placements_on_etcd_serve_and_fail_over() {
    let mut cluster = Cluster::start(ClusterOptions {
        etcd: true,
        placement_instances: 3,
        ..Default::default()
    })
    .await;
    let mut kv = kv_client(&cluster.proxy_url(0)).await;
    let t = token("etcd", "write");
    for i in 0..50u32 {
        let req = PutRequest {
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
            if_version: None,
            if_absent: false,
        };
        kv.put(with_token(req, Some(&t))).await.unwrap();
    }

    // Which instance leads placement?
    let mut pd = cluster.placement_client().await;
    let members = pd.get_members(GetMembersRequest {}).await.unwrap().into_inner();
    let leader_addr = members.leader.expect("a placement leader").address;
    let idx = cluster
        .placements
        .iter()
        .position(|h| {
            h.as_ref()
                .is_some_and(|h| leader_addr.ends_with(&h.addr.port().to_string()))
        })
        .expect("leader is one of ours");
    let killed = Instant::now();
    cluster.stop_placement(idx).await;

    // Writes keep flowing; a new placement leader appears within 10 s.
    let other = cluster
        .placements
        .iter()
        .flatten()
        .next()
        .map(|h| format!("http://{}", h.addr))
        .unwrap();
    let mut pd2 = skv_proto::internal::placement_client::PlacementClient::connect(other)
        .await
        .unwrap();
    let mut new_leader = None;
    let mut i = 50u32;
    while killed.elapsed() < Duration::from_secs(10) {
        let req = PutRequest {
            key: format!("k{i}").into_bytes(),
            value: b"v".to_vec(),
            if_version: None,
            if_absent: false,
        };
        kv.put(with_token(req, Some(&t)))
            .await
            .unwrap_or_else(|e| panic!("write {i} while placement fails over: {e:?}"));
        i += 1;
        if let Ok(m) = pd2.get_members(GetMembersRequest {}).await
            && let Some(l) = m.into_inner().leader
            && !l.address.is_empty()
            && l.address != leader_addr
        {
            new_leader = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = new_leader.expect("no new placement leader within 10 s");
    eprintln!("placement leader failover: {took:?}");
    cluster.shutdown().await;
}
