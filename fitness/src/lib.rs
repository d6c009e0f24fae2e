//! evomerge-fitness: the evaluation tasks and the lightweight fitness estimators built on them.
//!
//! ```text
//! item-level results of the source models (+ calibration candidates)
//!        │ fit: irt::Irt (2PL, d dims)            anchor::AnchorPoints (k-means on items)
//!        ▼
//! a candidate scored on a small item subset ──► estimators::Estimate {value, std_error}
//!        random subset │ anchor points │ IRT │ p-IRT │ gp-IRT   (tinyBenchmarks, Polo et al. 2024)
//! ```
//!
//! Tasks ([`tasks`]) score a real model with lm-eval-harness's conventions (multiple choice,
//! generation + exact match, perplexity) from TOML specs or presets; the estimators work on
//! the resulting item-level response matrices.

pub mod estimator;
pub mod estimators;
pub mod tasks;

pub use estimator::{Direction, Fitness, FitnessEstimator, Method, Objective, TaskEstimator, successive_halving};
pub use estimators::{AnchorPoints, Estimate, Irt, IrtConfig, Responses};
