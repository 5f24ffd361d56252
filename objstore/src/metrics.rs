//! Object store metrics (prometheus-client), shared by every user of one [`crate::Objects`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: String,
}

#[derive(Clone)]
pub struct ObjMetrics {
    pub uploads: Counter,
    pub downloads: Counter,
    pub upload_bytes: Counter,
    pub download_bytes: Counter,
    pub failures: Family<OpLabel, Counter>,
    pub upload_seconds: Histogram,
}

impl Default for ObjMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ObjMetrics {
    pub fn new() -> Self {
        Self {
            uploads: Counter::default(),
            downloads: Counter::default(),
            upload_bytes: Counter::default(),
            download_bytes: Counter::default(),
            failures: Family::default(),
            upload_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
        }
    }

    /// The operations [`ObjMetrics::failed`] is called with; their series exist (at 0) from
    /// registration on, so a dashboard shows "no failures" rather than "no data".
    pub const OPS: [&'static str; 6] = ["upload", "download", "get", "put", "list", "delete"];

    pub fn register(&self, r: &mut Registry) {
        for op in Self::OPS {
            let _ = self.failures.get_or_create(&OpLabel { op: op.to_string() });
        }
        r.register(
            "skv_objstore_uploads",
            "Checkpoint objects uploaded",
            self.uploads.clone(),
        );
        r.register(
            "skv_objstore_downloads",
            "Checkpoint objects read completely",
            self.downloads.clone(),
        );
        r.register(
            "skv_objstore_upload_bytes",
            "Bytes uploaded to the object store",
            self.upload_bytes.clone(),
        );
        r.register(
            "skv_objstore_download_bytes",
            "Bytes downloaded from the object store",
            self.download_bytes.clone(),
        );
        r.register(
            "skv_objstore_failures",
            "Failed object store operations, by operation",
            self.failures.clone(),
        );
        r.register(
            "skv_objstore_upload_duration_seconds",
            "Time to upload one checkpoint object",
            self.upload_seconds.clone(),
        );
    }

    pub fn failed(&self, op: &str) {
        self.failures.get_or_create(&OpLabel { op: op.to_string() }).inc();
    }
}
