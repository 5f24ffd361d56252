//! The body of a streaming `Store.Scan`: one engine snapshot, read in bounded chunks on the
//! blocking pool and handed to the gRPC stream through a small bounded channel.
//!
//! Memory stays bounded whatever the range size: at most [`CHANNEL`] chunks wait in the
//! channel and one is being read; HTTP/2 flow control stops the producer when the client
//! reads slowly. The snapshot (which pins old engine data) is held at most until the
//! caller's deadline (`grpc-timeout`) or [`MAX_HOLD`], whichever is first. A stream never
//! ends silently early: it ends after its last key, or with an error status.

use crate::engine::{Engine, data_range, decode_value, io_err};
use fjall::Readable;
use futures::{Stream, StreamExt};
use prometheus_client::metrics::gauge::Gauge;
use skv_proto::internal::{RoutingError, StoreKv, StoreScanResponse};
use std::io;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Status;

/// Keys per scan message.
pub const CHUNK_KEYS: usize = 256;
/// Soft byte budget of one scan message (keys + values; at least one pair per message).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Records (live or tombstones) examined per blocking read, so that a long run of
/// tombstones still yields to the deadline and client checks.
const CHUNK_EXAMINED: usize = 16 * CHUNK_KEYS;
/// Longest a scan holds its engine snapshot, whatever the caller's deadline.
pub const MAX_HOLD: Duration = Duration::from_secs(60);
/// Messages buffered between the reader and the gRPC stream.
const CHANNEL: usize = 2;
/// How long the producer tries to hand over a final error before giving up (the stream
/// then still ends with an error, see [`stream`]).
const FINAL_SEND: Duration = Duration::from_secs(1);

/// The response stream of `Store.Scan`.
pub type ScanStream = Pin<Box<dyn Stream<Item = Result<StoreScanResponse, Status>> + Send>>;

/// Reads the live pairs of `[start, end)` (empty end = +infinity) from one engine snapshot,
/// chunk by chunk. Tombstones (deleted keys) are skipped and do not count toward the limit.
pub struct ScanCursor {
    snap: fjall::Snapshot,
    data: fjall::Keyspace,
    /// Lower bound of the next read: the start key, then just past the last key examined.
    from: Bound<Vec<u8>>,
    end: Vec<u8>,
    /// Live pairs still allowed (`None`: no limit).
    remaining: Option<usize>,
    done: bool,
}

impl ScanCursor {
    /// A cursor over `snap`; `limit` 0 means no limit.
    pub fn new(engine: &Engine, snap: fjall::Snapshot, start: Vec<u8>, end: Vec<u8>, limit: u32) -> Self {
        Self {
            snap,
            data: engine.data.clone(),
            from: Bound::Included(start),
            end,
            remaining: (limit != 0).then_some(limit as usize),
            done: false,
        }
    }

    /// The next chunk of live pairs (at most [`CHUNK_KEYS`] and about [`CHUNK_BYTES`]), or
    /// `None` once the scan is complete. A chunk may be empty when only tombstones were
    /// examined; call again.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<StoreKv>>> {
        if self.done || self.remaining == Some(0) {
            self.done = true;
            return Ok(None);
        }
        let (_, hi) = data_range(&[], &self.end);
        let hi: Bound<Vec<u8>> = match hi {
            Bound::Excluded(e) => Bound::Excluded(e.to_vec()),
            _ => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut last: Option<Vec<u8>> = None;
        let mut exhausted = true;
        let iter = self.snap.range::<Vec<u8>, _>(&self.data, (self.from.clone(), hi));
        for (examined, g) in iter.enumerate() {
            if examined >= CHUNK_EXAMINED
                || out.len() >= CHUNK_KEYS
                || bytes >= CHUNK_BYTES
                || self.remaining.is_some_and(|r| out.len() >= r)
            {
                exhausted = false;
                break;
            }
            let (k, v) = g.into_inner().map_err(io_err)?;
            last = Some(k.to_vec());
            let Some((version, value)) = decode_value(&v) else {
                continue;
            };
            bytes += k.len() + value.len();
            out.push(StoreKv {
                key: k.to_vec(),
                value,
                version,
            });
        }
        if let Some(r) = self.remaining.as_mut() {
            *r -= out.len().min(*r);
        }
        match last {
            Some(k) if !exhausted => self.from = Bound::Excluded(k),
            _ => self.done = true,
        }
        if self.done && out.is_empty() {
            return Ok(None);
        }
        Ok(Some(out))
    }
}

/// A stream whose first and only message is the routing error.
pub fn routing_error_stream(e: RoutingError) -> ScanStream {
    Box::pin(futures::stream::once(async move {
        Ok(StoreScanResponse {
            routing_error: Some(e),
            kvs: Vec::new(),
        })
    }))
}

