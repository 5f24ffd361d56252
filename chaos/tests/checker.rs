//! The linearizability checker on known-good and known-bad histories: it must accept every
//! valid shape (concurrency, unknown outcomes, versions across deletes) and catch the classic
//! bad ones (stale read, lost write, double CAS, a read of a failed write, a follower read
//! without ReadIndex).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skv_chaos::checker::{CheckOptions, KeyVerdict, Report, check, check_key, describe};
use skv_chaos::history::{History, Input, Observed, Op, Outcome, Output};
use skv_chaos::model::{KeyState, step};

const MS: u64 = 1_000_000;

/// A history under construction; times in milliseconds.
#[derive(Default)]
struct H {
    h: History,
}

impl H {
    fn push(&mut self, client: u32, key: &str, input: Input, outcome: Outcome, call: u64, ret: u64) -> usize {
        let id = self.h.ops.len();
        self.h.ops.push(Op {
            id,
            client,
            key: key.to_string(),
            input,
            outcome,
            call: call * MS,
            ret: ret * MS,
            error: None,
        });
        id
    }
    fn ok(&mut self, client: u32, key: &str, input: Input, output: Output, call: u64, ret: u64) -> usize {
        self.push(client, key, input, Outcome::Ok { output }, call, ret)
    }
    fn put(&mut self, c: u32, value: u64, version: u64, call: u64, ret: u64) -> usize {
        self.ok(c, "k", Input::Put { value }, Output::Written { version }, call, ret)
    }
    fn get(&mut self, c: u32, found: Option<(u64, u64)>, call: u64, ret: u64) -> usize {
        let found = found.map(|(value, version)| Observed { value, version });
        self.ok(c, "k", Input::Get, Output::Read { found }, call, ret)
    }
    fn unknown(&mut self, c: u32, input: Input, call: u64) -> usize {
        self.push(c, "k", input, Outcome::Unknown, call, call + 5000)
    }
    fn fail(&mut self, c: u32, input: Input, call: u64, ret: u64) -> usize {
        self.push(c, "k", input, Outcome::Fail, call, ret)
    }
    fn check(&self) -> Report {
        check(&self.h, &CheckOptions::default())
    }
}

fn assert_ok(h: &H) {
    let r = h.check();
    assert!(
        r.is_linearizable(),
        "expected linearizable: {}",
        r.violations.iter().map(|v| describe(v, &h.h)).collect::<String>()
    );
}

/// Asserts a violation on key "k" and returns the id of the call the search got stuck at.
fn assert_violation(h: &H) -> usize {
    let r = h.check();
    assert!(r.undecided.is_empty(), "undecided: {:?}", r.undecided);
    assert_eq!(r.violations.len(), 1, "expected one violation, got {r:?}");
    let v = &r.violations[0];
    let text = describe(v, &h.h);
    assert!(text.contains("not linearizable"), "{text}");
    v.stuck
}

#[test]
fn empty_and_sequential_histories_are_linearizable() {
    assert!(H::default().check().is_linearizable());
    let mut h = H::default();
    h.get(1, None, 0, 1);
    h.put(1, 10, 1, 2, 3);
    h.get(2, Some((10, 1)), 4, 5);
    h.ok(
        1,
        "k",
        Input::Cas { expected: 1, value: 11 },
        Output::Written { version: 2 },
        6,
        7,
    );
    h.ok(
        2,
        "k",
        Input::Cas { expected: 1, value: 12 },
        Output::ConditionFailed { current: Some(2) },
        8,
        9,
    );
    h.ok(1, "k", Input::Delete, Output::Deleted { existed: true }, 10, 11);
    h.get(2, None, 12, 13);
    h.ok(
        1,
        "k",
        Input::PutIfVersion { value: 13, version: 0 },
        Output::Written { version: 3 },
        14,
        15,
    );
    h.ok(
        2,
        "k",
        Input::DeleteIfVersion { version: 2 },
        Output::ConditionFailed { current: None },
        16,
        17,
    );
    h.get(2, Some((13, 3)), 18, 19);
    assert_ok(&h);
}

#[test]
fn stale_read_after_a_completed_write_is_caught() {
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.put(1, 20, 2, 20, 30);
    let stale = h.get(2, Some((10, 1)), 40, 50);
    assert_eq!(assert_violation(&h), stale);
}

