//! Tenant namespaces: every user key is stored as
//! `u16 big-endian len(ns) ++ ns ++ user key` (docs/dev/contracts.md).
//!
//! The length prefix makes the encoding prefix-free: for two different namespaces
//! neither encoded prefix is a prefix of the other, so their key spans
//! `[prefix, prefix_end(prefix))` are disjoint and no user key of one can land in
//! the other. Scans are clamped to the span.

use skv_common::keys::{namespace_prefix, prefix_end};

/// Longest namespace in bytes.
pub const MAX_NAMESPACE_LEN: usize = skv_common::keys::MAX_NAMESPACE_LEN;

/// Why a namespace was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace is empty")]
    Empty,
    #[error("namespace is {0} bytes, the limit is 255")]
    TooLong(usize),
}

/// A validated namespace and its encoded key prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    prefix: Vec<u8>,
    end: Vec<u8>,
}

impl Namespace {
    /// Validates `ns` (1..=255 bytes) and builds its prefix.
    pub fn new(ns: &[u8]) -> Result<Self, NamespaceError> {
        if ns.is_empty() {
            return Err(NamespaceError::Empty);
        }
        let prefix = namespace_prefix(ns).ok_or(NamespaceError::TooLong(ns.len()))?;
        // The first byte is 0 (len <= 255), so the end is never +infinity.
        let end = prefix_end(&prefix);
        Ok(Namespace { prefix, end })
    }

    /// The namespace name.
    pub fn name(&self) -> &[u8] {
        &self.prefix[2..]
    }

    /// The encoded prefix every key of this namespace starts with.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The whole span of this namespace, `[prefix, prefix_end)`.
    pub fn span(&self) -> (&[u8], &[u8]) {
        (&self.prefix, &self.end)
    }

    /// The internal key of `user_key`.
    pub fn encode(&self, user_key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + user_key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(user_key);
        k
    }

    /// The user key of an internal key, or `None` when it is not in this namespace.
    pub fn strip<'a>(&self, internal: &'a [u8]) -> Option<&'a [u8]> {
        internal.strip_prefix(self.prefix.as_slice())
    }

    /// Internal scan bounds for user bounds `[start, end)`; an empty `end` means the end
    /// of the namespace. The result always lies inside [`Namespace::span`]; `None` when
    /// the interval is empty.
    pub fn scan_bounds(&self, start: &[u8], end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let s = self.encode(start);
        let e = if end.is_empty() {
            self.end.clone()
        } else {
            self.encode(end)
        };
        if s >= e { None } else { Some((s, e)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use skv_common::keys::in_range;

    fn random_bytes(rng: &mut StdRng, max: usize, min: usize) -> Vec<u8> {
        let len = rng.random_range(min..=max);
        // Bias towards the dangerous bytes 0x00 and 0xff.
        (0..len)
            .map(|_| match rng.random_range(0..4) {
                0 => 0x00,
                1 => 0xff,
                _ => rng.random(),
            })
            .collect()
    }

    #[test]
    fn validation() {
        assert_eq!(Namespace::new(b""), Err(NamespaceError::Empty));
        assert_eq!(Namespace::new(&[1u8; 256]), Err(NamespaceError::TooLong(256)));
        let ns = Namespace::new(&[0xffu8; 255]).unwrap();
        assert_eq!(ns.prefix()[..2], [0, 255]);
        assert!(!ns.span().1.is_empty());
        assert_eq!(ns.name(), &[0xffu8; 255][..]);
    }

    #[test]
    fn encode_strip_round_trip() {
        let ns = Namespace::new(b"acme").unwrap();
        let k = ns.encode(b"user/1");
        assert_eq!(k, b"\x00\x04acmeuser/1".to_vec());
        assert_eq!(ns.strip(&k), Some(&b"user/1"[..]));
        assert_eq!(Namespace::new(b"acm").unwrap().strip(&k), None);
        assert_eq!(Namespace::new(b"acmeu").unwrap().strip(&k), None);
    }

    #[test]
    fn classic_escapes_fail() {
        // "a" + key "\x00\x01b..." must not reach namespace "b"-ish spans and vice versa.
        let a = Namespace::new(b"a").unwrap();
        let ab = Namespace::new(b"ab").unwrap();
        let k = a.encode(b"b-secret");
        assert!(ab.strip(&k).is_none());
        let (s, e) = ab.span();
        assert!(!in_range(&k, s, e));
        // A user key full of 0xff stays below the namespace end.
        let k = a.encode(&[0xff; 4096]);
        let (s, e) = a.span();
        assert!(in_range(&k, s, e));
    }

    #[test]
    fn scan_bounds_are_clamped() {
        let ns = Namespace::new(b"t").unwrap();
        let (s, e) = ns.scan_bounds(b"", b"").unwrap();
        assert_eq!((s.as_slice(), e.as_slice()), ns.span());
        let (s, e) = ns.scan_bounds(b"a", b"c").unwrap();
        assert_eq!(s, ns.encode(b"a"));
        assert_eq!(e, ns.encode(b"c"));
        assert!(ns.scan_bounds(b"c", b"a").is_none());
        assert!(ns.scan_bounds(b"a", b"a").is_none());
    }

    /// Property: for random namespaces A != B and random user keys, A's keys never
    /// fall into B's span, B's strip never accepts them, and every scan of A stays in A.
    #[test]
    fn property_no_cross_namespace_mapping() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0001);
        for _ in 0..20_000 {
            let na = random_bytes(&mut rng, 8, 1);
            let nb = if rng.random_bool(0.3) {
                // Near misses: prefix / extension of the other namespace.
                let mut n = na.clone();
                if rng.random_bool(0.5) && n.len() > 1 {
                    n.pop();
                } else {
                    n.push(rng.random());
                }
                n
            } else {
                random_bytes(&mut rng, 8, 1)
            };
            if na == nb {
                continue;
            }
            let a = Namespace::new(&na).unwrap();
            let b = Namespace::new(&nb).unwrap();
            let key = random_bytes(&mut rng, 24, 0);
            let ka = a.encode(&key);
            let (bs, be) = b.span();
            assert!(!in_range(&ka, bs, be), "ns {na:?} key {key:?} lands in {nb:?}");
            assert!(b.strip(&ka).is_none());
            assert_eq!(a.strip(&ka), Some(key.as_slice()));
            let (as_, ae) = a.span();
            assert!(in_range(&ka, as_, ae));
            // Any scan of A (random bounds, possibly empty end) stays inside A's span,
            // hence disjoint from B's.
            let end = if rng.random_bool(0.3) {
                Vec::new()
            } else {
                random_bytes(&mut rng, 24, 0)
            };
            if let Some((s, e)) = a.scan_bounds(&key, &end) {
                assert!(s.as_slice() >= as_ && e.as_slice() <= ae);
                assert!(e.as_slice() <= bs || s.as_slice() >= be);
            }
        }
    }
}
