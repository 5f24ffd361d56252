//! Client side of the placement protocol: registration, store and range heartbeats,
//! split reports. Written against `skv.internal.v1.Placement` only.

use crate::node::NodeInner;
use skv_common::StoreId;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::*;
use skv_rpc::PlacementMembers;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Placement's members, through skv-rpc's one placement client.
#[derive(Clone)]
pub struct Placement {
    members: Arc<PlacementMembers>,
}

/// Longest one placement call may take (per member, and in all).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Placement {
    pub fn new(urls: &[String]) -> anyhow::Result<Self> {
        Self::with_tls(urls, None)
    }

    /// As [`Placement::new`], with mTLS to placement when `tls` is given (ADR 0022): a bare
    /// `host:port` then means `https://`, and this store presents its certificate.
    pub fn with_tls(urls: &[String], tls: Option<skv_rpc::tls::ClientTls>) -> anyhow::Result<Self> {
        let options = skv_rpc::EndpointOptions {
            tls,
            ..skv_rpc::EndpointOptions::default()
        };
        Ok(Self {
            members: Arc::new(PlacementMembers::with_options(urls, &options)?),
        })
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(PlacementClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        self.members.call(deadline, CALL_TIMEOUT, f).await
    }

    /// Registers until placement answers; returns the store id and the cluster id.
    pub async fn register(
        &self,
        known: Option<StoreId>,
        address: String,
        metrics: String,
        cancel: &CancellationToken,
    ) -> anyhow::Result<(StoreId, String)> {
        // Placement electing its leader while stores start is expected: stay quiet for
        // the first few seconds, then warn.
        let started = std::time::Instant::now();
        loop {
            let req = RegisterStoreRequest {
                store_id: known.map(|s| s.0).unwrap_or(0),
                address: address.clone(),
                metrics_address: metrics.clone(),
                capacity_bytes: 0,
            };
            match self
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.register_store(req).await }
                })
                .await
            {
                Ok(r) if r.store_id != 0 => return Ok((StoreId(r.store_id), r.cluster_id)),
                Ok(_) => tracing::warn!("placement returned store id 0"),
                Err(e) if started.elapsed() < Duration::from_secs(5) => {
                    tracing::debug!(error = %e, "placement not ready for registration yet; retrying")
                }
                Err(e) => tracing::warn!(error = %e, "placement registration failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => anyhow::bail!("cancelled"),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    pub async fn report_merge(&self, merged: RangeDescriptor, source: RangeDescriptor, leader: StoreId) {
        let req = ReportMergeRequest {
            merged: Some(merged),
            source: Some(source),
            leader_store_id: leader.0,
        };
        if let Err(e) = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_merge(req).await }
            })
            .await
        {
            tracing::debug!(error = %e, "report merge failed (heartbeats will converge)");
        }
    }

    pub async fn report_split(&self, left: RangeDescriptor, right: RangeDescriptor, leader: StoreId) {
        let req = ReportSplitRequest {
            left: Some(left),
            right: Some(right),
            leader_store_id: leader.0,
        };
        if let Err(e) = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_split(req).await }
            })
            .await
        {
            tracing::debug!(error = %e, "report split failed (heartbeats will converge)");
        }
    }
}

/// Heartbeats every `interval` until `cancel`.
///
/// Store heartbeat: `capacity_bytes` / `available_bytes` are statvfs of `data_dir` (its
/// file system's size, and its free bytes for non-root users), `used_bytes` the engine's
/// own disk space, `cpu_permille` this process's CPU since the previous heartbeat in
/// thousandths of one core, `host_idle_millicpus` the machine's idle CPU (a mean over
/// about 10 s, ADR 0036); `replicas` holds the descriptor of every initialized local
/// replica (followers too). The `stale` replicas placement answers with are checked locally
/// before anything is destroyed ([`NodeInner::handle_stale`]).
///
/// Range heartbeat (leaders only): the load since the previous report (counts, bytes, a
/// reservoir sample of up to 64 read or written keys) and the approximate live size
/// (key + value bytes) and key count kept by apply.
pub async fn heartbeat_loop(
    p: Placement,
    node: Arc<NodeInner>,
    address: String,
    metrics_address: String,
    data_dir: std::path::PathBuf,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    let mut cpu = crate::stats::CpuMeter::new();
    let mut host_cpu = crate::stats::HostCpuMeter::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let reps = node.replicas();
        let leaders: Vec<_> = reps.iter().filter(|r| r.is_leader()).collect();
        let dir = data_dir.clone();
        let engine = node.engine.clone();
        // Both block: a statfs, and fjall's disk space, which waits for fjall's journal lock
        // (held through journal fsyncs and rotations).
        let (disk, used_bytes) =
            tokio::task::spawn_blocking(move || (crate::stats::disk_stats(&dir), engine.db.disk_space().unwrap_or(0)))
                .await
                .unwrap_or_default();
        let cpu_permille = cpu.sample();
        let host_idle_millicpus = host_cpu.sample();
        node.metrics
            .capacity_bytes
            .set(disk.capacity_bytes.min(i64::MAX as u64) as i64);
        node.metrics
            .available_bytes
            .set(disk.available_bytes.min(i64::MAX as u64) as i64);
        node.metrics.cpu_permille.set(cpu_permille.min(i64::MAX as u64) as i64);
        if let Some(idle) = host_idle_millicpus {
            node.metrics.host_idle_millicpus.set(idle.min(i64::MAX as u64) as i64);
        }
        let info = StoreInfo {
            store_id: node.store_id.0,
            address: address.clone(),
            state: StoreState::Up as i32,
            capacity_bytes: disk.capacity_bytes,
            used_bytes,
            range_count: reps.len() as u64,
            leader_count: leaders.len() as u64,
            last_heartbeat_ms: 0,
            metrics_address: metrics_address.clone(),
            available_bytes: disk.available_bytes,
            cpu_permille,
            host_idle_millicpus,
        };
        let req = StoreHeartbeatRequest {
            store: Some(info),
            replicas: reps
                .iter()
                .filter(|r| r.shared.is_initialized())
                .map(|r| r.shared.desc())
                .collect(),
        };
        match p
            .call(|mut c| {
                let req = req.clone();
                async move { c.store_heartbeat(req).await }
            })
            .await
        {
            Ok(resp) => {
                if let Err(e) = node.record_addresses(&resp.stores) {
                    tracing::warn!(error = %e, "cannot persist address book");
                }
                node.on_store_states(&resp.stores);
                if !resp.stale.is_empty() {
                    node.handle_stale(resp.stale).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "store heartbeat failed"),
        }
        let ranges = leaders
            .iter()
            .map(|r| {
                let l = r.shared.take_load();
                let (size, keys) = r.shared.approximate_size();
                RangeReport {
                    descriptor: Some(r.shared.desc()),
                    leader_store_id: node.store_id.0,
                    term: r.leader_view().term,
                    load: Some(RangeLoad {
                        reads: l.reads,
                        writes: l.writes,
                        read_bytes: l.read_bytes,
                        written_bytes: l.written_bytes,
                        approximate_size_bytes: size,
                        approximate_keys: keys,
                        sampled_keys: l.sampled_keys,
                        interval_ms: interval.as_millis() as u64,
                    }),
                }
            })
            .collect();
        let req = RangeHeartbeatRequest {
            store_id: node.store_id.0,
            ranges,
        };
        if let Err(e) = p
            .call(|mut c| {
                let req = req.clone();
                async move { c.range_heartbeat(req).await }
            })
            .await
        {
            tracing::debug!(error = %e, "range heartbeat failed");
        }
    }
}
