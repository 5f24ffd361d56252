//! The I/O half of routing: placement access, the watch stream, storenode channels
//! and the retry loop that sends one request to the right range.

use crate::metrics::Metrics;
use crate::retry::{self, Attempt, Kind, Next};
use crate::routing::{RangeCache, Route, StoreBook, pick_any_store, pick_store};
use parking_lot::{Mutex, RwLock};
use skv_common::StoreId;
use skv_proto::internal::store_client::StoreClient;
use skv_proto::internal::{
    GetRangeRequest, GetStoresRequest, RangeInfo, RoutingError, ScanRangesRequest, StoreBatchGetResponse,
    StoreBatchWriteResponse, StoreGetResponse, StoreInfo, StoreScanResponse, StoreWriteResponse, WatchRangesRequest,
    routing_error,
};
use skv_rpc::{Backoff, PlacementMembers};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::{Instrument, debug, info, warn};

/// Metadata key set on an UNAVAILABLE answer when a write may or may not have applied.
pub const OUTCOME_METADATA_KEY: &str = "skv-outcome";
/// Largest internal response the proxy decodes from a storenode.
const STORE_MAX_DECODE: usize = 256 * 1024 * 1024;
/// Longest a placement call on the request path may take per member.
const PLACEMENT_TRY_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed placement call, serve from the (stale) cache for this long before asking again.
const PLACEMENT_QUIET_AFTER_FAILURE: Duration = Duration::from_millis(500);
const RANGES_PAGE: u32 = 1024;

/// UNAVAILABLE with "outcome unknown" and `skv-outcome: unknown` metadata.
pub fn outcome_unknown(detail: &str) -> Status {
    let mut md = MetadataMap::new();
    md.insert(OUTCOME_METADATA_KEY, MetadataValue::from_static("unknown"));
    Status::with_metadata(
        Code::Unavailable,
        format!("write outcome unknown: {detail}; the write may or may not have been applied"),
        md,
    )
}

/// Whether a status says the request may carry an unknown write outcome.
pub fn is_outcome_unknown(status: &Status) -> bool {
    status
        .metadata()
        .get(OUTCOME_METADATA_KEY)
        .is_some_and(|v| v == "unknown")
}

/// Internal responses that carry a routing error.
pub(crate) trait Routed {
    fn routing_error(&self) -> Option<&RoutingError>;
}

impl Routed for StoreGetResponse {
    fn routing_error(&self) -> Option<&RoutingError> {
        self.routing_error.as_ref()
    }
}
impl Routed for StoreWriteResponse {
    fn routing_error(&self) -> Option<&RoutingError> {
        self.routing_error.as_ref()
    }
}
impl Routed for StoreBatchGetResponse {
    fn routing_error(&self) -> Option<&RoutingError> {
        self.routing_error.as_ref()
    }
}
impl Routed for StoreBatchWriteResponse {
    fn routing_error(&self) -> Option<&RoutingError> {
        self.routing_error.as_ref()
    }
}

/// A storenode scan stream whose first message has been read: a routing error comes
/// only as the first message, so routing decides on it alone.
pub(crate) struct OpenScan {
    pub first: StoreScanResponse,
    /// The rest of the stream; None when it ended after the first message (or before).
    pub rest: Option<tonic::Streaming<StoreScanResponse>>,
}

impl Routed for OpenScan {
    fn routing_error(&self) -> Option<&RoutingError> {
        self.first.routing_error.as_ref()
    }
}

/// The request never reached the storenode's handler: no connection, still queued on a
/// connection that closed, or refused by the server's stream refusal or graceful GOAWAY
/// (a stopping store). A write failed so is retried elsewhere (ADR 0035).
fn certainly_not_sent(status: &Status) -> bool {
    status.message().starts_with("Service was not ready") || skv_rpc::never_processed(status)
}

