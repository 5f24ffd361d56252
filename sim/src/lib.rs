//! skv's deterministic simulation (issue 14, ADR 0033).
//!
//! - [`raft`]: the Raft path — openraft replicas built from the storenode's type config,
//!   Raft config, log store and state machine over real (temp-dir) fjall engines, joined by
//!   the in-memory network of [`net`], on a current-thread tokio runtime with a paused clock.
//!   One seed drives every choice (message fates, workload, faults, openraft's election
//!   timeouts through `skv_storenode::raft::runtime::seed_thread_rng`), so a failing seed
//!   replays exactly.
//! - [`control`]: placement's pure scheduler driven through a seeded stream of store
//!   failures, joins, drains and load shifts.
//!
//! It never opens a socket and never runs a server binary; it does not replace the
//! real-process tests (testkit, chaos).

pub mod control;
pub mod net;
pub mod raft;