#[test]
fn read_of_absent_after_a_completed_first_write_is_caught() {
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    let stale = h.get(2, None, 11, 12);
    assert_eq!(assert_violation(&h), stale);
}

#[test]
fn lost_write_is_caught() {
    // The second acknowledged put is lost: the next put continues from version 1.
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.put(2, 20, 2, 20, 30);
    h.put(1, 30, 2, 40, 50);
    assert_violation(&h);

    // Or the final read does not see it.
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.put(2, 20, 2, 20, 30);
    let final_read = h.get(3, Some((10, 1)), 100, 110);
    assert_eq!(assert_violation(&h), final_read);
}

#[test]
fn concurrent_puts_are_valid_in_the_order_their_versions_say() {
    // A [0,100] got version 2 and B [10,90] version 1: B then A.
    let mut h = H::default();
    h.put(1, 10, 2, 0, 100);
    h.put(2, 20, 1, 10, 90);
    h.get(3, Some((10, 2)), 110, 120);
    assert_ok(&h);

    // Then a later read of B contradicts that only order.
    let mut h = H::default();
    h.put(1, 10, 2, 0, 100);
    h.put(2, 20, 1, 10, 90);
    let bad = h.get(3, Some((20, 1)), 110, 120);
    assert_eq!(assert_violation(&h), bad);

    // Both claiming version 1 is impossible in any order.
    let mut h = H::default();
    h.put(1, 10, 1, 0, 100);
    h.put(2, 20, 1, 10, 90);
    assert_violation(&h);
}

#[test]
fn reads_during_a_write_may_see_either_side_but_never_go_back() {
    let mut h = H::default();
    h.put(1, 10, 1, 0, 100);
    h.get(2, None, 10, 20);
    h.get(3, Some((10, 1)), 10, 20);
    assert_ok(&h);

    // One client sees the new value, then a read invoked after that completed sees the old.
    let mut h = H::default();
    h.put(1, 10, 1, 0, 100);
    h.get(2, Some((10, 1)), 10, 20);
    let back = h.get(3, None, 30, 40);
    assert_eq!(assert_violation(&h), back);
}

#[test]
fn unknown_outcome_puts_may_or_may_not_take_effect() {
    // Observed later: it took effect.
    let mut h = H::default();
    h.unknown(1, Input::Put { value: 10 }, 0);
    h.get(2, Some((10, 1)), 50, 60);
    assert_ok(&h);

    // Never observed, and the next put is version 1: it did not take effect.
    let mut h = H::default();
    h.unknown(1, Input::Put { value: 10 }, 0);
    h.put(2, 20, 1, 50, 60);
    h.get(2, Some((20, 1)), 70, 80);
    assert_ok(&h);

    // Not observed, but the next put is version 2: it took effect, unseen.
    let mut h = H::default();
    h.unknown(1, Input::Put { value: 10 }, 0);
    h.put(2, 20, 2, 50, 60);
    assert_ok(&h);

    // It may take effect long after the client gave up (its completion is +inf).
    let mut h = H::default();
    h.unknown(1, Input::Put { value: 10 }, 0);
    h.get(2, None, 10_000, 10_001);
    h.get(2, Some((10, 1)), 20_000, 20_001);
    assert_ok(&h);

    // On a live key, one unknown put cannot account for two versions. (A put on a key that
    // is not live may start at any version above its last one: the range's version floor
    // once its tombstones were collected, ADR 0034.)
    let mut h = H::default();
    h.put(3, 5, 1, 0, 5);
    h.unknown(1, Input::Put { value: 10 }, 10);
    h.put(2, 20, 4, 50, 60);
    assert_violation(&h);

    // Seen before it was invoked: impossible.
    let mut h = H::default();
    let early = h.get(2, Some((10, 1)), 0, 10);
    h.unknown(1, Input::Put { value: 10 }, 20);
    assert_eq!(assert_violation(&h), early);
}

