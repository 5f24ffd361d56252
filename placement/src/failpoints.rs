//! Failpoints of placement (issue 14, ADR 0029), compiled in only with the cargo feature
//! `failpoints` (TiKV's `fail` crate; off by default, on in `scripts/test.sh`'s build).
//! `FAILPOINTS=name=action;...` is applied at start; without the feature a set `FAILPOINTS`
//! fails the start. Crash points exit the process on the spot (status 86) with any action
//! that returns.

/// Before the range-map transaction of a split (an update of more than one descriptor: both
/// halves) is sent to the metastore.
pub const BEFORE_SPLIT_TXN: &str = "placement::range_map::before_split_txn";
/// After the range-map transaction of a split succeeded, before anybody is told.
pub const AFTER_SPLIT_TXN: &str = "placement::range_map::after_split_txn";
/// Before the range-map transaction of a merge (one widened descriptor that deletes the record
/// of the range it absorbed) is sent to the metastore.
pub const BEFORE_MERGE_TXN: &str = "placement::range_map::before_merge_txn";
/// After the range-map transaction of a merge succeeded, before anybody is told.
pub const AFTER_MERGE_TXN: &str = "placement::range_map::after_merge_txn";

pub use skv_common::failpoints::{EXIT_CRASH_POINT, FailpointError};

/// A crash point (see the module doc); a no-op without the `failpoints` feature.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                $crate::failpoints::crash($name)
            }
        }
    };
}

/// Exits at crash point `name`.
pub fn crash(name: &str) -> ! {
    skv_common::failpoints::crash("skv-placement", name)
}

/// Applies `FAILPOINTS` from the environment (once, at start); refused by a binary built
/// without the feature.
pub fn setup_from_env() -> Result<(), FailpointError> {
    skv_common::failpoints::setup_from_env(cfg!(feature = "failpoints"))
}
