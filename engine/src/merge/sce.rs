//! SCE (Select, Calculate, Erase; FuseChat 2.0, Wan et al. 2024, arXiv:2408.07990), as
//! mergekit's `sce`.
//!
//! Task vectors δᵢ = xᵢ − base. **Select**: with `select_topk` τ < 1, keep the ⌊τ·nnz(σ²)⌋
//! elements with the largest variance σ² across models (population variance), zero the rest in
//! every δᵢ. **Calculate**: matrix-level weights `wᵢ = mean(δᵢ²)`, normalized to sum 1 (uniform
//! if all zero). **Erase**: TIES-style sign election on the *unweighted* Σᵢ δᵢ; mᵢ masks the
//! minority signs. Result `base + Σᵢ mᵢwᵢδᵢ / Σᵢ mᵢwᵢ` (divisor 0 → 1).

use rayon::prelude::*;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use super::select::keep_rank_window;
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct Sce;

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn reference(&self) -> &'static str {
        "https://arxiv.org/abs/2408.07990"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("select_topk", Scope::Global, 0.0, 1.0, Some(1.0), (0.1, 1.0), "fraction of highest-variance elements kept"),
            ParamSpec::bool("int8_mask", Scope::Global, false, "store masks as int8 (no numerical effect)").inert(),
        ]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Required
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let base = input.base_tensor()?;
        let mut deltas: Vec<Vec<f32>> = input.others().map(|(x, _)| x.iter().zip(base).map(|(a, b)| a - b).collect()).collect();
        if deltas.is_empty() {
            out.copy_from_slice(base);
            return Ok(());
        }
        let n = base.len();
        let m = deltas.len() as f32;
        let topk = input.params.get("select_topk");
        if topk < 1.0 {
            let mut var: Vec<f32> = (0..n)
                .into_par_iter()
                .map(|e| {
                    let mean = deltas.iter().map(|d| d[e]).sum::<f32>() / m;
                    deltas.iter().map(|d| (d[e] - mean) * (d[e] - mean)).sum::<f32>() / m
                })
                .collect();
            let nnz = var.iter().filter(|v| **v != 0.0).count();
            let k = (topk * nnz as f64) as usize;
            // mark kept positions with a positive sentinel, the rest zero
            var.iter_mut().for_each(|v| *v = v.abs() + f32::MIN_POSITIVE);
            keep_rank_window(&mut var, n - k, n);
            for d in &mut deltas {
                d.iter_mut().zip(&var).for_each(|(x, v)| {
                    if *v == 0.0 {
                        *x = 0.0;
                    }
                });
            }
        }
        let mut w: Vec<f32> = deltas.iter().map(|d| (d.iter().map(|x| (x * x) as f64).sum::<f64>() / n as f64) as f32).collect();
        let s: f32 = w.iter().sum();
        if s == 0.0 {
            w.iter_mut().for_each(|x| *x = 1.0 / m);
        } else {
            w.iter_mut().for_each(|x| *x /= s);
        }
        out.par_iter_mut().enumerate().for_each(|(e, o)| {
            let total: f32 = deltas.iter().map(|d| d[e]).sum();
            let majority = if total >= 0.0 { 1.0 } else { -1.0 };
            let (mut mixed, mut div) = (0f32, 0f32);
            for (d, wi) in deltas.iter().zip(&w) {
                if d[e] != 0.0 && d[e].signum() == majority {
                    mixed += d[e] * wi;
                    div += wi;
                }
            }
            *o = base[e] + mixed / if div == 0.0 { 1.0 } else { div };
        });
        Ok(())
    }
}
