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

/// This process's workers.
pub struct LocalPool<'w, 'a> {
    workers: &'w mut [WorkerRef<'a>],
    objectives: Vec<Objective>,
}

impl<'w, 'a> LocalPool<'w, 'a> {
    /// A pool of `workers` (at least one).
    pub fn new(workers: &'w mut [WorkerRef<'a>]) -> Self {
        let objectives = objectives(workers[0].1);
        Self { workers, objectives }
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
