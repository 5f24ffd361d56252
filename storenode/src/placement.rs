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
        Ok(Self {
            members: Arc::new(PlacementMembers::new(urls)?),
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

    /// Registers until placement answers; returns the store id.
    pub async fn register(
        &self,
        known: Option<StoreId>,
        address: String,
        metrics: String,
        cancel: &CancellationToken,
    ) -> anyhow::Result<StoreId> {
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
                Ok(r) if r.store_id != 0 => return Ok(StoreId(r.store_id)),
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
pub async fn heartbeat_loop(
    p: Placement,
    node: Arc<NodeInner>,
    address: String,
    metrics_address: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let reps = node.replicas();
        let leaders: Vec<_> = reps.iter().filter(|r| r.is_leader()).collect();
        let info = StoreInfo {
            store_id: node.store_id.0,
            address: address.clone(),
            state: StoreState::Up as i32,
            capacity_bytes: 0,
            used_bytes: node.engine.db.disk_space().unwrap_or(0),
            range_count: reps.len() as u64,
            leader_count: leaders.len() as u64,
            last_heartbeat_ms: 0,
            metrics_address: metrics_address.clone(),
            available_bytes: 0,
            cpu_permille: 0,
        };
        let req = StoreHeartbeatRequest {
            store: Some(info),
            replicas: Vec::new(),
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
            }
            Err(e) => tracing::debug!(error = %e, "store heartbeat failed"),
        }
        let ranges = leaders
            .iter()
            .map(|r| {
                let l = r.shared.take_load();
                RangeReport {
                    descriptor: Some(r.shared.desc()),
                    leader_store_id: node.store_id.0,
                    term: r.leader_view().term,
                    load: Some(RangeLoad {
                        reads: l.reads,
                        writes: l.writes,
                        read_bytes: l.read_bytes,
                        written_bytes: l.written_bytes,
                        approximate_size_bytes: 0,
                        approximate_keys: 0,
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
