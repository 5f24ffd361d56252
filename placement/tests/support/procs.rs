//! Placement as a real process (the `skv-placement` binary), killed by PID on drop.

use std::process::{Child, Command, Stdio};

pub struct ProcGuard {
    child: Option<Child>,
    pub addr: String,
}

impl ProcGuard {
    /// Spawns `bin` with `args`; `addr` is the gRPC address it will listen on.
    pub fn spawn(bin: &str, args: &[String], addr: String) -> Self {
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn process");
        Self {
            child: Some(child),
            addr,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL by PID (a crash: no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
