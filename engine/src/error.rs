//! The engine's one error type. Every I/O error carries its path, every tensor error the
//! tensor's name (and shapes where they matter), so that a user can act on the message alone.

use std::path::PathBuf;

/// Errors raised by `evomerge-engine`.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file or directory could not be read, written or created.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A safetensors file is malformed (bad header, offsets past the end, unknown dtype, ...).
    #[error("{path}: corrupt safetensors file: {reason}")]
    CorruptSafetensors { path: PathBuf, reason: String },
    /// A JSON file (config, shard index) could not be parsed or lacks a needed key.
    #[error("{path}: {reason}")]
    BadJson { path: PathBuf, reason: String },
    /// A model reference could not be resolved to a checkpoint directory.
    #[error("model '{model}' not found: {reason}")]
    ModelNotFound { model: String, reason: String },
    /// The model's architecture is not in the architecture table.
    #[error("{path}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArchitecture { path: PathBuf, arch: String, supported: String },
    /// A checkpoint cannot be run by the model runtime (activation, incompatible layer shapes).
    #[error("model '{model}': {reason}")]
    UnsupportedModel { model: String, reason: String },
    /// A tensor the recipe or architecture needs is not in the checkpoint.
    #[error("model '{model}' has no tensor '{tensor}'")]
    MissingTensor { model: String, tensor: String },
    /// A tensor has a dtype evomerge cannot merge.
    #[error("tensor '{tensor}' in {path}: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    /// Models disagree on a tensor's shape.
    #[error("tensor '{tensor}': shape {got:?} in '{model}' differs from {expected:?} in '{reference}'")]
    ShapeMismatch { tensor: String, model: String, got: Vec<usize>, reference: String, expected: Vec<usize> },
    /// Models disagree on their architecture.
    #[error("architecture mismatch: '{model}' is {got}, '{reference}' is {expected}")]
    ArchitectureMismatch { model: String, got: String, reference: String, expected: String },
    /// The merge recipe is invalid (unknown key, unknown method, parameter out of range, ...).
    #[error("{context}: {reason}")]
    BadRecipe { context: String, reason: String },
    /// A merge method failed on one tensor.
    #[error("merging tensor '{tensor}' with {method}: {reason}")]
    Merge { tensor: String, method: String, reason: crate::merge::MergeError },
    /// The user interrupted the operation (Ctrl-C / SIGTERM); nothing was left half-written.
    #[error("interrupted")]
    Interrupted,
    /// A device that does not exist or was not compiled into this binary.
    #[error("device '{device}': {reason}")]
    Device { device: String, reason: String },
    /// A tokenizer file could not be loaded or used.
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// A model cannot run this input (token id out of vocabulary, sequence longer than the
    /// context, an empty sequence, a layer path that names a missing layer, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The forward pass produced NaN or infinite values. Candidate-scoped: a search marks the
    /// candidate failed and goes on.
    #[error("non-finite values (NaN or inf) in the {what} of model '{model}'")]
    NonFinite { model: String, what: String },
    /// The output location is unusable.
    #[error("output {path}: {reason}")]
    Output { path: PathBuf, reason: String },
}

impl EngineError {
    /// Wraps an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), err: source }
    }

    /// Whether the error belongs to one candidate (the search goes on) rather than the run.
    pub fn is_candidate_scoped(&self) -> bool {
        matches!(self, Self::NonFinite { .. } | Self::Merge { .. })
    }

    /// A recipe error with a context (file, key) and reason.
    pub fn recipe(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::BadRecipe { context: context.into(), reason: reason.into() }
    }
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
