//! The checkpoint object format (docs/objstore-format.md), version 1.
//!
//! ```text
//! header   "SKVCKPT\0" | version u16 | header_len u32 | header fields | xxh3 u64
//! block*   'B' | raw_len u32 | comp_len u32 | entries u32 | lz4(payload) | xxh3 u64
//! trailer  'T' | blocks u64 | entries u64 | raw_bytes u64 | object xxh3 u64 | "SKVCEND\0"
//! ```
//!
//! Integers are little-endian. A block's payload is `(key_len u32, key, value_len u32,
//! value)*`, keys strictly ascending across the whole object and inside the header's
//! `[start, end)` (`end` empty = +infinity). A block's checksum covers its tag, its three
//! lengths and its compressed bytes; the object checksum covers every byte before it.
//!
//! [`CheckpointEncoder`] is pure (bytes in, frames out, memory bounded by one block);
//! [`CheckpointReader`] reads any `AsyncRead` and yields a block only after its checksum,
//! its decompression and every key in it were checked. It returns `None` (the end) only
//! after the trailer's counts, the object checksum, the end magic and end of input were
//! checked: a consumer commits what it read only then.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

pub const MAGIC: &[u8; 8] = b"SKVCKPT\0";
pub const END_MAGIC: &[u8; 8] = b"SKVCEND\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Default uncompressed size at which a block is closed.
pub const DEFAULT_BLOCK_BYTES: usize = 1 << 20;
/// Largest uncompressed block a reader accepts (a block holds at least one entry, so this
/// bounds one key + value too).
pub const MAX_BLOCK_RAW: usize = 32 << 20;
/// Largest header a reader accepts.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest entry (`8 + key + stored record`) the encoder takes: half a block, so that a
/// block of [`MAX_BLOCK_RAW`] always holds the entry that closes it.
pub const MAX_ENTRY_BYTES: usize = MAX_BLOCK_RAW / 2;
/// What the engine adds to a value in its stored record (version, flags), with room to spare.
pub const RECORD_OVERHEAD: usize = 64;

/// Whether every value a store accepts (`--max-value-len`) fits in a checkpoint entry under
/// the longest internal key. A value that did not would make its range's checkpoints fail
/// forever, so a storenode with object storage refuses such a limit at start (ADR 0025).
pub fn check_max_value_len(max_value_len: usize) -> Result<(), FormatError> {
    let entry = max_value_len
        .saturating_add(skv_common::limits::MAX_INTERNAL_KEY_LEN)
        .saturating_add(RECORD_OVERHEAD + 8);
    if entry > MAX_ENTRY_BYTES {
        return Err(FormatError::BadEntry(format!(
            "a value of {max_value_len} bytes does not fit a checkpoint block: with object storage the largest \
             value is {} bytes",
            max_value_limit()
        )));
    }
    Ok(())
}

/// The largest `--max-value-len` that [`check_max_value_len`] accepts.
pub fn max_value_limit() -> usize {
    MAX_ENTRY_BYTES - skv_common::limits::MAX_INTERNAL_KEY_LEN - RECORD_OVERHEAD - 8
}

const TAG_BLOCK: u8 = b'B';
const TAG_TRAILER: u8 = b'T';

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not an skv checkpoint (bad magic)")]
    BadMagic,
    #[error("checkpoint format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u16),
    #[error("checkpoint truncated ({0})")]
    Truncated(&'static str),
    #[error("checkpoint corrupt: {0}")]
    Corrupt(String),
    #[error("checkpoint entry refused: {0}")]
    BadEntry(String),
    #[error("I/O reading or writing a checkpoint: {0}")]
    Io(io::Error),
}

impl From<io::Error> for FormatError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FormatError::Truncated("unexpected end of object")
        } else {
            FormatError::Io(e)
        }
    }
}

fn corrupt(msg: impl Into<String>) -> FormatError {
    FormatError::Corrupt(msg.into())
}

