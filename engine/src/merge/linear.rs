//! Linear (weighted average), Wortsman et al. 2022 "Model soups" (arXiv:2203.05482).
//!
//! `y = Σᵢ wᵢ·xᵢ / Σᵢ wᵢ` with `normalize` (the default), else `Σᵢ wᵢ·xᵢ`; f32 in mergekit's
//! order. **Departure from mergekit:** with `normalize` and weights summing to 0 (|Σw| < 1e-8)
//! mergekit divides by zero and writes inf/NaN; evomerge skips the division (as mergekit's own
//! task arithmetic does for the same case).

use rayon::prelude::*;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct Linear;

/// What the weighted sum is divided by: Σᵢ wᵢ (an f32 sum in model order) with `normalize`,
/// unless |Σᵢ wᵢ| < 1e-8 (see the module's departure from mergekit).
pub fn divisor(normalize: bool, weights: &[f32]) -> Option<f32> {
    let sum: f32 = weights.iter().sum();
    (normalize && sum.abs() >= 1e-8).then_some(sum)
}

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn reference(&self) -> &'static str {
        "https://arxiv.org/abs/2203.05482"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float("weight", Scope::PerModel, -1e6, 1e6, None, (0.0, 1.0), "the model's weight"),
            ParamSpec::bool("normalize", Scope::Global, true, "divide by the sum of weights"),
        ]
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Unused
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let w: Vec<f32> = input.model_params.iter().map(|p| p.get("weight") as f32).collect();
        let div = divisor(input.params.flag("normalize"), &w);
        // Model-major per chunk (vectorizable); f32 sums in model order, as mergekit.
        out.par_chunks_mut(1 << 14).enumerate().for_each(|(c, o)| {
            let (s, n) = (c << 14, o.len());
            o.fill(0.0);
            for (t, &wi) in input.tensors.iter().zip(&w) {
                o.iter_mut().zip(&t[s..s + n]).for_each(|(y, x)| *y += wi * x);
            }
            if let Some(d) = div {
                o.iter_mut().for_each(|y| *y /= d);
            }
        });
        Ok(())
    }
}
