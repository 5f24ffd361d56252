//! Range-map update rules. Pure: no I/O; the caller reads the stored records that overlap
//! the incoming descriptors, asks [`plan_update`] what to do, and runs the returned
//! transaction (which compares the mod revision of every record involved, so a concurrent
//! change, even by a second placement leader, makes it fail and the caller re-reads).
//!
//! An incoming descriptor replaces the records it overlaps only if it is newer (by epoch,
//! [`skv_common::keys::epoch_newer`]) than EVERY one of them; one identical to a stored record
//! is a no-op (or a leader-only update). So the map never goes backwards.

use crate::layout::Layout;
use crate::meta::{CmpOp, Compare, Op, Txn};
use prost::Message;
use skv_common::keys::{epoch_newer, epoch_of};
use skv_proto::internal::{RangeDescriptor, RangeInfo};

/// A range record as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRange {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    pub info: RangeInfo,
}

impl StoredRange {
    pub fn desc(&self) -> &RangeDescriptor {
        self.info
            .descriptor
            .as_ref()
            .expect("stored ranges always carry a descriptor")
    }
}

/// An incoming descriptor, with the leader to record (None = keep what is stored, or 0).
#[derive(Clone, Debug)]
pub struct Incoming {
    pub desc: RangeDescriptor,
    pub leader: Option<u64>,
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

/// Whether `[a.start, a.end)` and `[b.start, b.end)` intersect (empty end = +infinity).
pub fn overlaps(a_start: &[u8], a_end: &[u8], b_start: &[u8], b_end: &[u8]) -> bool {
    (b_end.is_empty() || a_start < b_end) && (a_end.is_empty() || b_start < a_end)
}

fn desc_overlaps(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    overlaps(&a.start, &a.end, &b.start, &b.end)
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

/// Decides how to apply `incoming` (one descriptor, or the two halves of a split) given
/// `stored`: the records that overlap any of them (extra non-overlapping records are ignored).
pub fn plan_update(layout: &Layout, stored: &[StoredRange], incoming: &[Incoming]) -> UpdatePlan {
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
    let mut puts: Vec<(Vec<u8>, RangeInfo)> = Vec::new();
    for inc in incoming {
        let over: Vec<&StoredRange> = stored.iter().filter(|s| desc_overlaps(s.desc(), &inc.desc)).collect();
        let identical = over.len() == 1 && same_shape(over[0].desc(), &inc.desc);
        if identical {
            let s = over[0];
            let leader = inc.leader.unwrap_or(s.info.leader_store_id);
            if leader != s.info.leader_store_id {
                changed = true;
                let mut info = s.info.clone();
                info.leader_store_id = leader;
                puts.push((s.key.clone(), info));
            }
            involved.push(s);
            continue;
        }
        let inc_epoch = epoch_of(&inc.desc);
        if over.iter().any(|s| !epoch_newer(&inc_epoch, &epoch_of(s.desc()))) {
            return UpdatePlan::Stale(over.iter().map(|s| s.desc().clone()).collect());
        }
        changed = true;
        let keep_leader = over
            .iter()
            .find(|s| s.desc().range_id == inc.desc.range_id)
            .map_or(0, |s| s.info.leader_store_id);
        puts.push((
            layout.range(&inc.desc.end),
            RangeInfo {
                descriptor: Some(inc.desc.clone()),
                leader_store_id: inc.leader.unwrap_or(keep_leader),
            },
        ));
        involved.extend(over);
    }
    if !changed {
        return UpdatePlan::Unchanged;
    }
    involved.sort_by(|a, b| a.key.cmp(&b.key));
    involved.dedup_by(|a, b| a.key == b.key);
    let mut compares: Vec<Compare> = involved
        .iter()
        .map(|s| Compare::mod_revision(s.key.clone(), CmpOp::Equal, s.mod_revision))
        .collect();
    for (k, _) in &puts {
        if !involved.iter().any(|s| &s.key == k) {
            compares.push(Compare::absent(k.clone()));
        }
    }
    let mut ops: Vec<Op> = involved
        .iter()
        .filter(|s| !puts.iter().any(|(k, _)| k == &s.key))
        .map(|s| Op::delete(s.key.clone()))
        .collect();
    ops.extend(puts.into_iter().map(|(k, info)| Op::put(k, info.encode_to_vec())));
    UpdatePlan::Write(Txn::new().when(compares).and_then(ops))
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
        }
    }

