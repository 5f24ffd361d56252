//! Tenant quotas (ADR 0019): requests per second (a token bucket with a burst) and
//! requests in flight, per namespace, so that one tenant cannot starve another.
//!
//! Each namespace gets its own state behind an `Arc` in a sharded map: the hot path
//! takes a shard's read lock to find it, then only that tenant's own small lock (the
//! bucket) and an atomic semaphore. No lock is shared by all tenants. A refusal is
//! RESOURCE_EXHAUSTED with `retry-after-ms` metadata (how long until the bucket holds a
//! token again), counted in `skv_proxy_tenant_refusals_total{namespace,reason}`, and
//! logged at most once a second per tenant.
//!
//! The limits hold per proxy instance: with N proxies a tenant can get N times them.

use dashmap::DashMap;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Metadata key of the retry hint on a RESOURCE_EXHAUSTED answer, in milliseconds.
pub const RETRY_AFTER_METADATA_KEY: &str = "retry-after-ms";
/// Retry hint of a concurrency refusal: a slot frees when any request of the tenant ends.
pub const CONCURRENCY_RETRY_HINT: Duration = Duration::from_millis(20);
/// Namespaces that get their own metric label besides those of the config file; the
/// others share the label [`OTHER_LABEL`], so the series count stays bounded.
pub const MAX_LABELED_NAMESPACES: usize = 100;
/// The metric label of namespaces past [`MAX_LABELED_NAMESPACES`].
pub const OTHER_LABEL: &str = "_other";
/// Tenants kept in memory before idle ones are forgotten.
const MAX_TENANTS: usize = 100_000;
/// At most one log line per tenant this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The limits of one namespace. 0 means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantLimits {
    /// Requests per second (refill of the bucket).
    pub rate: u32,
    /// Bucket size: requests that may arrive at once after a quiet spell (0 = `rate`).
    pub burst: u32,
    /// Requests in flight.
    pub max_concurrency: usize,
}

impl TenantLimits {
    fn burst(&self) -> u32 {
        if self.burst == 0 { self.rate } else { self.burst }
    }
}

/// A `[tenants.<namespace>]` table of the proxy's config file: each field overrides the
/// matching flag (`--tenant-rate-limit`, `--tenant-rate-burst`, `--tenant-max-concurrency`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantOverride {
    pub rate_limit: Option<u32>,
    pub rate_burst: Option<u32>,
    pub max_concurrency: Option<usize>,
}

impl TenantOverride {
    fn apply(&self, base: TenantLimits) -> TenantLimits {
        TenantLimits {
            rate: self.rate_limit.unwrap_or(base.rate),
            burst: self.rate_burst.unwrap_or(base.burst),
            max_concurrency: self.max_concurrency.unwrap_or(base.max_concurrency),
        }
    }
}

/// Reads the `[tenants.<namespace>]` tables of a proxy config file (other keys are flags,
/// handled by `skv_common::config`).
pub fn load_overrides(path: &Path) -> anyhow::Result<BTreeMap<String, TenantOverride>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    parse_overrides(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// [`load_overrides`] on the file's text.
pub fn parse_overrides(text: &str) -> anyhow::Result<BTreeMap<String, TenantOverride>> {
    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        tenants: BTreeMap<String, TenantOverride>,
    }
    let table: toml::Table = text.parse()?;
    let Some(tenants) = table.get("tenants") else {
        return Ok(BTreeMap::new());
    };
    let mut only = toml::Table::new();
    only.insert("tenants".into(), tenants.clone());
    let file: File = only.try_into()?;
    for ns in file.tenants.keys() {
        anyhow::ensure!(
            !ns.is_empty() && ns.len() <= skv_common::keys::MAX_NAMESPACE_LEN,
            "[tenants.{ns:?}]: a namespace is 1 to {} bytes",
            skv_common::keys::MAX_NAMESPACE_LEN
        );
    }
    Ok(file.tenants)
}

/// A token bucket. Pure: the caller passes the time.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst.max(1)));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "namespace over its rate limit ({limit} requests/s); retry in {} ms",
        retry_after.as_millis().max(1)
    )]
    Rate { limit: u32, retry_after: Duration },
    #[error("too many concurrent requests for this namespace (limit {limit})")]
    Concurrency { limit: usize },
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Rate { .. } => "rate",
            Refusal::Concurrency { .. } => "concurrency",
        }
    }

    /// How long the client should wait before trying again.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::Rate { retry_after, .. } => *retry_after,
            Refusal::Concurrency { .. } => CONCURRENCY_RETRY_HINT,
        }
    }

    /// RESOURCE_EXHAUSTED with the `retry-after-ms` metadata (at least 1 ms).
    pub fn to_status(&self) -> tonic::Status {
        let mut s = tonic::Status::resource_exhausted(self.to_string());
        let ms = self.retry_after().as_millis().clamp(1, u128::from(u32::MAX));
        if let Ok(v) = ms.to_string().parse() {
            s.metadata_mut().insert(RETRY_AFTER_METADATA_KEY, v);
        }
        s
    }
}

