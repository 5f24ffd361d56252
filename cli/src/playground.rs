//! `skvctl playground`: placement (embedded store), N storenodes and a proxy
//! in this process, on 127.0.0.1, with a development secret (the proxy and placement both
//! check tokens with it, so the admin token printed works for data and admin commands).
//!
//! Port plan for `--port-base P`:
//!
//! | service         | gRPC        | metrics      |
//! |-----------------|-------------|--------------|
//! | placement       | P           | P+1          |
//! | storenode i=1.. | P+10+i      | P+110+i      |
//! | proxy           | P+400       | P+401        |
//!
//! Data layout in `--data-dir DIR`: `DIR/placement`, `DIR/store-<i>`, and
//! `DIR/dev-secret` (the HS256 secret, created on the first run and reused,
//! so tokens minted before a restart keep working).

use crate::args::PlaygroundArgs;
use crate::data::ExitCode;
use anyhow::{Context, Result, anyhow};
use clap::Parser;
use skv_common::service::ServiceHandle;
use skv_proxy::auth::{Claims, Role, load_hs256_secret, mint_hs256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the playground's token is valid.
const TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// The namespace of the playground's token.
pub const NAMESPACE: &str = "default";

/// The addresses of every service, from the port base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    pub placement: u16,
    pub placement_metrics: u16,
    /// (gRPC, metrics) per storenode, i = 1..=N.
    pub stores: Vec<(u16, u16)>,
    pub proxy: u16,
    pub proxy_metrics: u16,
}

impl Ports {
    pub fn plan(base: u16, storenodes: u16) -> Result<Self> {
        anyhow::ensure!((1..=89).contains(&storenodes), "--storenodes must be 1 to 89");
        anyhow::ensure!(
            u32::from(base) + 401 <= 65535,
            "--port-base {base} is too high: the proxy's metrics would be at {}",
            u32::from(base) + 401
        );
        Ok(Self {
            placement: base,
            placement_metrics: base + 1,
            stores: (1..=storenodes).map(|i| (base + 10 + i, base + 110 + i)).collect(),
            proxy: base + 400,
            proxy_metrics: base + 401,
        })
    }
}

/// `$XDG_DATA_HOME/skv/playground`, or `~/.local/share/skv/playground`.
pub fn default_data_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("skv").join("playground"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow!("neither XDG_DATA_HOME nor HOME is set: pass --data-dir"))?;
    Ok(PathBuf::from(home).join(".local/share/skv/playground"))
}

/// Loads `DIR/dev-secret`, creating it (32 random bytes, hex, mode 0600) on the first run.
pub fn dev_secret(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join("dev-secret");
    if !path.exists() {
        let bytes: [u8; 32] = rand::random();
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{}", hex::encode(bytes)).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all()?;
    }
    let secret = load_hs256_secret(&path)?;
    Ok((path, secret))
}

fn parse<C: Parser>(name: &str, args: &[String]) -> Result<C> {
    C::try_parse_from(std::iter::once(name.to_string()).chain(args.iter().cloned()))
        .map_err(|e| anyhow!("building the {name} config: {e}"))
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

/// The running services, stopped in reverse order of start.
#[derive(Default)]
struct Services {
    placement: Option<ServiceHandle>,
    stores: Vec<ServiceHandle>,
    proxy: Option<ServiceHandle>,
}

impl Services {
    /// The first service that stopped by itself, if any.
    fn stopped(&self) -> Option<String> {
        if self.placement.as_ref().is_some_and(|h| h.is_finished()) {
            return Some("placement".into());
        }
        if let Some(i) = self.stores.iter().position(|h| h.is_finished()) {
            return Some(format!("storenode {}", i + 1));
        }
        if self.proxy.as_ref().is_some_and(|h| h.is_finished()) {
            return Some("proxy".into());
        }
        None
    }

    /// Stops the proxy, then the storenodes, then placement. Returns every error.
    async fn shutdown(self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(p) = self.proxy {
            eprintln!("stopping the proxy");
            if let Err(e) = p.shutdown().await {
                errors.push(format!("proxy: {e:#}"));
            }
        }
        if !self.stores.is_empty() {
            eprintln!("stopping {} storenode(s)", self.stores.len());
        }
        let results = futures::future::join_all(self.stores.into_iter().map(|h| h.shutdown())).await;
        for (i, r) in results.into_iter().enumerate() {
            if let Err(e) = r {
                errors.push(format!("storenode {}: {e:#}", i + 1));
            }
        }
        if let Some(p) = self.placement {
            eprintln!("stopping placement");
            if let Err(e) = p.shutdown().await {
                errors.push(format!("placement: {e:#}"));
            }
        }
        errors
    }
}

/// Extra flags given with `--storenode-arg` and `--placement-arg`.
#[derive(Clone, Debug, Default)]
struct ExtraArgs {
    storenode: Vec<String>,
    placement: Vec<String>,
}

/// The certificates of `--tls`: `DIR/certs`, made on the first run and reused (so a CA file
/// handed to clients stays valid across restarts).
fn playground_certs(dir: &Path) -> Result<PathBuf> {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        skv_rpc::certs::create(&certs, &["127.0.0.1".into(), "localhost".into()], 365, false)
            .context("making the playground's certificates")?;
    }
    Ok(certs)
}

