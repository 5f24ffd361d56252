//! openraft's watch channel for [`super::runtime::SkvRuntime`]: a value, a version and one
//! `tokio::sync::Notify`.
//!
//! Why not tokio's `watch` (what openraft's `TokioRuntime` uses): its receivers wait on one
//! of eight `Notify`s picked by the runtime's random generator, so when a value changes the
//! waiting tasks wake in an order that differs from run to run, and tokio's generator can
//! only be seeded with `--cfg tokio_unstable`. The deterministic simulation (`sim/`, ADR
//! 0033) needs the same wake order every run; one `Notify` wakes its waiters in the order
//! they registered. Semantics follow tokio's: `changed` returns once a version newer than
//! the receiver's last seen one exists, or an error once every sender is gone; `send` fails
//! (and stores nothing) once every receiver is gone; `send_if_modified` always applies.
//! As with tokio's, a `Ref` is a read guard: never hold one across an `.await` or a send.

use openraft::OptionalSend;
use openraft::OptionalSync;
use openraft::async_runtime::watch::{RecvError, SendError, Watch, WatchReceiver, WatchSender};
use parking_lot::{RwLock, RwLockReadGuard};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::Notify;

pub struct SkvWatch;

struct Inner<T> {
    value: RwLock<T>,
    version: AtomicU64,
    notify: Notify,
    senders: AtomicUsize,
    receivers: AtomicUsize,
}

pub struct SkvWatchSender<T>(Arc<Inner<T>>);

pub struct SkvWatchReceiver<T> {
    inner: Arc<Inner<T>>,
    seen: u64,
}

impl<T> Clone for SkvWatchSender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::AcqRel);
        Self(self.0.clone())
    }
}

impl<T> Drop for SkvWatchSender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.notify.notify_waiters();
        }
    }
}

impl<T> Clone for SkvWatchReceiver<T> {
    fn clone(&self) -> Self {
        self.inner.receivers.fetch_add(1, Ordering::AcqRel);
        Self {
            inner: self.inner.clone(),
            seen: self.seen,
        }
    }
}

impl<T> Drop for SkvWatchReceiver<T> {
    fn drop(&mut self) {
        self.inner.receivers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watch for SkvWatch {
    type Sender<T: OptionalSend + OptionalSync> = SkvWatchSender<T>;
    type Receiver<T: OptionalSend + OptionalSync> = SkvWatchReceiver<T>;
    type Ref<'a, T: OptionalSend + 'a> = RwLockReadGuard<'a, T>;

    fn channel<T: OptionalSend + OptionalSync>(init: T) -> (Self::Sender<T>, Self::Receiver<T>) {
        let inner = Arc::new(Inner {
            value: RwLock::new(init),
            version: AtomicU64::new(0),
            notify: Notify::new(),
            senders: AtomicUsize::new(1),
            receivers: AtomicUsize::new(1),
        });
        (SkvWatchSender(inner.clone()), SkvWatchReceiver { inner, seen: 0 })
    }
}

impl<T: OptionalSend + OptionalSync> SkvWatchSender<T> {
    fn publish(&self) {
        self.0.version.fetch_add(1, Ordering::AcqRel);
        self.0.notify.notify_waiters();
    }
}

impl<T> WatchSender<SkvWatch, T> for SkvWatchSender<T>
where
    T: OptionalSend + OptionalSync,
{
    fn send(&self, value: T) -> Result<(), SendError<T>> {
        if self.0.receivers.load(Ordering::Acquire) == 0 {
            return Err(SendError(value));
        }
        *self.0.value.write() = value;
        self.publish();
        Ok(())
    }

    fn send_if_modified<F>(&self, modify: F) -> bool
    where
        F: FnOnce(&mut T) -> bool,
    {
        let modified = modify(&mut self.0.value.write());
        if modified {
            self.publish();
        }
        modified
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.0.value.read()
    }

    fn subscribe(&self) -> SkvWatchReceiver<T> {
        self.0.receivers.fetch_add(1, Ordering::AcqRel);
        SkvWatchReceiver {
            inner: self.0.clone(),
            seen: self.0.version.load(Ordering::Acquire),
        }
    }
}

impl<T> WatchReceiver<SkvWatch, T> for SkvWatchReceiver<T>
where
    T: OptionalSend + OptionalSync,
{
    async fn changed(&mut self) -> Result<(), RecvError> {
        loop {
            // Registered before the checks, so a send between them is not missed.
            let notified = self.inner.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let v = self.inner.version.load(Ordering::Acquire);
            if v != self.seen {
                self.seen = v;
                return Ok(());
            }
            if self.inner.senders.load(Ordering::Acquire) == 0 {
                return Err(RecvError(()));
            }
            notified.await;
        }
    }

    fn borrow_watched(&self) -> RwLockReadGuard<'_, T> {
        self.inner.value.read()
    }

    fn borrow_and_update(&mut self) -> RwLockReadGuard<'_, T> {
        let guard = self.inner.value.read();
        self.seen = self.inner.version.load(Ordering::Acquire);
        guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn changed_sees_every_new_version_and_ends_when_the_senders_are_gone() {
        let (tx, mut rx) = SkvWatch::channel(1u32);
        assert_eq!(*rx.borrow_watched(), 1);
        // Nothing new yet: changed waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), rx.changed())
                .await
                .is_err()
        );
        tx.send(2).unwrap();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_watched(), 2);
        // A send from another task wakes a waiting receiver.
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            let v = *rx.borrow_watched();
            (rx, v)
        });
        tokio::task::yield_now().await;
        assert!(!tx2.send_if_modified(|_| false), "an unmodified value is not published");
        tx2.send_if_modified(|v| {
            *v = 3;
            true
        });
        let (mut rx, v) = waiter.await.unwrap();
        assert_eq!(v, 3);
        // A subscriber sees only later versions; borrow_and_update marks the value seen.
        let mut sub = tx.subscribe();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), sub.changed())
                .await
                .is_err()
        );
        tx.send(4).unwrap();
        assert_eq!(*rx.borrow_and_update(), 4);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), rx.changed())
                .await
                .is_err()
        );
        sub.changed().await.unwrap();
        drop(tx);
        drop(tx2);
        assert!(rx.changed().await.is_err(), "every sender gone");
        // With every receiver gone, send fails and stores nothing.
        let (tx, rx) = SkvWatch::channel(0u32);
        drop(rx);
        assert!(tx.send(9).is_err());
        assert_eq!(*tx.borrow_watched(), 0);
    }
}