/// A request's concurrency slot; released when dropped.
#[must_use]
pub struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
}

struct TenantState {
    limits: TenantLimits,
    bucket: Mutex<Bucket>,
    slots: Option<Arc<Semaphore>>,
    refused_rate: Counter,
    refused_concurrency: Counter,
    /// Last log line (ms since `Quotas::epoch`), and refusals since.
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

impl TenantState {
    fn idle(&self) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|s| s.available_permits() == self.limits.max_concurrency)
    }
}

/// The quotas of every tenant of this proxy.
pub struct Quotas {
    defaults: TenantLimits,
    overrides: BTreeMap<String, TenantOverride>,
    tenants: DashMap<Box<str>, Arc<TenantState>>,
    /// Namespaces with their own metric label (cold path: new tenants only).
    labeled: Mutex<HashSet<String>>,
    refusals: crate::metrics::Metrics,
    epoch: Instant,
}

impl Quotas {
    pub fn new(
        defaults: TenantLimits,
        overrides: BTreeMap<String, TenantOverride>,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Quotas {
            defaults,
            overrides,
            tenants: DashMap::new(),
            labeled: Mutex::new(HashSet::new()),
            refusals: metrics,
            epoch: Instant::now(),
        }
    }

    /// The limits that apply to `ns`.
    pub fn limits(&self, ns: &str) -> TenantLimits {
        match self.overrides.get(ns) {
            Some(o) => o.apply(self.defaults),
            None => self.defaults,
        }
    }

    fn label(&self, ns: &str) -> String {
        if self.overrides.contains_key(ns) {
            return ns.to_string();
        }
        let mut labeled = self.labeled.lock();
        if labeled.contains(ns) {
            return ns.to_string();
        }
        if labeled.len() < MAX_LABELED_NAMESPACES {
            labeled.insert(ns.to_string());
            return ns.to_string();
        }
        OTHER_LABEL.to_string()
    }

