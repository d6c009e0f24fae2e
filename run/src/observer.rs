//! How a run reaches its front end: the run writes its own `log.jsonl` and records; what a
//! person watching should see comes through a [`RunObserver`] (the CLI draws bars, prints
//! JSON lines or tables; a test collects; a worker logs).

use std::path::PathBuf;

use evomerge_search::{Candidate, Outcome};

use crate::records::LogEvent;

/// Which stage of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Merge parameters (genome → recipe → merged weights).
    Params,
    /// Data-flow paths through the loaded models.
    DataFlow,
}

impl Stage {
    /// Its name in broker messages.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Params => "params",
            Stage::DataFlow => "dataflow",
        }
    }
}

/// What happened, in words a front end may show.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A new run's directory was created.
    RunDirectory(PathBuf),
    /// Calibration rows found on disk.
    CalibrationRowsRead {
        read: usize,
        total: usize,
    },
    /// Calibration merges start being scored.
    CalibrationStarted {
        sources: usize,
        merges: usize,
    },
    CalibrationDone {
        seconds: f64,
    },
    /// Candidates are scored this many at a time (more than one).
    Workers(usize),
    /// A stage ended (not interrupted): its termination, evaluations, folder, and with one
    /// objective the best minimized value and the file holding it.
    StageFinished {
        stage: Stage,
        termination: String,
        evaluations: u64,
        dir: PathBuf,
        best: Option<(f64, PathBuf)>,
    },
    /// The data-flow stage starts.
    DataFlowStage {
        genes: usize,
        models: usize,
        layers: usize,
    },
    /// What the broker side of a scale-out run is doing (attached, waiting for workers, ...).
    Broker(String),
    /// Something the user should know that does not stop the run.
    Warning(String),
}

/// Receives a run's progress. Every method has a default that ignores it.
pub trait RunObserver {
    /// A notice (see [`Notice`]).
    fn notice(&mut self, _notice: &Notice) {}
    /// An event, already appended to the stage's `log.jsonl`.
    fn event(&mut self, _event: &LogEvent) {}
    /// A stage's loop starts: `budget` evaluations at most.
    fn stage_started(&mut self, _stage: Stage, _budget: Option<u64>) {}
    /// A candidate's outcome was told to the optimizer (replayed ones too).
    fn evaluated(&mut self, _candidate: &Candidate, _outcome: &Outcome) {}
    /// A stage's loop ended (also when interrupted).
    fn stage_ended(&mut self, _stage: Stage) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl RunObserver for Quiet {}