#[test]
fn a_definitely_failed_write_must_not_be_seen() {
    let mut h = H::default();
    h.fail(1, Input::Put { value: 10 }, 0, 10);
    let bad = h.get(2, Some((10, 1)), 20, 30);
    assert_eq!(assert_violation(&h), bad);
    let r = h.check();
    assert!(
        r.violations[0].notes.iter().any(|n| n.contains("failed definitely")),
        "{:?}",
        r.violations[0].notes
    );

    // A failed put does not bump the version either (of a live key: see
    // unknown_outcome_puts_may_or_may_not_take_effect).
    let mut h = H::default();
    h.put(3, 5, 1, 0, 5);
    h.fail(1, Input::Put { value: 10 }, 10, 15);
    h.put(2, 20, 3, 20, 30);
    assert_violation(&h);
}

#[test]
fn cas_succeeds_once_per_version() {
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.ok(
        2,
        "k",
        Input::Cas { expected: 1, value: 20 },
        Output::Written { version: 2 },
        20,
        40,
    );
    h.ok(
        3,
        "k",
        Input::Cas { expected: 1, value: 30 },
        Output::Written { version: 2 },
        21,
        41,
    );
    assert_violation(&h);

    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.ok(
        2,
        "k",
        Input::Cas { expected: 1, value: 20 },
        Output::Written { version: 2 },
        20,
        40,
    );
    h.ok(
        3,
        "k",
        Input::Cas { expected: 1, value: 30 },
        Output::ConditionFailed { current: Some(2) },
        21,
        41,
    );
    assert_ok(&h);

    // A mismatch must report the live version at some point in its interval.
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    let bad = h.ok(
        3,
        "k",
        Input::Cas { expected: 5, value: 30 },
        Output::ConditionFailed { current: Some(0) },
        20,
        30,
    );
    assert_eq!(assert_violation(&h), bad);
}

#[test]
fn versions_survive_deletes() {
    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.ok(1, "k", Input::Delete, Output::Deleted { existed: true }, 20, 30);
    h.ok(1, "k", Input::Delete, Output::Deleted { existed: false }, 40, 50);
    h.ok(
        1,
        "k",
        Input::Cas { expected: 0, value: 20 },
        Output::Written { version: 2 },
        60,
        70,
    );
    assert_ok(&h);

    let mut h = H::default();
    h.put(1, 10, 1, 0, 10);
    h.ok(1, "k", Input::Delete, Output::Deleted { existed: true }, 20, 30);
    let restart = h.put(1, 20, 1, 40, 50);
    assert_eq!(assert_violation(&h), restart);

    let mut h = H::default();
    let ghost = h.ok(1, "k", Input::Delete, Output::Deleted { existed: true }, 0, 10);
    assert_eq!(assert_violation(&h), ghost);
}

#[test]
fn many_crashed_writes_are_checked_quickly() {
    // 60 unknown puts nobody read, then puts whose versions say 25 of them took effect.
    let mut h = H::default();
    for i in 0..60 {
        h.unknown(i % 8, Input::Put { value: 1000 + i as u64 }, i as u64);
    }
    h.put(9, 1, 26, 100, 110);
    h.get(9, Some((1, 26)), 120, 130);
    for i in 0..20 {
        h.unknown(i % 8, Input::Delete, 140 + i as u64);
    }
    h.get(9, None, 200, 210);
    h.put(9, 2, 31, 220, 230);
    let r = h.check();
    assert!(r.is_linearizable(), "{r:?}");
    // Without the symmetry reduction this is 2^60 subsets; with it, polynomial.
    assert!(
        r.steps < 500_000,
        "{} steps: the symmetry reduction is not working",
        r.steps
    );

    // And after a put at version 1, 60 of them cannot make version 63.
    let mut h = H::default();
    h.put(8, 7, 1, 0, 1);
    for i in 0..60 {
        h.unknown(i % 8, Input::Put { value: 1000 + i as u64 }, 2 + i as u64);
    }
    h.put(9, 1, 63, 100, 110);
    let r = h.check();
    assert_eq!(r.violations.len(), 1, "{r:?}");
    assert!(r.steps < 500_000, "{} steps", r.steps);
}

