//! Measurement, not a check (ignored by default): process CPU of 3 in-process storenodes
//! holding N idle 3-replica ranges. Run with
//! `SKV_IDLE_RANGES=300 cargo nextest run -p skv-storenode --run-ignored only idle_cpu`.
mod common;

use common::*;
use skv_proto::internal::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn idle_ranges_cpu() {
    let n: u64 = std::env::var("SKV_IDLE_RANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let c = Cluster::start(3, 10_000).await;
    let voters = |d: &mut RangeDescriptor| {
        d.replicas = (1..=3)
            .map(|s| Replica {
                store_id: s,
                role: ReplicaRole::Voter as i32,
            })
            .collect();
    };
    for i in 0..n {
        let mut d = RangeDescriptor {
            range_id: i + 1,
            start: if i == 0 {
                vec![]
            } else {
                format!("r{i:06}").into_bytes()
            },
            end: if i + 1 == n {
                vec![]
            } else {
                format!("r{:06}", i + 1).into_bytes()
            },
            epoch: Some(RangeEpoch {
                conf_ver: 1,
                version: 1,
            }),
            replicas: vec![],
        };
        voters(&mut d);
        for s in (1..=3u64).rev() {
            c.client(s)
                .await
                .create_replica(CreateReplicaRequest {
                    descriptor: Some(d.clone()),
                    bootstrap: s == 1,
                    stores: c.stores(),
                })
                .await
                .expect("create replica");
        }
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut cpu = skv_storenode::stats::CpuMeter::new();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let permille = cpu.sample();
    eprintln!(
        "IDLE: {n} ranges x 3 replicas on 3 in-process nodes: {permille} permille of one core ({:.2} per 100 ranges)",
        permille as f64 * 100.0 / n as f64
    );
    c.shutdown().await;
}