    fn inc(desc: RangeDescriptor) -> Incoming {
        Incoming { desc, leader: None }
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
        assert_eq!(plan_update(&l, &s, &[inc(d(1, "", "", 1, 1))]), UpdatePlan::Unchanged);
        let same_leader = Incoming {
            desc: d(1, "", "", 1, 1),
            leader: Some(2),
        };
        assert_eq!(plan_update(&l, &s, &[same_leader]), UpdatePlan::Unchanged);
        let t = txn(plan_update(
            &l,
            &s,
            &[Incoming {
                desc: d(1, "", "", 1, 1),
                leader: Some(3),
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
        let t = txn(plan_update(&l, &s, &[inc(d(1, "", "", 2, 1))]));
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
        match plan_update(&l, &s, &[inc(d(1, "", "", 1, 1))]) {
            UpdatePlan::Stale(cur) => assert_eq!(cur.len(), 2),
            other => panic!("{other:?}"),
        }
        // conf_ver newer but version older: not newer.
        assert!(matches!(
            plan_update(&l, &s, &[inc(d(1, "", "m", 2, 1))]),
            UpdatePlan::Stale(_)
        ));
        // Newer than one overlapping record but not the other.
        assert!(matches!(
            plan_update(&l, &s, &[inc(d(1, "", "", 1, 3)), inc(d(9, "zz", "zzz", 1, 3))]),
            UpdatePlan::Invalid(_) | UpdatePlan::Stale(_)
        ));
        assert!(matches!(
            plan_update(&l, &s, &[inc(d(2, "a", "", 1, 2))]),
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
            &[
                Incoming {
                    desc: d(1, "", "k", 1, 2),
                    leader: Some(4),
                },
                Incoming {
                    desc: d(5, "k", "", 1, 2),
                    leader: Some(4),
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
        let t = txn(plan_update(&l, &s, &[inc(d(5, "k", "", 1, 2))]));
        assert_eq!(t.success.len(), 1);
        // Then the left half overlaps nothing (a hole) and is simply created.
        let t = txn(plan_update(&l, &[], &[inc(d(1, "", "k", 1, 2))]));
        assert_eq!(t.compares, vec![Compare::absent(l.range(b"k"))]);
        // Left first instead: replaces the old record (different key: delete + put).
        let t = txn(plan_update(&l, &s, &[inc(d(1, "", "k", 1, 2))]));
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
        let t = txn(plan_update(&l, &s, &[inc(d(1, "", "", 1, 3))]));
        assert_eq!(t.compares.len(), 2);
        assert!(t.success.contains(&Op::delete(l.range(b"m"))));
        assert!(
            t.success
                .iter()
                .any(|op| matches!(op, Op::Put { key, .. } if key == &l.range(b"")))
        );
    }

    #[test]
    fn invalid_inputs() {
        let l = Layout::new("/p");
        assert!(matches!(
            plan_update(&l, &[], &[inc(d(1, "b", "a", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(matches!(
            plan_update(&l, &[], &[inc(d(0, "", "", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(matches!(
            plan_update(&l, &[], &[inc(d(1, "", "m", 1, 1)), inc(d(2, "a", "z", 1, 1))]),
            UpdatePlan::Invalid(_)
        ));
        assert!(overlaps(b"a", b"c", b"b", b""));
        assert!(!overlaps(b"a", b"b", b"b", b"c"));
    }
}
