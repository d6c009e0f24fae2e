//! The run loop: budgets, termination, observers, cancellation and atomic checkpoints.
//!
//! The runner owns the loop; the optimizer only asks and tells, and the objective is a closure
//! (`evomerge-run` plugs merge + fitness in). After every generation — and when cancelled
//! (Ctrl-C / SIGTERM set the flag the caller passes) — the whole state is written atomically:
//! the new state is written to `checkpoint.json.tmp` and fsynced, the current `checkpoint.json`
//! becomes `checkpoint.prev.json`, the temporary file is renamed into place and the directory
//! fsynced (`crate::atomic`). [`Runner::resume`] reads the checkpoint, falling back to the
//! previous one (and saying so) when it is corrupt or truncated. Evaluations told before a
//! cancellation are kept;
//! candidates still pending are re-asked after a resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::atomic::{commit, write_synced};
use crate::base::{Candidate, Evaluation, Optimizer, OptimizerState, Outcome, StopReason};
use crate::error::SearchError;

/// Limits of a run (all optional; checked between generations, wall time also between
/// evaluations).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    pub max_evaluations: Option<u64>,
    pub max_generations: Option<u64>,
    pub max_seconds: Option<f64>,
}

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Termination {
    Evaluations,
    Generations,
    WallTime,
    /// The optimizer's own criterion.
    Converged(StopReason),
    /// The cancel flag was set (a checkpoint was written).
    Interrupted,
}

/// What observers see after each generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationReport {
    pub generation: u64,
    pub evaluations: u64,
    pub failures: u64,
    pub best: Option<f64>,
    pub seconds: f64,
}

/// Progress, logging and best-so-far hooks.
pub trait Observer {
    fn on_evaluation(&mut self, _candidate: &Candidate, _evaluation: &Evaluation) {}
    fn on_generation(&mut self, _report: &GenerationReport) {}
    /// A checkpoint could not be read and the previous one was used.
    fn on_fallback(&mut self, _reason: &str) {}
}

/// Everything needed to continue a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunState {
    optimizer: String,
    failures: u64,
    seconds: f64,
}

/// Drives an optimizer against an objective.
pub struct Runner {
    optimizer: Box<dyn Optimizer>,
    budget: Budget,
    checkpoint: Option<PathBuf>,
    cancel: Arc<AtomicBool>,
    failures: u64,
    /// Seconds spent in earlier sessions of this run (resume).
    seconds_before: f64,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("optimizer", &self.optimizer.name()).field("budget", &self.budget).finish()
    }
}

const PREV: &str = "prev.json";

/// Where the checkpoint before `p` is kept (`checkpoint.prev.json` for `checkpoint.json`).
pub fn prev_path(p: &Path) -> PathBuf {
    p.with_extension(PREV)
}

/// Writes `bytes` to `path` atomically ([`crate::write_atomic`]), keeping the previous file as
/// `*.prev.json`.
pub fn write_checkpoint(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = write_synced(path, bytes)?;
    if path.exists() {
        std::fs::rename(path, prev_path(path))?;
    }
    commit(&tmp, path)
}

impl Runner {
    /// A new run; `checkpoint` is where state is written (none: no checkpoints).
    pub fn new(optimizer: Box<dyn Optimizer>, budget: Budget, checkpoint: Option<PathBuf>, cancel: Arc<AtomicBool>) -> Self {
        Self { optimizer, budget, checkpoint, cancel, failures: 0, seconds_before: 0.0 }
    }

    /// Continues the run saved at `checkpoint` (falling back to the previous checkpoint when the
    /// latest is unreadable); `expected` is the optimizer the run must be using.
    pub fn resume(
        checkpoint: PathBuf,
        expected: &str,
        budget: Budget,
        cancel: Arc<AtomicBool>,
        observer: &mut dyn Observer,
    ) -> Result<Self, SearchError> {
        let read = |p: &Path| -> Result<(RunState, OptimizerState), SearchError> {
            let text = std::fs::read_to_string(p).map_err(|e| SearchError::BadCheckpoint(format!("{}: {e}", p.display())))?;
            let run: RunState = serde_json::from_str(&text).map_err(|e| SearchError::BadCheckpoint(format!("{}: {e}", p.display())))?;
            let opt = OptimizerState::from_json(&run.optimizer).map_err(|e| SearchError::BadCheckpoint(format!("{}: {e}", p.display())))?;
            Ok((run, opt))
        };
        let (run, state) = match read(&checkpoint) {
            Ok(x) => x,
            Err(first) => {
                let prev = prev_path(&checkpoint);
                let x = read(&prev).map_err(|second| SearchError::BadCheckpoint(format!("{first}; previous checkpoint: {second}")))?;
                observer.on_fallback(&format!("{first}; continuing from {}", prev.display()));
                x
            }
        };
        let optimizer = state.restore(expected)?;
        Ok(Self { optimizer, budget, checkpoint: Some(checkpoint), cancel, failures: run.failures, seconds_before: run.seconds })
    }

    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    fn save(&self, seconds: f64) -> Result<(), SearchError> {
        let Some(path) = &self.checkpoint else { return Ok(()) };
        let run = RunState { optimizer: self.optimizer.state().to_json(), failures: self.failures, seconds };
        let text = serde_json::to_string(&run).map_err(|e| SearchError::BadCheckpoint(e.to_string()))?;
        write_checkpoint(path, text.as_bytes()).map_err(|e| SearchError::BadCheckpoint(format!("writing {}: {e}", path.display())))
    }

