//! Merge of two adjacent ranges (placeholder filled in the merge step).

use skv_common::RangeId;

pub fn merge_key(range: RangeId) -> Vec<u8> {
    let mut k = b"merge/".to_vec();
    k.extend_from_slice(&range.0.to_be_bytes());
    k
}
