//! Multidimensional two-parameter logistic IRT and the IRT-based estimators of tinyBenchmarks.
//!
//! Model: `P(model l answers item i) = σ(αᵢ·θₗ − βᵢ)`, θₗ, αᵢ ∈ ℝᵈ. [`Irt::fit`] finds the MAP
//! estimate of all θ, α, β on the training responses (Gaussian priors: θ, α ~ N(0, 1),
//! β ~ N(0, 3²); Bernoulli likelihood generalized to scores in [0, 1]) by full-batch Adam.
//! For a new candidate scored on a subset S, [`Irt::ability`] finds the MAP θ̂ on S with the
//! item parameters fixed, under a prior scaled to the training abilities
//! ([`Irt::ability_prior`]). A search fits with d chosen among 1, 2, 4, 8 by cross-validation
//! over the training models ([`Irt::fit_cross_validated`]). Then, with pᵢ = σ(αᵢ·θ̂ − βᵢ) and N items:
//!
//! - **IRT**: `(1/N) Σᵢ pᵢ`;
//! - **p-IRT**: `(1/N) (Σ_{i∈S} yᵢ + Σ_{i∉S} pᵢ)` — observed items count as observed;
//! - **gp-IRT**: `λ·naive + (1 − λ)·p-IRT`, with `naive` the subset's own (weighted) mean and λ
//!   chosen on the training models to minimize the absolute error ([`Irt::choose_lambda`]).
//!
//! Standard errors use the Bernoulli variance of the predicted items (θ̂'s own uncertainty is
//! not propagated).

use super::{Estimate, Responses};

