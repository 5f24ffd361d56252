//! A chaos run: start a process cluster, run recording clients over a few keys while the
//! nemesis injects faults, heal, read every key back, check the history, and say so.

use crate::checker::{CheckOptions, Report, check, describe};
use crate::cluster::{ChaosCluster, ClusterError, ClusterSpec};
use crate::direct::DirectReader;
use crate::history::{History, Input, NemesisEvent, Op, Outcome, Output};
use crate::nemesis::{self, Events, NemesisKind, NemesisOptions};
use crate::recorder::{Recorder, RecordingClient};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Errors that stop a run before it can be checked.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cluster could not start or heal.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Writing the history failed.
    #[error("write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// How long the clients and the nemesis run (healing and checking come after).
    pub duration: Duration,
    /// Seed of the workload's and the nemesis's choices. Timing is not deterministic (real
    /// processes), so a seed replays the same plan, not the same history; a failing run's
    /// history is written to a file and replays exactly through `skv-chaos check`.
    pub seed: u64,
    /// The faults (none: a calm run).
    pub nemeses: Vec<NemesisKind>,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys (few: contention is the point).
    pub keys: usize,
    /// Cluster shape and binaries.
    pub cluster: ClusterSpec,
    /// Where a failing run's history goes (and every run's with `always_write_history`).
    pub out_dir: PathBuf,
    /// Write the history even when the run is clean.
    pub always_write_history: bool,
    /// Checker limits.
    pub check: CheckOptions,
    /// Record a write the SDK calls a definite failure as such (true), or as unknown.
    pub trust_definite: bool,
    /// The nemesis's timing.
    pub calm_ms: (u64, u64),
    /// How long a process stays killed or paused (ms).
    pub fault_ms: (u64, u64),
    /// Probability that two faults run at once.
    pub together: f64,
    /// The SDK's call timeout.
    pub client_timeout: Duration,
    /// The SDK's per-attempt timeout.
    pub attempt_timeout: Duration,
    /// A deliberate bug in the clients, to show the checker catches it (None for real runs).
    pub plant: Option<Plant>,
}

/// A planted bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Plant {
    /// Half the reads are served by any replica without ReadIndex (`get_stale`) but recorded
    /// as linearizable gets: a follower read without ReadIndex, as issue 14 names it.
    StaleReads,
    /// Every storenode runs with the failpoint `storenode::read::skip_read_index` (ADR 0029):
    /// linearizable gets, routed as usual, are served from local state without the ReadIndex
    /// barrier, by a leader that may have been deposed and by a follower the proxy still
    /// takes for the leader. The clients are correct; the bug is in the servers. Needs
    /// binaries built with `--features skv-storenode/failpoints`.
    SkipReadIndex,
}

impl Plant {
    /// The storenodes' `FAILPOINTS` for this plant.
    pub fn store_failpoints(self) -> &'static str {
        match self {
            Plant::StaleReads => "",
            Plant::SkipReadIndex => "storenode::read::skip_read_index=return",
        }
    }
}

impl RunOptions {
    /// Defaults for a cluster from `bin_dir`: 60 s, the default faults, 8 clients on 6 keys.
    pub fn new(bin_dir: PathBuf) -> Self {
        Self {
            duration: Duration::from_secs(60),
            seed: 1,
            nemeses: NemesisKind::DEFAULT.to_vec(),
            clients: 8,
            keys: 6,
            cluster: ClusterSpec {
                placements: 2,
                storenodes: 3,
                proxies: 2,
                bin_dir,
                store_failpoints: String::new(),
                tombstone_gc_secs: 2,
                lazyfs_disks: false,
                etcd_members: 1,
                fake_clock: false,
                netns: false,
            },
            out_dir: PathBuf::from("target/chaos"),
            always_write_history: false,
            check: CheckOptions::default(),
            trust_definite: true,
            calm_ms: (2_000, 6_000),
            fault_ms: (2_000, 8_000),
            together: 0.3,
            client_timeout: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(3),
            plant: None,
        }
    }
}

/// What a run found.
pub struct RunSummary {
    /// The seed.
    pub seed: u64,
    /// Wall time of the workload phase.
    pub duration: Duration,
    /// The whole history (final reads included).
    pub history: History,
    /// The checker's report.
    pub report: Report,
    /// Acknowledged writes the final reads do not reflect.
    pub lost_writes: Vec<String>,
    /// Keys whose final read never succeeded.
    pub unread_keys: Vec<String>,
    /// How long the check took.
    pub check_time: Duration,
    /// The history file, when written.
    pub history_file: Option<PathBuf>,
    /// The cluster's directory, kept when the run failed.
    pub kept_dir: Option<PathBuf>,
    /// What the final heal did.
    pub healed: Vec<String>,
    /// The planted bug, if any.
    pub plant: Option<Plant>,
    /// Delete tombstones the storenodes' GC removed during the run (ADR 0034).
    pub tombstones_collected: u64,
}

