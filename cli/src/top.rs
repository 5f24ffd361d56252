//! `skvctl top`: a live terminal view of the cluster, refreshed every `--interval` (1 s).
//!
//! Each frame reads placement (members, stores, the range map, and from the leader's memory
//! the per-store leader load and the operators in flight) and each store's `/metrics` (the
//! address it registered with placement): Store requests/s and their p99 latency come from
//! the difference of two scrapes of `skv_storenode_requests_total` and
//! `skv_storenode_request_duration_seconds` (p99 interpolated in the bucket it falls into,
//! as Prometheus' `histogram_quantile` does), CPU from `process_cpu_seconds_total`.
//! `--once` prints one frame (two scrapes `--interval` apart) and exits; with
//! `--output json` that frame is one JSON document.

use crate::admin;
use crate::args::{Global, Output, TopArgs};
use crate::data::ExitCode;
use anyhow::Result;
use serde::Serialize;
use skv_proto::internal as pb;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one scrape of a store's `/metrics` gives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    /// Sum over methods and outcomes of `skv_storenode_requests_total`.
    pub requests: f64,
    /// Cumulative bucket counts of `skv_storenode_request_duration_seconds`, summed over
    /// methods, by upper bound (ascending; +Inf last).
    pub buckets: Vec<(f64, f64)>,
    pub cpu_seconds: Option<f64>,
}

/// The value and labels of one sample line (`name{labels} value [timestamp]`).
fn sample<'a>(line: &'a str, name: &str) -> Option<(&'a str, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
        let end = r.rfind('}')?;
        (&r[..end], &r[end + 1..])
    } else if rest.starts_with(' ') {
        ("", rest)
    } else {
        return None; // another family sharing the prefix
    };
    let v = value.split_whitespace().next()?;
    let v = match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        x => x.parse().ok()?,
    };
    Some((labels, v))
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = labels.find(&key)? + key.len();
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

/// Parses the families `top` reads from a storenode's `/metrics` text.
pub fn parse_scrape(text: &str) -> Scrape {
    let mut s = Scrape::default();
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, v)) = sample(line, "skv_storenode_requests_total") {
            s.requests += v;
        } else if let Some((labels, v)) = sample(line, "skv_storenode_request_duration_seconds_bucket") {
            let le = match label(labels, "le") {
                Some("+Inf") => f64::INFINITY,
                Some(x) => match x.parse::<f64>() {
                    Ok(le) => le,
                    Err(_) => continue,
                },
                None => continue,
            };
            // Keyed by the bits of the bound: the same bound from every method adds up.
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        } else if let Some((_, v)) = sample(line, "process_cpu_seconds_total") {
            s.cpu_seconds = Some(v);
        }
    }
    let mut b: Vec<(f64, f64)> = buckets.into_values().collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    s.buckets = b;
    s
}

/// The `q` quantile of the observations between two cumulative histograms (`before` may be
/// empty: since the start), interpolated linearly inside its bucket; None without
/// observations. The +Inf bucket answers the largest finite bound.
pub fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let old = before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            (*le, (c - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, c) in &delta {
        if *c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = c - prev.1;
            if in_bucket <= 0.0 {
                return Some(*le);
            }
            return Some(prev.0 + (le - prev.0) * (rank - prev.1) / in_bucket);
        }
        prev = (*le, *c);
    }
    Some(prev.0)
}

