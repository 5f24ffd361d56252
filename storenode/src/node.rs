//! The set of replicas (one Raft group per range) of this node, and the
//! operations that create, open, stop and split them.

use crate::engine::{Engine, applied_key, desc_key, io_err};
use crate::metrics::Metrics;
use crate::raft::network::Transport;
use crate::raft::state_machine::RangeShared;
use crate::raft::{GroupParts, InitError, LeaderView, RaftConfig, RaftGroup};
use parking_lot::RwLock;
use prost::Message;
use skv_common::keys::KeySpan;
use skv_common::{RangeId, StoreId};
use skv_proto::internal::{RangeDescriptor, ReplicaRole};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Weak};

/// One local replica of a range.
pub struct Replica {
    pub raft: RaftGroup,
    pub shared: Arc<RangeShared>,
}

impl Replica {
    pub fn leader_view(&self) -> LeaderView {
        self.raft.leader_view()
    }
    pub fn is_leader(&self) -> bool {
        self.raft.is_leader()
    }
}

tokio::task_local! {
    /// Set while a task runs `Raft::new` under the creation lock.
    static HOLDS_CREATE_LOCK: ();
}

/// Why `CreateReplica` failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateReplicaError {
    #[error("bootstrap needs at least one voter")]
    NoVoter,
    #[error(transparent)]
    Init(#[from] InitError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("opening the replica: {0}")]
    Open(String),
}

/// A snapshot install under way: (claim token, range, start, end).
type PendingInstall = (u64, RangeId, Vec<u8>, Vec<u8>);

/// Callback for events the node reports upward (placement ReportSplit).
pub type SplitReporter = Arc<dyn Fn(RangeDescriptor, RangeDescriptor) + Send + Sync>;
/// Callback for a merge applied on the target's leader: (merged, source as frozen).
pub type MergeReporter = Arc<dyn Fn(RangeDescriptor, RangeDescriptor) + Send + Sync>;

/// Uninitialized replicas (waiting for a snapshot) that Raft messages may create at most;
/// placement's moves, repairs and up-replications send a store a few at a time (its snapshot
/// limit per store), far below this.
pub const MAX_UNINITIALIZED_PEERS: usize = 1024;

/// Snapshot streams this store receives at once at most (each may put up to
/// `--snapshot-max-receive-bytes` on disk before it is checked); placement's per-store
/// snapshot limit keeps legitimate ones far below.
pub const MAX_SNAPSHOT_RECEIVES: usize = 8;

pub struct NodeInner {
    pub store_id: StoreId,
    pub engine: Arc<Engine>,
    pub transport: Arc<Transport>,
    pub raft_config: RaftConfig,
    pub snap_dir: PathBuf,
    pub metrics: Metrics,
    replicas: RwLock<HashMap<RangeId, Arc<Replica>>>,
    /// Serializes replica creation, reopening and split seeding (see [`Self::lock_creation`]).
    create_lock: Arc<tokio::sync::Mutex<()>>,
    self_weak: Weak<NodeInner>,
    /// Key spans of snapshot installs under way: (claim token, range, start, end).
    pending_installs: parking_lot::Mutex<Vec<PendingInstall>>,
    pub split_reporter: RwLock<Option<SplitReporter>>,
    pub merge_reporter: RwLock<Option<MergeReporter>>,
    /// Ranges being destroyed or garbage-collected: nothing may reopen them meanwhile.
    gc_ranges: parking_lot::Mutex<std::collections::HashSet<RangeId>>,
    /// Retired (merged) range → the range that absorbed it, for routing answers. One small
    /// entry per merge applied here for the process's life (merges are rate-limited by
    /// placement's cooldowns), so not pruned: a retried MergeRanges must still see it.
    pub retired: parking_lot::Mutex<HashMap<RangeId, RangeId>>,
    /// Set once the server accepts requests (see [`Self::merge_wait_bound`]).
    pub serving: std::sync::atomic::AtomicBool,
    /// The store states placement last reported (hibernation's store events, ADR 0018).
    store_states: parking_lot::Mutex<crate::hibernate::StoreStates>,
    /// Ranges that failed to open at start (a CommitMerge replay whose source had not
    /// caught up yet): reopened in the background.
    deferred: parking_lot::Mutex<Vec<(RangeDescriptor, bool)>>,
    /// Held by whoever drives a merge on this node (a MergeRanges call or the resolver), so
    /// two drivers never interleave a rollback with a commit.
    pub merge_lock: tokio::sync::Mutex<()>,
    /// With `--object-store-url`: new replicas start from the range's latest checkpoint
    /// (ADR 0027).
    pub bootstrapper: RwLock<Option<Arc<crate::raft::bootstrap::Bootstrapper>>>,
    /// Permits of the snapshot streams being received ([`MAX_SNAPSHOT_RECEIVES`]).
    pub snapshot_receives: Arc<tokio::sync::Semaphore>,
}

