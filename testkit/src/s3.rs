//! A real S3-compatible server for tests: `s3s-fs` (crates.io), installed by
//! `scripts/test.sh` under `target/s3s-fs/bin` (or named by `SKV_S3S_FS`), started on
//! 127.0.0.1 on a free port over a temporary directory, killed by PID on drop.

use crate::process::{ChildGuard, free_port, repo_root};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "skvtestaccess";
pub const SECRET_KEY: &str = "skvtestsecret0123456789";

/// The s3s-fs binary: `SKV_S3S_FS`, else `target/s3s-fs/bin/s3s-fs`.
pub fn s3s_fs_path() -> PathBuf {
    let p = std::env::var_os("SKV_S3S_FS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/s3s-fs/bin/s3s-fs"));
    assert!(
        p.exists(),
        "{} not found: install it with `cargo install s3s-fs --version 0.14.1 --locked --features binary --root target/s3s-fs` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A running s3s-fs.
pub struct S3Server {
    guard: Option<ChildGuard>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl S3Server {
    /// Starts s3s-fs with one empty bucket per name in `buckets`.
    pub fn start(buckets: &[&str]) -> S3Server {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        for b in buckets {
            std::fs::create_dir_all(dir.path().join(b)).unwrap_or_else(|e| panic!("bucket dir: {e}"));
        }
        let mut s = S3Server {
            guard: None,
            dir,
            port: free_port(),
        };
        s.restart();
        s
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `AWS_*` variables a client needs to reach it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Kills the server (the data stays in its directory).
    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.kill();
        }
    }

    /// (Re)starts the server on the same port and directory; returns once it accepts.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(s3s_fs_path());
        cmd.arg("--host")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--access-key")
            .arg(ACCESS_KEY)
            .arg("--secret-key")
            .arg(SECRET_KEY)
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let g = ChildGuard::spawn("s3s-fs", &mut cmd).unwrap_or_else(|e| panic!("start s3s-fs: {e}"));
        self.guard = Some(g);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.guard.as_ref().map(|g| g.pid()).unwrap_or(0)
    }
}