/// What a checkpoint covers: one range at one applied Raft index.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckpointHeader {
    pub range_id: u64,
    /// Who wrote it: the leader's Raft term (ADR 0025); an older leader's objects sort below.
    pub generation: u64,
    pub conf_ver: u64,
    pub epoch_version: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    pub created_unix_ms: u64,
    /// Inclusive start of the key span.
    pub start: Vec<u8>,
    /// Exclusive end of the key span (empty: +infinity).
    pub end: Vec<u8>,
    /// The writer's opaque range descriptor (the storenode's protobuf `RangeDescriptor`).
    pub descriptor: Vec<u8>,
}

impl CheckpointHeader {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + self.start.len() + self.end.len() + self.descriptor.len());
        for v in [
            self.range_id,
            self.generation,
            self.conf_ver,
            self.epoch_version,
            self.applied_index,
            self.applied_term,
            self.created_unix_ms,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for f in [&self.start, &self.end, &self.descriptor] {
            b.extend_from_slice(&(f.len() as u32).to_le_bytes());
            b.extend_from_slice(f);
        }
        b
    }

    fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let mut c = Cursor { b, at: 0 };
        let mut h = CheckpointHeader {
            range_id: c.u64()?,
            generation: c.u64()?,
            conf_ver: c.u64()?,
            epoch_version: c.u64()?,
            applied_index: c.u64()?,
            applied_term: c.u64()?,
            created_unix_ms: c.u64()?,
            ..Default::default()
        };
        h.start = c.bytes()?.to_vec();
        h.end = c.bytes()?.to_vec();
        h.descriptor = c.bytes()?.to_vec();
        if c.at != b.len() {
            return Err(corrupt("header has trailing bytes"));
        }
        Ok(h)
    }

    /// Whether `key` lies in `[start, end)`.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }
}

/// Reads fields out of a checked buffer (never panics on short input).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).ok_or_else(|| corrupt("length overflow"))?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or_else(|| corrupt("field runs past its frame"))?;
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// Counts and checksum of a finished checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub blocks: u64,
    pub entries: u64,
    /// Uncompressed payload bytes.
    pub raw_bytes: u64,
    /// Object size in bytes.
    pub size: u64,
    /// The whole-object xxh3 stored in the trailer.
    pub checksum: u64,
}

/// Encodes a checkpoint: pure, memory bounded by one block.
pub struct CheckpointEncoder {
    hasher: Xxh3,
    raw: Vec<u8>,
    block_entries: u32,
    block_target: usize,
    summary: Summary,
    last_key: Option<Vec<u8>>,
    start: Vec<u8>,
    end: Vec<u8>,
}

impl CheckpointEncoder {
    /// Starts a checkpoint; returns the encoder and the header frame (the object's first bytes).
    pub fn new(header: &CheckpointHeader, block_target: usize) -> Result<(Self, Vec<u8>), FormatError> {
        let body = header.encode();
        if body.len() > MAX_HEADER {
            return Err(FormatError::BadEntry(format!("header of {} bytes", body.len())));
        }
        let mut out = Vec::with_capacity(body.len() + 22);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let h = xxh3_64(&out);
        out.extend_from_slice(&h.to_le_bytes());
        let mut enc = Self {
            hasher: Xxh3::new(),
            raw: Vec::new(),
            block_entries: 0,
            block_target: block_target.clamp(4096, MAX_BLOCK_RAW / 2),
            summary: Summary::default(),
            last_key: None,
            start: header.start.clone(),
            end: header.end.clone(),
        };
        enc.emitted(&out);
        Ok((enc, out))
    }

    fn emitted(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.summary.size += b.len() as u64;
    }

