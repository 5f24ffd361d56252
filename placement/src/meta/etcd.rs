//! [`MetaStore`] on a real etcd cluster (3.4 API subset: KV range/txn, watch, leases).

use super::{
    CmpOp, CmpTarget, EventKind, KeyValue, MetaError, MetaResult, MetaStore, Op, RangeResult, Txn, TxnResult,
    WatchEvent, WatchStream,
};
use async_trait::async_trait;
use etcd_client as ec;
use std::time::Duration;

/// etcd-backed metadata store. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: ec::Client,
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port` or `host:port`).
    pub async fn connect(endpoints: &[String]) -> MetaResult<Self> {
        Self::connect_with_tls(endpoints, None).await
    }

    /// As [`EtcdStore::connect`], over TLS when `tls` is given (the etcd CA, and placement's
    /// certificate when etcd asks for client certificates).
    pub async fn connect_with_tls(endpoints: &[String], tls: Option<ec::TlsOptions>) -> MetaResult<Self> {
        let mut opts = ec::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(t) = tls {
            opts = opts.with_tls(t);
        }
        let client = ec::Client::connect(endpoints, Some(opts))
            .await
            .map_err(MetaError::other)?;
        Ok(Self { client })
    }
}

fn conv_kv(kv: &ec::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn conv_op(op: CmpOp) -> ec::CompareOp {
    match op {
        CmpOp::Equal => ec::CompareOp::Equal,
        CmpOp::NotEqual => ec::CompareOp::NotEqual,
        CmpOp::Less => ec::CompareOp::Less,
        CmpOp::Greater => ec::CompareOp::Greater,
    }
}

fn conv_write(op: Op) -> ec::TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| ec::PutOptions::new().with_lease(lease));
            ec::TxnOp::put(key, value, opts)
        }
        Op::Delete { key } => ec::TxnOp::delete(key, None),
    }
}

/// etcd answers NOT_FOUND for a missing lease (`ErrGRPCLeaseNotFound`), and nothing else
/// placement calls answers NOT_FOUND: a missing key is an empty result, not an error.
fn is_lease_not_found(e: &ec::Error) -> bool {
    matches!(e, ec::Error::GRpcStatus(st) if st.code() == tonic::Code::NotFound)
}

/// etcd answers OUT_OF_RANGE to a compaction at or below the compacted revision
/// (`ErrGRPCCompacted`), or above the current one (`ErrGRPCFutureRev`), which placement never
/// asks for: it compacts below a revision it has read.
fn is_compacted(e: &ec::Error) -> bool {
    matches!(e, ec::Error::GRpcStatus(st) if st.code() == tonic::Code::OutOfRange)
}

#[async_trait]
impl MetaStore for EtcdStore {
    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> MetaResult<RangeResult> {
        let mut kv = self.client.kv_client();
        let opts = ec::GetOptions::new().with_range(end.to_vec()).with_limit(limit as i64);
        let resp = kv.get(start.to_vec(), Some(opts)).await.map_err(MetaError::other)?;
        Ok(RangeResult {
            kvs: resp.kvs().iter().map(conv_kv).collect(),
            more: resp.more(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn txn(&self, txn: Txn) -> MetaResult<TxnResult> {
        let mut kv = self.client.kv_client();
        let compares: Vec<ec::Compare> = txn
            .compares
            .into_iter()
            .map(|c| {
                let cmp = match c.target {
                    CmpTarget::Value(v) => ec::Compare::value(c.key, conv_op(c.op), v),
                    CmpTarget::ModRevision(r) => ec::Compare::mod_revision(c.key, conv_op(c.op), r),
                    CmpTarget::CreateRevision(r) => ec::Compare::create_revision(c.key, conv_op(c.op), r),
                    CmpTarget::Version(r) => ec::Compare::version(c.key, conv_op(c.op), r),
                };
                if c.range_end.is_empty() {
                    cmp
                } else {
                    cmp.with_range(c.range_end)
                }
            })
            .collect();
        let t = ec::Txn::new()
            .when(compares)
            .and_then(txn.success.into_iter().map(conv_write).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(conv_write).collect::<Vec<_>>());
        let resp = kv.txn(t).await.map_err(|e| {
            if is_lease_not_found(&e) {
                MetaError::LeaseNotFound(0)
            } else {
                MetaError::other(e)
            }
        })?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn watch(&self, start: &[u8], end: &[u8], from: i64) -> MetaResult<WatchStream> {
        let mut w = self.client.watch_client();
        let mut opts = ec::WatchOptions::new().with_range(end.to_vec());
        if from > 0 {
            opts = opts.with_start_revision(from);
        }
        let stream = w.watch(start.to_vec(), Some(opts)).await.map_err(MetaError::other)?;
        let (sender, responses) = stream.split();
        let s = futures::stream::unfold((sender, responses, false), |(sender, mut responses, done)| async move {
            if done {
                return None;
            }
            loop {
                match responses.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let err = if resp.compact_revision() > 0 {
                                MetaError::Compacted(resp.compact_revision())
                            } else {
                                MetaError::Other(format!("watch canceled: {}", resp.cancel_reason()))
                            };
                            return Some((Err(err), (sender, responses, true)));
                        }
                        if resp.events().is_empty() {
                            continue;
                        }
                        let events = resp
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let kv = e.kv()?;
                                let kind = match e.event_type() {
                                    ec::EventType::Put => EventKind::Put,
                                    ec::EventType::Delete => EventKind::Delete,
                                };
                                Some(WatchEvent { kind, kv: conv_kv(kv) })
                            })
                            .collect();
                        return Some((Ok(events), (sender, responses, false)));
                    }
                    Ok(None) => {
                        return Some((
                            Err(MetaError::Other("watch stream ended".into())),
                            (sender, responses, true),
                        ));
                    }
                    Err(e) => return Some((Err(MetaError::other(e)), (sender, responses, true))),
                }
            }
        });
        Ok(Box::pin(s))
    }

    async fn grant_lease(&self, ttl_secs: i64) -> MetaResult<i64> {
        let mut l = self.client.lease_client();
        let resp = l.grant(ttl_secs, None).await.map_err(MetaError::other)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: i64) -> MetaResult<()> {
        let mut l = self.client.lease_client();
        // Opening the stream sends one keep-alive and checks the answer's TTL. The client
        // reports a TTL of 0 (lease gone) and a failed send with the same error variant, so
        // that case is told apart by asking for the lease's TTL (-1: gone).
        match l.keep_alive(lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(MetaError::LeaseNotFound(lease)),
            Err(e @ ec::Error::LeaseKeepAliveError(_)) => match l.time_to_live(lease, None).await {
                Ok(ttl) if ttl.ttl() <= 0 => Err(MetaError::LeaseNotFound(lease)),
                Err(e) if is_lease_not_found(&e) => Err(MetaError::LeaseNotFound(lease)),
                _ => Err(MetaError::other(e)),
            },
            Err(e) => Err(MetaError::other(e)),
        }
    }

    async fn revoke_lease(&self, lease: i64) -> MetaResult<()> {
        let mut l = self.client.lease_client();
        match l.revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(MetaError::other(e)),
        }
    }

    async fn compact(&self, revision: i64) -> MetaResult<()> {
        let mut kv = self.client.kv_client();
        match kv.compact(revision, None).await {
            Ok(_) => Ok(()),
            Err(e) if is_compacted(&e) => Ok(()),
            Err(e) => Err(MetaError::other(e)),
        }
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}
