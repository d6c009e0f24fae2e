//! evomerge-search: ask/tell optimizers (CMA-ES, NSGA-II, random search), the runner and its
//! checkpoints. No ML dependencies: a genome is a `Vec<f64>` inside bounds.
//!
//! Not built yet (see the search-core issue).
