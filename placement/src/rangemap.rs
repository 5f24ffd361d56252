//! Range-map update rules. Pure: no I/O; the caller reads the stored records that could be
//! affected by the incoming descriptors (see [`guard_start`] / [`ends_guard`]), asks
//! [`plan_update`] what to do, and runs the returned transaction. The transaction compares
//! the mod revision of every record read AND that no key of each read interval was created
//! or changed since it was read ([`Guard`]), so any concurrent change of that part of the
//! map, even by a second placement leader, makes it fail and the caller re-reads. Guarding
//! the interval (not just the records found) matters for holes: two descriptors landing in
//! the same hole with different ends have different keys, and would both commit otherwise.
//!
//! An incoming descriptor replaces the records it overlaps only if it is newer (by epoch,
//! [`skv_common::keys::epoch_newer`]) than EVERY one of them; one identical to a stored record
//! is a no-op (or a leader-only update). So the map never goes backwards.
//!
//! Leader hints carry the Raft term they were observed in; the stored record keeps the term
//! of its leader (`leader_term`, see [`encode_record`]) and a hint from an older term is
//! ignored, so a heartbeat from a deposed leader cannot overwrite a newer leader.

use crate::layout::Layout;
use crate::meta::{CmpOp, Compare, Op, Txn};
use crate::model::{store_opt, store_raw};
use prost::Message;
use skv_common::ids::{RangeId, StoreId};
use skv_common::keys::{KeySpan, epoch_newer, epoch_of};
use skv_proto::internal::{RangeDescriptor, RangeInfo};

/// A range record as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRange {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    pub info: RangeInfo,
    /// Raft term in which `info.leader_store_id` was reported leader (0 = unknown).
    pub leader_term: u64,
}

impl StoredRange {
    pub fn desc(&self) -> &RangeDescriptor {
        self.info
            .descriptor
            .as_ref()
            .expect("stored ranges always carry a descriptor")
    }

    pub fn range_id(&self) -> RangeId {
        RangeId(self.desc().range_id)
    }

    /// The last known leader.
    pub fn leader(&self) -> Option<StoreId> {
        store_opt(self.info.leader_store_id)
    }
}

/// Placement-only fields of a stored range record. They are encoded after the `RangeInfo`
/// fields in the same protobuf message (concatenated encodings merge), so the stored value
/// still decodes as a plain `RangeInfo` (unknown fields are skipped) for every other reader.
/// Field 3 is reserved for this in `RangeInfo` (proto/skv/internal/v1/meta.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct RecordExt {
    #[prost(uint64, tag = "3")]
    leader_term: u64,
}

/// The stored value of a range record: `info` plus the term of its leader.
pub fn encode_record(info: &RangeInfo, leader_term: u64) -> Vec<u8> {
    let mut v = info.encode_to_vec();
    RecordExt { leader_term }.encode(&mut v).expect("a Vec grows as needed");
    v
}

/// Decodes a stored range record value: `(info, leader_term)`.
pub fn decode_record(value: &[u8]) -> Result<(RangeInfo, u64), prost::DecodeError> {
    let info = RangeInfo::decode(value)?;
    let ext = RecordExt::decode(value)?;
    Ok((info, ext.leader_term))
}

/// An incoming descriptor, with the leader to record (None = keep what is stored, or 0).
#[derive(Clone, Debug)]
pub struct Incoming {
    pub desc: RangeDescriptor,
    pub leader: Option<StoreId>,
    /// The Raft term in which `leader` was observed leading. With a term, the hint is
    /// accepted only if the term is >= the stored one (and the stored term is raised).
    /// Without one (a hint from a routing error or a split report), the hint is accepted
    /// but the stored term is kept, so the next heartbeat from the real leader wins.
    pub leader_term: Option<u64>,
}

