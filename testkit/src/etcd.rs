//! A real etcd (the Debian `etcd-server` binary) in a temp dir, on random ports.

use crate::process::{ChildGuard, free_port};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A running single-member etcd, killed by PID on drop.
pub struct Etcd {
    /// `http://127.0.0.1:PORT`
    pub client_url: String,
    guard: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers. Panics with a hint when the
    /// binary is missing (the README's test command installs it).
    pub async fn start() -> Etcd {
        Self::start_inner(None).await
    }

    /// Starts etcd serving clients over TLS with `certs`' storenode certificate (any role's
    /// certificate names 127.0.0.1) and requiring client certificates of `certs/ca.pem`
    /// (`--client-cert-auth`); `client_url` is then `https://`. Made by
    /// `skv_rpc::certs::create` (feature `dev-certs`).
    pub async fn start_tls(certs: &std::path::Path) -> Etcd {
        Self::start_inner(Some(certs)).await
    }

    async fn start_inner(certs: Option<&std::path::Path>) -> Etcd {
        let bin = which_etcd();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let scheme = if certs.is_some() { "https" } else { "http" };
        let probe_opts = certs.map(|c| {
            let read = |name: &str| std::fs::read(c.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
                    .identity(etcd_client::Identity::from_pem(
                        read("placement.pem"),
                        read("placement-key.pem"),
                    )),
            )
        });
        for _attempt in 0..3 {
            let (cp, pp) = (free_port(), free_port());
            let client_url = format!("{scheme}://127.0.0.1:{cp}");
            let peer_url = format!("http://127.0.0.1:{pp}");
            let data = dir.path().join(format!("data-{cp}"));
            let mut cmd = Command::new(&bin);
            cmd.arg("--name")
                .arg("default")
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&client_url)
                .arg("--advertise-client-urls")
                .arg(&client_url)
                .arg("--listen-peer-urls")
                .arg(&peer_url)
                .arg("--initial-advertise-peer-urls")
                .arg(&peer_url)
                .arg("--initial-cluster")
                .arg(format!("default={peer_url}"))
                .arg("--log-level")
                .arg("error")
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(c) = certs {
                cmd.arg("--cert-file")
                    .arg(c.join("storenode.pem"))
                    .arg("--key-file")
                    .arg(c.join("storenode-key.pem"))
                    .arg("--trusted-ca-file")
                    .arg(c.join("ca.pem"))
                    .arg("--client-cert-auth");
            }
            let mut guard = ChildGuard::spawn("etcd", &mut cmd).unwrap_or_else(|e| panic!("spawn etcd: {e}"));
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(mut c) = etcd_client::Client::connect([client_url.as_str()], probe_opts.clone()).await
                    && c.get("health-probe", None).await.is_ok()
                {
                    return Etcd {
                        client_url,
                        guard,
                        _dir: dir,
                    };
                }
                if guard.wait_timeout(Duration::from_millis(1)).is_some() {
                    break; // exited (port race): try other ports
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            guard.kill();
        }
        panic!("etcd did not become ready");
    }

    /// The PID of the etcd process.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }
}

fn which_etcd() -> String {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("etcd not found: install Debian's etcd-server (the README's test command does)");
}
