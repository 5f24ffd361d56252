//! The public `skv.v1.Kv` service: auth, namespace, limits, then routing.

use crate::auth::{Claims, Role, Verifier};
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::quota::{Permit, Quotas};
use crate::retry::Kind;
use crate::router::{OpenScan, Router};
use futures::{StreamExt, TryStreamExt};
use skv_common::limits::{MAX_KEY_LEN, check_key, check_value};
use skv_proto::internal::{
    Condition, StoreBatchGetRequest, StoreBatchWriteRequest, StoreGetRequest, StoreScanRequest, StoreWriteOp,
    StoreWriteRequest, condition, store_write_op, store_write_request,
};
use skv_proto::v1::kv_server::Kv;
use skv_proto::v1::{
    BatchGetRequest, BatchGetResponse, BatchWriteRequest, BatchWriteResponse, CompareAndSwapRequest,
    CompareAndSwapResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyValue, PutRequest, PutResponse,
    ScanRequest, ScanResponse, WriteResult, write_op,
};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field, warn};

pub use skv_common::limits::{MAX_BATCH_OPS, MAX_BATCH_RESPONSE_BYTES};
/// How many ranges of one batch are asked at once.
const BATCH_PARALLELISM: usize = 16;
/// Deadline of one range's scan stream when the client sets none.
const SCAN_RANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a scan that reached its limit waits for its storenode stream's end.
const SCAN_DRAIN: Duration = Duration::from_millis(100);
/// Range pieces of one scan read ahead of the client (one storenode stream at a time).
const SCAN_LOOKAHEAD: usize = 4;
/// Target size of one streamed `ScanResponse`.
const SCAN_CHUNK_BYTES: usize = 1024 * 1024;
/// Longest deadline a client may ask for.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// Settings of the Kv service.
#[derive(Clone, Debug)]
pub struct ServiceLimits {
    pub max_value_len: usize,
    pub request_timeout: Duration,
}

struct Inner {
    router: Arc<Router>,
    verifier: Arc<Verifier>,
    metrics: Metrics,
    limits: ServiceLimits,
    quotas: Quotas,
}

/// The `skv.v1.Kv` implementation.
#[derive(Clone)]
pub struct KvService {
    inner: Arc<Inner>,
}

struct Ctx {
    claims: Claims,
    ns: Namespace,
}

fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    r
}

fn check_bound(b: &[u8]) -> Result<(), Status> {
    if b.len() > MAX_KEY_LEN {
        return Err(Status::invalid_argument(format!(
            "scan bound is {} bytes, the limit is {MAX_KEY_LEN}",
            b.len()
        )));
    }
    Ok(())
}

/// A scan whose range stream broke after it delivered keys: it cannot go on from the
/// same point, so the client is told where to resume.
fn interrupted(range: skv_common::RangeId, ns: &Namespace, last: Option<&[u8]>, why: &str) -> Status {
    let after = last.and_then(|k| ns.strip(k)).map_or_else(
        || "the start".to_string(),
        |k| format!("key {:?}", String::from_utf8_lossy(k)),
    );
    Status::unavailable(format!(
        "scan interrupted in {range} ({why}); the keys up to {after} were returned: resume after it"
    ))
}

fn precondition_failed(current: u64) -> Status {
    Status::failed_precondition(format!("condition not met: the key's current version is {current}"))
}

type ScanStream = Pin<Box<dyn futures::Stream<Item = Result<ScanResponse, Status>> + Send>>;

impl KvService {
    pub fn new(
        router: Arc<Router>,
        verifier: Arc<Verifier>,
        metrics: Metrics,
        quotas: Quotas,
        limits: ServiceLimits,
    ) -> Self {
        KvService {
            inner: Arc::new(Inner {
                router,
                verifier,
                metrics,
                limits,
                quotas,
            }),
        }
    }

    /// The caller's deadline: `grpc-timeout` (minus a small margin so that we answer
    /// before the client gives up), or `--request-timeout-ms`.
    fn deadline(&self, md: &MetadataMap) -> Instant {
        let now = Instant::now();
        match md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(skv_rpc::parse_grpc_timeout)
        {
            Some(t) => {
                let t = t.min(MAX_CLIENT_TIMEOUT);
                let margin = (t / 20).clamp(Duration::from_millis(2), Duration::from_millis(100));
                now + t.saturating_sub(margin)
            }
            None => now + self.inner.limits.request_timeout,
        }
    }