/// "No key in `[from, to)` was created or changed after `revision`": the part of the map
/// read for one incoming descriptor.
#[derive(Clone, Debug, PartialEq)]
pub struct Guard {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
    /// The store revision the read observed (its first page, if paged).
    pub revision: i64,
}

impl Guard {
    fn compare(&self) -> Compare {
        Compare::mod_revision(self.from.clone(), CmpOp::Less, self.revision + 1).with_range(self.to.clone())
    }
}

/// The first key to read for an incoming descriptor starting at `start`: every record that
/// could overlap it has an end > `start`, i.e. a key >= this one.
pub fn guard_start(layout: &Layout, start: &[u8]) -> Vec<u8> {
    layout.range_lookup_bounds(start).0
}

/// Whether `rec` is the last record to read (and guard, inclusively) for an incoming
/// descriptor ending at `end`: the first record, in key order, whose end is >= `end`. Any
/// record created later that overlaps the incoming descriptor either has its key in the
/// guarded interval or overlaps `rec` (so its writer must have changed `rec`).
pub fn ends_guard(rec: &RangeDescriptor, end: &[u8]) -> bool {
    rec.end.is_empty() || (!end.is_empty() && rec.end.as_slice() >= end)
}

/// What to do with an update.
#[derive(Clone, Debug, PartialEq)]
pub enum UpdatePlan {
    /// Already stored exactly so.
    Unchanged,
    /// Run this transaction; if it fails, re-read and plan again.
    Write(Txn),
    /// Refused: some overlapping record is as new or newer. Carries the stored descriptors.
    Stale(Vec<RangeDescriptor>),
    /// Malformed input (empty interval, overlapping incoming descriptors, no epoch).
    Invalid(String),
}

fn desc_overlaps(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    KeySpan::of(a).overlaps(&KeySpan::of(b))
}

fn same_shape(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    a.range_id == b.range_id && a.start == b.start && a.end == b.end && epoch_of(a) == epoch_of(b)
}

fn valid(d: &RangeDescriptor) -> Result<(), String> {
    if d.range_id == 0 {
        return Err("range_id is 0".into());
    }
    if d.epoch.is_none() {
        return Err(format!("range {} has no epoch", d.range_id));
    }
    if !d.end.is_empty() && d.start >= d.end {
        return Err(format!("range {} has an empty interval", d.range_id));
    }
    Ok(())
}

/// `(leader, term)` to store, given what is stored for the range (`prev`) and a hint.
fn merge_leader(prev: (Option<StoreId>, u64), inc: &Incoming) -> (Option<StoreId>, u64) {
    match (inc.leader, inc.leader_term) {
        (None, _) => prev,
        (Some(l), None) => (Some(l), prev.1),
        (Some(l), Some(t)) if t >= prev.1 => (Some(l), t),
        (Some(_), Some(_)) => prev,
    }
}

