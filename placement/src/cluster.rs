//! Cluster metadata operations on a [`MetaStore`](crate::meta::MetaStore): bootstrap, range map reads and updates,
//! stores, the ID allocator. Every write that must not race is a compare-and-swap.
//! Errors are [`PlacementError`]s: a failing metadata store is `PD-MetaUnavailable`, a
//! compare-and-swap that keeps losing `PD-Conflict`, an undecodable record `PD-Internal`.

use crate::error::{PlacementError, PlacementResult};
use crate::layout::Layout;
use crate::meta::{CmpOp, Compare, DynMetaStore, MetaResult, Op, Txn};
use crate::metrics::Metrics;
use crate::model::{Descriptor, Epoch};
use crate::rangemap::{
    Guard, Incoming, StoredRange, UpdatePlan, decode_record, encode_record, ends_guard, guard_start, plan_update,
};
use prost::Message;
use skv_common::ids::{RangeId, StoreId};
use skv_common::keys::desc_contains;
use skv_proto::internal::{RangeDescriptor, RangeInfo, StoreInfo};

/// How many times a CAS update is re-read and retried before giving up.
const CAS_RETRIES: usize = 16;

/// Outcome of a range map update.
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyOutcome {
    Applied,
    Unchanged,
    /// Refused; the stored overlapping descriptors.
    Stale(Vec<RangeDescriptor>),
}

/// Typed access to the cluster's metadata.
#[derive(Clone)]
pub struct Meta {
    pub store: DynMetaStore,
    pub layout: Layout,
    metrics: Metrics,
}

fn corrupt(kv: &crate::meta::KeyValue, what: impl std::fmt::Display) -> PlacementError {
    PlacementError::internal(format!(
        "corrupt metadata at {}: {what}",
        String::from_utf8_lossy(&kv.key)
    ))
}

fn decode_range(kv: &crate::meta::KeyValue) -> PlacementResult<StoredRange> {
    let (info, leader_term) = decode_record(kv.value.as_slice()).map_err(|e| corrupt(kv, e))?;
    if info.descriptor.is_none() {
        return Err(corrupt(kv, "range record without descriptor"));
    }
    Ok(StoredRange {
        key: kv.key.clone(),
        mod_revision: kv.mod_revision,
        info,
        leader_term,
    })
}

fn parse_u64(kv: &crate::meta::KeyValue) -> PlacementResult<u64> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(kv, "bad counter value"))
}

fn decode_store(kv: &crate::meta::KeyValue) -> PlacementResult<StoreInfo> {
    StoreInfo::decode(kv.value.as_slice()).map_err(|e| corrupt(kv, e))
}

impl Meta {
    pub fn new(store: DynMetaStore, layout: Layout, metrics: Metrics) -> Self {
        Self { store, layout, metrics }
    }

    async fn txn(&self, t: Txn) -> MetaResult<bool> {
        match self.store.txn(t).await {
            Ok(r) => {
                if !r.succeeded {
                    self.metrics.meta_txn_failures.inc();
                }
                Ok(r.succeeded)
            }
            Err(e) => {
                self.metrics.meta_errors.inc();
                Err(e)
            }
        }
    }

    /// Creates the cluster exactly once (safe under concurrent callers); returns its id.
    /// Writes the cluster id, range 1 = `["", "")` with epoch {1, 1} and no replicas,
    /// the ID allocator (next = 2) and the generation counter.
    pub async fn bootstrap(&self) -> PlacementResult<String> {
        let id = format!("{:032x}", rand::random::<u128>());
        let r1 = RangeInfo {
            descriptor: Some(
                Descriptor {
                    id: RangeId(1),
                    start: vec![],
                    end: vec![],
                    epoch: Epoch::INITIAL,
                    replicas: vec![],
                }
                .to_proto(),
            ),
            leader_store_id: 0,
        };
        let l = &self.layout;
        let t = Txn::new().when([Compare::absent(l.cluster_id())]).and_then([
            Op::put(l.cluster_id(), id.clone()),
            Op::put(l.range(b""), r1.encode_to_vec()),
            Op::put(l.ids(), "2"),
            Op::put(l.gen_key(), "0"),
        ]);
        let created = self.store.txn(t).await?.succeeded;
        let kv = self
            .store
            .get(&l.cluster_id())
            .await?
            .ok_or_else(|| PlacementError::internal("cluster id missing after bootstrap"))?;
        let stored = String::from_utf8_lossy(&kv.value).into_owned();
        if created {
            tracing::info!(cluster_id = %stored, "bootstrapped a new cluster");
        }
        Ok(stored)
    }

