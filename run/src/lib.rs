//! evomerge-run: the search run as a library.
//!
//! ```text
//! Experiment (TOML) ──► Setup: base checkpoint, GenomeLayout, tasks, runtime, the run's
//!                       Materializer (streamed | resident | on the device), OpenedCheckpoints
//!        │ calibrate: anchor / IRT estimators fitted on sources + random merges (calibration.jsonl)
//!        ▼
//! stage (parameter space, then data flow in RUN_DIR/dataflow/):
//!   search::Runner ask ─► batch ─► pool: evaluate(candidate) on each worker ─► EvaluationRecord
//!                    ◄─ tell in candidate order ◄─ records appended to evaluations.jsonl
//!        │ references: sources and the default-parameter baseline (references.json)
//!        ▼
//! RunEnd ─► the front end (RunObserver: notices, LogEvents, progress)
//! ```
//!
//! [`start`], [`resume`] and [`dry_run`] are what the CLI calls; [`evaluate`] is one candidate
//! from genome to record, the call an evaluation worker makes; [`RunDir`] and [`records`] read
//! a run directory back (typed, and compatible with every earlier release's files).

pub mod broker;
pub mod calibration;
pub mod driver;
pub mod error;
pub mod evaluate;
pub mod experiment;
pub mod observer;
pub mod pool;
pub mod records;
pub mod references;
pub mod resources;
pub mod run_dir;
pub mod setup;
pub mod stage;
pub mod summary;

pub use driver::{DryRun, DryRunDataFlow, RunEnd, RunOptions, dry_run, make_optimizer, resume, start};
pub use error::{Result, RunError};
pub use evaluate::{StageKind, Worker, evaluate};
pub use experiment::Experiment;
pub use observer::{Notice, Quiet, RunObserver, Stage};
pub use records::{EvaluationRecord, LogEvent, Objectives, RecordOutcome, Reference, Scores, best_by_mean, ranked};
pub use run_dir::RunDir;
pub use setup::Setup;
pub use summary::{RunSummary, StageSummary, summarize};
#[cfg(test)]
mod tests;
