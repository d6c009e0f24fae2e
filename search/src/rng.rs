//! The optimizers' random generator: ChaCha8 (serializable state, so checkpoints carry it), with
//! `rand`'s uniform and `rand_distr`'s normal (ziggurat) draws on top.

use rand::RngExt as _;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Uniform and normal draws from a seeded, serializable stream. The state is the stream
/// position only (no cached spare normal), so a restored generator continues exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
    }

    /// Uniform integer in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_moments() {
        let mut r = Rng::seeded(1);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let kurt = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02 && (kurt - 3.0).abs() < 0.1, "{mean} {var} {kurt}");
    }

    #[test]
    fn below_covers_its_range_evenly() {
        let mut r = Rng::seeded(2);
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[r.below(5)] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut a = Rng::seeded(7);
        a.normal();
        let mut b: Rng = serde_json::from_str(&serde_json::to_string(&a).expect("ser")).expect("de");
        assert_eq!((0..5).map(|_| (a.uniform(), a.normal())).collect::<Vec<_>>(), (0..5).map(|_| (b.uniform(), b.normal())).collect::<Vec<_>>());
    }
}
