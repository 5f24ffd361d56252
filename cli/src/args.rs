//! Command-line flags. Every flag can also come from its `SKV_*` environment variable.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// skvctl: use and administer an skv cluster, or run one locally (`skvctl playground`).
#[derive(Parser, Debug, Clone)]
#[command(name = "skvctl", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes. Its `Debug` output never shows the token.
#[derive(Args, Clone)]
pub struct Global {
    /// Output format: human-readable tables, or JSON for scripts.
    #[arg(long, global = true, env = "SKV_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Proxy endpoint(s), comma-separated (data commands).
    #[arg(
        long,
        global = true,
        env = "SKV_ENDPOINT",
        default_value = "http://127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub endpoint: Vec<String>,
    /// The JWT sent to the proxy (data commands) and to placement (admin commands need role
    /// admin; `ranges`, `stores` and `operators` read load and operators with any valid token).
    #[arg(long, global = true, env = "SKV_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Placement endpoint(s), comma-separated (admin commands).
    #[arg(
        long,
        global = true,
        env = "SKV_PLACEMENT",
        default_value = "http://127.0.0.1:7000",
        value_delimiter = ','
    )]
    pub placement: Vec<String>,
    /// Deadline of one command's calls, e.g. `10s`, `500ms`.
    #[arg(long, global = true, env = "SKV_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keys and values on the command line and in the output are hex, not UTF-8.
    #[arg(long, global = true, env = "SKV_HEX")]
    pub hex: bool,
    /// TLS: trust servers whose certificate chains to this CA (PEM), for `https://`
    /// endpoints (a bare `host:port` then means https too; `http://` stays plaintext).
    #[arg(long, global = true, env = "SKV_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// mTLS: present this certificate (PEM) to placement (`skvctl certs create` makes
    /// `admin.pem`, which placement accepts for admin calls without a token), and to a
    /// proxy that asks for client certificates. Needs --ca-file and --client-key-file.
    #[arg(long, global = true, env = "SKV_CLIENT_CERT_FILE")]
    pub client_cert_file: Option<PathBuf>,
    /// The private key of --client-cert-file (PEM).
    #[arg(long, global = true, env = "SKV_CLIENT_KEY_FILE")]
    pub client_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("output", &self.output)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("placement", &self.placement)
            .field("timeout", &self.timeout)
            .field("hex", &self.hex)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish()
    }
}