impl RunSummary {
    /// No violation, no undecided key, no lost write, every key read back.
    pub fn is_clean(&self) -> bool {
        self.report.is_linearizable() && self.lost_writes.is_empty() && self.unread_keys.is_empty()
    }

    /// Nemesis events of one kind.
    pub fn events(&self, kind: &str) -> usize {
        self.history.nemesis.iter().filter(|e| e.kind == kind).count()
    }

    /// Nemesis events of one kind that worked (their detail does not say FAILED).
    pub fn events_ok(&self, kind: &str) -> usize {
        self.history
            .nemesis
            .iter()
            .filter(|e| e.kind == kind && !e.detail.contains("FAILED"))
            .count()
    }

    /// Windows `[start, end)` (ns since the run's start) between each event of kind `start`
    /// whose detail contains `with` and the next event of kind `end` with the same target.
    pub fn fault_windows(&self, start: &str, with: &str, end: &str) -> Vec<(u64, u64)> {
        let ev = &self.history.nemesis;
        ev.iter()
            .enumerate()
            .filter(|(_, e)| e.kind == start && e.detail.contains(with) && !e.detail.contains("FAILED"))
            .filter_map(|(k, e)| {
                ev[k + 1..]
                    .iter()
                    .find(|x| x.kind == end && x.target == e.target)
                    .map(|x| (e.at, x.at))
            })
            .collect()
    }

    /// Calls that were invoked and returned `ok` inside the window (`at` values in ns), by
    /// kind: (reads, writes).
    pub fn ok_ops_within(&self, (from, to): (u64, u64)) -> (usize, usize) {
        let mut n = (0, 0);
        for o in &self.history.ops {
            if matches!(o.outcome, Outcome::Ok { .. }) && o.call >= from && o.ret <= to {
                if o.input == Input::Get {
                    n.0 += 1;
                } else {
                    n.1 += 1;
                }
            }
        }
        n
    }

    /// Calls with an `ok` outcome.
    pub fn ok_ops(&self) -> usize {
        self.history
            .ops
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Ok { .. }))
            .count()
    }
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.history;
        writeln!(
            f,
            "== skv-chaos run, seed {}, workload {:.0?}{} ==",
            self.seed,
            self.duration,
            match self.plant {
                Some(p) => format!(", PLANTED BUG {p:?}"),
                None => String::new(),
            }
        )?;
        writeln!(f, "operations: {} recorded", h.ops.len())?;
        let mut kinds: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        for ((kind, class), n) in h.counts() {
            let slot = match class {
                "ok" => 0,
                "fail" => 1,
                _ => 2,
            };
            kinds.entry(kind).or_default()[slot] += n;
        }
        writeln!(f, "  {:<18} {:>8} {:>8} {:>8}", "kind", "ok", "fail", "unknown")?;
        for (k, [ok, fail, unknown]) in &kinds {
            writeln!(f, "  {k:<18} {ok:>8} {fail:>8} {unknown:>8}")?;
        }
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for o in h.ops.iter().filter(|o| !matches!(o.outcome, Outcome::Ok { .. })) {
            if let Some(e) = &o.error {
                *errors.entry(error_kind(e)).or_default() += 1;
            }
        }
        if !errors.is_empty() {
            writeln!(f, "errors of failed and unknown calls:")?;
            for (e, n) in &errors {
                writeln!(f, "  {n:>8}  {e}")?;
            }
        }
        let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &h.nemesis {
            *by_kind.entry(e.kind.as_str()).or_default() += 1;
        }
        writeln!(
            f,
            "nemesis: {} events ({})",
            h.nemesis.len(),
            by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        for e in &h.nemesis {
            writeln!(
                f,
                "  {:>8.3}s  {:<16} {:<9} {}",
                e.at as f64 / 1e9,
                e.kind,
                e.target,
                e.detail
            )?;
        }
        if !self.healed.is_empty() {
            writeln!(f, "heal: {}", self.healed.join(", "))?;
        }
        writeln!(f, "tombstones collected by GC: {}", self.tombstones_collected)?;
        let r = &self.report;
        writeln!(
            f,
            "check: {} keys, {} calls ({} unknown-outcome writes), {} search steps, {:.2?}",
            r.keys, r.ops_checked, r.unknown_writes, r.steps, self.check_time
        )?;
        writeln!(f, "linearizability violations: {}", r.violations.len())?;
        for v in &r.violations {
            write!(f, "{}", describe(v, h))?;
        }
        if !r.undecided.is_empty() {
            writeln!(f, "undecided keys (search bound reached): {:?}", r.undecided)?;
        }
        writeln!(f, "acknowledged writes lost: {}", self.lost_writes.len())?;
        for l in self.lost_writes.iter().take(20) {
            writeln!(f, "  {l}")?;
        }
        if !self.unread_keys.is_empty() {
            writeln!(f, "keys never read back: {:?}", self.unread_keys)?;
        }
        if let Some(p) = &self.history_file {
            writeln!(f, "history: {} (replay: skv-chaos check {})", p.display(), p.display())?;
        }
        if let Some(p) = &self.kept_dir {
            writeln!(f, "cluster data and logs kept in {}", p.display())?;
        }
        write!(f, "result: {}", if self.is_clean() { "CLEAN" } else { "FAILED" })
    }
}

