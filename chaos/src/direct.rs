//! Reads sent straight to a range's **follower** over the storenode's internal `Store.Get`
//! (no proxy, no `stale_ok`): the vehicle of the planted bug `--plant skip-read-index`.
//!
//! A correct storenode refuses such a read (a follower answers NotLeader: only the leader
//! serves linearizable reads, after ReadIndex), so these calls end as failed reads, which
//! observe nothing and never fail a check. With the failpoint
//! `storenode::read::skip_read_index` (ADR 0029) the follower serves it from what it has
//! applied — a follower read without ReadIndex — and the checker must find the stale reads.

use crate::history::Observed;
use crate::recorder::decode_value;
use parking_lot::Mutex;
use skv_proto::internal::placement_client::PlacementClient;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::{GetRangeRequest, GetStoresRequest, RequestHeader, StoreGetRequest};
use skv_testkit::cluster::admin;
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Where to send a key's follower reads.
#[derive(Clone, Debug)]
struct Route {
    header: RequestHeader,
    /// Addresses of the replicas placement does not name as the leader.
    followers: Vec<String>,
}

/// Sends reads to followers directly; routes come from placement and are cached per key
/// until a read fails.
pub struct DirectReader {
    placement: Vec<String>,
    routes: Mutex<HashMap<Vec<u8>, Route>>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl DirectReader {
    /// A reader asking `placement` (URLs) for routes.
    pub fn new(placement: Vec<String>) -> Self {
        Self {
            placement,
            routes: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, url: &str) -> Result<Channel, String> {
        if let Some(c) = self.channels.lock().get(url) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        self.channels.lock().insert(url.to_string(), ch.clone());
        Ok(ch)
    }

    async fn route(&self, key: &[u8]) -> Result<Route, String> {
        if let Some(r) = self.routes.lock().get(key) {
            return Ok(r.clone());
        }
        let mut last = String::from("no placement URL");
        for url in &self.placement {
            let mut pd = PlacementClient::new(self.channel(url)?);
            let range = match pd.get_range(admin(GetRangeRequest { key: key.to_vec() })).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    last = format!("GetRange: {}", e.message());
                    continue;
                }
            };
            let stores = match pd.get_stores(admin(GetStoresRequest {})).await {
                Ok(r) => r.into_inner().stores,
                Err(e) => {
                    last = format!("GetStores: {}", e.message());
                    continue;
                }
            };
            let Some(info) = range.range else {
                return Err("GetRange: no range".into());
            };
            let Some(desc) = info.descriptor else {
                return Err("GetRange: no descriptor".into());
            };
            let followers: Vec<String> = desc
                .replicas
                .iter()
                .filter(|r| r.store_id != info.leader_store_id)
                .filter_map(|r| stores.iter().find(|s| s.store_id == r.store_id))
                .map(|s| format!("http://{}", s.address))
                .collect();
            let route = Route {
                header: RequestHeader {
                    range_id: desc.range_id,
                    epoch: desc.epoch,
                },
                followers,
            };
            self.routes.lock().insert(key.to_vec(), route.clone());
            return Ok(route);
        }
        Err(last)
    }

    /// Reads internal key `key` from a follower (`pick` chooses which): the value it
    /// returned, or why it did not (routing error, transport) — then the route is dropped.
    pub async fn follower_get(&self, key: &[u8], pick: usize) -> Result<Option<Observed>, String> {
        let r = self.follower_get_inner(key, pick).await;
        if r.is_err() {
            self.routes.lock().remove(key);
        }
        r
    }

    async fn follower_get_inner(&self, key: &[u8], pick: usize) -> Result<Option<Observed>, String> {
        let route = self.route(key).await?;
        if route.followers.is_empty() {
            return Err("no follower known".into());
        }
        let url = &route.followers[pick % route.followers.len()];
        let mut store = StoreClient::new(self.channel(url)?);
        let resp = store
            .get(StoreGetRequest {
                header: Some(route.header),
                key: key.to_vec(),
                stale_ok: false,
            })
            .await
            .map_err(|e| format!("follower read failed ({:?}) at {url}: {}", e.code(), e.message()))?
            .into_inner();
        if let Some(e) = resp.routing_error {
            return Err(format!("follower read refused (routing error) by {url}: {e:?}"));
        }
        Ok(resp.found.then(|| Observed {
            value: decode_value(&resp.value),
            version: resp.version,
        }))
    }
}
