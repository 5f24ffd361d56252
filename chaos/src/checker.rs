//! A linearizability checker for skv histories (Wing & Gong's search with Lowe's memoization,
//! as in Porcupine), per key.
//!
//! - **Per key.** skv's operations each touch one key, and linearizability is compositional
//!   (Herlihy & Wing), so every key's sub-history is checked on its own.
//! - **Outcomes.** A call that succeeded happened exactly once between its invocation and its
//!   completion. A call that failed definitely did not happen and is left out. A call whose
//!   outcome is unknown may have happened at any moment after its invocation, or never: its
//!   completion is +∞, and since an operation completing at +∞ can always be placed last,
//!   the search is done once every *completed* call is placed. A read with an unknown
//!   outcome constrains nothing and is left out.
//! - **Search.** Depth-first over the calls that may go next (their invocation precedes
//!   every pending completion), with a memo of (calls placed, key state) already explored;
//!   the placed set is hashed with two 64-bit Zobrist keys per call, so a memo entry is 16
//!   bytes and an update O(1).
//! - **Symmetry.** Unknown-outcome writes that nobody can tell apart (deletes with the same
//!   condition; puts with the same condition whose value no read returned) are placed only in
//!   invocation order. Swapping two such calls in any linearization gives another one (both
//!   complete at +∞, the earlier-invoked one is available wherever the later one is), so this
//!   loses no linearization and turns 2^k subsets of k crashed writes into k+1 counts.
//! - **Bounded.** At most `max_steps_per_key` search steps per key; past it the key is
//!   reported undecided instead of hanging (see ADR 0026 for the default).

use crate::history::{FOREIGN_VALUE, History, Input, Op, Outcome, Output, Value};
use crate::model::{KeyState, UNOBSERVED, step};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// Limits of a check.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    /// Search steps per key before the key is reported undecided.
    pub max_steps_per_key: u64,
}

/// 10 M steps: seconds of CPU per key at worst and a memo of at most about 200 MB, far above
/// what a valid history of a chaos run needs (about 3 steps per call). ADR 0026.
pub const DEFAULT_MAX_STEPS_PER_KEY: u64 = 10_000_000;

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            max_steps_per_key: DEFAULT_MAX_STEPS_PER_KEY,
        }
    }
}

/// The verdict for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    /// A linearization exists.
    Linearizable,
    /// None exists.
    Violation(Box<Violation>),
    /// The search ran out of steps.
    Undecided {
        /// Steps spent.
        steps: u64,
    },
}

/// Why a key's history is not linearizable: the longest prefix the search could place and
/// the calls that could not go next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// Calls checked on this key.
    pub ops: usize,
    /// Ids of the longest linearizable prefix found, in its order.
    pub prefix: Vec<usize>,
    /// The key's state after that prefix.
    pub state: KeyState,
    /// Id of the call that completed while it could not be placed after that prefix.
    pub stuck: usize,
    /// Ids of completed calls still unplaced that were invoked before `stuck` completed
    /// (the candidates the search tried there).
    pub candidates: Vec<usize>,
    /// Plain-language findings (a read of a value nobody wrote, or one a failed call wrote).
    pub notes: Vec<String>,
}

/// The result of checking a history.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Keys checked.
    pub keys: usize,
    /// Calls checked (definite failures and unknown reads are left out).
    pub ops_checked: usize,
    /// Unknown-outcome writes among them.
    pub unknown_writes: usize,
    /// Keys with no linearization.
    pub violations: Vec<Violation>,
    /// Keys the search gave up on: (key, steps).
    pub undecided: Vec<(String, u64)>,
    /// Search steps over all keys.
    pub steps: u64,
}

impl Report {
    /// Every key was shown linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.violations.is_empty() && self.undecided.is_empty()
    }
}

/// Checks every key of `history`.
pub fn check(history: &History, opts: &CheckOptions) -> Report {
    let mut report = Report::default();
    for (key, ops) in history.by_key() {
        report.keys += 1;
        let part = Partition::new(key, &ops);
        report.ops_checked += part.ops.len();
        report.unknown_writes += part.ops.iter().filter(|o| o.output.is_none()).count();
        let (verdict, steps) = part.search(opts.max_steps_per_key);
        report.steps += steps;
        match verdict {
            KeyVerdict::Linearizable => {}
            KeyVerdict::Violation(v) => report.violations.push(*v),
            KeyVerdict::Undecided { steps } => report.undecided.push((key.to_string(), steps)),
        }
    }
    report
}