    fn exhausted(&self, seconds: f64) -> Option<Termination> {
        let o = &self.optimizer;
        if self.budget.max_evaluations.is_some_and(|m| o.evaluations() >= m) {
            return Some(Termination::Evaluations);
        }
        if self.budget.max_generations.is_some_and(|m| o.generation() >= m) {
            return Some(Termination::Generations);
        }
        if self.budget.max_seconds.is_some_and(|m| seconds >= m) {
            return Some(Termination::WallTime);
        }
        o.stop().map(Termination::Converged)
    }

    /// Runs until a budget, the optimizer's criterion or cancellation ends it.
    pub fn run(&mut self, objective: &mut dyn FnMut(&Candidate) -> Outcome, observer: &mut dyn Observer) -> Result<Termination, SearchError> {
        self.run_batched(1, &mut |cs: &[Candidate]| cs.iter().map(&mut *objective).collect(), observer)
    }

    /// [`Runner::run`] handing the objective up to `batch` candidates of a generation at a time
    /// (to score them in parallel). The optimizer is told each outcome in candidate order, one
    /// at a time, exactly as `run` does, so the trajectory does not depend on `batch`;
    /// cancellation is checked between batches. An objective that returns fewer outcomes than
    /// candidates was cancelled mid-batch: the outcomes it has are told (in order), a
    /// checkpoint is written and the run ends `Interrupted`.
    pub fn run_batched(
        &mut self,
        batch: usize,
        objective: &mut dyn FnMut(&[Candidate]) -> Vec<Outcome>,
        observer: &mut dyn Observer,
    ) -> Result<Termination, SearchError> {
        let start = Instant::now();
        let elapsed = |s: &Self| s.seconds_before + start.elapsed().as_secs_f64();
        loop {
            if let Some(t) = self.exhausted(elapsed(self)) {
                self.save(elapsed(self))?;
                return Ok(t);
            }
            for chunk in self.optimizer.ask().chunks(batch.max(1)) {
                if self.cancel.load(Ordering::Relaxed) {
                    self.save(elapsed(self))?;
                    return Ok(Termination::Interrupted);
                }
                let outcomes = objective(chunk);
                assert!(outcomes.len() <= chunk.len(), "at most one outcome per candidate");
                // fewer outcomes than candidates: the objective was cancelled while waiting
                // (remote workers); the first ones are told, the rest re-asked after a resume
                let cut = outcomes.len() < chunk.len();
                for (c, outcome) in chunk.iter().zip(outcomes) {
                    let e = Evaluation { id: c.id, outcome };
                    if matches!(e.outcome, Outcome::Failed(_)) {
                        self.failures += 1;
                    }
                    observer.on_evaluation(c, &e);
                    self.optimizer.tell(vec![e])?;
                }
                if cut {
                    self.cancel.store(true, Ordering::Relaxed);
                    self.save(elapsed(self))?;
                    return Ok(Termination::Interrupted);
                }
            }
            let report = GenerationReport {
                generation: self.optimizer.generation(),
                evaluations: self.optimizer.evaluations(),
                failures: self.failures,
                best: self.optimizer.best().map(|(_, v)| v),
                seconds: elapsed(self),
            };
            self.save(report.seconds)?;
            observer.on_generation(&report);
        }
    }
}

/// What an asynchronous objective has for the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A candidate finished.
    Done(u64, Outcome),
    /// More candidates may be in flight now (workers joined).
    Wider,
    /// Cancelled while waiting.
    Cancelled,
}

