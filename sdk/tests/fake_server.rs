//! The client against tiny in-test fake `Kv` servers on 127.0.0.1:0: auth
//! header, failover, retries, outcome-unknown mapping, scans and typed maps.

use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use skv::{CasOutcome, Client, Error, OUTCOME_METADATA_KEY, RETRY_AFTER_METADATA_KEY};
use skv_proto::v1 as pb;
use skv_proto::v1::kv_server::{Kv, KvServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

const TOKEN: &str = "test-token.abc.def";

/// key -> (value, version)
type Store = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

#[derive(Default)]
struct Fake {
    data: Mutex<Store>,
    calls: AtomicUsize,
    /// Answer every call with a server-sent UNAVAILABLE ("no leader").
    down: AtomicBool,
    /// Break the next scan stream after its first batch.
    break_scan_once: AtomicBool,
    /// Refuse this many calls with RESOURCE_EXHAUSTED and `retry-after-ms: quota_hint_ms`.
    quota_refusals: AtomicUsize,
    quota_hint_ms: AtomicUsize,
}

type Shared = Arc<Fake>;

struct Svc(Shared);

impl Svc {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated(format!("bad authorization header {auth:?}")));
        }
        if self.0.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("no leader for range r1"));
        }
        if self
            .0
            .quota_refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            let mut s = Status::resource_exhausted("namespace over its rate limit");
            let hint = self.0.quota_hint_ms.load(Ordering::SeqCst).to_string();
            s.metadata_mut().insert(RETRY_AFTER_METADATA_KEY, hint.parse().unwrap());
            return Err(s);
        }
        Ok(())
    }
}

fn outcome_unknown() -> Status {
    let mut s = Status::unavailable("raft leader changed after proposing");
    s.metadata_mut()
        .insert(OUTCOME_METADATA_KEY, MetadataValue::from_static("unknown"));
    s
}

#[tonic::async_trait]
impl Kv for Svc {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.check(&req)?;
        let key = req.into_inner().key;
        if key == b"slow" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let data = self.0.data.lock().unwrap();
        Ok(Response::new(match data.get(&key) {
            Some((v, ver)) => pb::GetResponse {
                found: true,
                value: v.clone(),
                version: *ver,
            },
            None => pb::GetResponse::default(),
        }))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        if r.key.is_empty() {
            return Err(Status::invalid_argument("key is empty"));
        }
        if r.key == b"outcome-unknown" {
            return Err(outcome_unknown());
        }
        let mut data = self.0.data.lock().unwrap();
        let cur = data.get(&r.key).map_or(0, |e| e.1);
        if r.if_absent && cur != 0 {
            return Err(Status::failed_precondition("key exists"));
        }
        if let Some(v) = r.if_version
            && v != cur
        {
            return Err(Status::failed_precondition(format!("version is {cur}, not {v}")));
        }
        data.insert(r.key, (r.value, cur + 1));
        Ok(Response::new(pb::PutResponse { version: cur + 1 }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let deleted = self.0.data.lock().unwrap().remove(&r.key).is_some();
        Ok(Response::new(pb::DeleteResponse { deleted }))
    }

    async fn compare_and_swap(
        &self,
        req: Request<pb::CompareAndSwapRequest>,
    ) -> Result<Response<pb::CompareAndSwapResponse>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let mut data = self.0.data.lock().unwrap();
        let cur = data.get(&r.key).map_or(0, |e| e.1);
        if cur != r.expected_version {
            return Ok(Response::new(pb::CompareAndSwapResponse {
                succeeded: false,
                version: cur,
            }));
        }
        data.insert(r.key, (r.value, cur + 1));
        Ok(Response::new(pb::CompareAndSwapResponse {
            succeeded: true,
            version: cur + 1,
        }))
    }

    type ScanStream = Pin<Box<dyn Stream<Item = Result<pb::ScanResponse, Status>> + Send>>;