/// Checks the calls of one key (all of `ops` must name `key`).
pub fn check_key(key: &str, ops: &[&Op], opts: &CheckOptions) -> KeyVerdict {
    Partition::new(key, ops).search(opts.max_steps_per_key).0
}

/// The report's prefix: completed calls placed, `usize::MAX` - calls placed, the call that
/// could not go next, the state, the placed calls.
type Best = (usize, usize, usize, KeyState, Vec<usize>);

/// One call as the search sees it.
struct POp {
    id: usize,
    input: Input,
    /// `None`: unknown outcome.
    output: Option<Output>,
    call: u64,
    /// `u64::MAX` for an unknown outcome.
    ret: u64,
    /// The previous call of its symmetry class (by invocation), which must be placed first.
    class_pred: Option<usize>,
}

struct Partition<'a> {
    key: &'a str,
    ops: Vec<POp>,
    notes: Vec<String>,
}

impl<'a> Partition<'a> {
    fn new(key: &'a str, all: &[&Op]) -> Self {
        // Which values reads returned, and who wrote which value (failed calls included, for notes).
        let mut observed: HashSet<Value> = HashSet::new();
        let mut writers: HashMap<Value, &Op> = HashMap::new();
        for op in all {
            if let Some(Output::Read { found: Some(o) }) = op.output() {
                observed.insert(o.value);
            }
            if let Some(v) = op.input.written_value() {
                writers.insert(v, op);
            }
        }
        let mut notes = Vec::new();
        for op in all {
            let Some(Output::Read { found: Some(o) }) = op.output() else {
                continue;
            };
            match writers.get(&o.value) {
                None if o.value == FOREIGN_VALUE => {
                    notes.push(format!("read #{} returned bytes that no put of this run wrote", op.id))
                }
                None => notes.push(format!(
                    "read #{} returned value {} (version {}), which no put of this key wrote",
                    op.id, o.value, o.version
                )),
                Some(w) if w.outcome == Outcome::Fail => notes.push(format!(
                    "read #{} returned value {} of {} #{}, which failed definitely ({})",
                    op.id,
                    o.value,
                    w.input.kind(),
                    w.id,
                    w.error.as_deref().unwrap_or("no message")
                )),
                Some(w) if w.call > op.ret => notes.push(format!(
                    "read #{} returned value {} before {} #{} that wrote it was invoked",
                    op.id,
                    o.value,
                    w.input.kind(),
                    w.id
                )),
                Some(_) => {}
            }
        }

        let mut ops: Vec<POp> = Vec::new();
        for op in all {
            let (output, ret) = match &op.outcome {
                Outcome::Ok { output } => (Some(output.clone()), op.ret.max(op.call)),
                Outcome::Fail => continue,
                Outcome::Unknown if !op.input.is_write() => continue,
                Outcome::Unknown => (None, u64::MAX),
            };
            let mut input = op.input.clone();
            if output.is_none() {
                // A crashed write whose value nobody read is indistinguishable from the
                // others of its condition: give them one placeholder value.
                match &mut input {
                    Input::Put { value } | Input::PutIfVersion { value, .. } | Input::Cas { value, .. }
                        if !observed.contains(value) =>
                    {
                        *value = UNOBSERVED
                    }
                    _ => {}
                }
            }
            ops.push(POp {
                id: op.id,
                input,
                output,
                call: op.call,
                ret,
                class_pred: None,
            });
        }
        // Symmetry classes: unknown writes with the same (placeholder) input.
        let mut by_call: Vec<usize> = (0..ops.len()).collect();
        by_call.sort_by_key(|&i| (ops[i].call, ops[i].id));
        let mut last_of_class: HashMap<Input, usize> = HashMap::new();
        for i in by_call {
            let op = &ops[i];
            let symmetric = op.output.is_none()
                && match op.input {
                    Input::Delete | Input::DeleteIfVersion { .. } => true,
                    _ => op.input.written_value() == Some(UNOBSERVED),
                };
            if symmetric {
                let pred = last_of_class.insert(op.input.clone(), i);
                ops[i].class_pred = pred;
            }
        }
        Partition { key, ops, notes }
    }