/// `--object-store-url file://DIR/objects` (the directory made) for placement and the
/// storenodes, so checkpoints and `skvctl backup` work out of the box; nothing when `extra`
/// already names an object store.
fn object_store_args(dir: &Path, extra: &[String]) -> Result<Vec<String>> {
    if extra.iter().any(|a| a.starts_with("--object-store-url")) {
        return Ok(Vec::new());
    }
    let objects = dir.join("objects");
    std::fs::create_dir_all(&objects).with_context(|| format!("creating {}", objects.display()))?;
    Ok(vec!["--object-store-url".into(), format!("file://{}", s(objects))])
}

async fn start_all(
    dir: &Path,
    ports: &Ports,
    secret_file: &Path,
    certs: Option<&Path>,
    extra: &ExtraArgs,
    svc: &mut Services,
) -> Result<()> {
    // With --tls, every component serves mTLS with its role's certificate and presents it
    // on the calls it makes (ADR 0022): placement, storenodes and the proxy inside.
    let scheme = if certs.is_some() { "https" } else { "http" };
    let placement_url = format!("{scheme}://{}", addr(ports.placement));
    let mtls = |role: &str| -> Vec<String> {
        certs
            .map(|c| {
                vec![
                    "--tls-cert-file".to_string(),
                    s(c.join(format!("{role}.pem"))),
                    "--tls-key-file".to_string(),
                    s(c.join(format!("{role}-key.pem"))),
                    "--tls-ca-file".to_string(),
                    s(c.join("ca.pem")),
                ]
            })
            .unwrap_or_default()
    };
    let pcfg: skv_placement::Config = parse(
        "skv-placement",
        &[
            "--listen".into(),
            addr(ports.placement),
            "--data-dir".into(),
            s(dir.join("placement")),
            "--metrics-listen".into(),
            addr(ports.placement_metrics),
            // The proxy's secret: the playground's admin token also works on admin calls.
            "--jwt-hs256-secret-file".into(),
            s(secret_file),
        ]
        .into_iter()
        .chain(mtls("placement"))
        .chain(object_store_args(dir, &extra.placement)?)
        .chain(extra.placement.iter().cloned())
        .collect::<Vec<_>>(),
    )?;
    eprintln!("starting placement on {}", addr(ports.placement));
    svc.placement = Some(
        skv_placement::start(pcfg)
            .await
            .with_context(|| format!("starting placement on {}", addr(ports.placement)))?,
    );
    for (i, (grpc, metrics)) in ports.stores.iter().enumerate() {
        let n = i + 1;
        let cfg: skv_storenode::Config = parse(
            "skv-storenode",
            &[
                "--listen".into(),
                addr(*grpc),
                "--placement".into(),
                placement_url.clone(),
                "--data-dir".into(),
                s(dir.join(format!("store-{n}"))),
                "--metrics-listen".into(),
                addr(*metrics),
            ]
            .into_iter()
            .chain(mtls("storenode"))
            .chain(object_store_args(dir, &extra.storenode)?)
            .chain(extra.storenode.iter().cloned())
            .collect::<Vec<_>>(),
        )?;
        eprintln!("starting storenode {n} on {}", addr(*grpc));
        svc.stores.push(
            skv_storenode::start(cfg)
                .await
                .with_context(|| format!("starting storenode {n} on {}", addr(*grpc)))?,
        );
    }
    let cfg: skv_proxy::Config = parse(
        "skv-proxy",
        &[
            "--listen".into(),
            addr(ports.proxy),
            "--placement".into(),
            placement_url,
            "--jwt-hs256-secret-file".into(),
            s(secret_file),
            "--metrics-listen".into(),
            addr(ports.proxy_metrics),
        ]
        .into_iter()
        .chain(certs.into_iter().flat_map(|c| {
            [
                "--client-tls-cert-file".to_string(),
                s(c.join("proxy.pem")),
                "--client-tls-key-file".to_string(),
                s(c.join("proxy-key.pem")),
            ]
        }))
        .chain(mtls("proxy"))
        .collect::<Vec<_>>(),
    )?;
    eprintln!("starting the proxy on {}", addr(ports.proxy));
    svc.proxy = Some(
        skv_proxy::start(cfg)
            .await
            .with_context(|| format!("starting the proxy on {}", addr(ports.proxy)))?,
    );
    Ok(())
}