    async fn scan(&self, req: Request<pb::ScanRequest>) -> Result<Response<Self::ScanStream>, Status> {
        self.check(&req)?;
        let r = req.into_inner();
        let data = self.0.data.lock().unwrap();
        let mut kvs: Vec<pb::KeyValue> = data
            .range(r.start.clone()..)
            .filter(|(k, _)| r.end.is_empty() || k.as_slice() < r.end.as_slice())
            .map(|(k, (v, ver))| pb::KeyValue {
                key: k.clone(),
                value: v.clone(),
                version: *ver,
            })
            .collect();
        if r.limit > 0 {
            kvs.truncate(r.limit as usize);
        }
        let mut batches: Vec<Result<pb::ScanResponse, Status>> = kvs
            .chunks(2)
            .map(|c| Ok(pb::ScanResponse { kvs: c.to_vec() }))
            .collect();
        if batches.len() > 1 && self.0.break_scan_once.swap(false, Ordering::SeqCst) {
            batches.truncate(1);
            batches.push(Err(Status::unavailable("range leader moved")));
        }
        Ok(Response::new(futures::stream::iter(batches).boxed()))
    }

    async fn batch_get(&self, req: Request<pb::BatchGetRequest>) -> Result<Response<pb::BatchGetResponse>, Status> {
        self.check(&req)?;
        let data = self.0.data.lock().unwrap();
        let results = req
            .into_inner()
            .keys
            .iter()
            .map(|k| match data.get(k) {
                Some((v, ver)) => pb::GetResponse {
                    found: true,
                    value: v.clone(),
                    version: *ver,
                },
                None => pb::GetResponse::default(),
            })
            .collect();
        Ok(Response::new(pb::BatchGetResponse { results }))
    }

    async fn batch_write(
        &self,
        req: Request<pb::BatchWriteRequest>,
    ) -> Result<Response<pb::BatchWriteResponse>, Status> {
        self.check(&req)?;
        let mut data = self.0.data.lock().unwrap();
        let results = req
            .into_inner()
            .ops
            .into_iter()
            .map(|op| match op.op {
                _ if op.key.is_empty() => pb::WriteResult {
                    code: tonic::Code::InvalidArgument as i32,
                    message: "key is empty".into(),
                    version: 0,
                },
                Some(pb::write_op::Op::Put(v)) => {
                    let ver = data.get(&op.key).map_or(0, |e| e.1) + 1;
                    data.insert(op.key, (v, ver));
                    pb::WriteResult {
                        code: 0,
                        message: String::new(),
                        version: ver,
                    }
                }
                Some(pb::write_op::Op::Delete(_)) => pb::WriteResult {
                    code: 0,
                    message: String::new(),
                    version: u64::from(data.remove(&op.key).is_some()),
                },
                None => pb::WriteResult {
                    code: tonic::Code::InvalidArgument as i32,
                    message: "no op".into(),
                    version: 0,
                },
            })
            .collect();
        Ok(Response::new(pb::BatchWriteResponse { results }))
    }
}

/// Starts a fake server sharing `state`; returns its URL.
async fn serve(state: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(KvServer::new(Svc(state)))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    format!("http://{addr}")
}

/// A URL on which nothing listens.
async fn dead_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

async fn client(endpoints: Vec<String>) -> Client {
    Client::builder()
        .endpoints(endpoints)
        .token(TOKEN)
        .timeout(Duration::from_secs(5))
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn sends_the_bearer_token() {
    let state = Shared::default();
    let url = serve(state.clone()).await;
    let c = client(vec![url.clone()]).await;
    assert_eq!(c.put("k", "v").await.unwrap(), 1);
    assert_eq!(c.get("k").await.unwrap().unwrap().value, b"v");

    let wrong = Client::builder().endpoint(&url).token("other").connect().await.unwrap();
    let e = wrong.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Unauthenticated(_)), "{e:?}");
    let none = Client::builder().endpoint(&url).connect().await.unwrap();
    assert!(matches!(none.get("k").await, Err(Error::Unauthenticated(_))));
}