/// The whole range map and store list, page by page.
async fn scan_all(placement: &PlacementMembers, deadline: Instant) -> Result<(Vec<RangeInfo>, Vec<StoreInfo>), Status> {
    let mut ranges = Vec::new();
    let mut stores;
    let mut start = Vec::new();
    loop {
        let req = ScanRangesRequest {
            start: start.clone(),
            end: Vec::new(),
            limit: RANGES_PAGE,
        };
        let resp = placement
            .call(deadline, Duration::from_secs(5), |mut c| {
                let req = req.clone();
                async move { c.scan_ranges(req).await }
            })
            .await?;
        let n = resp.ranges.len();
        stores = resp.stores;
        let next = resp
            .ranges
            .last()
            .and_then(|r| r.descriptor.as_ref())
            .map(|d| d.end.clone());
        ranges.extend(resp.ranges);
        match next {
            Some(end) if !end.is_empty() && n >= RANGES_PAGE as usize && end > start => start = end,
            _ => break,
        }
    }
    if stores.is_empty() {
        stores = placement
            .call(deadline, Duration::from_secs(5), |mut c| async move {
                c.get_stores(GetStoresRequest {}).await
            })
            .await?
            .stores;
    }
    Ok((ranges, stores))
}

struct Table {
    ranges: RangeCache,
    stores: StoreBook,
}

/// Storenode channels kept at most: past it, those of addresses no known store has are
/// dropped (a store's address changes, or an address learnt from a NotLeader answer).
pub const MAX_STORE_CHANNELS: usize = 1024;

/// Routes requests to ranges. Shared by every RPC handler.
pub struct Router {
    table: RwLock<Table>,
    placement: PlacementMembers,
    channels: RwLock<HashMap<String, Channel>>,
    /// How storenodes are reached (TLS with the proxy's certificate, when configured).
    store_options: skv_rpc::EndpointOptions,
    metrics: Metrics,
    placement_quiet_until: Mutex<Option<Instant>>,
    /// One placement lookup at a time: concurrent misses wait and re-check the cache.
    miss_lock: tokio::sync::Mutex<()>,
}

impl Router {
    #[cfg(test)]
    pub(crate) fn new(placement: PlacementMembers, metrics: Metrics) -> Self {
        Self::with_store_options(placement, metrics, skv_rpc::EndpointOptions::default())
    }