/// `skvctl top`.
#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Print one frame (two scrapes --interval apart) and exit; with `--output json`, as JSON.
    #[arg(long, env = "SKV_TOP_ONCE")]
    pub once: bool,
    /// Time between two frames (and between the two scrapes of --once), e.g. `1s`.
    #[arg(long, env = "SKV_TOP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Human-readable text and tables.
    Table,
    /// One JSON document on stdout.
    Json,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Read a key (exit code 1 when it does not exist).
    Get {
        key: String,
        /// Allow a follower read that may be slightly stale.
        #[arg(long, env = "SKV_STALE_OK")]
        stale_ok: bool,
    },
    /// Write a key.
    Put {
        key: String,
        value: String,
        /// Write only if the key's version is this one.
        #[arg(long, env = "SKV_IF_VERSION", conflicts_with = "if_absent")]
        if_version: Option<u64>,
        /// Write only if the key does not exist.
        #[arg(long, env = "SKV_IF_ABSENT")]
        if_absent: bool,
    },
    /// Delete a key.
    Delete {
        key: String,
        /// Delete only if the key's version is this one.
        #[arg(long, env = "SKV_IF_VERSION")]
        if_version: Option<u64>,
    },
    /// List keys in order: all of them, a prefix, or [start, end).
    Scan(ScanArgs),
    /// Write VALUE only if KEY's version is --expected-version (0 = absent). Exit code 1 on mismatch.
    Cas {
        key: String,
        /// The version the key must have (0 = the key must be absent).
        #[arg(long, env = "SKV_EXPECTED_VERSION")]
        expected_version: u64,
        value: String,
    },
    /// List the ranges (placement's view).
    Ranges,
    /// List the storage nodes.
    Stores,
    /// Split a range at a key.
    Split {
        /// Range id (`7` or `r7`).
        #[arg(value_parser = parse_range_id)]
        range: u64,
        /// The first key of the new right half (a user key in --ns, unless --raw).
        #[arg(long, env = "SKV_SPLIT_AT")]
        at: String,
        /// The namespace the key belongs to.
        #[arg(long, env = "SKV_NS", default_value = "default")]
        ns: String,
        /// --at is an internal key (namespace prefix included), not a user key.
        #[arg(long, env = "SKV_RAW_KEY")]
        raw: bool,
    },
    /// Merge two adjacent ranges (left first): placement colocates their replicas, aligns
    /// their leaders, then merges. Queued; follow it with `operators`.
    Merge {
        #[arg(value_parser = parse_range_id)]
        left: u64,
        #[arg(value_parser = parse_range_id)]
        right: u64,
    },
    /// Move a replica of a range from one store to another (learner, promotion, leader
    /// transfer if it leads, removal). Started; follow it with `operators`.
    Move {
        #[arg(value_parser = parse_range_id)]
        range: u64,
        #[arg(long, env = "SKV_FROM_STORE", value_parser = parse_store_id)]
        from: u64,
        #[arg(long, env = "SKV_TO_STORE", value_parser = parse_store_id)]
        to: u64,
    },
    /// Make another replica the leader of a range.
    TransferLeader {
        #[arg(value_parser = parse_range_id)]
        range: u64,
        /// Store id (`3` or `s3`).
        #[arg(long, env = "SKV_TO_STORE", value_parser = parse_store_id)]
        to: u64,
    },
    /// Move every replica off a store (leaders first); `stores` shows it drained once it
    /// holds none. The scheduler does the moves: it must not be paused.
    Drain {
        #[arg(value_parser = parse_store_id)]
        store: u64,
    },
    /// The operators the placement leader has in flight, with their progress.
    Operators,
    /// Pause or resume the scheduler.
    Scheduler {
        #[arg(value_enum)]
        action: SchedulerAction,
    },
    /// Placement members and leader, stores up, range count.
    Status,
    /// A live view of the cluster, refreshed every --interval: store requests/s and p99
    /// (from each store's /metrics), ranges, leaders per store, operators in flight.
    Top(TopArgs),
    /// Tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Development certificates for TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run a local cluster in this process: placement, storenodes and a proxy.
    Playground(PlaygroundArgs),
    /// Backups of the whole cluster in object storage (placement's --object-store-url,
    /// ADR 0028): create, list, delete, restore into a fresh cluster.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum BackupCommand {
    /// Back up every range (each at a Raft index at or past the moment the backup began)
    /// and write the manifest; waits until it is complete unless --no-wait.
    Create(BackupWait),
    /// The backups: id, state (running, complete, failed), time, size, keys, ranges.
    List,
    /// Delete a backup (its manifest first, then its objects); an absent one is no error.
    Delete { id: String },
    /// Restore a backup into this cluster, which must be fresh and empty (new data
    /// directories, new etcd prefix); running it again resumes or is a no-op once done.
    Restore {
        id: String,
        #[command(flatten)]
        wait: BackupWait,
    },
    /// The restore this cluster took or is taking (backup id, state, progress, error).
    RestoreStatus,
}

#[derive(Args, Debug, Clone)]
pub struct BackupWait {
    /// Return once started instead of waiting for the end.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this many seconds (the operation goes on in placement).
    #[arg(long, default_value_t = 3600)]
    pub wait_secs: u64,
}

