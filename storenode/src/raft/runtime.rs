//! The async runtime of skv's Raft groups: openraft's tokio runtime, except for the random
//! numbers openraft draws (election timeouts, the first tick's phase), which can be seeded
//! per thread for the deterministic simulation (`sim/`, ADR 0033).
//!
//! Without a seed (the storenode binary and every other test), each draw is seeded from
//! the thread's OS-seeded generator, as openraft's own `TokioRuntime` does. With
//! [`seed_thread_rng`] on a thread, every draw on that thread comes from one SplitMix64
//! sequence, so a single-thread runtime with a paused clock replays the same elections.
//! Its watch channel is [`super::watch::SkvWatch`] (tokio's wakes its waiters in a random
//! order).

use openraft::async_runtime::{Select2, Select3, Select4};
use openraft::{AsyncRuntime, OptionalSend, TokioRuntime};
use rand010::SeedableRng;
use rand010::rngs::SmallRng;
use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

thread_local! {
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Seeds (Some) or unseeds (None) the Raft random numbers drawn on this thread.
pub fn seed_thread_rng(seed: Option<u64>) {
    SEED.with(|s| s.set(seed));
}

fn splitmix64(x: u64) -> u64 {
    let z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_133e_b11b);
    z ^ (z >> 31)
}

/// openraft's tokio runtime with a seedable `thread_rng` (see the module docs).
#[derive(Debug)]
pub struct SkvRuntime {
    inner: TokioRuntime,
}

impl AsyncRuntime for SkvRuntime {
    type JoinError = <TokioRuntime as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <TokioRuntime as AsyncRuntime>::Sleep;
    type Instant = <TokioRuntime as AsyncRuntime>::Instant;
    type TimeoutError = <TokioRuntime as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <TokioRuntime as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = SmallRng;

    #[inline]
    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        TokioRuntime::spawn(future)
    }

    #[inline]
    fn sleep(duration: Duration) -> Self::Sleep {
        TokioRuntime::sleep(duration)
    }

    #[inline]
    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        TokioRuntime::sleep_until(deadline)
    }

    #[inline]
    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout(duration, future)
    }

    #[inline]
    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        TokioRuntime::timeout_at(deadline, future)
    }

    fn select2<A, B>(a: A, b: B) -> impl Future<Output = Select2<A::Output, B::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
    {
        TokioRuntime::select2(a, b)
    }

    fn select3<A, B, C>(
        a: A,
        b: B,
        c: C,
    ) -> impl Future<Output = Select3<A::Output, B::Output, C::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
    {
        TokioRuntime::select3(a, b, c)
    }

    fn select4<A, B, C, D>(
        a: A,
        b: B,
        c: C,
        d: D,
    ) -> impl Future<Output = Select4<A::Output, B::Output, C::Output, D::Output>> + OptionalSend
    where
        A: Future + OptionalSend,
        B: Future + OptionalSend,
        C: Future + OptionalSend,
        D: Future + OptionalSend,
    {
        TokioRuntime::select4(a, b, c, d)
    }

    #[inline]
    fn is_panic(join_error: &Self::JoinError) -> bool {
        TokioRuntime::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        let seeded = SEED.with(|s| {
            let cur = s.get()?;
            let next = splitmix64(cur);
            s.set(Some(next));
            Some(next)
        });
        match seeded {
            Some(seed) => SmallRng::seed_from_u64(seed),
            None => SmallRng::from_rng(&mut TokioRuntime::thread_rng()),
        }
    }

    type Mpsc = <TokioRuntime as AsyncRuntime>::Mpsc;
    type Watch = super::watch::SkvWatch;
    type Oneshot = <TokioRuntime as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <TokioRuntime as AsyncRuntime>::Mutex<T>;

    fn new(threads: usize) -> Self {
        Self {
            inner: TokioRuntime::new(threads),
        }
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.inner.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand010::RngExt;

    fn draws() -> Vec<u64> {
        (0..4)
            .map(|_| SkvRuntime::thread_rng().random_range(0..1_000_000))
            .collect()
    }

    #[test]
    fn a_seeded_thread_replays_its_draws_and_an_unseeded_one_does_not_repeat() {
        seed_thread_rng(Some(7));
        let a = draws();
        seed_thread_rng(Some(7));
        assert_eq!(draws(), a);
        seed_thread_rng(Some(8));
        assert_ne!(draws(), a);
        seed_thread_rng(None);
        let x = draws();
        let y = draws();
        assert_ne!(x, y, "unseeded draws come from the OS-seeded generator");
    }
}
