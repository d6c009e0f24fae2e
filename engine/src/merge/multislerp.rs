//! Multi-SLERP: barycentric interpolation of N tensors on the hypersphere (Goddard,
//! "multislerp", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as mergekit.
//!
//! Inputs (task vectors `xᵢ − base` when a base model is given) are flattened; `wᵢ` normalized
//! to sum 1 when `normalize_weights`. `uᵢ = xᵢ/(‖xᵢ‖ + ε)`, `m = Σ wᵢuᵢ`; if `‖m‖ < ε`: with two
//! inputs fall back to `Σ wᵢxᵢ`, else error (antipodal inputs). Otherwise `m ← m/‖m‖`, tangent
//! vectors `τᵢ = uᵢ − ⟨uᵢ,m⟩m`, `τ = Σ wᵢτᵢ`, `r = m cos‖τ‖ + τ sin‖τ‖/‖τ‖` (‖τ‖ + ε), and the
//! result `r · Σ wᵢ‖xᵢ‖` (+ base). f64 internally.

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct MultiSlerp;

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }

    fn reference(&self) -> &'static str {
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("weight", Scope::PerModel, -1e6, 1e6, None, (0.0, 1.0), "the model's weight"),
            ParamSpec::bool("normalize_weights", Scope::Global, true, "normalize weights to sum to 1"),
            ParamSpec::float("eps", Scope::Global, 0.0, 1.0, Some(1e-8), (1e-8, 1e-8), "numerical floor"),
        ]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Optional
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let base = input.base.map(|b| input.tensors[b]);
        let others: Vec<(&[f32], f64)> = input.others().map(|(x, p)| (x, p.get("weight"))).collect();
        if others.len() == 1 {
            out.copy_from_slice(others[0].0);
            return Ok(());
        }
        let eps = input.params.get("eps");
        let mut w: Vec<f64> = others.iter().map(|o| o.1).collect();
        if input.params.flag("normalize_weights") {
            let s: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= s);
        }
        let xs: Vec<Vec<f64>> = others
            .iter()
            .map(|(x, _)| match base {
                Some(b) => x.iter().zip(b).map(|(p, q)| (p - q) as f64).collect(),
                None => x.iter().map(|&p| p as f64).collect(),
            })
            .collect();
        let n = input.numel();
        let norms: Vec<f64> = xs.iter().map(|x| norm(x)).collect();
        let units: Vec<Vec<f64>> = xs.iter().zip(&norms).map(|(x, nx)| x.iter().map(|v| v / (nx + eps)).collect()).collect();
        let mut mean = vec![0f64; n];
        for (u, wi) in units.iter().zip(&w) {
            mean.iter_mut().zip(u).for_each(|(m, v)| *m += wi * v);
        }
        let mn = norm(&mean);
        let mut add_base = |r: Vec<f64>| match base {
            Some(b) => out.iter_mut().zip(r.iter().zip(b)).for_each(|(o, (x, y))| *o = (x + *y as f64) as f32),
            None => out.iter_mut().zip(&r).for_each(|(o, x)| *o = *x as f32),
        };
        if mn < eps {
            if xs.len() == 2 {
                let r: Vec<f64> = xs[0].iter().zip(&xs[1]).map(|(a, b)| a * w[0] + b * w[1]).collect();
                add_base(r);
                return Ok(());
            }
            return Err(MergeError::ZeroMean);
        }
        mean.iter_mut().for_each(|m| *m /= mn);
        let mut tangent = vec![0f64; n];
        for (u, wi) in units.iter().zip(&w) {
            let d: f64 = u.iter().zip(&mean).map(|(a, b)| a * b).sum();
            tangent.iter_mut().zip(u.iter().zip(&mean)).for_each(|(t, (a, m))| *t += wi * (a - d * m));
        }
        let tn = norm(&tangent) + eps;
        let avg_norm: f64 = norms.iter().zip(&w).map(|(a, b)| a * b).sum();
        let r: Vec<f64> = mean.iter().zip(&tangent).map(|(m, t)| (m * tn.cos() + t * (tn.sin() / tn)) * avg_norm).collect();
        add_base(r);
        Ok(())
    }
}
