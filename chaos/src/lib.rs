//! skv-chaos: fault injection for skv (issue 14).
//!
//! - [`history`]: the recorded calls (plain data, JSON for replay);
//! - [`model`] and [`checker`]: a per-key linearizability checker for get, put, delete, CAS
//!   and conditional writes with versions, where unknown outcomes may take effect at any time
//!   after their invocation, or never (pure, bounded);
//! - [`recorder`]: an SDK client wrapper that records every call;
//! - [`direct`]: reads sent straight to followers (the vehicle of `--plant skip-read-index`);
//! - [`cluster`], [`nemesis`] and [`runner`]: a real process cluster on 127.0.0.1, faults,
//!   and a run that heals, reads every key back and checks the whole history;
//! - [`disk`]: storenode data directories on skv-lazyfs mounts, for the `slow-disk` nemesis;
//! - [`etcd3`]: a 3-member etcd, for the `etcd-member` nemesis;
//! - [`netns`]: storenodes in network namespaces and the partition plans, for the
//!   `partition` nemesis (the `partition`, `move` and `drain` faults are in `topology.rs`).

pub mod checker;
pub mod clock;
pub mod cluster;
pub mod direct;
pub mod disk;
pub mod etcd3;
mod faults;
pub mod history;
pub mod model;
pub mod nemesis;
pub mod netns;
pub mod recorder;
pub mod runner;
mod topology;
