//! The object store at skv's edge: opening it (one check at start), streamed checkpoint
//! uploads and reads, range manifests and retention.

use crate::format::{CheckpointEncoder, CheckpointHeader, CheckpointReader, DEFAULT_BLOCK_BYTES, FormatError, Summary};
use crate::manifest::{BackupObjects, CheckpointEntry, ManifestError, RangeManifest, orphans, plan_retention};
use crate::metrics::ObjMetrics;
use crate::url::{ObjectStoreUrl, UrlError};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncRead;
use tracing::Instrument;

/// Size of one multipart part (S3's minimum for every part but the last is 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Parts in flight at once during an upload (memory: about this many parts plus one block).
const PARTS_IN_FLIGHT: usize = 2;
/// Largest manifest read (a manifest lists a few checkpoints).
const MAX_MANIFEST_BYTES: usize = 16 << 20;
/// An unnamed checkpoint object younger than this may be an upload whose manifest write is
/// still to come; older ones are orphans and deleted.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// Why the object store could not be opened: one clear error at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("object store {url}: bad configuration: {source}")]
    Config { url: String, source: object_store::Error },
    #[error("object store {url}: AWS_ENDPOINT {endpoint} is plain http, which needs AWS_ALLOW_HTTP=true")]
    HttpNotAllowed { url: String, endpoint: String },
    #[error("object store {url}: directory {dir} does not exist (create it first)")]
    NoDirectory { url: String, dir: String },
    #[error("object store {url}: bucket or prefix not found: {source}")]
    NotFound { url: String, source: object_store::Error },
    #[error("object store {url}: access refused (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {source}")]
    Denied { url: String, source: object_store::Error },
    #[error("object store {url}: the start check (a list of the prefix) failed: {source}")]
    Check { url: String, source: object_store::Error },
}

/// Why an object store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error("object store {op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: object_store::Error,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest {path} is not valid: {reason}")]
    BadManifest { path: String, reason: String },
    #[error("checkpoint {path} does not match its manifest entry: {reason}")]
    Mismatch { path: String, reason: String },
    #[error("checkpoint producer failed: {0}")]
    Producer(String),
    /// Checkpoints and range manifests live under a cluster's prefix; this handle has none.
    #[error("no cluster id: checkpoints and range manifests are scoped by cluster (Objects::for_cluster)")]
    NoCluster,
    #[error("cluster id {0:?} is not valid (1 to 64 of [0-9A-Za-z_-])")]
    BadClusterId(String),
    /// A range manifest under this cluster's prefix names another cluster.
    #[error("manifest {path} belongs to cluster {found:?}, not {own:?}")]
    OtherCluster { path: String, own: String, found: String },
}

fn store_err(op: &'static str, path: &Path) -> impl FnOnce(object_store::Error) -> ObjError + use<> {
    let path = path.to_string();
    move |source| ObjError::Store { op, path, source }
}

enum Refusal {
    NotFound,
    Denied,
    Other,
}

/// What a failed request means. object_store reports most S3 answers as `Generic` with the
/// status and the S3 error code in its text (its status type is private), so the text of
/// the error chain is read.
fn classify(e: &object_store::Error) -> Refusal {
    match e {
        object_store::Error::NotFound { .. } => return Refusal::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            return Refusal::Denied;
        }
        _ => {}
    }
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(&s.to_string());
        src = s.source();
    }
    if ["NoSuchBucket", "404 Not Found"].iter().any(|m| text.contains(m)) {
        Refusal::NotFound
    } else if [
        "403 Forbidden",
        "401 Unauthorized",
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
    ]
    .iter()
    .any(|m| text.contains(m))
    {
        Refusal::Denied
    } else {
        Refusal::Other
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where one cluster's checkpoints and range manifests live, relative to the prefix. Range
/// ids restart at 1 in every cluster, so two clusters on one URL (a cluster restored from a
/// backup next to the one it was taken from) must never share these paths (ADR 0025).
pub fn cluster_prefix(cluster_id: &str) -> String {
    format!("clusters/{cluster_id}")
}

/// Whether `id` can name a cluster's prefix (placement's ids are 32 lowercase hex chars).
pub fn valid_cluster_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Object path of a checkpoint, relative to the prefix: generation and index zero-padded so
/// that names sort by number.
pub fn checkpoint_path(cluster_id: &str, range_id: u64, generation: u64, applied_index: u64) -> String {
    format!(
        "{}/snapshots/{range_id:020}/{generation:020}/{applied_index:020}.snap",
        cluster_prefix(cluster_id)
    )
}

pub fn range_snapshots_prefix(cluster_id: &str, range_id: u64) -> String {
    format!("{}/snapshots/{range_id:020}", cluster_prefix(cluster_id))
}

pub fn manifest_path(cluster_id: &str, range_id: u64) -> String {
    format!("{}/manifests/ranges/{range_id:020}.json", cluster_prefix(cluster_id))
}

pub const BACKUPS_PREFIX: &str = "backups";

/// An opened object store: the backend, the key prefix and the metrics.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: ObjectStoreUrl,
    pub metrics: ObjMetrics,
    block_bytes: usize,
    /// The cluster whose checkpoints and range manifests this handle reads and writes
    /// (`clusters/<id>/...`); `None`: backups only.
    cluster: Option<Arc<str>>,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Objects({})", self.url)
    }
}

