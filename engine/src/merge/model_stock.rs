//! Model Stock (Jang et al. 2024, arXiv:2403.19522), as mergekit's `model_stock`.
//!
//! With base w₀ and N ≥ 2 fine-tuned models wᵢ, offsets δᵢ = wᵢ − w₀; `cos θ` is the mean over
//! pairs i<j of `⟨δᵢ,δⱼ⟩ / max(‖δᵢ‖‖δⱼ‖, 1e-6)` (clamped to [−1, 1]) over the whole tensor, or
//! per row with `filter_wise`. `t = N cos θ / (1 + (N−1) cos θ)` (0 when the denominator is
//! below 1e-6), and the result `t · mean(wᵢ) + (1 − t) · w₀`. A tensor that only one model
//! changed has cos θ = 0 and stays at the base.

use rayon::prelude::*;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct ModelStock;

fn interpolation(base: &[f32], ws: &[&[f32]]) -> f64 {
    let offs: Vec<Vec<f64>> = ws.iter().map(|w| w.iter().zip(base).map(|(a, b)| (a - b) as f64).collect()).collect();
    let norms: Vec<f64> = offs.iter().map(|o| o.iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    let mut cos = Vec::new();
    for i in 0..offs.len() {
        for j in i + 1..offs.len() {
            let dot: f64 = offs[i].iter().zip(&offs[j]).map(|(a, b)| a * b).sum();
            cos.push((dot / (norms[i] * norms[j]).max(1e-6)).clamp(-1.0, 1.0));
        }
    }
    let c = cos.iter().sum::<f64>() / cos.len() as f64;
    let n = ws.len() as f64;
    let den = 1.0 + (n - 1.0) * c;
    if den.abs() < 1e-6 { 0.0 } else { n * c / den }
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn reference(&self) -> &'static str {
        "https://arxiv.org/abs/2403.19522"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::bool("filter_wise", Scope::Global, false, "compute the angle per row instead of per tensor")]
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Required
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let base = input.base_tensor()?;
        let ws: Vec<&[f32]> = input.others().map(|(x, _)| x).collect();
        if ws.len() < 2 {
            return Err(MergeError::ModelCount { method: "model_stock", need: "needs at least two models besides the base", got: ws.len() });
        }
        let cols = if input.params.flag("filter_wise") && input.shape.len() >= 2 { *input.shape.last().unwrap_or(&1) } else { base.len() };
        let inv_n = 1.0 / ws.len() as f32;
        out.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, o)| {
            let s = r * cols;
            let rows: Vec<&[f32]> = ws.iter().map(|w| &w[s..s + o.len()]).collect();
            let t = interpolation(&base[s..s + o.len()], &rows) as f32;
            for (j, y) in o.iter_mut().enumerate() {
                let avg = rows.iter().map(|w| w[j]).sum::<f32>() * inv_n;
                *y = t * avg + (1.0 - t) * base[s + j];
            }
        });
        Ok(())
    }
}
