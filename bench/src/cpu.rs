//! Server CPU from /proc: `utime + stime` of given processes (all their threads) before
//! and after the measured phase, reported as CPU-seconds per 1000 operations.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CpuError {
    #[error("reading /proc/{pid}/stat: {message}")]
    Read { pid: u32, message: String },
    #[error("/proc/PID/stat is malformed: {0}")]
    Parse(String),
}

/// `utime + stime` in clock ticks from the text of `/proc/PID/stat`. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted after the
/// last `)`: field 3 (state) is the first, utime is field 14 and stime field 15.
pub fn parse_stat_ticks(stat: &str) -> Result<u64, CpuError> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| CpuError::Parse("no ')' after the command name".into()))?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64, CpuError> {
        fields
            .get(n - 3)
            .ok_or_else(|| CpuError::Parse(format!("only {} fields", fields.len() + 2)))?
            .parse::<u64>()
            .map_err(|e| CpuError::Parse(format!("field {n}: {e}")))
    };
    Ok(field(14)? + field(15)?)
}

/// The CPU ticks a process has used so far.
pub fn read_ticks(pid: u32) -> Result<u64, CpuError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| CpuError::Read {
        pid,
        message: e.to_string(),
    })?;
    parse_stat_ticks(&text)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

/// CPU used by the servers during the measured phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    pub pids: Vec<u32>,
    pub cpu_seconds: f64,
    /// CPU-seconds per 1000 successful operations.
    pub cpu_s_per_1000_ops: f64,
    /// Average cores busy over the measured phase.
    pub cores: f64,
}

/// Ticks of every PID at the start of the measured phase.
pub struct CpuSampler {
    pids: Vec<u32>,
    start: u64,
}

impl CpuSampler {
    pub fn start(pids: &[u32]) -> Result<Self, CpuError> {
        let mut start = 0;
        for &p in pids {
            start += read_ticks(p)?;
        }
        Ok(Self {
            pids: pids.to_vec(),
            start,
        })
    }

    pub fn finish(&self, ops: u64, elapsed_secs: f64) -> Result<CpuReport, CpuError> {
        let mut end = 0;
        for &p in &self.pids {
            end += read_ticks(p)?;
        }
        Ok(report(
            &self.pids,
            end.saturating_sub(self.start),
            ticks_per_second(),
            ops,
            elapsed_secs,
        ))
    }
}

/// The report for `ticks` used over `elapsed_secs` for `ops` operations.
pub fn report(pids: &[u32], ticks: u64, hz: u64, ops: u64, elapsed_secs: f64) -> CpuReport {
    let cpu_seconds = ticks as f64 / hz as f64;
    CpuReport {
        pids: pids.to_vec(),
        cpu_seconds,
        cpu_s_per_1000_ops: if ops > 0 {
            cpu_seconds / (ops as f64 / 1000.0)
        } else {
            0.0
        },
        cores: if elapsed_secs > 0.0 {
            cpu_seconds / elapsed_secs
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_and_stime_even_with_odd_command_names() {
        let rest = "S 1 2 3 4 5 6 7 8 9 10 250 70 1 2 20 0 8 0 100 200 300";
        for comm in ["etcd", "tokio worker", "a) b (c", ")"] {
            let line = format!("4242 ({comm}) {rest}");
            assert_eq!(parse_stat_ticks(&line), Ok(320), "comm {comm:?}");
        }
        assert!(matches!(parse_stat_ticks("4242 etcd S 1"), Err(CpuError::Parse(_))));
        assert!(matches!(parse_stat_ticks("1 (x) S 1 2"), Err(CpuError::Parse(_))));
        assert!(matches!(
            parse_stat_ticks("1 (x) S 1 2 3 4 5 6 7 8 9 10 x 70"),
            Err(CpuError::Parse(_))
        ));
    }

    #[test]
    fn reads_this_process_and_reports_per_1000_ops() {
        let me = std::process::id();
        let a = read_ticks(me).unwrap();
        // Burn a little CPU so the counter can only go up.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(read_ticks(me).unwrap() >= a);
        assert!(matches!(read_ticks(u32::MAX), Err(CpuError::Read { .. })));
        let r = report(&[1, 2], 250, 100, 5000, 10.0);
        assert_eq!((r.cpu_seconds, r.cpu_s_per_1000_ops, r.cores), (2.5, 0.5, 0.25));
        assert_eq!(report(&[1], 10, 100, 0, 0.0).cpu_s_per_1000_ops, 0.0);
        let s = CpuSampler::start(&[me]).unwrap();
        assert!(s.finish(1000, 1.0).unwrap().cpu_seconds >= 0.0);
    }
}