impl NodeInner {
    pub fn new(
        store_id: StoreId,
        engine: Arc<Engine>,
        transport: Arc<Transport>,
        raft_config: RaftConfig,
        snap_dir: PathBuf,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new_cyclic(|w| Self {
            store_id,
            engine,
            transport,
            raft_config,
            snap_dir,
            metrics,
            replicas: RwLock::new(HashMap::new()),
            create_lock: Arc::new(tokio::sync::Mutex::new(())),
            self_weak: w.clone(),
            pending_installs: parking_lot::Mutex::new(Vec::new()),
            split_reporter: RwLock::new(None),
            merge_reporter: RwLock::new(None),
            gc_ranges: parking_lot::Mutex::new(std::collections::HashSet::new()),
            retired: parking_lot::Mutex::new(HashMap::new()),
            serving: std::sync::atomic::AtomicBool::new(false),
            store_states: parking_lot::Mutex::new(Default::default()),
            deferred: parking_lot::Mutex::new(Vec::new()),
            merge_lock: tokio::sync::Mutex::new(()),
            bootstrapper: RwLock::new(None),
            snapshot_receives: Arc::new(tokio::sync::Semaphore::new(MAX_SNAPSHOT_RECEIVES)),
        })
    }

    /// This node as an `Arc` (for tasks spawned from the apply path).
    pub fn arc(&self) -> Option<Arc<NodeInner>> {
        self.self_weak.upgrade()
    }

    /// Marks `id` as being destroyed; false if it already was.
    pub(crate) fn begin_gc(&self, id: RangeId) -> bool {
        self.gc_ranges.lock().insert(id)
    }

    pub(crate) fn end_gc(&self, id: RangeId) {
        self.gc_ranges.lock().remove(&id);
    }

    pub fn gc_pending(&self, id: RangeId) -> bool {
        self.gc_ranges.lock().contains(&id)
    }

