//! evomerge-fitness: lightweight fitness estimation (and, later, the evaluation tasks).
//!
//! ```text
//! item-level results of the source models (+ calibration candidates)
//!        │ fit: irt::Irt (2PL, d dims)            anchor::AnchorPoints (k-means on items)
//!        ▼
//! a candidate scored on a small item subset ──► estimators::Estimate {value, std_error}
//!        random subset │ anchor points │ IRT │ p-IRT │ gp-IRT   (tinyBenchmarks, Polo et al. 2024)
//! ```
//!
//! Built so far: the estimators on response matrices (simulated data in tests and in
//! `examples/bench_estimators.rs`). Tasks, the score cache and `evomerge eval` come with the
//! model runtime (see the fitness issue).

pub mod estimators;

pub use estimators::{AnchorPoints, Estimate, Irt, IrtConfig, Responses};
