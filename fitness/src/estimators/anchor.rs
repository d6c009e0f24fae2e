//! Anchor points (tinyBenchmarks): cluster the items by their correctness pattern across the
//! training models (each item is the vector of the models' scores on it), k-means with k = the
//! item budget (k-means++ seeding, Lloyd iterations, seeded), keep the item nearest each
//! centroid, and weight it by its cluster's share of the items. The estimate is the weighted
//! mean of a candidate's scores on the anchors.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};

use super::{Estimate, Responses, weighted_mean};

/// Chosen anchor items and their weights (summing to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorPoints {
    pub items: Vec<usize>,
    pub weights: Vec<f64>,
}

fn dist2(r: &Responses, item: usize, c: &[f64]) -> f64 {
    (0..r.models).map(|m| (r.get(m, item) - c[m]).powi(2)).sum()
}

impl AnchorPoints {
    /// `k` anchors from the training responses.
    pub fn fit(r: &Responses, k: usize, seed: u64) -> Self {
        let (n, l) = (r.items, r.models);
        let k = k.clamp(1, n);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let column = |i: usize| -> Vec<f64> { (0..l).map(|m| r.get(m, i)).collect() };
        // k-means++ seeding
        let mut centroids = vec![column(((uniform() * n as f64) as usize).min(n - 1))];
        let mut d2: Vec<f64> = (0..n).map(|i| dist2(r, i, &centroids[0])).collect();
        while centroids.len() < k {
            let total: f64 = d2.iter().sum();
            let mut pick = uniform() * total;
            let mut chosen = n - 1;
            for (i, d) in d2.iter().enumerate() {
                if pick < *d {
                    chosen = i;
                    break;
                }
                pick -= d;
            }
            let c = column(chosen);
            d2.iter_mut().enumerate().for_each(|(i, d)| *d = d.min(dist2(r, i, &c)));
            centroids.push(c);
        }
        let mut assign = vec![0usize; n];
        for _ in 0..30 {
            for (i, a) in assign.iter_mut().enumerate() {
                *a = (0..k).min_by(|&x, &y| dist2(r, i, &centroids[x]).total_cmp(&dist2(r, i, &centroids[y]))).unwrap_or(0);
            }
            for (c, centroid) in centroids.iter_mut().enumerate() {
                let members: Vec<usize> = (0..n).filter(|&i| assign[i] == c).collect();
                if members.is_empty() {
                    continue;
                }
                for (m, v) in centroid.iter_mut().enumerate() {
                    *v = members.iter().map(|&i| r.get(m, i)).sum::<f64>() / members.len() as f64;
                }
            }
        }
        let mut items = Vec::new();
        let mut weights = Vec::new();
        for (c, centroid) in centroids.iter().enumerate() {
            let members: Vec<usize> = (0..n).filter(|&i| assign[i] == c).collect();
            if let Some(&best) = members.iter().min_by(|&&x, &&y| dist2(r, x, centroid).total_cmp(&dist2(r, y, centroid))) {
                items.push(best);
                weights.push(members.len() as f64 / n as f64);
            }
        }
        Self { items, weights }
    }

    /// Weighted mean of a candidate's scores on the anchors (`y` parallel to `items`).
    pub fn estimate(&self, y: &[f64]) -> Estimate {
        weighted_mean(y, &self.weights)
    }
}