    /// The search. Returns the verdict and the steps spent.
    fn search(&self, max_steps: u64) -> (KeyVerdict, u64) {
        let n = self.ops.len();
        let must = self.ops.iter().filter(|o| o.output.is_some()).count();
        if must == 0 {
            return (KeyVerdict::Linearizable, 0);
        }
        // Events: node 0 is the head; call of op i is node 1 + 2i, its return 2 + 2i.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
        for (i, op) in self.ops.iter().enumerate() {
            events.push((op.call, 0, i));
            events.push((op.ret, 1, i));
        }
        // At equal times calls come first: touching intervals count as concurrent, so a
        // tie never produces a violation.
        events.sort_unstable();
        let call_node = |i: usize| 1 + 2 * i;
        let ret_node = |i: usize| 2 + 2 * i;
        let op_of = |node: usize| (node - 1) / 2;
        let is_call = |node: usize| node % 2 == 1;
        const NIL: usize = usize::MAX;
        let mut next = vec![NIL; 2 * n + 1];
        let mut prev = vec![NIL; 2 * n + 1];
        let mut last = 0usize;
        for &(_, kind, i) in &events {
            let node = if kind == 0 { call_node(i) } else { ret_node(i) };
            next[last] = node;
            prev[node] = last;
            last = node;
        }

        let (z1, z2) = zobrist(n);
        let mut hash = (0u64, 0u64);
        let mut placed = vec![false; n];
        let mut memo: HashSet<u128, BuildHasherDefault<PassThrough>> = HashSet::default();
        let mut stack: Vec<(usize, KeyState)> = Vec::new();
        let mut state = KeyState::default();
        let mut done = 0usize;
        let mut steps = 0u64;
        let mut best: Option<Best> = None;

        let mut cur = next[0];
        while done < must {
            steps += 1;
            if steps > max_steps {
                return (KeyVerdict::Undecided { steps: steps - 1 }, steps - 1);
            }
            if cur != NIL && is_call(cur) {
                let i = op_of(cur);
                let op = &self.ops[i];
                let allowed = op.class_pred.is_none_or(|p| placed[p]);
                if allowed && let Some(s) = step(&state, &op.input, op.output.as_ref()) {
                    let h = (hash.0 ^ z1[i], hash.1 ^ z2[i]);
                    if memo.insert(memo_key(h, &s)) {
                        stack.push((i, state));
                        state = s;
                        hash = h;
                        placed[i] = true;
                        if op.output.is_some() {
                            done += 1;
                        }
                        // Lift the call and its return out of the list.
                        for node in [call_node(i), ret_node(i)] {
                            let (p, nx) = (prev[node], next[node]);
                            next[p] = nx;
                            if nx != NIL {
                                prev[nx] = p;
                            }
                        }
                        cur = next[0];
                        continue;
                    }
                }
                cur = next[cur];
                continue;
            }
            // A completion whose call is not placed (or the end): back up one call.
            // Keep the prefix with the most completed calls (then the fewest unknown ones)
            // for the report.
            if cur != NIL
                && best
                    .as_ref()
                    .is_none_or(|b| (done, usize::MAX - stack.len()) > (b.0, b.1))
            {
                best = Some((
                    done,
                    usize::MAX - stack.len(),
                    op_of(cur),
                    state,
                    stack.iter().map(|(i, _)| *i).collect(),
                ));
            }
            let Some((i, before)) = stack.pop() else {
                return (KeyVerdict::Violation(Box::new(self.violation(best, &events))), steps);
            };
            state = before;
            hash = (hash.0 ^ z1[i], hash.1 ^ z2[i]);
            placed[i] = false;
            if self.ops[i].output.is_some() {
                done -= 1;
            }
            // Unlift in reverse order.
            for node in [ret_node(i), call_node(i)] {
                let (p, nx) = (prev[node], next[node]);
                next[p] = node;
                if nx != NIL {
                    prev[nx] = node;
                }
            }
            cur = next[call_node(i)];
        }
        (KeyVerdict::Linearizable, steps)
    }