#[derive(Subcommand, Debug, Clone)]
pub enum CertsCommand {
    /// Make a development CA and one certificate per role (placement, storenode, proxy,
    /// admin), each naming its role in a SAN URI spiffe://skv/role/<role>, in --dir:
    /// ca.pem, ca-key.pem, <role>.pem, <role>-key.pem (keys mode 0600).
    Create(CertsCreateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CertsCreateArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    pub dir: PathBuf,
    /// Host names and IP addresses the servers are reached at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    pub hosts: Vec<String>,
    /// Validity of the certificates, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Overwrite the files if the directory already holds a CA.
    #[arg(long)]
    pub force: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerAction {
    Pause,
    Resume,
}

#[derive(Args, Debug, Clone)]
pub struct ScanArgs {
    /// Only keys starting with this prefix.
    #[arg(long, env = "SKV_SCAN_PREFIX", conflicts_with_all = ["start", "end"])]
    pub prefix: Option<String>,
    /// First key (inclusive).
    #[arg(long, env = "SKV_SCAN_START")]
    pub start: Option<String>,
    /// End key (exclusive).
    #[arg(long, env = "SKV_SCAN_END")]
    pub end: Option<String>,
    /// At most this many keys (0 = no limit).
    #[arg(long, env = "SKV_SCAN_LIMIT", default_value_t = 0)]
    pub limit: u32,
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenCommand {
    /// Mint a token and print it: HS256 from the proxy's secret file, or RS256/ES256
    /// from a PEM private key (RSA or P-256), naming `--kid`.
    Mint(MintArgs),
    /// Print a JWKS (public keys only) for the proxy's `--jwt-jwks-file`, from PEM private
    /// keys given as KID=FILE (list the old and the new key during a rotation).
    Jwks {
        /// KID=PRIVATE_KEY_PEM, one per key.
        #[arg(required = true, value_parser = parse_kid_file)]
        keys: Vec<(String, PathBuf)>,
    },
}

fn parse_kid_file(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((kid, file)) if !kid.is_empty() && !file.is_empty() => Ok((kid.to_string(), PathBuf::from(file))),
        _ => Err(format!("{s:?}: expected KID=FILE")),
    }
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("signing_key").required(true).args(["secret_file", "key_file"])))]
pub struct MintArgs {
    /// The proxy's HS256 secret file.
    #[arg(long, env = "SKV_JWT_HS256_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// A PEM private key (RSA: RS256, P-256: ES256) whose public half the proxy trusts.
    #[arg(long, env = "SKV_JWT_PRIVATE_KEY_FILE", conflicts_with = "secret_file")]
    pub key_file: Option<PathBuf>,
    /// `kid` header: which key of the proxy's JWKS verifies the token.
    #[arg(long, env = "SKV_JWT_KID")]
    pub kid: Option<String>,
    /// The namespace the token grants.
    #[arg(long, env = "SKV_NS")]
    pub ns: String,
    /// read, write or admin.
    #[arg(long, env = "SKV_ROLE", value_enum)]
    pub role: RoleArg,
    /// How long the token is valid, e.g. `24h`, `30d`, `90m`.
    #[arg(long, env = "SKV_TTL", default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// `iss` claim.
    #[arg(long, env = "SKV_JWT_ISSUER", default_value = "skv")]
    pub issuer: String,
    /// `aud` claim.
    #[arg(long, env = "SKV_JWT_AUDIENCE", default_value = "skv")]
    pub audience: String,
    /// `sub` claim: who the token is for.
    #[arg(long, env = "SKV_SUB", default_value = "skvctl")]
    pub sub: String,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleArg {
    Read,
    Write,
    Admin,
}

#[derive(Args, Debug, Clone)]
pub struct PlaygroundArgs {
    /// Number of storage nodes.
    #[arg(long, env = "SKV_PLAYGROUND_STORENODES", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=89))]
    pub storenodes: u16,
    /// Where the cluster keeps its data (default: $XDG_DATA_HOME/skv/playground
    /// or ~/.local/share/skv/playground). A second run on it recovers the data.
    #[arg(long, env = "SKV_PLAYGROUND_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// First port: placement P (metrics P+1), storenode i at P+10+i (metrics
    /// P+110+i), proxy P+400 (metrics P+401).
    #[arg(long, env = "SKV_PLAYGROUND_PORT_BASE", default_value_t = 7000, value_parser = clap::value_parser!(u16).range(1..=65000))]
    pub port_base: u16,
    /// How long to wait for the cluster to serve a write and a read.
    #[arg(long, env = "SKV_PLAYGROUND_READY_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// A flag for every storenode, as `skv-storenode` takes it (repeatable), e.g.
    /// `--storenode-arg=--value-cache-bytes=0`.
    #[arg(long = "storenode-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub storenode_args: Vec<String>,
    /// A flag for placement, as `skv-placement` takes it (repeatable), e.g.
    /// `--placement-arg=--split-qps-threshold=500`.
    #[arg(long = "placement-arg", value_name = "FLAG", allow_hyphen_values = true)]
    pub placement_args: Vec<String>,
    /// TLS at the proxy: development certificates in DATA_DIR/certs (made on the first run,
    /// `skvctl certs create`), an `https://` endpoint and SKV_CA_FILE in the export line.
    /// Traffic between the in-process components stays on 127.0.0.1 in plaintext (mTLS
    /// inside is not built yet).
    #[arg(long, env = "SKV_PLAYGROUND_TLS")]
    pub tls: bool,
}

/// Parses `250ms`, `10s`, `5m`, `24h`, `30d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (use e.g. 500ms, 10s, 5m, 24h, 30d)"))?;
    let secs = |m: u64| {
        n.checked_mul(m)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        other => Err(format!("unknown duration unit {other:?} (ms, s, m, h or d)")),
    }
}

