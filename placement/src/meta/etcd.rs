//! [`MetaStore`] on a real etcd cluster (3.4 API subset: KV range/txn, watch, leases).

use super::retry::{self, Call, Failure, Next, RetryPolicy};
use super::{
    CmpOp, CmpTarget, EventKind, KeyValue, MetaClientMetrics, MetaError, MetaResult, MetaStore, Op, RangeResult, Txn,
    TxnResult, WatchEvent, WatchStream,
};
use async_trait::async_trait;
use etcd_client as ec;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// etcd-backed metadata store. Cheap to clone.
///
/// One etcd client per member given; every call goes to the preferred member, and a
/// failure that may be transient moves the preference to the next member and tries again
/// with backoff, within [`RetryPolicy::deadline`], as [`retry::decide`] says (ADR 0032). So a
/// call survives the loss of a member, or of etcd's leader, as long as a majority runs.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    preferred: AtomicUsize,
    policy: RetryPolicy,
    metrics: MetaClientMetrics,
}

struct Member {
    endpoint: String,
    client: ec::Client,
}

/// A failed attempt: the error to return if no other attempt is made, and what it says.
struct AttemptError {
    error: MetaError,
    failure: Failure,
}

impl AttemptError {
    fn permanent(error: MetaError) -> Self {
        AttemptError {
            error,
            failure: Failure::Permanent,
        }
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`http://host:port` or `host:port`).
    pub async fn connect(endpoints: &[String]) -> MetaResult<Self> {
        Self::connect_with_tls(endpoints, None).await
    }

    /// As [`EtcdStore::connect`], over TLS when `tls` is given (the etcd CA, and placement's
    /// certificate when etcd asks for client certificates).
    pub async fn connect_with_tls(endpoints: &[String], tls: Option<ec::TlsOptions>) -> MetaResult<Self> {
        Self::connect_with_policy(endpoints, tls, RetryPolicy::default()).await
    }

