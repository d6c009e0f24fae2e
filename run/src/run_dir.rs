//! The run directory (DESIGN.md, "Run directory"): its file names, and typed readers that
//! `status`, `export`, `report` and `resume` share. Readers work while the run is live: only
//! complete lines are read, and a line cut by a crash is skipped.
//!
//! ```text
//! RUN_DIR/
//!   config.resolved.toml, config.sha256   the experiment as run, and its hash
//!   checkpoint.json (+ .prev.json)        the optimizer (search::Runner)
//!   evaluations.jsonl                     one EvaluationRecord per candidate
//!   best.yaml                             the best candidate's recipe (several objectives: the
//!                                         lowest mean minimized objective, as `export --pick best`)
//!   references.json                       sources and the default-parameter baseline
//!   calibration.jsonl                     rows of the anchor / IRT calibration
//!   log.jsonl                             LogEvents
//!   dataflow/                             the data-flow stage: checkpoint, evaluations, best_path.json
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Result, RunError};
use crate::experiment::Experiment;
use crate::records::{EvaluationRecord, LogEvent, Reference, best_by_mean};

pub const CONFIG: &str = "config.resolved.toml";
pub const CONFIG_HASH: &str = "config.sha256";
pub const CHECKPOINT: &str = "checkpoint.json";
pub const EVALUATIONS: &str = "evaluations.jsonl";
pub const REFERENCES: &str = "references.json";
pub const CALIBRATION: &str = "calibration.jsonl";
pub const LOG: &str = "log.jsonl";
/// A stage's Pareto front (several objectives): the records of its members.
pub const FRONT: &str = "front.json";
/// The lock file of a run in progress (holds the pid of the process running it).
pub const LOCK: &str = "run.lock";
/// The data-flow stage's folder.
pub const DATAFLOW_DIR: &str = "dataflow";
/// The data-flow stage's models entry naming the best parameter-space merge.
pub const BEST: &str = "best";

/// SHA-256 of a resolved configuration (hex).
pub fn config_hash(text: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

/// The records of `dir/evaluations.jsonl` (a run directory or its `dataflow/` stage), in file
/// order, one per candidate id (the first); unreadable lines are skipped. Empty when there is
/// no file.
pub fn read_evaluations(dir: &Path) -> Vec<EvaluationRecord> {
    let mut seen = HashSet::new();
    read_evaluation_lines(dir).into_iter().filter(|r| seen.insert(r.id)).collect()
}

/// Every readable line of `dir/evaluations.jsonl`, repeats included (what replay reads). Read
/// as bytes, line by line: a damaged line (even invalid UTF-8) costs that line, not the file.
pub(crate) fn read_evaluation_lines(dir: &Path) -> Vec<EvaluationRecord> {
    let bytes = std::fs::read(dir.join(EVALUATIONS)).unwrap_or_default();
    bytes.split(|&b| b == b'\n').filter_map(|l| serde_json::from_slice(l).ok()).collect()
}

/// A run directory written by `evomerge search`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file of the run directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The data-flow stage's folder.
    pub fn dataflow_dir(&self) -> PathBuf {
        self.path.join(DATAFLOW_DIR)
    }

    /// The experiment as run (`config.resolved.toml`).
    pub fn experiment(&self) -> Result<Experiment> {
        Experiment::from_run_dir(&self.path)
    }

    /// Parameter-space records, in file order, one per id.
    pub fn evaluations(&self) -> Vec<EvaluationRecord> {
        read_evaluations(&self.path)
    }

    /// Data-flow records, in file order, one per id.
    pub fn dataflow_evaluations(&self) -> Vec<EvaluationRecord> {
        read_evaluations(&self.dataflow_dir())
    }

    /// The reference points, if written.
    pub fn references(&self) -> Vec<Reference> {
        std::fs::read_to_string(self.file(REFERENCES)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
    }

    /// The readable events of `log.jsonl`, in order.
    pub fn log_events(&self) -> Vec<LogEvent> {
        let text = std::fs::read_to_string(self.file(LOG)).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Calibration rows scored so far and the rows the run needs (sources + calibration
    /// merges); `None` when no objective uses an anchor / IRT estimator.
    pub fn calibration_progress(&self, exp: &Experiment) -> Option<(usize, usize)> {
        if !exp.objectives.iter().any(|o| o.estimator.needs_calibration()) {
            return None;
        }
        let total = exp.source_count() + exp.calibration.candidates;
        let text = std::fs::read_to_string(self.file(CALIBRATION)).unwrap_or_default();
        let rows = text.lines().skip(1).take_while(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()).count();
        Some((rows.min(total), total))
    }

    /// The parameter-space candidate the data-flow stage starts from: the best (one objective)
    /// or the candidate with the best mean minimized objective.
    pub fn best_params_candidate(&self) -> Result<EvaluationRecord> {
        best_by_mean(&self.evaluations()).cloned().ok_or_else(|| RunError::RunDir("the parameter-space stage has no scored candidate".into()))
    }

    /// Takes the run's lock: one process at a time searches into a run directory. An advisory
    /// lock (`flock`) on `run.lock`, released when the returned guard drops or the process
    /// ends in any way (a kill -9 leaves no stale lock). Refused, naming the holder's pid,
    /// while another process holds it.
    pub fn lock(&self) -> Result<RunLock> {
        let path = self.file(LOCK);
        let mut file = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path).map_err(RunError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(RunError::RunDir(format!(
                    "{} is in use by another evomerge process{}; wait for it to end or stop it first",
                    self.path.display(),
                    if holder.is_empty() { String::new() } else { format!(" (pid {holder})") }
                )));
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(RunError::Io { path, err }),
        }
        use std::io::{Seek, Write};
        let pid = std::process::id().to_string();
        file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(pid.as_bytes())).map_err(RunError::io(&path))?;
        Ok(RunLock { _file: file })
    }

    /// Writes `text` to the run's file `name` atomically.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        write_atomic(&self.file(name), text)
    }
}

/// Holds a run directory's lock ([`RunDir::lock`]) while it lives.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

/// [`evomerge_search::write_atomic`] with the run crate's error.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    evomerge_search::write_atomic(path, text.as_bytes()).map_err(RunError::io(path))
}
