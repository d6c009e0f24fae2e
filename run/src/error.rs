//! The run crate's one error type. Run-scoped errors only: a candidate-scoped failure (NaN
//! logits, an unmergeable point) is recorded as the candidate's failure, not returned.

use std::path::{Path, PathBuf};

use evomerge_engine::EngineError;
use evomerge_fitness::tasks::{SpecError, TaskError};
use evomerge_search::SearchError;

/// Errors raised by `evomerge-run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file or directory of the run (or the experiment file) could not be read or written.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file the user named could not be read.
    #[error("reading {path}: {err}")]
    Reading { path: PathBuf, err: std::io::Error },
    /// A file could not be parsed (experiment TOML, resolved config, records).
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// The experiment is valid TOML but cannot run as written.
    #[error("{0}")]
    Experiment(String),
    /// The run directory's state forbids the operation (already a run, config changed, ...).
    #[error("{0}")]
    RunDir(String),
    /// Not enough memory for the run as configured.
    #[error("{0}")]
    Resources(String),
    /// The broker (Redis) refused or could not be reached, or a run on it is not usable.
    #[error("{0}")]
    Broker(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Task(#[from] TaskError),
    /// A task of the experiment that cannot be loaded.
    #[error(transparent)]
    Spec(Box<SpecError>),
    #[error(transparent)]
    Search(#[from] SearchError),
}

impl RunError {
    pub(crate) fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        move |err| RunError::Io { path, err }
    }

    pub(crate) fn bad_file(path: impl AsRef<Path>, reason: impl std::fmt::Display) -> Self {
        RunError::BadFile { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
}

impl From<SpecError> for RunError {
    fn from(e: SpecError) -> Self {
        RunError::Spec(Box::new(e))
    }
}

pub type Result<T, E = RunError> = std::result::Result<T, E>;