/// A short class for an error message (its text up to the first colon).
fn error_kind(e: &str) -> String {
    let head: String = e.split(':').next().unwrap_or(e).chars().take(40).collect();
    head.trim().to_string()
}

/// One run.
pub async fn run(opts: RunOptions) -> Result<RunSummary, RunError> {
    let rec = Recorder::new(opts.trust_definite);
    let mut spec = opts.cluster.clone();
    // The plant's failpoints, unless the caller set FAILPOINTS itself (a control run sets
    // `storenode::read::skip_read_index=off`: the same follower reads against correct servers).
    if let Some(p) = opts.plant
        && spec.store_failpoints.is_empty()
    {
        spec.store_failpoints = p.store_failpoints().to_string();
    }
    // The slow-disk nemesis needs the storenodes on lazyfs mounts.
    spec.lazyfs_disks |= opts.nemeses.contains(&NemesisKind::SlowDisk);
    // The etcd-member nemesis needs a 3-member etcd.
    if opts.nemeses.contains(&NemesisKind::EtcdMember) {
        spec.etcd_members = spec.etcd_members.max(3);
    }
    // The clock nemesis runs every process under libfaketime.
    spec.fake_clock |= opts.nemeses.contains(&NemesisKind::Clock);
    // The partition nemesis needs the storenodes in network namespaces.
    spec.netns |= opts.nemeses.contains(&NemesisKind::Partition);
    // A move needs a store without a replica of the range, a drain 3 UP stores besides the
    // drained one: 4 storenodes.
    if opts.nemeses.contains(&NemesisKind::Move) || opts.nemeses.contains(&NemesisKind::Drain) {
        spec.storenodes = spec.storenodes.max(4);
    }
    let cluster = ChaosCluster::start(&spec).await?;
    tracing::info!(dir = %cluster.dir().display(), "cluster up");
    // A fresh namespace per run: every key starts absent at version 0.
    let nonce: u32 = rand::random();
    let ns = format!("chaos{}x{nonce:08x}", opts.seed);
    let keys: Vec<String> = (0..opts.keys.max(1)).map(|i| format!("k{i}")).collect();
    let prefix = skv_common::keys::namespace_prefix(ns.as_bytes()).unwrap_or_default();
    let internal_keys: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| [prefix.as_slice(), k.as_bytes()].concat())
        .collect();

    let mut clients = Vec::new();
    for i in 0..opts.clients.max(1) {
        let c = cluster.client(&ns, opts.client_timeout, opts.attempt_timeout).await?;
        clients.push(rec.client(c, i as u32));
    }
    let final_client = rec.client(
        cluster.client(&ns, opts.client_timeout, opts.attempt_timeout).await?,
        opts.clients.max(1) as u32,
    );
    let pd_urls: Vec<String> = cluster.placement_urls().split(',').map(String::from).collect();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let events: Events = Arc::new(Mutex::new(Vec::new()));

    let started = Instant::now();
    let until = started + opts.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    // --plant skip-read-index: half the gets go straight to a follower (crate::direct).
    let direct = (opts.plant == Some(Plant::SkipReadIndex))
        .then(|| (Arc::new(DirectReader::new(pd_urls.clone())), internal_keys.clone()));
    for c in clients {
        let (keys, stop) = (keys.clone(), stop.clone());
        let seed = opts.seed.wrapping_mul(0x9e37_79b9).wrapping_add(u64::from(c.id()));
        let plant = opts.plant;
        let direct = direct.clone();
        workers.push(tokio::spawn(async move {
            client_loop(c, keys, seed, stop, plant, direct).await
        }));
    }
    let nemesis = tokio::spawn(nemesis::run(
        cluster.clone(),
        rec.clone(),
        events.clone(),
        NemesisOptions {
            kinds: opts.nemeses.clone(),
            seed: opts.seed,
            calm_ms: opts.calm_ms,
            fault_ms: opts.fault_ms,
            together: opts.together,
            internal_keys: internal_keys.clone(),
        },
        until,
    ));
    let mut last_report = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "skv-chaos: {:.0?} of {:.0?}, {} calls, {} nemesis events",
                started.elapsed(),
                opts.duration,
                rec.len(),
                events.lock().len()
            );
        }
    }
    let _ = nemesis.await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let duration = started.elapsed();

    // Heal, wait until writable, then read every key until each read succeeds.
    let healed = {
        let mut c = cluster.lock().await;
        let healed = c.heal();
        for h in &healed {
            events.lock().push(NemesisEvent {
                at: rec.now(),
                kind: "heal".into(),
                target: h.split_whitespace().last().unwrap_or("").to_string(),
                detail: h.clone(),
            });
        }
        healed
    };
    let writable = {
        let c = cluster.lock().await;
        c.wait_writable(Duration::from_secs(120)).await
    };
    if let Err(e) = &writable {
        tracing::warn!("after healing: {e}");
    }
    let mut final_reads: HashMap<String, Op> = HashMap::new();
    let read_deadline = Instant::now() + Duration::from_secs(120);
    for k in &keys {
        loop {
            let op = final_client.invoke(k, Input::Get).await;
            if matches!(op.outcome, Outcome::Ok { .. }) {
                final_reads.insert(k.clone(), op);
                break;
            }
            if Instant::now() >= read_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let unread_keys: Vec<String> = keys.iter().filter(|k| !final_reads.contains_key(*k)).cloned().collect();

    let history = History {
        ops: rec.ops(),
        nemesis: events.lock().clone(),
    };
    let t = std::time::Instant::now();
    let report = check(&history, &opts.check);
    let check_time = t.elapsed();
    let lost_writes = lost_writes(&history.ops, &final_reads);

    let mut summary = RunSummary {
        seed: opts.seed,
        duration,
        history,
        report,
        lost_writes,
        unread_keys,
        check_time,
        history_file: None,
        kept_dir: None,
        healed,
        plant: opts.plant,
        tombstones_collected: cluster.lock().await.tombstones_collected(),
    };
    if !summary.is_clean() || opts.always_write_history {
        summary.history_file = Some(write_history(&opts.out_dir, opts.seed, &summary.history)?);
    }
    if !summary.is_clean() {
        summary.kept_dir = Some(cluster.lock().await.keep_dir());
    }
    Ok(summary)
}

/// Writes `history` as JSON under `dir`; returns the file.
pub fn write_history(dir: &std::path::Path, seed: u64, history: &History) -> Result<PathBuf, RunError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = dir.join(format!("history-seed{seed}-{stamp}.json"));
    std::fs::create_dir_all(dir).map_err(|source| RunError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let json = serde_json::to_vec(history).map_err(|e| RunError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(|source| RunError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// One client: random operations on random keys until told to stop. CAS and conditional
/// writes mostly name the version this client last saw, so some succeed under contention.
async fn client_loop(
    c: RecordingClient,
    keys: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
    plant: Option<Plant>,
    direct: Option<(Arc<DirectReader>, Vec<Vec<u8>>)>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: HashMap<usize, u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let k = rng.random_range(0..keys.len());
        let last = seen.get(&k).copied().unwrap_or(0);
        let guess = if rng.random_bool(0.8) {
            last
        } else {
            rng.random_range(0..=last + 1)
        };
        let value = c.recorder().fresh_value();
        let input = match rng.random_range(0..100) {
            0..40 => Input::Get,
            40..60 => Input::Put { value },
            60..80 => Input::Cas { expected: guess, value },
            80..88 => Input::Delete,
            88..94 => Input::PutIfVersion { value, version: guess },
            _ => Input::DeleteIfVersion { version: guess },
        };
        let op = if input == Input::Get && plant == Some(Plant::StaleReads) && rng.random_bool(0.5) {
            c.planted_stale_get(&keys[k]).await
        } else if let Some((reader, internal)) = direct.as_ref().filter(|_| input == Input::Get && rng.random_bool(0.5))
        {
            let pick = rng.random_range(0..2usize);
            c.record_read(&keys[k], reader.follower_get(&internal[k], pick)).await
        } else {
            c.invoke(&keys[k], input).await
        };
        match op.output() {
            Some(Output::Read { found }) => {
                seen.insert(k, found.map(|f| f.version).unwrap_or(0));
            }
            Some(Output::Written { version }) => {
                seen.insert(k, *version);
            }
            Some(Output::Deleted { .. }) => {
                seen.insert(k, 0);
            }
            Some(Output::ConditionFailed { current: Some(v) }) => {
                seen.insert(k, *v);
            }
            Some(Output::ConditionFailed { current: None }) | None => {}
        }
        if op.output().is_none() {
            // A failed call: do not spin while the cluster is down.
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..100))).await;
        }
    }
}

