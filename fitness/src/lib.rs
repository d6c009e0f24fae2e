//! evomerge-fitness: evaluation tasks and lightweight fitness estimators.
//!
//! Not built yet (see the fitness issue): tasks (multiple-choice log-likelihood, generation +
//! exact match, perplexity), subset / anchor-point / IRT estimators and the per-item score cache
//! will live here. The crate exists so the workspace layout of `DESIGN.md` is in place.
