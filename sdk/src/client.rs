//! The client: connections to the proxies, failover, retries and the calls.

use crate::error::{Error, Result, client_side_failure, from_status_at, retry_after, should_retry};
use futures::stream::{self, BoxStream, StreamExt};
use rand::Rng;
use skv_proto::v1 as pb;
use skv_proto::v1::kv_client::KvClient;
use skv_rpc::{Backoff, EndpointOptions};
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Bound, Range, RangeFrom, RangeFull, RangeInclusive, RangeTo, RangeToInclusive};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Largest gRPC message the client decodes (batch answers can hold many values).
const MAX_DECODE: usize = 256 * 1024 * 1024;
/// After a proxy could not be reached, new calls start elsewhere for this long.
const DOWN_FOR: Duration = Duration::from_secs(2);
/// How much longer than the deadline it sent the client waits for a proxy's answer, so
/// that the proxy's own "deadline reached" answer (which may say "not applied") arrives.
const ATTEMPT_GRACE: Duration = Duration::from_millis(250);

/// A stored value and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The key's version: 1 after the first write, +1 on every write after.
    pub version: u64,
}

/// A key with its value and version, as a scan yields it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key, relative to the token's namespace.
    pub key: Vec<u8>,
    /// The value's bytes.
    pub value: Vec<u8>,
    /// The key's version.
    pub version: u64,
}

/// What a [`Client::compare_and_swap`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The version matched and the value was written; `version` is the new one.
    Swapped {
        /// The key's version after the write.
        version: u64,
    },
    /// The version did not match; nothing was written.
    Mismatch {
        /// The key's current version (0 = the key is absent).
        current_version: u64,
    },
}

impl CasOutcome {
    /// Whether the value was written.
    pub fn is_swapped(&self) -> bool {
        matches!(self, CasOutcome::Swapped { .. })
    }
}

/// One write of a [`Client::batch_write`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// The stream a scan returns: entries in key order.
pub type ScanStream = BoxStream<'static, Result<KeyValue>>;

/// A key interval for [`Client::scan`]: built from any Rust range over
/// byte-like keys (`"a".."m"`, `b"a".to_vec()..`, `..=key`, `..`), or from a
/// `(start, end)` pair of bounds. An unbounded end means the end of the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// First key (inclusive).
    pub start: Vec<u8>,
    /// First key past the end (exclusive); empty = no end.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// `[start, end)`; an empty `end` means "to the end of the namespace".
    pub fn new(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Self {
            start: start.into(),
            end: end.into(),
        }
    }

    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Self {
        let start = prefix.into();
        let end = prefix_end(&start);
        Self { start, end }
    }

    /// From explicit bounds.
    pub fn from_bounds(start: Bound<&[u8]>, end: Bound<&[u8]>) -> Self {
        let start = match start {
            Bound::Included(k) => k.to_vec(),
            Bound::Excluded(k) => successor(k),
            Bound::Unbounded => Vec::new(),
        };
        let end = match end {
            Bound::Included(k) => successor(k),
            Bound::Excluded(k) => k.to_vec(),
            Bound::Unbounded => Vec::new(),
        };
        Self { start, end }
    }
}

/// The smallest key greater than `k`.
fn successor(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(k.len() + 1);
    v.extend_from_slice(k);
    v.push(0);
    v
}

/// The smallest key greater than every key starting with `prefix`, or empty
/// (no end) when there is none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

