//! evomerge-search: ask/tell optimizers with state you can save, and nothing else.
//!
//! ```text
//! SearchSpace (bounds, gene kinds) ──► Optimizer::ask() ──► Vec<Candidate{id, genome}>
//!                                            ▲                      │ caller evaluates
//!                                            └── Optimizer::tell(Vec<Evaluation{id, Outcome}>)
//! ```
//!
//! A genome is a `Vec<f64>` inside the space's bounds; objectives are `f64`s that every
//! optimizer **minimizes** ([`Direction::to_minimized`] is the one conversion). Optimizers never
//! call the objective, accept evaluations in any order and in batches, and serialize their whole
//! state — random generator included — so that a restored optimizer asks exactly the genomes an
//! uninterrupted one would have ([`OptimizerState`]). No ML dependency: tests run on analytic
//! functions ([`testfns`]) in milliseconds.
//!
//! Optimizers: [`RandomSearch`], [`CmaEs`] (full, separable, active, IPOP restarts, margin for
//! binary and integer genes), [`Nsga2`] (NSGA-II, and NSGA-III with [`Nsga2Config::nsga3`]) with
//! exact hypervolume ([`pareto`]). The [`Runner`] owns the loop: budgets, observers,
//! cancellation and atomic checkpoints.

pub mod atomic;
pub mod base;
pub mod cmaes;
pub mod error;
pub mod nsga2;
pub mod pareto;
#[cfg(test)]
mod props;
pub mod random;
pub mod rng;
pub mod runner;
pub mod space;
pub mod testfns;

pub use atomic::write_atomic;
pub use base::{Candidate, Evaluation, Optimizer, OptimizerState, Outcome, StopReason};
pub use cmaes::{CmaEs, CmaEsConfig};
pub use error::SearchError;
pub use nsga2::{Nsga2, Nsga2Config, das_dennis, das_dennis_count, nsga3_directions};
pub use random::RandomSearch;
pub use runner::{AsyncObjective, Budget, GenerationReport, Next, Observer, Runner, Termination};
pub use space::{Direction, GeneKind, SearchSpace};
