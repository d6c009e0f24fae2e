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
    /// A tensor the recipe or architecture needs is not in the checkpoint.
    #[error("model '{model}' has no tensor '{tensor}'")]
    MissingTensor { model: String, tensor: String },
    /// A tensor has a dtype evomerge cannot merge.
    #[error("tensor '{tensor}' in {path}: unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    /// Models disagree on a tensor's shape.
    #[error("tensor '{tensor}': shape {got:?} in '{model}' differs from {expected:?} in '{reference}'")]
    ShapeMismatch {
        tensor: String,
        model: String,
        got: Vec<usize>,
        reference: String,
        expected: Vec<usize>,
    },
    /// Models disagree on their architecture.
    #[error("architecture mismatch: '{model}' is {got}, '{reference}' is {expected}")]
    ArchitectureMismatch { model: String, got: String, reference: String, expected: String },
    /// The merge recipe is invalid (unknown key, unknown method, parameter out of range, ...).
    #[error("{context}: {reason}")]
    BadRecipe { context: String, reason: String },
    /// A merge method failed on one tensor.
    #[error("merging tensor '{tensor}' with {method}: {reason}")]
    Merge { tensor: String, method: String, reason: String },
    /// The user interrupted the operation (Ctrl-C / SIGTERM); nothing was left half-written.
    #[error("interrupted")]
    Interrupted,
    /// The output location is unusable.
    #[error("output {path}: {reason}")]
    Output { path: PathBuf, reason: String },
}

impl EngineError {
    /// Wraps an `std::io::Error` with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), err: source }
    }

    /// A recipe error with a context (file, key) and reason.
    pub fn recipe(context: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::BadRecipe { context: context.into(), reason: reason.into() }
    }
}

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
