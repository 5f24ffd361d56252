//! The range cache and store address book: pure logic, no I/O.
//!
//! The cache maps key intervals to range descriptors (keyed by start key) plus a
//! leader hint. It only ever accepts information that is at least as new as what it
//! holds (epochs, DESIGN.md §4), so a lagging placement watch cannot undo what a
//! storenode's routing error taught us. Routing errors are turned into a
//! [`RoutingAction`] that tells the request path how to retry.

use rand::Rng;
use skv_common::keys::{KeySpan, desc_contains, epoch_of, epoch_stale};
use skv_common::{RangeId, StoreId};
use skv_proto::internal::{
    RangeDescriptor, RangeEpoch, RangeInfo, ReplicaRole, RequestHeader, RoutingError, StoreInfo, StoreState,
    routing_error,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::time::Duration;

/// Longest a ServerBusy answer makes us wait per attempt.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Entry {
    desc: RangeDescriptor,
    leader: Option<StoreId>,
    /// Known to be out of date (a routing error said so); ask placement before use,
    /// but still usable when placement is unreachable.
    stale: bool,
}

/// What the request path needs to send to one range.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub range_id: RangeId,
    pub epoch: RangeEpoch,
    pub start: Vec<u8>,
    /// Empty = +infinity.
    pub end: Vec<u8>,
    /// Voters first, then learners.
    pub replicas: Vec<StoreId>,
    pub leader: Option<StoreId>,
    /// The cache knows this entry is out of date.
    pub stale: bool,
}

impl Route {
    /// The header of an internal request to this range.
    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            range_id: self.range_id.get(),
            epoch: Some(self.epoch),
        }
    }

    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        skv_common::keys::in_range(key, &self.start, &self.end)
    }

    fn from_entry(e: &Entry) -> Self {
        let mut replicas: Vec<_> = e
            .desc
            .replicas
            .iter()
            .filter(|r| r.role == ReplicaRole::Voter as i32)
            .map(|r| StoreId(r.store_id))
            .collect();
        replicas.extend(
            e.desc
                .replicas
                .iter()
                .filter(|r| r.role != ReplicaRole::Voter as i32)
                .map(|r| StoreId(r.store_id)),
        );
        Route {
            range_id: RangeId(e.desc.range_id),
            epoch: epoch_of(&e.desc),
            start: e.desc.start.clone(),
            end: e.desc.end.clone(),
            replicas,
            leader: e.leader,
            stale: e.stale,
        }
    }
}

/// How to go on after a routing error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingAction {
    /// Metric label (`skv_proxy_retries_total{reason}`).
    pub reason: &'static str,
    /// Wait at least this long before the next attempt.
    pub wait: Option<Duration>,
    /// Do not send the next attempt to the store that answered.
    pub avoid_store: bool,
    /// The cache has no usable entry for the key any more: ask placement.
    pub refresh: bool,
}

/// The range cache.
#[derive(Debug, Default)]
pub struct RangeCache {
    by_start: BTreeMap<Vec<u8>, Entry>,
    by_id: HashMap<RangeId, Vec<u8>>,
}