impl<K: AsRef<[u8]>> From<Range<K>> for KeyRange {
    fn from(r: Range<K>) -> Self {
        Self::from_bounds(Bound::Included(r.start.as_ref()), Bound::Excluded(r.end.as_ref()))
    }
}
impl<K: AsRef<[u8]>> From<RangeInclusive<K>> for KeyRange {
    fn from(r: RangeInclusive<K>) -> Self {
        Self::from_bounds(Bound::Included(r.start().as_ref()), Bound::Included(r.end().as_ref()))
    }
}
impl<K: AsRef<[u8]>> From<RangeFrom<K>> for KeyRange {
    fn from(r: RangeFrom<K>) -> Self {
        Self::from_bounds(Bound::Included(r.start.as_ref()), Bound::Unbounded)
    }
}
impl<K: AsRef<[u8]>> From<RangeTo<K>> for KeyRange {
    fn from(r: RangeTo<K>) -> Self {
        Self::from_bounds(Bound::Unbounded, Bound::Excluded(r.end.as_ref()))
    }
}
impl<K: AsRef<[u8]>> From<RangeToInclusive<K>> for KeyRange {
    fn from(r: RangeToInclusive<K>) -> Self {
        Self::from_bounds(Bound::Unbounded, Bound::Included(r.end.as_ref()))
    }
}
impl From<RangeFull> for KeyRange {
    fn from(_: RangeFull) -> Self {
        Self::default()
    }
}
impl<K: AsRef<[u8]>> From<(Bound<K>, Bound<K>)> for KeyRange {
    fn from((s, e): (Bound<K>, Bound<K>)) -> Self {
        Self::from_bounds(s.as_ref().map(|k| k.as_ref()), e.as_ref().map(|k| k.as_ref()))
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub(crate) struct Auth {
    header: Option<AsciiMetadataValue>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

type Stub = KvClient<InterceptedService<Channel, Auth>>;

/// Builds a [`Client`]. Get one with [`Client::builder`]. Its `Debug` output never
/// shows the token.
#[derive(Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    token: Option<String>,
    timeout: Duration,
    attempt_timeout: Duration,
    connect_timeout: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    ca_file: Option<std::path::PathBuf>,
    client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("endpoints", &self.endpoints)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert.as_ref().map(|(c, _)| c))
            .finish()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            token: None,
            timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(3),
            max_attempts: 10,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            ca_file: None,
            client_cert: None,
        }
    }
}

impl ClientBuilder {
    /// The proxies to talk to (`http://host:port`; a bare `host:port` gets
    /// `http://`). Any proxy serves any call; the client spreads calls over
    /// them and fails over when one is down.
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// Adds one proxy endpoint.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    /// TLS to the proxies: trust servers whose certificate chains to this CA (PEM). With
    /// it, `host:port` endpoints mean `https://` (`http://` stays plaintext); without it,
    /// `https://` endpoints are refused.
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// With [`ClientBuilder::ca_file`]: present this certificate and key (PEM) when a proxy
    /// asks for one (`--client-tls-ca-file` at the proxy). Tokens still decide what a
    /// client may do.
    pub fn client_cert(
        mut self,
        cert_file: impl Into<std::path::PathBuf>,
        key_file: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.client_cert = Some((cert_file.into(), key_file.into()));
        self
    }

    /// The JWT sent as `authorization: Bearer <token>` on every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let t: String = token.into();
        self.token = (!t.is_empty()).then_some(t);
        self
    }

    /// The deadline of one call, retries included (default 10 s). For scans
    /// it bounds opening the stream and each wait for the next batch.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one attempt at one proxy may take (default 3 s, never more than the
    /// call's [`timeout`](Self::timeout)). A proxy that accepts a call and never answers
    /// costs one attempt: a read then goes to another proxy; a write cannot be retried
    /// blindly and fails with [`Error::DeadlineExceeded`] saying its outcome is unknown.
    /// The proxy is told this deadline, so it answers in time when it can.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How long connecting to one proxy may take (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// At most this many tries per call (default 10, at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The exponential backoff between rounds of retries: it starts at
    /// `base`, doubles, is capped at `max`, and is jittered (default 20 ms .. 1 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max.max(base);
        self
    }

    /// Builds the client. This checks the configuration and sets up one
    /// connection per endpoint; connections are made lazily, so the servers
    /// need not be up yet: the first call connects (and fails over).
    pub async fn connect(self) -> Result<Client> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let header = match &self.token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| Error::Config("the token has characters not allowed in a header".into()))?,
            ),
            None => None,
        };
        let auth = Auth { header };
        let identity = self.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let tls = match (&self.ca_file, identity) {
            (Some(ca), identity) => {
                Some(skv_rpc::tls::ClientTls::load(ca, identity).map_err(|e| Error::Config(e.to_string()))?)
            }
            (None, Some(_)) => return Err(Error::Config("a client certificate needs the CA file too".into())),
            (None, None) => None,
        };
        let mut stubs = Vec::with_capacity(self.endpoints.len());
        let mut names = Vec::with_capacity(self.endpoints.len());
        for raw in &self.endpoints {
            for ep in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let url = skv_rpc::url_with(ep, tls.is_some());
                let options = EndpointOptions {
                    connect_timeout: self.connect_timeout,
                    keepalive_interval: Duration::from_secs(30),
                    keepalive_timeout: Duration::from_secs(10),
                    request_timeout: None,
                    tls: tls.clone(),
                };
                let channel = skv_rpc::channel_with(ep, &options).map_err(|e| Error::Config(e.to_string()))?;
                let stub = KvClient::with_interceptor(channel, auth.clone())
                    .max_decoding_message_size(MAX_DECODE)
                    .max_encoding_message_size(MAX_DECODE);
                stubs.push(stub);
                names.push(url);
            }
        }
        if stubs.is_empty() {
            return Err(Error::Config("no endpoint given".into()));
        }
        let start = rand::rng().random_range(0..stubs.len());
        Ok(Client {
            inner: Arc::new(Inner {
                down_until_ms: stubs.iter().map(|_| AtomicU64::new(0)).collect(),
                born: Instant::now(),
                stubs,
                names,
                next: AtomicUsize::new(start),
                timeout: self.timeout,
                attempt_timeout: self.attempt_timeout,
                max_attempts: self.max_attempts,
                backoff_base: self.backoff_base,
                backoff_max: self.backoff_max,
            }),
        })
    }
}

