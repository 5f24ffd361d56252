//! # skv — the Rust client
//!
//! A client for [skv](https://example.invalid/skv), a distributed, ordered
//! key-value store. It talks gRPC (`skv.v1.Kv`) to one or more stateless
//! proxies, spreads calls over them, fails over when one is down and retries
//! what is safe to retry, with bounded exponential backoff and jitter.
//!
//! - [`Client`]: bytes in, bytes out: `get`, `put`, conditional puts,
//!   `delete`, `compare_and_swap`, `scan` (a stream in key order), `batch_get`,
//!   `batch_put`.
//! - [`TypedMap`]: a `BTreeMap`-like view of one key prefix with serde types
//!   (`client.map::<K, V>("prefix/")`), with keys encoded so that the store's
//!   byte order is the map's order.
//! - [`Error`]: typed errors with [`Error::is_retryable`], and a distinct
//!   [`Error::OutcomeUnknown`] for writes that may or may not have been applied.
//!
//! Consistency: every write is linearizable, and so is every read unless you
//! ask for a stale one ([`Client::get_stale`]). A scan is linearizable within
//! one range of the cluster, not across ranges.
//!
//! ```no_run
//! use futures::TryStreamExt;
//!
//! # async fn demo() -> skv::Result<()> {
//! let client = skv::Client::builder()
//!     .endpoints(["http://127.0.0.1:7400"])
//!     .token(std::env::var("SKV_TOKEN").unwrap_or_default())
//!     .connect()
//!     .await?;
//!
//! client.put("fruit/apple", "red").await?;
//! client.put("fruit/banana", "yellow").await?;
//! let apple = client.get("fruit/apple").await?;
//! assert_eq!(apple.map(|e| e.value), Some(b"red".to_vec()));
//!
//! let fruit: Vec<skv::KeyValue> = client.scan_prefix("fruit/").try_collect().await?;
//! assert_eq!(fruit.len(), 2);
//!
//! let scores = client.map::<String, u32>("scores/");
//! scores.insert(&"ada".to_string(), &42).await?;
//! assert_eq!(scores.get(&"ada".to_string()).await?, Some(42));
//! # Ok(()) }
//! ```
//!
//! The client needs a Tokio runtime.

#![warn(missing_docs)]

mod client;
mod error;
pub mod keycodec;
mod map;

pub use client::{CasOutcome, Client, ClientBuilder, Entry, KeyRange, KeyValue, ScanStream, WriteOp};
pub use error::{Error, OUTCOME_METADATA_KEY, OUTCOME_UNKNOWN, RETRY_AFTER_METADATA_KEY, Result};
pub use map::TypedMap;
