//! The public `skv.v1.Kv` service: auth, namespace, limits, then routing.

use crate::auth::{Claims, Role, Verifier};
use crate::metrics::Metrics;
use crate::namespace::Namespace;
use crate::router::{Kind, Router};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use skv_common::limits::{MAX_KEY_LEN, check_key, check_value};
use skv_proto::internal::{
    Condition, StoreGetRequest, StoreScanRequest, StoreWriteRequest, condition, store_write_request,
};
use skv_proto::v1::kv_server::Kv;
use skv_proto::v1::{
    BatchGetRequest, BatchGetResponse, BatchWriteRequest, BatchWriteResponse, CompareAndSwapRequest,
    CompareAndSwapResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse, KeyValue, PutRequest, PutResponse,
    ScanRequest, ScanResponse, WriteResult, write_op,
};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field, warn};

/// Most keys or operations in one batch.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Largest total of values a BatchGet returns.
pub const MAX_BATCH_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// How many single-key requests of one batch are in flight at once.
const BATCH_PARALLELISM: usize = 64;
/// Keys asked of a storenode per scan page.
const SCAN_PAGE: u32 = 512;
/// Range pieces of one scan fetched in parallel.
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
    pub max_concurrency_per_tenant: usize,
}

/// Per-tenant concurrency limit: one semaphore per namespace.
struct Tenants {
    max: usize,
    map: Mutex<HashMap<Vec<u8>, Arc<Semaphore>>>,
}

impl Tenants {
    fn acquire(&self, ns: &[u8]) -> Result<OwnedSemaphorePermit, Status> {
        let sem = {
            let mut map = self.map.lock();
            if map.len() > 100_000 {
                // Forget idle tenants so the map cannot grow without bound.
                let max = self.max;
                map.retain(|_, s| s.available_permits() < max);
            }
            map.entry(ns.to_vec())
                .or_insert_with(|| Arc::new(Semaphore::new(self.max)))
                .clone()
        };
        sem.try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many concurrent requests for this namespace (limit {})",
                self.max
            ))
        })
    }
}

struct Inner {
    router: Arc<Router>,
    verifier: Arc<Verifier>,
    metrics: Metrics,
    limits: ServiceLimits,
    tenants: Tenants,
}

/// The `skv.v1.Kv` implementation.
#[derive(Clone)]
pub struct KvService {
    inner: Arc<Inner>,
}

/// Parses a `grpc-timeout` header value (e.g. `250m`, `5S`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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

fn precondition_failed(current: u64) -> Status {
    Status::failed_precondition(format!("condition not met: the key's current version is {current}"))
}

/// (request index, internal key, operation, is a put)
type BatchOp = (usize, Vec<u8>, store_write_request::Op, bool);

type ScanStream = Pin<Box<dyn futures::Stream<Item = Result<ScanResponse, Status>> + Send>>;

