//! The dashboards and alert rules in `deploy/` checked against a real Prometheus
//! (DESIGN.md §10, issue 13).
//!
//! A real cluster of processes (etcd from the Debian package, 2 placement instances on
//! it, 3 storenodes, 1 proxy, each with `--metrics-listen`) and a real Prometheus (the
//! Debian package `prometheus`, installed by scripts/test.sh; the test fails without it)
//! scraping them every second, with `deploy/prometheus/alerts.yml` loaded as its rules and
//! the job names of `deploy/prometheus/prometheus.yml`. Traffic is driven through the proxy
//! (writes, reads, scans, a failed conditional write, a refused token, a split and leader
//! transfers, so that routing retries happen, then an idle spell until a range hibernates
//! and a write that wakes it). Then every PromQL expression of every
//! Grafana dashboard (`deploy/grafana/**/*.json`, every `expr`) and every alert rule (as
//! Prometheus itself parsed them, from `/api/v1/rules`) is run with `/api/v1/query`.
//!
//! The rule an expression must pass ([`check_expr`]):
//! - it parses (Prometheus answers `success`);
//! - it is split at its top-level binary operators (outside parentheses, brackets, braces
//!   and strings; the `bool`, `on(...)`, `ignoring(...)`, `group_left(...)` and
//!   `group_right(...)` modifiers go with their operator), and every operand that is not a
//!   number literal must pass this rule itself, recursively (a parenthesised operand is
//!   unwrapped first; `absent(X)` is checked as `X`; the right operand of `unless` is exempt);
//! - the expression itself must return at least one series, unless one of its top-level
//!   operators is a comparison (`== != > < >= <=`) or a set operator (`and`, `or`,
//!   `unless`): such a *condition* (`up == 0`, `x > 0.1`) may legitimately select nothing in
//!   a healthy cluster, and its operands were checked instead.
//!
//! So a renamed metric, a typo in a label or a function, or a vector match that matches
//! nothing fails the test, while an alert that does not fire does not.
//! Last, one storenode is killed, and the store-down and under-replication alerts must
//! become active.
//! Grafana's `$__rate_interval`, `$__interval` and `$__range` are replaced by [`WINDOW`];
//! any other `$variable` fails the test.

use serde_json::Value;
use skv_testkit::cluster::{TEST_SECRET, token};
use skv_testkit::{ChildGuard, Etcd, bin_path, free_port, wait_until};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What Grafana's interval variables become in the test (scrapes are 1 s apart).
const WINDOW: &str = "30s";

/// The jobs the test's Prometheus scrapes; they must be the job names of
/// deploy/prometheus/prometheus.yml, which the alert rules select on.
const JOBS: [&str; 4] = ["skv-placement", "skv-storenode", "skv-proxy", "etcd"];

