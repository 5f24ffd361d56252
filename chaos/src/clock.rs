//! The `clock` nemesis (issue 14): one process's wall clock (`CLOCK_REALTIME`) jumps forward
//! or back by tens of seconds for a few seconds while its monotonic clock runs on, as Jepsen
//! does it: every process of the cluster runs under libfaketime (Debian's `faketime`) with a
//! clock file of its own (`<dir>/<name>.clock`, re-read at every clock call:
//! `FAKETIME_NO_CACHE=1`, monotonic clocks left alone: `FAKETIME_DONT_FAKE_MONOTONIC=1`),
//! and the nemesis writes offsets (`+37s`, `-22s`) into one process's file.
//!
//! A jump counts as made only if the process has libfaketime mapped (`/proc/PID/maps`), so a
//! fault that could not take is reported FAILED, not silently run.

use crate::cluster::{ClusterError, Role};
use crate::nemesis::Ctx;
use rand::Rng;
use rand::rngs::StdRng;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where Debian's `faketime` package puts the library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The clock file's text for an offset of `secs` seconds (libfaketime's relative format).
pub fn offset_text(secs: i64) -> String {
    format!("{secs:+}s\n")
}

/// Writes the offset into `file` atomically (a temporary file renamed over it: libfaketime
/// re-reads the file at every clock call and must never see half of it).
pub fn write_offset(file: &Path, secs: i64) -> std::io::Result<()> {
    let tmp = file.with_extension("clock-tmp");
    std::fs::write(&tmp, offset_text(secs))?;
    std::fs::rename(&tmp, file)
}

/// Makes `cmd` run under libfaketime with clock file `file` (created at offset 0 when
/// missing). Fails when the library is not installed.
pub fn prepare(cmd: &mut Command, file: &Path) -> Result<(), ClusterError> {
    if !Path::new(LIBFAKETIME).exists() {
        return Err(ClusterError::NotReady(format!(
            "{LIBFAKETIME} is missing: the clock nemesis needs Debian's faketime (apt-get install faketime)"
        )));
    }
    if !file.exists() {
        write_offset(file, 0).map_err(|source| ClusterError::Io {
            what: format!("write {}", file.display()),
            source,
        })?;
    }
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", file)
        .env("FAKETIME_NO_CACHE", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    Ok(())
}

/// Puts every clock file under `dir` back to offset 0; returns what it did.
pub fn reset_all(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "clock") {
            let at_zero = std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == "+0s");
            if !at_zero {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match write_offset(&path, 0) {
                    Ok(()) => done.push(format!("clock of {name} back to +0s")),
                    Err(e) => done.push(format!("clock of {name}: reset failed: {e}")),
                }
            }
        }
    }
    done
}

/// Whether process `pid` has libfaketime mapped.
fn runs_under_faketime(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains("libfaketime"))
}

/// The jumps of one round: forward by `a` seconds, then back to `-b` (a backward jump of
/// `a + b`), then forward to 0. Tens of seconds each, signs in random order.
pub fn plan(rng: &mut impl Rng) -> [i64; 3] {
    let a = rng.random_range(10..=60i64);
    let b = rng.random_range(10..=60i64);
    if rng.random_bool(0.5) { [a, -b, 0] } else { [-a, b, 0] }
}

/// One round: picks a process (a storenode half the time, else a proxy or a placement
/// instance), jumps its wall clock as [`plan`] says, `hold` at each offset (the return to 0
/// at once after the last).
pub(crate) async fn fault(ctx: &Ctx, rng: &mut StdRng, hold: Duration, round: u64) {
    let (role, prefix) = match rng.random_range(0..4) {
        0 | 1 => (Role::Store, "store"),
        2 => (Role::Proxy, "proxy"),
        _ => (Role::Placement, "pd"),
    };
    let n = {
        let c = ctx.cluster.lock().await;
        match role {
            Role::Store => c.stores.len(),
            Role::Proxy => c.proxies.len(),
            Role::Placement => c.placements.len(),
        }
    };
    if n == 0 {
        return;
    }
    let i = rng.random_range(0..n);
    let name = format!("{prefix}-{i}");
    let Some((file, pid)) = ctx.cluster.lock().await.clock_of(role, i) else {
        ctx.event(
            "clock-jump",
            &name,
            format!("round {round}: FAILED: not run under libfaketime"),
        );
        return;
    };
    match pid {
        Some(pid) if runs_under_faketime(pid) => {}
        Some(pid) => {
            ctx.event(
                "clock-jump",
                &name,
                format!("round {round}: FAILED: pid {pid} has no libfaketime mapped"),
            );
            return;
        }
        None => {
            ctx.event("clock-jump", &name, format!("round {round}: FAILED: not running"));
            return;
        }
    }
    let steps = plan(rng);
    let mut prev = 0i64;
    for (k, secs) in steps.into_iter().enumerate() {
        let last = k == steps.len() - 1;
        match write_offset(&file, secs) {
            Ok(()) => {
                let kind = if last { "clock-restored" } else { "clock-jump" };
                ctx.event(
                    kind,
                    &name,
                    format!(
                        "round {round}: wall clock {:+}s -> {secs:+}s (a jump of {:+}s), monotonic untouched",
                        prev,
                        secs - prev
                    ),
                );
            }
            Err(e) => {
                ctx.event("clock-jump", &name, format!("round {round}: FAILED: {e}"));
                let _ = write_offset(&file, 0);
                return;
            }
        }
        prev = secs;
        if !last {
            tokio::time::sleep(hold).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn offsets_are_libfaketimes_relative_format() {
        assert_eq!(offset_text(37), "+37s\n");
        assert_eq!(offset_text(-22), "-22s\n");
        assert_eq!(offset_text(0), "+0s\n");
    }

    #[test]
    fn a_round_jumps_tens_of_seconds_both_ways_and_ends_at_zero() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let [a, b, c] = plan(&mut rng);
            assert!((10..=60).contains(&a.abs()) && (10..=60).contains(&b.abs()), "{a} {b}");
            assert!(a.signum() == -b.signum(), "one jump forward, one back: {a} {b}");
            assert_eq!(c, 0);
        }
    }

    #[test]
    fn a_process_under_libfaketime_reads_the_offset_of_its_clock_file() {
        if !Path::new(LIBFAKETIME).exists() {
            panic!("{LIBFAKETIME} missing: apt-get install faketime (scripts/test.sh installs it)");
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let file = dir.path().join("p.clock");
        write_offset(&file, 3600).unwrap_or_else(|e| panic!("write: {e}"));
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("date +%s");
        prepare(&mut cmd, &file).unwrap_or_else(|e| panic!("prepare: {e}"));
        let out = cmd.output().unwrap_or_else(|e| panic!("sh: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let faked: i64 = text.lines().next().and_then(|l| l.trim().parse().ok()).unwrap_or(0);
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        assert!(
            (faked - real - 3600).abs() <= 5,
            "date under libfaketime: {faked}, real {real}: expected an hour ahead"
        );
    }
}
