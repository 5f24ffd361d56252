//! `--otlp-endpoint` (issue 13, ADR 0024): the servers export their `tracing` spans over
//! OTLP/gRPC. A tiny collector (the OTLP `TraceService` of the opentelemetry-proto crate on
//! a tonic server, 127.0.0.1, random port) receives them from real processes: placement
//! (embedded store), one storenode and a proxy, all started with `SKV_OTLP_ENDPOINT`. After a
//! put and a get, the proxy's `kv` span of the put carries its RPC and namespace, its
//! `store_call` span the range and the store, and the storenode's `store` span of the write
//! the range and the store; each process names itself in `service.name`.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use skv_testkit::cluster::{TEST_SECRET, token};
use skv_testkit::{ChildGuard, bin_path, free_port, wait_until};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One received span: its process, name and attributes (values as text).
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    attrs: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter().map(|a| (a.key.clone(), text(&a.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let res = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
            let service = res.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        service: service.clone(),
                        name: s.name.clone(),
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(got);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn find(&self, service: &str, name: &str, want: &[(&str, Option<&str>)]) -> Option<Span> {
        let spans = self.spans.lock().ok()?;
        spans
            .iter()
            .find(|s| {
                s.service == service
                    && s.name == name
                    && want.iter().all(|(k, v)| match (s.attrs.get(*k), v) {
                        (Some(have), Some(v)) => have == v,
                        (Some(have), None) => !have.is_empty(),
                        (None, _) => false,
                    })
            })
            .cloned()
    }

    fn summary(&self) -> String {
        let spans = self.spans.lock().map(|s| s.clone()).unwrap_or_default();
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for s in &spans {
            *names
                .entry(format!(
                    "{}/{} {:?}",
                    s.service,
                    s.name,
                    s.attrs.keys().collect::<Vec<_>>()
                ))
                .or_default() += 1;
        }
        format!("{} spans: {names:#?}", spans.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_range_store_and_namespace() {
    skv_testkit::init_test_logging();
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{addr}");

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let secret = dir.path().join("secret");
    std::fs::write(&secret, TEST_SECRET).unwrap_or_else(|e| panic!("secret: {e}"));
    let log = |name: &str| {
        std::fs::File::create(dir.path().join(format!("{name}.log"))).map_or_else(|_| Stdio::null(), Stdio::from)
    };
    let (pd_port, store_port, proxy_port) = (free_port(), free_port(), free_port());
    let placement = format!("http://127.0.0.1:{pd_port}");
    let mut children: Vec<ChildGuard> = Vec::new();
    let mut spawn = |name: &str, bin: &str, args: Vec<String>| {
        let mut cmd = Command::new(bin_path(bin));
        cmd.args(&args)
            .env("SKV_OTLP_ENDPOINT", &endpoint)
            // The batch exporter's delay (default 5 s), shorter for the test.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(log(name));
        children.push(ChildGuard::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("{name}: {e}")));
    };
    let s = |p: &std::path::Path| p.display().to_string();
    spawn(
        "placement",
        "skv-placement",
        vec![
            "--listen".into(),
            format!("127.0.0.1:{pd_port}"),
            "--data-dir".into(),
            s(&dir.path().join("pd")),
            "--initial-wait-ms".into(),
            "300".into(),
            "--jwt-hs256-secret-file".into(),
            s(&secret),
        ],
    );
    spawn(
        "store",
        "skv-storenode",
        vec![
            "--listen".into(),
            format!("127.0.0.1:{store_port}"),
            "--placement".into(),
            placement.clone(),
            "--data-dir".into(),
            s(&dir.path().join("store")),
            "--heartbeat-interval-ms".into(),
            "300".into(),
        ],
    );
    spawn(
        "proxy",
        "skv-proxy",
        vec![
            "--listen".into(),
            format!("127.0.0.1:{proxy_port}"),
            "--placement".into(),
            placement,
            "--jwt-hs256-secret-file".into(),
            s(&secret),
        ],
    );

    let client = skv::Client::builder()
        .endpoints([format!("http://127.0.0.1:{proxy_port}")])
        .token(token("tracedns", "write"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect sdk: {e}"));
    wait_until("the cluster to accept a put", Duration::from_secs(60), || {
        let client = client.clone();
        async move { client.put(b"traced".to_vec(), b"1".to_vec()).await.ok() }
    })
    .await;
    let got = client.get(b"traced").await.unwrap_or_else(|e| panic!("get: {e}"));
    assert!(got.is_some(), "the put is not readable");

    // (process, span, attributes: a value, or None for any non-empty one)
    type Want = (&'static str, &'static str, Vec<(&'static str, Option<&'static str>)>);
    let wanted: [Want; 4] = [
        (
            "skv-proxy",
            "kv",
            vec![
                ("rpc", Some("Put")),
                ("namespace", Some("tracedns")),
                ("tenant", Some("tracedns")),
            ],
        ),
        ("skv-proxy", "store_call", vec![("range_id", None), ("store_id", None)]),
        (
            "skv-storenode",
            "store",
            vec![("range_id", None), ("store_id", None), ("op", None)],
        ),
        ("skv-placement", "register_store", vec![("store_id", None)]),
    ];
    for (service, name, attrs) in &wanted {
        let found = wait_until(
            &format!("a {service} span {name} with {attrs:?}"),
            Duration::from_secs(30),
            || {
                let c = collector.clone();
                let attrs = attrs.clone();
                async move { c.find(service, name, &attrs) }
            },
        )
        .await;
        eprintln!("{service}: {name} {:?}", found.attrs);
    }
    // The storenode's span names a real range (not the 0 of a header-less call).
    let store_span = collector
        .find("skv-storenode", "store", &[("op", Some("write"))])
        .unwrap_or_else(|| panic!("no storenode write span; {}", collector.summary()));
    assert_ne!(
        store_span.attrs.get("range_id").map(String::as_str),
        Some("0"),
        "{store_span:?}"
    );
    eprintln!("{}", collector.summary());
    drop(children);
    server.abort();
}