/// The objective of an asynchronous run ([`Runner::run_async`]): candidates are submitted
/// as they are asked and come back in whatever order they finish.
pub trait AsyncObjective {
    /// Candidates that may be in flight now (at least 1 is used).
    fn capacity(&mut self) -> usize;
    /// Starts scoring `c` (returns at once).
    fn submit(&mut self, c: &Candidate);
    /// Waits for the next finished candidate.
    fn next(&mut self) -> Next;
}

impl Runner {
    /// The asynchronous (steady-state) loop: as many candidates in flight as the objective
    /// takes, each told as soon as it finishes ([`Optimizer::ask_one`]), a new one asked in
    /// its place. A checkpoint is written after every tell and the asks that follow it, with
    /// the candidates in flight: a resumed run submits those again, and the objective replays
    /// the ones already recorded in the order they were told. Reports come when the
    /// optimizer's generation count moves (a population's worth of tells). Budgets stop the
    /// asks; what is in flight is still told.
    pub fn run_async(&mut self, objective: &mut dyn AsyncObjective, observer: &mut dyn Observer) -> Result<Termination, SearchError> {
        let start = Instant::now();
        let elapsed = |s: &Self| s.seconds_before + start.elapsed().as_secs_f64();
        let mut flight: std::collections::BTreeMap<u64, Candidate> = self.optimizer.in_flight().into_iter().map(|c| (c.id, c)).collect();
        for c in flight.values() {
            objective.submit(c);
        }
        let mut generation = self.optimizer.generation();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                self.save(elapsed(self))?;
                return Ok(Termination::Interrupted);
            }
            let done = self.exhausted(elapsed(self));
            if done.is_none() {
                let cap = objective.capacity().max(1);
                let room = |s: &Self, n: usize| s.budget.max_evaluations.is_none_or(|m| s.optimizer.evaluations() + (n as u64) < m);
                while flight.len() < cap && room(self, flight.len()) {
                    let name = self.optimizer.name();
                    let c = self
                        .optimizer
                        .ask_one()
                        .ok_or_else(|| SearchError::BadConfig(format!("{name} has no asynchronous mode; use it with mode = \"sync\"")))?;
                    objective.submit(&c);
                    flight.insert(c.id, c);
                }
            }
            self.save(elapsed(self))?;
            if flight.is_empty() {
                return Ok(done.unwrap_or(Termination::Evaluations));
            }
            let (id, outcome) = match objective.next() {
                Next::Done(id, outcome) => (id, outcome),
                Next::Wider => continue,
                Next::Cancelled => {
                    self.save(elapsed(self))?;
                    return Ok(Termination::Interrupted);
                }
            };
            let Some(c) = flight.remove(&id) else { continue };
            let e = Evaluation { id, outcome };
            if matches!(e.outcome, Outcome::Failed(_)) {
                self.failures += 1;
            }
            observer.on_evaluation(&c, &e);
            self.optimizer.tell(vec![e])?;
            if self.optimizer.generation() != generation {
                generation = self.optimizer.generation();
                let report = GenerationReport {
                    generation,
                    evaluations: self.optimizer.evaluations(),
                    failures: self.failures,
                    best: self.optimizer.best().map(|(_, v)| v),
                    seconds: elapsed(self),
                };
                observer.on_generation(&report);
            }
        }
    }
}

