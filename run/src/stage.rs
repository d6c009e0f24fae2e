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

use evomerge_search::{AsyncObjective, Candidate, Evaluation, GenerationReport, Next, Observer, Outcome, Runner, Termination};

use crate::error::{Result, RunError};
use crate::evaluate::{StageKind, repeat};
use crate::observer::{Notice, RunObserver};
use crate::pool::{AsyncScored, AsyncScorer, Scorer};
use crate::records::{EvaluationRecord, LogEvent, Objectives, RecordOutcome};
use crate::run_dir::{EVALUATIONS, FRONT, LOG, read_evaluation_lines, write_atomic};

/// Appends events to a stage's `log.jsonl` and hands them to the run's observer; the runner's
/// observer of generations.
pub(crate) struct EventLog<'o> {
    log: Option<File>,
    observer: &'o mut dyn RunObserver,
    start: Instant,
    /// This generation's candidates' mean minimized objectives.
    generation_values: Vec<f64>,
    budget: Option<u64>,
    /// The stage's objectives (names and directions; empty when unknown).
    objectives: Vec<evomerge_fitness::Objective>,
    /// The pick so far: the minimized values of the candidate with the lowest mean (the first
    /// such), what `best.yaml` holds.
    pick: Option<Vec<f64>>,
}

impl<'o> EventLog<'o> {
    pub(crate) fn new(dir: &Path, budget: Option<u64>, objectives: &[evomerge_fitness::Objective], observer: &'o mut dyn RunObserver) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(LOG)).ok();
        Self { log, observer, start: Instant::now(), generation_values: vec![], budget, objectives: objectives.to_vec(), pick: None }
    }

    /// The pick's objectives in their own units (maximized ones as they are, not negated).
    fn pick_objectives(&self) -> Option<Objectives> {
        let v = self.pick.as_ref()?;
        (v.len() == self.objectives.len())
            .then(|| Objectives(self.objectives.iter().zip(v).map(|(o, x)| (o.name.clone(), o.direction.to_minimized(*x))).collect()))
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
        if let Outcome::Scored(v) = &e.outcome
            && !v.is_empty()
        {
            let m = mean(v);
            self.generation_values.push(m);
            if self.pick.as_ref().is_none_or(|p| m < mean(p)) {
                self.pick = Some(v.clone());
            }
        }
        self.observer.evaluated(c, &e.outcome);
    }

