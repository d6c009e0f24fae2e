//! Passthrough: copies one input tensor unchanged (optionally times `scale`). With `slices:` it
//! builds frankenmerges: each output layer is a layer of one source model, renumbered.

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope};

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

    fn base_role(&self) -> BaseRole {
        BaseRole::Unused
    }

    fn input_count(&self) -> Option<std::ops::RangeInclusive<usize>> {
        Some(1..=1)
    }

    fn merge(&self, input: &MergeInput) -> Result<Vec<f32>, String> {
        let s = input.model_params[0].get("scale") as f32;
        let x = input.tensors[0];
        Ok(if s == 1.0 { x.to_vec() } else { x.iter().map(|v| v * s).collect() })
    }
}
