//! Forwarding to the leader, and the clients placement uses (to the leader, to storenodes).

use super::Shared;
use crate::election;
use crate::error::{ErrorCode, PlacementError, PlacementResult};
use skv_proto::internal::store_client::StoreClient;
use skv_rpc::EndpointOptions;
use std::future::Future;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// Deadline of a call placement makes (to the leader, to a storenode) when it sets none.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of membership changes and merges (the storenode bounds them at 60 s).
const LONG_REQUEST_TIMEOUT: Duration = Duration::from_secs(75);

/// Metadata key set on requests a follower forwards, so they are never forwarded twice.
pub(super) const FORWARDED: &str = "skv-placement-forwarded";

/// Whether a failed forwarded call means the leader may have moved (so the leader key is
/// worth re-reading): a transport failure, or the instance answering that it does not lead.
/// Any other answer came from the leader itself and is passed through as it is.
fn leader_may_have_moved(st: &Status) -> bool {
    match ErrorCode::of(st) {
        None => st.code() == Code::Unavailable,
        Some(code) => code == ErrorCode::NotLeader,
    }
}

/// Sends `request` to the leader with `call` and returns its answer. If this instance's view
/// of the leader is missing or the leader may have moved ([`leader_may_have_moved`]), the
/// leader key is read afresh and, only if it names another instance, the request goes there
/// instead.
pub(super) async fn to_leader<Req, Resp, F, Fut>(
    s: &Shared,
    request: Request<Req>,
    call: F,
) -> Result<Response<Resp>, Status>
where
    Req: Clone,
    F: Fn(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    if request.metadata().contains_key(FORWARDED) {
        let leader = s
            .state
            .borrow()
            .leader
            .as_ref()
            .map(|l| l.address.clone())
            .filter(|a| *a != s.me.address);
        return Err(PlacementError::NotLeader { leader }.into());
    }
    // The leader checks the caller's token again (auth.rs): it travels with the request.
    let authorization = request.metadata().get("authorization").cloned();
    let inner = request.into_inner();
    let mut tried: Option<String> = None;
    let mut fresh = false;
    loop {
        let (client, address) = match s.leader_channel(fresh).await {
            Ok(c) => c,
            Err(_) if !fresh => {
                fresh = true;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if tried.as_deref() == Some(address.as_str()) {
            return Err(PlacementError::LeaderUnavailable { leader: address }.into());
        }
        s.metrics.forwarded.inc();
        let mut fwd = Request::new(inner.clone());
        fwd.metadata_mut().insert(FORWARDED, MetadataValue::from_static("1"));
        if let Some(a) = &authorization {
            fwd.metadata_mut().insert("authorization", a.clone());
        }
        match call(client, fwd).await {
            Err(st) if !fresh && leader_may_have_moved(&st) => {
                tried = Some(address);
                fresh = true;
            }
            r => return r,
        }
    }
}

impl Shared {
    /// A lazily connecting channel to `address` (`host:port` or URL), one per address.
    pub(super) fn channel(&self, address: &str) -> PlacementResult<Channel> {
        let mut g = self.channels.lock();
        if let Some(c) = g.get(address) {
            return Ok(c.clone());
        }
        let options = EndpointOptions {
            request_timeout: Some(REQUEST_TIMEOUT),
            tls: self.client_tls.clone(),
            ..Default::default()
        };
        let ch = skv_rpc::channel_with(address, &options).map_err(PlacementError::internal)?;
        g.insert(address.to_string(), ch.clone());
        Ok(ch)
    }

    /// A client to the leader. With `fresh`, the leader key is read from the metadata store
    /// instead of trusting this instance's (up to one campaign interval old) view.
    pub(super) async fn leader_channel(&self, fresh: bool) -> PlacementResult<(Channel, String)> {
        let leader = if fresh {
            election::observe_leader(&self.meta.store, &self.meta.layout)
                .await?
                .map(|(m, _)| m)
        } else {
            self.state.borrow().leader.clone()
        };
        match leader {
            Some(l) if l.address != self.me.address => Ok((self.channel(&l.address)?, l.address)),
            _ => Err(PlacementError::NotLeader { leader: None }),
        }
    }

    pub(super) fn store_client(&self, address: &str) -> PlacementResult<StoreClient<Channel>> {
        Ok(StoreClient::new(self.channel(address)?))
    }

    /// A client for calls that may take long on the storenode (a membership change waits
    /// for a learner to catch up, up to a minute there): a separate channel whose deadline
    /// is [`LONG_REQUEST_TIMEOUT`].
    pub(super) fn long_store_client(&self, address: &str) -> PlacementResult<StoreClient<Channel>> {
        Ok(StoreClient::new(self.long_channel(address)?))
    }

    /// The channel of [`Self::long_store_client`] (backup and ingest calls use it too).
    pub(super) fn long_channel(&self, address: &str) -> PlacementResult<Channel> {
        let key = format!("long\u{0}{address}");
        let mut g = self.channels.lock();
        if let Some(c) = g.get(&key) {
            return Ok(c.clone());
        }
        let options = EndpointOptions {
            request_timeout: Some(LONG_REQUEST_TIMEOUT),
            tls: self.client_tls.clone(),
            ..Default::default()
        };
        let ch = skv_rpc::channel_with(address, &options).map_err(PlacementError::internal)?;
        g.insert(key, ch.clone());
        Ok(ch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_failures_send_the_follower_back_to_the_leader_key() {
        let coded = |e: PlacementError| Status::from(e);
        // (answer, re-read the leader key?)
        let table = [
            (Status::unavailable("connection refused"), true),
            (Status::deadline_exceeded("timeout"), false),
            (coded(PlacementError::NotLeader { leader: None }), true),
            (
                coded(PlacementError::NotLeader {
                    leader: Some("l:1".into()),
                }),
                true,
            ),
            (
                coded(PlacementError::from(crate::meta::MetaError::Other("down".into()))),
                false,
            ),
            (coded(PlacementError::KeyNotCovered), false),
            (coded(PlacementError::invalid("bad")), false),
        ];
        for (st, want) in table {
            assert_eq!(leader_may_have_moved(&st), want, "{st:?}");
        }
    }
}