/// An observer that does nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl Observer for Silent {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testfns::rosenbrock;
    use crate::{CmaEs, CmaEsConfig, SearchSpace};

    fn cmaes() -> Box<dyn Optimizer> {
        Box::new(CmaEs::new(SearchSpace::uniform(4, -3.0, 3.0).expect("space"), &CmaEsConfig { seed: 21, ..Default::default() }).expect("cmaes"))
    }

    /// Records every evaluation (id, genome, value).
    #[derive(Default)]
    struct Log(Vec<(u64, Vec<f64>, Outcome)>, Vec<String>);

    impl Observer for Log {
        fn on_evaluation(&mut self, c: &Candidate, e: &Evaluation) {
            self.0.push((c.id, c.genome.clone(), e.outcome.clone()));
        }
        fn on_fallback(&mut self, reason: &str) {
            self.1.push(reason.to_string());
        }
    }

    fn objective(c: &Candidate) -> Outcome {
        Outcome::Scored(vec![rosenbrock(&c.genome)])
    }

    fn gens(n: u64) -> Budget {
        Budget { max_generations: Some(n), ..Default::default() }
    }

    #[test]
    fn batches_of_candidates_give_the_same_trajectory() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut one = Log::default();
        Runner::new(cmaes(), gens(6), None, flag.clone()).run(&mut objective, &mut one).expect("run");
        for batch in [2usize, 3, 64] {
            let mut log = Log::default();
            let mut sizes = vec![];
            let mut f = |cs: &[Candidate]| -> Vec<Outcome> {
                sizes.push(cs.len());
                cs.iter().map(objective).collect()
            };
            Runner::new(cmaes(), gens(6), None, flag.clone()).run_batched(batch, &mut f, &mut log).expect("run");
            assert_eq!(log.0, one.0, "batch {batch}");
            assert!(sizes.iter().all(|&n| n <= batch) && sizes.iter().any(|&n| n > 1), "batch {batch}: {sizes:?}");
        }
    }

    #[test]
    fn killed_and_resumed_equals_uninterrupted() {
        let dir = tempfile::tempdir().expect("tmp");
        let flag = Arc::new(AtomicBool::new(false));
        let mut whole = Log::default();
        Runner::new(cmaes(), gens(12), None, flag.clone()).run(&mut objective, &mut whole).expect("run");
        for stop_after in [1u64, 5, 11] {
            let ck = dir.path().join(format!("ck{stop_after}.json"));
            let mut log = Log::default();
            let t = Runner::new(cmaes(), gens(stop_after), Some(ck.clone()), flag.clone()).run(&mut objective, &mut log).expect("run");
            assert_eq!(t, Termination::Generations);
            // the process "dies" here; a new one resumes from the file
            let mut r = Runner::resume(ck, "cmaes", gens(12), flag.clone(), &mut log).expect("resume");
            r.run(&mut objective, &mut log).expect("run");
            assert_eq!(log.0, whole.0, "stopped after {stop_after} generations");
        }
    }

    #[test]
    fn cancellation_mid_generation_checkpoints_and_resumes_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("checkpoint.json");
        let flag = Arc::new(AtomicBool::new(false));
        let mut whole = Log::default();
        Runner::new(cmaes(), gens(6), None, Arc::new(AtomicBool::new(false))).run(&mut objective, &mut whole).expect("run");
        let mut log = Log::default();
        let mut count = 0;
        let f2 = flag.clone();
        let mut cancelling = |c: &Candidate| {
            count += 1;
            if count == 17 {
                f2.store(true, Ordering::Relaxed); // Ctrl-C during evaluation 17
            }
            objective(c)
        };
        let t = Runner::new(cmaes(), gens(6), Some(ck.clone()), flag.clone()).run(&mut cancelling, &mut log).expect("run");
        assert_eq!(t, Termination::Interrupted);
        assert_eq!(log.0.len(), 17, "the evaluation in flight completes and is kept");
        flag.store(false, Ordering::Relaxed);
        Runner::resume(ck, "cmaes", gens(6), flag, &mut log).expect("resume").run(&mut objective, &mut log).expect("run");
        assert_eq!(log.0, whole.0);
    }

    #[test]
    fn a_batch_cut_short_tells_its_prefix_and_resumes_exactly() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("checkpoint.json");
        let flag = Arc::new(AtomicBool::new(false));
        let mut whole = Log::default();
        Runner::new(cmaes(), gens(5), None, flag.clone()).run(&mut objective, &mut whole).expect("run");
        let mut log = Log::default();
        let mut calls = 0;
        // the third batch of 4 comes back with 2 outcomes (cancelled while waiting for workers)
        let mut f = |cs: &[Candidate]| -> Vec<Outcome> {
            calls += 1;
            let n = if calls == 3 { 2 } else { cs.len() };
            cs[..n].iter().map(objective).collect()
        };
        let t = Runner::new(cmaes(), gens(5), Some(ck.clone()), flag.clone()).run_batched(4, &mut f, &mut log).expect("run");
        assert_eq!(t, Termination::Interrupted);
        assert_eq!(log.0.len(), 10, "two whole batches and the prefix of the third");
        flag.store(false, Ordering::Relaxed);
        Runner::resume(ck, "cmaes", gens(5), flag, &mut log).expect("resume").run(&mut objective, &mut log).expect("run");
        assert_eq!(log.0, whole.0);
    }

    /// Finishes candidates first in, first out, `cap` at a time; sets `cancel` after `stop_after`
    /// results.
    struct Fifo {
        cap: usize,
        queue: std::collections::VecDeque<Candidate>,
        results: usize,
        stop_after: Option<(usize, Arc<AtomicBool>)>,
    }

    impl AsyncObjective for Fifo {
        fn capacity(&mut self) -> usize {
            self.cap
        }
        fn submit(&mut self, c: &Candidate) {
            self.queue.push_back(c.clone());
        }
        fn next(&mut self) -> Next {
            if let Some((n, flag)) = &self.stop_after
                && self.results == *n
            {
                flag.store(true, Ordering::Relaxed);
                return Next::Cancelled;
            }
            let c = self.queue.pop_front().expect("a candidate in flight");
            self.results += 1;
            Next::Done(c.id, Outcome::Scored(vec![rosenbrock(&c.genome), c.genome[0]]))
        }
    }

    fn steady() -> Box<dyn Optimizer> {
        let space = SearchSpace::uniform(4, -3.0, 3.0).expect("space");
        Box::new(crate::Nsga2::new(space, &crate::Nsga2Config { population: 8, objectives: 2, seed: 5, ..Default::default() }).expect("nsga2"))
    }

    #[test]
    fn asynchronous_runs_keep_the_budget_and_resume_exactly_after_a_cancel() {
        let dir = tempfile::tempdir().expect("tmp");
        let budget = Budget { max_evaluations: Some(40), ..Default::default() };
        let flag = Arc::new(AtomicBool::new(false));
        let mut whole = Log::default();
        let mut fifo = Fifo { cap: 3, queue: Default::default(), results: 0, stop_after: None };
        let t = Runner::new(steady(), budget.clone(), None, flag.clone()).run_async(&mut fifo, &mut whole).expect("run");
        assert_eq!(t, Termination::Evaluations);
        assert_eq!(whole.0.len(), 40, "every asked candidate is told, none past the budget");
        let ck = dir.path().join("checkpoint.json");
        let mut log = Log::default();
        let mut fifo = Fifo { cap: 3, queue: Default::default(), results: 0, stop_after: Some((17, flag.clone())) };
        let t = Runner::new(steady(), budget.clone(), Some(ck.clone()), flag.clone()).run_async(&mut fifo, &mut log).expect("run");
        assert_eq!(t, Termination::Interrupted);
        assert_eq!(log.0.len(), 17);
        flag.store(false, Ordering::Relaxed);
        let mut fifo = Fifo { cap: 3, queue: Default::default(), results: 0, stop_after: None };
        let mut r = Runner::resume(ck, "nsga2", budget, flag, &mut log).expect("resume");
        r.run_async(&mut fifo, &mut log).expect("run");
        assert_eq!(log.0, whole.0);
        // CMA-ES says it has no asynchronous mode
        let e = Runner::new(cmaes(), gens(2), None, Arc::new(AtomicBool::new(false)))
            .run_async(&mut Fifo { cap: 2, queue: Default::default(), results: 0, stop_after: None }, &mut Silent)
            .expect_err("cmaes");
        assert!(e.to_string().contains("no asynchronous mode"), "{e}");
    }

    #[test]
    fn corrupt_checkpoint_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let ck = dir.path().join("checkpoint.json");
        let flag = Arc::new(AtomicBool::new(false));
        let mut log = Log::default();
        Runner::new(cmaes(), gens(3), Some(ck.clone()), flag.clone()).run(&mut objective, &mut log).expect("run");
        assert!(prev_path(&ck).is_file());
        let text = std::fs::read_to_string(&ck).expect("read");
        std::fs::write(&ck, &text[..text.len() / 2]).expect("truncate");
        let r = Runner::resume(ck.clone(), "cmaes", gens(5), flag.clone(), &mut log).expect("fallback");
        assert_eq!(log.1.len(), 1, "the fallback is reported");
        assert!(r.optimizer().generation() >= 2);
        std::fs::write(prev_path(&ck), "{").expect("break prev");
        let e = Runner::resume(ck, "cmaes", gens(5), flag.clone(), &mut log).expect_err("both broken");
        assert!(e.to_string().contains("previous checkpoint"), "{e}");
        let missing = Runner::resume(dir.path().join("none.json"), "cmaes", gens(1), flag, &mut log).expect_err("missing");
        assert!(matches!(missing, SearchError::BadCheckpoint(_)));
    }

    #[test]
    fn budgets_and_failures_are_respected() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut r = Runner::new(cmaes(), Budget { max_evaluations: Some(25), ..Default::default() }, None, flag);
        let mut n = 0;
        let t = r
            .run(
                &mut |c: &Candidate| {
                    n += 1;
                    if n % 5 == 0 { Outcome::Failed("nan".into()) } else { objective(c) }
                },
                &mut Silent,
            )
            .expect("run");
        assert_eq!(t, Termination::Evaluations);
        let evals = r.optimizer().evaluations();
        assert!((25..25 + 8).contains(&evals), "stops at the first generation boundary past the budget: {evals}");
        assert_eq!(r.failures, evals / 5);
    }
}
