//! One stage's loop (parameter space or data flow) in its folder of the run directory:
//! replay, de-duplication, the scoring pool, records in candidate order, the best file, and
//! `log.jsonl`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use evomerge_search::{Candidate, Evaluation, GenerationReport, Observer, Outcome, Runner, Termination};

use crate::error::{Result, RunError};
use crate::evaluate::{StageKind, repeat};
use crate::observer::{Notice, RunObserver};
use crate::pool::Scorer;
use crate::records::{EvaluationRecord, LogEvent, RecordOutcome};
use crate::run_dir::{EVALUATIONS, LOG, read_evaluation_lines, write_atomic};

/// Appends events to a stage's `log.jsonl` and hands them to the run's observer; the runner's
/// observer of generations.
pub(crate) struct EventLog<'o> {
    log: Option<File>,
    observer: &'o mut dyn RunObserver,
    start: Instant,
    generation_values: Vec<f64>,
    budget: Option<u64>,
}

impl<'o> EventLog<'o> {
    pub(crate) fn new(dir: &Path, budget: Option<u64>, observer: &'o mut dyn RunObserver) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(LOG)).ok();
        Self { log, observer, start: Instant::now(), generation_values: vec![], budget }
    }

    pub(crate) fn event(&mut self, e: &LogEvent) {
        if let Some(f) = &mut self.log
            && let Ok(line) = serde_json::to_string(e)
        {
            let _ = writeln!(f, "{line}");
        }
        self.observer.event(e);
    }
}

impl Observer for EventLog<'_> {
    fn on_evaluation(&mut self, c: &Candidate, e: &Evaluation) {
        if let Outcome::Scored(v) = &e.outcome {
            self.generation_values.extend(v.first());
        }
        self.observer.evaluated(c, &e.outcome);
    }

    fn on_generation(&mut self, r: &GenerationReport) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let vals = std::mem::take(&mut self.generation_values);
        let mean = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
        let eta = self.budget.map(|b| b.saturating_sub(r.evaluations) as f64 / (r.evaluations.max(1) as f64 / secs));
        self.event(&LogEvent::Generation {
            generation: r.generation,
            evaluations: r.evaluations,
            failures: r.failures,
            best_minimized: r.best,
            mean_minimized: mean,
            candidates_per_hour: r.evaluations as f64 / secs * 3600.0,
            eta_seconds: eta,
            seconds: r.seconds,
        });
        tracing::info!(generation = r.generation, evaluations = r.evaluations, best = ?r.best, "generation done");
    }

    fn on_fallback(&mut self, reason: &str) {
        self.observer.notice(&Notice::Warning(reason.to_string()));
        self.event(&LogEvent::CheckpointFallback { reason: reason.to_string() });
    }
}

/// Candidates already scored in an earlier session (id → outcome): every readable line, the
/// last one of an id winning. A line cut by a crash was never told to the optimizer: that
/// candidate is scored again and recorded on a new line.
fn replayed(earlier: &[EvaluationRecord]) -> HashMap<u64, Outcome> {
    earlier
        .iter()
        .map(|r| {
            let outcome = match &r.outcome {
                RecordOutcome::Failed(f) => Outcome::Failed(f.clone()),
                RecordOutcome::Scored(_) => Outcome::Scored(r.minimized().unwrap_or_default()),
            };
            (r.id, outcome)
        })
        .collect()
}

/// A last line without its newline was being written when the process died. A whole record
/// (only the newline missing) gets its newline; a cut one was never told to the optimizer and
/// is removed (the file is truncated to the line before), so that every line of the file stays
/// JSON for `jq` and pandas; its candidate is scored again.
fn repair_last_line(path: &Path, evals: &mut File, observer: &mut dyn RunObserver) -> Result<()> {
    let bytes = std::fs::read(path).map_err(RunError::io(path))?;
    if bytes.last().is_none_or(|&c| c == b'\n') {
        return Ok(());
    }
    let start = bytes.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if serde_json::from_slice::<EvaluationRecord>(&bytes[start..]).is_ok() {
        return writeln!(evals).and_then(|()| evals.sync_data()).map_err(RunError::io(path));
    }
    evals.set_len(start as u64).and_then(|()| evals.sync_data()).map_err(RunError::io(path))?;
    observer.notice(&Notice::Warning(format!(
        "{}: removed a last line cut by a crash ({} bytes); that candidate is scored again",
        path.display(),
        bytes.len() - start
    )));
    Ok(())
}

