//! Workloads as pure, seeded generators: which operation comes next and on which key.
//! No I/O here; the runner passes in a seeded RNG, so one seed gives one sequence.

use crate::zipf::{ScrambledZipfian, ZipfError};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Digits of the key index in a key (`<prefix>000000001234`), so that byte order is
/// numeric order and a scan from key `i` meets `i+1, i+2, ...`.
const KEY_DIGITS: usize = 12;

/// The operation mixes (YCSB core workloads, plus write-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// 100% reads.
    C,
    /// 95% short scans, 5% inserts of new keys.
    E,
    /// 50% reads, 50% read-modify-writes.
    F,
    /// 100% updates (puts over existing keys).
    Write,
}

impl WorkloadKind {
    /// Fractions of each operation (they add up to 1).
    pub fn mix(self) -> Mix {
        let m = |read, update, insert, scan, rmw| Mix {
            read,
            update,
            insert,
            scan,
            rmw,
        };
        match self {
            WorkloadKind::A => m(0.5, 0.5, 0.0, 0.0, 0.0),
            WorkloadKind::B => m(0.95, 0.05, 0.0, 0.0, 0.0),
            WorkloadKind::C => m(1.0, 0.0, 0.0, 0.0, 0.0),
            WorkloadKind::E => m(0.0, 0.0, 0.05, 0.95, 0.0),
            WorkloadKind::F => m(0.5, 0.0, 0.0, 0.0, 0.5),
            WorkloadKind::Write => m(0.0, 1.0, 0.0, 0.0, 0.0),
        }
    }

    /// Whether any operation of this workload is a scan.
    pub fn has_scans(self) -> bool {
        self.mix().scan > 0.0
    }
}

/// Fractions of each operation kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    pub read: f64,
    pub update: f64,
    pub insert: f64,
    pub scan: f64,
    pub rmw: f64,
}

/// One kind of operation, as histograms and reports name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// A linearizable get.
    Read,
    /// A put over an existing key.
    Update,
    /// A put of a new key.
    Insert,
    /// A scan of up to `scan_len` keys from a key.
    Scan,
    /// A get, then a put of the same key (timed as one operation).
    Rmw,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [OpKind::Read, OpKind::Update, OpKind::Insert, OpKind::Scan, OpKind::Rmw];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Update => "update",
            OpKind::Insert => "insert",
            OpKind::Scan => "scan",
            OpKind::Rmw => "rmw",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How keys are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Every key equally likely.
    Uniform,
    /// Scrambled zipfian (see `zipf.rs`): a few keys, spread over the key space, are hot.
    Zipfian,
    /// A contiguous block of keys at the start of the key space gets most operations
    /// (YCSB's "hotspot"): one hot key range, for the scaling demo.
    HotPrefix,
}

/// Everything that decides the operation sequence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub distribution: Distribution,
    /// Keys loaded before the run (`0..keys`).
    pub keys: u64,
    pub value_size: usize,
    pub key_prefix: String,
    /// Zipfian exponent.
    pub theta: f64,
    /// Hot-prefix: the fraction of the keys that is hot.
    pub hot_fraction: f64,
    /// Hot-prefix: the fraction of operations that go to the hot keys.
    pub hot_ops: f64,
    /// Scans read 1..=scan_max keys (uniform), as YCSB's workload E.
    pub scan_max: u32,
}

/// Errors in a workload's parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WorkloadError {
    #[error(transparent)]
    Zipf(#[from] ZipfError),
    #[error("--keys must be at least 1")]
    NoKeys,
    #[error("--hot-fraction and --hot-ops must be in (0, 1]")]
    Hot,
    #[error("--scan-max must be at least 1")]
    ScanMax,
}

/// Picks key indexes in `0..n`.
#[derive(Clone, Debug)]
pub enum KeyChooser {
    Uniform { n: u64 },
    Zipfian(ScrambledZipfian),
    HotPrefix { n: u64, hot: u64, hot_ops: f64 },
}

impl KeyChooser {
    pub fn new(spec: &WorkloadSpec) -> Result<Self, WorkloadError> {
        let n = spec.keys;
        if n == 0 {
            return Err(WorkloadError::NoKeys);
        }
        Ok(match spec.distribution {
            Distribution::Uniform => KeyChooser::Uniform { n },
            Distribution::Zipfian => KeyChooser::Zipfian(ScrambledZipfian::new(n, spec.theta)?),
            Distribution::HotPrefix => {
                let ok = |f: f64| f > 0.0 && f <= 1.0;
                if !ok(spec.hot_fraction) || !ok(spec.hot_ops) {
                    return Err(WorkloadError::Hot);
                }
                let hot = ((n as f64 * spec.hot_fraction).ceil() as u64).clamp(1, n);
                KeyChooser::HotPrefix {
                    n,
                    hot,
                    hot_ops: spec.hot_ops,
                }
            }
        })
    }

