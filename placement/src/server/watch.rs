//! The WatchRanges stream.

use super::{Shared, now_ms};
use crate::error::PlacementError;
use crate::meta::EventKind;
use crate::model::effective;
use futures::StreamExt;
use prost::Message;
use skv_common::ids::RangeId;
use skv_proto::internal::*;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// Feeds one WatchRanges stream: the full map, then deltas from a metadata watch.
/// Restarts with a new full message if the watch breaks (e.g. compaction).
pub(super) async fn watch_ranges_task(s: Arc<Shared>, tx: mpsc::Sender<Result<WatchRangesResponse, Status>>) {
    let layout = s.meta.layout.clone();
    let (root_from, root_to) = crate::meta::prefix_range(&layout.root());
    let stores_prefix = layout.stores_prefix();
    loop {
        let (ranges, rev) = match s.meta.all_ranges().await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let stores = match s.current_stores().await {
            Ok(st) => st,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let mut known: HashMap<Vec<u8>, RangeId> = ranges.iter().map(|r| (r.key.clone(), r.range_id())).collect();
        let full = WatchRangesResponse {
            updated: ranges.into_iter().map(|r| r.info).collect(),
            removed_range_ids: vec![],
            stores,
            full: true,
        };
        if tx.send(Ok(full)).await.is_err() {
            return;
        }
        let mut w = match s.meta.store.watch(&root_from, &root_to, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                let _ = tx.send(Err(PlacementError::from(e).into())).await;
                return;
            }
        };
        loop {
            let batch = tokio::select! {
                _ = s.cancel.cancelled() => return,
                _ = tx.closed() => return,
                b = w.next() => b,
            };
            let events = match batch {
                Some(Ok(ev)) => ev,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "range watch broke; resending the full map");
                    break;
                }
                None => break,
            };
            let mut delta = WatchRangesResponse::default();
            let mut put_ids = HashSet::new();
            let mut deleted = Vec::new();
            let now = now_ms();
            for ev in events {
                if layout.range_end_of(&ev.kv.key).is_some() {
                    match ev.kind {
                        EventKind::Put => {
                            if let Ok(info) = RangeInfo::decode(ev.kv.value.as_slice())
                                && let Some(d) = &info.descriptor
                            {
                                let id = RangeId(d.range_id);
                                // A record key taken over by another range (a split's right
                                // half, a merge) means the old range may be gone.
                                if let Some(old) = known.insert(ev.kv.key.clone(), id)
                                    && old != id
                                {
                                    deleted.push(old);
                                }
                                put_ids.insert(id);
                                delta.updated.push(info);
                            }
                        }
                        EventKind::Delete => {
                            if let Some(id) = known.remove(&ev.kv.key) {
                                deleted.push(id);
                            }
                        }
                    }
                } else if ev.kv.key.starts_with(&stores_prefix)
                    && ev.kind == EventKind::Put
                    && let Ok(st) = StoreInfo::decode(ev.kv.value.as_slice())
                {
                    delta.stores.push(effective(st, now, s.config.store_down_after_ms));
                }
            }
            delta.removed_range_ids = deleted
                .into_iter()
                .filter(|id| !put_ids.contains(id))
                .map(RangeId::get)
                .collect();
            if delta.updated.is_empty() && delta.removed_range_ids.is_empty() && delta.stores.is_empty() {
                continue;
            }
            if tx.send(Ok(delta)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
