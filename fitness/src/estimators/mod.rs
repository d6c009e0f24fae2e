//! Estimators of a candidate's full-set score from a small item subset (tinyBenchmarks: Polo
//! et al., "tinyBenchmarks: evaluating LLMs with fewer examples", ICML 2024).
//!
//! All work on [`Responses`]: correctness (0/1, or a score in [0, 1]) of models × items. The
//! run's own source models (and a few calibration candidates) are the training rows; a new
//! candidate is scored only on the chosen items.

pub mod anchor;
pub mod irt;
pub mod sim;

pub use anchor::AnchorPoints;
pub use irt::{Irt, IrtConfig};

/// A models × items matrix of scores in [0, 1] (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Responses {
    pub models: usize,
    pub items: usize,
    pub data: Vec<f64>,
}

impl Responses {
    pub fn new(models: usize, items: usize, data: Vec<f64>) -> Self {
        debug_assert_eq!(data.len(), models * items);
        Self { models, items, data }
    }

    pub fn get(&self, model: usize, item: usize) -> f64 {
        self.data[model * self.items + item]
    }

    pub fn row(&self, model: usize) -> &[f64] {
        &self.data[model * self.items..(model + 1) * self.items]
    }

    /// A model's full-set mean score.
    pub fn mean(&self, model: usize) -> f64 {
        self.row(model).iter().sum::<f64>() / self.items as f64
    }
}

/// An estimated full-set score with its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub std_error: f64,
}

/// Weighted mean of the observed scores (random subsets: equal weights; anchor points: cluster
/// masses). Standard error from the weighted Bernoulli variance.
pub fn weighted_mean(scores: &[f64], weights: &[f64]) -> Estimate {
    let value: f64 = scores.iter().zip(weights).map(|(s, w)| s * w).sum();
    let var: f64 = weights.iter().map(|w| w * w).sum::<f64>() * value * (1.0 - value);
    Estimate { value, std_error: var.max(0.0).sqrt() }
}

/// Kendall's τ-a between two rankings (for benchmarks: do estimates order candidates right?).
pub fn kendall_tau(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len();
    let (mut concordant, mut discordant) = (0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let s = (a[i] - a[j]) * (b[i] - b[j]);
            if s > 0.0 {
                concordant += 1;
            } else if s < 0.0 {
                discordant += 1;
            }
        }
    }
    let pairs = (n * (n.saturating_sub(1)) / 2).max(1) as f64;
    (concordant - discordant) as f64 / pairs
}

#[cfg(test)]
mod tests {
    use super::sim::{random_items, simulate};
    use super::*;

    fn corr(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let (va, vb): (f64, f64) = (a.iter().map(|x| (x - ma).powi(2)).sum(), b.iter().map(|y| (y - mb).powi(2)).sum());
        cov / (va * vb).sqrt()
    }

    #[test]
    fn irt_fit_recovers_item_parameters() {
        let s = simulate(300, 200, 1, 1);
        let fit = Irt::fit(&s.responses, &IrtConfig { dims: 1, ..Default::default() });
        let (cb, ca) = (corr(&fit.beta, &s.beta), corr(&fit.alpha, &s.alpha));
        // (α, θ) and (−α, −θ) fit equally well; the positive initialization picks the sign
        assert!(cb >= 0.9 && ca >= 0.9, "corr β {cb:.3}, α {ca:.3}");
    }

