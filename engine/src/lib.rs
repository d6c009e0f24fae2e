//! evomerge-engine: checkpoints in and out, architectures as data, and merge methods.
//!
//! Data flow of a one-shot merge (`evomerge merge recipe.yaml`):
//!
//! ```text
//! recipe.yaml ──► recipe::Recipe (mergekit schema, strict)
//!                   │ resolve models (io::hub), open checkpoints (io::Checkpoint, mmap, lazy)
//!                   ▼
//!              recipe::MergePlan: one TensorTask per output tensor
//!                   (inputs, resolved per-tensor parameters incl. gradients and filters)
//!                   │ executor: per tensor, decode inputs → f32, merge::MergeMethod::merge
//!                   ▼
//!              io::ShardedWriter (streamed shards) inside io::OutputDir (atomic rename)
//! ```
//!
//! A search takes the same path without YAML or disk output: [`genome::GenomeLayout::plan`]
//! turns a genome into a `MergePlan` over checkpoints opened once ([`io::OpenedCheckpoints`]),
//! and the run's [`Materializer`] merges it into the runtime's weights (streamed from the
//! memory maps, or in place from inputs held resident by [`resident`], on the host or the
//! device). [`dataflow`] decodes data-flow genomes into layer paths.
//!
//! The model runtime ([`model`]) runs checkpoints or merged tensors with burn: a forward pass
//! that follows data-flow layer paths, batched log-likelihood scoring and greedy generation.

pub mod alloc;
pub mod arch;
pub mod buffer;
pub mod dataflow;
pub mod dtype;
pub mod error;
pub mod executor;
pub mod genome;
pub mod io;
pub mod materialize;
pub mod merge;
pub mod model;
pub mod recipe;
pub mod resident;
pub mod source;

pub use arch::Architecture;
pub use dtype::DType;
pub use error::{EngineError, Result};
pub use executor::{MergeOptions, MergeProgress, MergeSummary};
pub use io::{Checkpoint, OpenedCheckpoints};
pub use materialize::Materializer;
pub use recipe::{MergePlan, Recipe};
pub use source::{MemorySource, Tensor, TensorSource};