/// Retries of one request: few and short, so that an unreachable store fails a checkpoint
/// (retried at the next interval) instead of stalling it for minutes.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
    }
}

impl Objects {
    /// Opens `url`, reading the `AWS_*` variables of the process for s3 (as
    /// `AmazonS3Builder::from_env` does), and checks it with one list of the prefix.
    pub async fn open(url: &ObjectStoreUrl, metrics: ObjMetrics) -> Result<Self, OpenError> {
        Self::open_with_vars(url, std::env::vars(), metrics).await
    }

    /// [`Self::open`] with the `AWS_*` variables given (tests; several stores in one process).
    pub async fn open_with_vars(
        url: &ObjectStoreUrl,
        vars: impl IntoIterator<Item = (String, String)>,
        metrics: ObjMetrics,
    ) -> Result<Self, OpenError> {
        let u = url.to_string();
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match url {
            ObjectStoreUrl::S3 { bucket, prefix } => {
                let vars: Vec<(String, String)> = vars.into_iter().collect();
                let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                let allow_http = var("AWS_ALLOW_HTTP")
                    .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes" | "on"));
                let endpoint = var("AWS_ENDPOINT").or(var("AWS_ENDPOINT_URL")).unwrap_or_default();
                if endpoint.starts_with("http://") && !allow_http {
                    return Err(OpenError::HttpNotAllowed {
                        url: u,
                        endpoint: endpoint.to_string(),
                    });
                }
                let mut b = AmazonS3Builder::new();
                for (k, v) in vars {
                    if k.starts_with("AWS_")
                        && let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
                    {
                        b = b.with_config(key, v);
                    }
                }
                let s3 = b
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false)
                    .with_retry(retry_config())
                    .build()
                    .map_err(|source| OpenError::Config { url: u.clone(), source })?;
                (Arc::new(s3), prefix.clone())
            }
            ObjectStoreUrl::File { root } => {
                if !root.is_dir() {
                    return Err(OpenError::NoDirectory {
                        url: u,
                        dir: root.display().to_string(),
                    });
                }
                let fs = LocalFileSystem::new_with_prefix(root)
                    .map_err(|source| OpenError::Config { url: u.clone(), source })?;
                (Arc::new(fs), String::new())
            }
        };
        let objects = Self {
            store,
            prefix,
            url: url.clone(),
            metrics,
            block_bytes: DEFAULT_BLOCK_BYTES,
            cluster: None,
        };
        let p = objects.full(BACKUPS_PREFIX);
        if let Err(source) = objects.store.list_with_delimiter(Some(&p)).await {
            return Err(match classify(&source) {
                Refusal::NotFound => OpenError::NotFound { url: u, source },
                Refusal::Denied => OpenError::Denied { url: u, source },
                Refusal::Other => OpenError::Check { url: u, source },
            });
        }
        Ok(objects)
    }

    pub fn url(&self) -> &ObjectStoreUrl {
        &self.url
    }

    /// This store scoped to one cluster's checkpoints and range manifests (same backend,
    /// metrics and backups).
    pub fn for_cluster(&self, cluster_id: &str) -> Result<Self, ObjError> {
        if !valid_cluster_id(cluster_id) {
            return Err(ObjError::BadClusterId(cluster_id.to_string()));
        }
        let mut o = self.clone();
        o.cluster = Some(Arc::from(cluster_id));
        Ok(o)
    }

    /// The cluster this handle is scoped to ([`Self::for_cluster`]).
    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    fn scope(&self) -> Result<&str, ObjError> {
        self.cluster.as_deref().ok_or(ObjError::NoCluster)
    }

    /// Blocks close at this many uncompressed bytes (tests use small blocks).
    pub fn with_block_bytes(mut self, n: usize) -> Self {
        self.block_bytes = n;
        self
    }

    pub(crate) fn full(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn relative(&self, p: &Path) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(s).to_string()
        }
    }

    /// Every object under `rel` (relative paths, size, last modified ms), sorted by path.
    pub async fn list(&self, rel: &str) -> Result<Vec<(String, u64, u64)>, ObjError> {
        let p = self.full(rel);
        let mut out: Vec<(String, u64, u64)> = self
            .store
            .list(Some(&p))
            .map_ok(|m| {
                (
                    self.relative(&m.location),
                    m.size,
                    m.last_modified.timestamp_millis().max(0) as u64,
                )
            })
            .try_collect()
            .await
            .map_err(store_err("list", &p))
            .inspect_err(|_| self.metrics.failed("list"))?;
        out.sort();
        Ok(out)
    }

    /// Uploads one checkpoint. `produce` runs on the blocking pool and pushes the range's
    /// entries in key order into the sink; blocks stream to the store as they fill
    /// (multipart once past one part), so memory stays bounded by a few parts. The object
    /// is not visible to readers until [`Self::commit_checkpoint`] names it in the manifest.
    pub async fn upload_checkpoint<F>(&self, header: CheckpointHeader, produce: F) -> Result<CheckpointEntry, ObjError>
    where
        F: FnOnce(&mut EntrySink) -> Result<(), String> + Send + 'static,
    {
        let rel = checkpoint_path(self.scope()?, header.range_id, header.generation, header.applied_index);
        let span = tracing::info_span!("checkpoint_upload", range_id = header.range_id, path = %rel);
        let started = Instant::now();
        let res = self
            .upload_inner(header.clone(), &rel, produce)
            .instrument(span.clone())
            .await;
        match &res {
            Ok(e) => {
                self.metrics.uploads.inc();
                self.metrics.upload_seconds.observe(started.elapsed().as_secs_f64());
                span.in_scope(|| {
                    tracing::info!(
                        bytes = e.size,
                        keys = e.key_count,
                        ms = started.elapsed().as_millis() as u64,
                        "checkpoint uploaded"
                    )
                });
            }
            Err(err) => {
                self.metrics.failed("upload");
                span.in_scope(|| tracing::warn!(error = %err, "checkpoint upload failed"));
            }
        }
        res
    }

    pub(crate) async fn upload_inner<F>(
        &self,
        header: CheckpointHeader,
        rel: &str,
        produce: F,
    ) -> Result<CheckpointEntry, ObjError>
    where
        F: FnOnce(&mut EntrySink) -> Result<(), String> + Send + 'static,
    {
        let path = self.full(rel);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let block_bytes = self.block_bytes;
        let hdr = header.clone();
        let producer = tokio::task::spawn_blocking(move || -> Result<Summary, ObjError> {
            let (enc, first) = CheckpointEncoder::new(&hdr, block_bytes)?;
            let mut sink = EntrySink { enc: Some(enc), tx };
            sink.send(first)?;
            produce(&mut sink).map_err(ObjError::Producer)?;
            let enc = sink
                .enc
                .take()
                .ok_or_else(|| ObjError::Producer("sink already finished".into()))?;
            let (rest, summary) = enc.finish();
            sink.send(rest)?;
            Ok(summary)
        });

        let mut pending: Vec<u8> = Vec::new();
        // Aborts the multipart upload if this future is dropped before it completes (a
        // cancelled checkpoint pass, a shutdown): S3 would otherwise keep the parts.
        let mut multipart = AbortOnDrop(None);
        let mut sent: u64 = 0;
        let outcome: Result<(), ObjError> = async {
            while let Some(frame) = rx.recv().await {
                sent += frame.len() as u64;
                match multipart.0.as_mut() {
                    Some(w) => {
                        w.wait_for_capacity(PARTS_IN_FLIGHT)
                            .await
                            .map_err(store_err("upload part", &path))?;
                        w.write(&frame);
                    }
                    None => {
                        pending.extend_from_slice(&frame);
                        if pending.len() >= PART_BYTES {
                            let up = start_multipart(&self.store, &path)
                                .await
                                .map_err(store_err("start multipart", &path))?;
                            let mut w = WriteMultipart::new_with_chunk_size(up, PART_BYTES);
                            w.write(&std::mem::take(&mut pending));
                            multipart.0 = Some(w);
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        // Closing the channel stops a producer still pushing after an upload error (it
        // would wait on a full channel forever otherwise); then it ends.
        drop(rx);
        let produced = match producer.await {
            Ok(r) => r,
            Err(e) => Err(ObjError::Producer(format!("producer task: {e}"))),
        };
        let summary = match (outcome, produced) {
            (Ok(()), Ok(s)) => s,
            (Err(e), _) | (Ok(()), Err(e)) => {
                if let Some(w) = multipart.0.take() {
                    let _ = w.abort().await;
                }
                return Err(e);
            }
        };
        // `finish` aborts the upload itself when completing it fails.
        match multipart.0.take() {
            Some(w) => {
                w.finish().await.map_err(store_err("complete multipart", &path))?;
            }
            None => {
                self.store
                    .put(&path, PutPayload::from(pending))
                    .await
                    .map_err(store_err("put", &path))?;
            }
        }
        self.metrics.upload_bytes.inc_by(sent);
        Ok(CheckpointEntry {
            path: rel.to_string(),
            range_id: header.range_id,
            generation: header.generation,
            conf_ver: header.conf_ver,
            epoch_version: header.epoch_version,
            applied_index: header.applied_index,
            applied_term: header.applied_term,
            start_hex: hex(&header.start),
            end_hex: hex(&header.end),
            size: summary.size,
            key_count: summary.entries,
            checksum: format!("{:016x}", summary.checksum),
            created_unix_ms: header.created_unix_ms,
        })
    }

    /// The manifest of `range_id` in this handle's cluster, if one was written. A manifest
    /// that names another cluster is refused ([`ObjError::OtherCluster`]).
    pub async fn read_manifest(&self, range_id: u64) -> Result<Option<RangeManifest>, ObjError> {
        let cluster = self.scope()?;
        let rel = manifest_path(cluster, range_id);
        let Some(bytes) = self.get_small(&rel).await? else {
            return Ok(None);
        };
        let m: RangeManifest = serde_json::from_slice(&bytes).map_err(|e| ObjError::BadManifest {
            path: rel.clone(),
            reason: e.to_string(),
        })?;
        if m.range_id != range_id || m.format != crate::manifest::MANIFEST_FORMAT {
            return Err(ObjError::BadManifest {
                path: rel,
                reason: format!("range {} format {}", m.range_id, m.format),
            });
        }
        if !m.cluster_id.is_empty() && m.cluster_id != cluster {
            return Err(ObjError::OtherCluster {
                path: rel,
                own: cluster.to_string(),
                found: m.cluster_id,
            });
        }
        Ok(Some(m))
    }

    pub(crate) async fn get_small(&self, rel: &str) -> Result<Option<Vec<u8>>, ObjError> {
        let p = self.full(rel);
        let res = match self.store.get(&p).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                self.metrics.failed("get");
                return Err(store_err("get", &p)(e));
            }
        };
        if res.meta.size as usize > MAX_MANIFEST_BYTES {
            return Err(ObjError::BadManifest {
                path: rel.to_string(),
                reason: format!("{} bytes", res.meta.size),
            });
        }
        let b = res.bytes().await.map_err(store_err("get", &p))?;
        self.metrics.download_bytes.inc_by(b.len() as u64);
        Ok(Some(b.to_vec()))
    }

    pub(crate) async fn put_json<T: serde::Serialize>(&self, rel: &str, v: &T) -> Result<(), ObjError> {
        let p = self.full(rel);
        let body = serde_json::to_vec_pretty(v).map_err(|e| ObjError::BadManifest {
            path: rel.to_string(),
            reason: e.to_string(),
        })?;
        let n = body.len() as u64;
        self.store
            .put(&p, PutPayload::from(body))
            .await
            .map_err(store_err("put", &p))
            .inspect_err(|_| self.metrics.failed("put"))?;
        self.metrics.upload_bytes.inc_by(n);
        Ok(())
    }

    /// Objects the backup manifests name (`backups/<id>/manifest.json`): never deleted by
    /// retention.
    pub async fn pinned_by_backups(&self) -> Result<BTreeSet<String>, ObjError> {
        let mut pinned = BTreeSet::new();
        for (rel, _, _) in self.list(BACKUPS_PREFIX).await? {
            if !rel.ends_with("/manifest.json") {
                continue;
            }
            let Some(bytes) = self.get_small(&rel).await? else {
                continue;
            };
            let b: BackupObjects = serde_json::from_slice(&bytes).map_err(|e| ObjError::BadManifest {
                path: rel.clone(),
                reason: e.to_string(),
            })?;
            pinned.extend(b.objects);
        }
        Ok(pinned)
    }

    /// Makes an uploaded checkpoint visible: adds it to its range's manifest (refused if a
    /// newer generation wrote the manifest: the object is deleted then), then applies
    /// retention: the manifest without the covered checkpoints is written first, their
    /// objects deleted after (keeping the newest `keep` and those a backup names), and
    /// orphans older than [`ORPHAN_GRACE`] are swept. Returns the manifest written and the
    /// objects deleted.
    pub async fn commit_checkpoint(
        &self,
        entry: CheckpointEntry,
        keep: usize,
    ) -> Result<(RangeManifest, Vec<String>), ObjError> {
        let cluster = self.scope()?;
        let range = entry.range_id;
        let mut m = self
            .read_manifest(range)
            .await?
            .unwrap_or_else(|| RangeManifest::new(range));
        m.cluster_id = cluster.to_string();
        let path = entry.path.clone();
        if let Err(e) = m.add(entry) {
            let _ = self.delete(&path).await;
            return Err(e.into());
        }
        let pinned = self.pinned_by_backups().await?;
        let plan = plan_retention(&m, &pinned, keep);
        self.put_json(&manifest_path(cluster, range), &plan.manifest).await?;
        // Only this cluster's objects: another cluster's on the same URL are never swept.
        let listed: Vec<(String, u64)> = self
            .list(&range_snapshots_prefix(cluster, range))
            .await?
            .into_iter()
            .map(|(p, _, t)| (p, t))
            .collect();
        let mut gone = plan.delete.clone();
        gone.extend(orphans(
            &listed,
            &plan.manifest,
            &pinned,
            now_ms(),
            ORPHAN_GRACE.as_millis() as u64,
        ));
        gone.sort();
        gone.dedup();
        for p in &gone {
            self.delete(p).await?;
        }
        Ok((plan.manifest, gone))
    }

    /// Deletes one object (absent is fine).
    pub async fn delete(&self, rel: &str) -> Result<(), ObjError> {
        let p = self.full(rel);
        match self.store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => {
                self.metrics.failed("delete");
                Err(store_err("delete", &p)(e))
            }
        }
    }

    /// Opens a checkpoint object for streaming: the reader checks every block as it reads.
    pub async fn open_checkpoint(
        &self,
        rel: &str,
    ) -> Result<CheckpointReader<impl AsyncRead + Unpin + use<>>, ObjError> {
        let p = self.full(rel);
        let res = self
            .store
            .get(&p)
            .await
            .map_err(store_err("get", &p))
            .inspect_err(|_| self.metrics.failed("download"))?;
        let counter = self.metrics.download_bytes.clone();
        let stream = res
            .into_stream()
            .inspect(move |r| {
                if let Ok(b) = r {
                    counter.inc_by(b.len() as u64);
                }
            })
            .map_err(std::io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        CheckpointReader::open(reader)
            .await
            .inspect_err(|_| self.metrics.failed("download"))
            .map_err(ObjError::from)
    }

    /// Reads a whole checkpoint named by `entry`, handing each checked block to `each`,
    /// and checks it against the entry (size, key count, checksum). `each` must treat what
    /// it got as provisional until this returns `Ok`.
    pub async fn read_checkpoint(
        &self,
        entry: &CheckpointEntry,
        each: impl FnMut(Vec<crate::format::Entry>) -> Result<(), String>,
    ) -> Result<Summary, ObjError> {
        self.read_checkpoint_with_header(entry, |_| Ok(()), each).await
    }

    /// [`Self::read_checkpoint`], handing the checked header to `on_header` before the first
    /// block (a bootstrap checks the descriptor and applied state it carries, and refuses the
    /// checkpoint before writing anything when they do not fit).
    pub async fn read_checkpoint_with_header(
        &self,
        entry: &CheckpointEntry,
        on_header: impl FnOnce(&CheckpointHeader) -> Result<(), String>,
        mut each: impl FnMut(Vec<crate::format::Entry>) -> Result<(), String>,
    ) -> Result<Summary, ObjError> {
        let res: Result<Summary, ObjError> = async {
            let mut r = self.open_checkpoint(&entry.path).await?;
            let h = r.header();
            if (h.range_id, h.generation, h.applied_index) != (entry.range_id, entry.generation, entry.applied_index) {
                return Err(ObjError::Mismatch {
                    path: entry.path.clone(),
                    reason: "header names another checkpoint".into(),
                });
            }
            on_header(h).map_err(|reason| ObjError::Mismatch {
                path: entry.path.clone(),
                reason,
            })?;
            while let Some(block) = r.next_block().await? {
                each(block).map_err(ObjError::Producer)?;
            }
            let s = r.summary();
            if format!("{:016x}", s.checksum) != entry.checksum || s.size != entry.size || s.entries != entry.key_count
            {
                return Err(ObjError::Mismatch {
                    path: entry.path.clone(),
                    reason: format!(
                        "read {} bytes, {} keys, checksum {:016x}; manifest says {}, {}, {}",
                        s.size, s.entries, s.checksum, entry.size, entry.key_count, entry.checksum
                    ),
                });
            }
            Ok(s)
        }
        .await;
        match &res {
            Ok(_) => {
                self.metrics.downloads.inc();
            }
            Err(_) => self.metrics.failed("download"),
        }
        res
    }
}

/// Starts a multipart upload in a task of its own, so that dropping the caller while the
/// create request is in flight cannot leak the upload: the server may have created it
/// before the caller learns its id. The upload travels to the caller inside a guard that
/// aborts it when dropped, in the channel or undelivered, before the caller takes it.
async fn start_multipart(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (store, path) = (store.clone(), path.clone());
    tokio::spawn(async move {
        let _ = tx.send(store.put_multipart(&path).await.map(|up| UploadGuard(Some(up))));
    });
    let mut guard = rx.await.map_err(|_| object_store::Error::Generic {
        store: "skv",
        source: "the task starting the multipart upload ended without an answer".into(),
    })??;
    guard.0.take().ok_or_else(|| object_store::Error::Generic {
        store: "skv",
        source: "a multipart upload handed over twice".into(),
    })
}

/// A started multipart upload not yet in a [`WriteMultipart`]; aborted in the background
/// if dropped.
struct UploadGuard(Option<Box<dyn object_store::MultipartUpload>>);

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let Some(mut up) = self.0.take() else { return };
        spawn_abort(async move { up.abort().await });
    }
}

/// Runs an upload's abort in the background (a drop cannot wait for it).
fn spawn_abort(abort: impl std::future::Future<Output = object_store::Result<()>> + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(async move {
                if let Err(e) = abort.await {
                    tracing::warn!(error = %e, "aborting a dropped multipart upload failed");
                }
            });
        }
        Err(_) => tracing::warn!("a multipart upload was dropped outside a runtime; its parts stay"),
    }
}

/// A multipart upload in progress; aborted in the background if dropped unfinished.
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            spawn_abort(w.abort());
        }
    }
}

/// Where a checkpoint producer pushes entries (on the blocking pool).
pub struct EntrySink {
    enc: Option<CheckpointEncoder>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl EntrySink {
    fn send(&self, frame: Vec<u8>) -> Result<(), ObjError> {
        if frame.is_empty() {
            return Ok(());
        }
        self.tx
            .blocking_send(frame)
            .map_err(|_| ObjError::Producer("the upload stopped".into()))
    }

    /// Adds one entry (keys ascending); blocks while the upload is behind.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let enc = self.enc.as_mut().ok_or("sink finished")?;
        if let Some(frame) = enc.push(key, value).map_err(|e| e.to_string())? {
            self.send(frame).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}
