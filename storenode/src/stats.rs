//! Measurements a storenode reports to placement: the file system of its data directory
//! (statvfs), its process CPU (/proc/self/stat), its machine's idle CPU (/proc/stat), and
//! the approximate size and key count of each range, kept incrementally by apply.
//!
//! ## Range size and key count
//! Apply knows, for every write, whether the key was live before (versions are kept, so the
//! old record is read anyway) and how large its old value was; it adds or subtracts
//! `key + value` bytes and one key per live key created or deleted. Tombstones count for
//! neither. The counters are persisted in `meta: stats/<range>` **in the same atomic batch
//! as the applied state**, tagged with the applied index they match: after a crash they are
//! exactly as of the applied index (no drift), and a replica whose stored counters do not
//! match its applied index (a snapshot install, or data written before counters existed) is
//! recounted by one scan of its span when it opens. The write is a few bytes per apply batch
//! (not per entry). After a split, the split apply counts the right half by one scan of its
//! span (exact; O(right half)), and the left keeps the rest.

use crate::engine::{Engine, data_range, decode_record, io_err};
use serde::{Deserialize, Serialize};
use skv_common::RangeId;
use std::io;
use std::path::Path;
use std::time::Instant;

/// The persisted counters of one range, as of `applied_index`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeStats {
    /// Sum of key + value lengths of the live keys.
    pub bytes: u64,
    /// Live keys (tombstones excluded).
    pub keys: u64,
    pub applied_index: u64,
}

pub fn stats_key(range: RangeId) -> Vec<u8> {
    let mut k = b"stats/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}

pub fn encode_stats(s: &RangeStats) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(s).map_err(io_err)
}

/// The stored counters of `range`, if any (garbage reads as none: it is recounted).
pub fn load_stats(engine: &Engine, range: RangeId) -> io::Result<Option<RangeStats>> {
    Ok(engine
        .meta
        .get(stats_key(range))
        .map_err(io_err)?
        .and_then(|v| postcard::from_bytes(&v).ok()))
}

/// Counts the live keys of `[start, end)` and their key + value bytes (one scan).
pub fn count_span(engine: &Engine, start: &[u8], end: &[u8]) -> io::Result<(u64, u64)> {
    let (mut bytes, mut keys) = (0u64, 0u64);
    for g in engine.data.range::<&[u8], _>(data_range(start, end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        if let Some(r) = decode_record(&v)
            && r.is_live()
        {
            keys += 1;
            bytes += (k.len() + v.len().saturating_sub(8)) as u64;
        }
    }
    Ok((bytes, keys))
}

/// Picks the key that halves `[start, end)` by live bytes: the first live key (never the
/// first live key of the span, never `start`) before which at least half of the bytes lie.
/// `None` when the span holds fewer than 2 live keys.
pub fn size_median_key(engine: &Engine, start: &[u8], end: &[u8]) -> io::Result<Option<Vec<u8>>> {
    use fjall::Readable;
    let snap = engine.db.snapshot();
    // Total first (the approximate counters could be stale by a few writes; one more scan
    // of a range that is being split anyway is cheap next to the split itself).
    let mut total = 0u64;
    let mut keys = 0u64;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(start, end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        if decode_record(&v).is_some_and(|r| r.is_live()) {
            total += (k.len() + v.len().saturating_sub(8)) as u64;
            keys += 1;
        }
    }
    if keys < 2 {
        return Ok(None);
    }
    let half = total / 2;
    let mut acc = 0u64;
    let mut first = true;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(start, end)) {
        let (k, v) = g.into_inner().map_err(io_err)?;
        if !decode_record(&v).is_some_and(|r| r.is_live()) {
            continue;
        }
        if !first && acc >= half && k.as_ref() != start {
            return Ok(Some(k.to_vec()));
        }
        first = false;
        acc += (k.len() + v.len().saturating_sub(8)) as u64;
    }
    // Half lies in the last key: split before it (there are at least 2 live keys).
    let mut last = None;
    for g in snap.range::<&[u8], _>(&engine.data, data_range(start, end)).rev() {
        let (k, v) = g.into_inner().map_err(io_err)?;
        if decode_record(&v).is_some_and(|r| r.is_live()) {
            last = Some(k.to_vec());
            break;
        }
    }
    Ok(last.filter(|k| k.as_slice() != start))
}

/// Size, free space (for non-root users) and the engine's own use of the data directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub capacity_bytes: u64,
    pub available_bytes: u64,
}

/// statvfs of `dir`; zeros if it cannot be read.
pub fn disk_stats(dir: &Path) -> DiskStats {
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let frag = if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize };
            DiskStats {
                capacity_bytes: s.f_blocks.saturating_mul(frag),
                available_bytes: s.f_bavail.saturating_mul(frag),
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, dir = %dir.display(), "statvfs failed");
            DiskStats::default()
        }
    }
}