/// Fitting settings.
#[derive(Debug, Clone, PartialEq)]
pub struct IrtConfig {
    pub dims: usize,
    pub iterations: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Default for IrtConfig {
    fn default() -> Self {
        Self { dims: 2, iterations: 600, learning_rate: 0.05, seed: 0 }
    }
}

/// The numbers of ability dimensions [`Irt::fit_cross_validated`] chooses from.
pub const DIMS_OPTIONS: &[usize] = &[1, 2, 4, 8];

/// Fitted item parameters (and the training abilities).
#[derive(Debug, Clone, PartialEq)]
pub struct Irt {
    pub dims: usize,
    /// items × dims
    pub alpha: Vec<f64>,
    pub beta: Vec<f64>,
    /// training models × dims
    pub theta: Vec<f64>,
}

/// Bernoulli log-loss of probability `p` for a score `y` in [0, 1].
fn log_loss(p: f64, y: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Adam state for one parameter vector.
struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self { m: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Ascent step on `x` with gradient `g` at step `t` (1-based).
    fn step(&mut self, x: &mut [f64], g: &[f64], lr: f64, t: i32) {
        let (b1, b2) = (0.9f64, 0.999f64);
        for i in 0..x.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = self.m[i] / (1.0 - b1.powi(t));
            let vh = self.v[i] / (1.0 - b2.powi(t));
            x[i] += lr * mh / (vh.sqrt() + 1e-8);
        }
    }
}

impl Irt {
    /// MAP fit on training responses.
    pub fn fit(r: &Responses, cfg: &IrtConfig) -> Self {
        let (l, n, d) = (r.models, r.items, cfg.dims.max(1));
        // deterministic small initialization (a hash of the index; no RNG state to keep)
        let init = |k: usize, salt: u64| {
            let x = (k as u64 ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2
        };
        let mut theta: Vec<f64> = (0..l * d).map(|k| init(k, cfg.seed + 1)).collect();
        let mut alpha: Vec<f64> = (0..n * d).map(|k| 1.0 + init(k, cfg.seed + 2)).collect();
        let mut beta: Vec<f64> = (0..n)
            .map(|i| {
                // start at the logit of the item's mean score
                let m = (0..l).map(|j| r.get(j, i)).sum::<f64>() / l as f64;
                let m = m.clamp(0.02, 0.98);
                -(m / (1.0 - m)).ln()
            })
            .collect();
        let (mut at, mut aa, mut ab) = (Adam::new(l * d), Adam::new(n * d), Adam::new(n));
        let (mut gt, mut ga, mut gb) = (vec![0.0; l * d], vec![0.0; n * d], vec![0.0; n]);
        for step in 1..=cfg.iterations {
            gt.iter_mut().enumerate().for_each(|(k, g)| *g = -theta[k]);
            ga.iter_mut().enumerate().for_each(|(k, g)| *g = -alpha[k]);
            gb.iter_mut().enumerate().for_each(|(k, g)| *g = -beta[k] / 9.0);
            for j in 0..l {
                let th = &theta[j * d..(j + 1) * d];
                for i in 0..n {
                    let a = &alpha[i * d..(i + 1) * d];
                    let z: f64 = a.iter().zip(th).map(|(x, y)| x * y).sum::<f64>() - beta[i];
                    let e = r.get(j, i) - sigmoid(z); // ∂ log-lik / ∂z
                    for k in 0..d {
                        gt[j * d + k] += e * a[k];
                        ga[i * d + k] += e * th[k];
                    }
                    gb[i] -= e;
                }
            }
            let lr = cfg.learning_rate;
            at.step(&mut theta, &gt, lr, step as i32);
            aa.step(&mut alpha, &ga, lr, step as i32);
            ab.step(&mut beta, &gb, lr, step as i32);
        }
        Self { dims: d, alpha, beta, theta }
    }

    /// Cross-validated error of each number of ability dimensions in `options` (those with
    /// `2·d` ≤ the models of a training fold), for estimates from `items`.
    ///
    /// The training models are split into `folds` interleaved folds. For each d and fold, the
    /// item parameters are fitted on the other folds; each held-out model's ability is
    /// estimated from its scores on `items` (the use the fit is for), and the error is the
    /// log-loss of its predicted scores on the other items, averaged over items and held-out
    /// models. Fits run in parallel (rayon).
    ///
    /// Log-loss rather than the error of the estimated mean: on the zoo's merges both chose
    /// the best d on `both`, but the mean's error, one number per held-out model, is noisier
    /// and chose d = 4 over 8 on `add` with 64 calibration merges (BENCHMARKS.md).
    pub fn cross_validate_dims(r: &Responses, cfg: &IrtConfig, options: &[usize], items: &[usize], folds: usize) -> Vec<(usize, f64)> {
        use rayon::prelude::*;
        let folds = folds.clamp(2, r.models.max(2));
        let train_models = r.models - r.models.div_ceil(folds);
        let options: Vec<usize> = options.iter().copied().filter(|&d| d >= 1 && 2 * d <= train_models).collect();
        let subset = |keep: &dyn Fn(usize) -> bool| {
            let rows: Vec<usize> = (0..r.models).filter(|&m| keep(m)).collect();
            Responses::new(rows.len(), r.items, rows.iter().flat_map(|&m| r.row(m).iter().copied()).collect())
        };
        // the items a held-out model is not scored on: where its predictions are judged
        let mut seen = vec![false; r.items];
        items.iter().for_each(|&i| seen[i] = true);
        let unseen: Vec<usize> = (0..r.items).filter(|&i| !seen[i]).collect();
        let jobs: Vec<(usize, usize)> = options.iter().flat_map(|&d| (0..folds).map(move |f| (d, f))).collect();
        let errors: Vec<(usize, f64, usize)> = jobs
            .par_iter()
            .map(|&(d, f)| {
                let fit = Irt::fit(&subset(&|m| m % folds != f), &IrtConfig { dims: d, ..cfg.clone() });
                let held = subset(&|m| m % folds == f);
                let err: f64 = (0..held.models)
                    .map(|m| {
                        let y: Vec<f64> = items.iter().map(|&i| held.get(m, i)).collect();
                        let p = fit.probabilities(&fit.ability(items, &y));
                        unseen.iter().map(|&i| log_loss(p[i], held.get(m, i))).sum::<f64>() / unseen.len().max(1) as f64
                    })
                    .sum();
                (d, err, held.models)
            })
            .collect();
        options
            .iter()
            .map(|&d| {
                let (sum, n) = errors.iter().filter(|e| e.0 == d).fold((0.0, 0), |(s, n), e| (s + e.1, n + e.2));
                (d, sum / n.max(1) as f64)
            })
            .collect()
    }

    /// [`Irt::fit`] with the number of dimensions chosen by [`Irt::cross_validate_dims`] over
    /// [`DIMS_OPTIONS`] with 4 folds (the d of least error; `cfg.dims` when no option fits
    /// the training models); also returns the cross-validated error of each d.
    pub fn fit_cross_validated(r: &Responses, cfg: &IrtConfig, items: &[usize]) -> (Self, Vec<(usize, f64)>) {
        let cv = Self::cross_validate_dims(r, cfg, DIMS_OPTIONS, items, 4);
        let dims = cv.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map_or(cfg.dims, |c| c.0);
        let curve: Vec<String> = cv.iter().map(|(d, e)| format!("d={d}: {e:.4}")).collect();
        tracing::info!("IRT fit on {} models: {dims} ability dimensions (cross-validated log-loss {})", r.models, curve.join(", "));
        (Self::fit(r, &IrtConfig { dims, ..cfg.clone() }), cv)
    }

    pub fn items(&self) -> usize {
        self.beta.len()
    }

    /// P(correct) of every item for ability θ.
    pub fn probabilities(&self, theta: &[f64]) -> Vec<f64> {
        let d = self.dims;
        (0..self.items()).map(|i| sigmoid(self.alpha[i * d..(i + 1) * d].iter().zip(theta).map(|(a, t)| a * t).sum::<f64>() - self.beta[i])).collect()
    }

    /// The ability prior: N(0, diag(s²)) with s² each dimension's variance over the training
    /// abilities (plus 10⁻³), or N(0, I) without at least d + 1 training models. Returned as the
    /// diagonal of the precision.
    ///
    /// Why not N(0, I), the prior of the fit: α·θ has a scale freedom that the priors of α
    /// and θ settle, and with few training models and many items the MAP puts the scale in
    /// θ (its prior is summed over fewer terms). A candidate's θ̂ under N(0, I) is then shrunk
    /// far below the training abilities it is compared with: on the zoo's `both` split with 16
    /// calibration merges this bias made p-IRT 4.1 points off against 3.5 (BENCHMARKS.md).
    /// The full empirical N(μ, Σ) measured the same; the mean stays 0 so that a search's
    /// candidates, which move away from the calibration merges, are not pulled back to them.
    pub fn ability_prior(&self) -> Vec<f64> {
        let d = self.dims;
        let l = self.theta.len() / d.max(1);
        if l <= d {
            return vec![1.0; d];
        }
        (0..d)
            .map(|k| {
                let col = || (0..l).map(|j| self.theta[j * d + k]);
                let mean = col().sum::<f64>() / l as f64;
                let var = col().map(|t| (t - mean).powi(2)).sum::<f64>() / (l - 1) as f64;
                1.0 / (var + 1e-3)
            })
            .collect()
    }

    /// MAP ability from scores `y` on `items` (item parameters fixed; prior
    /// [`Irt::ability_prior`]).
    pub fn ability(&self, items: &[usize], y: &[f64]) -> Vec<f64> {
        let d = self.dims;
        let prec = self.ability_prior();
        let mut theta = vec![0.0; d];
        let mut adam = Adam::new(d);
        let mut g = vec![0.0; d];
        for step in 1..=300 {
            g.iter_mut().zip(&theta).zip(&prec).for_each(|((g, t), p)| *g = -p * t);
            for (&i, &yi) in items.iter().zip(y) {
                let a = &self.alpha[i * d..(i + 1) * d];
                let z: f64 = a.iter().zip(&theta).map(|(x, t)| x * t).sum::<f64>() - self.beta[i];
                let e = yi - sigmoid(z);
                g.iter_mut().zip(a).for_each(|(g, a)| *g += e * a);
            }
            adam.step(&mut theta, &g, 0.1, step);
        }
        theta
    }

    /// IRT estimate: mean predicted score over all items.
    pub fn estimate(&self, items: &[usize], y: &[f64]) -> Estimate {
        let p = self.probabilities(&self.ability(items, y));
        let n = p.len() as f64;
        Estimate { value: p.iter().sum::<f64>() / n, std_error: p.iter().map(|q| q * (1.0 - q)).sum::<f64>().sqrt() / n }
    }

    /// p-IRT estimate: observed items as observed, the rest predicted.
    pub fn estimate_p(&self, items: &[usize], y: &[f64]) -> Estimate {
        let p = self.probabilities(&self.ability(items, y));
        let n = p.len() as f64;
        let mut observed = vec![false; p.len()];
        items.iter().for_each(|&i| observed[i] = true);
        let seen: f64 = y.iter().sum();
        let (pred, var) = p.iter().zip(&observed).filter(|(_, o)| !**o).fold((0.0, 0.0), |(s, v), (q, _)| (s + q, v + q * (1.0 - q)));
        Estimate { value: (seen + pred) / n, std_error: var.sqrt() / n }
    }

    /// gp-IRT estimate: `λ·naive + (1 − λ)·p-IRT`.
    pub fn estimate_gp(&self, items: &[usize], y: &[f64], naive: Estimate, lambda: f64) -> Estimate {
        let p = self.estimate_p(items, y);
        Estimate {
            value: lambda * naive.value + (1.0 - lambda) * p.value,
            std_error: (lambda * lambda * naive.std_error.powi(2) + (1.0 - lambda).powi(2) * p.std_error.powi(2)).sqrt(),
        }
    }

    /// λ ∈ {0, 0.05, …, 1} minimizing the mean absolute gp-IRT error over the `train` models
    /// (scored on `items` with weights `weights`), against their full-set means.
    ///
    /// In-sample: this fit has seen the training models' every response. Choosing λ out of
    /// sample instead (5-fold cross-fitting of the IRT parameters) was measured on the zoo's
    /// merges and changed the MAE by −0.1 to +0.5 points (BENCHMARKS.md), so it was not kept.
    pub fn choose_lambda(&self, train: &Responses, items: &[usize], weights: &[f64]) -> f64 {
        let per_model: Vec<(f64, f64, f64)> = (0..train.models)
            .map(|m| {
                let y: Vec<f64> = items.iter().map(|&i| train.get(m, i)).collect();
                let naive = super::weighted_mean(&y, weights).value;
                (naive, self.estimate_p(items, &y).value, train.mean(m))
            })
            .collect();
        (0..=20)
            .map(|k| k as f64 / 20.0)
            .map(|lam| (lam, per_model.iter().map(|(nv, p, t)| (lam * nv + (1.0 - lam) * p - t).abs()).sum::<f64>()))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(0.5, |(lam, _)| lam)
    }
}