/// Acknowledged writes the final reads contradict. For each key read back: an acknowledged
/// write of version `V` and value `X` is lost when the final read shows a version below `V`,
/// or version `V` with another value, or nothing while no delete (acknowledged or unknown)
/// could have come after the write. (The checker proves more; this is the plain statement
/// of "no acknowledged write lost", independent of its search.)
pub fn lost_writes(ops: &[Op], final_reads: &HashMap<String, Op>) -> Vec<String> {
    let mut lost = Vec::new();
    for (key, fr) in final_reads {
        let Some(Output::Read { found }) = fr.output() else {
            continue;
        };
        for w in ops.iter().filter(|o| &o.key == key && o.id != fr.id) {
            let (Some(Output::Written { version }), Some(value)) = (w.output(), w.input.written_value()) else {
                continue;
            };
            let problem = match found {
                Some(f) if f.version < *version => Some(format!("final read shows version {}", f.version)),
                Some(f) if f.version == *version && f.value != value => Some(format!(
                    "final read shows version {} with value {} instead of {value}",
                    f.version, f.value
                )),
                Some(_) => None,
                None => {
                    let deleted_after = ops.iter().any(|d| {
                        &d.key == key
                            && matches!(d.input, Input::Delete | Input::DeleteIfVersion { .. })
                            && match &d.outcome {
                                Outcome::Ok {
                                    output: Output::Deleted { .. },
                                } => d.ret >= w.call,
                                Outcome::Unknown => true,
                                _ => false,
                            }
                    });
                    (!deleted_after).then(|| "final read finds nothing and no delete came after it".to_string())
                }
            };
            if let Some(p) = problem {
                lost.push(format!(
                    "key {key}: {} #{} (value {value}, version {version}, acknowledged at {:.3}s): {p}",
                    w.input.kind(),
                    w.id,
                    w.ret as f64 / 1e9
                ));
            }
        }
    }
    lost.sort();
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Observed;

    fn op(id: usize, key: &str, input: Input, outcome: Outcome, call: u64, ret: u64) -> Op {
        Op {
            id,
            client: 0,
            key: key.into(),
            input,
            outcome,
            call,
            ret,
            error: None,
        }
    }

    #[test]
    fn lost_writes_are_named() {
        let put = |id, value, version, t| {
            op(
                id,
                "k",
                Input::Put { value },
                Outcome::Ok {
                    output: Output::Written { version },
                },
                t,
                t + 1,
            )
        };
        let read = |id, found: Option<(u64, u64)>| {
            op(
                id,
                "k",
                Input::Get,
                Outcome::Ok {
                    output: Output::Read {
                        found: found.map(|(value, version)| Observed { value, version }),
                    },
                },
                100,
                101,
            )
        };
        let ops = vec![put(0, 10, 1, 0), put(1, 11, 2, 10)];
        let finals = |r: Op| HashMap::from([("k".to_string(), r)]);
        assert!(lost_writes(&ops, &finals(read(2, Some((11, 2))))).is_empty());
        assert_eq!(lost_writes(&ops, &finals(read(2, Some((10, 1))))).len(), 1);
        assert_eq!(lost_writes(&ops, &finals(read(2, Some((99, 2))))).len(), 1);
        assert_eq!(lost_writes(&ops, &finals(read(2, None))).len(), 2);
        let mut with_delete = ops.clone();
        with_delete.push(op(3, "k", Input::Delete, Outcome::Unknown, 50, 60));
        assert!(lost_writes(&with_delete, &finals(read(4, None))).is_empty());
    }
}
