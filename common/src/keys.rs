//! Key-space helpers and range/epoch logic shared by every component. Pure, no I/O.

use skv_proto::internal::{RangeDescriptor, RangeEpoch};
use std::cmp::Ordering;

/// Whether `key` lies in `[start, end)`; an empty `end` is +infinity.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// Whether `key` lies in the descriptor's bounds.
pub fn desc_contains(d: &RangeDescriptor, key: &[u8]) -> bool {
    in_range(key, &d.start, &d.end)
}

/// Compares two end bounds where empty means +infinity.
pub fn cmp_end(a: &[u8], b: &[u8]) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.cmp(b),
    }
}

/// The smallest key strictly greater than every key with `prefix`, or empty
/// (+infinity) when none exists (prefix all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// The epoch of a descriptor, or zero when missing.
pub fn epoch_of(d: &RangeDescriptor) -> RangeEpoch {
    d.epoch.unwrap_or_default()
}

/// True when `a` is strictly newer than `b`: no field smaller and one greater.
pub fn epoch_newer(a: &RangeEpoch, b: &RangeEpoch) -> bool {
    a.conf_ver >= b.conf_ver && a.version >= b.version && (a.conf_ver > b.conf_ver || a.version > b.version)
}

/// True when `a` is older than `b` in either field (the caller's view is stale).
pub fn epoch_stale(a: &RangeEpoch, b: &RangeEpoch) -> bool {
    a.conf_ver < b.conf_ver || a.version < b.version
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_prefixes() {
        assert!(in_range(b"b", b"a", b"c"));
        assert!(!in_range(b"c", b"a", b"c"));
        assert!(in_range(b"zzz", b"a", b""));
        assert!(in_range(b"a", b"", b"b"));
        assert_eq!(prefix_end(b"ab"), b"ac".to_vec());
        assert_eq!(prefix_end(&[0x01, 0xff]), vec![0x02]);
        assert_eq!(prefix_end(&[0xff, 0xff]), Vec::<u8>::new());
        assert_eq!(cmp_end(b"", b"z"), Ordering::Greater);
        assert_eq!(cmp_end(b"a", b"b"), Ordering::Less);
    }

    #[test]
    fn epochs() {
        let e = |c, v| RangeEpoch {
            conf_ver: c,
            version: v,
        };
        assert!(epoch_newer(&e(1, 2), &e(1, 1)));
        assert!(!epoch_newer(&e(1, 1), &e(1, 1)));
        assert!(!epoch_newer(&e(2, 0), &e(1, 1)));
        assert!(epoch_stale(&e(1, 0), &e(1, 1)));
        assert!(!epoch_stale(&e(1, 1), &e(1, 1)));
    }
}
