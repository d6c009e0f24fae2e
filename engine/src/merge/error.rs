//! Why a merge method cannot merge a tensor. [`crate::EngineError::Merge`] wraps it with the
//! tensor and method; a recipe that plans has its parameters checked, so most of these are
//! caught before the first tensor.

/// Errors of merge methods and their parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// A float parameter outside its range.
    #[error("{name} = {value} is outside [{min}, {max}]")]
    OutOfRange { name: &'static str, value: f64, min: f64, max: f64 },
    /// An integer parameter that is not an integer in its range.
    #[error("{name} = {value} is not an integer in [{min}, {max}]")]
    NotAnInteger { name: &'static str, value: f64, min: i64, max: i64 },
    #[error("{name} = {value} is not a boolean")]
    NotABoolean { name: &'static str, value: f64 },
    /// A parameter gradient with no values.
    #[error("empty gradient")]
    EmptyGradient,
    #[error("needs a base_model")]
    NoBase,
    /// The method needs another number of input models: `need` says how many.
    #[error("{method} {need}, got {got}")]
    ModelCount { method: &'static str, need: &'static str, got: usize },
    /// DELLA's drop window leaves [0, 1].
    #[error("della needs 0 < density ± epsilon < 1 (density {density}, epsilon {epsilon})")]
    DellaWindow { density: f64, epsilon: f64 },
    /// multislerp: the weighted mean of the unit inputs vanishes.
    #[error("the weighted mean of the unit inputs is zero (antipodal inputs with balancing weights)")]
    ZeroMean,
    /// The consumer of a streamed merge stopped taking chunks.
    #[error("the writer stopped")]
    SinkClosed,
}