    /// Spans of the live (initialized) local replicas other than `id`.
    pub(crate) fn live_spans(&self, id: RangeId) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.replicas
            .read()
            .values()
            .filter(|r| r.shared.range_id != id && r.shared.is_initialized())
            .map(|r| {
                let d = r.shared.desc.read();
                (d.start.clone(), d.end.clone())
            })
            .collect()
    }

    /// Whether a message or request with descriptor epoch `conf_ver` may (re)create
    /// replica `id`: not while it is being destroyed, and not with a descriptor that is
    /// not newer than the one it was destroyed with.
    fn may_create(&self, id: RangeId, conf_ver: u64) -> Result<(), String> {
        if self.gc_pending(id) {
            return Err(format!("replica {id} is being destroyed; retry later"));
        }
        match crate::gc::load_tombstone(&self.engine, id) {
            Ok(Some(t)) if conf_ver <= t.conf_ver => Err(format!(
                "replica {id} was destroyed at conf_ver {}; descriptor conf_ver {conf_ver} is not newer",
                t.conf_ver
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The creation lock. A split apply holds it from stopping an uninitialized peer of the
    /// new range, through the seed commit, to reopening the range on the seeded storage, so
    /// no Raft message can recreate the peer (and grant a vote) in between.
    pub async fn lock_creation(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.create_lock.clone().lock_owned().await
    }

    /// [`Self::lock_creation`], or `None` when the calling task already holds the lock:
    /// `Raft::new` (run under the lock) re-applies committed entries inline on start, and
    /// a split among them must not wait for the lock its own task holds.
    pub async fn lock_creation_unless_held(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if HOLDS_CREATE_LOCK.try_with(|_| ()).is_ok() {
            None
        } else {
            Some(self.lock_creation().await)
        }
    }

    pub fn replica(&self, id: RangeId) -> Option<Arc<Replica>> {
        self.replicas.read().get(&id).cloned()
    }

    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        // Sorted by the map's keys, not through each replica's pointer: this runs several
        // times a second (gauges, heartbeats, checkpoints) over every replica of the store.
        let mut v: Vec<(RangeId, Arc<Replica>)> = self.replicas.read().iter().map(|(id, r)| (*id, r.clone())).collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// Opens every range found in `meta` (restart path).
    pub async fn load(&self) -> anyhow::Result<()> {
        // Snapshots are rebuilt on demand (Raft rebuilds one when the log is purged and
        // none is current), so once interrupted installs are redone, old files are garbage.
        crate::raft::state_machine::recover_interrupted_installs(&self.engine)?;
        if self.snap_dir.exists() {
            std::fs::remove_dir_all(&self.snap_dir)?;
        }
        std::fs::create_dir_all(&self.snap_dir)?;
        // The directory's entry must be durable: an install's redo marker names a file in it.
        if let Some(parent) = self.snap_dir.parent() {
            crate::engine::sync_dir(parent)?;
        }
        for (id, addr) in self.engine.load_addresses()? {
            self.transport.set_address(id, &addr);
        }
        let gc: std::collections::HashSet<RangeId> = crate::gc::pending(&self.engine)?.into_iter().collect();
        let mut descs = self.engine.load_descriptors()?;
        // Right to left: the source of a merge (the right neighbour) opens, and replays its
        // committed entries, before the target whose CommitMerge may wait for it.
        descs.sort_by(|a, b| b.start.cmp(&a.start));
        for d in descs {
            if gc.contains(&RangeId(d.range_id)) {
                continue;
            }
            let initialized = self.engine.meta.get(applied_key(RangeId(d.range_id)))?.is_some();
            let _g = self.create_lock.lock().await;
            if let Err(e) = self.open_locked(d.clone(), initialized).await {
                tracing::warn!(store_id = %self.store_id, range_id = d.range_id, error = %e, "range failed to open; retrying in the background");
                self.deferred.lock().push((d, initialized));
            }
        }
        Ok(())
    }

    /// Reopens the ranges that failed to open at start, until each opens (or is destroyed).
    pub async fn reopen_deferred(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let pending: Vec<_> = std::mem::take(&mut *self.deferred.lock());
            if pending.is_empty() {
                return;
            }
            for (d, initialized) in pending {
                let id = RangeId(d.range_id);
                if self.gc_pending(id) || self.replica(id).is_some() {
                    continue;
                }
                let _g = self.create_lock.lock().await;
                if let Err(e) = self.open_locked(d.clone(), initialized).await {
                    tracing::warn!(store_id = %self.store_id, range_id = %id, error = %e, "range still fails to open; retrying");
                    self.deferred.lock().push((d, initialized));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }

    async fn open_locked(&self, desc: RangeDescriptor, initialized: bool) -> anyhow::Result<Arc<Replica>> {
        let id = RangeId(desc.range_id);
        if let Some(r) = self.replica(id) {
            return Ok(r);
        }
        let shared = RangeShared::new(desc, initialized);
        let parts = GroupParts {
            store_id: self.store_id,
            config: self.raft_config.clone(),
            engine: self.engine.clone(),
            shared: shared.clone(),
            node: self.self_weak.clone(),
            snap_dir: self.snap_dir.clone(),
            metrics: self.metrics.clone(),
            transport: self.transport.clone(),
        };
        // Callers hold the creation lock; mark the task so a split re-applied inline while
        // the group starts does not wait for it.
        let raft = HOLDS_CREATE_LOCK.scope((), RaftGroup::start(parts)).await?;
        let r = Arc::new(Replica { raft, shared });
        self.replicas.write().insert(id, r.clone());
        self.metrics.ranges.set(self.replicas.read().len() as i64);
        tracing::info!(store_id = %self.store_id, range_id = %id, initialized, "replica opened");
        Ok(r)
    }

    /// Stops and forgets a replica (its storage stays).
    pub fn stop_replica(&self, id: RangeId) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let r = self.replicas.write().remove(&id);
            if let Some(r) = r {
                r.raft.shutdown().await;
            }
            self.metrics.ranges.set(self.replicas.read().len() as i64);
        })
    }

    /// Stops every replica (shutdown path).
    pub async fn stop_all(&self) {
        let all: Vec<_> = self.replicas.write().drain().map(|(_, r)| r).collect();
        for r in all {
            r.raft.shutdown().await;
        }
    }

    /// `CreateReplica`: idempotent; with `bootstrap`, initializes the group with the voters.
    ///
    /// The replica is marked initialized (it holds the data of its descriptor: none, for a
    /// brand-new range) only once `initialize` succeeded; until then, and for good if it
    /// fails, it is an uninitialized peer that serves nothing and waits for a leader. A
    /// bootstrap retry on a group that already has a log or a vote is a no-op (idempotent)
    /// and does not change the mark either.
    pub async fn create_replica(&self, desc: RangeDescriptor, bootstrap: bool) -> Result<(), CreateReplicaError> {
        let id = RangeId(desc.range_id);
        let voters: BTreeSet<StoreId> = desc
            .replicas
            .iter()
            .filter(|r| r.role == ReplicaRole::Voter as i32)
            .map(|r| StoreId(r.store_id))
            .collect();
        if bootstrap && voters.is_empty() {
            return Err(CreateReplicaError::NoVoter);
        }
        let storage = |e: fjall::Error| CreateReplicaError::Storage(e.to_string());
        let replica = {
            let _g = self.create_lock.lock().await;
            match self.replica(id) {
                Some(r) => r,
                None => {
                    let conf_ver = desc.epoch.unwrap_or_default().conf_ver;
                    self.may_create(id, conf_ver).map_err(CreateReplicaError::Storage)?;
                    // Added back after it was destroyed: the tombstone has done its job.
                    self.engine.meta.remove(crate::gc::tomb_key(id)).map_err(storage)?;
                    // A replica this store does not hold yet starts from the range's latest
                    // checkpoint in object storage when one fits (ADR 0027); otherwise, or if
                    // it fails, it opens uninitialized and gets the leader's snapshot.
                    self.try_bootstrap(&desc, bootstrap).await.map_err(storage)?;
                    if self.engine.meta.get(desc_key(id)).map_err(storage)?.is_none() {
                        self.engine
                            .meta
                            .insert(desc_key(id), desc.encode_to_vec())
                            .map_err(storage)?;
                    }
                    let stored = self
                        .engine
                        .meta
                        .get(desc_key(id))
                        .map_err(storage)?
                        .and_then(|v| RangeDescriptor::decode(&v[..]).ok())
                        .unwrap_or(desc.clone());
                    let initialized = self.engine.meta.get(applied_key(id)).map_err(storage)?.is_some();
                    self.open_locked(stored, initialized)
                        .await
                        .map_err(|e| CreateReplicaError::Open(format!("{e:#}")))?
                }
            }
        };
        if !bootstrap {
            return Ok(());
        }
        match replica.raft.initialize(voters).await {
            Ok(()) => {
                replica
                    .shared
                    .initialized
                    .store(true, std::sync::atomic::Ordering::Release);
                self.engine
                    .sync()
                    .await
                    .map_err(|e| CreateReplicaError::Storage(e.to_string()))?;
                tokio::spawn(replica.raft.clone().compact_after_bootstrap());
                Ok(())
            }
            Err(InitError::AlreadyInitialized(e)) => {
                tracing::debug!(range_id = %id, error = %e, "bootstrap skipped: the group already has a log or a vote");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Installs the latest checkpoint of `desc`'s range before its replica first opens, when
    /// [`crate::raft::bootstrap::attempt`] says so. Called under the creation lock.
    async fn try_bootstrap(&self, desc: &RangeDescriptor, initialize: bool) -> Result<(), fjall::Error> {
        use crate::raft::bootstrap::{Attempt, attempt};
        let b = self.bootstrapper.read().clone();
        let has_applied = self.engine.meta.get(applied_key(RangeId(desc.range_id)))?.is_some();
        let Some(b) = b else { return Ok(()) };
        match attempt(true, b.enabled, initialize, has_applied) {
            Attempt::NotApplicable => {}
            Attempt::Refused(_) | Attempt::Try => {
                b.bootstrap(self, desc).await;
            }
        }
        Ok(())
    }

    /// A snapshot was installed on `range` (the state machine's hook).
    pub fn on_snapshot_installed(&self, range: RangeId) {
        if let Some(b) = self.bootstrapper.read().clone() {
            b.on_snapshot_installed(range);
        }
    }

    /// A Raft message from store `from` arrived for a range we do not have: create an
    /// uninitialized peer from the sender's descriptor (new learner, or a split this node has
    /// not applied yet).
    ///
    /// Bounded: the descriptor must name both this store and the sender, and at most
    /// [`MAX_UNINITIALIZED_PEERS`] uninitialized replicas exist at once (a peer naming new
    /// range ids cannot make this store open Raft groups without limit; at the cap the
    /// message is refused and its sender retries).
    pub async fn get_or_create_peer(
        &self,
        id: RangeId,
        desc: Option<RangeDescriptor>,
        from: StoreId,
    ) -> Option<Arc<Replica>> {
        if let Some(r) = self.replica(id) {
            return Some(r);
        }
        // Only a descriptor naming this store and the sender as replicas may create a peer
        // here, and an epoch within skv_common::limits::MAX_EPOCH (no later increment can wrap).
        let desc = desc.filter(|d| {
            d.range_id == id.0
                && d.replicas.iter().any(|r| r.store_id == self.store_id.0)
                && d.replicas.iter().any(|r| r.store_id == from.0)
                && d.epoch
                    .is_none_or(|e| skv_common::limits::check_epoch(e.version, e.conf_ver).is_ok())
        })?;
        let _g = self.create_lock.lock().await;
        if let Some(r) = self.replica(id) {
            return Some(r);
        }
        let uninitialized = self
            .replicas
            .read()
            .values()
            .filter(|r| !r.shared.is_initialized())
            .count();
        if uninitialized >= MAX_UNINITIALIZED_PEERS {
            self.metrics.peers_refused.inc();
            tracing::warn!(range_id = %id, from = %from, uninitialized, "refusing to create a peer: too many uninitialized replicas");
            return None;
        }
        if let Err(why) = self.may_create(id, desc.epoch.unwrap_or_default().conf_ver) {
            tracing::debug!(range_id = %id, why, "message does not recreate a destroyed replica");
            return None;
        }
        let stored = self
            .engine
            .meta
            .get(desc_key(id))
            .ok()
            .flatten()
            .and_then(|v| RangeDescriptor::decode(&v[..]).ok());
        let initialized = stored.is_some() && self.engine.meta.get(applied_key(id)).ok().flatten().is_some();
        match self.open_locked(stored.unwrap_or(desc), initialized).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(range_id = %id, error = %e, "cannot create peer");
                None
            }
        }
    }

    /// Called by a state machine after a split entry applied (on every replica).
    /// Boxed: it opens a Raft group whose type contains the state machine calling it.
    /// `guard` is the creation lock taken by the split apply before it stopped/seeded the
    /// right range; it is released once the right range is reopened.
    pub fn on_split_applied(
        &self,
        left: RangeId,
        right: RangeDescriptor,
        seeded: bool,
        guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.on_split_applied_inner(left, right, seeded, guard))
    }

    async fn on_split_applied_inner(
        &self,
        left: RangeId,
        right: RangeDescriptor,
        seeded: bool,
        guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) {
        let right_id = RangeId(right.range_id);
        if seeded {
            let _g = match guard {
                Some(g) => Some(g),
                None => self.lock_creation_unless_held().await,
            };
            // A peer created by a Raft message just before the seed commit loaded empty
            // state: restart it on the seeded storage.
            let stale = self.replica(right_id).is_some_and(|r| !r.shared.is_initialized());
            if stale {
                let r = self.replicas.write().remove(&right_id);
                if let Some(r) = r {
                    r.raft.shutdown().await;
                }
            }
            if let Err(e) = self.open_locked(right.clone(), true).await {
                tracing::error!(range_id = %right_id, error = %e, "cannot open split range");
                return;
            }
        }
        let left_replica = self.replica(left);
        if let Some(l) = left_replica
            && l.is_leader()
        {
            if let Some(r) = self.replica(right_id) {
                // The old leader's node campaigns first for the new group.
                let raft = r.raft.clone();
                tokio::spawn(async move { raft.campaign().await });
            }
            let reporter = self.split_reporter.read().clone();
            if let Some(rep) = reporter {
                rep(l.shared.desc(), right);
            }
        }
    }

    /// Whether a live (initialized) local range other than `id` overlaps `[start, end)`.
    pub fn overlapping_live(&self, id: RangeId, start: &[u8], end: &[u8]) -> Option<RangeId> {
        for r in self.replicas.read().values() {
            if r.shared.range_id == id || !r.shared.is_initialized() {
                continue;
            }
            // A merge source frozen for `id`: its keys are `id`'s once the merge commits, and a
            // snapshot of `id` that covers them comes from after the commit (ADR 0016).
            if r.shared.merging.lock().as_ref().is_some_and(|m| m.target_id == id.0) {
                continue;
            }
            let d = r.shared.desc.read();
            if spans_overlap(&d.start, &d.end, start, end) {
                return Some(r.shared.range_id);
            }
        }
        None
    }

    /// Claims `[start, end)` for a snapshot install of `id`: refused (with the range in the
    /// way) if a live local range other than `id` or another range's pending install
    /// overlaps it. Check and claim happen under one lock, so two overlapping installs
    /// cannot both pass. The claim is released when the returned guard drops (after the
    /// install committed or failed).
    pub fn claim_install(&self, id: RangeId, start: &[u8], end: &[u8]) -> Result<InstallClaim, RangeId> {
        let node = self.self_weak.upgrade().ok_or(id)?;
        let mut pending = self.pending_installs.lock();
        if let Some(other) = self.overlapping_live(id, start, end) {
            return Err(other);
        }
        if let Some((_, other, _, _)) = pending
            .iter()
            .find(|(_, r, s, e)| *r != id && spans_overlap(s, e, start, end))
        {
            return Err(*other);
        }
        let token = rand::random::<u64>();
        pending.push((token, id, start.to_vec(), end.to_vec()));
        Ok(InstallClaim { node, token })
    }

    /// This node's current descriptors covering the key space a stale request targeted:
    /// the range itself, then the ranges split off to its right (same or newer version).
    pub fn current_descriptors(&self, desc: &RangeDescriptor, req_version: u64) -> Vec<RangeDescriptor> {
        let all: Vec<RangeDescriptor> = self
            .replicas
            .read()
            .values()
            .filter(|r| r.shared.is_initialized())
            .map(|r| r.shared.desc())
            .collect();
        let mut out = vec![desc.clone()];
        let mut end = desc.end.clone();
        while !end.is_empty() {
            match all
                .iter()
                .find(|d| d.start == end && d.epoch.unwrap_or_default().version > req_version)
            {
                Some(d) => {
                    out.push(d.clone());
                    end = d.end.clone();
                }
                None => break,
            }
        }
        out
    }

    /// Persists and installs peer addresses.
    pub fn record_addresses(&self, stores: &[skv_proto::internal::StoreInfo]) -> anyhow::Result<()> {
        for s in stores {
            if s.store_id == 0 || s.address.is_empty() {
                continue;
            }
            if self.transport.set_address(StoreId(s.store_id), &s.address) {
                self.engine
                    .save_address(StoreId(s.store_id), &s.address)
                    .map_err(io_err)?;
            }
        }
        Ok(())
    }

    /// Activity on a replica (a routed request, an admin call): wakes it if it sleeps.
    pub fn touch(&self, r: &Replica, reason: crate::hibernate::WakeReason) {
        r.raft.touch(reason);
    }

    /// Placement's store list (from a store heartbeat answer): records which stores are DOWN
    /// and wakes only the replicas a change concerns (ADR 0018): a store turning DOWN wakes
    /// the sleeping followers it leads, a store turning UP the sleeping leaders that left it
    /// behind.
    pub fn on_store_states(&self, stores: &[skv_proto::internal::StoreInfo]) {
        use skv_proto::internal::StoreState;
        let states = stores
            .iter()
            .filter(|s| s.store_id != 0)
            .map(|s| (s.store_id, s.state == StoreState::Down as i32));
        let (events, down) = {
            let mut st = self.store_states.lock();
            let events = st.update(states);
            (events, st.down())
        };
        self.transport.set_down_stores(down);
        if events.is_empty() {
            return;
        }
        let reps = self.replicas();
        if !reps.first().is_some_and(|r| r.raft.hibernation_enabled()) {
            return; // a node-wide setting
        }
        for r in reps {
            for e in &events {
                r.raft.on_store_event(*e);
            }
        }
    }

    /// The node-wide hibernate loop (ADR 0018): every `every`, over the replicas that are not
    /// hibernating, turns on the election timer of waking followers whose grace passed and
    /// lets idle leaders poll their followers. Polls run concurrently, a bounded number at a
    /// time.
    pub async fn hibernate_loop(
        self: Arc<Self>,
        every: std::time::Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        use futures::StreamExt;
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = t.tick() => {}
            }
            let down = self.transport.down_stores();
            let awake: Vec<_> = self
                .replicas()
                .into_iter()
                .filter(|r| r.raft.hibernation_enabled() && !r.raft.is_hibernating())
                .collect();
            let down = &down;
            futures::stream::iter(awake)
                .for_each_concurrent(64, |r| async move {
                    r.raft.hibernate_pass(down).await;
                })
                .await;
        }
    }

    pub fn refresh_gauges(&self) {
        self.engine.cache.sample_usage();
        let reps = self.replicas();
        self.metrics.ranges.set(reps.len() as i64);
        let (mut sleeping, mut waking) = (0i64, 0i64);
        for r in &reps {
            let (h, w) = r.raft.hibernation_gauges();
            sleeping += i64::from(h);
            waking += i64::from(w);
        }
        self.metrics.ranges_hibernating.set(sleeping);
        self.metrics.ranges_waking.set(waking);
        self.metrics
            .leaders
            .set(reps.iter().filter(|r| r.is_leader()).count() as i64);
        let (mut bytes, mut keys) = (0u64, 0u64);
        for r in &reps {
            let (b, k) = r.shared.approximate_size();
            bytes = bytes.saturating_add(b);
            keys = keys.saturating_add(k);
        }
        self.metrics.replica_bytes.set(bytes.min(i64::MAX as u64) as i64);
        self.metrics.replica_keys.set(keys.min(i64::MAX as u64) as i64);
        let (mut lag_sum, mut lag_max) = (0u64, 0u64);
        for r in &reps {
            let lag = r.raft.apply_lag();
            lag_sum = lag_sum.saturating_add(lag);
            lag_max = lag_max.max(lag);
        }
        self.metrics
            .raft_apply_lag_entries
            .set(lag_sum.min(i64::MAX as u64) as i64);
        self.metrics
            .raft_apply_lag_max_entries
            .set(lag_max.min(i64::MAX as u64) as i64);
        if let Ok(b) = self.engine.db.disk_space() {
            self.metrics.engine_disk_bytes.set(b.min(i64::MAX as u64) as i64);
        }
    }
}