/// GET `http://addr/metrics` (HTTP/1.0, 2 s).
async fn fetch_metrics(addr: &str) -> Result<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        s.take(64 << 20).read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: /metrics timed out"))??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!("{addr}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StoreRow {
    pub id: u64,
    pub address: String,
    pub state: String,
    /// Replicas and leaders in placement's range map.
    pub ranges: u64,
    pub leaders: u64,
    /// Read + write qps of the ranges it leads (placement's load stats).
    pub leader_qps: Option<f64>,
    /// From the store's `/metrics` (None when it could not be scraped twice).
    pub requests_per_sec: Option<f64>,
    pub p99_ms: Option<f64>,
    pub cpu_percent: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OperatorRow {
    pub range_id: u64,
    pub kind: String,
    pub description: String,
    pub step: String,
    pub origin: String,
    pub running_secs: f64,
}

/// One frame of `skvctl top`.
#[derive(Clone, Debug, Serialize)]
pub struct Frame {
    pub placement_leader: Option<String>,
    pub ranges: usize,
    pub leaderless_ranges: usize,
    pub stores_up: usize,
    /// Sums over the stores that could be scraped.
    pub requests_per_sec: f64,
    /// Of every Store request of the interval, all stores together.
    pub p99_ms: Option<f64>,
    /// Placement's load stats (range leaders' heartbeats), summed over the ranges.
    pub read_qps: f64,
    pub write_qps: f64,
    pub interval_secs: f64,
    pub stores: Vec<StoreRow>,
    pub operators: Vec<OperatorRow>,
}

/// A scrape of every store, with the time it was taken.
type Scrapes = HashMap<u64, (Instant, Scrape)>;

async fn scrape_all(stores: &[pb::StoreInfo]) -> Scrapes {
    let jobs = stores.iter().filter(|s| !s.metrics_address.is_empty()).map(|s| {
        let (id, addr) = (s.store_id, s.metrics_address.clone());
        async move {
            fetch_metrics(&addr)
                .await
                .ok()
                .map(|t| (id, (Instant::now(), parse_scrape(&t))))
        }
    });
    futures::future::join_all(jobs).await.into_iter().flatten().collect()
}

struct View {
    leader: Option<String>,
    stores: Vec<pb::StoreInfo>,
    ranges: Vec<pb::RangeInfo>,
    status: HashMap<u64, pb::StoreStatus>,
    stats: HashMap<u64, pb::RangeStats>,
    operators: Vec<pb::OperatorInfo>,
}

async fn read_placement(g: &Global) -> Result<View> {
    let mut c = admin::connect(g).await?;
    let members = c
        .get_members(pb::GetMembersRequest {})
        .await
        .ok()
        .map(|r| r.into_inner());
    let stores = admin::all_stores(&mut c).await?;
    let ranges = admin::all_ranges(&mut c).await?;
    Ok(View {
        leader: members.and_then(|m| m.leader).map(|l| {
            if l.name.is_empty() || l.name == l.address {
                l.address
            } else {
                format!("{} ({})", l.name, l.address)
            }
        }),
        stores,
        ranges,
        status: admin::store_status(g).await,
        stats: admin::range_stats(g).await,
        operators: admin::list_operators(g).await.unwrap_or_default(),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Builds a frame from placement's view and two scrapes of the stores.
fn frame(v: &View, before: &Scrapes, after: &Scrapes) -> Frame {
    let mut rows = Vec::new();
    let (mut total_rps, mut secs) = (0.0, 0.0);
    let (mut all_before, mut all_after): (Vec<Scrape>, Vec<Scrape>) = (Vec::new(), Vec::new());
    for s in &v.stores {
        let st = v.status.get(&s.store_id);
        let pair = before.get(&s.store_id).zip(after.get(&s.store_id));
        let (mut rps, mut p99, mut cpu) = (None, None, None);
        if let Some(((t0, a), (t1, b))) = pair {
            let dt = t1.saturating_duration_since(*t0).as_secs_f64();
            if dt > 0.0 {
                let r = (b.requests - a.requests).max(0.0) / dt;
                rps = Some(r);
                total_rps += r;
                secs = dt;
                p99 = quantile(0.99, &a.buckets, &b.buckets).map(|x| x * 1000.0);
                cpu = a
                    .cpu_seconds
                    .zip(b.cpu_seconds)
                    .map(|(x, y)| (y - x).max(0.0) / dt * 100.0);
                all_before.push(a.clone());
                all_after.push(b.clone());
            }
        }
        rows.push(StoreRow {
            id: s.store_id,
            address: s.address.clone(),
            state: admin::state_name(s.state).to_string(),
            ranges: st.map_or(s.range_count, |x| x.replicas),
            leaders: st.map_or(s.leader_count, |x| x.leaders),
            leader_qps: st.map(|x| x.leader_qps),
            requests_per_sec: rps,
            p99_ms: p99,
            cpu_percent: cpu,
        });
    }
    rows.sort_by_key(|r| r.id);
    // The p99 of all stores: their buckets added up (the bounds are the same everywhere).
    let merge = |xs: &[Scrape]| -> Vec<(f64, f64)> {
        let mut m: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for x in xs {
            for (le, c) in &x.buckets {
                m.entry(le.to_bits()).or_insert((*le, 0.0)).1 += c;
            }
        }
        let mut b: Vec<(f64, f64)> = m.into_values().collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    };
    let now = now_ms();
    let mut operators: Vec<OperatorRow> = v
        .operators
        .iter()
        .map(|o| OperatorRow {
            range_id: o.range_id,
            kind: o.kind.clone(),
            description: o.description.clone(),
            step: format!("{}/{} {}", o.step, o.steps, o.step_name),
            origin: o.origin.clone(),
            running_secs: now.saturating_sub(o.started_ms) as f64 / 1000.0,
        })
        .collect();
    operators.sort_by_key(|o| o.range_id);
    Frame {
        placement_leader: v.leader.clone(),
        ranges: v.ranges.len(),
        leaderless_ranges: v.ranges.iter().filter(|r| r.leader_store_id == 0).count(),
        stores_up: v.stores.iter().filter(|s| s.state == pb::StoreState::Up as i32).count(),
        requests_per_sec: total_rps,
        p99_ms: quantile(0.99, &merge(&all_before), &merge(&all_after)).map(|x| x * 1000.0),
        read_qps: v.stats.values().map(|s| s.read_qps).sum(),
        write_qps: v.stats.values().map(|s| s.write_qps).sum(),
        interval_secs: secs,
        stores: rows,
        operators,
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

/// The frame as text (what the terminal shows).
pub fn render(f: &Frame) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "skv top   placement leader: {}\n",
        f.placement_leader.as_deref().unwrap_or("none")
    ));
    out.push_str(&format!(
        "stores up {}/{}   ranges {} ({} without leader)   store requests/s {:.0}   p99 {} ms   load qps read {:.0} write {:.0}\n\n",
        f.stores_up,
        f.stores.len(),
        f.ranges,
        f.leaderless_ranges,
        f.requests_per_sec,
        opt(f.p99_ms, 2),
        f.read_qps,
        f.write_qps,
    ));
    let header = [
        "STORE",
        "ADDRESS",
        "STATE",
        "RANGES",
        "LEADERS",
        "LEADER QPS",
        "REQ/S",
        "P99 MS",
        "CPU %",
    ];
    let mut rows = Vec::new();
    for s in &f.stores {
        rows.push(vec![
            format!("s{}", s.id),
            s.address.clone(),
            s.state.clone(),
            s.ranges.to_string(),
            s.leaders.to_string(),
            opt(s.leader_qps, 0),
            opt(s.requests_per_sec, 0),
            opt(s.p99_ms, 2),
            opt(s.cpu_percent, 0),
        ]);
    }
    out.push_str(&crate::output::table(&header, &rows));
    out.push_str(&format!("\noperators in flight: {}\n", f.operators.len()));
    if !f.operators.is_empty() {
        let header = ["RANGE", "KIND", "STEP", "ORIGIN", "RUNNING", "WHAT"];
        let mut rows = Vec::new();
        for o in &f.operators {
            rows.push(vec![
                format!("r{}", o.range_id),
                o.kind.clone(),
                o.step.clone(),
                o.origin.clone(),
                format!("{:.0}s", o.running_secs),
                o.description.clone(),
            ]);
        }
        out.push_str(&crate::output::table(&header, &rows));
    }
    out
}

pub async fn run(g: &Global, a: &TopArgs) -> Result<ExitCode> {
    let interval = a.interval.max(Duration::from_millis(100));
    let v = read_placement(g).await?;
    let mut before = scrape_all(&v.stores).await;
    if a.once {
        tokio::time::sleep(interval).await;
        let v = read_placement(g).await?;
        let after = scrape_all(&v.stores).await;
        let f = frame(&v, &before, &after);
        match g.output {
            Output::Json => println!("{}", serde_json::to_string(&f)?),
            Output::Table => print!("{}", render(&f)),
        }
        return Ok(0);
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            _ = tokio::time::sleep(interval) => {}
        }
        let text = match read_placement(g).await {
            Ok(v) => {
                let after = scrape_all(&v.stores).await;
                let f = frame(&v, &before, &after);
                before = after;
                render(&f)
            }
            Err(e) => format!("skv top: placement: {e:#}\n"),
        };
        // Clear the screen, cursor home, then the frame.
        print!("\x1b[2J\x1b[H{text}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE skv_storenode_requests counter
skv_storenode_requests_total{rpc=\"Get\",outcome=\"ok\"} 10
skv_storenode_requests_total{rpc=\"Write\",outcome=\"ok\"} 5
skv_storenode_requests_total_other 99
skv_storenode_request_duration_seconds_bucket{le=\"0.001\",rpc=\"Get\"} 4
skv_storenode_request_duration_seconds_bucket{le=\"0.01\",rpc=\"Get\"} 10
skv_storenode_request_duration_seconds_bucket{le=\"+Inf\",rpc=\"Get\"} 10
skv_storenode_request_duration_seconds_bucket{le=\"0.001\",rpc=\"Write\"} 0
skv_storenode_request_duration_seconds_bucket{le=\"0.01\",rpc=\"Write\"} 4
skv_storenode_request_duration_seconds_bucket{le=\"+Inf\",rpc=\"Write\"} 5
skv_storenode_request_duration_seconds_sum{rpc=\"Write\"} 3.5
process_cpu_seconds_total 12.5
# EOF
";

    #[test]
    fn a_scrape_sums_methods_and_buckets() {
        let s = parse_scrape(TEXT);
        assert_eq!(s.requests, 15.0);
        assert_eq!(s.buckets, vec![(0.001, 4.0), (0.01, 14.0), (f64::INFINITY, 15.0)]);
        assert_eq!(s.cpu_seconds, Some(12.5));
        assert_eq!(parse_scrape("garbage\n{}\n"), Scrape::default());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_of_the_difference() {
        let before = [(0.001, 4.0), (0.01, 14.0), (f64::INFINITY, 15.0)];
        // 100 new observations: 50 under 1 ms, 50 between 1 and 10 ms.
        let after = [(0.001, 54.0), (0.01, 114.0), (f64::INFINITY, 115.0)];
        let p50 = quantile(0.5, &before, &after).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p99 = quantile(0.99, &before, &after).unwrap();
        assert!((p99 - (0.001 + 0.009 * 49.0 / 50.0)).abs() < 1e-9, "{p99}");
        // Nothing new: no quantile.
        assert_eq!(quantile(0.99, &after, &after), None);
        assert_eq!(quantile(0.99, &[], &[]), None);
        // Everything above the last finite bound: that bound.
        assert_eq!(quantile(0.99, &[], &[(0.01, 0.0), (f64::INFINITY, 3.0)]), Some(0.01));
        // Since the start.
        assert_eq!(quantile(0.5, &[], &[(1.0, 2.0), (f64::INFINITY, 2.0)]), Some(0.5));
    }

    #[test]
    fn a_frame_renders_stores_and_operators() {
        let v = View {
            leader: Some("pd-1 (127.0.0.1:7000)".into()),
            stores: vec![pb::StoreInfo {
                store_id: 2,
                address: "127.0.0.1:7200".into(),
                state: pb::StoreState::Up as i32,
                range_count: 3,
                leader_count: 1,
                metrics_address: "127.0.0.1:7201".into(),
                ..Default::default()
            }],
            ranges: vec![pb::RangeInfo::default()],
            status: HashMap::new(),
            stats: HashMap::new(),
            operators: vec![pb::OperatorInfo {
                range_id: 7,
                kind: "split".into(),
                description: "at key".into(),
                step: 1,
                steps: 2,
                step_name: "propose".into(),
                started_ms: now_ms(),
                origin: "admin".into(),
            }],
        };
        let t0 = Instant::now();
        let before: Scrapes = [(2, (t0, parse_scrape(TEXT)))].into();
        let mut later = parse_scrape(TEXT);
        later.requests += 20.0;
        let after: Scrapes = [(2, (t0 + Duration::from_secs(2), later))].into();
        let f = frame(&v, &before, &after);
        assert_eq!(f.stores[0].requests_per_sec, Some(10.0));
        assert_eq!(f.requests_per_sec, 10.0);
        assert_eq!(f.stores[0].p99_ms, None, "no new latency observations");
        assert_eq!(f.leaderless_ranges, 1);
        let text = render(&f);
        assert!(text.contains("s2"), "{text}");
        assert!(text.contains("operators in flight: 1"), "{text}");
        assert!(text.contains("r7"), "{text}");
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["stores"][0]["leaders"], 1);
        assert_eq!(json["operators"][0]["kind"], "split");
    }
}