use skv_testkit::repo_root;

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The Prometheus binaries; panics (no skipping) when the Debian package is missing.
fn prometheus_bin(name: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "{name} not found: install Debian's `prometheus` package (scripts/test.sh does: apt-get install prometheus)"
        )
    })
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.0 GET (no client library in the workspace's lock file for this).

async fn http_get(addr: &str, path_and_query: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await??;
    let req = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header end in {text:?}"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The answer of `/api/v1/query` for one expression.
#[derive(Debug, Clone, PartialEq)]
enum QueryResult {
    /// Parsed and evaluated: how many series (a scalar or string counts as one).
    Series(usize),
    /// Prometheus refused it (a parse or evaluation error).
    Invalid(String),
}

struct Prom {
    addr: String,
}

impl Prom {
    async fn query(&self, expr: &str) -> QueryResult {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let (status, body) = match http_get(&self.addr, &path).await {
            Ok(r) => r,
            Err(e) => return QueryResult::Invalid(format!("HTTP error: {e}")),
        };
        let v: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => return QueryResult::Invalid(format!("HTTP {status}, not JSON ({e}): {body}")),
        };
        if v["status"] != "success" {
            return QueryResult::Invalid(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        match (&v["data"]["resultType"], &v["data"]["result"]) {
            (t, Value::Array(a)) if t == "vector" || t == "matrix" => QueryResult::Series(a.len()),
            (t, _) if t == "scalar" || t == "string" => QueryResult::Series(1),
            _ => QueryResult::Invalid(format!("unexpected answer {body}")),
        }
    }

    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.addr, path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }
}

// ---------------------------------------------------------------------------------------
// Splitting PromQL at its top-level binary operators (pure; unit-tested below).

const COMPARISONS: [&str; 6] = ["==", "!=", ">=", "<=", ">", "<"];
const SET_OPS: [&str; 3] = ["and", "or", "unless"];

/// `expr` split at its top-level binary operators: (operands, operators), with
/// `operators.len() == operands.len() - 1`. One operand and no operator when there is none.
fn split_top_level(expr: &str) -> (Vec<String>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut operands = Vec::new();
    let mut operators = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0usize;
    // Whether the text since `start` ends with something an operator can follow.
    let mut have_operand = false;
    let mut i = 0usize;
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == '\\' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => {
                quote = Some(c);
                have_operand = true;
                i += 1;
                continue;
            }
            '(' | '[' | '{' => {
                depth += 1;
                i += 1;
                continue;
            }
            ')' | ']' | '}' => {
                depth -= 1;
                have_operand = true;
                i += 1;
                continue;
            }
            '#' if depth == 0 => {
                // A comment runs to the end of the line.
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        if depth > 0 {
            i += 1;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        // A word: an operand part, or the set operators and/or/unless.
        if is_word(c) {
            let mut j = i;
            while j < chars.len() && is_word(chars[j]) {
                j += 1;
            }
            let word: String = chars[i..j].iter().collect();
            if have_operand && SET_OPS.contains(&word.as_str()) {
                operands.push(chars[start..i].iter().collect::<String>());
                operators.push(word);
                start = j;
                have_operand = false;
            } else {
                // A number's exponent sign (1e-3) belongs to the number.
                let numeric = word.chars().next().is_some_and(|d| d.is_ascii_digit());
                if numeric
                    && (word.ends_with('e') || word.ends_with('E'))
                    && let Some('+' | '-') = chars.get(j)
                {
                    j += 1;
                    while j < chars.len() && is_word(chars[j]) {
                        j += 1;
                    }
                }
                have_operand = true;
            }
            i = j;
            continue;
        }
        // Symbol operators, longest first.
        let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let op = ["==", "!=", ">=", "<=", ">", "<", "+", "-", "*", "/", "%", "^"]
            .into_iter()
            .find(|op| rest.starts_with(op));
        match op {
            Some(op) if have_operand => {
                operands.push(chars[start..i].iter().collect::<String>());
                operators.push(op.to_string());
                i += op.len();
                start = i;
                have_operand = false;
            }
            _ => i += 1, // a unary sign, or something this splitter need not understand
        }
    }
    operands.push(chars[start..].iter().collect::<String>());
    let operands = operands
        .into_iter()
        .map(|o| strip_modifiers(o.trim()).to_string())
        .collect();
    (operands, operators)
}

/// Drops the leading `bool`, `on(...)`/`ignoring(...)` and `group_left(...)`/
/// `group_right(...)` that belong to the operator before an operand.
fn strip_modifiers(mut s: &str) -> &str {
    loop {
        let t = s.trim_start();
        let mut done = true;
        for kw in ["bool", "on", "ignoring", "group_left", "group_right"] {
            if let Some(after) = t.strip_prefix(kw) {
                if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // a longer word (e.g. a metric named on_...)
                }
                let after = after.trim_start();
                s = if kw != "bool" && after.starts_with('(') {
                    match matching_paren(after) {
                        Some(end) => &after[end + 1..],
                        None => after,
                    }
                } else {
                    after
                };
                done = false;
                break;
            }
        }
        if done {
            return t;
        }
    }
}

/// Index of the `)` closing the `(` at index 0 of `s`.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `(x)` -> `x` while the outer parentheses enclose the whole expression.
fn unwrap_parens(mut s: &str) -> &str {
    loop {
        let t = s.trim();
        if t.starts_with('(') && matching_paren(t) == Some(t.len() - 1) {
            s = &t[1..t.len() - 1];
        } else {
            return t;
        }
    }
}

fn is_number(s: &str) -> bool {
    let s = s.trim().trim_start_matches(['-', '+']);
    s.parse::<f64>().is_ok() || ["inf", "nan"].contains(&s.to_ascii_lowercase().as_str())
}

/// `absent(X)` / `absent_over_time(X)` -> `X`.
fn absent_argument(s: &str) -> Option<&str> {
    for f in ["absent_over_time", "absent"] {
        if let Some(rest) = s.strip_prefix(f) {
            let rest = rest.trim_start();
            if rest.starts_with('(') && matching_paren(rest) == Some(rest.len() - 1) {
                return Some(&rest[1..rest.len() - 1]);
            }
        }
    }
    None
}

/// The checks [`check_expr`] makes, as a list of (expression, must return series).
fn plan_checks(expr: &str, out: &mut Vec<(String, bool)>) {
    let e = unwrap_parens(expr);
    if is_number(e) {
        return;
    }
    if let Some(arg) = absent_argument(e) {
        plan_checks(arg, out);
        return;
    }
    let (operands, operators) = split_top_level(e);
    let condition = operators
        .iter()
        .any(|o| COMPARISONS.contains(&o.as_str()) || SET_OPS.contains(&o.as_str()));
    out.push((e.to_string(), !condition));
    if operators.is_empty() {
        return;
    }
    for (i, operand) in operands.iter().enumerate() {
        let exempt = i > 0 && operators[i - 1] == "unless";
        if !exempt {
            plan_checks(operand, out);
        }
    }
}

/// Runs `expr` and its operands against Prometheus by the rule in the module doc.
/// Returns the problems found (empty = the expression passes).
async fn check_expr(prom: &Prom, expr: &str) -> (Vec<String>, usize) {
    let mut plan = Vec::new();
    plan_checks(expr, &mut plan);
    let mut problems = Vec::new();
    let mut whole = 0;
    for (n, (e, must_have_series)) in plan.iter().enumerate() {
        match prom.query(e).await {
            QueryResult::Invalid(err) => problems.push(format!("invalid: {e}: {err}")),
            QueryResult::Series(0) if *must_have_series => problems.push(format!("no series: {e}")),
            QueryResult::Series(k) => {
                if n == 0 {
                    whole = k;
                }
            }
        }
    }
    (problems, whole)
}

fn grafana_vars(expr: &str) -> String {
    let mut e = expr.to_string();
    for v in [
        "${__rate_interval}",
        "$__rate_interval",
        "${__interval}",
        "$__interval",
        "${__range}",
        "$__range",
    ] {
        e = e.replace(v, WINDOW);
    }
    e
}

// ---------------------------------------------------------------------------------------
// Unit tests of the splitter and the rule (no cluster).

#[test]
fn split_top_level_finds_operators_outside_brackets() {
    let (o, ops) = split_top_level(r#"up{job="a>b"} == 0"#);
    assert_eq!(o, vec![r#"up{job="a>b"}"#, "0"]);
    assert_eq!(ops, vec!["=="]);

    let (o, ops) = split_top_level("(sum(skv_x) or vector(0)) < 1");
    assert_eq!(o, vec!["(sum(skv_x) or vector(0))", "1"]);
    assert_eq!(ops, vec!["<"]);

    let (o, ops) = split_top_level("1 - (a / b) > 0.05");
    assert_eq!(o, vec!["1", "(a / b)", "0.05"]);
    assert_eq!(ops, vec!["-", ">"]);

    let (o, ops) = split_top_level("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) > 0.1");
    assert_eq!(o.len(), 2);
    assert_eq!(ops, vec![">"]);

    let (o, ops) = split_top_level("a * on (instance) group_left (x) b > bool 1e-3");
    assert_eq!(o, vec!["a", "b", "1e-3"]);
    assert_eq!(ops, vec!["*", ">"]);

    let (o, ops) = split_top_level("-a + sorting_order");
    assert_eq!(o, vec!["-a", "sorting_order"]);
    assert_eq!(ops, vec!["+"]);

    let (o, ops) = split_top_level("sum by (le, rpc) (rate(x[5m]))");
    assert_eq!(o.len(), 1);
    assert!(ops.is_empty());
}

#[test]
fn conditions_may_be_empty_but_their_operands_may_not() {
    let mut plan = Vec::new();
    plan_checks("(sum(skv_a) or vector(0)) < 1", &mut plan);
    assert_eq!(
        plan,
        vec![
            ("(sum(skv_a) or vector(0)) < 1".to_string(), false),
            ("sum(skv_a) or vector(0)".to_string(), false),
            ("sum(skv_a)".to_string(), true),
            ("vector(0)".to_string(), true),
        ]
    );
    let mut plan = Vec::new();
    plan_checks("a / b", &mut plan);
    assert_eq!(
        plan,
        vec![
            ("a / b".to_string(), true),
            ("a".to_string(), true),
            ("b".to_string(), true)
        ]
    );
    let mut plan = Vec::new();
    plan_checks("absent(up{job=\"x\"})", &mut plan);
    assert_eq!(plan, vec![("up{job=\"x\"}".to_string(), true)]);
    let mut plan = Vec::new();
    plan_checks("a unless b", &mut plan);
    assert_eq!(plan, vec![("a unless b".to_string(), false), ("a".to_string(), true)]);
}

// ---------------------------------------------------------------------------------------
// The cluster.

struct Procs {
    _etcd: Etcd,
    dir: tempfile::TempDir,
    children: Vec<ChildGuard>,
    placement_urls: Vec<String>,
    proxy_url: String,
    /// job -> metrics addresses
    targets: Vec<(&'static str, Vec<String>)>,
}

impl Procs {
    fn spawn(&mut self, name: &str, bin: &str, args: &[String]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log")))
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let mut cmd = Command::new(bin_path(bin));
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::from(log));
        let g = ChildGuard::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.children.push(g);
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    out.push_str(&format!("--- {}\n", p.display()));
                    for l in tail.into_iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    async fn start() -> Procs {
        skv_testkit::init_test_logging();
        let etcd = Etcd::start().await;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, TEST_SECRET).unwrap_or_else(|e| panic!("secret: {e}"));
        let etcd_url = etcd.client_url.clone();
        let etcd_addr = etcd_url.trim_start_matches("http://").to_string();
        let mut p = Procs {
            _etcd: etcd,
            dir,
            children: Vec::new(),
            placement_urls: Vec::new(),
            proxy_url: String::new(),
            targets: Vec::new(),
        };
        let s = |x: &Path| x.display().to_string();
        let mut pd_metrics = Vec::new();
        for i in 0..2 {
            let (port, mport) = (free_port(), free_port());
            let data = s(&p.dir.path().join(format!("pd-{i}")));
            p.spawn(
                &format!("placement-{i}"),
                "skv-placement",
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--data-dir".into(),
                    data,
                    "--etcd".into(),
                    etcd_url.clone(),
                    "--name".into(),
                    format!("pd-{i}"),
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{mport}"),
                    "--initial-wait-ms".into(),
                    "300".into(),
                    "--schedule-interval-ms".into(),
                    "200".into(),
                    // A killed store is DOWN (and its ranges under-replicated) within the
                    // test's 30 s wait for the alerts; 6 missed 1 s heartbeats, so a live
                    // store on a loaded 2-core machine is not taken for a dead one.
                    "--store-down-after-ms".into(),
                    "6000".into(),
                    "--jwt-hs256-secret-file".into(),
                    s(&secret),
                ],
            );
            p.placement_urls.push(format!("http://127.0.0.1:{port}"));
            pd_metrics.push(format!("127.0.0.1:{mport}"));
        }
        let placement = p.placement_urls.join(",");
        let mut store_metrics = Vec::new();
        for i in 0..3 {
            let (port, mport) = (free_port(), free_port());
            let data = s(&p.dir.path().join(format!("store-{i}")));
            p.spawn(
                &format!("store-{i}"),
                "skv-storenode",
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--placement".into(),
                    placement.clone(),
                    "--data-dir".into(),
                    data,
                    "--metrics-listen".into(),
                    format!("127.0.0.1:{mport}"),
                    "--heartbeat-interval-ms".into(),
                    "300".into(),
                    "--raft-hibernate=true".into(),
                    "--raft-hibernate-after-ms".into(),
                    "500".into(),
                ],
            );
            store_metrics.push(format!("127.0.0.1:{mport}"));
        }
        let (port, mport) = (free_port(), free_port());
        p.spawn(
            "proxy",
            "skv-proxy",
            &[
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--placement".into(),
                placement,
                "--jwt-hs256-secret-file".into(),
                s(&secret),
                "--metrics-listen".into(),
                format!("127.0.0.1:{mport}"),
            ],
        );
        p.proxy_url = format!("http://127.0.0.1:{port}");
        p.targets = vec![
            ("skv-placement", pd_metrics),
            ("skv-storenode", store_metrics),
            ("skv-proxy", vec![format!("127.0.0.1:{mport}")]),
            ("etcd", vec![etcd_addr]),
        ];
        p
    }

    async fn client(&self, tok: String) -> skv::Client {
        skv::Client::builder()
            .endpoints([self.proxy_url.clone()])
            .token(tok)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect sdk: {e}"))
    }
}

/// Prometheus on 127.0.0.1, scraping `targets` every second with deploy's alert rules.
struct Prometheus {
    _guard: ChildGuard,
    _dir: tempfile::TempDir,
    prom: Prom,
}

async fn start_prometheus(targets: &[(&str, Vec<String>)], rules: &Path) -> Prometheus {
    let bin = prometheus_bin("prometheus");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut cfg = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        serde_json::to_string(&rules.display().to_string()).unwrap_or_default()
    );
    for (job, addrs) in targets {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        cfg.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ));
    }
    let cfg_path = dir.path().join("prometheus.yml");
    std::fs::write(&cfg_path, &cfg).unwrap_or_else(|e| panic!("write config: {e}"));
    for _attempt in 0..3 {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap_or_else(|e| panic!("log: {e}"));
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let mut guard = ChildGuard::spawn("prometheus", &mut cmd).unwrap_or_else(|e| panic!("spawn prometheus: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(&addr, "/-/ready").await {
                return Prometheus {
                    _guard: guard,
                    _dir: dir,
                    prom: Prom { addr },
                };
            }
            if guard.wait_timeout(Duration::from_millis(1)).is_some() {
                break; // exited: a port race, or a bad config (see the log)
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        guard.kill();
    }
    let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    panic!("prometheus did not become ready; config:\n{cfg}\nlog:\n{log}");
}

/// The `job_name`s of deploy/prometheus/prometheus.yml (read as text: no YAML crate here).
fn deploy_job_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name:"))
        .map(|j| j.trim().trim_matches(['"', '\'']).to_string())
        .collect()
}

/// Every `expr` string in a Grafana dashboard JSON, with the panel title.
fn dashboard_exprs(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push((title.to_string(), e.clone())),
                    _ => dashboard_exprs(x, title, out),
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                dashboard_exprs(x, title, out);
            }
        }
        _ => {}
    }
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

