//! `skvctl`: the skv admin and user CLI, and the local playground.
//!
//! Data commands go through the Rust SDK to a proxy (`--endpoint`, `SKV_ENDPOINT`,
//! with `--token`/`SKV_TOKEN`); admin commands go to placement (`--placement`,
//! `SKV_PLACEMENT`). Output is human-readable, or JSON with `--output json`.
//! Errors are one line on stderr and a non-zero exit code.

mod admin;
mod args;
mod data;
mod output;
#[cfg(feature = "servers")]
mod playground;
#[cfg(feature = "servers")]
mod token;
mod top;

use args::{CertsCommand, Cli, Command, TokenCommand};

/// mimalloc instead of glibc malloc: ADR 0017 (allocation was ~20% of server CPU).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use data::ExitCode;

fn main() {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Playground(_)) {
        prepare_playground_env();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    };
    drop(rt);
    std::process::exit(code);
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// The in-process servers parse their configs with clap, which also reads
/// `SKV_*` variables: drop ours (`SKV_ENDPOINT` of an old playground,
/// `SKV_DATA_DIR`, `SKV_ETCD`, ...) so that they get exactly the flags the
/// playground passes. Quiet logs unless `RUST_LOG` says otherwise.
fn prepare_playground_env() {
    let ours: Vec<_> = std::env::vars_os()
        .filter(|(k, _)| k.to_str().is_some_and(|k| k.starts_with("SKV_")))
        .map(|(k, _)| k)
        .collect();
    // SAFETY: called from `main` before the runtime or any other thread starts.
    unsafe {
        for k in ours {
            std::env::remove_var(k);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn,openraft=error");
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match cli.command {
        Command::Get { key, stale_ok } => data::get(g, &key, stale_ok).await,
        Command::Put {
            key,
            value,
            if_version,
            if_absent,
        } => data::put(g, &key, &value, if_version, if_absent).await,
        Command::Delete { key, if_version } => data::delete(g, &key, if_version).await,
        Command::Scan(a) => data::scan(g, &a).await,
        Command::Cas {
            key,
            expected_version,
            value,
        } => data::cas(g, &key, expected_version, &value).await,
        Command::Ranges => admin::ranges(g).await,
        Command::Stores => admin::stores(g).await,
        Command::Split { range, at, ns, raw } => admin::split(g, range, &at, &ns, raw).await,
        Command::Merge { left, right } => admin::merge(g, left, right).await,
        Command::Move { range, from, to } => admin::move_replica(g, range, from, to).await,
        Command::TransferLeader { range, to } => admin::transfer_leader(g, range, to).await,
        Command::Drain { store } => admin::drain(g, store).await,
        Command::Scheduler { action } => admin::scheduler(g, action).await,
        Command::Operators => admin::operators(g).await,
        Command::Status => admin::status(g).await,
        Command::Top(a) => top::run(g, &a).await,
        Command::Token {
            command: TokenCommand::Mint(m),
        } => mint(g, &m),
        Command::Token {
            command: TokenCommand::Jwks { keys },
        } => jwks(&keys),
        Command::Certs {
            command: CertsCommand::Create(a),
        } => {
            let written = skv_rpc::certs::create(&a.dir, &a.hosts, a.days, a.force)?;
            match g.output {
                args::Output::Table => {
                    for p in &written {
                        println!("{}", p.display());
                    }
                }
                args::Output::Json => println!(
                    "{}",
                    serde_json::json!({ "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>() })
                ),
            }
            Ok(0)
        }
        Command::Playground(p) => playground(p).await,
        Command::Backup { command } => admin::backup(g, command).await,
    }
}

#[cfg(feature = "servers")]
fn mint(g: &args::Global, m: &args::MintArgs) -> anyhow::Result<ExitCode> {
    let (jwt, claims) = token::mint_token(m)?;
    match g.output {
        args::Output::Table => println!("{jwt}"),
        args::Output::Json => println!("{}", serde_json::json!({ "token": jwt, "claims": claims })),
    }
    Ok(0)
}

#[cfg(feature = "servers")]
fn jwks(keys: &[(String, std::path::PathBuf)]) -> anyhow::Result<ExitCode> {
    println!("{}", token::jwks(keys)?);
    Ok(0)
}

#[cfg(not(feature = "servers"))]
fn jwks(_keys: &[(String, std::path::PathBuf)]) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this skvctl was built without the `servers` feature: `token jwks` is not available")
}

#[cfg(not(feature = "servers"))]
fn mint(_g: &args::Global, _m: &args::MintArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this skvctl was built without the `servers` feature: `token mint` is not available")
}

#[cfg(feature = "servers")]
async fn playground(p: args::PlaygroundArgs) -> anyhow::Result<ExitCode> {
    skv_common::telemetry::init_logging(skv_common::telemetry::LogFormat::Text);
    playground::run(p).await
}

#[cfg(not(feature = "servers"))]
async fn playground(_p: args::PlaygroundArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("this skvctl was built without the `servers` feature: `playground` is not available")
}
