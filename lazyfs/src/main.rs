//! `skv-lazyfs --backing DIR --mount DIR`: mounts the filesystem and serves it until a
//! signal. SIGUSR1 pulls the plug (every unsynced write and name is dropped at once, later
//! requests fail with EIO); SIGTERM or SIGINT unmounts and exits. Either way nothing that
//! was not fsynced reaches the backing directory: the process is the power domain.

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
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits on the set built above.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
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