    /// Adds one entry (keys strictly ascending, inside the span); returns a block frame
    /// when the current block is full.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, FormatError> {
        if let Some(last) = &self.last_key
            && key <= last.as_slice()
        {
            return Err(FormatError::BadEntry("keys must be strictly ascending".into()));
        }
        let in_span = key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice());
        if !in_span {
            return Err(FormatError::BadEntry("key outside the checkpoint's span".into()));
        }
        let entry_len = 8 + key.len() + value.len();
        if entry_len > MAX_ENTRY_BYTES || key.len() > u32::MAX as usize || value.len() > u32::MAX as usize {
            return Err(FormatError::BadEntry(format!("entry of {entry_len} bytes")));
        }
        self.raw.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.raw.extend_from_slice(key);
        self.raw.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.raw.extend_from_slice(value);
        self.block_entries += 1;
        self.summary.entries += 1;
        self.last_key = Some(key.to_vec());
        if self.raw.len() >= self.block_target {
            return Ok(Some(self.close_block()));
        }
        Ok(None)
    }

    fn close_block(&mut self) -> Vec<u8> {
        let comp = lz4_flex::block::compress(&self.raw);
        let mut out = Vec::with_capacity(comp.len() + 21);
        out.push(TAG_BLOCK);
        out.extend_from_slice(&(self.raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&(comp.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.block_entries.to_le_bytes());
        out.extend_from_slice(&comp);
        let h = xxh3_64(&out);
        out.extend_from_slice(&h.to_le_bytes());
        self.summary.blocks += 1;
        self.summary.raw_bytes += self.raw.len() as u64;
        self.raw.clear();
        self.block_entries = 0;
        self.emitted(&out);
        out
    }

    /// Closes the last block and writes the trailer; returns the remaining bytes and the summary.
    pub fn finish(mut self) -> (Vec<u8>, Summary) {
        let mut out = if self.block_entries > 0 {
            self.close_block()
        } else {
            Vec::new()
        };
        let mut t = Vec::with_capacity(41);
        t.push(TAG_TRAILER);
        t.extend_from_slice(&self.summary.blocks.to_le_bytes());
        t.extend_from_slice(&self.summary.entries.to_le_bytes());
        t.extend_from_slice(&self.summary.raw_bytes.to_le_bytes());
        self.emitted(&t);
        let checksum = self.hasher.digest();
        t.extend_from_slice(&checksum.to_le_bytes());
        t.extend_from_slice(END_MAGIC);
        self.summary.size += 16;
        self.summary.checksum = checksum;
        out.extend_from_slice(&t);
        (out, self.summary)
    }
}

/// One entry of a checkpoint: the key and the value exactly as the engine stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// Reads and checks a checkpoint from any byte stream.
pub struct CheckpointReader<R> {
    r: R,
    hasher: Xxh3,
    header: CheckpointHeader,
    seen: Summary,
    last_key: Option<Vec<u8>>,
    done: bool,
}

impl<R: AsyncRead + Unpin> CheckpointReader<R> {
    /// Reads and checks the header.
    pub async fn open(mut r: R) -> Result<Self, FormatError> {
        let mut fixed = [0u8; 14];
        r.read_exact(&mut fixed).await?;
        if &fixed[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let len = u32::from_le_bytes([fixed[10], fixed[11], fixed[12], fixed[13]]) as usize;
        if len > MAX_HEADER {
            return Err(corrupt(format!("header length {len}")));
        }
        let mut body = vec![0u8; len + 8];
        r.read_exact(&mut body).await?;
        let (hdr, sum) = body.split_at(len);
        let mut h = Xxh3::new();
        h.update(&fixed);
        h.update(hdr);
        if h.digest().to_le_bytes() != sum {
            return Err(corrupt("header checksum mismatch"));
        }
        let header = CheckpointHeader::decode(hdr)?;
        let mut hasher = Xxh3::new();
        hasher.update(&fixed);
        hasher.update(&body);
        Ok(Self {
            r,
            hasher,
            header,
            seen: Summary {
                size: (14 + body.len()) as u64,
                ..Default::default()
            },
            last_key: None,
            done: false,
        })
    }

    pub fn header(&self) -> &CheckpointHeader {
        &self.header
    }

    /// Counts so far; after the end was returned, the checked summary of the whole object.
    pub fn summary(&self) -> Summary {
        self.seen
    }

    async fn read_hashed(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        self.r.read_exact(buf).await?;
        self.hasher.update(buf);
        self.seen.size += buf.len() as u64;
        Ok(())
    }

    /// The next block's entries, checked; `Ok(None)` once the trailer and the whole object
    /// were checked (only then is the checkpoint complete).
    pub async fn next_block(&mut self) -> Result<Option<Vec<Entry>>, FormatError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.read_hashed(&mut tag).await?;
        match tag[0] {
            TAG_BLOCK => self.read_block().await.map(Some),
            TAG_TRAILER => {
                self.read_trailer().await?;
                self.done = true;
                Ok(None)
            }
            t => Err(corrupt(format!("unknown frame tag {t:#x}"))),
        }
    }

    async fn read_block(&mut self) -> Result<Vec<Entry>, FormatError> {
        let mut lens = [0u8; 12];
        self.r.read_exact(&mut lens).await?;
        let raw_len = u32::from_le_bytes([lens[0], lens[1], lens[2], lens[3]]) as usize;
        let comp_len = u32::from_le_bytes([lens[4], lens[5], lens[6], lens[7]]) as usize;
        let count = u32::from_le_bytes([lens[8], lens[9], lens[10], lens[11]]);
        if raw_len > MAX_BLOCK_RAW || comp_len > lz4_flex::block::get_maximum_output_size(raw_len) {
            return Err(corrupt(format!("block lengths {raw_len}/{comp_len}")));
        }
        let mut comp = vec![0u8; comp_len];
        self.r.read_exact(&mut comp).await?;
        let mut sum = [0u8; 8];
        self.r.read_exact(&mut sum).await?;
        let mut h = Xxh3::new();
        h.update(&[TAG_BLOCK]);
        h.update(&lens);
        h.update(&comp);
        if h.digest().to_le_bytes() != sum {
            return Err(corrupt(format!("block {} checksum mismatch", self.seen.blocks)));
        }
        self.hasher.update(&lens);
        self.hasher.update(&comp);
        self.hasher.update(&sum);
        self.seen.size += (12 + comp_len + 8) as u64;
        let raw =
            lz4_flex::block::decompress(&comp, raw_len).map_err(|e| corrupt(format!("block decompression: {e}")))?;
        if raw.len() != raw_len {
            return Err(corrupt("block decompressed to a different length"));
        }
        let mut c = Cursor { b: &raw, at: 0 };
        // The count comes from the object: an entry takes at least 8 bytes of the payload, so
        // a lying count cannot make the reservation exceed the (bounded) raw length.
        let mut out = Vec::with_capacity((count as usize).min(raw_len / 8));
        while !c.done() {
            let key = c.bytes()?;
            let value = c.bytes()?;
            if let Some(last) = &self.last_key
                && key <= last.as_slice()
            {
                return Err(corrupt("keys out of order"));
            }
            if !self.header.contains(key) {
                return Err(corrupt("key outside the checkpoint's span"));
            }
            self.last_key = Some(key.to_vec());
            out.push(Entry {
                key: key.to_vec(),
                value: value.to_vec(),
            });
        }
        if out.len() != count as usize {
            return Err(corrupt("block entry count mismatch"));
        }
        self.seen.blocks += 1;
        self.seen.entries += count as u64;
        self.seen.raw_bytes += raw_len as u64;
        Ok(out)
    }

    async fn read_trailer(&mut self) -> Result<(), FormatError> {
        let mut counts = [0u8; 24];
        self.read_hashed(&mut counts).await?;
        let mut c = Cursor { b: &counts, at: 0 };
        let (blocks, entries, raw) = (c.u64()?, c.u64()?, c.u64()?);
        if (blocks, entries, raw) != (self.seen.blocks, self.seen.entries, self.seen.raw_bytes) {
            return Err(corrupt(format!(
                "trailer counts {blocks} blocks/{entries} entries, read {}/{}",
                self.seen.blocks, self.seen.entries
            )));
        }
        let mut tail = [0u8; 16];
        self.r.read_exact(&mut tail).await?;
        let expect = self.hasher.digest();
        if tail[..8] != expect.to_le_bytes() {
            return Err(corrupt("object checksum mismatch"));
        }
        if &tail[8..] != END_MAGIC {
            return Err(corrupt("bad end magic"));
        }
        let mut extra = [0u8; 1];
        if self.r.read(&mut extra).await? != 0 {
            return Err(corrupt("bytes after the trailer"));
        }
        self.seen.size += 16;
        self.seen.checksum = expect;
        Ok(())
    }

    /// Reads the rest of the object, checking it; returns the summary.
    pub async fn verify_rest(&mut self) -> Result<Summary, FormatError> {
        while self.next_block().await?.is_some() {}
        Ok(self.seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> CheckpointHeader {
        CheckpointHeader {
            range_id: 7,
            generation: 3,
            conf_ver: 2,
            epoch_version: 4,
            applied_index: 1234,
            applied_term: 3,
            created_unix_ms: 1,
            start: b"a".to_vec(),
            end: b"z".to_vec(),
            descriptor: b"desc".to_vec(),
        }
    }

    fn build(n: usize, block: usize) -> (Vec<u8>, Summary) {
        let (mut enc, mut out) = CheckpointEncoder::new(&header(), block).unwrap();
        for i in 0..n {
            let k = format!("k{i:08}");
            if let Some(f) = enc.push(k.as_bytes(), format!("value-{i}").as_bytes()).unwrap() {
                out.extend_from_slice(&f);
            }
        }
        let (rest, s) = enc.finish();
        out.extend_from_slice(&rest);
        (out, s)
    }

    async fn read_all(b: &[u8]) -> Result<(CheckpointHeader, Vec<Entry>, Summary), FormatError> {
        let mut r = CheckpointReader::open(b).await?;
        let mut all = Vec::new();
        while let Some(block) = r.next_block().await? {
            all.extend(block);
        }
        Ok((r.header().clone(), all, r.summary()))
    }

    #[tokio::test]
    async fn round_trip_with_many_blocks() {
        let (bytes, s) = build(20_000, 4096);
        assert!(s.blocks > 10, "{s:?}");
        assert_eq!(s.size, bytes.len() as u64);
        let (h, all, rs) = read_all(&bytes).await.unwrap();
        assert_eq!(h, header());
        assert_eq!(all.len(), 20_000);
        assert_eq!(all[17].key, b"k00000017");
        assert_eq!(all[17].value, b"value-17");
        assert_eq!(rs, s);
    }

    #[tokio::test]
    async fn an_empty_checkpoint_round_trips() {
        let (bytes, s) = build(0, 4096);
        assert_eq!((s.blocks, s.entries), (0, 0));
        let (_, all, rs) = read_all(&bytes).await.unwrap();
        assert!(all.is_empty());
        assert_eq!(rs.checksum, s.checksum);
    }

    #[tokio::test]
    async fn every_flipped_byte_is_detected_and_no_bad_block_is_yielded() {
        let (bytes, _) = build(300, 4096);
        let (_, good, _) = read_all(&bytes).await.unwrap();
        // Flip every byte in turn: the read must fail, and what it yielded before failing
        // must be a prefix of the good entries (never data from the bad block).
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let mut r = match CheckpointReader::open(&b[..]).await {
                Ok(r) => r,
                Err(_) => continue,
            };
            let mut got = Vec::new();
            let res = loop {
                match r.next_block().await {
                    Ok(Some(block)) => got.extend(block),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            assert!(res.is_err(), "flipping byte {i} went unnoticed");
            assert_eq!(got[..], good[..got.len()], "byte {i}: a bad block was yielded");
        }
    }

    #[tokio::test]
    async fn every_truncation_is_detected() {
        let (bytes, _) = build(300, 4096);
        for cut in 0..bytes.len() {
            let r = read_all(&bytes[..cut]).await;
            assert!(r.is_err(), "truncated at {cut} of {} was accepted", bytes.len());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(read_all(&longer).await, Err(FormatError::Corrupt(_))));
    }

    #[tokio::test]
    async fn wrong_magic_and_wrong_version_are_named() {
        let (bytes, _) = build(10, 4096);
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(read_all(&b).await, Err(FormatError::BadMagic)));
        let mut b = bytes.clone();
        b[8..10].copy_from_slice(&2u16.to_le_bytes());
        match read_all(&b).await {
            Err(FormatError::UnsupportedVersion(2)) => {}
            other => panic!("expected UnsupportedVersion(2), got {other:?}"),
        }
        assert!(matches!(read_all(&bytes[..5]).await, Err(FormatError::Truncated(_))));
    }

    #[test]
    fn max_value_len_is_checked_against_the_block_limit() {
        assert!(check_max_value_len(skv_common::limits::DEFAULT_MAX_VALUE_LEN).is_ok());
        assert!(check_max_value_len(max_value_limit()).is_ok());
        assert!(matches!(
            check_max_value_len(max_value_limit() + 1),
            Err(FormatError::BadEntry(_))
        ));
        // The largest accepted value under the longest key is taken by the encoder.
        let h = CheckpointHeader {
            start: Vec::new(),
            end: Vec::new(),
            ..header()
        };
        let (mut enc, _) = CheckpointEncoder::new(&h, 4096).unwrap();
        let key = vec![1u8; skv_common::limits::MAX_INTERNAL_KEY_LEN];
        let value = vec![0u8; max_value_limit() + RECORD_OVERHEAD];
        assert!(enc.push(&key, &value).is_ok());
    }

    #[tokio::test]
    async fn a_lying_entry_count_does_not_size_the_block_vector() {
        // A block whose count says u32::MAX but whose checksum is right (a writer bug or a
        // crafted object): refused by the count check, after a reservation of at most
        // raw_len / 8 entries (the test would abort on allocation failure otherwise).
        let (bytes, _) = build(3, 4096);
        let hlen = 14 + u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]) as usize + 8;
        let mut b = bytes.clone();
        assert_eq!(b[hlen], TAG_BLOCK);
        b[hlen + 9..hlen + 13].copy_from_slice(&u32::MAX.to_le_bytes());
        let comp_len = u32::from_le_bytes([b[hlen + 5], b[hlen + 6], b[hlen + 7], b[hlen + 8]]) as usize;
        let sum_at = hlen + 13 + comp_len;
        let h = xxh3_64(&b[hlen..sum_at]);
        b[sum_at..sum_at + 8].copy_from_slice(&h.to_le_bytes());
        match read_all(&b).await {
            Err(FormatError::Corrupt(m)) => assert!(m.contains("entry count"), "{m}"),
            other => panic!("expected a count mismatch, got {other:?}"),
        }
    }

    #[test]
    fn the_encoder_refuses_unordered_or_out_of_span_keys() {
        let (mut enc, _) = CheckpointEncoder::new(&header(), 4096).unwrap();
        enc.push(b"b", b"1").unwrap();
        assert!(enc.push(b"b", b"1").is_err());
        assert!(enc.push(b"a", b"1").is_err());
        assert!(enc.push(b"zz", b"1").is_err());
        let (mut enc, _) = CheckpointEncoder::new(&header(), 4096).unwrap();
        assert!(enc.push(b"0", b"1").is_err());
    }
}
