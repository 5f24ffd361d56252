//! Process metrics and build info, added to every `/metrics` answer by
//! [`crate::telemetry::serve_metrics`] (ADR 0024).
//!
//! Read from `/proc/self` at each scrape (a few small file reads; nothing on the data path):
//! the usual `process_*` families of the Prometheus client libraries, under their usual
//! names so existing dashboards and rules work:
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_threads`, `process_start_time_seconds`. On a system without `/proc` the
//! families are left out (never an error). `skv_build_info{version,profile,arch,os} 1`
//! names the build.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// What one read of `/proc/self/stat` gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// User + system CPU, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    /// Start time after boot, in clock ticks.
    pub start_ticks: u64,
    pub vsize_bytes: u64,
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from the last `)`.
pub fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        cpu_ticks: num(14)?.saturating_add(num(15)?),
        threads: num(20)?,
        start_ticks: num(22)?,
        vsize_bytes: num(23)?,
        rss_pages: num(24)?,
    })
}

/// `btime` (boot time, seconds since the epoch) from `/proc/stat`.
pub fn parse_btime(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of open files from `/proc/<pid>/limits` (None when unlimited).
pub fn parse_max_fds(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Registers the process families, as read now, into `reg` (a registry built per scrape).
pub fn register_process(reg: &mut Registry) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(st) = parse_stat(&stat) else {
        return;
    };
    let hz = clock_ticks();
    let cpu: Counter<f64, AtomicU64> = Counter::default();
    cpu.inc_by(st.cpu_ticks as f64 / hz as f64);
    reg.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );
    let gauge = |v: u64| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    reg.register(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        gauge(st.rss_pages.saturating_mul(page_size())),
    );
    reg.register(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        gauge(st.vsize_bytes),
    );
    reg.register("process_threads", "OS threads of the process", gauge(st.threads));
    if let Some(btime) = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(parse_btime)
    {
        let g: Gauge<f64, AtomicU64> = Gauge::default();
        g.set(btime as f64 + st.start_ticks as f64 / hz as f64);
        reg.register(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            g,
        );
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        reg.register(
            "process_open_fds",
            "Number of open file descriptors",
            gauge(dir.count() as u64),
        );
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(parse_max_fds)
    {
        reg.register("process_max_fds", "Maximum number of open file descriptors", gauge(max));
    }
}

/// Registers `skv_build_info{version,profile,arch,os} 1`.
pub fn register_build_info(reg: &mut Registry) {
    let f: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
    f.get_or_create(&vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("profile", if cfg!(debug_assertions) { "debug" } else { "release" }),
        ("arch", std::env::consts::ARCH),
        ("os", std::env::consts::OS),
    ])
    .set(1);
    reg.register(
        "skv_build_info",
        "Build of this binary (always 1; the labels say which)",
        f,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_count_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as the kernel writes it.
        let s = "4242 (skv (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 \
                 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.cpu_ticks, 300);
        assert_eq!(st.threads, 7);
        assert_eq!(st.start_ticks, 123_456);
        assert_eq!(st.vsize_bytes, 987_654_321);
        assert_eq!(st.rss_pages, 2048);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn btime_and_limits() {
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_btime("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        assert_eq!(
            parse_max_fds("Max open files            unlimited            unlimited            files\n"),
            None
        );
    }

    #[test]
    fn this_process_is_measured() {
        let mut reg = Registry::default();
        register_process(&mut reg);
        register_build_info(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for family in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "process_threads ",
        ] {
            assert!(out.contains(family), "{family} missing in\n{out}");
        }
        assert!(out.contains("skv_build_info{version=\""), "{out}");
        let rss: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(rss > 1_000_000.0, "rss {rss}");
        let start: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "start {start} now {now}"
        );
    }
}