/// Process CPU between two calls, in thousandths of one core (Linux: /proc/self/stat;
/// elsewhere always 0).
pub struct CpuMeter {
    last: Option<(Instant, u64)>,
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuMeter {
    pub fn new() -> Self {
        Self {
            last: process_cpu_ticks().map(|t| (Instant::now(), t)),
        }
    }

    /// CPU used since the previous call (or since `new`), in permille of one core.
    pub fn sample(&mut self) -> u64 {
        let now = Instant::now();
        let Some(ticks) = process_cpu_ticks() else {
            return 0;
        };
        let prev = self.last.replace((now, ticks));
        let Some((at, before)) = prev else {
            return 0;
        };
        let secs = now.duration_since(at).as_secs_f64();
        if secs <= 0.0 {
            return 0;
        }
        let hz = rustix::param::clock_ticks_per_second() as f64;
        if hz <= 0.0 {
            return 0;
        }
        let cpu_secs = ticks.saturating_sub(before) as f64 / hz;
        (cpu_secs / secs * 1000.0).round() as u64
    }
}

/// Idle CPU of the whole machine, in thousandths of one core: an exponentially weighted
/// mean of the samples taken at each call (half-life [`HOST_IDLE_HALF_LIFE`], so about the
/// last 10 s; Linux: `/proc/stat`; elsewhere `None`). Placement reads it to tell whether a
/// load split can put half of a range's work on idle CPU (ADR 0036). A container sees the
/// host's `/proc/stat`: the figure is the machine's, not a CPU quota's.
pub struct HostCpuMeter {
    last: Option<(Instant, HostCpuTicks)>,
    mean: Option<f64>,
}

/// How fast the mean follows a change: a step is half followed after this long.
pub const HOST_IDLE_HALF_LIFE: std::time::Duration = std::time::Duration::from_secs(7);

impl Default for HostCpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCpuMeter {
    pub fn new() -> Self {
        Self {
            last: host_cpu_ticks().map(|t| (Instant::now(), t)),
            mean: None,
        }
    }

    /// Takes a sample and returns the mean so far (`None` until two readings exist, or
    /// where `/proc/stat` cannot be read).
    pub fn sample(&mut self) -> Option<u64> {
        let now = Instant::now();
        let ticks = host_cpu_ticks()?;
        let (at, before) = self.last.replace((now, ticks))?;
        let idle = ticks.idle_millicpus_since(&before)?;
        Some(self.fold(idle as f64, now.duration_since(at)))
    }

    /// Adds one interval's idle CPU (`idle`, over `dt`) to the mean; returns the mean.
    fn fold(&mut self, idle: f64, dt: std::time::Duration) -> u64 {
        let mean = match self.mean {
            None => idle,
            Some(m) => {
                // The weight of the new sample: 1 − 2^(−dt / half-life).
                let w = 1.0 - (-dt.as_secs_f64() / HOST_IDLE_HALF_LIFE.as_secs_f64()).exp2();
                m + (idle - m) * w
            }
        };
        self.mean = Some(mean);
        mean.round().max(0.0) as u64
    }
}

/// The `cpu` line of /proc/stat: idle ticks (idle + iowait), all ticks, and the number of
/// CPUs (`cpuN` lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HostCpuTicks {
    idle: u64,
    total: u64,
    cpus: u64,
}

impl HostCpuTicks {
    /// Idle CPU between `before` and `self`, in thousandths of one core.
    fn idle_millicpus_since(&self, before: &HostCpuTicks) -> Option<u64> {
        let total = self.total.checked_sub(before.total).filter(|t| *t > 0)?;
        let idle = self.idle.checked_sub(before.idle)?.min(total);
        Some(((idle as f64 / total as f64) * self.cpus as f64 * 1000.0).round() as u64)
    }
}

fn host_cpu_ticks() -> Option<HostCpuTicks> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&s)
}

/// `cpu  user nice system idle iowait irq softirq steal [guest guest_nice]`: the total is
/// the first eight fields (guest time is already counted in user and nice), idle is idle +
/// iowait; the CPUs are the `cpuN` lines.
fn parse_proc_stat(stat: &str) -> Option<HostCpuTicks> {
    let mut lines = stat.lines();
    let first = lines.next()?;
    let mut f = first.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
    if v.len() < 5 {
        return None;
    }
    let cpus = lines
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u64;
    if cpus == 0 {
        return None;
    }
    Some(HostCpuTicks {
        idle: v[3] + v[4],
        total: v.iter().sum(),
        cpus,
    })
}

/// utime + stime of this process in clock ticks.
fn process_cpu_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_ticks(&s)
}

