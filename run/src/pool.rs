//! Where a stage's candidates are scored: a [`Scorer`]. [`LocalPool`] spreads a batch over
//! this process's workers, one candidate per worker at a time on the rayon pool; the broker's
//! coordinator (`crate::broker`) hands them to workers anywhere. Results come back in the
//! batch's order either way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use evomerge_engine::model::LanguageModel;
use evomerge_fitness::{Objective, TaskEstimator};
use evomerge_search::Candidate;

use crate::evaluate::{StageKind, evaluate, objectives};
use crate::records::EvaluationRecord;

/// A worker's runtime and estimators, borrowed for one stage.
pub type WorkerRef<'a> = (&'a mut dyn LanguageModel, &'a mut [TaskEstimator]);

/// Scores candidates for a stage.
pub trait Scorer {
    /// The objectives its records hold (name and direction), in order.
    fn objectives(&self) -> &[Objective];
    /// Candidates handed to [`Scorer::score`] at once (the runner's batch): as many as can be
    /// scored at the same time.
    fn batch(&self) -> usize;
    /// The records of `batch[i]` for every `i` in `todo`, in `todo`'s order. Fewer (a prefix)
    /// only when the run was cancelled while waiting for them.
    fn score(&mut self, kind: &StageKind<'_>, batch: &[Candidate], todo: &[usize]) -> Vec<EvaluationRecord>;
}

/// What an asynchronous scorer has for the stage.
#[derive(Debug)]
pub enum AsyncScored {
    /// A candidate's record.
    Record(EvaluationRecord),
    /// More candidates may be in flight now (workers joined).
    Wider,
    /// Cancelled while waiting.
    Cancelled,
}

/// Scores candidates for a stage in asynchronous mode: submitted one at a time, records back
/// in the order they finish.
pub trait AsyncScorer {
    fn objectives(&self) -> &[Objective];
    /// Candidates worth having in flight now (every worker busy, and one waiting).
    fn capacity(&mut self) -> usize;
    fn submit(&mut self, kind: &StageKind<'_>, c: &Candidate);
    /// Waits for the next finished candidate.
    fn next(&mut self, kind: &StageKind<'_>) -> AsyncScored;
}

/// This process's workers.
pub struct LocalPool<'w, 'a> {
    workers: &'w mut [WorkerRef<'a>],
    objectives: Vec<Objective>,
    /// Asynchronous mode: submitted, and scored but not yet handed back.
    queue: std::collections::VecDeque<Candidate>,
    done: std::collections::VecDeque<EvaluationRecord>,
}

impl<'w, 'a> LocalPool<'w, 'a> {
    /// A pool of `workers` (at least one).
    pub fn new(workers: &'w mut [WorkerRef<'a>]) -> Self {
        let objectives = objectives(workers[0].1);
        Self { workers, objectives, queue: Default::default(), done: Default::default() }
    }
}

impl std::fmt::Debug for LocalPool<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPool").field("workers", &self.workers.len()).finish()
    }
}

impl Scorer for LocalPool<'_, '_> {
    fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    fn batch(&self) -> usize {
        self.workers.len()
    }

    fn score(&mut self, kind: &StageKind<'_>, batch: &[Candidate], todo: &[usize]) -> Vec<EvaluationRecord> {
        score_parallel(kind, batch, todo, self.workers)
    }
}

/// In this process, "asynchronous" scores the queue a round at a time (one candidate per
/// worker, in submission order): the optimizer is told each as soon as its round is done.
impl AsyncScorer for LocalPool<'_, '_> {
    fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    fn capacity(&mut self) -> usize {
        self.workers.len()
    }

    fn submit(&mut self, _kind: &StageKind<'_>, c: &Candidate) {
        self.queue.push_back(c.clone());
    }

    fn next(&mut self, kind: &StageKind<'_>) -> AsyncScored {
        if self.done.is_empty() {
            let round: Vec<Candidate> = self.queue.drain(..self.queue.len().min(self.workers.len())).collect();
            let todo: Vec<usize> = (0..round.len()).collect();
            self.done.extend(score_parallel(kind, &round, &todo, self.workers));
        }
        self.done.pop_front().map_or(AsyncScored::Cancelled, AsyncScored::Record)
    }
}

/// Evaluates `batch[i]` for every `i` in `todo` over `workers`; `out[k]` is `todo[k]`'s record.
pub fn score_parallel(kind: &StageKind<'_>, batch: &[Candidate], todo: &[usize], workers: &mut [WorkerRef<'_>]) -> Vec<EvaluationRecord> {
    if workers.len() == 1 || todo.len() == 1 {
        let (rt, est) = &mut workers[0];
        return todo.iter().map(|&i| evaluate(kind, &batch[i], &mut **rt, est)).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<EvaluationRecord>>> = todo.iter().map(|_| Mutex::new(None)).collect();
    rayon::scope(|s| {
        for (rt, est) in workers.iter_mut() {
            let (next, slots) = (&next, &slots);
            s.spawn(move |_| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    let r = evaluate(kind, &batch[i], &mut **rt, est);
                    *slots[k].lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
                }
            });
        }
    });
    slots.into_iter().map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner).expect("every candidate scored")).collect()
}
