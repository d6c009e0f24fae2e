//! Calibration of anchor / IRT estimators: every item's result for the source models and for
//! `[calibration] candidates` random merges, kept in `RUN_DIR/calibration.jsonl` as they are
//! scored so that a killed or resumed run picks up where it was.

use std::path::Path;
use std::time::Instant;

use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{self, LanguageModel};
use evomerge_fitness::TaskEstimator;
use evomerge_fitness::estimators::Responses;
use evomerge_fitness::tasks::Task;
use evomerge_search::SearchSpace;

use crate::error::{Result, RunError};
use crate::experiment::Experiment;
use crate::observer::{Notice, RunObserver};
use crate::records::{CalibrationHeader, CalibrationRow};
use crate::resources::{runtime_bytes, worker_count};
use crate::run_dir::{CALIBRATION, config_hash, write_atomic};
use crate::setup::Setup;

/// Builds the estimators. Anchor / IRT estimators first need every item's result for the source
/// models and for `[calibration] candidates` random merges (a dry run fits on the sources
/// alone). The merges are scored `workers` at a time where the search would (small models on
/// the CPU, `--workers`), in order, so the rows do not depend on how many there were. With
/// `cache` (the run directory), each row is appended to `calibration.jsonl` as soon as it is
/// scored, and rows found there are not scored again.
pub fn calibrate(s: &mut Setup, dry_run: bool, cache: Option<&Path>, workers: usize, observer: &mut dyn RunObserver) -> Result<()> {
    let needs_cal: Vec<bool> = s.exp.objectives.iter().map(|o| o.estimator.needs_calibration()).collect();
    let tasks = std::mem::take(&mut s.tasks);
    let mut cal: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let mut rows = 0;
    if needs_cal.iter().any(|&n| n) {
        let exp = &s.exp;
        let n_sources = exp.source_count();
        let n = if dry_run { 0 } else { exp.calibration.candidates };
        let items: Vec<usize> = tasks.iter().zip(&needs_cal).map(|(t, &need)| if need { t.items.len() } else { 0 }).collect();
        let mut store = match cache {
            Some(dir) => Some(CalibrationCache::open(dir, &calibration_key(exp, &tasks)?, &items, observer)?),
            None => None,
        };
        let mut done = store.as_mut().map_or(vec![], |c| std::mem::take(&mut c.rows));
        let total = n_sources + n;
        done.truncate(total);
        if !done.is_empty() {
            observer.notice(&Notice::CalibrationRowsRead { read: done.len(), total });
        }
        // one row of every calibrated objective's matrix: `model` on all its items
        let (tok, prefix) = (&s.tok, s.prefix);
        let score = |model: &mut dyn LanguageModel| -> Result<Vec<Vec<f64>>> {
            let per_task = tasks.iter().zip(&needs_cal);
            Ok(per_task
                .map(|(task, &need)| if need { TaskEstimator::item_scores(task, tok, prefix, model) } else { Ok(vec![]) })
                .collect::<Result<_, _>>()?)
        };
        let mut keep = |done: &mut Vec<Vec<Vec<f64>>>, row: Vec<Vec<f64>>| -> Result<()> {
            if let Some(c) = store.as_mut() {
                c.append(done.len(), &row)?;
            }
            done.push(row);
            Ok(())
        };
        for r in exp.sources().skip(done.len()) {
            let mut m = model::open_dir(exp.runtime, exp.device, &resolve_model(r, None)?)?;
            let row = score(m.as_mut())?;
            keep(&mut done, row)?;
        }
        let genomes = calibration_genomes(&s.space, n, exp.seed);
        let todo = &genomes[done.len().saturating_sub(n_sources).min(n)..];
        if !todo.is_empty() {
            observer.notice(&Notice::CalibrationStarted { sources: n_sources, merges: n });
            let w = worker_count(workers, exp.device, &s.base, s.memory, runtime_bytes(&s.base)).min(todo.len());
            while s.spare.len() + 1 < w {
                let rt = s.open_runtime()?;
                s.spare.push(rt);
            }
            let t0 = Instant::now();
            let (layout, opened, materializer) = (&s.layout, &s.opened, &s.materializer);
            let merge_and_score = |genome: &[f64], rt: &mut dyn LanguageModel| -> Result<Vec<Vec<f64>>> {
                let plan = layout.plan(genome, opened, exp.seed)?;
                materializer.materialize(&plan, rt, 0)?;
                score(rt)
            };
            let mut runtimes: Vec<&mut Box<dyn LanguageModel>> = std::iter::once(&mut s.runtime).chain(s.spare.iter_mut()).take(w).collect();
            for chunk in todo.chunks(w) {
                // one merge per worker, recorded in order
                let mut out: Vec<Option<Result<Vec<Vec<f64>>>>> = chunk.iter().map(|_| None).collect();
                rayon::scope(|sc| {
                    for ((g, rt), slot) in chunk.iter().zip(runtimes.iter_mut()).zip(out.iter_mut()) {
                        let merge_and_score = &merge_and_score;
                        sc.spawn(move |_| *slot = Some(merge_and_score(g, rt.as_mut())));
                    }
                });
                for r in out {
                    let row = r.expect("every calibration merge scored")?;
                    keep(&mut done, row)?;
                }
                tracing::info!("calibration merge {}/{n} scored on every item ({:.1} s)", done.len() - n_sources, t0.elapsed().as_secs_f64());
            }
            observer.notice(&Notice::CalibrationDone { seconds: t0.elapsed().as_secs_f64() });
        }
        rows = done.len();
        for row in done {
            for (c, r) in cal.iter_mut().zip(row) {
                c.extend(r);
            }
        }
    }
    for ((o, task), cal) in s.exp.objectives.iter().zip(tasks).zip(cal) {
        let cal = (!cal.is_empty()).then(|| Responses::new(rows, task.items.len(), cal));
        s.estimators.push(TaskEstimator::new(task, s.tok.clone(), s.prefix, o.estimator, cal.as_ref())?);
    }
    Ok(())
}

