//! evomerge-datasets: task data readers (JSONL, parquet), shipped sample sets and the synthetic
//! generators of the demo zoo.
//!
//! Not built yet (see the fitness issue).