    fn client_deadline(&self, md: &MetadataMap) -> Option<Instant> {
        md.get("grpc-timeout")?;
        Some(self.deadline(md))
    }

    fn authenticate(&self, rpc: &'static str, md: &MetadataMap, needed: Role) -> Result<Ctx, Status> {
        let claims = match self.inner.verifier.authorize(md, needed) {
            Ok(c) => c,
            Err(e) => {
                self.inner.metrics.auth_denied(e.reason());
                warn!(rpc, reason = e.reason(), "request denied");
                return Err(e.to_status());
            }
        };
        let ns = Namespace::new(claims.ns.as_bytes()).map_err(|_| {
            self.inner.metrics.auth_denied("bad_namespace");
            Status::unauthenticated("token namespace invalid")
        })?;
        // The tenant is its namespace; both names, for log and trace queries (issue 13).
        let span = Span::current();
        span.record("tenant", field::display(&claims.ns));
        span.record("namespace", field::display(&claims.ns));
        Ok(Ctx { claims, ns })
    }

    /// The tenant's quotas (rate, then concurrency); the permit holds its slot.
    fn admit(&self, ctx: &Ctx) -> Result<Permit, Status> {
        self.inner.quotas.admit(&ctx.claims.ns).map_err(|r| r.to_status())
    }

    fn finish<T>(&self, rpc: &'static str, started: Instant, r: Result<T, Status>) -> Result<T, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.inner.metrics.observe(rpc, code, started.elapsed());
        r
    }

    async fn read(&self, key: Vec<u8>, stale_ok: bool, deadline: Instant) -> Result<GetResponse, Status> {
        let kind = if stale_ok { Kind::StaleRead } else { Kind::Read };
        let (resp, _) = self
            .inner
            .router
            .call(&key, kind, deadline, |mut c, route, t| {
                let r = request(
                    StoreGetRequest {
                        header: Some(route.header()),
                        key: key.clone(),
                        stale_ok,
                    },
                    t,
                );
                async move { c.get(r).await }
            })
            .await?;
        Ok(GetResponse {
            found: resp.found,
            value: resp.value,
            version: resp.version,
        })
    }

    async fn write(
        &self,
        key: Vec<u8>,
        op: store_write_request::Op,
        version_equals: Option<u64>,
        deadline: Instant,
    ) -> Result<skv_proto::internal::StoreWriteResponse, Status> {
        let condition = version_equals.map(|v| Condition {
            kind: Some(condition::Kind::VersionEquals(v)),
        });
        let (resp, _) = self
            .inner
            .router
            .call(&key, Kind::Write, deadline, |mut c, route, t| {
                let r = request(
                    StoreWriteRequest {
                        header: Some(route.header()),
                        key: key.clone(),
                        op: Some(op.clone()),
                        condition,
                    },
                    t,
                );
                async move { c.write(r).await }
            })
            .await?;
        Ok(resp)
    }