    /// As [`Router::new`], reaching storenodes with `store_options` (TLS).
    pub(crate) fn with_store_options(
        placement: PlacementMembers,
        metrics: Metrics,
        store_options: skv_rpc::EndpointOptions,
    ) -> Self {
        Router {
            table: RwLock::new(Table {
                ranges: RangeCache::new(),
                stores: StoreBook::new(),
            }),
            placement,
            channels: RwLock::new(HashMap::new()),
            store_options,
            metrics,
            placement_quiet_until: Mutex::new(None),
            miss_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Number of cached ranges.
    pub fn cached_ranges(&self) -> usize {
        self.table.read().ranges.len()
    }

    fn update_size_metric(&self, t: &Table) {
        self.metrics.range_cache_size.set(t.ranges.len() as i64);
    }

    /// Loads the whole range map and store list from placement.
    pub(crate) async fn load_all(&self, deadline: Instant) -> Result<usize, Status> {
        let (ranges, stores) = scan_all(&self.placement, deadline).await.inspect_err(|_| {
            self.metrics.placement_errors.inc();
        })?;
        let mut t = self.table.write();
        t.stores.update(&stores);
        t.ranges.replace_all(&ranges);
        self.update_size_metric(&t);
        Ok(t.ranges.len())
    }

    /// Cuts `[start, end)` at the boundaries of the cached ranges (for parallel scans).
    pub(crate) fn plan_intervals(&self, start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let routes = self.table.read().ranges.overlapping(start, end);
        let mut cuts: Vec<Vec<u8>> = routes
            .into_iter()
            .flat_map(|r| [r.start, r.end])
            .filter(|k| !k.is_empty() && k.as_slice() > start && (end.is_empty() || k.as_slice() < end))
            .collect();
        cuts.sort();
        cuts.dedup();
        let mut out = Vec::with_capacity(cuts.len() + 1);
        let mut s = start.to_vec();
        for c in cuts {
            out.push((std::mem::replace(&mut s, c.clone()), c));
        }
        out.push((s, end.to_vec()));
        out
    }

    /// Groups the indexes of `keys` by the cached range that holds each key (keys with
    /// no cached range form one group of their own). Within a group, indexes keep their
    /// order. Routing errors later may split a group further.
    pub(crate) fn group_by_range(&self, keys: &[&[u8]]) -> Vec<Vec<usize>> {
        let t = self.table.read();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_range: HashMap<Option<skv_common::RangeId>, usize> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            let id = t.ranges.lookup(k).map(|r| r.range_id);
            let g = *by_range.entry(id).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        groups
    }

    fn store_client(&self, addr: &str) -> Result<StoreClient<Channel>, Status> {
        let cached = self.channels.read().get(addr).cloned();
        let ch = match cached {
            Some(c) => c,
            None => {
                let mut chans = self.channels.write();
                match chans.get(addr) {
                    Some(c) => c.clone(),
                    None => {
                        let c = skv_rpc::channel_with(addr, &self.store_options)
                            .map_err(|e| Status::internal(format!("bad store address: {e}")))?;
                        if chans.len() >= MAX_STORE_CHANNELS {
                            // Addresses no store has any more (stores moved, or addresses
                            // learnt from routing errors) are dropped; a live one reconnects.
                            let t = self.table.read();
                            chans.retain(|a, _| t.stores.knows_address(a));
                            if chans.len() >= MAX_STORE_CHANNELS {
                                chans.clear();
                            }
                        }
                        chans.insert(addr.to_string(), c.clone());
                        c
                    }
                }
            }
        };
        Ok(StoreClient::new(ch)
            .max_decoding_message_size(STORE_MAX_DECODE)
            .max_encoding_message_size(STORE_MAX_DECODE))
    }

    fn placement_quiet(&self) -> bool {
        self.placement_quiet_until.lock().is_some_and(|t| Instant::now() < t)
    }

    fn placement_failed(&self, what: &str, e: &Status) {
        self.metrics.placement_errors.inc();
        *self.placement_quiet_until.lock() = Some(Instant::now() + PLACEMENT_QUIET_AFTER_FAILURE);
        debug!(error = %e.message(), code = ?e.code(), "placement {what} failed; serving from cache");
    }

    /// The route for `key`: from the cache, or from placement on a miss or a stale entry.
    /// When placement cannot answer, a stale entry is still returned.
    pub(crate) async fn locate(&self, key: &[u8], deadline: Instant) -> Option<Route> {
        let cached = self.table.read().ranges.lookup(key);
        if let Some(r) = &cached
            && !r.stale
        {
            self.metrics.range_cache_hits.inc();
            return cached;
        }
        self.metrics.range_cache_misses.inc();
        if cached.is_some() && self.placement_quiet() {
            return cached;
        }
        let Ok(_single_flight) = tokio::time::timeout_at(deadline, self.miss_lock.lock()).await else {
            return cached;
        };
        // Someone else may have just learnt it.
        let cached = self.table.read().ranges.lookup(key);
        if let Some(r) = &cached
            && (!r.stale || self.placement_quiet())
        {
            return cached;
        }
        let req = GetRangeRequest { key: key.to_vec() };
        match self
            .placement
            .call(deadline, PLACEMENT_TRY_TIMEOUT, |mut c| {
                let req = req.clone();
                async move { c.get_range(req).await }
            })
            .await
        {
            Ok(resp) => {
                let mut t = self.table.write();
                t.stores.update(&resp.stores);
                if let Some(info) = &resp.range {
                    t.ranges.insert_info(info);
                }
                self.update_size_metric(&t);
                t.ranges.lookup(key).or(cached)
            }
            Err(e) => {
                self.placement_failed("GetRange", &e);
                cached
            }
        }
    }

    async fn store_address(&self, store: StoreId, deadline: Instant) -> Option<String> {
        if let Some(a) = self.table.read().stores.address(store) {
            return Some(a.to_string());
        }
        if self.placement_quiet() {
            return None;
        }
        match self
            .placement
            .call(deadline, PLACEMENT_TRY_TIMEOUT, |mut c| async move {
                c.get_stores(GetStoresRequest {}).await
            })
            .await
        {
            Ok(resp) => {
                let mut t = self.table.write();
                t.stores.update(&resp.stores);
                t.stores.address(store).map(str::to_string)
            }
            Err(e) => {
                self.placement_failed("GetStores", &e);
                None
            }
        }
    }

    /// Sends one request for `key` to its range, retrying on routing errors (and, for
    /// reads, transport errors) with bounded exponential backoff until `deadline`.
    /// A write whose outcome is unknown fails with [`outcome_unknown`], never retried.
    /// What is retried is decided by [`retry::decide`] and the range cache.
    pub(crate) async fn call<Resp, F, Fut>(
        &self,
        key: &[u8],
        kind: Kind,
        deadline: Instant,
        mut f: F,
    ) -> Result<(Resp, Route), Status>
    where
        Resp: Routed,
        F: FnMut(StoreClient<Channel>, &Route, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(500));
        let mut avoid: HashSet<StoreId> = HashSet::new();
        let mut immediate = 0u32;
        // A follower refused a stale read (e.g. NotLeader): go to the leader from now on.
        let mut follower_refused = false;
        let mut last = String::from("no attempt made");
        loop {
            if Instant::now() >= deadline {
                return Err(match kind {
                    Kind::Write => Status::unavailable(format!(
                        "write not applied: deadline reached while routing (last: {last})"
                    )),
                    _ => Status::deadline_exceeded(format!("deadline reached (last: {last})")),
                });
            }
            let mut wait = None;
            'attempt: {
                let Some(route) = self.locate(key, deadline).await else {
                    last = "no range known for key (placement unreachable?)".into();
                    self.metrics.retry("no_route");
                    wait = Some(backoff.next_wait());
                    break 'attempt;
                };
                let pick = {
                    let t = self.table.read();
                    if kind == Kind::StaleRead && !follower_refused {
                        pick_any_store(&route, &avoid, &t.stores)
                    } else {
                        pick_store(&route, &avoid, &t.stores)
                    }
                };
                let Some(store) = pick else {
                    last = format!("no reachable replica of {}", route.range_id);
                    avoid.clear();
                    self.metrics.retry("no_replica");
                    self.table.write().ranges.mark_stale(route.range_id, &route.epoch);
                    wait = Some(backoff.next_wait());
                    break 'attempt;
                };
                let Some(addr) = self.store_address(store, deadline).await else {
                    last = format!("address of {store} unknown");
                    avoid.insert(store);
                    self.metrics.retry("unknown_store");
                    break 'attempt;
                };
                let client = self.store_client(&addr)?;
                let remaining = deadline.saturating_duration_since(Instant::now());
                let budget = retry::attempt_budget(kind, remaining);
                let span = tracing::debug_span!("store_call", range_id = %route.range_id, store_id = %store);
                let (failure, reason, detail) = match tokio::time::timeout(budget, f(client, &route, budget))
                    .instrument(span)
                    .await
                {
                    Ok(Ok(resp)) => {
                        let resp = resp.into_inner();
                        let Some(err) = resp.routing_error() else {
                            if kind != Kind::StaleRead && route.leader != Some(store) {
                                self.table.write().ranges.set_leader(route.range_id, Some(store));
                            }
                            return Ok((resp, route));
                        };
                        wait = self.on_routing_error(&route, store, err, &mut avoid, &mut backoff, &mut last);
                        follower_refused = true;
                        if wait.is_none() {
                            immediate += 1;
                            if immediate > 3 {
                                wait = Some(backoff.next_wait());
                            }
                        }
                        break 'attempt;
                    }
                    Err(_) => (
                        Attempt::TimedOut {
                            had_all_time: budget == remaining,
                        },
                        "timeout",
                        format!("no answer from {store} before the deadline"),
                    ),
                    Ok(Err(status)) if certainly_not_sent(&status) => (
                        Attempt::NotSent,
                        "connect",
                        format!("{store} unreachable: {}", status.message()),
                    ),
                    // A status with a source was made by the transport, not sent by the
                    // storenode: its code says nothing about whether a write applied.
                    Ok(Err(status)) if std::error::Error::source(&status).is_some() => (
                        Attempt::Broken,
                        "transport",
                        format!("{store}: connection failed: {:?} {}", status.code(), status.message()),
                    ),
                    Ok(Err(status)) => (
                        Attempt::Failed(status.code()),
                        "transport",
                        format!("{store}: {:?} {}", status.code(), status.message()),
                    ),
                };
                match retry::decide(kind, failure) {
                    Next::Retry => {
                        last = detail;
                        avoid.insert(store);
                        if route.leader == Some(store) {
                            self.table.write().ranges.set_leader(route.range_id, None);
                        }
                        self.metrics.retry(reason);
                        if !matches!(failure, Attempt::TimedOut { .. })
                            && route.replicas.iter().all(|s| avoid.contains(s))
                        {
                            wait = Some(backoff.next_wait());
                        }
                    }
                    Next::DeadlineExceeded => return Err(Status::deadline_exceeded(detail)),
                    Next::Refused(code) => {
                        return Err(Status::new(code, format!("storenode {detail}")));
                    }
                    Next::OutcomeUnknown => {
                        self.metrics.retry("write_outcome_unknown");
                        return Err(outcome_unknown(&detail));
                    }
                }
            }
            if let Some(w) = wait {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    continue;
                }
                tokio::time::sleep(w.min(remaining)).await;
            }
        }
    }

    /// Learns from a routing error in an answer's body; returns how long to wait before
    /// the next attempt (None: at once).
    fn on_routing_error(
        &self,
        route: &Route,
        store: StoreId,
        err: &RoutingError,
        avoid: &mut HashSet<StoreId>,
        backoff: &mut Backoff,
        last: &mut String,
    ) -> Option<Duration> {
        let action = {
            let mut t = self.table.write();
            // Only the address of a replica of this range is learnt from the answer.
            if let Some(routing_error::Kind::NotLeader(nl)) = &err.kind
                && nl.leader_store_id != 0
                && route.replicas.contains(&StoreId(nl.leader_store_id))
            {
                t.stores.learn_address(StoreId(nl.leader_store_id), &nl.leader_address);
            }
            let a = t.ranges.on_routing_error(route, store, err);
            self.update_size_metric(&t);
            a
        };
        debug!(reason = action.reason, range_id = %route.range_id, store_id = %store, "routing error; retrying");
        self.metrics.retry(action.reason);
        *last = format!("{} from {store}: {}", action.reason, err.message);
        if action.avoid_store {
            avoid.insert(store);
        }
        let mut wait = action.wait;
        // The replicas agree on a leader we gave up on (it failed a moment ago): give it
        // another chance, after a backoff.
        if let Some(routing_error::Kind::NotLeader(nl)) = &err.kind
            && nl.leader_store_id != 0
            && avoid.remove(&StoreId(nl.leader_store_id))
        {
            wait = Some(wait.unwrap_or_default().max(backoff.next_wait()));
        }
        wait
    }

    /// Applies one watch message.
    fn apply_watch(&self, msg: skv_proto::internal::WatchRangesResponse) {
        let mut t = self.table.write();
        t.stores.update(&msg.stores);
        if msg.full {
            t.ranges.replace_all(&msg.updated);
        } else {
            for id in &msg.removed_range_ids {
                t.ranges.remove((*id).into());
            }
            for info in &msg.updated {
                t.ranges.insert_info(info);
            }
        }
        self.update_size_metric(&t);
    }

    /// Follows placement's `WatchRanges` until `cancel`, reconnecting with backoff and
    /// rotating through the placement members.
    pub(crate) async fn run_watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut idx = self.placement.preferred();
        loop {
            let (url, mut client) = {
                let (u, c) = self.placement.member(idx);
                (u.to_string(), c)
            };
            let opened = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(Duration::from_secs(5), client.watch_ranges(WatchRangesRequest {})) => r,
            };
            match opened {
                Ok(Ok(resp)) => {
                    let mut stream = resp.into_inner();
                    let mut got_any = false;
                    loop {
                        let msg = tokio::select! {
                            _ = cancel.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match msg {
                            Ok(Some(m)) => {
                                if !got_any {
                                    info!(placement = %url, ranges = m.updated.len(), full = m.full, "range watch established");
                                    got_any = true;
                                    backoff.reset();
                                }
                                self.apply_watch(m);
                            }
                            Ok(None) => {
                                debug!(placement = %url, "range watch ended");
                                break;
                            }
                            Err(e) => {
                                debug!(placement = %url, error = %e.message(), "range watch failed");
                                break;
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    self.metrics.placement_errors.inc();
                    debug!(placement = %url, error = %e.message(), "cannot open range watch");
                }
                Err(_) => {
                    self.metrics.placement_errors.inc();
                    debug!(placement = %url, "opening range watch timed out");
                }
            }
            idx = idx.wrapping_add(1);
            let w = backoff.next_wait();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(w) => {}
            }
        }
    }

    /// Initial load, retried in the background until it succeeds once (the watch also
    /// fills the cache). Never blocks traffic.
    pub(crate) async fn initial_load(&self, timeout: Duration) {
        match self.load_all(Instant::now() + timeout).await {
            Ok(n) => info!(ranges = n, "range map loaded from placement"),
            Err(e) => {
                warn!(error = %e.message(), "cannot load the range map from placement yet; will learn it from the watch and on demand")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skv_proto::internal::{RangeDescriptor, RangeEpoch};

    fn info(id: u64, start: &[u8], end: &[u8]) -> RangeInfo {
        RangeInfo {
            descriptor: Some(RangeDescriptor {
                range_id: id,
                start: start.to_vec(),
                end: end.to_vec(),
                epoch: Some(RangeEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                replicas: vec![],
            }),
            leader_store_id: 0,
        }
    }

    #[tokio::test]
    async fn plans_scan_intervals_at_range_boundaries() {
        let router = Router::new(
            PlacementMembers::new(&["127.0.0.1:1"]).unwrap(),
            Metrics::unregistered(),
        );
        // Nothing cached: one interval.
        assert_eq!(router.plan_intervals(b"a", b"z"), vec![(b"a".to_vec(), b"z".to_vec())]);
        router.apply_watch(skv_proto::internal::WatchRangesResponse {
            updated: vec![info(1, b"", b"c"), info(2, b"c", b"m"), info(3, b"m", b"")],
            removed_range_ids: vec![],
            stores: vec![],
            full: true,
        });
        assert_eq!(router.cached_ranges(), 3);
        let iv = router.plan_intervals(b"b", b"x");
        assert_eq!(
            iv,
            vec![
                (b"b".to_vec(), b"c".to_vec()),
                (b"c".to_vec(), b"m".to_vec()),
                (b"m".to_vec(), b"x".to_vec())
            ]
        );
        assert_eq!(router.plan_intervals(b"d", b"e"), vec![(b"d".to_vec(), b"e".to_vec())]);
        assert_eq!(router.plan_intervals(b"c", b"m"), vec![(b"c".to_vec(), b"m".to_vec())]);
        // A removal (merge) and an incremental update.
        router.apply_watch(skv_proto::internal::WatchRangesResponse {
            updated: vec![],
            removed_range_ids: vec![3],
            stores: vec![],
            full: false,
        });
        assert_eq!(router.cached_ranges(), 2);
    }

    #[test]
    fn outcome_unknown_is_marked() {
        let s = outcome_unknown("timeout");
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("outcome unknown"));
        assert!(is_outcome_unknown(&s));
        assert!(!is_outcome_unknown(&Status::unavailable("x")));
        assert!(!certainly_not_sent(&Status::unavailable("connection reset")));
    }
}
