//! Typed IDs. A `RangeId` can never be passed where a `StoreId` is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value, for the wire.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }
    };
}

typed_id!(
    /// Identifies a range (and its Raft group) for the life of the cluster.
    RangeId,
    "r"
);
typed_id!(
    /// Identifies a storage node. Kept in the node's `meta` keyspace across restarts.
    StoreId,
    "s"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_prefixed() {
        assert_eq!(RangeId(7).to_string(), "r7");
        assert_eq!(StoreId(3).to_string(), "s3");
        assert_eq!(u64::from(StoreId::from(9)), 9);
    }
}