/// Polls a put, a get and a delete through the proxy until they work.
async fn wait_ready(endpoint: &str, token: &str, ca_file: Option<&Path>, timeout: Duration) -> Result<()> {
    let mut b = skv::Client::builder()
        .endpoint(endpoint)
        .token(token)
        .timeout(Duration::from_secs(3))
        .max_attempts(2);
    if let Some(ca) = ca_file {
        b = b.ca_file(ca);
    }
    let client = b.connect().await?;
    let start = Instant::now();
    let mut last_report = Instant::now();
    let key = b"__skv_playground_probe__";
    loop {
        let attempt = async {
            let v = client.put(key, "ok").await?;
            match client.get(key).await? {
                Some(e) if e.version >= v => {}
                other => anyhow::bail!("read back {other:?} after writing version {v}"),
            }
            client.delete(key).await?;
            anyhow::Ok(())
        };
        let err = match attempt.await {
            Ok(()) => {
                eprintln!(
                    "the cluster serves reads and writes ({:.1}s)",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            return Err(anyhow!(
                "the cluster did not serve a write and a read within {}s; last error: {err:#}",
                timeout.as_secs()
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "waiting for the cluster to serve requests ({:.0}s): {err:#}",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A second Ctrl-C while stopping exits at once (the data stays consistent:
/// every acknowledged write is durable).
fn force_exit_on_second_signal() {
    tokio::spawn(async {
        skv_common::service::shutdown_signal().await;
        eprintln!("second signal: exiting without waiting for a clean shutdown");
        std::process::exit(130);
    });
}

pub async fn run(args: PlaygroundArgs) -> Result<ExitCode> {
    let ports = Ports::plan(args.port_base, args.storenodes)?;
    let (dir, defaulted) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (default_data_dir()?, true),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the data dir {}", dir.display()))?;
    let dir = dir.canonicalize().unwrap_or(dir);
    if defaulted {
        println!(
            "data dir: {} (the default; choose another with --data-dir)",
            dir.display()
        );
    } else {
        println!("data dir: {}", dir.display());
    }
    let (secret_file, secret) = dev_secret(&dir)?;
    let claims = Claims::new("playground", NAMESPACE, Role::Admin, TOKEN_TTL);
    let token = mint_hs256(&secret, &claims).context("minting the playground token")?;
    let certs = if args.tls { Some(playground_certs(&dir)?) } else { None };
    let ca_file = certs.as_ref().map(|c| c.join("ca.pem"));
    let scheme = if args.tls { "https" } else { "http" };
    let endpoint = format!("{scheme}://{}", addr(ports.proxy));
    let placement = format!("{scheme}://{}", addr(ports.placement));

    let mut svc = Services::default();
    let signal = skv_common::service::shutdown_signal();
    tokio::pin!(signal);

    let extra = ExtraArgs {
        storenode: args.storenode_args.clone(),
        placement: args.placement_args.clone(),
    };
    let started = async {
        start_all(&dir, &ports, &secret_file, certs.as_deref(), &extra, &mut svc).await?;
        wait_ready(&endpoint, &token, ca_file.as_deref(), args.ready_timeout).await
    };
    let interrupted = tokio::select! {
        r = started => {
            if let Err(e) = r {
                eprintln!("error: {e:#}");
                if format!("{e:#}").contains("in use") {
                    eprintln!("hint: another playground may be running; choose other ports with --port-base");
                }
                let errors = svc.shutdown().await;
                for e in errors {
                    eprintln!("error while stopping: {e}");
                }
                return Ok(1);
            }
            false
        }
        _ = &mut signal => true,
    };
    if interrupted {
        eprintln!("interrupted during start-up; stopping");
        force_exit_on_second_signal();
        let errors = svc.shutdown().await;
        for e in &errors {
            eprintln!("error while stopping: {e}");
        }
        return Ok(if errors.is_empty() { 0 } else { 1 });
    }

    println!();
    println!("skv playground is up: {} storenode(s)", ports.stores.len());
    println!(
        "  placement    {placement}  (metrics http://{}/metrics)",
        addr(ports.placement_metrics)
    );
    for (i, (grpc, metrics)) in ports.stores.iter().enumerate() {
        println!(
            "  storenode {:<2} {scheme}://{}  (metrics http://{}/metrics)",
            i + 1,
            addr(*grpc),
            addr(*metrics)
        );
    }
    println!(
        "  proxy        {endpoint}  (metrics http://{}/metrics)",
        addr(ports.proxy_metrics)
    );
    println!("  token        admin on namespace \"{NAMESPACE}\", valid 30 days");
    println!("  secret       {}", secret_file.display());
    if let (Some(ca), Some(c)) = (&ca_file, &certs) {
        println!(
            "  tls          https at the proxy, mTLS inside (CA {}; certificates per role in {})",
            ca.display(),
            c.display()
        );
    }
    println!();
    println!("In another shell, run this line, then e.g. `skvctl put hello world`:");
    match (&ca_file, &certs) {
        // Placement asks every caller for a certificate of the cluster CA: skvctl's admin
        // commands present the admin one (the proxy does not ask for one).
        (Some(ca), Some(c)) => println!(
            "export SKV_ENDPOINT={endpoint} SKV_TOKEN={token} SKV_PLACEMENT={placement} SKV_CA_FILE={} SKV_CLIENT_CERT_FILE={} SKV_CLIENT_KEY_FILE={}",
            ca.display(),
            c.join("admin.pem").display(),
            c.join("admin-key.pem").display()
        ),
        _ => println!("export SKV_ENDPOINT={endpoint} SKV_TOKEN={token} SKV_PLACEMENT={placement}"),
    }
    println!();
    println!("Press Ctrl-C to stop. The data stays in {}.", dir.display());

    let mut code = 0;
    loop {
        tokio::select! {
            _ = &mut signal => {
                force_exit_on_second_signal();
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(which) = svc.stopped() {
                    eprintln!("error: {which} stopped unexpectedly; stopping the playground");
                    code = 1;
                    break;
                }
            }
        }
    }
    eprintln!("shutting down");
    let errors = svc.shutdown().await;
    for e in &errors {
        eprintln!("error while stopping: {e}");
    }
    if !errors.is_empty() {
        code = 1;
    }
    if code == 0 {
        eprintln!("stopped cleanly");
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_plan() {
        let p = Ports::plan(7000, 3).unwrap();
        assert_eq!((p.placement, p.placement_metrics), (7000, 7001));
        assert_eq!(p.stores, vec![(7011, 7111), (7012, 7112), (7013, 7113)]);
        assert_eq!((p.proxy, p.proxy_metrics), (7400, 7401));
        assert!(Ports::plan(65200, 3).is_err());
        assert!(Ports::plan(7000, 0).is_err());
    }

    #[test]
    fn extra_flags_reach_the_servers_and_bad_ones_are_refused() {
        use clap::Parser;
        let cli = crate::args::Cli::try_parse_from([
            "skvctl",
            "playground",
            "--storenode-arg=--value-cache-bytes=0",
            "--placement-arg",
            "--split-qps-threshold=500",
        ])
        .unwrap();
        let crate::args::Command::Playground(p) = cli.command else {
            panic!("not the playground command")
        };
        let mut args = vec!["--data-dir".to_string(), "/tmp/x".into()];
        args.extend(p.storenode_args);
        let cfg: skv_storenode::Config = parse("skv-storenode", &args).unwrap();
        assert_eq!(cfg.value_cache_bytes, 0);
        assert_eq!(p.placement_args, vec!["--split-qps-threshold=500".to_string()]);
        let bad = parse::<skv_storenode::Config>("skv-storenode", &["--no-such-flag".to_string()]);
        assert!(bad.is_err());
    }

    #[test]
    fn object_storage_defaults_to_the_data_dir_unless_a_flag_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let args = object_store_args(dir.path(), &[]).unwrap();
        assert_eq!(args[0], "--object-store-url");
        assert_eq!(args[1], format!("file://{}", dir.path().join("objects").display()));
        assert!(dir.path().join("objects").is_dir());
        let cfg: skv_placement::Config = parse("skv-placement", &args).unwrap();
        assert_eq!(cfg.object_store_url.as_deref(), Some(args[1].as_str()));
        let own = vec!["--object-store-url=s3://b/p".to_string()];
        assert!(object_store_args(dir.path(), &own).unwrap().is_empty());
    }

    #[test]
    fn secret_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, a) = dev_secret(dir.path()).unwrap();
        let (_, b) = dev_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64, "32 bytes as hex");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