    async fn do_get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("Get", req.metadata(), Role::Read)?;
        let req = req.into_inner();
        check_key(&req.key)?;
        let _permit = self.admit(&ctx)?;
        let resp = self.read(ctx.ns.encode(&req.key), req.stale_ok, deadline).await?;
        Ok(Response::new(resp))
    }

    async fn do_put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("Put", req.metadata(), Role::Write)?;
        let req = req.into_inner();
        check_key(&req.key)?;
        check_value(&req.value, self.inner.limits.max_value_len)?;
        let cond = match (req.if_absent, req.if_version) {
            (true, Some(v)) if v != 0 => {
                return Err(Status::invalid_argument(
                    "if_absent and if_version are mutually exclusive",
                ));
            }
            (true, _) => Some(0),
            (false, v) => v,
        };
        let _permit = self.admit(&ctx)?;
        let resp = self
            .write(
                ctx.ns.encode(&req.key),
                store_write_request::Op::Put(req.value),
                cond,
                deadline,
            )
            .await?;
        if !resp.succeeded {
            return Err(precondition_failed(resp.version));
        }
        Ok(Response::new(PutResponse { version: resp.version }))
    }

    async fn do_delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("Delete", req.metadata(), Role::Write)?;
        let req = req.into_inner();
        check_key(&req.key)?;
        let _permit = self.admit(&ctx)?;
        let resp = self
            .write(
                ctx.ns.encode(&req.key),
                store_write_request::Op::Delete(true),
                req.if_version,
                deadline,
            )
            .await?;
        if !resp.succeeded {
            return Err(precondition_failed(resp.version));
        }
        Ok(Response::new(DeleteResponse { deleted: resp.existed }))
    }

    async fn do_cas(&self, req: Request<CompareAndSwapRequest>) -> Result<Response<CompareAndSwapResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("CompareAndSwap", req.metadata(), Role::Write)?;
        let req = req.into_inner();
        check_key(&req.key)?;
        check_value(&req.value, self.inner.limits.max_value_len)?;
        let _permit = self.admit(&ctx)?;
        let resp = self
            .write(
                ctx.ns.encode(&req.key),
                store_write_request::Op::Put(req.value),
                Some(req.expected_version),
                deadline,
            )
            .await?;
        Ok(Response::new(CompareAndSwapResponse {
            succeeded: resp.succeeded,
            version: resp.version,
        }))
    }

    async fn do_scan(&self, req: Request<ScanRequest>, started: Instant) -> Result<Response<ScanStream>, Status> {
        let client_deadline = self.client_deadline(req.metadata());
        let ctx = self.authenticate("Scan", req.metadata(), Role::Read)?;
        let req = req.into_inner();
        check_bound(&req.start)?;
        check_bound(&req.end)?;
        let Some((start, end)) = ctx.ns.scan_bounds(&req.start, &req.end) else {
            self.inner.metrics.observe("Scan", tonic::Code::Ok, started.elapsed());
            return Ok(Response::new(Box::pin(futures::stream::empty())));
        };
        let permit = self.admit(&ctx)?;
        let (tx, rx) = mpsc::channel::<Result<ScanResponse, Status>>(4);
        let this = self.clone();
        let span = Span::current();
        tokio::spawn(
            async move {
                let _permit = permit;
                let r = this
                    .scan_task(&ctx.ns, start, end, req.limit, client_deadline, &tx)
                    .await;
                let code = match &r {
                    Ok(()) => tonic::Code::Ok,
                    Err(s) => s.code(),
                };
                this.inner.metrics.observe("Scan", code, started.elapsed());
                if let Err(s) = r {
                    // Bounded: a client that stopped reading must not pin this task.
                    let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(s))).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// Streams `[start, end)` in key order. The interval is cut at the cached range
    /// boundaries into pieces, fetched one storenode stream at a time: the next piece
    /// opens only when the previous one has been read from its storenode (its last pages
    /// wait in a small channel), so no storenode holds a snapshot for a piece that sits
    /// queued behind a slow one. Pages are forwarded strictly in order and the limit is
    /// applied here. Every send to the client is bounded, so a client that stops reading
    /// frees its tenant slot.
    async fn scan_task(
        &self,
        ns: &Namespace,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: u32,
        client_deadline: Option<Instant>,
        tx: &mpsc::Sender<Result<ScanResponse, Status>>,
    ) -> Result<(), Status> {
        let mut remaining: u64 = if limit == 0 { u64::MAX } else { u64::from(limit) };
        let mut intervals = self.inner.router.plan_intervals(&start, &end).into_iter();
        let mut queue: VecDeque<mpsc::Receiver<Result<Vec<KeyValue>, Status>>> = VecDeque::new();
        // Dropping the set (early return, client gone) aborts the fetcher.
        let mut fetchers = JoinSet::new();
        let mut out: Vec<KeyValue> = Vec::new();
        let mut out_bytes = 0usize;
        let send = |kvs: Vec<KeyValue>| async move {
            let by = client_deadline.unwrap_or_else(|| Instant::now() + SCAN_RANGE_TIMEOUT);
            match tokio::time::timeout_at(by, tx.send(Ok(ScanResponse { kvs }))).await {
                Ok(Ok(())) => Ok(true),
                Ok(Err(_)) => Ok(false), // client went away
                Err(_) => Err(Status::deadline_exceeded("the client stopped reading the scan")),
            }
        };
        loop {
            while fetchers.try_join_next().is_some() {}
            if fetchers.is_empty()
                && queue.len() < SCAN_LOOKAHEAD
                && let Some((s, e)) = intervals.next()
            {
                let (ptx, prx) = mpsc::channel(2);
                fetchers.spawn(
                    self.clone()
                        .scan_interval(ns.clone(), s, e, remaining, client_deadline, ptx)
                        .instrument(Span::current()),
                );
                queue.push_back(prx);
            }
            let Some(rx) = queue.front_mut() else { break };
            let next = tokio::select! {
                _ = tx.closed() => return Ok(()), // client went away
                // The running piece was read whole: open the next one.
                Some(_) = fetchers.join_next(), if !fetchers.is_empty() => continue,
                n = rx.recv() => n,
            };
            match next {
                Some(Ok(page)) => {
                    for kv in page {
                        out_bytes += kv.key.len() + kv.value.len() + 16;
                        out.push(kv);
                        remaining -= 1;
                        if out_bytes >= SCAN_CHUNK_BYTES || remaining == 0 {
                            out_bytes = 0;
                            if !send(std::mem::take(&mut out)).await? {
                                return Ok(());
                            }
                        }
                        if remaining == 0 {
                            // The running piece hit the same limit and is reading its
                            // stream's end: let it, rather than cancel the stream.
                            let _ = tokio::time::timeout(SCAN_DRAIN, fetchers.join_next()).await;
                            return Ok(());
                        }
                    }
                }
                Some(Err(s)) => {
                    // What was received is the client's before the error (which names the
                    // last key returned as the place to resume).
                    if !out.is_empty() {
                        send(std::mem::take(&mut out)).await?;
                    }
                    return Err(s);
                }
                None => {
                    queue.pop_front();
                }
            }
        }
        if !out.is_empty() {
            send(out).await?;
        }
        Ok(())
    }

    /// Fetches `[start, end)` page by page into `tx` (user keys, at most `limit`).
    /// After any routing change (split, merge, move) it re-locates from the key after
    /// the last one returned, so the result stays complete and ordered.
    async fn scan_interval(
        self,
        ns: Namespace,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: u64,
        client_deadline: Option<Instant>,
        tx: mpsc::Sender<Result<Vec<KeyValue>, Status>>,
    ) {
        if let Err(s) = self
            .scan_interval_inner(&ns, start, end, limit, client_deadline, &tx)
            .await
        {
            let _ = tx.send(Err(s)).await;
        }
    }

    /// One storenode stream per range piece: each range's part is read from one
    /// consistent point (one ReadIndex, one engine snapshot on the storenode). When the
    /// range map changed (split, merge, move) before a piece's stream opened, it is
    /// re-located and retried; a stream that breaks after it delivered keys cannot be
    /// resumed at the same point, so the scan fails with UNAVAILABLE naming where to
    /// resume, rather than silently mixing two points in one range.
    async fn scan_interval_inner(
        &self,
        ns: &Namespace,
        start: Vec<u8>,
        end: Vec<u8>,
        limit: u64,
        client_deadline: Option<Instant>,
        tx: &mpsc::Sender<Result<Vec<KeyValue>, Status>>,
    ) -> Result<(), Status> {
        let mut cursor = start;
        let mut remaining = limit;
        loop {
            let deadline = client_deadline.unwrap_or_else(|| Instant::now() + SCAN_RANGE_TIMEOUT);
            let want = u32::try_from(remaining).unwrap_or(0); // 0 = no limit
            let cur = cursor.clone();
            let (open, route) = self
                .inner
                .router
                .call(&cur, Kind::Read, deadline, |mut c, route, _attempt| {
                    let sub_end = if !route.end.is_empty() && route.end < end {
                        route.end.clone()
                    } else {
                        end.clone()
                    };
                    // The stream may outlive the opening attempt: it gets the whole deadline.
                    let r = request(
                        StoreScanRequest {
                            header: Some(route.header()),
                            start: cur.clone(),
                            end: sub_end,
                            limit: want,
                        },
                        deadline.saturating_duration_since(Instant::now()),
                    );
                    async move {
                        let mut stream = c.scan(r).await?.into_inner();
                        let first = stream.message().await?;
                        let rest = first.is_some().then_some(stream);
                        Ok(Response::new(OpenScan {
                            first: first.unwrap_or_default(),
                            rest,
                        }))
                    }
                })
                .await?;
            let OpenScan { first, mut rest } = open;
            let mut delivered = 0u64;
            let mut retry_piece = false;
            let mut last: Option<Vec<u8>> = None;
            let mut message = Some(first);
            while let Some(m) = message.take() {
                let mut out = Vec::with_capacity(m.kvs.len());
                for kv in m.kvs {
                    // Defence in depth: only keys of this namespace, inside the request, in order.
                    if kv.key < cursor || kv.key >= end || last.as_ref().is_some_and(|l| &kv.key <= l) {
                        warn!(range_id = %route.range_id, "storenode returned a key outside the scan interval; dropped");
                        continue;
                    }
                    let Some(user_key) = ns.strip(&kv.key) else {
                        warn!(range_id = %route.range_id, "storenode returned a key outside the namespace; dropped");
                        continue;
                    };
                    out.push(KeyValue {
                        key: user_key.to_vec(),
                        value: kv.value,
                        version: kv.version,
                    });
                    last = Some(kv.key);
                    remaining = remaining.saturating_sub(1);
                    if remaining == 0 {
                        break;
                    }
                }
                delivered += out.len() as u64;
                if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                    return Ok(()); // the consumer stopped (limit reached or client gone)
                }
                if remaining == 0 {
                    // The storenode stops at the same limit: read its end rather than
                    // cancel the stream (every cancel costs HTTP/2 a reset).
                    if let Some(stream) = rest.as_mut() {
                        let drain = async { while let Ok(Some(_)) = stream.message().await {} };
                        let _ = tokio::time::timeout(SCAN_DRAIN, drain).await;
                    }
                    return Ok(());
                }
                let Some(stream) = rest.as_mut() else { break };
                let next = tokio::time::timeout_at(deadline, stream.message()).await;
                message = match next {
                    Ok(Ok(m)) => m,
                    // Nothing of this piece reached the client yet: open it again.
                    Ok(Err(_)) if delivered == 0 => {
                        retry_piece = true;
                        break;
                    }
                    Ok(Err(e)) => return Err(interrupted(route.range_id, ns, last.as_deref(), e.message())),
                    Err(_) => return Err(Status::deadline_exceeded("scan deadline reached")),
                };
                if message.as_ref().is_some_and(|m| m.routing_error.is_some()) {
                    // Only a first message may carry one; a storenode that breaks that rule
                    // must not make us mix points.
                    return Err(interrupted(
                        route.range_id,
                        ns,
                        last.as_deref(),
                        "routing error mid-stream",
                    ));
                }
            }
            if retry_piece {
                continue;
            }
            if route.end.is_empty() || route.end >= end {
                return Ok(());
            }
            cursor = route.end.clone();
        }
    }

    /// Reads `keys` (internal keys), one storenode call per range; results in key order.
    async fn batch_read(&self, keys: &[Vec<u8>], deadline: Instant) -> Result<Vec<GetResponse>, Status> {
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let groups = self.inner.router.group_by_range(&refs);
        let mut results: Vec<GetResponse> = vec![GetResponse::default(); keys.len()];
        let mut done = futures::stream::iter(groups.into_iter().map(|g| self.batch_read_group(keys, g, deadline)))
            .buffer_unordered(BATCH_PARALLELISM);
        let mut bytes = 0usize;
        while let Some(out) = done.try_next().await? {
            for (i, r) in out {
                bytes += r.value.len() + 16;
                if bytes > MAX_BATCH_RESPONSE_BYTES {
                    return Err(Status::resource_exhausted(format!(
                        "batch response would exceed {MAX_BATCH_RESPONSE_BYTES} bytes; ask for fewer keys"
                    )));
                }
                results[i] = r;
            }
        }
        Ok(results)
    }

    /// The keys at `pending` (indexes into `keys`), one call per range: each call sends
    /// the pending keys inside the range that holds the first one, so every round makes
    /// progress even when the range map changed.
    async fn batch_read_group(
        &self,
        keys: &[Vec<u8>],
        mut pending: Vec<usize>,
        deadline: Instant,
    ) -> Result<Vec<(usize, GetResponse)>, Status> {
        let mut out = Vec::with_capacity(pending.len());
        while let Some(&first) = pending.first() {
            let (resp, route) = self
                .inner
                .router
                .call(&keys[first], Kind::Read, deadline, |mut c, route, t| {
                    let r = request(
                        StoreBatchGetRequest {
                            header: Some(route.header()),
                            keys: pending
                                .iter()
                                .filter(|&&i| route.contains(&keys[i]))
                                .map(|&i| keys[i].clone())
                                .collect(),
                            stale_ok: false,
                        },
                        t,
                    );
                    async move { c.batch_get(r).await }
                })
                .await?;
            let (sent, rest): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| route.contains(&keys[i]));
            if resp.results.len() != sent.len() {
                return Err(Status::internal(format!(
                    "storenode answered {} results for {} keys",
                    resp.results.len(),
                    sent.len()
                )));
            }
            for (i, r) in sent.into_iter().zip(resp.results) {
                out.push((
                    i,
                    GetResponse {
                        found: r.found,
                        value: r.value,
                        version: r.version,
                    },
                ));
            }
            pending = rest;
        }
        Ok(out)
    }

    /// Applies `ops` (internal keys), one storenode call (one Raft proposal) per range;
    /// one result per op, in request order. Ops on one key stay in request order: they
    /// always go to the same range in the same call.
    async fn batch_apply(&self, ops: Vec<(Vec<u8>, store_write_op::Op)>, deadline: Instant) -> Vec<WriteResult> {
        let refs: Vec<&[u8]> = ops.iter().map(|(k, _)| k.as_slice()).collect();
        let groups = self.inner.router.group_by_range(&refs);
        let mut results: Vec<WriteResult> = vec![WriteResult::default(); ops.len()];
        let ops = &ops;
        let mut done = futures::stream::iter(groups.into_iter().map(|g| self.batch_apply_group(ops, g, deadline)))
            .buffer_unordered(BATCH_PARALLELISM);
        while let Some(out) = done.next().await {
            for (i, r) in out {
                results[i] = r;
            }
        }
        results
    }

    async fn batch_apply_group(
        &self,
        ops: &[(Vec<u8>, store_write_op::Op)],
        mut pending: Vec<usize>,
        deadline: Instant,
    ) -> Vec<(usize, WriteResult)> {
        let mut out = Vec::with_capacity(pending.len());
        while let Some(&first) = pending.first() {
            let r = self
                .inner
                .router
                .call(&ops[first].0, Kind::Write, deadline, |mut c, route, t| {
                    let r = request(
                        StoreBatchWriteRequest {
                            header: Some(route.header()),
                            ops: pending
                                .iter()
                                .filter(|&&i| route.contains(&ops[i].0))
                                .map(|&i| StoreWriteOp {
                                    key: ops[i].0.clone(),
                                    op: Some(ops[i].1.clone()),
                                    condition: None,
                                })
                                .collect(),
                        },
                        t,
                    );
                    async move { c.batch_write(r).await }
                })
                .await;
            let failed = |s: &Status| WriteResult {
                code: s.code() as i32,
                message: s.message().to_string(),
                version: 0,
            };
            match r {
                Ok((resp, route)) => {
                    let (sent, rest): (Vec<usize>, Vec<usize>) =
                        pending.into_iter().partition(|&i| route.contains(&ops[i].0));
                    if resp.results.len() != sent.len() {
                        let s = crate::router::outcome_unknown(&format!(
                            "storenode answered {} results for {} operations",
                            resp.results.len(),
                            sent.len()
                        ));
                        out.extend(sent.into_iter().map(|i| (i, failed(&s))));
                    } else {
                        for (i, r) in sent.into_iter().zip(resp.results) {
                            let is_put = matches!(ops[i].1, store_write_op::Op::Put(_));
                            out.push((
                                i,
                                WriteResult {
                                    code: 0,
                                    message: String::new(),
                                    version: if is_put { r.version } else { u64::from(r.existed) },
                                },
                            ));
                        }
                    }
                    pending = rest;
                }
                Err(s) => {
                    // Whatever was in flight shares the call's fate; the rest of the group
                    // was never sent and would only meet the same deadline.
                    out.extend(pending.drain(..).map(|i| (i, failed(&s))));
                }
            }
        }
        out
    }

    async fn do_batch_get(&self, req: Request<BatchGetRequest>) -> Result<Response<BatchGetResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("BatchGet", req.metadata(), Role::Read)?;
        let req = req.into_inner();
        if req.keys.len() > MAX_BATCH_OPS {
            return Err(Status::invalid_argument(format!(
                "batch has {} keys, the limit is {MAX_BATCH_OPS}",
                req.keys.len()
            )));
        }
        for k in &req.keys {
            check_key(k)?;
        }
        let _permit = self.admit(&ctx)?;
        let keys: Vec<Vec<u8>> = req.keys.iter().map(|k| ctx.ns.encode(k)).collect();
        let results = self.batch_read(&keys, deadline).await?;
        Ok(Response::new(BatchGetResponse { results }))
    }

    async fn do_batch_write(&self, req: Request<BatchWriteRequest>) -> Result<Response<BatchWriteResponse>, Status> {
        let deadline = self.deadline(req.metadata());
        let ctx = self.authenticate("BatchWrite", req.metadata(), Role::Write)?;
        let req = req.into_inner();
        if req.ops.len() > MAX_BATCH_OPS {
            return Err(Status::invalid_argument(format!(
                "batch has {} operations, the limit is {MAX_BATCH_OPS}",
                req.ops.len()
            )));
        }
        for (i, op) in req.ops.iter().enumerate() {
            check_key(&op.key).map_err(|e| Status::invalid_argument(format!("operation {i}: {e}")))?;
            match &op.op {
                Some(write_op::Op::Put(v)) => check_value(v, self.inner.limits.max_value_len)
                    .map_err(|e| Status::invalid_argument(format!("operation {i}: {e}")))?,
                Some(write_op::Op::Delete(_)) => {}
                None => return Err(Status::invalid_argument(format!("operation {i}: no put or delete"))),
            }
        }
        let _permit = self.admit(&ctx)?;
        let ops = req
            .ops
            .into_iter()
            .map(|op| {
                let store_op = match op.op {
                    Some(write_op::Op::Put(v)) => store_write_op::Op::Put(v),
                    _ => store_write_op::Op::Delete(true),
                };
                (ctx.ns.encode(&op.key), store_op)
            })
            .collect();
        let results = self.batch_apply(ops, deadline).await;
        Ok(Response::new(BatchWriteResponse { results }))
    }
}

