//! Shared pieces that are not a component: typed IDs, input limits, epoch
//! comparison, logging setup, the metrics/health HTTP server and the handle
//! of a running service. Keep this crate small: no decisions live here.

pub mod config;
pub mod failpoints;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod process_metrics;
pub mod service;
pub mod telemetry;

pub use ids::{RangeId, StoreId};
