//! Input limits shared by proxy and storenode (DESIGN.md §3).

use thiserror::Error;

/// Longest key a client may send, in bytes.
pub const MAX_KEY_LEN: usize = 4096;
/// Largest namespace the proxy accepts, in bytes.
pub const MAX_NAMESPACE_LEN: usize = 255;
/// Longest key a storenode accepts: a user key plus the proxy's namespace
/// prefix (`u16` length + namespace).
pub const MAX_INTERNAL_KEY_LEN: usize = MAX_KEY_LEN + 2 + MAX_NAMESPACE_LEN;
/// Default largest value, in bytes (configurable per process).
pub const DEFAULT_MAX_VALUE_LEN: usize = 1024 * 1024;
/// Default largest gRPC message a server decodes (value + key + framing headroom).
pub const DEFAULT_MAX_MESSAGE_LEN: usize = DEFAULT_MAX_VALUE_LEN + 64 * 1024;

/// Why a key or value was refused. Maps to INVALID_ARGUMENT.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InputError {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {len} bytes, the limit is {max}")]
    KeyTooLong { len: usize, max: usize },
    #[error("value is {len} bytes, the limit is {max}")]
    ValueTooLong { len: usize, max: usize },
    #[error("record version {version} is above {max}")]
    VersionTooHigh { version: u64, max: u64 },
    #[error("range epoch (version {version}, conf_ver {conf_ver}) is above {max}")]
    EpochTooHigh { version: u64, conf_ver: u64, max: u64 },
}

/// The highest key version a record from outside may carry (a restore's `Ingest`: the only
/// way a version enters a store other than by a put). A put adds 1, so a key at this version
/// needs 2^62 more puts (146 years at a billion puts a second) before a u64 could wrap:
/// version arithmetic in apply never overflows.
pub const MAX_RECORD_VERSION: u64 = 1 << 62;

/// The highest `version` or `conf_ver` a range epoch from the network may carry (a
/// descriptor in `CreateReplica`). Splits, merges and membership changes add 1 each, so
/// from here an epoch cannot wrap within 2^62 admin operations.
pub const MAX_EPOCH: u64 = 1 << 62;

/// Checks a record's version against [`MAX_RECORD_VERSION`].
pub fn check_record_version(version: u64) -> Result<(), InputError> {
    if version > MAX_RECORD_VERSION {
        return Err(InputError::VersionTooHigh {
            version,
            max: MAX_RECORD_VERSION,
        });
    }
    Ok(())
}

/// Checks a range epoch against [`MAX_EPOCH`].
pub fn check_epoch(version: u64, conf_ver: u64) -> Result<(), InputError> {
    if version > MAX_EPOCH || conf_ver > MAX_EPOCH {
        return Err(InputError::EpochTooHigh {
            version,
            conf_ver,
            max: MAX_EPOCH,
        });
    }
    Ok(())
}

/// Checks a key against [`MAX_KEY_LEN`] (and that it is not empty).
pub fn check_key(key: &[u8]) -> Result<(), InputError> {
    check_key_with(key, MAX_KEY_LEN)
}

/// Checks an internal (namespaced) key against [`MAX_INTERNAL_KEY_LEN`]; for storenodes.
pub fn check_internal_key(key: &[u8]) -> Result<(), InputError> {
    check_key_with(key, MAX_INTERNAL_KEY_LEN)
}

/// Checks a key against an explicit limit.
pub fn check_key_with(key: &[u8], max: usize) -> Result<(), InputError> {
    if key.is_empty() {
        return Err(InputError::EmptyKey);
    }
    if key.len() > max {
        return Err(InputError::KeyTooLong { len: key.len(), max });
    }
    Ok(())
}

/// Checks a value against `max`.
pub fn check_value(value: &[u8], max: usize) -> Result<(), InputError> {
    if value.len() > max {
        return Err(InputError::ValueTooLong { len: value.len(), max });
    }
    Ok(())
}