#[test]
fn the_search_is_bounded() {
    // Forty concurrent puts, all wrongly claiming version 1 (a violation the search must
    // exhaust the orders to prove), with a budget of 100 steps: undecided, not hanging.
    let mut h = H::default();
    for i in 0..40 {
        h.put(i, 100 + i as u64, 1 + (i as u64 % 2), 0, 1000);
    }
    let ops: Vec<&Op> = h.h.ops.iter().collect();
    let v = check_key("k", &ops, &CheckOptions { max_steps_per_key: 100 });
    assert_eq!(v, KeyVerdict::Undecided { steps: 100 });
    let r = check(&h.h, &CheckOptions { max_steps_per_key: 100 });
    assert!(!r.is_linearizable());
    assert_eq!(r.undecided, vec![("k".to_string(), 100)]);
}

#[test]
fn keys_are_checked_separately() {
    let mut h = H::default();
    h.ok(1, "a", Input::Put { value: 1 }, Output::Written { version: 1 }, 0, 10);
    h.ok(
        2,
        "a",
        Input::Get,
        Output::Read {
            found: Some(Observed { value: 1, version: 1 }),
        },
        20,
        30,
    );
    h.ok(1, "b", Input::Put { value: 2 }, Output::Written { version: 1 }, 0, 10);
    // A value of key a, read from key b: no put of b wrote it.
    h.ok(
        2,
        "b",
        Input::Get,
        Output::Read {
            found: Some(Observed { value: 1, version: 1 }),
        },
        20,
        30,
    );
    let r = h.check();
    assert_eq!(r.keys, 2);
    assert_eq!(r.violations.len(), 1);
    assert_eq!(r.violations[0].key, "b");
    assert!(
        r.violations[0].notes[0].contains("no put of this key wrote"),
        "{:?}",
        r.violations[0].notes
    );
}

/// The planted bug of issue 14: a follower serves a linearizable read without ReadIndex and
/// returns what it had applied, one write behind its leader. The history is in the recorder's
/// JSON shape, as `skv-chaos run` writes it.
#[test]
fn planted_bug_follower_read_without_read_index() {
    let json = r#"{"ops":[
      {"id":0,"client":0,"key":"k3","input":{"op":"put","value":101},"outcome":{"class":"ok","output":{"kind":"written","version":1}},"call":1000000,"ret":4000000},
      {"id":1,"client":1,"key":"k3","input":{"op":"get"},"outcome":{"class":"ok","output":{"kind":"read","found":{"value":101,"version":1}}},"call":5000000,"ret":6000000},
      {"id":2,"client":0,"key":"k3","input":{"op":"cas","expected":1,"value":102},"outcome":{"class":"ok","output":{"kind":"written","version":2}},"call":7000000,"ret":9000000},
      {"id":3,"client":2,"key":"k3","input":{"op":"put","value":103},"outcome":{"class":"unknown"},"call":9500000,"ret":3009500000,"error":"outcome unknown: leader changed"},
      {"id":4,"client":1,"key":"k3","input":{"op":"get"},"outcome":{"class":"ok","output":{"kind":"read","found":{"value":101,"version":1}}},"call":10000000,"ret":11000000},
      {"id":5,"client":1,"key":"k1","input":{"op":"get"},"outcome":{"class":"ok","output":{"kind":"read","found":null}},"call":10000000,"ret":11000000}
    ],"nemesis":[{"at":8000000,"kind":"pause","target":"store-0","detail":"SIGSTOP"}]}"#;
    let h: History = serde_json::from_str(json).expect("the recorder's JSON shape");
    let r = check(&h, &CheckOptions::default());
    assert_eq!(r.keys, 2);
    assert_eq!(r.violations.len(), 1, "{r:?}");
    let v = &r.violations[0];
    assert_eq!(v.key, "k3");
    assert_eq!(v.stuck, 4, "the stale follower read");
    assert_eq!(
        v.state,
        KeyState {
            version: 2,
            value: Some(102),
            inexact: false,
        }
    );
    let text = describe(v, &h);
    assert!(text.contains("#4 c1 get -> found 101 at v1"), "{text}");

    // The same history with the read served by the leader (ReadIndex) is fine.
    let mut h = h;
    h.ops[4].outcome = Outcome::Ok {
        output: Output::Read {
            found: Some(Observed { value: 102, version: 2 }),
        },
    };
    assert!(check(&h, &CheckOptions::default()).is_linearizable());
}

