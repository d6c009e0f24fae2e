//! NuSLERP (mergekit's "new" SLERP): weights instead of `t`, optional base model (then it
//! interpolates task vectors), and row-wise or whole-tensor spherical interpolation.
//!
//! `t = w₁ / (w₀ + w₁)` (0.5 when |w₀ + w₁| < 1e-6). With a base model the inputs are the task
//! vectors `xᵢ − base` and the result is added back to the base. Vectors are the whole tensor
//! (`nuslerp_flatten`, the default), else rows along the last dimension, or along the first
//! with `nuslerp_row_wise`. Per vector: `u = v/max(‖v‖, 1e-7)`, `θ = acos(clamp(⟨u₀,u₁⟩))`;
//! if `|sin θ| < 1e-8` lerp, else `(sin((1−t)θ)·v₀ + sin(tθ)·v₁) / sin θ`. f64 internally.

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use super::slerp::{combine, norms_dot};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct NuSlerp;

fn nuslerp_vec(t: f64, a: &[f32], b: &[f32], out: &mut [f32]) {
    let (aa, bb, ab) = norms_dot(a, b);
    let dot = (ab / (aa.sqrt().max(1e-7) * bb.sqrt().max(1e-7))).clamp(-1.0, 1.0);
    let theta = dot.acos();
    let s = theta.sin();
    let (c0, c1) = if s.abs() < 1e-8 { (1.0 - t, t) } else { (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s) };
    for ((o, &p), &q) in out.iter_mut().zip(a).zip(b) {
        *o = (c0 * p as f64 + c1 * q as f64) as f32;
    }
}

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn reference(&self) -> &'static str {
        "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("weight", Scope::PerModel, -1e6, 1e6, None, (0.0, 1.0), "relative weight of the model"),
            ParamSpec::bool("nuslerp_flatten", Scope::Global, true, "interpolate the whole tensor as one vector"),
            ParamSpec::bool("nuslerp_row_wise", Scope::Global, false, "interpolate columns (dim 0) instead of rows"),
        ]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Optional
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let others: Vec<(&[f32], f64)> = input.others().map(|(x, p)| (x, p.get("weight"))).collect();
        if others.len() != 2 {
            return Err(MergeError::ModelCount { method: "nuslerp", need: "merges exactly two models (plus an optional base)", got: others.len() });
        }
        let sum = others[0].1 + others[1].1;
        let t = if sum.abs() < 1e-6 { 0.5 } else { others[1].1 / sum };
        let base = input.base.map(|b| input.tensors[b]);
        let (a, b): (Vec<f32>, Vec<f32>) = match base {
            Some(base) => (others[0].0.iter().zip(base).map(|(x, y)| x - y).collect(), others[1].0.iter().zip(base).map(|(x, y)| x - y).collect()),
            None => (others[0].0.to_vec(), others[1].0.to_vec()),
        };
        let n = a.len();
        let mut res = vec![0f32; n];
        let flatten = input.params.flag("nuslerp_flatten") || input.shape.len() < 2;
        if flatten {
            nuslerp_vec(t, &a, &b, &mut res);
        } else if !input.params.flag("nuslerp_row_wise") {
            let cols = *input.shape.last().unwrap_or(&n);
            for ((o, x), y) in res.chunks_mut(cols).zip(a.chunks(cols)).zip(b.chunks(cols)) {
                nuslerp_vec(t, x, y, o);
            }
        } else {
            // vectors along dim 0: gather each column of the [rows, rest] view
            let rows = input.shape[0];
            let cols = n / rows;
            let (mut x, mut y, mut o) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
            for c in 0..cols {
                for r in 0..rows {
                    x[r] = a[r * cols + c];
                    y[r] = b[r * cols + c];
                }
                nuslerp_vec(t, &x, &y, &mut o);
                for r in 0..rows {
                    res[r * cols + c] = o[r];
                }
            }
        }
        match base {
            Some(base) => combine(&res, base, 1.0, 1.0, out),
            None => out.copy_from_slice(&res),
        }
        Ok(())
    }
}