    fn on_generation(&mut self, r: &GenerationReport) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let vals = std::mem::take(&mut self.generation_values);
        let gen_mean = (!vals.is_empty()).then(|| mean(&vals));
        let eta = self.budget.map(|b| b.saturating_sub(r.evaluations) as f64 / (r.evaluations.max(1) as f64 / secs));
        self.event(&LogEvent::Generation {
            generation: r.generation,
            evaluations: r.evaluations,
            failures: r.failures,
            best_minimized: self.pick.as_deref().map(mean),
            best: self.pick_objectives(),
            mean_minimized: gen_mean,
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

/// What the optimizer was told of a candidate scored in an earlier session. Every readable
/// line counts, the last one of an id winning; a line cut by a crash was never told to the
/// optimizer: that candidate is scored again and recorded on a new line.
fn replayed(r: &EvaluationRecord) -> Outcome {
    match &r.outcome {
        RecordOutcome::Failed(f) => Outcome::Failed(f.clone()),
        RecordOutcome::Scored(_) => Outcome::Scored(r.minimized().unwrap_or_default()),
    }
}

/// A last line without its newline was being written when the process died. A whole record
/// (only the newline missing) gets its newline; a cut one was never told to the optimizer and
/// is removed (the file is truncated to the line before), so that every line of the file stays
/// JSON for `jq` and pandas; its candidate is scored again.
fn repair_last_line(path: &Path, evals: &mut File, observer: &mut dyn RunObserver) -> Result<Option<Candidate>> {
    let bytes = std::fs::read(path).map_err(RunError::io(path))?;
    if bytes.last().is_none_or(|&c| c == b'\n') {
        return Ok(None);
    }
    let start = bytes.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if serde_json::from_slice::<EvaluationRecord>(&bytes[start..]).is_ok() {
        writeln!(evals).and_then(|()| evals.sync_data()).map_err(RunError::io(path))?;
        return Ok(None);
    }
    evals.set_len(start as u64).and_then(|()| evals.sync_data()).map_err(RunError::io(path))?;
    observer.notice(&Notice::Warning(format!(
        "{}: removed a last line cut by a crash ({} bytes); that candidate is scored again",
        path.display(),
        bytes.len() - start
    )));
    Ok(cut_candidate(&bytes[start..]))
}

/// The candidate of a record line cut after its genome (a record starts with its id,
/// generation and genome).
fn cut_candidate(line: &[u8]) -> Option<Candidate> {
    let text = std::str::from_utf8(line).ok()?;
    let end = text.find("\"genome\":[")? + text[text.find("\"genome\":[")?..].find(']')?;
    serde_json::from_str(&format!("{}]}}", &text[..end])).ok()
}

/// What a stage knows of its records: earlier sessions' (replayed), the genomes scored (for
/// repeats), the best so far; it appends each new record to `evaluations.jsonl` and keeps the
/// best file. A failure to write is run-scoped: `cancel` stops the run (the runner writes a
/// checkpoint) and the error is returned at the end of the stage.
struct Recorder<'k> {
    kind: StageKind<'k>,
    dir: std::path::PathBuf,
    evals: File,
    evals_path: std::path::PathBuf,
    /// Earlier sessions' outcomes by id, and the file position of each id's last line (the
    /// order an asynchronous run told them in).
    replay: HashMap<u64, (usize, Outcome)>,
    directions: Vec<evomerge_fitness::Objective>,
    /// Genomes scored before (this session or an earlier one): a repeat is recorded with the
    /// earlier values and no work, whether or not the earlier one was scored in this process,
    /// so that a resumed run writes the same records as an uninterrupted one.
    seen: HashMap<String, (Vec<f64>, Vec<f64>)>,
    best: Option<f64>,
    write_err: Option<RunError>,
    cancel: Arc<AtomicBool>,
    /// Earlier sessions' records, in file order.
    earlier: Vec<EvaluationRecord>,
    /// The candidate of a last line cut by a crash (removed), when its genome was whole.
    cut: Option<Candidate>,
}

impl<'k> Recorder<'k> {
    fn open(
        kind: StageKind<'k>,
        dir: &Path,
        directions: &[evomerge_fitness::Objective],
        cancel: &Arc<AtomicBool>,
        observer: &mut dyn RunObserver,
    ) -> Result<Self> {
        let evals_path = dir.join(EVALUATIONS);
        let mut evals = std::fs::OpenOptions::new().create(true).append(true).open(&evals_path).map_err(RunError::io(&evals_path))?;
        let cut = repair_last_line(&evals_path, &mut evals, observer)?;
        // every readable line of earlier sessions, read once
        let earlier = read_evaluation_lines(dir);
        let replay: HashMap<u64, (usize, Outcome)> = earlier.iter().enumerate().map(|(i, r)| (r.id, (i, replayed(r)))).collect();
        // The best so far includes earlier sessions (their best file is already on disk).
        let best: Option<f64> = replay
            .values()
            .filter_map(|(_, o)| match o {
                Outcome::Scored(v) if !v.is_empty() => Some(mean(v)),
                _ => None,
            })
            .reduce(f64::min);
        let mut rec = Self {
            kind,
            dir: dir.to_path_buf(),
            evals,
            evals_path,
            replay,
            directions: directions.to_vec(),
            seen: HashMap::new(),
            best,
            write_err: None,
            cancel: cancel.clone(),
            earlier: vec![],
            cut,
        };
        // (a repeated line has its id's genome: the first one stands, as it would de-duplicated)
        for r in &earlier {
            rec.see(r);
        }
        rec.earlier = earlier;
        Ok(rec)
    }

    /// Remembers a scored record's genome (for repeats).
    fn see(&mut self, r: &EvaluationRecord) {
        let Some(s) = r.scores() else { return };
        let values: Vec<f64> = self.directions.iter().filter_map(|d| s.objectives.get(&d.name)).collect();
        self.seen.entry(self.kind.fingerprint(&r.genome)).or_insert((values, s.std_errors.clone()));
    }

    /// An earlier session's outcome for candidate `id`.
    fn replayed(&self, id: u64) -> Option<&Outcome> {
        self.replay.get(&id).map(|(_, o)| o)
    }

    /// The record of a genome scored before, if it was.
    fn repeat(&self, c: &Candidate) -> Option<EvaluationRecord> {
        let (values, ses) = self.seen.get(&self.kind.fingerprint(&c.genome)).cloned()?;
        Some(repeat(&self.kind, c, &self.directions, values, ses))
    }

    /// Appends `record` (of candidate `c`), keeps the best file, and returns what the
    /// optimizer is told; `None` when the record could not be written (the disk is full, say):
    /// the candidate must not be told then, or a resumed run would have lost it (told, yet
    /// without a record). The run is cancelled and the error returned at the stage's end.
    fn record(&mut self, c: &Candidate, record: &EvaluationRecord) -> Option<Outcome> {
        // one write of the whole line: a kill leaves it whole or cut, never split in two
        let line = serde_json::to_string(record).unwrap_or_default() + "\n";
        if let Err(e) = self.evals.write_all(line.as_bytes()).and_then(|()| self.evals.sync_data()) {
            self.write_err.get_or_insert(RunError::Io { path: self.evals_path.clone(), err: e });
            self.cancel.store(true, Ordering::Relaxed);
            return None;
        }
        self.see(record);
        Some(match &record.outcome {
            RecordOutcome::Scored(s) => {
                // the best file follows the lowest mean minimized objective: the one objective's
                // best, or with several the balanced pick (`export --pick best`)
                let m = mean(&s.minimized);
                if !s.minimized.is_empty() && self.best.is_none_or(|b| m < b) {
                    self.best = Some(m);
                    let written = self.kind.artifact(&c.genome).and_then(|text| write_atomic(&self.dir.join(self.kind.best_file()), &text));
                    if let Err(e) = written {
                        self.write_err.get_or_insert(e);
                        self.cancel.store(true, Ordering::Relaxed);
                    }
                }
                Outcome::Scored(s.minimized.clone())
            }
            RecordOutcome::Failed(f) => Outcome::Failed(f.clone()),
        })
    }
}

/// Runs one stage's loop with `dir` as its folder (checkpoint, evaluations, best file).
/// The scorer takes candidates a batch at a time (a generation in batches of
/// [`Scorer::batch`]); records are written, and the optimizer told, in candidate order, so
/// the run does not depend on how many workers it had.
pub fn run_stage(
    kind: StageKind<'_>,
    scorer: &mut dyn Scorer,
    dir: &Path,
    runner: &mut Runner,
    cancel: &Arc<AtomicBool>,
    budget: Option<u64>,
    observer: &mut dyn RunObserver,
) -> Result<Termination> {
    let mut rec = Recorder::open(kind, dir, scorer.objectives(), cancel, observer)?;
    // Reconcile the records with the checkpoint: a candidate told before a crash whose line was
    // then cut (told, so never asked again) is scored again and recorded.
    let missing = runner.optimizer().evaluations().saturating_sub(rec.replay.len() as u64);
    if missing > 0
        && let Some(c) = rec.cut.take()
    {
        observer.notice(&Notice::Warning(format!("candidate {} was told to the optimizer but its record was cut: scoring it again", c.id)));
        if let Some(r) = scorer.score(&kind, std::slice::from_ref(&c), &[0]).pop() {
            rec.record(&c, &r);
            rec.replay.insert(c.id, (usize::MAX, replayed(&r)));
        }
    }
    warn_missing(runner, &rec, observer);
    let replayed_count = rec.replay.len();
    let n_workers = scorer.batch();
    let mut events = EventLog::new(dir, budget, scorer.objectives(), observer);
    events.observer.stage_started(kind.stage(), budget);
    let mut objective = |batch: &[Candidate]| -> Vec<Outcome> {
        // Which candidates need scoring: not replayed from an earlier session, not seen before,
        // not a twin of one scored in this batch (that one is resolved in order below).
        let fps: Vec<String> = batch.iter().map(|c| kind.fingerprint(&c.genome)).collect();
        let mut todo = vec![];
        for (i, c) in batch.iter().enumerate() {
            let twin = todo.iter().any(|&j: &usize| fps[j] == fps[i]);
            if rec.replayed(c.id).is_none() && !rec.seen.contains_key(&fps[i]) && !twin {
                todo.push(i);
            }
        }
        let mut scored: Vec<Option<EvaluationRecord>> = batch.iter().map(|_| None).collect();
        for (k, r) in scorer.score(&kind, batch, &todo).into_iter().enumerate() {
            scored[todo[k]] = Some(r);
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, c) in batch.iter().enumerate() {
            if let Some(o) = rec.replayed(c.id) {
                outcomes.push(o.clone());
                continue;
            }
            let record = match scored[i].take() {
                Some(x) => x,
                None => match rec.repeat(c) {
                    Some(r) => r,
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
            // a record that could not be written ends the batch before its candidate is told
            let Some(outcome) = rec.record(c, &record) else { break };
            outcomes.push(outcome);
        }
        outcomes
    };
    events.event(&LogEvent::Start { evaluations_done: replayed_count });
    let end = runner.run_batched(n_workers, &mut objective, &mut events);
    let best_mean = rec.best;
    finish_stage(kind, dir, end, rec.write_err.take(), best_mean, runner, &mut events)
}

/// [`run_stage`] in asynchronous mode (`optimizer.mode = "async"`): candidates are scored as
/// workers free up and told as they finish ([`Runner::run_async`]); the records are written in
/// the order they were told, which a resumed run replays.
pub fn run_stage_async(
    kind: StageKind<'_>,
    scorer: &mut dyn AsyncScorer,
    dir: &Path,
    runner: &mut Runner,
    cancel: &Arc<AtomicBool>,
    budget: Option<u64>,
    observer: &mut dyn RunObserver,
) -> Result<Termination> {
    let rec = Recorder::open(kind, dir, scorer.objectives(), cancel, observer)?;
    warn_missing(runner, &rec, observer);
    let replayed_count = rec.replay.len();
    let mut events = EventLog::new(dir, budget, scorer.objectives(), observer);
    events.observer.stage_started(kind.stage(), budget);
    events.event(&LogEvent::Start { evaluations_done: replayed_count });
    let mut objective = AsyncStage {
        kind,
        scorer,
        rec,
        ready: std::collections::BTreeMap::new(),
        flight: HashMap::new(),
        repeats: 0,
        submitted: vec![],
        started: false,
    };
    let end = runner.run_async(&mut objective, &mut events);
    let (err, best_mean) = (objective.rec.write_err.take(), objective.rec.best);
    finish_stage(kind, dir, end, err, best_mean, runner, &mut events)
}

/// The asynchronous objective of a stage: replays and repeats are ready at once (replays
/// first, in the order an earlier session told them), the rest go to the scorer.
struct AsyncStage<'s, 'k> {
    kind: StageKind<'k>,
    scorer: &'s mut dyn AsyncScorer,
    rec: Recorder<'k>,
    /// Ready without scoring, by (0 = replay / 1 = repeat, order): the candidate and, for a
    /// repeat, its record.
    ready: std::collections::BTreeMap<(u8, usize), (Candidate, Option<EvaluationRecord>)>,
    /// Submitted to the scorer.
    flight: HashMap<u64, Candidate>,
    repeats: usize,
    /// Submitted, not yet sorted into replays, repeats and candidates to score (done when the
    /// runner waits: a repeat is one of a genome told before, as in an uninterrupted run).
    submitted: Vec<Candidate>,
    started: bool,
}

impl AsyncObjective for AsyncStage<'_, '_> {
    fn capacity(&mut self) -> usize {
        self.scorer.capacity()
    }

    fn submit(&mut self, c: &Candidate) {
        self.submitted.push(c.clone());
    }

    fn next(&mut self) -> Next {
        if !self.started {
            // A resumed run: what was in flight at the checkpoint is submitted first. Earlier
            // records of those are replays, told from here in their file order; only the
            // others were told before the checkpoint, and only their genomes count as seen.
            self.started = true;
            let flight: std::collections::HashSet<u64> = self.submitted.iter().map(|c| c.id).collect();
            self.rec.seen.clear();
            for r in std::mem::take(&mut self.rec.earlier) {
                if !flight.contains(&r.id) {
                    self.rec.see(&r);
                }
                self.rec.earlier.push(r);
            }
        }
        for c in std::mem::take(&mut self.submitted) {
            if let Some(&(line, _)) = self.rec.replay.get(&c.id) {
                self.ready.insert((0, line), (c, None));
            } else if let Some(r) = self.rec.repeat(&c) {
                self.repeats += 1;
                self.ready.insert((1, self.repeats), (c, Some(r)));
            } else {
                self.scorer.submit(&self.kind, &c);
                self.flight.insert(c.id, c);
            }
        }
        if let Some((_, (c, record))) = self.ready.pop_first() {
            return match record {
                Some(r) => self.rec.record(&c, &r).map_or(Next::Cancelled, |o| Next::Done(c.id, o)),
                None => {
                    // a replay: its genome is told now
                    if let Some(r) = self.rec.earlier.iter().rev().find(|r| r.id == c.id).cloned() {
                        self.rec.see(&r);
                    }
                    Next::Done(c.id, self.rec.replayed(c.id).cloned().unwrap_or_else(|| Outcome::Failed("replay".into())))
                }
            };
        }
        loop {
            match self.scorer.next(&self.kind) {
                AsyncScored::Record(r) => {
                    let Some(c) = self.flight.remove(&r.id) else { continue };
                    return self.rec.record(&c, &r).map_or(Next::Cancelled, |o| Next::Done(c.id, o));
                }
                AsyncScored::Wider => return Next::Wider,
                AsyncScored::Cancelled => return Next::Cancelled,
            }
        }
    }
}

/// Says so when the checkpoint has told the optimizer more candidates than the records hold
/// (lines removed by hand, or cut before the genome): those are not in the records for good.
fn warn_missing(runner: &Runner, rec: &Recorder<'_>, observer: &mut dyn RunObserver) {
    let missing = runner.optimizer().evaluations().saturating_sub(rec.replay.len() as u64);
    if missing > 0 {
        observer.notice(&Notice::Warning(format!(
            "{}: the checkpoint counts {missing} more evaluation(s) than the file records (lines removed or cut); \
             they cannot be scored again, the search goes on",
            rec.evals_path.display()
        )));
    }
}

/// The mean of a candidate's minimized objectives (its value, with one).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// With several objectives, the stage's Pareto front (each point once, by first objective) as
/// `front.json`: the records of its members.
fn write_front(dir: &Path) -> Result<()> {
    let recs = crate::run_dir::read_evaluations(dir);
    if recs.iter().find_map(EvaluationRecord::minimized).is_none_or(|m| m.len() < 2) {
        return Ok(());
    }
    let path = dir.join(FRONT);
    let text = serde_json::to_string_pretty(&crate::ranked(&recs)).map_err(|e| RunError::bad_file(&path, e))?;
    write_atomic(&path, &text)
}

/// The end of a stage: its `finished` event and notice (unless interrupted), or the error.
fn finish_stage(
    kind: StageKind<'_>,
    dir: &Path,
    end: std::result::Result<Termination, evomerge_search::SearchError>,
    write_err: Option<RunError>,
    best_mean: Option<f64>,
    runner: &Runner,
    events: &mut EventLog<'_>,
) -> Result<Termination> {
    events.observer.stage_ended(kind.stage());
    let end = end?;
    if let Some(e) = write_err {
        return Err(e);
    }
    if end != Termination::Interrupted {
        let evaluations = runner.optimizer().evaluations();
        write_front(dir)?;
        events.event(&LogEvent::Finished { termination: format!("{end:?}"), evaluations, best_minimized: best_mean });
        // the best file holds the lowest mean minimized objective (`best_mean`)
        let best = best_mean.map(|v| (v, dir.join(kind.best_file())));
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

    /// Issue 23, defect 4: a record that cannot be written (the disk is full) must not be told
    /// to the optimizer, or a resumed run would have it told and missing.
    #[test]
    #[cfg(target_os = "linux")]
    fn a_record_that_cannot_be_written_is_not_told() {
        let dir = tempfile::tempdir().expect("tmp");
        let layout = evomerge_engine::dataflow::DataFlowLayout::new(&[2], &Default::default()).expect("layout");
        let kind = StageKind::DataFlow { layout: &layout };
        let cancel = Arc::new(AtomicBool::new(false));
        let mut rec = Recorder::open(kind, dir.path(), &[], &cancel, &mut crate::Quiet).expect("open");
        // every write to /dev/full fails with ENOSPC
        rec.evals = std::fs::OpenOptions::new().append(true).open("/dev/full").expect("/dev/full");
        let c = Candidate { id: 0, generation: 0, genome: vec![1.0; layout.genes().len()] };
        let r = crate::evaluate::failed(&c, "x".into());
        assert_eq!(rec.record(&c, &r), None);
        assert!(cancel.load(Ordering::Relaxed), "the run is stopped");
        assert!(matches!(rec.write_err, Some(RunError::Io { .. })));
    }

    /// Fuzzing the replay of `evaluations.jsonl` (issue 23): valid records cut, damaged,
    /// duplicated, with odd values, then opened as a resumed stage and read as `status` does;
    /// nothing may panic. `EVOMERGE_FUZZ_CASES` cases (default 1,000).
    #[test]
    fn fuzz_evaluations_replay() {
        use rand_core::{Rng, SeedableRng};
        let cases: u64 = std::env::var("EVOMERGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let mut below = |n: usize| (r.next_u64() % n.max(1) as u64) as usize;
        let dir = tempfile::tempdir().expect("tmp");
        let layout = evomerge_engine::dataflow::DataFlowLayout::new(&[2], &Default::default()).expect("layout");
        let genes = layout.genes().len();
        let kind = StageKind::DataFlow { layout: &layout };
        let objectives = [evomerge_fitness::Objective { name: "t/acc".into(), direction: evomerge_search::Direction::Maximize }];
        let good = |id: u64| {
            let genome: Vec<String> = (0..genes).map(|g| format!("{}", (id as usize + g) % 2)).collect();
            format!(
                r#"{{"id":{id},"generation":0,"genome":[{}],"objectives":{{"t/acc":0.5}},"std_errors":[0.1],"minimized":[-0.5],"items":3,"tokens":9,"seconds":0.1,"materialize_seconds":0.0}}"#,
                genome.join(",")
            )
        };
        let odd = ["null", "-1", "1e999", "\"x\"", "[]", "{}", "18446744073709551616", "NaN", "[1,2,3]"];
        let t0 = Instant::now();
        for case in 0..cases {
            let mut lines: Vec<Vec<u8>> = (0..1 + below(6) as u64).map(|id| good(id).into_bytes()).collect();
            for _ in 0..1 + below(3) {
                let i = below(lines.len());
                match below(6) {
                    0 => {
                        let l = lines[i].clone();
                        lines.push(l);
                    }
                    1 => {
                        let cut = below(lines[i].len());
                        lines[i].truncate(cut);
                    }
                    2 => {
                        let field = ["\"id\":", "\"generation\":", "\"minimized\":", "\"items\":", "\"objectives\":", "\"genome\":"][below(6)];
                        let text = String::from_utf8_lossy(&lines[i]).into_owned();
                        if let Some(at) = text.find(field) {
                            let end = at + field.len();
                            let rest = text[end..].find([',', '}']).map_or(text.len(), |e| end + e);
                            let v = odd[below(odd.len())];
                            let mut t = text;
                            t.replace_range(end..rest, v);
                            lines[i] = t.into_bytes();
                        }
                    }
                    3 if !lines[i].is_empty() => {
                        // any byte, invalid UTF-8 included
                        let at = below(lines[i].len());
                        lines[i][at] ^= 1 << below(8);
                    }
                    4 => lines.insert(i, vec![]),
                    _ => {}
                }
            }
            let mut text = lines.join(&b'\n');
            if below(2) == 0 {
                text.push(b'\n');
            }
            std::fs::write(dir.path().join(EVALUATIONS), &text).expect("write");
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let cancel = Arc::new(AtomicBool::new(false));
                if let Ok(rec) = Recorder::open(kind, dir.path(), &objectives, &cancel, &mut crate::Quiet) {
                    for c in (0..8).map(|id| Candidate { id, generation: 0, genome: vec![1.0; genes] }) {
                        let _ = rec.replayed(c.id);
                        let _ = rec.repeat(&c);
                    }
                }
                let _ = crate::run_dir::read_evaluations(dir.path());
                let recs = crate::RunDir::new(dir.path()).evaluations();
                let _ = crate::best_by_mean(&recs);
                let _ = crate::ranked(&recs);
            }));
            assert!(opened.is_ok(), "case {case} panicked on:\n{}", String::from_utf8_lossy(&text));
        }
        eprintln!("fuzz replay: {cases} cases in {:.1} s", t0.elapsed().as_secs_f64());
    }

    /// Found by the replay fuzzer: one byte of invalid UTF-8 in `evaluations.jsonl` used to
    /// make the whole file read as empty (every candidate scored again on resume).
    #[test]
    fn a_damaged_byte_costs_its_line_not_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let rec = |id: u64| format!(r#"{{"id":{id},"generation":0,"genome":[0.5],"failure":"x","seconds":0.1}}"#);
        let mut bytes = format!("{}\n{}\n{}\n", rec(0), rec(1), rec(2)).into_bytes();
        let at = bytes.iter().position(|&b| b == b'x').expect("x");
        bytes[at] = 0xFF;
        std::fs::write(dir.path().join(EVALUATIONS), bytes).expect("write");
        assert_eq!(read_evaluation_lines(dir.path()).iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_whole_last_record_keeps_its_place_and_a_cut_one_goes() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(EVALUATIONS);
        let rec = r#"{"id":0,"generation":0,"genome":[0.5],"failure":"x","seconds":0.1}"#;
        let open = |p: &Path| std::fs::OpenOptions::new().append(true).open(p).expect("open");
        // the newline alone is missing: the record stays (its candidate was scored)
        std::fs::write(&path, format!("{rec}\n{}", rec.replace("\"id\":0", "\"id\":1"))).expect("write");
        assert_eq!(repair_last_line(&path, &mut open(&path), &mut crate::Quiet).expect("repair"), None);
        assert_eq!(read_evaluation_lines(dir.path()).len(), 2);
        assert!(std::fs::read_to_string(&path).expect("read").ends_with("}\n"));
        // cut inside the record: removed, the lines before kept byte for byte
        let before = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("{before}{}", &rec[..20])).expect("write");
        assert_eq!(repair_last_line(&path, &mut open(&path), &mut crate::Quiet).expect("repair"), None, "cut inside the genome");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
        // cut after the genome: its candidate is known
        std::fs::write(&path, format!("{before}{}", &rec[..50])).expect("write");
        let c = repair_last_line(&path, &mut open(&path), &mut crate::Quiet).expect("repair");
        assert_eq!(c, Some(Candidate { id: 0, generation: 0, genome: vec![0.5] }));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), before);
    }
}
