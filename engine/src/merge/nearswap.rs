//! NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as
//! mergekit: interpolate towards the secondary model only where the two are already close.
//!
//! With `v₀` the base model and `v₁` the other: `λ = clamp(t / |v₀ − v₁|, 0, 1)` (1 where the
//! difference is 0), result `λ·v₁ + (1−λ)·v₀`. `t > 0` is the "sameness" threshold.

use rayon::prelude::*;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct NearSwap;

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn reference(&self) -> &'static str {
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float("t", Scope::Global, 1e-12, 1e6, None, (1e-5, 1e-2), "similarity threshold (> 0)")]
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Required
    }

    fn input_count(&self) -> Option<std::ops::RangeInclusive<usize>> {
        Some(2..=2)
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let v0 = input.base_tensor()?;
        let (v1, _) = input.others().next().ok_or(MergeError::ModelCount { method: "nearswap", need: "needs a second model", got: 1 })?;
        let t = input.params.get("t") as f32;
        out.par_iter_mut().zip(v0.par_iter().zip(v1)).for_each(|(o, (&a, &b))| {
            let l = t / (a - b).abs();
            let l = if l.is_finite() { l.clamp(0.0, 1.0) } else { 1.0 };
            *o = l * b + (1.0 - l) * a;
        });
        Ok(())
    }
}