/// Fields 14 and 15 (utime, stime) of /proc/<pid>/stat; the command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ")": field 3 (state) is index 0, so utime (14) is index 11, stime (15) index 12.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{encode_tombstone, encode_value};
    use crate::metrics::Metrics;
    use std::time::Duration;

    #[test]
    fn proc_stat_cpu_fields_are_found_after_the_command_name() {
        let line = "1234 (my (odd) cmd) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 4 0 100 200 300";
        assert_eq!(parse_cpu_ticks(line), Some(200));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
        #[cfg(target_os = "linux")]
        assert!(process_cpu_ticks().is_some());
    }

    #[test]
    fn host_idle_cpu_from_proc_stat() {
        let a =
            "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\ncpu1 50 0 25 400 25 0 0 0 0 0\nintr 1 2\n";
        let b = "cpu  200 0 100 900 50 0 0 0 0 0\ncpu0 1 0 0 0 0 0 0 0 0 0\ncpu1 1 0 0 0 0 0 0 0 0 0\n";
        let (ta, tb) = (parse_proc_stat(a).unwrap(), parse_proc_stat(b).unwrap());
        assert_eq!(
            ta,
            HostCpuTicks {
                idle: 850,
                total: 1000,
                cpus: 2
            }
        );
        // 250 ticks passed, 100 of them idle: 40% of 2 CPUs = 0.8 of one core.
        assert_eq!(tb.idle_millicpus_since(&ta), Some(800));
        // No time passed, or the counters went back: no figure.
        assert_eq!(ta.idle_millicpus_since(&ta), None);
        assert_eq!(ta.idle_millicpus_since(&tb), None);
        for bad in [
            "",
            "garbage",
            "cpu  1 2 x 4 5",
            "cpu  1 2 3\ncpu0 1 2 3 4 5",
            "cpu  1 2 3 4 5 6 7 8\n",
        ] {
            assert_eq!(parse_proc_stat(bad), None, "{bad:?}");
        }
        #[cfg(target_os = "linux")]
        {
            let t = host_cpu_ticks().unwrap();
            assert!(t.cpus >= 1 && t.idle <= t.total);
        }
    }

    #[test]
    fn host_idle_cpu_mean_follows_a_step_by_its_half_life() {
        let mut m = HostCpuMeter { last: None, mean: None };
        assert_eq!(m.fold(2000.0, Duration::from_secs(1)), 2000);
        // A drop to 0 is half followed after one half-life, whatever the sampling steps.
        let mut got = 0;
        for _ in 0..7 {
            got = m.fold(0.0, Duration::from_secs(1));
        }
        assert_eq!(got, 1000);
        let mut n = HostCpuMeter {
            last: None,
            mean: Some(2000.0),
        };
        assert_eq!(n.fold(0.0, HOST_IDLE_HALF_LIFE), 1000);
    }

    #[test]
    fn disk_stats_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk_stats(dir.path());
        assert!(d.capacity_bytes > 0);
        assert!(d.available_bytes <= d.capacity_bytes);
        assert_eq!(disk_stats(Path::new("/no/such/dir")), DiskStats::default());
    }

    #[test]
    fn counting_and_the_size_median_skip_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), Metrics::new()).unwrap();
        assert_eq!(size_median_key(&e, b"", b"").unwrap(), None);
        e.data.insert(b"a", encode_value(1, &[0u8; 99])).unwrap();
        assert_eq!(size_median_key(&e, b"", b"").unwrap(), None);
        e.data.insert(b"b", encode_tombstone(3)).unwrap();
        assert_eq!(size_median_key(&e, b"", b"").unwrap(), None);
        e.data.insert(b"c", encode_value(1, &[0u8; 9])).unwrap();
        assert_eq!(count_span(&e, b"", b"").unwrap(), (100 + 10, 2));
        // Two keys: the second starts the right half, whatever the sizes.
        assert_eq!(size_median_key(&e, b"", b"").unwrap(), Some(b"c".to_vec()));
        for i in 0..10u8 {
            e.data.insert([b'd', i], encode_value(1, &[0u8; 8])).unwrap();
        }
        // 100 (a) + 10 (c) + 10 × 10 (d*): half is 105, reached after "a" and "c".
        assert_eq!(size_median_key(&e, b"", b"").unwrap(), Some(vec![b'd', 0]));
        // Without "a": 10 + 100, half 55 → after c and 4 d keys (10 + 40 = 50 < 55, 60 ≥ 55).
        assert_eq!(size_median_key(&e, b"b", b"").unwrap(), Some(vec![b'd', 5]));
        assert_eq!(count_span(&e, b"b", b"d").unwrap(), (10, 1));
        // Never the range start.
        assert_eq!(size_median_key(&e, b"c", b"d\x02").unwrap(), Some(vec![b'd', 1]));
    }
}