impl KvService {
    pub fn new(router: Arc<Router>, verifier: Arc<Verifier>, metrics: Metrics, limits: ServiceLimits) -> Self {
        let tenants = Tenants {
            max: limits.max_concurrency_per_tenant.max(1),
            map: Mutex::new(HashMap::new()),
        };
        KvService {
            inner: Arc::new(Inner {
                router,
                verifier,
                metrics,
                limits,
                tenants,
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
            .and_then(parse_grpc_timeout)
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
        Span::current().record("tenant", field::display(&claims.ns));
        Ok(Ctx { claims, ns })
    }

    fn admit(&self, ctx: &Ctx) -> Result<OwnedSemaphorePermit, Status> {
        self.inner.tenants.acquire(ctx.ns.name()).inspect_err(|_| {
            tracing::debug!(tenant = %ctx.claims.ns, sub = %ctx.claims.sub, "tenant concurrency limit reached");
        })
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
                    let _ = tx.send(Err(s)).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// Streams `[start, end)` in key order. The interval is cut at the cached range
    /// boundaries and up to [`SCAN_LOOKAHEAD`] pieces are fetched in parallel (each
    /// bounded by a small channel); their pages are forwarded strictly in order and
    /// the limit is applied here.
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
        let lookahead = if limit != 0 && limit <= SCAN_PAGE {
            1
        } else {
            SCAN_LOOKAHEAD
        };
        let mut intervals = self.inner.router.plan_intervals(&start, &end).into_iter();
        let mut queue: VecDeque<mpsc::Receiver<Result<Vec<KeyValue>, Status>>> = VecDeque::new();
        // Dropping the set (early return, client gone) aborts the fetchers.
        let mut fetchers = JoinSet::new();
        let mut out: Vec<KeyValue> = Vec::new();
        let mut out_bytes = 0usize;
        loop {
            while fetchers.try_join_next().is_some() {}
            while queue.len() < lookahead {
                let Some((s, e)) = intervals.next() else { break };
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
                n = rx.recv() => n,
            };
            match next {
                Some(Ok(page)) => {
                    for kv in page {
                        out_bytes += kv.key.len() + kv.value.len() + 16;
                        out.push(kv);
                        remaining -= 1;
                        if out_bytes >= SCAN_CHUNK_BYTES || remaining == 0 {
                            let kvs = std::mem::take(&mut out);
                            out_bytes = 0;
                            if tx.send(Ok(ScanResponse { kvs })).await.is_err() {
                                return Ok(()); // client went away
                            }
                        }
                        if remaining == 0 {
                            return Ok(());
                        }
                    }
                }
                Some(Err(s)) => return Err(s),
                None => {
                    queue.pop_front();
                }
            }
        }
        if !out.is_empty() {
            let _ = tx.send(Ok(ScanResponse { kvs: out })).await;
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
            let page_deadline = {
                let d = Instant::now() + self.inner.limits.request_timeout;
                client_deadline.map_or(d, |c| c.min(d))
            };
            let page = remaining.min(u64::from(SCAN_PAGE)) as u32;
            let cur = cursor.clone();
            let (resp, route) = self
                .inner
                .router
                .call(&cur, Kind::Read, page_deadline, |mut c, route, t| {
                    let sub_end = if !route.end.is_empty() && route.end < end {
                        route.end.clone()
                    } else {
                        end.clone()
                    };
                    let r = request(
                        StoreScanRequest {
                            header: Some(route.header()),
                            start: cur.clone(),
                            end: sub_end,
                            limit: page,
                        },
                        t,
                    );
                    async move { c.scan(r).await }
                })
                .await?;
            let got = resp.kvs.len();
            let mut last: Option<Vec<u8>> = None;
            let mut out = Vec::with_capacity(got);
            for kv in resp.kvs {
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
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return Ok(()); // the consumer stopped (limit reached or client gone)
            }
            if remaining == 0 {
                return Ok(());
            }
            if resp.more {
                match last {
                    Some(mut l) => {
                        l.push(0); // the smallest key after the last one returned
                        cursor = l;
                    }
                    None if got == 0 => {
                        return Err(Status::internal("storenode reported more keys but returned none"));
                    }
                    None => return Err(Status::internal("storenode returned only keys outside the scan")),
                }
            } else if route.end.is_empty() || route.end >= end {
                return Ok(());
            } else {
                cursor = route.end.clone();
            }
        }
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
        let mut results = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        let mut gets = futures::stream::iter(keys.into_iter().map(|key| self.read(key, false, deadline)))
            .buffered(BATCH_PARALLELISM);
        while let Some(r) = gets.try_next().await? {
            bytes += r.value.len() + 16;
            if bytes > MAX_BATCH_RESPONSE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "batch response would exceed {MAX_BATCH_RESPONSE_BYTES} bytes; ask for fewer keys"
                )));
            }
            results.push(r);
        }
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
        // Operations on the same key run one after another in request order; distinct
        // keys run in parallel. Results come back in request order.
        let n = req.ops.len();
        let mut groups: Vec<Vec<BatchOp>> = Vec::new();
        let mut by_key: HashMap<Vec<u8>, usize> = HashMap::new();
        for (i, op) in req.ops.into_iter().enumerate() {
            let (store_op, is_put) = match op.op {
                Some(write_op::Op::Put(v)) => (store_write_request::Op::Put(v), true),
                _ => (store_write_request::Op::Delete(true), false),
            };
            let key = ctx.ns.encode(&op.key);
            let g = *by_key.entry(key.clone()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push((i, key, store_op, is_put));
        }
        drop(by_key);
        let mut results: Vec<WriteResult> = vec![WriteResult::default(); n];
        let mut done = futures::stream::iter(groups.into_iter().map(|group| async move {
            let mut out = Vec::with_capacity(group.len());
            for (i, key, store_op, is_put) in group {
                let r = match self.write(key, store_op, None, deadline).await {
                    Ok(r) => WriteResult {
                        code: 0,
                        message: String::new(),
                        version: if is_put { r.version } else { u64::from(r.existed) },
                    },
                    Err(s) => WriteResult {
                        code: s.code() as i32,
                        message: s.message().to_string(),
                        version: 0,
                    },
                };
                out.push((i, r));
            }
            out
        }))
        .buffer_unordered(BATCH_PARALLELISM);
        while let Some(out) = done.next().await {
            for (i, r) in out {
                results[i] = r;
            }
        }
        Ok(Response::new(BatchWriteResponse { results }))
    }
}

macro_rules! rpc_span {
    ($rpc:literal) => {
        tracing::info_span!("kv", rpc = $rpc, tenant = field::Empty)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parsing() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
