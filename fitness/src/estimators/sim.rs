//! Response matrices simulated from a known 2PL IRT model (tests and benchmarks).

use rand::RngExt as _;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::Responses;

/// A simulated population: responses, and the true parameters behind them.
#[derive(Debug, Clone)]
pub struct Simulated {
    pub responses: Responses,
    /// models × dims
    pub theta: Vec<f64>,
    /// items × dims
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
    /// P(correct) per model and item (the expected full-set score is the row mean).
    pub probabilities: Vec<f64>,
}

/// Seeded uniform and normal draws (`rand`'s StandardUniform, `rand_distr`'s StandardNormal).
pub(crate) struct Gen(pub(crate) ChaCha8Rng);

impl Gen {
    pub(crate) fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
    pub(crate) fn normal(&mut self) -> f64 {
        StandardNormal.sample(&mut self.0)
    }
}

/// `models` abilities θ ~ N(0, I), item slopes α ~ |N(1, 0.4²)|, difficulties β ~ N(0, 1),
/// responses ~ Bernoulli(σ(α·θ − β)).
pub fn simulate(models: usize, items: usize, dims: usize, seed: u64) -> Simulated {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    let theta: Vec<f64> = (0..models * dims).map(|_| g.normal()).collect();
    let alpha: Vec<f64> = (0..items * dims).map(|_| (1.0 + 0.4 * g.normal()).abs()).collect();
    let beta: Vec<f64> = (0..items).map(|_| g.normal()).collect();
    let mut probabilities = Vec::with_capacity(models * items);
    let mut data = Vec::with_capacity(models * items);
    for m in 0..models {
        for i in 0..items {
            let z: f64 = (0..dims).map(|k| alpha[i * dims + k] * theta[m * dims + k]).sum::<f64>() - beta[i];
            let p = 1.0 / (1.0 + (-z).exp());
            probabilities.push(p);
            data.push(if g.uniform() < p { 1.0 } else { 0.0 });
        }
    }
    Simulated { responses: Responses::new(models, items, data), theta, alpha, beta, probabilities }
}

/// `k` distinct items out of `n`, seeded (a partial Fisher–Yates shuffle).
pub fn random_items(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut g = Gen(ChaCha8Rng::seed_from_u64(seed));
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = g.0.random_range(i..n);
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}