    fn violation(&self, best: Option<Best>, events: &[(u64, u8, usize)]) -> Violation {
        let (prefix, stuck, state) = match best {
            Some((_, _, stuck, state, prefix)) => (prefix, stuck, state),
            None => {
                // Cannot happen with at least one completed call; report the first completion.
                let first = events.iter().find(|e| e.1 == 1).map(|e| e.2).unwrap_or(0);
                (Vec::new(), first, KeyState::default())
            }
        };
        let in_prefix: HashSet<usize> = prefix.iter().copied().collect();
        let stuck_ret = self.ops.get(stuck).map(|o| o.ret).unwrap_or(0);
        let candidates = (0..self.ops.len())
            .filter(|i| !in_prefix.contains(i) && self.ops[*i].call <= stuck_ret && self.ops[*i].output.is_some())
            .map(|i| self.ops[i].id)
            .collect();
        Violation {
            key: self.key.to_string(),
            ops: self.ops.len(),
            prefix: prefix.iter().map(|&i| self.ops[i].id).collect(),
            state,
            stuck: self.ops.get(stuck).map(|o| o.id).unwrap_or(0),
            candidates,
            notes: self.notes.clone(),
        }
    }
}

fn memo_key(h: (u64, u64), s: &KeyState) -> u128 {
    let v = s.value.map_or(0x9e37_79b9_7f4a_7c15, |v| splitmix(v ^ 0x5bd1_e995)) ^ u64::from(s.inexact);
    let a = h.0 ^ splitmix(s.version ^ v);
    let b = h.1 ^ splitmix(splitmix(s.version.rotate_left(17)) ^ v.rotate_left(29));
    (u128::from(a) << 64) | u128::from(b)
}

/// Two independent 64-bit Zobrist keys per call, from a fixed seed (deterministic).
fn zobrist(n: usize) -> (Vec<u64>, Vec<u64>) {
    let mut x = 0x243f_6a88_85a3_08d3u64;
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(x)
    };
    let a = (0..n).map(|_| next()).collect();
    let b = (0..n).map(|_| next()).collect();
    (a, b)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The memo's keys are already uniformly random: hash them by folding.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = (i as u64) ^ ((i >> 64) as u64);
    }
}

/// A readable account of a violation, with the calls involved.
pub fn describe(v: &Violation, history: &History) -> String {
    use std::fmt::Write;
    let by_id: HashMap<usize, &Op> = history.ops.iter().map(|o| (o.id, o)).collect();
    let line = |id: usize| {
        by_id
            .get(&id)
            .map(|o| describe_op(o))
            .unwrap_or_else(|| format!("#{id} ?"))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "key {:?}: not linearizable ({} calls checked). The longest linearizable prefix has {} calls and leaves the key {}.",
        v.key,
        v.ops,
        v.prefix.len(),
        v.state
    );
    let _ = writeln!(s, "  no call can go next before this one completes: {}", line(v.stuck));
    for id in v.prefix.iter().rev().take(5).rev() {
        let _ = writeln!(s, "  placed: {}", line(*id));
    }
    for id in v.candidates.iter().take(10) {
        let _ = writeln!(s, "  unplaced, invoked before it completed: {}", line(*id));
    }
    for n in &v.notes {
        let _ = writeln!(s, "  note: {n}");
    }
    s
}

/// One call on one line: `#id c3 put(v=17) -> written v5 [t 1.200s .. 1.250s]`.
pub fn describe_op(o: &Op) -> String {
    let input = match &o.input {
        Input::Get => "get".to_string(),
        Input::Put { value } => format!("put({value})"),
        Input::PutIfVersion { value, version } => format!("put_if_version({value}, if v{version})"),
        Input::Delete => "delete".to_string(),
        Input::DeleteIfVersion { version } => format!("delete_if_version(if v{version})"),
        Input::Cas { expected, value } => format!("cas(expect v{expected}, {value})"),
    };
    let out = match &o.outcome {
        Outcome::Ok { output } => match output {
            Output::Read { found: Some(f) } => format!("found {} at v{}", f.value, f.version),
            Output::Read { found: None } => "not found".to_string(),
            Output::Written { version } => format!("written v{version}"),
            Output::Deleted { existed } => format!("deleted (existed: {existed})"),
            Output::ConditionFailed { current: Some(c) } => format!("condition failed (current v{c})"),
            Output::ConditionFailed { current: None } => "condition failed".to_string(),
        },
        Outcome::Fail => format!("FAILED ({})", o.error.as_deref().unwrap_or("")),
        Outcome::Unknown => format!("UNKNOWN ({})", o.error.as_deref().unwrap_or("")),
    };
    format!(
        "#{} c{} {} -> {} [t {:.3}s .. {:.3}s]",
        o.id,
        o.client,
        input,
        out,
        o.call as f64 / 1e9,
        o.ret as f64 / 1e9
    )
}