fn parse_prefixed_id(s: &str, prefix: char, what: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_prefix(prefix).unwrap_or(t);
    t.parse()
        .map_err(|_| format!("bad {what} id {s:?} (a number, optionally prefixed with '{prefix}')"))
}

/// `7` or `r7`.
pub fn parse_range_id(s: &str) -> Result<u64, String> {
    parse_prefixed_id(s, 'r', "range")
}

/// `3` or `s3`.
pub fn parse_store_id(s: &str) -> Result<u64, String> {
    parse_prefixed_id(s, 's', "store")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("skvctl").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn data_commands() {
        let c = parse(&["--output", "json", "put", "k", "v", "--if-version", "3"]).unwrap();
        assert_eq!(c.global.output, Output::Json);
        assert!(
            matches!(c.command, Command::Put { ref key, ref value, if_version: Some(3), if_absent: false } if key == "k" && value == "v")
        );
        let c = parse(&["get", "k", "--endpoint", "http://a:1,http://b:2", "--hex"]).unwrap();
        assert_eq!(c.global.endpoint, ["http://a:1", "http://b:2"]);
        assert!(c.global.hex);
        let c = parse(&["cas", "k", "--expected-version", "0", "v"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Cas {
                expected_version: 0,
                ..
            }
        ));
        assert!(parse(&["cas", "k", "v"]).is_err(), "--expected-version is required");
        let c = parse(&["scan", "--prefix", "user/", "--limit", "10"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Scan(ScanArgs {
                prefix: Some(_),
                limit: 10,
                ..
            })
        ));
        assert!(parse(&["scan", "--prefix", "a", "--start", "b"]).is_err());
        assert!(parse(&["put", "k", "v", "--if-version", "1", "--if-absent"]).is_err());
        assert!(parse(&["delete", "k"]).is_ok());
        assert!(parse(&["get"]).is_err());
    }

    #[test]
    fn admin_commands() {
        let c = parse(&["split", "r7", "--at", "user/m"]).unwrap();
        assert!(
            matches!(c.command, Command::Split { range: 7, ref at, ref ns, raw: false } if at == "user/m" && ns == "default")
        );
        let c = parse(&["transfer-leader", "3", "--to", "s2"]).unwrap();
        assert!(matches!(c.command, Command::TransferLeader { range: 3, to: 2 }));
        assert!(parse(&["transfer-leader", "x3", "--to", "2"]).is_err());
        assert!(matches!(parse(&["ranges"]).unwrap().command, Command::Ranges));
        assert!(matches!(parse(&["stores"]).unwrap().command, Command::Stores));
        assert!(matches!(parse(&["operators"]).unwrap().command, Command::Operators));
        assert!(matches!(
            parse(&["backup", "create", "--no-wait"]).unwrap().command,
            Command::Backup {
                command: BackupCommand::Create(BackupWait { no_wait: true, .. })
            }
        ));
        assert!(matches!(
            parse(&["backup", "restore", "20261202-093800-ab12"]).unwrap().command,
            Command::Backup {
                command: BackupCommand::Restore { .. }
            }
        ));
        assert!(parse(&["backup", "delete"]).is_err());
        assert!(matches!(
            parse(&["status", "--placement", "http://p:1"]).unwrap().command,
            Command::Status
        ));
        assert!(matches!(
            parse(&["scheduler", "pause"]).unwrap().command,
            Command::Scheduler {
                action: SchedulerAction::Pause
            }
        ));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = parse(&["--token", "eyJsecret.payload.sig", "get", "k"]).unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("eyJsecret"), "{d}");
        assert!(d.contains("<redacted>"), "{d}");
    }

    #[test]
    fn token_and_playground() {
        let c = parse(&[
            "token",
            "mint",
            "--secret-file",
            "/s",
            "--ns",
            "t1",
            "--role",
            "write",
            "--ttl",
            "2h",
        ])
        .unwrap();
        let Command::Token {
            command: TokenCommand::Mint(m),
        } = c.command
        else {
            panic!("not mint");
        };
        assert_eq!(m.role, RoleArg::Write);
        assert_eq!(m.ttl, Duration::from_secs(7200));
        assert_eq!(
            (m.issuer.as_str(), m.audience.as_str(), m.sub.as_str()),
            ("skv", "skv", "skvctl")
        );
        assert!(parse(&["token", "mint", "--secret-file", "/s", "--ns", "t", "--role", "root"]).is_err());
        // Exactly one signing key.
        assert!(parse(&["token", "mint", "--ns", "t", "--role", "read"]).is_err());
        assert!(
            parse(&[
                "token",
                "mint",
                "--secret-file",
                "/s",
                "--key-file",
                "/k",
                "--ns",
                "t",
                "--role",
                "read"
            ])
            .is_err()
        );
        let c = parse(&[
            "token",
            "mint",
            "--key-file",
            "/k",
            "--kid",
            "k2",
            "--ns",
            "t",
            "--role",
            "read",
        ])
        .unwrap();
        let Command::Token {
            command: TokenCommand::Mint(m),
        } = c.command
        else {
            panic!("not mint");
        };
        assert_eq!(
            (m.key_file.unwrap(), m.kid.unwrap()),
            (PathBuf::from("/k"), "k2".to_string())
        );
        let c = parse(&["token", "jwks", "old=/a.pem", "new=/b.pem"]).unwrap();
        let Command::Token {
            command: TokenCommand::Jwks { keys },
        } = c.command
        else {
            panic!("not jwks");
        };
        assert_eq!(keys[1], ("new".to_string(), PathBuf::from("/b.pem")));
        assert!(parse(&["token", "jwks", "/a.pem"]).is_err());
        assert!(parse(&["token", "jwks"]).is_err());

        let c = parse(&["playground"]).unwrap();
        let Command::Playground(p) = c.command else { panic!() };
        assert_eq!((p.storenodes, p.port_base, p.data_dir), (3, 7000, None));
        let c = parse(&[
            "playground",
            "--storenodes",
            "1",
            "--data-dir",
            "/tmp/x",
            "--port-base",
            "20000",
        ])
        .unwrap();
        let Command::Playground(p) = c.command else { panic!() };
        assert_eq!((p.storenodes, p.port_base), (1, 20000));
        assert!(parse(&["playground", "--storenodes", "0"]).is_err());
    }

    #[test]
    fn durations_and_ids() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(parse_range_id("r12"), Ok(12));
        assert_eq!(parse_store_id("4"), Ok(4));
        assert!(parse_store_id("r4").is_err());
    }
}
