//! The deterministic simulation's CI tier (ADR 0033): determinism, a sweep of seeds over
//! the Raft path and the control plane, and planted bugs that must be caught.
//! More seeds on demand: `cargo run -p skv-sim -- --seeds 100000`; one seed:
//! `cargo run -p skv-sim -- --seed N --trace`.

use skv_sim::raft::{Plant, RunConfig, run};
use std::time::Instant;

/// Seeds of the Raft sweep in CI: 40-60 s of one core in a debug build on a loaded 2-core machine (3-5 seeds/s).
const RAFT_SEEDS: u64 = 150;
/// Seeds of the control-plane sweep in CI, in four tests of a quarter each (so that each
/// stays far below nextest's 240 s limit): about 0.11 s per seed in a debug build, so
/// ~65 s of one core per test. With the Raft sweep, 2,550 seeds per CI run.
const CONTROL_SEEDS: u64 = 2_400;

#[test]
fn the_same_seed_gives_the_same_trace_twice() {
    for seed in [1, 2, 3] {
        let a = run(RunConfig::new(seed)).unwrap_or_else(|e| panic!("{e}"));
        let b = run(RunConfig::new(seed)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.trace_hash, a.events, a.ops, a.acked_writes),
            (b.trace_hash, b.events, b.ops, b.acked_writes),
            "seed {seed} did not replay"
        );
        assert!(a.events > 100 && a.acked_writes > 0, "seed {seed} did nothing: {a:?}");
    }
    let other = run(RunConfig::new(4)).unwrap_or_else(|e| panic!("{e}"));
    let one = run(RunConfig::new(1)).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(other.trace_hash, one.trace_hash, "different seeds, different runs");
    let c1 = skv_sim::control::run(7).unwrap_or_else(|e| panic!("{e}"));
    let c2 = skv_sim::control::run(7).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((c1.trace_hash, c1.ops), (c2.trace_hash, c2.ops));
}

#[test]
fn raft_seeds_keep_every_invariant() {
    let started = Instant::now();
    let (mut acked, mut crashes) = (0, 0);
    for seed in 0..RAFT_SEEDS {
        match run(RunConfig::new(seed)) {
            Ok(r) => {
                acked += r.acked_writes;
                crashes += r.crashes;
            }
            Err(e) => panic!("{e}\nreplay: cargo run -p skv-sim -- --seed {seed} --trace"),
        }
    }
    println!(
        "{RAFT_SEEDS} seeds in {:.1} s: {acked} acknowledged writes, {crashes} crashes",
        started.elapsed().as_secs_f64()
    );
    assert!(
        crashes > RAFT_SEEDS as u32 / 4,
        "the nemesis crashed too little: {crashes}"
    );
}

/// Runs the control-plane seeds of quarter `q` (0..4) of [`CONTROL_SEEDS`].
fn control_quarter(q: u64) {
    let n = CONTROL_SEEDS / 4;
    for seed in q * n..(q + 1) * n {
        if let Err(e) = skv_sim::control::run(seed) {
            panic!("{e}\nreplay: cargo run -p skv-sim -- --control --seed {seed}");
        }
    }
}

#[test]
fn control_plane_seeds_keep_every_invariant_q0() {
    control_quarter(0);
}

#[test]
fn control_plane_seeds_keep_every_invariant_q1() {
    control_quarter(1);
}

#[test]
fn control_plane_seeds_keep_every_invariant_q2() {
    control_quarter(2);
}

#[test]
fn control_plane_seeds_keep_every_invariant_q3() {
    control_quarter(3);
}

/// The first seed below `limit` whose run fails with the plant, and its error.
fn first_failure(plant: Plant, limit: u64) -> Option<(u64, String)> {
    (0..limit).find_map(|seed| {
        let mut cfg = RunConfig::new(seed);
        cfg.plant = Some(plant);
        run(cfg).err().map(|e| (seed, e.to_string()))
    })
}

#[test]
fn a_log_that_loses_its_tail_on_restart_is_caught() {
    let found = first_failure(Plant::LoseLogTail, 20);
    println!("lose-log-tail: {found:?}");
    assert!(
        found.is_some(),
        "no seed of 20 caught a log losing acknowledged entries"
    );
}

#[test]
fn a_vote_forgotten_on_restart_is_caught() {
    let found = first_failure(Plant::ForgetVote, 150);
    println!("forget-vote: {found:?}");
    let Some((_, e)) = found else {
        panic!("no seed of 150 caught a store that forgets its vote");
    };
    assert!(
        e.contains("two leaders") || e.contains("not in the log") || e.contains("linearizable") || e.contains("differ"),
        "{e}"
    );
}