/// Whether `[a_start, a_end)` and `[b_start, b_end)` overlap (empty end = +inf).
impl RangeCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached ranges.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The range holding `key`, if cached (possibly marked stale).
    pub fn lookup(&self, key: &[u8]) -> Option<Route> {
        let (_, e) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()?;
        desc_contains(&e.desc, key).then(|| Route::from_entry(e))
    }

    /// The cached range with this id.
    pub fn get(&self, id: RangeId) -> Option<Route> {
        let start = self.by_id.get(&id)?;
        self.by_start.get(start).map(Route::from_entry)
    }

    /// Every cached range overlapping `[start, end)`, in key order.
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<Route> {
        self.overlapping_starts(start, end)
            .into_iter()
            .filter_map(|s| self.by_start.get(&s).map(Route::from_entry))
            .collect()
    }

    fn overlapping_starts(&self, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // The entry that starts at or before `start` may reach into the interval.
        if let Some((s, e)) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start)))
            .next_back()
            && KeySpan::of(&e.desc).overlaps(&KeySpan::new(start, end))
        {
            out.push(s.clone());
        }
        for (s, e) in self
            .by_start
            .range::<[u8], _>((Bound::Excluded(start), Bound::Unbounded))
        {
            if !end.is_empty() && s.as_slice() >= end {
                break;
            }
            if KeySpan::of(&e.desc).overlaps(&KeySpan::new(start, end)) {
                out.push(s.clone());
            }
        }
        out
    }

    fn remove_start(&mut self, start: &[u8]) -> Option<Entry> {
        let e = self.by_start.remove(start)?;
        if self.by_id.get(&RangeId(e.desc.range_id)).map(Vec::as_slice) == Some(start) {
            self.by_id.remove(&RangeId(e.desc.range_id));
        }
        Some(e)
    }

    /// Inserts a descriptor if it is not older than anything it overlaps, removing
    /// what it replaces. Same range id: accepted when no epoch field is smaller.
    /// Different range ids: accepted when its `version` (which rises on every split
    /// and merge of the key space) is strictly greater. Returns whether it was applied.
    pub fn insert(&mut self, desc: RangeDescriptor, leader: Option<StoreId>) -> bool {
        if !desc.end.is_empty() && desc.end <= desc.start {
            return false;
        }
        let epoch = epoch_of(&desc);
        let id = RangeId(desc.range_id);
        let over = self.overlapping_starts(&desc.start, &desc.end);
        // Also the same id elsewhere (e.g. its start moved in a merge).
        let mut victims: Vec<Vec<u8>> = over;
        if let Some(s) = self.by_id.get(&id)
            && !victims.contains(s)
        {
            victims.push(s.clone());
        }
        let mut kept_leader = None;
        for s in &victims {
            let e = &self.by_start[s];
            let old = epoch_of(&e.desc);
            if e.desc.range_id == desc.range_id {
                if epoch_stale(&epoch, &old) {
                    return false;
                }
                if old.conf_ver == epoch.conf_ver {
                    kept_leader = e.leader;
                }
            } else if epoch.version <= old.version {
                return false;
            }
        }
        for s in victims {
            self.remove_start(&s);
        }
        let leader = leader.or(kept_leader);
        self.by_id.insert(id, desc.start.clone());
        self.by_start.insert(
            desc.start.clone(),
            Entry {
                desc,
                leader,
                stale: false,
            },
        );
        true
    }

    /// Inserts a placement `RangeInfo`.
    pub fn insert_info(&mut self, info: &RangeInfo) -> bool {
        match &info.descriptor {
            Some(d) => self.insert(
                d.clone(),
                (info.leader_store_id != 0).then_some(StoreId(info.leader_store_id)),
            ),
            None => false,
        }
    }

    /// Replaces the map with a full one from placement, but keeps any local entry
    /// that is strictly newer than what placement sent (placement may lag).
    pub fn replace_all(&mut self, infos: &[RangeInfo]) {
        let old = std::mem::take(&mut self.by_start);
        self.by_id.clear();
        for info in infos {
            self.insert_info(info);
        }
        for (_, e) in old {
            if !e.stale {
                self.insert(e.desc, e.leader);
            }
        }
    }

    /// Drops a range (merged away).
    pub fn remove(&mut self, id: RangeId) {
        if let Some(s) = self.by_id.get(&id).cloned() {
            self.remove_start(&s);
        }
    }

    /// Sets (or clears) the leader hint of a range.
    pub fn set_leader(&mut self, id: RangeId, leader: Option<StoreId>) {
        if let Some(s) = self.by_id.get(&id)
            && let Some(e) = self.by_start.get_mut(s)
        {
            e.leader = leader;
        }
    }

    /// Marks a range as out of date if the cache still holds the epoch the caller used.
    pub fn mark_stale(&mut self, id: RangeId, epoch: &RangeEpoch) {
        if let Some(s) = self.by_id.get(&id)
            && let Some(e) = self.by_start.get_mut(s)
            && epoch_of(&e.desc) == *epoch
        {
            e.stale = true;
        }
    }

    /// Learns from a routing error that `store` returned for a request sent with `route`.
    pub fn on_routing_error(&mut self, route: &Route, store: StoreId, err: &RoutingError) -> RoutingAction {
        let action = |reason, wait, avoid_store, refresh| RoutingAction {
            reason,
            wait,
            avoid_store,
            refresh,
        };
        match &err.kind {
            Some(routing_error::Kind::NotLeader(nl)) => {
                let leader = (nl.leader_store_id != 0).then_some(StoreId(nl.leader_store_id));
                match leader {
                    Some(l) if l != store => {
                        self.set_leader(route.range_id, Some(l));
                        action("not_leader", None, false, false)
                    }
                    _ => {
                        // No leader known (election running), or it names itself: try another
                        // replica after a short pause.
                        self.set_leader(route.range_id, None);
                        action("not_leader", Some(Duration::from_millis(5)), true, false)
                    }
                }
            }
            Some(routing_error::Kind::EpochNotMatch(enm)) => {
                let mut any = false;
                for d in &enm.current {
                    any |= self.insert(d.clone(), None);
                }
                if !any {
                    self.mark_stale(route.range_id, &route.epoch);
                }
                action("epoch_not_match", None, false, !any)
            }
            Some(routing_error::Kind::KeyNotInRange(k)) => {
                if let Some(d) = &k.descriptor {
                    self.insert(d.clone(), None);
                }
                self.mark_stale(route.range_id, &route.epoch);
                action("key_not_in_range", None, false, true)
            }
            Some(routing_error::Kind::RangeNotFound(_)) => {
                // This store has no replica (moved or merged away): ask placement, and
                // meanwhile try another replica.
                if route.leader == Some(store) {
                    self.set_leader(route.range_id, None);
                }
                self.mark_stale(route.range_id, &route.epoch);
                action("range_not_found", None, true, true)
            }
            Some(routing_error::Kind::ServerBusy(b)) => {
                let wait = Duration::from_millis(b.retry_after_ms.max(1)).min(MAX_BUSY_WAIT);
                action("server_busy", Some(wait), false, false)
            }
            None => action("unknown_routing_error", Some(Duration::from_millis(10)), true, true),
        }
    }
}

