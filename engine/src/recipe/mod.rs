//! Merge recipes: mergekit's YAML schema in, a [`MergePlan`] (one task per output tensor) out.
//!
//! - [`schema`]: the YAML structures (strict: unknown keys are errors).
//! - [`param`]: parameter settings (scalars, gradients, filtered lists) and their evaluation.
//! - [`plan`]: resolving models, checking architectures and shapes, and expanding slices into
//!   per-tensor tasks with fully resolved parameters.

pub mod param;
pub mod plan;
pub mod schema;

pub use param::ParamSetting;
pub use plan::{MergePlan, TensorTask};
pub use schema::Recipe;