    #[test]
    fn irt_estimators_beat_random_subsets_at_10_percent() {
        let (train, test) = (simulate(300, 400, 2, 2), simulate(60, 400, 2, 2));
        // same items for both populations: reuse the training item parameters for the test models
        let test = {
            let mut t = test.clone();
            let d = 2;
            let mut data = Vec::new();
            let mut g = 0u64;
            for m in 0..t.responses.models {
                for i in 0..400 {
                    let z: f64 = (0..d).map(|k| train.alpha[i * d + k] * t.theta[m * d + k]).sum::<f64>() - train.beta[i];
                    let p = 1.0 / (1.0 + (-z).exp());
                    g = g.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let u = ((g ^ (g >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9) >> 11) as f64 / (1u64 << 53) as f64;
                    data.push(if u < p { 1.0 } else { 0.0 });
                }
            }
            t.responses = Responses::new(t.responses.models, 400, data);
            t
        };
        let fit = Irt::fit(&train.responses, &IrtConfig::default());
        let k = 40;
        let items = random_items(400, k, 3);
        let w = vec![1.0 / k as f64; k];
        let lambda = fit.choose_lambda(&train.responses, &items, &w);
        let (mut e_rand, mut e_p, mut e_gp) = (0.0, 0.0, 0.0);
        for m in 0..test.responses.models {
            let y: Vec<f64> = items.iter().map(|&i| test.responses.get(m, i)).collect();
            let truth = test.responses.mean(m);
            let naive = weighted_mean(&y, &w);
            e_rand += (naive.value - truth).abs();
            e_p += (fit.estimate_p(&items, &y).value - truth).abs();
            e_gp += (fit.estimate_gp(&items, &y, naive, lambda).value - truth).abs();
        }
        let n = test.responses.models as f64;
        let (e_rand, e_p, e_gp) = (e_rand / n, e_p / n, e_gp / n);
        assert!(e_p < e_rand && e_gp <= e_rand, "MAE random {e_rand:.4}, p-IRT {e_p:.4}, gp-IRT {e_gp:.4}");
    }

    /// Rows `from..to` of a simulated population (same items and item parameters throughout).
    fn rows(r: &Responses, from: usize, to: usize) -> Responses {
        Responses::new(to - from, r.items, r.data[from * r.items..to * r.items].to_vec())
    }

    fn slope(x: &[f64], y: &[f64]) -> f64 {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum::<f64>() / x.iter().map(|a| (a - mx).powi(2)).sum::<f64>()
    }

    /// Few training models and many items put the fit's scale in θ (sd ≈ 3 here); a candidate's
    /// ability must be estimated on that scale. Under the fit's own N(0, 1) prior plain IRT's
    /// estimates were flattened to a slope of 0.54 on the expected scores; 0.72 now, the mean
    /// over four simulated populations (0.66–0.78 each; what is left is the Bayes shrinkage of
    /// an ability read from 80 items).
    #[test]
    fn irt_estimates_are_not_shrunk_with_few_training_models() {
        let slopes: Vec<f64> = (0..4)
            .map(|seed| {
                let s = simulate(15 + 60, 800, 1, seed);
                let (train, test) = (rows(&s.responses, 0, 15), rows(&s.responses, 15, 75));
                let fit = Irt::fit(&train, &IrtConfig { dims: 1, ..Default::default() });
                let items = random_items(800, 80, 9 + seed);
                let (est, truth): (Vec<f64>, Vec<f64>) = (0..test.models)
                    .map(|m| {
                        let y: Vec<f64> = items.iter().map(|&i| test.get(m, i)).collect();
                        let p = &s.probabilities[(15 + m) * 800..(16 + m) * 800];
                        (fit.estimate(&items, &y).value, p.iter().sum::<f64>() / 800.0)
                    })
                    .unzip();
                slope(&truth, &est)
            })
            .collect();
        let b = slopes.iter().sum::<f64>() / slopes.len() as f64;
        assert!((0.65..1.1).contains(&b), "mean slope of IRT estimates on the expected scores: {b:.3} ({slopes:.3?})");
    }

    /// Responses of `models` to `items` items of two skills: item i depends on ability
    /// dimension i % 2 only (slope 1.5), so one dimension cannot describe them.
    fn two_skills(models: usize, items: usize, seed: u64) -> Responses {
        use rand_core::SeedableRng;
        let mut g = super::sim::Gen(rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let beta: Vec<f64> = (0..items).map(|_| g.normal()).collect();
        let theta: Vec<[f64; 2]> = (0..models).map(|_| [g.normal(), g.normal()]).collect();
        let data = theta
            .iter()
            .flat_map(|t| (0..items).map(|i| 1.0 / (1.0 + (beta[i] - 1.5 * t[i % 2]).exp())).collect::<Vec<_>>())
            .map(|p| if g.uniform() < p { 1.0 } else { 0.0 })
            .collect();
        Responses::new(models, items, data)
    }

    /// The cross-validated number of ability dimensions follows the data's own.
    #[test]
    fn cross_validation_chooses_the_data_dimensions() {
        let items = random_items(300, 60, 2);
        let chosen = |r: &Responses| {
            let (fit, cv) = Irt::fit_cross_validated(r, &IrtConfig::default(), &items);
            assert_eq!(cv.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2, 4, 8]);
            fit.dims
        };
        let (one, two) = (chosen(&simulate(64, 300, 1, 3).responses), chosen(&two_skills(64, 300, 3)));
        assert!(one == 1 && two >= 2, "chosen for 1-D data: {one}, for two skills: {two}");
    }

    #[test]
    fn anchor_points_cover_the_items_with_weights_summing_to_one() {
        let s = simulate(40, 300, 2, 4);
        let a = AnchorPoints::fit(&s.responses, 20, 5);
        assert_eq!(a.items.len(), 20);
        assert!((a.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut sorted = a.items.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "distinct anchors");
    }

    #[test]
    fn weighted_mean_and_tau() {
        let e = weighted_mean(&[1.0, 0.0, 1.0, 1.0], &[0.25; 4]);
        assert!((e.value - 0.75).abs() < 1e-12);
        assert!((e.std_error - (0.25f64 * 0.1875).sqrt()).abs() < 1e-12);
        assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), 1.0);
        assert_eq!(kendall_tau(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), -1.0);
    }
}