/// Decides how to apply `incoming` (one descriptor, or the two halves of a split) given
/// `stored`: the records read (those overlapping any incoming descriptor, and possibly
/// neighbours; every one is compared by mod revision, only overlapping ones are acted on),
/// and `guards`: the intervals they were read from, each compared for "nothing new since".
pub fn plan_update(layout: &Layout, stored: &[StoredRange], guards: &[Guard], incoming: &[Incoming]) -> UpdatePlan {
    if incoming.is_empty() {
        return UpdatePlan::Unchanged;
    }
    for (i, inc) in incoming.iter().enumerate() {
        if let Err(e) = valid(&inc.desc) {
            return UpdatePlan::Invalid(e);
        }
        if incoming[..i].iter().any(|o| desc_overlaps(&o.desc, &inc.desc)) {
            return UpdatePlan::Invalid("incoming descriptors overlap each other".into());
        }
    }
    let mut involved: Vec<&StoredRange> = Vec::new();
    let mut changed = false;
    let mut puts: Vec<(Vec<u8>, RangeInfo, u64)> = Vec::new();
    for inc in incoming {
        let over: Vec<&StoredRange> = stored.iter().filter(|s| desc_overlaps(s.desc(), &inc.desc)).collect();
        let identical = over.len() == 1 && same_shape(over[0].desc(), &inc.desc);
        if identical {
            let s = over[0];
            let (leader, term) = merge_leader((s.leader(), s.leader_term), inc);
            if (leader, term) != (s.leader(), s.leader_term) {
                changed = true;
                let mut info = s.info.clone();
                info.leader_store_id = store_raw(leader);
                puts.push((s.key.clone(), info, term));
            }
            involved.push(s);
            continue;
        }
        let inc_epoch = epoch_of(&inc.desc);
        if over.iter().any(|s| !epoch_newer(&inc_epoch, &epoch_of(s.desc()))) {
            return UpdatePlan::Stale(over.iter().map(|s| s.desc().clone()).collect());
        }
        changed = true;
        let prev = over
            .iter()
            .find(|s| s.range_id() == RangeId(inc.desc.range_id))
            .map_or((None, 0), |s| (s.leader(), s.leader_term));
        let (leader, term) = merge_leader(prev, inc);
        puts.push((
            layout.range(&inc.desc.end),
            RangeInfo {
                descriptor: Some(inc.desc.clone()),
                leader_store_id: store_raw(leader),
            },
            term,
        ));
        involved.extend(over);
    }
    if !changed {
        return UpdatePlan::Unchanged;
    }
    involved.sort_by(|a, b| a.key.cmp(&b.key));
    involved.dedup_by(|a, b| a.key == b.key);
    let mut read: Vec<&StoredRange> = stored.iter().collect();
    read.sort_by(|a, b| a.key.cmp(&b.key));
    read.dedup_by(|a, b| a.key == b.key);
    let mut compares: Vec<Compare> = read
        .iter()
        .map(|s| Compare::mod_revision(s.key.clone(), CmpOp::Equal, s.mod_revision))
        .collect();
    for (k, _, _) in &puts {
        if !read.iter().any(|s| &s.key == k) {
            compares.push(Compare::absent(k.clone()));
        }
    }
    compares.extend(guards.iter().map(Guard::compare));
    let mut ops: Vec<Op> = involved
        .iter()
        .filter(|s| !puts.iter().any(|(k, _, _)| k == &s.key))
        .map(|s| Op::delete(s.key.clone()))
        .collect();
    ops.extend(
        puts.into_iter()
            .map(|(k, info, term)| Op::put(k, encode_record(&info, term))),
    );
    UpdatePlan::Write(Txn::new().when(compares).and_then(ops))
}

