//! A background read/write workload for end-to-end tests that reshape the cluster while
//! clients run: every acknowledged write is remembered, every read is checked against
//! what was acknowledged before it started, and every client-visible error is kept.
//!
//! Each key has exactly one writer, which writes it sequentially with a rising sequence
//! number in the value, so the last acknowledged value of every key is known exactly and a
//! read must return that sequence number or a later one.

use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Shape of a [`Workload`].
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Keys are `{prefix}{index:06}`.
    pub prefix: String,
    pub keys: usize,
    pub writers: usize,
    pub readers: usize,
    /// Pause between two operations of one task (0: closed loop as fast as it goes).
    pub pause: Duration,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            prefix: "w/".into(),
            keys: 400,
            writers: 4,
            readers: 4,
            pause: Duration::ZERO,
        }
    }
}

/// What a stopped workload saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// key -> last acknowledged sequence number.
    pub acked: HashMap<Vec<u8>, u64>,
    /// Client-visible errors, with the operation and key.
    pub errors: Vec<String>,
    /// Reads that returned an older value than one acknowledged before they started.
    pub stale_reads: Vec<String>,
    pub ops: u64,
}

struct State {
    acked: Mutex<HashMap<Vec<u8>, u64>>,
    errors: Mutex<Vec<String>>,
    stale: Mutex<Vec<String>>,
    ops: AtomicU64,
}

/// A running workload; [`Workload::stop`] ends it.
pub struct Workload {
    state: Arc<State>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn value(writer: usize, seq: u64) -> Vec<u8> {
    format!("{writer}:{seq}:{}", "x".repeat(64)).into_bytes()
}

fn seq_of(v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?;
    s.split(':').nth(1)?.parse().ok()
}

impl Workload {
    pub fn start(client: skv::Client, opts: WorkloadOptions) -> Workload {
        let state = Arc::new(State {
            acked: Mutex::new(HashMap::new()),
            errors: Mutex::new(Vec::new()),
            stale: Mutex::new(Vec::new()),
            ops: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let key = {
            let prefix = opts.prefix.clone();
            move |i: usize| format!("{prefix}{i:06}").into_bytes()
        };
        let writers = opts.writers.max(1);
        for w in 0..writers {
            let (client, state, stop, key, pause) =
                (client.clone(), state.clone(), stop.clone(), key.clone(), opts.pause);
            let mine: Vec<usize> = (0..opts.keys).filter(|i| i % writers == w).collect();
            tasks.push(tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.is_cancelled() && !mine.is_empty() {
                    seq += 1;
                    let i = mine[rand::rng().random_range(0..mine.len())];
                    let k = key(i);
                    match client.put(&k, value(w, seq)).await {
                        Ok(_) => {
                            state.acked.lock().await.insert(k, seq);
                        }
                        Err(e) => state
                            .errors
                            .lock()
                            .await
                            .push(format!("put {}: {e}", String::from_utf8_lossy(&k))),
                    }
                    state.ops.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }));
        }
        for _ in 0..opts.readers {
            let (client, state, stop, key, pause, n) = (
                client.clone(),
                state.clone(),
                stop.clone(),
                key.clone(),
                opts.pause,
                opts.keys.max(1),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let k = key(rand::rng().random_range(0..n));
                    let before = state.acked.lock().await.get(&k).copied();
                    match client.get(&k).await {
                        Ok(got) => {
                            let got_seq = got.as_ref().and_then(|e| seq_of(&e.value));
                            if let Some(b) = before
                                && got_seq.is_none_or(|g| g < b)
                            {
                                state.stale.lock().await.push(format!(
                                    "get {}: acknowledged seq {b} before the read, read {got_seq:?}",
                                    String::from_utf8_lossy(&k)
                                ));
                            }
                        }
                        Err(e) => state
                            .errors
                            .lock()
                            .await
                            .push(format!("get {}: {e}", String::from_utf8_lossy(&k))),
                    }
                    state.ops.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }));
        }
        Workload { state, stop, tasks }
    }

    /// Operations done so far.
    pub fn ops(&self) -> u64 {
        self.state.ops.load(Ordering::Relaxed)
    }

    /// Client-visible errors so far.
    pub async fn error_count(&self) -> usize {
        self.state.errors.lock().await.len()
    }

    /// Stops every task and returns what they saw.
    pub async fn stop(self) -> Outcome {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        Outcome {
            acked: std::mem::take(&mut *self.state.acked.lock().await),
            errors: std::mem::take(&mut *self.state.errors.lock().await),
            stale_reads: std::mem::take(&mut *self.state.stale.lock().await),
            ops: self.state.ops.load(Ordering::Relaxed),
        }
    }

    /// Stops the workload and checks what a client may expect of skv through any fault or
    /// reshaping: no client-visible error, no stale read, something acknowledged, and every
    /// acknowledged write read back through `client`. Panics, naming `what`, otherwise.
    pub async fn stop_and_check(self, client: &skv::Client, what: &str) -> Outcome {
        let out = self.stop().await;
        assert!(
            out.errors.is_empty(),
            "{what}: client-visible errors: {:?}",
            &out.errors[..out.errors.len().min(10)]
        );
        assert!(out.stale_reads.is_empty(), "{what}: stale reads: {:?}", out.stale_reads);
        assert!(!out.acked.is_empty(), "{what}: the workload acknowledged nothing");
        let bad = out.verify(client).await;
        assert!(bad.is_empty(), "{what}: acknowledged writes lost: {bad:?}");
        out
    }
}

impl Outcome {
    /// Reads back every acknowledged key; returns the keys whose value is missing or older.
    pub async fn verify(&self, client: &skv::Client) -> Vec<String> {
        let mut bad = Vec::new();
        for (k, seq) in &self.acked {
            match client.get(k).await {
                Ok(Some(e)) if seq_of(&e.value).is_some_and(|s| s >= *seq) => {}
                other => bad.push(format!(
                    "{}: acknowledged seq {seq}, read {:?}",
                    String::from_utf8_lossy(k),
                    other.map(|o| o.map(|e| String::from_utf8_lossy(&e.value).into_owned()))
                )),
            }
        }
        bad
    }
}