struct Inner {
    stubs: Vec<Stub>,
    /// Per endpoint: until when (ms since `born`) to avoid it after a transport failure.
    down_until_ms: Vec<AtomicU64>,
    born: Instant,
    names: Vec<String>,
    next: AtomicUsize,
    timeout: Duration,
    attempt_timeout: Duration,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// The first endpoint from `cursor` on (round-robin) not marked down; if
    /// all are, the one at `cursor`.
    fn pick(&self, cursor: usize) -> usize {
        let n = self.stubs.len();
        let now = self.now_ms();
        (0..n)
            .map(|k| (cursor + k) % n)
            .find(|&i| self.down_until_ms[i].load(Ordering::Relaxed) <= now)
            .unwrap_or(cursor % n)
    }

    fn mark_down(&self, idx: usize) {
        let until = self.now_ms() + DOWN_FOR.as_millis() as u64;
        self.down_until_ms[idx].store(until, Ordering::Relaxed);
    }

    fn mark_up(&self, idx: usize) {
        if self.down_until_ms[idx].load(Ordering::Relaxed) != 0 {
            self.down_until_ms[idx].store(0, Ordering::Relaxed);
        }
    }
}

/// A client of an skv cluster. Cheap to clone: clones share connections.
///
/// ```no_run
/// # async fn demo() -> skv::Result<()> {
/// let client = skv::Client::builder()
///     .endpoints(["http://127.0.0.1:7400"])
///     .token(std::env::var("SKV_TOKEN").unwrap_or_default())
///     .timeout(std::time::Duration::from_secs(5))
///     .connect()
///     .await?;
/// let version = client.put("greeting", "hello").await?;
/// let entry = client.get("greeting").await?.expect("just written");
/// assert_eq!(entry.value, b"hello");
/// assert_eq!(entry.version, version);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.inner.names).finish()
    }
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The proxy endpoints this client uses.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.names
    }

    /// Runs one RPC with failover and retries. `write` says whether the call
    /// could change data (then only errors that prove it was not applied are
    /// retried). `f` builds and sends the request on the given stub with the
    /// given remaining deadline.
    async fn call<T, F, Fut>(&self, write: bool, mut f: F) -> Result<T>
    where
        F: FnMut(Stub, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let inner = &*self.inner;
        let n = inner.stubs.len();
        let deadline = Instant::now() + inner.timeout;
        let mut cursor = inner.next.fetch_add(1, Ordering::Relaxed);
        let mut attempt: u32 = 0;
        let mut backoff = Backoff::new(inner.backoff_base, inner.backoff_max);
        loop {
            let idx = inner.pick(cursor);
            cursor = idx + 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded(
                    "the call's deadline passed while retrying".into(),
                ));
            }
            let budget = inner.attempt_timeout.min(remaining);
            let wait = budget + ATTEMPT_GRACE.min(remaining - budget);
            let stub = inner.stubs[idx].clone();
            let status = match tokio::time::timeout(wait, f(stub, budget)).await {
                Ok(Ok(resp)) => {
                    inner.mark_up(idx);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => {
                    if client_side_failure(&status) {
                        inner.mark_down(idx);
                    }
                    status
                }
                Err(_) if write => {
                    inner.mark_down(idx);
                    return Err(Error::DeadlineExceeded(format!(
                        "no answer from {} in {budget:?}; the write may or may not have been applied",
                        inner.names[idx]
                    )));
                }
                Err(_) if budget == remaining => {
                    return Err(Error::DeadlineExceeded(format!(
                        "no answer from {} before the deadline",
                        inner.names[idx]
                    )));
                }
                Err(_) => {
                    // The proxy accepted the call and never answered: one attempt spent.
                    inner.mark_down(idx);
                    Status::unavailable(format!("no answer from {} in {budget:?}", inner.names[idx]))
                }
            };
            attempt += 1;
            if !should_retry(&status, write) || attempt >= inner.max_attempts {
                return Err(from_status_at(status, write, &inner.names[idx]));
            }
            tracing::debug!(endpoint = %inner.names[idx], code = ?status.code(), msg = status.message(), attempt, "skv call failed; retrying");
            if let Some(hint) = retry_after(&status) {
                // A tenant quota said when to come back (every proxy applies it to us):
                // wait that long, or give up now if the deadline comes first.
                let remaining = deadline.saturating_duration_since(Instant::now());
                if hint >= remaining {
                    return Err(from_status_at(status, write, &inner.names[idx]));
                }
                tokio::time::sleep(hint).await;
                continue;
            }
            // Fail over to the next proxy at once; back off after a full round.
            if (attempt as usize).is_multiple_of(n) {
                let pause = backoff.next_wait();
                let remaining = deadline.saturating_duration_since(Instant::now());
                if pause >= remaining {
                    return Err(from_status_at(status, write, &inner.names[idx]));
                }
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// Reads a key. `None` when it does not exist.
    ///
    /// ```no_run
    /// # async fn demo(client: skv::Client) -> skv::Result<()> {
    /// match client.get("user/42").await? {
    ///     Some(e) => println!("v{}: {:?}", e.version, e.value),
    ///     None => println!("absent"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        self.get_opt(key.as_ref(), false).await
    }

    /// Reads a key from any replica: faster, but may be slightly stale.
    pub async fn get_stale(&self, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        self.get_opt(key.as_ref(), true).await
    }

    async fn get_opt(&self, key: &[u8], stale_ok: bool) -> Result<Option<Entry>> {
        let resp = self
            .call(false, |mut c, t| {
                let mut req = Request::new(pb::GetRequest {
                    key: key.to_vec(),
                    stale_ok,
                });
                req.set_timeout(t);
                async move { c.get(req).await }
            })
            .await?;
        Ok(resp.found.then_some(Entry {
            value: resp.value,
            version: resp.version,
        }))
    }

    async fn put_req(&self, req: pb::PutRequest) -> Result<u64> {
        let resp = self
            .call(true, |mut c, t| {
                let mut r = Request::new(req.clone());
                r.set_timeout(t);
                async move { c.put(r).await }
            })
            .await?;
        Ok(resp.version)
    }

    /// Writes a value and returns the key's new version.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) -> Result<u64> {
        self.put_req(pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.into(),
            if_version: None,
            if_absent: false,
        })
        .await
    }

    /// Writes only if the key's current version is `version`; otherwise
    /// fails with [`Error::ConditionFailed`].
    pub async fn put_if_version(&self, key: impl AsRef<[u8]>, version: u64, value: impl Into<Vec<u8>>) -> Result<u64> {
        self.put_req(pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.into(),
            if_version: Some(version),
            if_absent: false,
        })
        .await
    }

    /// Writes only if the key does not exist; otherwise fails with
    /// [`Error::ConditionFailed`]. Returns the new version (1).
    pub async fn put_if_absent(&self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) -> Result<u64> {
        self.put_req(pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.into(),
            if_version: None,
            if_absent: true,
        })
        .await
    }

    /// Deletes a key. Returns whether it existed.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.delete_req(key.as_ref(), None).await
    }

    /// Deletes a key only if its current version is `version`; otherwise fails
    /// with [`Error::ConditionFailed`].
    pub async fn delete_if_version(&self, key: impl AsRef<[u8]>, version: u64) -> Result<bool> {
        self.delete_req(key.as_ref(), Some(version)).await
    }

    async fn delete_req(&self, key: &[u8], if_version: Option<u64>) -> Result<bool> {
        let resp = self
            .call(true, |mut c, t| {
                let mut r = Request::new(pb::DeleteRequest {
                    key: key.to_vec(),
                    if_version,
                });
                r.set_timeout(t);
                async move { c.delete(r).await }
            })
            .await?;
        Ok(resp.deleted)
    }

    /// Writes `value` only if the key's version is `expected_version` (0 =
    /// only if absent). A mismatch is not an error: it is
    /// [`CasOutcome::Mismatch`] with the current version.
    ///
    /// ```no_run
    /// # async fn demo(client: skv::Client) -> skv::Result<()> {
    /// use skv::CasOutcome;
    /// let current = client.get("counter").await?;
    /// let (n, version) = match current {
    ///     Some(e) => (String::from_utf8_lossy(&e.value).parse::<u64>().unwrap_or(0), e.version),
    ///     None => (0, 0),
    /// };
    /// match client.compare_and_swap("counter", version, (n + 1).to_string()).await? {
    ///     CasOutcome::Swapped { version } => println!("now v{version}"),
    ///     CasOutcome::Mismatch { current_version } => println!("lost the race to v{current_version}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected_version: u64,
        value: impl Into<Vec<u8>>,
    ) -> Result<CasOutcome> {
        let req = pb::CompareAndSwapRequest {
            key: key.as_ref().to_vec(),
            expected_version,
            value: value.into(),
        };
        let resp = self
            .call(true, |mut c, t| {
                let mut r = Request::new(req.clone());
                r.set_timeout(t);
                async move { c.compare_and_swap(r).await }
            })
            .await?;
        Ok(if resp.succeeded {
            CasOutcome::Swapped { version: resp.version }
        } else {
            CasOutcome::Mismatch {
                current_version: resp.version,
            }
        })
    }

    /// Reads many keys at once. One answer per key, in the order given.
    pub async fn batch_get<I, K>(&self, keys: I) -> Result<Vec<Option<Entry>>>
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        let keys: Vec<Vec<u8>> = keys.into_iter().map(|k| k.as_ref().to_vec()).collect();
        let n = keys.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let req = pb::BatchGetRequest { keys };
        let resp = self
            .call(false, |mut c, t| {
                let mut r = Request::new(req.clone());
                r.set_timeout(t);
                async move { c.batch_get(r).await }
            })
            .await?;
        if resp.results.len() != n {
            return Err(Error::Other(Box::new(Status::internal(format!(
                "asked for {n} keys, got {} answers",
                resp.results.len()
            )))));
        }
        Ok(resp
            .results
            .into_iter()
            .map(|g| {
                g.found.then_some(Entry {
                    value: g.value,
                    version: g.version,
                })
            })
            .collect())
    }

    /// Writes many keys. Not atomic: one result (the new version, or the
    /// error of that key) per pair, in the order given.
    pub async fn batch_put<I, K, V>(&self, pairs: I) -> Result<Vec<Result<u64>>>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: Into<Vec<u8>>,
    {
        self.batch_write(pairs.into_iter().map(|(k, v)| WriteOp::Put {
            key: k.as_ref().to_vec(),
            value: v.into(),
        }))
        .await
    }

    /// Puts and deletes many keys. Not atomic: one result per operation, in
    /// order. For a put it is the new version; for a delete 1 if a key was
    /// removed, 0 if there was none.
    pub async fn batch_write(&self, ops: impl IntoIterator<Item = WriteOp>) -> Result<Vec<Result<u64>>> {
        let ops: Vec<pb::WriteOp> = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Put { key, value } => pb::WriteOp {
                    key,
                    op: Some(pb::write_op::Op::Put(value)),
                },
                WriteOp::Delete { key } => pb::WriteOp {
                    key,
                    op: Some(pb::write_op::Op::Delete(pb::DeleteMarker {})),
                },
            })
            .collect();
        let n = ops.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let req = pb::BatchWriteRequest { ops };
        let resp = self
            .call(true, |mut c, t| {
                let mut r = Request::new(req.clone());
                r.set_timeout(t);
                async move { c.batch_write(r).await }
            })
            .await?;
        if resp.results.len() != n {
            return Err(Error::OutcomeUnknown(format!(
                "sent {n} writes, got {} results",
                resp.results.len()
            )));
        }
        Ok(resp
            .results
            .into_iter()
            .map(|r| {
                if r.code == 0 {
                    Ok(r.version)
                } else {
                    Err(Error::from_status_for(
                        Status::new(tonic::Code::from_i32(r.code), r.message),
                        true,
                    ))
                }
            })
            .collect())
    }

    /// Streams the entries of a key interval in key order. Accepts any range
    /// over byte-like keys, or a [`KeyRange`].
    ///
    /// Each range of the cluster is read from one consistent point, so the scan is
    /// linearizable within one range, not across ranges. If the stream fails before it
    /// yielded anything, it is reopened (on another proxy if needed); if it fails after,
    /// it ends with [`Error::Unavailable`] naming the key to scan again from, rather than
    /// reading the rest at another point.
    ///
    /// ```no_run
    /// # async fn demo(client: skv::Client) -> skv::Result<()> {
    /// use futures::TryStreamExt;
    /// let mut rows = client.scan("user/".."user0");
    /// while let Some(kv) = rows.try_next().await? {
    ///     println!("{} = {} bytes", String::from_utf8_lossy(&kv.key), kv.value.len());
    /// }
    /// let all: Vec<skv::KeyValue> = client.scan(..).try_collect().await?;
    /// # Ok(()) }
    /// ```
    pub fn scan(&self, range: impl Into<KeyRange>) -> ScanStream {
        self.scan_limit(range, 0)
    }

    /// Like [`Client::scan`], stopping after `limit` entries (0 = no limit).
    pub fn scan_limit(&self, range: impl Into<KeyRange>, limit: u32) -> ScanStream {
        let range = range.into();
        let state = ScanState {
            client: self.clone(),
            next_start: range.start,
            end: range.end,
            remaining: (limit > 0).then_some(limit),
            stream: None,
            buf: VecDeque::new(),
            done: false,
            failures: 0,
            received: false,
            backoff: Backoff::new(self.inner.backoff_base, self.inner.backoff_max),
        };
        stream::unfold(state, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        })
        .boxed()
    }

    /// Streams every key that starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl Into<Vec<u8>>) -> ScanStream {
        self.scan(KeyRange::prefix(prefix))
    }

    /// Streams up to `limit` keys that start with `prefix` (0 = no limit).
    pub fn scan_prefix_limit(&self, prefix: impl Into<Vec<u8>>, limit: u32) -> ScanStream {
        self.scan_limit(KeyRange::prefix(prefix), limit)
    }

    /// Opens a scan stream, with failover. No `grpc-timeout` is set, so long
    /// scans are not cut; the wait for the first answer is bounded by the timeout.
    async fn open_scan(&self, start: Vec<u8>, end: Vec<u8>, limit: u32) -> Result<tonic::Streaming<pb::ScanResponse>> {
        let req = pb::ScanRequest { start, end, limit };
        self.call(false, |mut c, _t| {
            let r = Request::new(req.clone());
            async move { c.scan(r).await }
        })
        .await
    }
}