/// Writes, reads, scans, a failed CAS, a refused token, a split and leader transfers.
async fn drive_traffic(p: &Procs) {
    let client = p.client(token("obs", "write")).await;
    for i in 0..200u32 {
        let k = format!("key{i:04}");
        client
            .put(k.as_bytes(), format!("value-{i}").into_bytes())
            .await
            .unwrap_or_else(|e| panic!("put {k}: {e}"));
        assert!(
            client
                .get(k.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("get {k}: {e}"))
                .is_some()
        );
    }
    assert!(
        client
            .get(b"missing")
            .await
            .unwrap_or_else(|e| panic!("get: {e}"))
            .is_none()
    );
    // A conditional write that does not match: FAILED_PRECONDITION at the proxy.
    assert!(client.put_if_version(b"key0000", 999, b"x".to_vec()).await.is_err());
    // A token signed with another secret: an auth denial.
    let bad = skv_testkit::cluster::token_with(
        "obs",
        "read",
        3600,
        "skv",
        "skv",
        b"another-secret-0123456789abcdef-xyz",
    );
    let stranger = p.client(bad).await;
    assert!(
        stranger.get(b"key0000").await.is_err(),
        "a token with the wrong key was accepted"
    );

    // A split and leader transfers make the proxy's cached routes stale: routing errors
    // at the storenodes, retries at the proxy, operators at placement.
    let mut pd = skv_proto::internal::placement_client::PlacementClient::connect(p.placement_urls[0].clone())
        .await
        .unwrap_or_else(|e| panic!("connect placement: {e}"));
    let mut split_key = (3u16).to_be_bytes().to_vec();
    split_key.extend_from_slice(b"obskey0100");
    let range = |pd: &mut skv_proto::internal::placement_client::PlacementClient<tonic::transport::Channel>| {
        let mut pd = pd.clone();
        async move {
            pd.get_range(skv_proto::internal::GetRangeRequest {
                key: b"\x00\x03obskey0000".to_vec(),
            })
            .await
            .ok()
            .and_then(|r| r.into_inner().range)
        }
    };
    let r = range(&mut pd).await.unwrap_or_else(|| panic!("no range for obs keys"));
    let range_id = r.descriptor.as_ref().map(|d| d.range_id).unwrap_or(0);
    let mut split = Err(tonic::Status::unknown("not tried"));
    for _ in 0..5 {
        split = pd
            .split_range(skv_testkit::cluster::admin(skv_proto::internal::AdminSplitRequest {
                range_id,
                split_key: split_key.clone(),
            }))
            .await;
        if split.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Err(e) = split {
        panic!("split: {e}");
    }
    let proxy_metrics = p.targets[2].1[0].clone();
    for round in 0..10u32 {
        for i in 0..50u32 {
            let k = format!("key{:04}", (i * 7 + round) % 200);
            // A write caught by a leader transfer may fail (its outcome unknown): this
            // traffic is only there to be measured.
            let _ = client.put(k.as_bytes(), b"again".to_vec()).await;
            let _ = client.get(format!("key{:04}", i * 3).as_bytes()).await;
        }
        let (_, m) = http_get(&proxy_metrics, "/metrics").await.unwrap_or_default();
        if m.contains("skv_proxy_retries_total{") && round >= 2 {
            break;
        }
        // Move the leader of the left range to another replica.
        if let Some(r) = range(&mut pd).await {
            let d = r.descriptor.unwrap_or_default();
            if let Some(to) = d.replicas.iter().map(|x| x.store_id).find(|s| *s != r.leader_store_id) {
                let _ = pd
                    .transfer_leader(skv_testkit::cluster::admin(
                        skv_proto::internal::AdminTransferLeaderRequest {
                            range_id: d.range_id,
                            to_store_id: to,
                        },
                    ))
                    .await;
            }
        }
    }
    // Scans (one per range part).
    let mut kv = skv_testkit::cluster::kv_client(&p.proxy_url).await;
    let all = skv_testkit::cluster::scan_all(&mut kv, &token("obs", "read"), b"", b"", 0)
        .await
        .unwrap_or_else(|e| panic!("scan: {e}"));
    assert_eq!(all.len(), 200, "scan saw {} keys", all.len());

    // Idle ranges hibernate (ADR 0018; the storenodes run with a short
    // --raft-hibernate-after-ms), and a request wakes them.
    let stores = p.targets[1].1.clone();
    let gauge = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    wait_until("an idle range to hibernate", Duration::from_secs(30), || {
        let stores = stores.clone();
        async move {
            for s in &stores {
                let (_, m) = http_get(s, "/metrics").await.unwrap_or_default();
                if gauge(&m, "skv_storenode_ranges_hibernating ") > 0.0 {
                    return Some(());
                }
            }
            None
        }
    })
    .await;
    client
        .put(b"key0001", b"wake up".to_vec())
        .await
        .unwrap_or_else(|e| panic!("put after hibernation: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_returns_data_from_a_real_prometheus() {
    let root = repo_root();
    let deploy_prom = root.join("deploy/prometheus");
    let rules = deploy_prom.join("alerts.yml");

    // The shipped configs are valid (and their rule file with them), and name the jobs used here.
    for cfg in ["prometheus.yml", "playground.yml"] {
        let out = Command::new(prometheus_bin("promtool"))
            .args(["check", "config", cfg])
            .current_dir(&deploy_prom)
            .output()
            .unwrap_or_else(|e| panic!("promtool: {e}"));
        assert!(
            out.status.success(),
            "promtool check config deploy/prometheus/{cfg}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg_text = std::fs::read_to_string(deploy_prom.join(cfg)).unwrap_or_default();
        let jobs = deploy_job_names(&cfg_text);
        for j in JOBS.iter().filter(|j| cfg == "prometheus.yml" || j.starts_with("skv-")) {
            assert!(
                jobs.contains(*j),
                "deploy/prometheus/{cfg} has no job {j:?} (has {jobs:?})"
            );
        }
    }

    let procs = Procs::start().await;
    let client = procs.client(token("healthcheck", "write")).await;
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if client.put(b"ready", b"1".to_vec()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "the cluster never accepted a write; logs:\n{}",
        procs.logs()
    );

    let prometheus = start_prometheus(&procs.targets, &rules).await;
    let prom = &prometheus.prom;
    drive_traffic(&procs).await;

    // Every target is up and has been scraped a few times since the traffic.
    let n_targets: usize = procs.targets.iter().map(|(_, a)| a.len()).sum();
    // (Each target must have answered its last scrape; on a timeout, say which did not.)
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let v = prom.api("/api/v1/targets").await;
        let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let down: Vec<String> = targets
            .iter()
            .filter(|t| t["health"] != "up")
            .map(|t| {
                format!(
                    "{} {} {} {}",
                    t["labels"]["job"], t["labels"]["instance"], t["health"], t["lastError"]
                )
            })
            .collect();
        if targets.len() == n_targets && down.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every target is up after 45 s ({} targets): {down:?}\nlogs:\n{}",
            targets.len(),
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The alert rules, as Prometheus loaded them: all of them, all evaluating fine.
    let alerts_text = std::fs::read_to_string(&rules).unwrap_or_default();
    let declared = alerts_text.lines().filter(|l| l.trim().starts_with("- alert:")).count();
    assert!(declared >= 5, "alerts.yml declares only {declared} alerts");
    let v = prom.api("/api/v1/rules").await;
    let mut rule_exprs = Vec::new();
    let mut unhealthy = Vec::new();
    for g in v["data"]["groups"].as_array().cloned().unwrap_or_default() {
        for r in g["rules"].as_array().cloned().unwrap_or_default() {
            let name = r["name"].as_str().unwrap_or("?").to_string();
            if r["health"] != "ok" {
                unhealthy.push(format!("{name}: health {} {}", r["health"], r["lastError"]));
            }
            rule_exprs.push((name, r["query"].as_str().unwrap_or_default().to_string()));
        }
    }
    assert_eq!(rule_exprs.len(), declared, "Prometheus loaded {rule_exprs:?}");
    for needed in [
        "SkvStorenodeDown",
        "SkvRangeUnderReplicated",
        "SkvPlacementNoLeader",
        "SkvProxyP99LatencyHigh",
        "SkvDiskNearlyFull",
    ] {
        assert!(
            rule_exprs.iter().any(|(n, _)| n == needed),
            "alerts.yml has no {needed}"
        );
    }

    // Every dashboard query.
    let mut files = Vec::new();
    json_files(&root.join("deploy/grafana"), &mut files);
    assert!(!files.is_empty(), "no dashboard JSON under deploy/grafana");
    let mut panel_exprs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", f.display()));
        let rows: Vec<String> = v["panels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["type"] == "row")
                    .filter_map(|p| p["title"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if f.ends_with("skv-overview.json") {
            for row in [
                "Cluster at a glance",
                "Proxy",
                "Storenodes",
                "Raft",
                "Placement and scheduling",
            ] {
                assert!(
                    rows.iter().any(|r| r == row),
                    "{}: no row {row:?} in {rows:?}",
                    f.display()
                );
            }
        }
        // Panels: unique ids, inside Grafana's 24-column grid, no two on the same cells.
        let panels = v["panels"].as_array().cloned().unwrap_or_default();
        let mut ids = BTreeSet::new();
        let mut cells = BTreeSet::new();
        for p in &panels {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{}: a panel without id", f.display()));
            assert!(ids.insert(id), "{}: panel id {id} twice", f.display());
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().unwrap_or(99),
                g["y"].as_u64().unwrap_or(0),
                g["w"].as_u64().unwrap_or(0),
                g["h"].as_u64().unwrap_or(0),
            );
            assert!(w > 0 && h > 0 && x + w <= 24, "{}: panel {id} gridPos {g}", f.display());
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(
                        cells.insert((cx, cy)),
                        "{}: panel {id} overlaps another at ({cx},{cy})",
                        f.display()
                    );
                }
            }
        }
        let before = panel_exprs.len();
        dashboard_exprs(&v, "", &mut panel_exprs);
        assert!(panel_exprs.len() > before, "{}: no PromQL expressions", f.display());
        for ds in text.match_indices("\"uid\": \"").map(|(i, _)| &text[i + 8..]) {
            let uid = ds.split('"').next().unwrap_or_default();
            assert!(
                uid == "prometheus" || uid.starts_with("skv"),
                "{}: a datasource uid {uid:?} that deploy/grafana/provisioning does not define",
                f.display()
            );
        }
    }

    // The checker itself can fail (a guard against a test that passes on anything).
    let (p, _) = check_expr(prom, "skv_no_such_metric_total").await;
    assert!(!p.is_empty(), "a missing metric passed the check");
    let (p, _) = check_expr(prom, "sum(rate(skv_proxy_requests_total[1m])").await;
    assert!(!p.is_empty(), "an unparsable expression passed the check");
    let (p, _) = check_expr(prom, "max(skv_no_such_metric) > 0").await;
    assert!(!p.is_empty(), "a condition on a missing metric passed the check");
    let (p, _) = check_expr(prom, "max(skv_placement_is_leader) > 100").await;
    assert!(p.is_empty(), "a condition that does not hold failed the check: {p:?}");

    let mut failures = Vec::new();
    let mut report = Vec::new();
    for (what, name, expr) in rule_exprs
        .iter()
        .map(|(n, e)| ("alert", n, e.clone()))
        .chain(panel_exprs.iter().map(|(t, e)| ("panel", t, grafana_vars(e))))
    {
        if expr.contains('$') {
            failures.push(format!("{what} {name:?}: unknown variable in {expr}"));
            continue;
        }
        let (problems, series) = check_expr(prom, &expr).await;
        report.push(format!(
            "{what:5} {series:>3} series  {name}: {}",
            expr.replace('\n', " ")
        ));
        for pr in problems {
            failures.push(format!("{what} {name:?}: {pr}"));
        }
    }
    eprintln!(
        "{} alert rules and {} dashboard queries checked against Prometheus:\n{}",
        rule_exprs.len(),
        panel_exprs.len(),
        report.join("\n")
    );
    assert!(
        unhealthy.is_empty(),
        "alert rules Prometheus could not evaluate:\n{}",
        unhealthy.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{} of the dashboard and alert queries fail:\n{}\n\nmetric names Prometheus has: {}",
        failures.len(),
        failures.join("\n"),
        prom.api("/api/v1/label/__name__/values").await["data"]
    );

    // The families of issue 13 counted what the traffic did (a query returning a 0 series
    // passes the check above; these must be above 0).
    for expr in [
        "sum(skv_storenode_raft_applied_entries_total)",
        "sum(skv_storenode_raft_commit_duration_seconds_count)",
        "sum(skv_storenode_raft_leader_changes_total)",
        "sum(skv_storenode_raft_elections_started_total)",
        "sum(skv_storenode_group_commit_batch_appends_count)",
        "min(skv_storenode_engine_disk_bytes)",
        "sum(skv_placement_scheduler_ticks_total)",
        "sum(skv_placement_operators_started_total)",
        "sum(skv_placement_operator_duration_seconds_count)",
        "sum(skv_proxy_range_cache_hits_total)",
        "min(process_resident_memory_bytes{job=~\"skv-.*\"})",
        "min(process_open_fds{job=~\"skv-.*\"})",
        "min(process_start_time_seconds{job=~\"skv-.*\"})",
        "min(skv_build_info{job=~\"skv-.*\"})",
    ] {
        let v = prom.api(&format!("/api/v1/query?query={}", urlencode(expr))).await;
        let value = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(value > 0.0, "{expr} is {value}: {v}");
    }
    // Every skv process exports build info and process metrics (6 targets).
    let v = prom
        .api(&format!(
            "/api/v1/query?query={}",
            urlencode("count(process_cpu_seconds_total{job=~\"skv-.*\"})")
        ))
        .await;
    assert_eq!(v["data"]["result"][0]["value"][1].as_str(), Some("6"), "{v}");

    // A store goes down: the store-down and under-replication alerts become active
    // (pending: their `for` has not run out yet), so they fire on a real failure.
    let store_pid = procs.children[2].pid();
    let mut procs = procs;
    procs.children[2].kill();
    let active = wait_until(
        "SkvStorenodeDown and SkvRangeUnderReplicated to become active",
        Duration::from_secs(30),
        || async {
            let v = prom.api("/api/v1/alerts").await;
            let names: BTreeSet<String> = v["data"]["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|a| a["state"] == "pending" || a["state"] == "firing")
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
                .collect();
            (names.contains("SkvStorenodeDown") && names.contains("SkvRangeUnderReplicated")).then_some(names)
        },
    )
    .await;
    eprintln!("after kill -9 of storenode pid {store_pid}, active alerts: {active:?}");
    assert!(
        !active.contains("SkvPlacementNoLeader") && !active.contains("SkvProxyDown"),
        "unrelated alerts became active: {active:?}"
    );
}
