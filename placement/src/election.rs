//! Leader election on a [`MetaStore`](crate::meta::MetaStore), etcd's "session + leader key" pattern:
//!
//! - each instance holds a session lease (TTL `--lease-ttl-secs`) kept alive every TTL/3 and
//!   registers `<p>/members/<name>` with it;
//! - campaigning is a transaction `if leader key absent { put leader key (with the lease) }`,
//!   retried every [`CAMPAIGN_INTERVAL`]; the leader key's value is the leader's
//!   `PlacementMember` (name + address), so followers know where to forward;
//! - the leader steps down when its keep-alives fail for 2/3 of the TTL or the key is no longer
//!   attached to its lease; resigning (clean shutdown) revokes the lease, which deletes the
//!   leader key at once, so a clean failover takes about one campaign interval and a crash
//!   about one TTL;
//! - a failed keep-alive is tried again at the campaign interval (not a third of the TTL), and
//!   failing keep-alives end the session only once etcd says the lease is gone: an etcd leader
//!   change (its leader killed) stalls keep-alives for a second or two but keeps the lease
//!   (etcd's new leader extends every lease), so an instance that stepped down meanwhile takes
//!   its key back as soon as a keep-alive goes through (issue 14, ADR 0032).
//!
//! Safety does not depend on the election: every range map write is a CAS.

use crate::layout::Layout;
use crate::meta::{DynMetaStore, MetaError, MetaResult, Op, Txn};
use prost::Message;
use skv_proto::internal::PlacementMember;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a follower tries to become leader (and refreshes its view of the leader).
pub const CAMPAIGN_INTERVAL: Duration = Duration::from_millis(200);

/// What an instance knows about leadership.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ElectionState {
    pub is_leader: bool,
    /// The current leader, when known (this instance when `is_leader`).
    pub leader: Option<PlacementMember>,
    /// Rises each time this instance becomes leader.
    pub terms_won: u64,
}

/// Tries once to take the leader key with `lease`. Returns whether this caller now holds it.
pub async fn campaign_once(store: &DynMetaStore, key: &[u8], value: &[u8], lease: i64) -> MetaResult<bool> {
    let t = Txn::new()
        .when([crate::meta::Compare::absent(key.to_vec())])
        .and_then([Op::put_with_lease(key.to_vec(), value.to_vec(), lease)]);
    if store.txn(t).await?.succeeded {
        return Ok(true);
    }
    Ok(store
        .get(key)
        .await?
        .is_some_and(|kv| kv.lease == lease && kv.value == value))
}

/// The current leader, if any.
pub async fn observe_leader(store: &DynMetaStore, layout: &Layout) -> MetaResult<Option<(PlacementMember, i64)>> {
    match store.get(&layout.leader()).await? {
        Some(kv) => {
            let m = PlacementMember::decode(kv.value.as_slice()).map_err(MetaError::other)?;
            Ok(Some((m, kv.lease)))
        }
        None => Ok(None),
    }
}

/// Gives up leadership (and the session): revokes the lease, deleting its keys.
pub async fn resign(store: &DynMetaStore, lease: i64) -> MetaResult<()> {
    store.revoke_lease(lease).await
}

/// Every live instance registered under `<p>/members/`.
pub async fn members(store: &DynMetaStore, layout: &Layout) -> MetaResult<Vec<PlacementMember>> {
    let (from, to) = crate::meta::prefix_range(&layout.members_prefix());
    let r = store.range(&from, &to, 0).await?;
    r.kvs
        .iter()
        .map(|kv| PlacementMember::decode(kv.value.as_slice()).map_err(MetaError::other))
        .collect()
}