    fn state(&self, ns: &str) -> Arc<TenantState> {
        if let Some(s) = self.tenants.get(ns) {
            return s.clone();
        }
        if self.tenants.len() >= MAX_TENANTS {
            // Forget idle tenants so the map cannot grow without bound.
            self.tenants.retain(|_, s| Arc::strong_count(s) > 1 || !s.idle());
        }
        self.tenants
            .entry(ns.into())
            .or_insert_with(|| {
                let limits = self.limits(ns);
                let label = self.label(ns);
                Arc::new(TenantState {
                    limits,
                    bucket: Mutex::new(Bucket::new(limits.burst(), Instant::now())),
                    slots: (limits.max_concurrency > 0).then(|| Arc::new(Semaphore::new(limits.max_concurrency))),
                    refused_rate: self.refusals.tenant_refusals(label.clone(), "rate"),
                    refused_concurrency: self.refusals.tenant_refusals(label, "concurrency"),
                    last_log_ms: AtomicU64::new(u64::MAX),
                    unlogged: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Admits one request of `ns` or refuses it. The permit holds a concurrency slot.
    pub fn admit(&self, ns: &str) -> Result<Permit, Refusal> {
        let t = self.state(ns);
        let now = Instant::now();
        // The concurrency slot first: a request refused for concurrency must not spend a
        // rate token (a slot taken here is released if the rate then refuses).
        let slot = match &t.slots {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let r = Refusal::Concurrency {
                        limit: t.limits.max_concurrency,
                    };
                    t.refused_concurrency.inc();
                    self.log(ns, &t, &r, now);
                    return Err(r);
                }
            },
        };
        if t.limits.rate > 0 {
            let taken = t.bucket.lock().take(t.limits.rate, t.limits.burst(), now);
            if let Err(retry_after) = taken {
                let r = Refusal::Rate {
                    limit: t.limits.rate,
                    retry_after,
                };
                t.refused_rate.inc();
                self.log(ns, &t, &r, now);
                return Err(r);
            }
        }
        Ok(Permit { _slot: slot })
    }

    /// One log line per tenant per [`LOG_EVERY`], with the count of refusals since the last.
    fn log(&self, ns: &str, t: &TenantState, r: &Refusal, now: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1);
        let last = t.last_log_ms.load(Ordering::Relaxed);
        let due = last == u64::MAX || now_ms.saturating_sub(last) >= LOG_EVERY.as_millis() as u64;
        if due
            && t.last_log_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let since = t.unlogged.swap(0, Ordering::Relaxed);
            tracing::info!(
                tenant = ns,
                reason = r.reason(),
                rate_limit = t.limits.rate,
                max_concurrency = t.limits.max_concurrency,
                retry_after_ms = r.retry_after().as_millis() as u64,
                refused_since_last_log = since + 1,
                "tenant quota refused requests"
            );
        } else {
            t.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate: u32, burst: u32, max_concurrency: usize) -> TenantLimits {
        TenantLimits {
            rate,
            burst,
            max_concurrency,
        }
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(5, t0);
        for _ in 0..5 {
            assert!(b.take(10, 5, t0).is_ok());
        }
        let wait = b.take(10, 5, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(10, 5, t1).is_ok());
        assert!(b.take(10, 5, t1).is_err());
        // A long pause refills up to the burst, never more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert!(b.take(10, 5, t2).is_ok());
        }
        assert!(b.take(10, 5, t2).is_err());
    }

    #[test]
    fn bucket_half_token_hint() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1, t0);
        assert!(b.take(2, 1, t0).is_ok());
        let t1 = t0 + Duration::from_millis(250);
        let wait = b.take(2, 1, t1).unwrap_err();
        assert!((wait.as_secs_f64() - 0.25).abs() < 1e-6, "{wait:?}");
    }

    #[tokio::test]
    async fn tenants_are_limited_separately() {
        let mut o = BTreeMap::new();
        o.insert(
            "small".to_string(),
            TenantOverride {
                rate_limit: Some(2),
                rate_burst: Some(2),
                max_concurrency: None,
            },
        );
        let q = Quotas::new(limits(0, 0, 2), o, crate::metrics::Metrics::unregistered());
        assert_eq!(q.limits("small"), limits(2, 2, 2));
        assert_eq!(q.limits("big"), limits(0, 0, 2));
        // Rate: two pass, the third is refused with a hint.
        let _a = q.admit("small").unwrap();
        drop(q.admit("small").unwrap());
        let r = q.admit("small").err().unwrap();
        assert!(matches!(r, Refusal::Rate { limit: 2, .. }), "{r:?}");
        let s = r.to_status();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let ms: u64 = s
            .metadata()
            .get(RETRY_AFTER_METADATA_KEY)
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=500).contains(&ms), "{ms}");
        // Concurrency: two in flight, the third refused, freed on drop.
        let p1 = q.admit("big").unwrap();
        let _p2 = q.admit("big").unwrap();
        let r = q.admit("big").err().unwrap();
        assert_eq!(r, Refusal::Concurrency { limit: 2 });
        assert_eq!(r.retry_after(), CONCURRENCY_RETRY_HINT);
        drop(p1);
        assert!(q.admit("big").is_ok());
        // Unlimited.
        let q = Quotas::new(
            limits(0, 0, 0),
            BTreeMap::new(),
            crate::metrics::Metrics::unregistered(),
        );
        let held: Vec<Permit> = (0..10_000).map(|_| q.admit("x").unwrap()).collect();
        assert_eq!(held.len(), 10_000);
    }

    #[tokio::test]
    async fn a_concurrency_refusal_spends_no_rate_token() {
        // Burst 2, one slot: the second request in flight is refused for concurrency; once
        // the slot is free, a rate token is still left for the next one.
        let q = Quotas::new(
            limits(1, 2, 1),
            BTreeMap::new(),
            crate::metrics::Metrics::unregistered(),
        );
        let p = q.admit("t").unwrap();
        for _ in 0..5 {
            assert_eq!(q.admit("t").err(), Some(Refusal::Concurrency { limit: 1 }));
        }
        drop(p);
        assert!(q.admit("t").is_ok(), "the concurrency refusals spent the burst");
    }

    #[test]
    fn labels_are_bounded() {
        let mut o = BTreeMap::new();
        o.insert("configured".to_string(), TenantOverride::default());
        let q = Quotas::new(limits(0, 0, 0), o, crate::metrics::Metrics::unregistered());
        for i in 0..MAX_LABELED_NAMESPACES {
            assert_eq!(q.label(&format!("t{i}")), format!("t{i}"));
        }
        assert_eq!(q.label("late"), OTHER_LABEL);
        assert_eq!(q.label("t0"), "t0");
        assert_eq!(q.label("configured"), "configured");
    }

    #[test]
    fn overrides_parse() {
        let o = parse_overrides(
            r#"
tenant-rate-limit = 100
[tenants.acme]
rate-limit = 5
rate-burst = 10
[tenants."with space"]
max-concurrency = 3
"#,
        )
        .unwrap();
        assert_eq!(
            o["acme"],
            TenantOverride {
                rate_limit: Some(5),
                rate_burst: Some(10),
                max_concurrency: None
            }
        );
        assert_eq!(o["with space"].max_concurrency, Some(3));
        assert!(parse_overrides("listen = \"x\"").unwrap().is_empty());
        assert!(parse_overrides("[tenants.a]\nrate = 5\n").is_err(), "unknown field");
        assert!(parse_overrides("[tenants.a]\nrate-limit = -1\n").is_err());
        assert!(parse_overrides("[tenants.\"\"]\nrate-limit = 1\n").is_err());
    }
}