/// The replicas a store reported (`reported`, its local descriptors) that the map shows
/// removed, with the descriptor that shows it. Conservative: a replica is named only when
/// the map's record is strictly newer than the store's and excludes the store:
/// - the same range id at a higher conf_ver (and no lower version) without `store`;
/// - or a range id absent from the map whose whole interval is covered by one other range
///   at a higher version (a merge retired it: a range absent because placement has not
///   heard of its split yet is covered by its parent at a LOWER version, so it is kept).
///
/// `map` must be sorted by start key (the range map's order is by end key, the same order).
pub fn stale_replicas(
    store: StoreId,
    reported: &[RangeDescriptor],
    map: &[RangeDescriptor],
) -> Vec<(u64, RangeDescriptor)> {
    let by_id: std::collections::HashMap<u64, &RangeDescriptor> = map.iter().map(|d| (d.range_id, d)).collect();
    let mut out = Vec::new();
    for r in reported {
        let Some(re) = r.epoch else { continue };
        if r.range_id == 0 {
            continue;
        }
        if let Some(m) = by_id.get(&r.range_id) {
            let Some(me) = m.epoch else { continue };
            let removed = !m.replicas.iter().any(|x| StoreId(x.store_id) == store);
            if removed && me.conf_ver > re.conf_ver && me.version >= re.version {
                out.push((r.range_id, (*m).clone()));
            }
            continue;
        }
        // The record covering the reported start key.
        let idx = map.partition_point(|d| !d.end.is_empty() && d.end.as_slice() <= r.start.as_slice());
        let Some(m) = map.get(idx) else { continue };
        let Some(me) = m.epoch else { continue };
        let covers_start = m.start.as_slice() <= r.start.as_slice();
        let covers_end = m.end.is_empty() || (!r.end.is_empty() && r.end.as_slice() <= m.end.as_slice());
        if covers_start && covers_end && me.version > re.version {
            out.push((r.range_id, m.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use skv_proto::internal::{RangeEpoch, Replica};

    fn d(id: u64, start: &str, end: &str, conf_ver: u64, version: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
            epoch: Some(RangeEpoch { conf_ver, version }),
            replicas: vec![Replica { store_id: 1, role: 0 }],
        }
    }

    fn stored(l: &Layout, desc: RangeDescriptor, rev: i64, leader: u64) -> StoredRange {
        StoredRange {
            key: l.range(&desc.end),
            mod_revision: rev,
            info: RangeInfo {
                descriptor: Some(desc),
                leader_store_id: leader,
            },
            leader_term: 0,
        }
    }

    fn inc(desc: RangeDescriptor) -> Incoming {
        Incoming {
            desc,
            leader: None,
            leader_term: None,
        }
    }

    fn txn(p: UpdatePlan) -> Txn {
        match p {
            UpdatePlan::Write(t) => t,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    #[test]
    fn identical_is_unchanged_and_leader_change_is_a_cas_put() {
        let l = Layout::new("/p");
        let s = vec![stored(&l, d(1, "", "", 1, 1), 5, 2)];
        assert_eq!(
            plan_update(&l, &s, &[], &[inc(d(1, "", "", 1, 1))]),
            UpdatePlan::Unchanged
        );
        let same_leader = Incoming {
            desc: d(1, "", "", 1, 1),
            leader: Some(StoreId(2)),
            leader_term: None,
        };
        assert_eq!(plan_update(&l, &s, &[], &[same_leader]), UpdatePlan::Unchanged);
        let t = txn(plan_update(
            &l,
            &s,
            &[],
            &[Incoming {
                desc: d(1, "", "", 1, 1),
                leader: Some(StoreId(3)),
                leader_term: None,
            }],
        ));
        assert_eq!(t.compares, vec![Compare::mod_revision(l.range(b""), CmpOp::Equal, 5)]);
        assert_eq!(t.success.len(), 1);
        let Op::Put { value, .. } = &t.success[0] else { panic!() };
        assert_eq!(RangeInfo::decode(value.as_slice()).unwrap().leader_store_id, 3);
    }

    #[test]
    fn newer_conf_ver_replaces_and_keeps_leader() {
        let l = Layout::new("/p");
        let s = vec![stored(&l, d(1, "", "", 1, 1), 5, 2)];
        let t = txn(plan_update(&l, &s, &[], &[inc(d(1, "", "", 2, 1))]));
        assert_eq!(t.compares, vec![Compare::mod_revision(l.range(b""), CmpOp::Equal, 5)]);
        let Op::Put { key, value, .. } = &t.success[0] else {
            panic!()
        };
        assert_eq!(key, &l.range(b""));
        let info = RangeInfo::decode(value.as_slice()).unwrap();
        assert_eq!(info.leader_store_id, 2);
        assert_eq!(info.descriptor.unwrap().epoch.unwrap().conf_ver, 2);
    }

    #[test]
    fn stale_or_equal_epoch_with_different_shape_is_refused() {
        let l = Layout::new("/p");
        let s = vec![
            stored(&l, d(1, "", "m", 1, 2), 5, 0),
            stored(&l, d(2, "m", "", 1, 2), 6, 0),
        ];
        // An old full-range descriptor from before the split.
        match plan_update(&l, &s, &[], &[inc(d(1, "", "", 1, 1))]) {
            UpdatePlan::Stale(cur) => assert_eq!(cur.len(), 2),
            other => panic!("{other:?}"),
        }
        // conf_ver newer but version older: not newer.
        assert!(matches!(
            plan_update(&l, &s, &[], &[inc(d(1, "", "m", 2, 1))]),
            UpdatePlan::Stale(_)
        ));
        // Newer than one overlapping record but not the other.
        assert!(matches!(
            plan_update(&l, &s, &[], &[inc(d(1, "", "", 1, 3)), inc(d(9, "zz", "zzz", 1, 3))]),
            UpdatePlan::Invalid(_) | UpdatePlan::Stale(_)
        ));
        assert!(matches!(
            plan_update(&l, &s, &[], &[inc(d(2, "a", "", 1, 2))]),
            UpdatePlan::Stale(_)
        ));
    }

    #[test]
    fn split_pair_applies_atomically() {
        let l = Layout::new("/p");
        let s = vec![stored(&l, d(1, "", "", 1, 1), 7, 4)];
        let t = txn(plan_update(
            &l,
            &s,
            &[],
            &[
                Incoming {
                    desc: d(1, "", "k", 1, 2),
                    leader: Some(StoreId(4)),
                    leader_term: None,
                },
                Incoming {
                    desc: d(5, "k", "", 1, 2),
                    leader: Some(StoreId(4)),
                    leader_term: None,
                },
            ],
        ));
        assert!(
            t.compares
                .contains(&Compare::mod_revision(l.range(b""), CmpOp::Equal, 7))
        );
        assert!(t.compares.contains(&Compare::absent(l.range(b"k"))));
        assert_eq!(t.success.len(), 2);
        assert!(t.success.iter().all(|op| matches!(op, Op::Put { .. })));
    }

    #[test]
    fn right_half_first_then_left_half() {
        let l = Layout::new("/p");
        let s = vec![stored(&l, d(1, "", "", 1, 1), 7, 4)];
        // The right half (new range) reported first overwrites the old record's key.
        let t = txn(plan_update(&l, &s, &[], &[inc(d(5, "k", "", 1, 2))]));
        assert_eq!(t.success.len(), 1);
        // Then the left half overlaps nothing (a hole) and is simply created.
        let t = txn(plan_update(&l, &[], &[], &[inc(d(1, "", "k", 1, 2))]));
        assert_eq!(t.compares, vec![Compare::absent(l.range(b"k"))]);
        // Left first instead: replaces the old record (different key: delete + put).
        let t = txn(plan_update(&l, &s, &[], &[inc(d(1, "", "k", 1, 2))]));
        assert!(t.success.contains(&Op::delete(l.range(b""))));
        assert!(
            t.success
                .iter()
                .any(|op| matches!(op, Op::Put { key, .. } if key == &l.range(b"k")))
        );
    }

    #[test]
    fn merge_like_update_deletes_both() {
        let l = Layout::new("/p");
        let s = vec![
            stored(&l, d(1, "", "m", 1, 2), 5, 0),
            stored(&l, d(2, "m", "", 1, 2), 6, 0),
        ];
        let t = txn(plan_update(&l, &s, &[], &[inc(d(1, "", "", 1, 3))]));
        assert_eq!(t.compares.len(), 2);
        assert!(t.success.contains(&Op::delete(l.range(b"m"))));
        assert!(
            t.success
                .iter()
                .any(|op| matches!(op, Op::Put { key, .. } if key == &l.range(b"")))
        );
    }

    fn hint(desc: RangeDescriptor, leader: u64, term: Option<u64>) -> Incoming {
        Incoming {
            desc,
            leader: Some(StoreId(leader)),
            leader_term: term,
        }
    }

    fn put_of(t: &Txn, key: &[u8]) -> (RangeInfo, u64) {
        t.success
            .iter()
            .find_map(|op| match op {
                Op::Put { key: k, value, .. } if k == key => Some(decode_record(value).unwrap()),
                _ => None,
            })
            .expect("a put of the key")
    }

    #[test]
    fn record_encoding_keeps_the_term_and_stays_a_range_info() {
        let info = RangeInfo {
            descriptor: Some(d(1, "a", "b", 1, 2)),
            leader_store_id: 7,
        };
        let v = encode_record(&info, 42);
        assert_eq!(decode_record(&v).unwrap(), (info.clone(), 42));
        // Other readers see a plain RangeInfo.
        assert_eq!(RangeInfo::decode(v.as_slice()).unwrap(), info);
        // Records written before terms were stored decode with term 0.
        assert_eq!(decode_record(&info.encode_to_vec()).unwrap(), (info, 0));
    }

    #[test]
    fn leader_hint_from_an_older_term_is_ignored() {
        let l = Layout::new("/p");
        let mut rec = stored(&l, d(1, "", "", 1, 1), 5, 2);
        rec.leader_term = 7;
        let s = vec![rec];
        let key = l.range(b"");
        // A deposed leader (term 6) reporting the identical descriptor: nothing changes.
        assert_eq!(
            plan_update(&l, &s, &[], &[hint(d(1, "", "", 1, 1), 3, Some(6))]),
            UpdatePlan::Unchanged
        );
        // Same term (e.g. the stored leader came from an untermed hint): accepted.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(1, "", "", 1, 1), 3, Some(7))]));
        assert_eq!(put_of(&t, &key).0.leader_store_id, 3);
        assert_eq!(put_of(&t, &key).1, 7);
        // Newer term: accepted and the term raised.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(1, "", "", 1, 1), 3, Some(8))]));
        assert_eq!(put_of(&t, &key).0.leader_store_id, 3);
        assert_eq!(put_of(&t, &key).1, 8);
        // Same leader re-elected in a newer term: the term alone is written.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(1, "", "", 1, 1), 2, Some(9))]));
        assert_eq!(put_of(&t, &key), (s[0].info.clone(), 9));
        // A hint without a term (routing error, split report) is taken, the term kept.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(1, "", "", 1, 1), 4, None)]));
        assert_eq!(put_of(&t, &key).0.leader_store_id, 4);
        assert_eq!(put_of(&t, &key).1, 7);
        // A newer descriptor from a deposed leader replaces the descriptor, not the leader.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(1, "", "", 2, 1), 3, Some(6))]));
        let (info, term) = put_of(&t, &key);
        assert_eq!((info.leader_store_id, term), (2, 7));
        assert_eq!(info.descriptor.unwrap().epoch.unwrap().conf_ver, 2);
        // A different range taking the keys over starts from its own term.
        let t = txn(plan_update(&l, &s, &[], &[hint(d(5, "k", "", 1, 2), 3, Some(1))]));
        assert_eq!(put_of(&t, &key).0.leader_store_id, 3);
        assert_eq!(put_of(&t, &key).1, 1);
    }

    #[test]
    fn guards_and_every_read_record_are_compared() {
        let l = Layout::new("/p");
        // A hole [a, m) before [m, +inf): the update into the hole reads that record as
        // the boundary of its guarded interval.
        let s = [stored(&l, d(3, "m", "", 1, 2), 6, 0)];
        let from = guard_start(&l, b"a");
        let mut to = l.range(b"");
        to.push(0);
        let g = Guard {
            from: from.clone(),
            to: to.clone(),
            revision: 9,
        };
        let t = txn(plan_update(
            &l,
            &s,
            std::slice::from_ref(&g),
            &[inc(d(2, "a", "c", 1, 3))],
        ));
        assert!(
            t.compares
                .contains(&Compare::mod_revision(from, CmpOp::Less, 10).with_range(to))
        );
        // The boundary does not overlap, but is compared (a writer deleting it could take
        // the hole over from outside the guarded interval).
        assert!(
            t.compares
                .contains(&Compare::mod_revision(l.range(b""), CmpOp::Equal, 6))
        );
        assert!(t.compares.contains(&Compare::absent(l.range(b"c"))));
        assert_eq!(t.success.len(), 1, "the boundary is not touched");
        // Where the guarded read stops.
        assert!(ends_guard(&d(3, "m", "", 1, 2), b"c"));
        assert!(ends_guard(&d(3, "m", "x", 1, 2), b"c"));
        assert!(ends_guard(&d(3, "a", "c", 1, 2), b"c"));
        assert!(!ends_guard(&d(3, "a", "b", 1, 2), b"c"));
        assert!(!ends_guard(&d(3, "a", "b", 1, 2), b""));
        // Every record overlapping [a, ..) sorts at or after the guard start.
        assert!(l.range(b"a") < guard_start(&l, b"a"));
        assert!(l.range(b"a\x00") >= guard_start(&l, b"a"));
    }

    #[test]
    fn invalid_inputs() {
        let l = Layout::new("/p");
        assert!(matches!(
            plan_update(&l, &[], &[], &[inc(d(1, "b", "a", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(matches!(
            plan_update(&l, &[], &[], &[inc(d(0, "", "", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(matches!(
            plan_update(&l, &[], &[], &[inc(d(1, "", "m", 1, 1)), inc(d(2, "a", "z", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(KeySpan::new(b"a", b"c").overlaps(&KeySpan::new(b"b", b"")));
        assert!(!KeySpan::new(b"a", b"b").overlaps(&KeySpan::new(b"b", b"c")));
    }

    fn ds(id: u64, start: &str, end: &str, conf_ver: u64, version: u64, stores: &[u64]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
            epoch: Some(skv_proto::internal::RangeEpoch { conf_ver, version }),
            replicas: stores
                .iter()
                .map(|s| skv_proto::internal::Replica { store_id: *s, role: 0 })
                .collect(),
        }
    }

    #[test]
    fn stale_replicas_are_named_only_on_newer_information() {
        let map = vec![ds(1, "", "m", 6, 3, &[1, 2, 4]), ds(2, "m", "", 3, 2, &[1, 2, 3])];
        let me = StoreId(3);
        // (reported, stale with the id of the current descriptor?)
        let table = [
            // Range 1 moved off store 3 at conf_ver 6 > 4.
            (ds(1, "", "m", 4, 3, &[1, 2, 3]), Some(1)),
            // Same conf_ver: placement is not newer, keep.
            (ds(1, "", "m", 6, 3, &[1, 2, 3]), None),
            // The store is newer than placement: keep.
            (ds(1, "", "m", 7, 3, &[1, 2, 3]), None),
            // Placement's version is older (a split placement has not heard of): keep.
            (ds(1, "", "g", 4, 4, &[1, 2, 3]), None),
            // Still a member per placement.
            (ds(2, "m", "", 2, 2, &[1, 2, 3]), None),
            // Range 9 was merged into 1 (covered, higher version): stale.
            (ds(9, "c", "m", 6, 2, &[1, 2, 3]), Some(1)),
            // Range 9 covered by an older version: a split not reported yet, keep.
            (ds(9, "c", "m", 6, 3, &[1, 2, 3]), None),
            // Not covered by one range: keep.
            (ds(9, "c", "z", 6, 1, &[1, 2, 3]), None),
            (ds(9, "c", "", 6, 1, &[1, 2, 3]), None),
            (ds(9, "x", "", 1, 1, &[1, 2, 3]), Some(2)),
        ];
        for (rep, want) in table {
            let got = stale_replicas(me, std::slice::from_ref(&rep), &map);
            assert_eq!(got.first().map(|(_, c)| c.range_id), want, "{rep:?}");
            if let Some((id, _)) = got.first() {
                assert_eq!(*id, rep.range_id);
            }
        }
    }
}