#[tokio::test]
async fn fails_over_from_a_dead_endpoint() {
    let state = Shared::default();
    let live = serve(state.clone()).await;
    let dead = dead_endpoint().await;
    let c = client(vec![dead.clone(), live.clone(), dead]).await;
    // Whatever proxy each call starts on, it lands on the live one; writes too
    // (a refused connection proves the write was not sent).
    for i in 0..10u64 {
        assert_eq!(c.put(format!("k{i}"), "v").await.unwrap(), 1);
        assert!(c.get(format!("k{i}")).await.unwrap().is_some());
    }
    // Only dead endpoints: Unavailable (retryable), within the deadline.
    let only_dead = client(vec![dead_endpoint().await]).await;
    let e = only_dead.put("x", "y").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn retries_a_server_unavailable_on_another_proxy() {
    let sick = Shared::default();
    sick.down.store(true, Ordering::SeqCst);
    let healthy = Shared::default();
    let c = client(vec![serve(sick.clone()).await, serve(healthy.clone()).await]).await;
    for _ in 0..6 {
        c.put("k", "v").await.unwrap();
    }
    assert_eq!(c.get("k").await.unwrap().unwrap().version, 6);

    // All proxies unavailable: it gives up with Unavailable after its attempts.
    healthy.down.store(true, Ordering::SeqCst);
    let before = sick.calls.load(Ordering::SeqCst) + healthy.calls.load(Ordering::SeqCst);
    let e = c.get("k").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let after = sick.calls.load(Ordering::SeqCst) + healthy.calls.load(Ordering::SeqCst);
    assert!(after - before > 2, "should have retried: {} calls", after - before);
}

#[tokio::test]
async fn quota_refusals_wait_the_servers_retry_hint() {
    let state = Shared::default();
    let c = client(vec![serve(state.clone()).await, serve(state.clone()).await]).await;
    state.quota_hint_ms.store(150, Ordering::SeqCst);
    state.quota_refusals.store(2, Ordering::SeqCst);
    let before = state.calls.load(Ordering::SeqCst);
    let t = std::time::Instant::now();
    assert_eq!(c.put("k", "v").await.unwrap(), 1);
    // Two refusals, each waited out (not failed over at once), then success.
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    assert_eq!(state.calls.load(Ordering::SeqCst) - before, 3);
    // A hint past the deadline: the error at once, not a sleep into the deadline.
    state.quota_hint_ms.store(60_000, Ordering::SeqCst);
    state.quota_refusals.store(1, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let e = c.get("k").await.unwrap_err();
    assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test]
async fn outcome_unknown_is_reported_not_retried() {
    let state = Shared::default();
    let c = client(vec![serve(state.clone()).await, serve(state.clone()).await]).await;
    let before = state.calls.load(Ordering::SeqCst);
    let e = c.put("outcome-unknown", "v").await.unwrap_err();
    assert!(matches!(e, Error::OutcomeUnknown(_)), "{e:?}");
    assert!(!e.is_retryable());
    assert_eq!(
        state.calls.load(Ordering::SeqCst) - before,
        1,
        "a maybe-applied write must not be retried"
    );
}

#[tokio::test]
async fn deadline_is_enforced() {
    let state = Shared::default();
    let url = serve(state).await;
    let c = Client::builder()
        .endpoint(url)
        .token(TOKEN)
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let e = c.get("slow").await.unwrap_err();
    assert!(matches!(e, Error::DeadlineExceeded(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn conditional_writes_cas_and_batches() {
    let state = Shared::default();
    let c = client(vec![serve(state).await]).await;
    assert_eq!(c.put_if_absent("a", "1").await.unwrap(), 1);
    assert!(matches!(
        c.put_if_absent("a", "2").await,
        Err(Error::ConditionFailed(_))
    ));
    assert!(matches!(
        c.put_if_version("a", 7, "2").await,
        Err(Error::ConditionFailed(_))
    ));
    assert_eq!(c.put_if_version("a", 1, "2").await.unwrap(), 2);
    assert_eq!(
        c.compare_and_swap("a", 1, "x").await.unwrap(),
        CasOutcome::Mismatch { current_version: 2 }
    );
    assert_eq!(
        c.compare_and_swap("a", 2, "3").await.unwrap(),
        CasOutcome::Swapped { version: 3 }
    );
    assert!(matches!(c.put("", "v").await, Err(Error::InvalidArgument(_))));
    assert!(c.delete("a").await.unwrap());
    assert!(!c.delete("a").await.unwrap());

    let res = c.batch_put([("b1", "x"), ("", "bad"), ("b2", "y")]).await.unwrap();
    assert_eq!(res.len(), 3);
    assert_eq!(res[0].as_ref().unwrap(), &1);
    assert!(matches!(res[1], Err(Error::InvalidArgument(_))));
    assert_eq!(res[2].as_ref().unwrap(), &1);
    let got = c.batch_get(["b1", "nope", "b2"]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().value, b"x");
    assert!(got[1].is_none());
    assert_eq!(got[2].as_ref().unwrap().value, b"y");
    assert!(c.batch_get(Vec::<Vec<u8>>::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn scans_stream_in_order_and_say_where_to_resume_after_a_break() {
    let state = Shared::default();
    let c = client(vec![serve(state.clone()).await]).await;
    for i in 0..9 {
        c.put(format!("s/{i}"), format!("v{i}")).await.unwrap();
    }
    c.put("t", "outside").await.unwrap();

    let all: Vec<skv::KeyValue> = c.scan_prefix("s/").try_collect().await.unwrap();
    let keys: Vec<String> = all
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, (0..9).map(|i| format!("s/{i}")).collect::<Vec<_>>());

    let some: Vec<skv::KeyValue> = c.scan("s/3"..="s/5").try_collect().await.unwrap();
    assert_eq!(some.len(), 3);
    let limited: Vec<skv::KeyValue> = c.scan_limit(.., 4).try_collect().await.unwrap();
    assert_eq!(limited.len(), 4);

    // The stream breaks after its first batch. Each range's part of a scan is read from
    // one point, so the client does not silently resume at another point: it yields what
    // it got, then an error that says where to resume; resuming there gets the rest.
    state.break_scan_once.store(true, Ordering::SeqCst);
    let mut stream = c.scan(..);
    let mut first = Vec::new();
    let err = loop {
        match stream.next().await {
            Some(Ok(kv)) => first.push(kv),
            Some(Err(e)) => break e,
            None => panic!("the broken stream must end with an error"),
        }
    };
    assert!(
        matches!(err, Error::Unavailable(ref m) if m.contains("scan again from there")),
        "{err:?}"
    );
    assert!(!first.is_empty() && first.len() < 10, "{}", first.len());
    assert!(stream.next().await.is_none(), "nothing after the error");
    let mut from = first.last().unwrap().key.clone();
    from.push(0);
    let rest: Vec<skv::KeyValue> = c.scan(from..).try_collect().await.unwrap();
    assert_eq!(first.len() + rest.len(), 10);
    assert!(
        first
            .iter()
            .chain(&rest)
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0].key < w[1].key)
    );
    // With no break, the same scan is whole.
    let limited: Vec<skv::KeyValue> = c.scan_limit(.., 5).try_collect().await.unwrap();
    assert_eq!(limited.len(), 5);
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Profile {
    name: String,
    karma: i64,
}

#[tokio::test]
async fn typed_map_feels_like_a_btreemap() {
    let state = Shared::default();
    let c = client(vec![serve(state).await]).await;
    let m = c.map::<i64, Profile>("users/");
    // Neighbour data that must not leak into the map.
    c.put("users", "x").await.unwrap();
    c.put("userz/1", "x").await.unwrap();

    let ids = [300i64, -5, 2, 1 << 40, 0, -70000];
    for id in ids {
        let p = Profile {
            name: format!("u{id}"),
            karma: id,
        };
        assert_eq!(m.insert(&id, &p).await.unwrap(), None);
    }
    let old = m
        .insert(
            &2,
            &Profile {
                name: "two".into(),
                karma: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(old.unwrap().name, "u2");
    assert_eq!(m.get(&2).await.unwrap().unwrap().name, "two");
    assert!(m.contains_key(&300).await.unwrap());
    assert!(!m.contains_key(&301).await.unwrap());
    assert_eq!(m.get(&301).await.unwrap(), None);

    let keys: Vec<i64> = m.keys().try_collect().await.unwrap();
    let mut sorted = ids.to_vec();
    sorted.sort();
    assert_eq!(keys, sorted, "iteration follows the integers' order, negatives first");
    let mid: Vec<(i64, Profile)> = m.range(0..=300).try_collect().await.unwrap();
    assert_eq!(mid.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 2, 300]);
    let tail: Vec<(i64, Profile)> = m.range(301..).try_collect().await.unwrap();
    assert_eq!(tail.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1 << 40]);
    assert_eq!(m.len().await.unwrap(), 6);
    assert!(!m.is_empty().await.unwrap());

    assert!(m.remove(&-5).await.unwrap());
    assert!(!m.remove(&-5).await.unwrap());
    assert_eq!(m.len().await.unwrap(), 5);

    // A value that is not a Profile: a Decode error, not a panic.
    c.put(m.raw_key(&7).unwrap(), vec![0xff, 0xff, 0xff]).await.unwrap();
    assert!(matches!(m.get(&7).await, Err(Error::Decode(_))));
    assert!(m.is_empty().await.is_ok());
    let empty = c.map::<String, u8>("nothing/");
    assert!(empty.is_empty().await.unwrap());
}
