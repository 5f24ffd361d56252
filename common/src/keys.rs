//! Key-space helpers and range/epoch logic shared by every component. Pure, no I/O.

use skv_proto::internal::{RangeDescriptor, RangeEpoch};
use std::cmp::Ordering;

/// Whether `key` lies in `[start, end)`; an empty `end` is +infinity.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// A span of keys `[start, end)`; an empty `end` is +infinity. The one definition of
/// "contains" and "overlaps" for ranges, scans and snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeySpan<'a> {
    pub start: &'a [u8],
    pub end: &'a [u8],
}

impl<'a> KeySpan<'a> {
    pub fn new(start: &'a [u8], end: &'a [u8]) -> Self {
        KeySpan { start, end }
    }

    /// The span of a descriptor.
    pub fn of(d: &'a RangeDescriptor) -> Self {
        KeySpan::new(&d.start, &d.end)
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        in_range(key, self.start, self.end)
    }

    /// Whether the two spans share at least one key.
    pub fn overlaps(&self, other: &KeySpan<'_>) -> bool {
        // start < end, where an empty end is +infinity (an empty start is the least key).
        let before = |start: &[u8], end: &[u8]| end.is_empty() || start < end;
        before(self.start, other.end) && before(other.start, self.end)
    }
}

/// Longest tenant namespace, in bytes.
pub const MAX_NAMESPACE_LEN: usize = crate::limits::MAX_NAMESPACE_LEN;

/// The key prefix of namespace `ns`: `u16 big-endian len(ns) ++ ns`
/// (docs/dev/contracts.md). The length makes it prefix-free: no namespace's prefix is a
/// prefix of another's, so their key spans are disjoint. None unless `ns` is 1..=255 bytes.
pub fn namespace_prefix(ns: &[u8]) -> Option<Vec<u8>> {
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN {
        return None;
    }
    let mut prefix = Vec::with_capacity(2 + ns.len());
    prefix.extend_from_slice(&(ns.len() as u16).to_be_bytes());
    prefix.extend_from_slice(ns);
    Some(prefix)
}

/// Splits an internal key into (namespace, user key), when it starts with a namespace prefix.
pub fn split_namespace(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u16::from_be_bytes([*key.first()?, *key.get(1)?]) as usize;
    if n == 0 || n > MAX_NAMESPACE_LEN || key.len() < 2 + n {
        return None;
    }
    Some((&key[2..2 + n], &key[2 + n..]))
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
    fn spans() {
        let s = KeySpan::new;
        // (a, b, overlaps)
        let table: [(KeySpan, KeySpan, bool); 10] = [
            (s(b"a", b"c"), s(b"b", b"d"), true),
            (s(b"a", b"c"), s(b"c", b"d"), false),
            (s(b"c", b"d"), s(b"a", b"c"), false),
            (s(b"a", b""), s(b"z", b""), true),
            (s(b"", b"b"), s(b"a", b"c"), true),
            (s(b"", b""), s(b"x", b"y"), true),
            (s(b"", b"a"), s(b"a", b""), false),
            (s(b"", b"a"), s(b"", b"b"), true),
            (s(b"m", b""), s(b"", b"m"), false),
            (s(b"m", b""), s(b"", b"n"), true),
        ];
        for (a, b, want) in table {
            assert_eq!(a.overlaps(&b), want, "{a:?} ~ {b:?}");
            assert_eq!(b.overlaps(&a), want, "{b:?} ~ {a:?}");
        }
        assert!(s(b"a", b"").contains(b"\xff"));
        assert!(!s(b"a", b"b").contains(b"b"));
    }

    #[test]
    fn namespaces() {
        let p = namespace_prefix(b"team").unwrap();
        assert_eq!(p, b"\x00\x04team");
        let mut k = p.clone();
        k.extend_from_slice(b"key");
        assert_eq!(split_namespace(&k), Some((&b"team"[..], &b"key"[..])));
        assert_eq!(split_namespace(b"\x00\x09short"), None);
        assert_eq!(split_namespace(b"\x00"), None);
        assert_eq!(split_namespace(b""), None);
        assert!(namespace_prefix(b"").is_none());
        assert!(namespace_prefix(&[b'a'; 256]).is_none());
        assert!(namespace_prefix(&[b'a'; 255]).is_some());
    }

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
