//! Checkpoint I/O: Hugging Face model directories in and out.
//!
//! - [`hub`] resolves a model reference (local path or hub id) to a directory.
//! - [`config`] reads `config.json` (transformers 4 and 5 spellings).
//! - [`safetensors`] memory-maps one `.safetensors` file and validates its header.
//! - [`checkpoint`] ties config + shards together: a lazy, per-tensor [`crate::TensorSource`].
//! - [`opened`] keeps checkpoints opened once for every plan of a run.
//! - [`writer`] writes sharded safetensors and whole model directories atomically.

pub mod checkpoint;
pub mod config;
pub mod hub;
pub mod opened;
pub mod safetensors;
pub mod writer;

pub use checkpoint::Checkpoint;
pub use config::{ConfigError, ModelConfig, RopeScaling};
pub use hub::resolve_model;
pub use opened::OpenedCheckpoints;
pub use writer::{OutputDir, ShardedWriter, TensorEntry};
