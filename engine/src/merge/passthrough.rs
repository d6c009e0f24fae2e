//! Passthrough: copies one input tensor unchanged (optionally times `scale`). With `slices:` it
//! builds frankenmerges: each output layer is a layer of one source model, renumbered.

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use crate::merge::error::MergeError;

#[derive(Debug, Clone, Copy)]
pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn reference(&self) -> &'static str {
        "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough"
    }

    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::float("scale", Scope::PerModel, -1e6, 1e6, Some(1.0), (0.0, 2.0), "multiplies the tensor")]
    }

    fn elementwise(&self) -> bool {
        true
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Unused
    }

    fn input_count(&self) -> Option<std::ops::RangeInclusive<usize>> {
        Some(1..=1)
    }

    fn merge(&self, input: &MergeInput, _scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let s = input.model_params[0].get("scale") as f32;
        let x = input.tensors[0];
        out.iter_mut().zip(x).for_each(|(o, v)| *o = v * s);
        Ok(())
    }
}