/// A claimed key span of a pending snapshot install (see [`NodeInner::claim_install`]).
pub struct InstallClaim {
    node: Arc<NodeInner>,
    token: u64,
}

impl Drop for InstallClaim {
    fn drop(&mut self) {
        self.node.pending_installs.lock().retain(|(t, ..)| *t != self.token);
    }
}

/// Whether `[a_start, a_end)` and `[b_start, b_end)` intersect (empty end = +infinity).
fn spans_overlap(a_start: &[u8], a_end: &[u8], b_start: &[u8], b_end: &[u8]) -> bool {
    KeySpan::new(a_start, a_end).overlaps(&KeySpan::new(b_start, b_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_node(dir: &std::path::Path) -> Arc<NodeInner> {
        let engine = Engine::open(dir, Metrics::new()).unwrap();
        NodeInner::new(
            StoreId(1),
            engine,
            Transport::new(StoreId(1), None, 1 << 20),
            crate::raft::raft_config(100).unwrap(),
            dir.join("snaps"),
            Metrics::new(),
        )
    }

    #[tokio::test]
    async fn a_message_creates_a_peer_only_if_its_descriptor_lists_this_store() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        let replica = |id| skv_proto::internal::Replica {
            store_id: id,
            role: ReplicaRole::Voter as i32,
        };
        let mut desc = RangeDescriptor {
            range_id: 5,
            replicas: vec![replica(2), replica(3)],
            ..Default::default()
        };
        assert!(
            node.get_or_create_peer(RangeId(5), Some(desc.clone()), StoreId(2))
                .await
                .is_none()
        );
        assert!(node.get_or_create_peer(RangeId(5), None, StoreId(2)).await.is_none());
        assert!(node.replica(RangeId(5)).is_none());
        desc.replicas.push(replica(1));
        // ... and it must name the sender too.
        assert!(
            node.get_or_create_peer(RangeId(5), Some(desc.clone()), StoreId(4))
                .await
                .is_none()
        );
        let r = node
            .get_or_create_peer(RangeId(5), Some(desc), StoreId(2))
            .await
            .unwrap();
        assert!(!r.shared.is_initialized());
        node.stop_all().await;
    }

    #[tokio::test]
    async fn messages_create_at_most_the_cap_of_uninitialized_peers() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        for id in 10..10 + MAX_UNINITIALIZED_PEERS as u64 {
            let d = voters_desc(id, &[1, 2, 3]);
            assert!(
                node.get_or_create_peer(RangeId(id), Some(d), StoreId(2))
                    .await
                    .is_some(),
                "peer {id}"
            );
        }
        let over = 10 + MAX_UNINITIALIZED_PEERS as u64;
        let d = voters_desc(over, &[1, 2, 3]);
        assert!(
            node.get_or_create_peer(RangeId(over), Some(d), StoreId(2))
                .await
                .is_none()
        );
        assert_eq!(node.metrics.peers_refused.get(), 1);
        // An existing one is still found.
        assert!(node.get_or_create_peer(RangeId(10), None, StoreId(2)).await.is_some());
        node.stop_all().await;
    }

    fn voters_desc(range: u64, voters: &[u64]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: range,
            replicas: voters
                .iter()
                .map(|id| skv_proto::internal::Replica {
                    store_id: *id,
                    role: ReplicaRole::Voter as i32,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_failed_bootstrap_leaves_the_replica_uninitialized() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        // This store (1) is not among the voters: initialize fails, the error is reported,
        // and the replica stays an uninitialized peer.
        let r = node.create_replica(voters_desc(5, &[2, 3]), true).await;
        assert!(
            matches!(r, Err(CreateReplicaError::Init(InitError::NotAVoter(_)))),
            "{r:?}"
        );
        assert!(!node.replica(RangeId(5)).unwrap().shared.is_initialized());
        assert!(node.overlapping_live(RangeId(99), b"", b"").is_none());

        // A peer that already voted for a candidate (it has a vote, no data): a bootstrap
        // retry is a no-op and does not mark it initialized.
        let vote = crate::raft::encode(&crate::raft::split_init_vote()).unwrap();
        node.engine
            .raft
            .insert(crate::engine::raft_key(RangeId(6), crate::engine::TAG_VOTE), vote)
            .unwrap();
        node.create_replica(voters_desc(6, &[1, 2]), true).await.unwrap();
        assert!(!node.replica(RangeId(6)).unwrap().shared.is_initialized());

        // No voter at all: refused before anything is created.
        let r = node.create_replica(voters_desc(8, &[]), true).await;
        assert!(matches!(r, Err(CreateReplicaError::NoVoter)), "{r:?}");
        assert!(node.replica(RangeId(8)).is_none());

        // A real bootstrap is initialized, and stays so on an idempotent retry.
        node.create_replica(voters_desc(7, &[1]), true).await.unwrap();
        assert!(node.replica(RangeId(7)).unwrap().shared.is_initialized());
        node.create_replica(voters_desc(7, &[1]), true).await.unwrap();
        assert!(node.replica(RangeId(7)).unwrap().shared.is_initialized());
        node.stop_all().await;
    }

    #[tokio::test]
    async fn a_split_reapplied_inside_raft_new_does_not_wait_for_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        // What `open_locked` does: hold the lock and run `Raft::new` in the marked scope.
        let held = node.lock_creation().await;
        let inner = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            HOLDS_CREATE_LOCK.scope((), node.lock_creation_unless_held()),
        )
        .await
        .expect("deadlock: the lock holder's own task waited for the lock");
        assert!(inner.is_none());
        drop(held);
        // Any other task takes the lock normally.
        assert!(node.lock_creation_unless_held().await.is_some());
    }

    #[test]
    fn overlapping_snapshot_installs_cannot_both_claim() {
        assert!(spans_overlap(b"a", b"m", b"l", b""));
        assert!(!spans_overlap(b"a", b"m", b"m", b"z"));
        assert!(spans_overlap(b"", b"", b"x", b"y"));
        assert!(!spans_overlap(b"x", b"", b"a", b"x"));

        let dir = tempfile::tempdir().unwrap();
        let node = test_node(dir.path());
        let c1 = node.claim_install(RangeId(1), b"a", b"m").unwrap();
        // Another range overlapping the pending install is refused; a disjoint one is not;
        // the same range may claim again (the Raft library serializes its own installs).
        assert_eq!(node.claim_install(RangeId(2), b"k", b"").err(), Some(RangeId(1)));
        let c3 = node.claim_install(RangeId(3), b"m", b"z").unwrap();
        let c1b = node.claim_install(RangeId(1), b"a", b"m").unwrap();
        drop(c1);
        // Still claimed by c1b.
        assert_eq!(node.claim_install(RangeId(4), b"b", b"c").err(), Some(RangeId(1)));
        drop(c1b);
        assert!(node.claim_install(RangeId(4), b"b", b"c").is_ok());
        assert_eq!(node.claim_install(RangeId(2), b"k", b"").err(), Some(RangeId(3)));
        drop(c3);
        assert!(node.claim_install(RangeId(2), b"k", b"").is_ok());
    }
}
