//! A real single-member etcd (`/usr/bin/etcd`, 3.4+) on random 127.0.0.1 ports, in a temp
//! dir, killed by PID when the guard drops (also when the test panics).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdGuard {
    child: Option<Child>,
    pub endpoint: String,
    pub dir: PathBuf,
}

impl EtcdGuard {
    /// Starts etcd and waits until it answers on its client port.
    pub fn start() -> Self {
        let bin = std::env::var("SKV_ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".to_string());
        for attempt in 0..3 {
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "skv-etcd-{}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                attempt
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create etcd dir");
            let (client, peer) = (super::free_port(), super::free_port());
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
            let child = Command::new(&bin)
                .arg("--data-dir")
                .arg(dir.join("data"))
                .args(["--name", "default"])
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn etcd");
            let mut guard = EtcdGuard {
                child: Some(child),
                endpoint: client_url,
                dir,
            };
            if guard.wait_ready(Duration::from_secs(20)) {
                return guard;
            }
            eprintln!(
                "etcd did not start (attempt {attempt}); log:\n{}",
                std::fs::read_to_string(guard.dir.join("etcd.log")).unwrap_or_default()
            );
            guard.kill();
        }
        panic!("could not start etcd");
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            // etcd answers /health once it has a leader.
            if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                if out.contains("\"health\":\"true\"") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The PID of the etcd process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills etcd (SIGKILL by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