struct ScanState {
    client: Client,
    next_start: Vec<u8>,
    end: Vec<u8>,
    remaining: Option<u32>,
    stream: Option<tonic::Streaming<pb::ScanResponse>>,
    /// The open stream has delivered keys: it cannot be resumed at the same point.
    received: bool,
    backoff: Backoff,
    buf: VecDeque<pb::KeyValue>,
    done: bool,
    failures: u32,
}

impl ScanState {
    async fn next(&mut self) -> Option<Result<KeyValue>> {
        loop {
            if self.remaining == Some(0) {
                return None;
            }
            if let Some(kv) = self.buf.pop_front() {
                if !self.end.is_empty() && kv.key.as_slice() >= self.end.as_slice() {
                    self.done = true;
                    self.buf.clear();
                    return None;
                }
                self.next_start = successor(&kv.key);
                if let Some(r) = self.remaining.as_mut() {
                    *r -= 1;
                }
                return Some(Ok(KeyValue {
                    key: kv.key,
                    value: kv.value,
                    version: kv.version,
                }));
            }
            if self.done {
                return None;
            }
            if self.stream.is_none() {
                let opened = self
                    .client
                    .open_scan(self.next_start.clone(), self.end.clone(), self.remaining.unwrap_or(0))
                    .await;
                match opened {
                    Ok(s) => {
                        self.stream = Some(s);
                        self.received = false;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            let timeout = self.client.inner.timeout;
            let stream = self.stream.as_mut().expect("opened above");
            match tokio::time::timeout(timeout, stream.message()).await {
                Ok(Ok(Some(resp))) => {
                    self.failures = 0;
                    self.received |= !resp.kvs.is_empty();
                    self.buf.extend(resp.kvs);
                }
                Ok(Ok(None)) => {
                    self.done = true;
                    self.stream = None;
                }
                Ok(Err(status)) => {
                    self.stream = None;
                    self.failures += 1;
                    if self.received {
                        // Each range's part of a scan comes from one consistent point;
                        // reopening after the last key would read the rest at another
                        // one. Say where to resume instead of mixing them silently.
                        self.done = true;
                        return Some(Err(Error::Unavailable(format!(
                            "scan interrupted ({}); every key before {:?} was returned: scan again from there",
                            status.message(),
                            String::from_utf8_lossy(&self.next_start)
                        ))));
                    }
                    if should_retry(&status, false) && self.failures < self.client.inner.max_attempts {
                        let wait = retry_after(&status).unwrap_or_else(|| self.backoff.next_wait());
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    self.done = true;
                    return Some(Err(Error::from_status(status)));
                }
                Err(_) => {
                    self.done = true;
                    self.stream = None;
                    return Some(Err(Error::DeadlineExceeded("no scan batch before the deadline".into())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges() {
        assert_eq!(KeyRange::from("a".."c"), KeyRange::new("a", "c"));
        assert_eq!(KeyRange::from("a"..="c"), KeyRange::new("a", b"c\0".to_vec()));
        assert_eq!(KeyRange::from(b"a".to_vec()..), KeyRange::new("a", ""));
        assert_eq!(KeyRange::from(.."c"), KeyRange::new("", "c"));
        assert_eq!(KeyRange::from(..="c"), KeyRange::new("", b"c\0".to_vec()));
        assert_eq!(KeyRange::from(..), KeyRange::new("", ""));
        assert_eq!(
            KeyRange::from((Bound::Excluded("a"), Bound::Unbounded)),
            KeyRange::new(b"a\0".to_vec(), "")
        );
        assert_eq!(KeyRange::prefix("ab"), KeyRange::new("ab", "ac"));
        assert_eq!(KeyRange::prefix(vec![1, 0xff]), KeyRange::new(vec![1, 0xff], vec![2]));
        assert_eq!(KeyRange::prefix(vec![0xff]), KeyRange::new(vec![0xff], ""));
    }

    #[tokio::test]
    async fn builder_checks_config() {
        assert!(matches!(Client::builder().connect().await, Err(Error::Config(_))));
        assert!(matches!(
            Client::builder()
                .endpoint("http://x:1")
                .token("bad\ntoken")
                .connect()
                .await,
            Err(Error::Config(_))
        ));
        let c = Client::builder()
            .endpoints(["127.0.0.1:1, http://127.0.0.1:2"])
            .connect()
            .await
            .unwrap();
        assert_eq!(c.endpoints(), ["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let b = Client::builder().endpoint("http://x:1").token("eyJsecret.payload.sig");
        let d = format!("{b:?}");
        assert!(!d.contains("eyJsecret"), "{d}");
        assert!(d.contains("<redacted>") && d.contains("http://x:1"), "{d}");
    }

    #[tokio::test]
    async fn unreachable_endpoints_are_skipped_for_a_while() {
        let c = Client::builder()
            .endpoints(["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"])
            .connect()
            .await
            .unwrap();
        let inner = &*c.inner;
        assert_eq!(inner.pick(1), 1);
        inner.mark_down(1);
        assert_eq!(inner.pick(1), 2);
        assert_eq!(inner.pick(0), 0);
        inner.mark_down(2);
        inner.mark_down(0);
        assert_eq!(inner.pick(4), 1, "all down: plain round-robin");
        inner.mark_up(2);
        assert_eq!(inner.pick(0), 2);
    }
}
