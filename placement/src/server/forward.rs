//! Forwarding to the leader, and the clients placement uses (to the leader, to storenodes).

use super::Shared;
use crate::election;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::store_client::StoreClient;
use std::time::Duration;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

/// Metadata key set on requests a follower forwards, so they are never forwarded twice.
pub(super) const FORWARDED: &str = "skv-placement-forwarded";

/// On a follower: forwards the request to the leader and returns its answer. If this
/// instance's view of the leader is missing or the leader is unavailable, the leader key is
/// read afresh and, only if it names another instance, the request goes there instead.
macro_rules! forward_if_follower {
    ($self:ident, $req:ident, $method:ident) => {
        if !$self.s.is_leader() {
            if $req.metadata().contains_key($crate::server::forward::FORWARDED) {
                return Err(Status::unavailable("this placement instance is not the leader"));
            }
            let inner = $req.into_inner();
            let mut tried: Option<String> = None;
            let mut fresh = false;
            loop {
                let (mut client, address) = match $self.s.leader_client(fresh).await {
                    Ok(c) => c,
                    Err(_) if !fresh => {
                        fresh = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if tried.as_deref() == Some(address.as_str()) {
                    return Err(Status::unavailable(format!(
                        "placement leader {address} is unavailable"
                    )));
                }
                $self.s.metrics.forwarded.inc();
                let mut fwd = Request::new(inner.clone());
                fwd.metadata_mut().insert(
                    $crate::server::forward::FORWARDED,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                match client.$method(fwd).await {
                    Err(st) if st.code() == tonic::Code::Unavailable && !fresh => {
                        tried = Some(address);
                        fresh = true;
                    }
                    r => return r,
                }
            }
        }
    };
}

impl Shared {
    pub(super) fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut g = self.channels.lock();
        if let Some(c) = g.get(address) {
            return Ok(c.clone());
        }
        let uri = if address.starts_with("http://") || address.starts_with("https://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let ch = Endpoint::from_shared(uri)
            .map_err(|e| Status::internal(format!("bad address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        g.insert(address.to_string(), ch.clone());
        Ok(ch)
    }

    /// A client to the leader. With `fresh`, the leader key is read from the metadata store
    /// instead of trusting this instance's (up to one campaign interval old) view.
    pub(super) async fn leader_client(&self, fresh: bool) -> Result<(PlacementClient<Channel>, String), Status> {
        let leader = if fresh {
            election::observe_leader(&self.meta.store, &self.meta.layout)
                .await
                .map_err(super::meta_status)?
                .map(|(m, _)| m)
        } else {
            self.state.borrow().leader.clone()
        };
        match leader {
            Some(l) if l.address != self.me.address => Ok((PlacementClient::new(self.channel(&l.address)?), l.address)),
            _ => Err(Status::unavailable("no placement leader elected yet; retry")),
        }
    }

    pub(super) fn store_client(&self, address: &str) -> Result<StoreClient<Channel>, Status> {
        Ok(StoreClient::new(self.channel(address)?))
    }
}
