//! Real processes killed with SIGKILL: acknowledged writes survive, every range comes back.
mod common;

use common::*;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Proc {
    id: u64,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_skv-storenode"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--data-dir", self.dir.to_str().expect("utf8 dir")])
            .args(["--store-id", &self.id.to_string()])
            .args(["--raft-snapshot-logs", "50"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn storenode");
        self.child = Some(child);
    }
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill"); // SIGKILL
            let _ = c.wait();
        }
    }
    fn client(&self) -> StoreClient<Channel> {
        StoreClient::new(
            Channel::from_shared(format!("http://127.0.0.1:{}", self.port))
                .expect("uri")
                .connect_lazy(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn leader(procs: &[Proc], range: u64, timeout: Duration) -> (usize, RangeDescriptor) {
    let deadline = Instant::now() + timeout;
    loop {
        for (i, p) in procs.iter().enumerate() {
            if p.child.is_none() {
                continue;
            }
            let mut c = p.client();
            if let Ok(Ok(r)) =
                tokio::time::timeout(Duration::from_millis(500), c.list_replicas(ListReplicasRequest {})).await
            {
                for rep in r.into_inner().replicas {
                    let d = rep.descriptor.unwrap_or_default();
                    if d.range_id == range && rep.leader_store_id == p.id {
                        return (i, d);
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader for r{range}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn put(procs: &[Proc], key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (i, d) = leader(procs, 1, Duration::from_secs(20)).await;
        let mut c = procs[i].client();
        let req = StoreWriteRequest {
            header: Some(header(&d)),
            key: key.to_vec(),
            op: Some(store_write_request::Op::Put(key.to_vec())),
            condition: None,
        };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.write(req)).await
            && r.get_ref().routing_error.is_none()
            && r.get_ref().succeeded
        {
            return;
        }
        assert!(Instant::now() < deadline, "put failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(procs: &[Proc], key: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (i, d) = leader(procs, 1, Duration::from_secs(20)).await;
        let mut c = procs[i].client();
        let req = StoreGetRequest {
            header: Some(header(&d)),
            key: key.to_vec(),
            stale_ok: false,
        };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), c.get(req)).await
            && r.get_ref().routing_error.is_none()
        {
            return r.get_ref().found;
        }
        assert!(Instant::now() < deadline, "get failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_leader_and_whole_cluster_lose_no_acked_write() {
    let tmp = tempfile::tempdir().unwrap();
    let mut procs: Vec<Proc> = (1..=3)
        .map(|id| Proc {
            id,
            port: free_port(),
            dir: tmp.path().join(format!("s{id}")),
            child: None,
        })
        .collect();
    for p in procs.iter_mut() {
        p.spawn();
    }
    let stores: Vec<StoreInfo> = procs
        .iter()
        .map(|p| StoreInfo {
            store_id: p.id,
            address: format!("127.0.0.1:{}", p.port),
            ..Default::default()
        })
        .collect();
    let desc = whole_range(1..=3);
    for p in procs.iter().rev() {
        wait_until("process listening", Duration::from_secs(20), || async {
            let mut c = p.client();
            c.create_replica(CreateReplicaRequest {
                descriptor: Some(desc.clone()),
                bootstrap: p.id == 1,
                stores: stores.clone(),
            })
            .await
            .is_ok()
        })
        .await;
    }
    let mut acked = Vec::new();
    for i in 0..40u32 {
        let k = format!("p{i:03}");
        put(&procs, k.as_bytes()).await;
        acked.push(k);
    }
    // SIGKILL the leader; a new one takes over; nothing acknowledged is lost.
    let (li, _) = leader(&procs, 1, Duration::from_secs(10)).await;
    procs[li].kill9();
    let t = Instant::now();
    leader(&procs, 1, Duration::from_secs(10)).await;
    eprintln!("MEASURE new leader {:?} after SIGKILL of the old one", t.elapsed());
    for i in 40..80u32 {
        let k = format!("p{i:03}");
        put(&procs, k.as_bytes()).await;
        acked.push(k);
    }
    procs[li].spawn();
    // SIGKILL everyone, restart: every range comes back from meta with its data.
    for p in procs.iter_mut() {
        p.kill9();
    }
    for p in procs.iter_mut() {
        p.spawn();
    }
    for k in &acked {
        assert!(get(&procs, k.as_bytes()).await, "lost {k}");
    }
}
