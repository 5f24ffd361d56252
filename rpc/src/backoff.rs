use std::time::Duration;

/// Bounded exponential backoff with full jitter: the n-th wait is uniform in
/// `[cap/2, cap]` with `cap = min(max, base * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The cap of wait number `attempt` (0-based).
    pub fn cap(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(1u32 << attempt.min(20)).min(self.max)
    }

    /// The next wait, with `jitter` in `[0, 1]` choosing where in `[cap/2, cap]` it falls.
    /// Pure: tests pass the jitter; [`Backoff::next_wait`] draws it.
    pub fn next_wait_with(&mut self, jitter: f64) -> Duration {
        let cap = self.cap(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// The next wait, with random jitter.
    pub fn next_wait(&mut self) -> Duration {
        self.next_wait_with(rand::random::<f64>())
    }

    /// How many waits were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn schedule() {
        // (jitter, expected wait) for successive calls with base 5 ms, max 100 ms.
        let table = [
            (0.0, 2.5),
            (1.0, 10.0),
            (0.0, 10.0),
            (1.0, 40.0),
            (1.0, 80.0),
            (1.0, 100.0),
            (0.0, 50.0),
            (0.5, 75.0),
        ];
        let mut b = Backoff::new(5 * MS, 100 * MS);
        for (i, (jitter, want_ms)) in table.into_iter().enumerate() {
            assert_eq!(b.next_wait_with(jitter), MS.mul_f64(want_ms), "wait #{i}");
        }
        b.reset();
        assert_eq!(b.next_wait_with(1.0), 5 * MS);
    }

    #[test]
    fn bounded_for_ever() {
        let mut b = Backoff::new(5 * MS, 500 * MS);
        for _ in 0..10_000 {
            let w = b.next_wait();
            assert!(w <= 500 * MS && w >= 2 * MS, "{w:?}");
        }
        // Jitter outside [0, 1] is clamped, never a panic or an overflow.
        assert_eq!(b.next_wait_with(7.0), 500 * MS);
        assert_eq!(b.next_wait_with(-1.0), 250 * MS);
        // max below base is raised to base.
        assert_eq!(Backoff::new(10 * MS, MS).next_wait_with(1.0), 10 * MS);
    }
}