impl From<InputError> for tonic::Status {
    fn from(e: InputError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Most keys or operations in one batch (BatchGet, BatchWrite), at the proxy and per
/// storenode call.
pub const MAX_BATCH_OPS: usize = 10_000;
/// Largest total of values one batch read returns (the proxy's answer, and so also one
/// storenode call's).
pub const MAX_BATCH_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// What the proxy adds to a client's batch before it reaches a storenode: a namespace
/// prefix on every key, plus the framing of each op.
pub const BATCH_PREFIX_OVERHEAD: usize = MAX_BATCH_OPS * (2 + MAX_NAMESPACE_LEN + 16);

/// Largest Store request and largest encoded Raft command of a storenode run with
/// `--max-value-len max_value_len`: one value, or a client's batch plus the namespace prefix
/// the proxy added (the Raft transport allows a few MiB plus two of these per message).
pub fn max_store_message(max_value_len: usize) -> usize {
    max_value_len
        .saturating_add(256 * 1024)
        .saturating_add(BATCH_PREFIX_OVERHEAD)
}

/// A restore's ingest chunk of more than one record is at most this many encoded bytes
/// ([`ingest_record_cost`] summed, plus [`INGEST_COMMAND_OVERHEAD`]): below
/// [`max_store_message`] of any `--max-value-len`, so it fits one Raft entry; a chunk of
/// one record fits because the record's value is bounded by `--max-value-len` and its key
/// by [`MAX_INTERNAL_KEY_LEN`] (ADR 0028).
pub const INGEST_CHUNK_BYTES: usize = 256 * 1024;
/// Encoded bytes of an ingest command besides its records: variant, record count, epoch.
pub const INGEST_COMMAND_OVERHEAD: usize = 16;

/// Encoded bytes one record adds to an ingest command (an upper bound): its key, its stored
/// record and two length prefixes (varints of at most 5 bytes).
pub fn ingest_record_cost(key_len: usize, record_len: usize) -> usize {
    key_len.saturating_add(record_len).saturating_add(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_epochs_above_their_bounds_are_refused() {
        assert_eq!(check_record_version(MAX_RECORD_VERSION), Ok(()));
        assert!(matches!(
            check_record_version(MAX_RECORD_VERSION + 1),
            Err(InputError::VersionTooHigh { .. })
        ));
        assert!(check_record_version(u64::MAX).is_err());
        assert_eq!(check_epoch(MAX_EPOCH, MAX_EPOCH), Ok(()));
        assert!(check_epoch(u64::MAX, 1).is_err());
        assert!(check_epoch(1, MAX_EPOCH + 1).is_err());
        let s: tonic::Status = check_epoch(u64::MAX, 1).unwrap_err().into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        // 2^62 more puts or admin operations stay below u64::MAX (and below the tombstone
        // bit of the stored record, 2^63).
        assert!(
            MAX_RECORD_VERSION
                .checked_add(MAX_RECORD_VERSION - 1)
                .is_some_and(|v| v < 1 << 63)
        );
    }

    #[test]
    fn every_ingest_chunk_fits_one_store_message() {
        for max_value_len in [1, 1024, DEFAULT_MAX_VALUE_LEN, 8 << 20, 64 << 20] {
            let cap = max_store_message(max_value_len);
            // Several records: the chunk bound.
            assert!(INGEST_CHUNK_BYTES + INGEST_COMMAND_OVERHEAD <= cap, "{max_value_len}");
            // One record alone: a maximal key and a maximal value (8 bytes of version).
            let one = INGEST_COMMAND_OVERHEAD + ingest_record_cost(MAX_INTERNAL_KEY_LEN, max_value_len + 8);
            assert!(one <= cap, "{max_value_len}");
        }
        assert_eq!(ingest_record_cost(3, 4), 17);
    }

    #[test]
    fn key_limits() {
        assert_eq!(check_key(b""), Err(InputError::EmptyKey));
        assert!(check_key(&[0u8; MAX_KEY_LEN]).is_ok());
        assert!(matches!(
            check_key(&[0u8; MAX_KEY_LEN + 1]),
            Err(InputError::KeyTooLong { .. })
        ));
        assert!(check_value(&[0u8; 10], 10).is_ok());
        assert!(check_value(&[0u8; 11], 10).is_err());
        let s: tonic::Status = InputError::EmptyKey.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
    }
}