/// Runs one stage's loop with `dir` as its folder (checkpoint, evaluations, best file).
/// `workers` score candidates at once (a generation in batches of that many); records are
/// written, and the optimizer told, in candidate order, so the run does not depend on how many
/// workers it had. A failure to record an evaluation is run-scoped: `cancel` stops the run at
/// once (the runner writes a checkpoint) and the error is returned.
pub fn run_stage(
    kind: StageKind<'_>,
    scorer: &mut dyn Scorer,
    dir: &Path,
    runner: &mut Runner,
    cancel: &Arc<AtomicBool>,
    budget: Option<u64>,
    observer: &mut dyn RunObserver,
) -> Result<Termination> {
    let evals_path = dir.join(EVALUATIONS);
    let mut evals = std::fs::OpenOptions::new().create(true).append(true).open(&evals_path).map_err(RunError::io(&evals_path))?;
    repair_last_line(&evals_path, &mut evals, &mut *observer)?;
    // every readable line of earlier sessions, read once
    let earlier = read_evaluation_lines(dir);
    let replay = replayed(&earlier);
    let replayed_count = replay.len();
    let directions = scorer.objectives().to_vec();
    let directions = directions.as_slice();
    let n_objectives = directions.len();
    // The best so far includes earlier sessions (their best file is already on disk).
    let mut best: Option<f64> = replay
        .values()
        .filter_map(|o| match o {
            Outcome::Scored(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        })
        .reduce(f64::min);
    let mut write_err: Option<RunError> = None;
    // Genomes scored before (this session or an earlier one): a repeat is recorded with the
    // earlier values and no work, whether or not the earlier one was scored in this process,
    // so that a resumed run writes the same records as an uninterrupted one.
    let mut seen: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    // (a repeated line has its id's genome: the first one stands, as it would de-duplicated)
    for r in &earlier {
        let Some(s) = r.scores() else { continue };
        let values: Vec<f64> = directions.iter().filter_map(|d| s.objectives.get(&d.name)).collect();
        seen.entry(kind.fingerprint(&r.genome)).or_insert((values, s.std_errors.clone()));
    }
    let n_workers = scorer.batch();
    let mut events = EventLog::new(dir, budget, observer);
    events.observer.stage_started(kind.stage(), budget);
    let mut objective = |batch: &[Candidate]| -> Vec<Outcome> {
        // Which candidates need scoring: not replayed from an earlier session, not seen before,
        // not a twin of one scored in this batch (that one is resolved in order below).
        let fps: Vec<String> = batch.iter().map(|c| kind.fingerprint(&c.genome)).collect();
        let mut todo = vec![];
        for (i, c) in batch.iter().enumerate() {
            let twin = todo.iter().any(|&j: &usize| fps[j] == fps[i]);
            if !replay.contains_key(&c.id) && !seen.contains_key(&fps[i]) && !twin {
                todo.push(i);
            }
        }
        let mut scored: Vec<Option<EvaluationRecord>> = batch.iter().map(|_| None).collect();
        for (k, r) in scorer.score(&kind, batch, &todo).into_iter().enumerate() {
            scored[todo[k]] = Some(r);
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, c) in batch.iter().enumerate() {
            if let Some(o) = replay.get(&c.id) {
                outcomes.push(o.clone());
                continue;
            }
            let fp = &fps[i];
            let record = match scored[i].take() {
                Some(x) => x,
                None => match seen.get(fp).cloned() {
                    Some((values, ses)) => repeat(&kind, c, directions, values, ses),
                    // cancelled before it was scored: asked again after a resume
                    None if todo.contains(&i) => break,
                    // the twin it waited for failed: score this one itself, as a run one
                    // candidate at a time would
                    None => match scorer.score(&kind, batch, &[i]).pop() {
                        Some(r) => r,
                        None => break,
                    },
                },
            };
            let outcome = match &record.outcome {
                RecordOutcome::Scored(s) => {
                    seen.entry(fp.clone()).or_insert_with(|| (s.objectives.0.iter().map(|x| x.1).collect(), s.std_errors.clone()));
                    if s.minimized.len() == 1 && best.is_none_or(|b| s.minimized[0] < b) {
                        best = Some(s.minimized[0]);
                        let written = kind.artifact(&c.genome).and_then(|text| write_atomic(&dir.join(kind.best_file()), &text));
                        if let Err(e) = written {
                            write_err.get_or_insert(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Outcome::Scored(s.minimized.clone())
                }
                RecordOutcome::Failed(f) => Outcome::Failed(f.clone()),
            };
            // one write of the whole line: a kill leaves it whole or cut, never split in two
            let line = serde_json::to_string(&record).unwrap_or_default() + "\n";
            if let Err(e) = evals.write_all(line.as_bytes()).and_then(|()| evals.sync_data()) {
                write_err.get_or_insert(RunError::Io { path: evals_path.clone(), err: e });
                cancel.store(true, Ordering::Relaxed);
            }
            outcomes.push(outcome);
        }
        outcomes
    };
    events.event(&LogEvent::Start { evaluations_done: replayed_count });
    let end = runner.run_batched(n_workers, &mut objective, &mut events);
    events.observer.stage_ended(kind.stage());
    let end = end?;
    if let Some(e) = write_err {
        return Err(e);
    }
    if end != Termination::Interrupted {
        let best = runner.optimizer().best().map(|(_, v)| v);
        let evaluations = runner.optimizer().evaluations();
        events.event(&LogEvent::Finished { termination: format!("{end:?}"), evaluations, best_minimized: best });
        let best = best.filter(|_| n_objectives == 1).map(|v| (v, dir.join(kind.best_file())));
        events.observer.notice(&Notice::StageFinished {
            stage: kind.stage(),
            termination: format!("{end:?}"),
            evaluations,
            dir: dir.to_path_buf(),
            best,
        });
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_last_record_keeps_its_place_and_a_cut_one_goes() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(EVALUATIONS);
        let rec = r#"{"id":0,"generation":0,"genome":[0.5],"failure":"x","seconds":0.1}"#;
        let open = |p: &Path| std::fs::OpenOptions::new().append(true).open(p).expect("open");
        // the newline alone is missing: the record stays (its candidate was scored)
        std::fs::write(&path, format!("{rec}\n{}", rec.replace("\"id\":0", "\"id\":1"))).expect("write");
        repair_last_line(&path, &mut open(&path), &mut crate::Quiet).expect("repair");
        assert_eq!(read_evaluation_lines(dir.path()).len(), 2);
        assert!(std::fs::read_to_string(&path).expect("read").ends_with("}\n"));
        // cut inside the record: removed, the lines before kept byte for byte
        let before = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("{before}{}", &rec[..20])).expect("write");
        repair_last_line(&path, &mut open(&path), &mut crate::Quiet).expect("repair");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
    }
}
