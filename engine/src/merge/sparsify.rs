//! Sparsification of task vectors (δ = model − base), the first step of the generalized task
//! arithmetic methods. Semantics are mergekit 0.1.5's (`mergekit/sparsify.py`):
//!
//! - **magnitude** (TIES, Yadav et al. 2023, arXiv:2306.01708): keep the `k = ⌊density·n⌋`
//!   largest |δ| (at least one), zero the rest. Found by rank selection ([`super::select`]), not
//!   a sort.
//! - **magnitude_outliers** (Model Breadcrumbs, Davari & Belilovsky 2023, arXiv:2312.06795):
//!   with `target = ⌊density·n⌋`, `n_top = ⌊γ·n⌋`, `n_bot = max(0, n − target − n_top)`, keep
//!   the ascending magnitude ranks `[n_bot, n_bot + target)`: the smallest and the `γ` largest
//!   are dropped. **Departure from mergekit:** when `⌊γ·n⌋ = 0` mergekit slices
//!   `indices[n_bot:-0]`, which is empty, and zeroes the whole δ; evomerge keeps the window
//!   (the `target` largest), which is what the method intends.
//! - **random** (DARE, Yu et al. 2023, arXiv:2311.03099): keep each element with probability
//!   `density`.
//! - **della_magprune** (DELLA, Deep et al. 2024, arXiv:2406.11617): within each row (a 1-D
//!   tensor is one row), rank |δ| ascending, `r ∈ [0, 1]` the normalized rank; keep with
//!   probability `p = density − ε + 2ε·r`. Requires `0 < density ± ε < 1`. (For a row of one
//!   element mergekit divides 0 by 0; evomerge uses `r = ½`.)
//!
//! **rescale** matches mergekit's L1 rescale: `δ' = m⊙δ · ‖δ‖₁ / ‖m⊙δ‖₁`, skipped when either
//! norm is below 1e-7 (not the DARE paper's `1/density`).

use rayon::prelude::*;

use super::rng::CounterRng;
use super::select::keep_rank_window;
use crate::merge::error::MergeError;

const CHUNK: usize = 1 << 16;

/// Which sparsification a generalized task-arithmetic preset applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsifier {
    Magnitude,
    MagnitudeOutliers,
    Random,
    DellaMagprune,
}

/// The magnitude-rank window `[lo, hi)` kept by the rank-selecting sparsifiers (`density` in
/// (0, 1)): the `⌊density·n⌋` largest (at least one) for magnitude, `[n_bot, n_bot + target)`
/// for outliers.
pub(crate) fn window(method: Sparsifier, n: usize, density: f64, gamma: f64) -> (usize, usize) {
    match method {
        Sparsifier::Magnitude => {
            let k = ((density * n as f64) as usize).max(1);
            (n - k, n)
        }
        _ => {
            let target = (density * n as f64) as usize;
            let n_top = (gamma * n as f64) as usize;
            let n_bot = n.saturating_sub(target + n_top);
            (n_bot, n_bot + target)
        }
    }
}

fn l1(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK).map(|c| c.iter().map(|v| v.abs() as f64).sum::<f64>()).sum()
}

