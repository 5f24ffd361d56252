//! Admin commands through the placement gRPC service.

use crate::args::{Global, Output, SchedulerAction};
use crate::data::ExitCode;
use crate::output::{ago, internal_key, show_internal_key, table};
use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use skv_proto::internal as pb;
use skv_proto::internal::placement_admin_client::PlacementAdminClient;
use skv_proto::internal::placement_client::PlacementClient;
use skv_rpc::{EndpointOptions, PlacementMembers};
use std::collections::HashMap;
use std::time::Duration;
use tonic::transport::Channel;

/// How skvctl reaches placement: its deadline, and TLS when `--ca-file` is given (with
/// `--client-cert-file`/`--client-key-file`, mTLS: an admin certificate authorizes admin
/// calls without a token, ADR 0022).
fn options(g: &Global) -> Result<EndpointOptions> {
    let tls = skv_rpc::tls::ClientTls::from_flags(
        g.ca_file.as_deref(),
        g.client_cert_file.as_deref(),
        g.client_key_file.as_deref(),
        ["--ca-file", "--client-cert-file", "--client-key-file"],
    )?;
    Ok(EndpointOptions {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Some(g.timeout),
        tls,
        ..EndpointOptions::default()
    })
}

/// Connects to the first placement member that answers (skv-rpc's one placement client).
pub(crate) async fn connect(g: &Global) -> Result<PlacementClient<Channel>> {
    let options = options(g)?;
    let members = PlacementMembers::with_options(&g.placement, &options).map_err(|e| anyhow!("--placement: {e}"))?;
    let deadline = tokio::time::Instant::now() + g.timeout;
    members
        .call(deadline, Duration::from_secs(3), |mut c| async move {
            c.get_members(pb::GetMembersRequest {}).await
        })
        .await
        .map_err(|s| {
            anyhow!(
                "no placement member reachable at {}: {}",
                g.placement.join(","),
                s.message()
            )
        })?;
    let (_, client) = members.member(members.preferred());
    Ok(client)
}

/// A client of `PlacementAdmin` (what lives in the placement leader's memory: load,
/// drained stores, operators) on the first placement member that answers.
async fn connect_admin(g: &Global) -> Result<PlacementAdminClient<Channel>> {
    let options = options(g)?;
    let members = PlacementMembers::with_options(&g.placement, &options).map_err(|e| anyhow!("--placement: {e}"))?;
    let deadline = tokio::time::Instant::now() + g.timeout;
    members
        .call(deadline, Duration::from_secs(3), |mut c| async move {
            c.get_members(pb::GetMembersRequest {}).await
        })
        .await
        .map_err(|s| anyhow!("no placement member reachable: {}", s.message()))?;
    let (address, _) = members.member(members.preferred());
    let channel = skv_rpc::endpoint_with(address, &options)
        .map_err(|e| anyhow!("{address}: {e}"))?
        .connect_lazy();
    Ok(PlacementAdminClient::new(channel))
}

/// `msg` with `authorization: Bearer <--token>` when a token is given: placement checks it on
/// admin calls (role admin) and status calls (any valid token), ADR 0021.
fn authed<T>(g: &Global, msg: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = g.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| anyhow!("--token (SKV_TOKEN) is not a valid header value"))?;
        r.metadata_mut().insert("authorization", v);
    }
    Ok(r)
}

/// Range load by range id (empty if the leader has none or cannot be asked: the columns
/// then show `-`).
pub(crate) async fn range_stats(g: &Global) -> HashMap<u64, pb::RangeStats> {
    let Ok(mut c) = connect_admin(g).await else {
        return HashMap::new();
    };
    let Ok(req) = authed(g, pb::RangeStatsRequest {}) else {
        return HashMap::new();
    };
    match c.range_stats(req).await {
        Ok(r) => r.into_inner().stats.into_iter().map(|s| (s.range_id, s)).collect(),
        Err(_) => HashMap::new(),
    }
}

