//! The scoring pool: a batch of candidates spread over the workers, one candidate per worker
//! at a time on the rayon pool; results come back in the batch's order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use evomerge_engine::model::LanguageModel;
use evomerge_fitness::TaskEstimator;
use evomerge_search::Candidate;

use crate::evaluate::{StageKind, evaluate};
use crate::records::EvaluationRecord;

/// A worker's runtime and estimators, borrowed for one stage.
pub type WorkerRef<'a> = (&'a mut dyn LanguageModel, &'a mut [TaskEstimator]);

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
