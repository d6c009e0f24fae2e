//! Karcher (Riemannian / Fréchet) mean on the unit hypersphere, as mergekit's `karcher`.
//!
//! Inputs get equal weights αᵢ = 1/N. Each tensor is split into norm ‖xᵢ‖ and direction
//! uᵢ; inputs with ‖xᵢ‖ ≤ tol are left out of the direction (all zero → zero tensor). Starting
//! from the normalized weighted mean direction `m`, iterate at most `max_iter` times:
//! `T = Σ α̂ᵢ θᵢ/sin θᵢ (uᵢ − cos θᵢ m)` with `θᵢ = acos⟨m, uᵢ⟩` (terms with θᵢ < tol skipped);
//! stop when ‖T‖ < tol, else `m ← cos‖T‖ m + sin‖T‖ T/‖T‖`, renormalized. Result
//! `(Σ αᵢ‖xᵢ‖) · m`. Reference: Karcher 1977, https://en.wikipedia.org/wiki/Karcher_mean.

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct Karcher;

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn reference(&self) -> &'static str {
        "https://en.wikipedia.org/wiki/Karcher_mean"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::int("max_iter", Scope::Global, 1, 1000, 10, "maximum fixed-point iterations"),
            ParamSpec::float("tol", Scope::Global, 0.0, 1.0, Some(1e-5), (1e-5, 1e-5), "convergence tolerance"),
        ]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Unused
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let xs = &input.tensors;
        if xs.len() == 1 {
            out.copy_from_slice(xs[0]);
            return Ok(());
        }
        let tol = input.params.get("tol");
        let max_iter = input.params.get("max_iter") as usize;
        let alpha = 1.0 / xs.len() as f64;
        let norms: Vec<f64> = xs.iter().map(|x| x.iter().map(|&v| (v as f64) * v as f64).sum::<f64>().sqrt()).collect();
        let valid: Vec<usize> = (0..xs.len()).filter(|&i| norms[i] > tol).collect();
        if valid.is_empty() {
            out.fill(0.0);
            return Ok(());
        }
        let a_hat = 1.0 / valid.len() as f64;
        let units: Vec<Vec<f64>> = valid.iter().map(|&i| xs[i].iter().map(|&v| v as f64 / norms[i]).collect()).collect();
        let n = input.numel();
        let mut mean = vec![0f64; n];
        for u in &units {
            mean.iter_mut().zip(u).for_each(|(m, v)| *m += a_hat * v);
        }
        let mn = norm(&mean);
        if mn < tol {
            mean.clone_from(&units[0]);
        } else {
            mean.iter_mut().for_each(|m| *m /= mn);
        }
        for _ in 0..max_iter {
            let mut tangent = vec![0f64; n];
            for u in &units {
                let d = dot(&mean, u).clamp(-1.0, 1.0);
                let theta = d.acos();
                if theta < tol {
                    continue;
                }
                let f = a_hat * theta / theta.sin();
                tangent.iter_mut().zip(u.iter().zip(&mean)).for_each(|(t, (x, m))| *t += f * (x - d * m));
            }
            let tn = norm(&tangent);
            if tn < tol {
                break;
            }
            mean.iter_mut().zip(&tangent).for_each(|(m, t)| *m = tn.cos() * *m + tn.sin() * t / tn);
            let un = norm(&mean);
            if un > tol {
                mean.iter_mut().for_each(|m| *m /= un);
            }
        }
        let scale: f64 = norms.iter().map(|nx| alpha * nx).sum();
        out.iter_mut().zip(&mean).for_each(|(o, m)| *o = (scale * m) as f32);
        Ok(())
    }
}