/// Sparsifies `delta` in place and returns the rescale factor `‖δ‖₁ / ‖m⊙δ‖₁` (1 without
/// `rescale`), which the caller folds into the model's weight instead of another pass over δ.
/// `rows` is the number of rows (for DELLA's row-wise ranks).
#[allow(clippy::too_many_arguments)]
pub fn sparsify(
    delta: &mut [f32],
    rows: usize,
    method: Sparsifier,
    density: f64,
    gamma: f64,
    epsilon: f64,
    rescale: bool,
    rng: CounterRng,
) -> Result<f32, MergeError> {
    if density >= 1.0 {
        return Ok(1.0);
    }
    let n = delta.len();
    if density <= 0.0 || n == 0 {
        delta.iter_mut().for_each(|v| *v = 0.0);
        return Ok(1.0);
    }
    let mut before = if rescale && method != Sparsifier::Random { Some(l1(delta)) } else { None };
    match method {
        Sparsifier::Magnitude | Sparsifier::MagnitudeOutliers => {
            let (lo, hi) = window(method, n, density, gamma);
            keep_rank_window(delta, lo, hi);
        }
        Sparsifier::Random => {
            // one pass: mask, and the L1 norm before masking for the rescale
            let l1_before: f64 = delta
                .par_chunks_mut(CHUNK)
                .enumerate()
                .map(|(c, chunk)| {
                    let mut keep = [false; CHUNK];
                    rng.keep_run((c * CHUNK) as u64, density, &mut keep[..chunk.len()]);
                    let mut acc = 0f64;
                    for (v, k) in chunk.iter_mut().zip(keep) {
                        acc += v.abs() as f64;
                        *v = if k { *v } else { 0.0 };
                    }
                    acc
                })
                .sum();
            before = Some(l1_before);
        }
        Sparsifier::DellaMagprune => {
            if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                return Err(MergeError::DellaWindow { density, epsilon });
            }
            let cols = n / rows.max(1);
            delta.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
                let m = row.len();
                let mut order: Vec<u32> = (0..m as u32).collect();
                order.sort_by(|&a, &b| row[a as usize].abs().total_cmp(&row[b as usize].abs()).then(a.cmp(&b)));
                let mut keep = vec![false; m];
                for (rank, &i) in order.iter().enumerate() {
                    let rn = if m > 1 { rank as f64 / (m - 1) as f64 } else { 0.5 };
                    let p = density - epsilon + 2.0 * epsilon * rn;
                    keep[i as usize] = rng.uniform((r * cols + i as usize) as u64) < p;
                }
                for (v, k) in row.iter_mut().zip(keep) {
                    if !k {
                        *v = 0.0;
                    }
                }
            });
        }
    }
    // `before` is taken above whenever `rescale` is set
    let (true, Some(before)) = (rescale, before) else {
        return Ok(1.0);
    };
    let after = l1(delta);
    Ok(if before >= 1e-7 && after >= 1e-7 { before as f32 / after as f32 } else { 1.0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::rng::tensor_seed;

    fn rng() -> CounterRng {
        CounterRng::new(tensor_seed(0, "t"), 0)
    }

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| if i % 2 == 0 { i as f32 + 1.0 } else { -(i as f32) - 1.0 }).collect()
    }

    #[test]
    fn magnitude_keeps_the_largest() {
        let mut d = ramp(10);
        sparsify(&mut d, 1, Sparsifier::Magnitude, 0.3, 0.0, 0.0, false, rng()).expect("ok");
        assert_eq!(d.iter().filter(|v| **v != 0.0).count(), 3);
        assert_eq!(&d[7..], &[-8.0, 9.0, -10.0]);
    }

    #[test]
    fn outliers_drop_top_and_bottom() {
        let mut d = ramp(10);
        sparsify(&mut d, 1, Sparsifier::MagnitudeOutliers, 0.5, 0.2, 0.0, false, rng()).expect("ok");
        // target 5, n_top 2, n_bot 3 -> ranks 3..8 kept (|x| = 4..8)
        let kept: Vec<f32> = d.iter().copied().filter(|v| *v != 0.0).map(f32::abs).collect();
        assert_eq!(kept, vec![4.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn outliers_with_gamma_rounding_to_zero_keep_the_window() {
        let mut d = ramp(10);
        sparsify(&mut d, 1, Sparsifier::MagnitudeOutliers, 0.5, 0.01, 0.0, false, rng()).expect("ok");
        assert_eq!(d.iter().filter(|v| **v != 0.0).count(), 5, "mergekit would zero everything");
    }

    #[test]
    fn random_keeps_density_and_rescales_l1() {
        let d0: Vec<f32> = (0..100_000).map(|i| ((i % 97) as f32 - 48.0) / 10.0).collect();
        let mut d = d0.clone();
        let s = sparsify(&mut d, 1, Sparsifier::Random, 0.3, 0.0, 0.0, true, rng()).expect("ok");
        assert!((s - 1.0 / 0.3).abs() < 0.05, "rescale ≈ 1/density: {s}");
        let kept = d.iter().filter(|v| **v != 0.0).count() as f64 / d0.len() as f64;
        let kept_nonzero_src = d0.iter().filter(|v| **v != 0.0).count() as f64 / d0.len() as f64;
        assert!((kept / kept_nonzero_src - 0.3).abs() < 0.01, "{kept}");
        let (a, b) = (l1(&d0), l1(&d) * s as f64);
        assert!((a - b).abs() / a < 1e-5, "L1 preserved: {a} vs {b}");
    }

    #[test]
    fn della_prefers_large_magnitudes() {
        let rows = 50;
        let d0: Vec<f32> = (0..rows * 200).map(|i| (i % 200) as f32 + 1.0).collect();
        let mut d = d0.clone();
        sparsify(&mut d, rows, Sparsifier::DellaMagprune, 0.5, 0.0, 0.4, false, rng()).expect("ok");
        let kept_small = (0..rows).map(|r| (0..50).filter(|c| d[r * 200 + c] != 0.0).count()).sum::<usize>();
        let kept_large = (0..rows).map(|r| (150..200).filter(|c| d[r * 200 + c] != 0.0).count()).sum::<usize>();
        // p ≈ 0.1..0.3 for the smallest quarter, 0.7..0.9 for the largest
        assert!(kept_large > 3 * kept_small, "{kept_small} vs {kept_large}");
        let mut bad = d0.clone();
        assert!(sparsify(&mut bad, rows, Sparsifier::DellaMagprune, 0.5, 0.0, 0.5, false, rng()).is_err());
    }
}