/// The store address book (from placement and from NotLeader answers).
#[derive(Debug, Default)]
pub struct StoreBook {
    stores: HashMap<StoreId, (String, StoreState)>,
}

impl StoreBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges store records (a later record for the same id wins).
    pub fn update(&mut self, stores: &[StoreInfo]) {
        for s in stores {
            if s.store_id == 0 || s.address.is_empty() {
                continue;
            }
            let state = StoreState::try_from(s.state).unwrap_or(StoreState::Up);
            self.stores.insert(StoreId(s.store_id), (s.address.clone(), state));
        }
    }

    /// Records an address learnt from a NotLeader answer, keeping a known state.
    pub fn learn_address(&mut self, id: StoreId, address: &str) {
        if id.get() == 0 || address.is_empty() {
            return;
        }
        let state = self.stores.get(&id).map(|(_, s)| *s).unwrap_or(StoreState::Up);
        self.stores.insert(id, (address.to_string(), state));
    }

    pub fn address(&self, id: StoreId) -> Option<&str> {
        self.stores.get(&id).map(|(a, _)| a.as_str())
    }

    /// Whether some store is known at `address`.
    pub fn knows_address(&self, address: &str) -> bool {
        self.stores.values().any(|(a, _)| a == address)
    }

    pub fn is_up(&self, id: StoreId) -> bool {
        matches!(self.stores.get(&id), Some((_, StoreState::Up | StoreState::Draining)))
    }

    pub fn len(&self) -> usize {
        self.stores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stores.is_empty()
    }
}

/// Chooses the store for the next attempt: the leader when known and not avoided,
/// otherwise the first replica not avoided that is up, otherwise any not avoided.
pub fn pick_store(route: &Route, avoid: &HashSet<StoreId>, book: &StoreBook) -> Option<StoreId> {
    if let Some(l) = route.leader
        && !avoid.contains(&l)
    {
        return Some(l);
    }
    let mut candidates = route.replicas.iter().copied().filter(|s| !avoid.contains(s));
    let first = candidates.clone().find(|s| book.is_up(*s));
    first.or_else(|| candidates.next())
}

