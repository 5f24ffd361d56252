//! Key layout of placement's metadata, under a configurable prefix (`--etcd-prefix`,
//! default `/skv/default`). All keys are byte strings; `<p>` is the prefix.
//!
//! | key | value |
//! |---|---|
//! | `<p>/cluster_id` | the cluster id, 32 lowercase hex chars (written once, at bootstrap) |
//! | `<p>/stores/<id>` | `StoreInfo` (protobuf); `<id>` is the `StoreId` as 20-digit zero-padded decimal |
//! | `<p>/ranges/1<end>` | `RangeInfo` (protobuf: descriptor + last known leader) of the range whose finite end key is `<end>` (raw bytes), plus field 3 `leader_term` (uint64, the leader's Raft term; reserved in `RangeInfo`, see [`crate::rangemap::encode_record`]) |
//! | `<p>/ranges/2` | the same, for the range whose end is +infinity |
//! | `<p>/ids` | next free id of the shared RangeId/StoreId allocator, decimal ASCII; leaders reserve blocks by CAS |
//! | `<p>/gen` | generation counter (decimal ASCII), for snapshot generations |
//! | `<p>/leader` | `PlacementMember` (protobuf) of the current leader, attached to its lease |
//! | `<p>/members/<name>` | `PlacementMember` of each live instance, attached to its lease |
//! | `<p>/scheduler_paused` | `1` or `0`: SetSchedulerPaused, so that it survives a leader change |
//! | `<p>/backups/<id>` | `BackupInfo` (protobuf) of a backup not complete yet (running, or failed); a complete one is its manifest in object storage (ADR 0028) |
//! | `<p>/restore` | `RestoreInfo` (protobuf): the one restore this cluster took or is taking (ADR 0028) |
//!
//! Ranges are keyed by their end so that "which range holds key K" is ONE range read:
//! the first record with end > K, i.e. from `ranges/1` + K + `\x00` (the smallest key above
//! `ranges/1` + K) to `ranges/3`, limit 1. Since `2` > `1…`, the infinite range sorts last.

use skv_common::ids::StoreId;

/// Key builder for one cluster prefix.
#[derive(Clone, Debug)]
pub struct Layout {
    prefix: Vec<u8>,
}

impl Layout {
    pub fn new(prefix: &str) -> Self {
        let p = prefix.trim_end_matches('/');
        Self {
            prefix: p.as_bytes().to_vec(),
        }
    }

    fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(b'/');
        k.extend_from_slice(suffix);
        k
    }

    /// Everything of this cluster: `<p>/`.
    pub fn root(&self) -> Vec<u8> {
        self.key(b"")
    }
    pub fn cluster_id(&self) -> Vec<u8> {
        self.key(b"cluster_id")
    }
    pub fn ids(&self) -> Vec<u8> {
        self.key(b"ids")
    }
    pub fn gen_key(&self) -> Vec<u8> {
        self.key(b"gen")
    }
    pub fn scheduler_paused(&self) -> Vec<u8> {
        self.key(b"scheduler_paused")
    }
    pub fn leader(&self) -> Vec<u8> {
        self.key(b"leader")
    }
    pub fn members_prefix(&self) -> Vec<u8> {
        self.key(b"members/")
    }
    pub fn member(&self, name: &str) -> Vec<u8> {
        let mut k = self.members_prefix();
        k.extend_from_slice(name.as_bytes());
        k
    }
    pub fn backups_prefix(&self) -> Vec<u8> {
        self.key(b"backups/")
    }
    pub fn backup(&self, id: &str) -> Vec<u8> {
        let mut k = self.backups_prefix();
        k.extend_from_slice(id.as_bytes());
        k
    }
    pub fn restore(&self) -> Vec<u8> {
        self.key(b"restore")
    }
    pub fn stores_prefix(&self) -> Vec<u8> {
        self.key(b"stores/")
    }
    pub fn store(&self, id: StoreId) -> Vec<u8> {
        let mut k = self.stores_prefix();
        k.extend_from_slice(format!("{:020}", id.get()).as_bytes());
        k
    }
    pub fn ranges_prefix(&self) -> Vec<u8> {
        self.key(b"ranges/")
    }
    /// The record key of a range with this end (empty = +infinity).
    pub fn range(&self, end: &[u8]) -> Vec<u8> {
        let mut k = self.ranges_prefix();
        if end.is_empty() {
            k.push(b'2');
        } else {
            k.push(b'1');
            k.extend_from_slice(end);
        }
        k
    }
    /// The end key encoded in a range record key, or None if it is not one.
    pub fn range_end_of(&self, key: &[u8]) -> Option<Vec<u8>> {
        let rest = key.strip_prefix(self.ranges_prefix().as_slice())?;
        match rest.split_first()? {
            (b'1', end) if !end.is_empty() => Some(end.to_vec()),
            (b'2', []) => Some(Vec::new()),
            _ => None,
        }
    }
    /// `[from, to)` of the records whose end is > `key`: the first one holds `key`.
    pub fn range_lookup_bounds(&self, key: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut from = self.ranges_prefix();
        from.push(b'1');
        from.extend_from_slice(key);
        from.push(0);
        let mut to = self.ranges_prefix();
        to.push(b'3');
        (from, to)
    }
    /// `[from, to)` of every range record.
    pub fn ranges_bounds(&self) -> (Vec<u8>, Vec<u8>) {
        let mut from = self.ranges_prefix();
        from.push(b'1');
        let mut to = self.ranges_prefix();
        to.push(b'3');
        (from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_keys_sort_by_end_and_lookup_bounds_work() {
        let l = Layout::new("/skv/t/");
        assert_eq!(l.range(b"b"), b"/skv/t/ranges/1b".to_vec());
        assert_eq!(l.range(b""), b"/skv/t/ranges/2".to_vec());
        assert!(l.range(b"\xff\xff") < l.range(b""));
        assert!(l.range(b"a") < l.range(b"a\x00"));
        assert_eq!(l.range_end_of(&l.range(b"xyz")), Some(b"xyz".to_vec()));
        assert_eq!(l.range_end_of(&l.range(b"")), Some(vec![]));
        assert_eq!(l.range_end_of(b"/skv/t/ranges/3"), None);
        // The record with end == key does not hold key; the first one above does.
        let (from, to) = l.range_lookup_bounds(b"b");
        assert!(l.range(b"b") < from);
        assert!(l.range(b"b\x00") >= from);
        assert!(l.range(b"") < to);
        let (from, _) = l.range_lookup_bounds(b"");
        assert!(l.range(b"\x00") >= from);
        assert_eq!(l.store(StoreId(7)), b"/skv/t/stores/00000000000000000007".to_vec());
    }
}
