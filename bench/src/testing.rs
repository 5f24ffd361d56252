//! An in-memory driver for tests of the loop (no network).

use crate::driver::{Driver, DriverError, DriverResult, ErrorKind};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A sorted map behind a lock; each call sleeps `delay` (tokio time), and every
/// `fail_every`-th call fails as `Unavailable`.
#[derive(Default)]
pub struct MemDriver {
    pub map: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    pub delay: Duration,
    pub fail_every: Option<u64>,
    pub calls: AtomicU64,
}

impl MemDriver {
    pub fn with_delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Default::default()
        }
    }

    async fn enter(&self) -> DriverResult<()> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        match self.fail_every {
            Some(k) if n.is_multiple_of(k) => Err(DriverError::new(ErrorKind::Unavailable, "injected")),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Driver for MemDriver {
    async fn get(&self, key: &[u8]) -> DriverResult<Option<Vec<u8>>> {
        self.enter().await?;
        Ok(self.map.lock().get(key).cloned())
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> DriverResult<()> {
        self.enter().await?;
        self.map.lock().insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    async fn delete(&self, key: &[u8]) -> DriverResult<bool> {
        self.enter().await?;
        Ok(self.map.lock().remove(key).is_some())
    }

    async fn scan(&self, start: &[u8], limit: u32) -> DriverResult<usize> {
        self.enter().await?;
        Ok(self.map.lock().range(start.to_vec()..).take(limit as usize).count())
    }
}
