//! Zipfian key choice, as in YCSB.
//!
//! [`Zipfian`] is the generator of Gray et al., "Quickly Generating Billion-Record
//! Synthetic Databases" (SIGMOD 1994), which YCSB's `ZipfianGenerator` implements: rank
//! 0 is the most popular item, and rank `i` is drawn with probability about
//! `1 / ((i+1)^theta * zeta(n, theta))`.
//!
//! [`ScrambledZipfian`] spreads the popular ranks over the key space, so that the hot
//! keys are not all neighbours (which would put them all in one range). YCSB hashes the
//! rank with FNV-64 and takes it modulo `n`, which can fold two hot ranks onto one key.
//! We use an affine bijection instead, `key = (a * rank + b) mod n` with
//! `gcd(a, n) = 1`, so the key popularity curve is exactly the zipfian one while
//! neighbouring ranks land far apart. `a` and `b` depend on `n` only, so every worker
//! and every system sees the same hot keys.

use rand::Rng;

/// Up to this many terms of zeta are summed exactly; past it the tail is integrated.
const EXACT_TERMS: u64 = 10_000_000;

/// Errors in a distribution's parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ZipfError {
    #[error("a zipfian needs at least one item")]
    Empty,
    #[error("zipfian theta must be in (0, 1), got {0}")]
    Theta(f64),
}

/// `sum_{i=1..n} 1 / i^theta`: exact up to [`EXACT_TERMS`], then the tail by the integral
/// of `x^-theta` from `EXACT_TERMS + 0.5` to `n + 0.5` (error far below 1e-9 relative).
pub fn zeta(n: u64, theta: f64) -> f64 {
    let exact = n.min(EXACT_TERMS);
    let mut sum = 0.0;
    for i in 1..=exact {
        sum += 1.0 / (i as f64).powf(theta);
    }
    if n > exact {
        let e = 1.0 - theta;
        let upper = (n as f64 + 0.5).powf(e);
        let lower = (exact as f64 + 0.5).powf(e);
        sum += (upper - lower) / e;
    }
    sum
}

/// Ranks `0..n`, rank 0 the most popular.
#[derive(Clone, Debug)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// A zipfian over `n` items with exponent `theta` (YCSB's default is 0.99).
    pub fn new(n: u64, theta: f64) -> Result<Self, ZipfError> {
        if n == 0 {
            return Err(ZipfError::Empty);
        }
        if !(theta > 0.0 && theta < 1.0) {
            return Err(ZipfError::Theta(theta));
        }
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Ok(Self {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
        })
    }

    /// The number of items.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// The exact probability of rank `i` under the zipfian law this approximates.
    #[cfg(test)]
    pub fn probability(&self, rank: u64) -> f64 {
        1.0 / ((rank + 1) as f64).powf(self.theta) / self.zetan
    }

    /// Draws a rank in `0..n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

/// A zipfian whose ranks are spread over the key space by an affine bijection.
#[derive(Clone, Debug)]
pub struct ScrambledZipfian {
    zipf: Zipfian,
    mul: u64,
    add: u64,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl ScrambledZipfian {
    /// Over keys `0..n`.
    pub fn new(n: u64, theta: f64) -> Result<Self, ZipfError> {
        let zipf = Zipfian::new(n, theta)?;
        // Odd multiplier near n/φ, moved up until it is coprime with n.
        let mut mul = ((n as f64 * 0.618_033_988_749_895) as u64) | 1;
        while n > 1 && gcd(mul, n) != 1 {
            mul += 2;
        }
        let add = (n as f64 * 0.381_966_011_250_105) as u64;
        Ok(Self {
            zipf,
            mul: mul % n.max(1),
            add: add % n.max(1),
        })
    }

    /// The key of rank `rank`.
    pub fn key_of_rank(&self, rank: u64) -> u64 {
        let n = u128::from(self.zipf.len());
        ((u128::from(self.mul) * u128::from(rank) + u128::from(self.add)) % n) as u64
    }

    /// Draws a key in `0..n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        self.key_of_rank(self.zipf.sample(rng))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::collections::HashSet;

    #[test]
    fn zeta_matches_direct_sum_and_tail_integral() {
        let direct: f64 = (1..=1000u64).map(|i| 1.0 / (i as f64).powf(0.99)).sum();
        assert!((zeta(1000, 0.99) - direct).abs() < 1e-9);
        // Past the exact part: compare with the integral approximation's known shape:
        // zeta grows by about the integral of x^-theta between the two counts.
        let a = zeta(EXACT_TERMS, 0.99);
        let b = zeta(EXACT_TERMS * 2, 0.99);
        let expect = ((2.0 * EXACT_TERMS as f64).powf(0.01) - (EXACT_TERMS as f64).powf(0.01)) / 0.01;
        assert!((b - a - expect).abs() / expect < 1e-4, "{} vs {expect}", b - a);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(Zipfian::new(0, 0.99).unwrap_err(), ZipfError::Empty);
        for theta in [0.0, 1.0, -0.5, f64::NAN] {
            assert!(Zipfian::new(10, theta).is_err(), "theta {theta}");
        }
    }

    /// Table: for several (n, theta), the mass of the top ranks is within tolerance of
    /// the zipfian law.
    #[test]
    fn shape_of_top_ranks_follows_the_law() {
        let cases: &[(u64, f64, u64, f64)] = &[
            // n, theta, ranks 0..k, tolerance on their total mass (absolute)
            (1_000, 0.99, 1, 0.01),
            (1_000, 0.99, 2, 0.01),
            (1_000, 0.99, 10, 0.03),
            (1_000, 0.99, 100, 0.03),
            (100_000, 0.99, 1, 0.01),
            (100_000, 0.99, 100, 0.03),
            (10_000, 0.5, 100, 0.03),
        ];
        let draws = 200_000;
        for &(n, theta, k, tol) in cases {
            let z = Zipfian::new(n, theta).unwrap();
            let mut rng = StdRng::seed_from_u64(7);
            let hits = (0..draws).filter(|_| z.sample(&mut rng) < k).count();
            let got = hits as f64 / draws as f64;
            let want: f64 = (0..k).map(|r| z.probability(r)).sum();
            assert!(
                (got - want).abs() < tol,
                "n={n} theta={theta} top {k}: got {got:.4}, law {want:.4}"
            );
        }
    }

    #[test]
    fn samples_stay_in_range_and_small_n_works() {
        for n in [1u64, 2, 3, 17] {
            let z = ScrambledZipfian::new(n, 0.99).unwrap();
            let mut rng = StdRng::seed_from_u64(1);
            for _ in 0..10_000 {
                assert!(z.sample(&mut rng) < n);
            }
        }
    }

    #[test]
    fn scramble_is_a_bijection_that_spreads_neighbours() {
        for n in [10u64, 1000, 1024, 10_000, 99_991] {
            let z = ScrambledZipfian::new(n, 0.99).unwrap();
            let keys: HashSet<u64> = (0..n).map(|r| z.key_of_rank(r)).collect();
            assert_eq!(keys.len() as u64, n, "n={n}: not a bijection");
        }
        let z = ScrambledZipfian::new(10_000, 0.99).unwrap();
        let gap = z.key_of_rank(0).abs_diff(z.key_of_rank(1));
        assert!(gap > 100, "ranks 0 and 1 are neighbours ({gap})");
    }

    #[test]
    fn same_seed_same_sequence() {
        let z = ScrambledZipfian::new(50_000, 0.99).unwrap();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..100).map(|_| z.sample(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
