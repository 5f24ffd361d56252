//! `skv-lazyfs --backing DIR --mount DIR`: mounts the filesystem and serves it until a
//! signal. SIGUSR1 pulls the plug (every unsynced write and name is dropped at once, later
//! requests fail with EIO); SIGTERM or SIGINT unmounts and exits. Either way nothing that
//! was not fsynced reaches the backing directory: the process is the power domain.
//!
//! `--delay-file FILE` makes the disk slow at run time (ADR 0030): the file holds a number
//! of milliseconds that every `write`, `fsync` and `fsyncdir` waits before it runs; it is
//! read every 100 ms, and a missing or empty file means full speed.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "skv-lazyfs",
    about = "Mount a lazyfs-style FUSE filesystem over a backing directory"
)]
struct Args {
    /// Directory that holds what was made durable (created if missing).
    #[arg(long)]
    backing: PathBuf,
    /// Where to mount (an existing, empty directory).
    #[arg(long)]
    mount: PathBuf,
    /// File holding the slow-disk delay in milliseconds (re-read every 100 ms; missing or
    /// empty: no delay).
    #[arg(long)]
    delay_file: Option<PathBuf>,
}

/// The delay a `--delay-file` asks for: `Ok(0)` when missing or empty, an error text when
/// it holds something else than a number of milliseconds.
fn read_delay(path: &std::path::Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Ok(0),
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            format!(
                "{}: {:?} is not a number of milliseconds: {e}",
                path.display(),
                s.trim()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    // Block the signals in every thread (the FUSE threads inherit the mask), then wait for
    // them here.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain libc signal-set calls on a set we own.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mounted = match skv_lazyfs::mount(&args.backing, &args.mount) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skv-lazyfs: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(backing = %args.backing.display(), mount = %args.mount.display(), "lazyfs mounted");
    let mut last_bad = String::new();
    loop {
        if let Some(f) = &args.delay_file {
            match read_delay(f) {
                Ok(ms) => {
                    let d = std::time::Duration::from_millis(ms);
                    if mounted.switch().delay() != d {
                        tracing::warn!(delay_ms = ms, "lazyfs: slow-disk delay set");
                        eprintln!("skv-lazyfs: delay {ms} ms");
                        mounted.switch().set_delay(d);
                    }
                }
                Err(e) if e != last_bad => {
                    eprintln!("skv-lazyfs: bad delay file: {e}");
                    last_bad = e;
                }
                Err(_) => {}
            }
        }
        let timeout = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        // SAFETY: waits on the set built above, at most 100 ms.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig < 0 {
            continue;
        }
        if sig == libc::SIGUSR1 {
            let s = mounted.switch().power_loss();
            tracing::warn!(
                fsyncs = s.fsyncs,
                fsyncdirs = s.fsyncdirs,
                bytes_synced = s.bytes_synced,
                unsynced_bytes_dropped = s.unsynced_bytes,
                "lazyfs: power loss, unsynced writes dropped"
            );
            eprintln!("skv-lazyfs: power loss: dropped {} unsynced bytes", s.unsynced_bytes);
            continue;
        }
        let s = mounted.switch().stats();
        tracing::info!(
            fsyncs = s.fsyncs,
            unsynced_bytes_dropped = s.unsynced_bytes,
            "lazyfs: unmounting"
        );
        return match mounted.unmount() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("skv-lazyfs: unmount: {e}");
                ExitCode::from(1)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::read_delay;

    #[test]
    fn the_delay_file_is_a_number_of_milliseconds() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("delay");
        assert_eq!(read_delay(&f), Ok(0));
        std::fs::write(&f, "250\n").unwrap();
        assert_eq!(read_delay(&f), Ok(250));
        std::fs::write(&f, "").unwrap();
        assert_eq!(read_delay(&f), Ok(0));
        std::fs::write(&f, "fast").unwrap();
        assert!(read_delay(&f).is_err());
    }
}