    pub fn next<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match self {
            KeyChooser::Uniform { n } => rng.random_range(0..*n),
            KeyChooser::Zipfian(z) => z.sample(rng),
            KeyChooser::HotPrefix { n, hot, hot_ops } => {
                if hot >= n || rng.random::<f64>() < *hot_ops {
                    rng.random_range(0..*hot)
                } else {
                    rng.random_range(*hot..*n)
                }
            }
        }
    }
}

/// One operation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub key: u64,
    /// Keys to read, for scans (0 otherwise).
    pub scan_len: u32,
}

/// The operation stream of one worker. Inserts (workload E) take new key indexes
/// `keys + worker + k * workers`, so workers never insert the same key; reads and scans
/// choose among the loaded keys `0..keys`.
#[derive(Clone, Debug)]
pub struct OpGenerator {
    mix: Mix,
    chooser: KeyChooser,
    scan_max: u32,
    next_insert: u64,
    insert_stride: u64,
}

impl OpGenerator {
    pub fn new(spec: &WorkloadSpec, worker: u64, workers: u64) -> Result<Self, WorkloadError> {
        if spec.scan_max == 0 {
            return Err(WorkloadError::ScanMax);
        }
        Ok(Self {
            mix: spec.kind.mix(),
            chooser: KeyChooser::new(spec)?,
            scan_max: spec.scan_max,
            next_insert: spec.keys + worker,
            insert_stride: workers.max(1),
        })
    }

    pub fn next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Op {
        let m = self.mix;
        let x: f64 = rng.random();
        let kind = if x < m.read {
            OpKind::Read
        } else if x < m.read + m.update {
            OpKind::Update
        } else if x < m.read + m.update + m.insert {
            OpKind::Insert
        } else if x < m.read + m.update + m.insert + m.scan {
            OpKind::Scan
        } else if m.rmw > 0.0 {
            OpKind::Rmw
        } else {
            // Rounding past the last non-zero fraction: take the most common kind.
            OpKind::ALL
                .into_iter()
                .max_by(|a, b| frac(&m, *a).total_cmp(&frac(&m, *b)))
                .unwrap_or(OpKind::Read)
        };
        match kind {
            OpKind::Insert => {
                let key = self.next_insert;
                self.next_insert += self.insert_stride;
                Op { kind, key, scan_len: 0 }
            }
            OpKind::Scan => Op {
                kind,
                key: self.chooser.next(rng),
                scan_len: rng.random_range(1..=self.scan_max),
            },
            _ => Op {
                kind,
                key: self.chooser.next(rng),
                scan_len: 0,
            },
        }
    }
}

fn frac(m: &Mix, k: OpKind) -> f64 {
    match k {
        OpKind::Read => m.read,
        OpKind::Update => m.update,
        OpKind::Insert => m.insert,
        OpKind::Scan => m.scan,
        OpKind::Rmw => m.rmw,
    }
}

/// The key of index `i`: the prefix, then `i` in fixed-width decimal.
pub fn key_bytes(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}{i:0width$}", width = KEY_DIGITS).into_bytes()
}