/// Runs sessions and campaigns until `cancel`, publishing the state on `state`.
pub async fn run(
    store: DynMetaStore,
    layout: Layout,
    me: PlacementMember,
    ttl_secs: u64,
    state: watch::Sender<ElectionState>,
    cancel: CancellationToken,
) {
    let ttl = Duration::from_secs(ttl_secs.max(1));
    let keepalive_every = ttl / 3;
    let lost_after = ttl * 2 / 3;
    let value = me.encode_to_vec();
    let leader_key = layout.leader();
    let mut terms_won = 0u64;
    let set = |is_leader: bool, leader: Option<PlacementMember>, terms_won: u64| {
        state.send_if_modified(|s| {
            let new = ElectionState {
                is_leader,
                leader,
                terms_won,
            };
            if *s != new {
                *s = new;
                true
            } else {
                false
            }
        });
    };
    while !cancel.is_cancelled() {
        let lease = match store.grant_lease(ttl.as_secs() as i64).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "placement session: lease grant failed");
                set(false, None, terms_won);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        if let Err(e) = store
            .txn(Txn::new().and_then([Op::put_with_lease(layout.member(&me.name), value.clone(), lease)]))
            .await
        {
            tracing::warn!(error = %e, "placement session: member registration failed");
        }
        let mut last_ok = Instant::now();
        let mut last_ka = Instant::now();
        let mut is_leader = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    set(false, None, terms_won);
                    let _ = tokio::time::timeout(Duration::from_secs(2), resign(&store, lease)).await;
                    return;
                }
                _ = tokio::time::sleep(CAMPAIGN_INTERVAL) => {}
            }
            // Every third of the TTL, and at every tick while keep-alives fail.
            if last_ka.elapsed() >= keepalive_every || last_ok.elapsed() >= keepalive_every + CAMPAIGN_INTERVAL {
                last_ka = Instant::now();
                match tokio::time::timeout(keepalive_every, store.keep_alive(lease)).await {
                    Ok(Ok(())) => last_ok = Instant::now(),
                    Ok(Err(MetaError::LeaseNotFound(_))) => {
                        tracing::warn!(lease, "placement session lease expired");
                        break;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "placement session keep-alive failed"),
                    Err(_) => tracing::warn!("placement session keep-alive timed out"),
                }
            }
            let unsure = last_ok.elapsed() >= lost_after;
            if unsure {
                // The lease may be about to expire: lead no more, but keep the session (etcd
                // may still hold the lease; a later keep-alive tells).
                if is_leader {
                    tracing::warn!("placement session unsure (keep-alives failing): stepping down");
                    is_leader = false;
                    set(false, None, terms_won);
                }
                if last_ok.elapsed() >= ttl * 4 {
                    tracing::warn!("placement session lost (keep-alives failing)");
                    break;
                }
                continue;
            }
            if is_leader {
                // Verify at keep-alive cadence that the key is still ours.
                if last_ka.elapsed() < CAMPAIGN_INTERVAL {
                    match observe_leader(&store, &layout).await {
                        Ok(Some((_, l))) if l == lease => {}
                        Ok(_) => {
                            tracing::warn!("leader key no longer ours; stepping down");
                            is_leader = false;
                            set(false, None, terms_won);
                        }
                        Err(e) => tracing::warn!(error = %e, "leader check failed"),
                    }
                }
                continue;
            }
            match campaign_once(&store, &leader_key, &value, lease).await {
                Ok(true) => {
                    is_leader = true;
                    terms_won += 1;
                    tracing::info!(name = %me.name, address = %me.address, "became placement leader");
                    set(true, Some(me.clone()), terms_won);
                }
                Ok(false) => match observe_leader(&store, &layout).await {
                    Ok(l) => set(false, l.map(|(m, _)| m), terms_won),
                    Err(e) => tracing::debug!(error = %e, "observe leader failed"),
                },
                Err(e) => tracing::debug!(error = %e, "campaign failed"),
            }
        }
        if is_leader {
            tracing::warn!(name = %me.name, "lost placement leadership");
        }
        set(false, None, terms_won);
        let _ = tokio::time::timeout(Duration::from_secs(1), store.revoke_lease(lease)).await;
    }
}