    /// As [`EtcdStore::connect_with_tls`], with `policy` for retries. Connections are made
    /// lazily: a member that is down now is tried when a call needs it.
    pub async fn connect_with_policy(
        endpoints: &[String],
        tls: Option<ec::TlsOptions>,
        policy: RetryPolicy,
    ) -> MetaResult<Self> {
        if endpoints.is_empty() {
            return Err(MetaError::Other("no etcd endpoint".into()));
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let mut opts = ec::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
            if let Some(t) = &tls {
                opts = opts.with_tls(t.clone());
            }
            let client = ec::Client::connect([e.as_str()], Some(opts))
                .await
                .map_err(|err| MetaError::Other(format!("etcd endpoint {e}: {err}")))?;
            members.push(Member {
                endpoint: e.clone(),
                client,
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(0),
                policy,
                metrics: MetaClientMetrics::default(),
            }),
        })
    }

    /// The member calls go to now (its endpoint).
    pub fn preferred_endpoint(&self) -> &str {
        let i = self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len();
        &self.inner.members[i].endpoint
    }

    /// Runs `attempt` on the preferred member until it succeeds, fails for good, or the
    /// deadline passes; `resolve` decides an unguarded write whose outcome is unknown
    /// (`Some(result)`: settled by a re-read; `None`: not applied, send it again).
    async fn call<T, F, Fut, R, RFut>(&self, name: &'static str, kind: Call, attempt: F, resolve: R) -> MetaResult<T>
    where
        F: Fn(ec::Client) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
        R: Fn(ec::Client) -> RFut,
        RFut: Future<Output = Result<Option<T>, AttemptError>>,
    {
        let p = self.inner.policy;
        let started = Instant::now();
        let mut backoff = skv_rpc::Backoff::new(p.backoff_base, p.backoff_max);
        let mut resolving = false;
        loop {
            let i = self.inner.preferred.load(Ordering::Relaxed) % self.inner.members.len();
            let client = self.inner.members[i].client.clone();
            let outcome = if resolving {
                match tokio::time::timeout(p.attempt_timeout, resolve(client)).await {
                    Ok(Ok(Some(v))) => {
                        self.inner.metrics.unknown_outcome(name, "applied");
                        return Ok(v);
                    }
                    Ok(Ok(None)) => {
                        self.inner.metrics.unknown_outcome(name, "not_applied");
                        resolving = false;
                        continue;
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(timed_out(p.attempt_timeout)),
                }
            } else {
                match tokio::time::timeout(p.attempt_timeout, attempt(client)).await {
                    Ok(r) => r,
                    Err(_) => Err(timed_out(p.attempt_timeout)),
                }
            };
            let e = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            // While resolving, the re-read is itself a read.
            let k = if resolving { Call::Read } else { kind };
            let wait = backoff.next_wait();
            match retry::decide(k, e.failure, started.elapsed(), p.deadline, wait) {
                Next::Fail => {
                    if e.failure != Failure::Permanent {
                        tracing::warn!(call = name, endpoint = %self.inner.members[i].endpoint, error = %e.error,
                            attempts = backoff.attempts(), "etcd call failed on every attempt");
                    }
                    return Err(e.error);
                }
                Next::Retry { wait } => {
                    self.inner.metrics.retry(name, e.failure.label());
                    self.fail_over(i, name, &e.error);
                    tokio::time::sleep(wait).await;
                }
                Next::Resolve { wait } => {
                    self.inner.metrics.retry(name, e.failure.label());
                    self.fail_over(i, name, &e.error);
                    resolving = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Moves the preference off member `from` (unless another call already did).
    fn fail_over(&self, from: usize, call: &'static str, error: &MetaError) {
        let n = self.inner.members.len();
        if n < 2 {
            return;
        }
        let to = (from + 1) % n;
        if self
            .inner
            .preferred
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.inner.metrics.member_switches.inc();
            tracing::info!(call, from = %self.inner.members[from].endpoint, to = %self.inner.members[to].endpoint,
                error = %error, "etcd: trying the next member");
        }
    }
}

/// The resolver of calls that are never resolved (only an unguarded write is).
async fn no_resolve<T>(_client: ec::Client) -> Result<Option<T>, AttemptError> {
    Ok(None)
}

fn timed_out(after: Duration) -> AttemptError {
    AttemptError {
        error: MetaError::Other(format!("etcd attempt timed out after {after:?}")),
        failure: Failure::Interrupted,
    }
}

/// What an etcd-client error says about the request ([`retry::classify`]).
fn failure_of(e: &ec::Error) -> Failure {
    // A TLS refusal (no or a wrong client certificate, a server certificate we reject) gets
    // the same answer every time: reported at once, not retried.
    // (etcd-client's error has no `source`: its variants are looked into.)
    let tls_refused = match e {
        ec::Error::GRpcStatus(st) => std::error::Error::source(st).is_some_and(skv_rpc::tls_refused_cause),
        ec::Error::TransportError(t) => skv_rpc::tls_refused_cause(t),
        _ => false,
    };
    if tls_refused {
        return Failure::Permanent;
    }
    match e {
        ec::Error::GRpcStatus(st) => retry::classify(st.code(), st.message(), skv_rpc::never_processed(st)),
        ec::Error::TransportError(t) => {
            if skv_rpc::never_processed_cause(t) {
                Failure::NotSent
            } else {
                Failure::Interrupted
            }
        }
        ec::Error::IoError(_) | ec::Error::WatchError(_) | ec::Error::LeaseKeepAliveError(_) => Failure::Interrupted,
        _ => Failure::Permanent,
    }
}

fn attempt_error(e: ec::Error) -> AttemptError {
    let failure = failure_of(&e);
    AttemptError {
        error: MetaError::other(e),
        failure,
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

fn conv_compare(c: super::Compare) -> ec::Compare {
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
}

/// Reads every key `ops` writes (one transaction of gets, so one revision) and says whether
/// each already holds what `ops` would leave: a put's value and lease, a delete's absence.
async fn effects_present(client: ec::Client, ops: &[Op]) -> Result<Option<i64>, AttemptError> {
    let gets: Vec<ec::TxnOp> = ops
        .iter()
        .map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => ec::TxnOp::get(key.clone(), None),
        })
        .collect();
    let resp = client
        .kv_client()
        .txn(ec::Txn::new().and_then(gets))
        .await
        .map_err(attempt_error)?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut present = true;
    for (op, r) in ops.iter().zip(resp.op_responses()) {
        let ec::TxnOpResponse::Get(g) = r else {
            return Err(AttemptError::permanent(MetaError::Other(
                "etcd answered a get with another op".into(),
            )));
        };
        let kv = g.kvs().first();
        present &= match op {
            Op::Put { value, lease, .. } => kv.is_some_and(|kv| kv.value() == value.as_slice() && kv.lease() == *lease),
            Op::Delete { .. } => kv.is_none(),
        };
    }
    Ok(present.then_some(revision))
}

#[async_trait]
impl MetaStore for EtcdStore {
    async fn range(&self, start: &[u8], end: &[u8], limit: usize) -> MetaResult<RangeResult> {
        self.call(
            "range",
            Call::Read,
            |client| async move {
                let opts = ec::GetOptions::new().with_range(end.to_vec()).with_limit(limit as i64);
                let resp = client
                    .kv_client()
                    .get(start.to_vec(), Some(opts))
                    .await
                    .map_err(attempt_error)?;
                Ok(RangeResult {
                    kvs: resp.kvs().iter().map(conv_kv).collect(),
                    more: resp.more(),
                    revision: resp.header().map_or(0, |h| h.revision()),
                })
            },
            no_resolve,
        )
        .await
    }

    async fn txn(&self, txn: Txn) -> MetaResult<TxnResult> {
        let kind = Call::of_txn(txn.compares.len(), txn.success.len() + txn.failure.len());
        let txn = &txn;
        self.call(
            "txn",
            kind,
            |client| async move {
                let t = ec::Txn::new()
                    .when(txn.compares.iter().cloned().map(conv_compare).collect::<Vec<_>>())
                    .and_then(txn.success.iter().cloned().map(conv_write).collect::<Vec<_>>())
                    .or_else(txn.failure.iter().cloned().map(conv_write).collect::<Vec<_>>());
                let resp = client.kv_client().txn(t).await.map_err(|e| {
                    if is_lease_not_found(&e) {
                        AttemptError::permanent(MetaError::LeaseNotFound(0))
                    } else {
                        attempt_error(e)
                    }
                })?;
                Ok(TxnResult {
                    succeeded: resp.succeeded(),
                    revision: resp.header().map_or(0, |h| h.revision()),
                })
            },
            // Only an unguarded write is resolved (retry::decide): it has no failure branch.
            |client| async move {
                Ok(effects_present(client, &txn.success).await?.map(|revision| TxnResult {
                    succeeded: true,
                    revision,
                }))
            },
        )
        .await
    }

    async fn watch(&self, start: &[u8], end: &[u8], from: i64) -> MetaResult<WatchStream> {
        let (sender, responses) = self
            .call(
                "watch",
                Call::Read,
                |client| async move {
                    let mut opts = ec::WatchOptions::new().with_range(end.to_vec());
                    if from > 0 {
                        opts = opts.with_start_revision(from);
                    }
                    let stream = client
                        .watch_client()
                        .watch(start.to_vec(), Some(opts))
                        .await
                        .map_err(attempt_error)?;
                    Ok(stream.split())
                },
                no_resolve,
            )
            .await?;
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
        self.call(
            "grant_lease",
            Call::Grant,
            |client| async move {
                let resp = client
                    .lease_client()
                    .grant(ttl_secs, None)
                    .await
                    .map_err(attempt_error)?;
                Ok(resp.id())
            },
            no_resolve,
        )
        .await
    }

    async fn keep_alive(&self, lease: i64) -> MetaResult<()> {
        self.call(
            "keep_alive",
            Call::Read,
            |client| async move {
                let mut l = client.lease_client();
                // Opening the stream sends one keep-alive and checks the answer's TTL. The
                // client reports a TTL of 0 (lease gone) and a failed send with the same error
                // variant, so that case is told apart by asking for the lease's TTL (-1: gone).
                let gone = || AttemptError::permanent(MetaError::LeaseNotFound(lease));
                match l.keep_alive(lease).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_lease_not_found(&e) => Err(gone()),
                    Err(e @ ec::Error::LeaseKeepAliveError(_)) => match l.time_to_live(lease, None).await {
                        Ok(ttl) if ttl.ttl() <= 0 => Err(gone()),
                        Err(e) if is_lease_not_found(&e) => Err(gone()),
                        _ => Err(attempt_error(e)),
                    },
                    Err(e) => Err(attempt_error(e)),
                }
            },
            no_resolve,
        )
        .await
    }

    async fn revoke_lease(&self, lease: i64) -> MetaResult<()> {
        self.call(
            "revoke_lease",
            Call::Read,
            |client| async move {
                match client.lease_client().revoke(lease).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_lease_not_found(&e) => Ok(()),
                    Err(e) => Err(attempt_error(e)),
                }
            },
            no_resolve,
        )
        .await
    }

    async fn compact(&self, revision: i64) -> MetaResult<()> {
        self.call(
            "compact",
            Call::Read,
            |client| async move {
                match client.kv_client().compact(revision, None).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_compacted(&e) => Ok(()),
                    Err(e) => Err(attempt_error(e)),
                }
            },
            no_resolve,
        )
        .await
    }

    fn client_metrics(&self) -> Option<MetaClientMetrics> {
        Some(self.inner.metrics.clone())
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }
}