/// Decrements a gauge when dropped.
struct OpenScan(Gauge);

impl Drop for OpenScan {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Streams the cursor's chunks until the end, the deadline, or the client going away.
/// The cursor (and so the snapshot) is dropped as soon as the producer stops; `open` counts
/// the producers running.
pub fn stream(cursor: ScanCursor, deadline: Instant, open: Gauge) -> ScanStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<StoreScanResponse, Status>>(CHANNEL);
    // Set by the producer when it ended the stream itself (last key sent, or an error sent).
    let finished = Arc::new(AtomicBool::new(false));
    let fin = finished.clone();
    open.inc();
    let open = OpenScan(open);
    tokio::spawn(async move {
        let _open = open;
        let mut cursor = cursor;
        // Ends the stream with `st`; `finished` only if the client can receive it.
        let fail = |st: Status| {
            let (tx, fin) = (tx.clone(), fin.clone());
            async move {
                if let Ok(Ok(())) = tokio::time::timeout(FINAL_SEND, tx.send(Err(st))).await {
                    fin.store(true, Ordering::Release);
                }
            }
        };
        let past_deadline = || {
            Status::deadline_exceeded(format!(
                "scan stopped: it held its snapshot for the caller's deadline or the server cap \
                 ({MAX_HOLD:?}); resume after the last key received"
            ))
        };
        loop {
            if tx.is_closed() {
                return; // the client went away
            }
            if Instant::now() >= deadline {
                return fail(past_deadline()).await;
            }
            let read = tokio::task::spawn_blocking(move || {
                let r = cursor.next_chunk();
                (cursor, r)
            })
            .await;
            let (c, chunk) = match read {
                Ok(x) => x,
                Err(e) => return fail(Status::internal(format!("scan reader failed: {e}"))).await,
            };
            cursor = c;
            let kvs = match chunk {
                Ok(Some(kvs)) if kvs.is_empty() => continue,
                Ok(Some(kvs)) => kvs,
                Ok(None) => {
                    fin.store(true, Ordering::Release);
                    return;
                }
                Err(e) => return fail(Status::internal(format!("scan read failed: {e}"))).await,
            };
            let msg = Ok(StoreScanResponse {
                routing_error: None,
                kvs,
            });
            tokio::select! {
                sent = tx.send(msg) => if sent.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return fail(past_deadline()).await,
            }
        }
    });
    // If the producer stopped without ending the stream itself (it panicked, or the deadline
    // error did not fit in a full channel), the client must not see a clean end: that would
    // read as a complete, silently truncated scan.
    let tail = futures::stream::once(async move {
        if finished.load(Ordering::Acquire) {
            None
        } else {
            Some(Err(Status::aborted(
                "scan ended before its last key; resume after the last key received",
            )))
        }
    })
    .filter_map(|x| async move { x });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).chain(tail))
}