pub(crate) async fn store_status(g: &Global) -> HashMap<u64, pb::StoreStatus> {
    let Ok(mut c) = connect_admin(g).await else {
        return HashMap::new();
    };
    let Ok(req) = authed(g, pb::StoreStatusRequest {}) else {
        return HashMap::new();
    };
    match c.store_status(req).await {
        Ok(r) => r.into_inner().stores.into_iter().map(|s| (s.store_id, s)).collect(),
        Err(_) => HashMap::new(),
    }
}

/// `12.3 MiB`-style sizes for tables.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn status_err(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| match s.code() {
        tonic::Code::Unimplemented => anyhow!("{what} is not implemented yet in this version of skv ({})", s.message()),
        _ => anyhow!("{what}: {:?}: {}", s.code(), s.message()),
    }
}

fn epoch(d: &pb::RangeDescriptor) -> (u64, u64) {
    d.epoch.map_or((0, 0), |e| (e.conf_ver, e.version))
}

fn replicas(d: &pb::RangeDescriptor) -> String {
    d.replicas
        .iter()
        .map(|r| {
            if r.role == pb::ReplicaRole::Learner as i32 {
                format!("s{}(learner)", r.store_id)
            } else {
                format!("s{}", r.store_id)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn desc_json(d: &pb::RangeDescriptor) -> Value {
    let (conf_ver, version) = epoch(d);
    json!({
        "id": d.range_id,
        "start_hex": hex::encode(&d.start),
        "end_hex": hex::encode(&d.end),
        "start": show_internal_key(&d.start, false),
        "end": show_internal_key(&d.end, true),
        "epoch": { "conf_ver": conf_ver, "version": version },
        "replicas": d.replicas.iter().map(|r| json!({
            "store_id": r.store_id,
            "role": if r.role == pb::ReplicaRole::Learner as i32 { "learner" } else { "voter" },
        })).collect::<Vec<_>>(),
    })
}

pub(crate) async fn all_ranges(c: &mut PlacementClient<Channel>) -> Result<Vec<pb::RangeInfo>> {
    let resp = c
        .scan_ranges(pb::ScanRangesRequest::default())
        .await
        .map_err(status_err("listing ranges"))?;
    Ok(resp.into_inner().ranges)
}

pub async fn ranges(g: &Global) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    let ranges = all_ranges(&mut c).await?;
    let stats = range_stats(g).await;
    let stat_of = |r: &pb::RangeInfo| r.descriptor.as_ref().and_then(|d| stats.get(&d.range_id));
    match g.output {
        Output::Json => {
            let rows: Vec<Value> = ranges
                .iter()
                .map(|r| {
                    let mut v = r.descriptor.as_ref().map(desc_json).unwrap_or_else(|| json!({}));
                    v["leader_store_id"] = r.leader_store_id.into();
                    // null when the placement leader has no statistics for the range yet.
                    let st = stat_of(r);
                    v["size_bytes"] = st.map(|x| x.size_bytes).into();
                    v["keys"] = st.map(|x| x.keys).into();
                    v["read_qps"] = st.map(|x| x.read_qps).into();
                    v["write_qps"] = st.map(|x| x.write_qps).into();
                    v["read_bytes_per_sec"] = st.map(|x| x.read_bytes_per_sec).into();
                    v["write_bytes_per_sec"] = st.map(|x| x.write_bytes_per_sec).into();
                    v
                })
                .collect();
            println!("{}", Value::Array(rows));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = ranges
                .iter()
                .filter_map(|r| {
                    let d = r.descriptor.as_ref()?;
                    let (cv, v) = epoch(d);
                    let st = stats.get(&d.range_id);
                    let dash = || "-".to_string();
                    Some(vec![
                        format!("r{}", d.range_id),
                        show_internal_key(&d.start, false),
                        show_internal_key(&d.end, true),
                        format!("{cv}/{v}"),
                        replicas(d),
                        if r.leader_store_id == 0 {
                            "-".into()
                        } else {
                            format!("s{}", r.leader_store_id)
                        },
                        st.map_or_else(dash, |x| bytes(x.size_bytes)),
                        st.map_or_else(dash, |x| x.keys.to_string()),
                        st.map_or_else(dash, |x| format!("{:.0}", x.read_qps)),
                        st.map_or_else(dash, |x| format!("{:.0}", x.write_qps)),
                    ])
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "START",
                        "END",
                        "EPOCH(conf/ver)",
                        "REPLICAS",
                        "LEADER",
                        "SIZE",
                        "KEYS",
                        "READ/S",
                        "WRITE/S"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(0)
}

pub(crate) fn state_name(s: i32) -> &'static str {
    match pb::StoreState::try_from(s) {
        Ok(pb::StoreState::Up) => "up",
        Ok(pb::StoreState::Down) => "down",
        Ok(pb::StoreState::Draining) => "draining",
        Ok(pb::StoreState::Removed) => "removed",
        Err(_) => "unknown",
    }
}

pub(crate) async fn all_stores(c: &mut PlacementClient<Channel>) -> Result<Vec<pb::StoreInfo>> {
    let resp = c
        .get_stores(pb::GetStoresRequest {})
        .await
        .map_err(status_err("listing stores"))?;
    let mut stores = resp.into_inner().stores;
    stores.sort_by_key(|s| s.store_id);
    Ok(stores)
}

pub async fn stores(g: &Global) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    let stores = all_stores(&mut c).await?;
    let status = store_status(g).await;
    // "draining" becomes "drained" once the store holds no replica.
    let state = |s: &pb::StoreInfo| {
        if status.get(&s.store_id).is_some_and(|x| x.drained) {
            "drained"
        } else {
            state_name(s.state)
        }
    };
    match g.output {
        Output::Json => {
            let rows: Vec<Value> = stores
                .iter()
                .map(|s| {
                    let st = status.get(&s.store_id);
                    json!({
                        "id": s.store_id,
                        "address": s.address,
                        "state": state(s),
                        "drained": st.map(|x| x.drained),
                        "ranges": s.range_count,
                        "leaders": s.leader_count,
                        "replicas_in_map": st.map(|x| x.replicas),
                        "leaders_in_map": st.map(|x| x.leaders),
                        "leader_qps": st.map(|x| x.leader_qps),
                        "capacity_bytes": s.capacity_bytes,
                        "used_bytes": s.used_bytes,
                        "available_bytes": s.available_bytes,
                        "cpu_permille": s.cpu_permille,
                        "host_idle_millicpus": s.host_idle_millicpus,
                        "last_heartbeat_ms": s.last_heartbeat_ms,
                        "metrics_address": s.metrics_address,
                    })
                })
                .collect();
            println!("{}", Value::Array(rows));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = stores
                .iter()
                .map(|s| {
                    vec![
                        format!("s{}", s.store_id),
                        s.address.clone(),
                        state(s).into(),
                        s.range_count.to_string(),
                        s.leader_count.to_string(),
                        bytes(s.used_bytes),
                        bytes(s.available_bytes),
                        bytes(s.capacity_bytes),
                        format!("{:.1}%", s.cpu_permille as f64 / 10.0),
                        s.host_idle_millicpus
                            .map_or_else(|| "-".into(), |m| format!("{:.2}", m as f64 / 1000.0)),
                        ago(s.last_heartbeat_ms),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "ADDRESS",
                        "STATE",
                        "RANGES",
                        "LEADERS",
                        "USED",
                        "AVAILABLE",
                        "CAPACITY",
                        "CPU",
                        "HOST IDLE CPUS",
                        "LAST HEARTBEAT"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(0)
}

pub async fn split(g: &Global, range: u64, at: &str, ns: &str, raw: bool) -> Result<ExitCode> {
    let key = crate::output::input_bytes(at, g.hex)?;
    let split_key = if raw { key } else { internal_key(ns, &key)? };
    let mut c = connect(g).await?;
    let resp = c
        .split_range(authed(
            g,
            pb::AdminSplitRequest {
                range_id: range,
                split_key: split_key.clone(),
            },
        )?)
        .await
        .map_err(status_err("split"))?
        .into_inner();
    match g.output {
        Output::Json => println!(
            "{}",
            json!({
                "left": resp.left.as_ref().map(desc_json),
                "right": resp.right.as_ref().map(desc_json),
            })
        ),
        Output::Table => {
            let show = |d: &Option<pb::RangeDescriptor>| match d {
                Some(d) => format!(
                    "r{} [{}, {})",
                    d.range_id,
                    show_internal_key(&d.start, false),
                    show_internal_key(&d.end, true)
                ),
                None => "?".into(),
            };
            println!(
                "split r{range} at {}: {} + {}",
                show_internal_key(&split_key, false),
                show(&resp.left),
                show(&resp.right)
            );
        }
    }
    Ok(0)
}

fn done(g: &Global, what: String) -> ExitCode {
    match g.output {
        Output::Json => println!("{}", json!({ "ok": true })),
        Output::Table => println!("{what}"),
    }
    0
}

pub async fn transfer_leader(g: &Global, range: u64, to: u64) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    c.transfer_leader(authed(
        g,
        pb::AdminTransferLeaderRequest {
            range_id: range,
            to_store_id: to,
        },
    )?)
    .await
    .map_err(status_err("transfer-leader"))?;
    Ok(done(g, format!("leadership of r{range} transferred to s{to}")))
}

pub async fn merge(g: &Global, left: u64, right: u64) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    let resp = c
        .merge_ranges(authed(
            g,
            pb::AdminMergeRequest {
                left_range_id: left,
                right_range_id: right,
            },
        )?)
        .await
        .map_err(status_err("merge"))?
        .into_inner();
    match g.output {
        Output::Json => println!(
            "{}",
            json!({ "queued": resp.merged.is_none(), "merged": resp.merged.as_ref().map(desc_json) })
        ),
        Output::Table if resp.merged.is_some() => println!("merged r{right} into r{left}"),
        Output::Table => println!(
            "merge of r{right} into r{left} queued (colocation, leader alignment, merge); follow it with `skvctl operators`"
        ),
    }
    Ok(0)
}

/// The operators the placement leader has in flight.
pub(crate) async fn list_operators(g: &Global) -> Result<Vec<pb::OperatorInfo>> {
    let mut c = connect_admin(g).await?;
    Ok(c.list_operators(authed(g, pb::ListOperatorsRequest {})?)
        .await
        .map_err(status_err("listing operators"))?
        .into_inner()
        .operators)
}

pub async fn operators(g: &Global) -> Result<ExitCode> {
    let ops = list_operators(g).await?;
    match g.output {
        Output::Json => {
            let rows: Vec<Value> = ops
                .iter()
                .map(|o| {
                    json!({
                        "range_id": o.range_id,
                        "kind": o.kind,
                        "description": o.description,
                        "step": o.step,
                        "steps": o.steps,
                        "step_name": o.step_name,
                        "started_ms": o.started_ms,
                        "origin": o.origin,
                    })
                })
                .collect();
            println!("{}", Value::Array(rows));
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = ops
                .iter()
                .map(|o| {
                    vec![
                        format!("r{}", o.range_id),
                        o.kind.clone(),
                        format!("{}/{} {}", o.step, o.steps, o.step_name),
                        o.description.clone(),
                        o.origin.clone(),
                        ago(o.started_ms),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["RANGE", "KIND", "STEP", "WHAT", "ORIGIN", "STARTED"], &rows)
            );
        }
    }
    Ok(0)
}

pub async fn move_replica(g: &Global, range: u64, from: u64, to: u64) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    c.move_replica(authed(
        g,
        pb::AdminMoveReplicaRequest {
            range_id: range,
            from_store_id: from,
            to_store_id: to,
        },
    )?)
    .await
    .map_err(status_err("move"))?;
    Ok(done(
        g,
        format!("moving r{range} from s{from} to s{to} (follow it with `skvctl operators`)"),
    ))
}

pub async fn drain(g: &Global, store: u64) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    c.drain_store(authed(g, pb::AdminDrainStoreRequest { store_id: store })?)
        .await
        .map_err(status_err("drain"))?;
    Ok(done(
        g,
        format!("draining s{store}: `skvctl stores` shows it drained once it holds no replica"),
    ))
}

pub async fn scheduler(g: &Global, action: SchedulerAction) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    let paused = action == SchedulerAction::Pause;
    c.set_scheduler_paused(authed(g, pb::SetSchedulerPausedRequest { paused })?)
        .await
        .map_err(status_err("scheduler"))?;
    Ok(done(
        g,
        if paused {
            "scheduler paused".into()
        } else {
            "scheduler resumed".into()
        },
    ))
}

pub async fn status(g: &Global) -> Result<ExitCode> {
    let mut c = connect(g).await?;
    let members = c
        .get_members(pb::GetMembersRequest {})
        .await
        .map_err(status_err("placement members"))?
        .into_inner();
    let stores = all_stores(&mut c).await.context("status")?;
    let ranges = all_ranges(&mut c).await.context("status")?;
    let up = stores.iter().filter(|s| s.state == pb::StoreState::Up as i32).count();
    let leaderless = ranges.iter().filter(|r| r.leader_store_id == 0).count();
    let leader = members.leader.as_ref();
    match g.output {
        Output::Json => println!(
            "{}",
            json!({
                "cluster_id": members.cluster_id,
                "placement_leader": leader.map(|m| json!({"name": m.name, "address": m.address})),
                "placement_members": members.members.iter().map(|m| json!({"name": m.name, "address": m.address})).collect::<Vec<_>>(),
                "stores": stores.len(),
                "stores_up": up,
                "ranges": ranges.len(),
                "ranges_without_leader": leaderless,
            })
        ),
        Output::Table => {
            println!("cluster:    {}", members.cluster_id);
            println!(
                "placement:  {} member(s), leader {}",
                members.members.len(),
                leader.map_or("none".to_string(), |m| format!("{} ({})", m.name, m.address))
            );
            for m in &members.members {
                println!("            - {} {}", m.name, m.address);
            }
            println!("stores:     {up}/{} up", stores.len());
            println!("ranges:     {} ({leaderless} without a known leader)", ranges.len());
        }
    }
    Ok(0)
}

fn backup_json(b: &pb::BackupInfo) -> Value {
    json!({
        "id": b.id,
        "state": b.state,
        "created_unix_ms": b.created_unix_ms,
        "finished_unix_ms": b.finished_unix_ms,
        "bytes": b.bytes,
        "keys": b.keys,
        "ranges": b.ranges,
        "error": b.error,
    })
}

fn restore_json(r: &pb::RestoreInfo) -> Value {
    json!({
        "backup_id": r.backup_id,
        "state": r.state,
        "started_unix_ms": r.started_unix_ms,
        "finished_unix_ms": r.finished_unix_ms,
        "keys": r.keys,
        "bytes": r.bytes,
        "ranges_done": r.ranges_done,
        "ranges": r.ranges,
        "error": r.error,
    })
}

fn backup_rows(bs: &[pb::BackupInfo]) -> String {
    let rows: Vec<Vec<String>> = bs
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.state.clone(),
                ago(b.created_unix_ms),
                bytes(b.bytes),
                b.keys.to_string(),
                b.ranges.to_string(),
                b.error.clone(),
            ]
        })
        .collect();
    table(&["ID", "STATE", "CREATED", "SIZE", "KEYS", "RANGES", "ERROR"], &rows)
}

async fn list_backups(g: &Global) -> Result<Vec<pb::BackupInfo>> {
    let mut c = connect_admin(g).await?;
    Ok(c.list_backups(authed(g, pb::ListBackupsRequest {})?)
        .await
        .map_err(status_err("listing backups"))?
        .into_inner()
        .backups)
}

async fn restore_status(g: &Global) -> Result<Option<pb::RestoreInfo>> {
    let mut c = connect_admin(g).await?;
    Ok(c.restore_status(authed(g, pb::RestoreStatusRequest {})?)
        .await
        .map_err(status_err("restore status"))?
        .into_inner()
        .restore)
}

/// Polls `poll` every half second until it answers something that is not running; calls
/// that fail (a placement failover) are retried until `wait` runs out.
async fn wait_for<T, F, Fut>(wait: &crate::args::BackupWait, what: &str, mut poll: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.wait_secs);
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        match poll().await {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("{what}: gave up waiting")),
                None => anyhow!("{what}: still running after {} s (it goes on)", wait.wait_secs),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn backup(g: &Global, command: crate::args::BackupCommand) -> Result<ExitCode> {
    use crate::args::BackupCommand;
    match command {
        BackupCommand::Create(wait) => {
            let mut c = connect_admin(g).await?;
            let b = c
                .create_backup(authed(g, pb::CreateBackupRequest {})?)
                .await
                .map_err(status_err("backup create"))?
                .into_inner()
                .backup
                .ok_or_else(|| anyhow!("placement answered without the backup"))?;
            let b = if wait.no_wait {
                b
            } else {
                let id = b.id.clone();
                wait_for(&wait, &format!("backup {id}"), || async {
                    let all = list_backups(g).await?;
                    match all.into_iter().find(|x| x.id == id) {
                        Some(x) if x.state == "running" => Ok(None),
                        Some(x) => Ok(Some(x)),
                        None => Err(anyhow!("backup {id} is no longer listed")),
                    }
                })
                .await?
            };
            match g.output {
                Output::Json => println!("{}", backup_json(&b)),
                Output::Table => print!("{}", backup_rows(std::slice::from_ref(&b))),
            }
            if b.state == "failed" {
                return Err(anyhow!("backup {} failed: {}", b.id, b.error));
            }
            Ok(0)
        }
        BackupCommand::List => {
            let bs = list_backups(g).await?;
            match g.output {
                Output::Json => println!("{}", Value::Array(bs.iter().map(backup_json).collect())),
                Output::Table => print!("{}", backup_rows(&bs)),
            }
            Ok(0)
        }
        BackupCommand::Delete { id } => {
            let mut c = connect_admin(g).await?;
            let existed = c
                .delete_backup(authed(g, pb::DeleteBackupRequest { id: id.clone() })?)
                .await
                .map_err(status_err("backup delete"))?
                .into_inner()
                .existed;
            match g.output {
                Output::Json => println!("{}", json!({ "id": id, "existed": existed })),
                Output::Table if existed => println!("backup {id} deleted"),
                Output::Table => println!("backup {id} was not there"),
            }
            Ok(0)
        }
        BackupCommand::RestoreStatus => {
            let r = restore_status(g).await?;
            match (g.output, &r) {
                (Output::Json, Some(r)) => println!("{}", restore_json(r)),
                (Output::Json, None) => println!("null"),
                (Output::Table, Some(r)) => println!(
                    "restore of {}: {} ({}/{} range objects, {} keys, {}){}",
                    r.backup_id,
                    r.state,
                    r.ranges_done,
                    r.ranges,
                    r.keys,
                    bytes(r.bytes),
                    if r.error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.error)
                    }
                ),
                (Output::Table, None) => println!("this cluster was never restored"),
            }
            Ok(0)
        }
        BackupCommand::Restore { id, wait } => {
            let mut c = connect_admin(g).await?;
            let r = c
                .restore_backup(authed(g, pb::RestoreBackupRequest { id: id.clone() })?)
                .await
                .map_err(status_err("backup restore"))?
                .into_inner()
                .restore
                .ok_or_else(|| anyhow!("placement answered without the restore"))?;
            let r = if wait.no_wait || r.state != "running" {
                r
            } else {
                wait_for(&wait, &format!("restore of {id}"), || async {
                    match restore_status(g).await? {
                        Some(x) if x.state == "running" => Ok(None),
                        Some(x) => Ok(Some(x)),
                        None => Err(anyhow!("no restore recorded")),
                    }
                })
                .await?
            };
            match g.output {
                Output::Json => println!("{}", restore_json(&r)),
                Output::Table => println!(
                    "restore of {}: {} ({}/{} range objects, {} keys, {})",
                    r.backup_id,
                    r.state,
                    r.ranges_done,
                    r.ranges,
                    r.keys,
                    bytes(r.bytes)
                ),
            }
            if r.state == "failed" {
                return Err(anyhow!("restore of {} failed: {}", r.backup_id, r.error));
            }
            Ok(0)
        }
    }
}
