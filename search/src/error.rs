//! The search crate's error type.

/// Errors of optimizers and search spaces (never a panic on bad input).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error("search space: {0}")]
    BadSpace(String),
    #[error("optimizer settings: {0}")]
    BadConfig(String),
    #[error("candidate {0} was never asked (or was already told)")]
    UnknownCandidate(u64),
    #[error("candidate {id}: objective {index} is {value} (objectives must be finite; report a failure instead)")]
    NonFiniteObjective { id: u64, index: usize, value: f64 },
    #[error("candidate {id}: {got} objectives, the optimizer expects {expected}")]
    ObjectiveCount { id: u64, got: usize, expected: usize },
    #[error("checkpoint: {0}")]
    BadCheckpoint(String),
}