/// Chooses any replica for a follower read (`stale_ok`): a random up replica not
/// avoided, spreading read load; falls back to [`pick_store`].
pub fn pick_any_store(route: &Route, avoid: &HashSet<StoreId>, book: &StoreBook) -> Option<StoreId> {
    let up: Vec<StoreId> = route
        .replicas
        .iter()
        .copied()
        .filter(|s| !avoid.contains(s) && book.is_up(*s))
        .collect();
    if up.is_empty() {
        return pick_store(route, avoid, book);
    }
    Some(up[rand::rng().random_range(0..up.len())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use skv_common::keys::cmp_end;
    use skv_proto::internal::{EpochNotMatch, KeyNotInRange, NotLeader, RangeNotFound, Replica, ServerBusy};
    use std::cmp::Ordering;

    fn desc(id: u64, start: &[u8], end: &[u8], conf_ver: u64, version: u64, stores: &[u64]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch: Some(RangeEpoch { conf_ver, version }),
            replicas: stores
                .iter()
                .map(|s| Replica {
                    store_id: *s,
                    role: ReplicaRole::Voter as i32,
                })
                .collect(),
        }
    }

    fn err(kind: routing_error::Kind) -> RoutingError {
        RoutingError {
            message: String::new(),
            kind: Some(kind),
        }
    }

    #[test]
    fn lookup_by_key() {
        let mut c = RangeCache::new();
        assert!(c.insert(desc(1, b"", b"m", 1, 1, &[1, 2, 3]), Some(StoreId(2))));
        assert!(c.insert(desc(2, b"m", b"", 1, 1, &[1, 2, 3]), None));
        assert_eq!(c.len(), 2);
        let r = c.lookup(b"a").unwrap();
        assert_eq!(r.range_id, RangeId(1));
        assert_eq!(r.leader, Some(StoreId(2)));
        assert_eq!(c.lookup(b"m").unwrap().range_id, RangeId(2));
        assert_eq!(c.lookup(b"\xff\xff").unwrap().range_id, RangeId(2));
        assert_eq!(c.lookup(b"").unwrap().range_id, RangeId(1));
        assert_eq!(c.overlapping(b"a", b"z").len(), 2);
        assert_eq!(c.overlapping(b"a", b"b").len(), 1);
        assert_eq!(c.overlapping(b"m", b"").len(), 1);
    }

    #[test]
    fn gaps_miss() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"b", b"d", 1, 1, &[1]), None);
        assert!(c.lookup(b"a").is_none());
        assert!(c.lookup(b"d").is_none());
        assert!(c.lookup(b"c").is_some());
    }

    #[test]
    fn split_replaces_parent_and_stale_is_ignored() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1, 2, 3]), Some(StoreId(1)));
        // Split: left keeps id 1 (version 2), right is id 2 (version 2).
        assert!(c.insert(desc(2, b"k", b"", 1, 2, &[1, 2, 3]), None));
        // The right half removed the whole parent: "a" now misses until the left arrives.
        assert!(c.lookup(b"a").is_none());
        assert!(c.insert(desc(1, b"", b"k", 1, 2, &[1, 2, 3]), None));
        assert_eq!(c.lookup(b"a").unwrap().range_id, RangeId(1));
        assert_eq!(c.lookup(b"z").unwrap().range_id, RangeId(2));
        // A lagging watch replays the old parent: refused.
        assert!(!c.insert(desc(1, b"", b"", 1, 1, &[1, 2, 3]), None));
        assert_eq!(c.lookup(b"z").unwrap().range_id, RangeId(2));
        assert_eq!(c.len(), 2);
        // Equal epoch refreshes (and keeps the leader hint when conf_ver is unchanged).
        c.set_leader(RangeId(1), Some(StoreId(3)));
        assert!(c.insert(desc(1, b"", b"k", 1, 2, &[1, 2, 3]), None));
        assert_eq!(c.lookup(b"a").unwrap().leader, Some(StoreId(3)));
        // A membership change drops the hint.
        assert!(c.insert(desc(1, b"", b"k", 2, 2, &[1, 2, 4]), None));
        assert_eq!(c.lookup(b"a").unwrap().leader, None);
        // Different id with equal version overlapping: refused.
        assert!(!c.insert(desc(9, b"a", b"b", 5, 2, &[1]), None));
    }

    #[test]
    fn merge_replaces_both() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"k", 1, 2, &[1]), None);
        c.insert(desc(2, b"k", b"", 1, 2, &[1]), None);
        assert!(c.insert(desc(1, b"", b"", 1, 3, &[1]), None));
        assert_eq!(c.len(), 1);
        assert_eq!(c.lookup(b"z").unwrap().range_id, RangeId(1));
        assert!(c.get(RangeId(2)).is_none());
        c.remove(RangeId(1));
        assert!(c.is_empty());
    }

    #[test]
    fn replace_all_keeps_newer_local_knowledge() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"k", 1, 2, &[1]), None);
        c.insert(desc(2, b"k", b"", 1, 2, &[1]), None);
        let lagging = vec![RangeInfo {
            descriptor: Some(desc(1, b"", b"", 1, 1, &[1])),
            leader_store_id: 1,
        }];
        c.replace_all(&lagging);
        assert_eq!(c.len(), 2);
        assert_eq!(c.lookup(b"z").unwrap().range_id, RangeId(2));
    }

    #[test]
    fn not_leader_sets_hint() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1, 2, 3]), None);
        let r = c.lookup(b"a").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::NotLeader(NotLeader {
                range_id: 1,
                leader_store_id: 3,
                leader_address: "x:1".into(),
            })),
        );
        assert_eq!(a.reason, "not_leader");
        assert!(!a.avoid_store && a.wait.is_none());
        assert_eq!(c.lookup(b"a").unwrap().leader, Some(StoreId(3)));
        // Leader unknown: clear, avoid and wait briefly.
        let r = c.lookup(b"a").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(3),
            &err(routing_error::Kind::NotLeader(NotLeader {
                range_id: 1,
                leader_store_id: 0,
                leader_address: String::new(),
            })),
        );
        assert!(a.avoid_store && a.wait.is_some());
        assert_eq!(c.lookup(b"a").unwrap().leader, None);
    }

    #[test]
    fn epoch_not_match_inserts_current() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1]), Some(StoreId(1)));
        let r = c.lookup(b"q").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::EpochNotMatch(EpochNotMatch {
                current: vec![desc(1, b"", b"k", 1, 2, &[1]), desc(2, b"k", b"", 1, 2, &[1])],
            })),
        );
        assert_eq!(a.reason, "epoch_not_match");
        assert!(!a.refresh);
        assert_eq!(c.lookup(b"q").unwrap().range_id, RangeId(2));
        assert_eq!(c.lookup(b"a").unwrap().epoch.version, 2);
        // Empty `current`: mark stale and ask placement.
        let r = c.lookup(b"a").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::EpochNotMatch(EpochNotMatch { current: vec![] })),
        );
        assert!(a.refresh);
        assert!(c.lookup(b"a").unwrap().stale);
    }

    #[test]
    fn key_not_in_range_and_range_not_found_invalidate() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1, 2]), Some(StoreId(1)));
        let r = c.lookup(b"q").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::KeyNotInRange(KeyNotInRange {
                key: b"q".to_vec(),
                descriptor: Some(desc(1, b"", b"k", 1, 2, &[1, 2])),
            })),
        );
        assert!(a.refresh);
        assert!(c.lookup(b"q").is_none(), "the key's range is unknown now");
        assert!(!c.lookup(b"a").unwrap().stale, "the fresh descriptor is usable");

        let r = c.lookup(b"a").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::RangeNotFound(RangeNotFound { range_id: 1 })),
        );
        assert!(a.refresh && a.avoid_store);
        let r = c.lookup(b"a").unwrap();
        assert!(r.stale);
        assert_eq!(r.leader, None);
        // A fresh descriptor (same epoch, from placement) clears the flag.
        c.insert(desc(1, b"", b"k", 1, 2, &[2]), None);
        assert!(!c.lookup(b"a").unwrap().stale);
    }

    #[test]
    fn server_busy_waits() {
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1]), None);
        let r = c.lookup(b"a").unwrap();
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::ServerBusy(ServerBusy { retry_after_ms: 50 })),
        );
        assert_eq!(a.wait, Some(Duration::from_millis(50)));
        let a = c.on_routing_error(
            &r,
            StoreId(1),
            &err(routing_error::Kind::ServerBusy(ServerBusy { retry_after_ms: 60_000 })),
        );
        assert_eq!(a.wait, Some(MAX_BUSY_WAIT));
    }

    #[test]
    fn store_book_and_pick() {
        let mut book = StoreBook::new();
        book.update(&[
            StoreInfo {
                store_id: 1,
                address: "a:1".into(),
                state: StoreState::Down as i32,
                ..Default::default()
            },
            StoreInfo {
                store_id: 2,
                address: "a:2".into(),
                ..Default::default()
            },
        ]);
        book.learn_address(StoreId(3), "a:3");
        assert_eq!(book.address(StoreId(3)), Some("a:3"));
        assert_eq!(book.len(), 3);
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1, 2, 3]), None);
        let mut r = c.lookup(b"x").unwrap();
        let mut avoid = HashSet::new();
        // Leader unknown: skip the down store.
        assert_eq!(pick_store(&r, &avoid, &book), Some(StoreId(2)));
        r.leader = Some(StoreId(1));
        assert_eq!(pick_store(&r, &avoid, &book), Some(StoreId(1)));
        avoid.insert(StoreId(1));
        avoid.insert(StoreId(2));
        assert_eq!(pick_store(&r, &avoid, &book), Some(StoreId(3)));
        avoid.insert(StoreId(3));
        assert_eq!(pick_store(&r, &avoid, &book), None);
    }

    #[test]
    fn follower_reads_spread() {
        let mut book = StoreBook::new();
        for id in 1..=3 {
            book.update(&[StoreInfo {
                store_id: id,
                address: format!("a:{id}"),
                ..Default::default()
            }]);
        }
        let mut c = RangeCache::new();
        c.insert(desc(1, b"", b"", 1, 1, &[1, 2, 3]), Some(StoreId(1)));
        let r = c.lookup(b"x").unwrap();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.insert(pick_any_store(&r, &HashSet::new(), &book).unwrap());
        }
        assert_eq!(seen.len(), 3);
        let avoid: HashSet<_> = [StoreId(1), StoreId(2)].into();
        assert_eq!(pick_any_store(&r, &avoid, &book), Some(StoreId(3)));
        let avoid: HashSet<_> = [StoreId(1), StoreId(2), StoreId(3)].into();
        assert_eq!(pick_any_store(&r, &avoid, &book), None);
    }

    /// Randomized: after any sequence of accepted inserts, cached ranges never overlap.
    #[test]
    fn never_overlapping() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = RangeCache::new();
        for i in 0..5000u64 {
            let a: u8 = rng.random_range(0..20);
            let b: u8 = rng.random_range(0..21);
            let (s, e) = if b == 20 {
                (vec![a], vec![])
            } else if a < b {
                (vec![a], vec![b])
            } else {
                continue;
            };
            let s = if a == 0 { vec![] } else { s };
            c.insert(
                desc(
                    rng.random_range(1..10),
                    &s,
                    &e,
                    1,
                    rng.random_range(1..(i / 50 + 2)),
                    &[1],
                ),
                None,
            );
            let all = c.overlapping(b"", b"");
            for w in all.windows(2) {
                assert!(
                    cmp_end(&w[0].end, &w[1].start) != Ordering::Greater && !w[0].end.is_empty(),
                    "{w:?}"
                );
            }
            assert_eq!(c.by_id.len(), c.by_start.len());
        }
    }
}