macro_rules! rpc_span {
    ($rpc:literal) => {
        tracing::info_span!("kv", rpc = $rpc, tenant = field::Empty, namespace = field::Empty)
    };
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let t = Instant::now();
        let r = self.do_get(request).instrument(rpc_span!("Get")).await;
        self.finish("Get", t, r)
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let t = Instant::now();
        let r = self.do_put(request).instrument(rpc_span!("Put")).await;
        self.finish("Put", t, r)
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let t = Instant::now();
        let r = self.do_delete(request).instrument(rpc_span!("Delete")).await;
        self.finish("Delete", t, r)
    }

    async fn compare_and_swap(
        &self,
        request: Request<CompareAndSwapRequest>,
    ) -> Result<Response<CompareAndSwapResponse>, Status> {
        let t = Instant::now();
        let r = self.do_cas(request).instrument(rpc_span!("CompareAndSwap")).await;
        self.finish("CompareAndSwap", t, r)
    }

    type ScanStream = ScanStream;

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        let t = Instant::now();
        let r = self.do_scan(request, t).instrument(rpc_span!("Scan")).await;
        if let Err(s) = &r {
            // Failures before the stream started; the stream task records the rest.
            self.inner.metrics.observe("Scan", s.code(), t.elapsed());
        }
        r
    }

    async fn batch_get(&self, request: Request<BatchGetRequest>) -> Result<Response<BatchGetResponse>, Status> {
        let t = Instant::now();
        let r = self.do_batch_get(request).instrument(rpc_span!("BatchGet")).await;
        self.finish("BatchGet", t, r)
    }

    async fn batch_write(&self, request: Request<BatchWriteRequest>) -> Result<Response<BatchWriteResponse>, Status> {
        let t = Instant::now();
        let r = self.do_batch_write(request).instrument(rpc_span!("BatchWrite")).await;
        self.finish("BatchWrite", t, r)
    }
}
