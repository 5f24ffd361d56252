//! Child processes killed by PID on drop, free ports, binary lookup, polling.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a child process to listen on, below the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by default), reserved for
/// this test process until it exits.
///
/// A port taken with `bind(0)` comes from the ephemeral range, which is also where the
/// kernel picks the local port of every outgoing connection: between releasing it here and the
/// child binding it, any of the many connections of concurrently running tests can be given
/// it, and the child then fails to start with EADDRINUSE (seen in CI: a placement's metrics
/// port). Ports below the range are only ever taken by an explicit bind.
///
/// That still leaves two tests (nextest runs each in its own process) picking the same port
/// between one's pick and its child's bind: seen in CI as a chaos cluster's client reaching
/// another test's server ("Unimplemented"). So each pick also takes an exclusive `flock` on
/// `<tmp>/skv-test-ports/<port>.lock` and keeps it open until the process exits (the kernel
/// drops the lock with the process, so a crashed test leaves nothing reserved); a port whose
/// lock another live test holds is skipped. Falls back to `bind(0)` when the range starts too
/// low to leave room or no lock can be taken.
pub fn free_port() -> u16 {
    use rand::Rng;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    if low > 12_000 {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let port = rng.random_range(10_000..low);
            let Some(lock) = reserve_port(port) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                RESERVED_PORTS
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(lock);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// The lock files of the ports [`free_port`] handed out, held until the process exits.
static RESERVED_PORTS: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());

/// Takes the exclusive lock of `port` among test processes; `None` if another holds it
/// (or the lock file cannot be opened).
fn reserve_port(port: u16) -> Option<std::fs::File> {
    let dir = std::env::temp_dir().join("skv-test-ports");
    std::fs::create_dir_all(&dir).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{port}.lock")))
        .ok()?;
    file.try_lock().ok()?;
    Some(file)
}

/// Path of a workspace binary (`skv-storenode`, `skvctl`, ...) in the same
/// target directory as the running test, or in `SKV_BIN_DIR` when set. `cargo build --bins`
/// must have run (the README's test command does it).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    // SKV_BIN_DIR: binaries built elsewhere (e.g. with --features skv-storenode/failpoints).
    if let Some(d) = std::env::var_os("SKV_BIN_DIR") {
        dir = PathBuf::from(d);
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (`cargo build --bins`)",
        path.display()
    );
    path
}

/// The workspace's root directory (deploy/, scripts/, target/ live there).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| panic!("no workspace root"))
}

/// Runs `cmd` to completion with no stdin, capturing its output (panics if it cannot start).
pub fn run_captured(cmd: &mut std::process::Command) -> std::process::Output {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// stdout then stderr of a finished command, as text (for assertion messages).
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout/stderr inherited unless the caller set them.
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> std::io::Result<Self> {
        let child = cmd.stdin(Stdio::null()).spawn()?;
        Ok(Self {
            name: name.into(),
            child: Some(child),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Mutable access to the child (to take its stdout, say).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// `kill -9` and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by PID (e.g. "INT", "STOP", "CONT") with `kill(1)`.
    pub fn signal(&self, sig: &str) -> std::io::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("kill -{sig} {} failed", self.pid())))
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            tracing::debug!(name = %self.name, pid = self.pid(), "killing child");
        }
        self.kill();
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_handed_out_stays_reserved_against_other_pickers() {
        let port = free_port();
        // Another test process opening the same lock file is refused (flock conflicts
        // between open file descriptions, in one process or in two).
        assert!(
            reserve_port(port).is_none(),
            "port {port} was handed out but is not reserved"
        );
        // The port itself is still free for the child to bind.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
        // And two picks never return the same port.
        let ports: std::collections::HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
        assert!(!ports.contains(&port));
    }
}