/// Random concurrent histories made from a sequential run of the model (each call's interval
/// contains the moment it took effect) are linearizable; in a sequential one, any changed
/// read answer is caught.
#[test]
fn random_histories_pass_and_mutated_reads_are_caught() {
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let h = random_history(&mut rng, 40, 35, true);
        let r = check(&h, &CheckOptions::default());
        assert!(
            r.is_linearizable(),
            "seed {seed}: {}",
            r.violations.iter().map(|v| describe(v, &h)).collect::<String>()
        );
    }
    let mut caught = 0;
    for seed in 0..300u64 {
        let mut rng = StdRng::seed_from_u64(1_000 + seed);
        let mut h = random_history(&mut rng, 30, 0, false);
        assert!(check(&h, &CheckOptions::default()).is_linearizable(), "seed {seed}");
        let reads: Vec<usize> = h
            .ops
            .iter()
            .filter(|o| o.input == Input::Get && matches!(o.outcome, Outcome::Ok { .. }))
            .map(|o| o.id)
            .collect();
        if reads.is_empty() {
            continue;
        }
        let id = reads[rng.random_range(0..reads.len())];
        let Outcome::Ok {
            output: Output::Read { found },
        } = h.ops[id].outcome.clone()
        else {
            unreachable!()
        };
        let wrong = match (found, rng.random_range(0..3)) {
            (Some(_), 0) => None,
            (Some(o), 1) => Some(Observed {
                value: o.value,
                version: o.version + 1,
            }),
            (Some(o), _) => Some(Observed {
                value: o.value + 1_000_000,
                version: o.version,
            }),
            (None, _) => Some(Observed { value: 1, version: 1 }),
        };
        h.ops[id].outcome = Outcome::Ok {
            output: Output::Read { found: wrong },
        };
        let r = check(&h, &CheckOptions::default());
        assert_eq!(r.violations.len(), 1, "seed {seed}: mutated read #{id} not caught");
        caught += 1;
    }
    assert!(caught > 250, "only {caught} mutations tried");
}

/// Runs the model sequentially on two keys; call `i` takes effect at 100·i ms and its interval
/// reaches up to `spread` ms either side. With `unknown`, some writes end with an unknown
/// outcome (and took effect or not).
fn random_history(rng: &mut StdRng, n: usize, spread: u64, unknown: bool) -> History {
    let mut states = [KeyState::default(), KeyState::default()];
    let mut h = History::default();
    for i in 0..n {
        let next_value = 1 + i as u64;
        let k = rng.random_range(0..2usize);
        let s = states[k];
        let input = match rng.random_range(0..7) {
            0 | 1 => Input::Get,
            2 => Input::Put { value: next_value },
            3 => Input::Delete,
            4 => Input::Cas {
                expected: [s.live_version(), s.version + 1, 0][rng.random_range(0..3)],
                value: next_value,
            },
            5 => Input::PutIfVersion {
                value: next_value,
                version: [s.live_version(), 0][rng.random_range(0..2)],
            },
            _ => Input::DeleteIfVersion {
                version: [s.live_version(), s.version + 1][rng.random_range(0..2)],
            },
        };
        let at = 1_000 + 100 * i as u64;
        let call = at - rng.random_range(0..=spread);
        let ret = at + rng.random_range(0..=spread);
        let crashed = unknown && input.is_write() && rng.random_bool(0.15);
        let outcome = if crashed {
            if rng.random_bool(0.5) {
                states[k] = step(&s, &input, None).expect("an unknown write always applies");
            }
            Outcome::Unknown
        } else {
            let output = expected_output(&s, &input);
            states[k] = step(&s, &input, Some(&output)).expect("the model accepts its own answer");
            Outcome::Ok { output }
        };
        h.ops.push(Op {
            id: i,
            client: rng.random_range(0..4),
            key: format!("k{k}"),
            input,
            outcome,
            call: call * MS,
            ret: ret * MS,
            error: None,
        });
    }
    h
}

fn expected_output(s: &KeyState, input: &Input) -> Output {
    let live = s.live_version();
    let matches = input.condition().is_none_or(|c| c == live);
    match input {
        Input::Get => Output::Read { found: s.read() },
        _ if !matches => Output::ConditionFailed {
            current: matches!(input, Input::Cas { .. }).then_some(live),
        },
        Input::Delete | Input::DeleteIfVersion { .. } => Output::Deleted {
            existed: s.value.is_some(),
        },
        _ => Output::Written { version: s.version + 1 },
    }
}