/// How long a scan that arrived at `arrived` may hold its snapshot: the caller's deadline
/// (`grpc-timeout`, counted from arrival) capped by [`MAX_HOLD`].
pub fn deadline(metadata: &tonic::metadata::MetadataMap, arrived: Instant) -> Instant {
    let caller = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(skv_rpc::parse_grpc_timeout);
    arrived + caller.map_or(MAX_HOLD, |t| t.min(MAX_HOLD))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{encode_tombstone, encode_value};

    fn keys(kvs: &[StoreKv]) -> Vec<Vec<u8>> {
        kvs.iter().map(|kv| kv.key.clone()).collect()
    }

    fn all(c: &mut ScanCursor) -> (Vec<Vec<Vec<u8>>>, usize) {
        let mut chunks = Vec::new();
        let mut calls = 0;
        while let Some(kvs) = c.next_chunk().unwrap() {
            calls += 1;
            assert!(calls < 10_000, "cursor does not end");
            chunks.push(keys(&kvs));
        }
        (chunks, calls)
    }

    #[test]
    fn cursor_skips_tombstones_honours_the_limit_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        e.data.insert(b"a", encode_value(1, b"1")).unwrap();
        e.data.insert(b"b", encode_tombstone(3)).unwrap();
        e.data.insert(b"c", encode_value(2, b"2")).unwrap();
        e.data.insert(b"d", encode_tombstone(1)).unwrap();
        let flat = |chunks: Vec<Vec<Vec<u8>>>| chunks.concat();
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        assert_eq!(flat(all(&mut c).0), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(c.next_chunk().unwrap().is_none());
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 1);
        assert_eq!(flat(all(&mut c).0), vec![b"a".to_vec()]);
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"b".to_vec(), b"d".to_vec(), 1);
        assert_eq!(flat(all(&mut c).0), vec![b"c".to_vec()]);
        // Only tombstones: nothing.
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"d".to_vec(), b"".to_vec(), 0);
        assert!(flat(all(&mut c).0).is_empty());

        // Many keys: full chunks of CHUNK_KEYS, in order, nothing lost or repeated.
        for i in 0..1000u32 {
            e.data.insert(format!("k{i:04}"), encode_value(1, b"v")).unwrap();
        }
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"k".to_vec(), b"l".to_vec(), 0);
        let (chunks, _) = all(&mut c);
        assert!(chunks.iter().all(|ch| ch.len() <= CHUNK_KEYS));
        assert_eq!(chunks[0].len(), CHUNK_KEYS);
        let got = flat(chunks);
        let want: Vec<Vec<u8>> = (0..1000u32).map(|i| format!("k{i:04}").into_bytes()).collect();
        assert_eq!(got, want);
        // A limit that is not a multiple of the chunk size.
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"k".to_vec(), b"".to_vec(), 300);
        assert_eq!(flat(all(&mut c).0), want[..300].to_vec());
    }

    #[test]
    fn cursor_reads_its_snapshot_not_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        for i in 0..600u32 {
            e.data.insert(format!("k{i:04}"), encode_value(1, b"old")).unwrap();
        }
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        let first = c.next_chunk().unwrap().unwrap();
        assert_eq!(first.len(), CHUNK_KEYS);
        // Writes after the snapshot: new keys, changed values, deletes.
        for i in 0..600u32 {
            e.data.insert(format!("k{i:04}"), encode_value(2, b"new")).unwrap();
        }
        e.data.insert(b"k0300", encode_tombstone(2)).unwrap();
        e.data.insert(b"k9999", encode_value(1, b"new")).unwrap();
        let mut rest = Vec::new();
        while let Some(kvs) = c.next_chunk().unwrap() {
            rest.extend(kvs);
        }
        assert_eq!(first.len() + rest.len(), 600);
        assert!(rest.iter().all(|kv| kv.value == b"old" && kv.version == 1));
    }

    #[test]
    fn large_values_make_smaller_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        for i in 0..10u32 {
            e.data
                .insert(format!("k{i}"), encode_value(1, &vec![7u8; 300 * 1024]))
                .unwrap();
        }
        let mut c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        let mut sizes = Vec::new();
        while let Some(kvs) = c.next_chunk().unwrap() {
            sizes.push(kvs.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 10);
        // ~1 MiB per message: 4 values of 300 KiB reach the budget.
        assert!(sizes.iter().all(|n| *n <= 4), "{sizes:?}");
    }

    #[test]
    fn deadline_from_grpc_timeout() {
        let now = Instant::now();
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(deadline(&md, now), now + MAX_HOLD);
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(deadline(&md, now), now + Duration::from_millis(250));
        md.insert("grpc-timeout", "10M".parse().unwrap());
        assert_eq!(deadline(&md, now), now + MAX_HOLD);
    }

    #[tokio::test]
    async fn a_client_that_goes_away_stops_the_reader_and_frees_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        for i in 0..5000u32 {
            e.data.insert(format!("k{i:05}"), encode_value(1, b"v")).unwrap();
        }
        let open = Gauge::default();
        let c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        let mut s = stream(c, Instant::now() + Duration::from_secs(60), open.clone());
        assert!(s.next().await.unwrap().unwrap().kvs.len() == CHUNK_KEYS);
        assert_eq!(open.get(), 1);
        drop(s);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while open.get() != 0 {
            assert!(std::time::Instant::now() < until, "the reader kept running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn stream_ends_with_an_error_past_the_deadline_never_silently() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), crate::metrics::Metrics::new()).unwrap();
        for i in 0..2000u32 {
            e.data.insert(format!("k{i:05}"), encode_value(1, b"v")).unwrap();
        }
        // Complete: every key, then a clean end.
        let c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        let items: Vec<_> = stream(c, Instant::now() + Duration::from_secs(30), Gauge::default())
            .collect()
            .await;
        let n: usize = items.iter().map(|m| m.as_ref().map(|m| m.kvs.len()).unwrap()).sum();
        assert_eq!(n, 2000);
        // A client that stops reading past the deadline gets an error at the end, not a
        // clean (truncated) end.
        let c = ScanCursor::new(&e, e.db.snapshot(), b"".to_vec(), b"".to_vec(), 0);
        let mut s = stream(c, Instant::now() + Duration::from_millis(200), Gauge::default());
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.kvs.len(), CHUNK_KEYS);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut got = first.kvs.len();
        let mut last = None;
        while let Some(m) = s.next().await {
            match m {
                Ok(m) => got += m.kvs.len(),
                Err(st) => {
                    last = Some(st.code());
                    break;
                }
            }
        }
        assert!(got < 2000, "the slow client got everything: {got}");
        assert!(
            matches!(last, Some(tonic::Code::DeadlineExceeded | tonic::Code::Aborted)),
            "{last:?}"
        );
    }
}
