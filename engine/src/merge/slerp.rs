//! SLERP between two models (Shoemake 1985), as mergekit: the **whole tensor** is one vector.
//!
//! With `v0` = the base model's tensor (t = 0) and `v1` = the other's (t = 1):
//! `d = clamp(⟨v0/‖v0‖, v1/‖v1‖⟩, −1, 1)` (a norm ≤ 1e-8 is taken as 1); if `|d| > 0.9995`
//! plain lerp `(1−t)·v0 + t·v1`, else with `θ = acos d`:
//! `sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1` on the *unnormalized* tensors. Reductions
//! and coefficients in f64, output f32.

use rayon::prelude::*;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct Slerp;

/// Norm and dot product in f64.
pub(crate) fn norms_dot(a: &[f32], b: &[f32]) -> (f64, f64, f64) {
    a.par_chunks(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .map(|(x, y)| {
            x.iter().zip(y).fold((0.0, 0.0, 0.0), |(aa, bb, ab), (&p, &q)| {
                let (p, q) = (p as f64, q as f64);
                (aa + p * p, bb + q * q, ab + p * q)
            })
        })
        .reduce(|| (0.0, 0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1, x.2 + y.2))
}

/// `out = c0·a + c1·b` in f64, rounded to f32.
pub(crate) fn combine(a: &[f32], b: &[f32], c0: f64, c1: f64, out: &mut [f32]) {
    out.par_iter_mut().zip(a.par_iter().zip(b)).for_each(|(o, (&p, &q))| *o = (c0 * p as f64 + c1 * q as f64) as f32);
}

/// The SLERP coefficients `(c0, c1)` for normalized dot `dot` (already clamped).
pub(crate) fn slerp_coefficients(t: f64, dot: f64, lerp_above: f64) -> (f64, f64) {
    if dot.abs() > lerp_above {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }

    fn reference(&self) -> &'static str {
        "https://en.wikipedia.org/wiki/Slerp"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float("t", Scope::Global, -1e6, 1e6, None, (0.0, 1.0), "interpolation factor (0 = base model)")]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Required
    }

    fn input_count(&self) -> Option<std::ops::RangeInclusive<usize>> {
        Some(2..=2)
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let v0 = input.base_tensor()?;
        let (v1, _) = input.others().next().ok_or(MergeError::ModelCount { method: "slerp", need: "needs a second model", got: 1 })?;
        let t = input.params.get("t");
        let (aa, bb, ab) = norms_dot(v0, v1);
        let na = if aa.sqrt() > 1e-8 { aa.sqrt() } else { 1.0 };
        let nb = if bb.sqrt() > 1e-8 { bb.sqrt() } else { 1.0 };
        let dot = (ab / (na * nb)).clamp(-1.0, 1.0);
        let (c0, c1) = slerp_coefficients(t, dot, 0.9995);
        combine(v0, v1, c0, c1, out);
        Ok(())
    }
}
