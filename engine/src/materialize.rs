//! How a run turns a candidate's [`MergePlan`] into the weights of its runtime, chosen once
//! per run: streamed from the memory-mapped checkpoints and swapped in, or merged in place
//! from inputs held resident in the runtime's weight layout (on the host, or on the runtime's
//! device where [`ResidentMerge::hold_on_device`] put them). The values are the same either
//! way (`tests/it/resident.rs`).

use crate::error::Result;
use crate::executor::merge_to_memory;
use crate::model::LanguageModel;
use crate::recipe::MergePlan;
use crate::resident::ResidentMerge;
use crate::source::TensorSource;

/// The materialization path of a run.
#[derive(Debug, Default)]
pub enum Materializer {
    /// Merge from the memory maps into host memory, then load into the runtime.
    #[default]
    Streamed,
    /// Merge in place from resident inputs.
    Resident(ResidentMerge),
}

impl Materializer {
    /// Merges `plan` into loaded model `model` of `runtime`.
    pub fn materialize(&self, plan: &MergePlan, runtime: &mut dyn LanguageModel, model: usize) -> Result<()> {
        match self {
            Materializer::Resident(r) => r.materialize(plan, runtime, model),
            Materializer::Streamed => runtime.load_weights(model, &merge_to_memory(plan)? as &dyn TensorSource),
        }
    }

    /// Whether candidates are merged in place.
    pub fn in_place(&self) -> bool {
        matches!(self, Materializer::Resident(_))
    }
}