    /// The range holding `key`, if the map covers it (one range read).
    pub async fn lookup(&self, key: &[u8]) -> PlacementResult<Option<StoredRange>> {
        let (from, to) = self.layout.range_lookup_bounds(key);
        let r = self.store.range(&from, &to, 1).await?;
        match r.kvs.first() {
            Some(kv) => {
                let s = decode_range(kv)?;
                Ok(desc_contains(s.desc(), key).then_some(s))
            }
            None => Ok(None),
        }
    }

    /// Records in key order starting with the one holding `start`, while their start is
    /// below `end` (empty = +infinity), at most `limit` (0 = all).
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> PlacementResult<Vec<StoredRange>> {
        const PAGE: usize = 256;
        let (mut from, to) = self.layout.range_lookup_bounds(start);
        let mut out = Vec::new();
        loop {
            let r = self.store.range(&from, &to, PAGE).await?;
            for kv in &r.kvs {
                let s = decode_range(kv)?;
                if !end.is_empty() && s.desc().start.as_slice() >= end {
                    return Ok(out);
                }
                out.push(s);
                if limit > 0 && out.len() >= limit {
                    return Ok(out);
                }
            }
            match r.kvs.last() {
                Some(last) if r.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Every range record and the revision read (for watching from `revision + 1`).
    pub async fn all_ranges(&self) -> PlacementResult<(Vec<StoredRange>, i64)> {
        let (from, to) = self.layout.ranges_bounds();
        let r = self.store.range(&from, &to, 0).await?;
        let ranges = r.kvs.iter().map(decode_range).collect::<PlacementResult<Vec<_>>>()?;
        Ok((ranges, r.revision))
    }

    /// The record of range `id` (a full scan: there is no index by id).
    pub async fn range_by_id(&self, id: RangeId) -> PlacementResult<Option<StoredRange>> {
        Ok(self.all_ranges().await?.0.into_iter().find(|s| s.range_id() == id))
    }

    /// Reads the records an update of `[start, end)` must guard: from the first one that
    /// could overlap it through the first one whose end is >= `end` ([`ends_guard`]), and
    /// the interval read, with the revision it was read at.
    async fn read_guarded(&self, start: &[u8], end: &[u8]) -> PlacementResult<(Vec<StoredRange>, Guard)> {
        const PAGE: usize = 256;
        let first = guard_start(&self.layout, start);
        let (_, to) = self.layout.ranges_bounds();
        let mut from = first.clone();
        let mut revision = None;
        let mut out = Vec::new();
        loop {
            let r = self.store.range(&from, &to, PAGE).await?;
            let revision = *revision.get_or_insert(r.revision);
            for kv in &r.kvs {
                let s = decode_range(kv)?;
                let last = ends_guard(s.desc(), end);
                out.push(s);
                if last {
                    let mut guard_end = kv.key.clone();
                    guard_end.push(0);
                    let guard = Guard {
                        from: first,
                        to: guard_end,
                        revision,
                    };
                    return Ok((out, guard));
                }
            }
            match r.kvs.last() {
                Some(last) if r.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => {
                    let guard = Guard {
                        from: first,
                        to,
                        revision,
                    };
                    return Ok((out, guard));
                }
            }
        }
    }

    /// Reads what `incoming` could affect and plans the update ([`plan_update`]); a
    /// [`UpdatePlan::Write`] must then be run as is (it fails if that part of the map changed
    /// since the read). [`Meta::apply`] does both, with retries.
    pub async fn plan(&self, incoming: &[Incoming]) -> PlacementResult<UpdatePlan> {
        let mut stored: Vec<StoredRange> = Vec::new();
        let mut guards: Vec<Guard> = Vec::new();
        for inc in incoming {
            let (read, guard) = self.read_guarded(&inc.desc.start, &inc.desc.end).await?;
            for s in read {
                if !stored.iter().any(|x| x.key == s.key) {
                    stored.push(s);
                }
            }
            guards.push(guard);
        }
        Ok(plan_update(&self.layout, &stored, &guards, incoming))
    }

    /// Applies descriptors through the epoch rules ([`plan_update`]), retrying on conflicts.
    /// Malformed input is `PD-InvalidArgument`.
    pub async fn apply(&self, incoming: &[Incoming]) -> PlacementResult<ApplyOutcome> {
        for _ in 0..CAS_RETRIES {
            match self.plan(incoming).await? {
                UpdatePlan::Unchanged => return Ok(ApplyOutcome::Unchanged),
                UpdatePlan::Stale(cur) => {
                    self.metrics.stale_updates.inc();
                    return Ok(ApplyOutcome::Stale(cur));
                }
                UpdatePlan::Invalid(m) => return Err(PlacementError::invalid(format!("invalid range update: {m}"))),
                UpdatePlan::Write(t) => {
                    let split = incoming.len() > 1;
                    // One descriptor that deletes another record: it widened over a range.
                    let merge = incoming.len() == 1 && t.success.iter().any(|op| matches!(op, Op::Delete { .. }));
                    if split {
                        crate::crash_point!(crate::failpoints::BEFORE_SPLIT_TXN);
                    }
                    if merge {
                        crate::crash_point!(crate::failpoints::BEFORE_MERGE_TXN);
                    }
                    if self.txn(t).await? {
                        if split {
                            crate::crash_point!(crate::failpoints::AFTER_SPLIT_TXN);
                        }
                        if merge {
                            crate::crash_point!(crate::failpoints::AFTER_MERGE_TXN);
                        }
                        return Ok(ApplyOutcome::Applied);
                    }
                }
            }
        }
        Err(PlacementError::Conflict {
            what: format!("range update kept conflicting {CAS_RETRIES} times"),
        })
    }

    /// Writes the voters chosen for a replica-less range, only if its record is unchanged
    /// and still replica-less. Returns whether it was written.
    pub async fn place_initial(&self, desc: &Descriptor) -> PlacementResult<bool> {
        let key = self.layout.range(&desc.end);
        let Some(kv) = self.store.get(&key).await? else {
            return Ok(false);
        };
        let cur = decode_range(&kv)?;
        let c = cur.desc();
        if cur.range_id() != desc.id
            || c.start != desc.start
            || !c.replicas.is_empty()
            || c.epoch.map(Epoch::from) != Some(desc.epoch)
        {
            return Ok(false);
        }
        let info = RangeInfo {
            descriptor: Some(desc.to_proto()),
            leader_store_id: 0,
        };
        self.txn(
            Txn::new()
                .when([Compare::mod_revision(key.clone(), CmpOp::Equal, kv.mod_revision)])
                .and_then([Op::put(key, encode_record(&info, cur.leader_term))]),
        )
        .await
        .map_err(PlacementError::from)
    }

    /// Every stored store record.
    pub async fn stores(&self) -> PlacementResult<Vec<StoreInfo>> {
        let (from, to) = crate::meta::prefix_range(&self.layout.stores_prefix());
        let r = self.store.range(&from, &to, 0).await?;
        r.kvs.iter().map(decode_store).collect()
    }

    pub async fn get_store(&self, id: StoreId) -> PlacementResult<Option<StoreInfo>> {
        match self.store.get(&self.layout.store(id)).await? {
            Some(kv) => Ok(Some(decode_store(&kv)?)),
            None => Ok(None),
        }
    }

    pub async fn put_store(&self, s: &StoreInfo) -> PlacementResult<()> {
        self.store
            .txn(Txn::new().and_then([Op::put(self.layout.store(StoreId(s.store_id)), s.encode_to_vec())]))
            .await?;
        Ok(())
    }

    /// Reserves `n` ids from the shared allocator by CAS; returns the first.
    pub async fn reserve_ids(&self, n: u64) -> PlacementResult<u64> {
        self.bump_counter(&self.layout.ids(), n, 2).await
    }

    /// Next snapshot generation (strictly increasing across leaders).
    pub async fn next_generation(&self) -> PlacementResult<u64> {
        Ok(self.bump_counter(&self.layout.gen_key(), 1, 0).await? + 1)
    }

    async fn bump_counter(&self, key: &[u8], n: u64, initial: u64) -> PlacementResult<u64> {
        for _ in 0..CAS_RETRIES * 4 {
            let cur = self.store.get(key).await?;
            let (first, cmp) = match &cur {
                Some(kv) => (
                    parse_u64(kv)?,
                    Compare::mod_revision(key.to_vec(), CmpOp::Equal, kv.mod_revision),
                ),
                None => (initial, Compare::absent(key.to_vec())),
            };
            let next = first
                .checked_add(n)
                .ok_or_else(|| PlacementError::internal("id space exhausted"))?;
            if self
                .txn(
                    Txn::new()
                        .when([cmp])
                        .and_then([Op::put(key.to_vec(), next.to_string())]),
                )
                .await?
            {
                return Ok(first);
            }
        }
        Err(PlacementError::Conflict {
            what: format!("counter {} kept conflicting", String::from_utf8_lossy(key)),
        })
    }
}