/// What calibration rows depend on: the seed, the device, the merge, the genome, the
/// objectives and their tasks' specs and items (not the number of calibration merges: their
/// genomes are one seeded stream, so a longer list extends a shorter one).
fn calibration_key(exp: &Experiment, tasks: &[Task]) -> Result<String> {
    let tasks: Vec<_> = tasks.iter().map(|t| (&t.spec, &t.items)).collect();
    let text = serde_json::to_string(&(exp.seed, &exp.device, &exp.merge, &exp.genome, &exp.objectives, tasks))
        .map_err(|e| RunError::Experiment(format!("calibration key: {e}")))?;
    Ok(config_hash(&text))
}

/// `RUN_DIR/calibration.jsonl`: a [`CalibrationHeader`], then one [`CalibrationRow`] per line,
/// appended and synced as each is scored.
struct CalibrationCache {
    file: std::fs::File,
    rows: Vec<Vec<Vec<f64>>>,
}

impl CalibrationCache {
    /// Reads the rows a file with this key holds (up to a line cut by a crash); any other
    /// file is replaced by a new header.
    fn open(dir: &Path, key: &str, items: &[usize], observer: &mut dyn RunObserver) -> Result<Self> {
        let path = dir.join(CALIBRATION);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let header = lines.next().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        let fits = header.clone().and_then(|h| serde_json::from_value::<CalibrationHeader>(h).ok()).is_some_and(|h| h.key == key && h.items == items);
        let mut rows = vec![];
        if fits {
            for l in lines {
                match serde_json::from_str::<CalibrationRow>(l) {
                    Ok(r) if r.row == rows.len() && r.scores.iter().map(Vec::len).eq(items.iter().copied()) => rows.push(r.scores),
                    _ => break,
                }
            }
        } else if header.is_some() {
            observer.notice(&Notice::Warning(format!("{} was written for another configuration; calibrating again", path.display())));
        }
        // Rewrite what was read (drops a cut last line), then append from there.
        let mut text = json_line(&CalibrationHeader { key: key.to_string(), items: items.to_vec() });
        for (i, r) in rows.iter().enumerate() {
            text += &json_line(&CalibrationRow { row: i, scores: r.clone() });
        }
        std::fs::create_dir_all(dir).map_err(RunError::io(dir))?;
        write_atomic(&path, &text)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(RunError::io(&path))?;
        Ok(Self { file, rows })
    }

    fn append(&mut self, row: usize, scores: &[Vec<f64>]) -> Result<()> {
        use std::io::Write as _;
        // one write of the whole line: a kill leaves it whole or missing, rarely cut
        let line = json_line(&CalibrationRow { row, scores: scores.to_vec() });
        self.file.write_all(line.as_bytes()).and_then(|()| self.file.sync_data()).map_err(|err| RunError::Io { path: CALIBRATION.into(), err })
    }
}

/// A record as one JSON line.
fn json_line<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default() + "\n"
}

/// `n` genomes drawn uniformly from `space` (seeded by the run's seed, apart from the
/// optimizer's own stream): the calibration merges.
pub fn calibration_genomes(space: &SearchSpace, n: usize, seed: u64) -> Vec<Vec<f64>> {
    use rand_core::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xCA11_B8A7_E5EE_D000);
    let mut unit = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (0..n).map(|_| space.lower.iter().zip(&space.upper).map(|(&lo, &hi)| lo + unit() * (hi - lo)).collect()).collect()
}