/// A value of `size` printable ASCII bytes (as YCSB's values).
pub fn value_bytes<R: Rng + ?Sized>(rng: &mut R, size: usize) -> Vec<u8> {
    (0..size).map(|_| rng.random_range(b' '..=b'~')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn spec(kind: WorkloadKind, distribution: Distribution) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            distribution,
            keys: 10_000,
            value_size: 16,
            key_prefix: "b/".into(),
            theta: 0.99,
            hot_fraction: 0.01,
            hot_ops: 0.9,
            scan_max: 100,
        }
    }

    #[test]
    fn mixes_add_up_to_one() {
        for k in [
            WorkloadKind::A,
            WorkloadKind::B,
            WorkloadKind::C,
            WorkloadKind::E,
            WorkloadKind::F,
            WorkloadKind::Write,
        ] {
            let m = k.mix();
            let sum = m.read + m.update + m.insert + m.scan + m.rmw;
            assert!((sum - 1.0).abs() < 1e-12, "{k:?}: {sum}");
        }
    }

    /// Table: the observed share of each operation kind is within 1% of the mix.
    #[test]
    fn observed_mix_matches_the_workload() {
        let n = 100_000;
        for (kind, want) in [
            (WorkloadKind::A, [(OpKind::Read, 0.5), (OpKind::Update, 0.5)].as_slice()),
            (WorkloadKind::B, &[(OpKind::Read, 0.95), (OpKind::Update, 0.05)]),
            (WorkloadKind::C, &[(OpKind::Read, 1.0)]),
            (WorkloadKind::E, &[(OpKind::Scan, 0.95), (OpKind::Insert, 0.05)]),
            (WorkloadKind::F, &[(OpKind::Read, 0.5), (OpKind::Rmw, 0.5)]),
            (WorkloadKind::Write, &[(OpKind::Update, 1.0)]),
        ] {
            let mut g = OpGenerator::new(&spec(kind, Distribution::Uniform), 0, 1).unwrap();
            let mut rng = StdRng::seed_from_u64(11);
            let mut counts = [0u64; 5];
            for _ in 0..n {
                counts[g.next(&mut rng).kind.index()] += 1;
            }
            let total: f64 = want.iter().map(|(k, _)| counts[k.index()] as f64).sum();
            assert_eq!(total as u64, n, "{kind:?}: an operation outside the mix");
            for (k, f) in want {
                let got = counts[k.index()] as f64 / n as f64;
                assert!((got - f).abs() < 0.01, "{kind:?} {k:?}: {got} vs {f}");
            }
        }
    }

    /// Table: key distributions have the expected shape.
    #[test]
    fn key_distributions_have_their_shape() {
        let draws = 200_000;
        let mut rng = StdRng::seed_from_u64(5);
        // Uniform: each tenth of the key space gets about a tenth.
        let u = KeyChooser::new(&spec(WorkloadKind::C, Distribution::Uniform)).unwrap();
        let mut deciles = [0u64; 10];
        for _ in 0..draws {
            deciles[(u.next(&mut rng) / 1000) as usize] += 1;
        }
        for d in deciles {
            let f = d as f64 / draws as f64;
            assert!((f - 0.1).abs() < 0.01, "uniform decile {f}");
        }
        // Hot prefix: 90% of draws in the first 1% (keys 0..100).
        let h = KeyChooser::new(&spec(WorkloadKind::C, Distribution::HotPrefix)).unwrap();
        let hot = (0..draws).filter(|_| h.next(&mut rng) < 100).count() as f64 / draws as f64;
        assert!((hot - 0.9).abs() < 0.01, "hot share {hot}");
        // Zipfian 0.99 over 10k keys: the hottest key takes about 1/zeta(10^4) ~ 10%,
        // the top 1% of keys (100) about 53%, and the hot keys are spread out.
        let z = KeyChooser::new(&spec(WorkloadKind::C, Distribution::Zipfian)).unwrap();
        let mut counts = vec![0u64; 10_000];
        for _ in 0..draws {
            counts[z.next(&mut rng) as usize] += 1;
        }
        let mut sorted = counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top1 = sorted[0] as f64 / draws as f64;
        let top100 = sorted[..100].iter().sum::<u64>() as f64 / draws as f64;
        assert!((top1 - 0.1).abs() < 0.02, "zipf top key {top1}");
        assert!((top100 - 0.53).abs() < 0.04, "zipf top 100 {top100}");
        let first_block: u64 = counts[..100].iter().sum();
        assert!((first_block as f64 / draws as f64) < 0.3, "hot keys are not spread");
    }

    #[test]
    fn same_seed_same_ops_and_values() {
        let s = spec(WorkloadKind::A, Distribution::Zipfian);
        let run = |seed| {
            let mut g = OpGenerator::new(&s, 0, 1).unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            let ops: Vec<Op> = (0..500).map(|_| g.next(&mut rng)).collect();
            (ops, value_bytes(&mut rng, 32))
        };
        assert_eq!(run(9), run(9));
        assert_ne!(run(9), run(10));
    }

    #[test]
    fn inserts_take_fresh_keys_per_worker() {
        let s = spec(WorkloadKind::E, Distribution::Uniform);
        let mut seen = std::collections::HashSet::new();
        for w in 0..4 {
            let mut g = OpGenerator::new(&s, w, 4).unwrap();
            let mut rng = StdRng::seed_from_u64(w);
            for _ in 0..2_000 {
                let op = g.next(&mut rng);
                match op.kind {
                    OpKind::Insert => {
                        assert!(op.key >= s.keys);
                        assert!(seen.insert(op.key), "key {} inserted twice", op.key);
                    }
                    OpKind::Scan => assert!(op.key < s.keys && (1..=100).contains(&op.scan_len)),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn keys_sort_like_their_indexes_and_values_are_printable() {
        assert_eq!(key_bytes("p/", 42), b"p/000000000042".to_vec());
        assert!(key_bytes("p/", 9) < key_bytes("p/", 10));
        let v = value_bytes(&mut StdRng::seed_from_u64(1), 1024);
        assert_eq!(v.len(), 1024);
        assert!(v.iter().all(|b| (b' '..=b'~').contains(b)));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let mut s = spec(WorkloadKind::C, Distribution::HotPrefix);
        s.hot_fraction = 0.0;
        assert_eq!(KeyChooser::new(&s).unwrap_err(), WorkloadError::Hot);
        s.keys = 0;
        assert_eq!(KeyChooser::new(&s).unwrap_err(), WorkloadError::NoKeys);
        let mut s = spec(WorkloadKind::E, Distribution::Uniform);
        s.scan_max = 0;
        assert_eq!(OpGenerator::new(&s, 0, 1).unwrap_err(), WorkloadError::ScanMax);
    }
}
