//! `evomerge search EXPERIMENT.toml` and `evomerge resume RUN_DIR`: the search loop.
//!
//! Per candidate: genome → recipe (engine::genome) → merge in memory → weights swapped into the
//! resident model → every objective's estimator → one line of `evaluations.jsonl`. The run
//! directory holds `config.resolved.toml`, `checkpoint.json` (+ `.prev.json`, written after
//! every generation and on Ctrl-C), `evaluations.jsonl` (append-only) and `best.yaml` (the best
//! candidate as a mergekit recipe, runnable with `evomerge merge`). Resume restores the
//! optimizer from the checkpoint and replays already-scored candidates from
//! `evaluations.jsonl` instead of scoring them again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use evomerge_engine::dataflow::{self, DataFlowLayout};
use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::resident::ResidentMerge;
use evomerge_engine::genome::GenomeLayout;
use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{self, DeviceSpec, LanguageModel, ModelSpec, Tokenizer};
use evomerge_engine::recipe::MergePlan;
use evomerge_engine::{Checkpoint, TensorSource};
use evomerge_fitness::tasks::{Task, TaskSpec};
use evomerge_fitness::estimators::Responses;
use evomerge_fitness::{FitnessEstimator, TaskEstimator};
use evomerge_search::runner::prev_path;
use evomerge_search::{
    Candidate, CmaEs, CmaEsConfig, GeneKind, GenerationReport, Nsga2, Nsga2Config, Observer, Optimizer, Outcome,
    RandomSearch, Runner, SearchSpace, Termination,
};
use serde_json::json;

use crate::commands::runs::read_evaluations;
use crate::experiment::{Experiment, OptimizerKind, OptimizerSpec};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge search experiments/demo.toml\n  evomerge search experiments/search-tiny.toml --run-dir runs/try1 --workers 1\n\n\
The experiment file format is documented in experiments/README.md. Ctrl-C writes a checkpoint;\n\
`evomerge resume RUN_DIR` continues the run.")]
pub struct SearchArgs {
    /// Experiment TOML file.
    pub experiment: PathBuf,
    /// Run directory to create (default: <run_root>/<timestamp>-<name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Override the experiment's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override the experiment's device (cpu, cuda:N).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Check the experiment (models, genome, tasks) and print the genome size; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: SearchProgress,
    /// Candidates (and calibration merges) scored at once, each on its own copy of the model
    /// (0 = auto: one per core for models up to 32 M parameters on the CPU, where one core runs
    /// a forward pass as fast as all of them, memory permitting; else 1). Results do not
    /// depend on it.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// A run directory written by `evomerge search`.
    pub run_dir: PathBuf,
    /// Continue even though config.resolved.toml was edited since the run started.
    #[arg(long)]
    pub force: bool,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: SearchProgress,
    /// Candidates (and calibration merges) scored at once, each on its own copy of the model
    /// (0 = auto: one per core for models up to 32 M parameters on the CPU, where one core runs
    /// a forward pass as fast as all of them, memory permitting; else 1). Results do not
    /// depend on it.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

const CONFIG: &str = crate::experiment::RESOLVED;
const CHECKPOINT: &str = "checkpoint.json";
const EVALS: &str = "evaluations.jsonl";
const CONFIG_HASH: &str = "config.sha256";
const REFERENCES: &str = "references.json";
const CALIBRATION: &str = "calibration.jsonl";

/// SHA-256 of the resolved configuration (hex).
fn config_hash(text: &str) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

/// Everything a run needs, built from an experiment.
struct Setup {
    exp: Experiment,
    layout: GenomeLayout,
    space: SearchSpace,
    /// One per objective, built by [`calibrate`] (empty before).
    estimators: Vec<TaskEstimator>,
    /// The objectives' tasks until [`calibrate`] turns them into estimators.
    tasks: Vec<Task>,
    tok: Tokenizer,
    prefix: u32,
    runtime: Box<dyn LanguageModel>,
    /// Runtimes of further workers opened by [`calibrate`], which `drive` reuses.
    spare: Vec<Box<dyn LanguageModel>>,
    /// The merge inputs held in the runtime's weight layout (candidates merged in place), when
    /// the method allows it and memory suffices; `None`: candidates are merged from the memory
    /// maps and swapped in.
    resident: Option<ResidentMerge>,
    /// Candidates are merged in place (`resident` is built unless this is a dry run).
    in_place: bool,
    /// The base model (its config and size size the workers and the data-flow stage).
    base: Checkpoint,
    /// Estimated peak host memory of the run (bytes).
    memory: u64,
}

/// Bytes of memory available to a run: `EVOMERGE_MEMORY_BYTES` if set (a cap the user chooses),
/// else `MemAvailable` from /proc/meminfo; `None` when unknown.
fn memory_available() -> Option<u64> {
    if let Some(v) = std::env::var("EVOMERGE_MEMORY_BYTES").ok().and_then(|v| v.parse().ok()) {
        return Some(v);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Parameters of a checkpoint.
fn param_count(base: &Checkpoint) -> u64 {
    base.raw_bytes() / base.dtype().size() as u64
}

/// Host memory of the loaded model's f32 weights (plus the transposed copy of a tied embedding).
fn runtime_bytes(base: &Checkpoint) -> u64 {
    let tied = if base.config.tie_word_embeddings { (base.config.vocab_size * base.config.hidden_size) as u64 * 4 } else { 0 };
    param_count(base) * 4 + tied
}

/// Host memory a CPU run holds at its peak when candidates are merged from the memory maps:
/// the loaded model and one merged candidate in f32. Activations and the page cache of the
/// memory-mapped sources come on top and are not counted.
fn memory_needed(base: &Checkpoint) -> u64 {
    runtime_bytes(base) + param_count(base) * 4
}

/// Holds the merge inputs in the runtime's layout when the method is elementwise and the
/// memory is there (see `evomerge_engine::resident`); says why not otherwise. Returns the
/// resident inputs (built only if `build`, and then also held on the runtime's device where
/// [`device_merge`] says so), whether candidates are merged in place, and the run's estimated
/// peak memory.
fn resident_merge(exp: &Experiment, layout: &GenomeLayout, base: &Checkpoint, runtime: &mut dyn LanguageModel, build: bool) -> Result<(Option<ResidentMerge>, bool, u64)> {
    let streamed = memory_needed(base);
    let recipe = layout.decode(&layout.initial())?;
    let plan = MergePlan::build(&recipe, serde_norway::to_string(&recipe)?, None, exp.seed)?;
    let weights = runtime.weight_layout(0)?;
    let why_not = match ResidentMerge::bytes_needed(&plan, &weights) {
        Err(why) => why,
        Ok(bytes) => {
            let need = runtime_bytes(base) + bytes;
            match memory_available() {
                Some(avail) if need > avail => format!(
                    "holding the inputs in the runtime's layout needs {:.1} GiB, {:.1} GiB are available",
                    gib(need),
                    gib(avail)
                ),
                _ => {
                    if !build {
                        return Ok((None, true, need));
                    }
                    tracing::info!("merge inputs held in the runtime's layout ({:.2} GiB): candidates are merged in place", gib(bytes));
                    let resident = ResidentMerge::new(&plan, weights)?;
                    if device_merge(exp.device) {
                        if resident.hold_on_device(&plan, runtime, 0)? {
                            tracing::info!("merge inputs held on {}: candidates are merged there", exp.device);
                        } else {
                            tracing::info!("{} candidates are merged on the host and uploaded", plan.method.name());
                        }
                    }
                    return Ok((Some(resident), true, need));
                }
            }
        }
    };
    tracing::info!("candidates are merged from the memory-mapped checkpoints and swapped in ({why_not})");
    Ok((None, false, streamed))
}

/// Whether resident inputs also go to the runtime's device, where candidates are then merged
/// with burn ops (task arithmetic, linear): on a GPU. EVOMERGE_DEVICE_MERGE=1 does the same on
/// the CPU, which is how the tests check that path (the plain-Rust kernels are faster there);
/// =0 keeps a GPU run on the host path (to compare).
fn device_merge(device: DeviceSpec) -> bool {
    match std::env::var("EVOMERGE_DEVICE_MERGE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => device != DeviceSpec::Cpu,
    }
}

/// Merges `plan` into the runtime's model 0: in place from the resident inputs when they are
/// held, else streamed from the memory maps and swapped in (the same values either way).
fn materialize(plan: &MergePlan, resident: Option<&ResidentMerge>, runtime: &mut dyn LanguageModel) -> Result<()> {
    match resident {
        Some(r) => r.materialize(plan, runtime, 0)?,
        None => runtime.load_weights(0, &merge_to_memory(plan)? as &dyn TensorSource)?,
    }
    Ok(())
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Largest model (parameters) for which `--workers 0` scores one candidate per core.
const SMALL_MODEL_PARAMS: u64 = 32_000_000;

/// How many candidates are scored at once: `requested` unless 0 (auto). Auto: on the CPU, one
/// per core for models of at most [`SMALL_MODEL_PARAMS`] parameters — their matrices are too
/// small for the runtime's parallel loops to use the other cores (the demo zoo runs as fast on
/// one core as on two, BENCHMARKS.md) — as far as the available memory, less `reserved`, holds
/// `per_worker` bytes for each worker beyond the first; larger models, and GPUs, one at a time.
fn worker_count(requested: usize, device: DeviceSpec, base: &Checkpoint, reserved: u64, per_worker: u64) -> usize {
    if requested > 0 {
        return requested;
    }
    if device != DeviceSpec::Cpu || param_count(base) > SMALL_MODEL_PARAMS {
        return 1;
    }
    let cores = rayon::current_num_threads();
    let by_memory = memory_available().map_or(cores, |a| 1 + (a.saturating_sub(reserved) / per_worker.max(1)) as usize);
    cores.min(by_memory).max(1)
}

/// Loads everything a run needs; `dry_run` skips building the resident inputs.
fn setup(exp: Experiment, dry_run: bool) -> Result<Setup> {
    let (base, layout) = exp.layout()?;
    let need = memory_needed(&base);
    if let Some(avail) = memory_available().filter(|&a| exp.device == DeviceSpec::Cpu && need > a) {
        bail!(
            "this search needs about {:.1} GiB of memory ({} in f32: the resident model plus one merged candidate) \
             but {:.1} GiB are available; use a smaller model, free memory, or a GPU (--device cuda:0)",
            gib(need),
            base.label(),
            gib(avail)
        );
    }
    let genes = layout.genes();
    let space = SearchSpace::new(
        genes.iter().map(|g| g.name.clone()).collect(),
        genes.iter().map(|g| g.lower).collect(),
        genes.iter().map(|g| g.upper).collect(),
        vec![GeneKind::Real; genes.len()],
    )?;
    if exp.objectives.len() > 1 && exp.optimizer.kind == OptimizerKind::Cmaes {
        bail!("CMA-ES optimizes one objective; use optimizer.kind = \"nsga2\" (or \"random\") for {}", exp.objectives.len());
    }
    if let Some(df) = &exp.dataflow {
        if exp.objectives.len() > 1 && df.optimizer.kind == OptimizerKind::Cmaes {
            bail!("CMA-ES optimizes one objective; use dataflow.optimizer.kind = \"nsga2\" (or \"random\") for {}", exp.objectives.len());
        }
    }
    let prefix = base.config.prefix_token();
    let tok = Tokenizer::from_dir(base.dir())?;
    let mut tasks = Vec::new();
    for o in &exp.objectives {
        let spec = TaskSpec::load(&o.task).map_err(anyhow::Error::msg)?;
        tasks.push(Task::load(spec, o.data.as_deref(), o.fewshot_data.as_deref())?);
    }
    let runtime = model::open(exp.device, &[ModelSpec::from_checkpoint(&base)])?;
    let mut s = Setup { exp, layout, space, estimators: vec![], tasks, tok, prefix, runtime, spare: vec![], resident: None, in_place: false, base, memory: 0 };
    let (resident, in_place, memory) = resident_merge(&s.exp, &s.layout, &s.base, s.runtime.as_mut(), !dry_run)?;
    (s.resident, s.in_place, s.memory) = (resident, in_place, memory);
    Ok(s)
}

/// Builds the estimators. Anchor / IRT estimators first need every item's result for the source
/// models and for `[calibration] candidates` random merges (a dry run fits on the sources
/// alone). The merges are scored `workers` at a time where the search would (small models on
/// the CPU, `--workers`), in order, so the rows do not depend on how many there were. With
/// `cache` (the run directory), each row is appended to `calibration.jsonl` as soon as it is
/// scored, and rows found there are not scored again: a run killed during calibration, or
/// resumed later, picks up where it was.
fn calibrate(s: &mut Setup, dry_run: bool, cache: Option<&Path>, workers: usize) -> Result<()> {
    let needs_cal: Vec<bool> = s.exp.objectives.iter().map(|o| o.estimator.needs_calibration()).collect();
    let tasks = std::mem::take(&mut s.tasks);
    let mut cal: Vec<Vec<f64>> = vec![Vec::new(); tasks.len()];
    let mut rows = 0;
    if needs_cal.iter().any(|&n| n) {
        let exp = &s.exp;
        let n_sources = source_count(exp);
        let n = if dry_run { 0 } else { exp.calibration.candidates };
        let items: Vec<usize> = tasks.iter().zip(&needs_cal).map(|(t, &need)| if need { t.items.len() } else { 0 }).collect();
        let mut store = match cache {
            Some(dir) => Some(CalibrationCache::open(dir, &calibration_key(exp, &tasks)?, &items)?),
            None => None,
        };
        let mut done = store.as_mut().map_or(vec![], |c| std::mem::take(&mut c.rows));
        let total = n_sources + n;
        done.truncate(total);
        if !done.is_empty() {
            eprintln!("calibration: {} of {total} rows read from {CALIBRATION}", done.len());
        }
        // one row of every calibrated objective's matrix: `model` on all its items
        let (tok, prefix) = (&s.tok, s.prefix);
        let score = |model: &mut dyn LanguageModel| -> Result<Vec<Vec<f64>>> {
            let per_task = tasks.iter().zip(&needs_cal);
            Ok(per_task.map(|(task, &need)| if need { TaskEstimator::item_scores(task, tok, prefix, model) } else { Ok(vec![]) }).collect::<Result<_, _>>()?)
        };
        let mut keep = |done: &mut Vec<Vec<Vec<f64>>>, row: Vec<Vec<f64>>| -> Result<()> {
            if let Some(c) = store.as_mut() {
                c.append(done.len(), &row)?;
            }
            done.push(row);
            Ok(())
        };
        for r in exp.merge.models.iter().chain(exp.merge.base_model.as_ref()).skip(done.len()) {
            let mut m = model::open_dir(exp.device, &resolve_model(r, None)?)?;
            let row = score(m.as_mut())?;
            keep(&mut done, row)?;
        }
        let genomes = calibration_genomes(&s.space, n, exp.seed);
        let todo = &genomes[done.len().saturating_sub(n_sources).min(n)..];
        if !todo.is_empty() {
            eprintln!("calibrating anchor / IRT estimators: {n_sources} source models and {n} random merges, every item of each such objective");
            let w = worker_count(workers, exp.device, &s.base, s.memory, runtime_bytes(&s.base)).min(todo.len());
            while s.spare.len() + 1 < w {
                s.spare.push(model::open(exp.device, &[ModelSpec::from_checkpoint(&s.base)])?);
            }
            let t0 = Instant::now();
            let (layout, resident) = (&s.layout, s.resident.as_ref());
            let merge_and_score = |genome: &[f64], rt: &mut dyn LanguageModel| -> Result<Vec<Vec<f64>>> {
                let recipe = layout.decode(genome)?;
                let plan = MergePlan::build(&recipe, serde_norway::to_string(&recipe)?, None, exp.seed)?;
                materialize(&plan, resident, rt)?;
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
            eprintln!("calibration done in {:.1} s", t0.elapsed().as_secs_f64());
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

/// Calibration rows scored so far and the rows the run needs (sources + calibration merges),
/// for `status`; `None` when no objective uses an anchor / IRT estimator.
pub fn calibration_progress(run_dir: &Path, exp: &Experiment) -> Option<(usize, usize)> {
    if !exp.objectives.iter().any(|o| o.estimator.needs_calibration()) {
        return None;
    }
    let total = source_count(exp) + exp.calibration.candidates;
    let text = std::fs::read_to_string(run_dir.join(CALIBRATION)).unwrap_or_default();
    let rows = text.lines().skip(1).take_while(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()).count();
    Some((rows.min(total), total))
}

/// The merge's source models (its models and the base): the first calibration rows.
fn source_count(exp: &Experiment) -> usize {
    exp.merge.models.len() + usize::from(exp.merge.base_model.is_some())
}

/// What calibration rows depend on: the seed, the device, the merge, the genome, the
/// objectives and their tasks' specs and items (not the number of calibration merges: their
/// genomes are one seeded stream, so a longer list extends a shorter one).
fn calibration_key(exp: &Experiment, tasks: &[Task]) -> Result<String> {
    let tasks: Vec<_> = tasks.iter().map(|t| (&t.spec, &t.items)).collect();
    let text = serde_json::to_string(&(exp.seed, &exp.device, &exp.merge, &exp.genome, &exp.objectives, tasks))?;
    Ok(config_hash(&text))
}

/// `RUN_DIR/calibration.jsonl`: a header `{"key", "items"}`, then one line per calibration row
/// (`{"row", "scores"}`: per objective, every item's score; empty for objectives without
/// calibration), appended and synced as each is scored.
struct CalibrationCache {
    file: std::fs::File,
    rows: Vec<Vec<Vec<f64>>>,
}

impl CalibrationCache {
    /// Reads the rows a file with this key holds (up to a line cut by a crash); any other
    /// file is replaced by a new header.
    fn open(dir: &Path, key: &str, items: &[usize]) -> Result<Self> {
        let path = dir.join(CALIBRATION);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let header = lines.next().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        let fits = header.as_ref().is_some_and(|h| h["key"] == key && h["items"] == serde_json::json!(items));
        let mut rows = vec![];
        if fits {
            for l in lines {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { break };
                let scores: Option<Vec<Vec<f64>>> = serde_json::from_value(v["scores"].clone()).ok();
                match scores {
                    Some(sc) if v["row"] == rows.len() && sc.iter().map(Vec::len).eq(items.iter().copied()) => rows.push(sc),
                    _ => break,
                }
            }
        } else if header.is_some() {
            eprintln!("warning: {} was written for another configuration; calibrating again", path.display());
        }
        // Rewrite what was read (drops a cut last line), then append from there.
        let mut text = serde_json::json!({"key": key, "items": items}).to_string() + "\n";
        for (i, r) in rows.iter().enumerate() {
            text += &(serde_json::json!({"row": i, "scores": r}).to_string() + "\n");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&path, &text)?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, rows })
    }

    fn append(&mut self, row: usize, scores: &[Vec<f64>]) -> Result<()> {
        use std::io::Write as _;
        // one write of the whole line: a kill leaves it whole or missing, rarely cut
        let line = serde_json::json!({"row": row, "scores": scores}).to_string() + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to {CALIBRATION}"))
    }
}

/// `n` genomes drawn uniformly from `space` (seeded by the run's seed, apart from the
/// optimizer's own stream): the calibration merges.
fn calibration_genomes(space: &SearchSpace, n: usize, seed: u64) -> Vec<Vec<f64>> {
    use rand_core::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xCA11_B8A7_E5EE_D000);
    let mut unit = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (0..n).map(|_| space.lower.iter().zip(&space.upper).map(|(&lo, &hi)| lo + unit() * (hi - lo)).collect()).collect()
}

fn optimizer(s: &Setup) -> Result<Box<dyn Optimizer>> {
    let x0: Vec<f64> = s.layout.genes().iter().map(|g| (g.init - g.lower) / (g.upper - g.lower)).collect();
    let sources = if s.exp.optimizer.seed_sources { s.layout.source_genomes() } else { vec![] };
    make_optimizer(&s.exp.optimizer, s.space.clone(), x0, sources, s.exp.objectives.len(), s.exp.seed)
}

/// An optimizer over `space` starting at `x0` (unit coordinates; CMA-ES's mean). NSGA-II's
/// first population also holds `seeds` (genomes in the genes' units).
fn make_optimizer(
    o: &OptimizerSpec,
    space: SearchSpace,
    x0: Vec<f64>,
    seeds: Vec<Vec<f64>>,
    n_obj: usize,
    seed: u64,
) -> Result<Box<dyn Optimizer>> {
    if n_obj > 1 && o.kind == OptimizerKind::Cmaes {
        bail!("CMA-ES optimizes one objective; use optimizer.kind = \"nsga2\" (or \"random\") for {n_obj}");
    }
    // The start point (default parameters; model A itself for a data-flow stage) in the genes'
    // own units, as both optimizers take it.
    let start: Vec<f64> = x0.iter().enumerate().map(|(i, u)| space.lower[i] + u * (space.upper[i] - space.lower[i])).collect();
    Ok(match o.kind {
        // CMA-ES's mean starts there.
        OptimizerKind::Cmaes => Box::new(CmaEs::new(
            space,
            &CmaEsConfig { population: o.population, sigma0: o.sigma0, x0: Some(start), seed, ..Default::default() },
        )?),
        OptimizerKind::Nsga2 => {
            // It is one member of the first population, with the seeds.
            let initial: Vec<Vec<f64>> = std::iter::once(start).chain(seeds).collect();
            Box::new(Nsga2::new(space, &Nsga2Config { population: o.population.unwrap_or(40), objectives: n_obj, seed, initial, ..Default::default() })?)
        }
        OptimizerKind::Random => Box::new(RandomSearch::new(space, o.population.unwrap_or(8), n_obj, seed)?),
    })
}

/// Objective values, their standard errors, items and tokens scored, and the recipe YAML.
type Scored = (Vec<f64>, Vec<f64>, usize, usize, String);

/// How `search` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SearchProgress {
    /// A bar on a terminal, JSON lines otherwise.
    Auto,
    /// A bar on stderr.
    Bar,
    /// One JSON object per generation on stdout.
    Jsonl,
    /// Nothing (log.jsonl is still written).
    Off,
}

impl SearchProgress {
    /// `Auto` made concrete: a bar on a terminal, JSON lines otherwise.
    fn resolved(self) -> Self {
        use std::io::IsTerminal;
        match self {
            SearchProgress::Auto if std::io::stderr().is_terminal() => SearchProgress::Bar,
            SearchProgress::Auto => SearchProgress::Jsonl,
            m => m,
        }
    }
}

/// Per-generation reports: bar or JSON lines, and always a line in the run's `log.jsonl`.
struct Progress {
    start: Instant,
    mode: SearchProgress,
    bar: indicatif::ProgressBar,
    log: Option<std::fs::File>,
    generation_values: Vec<f64>,
    budget: Option<u64>,
}

impl Progress {
    fn new(mode: SearchProgress, budget: Option<u64>, run_dir: Option<&Path>) -> Self {
        let mode = mode.resolved();
        let bar = if mode == SearchProgress::Bar {
            let b = budget.map_or_else(indicatif::ProgressBar::no_length, indicatif::ProgressBar::new);
            b.set_style(
                indicatif::ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} candidates (eta {eta}) {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let log = run_dir.and_then(|d| std::fs::OpenOptions::new().create(true).append(true).open(d.join("log.jsonl")).ok());
        Self { start: Instant::now(), mode, bar, log, generation_values: vec![], budget }
    }

    fn event(&mut self, v: &serde_json::Value) {
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{v}");
        }
        if self.mode == SearchProgress::Jsonl {
            println!("{v}");
        }
    }
}

impl Observer for Progress {
    fn on_evaluation(&mut self, _c: &Candidate, e: &evomerge_search::Evaluation) {
        if let Outcome::Scored(v) = &e.outcome {
            self.generation_values.extend(v.first());
        }
        self.bar.inc(1);
    }

    fn on_generation(&mut self, r: &GenerationReport) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let per_hour = r.evaluations as f64 / secs * 3600.0;
        let vals = std::mem::take(&mut self.generation_values);
        let mean = (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64);
        let eta = self.budget.map(|b| b.saturating_sub(r.evaluations) as f64 / (r.evaluations.max(1) as f64 / secs));
        let line = json!({"event": "generation", "generation": r.generation, "evaluations": r.evaluations,
            "failures": r.failures, "best_minimized": r.best, "mean_minimized": mean,
            "candidates_per_hour": per_hour, "eta_seconds": eta, "seconds": r.seconds});
        self.event(&line);
        self.bar.set_position(r.evaluations);
        self.bar.set_message(format!(
            "gen {} best {} mean {}",
            r.generation,
            r.best.map_or("-".into(), |b| format!("{b:.4}")),
            mean.map_or("-".into(), |m| format!("{m:.4}"))
        ));
        tracing::info!(generation = r.generation, evaluations = r.evaluations, best = ?r.best, "generation done");
    }

    fn on_fallback(&mut self, reason: &str) {
        eprintln!("warning: {reason}");
        self.event(&json!({"event": "checkpoint_fallback", "reason": reason}));
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Candidates already scored in an earlier session (id → outcome).
fn replayed(run_dir: &Path) -> Result<HashMap<u64, Outcome>> {
    let path = run_dir.join(EVALS);
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(out) };
    for line in text.lines() {
        // A line cut by a crash (kill -9 while appending) was never told to the optimizer: the
        // candidate is scored again and recorded on a new line.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let id = v["id"].as_u64().context("evaluation record without id")?;
        let outcome = match v["failure"].as_str() {
            Some(f) => Outcome::Failed(f.to_string()),
            None => Outcome::Scored(
                v["minimized"].as_array().context("record without minimized values")?.iter().filter_map(|x| x.as_f64()).collect(),
            ),
        };
        out.insert(id, outcome);
    }
    Ok(out)
}

/// What a stage's genomes are.
enum StageKind<'a> {
    /// Merge parameters: genome → recipe → merged weights swapped into the runtime.
    Params { layout: &'a GenomeLayout, seed: u64, resident: Option<&'a ResidentMerge> },
    /// A data-flow path through the runtime's loaded models (no weights move).
    DataFlow { layout: &'a DataFlowLayout },
}

impl StageKind<'_> {
    /// File holding the best candidate so far (one objective).
    fn best_file(&self) -> &'static str {
        match self {
            StageKind::Params { .. } => "best.yaml",
            StageKind::DataFlow { .. } => "best_path.json",
        }
    }
}

/// A runtime and its own estimators: one per candidate scored at once.
struct Worker {
    runtime: Box<dyn LanguageModel>,
    estimators: Vec<TaskEstimator>,
}

/// One candidate's scoring: objective values and standard errors, items, tokens, artifact;
/// the seconds it took (and of that, materializing it); its data-flow path in words.
struct Computed {
    result: Result<Scored>,
    seconds: f64,
    materialize_s: f64,
    path_text: Option<String>,
}

/// Identifies a candidate's weights (the result cache's key): stage tag + the genome's bits.
fn fingerprint(tag: &str, genome: &[f64]) -> String {
    format!("{tag}{}", genome.iter().map(|x| format!("{:016x}", x.to_bits())).collect::<String>())
}

/// Scores candidate `c` on one worker: merge it into (or route) the runtime, then run every
/// estimator.
fn score_candidate(kind: &StageKind<'_>, c: &Candidate, fp: &str, runtime: &mut dyn LanguageModel, estimators: &mut [TaskEstimator]) -> Computed {
    let t0 = Instant::now();
    let mut materialize_s = 0.0;
    let mut path_text = None;
    let result = (|| -> Result<Scored> {
        let artifact = match kind {
            StageKind::Params { layout, seed, resident } => {
                let recipe = layout.decode(&c.genome)?;
                let yaml = serde_norway::to_string(&recipe)?;
                let plan = MergePlan::build(&recipe, yaml.clone(), None, *seed)?;
                materialize(&plan, *resident, runtime)?;
                yaml
            }
            StageKind::DataFlow { layout } => {
                let path = layout.decode(&c.genome)?;
                path_text = Some(dataflow::describe(&path));
                let json = serde_json::to_string_pretty(&path)?;
                runtime.set_path(path)?;
                json
            }
        };
        materialize_s = t0.elapsed().as_secs_f64();
        let (mut values, mut ses, mut items, mut tokens) = (vec![], vec![], 0, 0);
        for e in estimators.iter_mut() {
            let f = e.evaluate(runtime, fp)?;
            values.extend(&f.values);
            ses.extend(&f.std_errors);
            items += f.items;
            tokens += f.tokens;
        }
        Ok((values, ses, items, tokens, artifact))
    })();
    Computed { result, seconds: t0.elapsed().as_secs_f64(), materialize_s, path_text }
}

/// A genome scored before: its earlier values, no work.
fn repeat(kind: &StageKind<'_>, c: &Candidate, values: Vec<f64>, ses: Vec<f64>) -> Computed {
    let t0 = Instant::now();
    let mut path_text = None;
    let result = (|| -> Result<Scored> {
        if let StageKind::DataFlow { layout } = kind {
            path_text = Some(dataflow::describe(&layout.decode(&c.genome)?));
        }
        Ok((values, ses, 0, 0, String::new()))
    })();
    Computed { result, seconds: t0.elapsed().as_secs_f64(), materialize_s: 0.0, path_text }
}

/// Scores `batch[i]` (fingerprint `fps[i]`) for every `i` in `todo`, spread over the workers (one candidate per worker
/// at a time, on the rayon pool); `out[k]` is `todo[k]`'s result.
fn score_parallel(kind: &StageKind<'_>, batch: &[Candidate], fps: &[String], todo: &[usize], workers: &mut [(&mut dyn LanguageModel, &mut [TaskEstimator])]) -> Vec<Computed> {
    if workers.len() == 1 || todo.len() == 1 {
        let (rt, est) = &mut workers[0];
        return todo.iter().map(|&i| score_candidate(kind, &batch[i], &fps[i], &mut **rt, est)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Computed>>> = todo.iter().map(|_| std::sync::Mutex::new(None)).collect();
    rayon::scope(|s| {
        for (rt, est) in workers.iter_mut() {
            let (next, slots) = (&next, &slots);
            s.spawn(move |_| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = todo.get(k) else { break };
                    let r = score_candidate(kind, &batch[i], &fps[i], &mut **rt, est);
                    *slots[k].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
                }
            });
        }
    });
    slots.into_iter().map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner).expect("every candidate scored")).collect()
}

/// Runs one stage's loop with `dir` as its run directory (checkpoint, evaluations, best).
/// `runtime` + `estimators` and each of `extra` score candidates at once (a generation in
/// batches of that many); records are written, and the optimizer told, in candidate order, so
/// the run does not depend on how many workers it had. A failure to record an evaluation is
/// run-scoped: `cancel` stops the run at once (the runner writes a checkpoint) and the error is
/// returned.
#[allow(clippy::too_many_arguments)]
fn run_stage(
    kind: StageKind<'_>,
    estimators: &mut [TaskEstimator],
    runtime: &mut dyn LanguageModel,
    extra: &mut [Worker],
    dir: &Path,
    runner: &mut Runner,
    cancel: &Arc<AtomicBool>,
    mode: SearchProgress,
    budget: Option<u64>,
) -> Result<Termination> {
    let replay = replayed(dir)?;
    let replayed_count = replay.len();
    let evals_path = dir.join(EVALS);
    let cut = std::fs::read(&evals_path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
    let mut evals = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&evals_path)
        .with_context(|| format!("opening {}", evals_path.display()))?;
    if cut {
        // End the line a crash cut short, so the next record starts on its own line.
        writeln!(evals).with_context(|| format!("appending to {}", evals_path.display()))?;
    }
    let directions: Vec<_> = estimators.iter().map(|e| e.objectives()[0].clone()).collect();
    let n_objectives = estimators.len();
    // The best so far includes earlier sessions (their best file is already on disk).
    let mut best: Option<f64> = replay
        .values()
        .filter_map(|o| match o {
            Outcome::Scored(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        })
        .reduce(f64::min);
    let mut write_err: Option<anyhow::Error> = None;
    let tag = match kind {
        StageKind::Params { .. } => "",
        StageKind::DataFlow { .. } => "dfs:",
    };
    // Genomes scored before (this session or an earlier one): a repeat is recorded with the
    // earlier values and no work, whether or not the earlier one was scored in this process,
    // so that a resumed run writes the same records as an uninterrupted one.
    let mut seen: HashMap<String, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for v in read_evaluations(dir) {
        let (Some(g), Some(o)) = (v["genome"].as_array(), v["objectives"].as_object()) else { continue };
        let genome: Vec<f64> = g.iter().filter_map(|x| x.as_f64()).collect();
        let values: Vec<f64> = directions.iter().filter_map(|d| o.get(&d.name).and_then(|x| x.as_f64())).collect();
        let ses: Vec<f64> = v["std_errors"].as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()).unwrap_or_default();
        seen.entry(fingerprint(tag, &genome)).or_insert((values, ses));
    }
    let n_workers = 1 + extra.len();
    let mut workers: Vec<(&mut dyn LanguageModel, &mut [TaskEstimator])> = vec![(runtime, estimators)];
    for w in extra.iter_mut() {
        let rt: &mut dyn LanguageModel = w.runtime.as_mut();
        workers.push((rt, w.estimators.as_mut_slice()));
    }
    let mut objective = |batch: &[Candidate]| -> Vec<Outcome> {
        // Which candidates need scoring: not replayed from an earlier session, not seen before,
        // not a twin of one scored in this batch (that one is resolved in order below).
        let fps: Vec<String> = batch.iter().map(|c| fingerprint(tag, &c.genome)).collect();
        let mut todo = vec![];
        for (i, c) in batch.iter().enumerate() {
            let twin = todo.iter().any(|&j: &usize| fps[j] == fps[i]);
            if !replay.contains_key(&c.id) && !seen.contains_key(&fps[i]) && !twin {
                todo.push(i);
            }
        }
        let mut scored: Vec<Option<Computed>> = batch.iter().map(|_| None).collect();
        for (k, r) in score_parallel(&kind, batch, &fps, &todo, &mut workers).into_iter().enumerate() {
            scored[todo[k]] = Some(r);
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, c) in batch.iter().enumerate() {
            if let Some(o) = replay.get(&c.id) {
                outcomes.push(o.clone());
                continue;
            }
            let fp = &fps[i];
            let computed = match scored[i].take() {
                Some(x) => x,
                None => match seen.get(fp).cloned() {
                    Some((values, ses)) => repeat(&kind, c, values, ses),
                    // the twin it waited for failed: score this one itself, as a run one
                    // candidate at a time would
                    None => {
                        let (rt, est) = &mut workers[0];
                        score_candidate(&kind, c, fp, &mut **rt, est)
                    }
                },
            };
            let Computed { result, seconds, materialize_s, path_text } = computed;
            let (record, outcome) = match result {
                Ok((values, ses, items, tokens, artifact)) => {
                    seen.entry(fp.clone()).or_insert_with(|| (values.clone(), ses.clone()));
                    let minimized: Vec<f64> = values.iter().zip(&directions).map(|(v, o)| o.direction.to_minimized(*v)).collect();
                    if minimized.len() == 1 && best.is_none_or(|b| minimized[0] < b) {
                        best = Some(minimized[0]);
                        if let Err(e) = write_atomic(&dir.join(kind.best_file()), &artifact) {
                            write_err.get_or_insert(e);
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    let objectives: serde_json::Map<String, serde_json::Value> =
                        directions.iter().zip(&values).map(|(o, v)| (o.name.clone(), json!(v))).collect();
                    (
                        json!({"id": c.id, "generation": c.generation, "genome": c.genome, "objectives": objectives,
                               "std_errors": ses, "minimized": minimized, "items": items, "tokens": tokens,
                               "seconds": seconds, "materialize_seconds": materialize_s,
                               "path": path_text, "failure": null}),
                        Outcome::Scored(minimized),
                    )
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    (
                        json!({"id": c.id, "generation": c.generation, "genome": c.genome, "failure": msg,
                               "seconds": seconds}),
                        Outcome::Failed(msg),
                    )
                }
            };
            if let Err(e) = writeln!(evals, "{record}").and_then(|()| evals.sync_data()) {
                write_err.get_or_insert(anyhow::Error::from(e).context("appending to evaluations.jsonl"));
                cancel.store(true, Ordering::Relaxed);
            }
            outcomes.push(outcome);
        }
        outcomes
    };
    let mut progress = Progress::new(mode, budget, Some(dir));
    progress.event(&json!({"event": "start", "evaluations_done": replayed_count}));
    let end = runner.run_batched(n_workers, &mut objective, &mut progress)?;
    progress.bar.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e);
    }
    if end != Termination::Interrupted {
        let best = runner.optimizer().best().map(|(_, v)| v);
        let evals = runner.optimizer().evaluations();
        progress.event(&json!({"event": "finished", "termination": format!("{end:?}"), "evaluations": evals, "best_minimized": best}));
        if progress.mode != SearchProgress::Jsonl {
            println!("stage finished ({end:?}): {evals} evaluations in {}", dir.display());
            match best {
                Some(v) if n_objectives == 1 => {
                    println!("best (minimized objective): {v:.6}; written to {}", dir.join(kind.best_file()).display())
                }
                _ => {}
            }
        }
    }
    Ok(end)
}

fn interrupted(run_dir: &Path) -> ! {
    eprintln!("interrupted: checkpoint written; continue with `evomerge resume {}`", run_dir.display());
    std::process::exit(i32::from(crate::exit::INTERRUPTED));
}

/// Runs the parameter-space stage, scores the references, then the data-flow stage if the
/// experiment has one (in `RUN_DIR/dataflow/`, its own checkpoint and evaluations).
fn drive(mut s: Setup, run_dir: &Path, mut runner: Runner, cancel: Arc<AtomicBool>, mode: SearchProgress, workers: usize) -> Result<()> {
    let mode = mode.resolved();
    let Setup { exp, layout, estimators, runtime, spare, resident, base, memory, .. } = &mut s;
    let n = worker_count(workers, exp.device, base, *memory, runtime_bytes(base));
    if n > 1 && mode != SearchProgress::Jsonl {
        println!("{n} workers: candidates are scored {n} at a time (--workers to choose)");
    }
    // the calibration's runtimes first (every candidate rewrites the weights it was left with)
    spare.truncate(n.saturating_sub(1));
    let mut extra = (1..n)
        .map(|_| {
            let runtime = match spare.pop() {
                Some(rt) => rt,
                None => model::open(exp.device, &[ModelSpec::from_checkpoint(base)])?,
            };
            Ok(Worker { runtime, estimators: estimators.clone() })
        })
        .collect::<Result<Vec<_>>>()?;
    let kind = StageKind::Params { layout, seed: exp.seed, resident: resident.as_ref() };
    let end = run_stage(kind, estimators, runtime.as_mut(), &mut extra, run_dir, &mut runner, &cancel, mode, exp.budget.max_evaluations)?;
    if end == Termination::Interrupted {
        interrupted(run_dir);
    }
    drop(extra);
    let refs = references(exp, layout, estimators, runtime.as_mut(), resident.as_ref(), run_dir)?;
    // The data-flow stage opens its own runtime: free the resident inputs first (and their
    // device copies).
    *resident = None;
    runtime.release_held();
    if mode == SearchProgress::Jsonl {
        println!("{}", json!({"event": "references", "references": refs}));
    }
    if let Some(df) = exp.dataflow.clone() {
        let dir = run_dir.join(DATAFLOW_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (best_ps, _) = best_params_candidate(run_dir)?;
        let merged = {
            let recipe = layout.decode(&best_ps)?;
            let yaml = serde_norway::to_string(&recipe)?;
            merge_to_memory(&MergePlan::build(&recipe, yaml, None, exp.seed)?)?
        };
        let mut cks = vec![];
        for m in df.models.iter().filter(|m| m.as_str() != BEST) {
            cks.push(Checkpoint::open(&resolve_model(m, None)?, m.clone())?);
        }
        let mut it = cks.iter();
        let specs: Vec<ModelSpec<'_>> = df
            .models
            .iter()
            .map(|m| match m.as_str() {
                BEST => Some(ModelSpec { label: "best parameter-space merge", config: &base.config, arch: base.arch, tensors: &merged }),
                _ => it.next().map(ModelSpec::from_checkpoint),
            })
            .collect::<Option<_>>()
            .context("dataflow models")?;
        let counts: Vec<usize> = specs.iter().map(|m| m.config.num_hidden_layers).collect();
        let mut rt = model::open(exp.device, &specs)?;
        let df_layout = DataFlowLayout::new(&counts, &df.genome)?;
        let (space, x0) = dataflow_space(&df_layout)?;
        let fresh = make_optimizer(&df.optimizer, space, x0, vec![], estimators.len(), exp.seed)?;
        let ckpt = dir.join(CHECKPOINT);
        let mut runner2 = if !ckpt.exists() && !prev_path(&ckpt).exists() {
            Runner::new(fresh, df.budget.clone(), Some(ckpt), cancel.clone())
        } else {
            let mut quiet = Progress::new(SearchProgress::Off, None, Some(&dir));
            Runner::resume(ckpt, fresh.name(), df.budget.clone(), cancel.clone(), &mut quiet)?
        };
        if mode != SearchProgress::Jsonl {
            println!("data-flow stage: {} genes over {} models ({} layers)", df_layout.genes().len(), counts.len(), df_layout.total_layers());
        }
        let kind = StageKind::DataFlow { layout: &df_layout };
        // A data-flow worker holds every stage model: fewer may fit than in the first stage.
        let n = n.min(worker_count(workers, exp.device, base, 0, runtime_bytes(base) * specs.len() as u64));
        let mut extra = (1..n)
            .map(|_| Ok(Worker { runtime: model::open(exp.device, &specs)?, estimators: estimators.clone() }))
            .collect::<Result<Vec<_>>>()?;
        let end = run_stage(kind, estimators, rt.as_mut(), &mut extra, &dir, &mut runner2, &cancel, mode, df.budget.max_evaluations)?;
        if end == Termination::Interrupted {
            interrupted(run_dir);
        }
    }
    if mode != SearchProgress::Jsonl {
        print_standing(&refs, run_dir);
    }
    Ok(())
}

/// The data-flow stage's models entry naming the best parameter-space merge.
pub const BEST: &str = "best";
/// The data-flow stage's folder in a run directory.
pub const DATAFLOW_DIR: &str = "dataflow";

/// Genome of the parameter-space candidate the data-flow stage starts from: the best (one
/// objective) or the front member with the best mean minimized objective.
pub fn best_params_candidate(run_dir: &Path) -> Result<(Vec<f64>, serde_json::Value)> {
    let recs = read_evaluations(run_dir);
    let best = best_by_mean(&recs).context("the parameter-space stage has no scored candidate")?;
    let genome = best["genome"].as_array().context("record without genome")?.iter().filter_map(|x| x.as_f64()).collect();
    Ok((genome, best.clone()))
}

/// Mean of a record's minimized objectives (`None` for failures).
pub fn mean_minimized(v: &serde_json::Value) -> Option<f64> {
    let m: Vec<f64> = v["minimized"].as_array()?.iter().filter_map(|x| x.as_f64()).collect();
    (!m.is_empty() && v["failure"].is_null()).then(|| m.iter().sum::<f64>() / m.len() as f64)
}

/// The record with the lowest mean minimized objective (ties: the earliest).
pub fn best_by_mean(recs: &[serde_json::Value]) -> Option<&serde_json::Value> {
    recs.iter()
        .filter_map(|r| mean_minimized(r).map(|m| (r, m)))
        .fold(None, |acc: Option<(&serde_json::Value, f64)>, (r, m)| match acc {
            Some((_, b)) if b <= m => acc,
            _ => Some((r, m)),
        })
        .map(|x| x.0)
}

/// Search space of a data-flow layout (indicators are binary genes) and its start point.
fn dataflow_space(l: &DataFlowLayout) -> Result<(SearchSpace, Vec<f64>)> {
    let genes = l.genes();
    let space = SearchSpace::new(
        genes.iter().map(|g| g.name.clone()).collect(),
        genes.iter().map(|g| g.lower).collect(),
        genes.iter().map(|g| g.upper).collect(),
        genes.iter().map(|g| if g.binary { GeneKind::Binary } else { GeneKind::Real }).collect(),
    )?;
    let x0 = genes.iter().map(|g| (g.init - g.lower) / (g.upper - g.lower)).collect();
    Ok((space, x0))
}

/// Objective values of the reference points a searched merge must beat: every source model, and
/// the merge method at its default parameters (the genome's initial point, the "hand-set"
/// baseline), scored by the same estimators on the same items as the candidates. Written to
/// `references.json`; a finished run that is resumed reads them back.
fn references(
    exp: &Experiment,
    layout: &GenomeLayout,
    estimators: &mut [TaskEstimator],
    runtime: &mut dyn LanguageModel,
    resident: Option<&ResidentMerge>,
    run_dir: &Path,
) -> Result<Vec<serde_json::Value>> {
    let path = run_dir.join(REFERENCES);
    if let Some(v) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Vec<serde_json::Value>>(&t).ok()) {
        return Ok(v);
    }
    // `source`: weights to load first (None: the runtime holds them already)
    let score = |estimators: &mut [TaskEstimator], runtime: &mut dyn LanguageModel, source: Option<&dyn TensorSource>, key: &str| {
        if let Some(source) = source {
            runtime.load_weights(0, source)?;
        }
        let mut out = serde_json::Map::new();
        let mut minimized = vec![];
        for e in estimators.iter_mut() {
            let f = e.evaluate(runtime, key)?;
            for (o, v) in e.objectives().iter().zip(&f.values) {
                out.insert(o.name.clone(), json!(v));
                minimized.push(o.direction.to_minimized(*v));
            }
        }
        anyhow::Ok((out, minimized))
    };
    let mut refs = vec![];
    for m in exp.merge.models.iter().chain(exp.merge.base_model.as_ref()) {
        let ck = Checkpoint::open(&resolve_model(m, None)?, m.clone())?;
        let (objectives, minimized) = score(estimators, runtime, Some(&ck), &format!("source:{m}"))?;
        let name = Path::new(m).file_name().map_or(m.clone(), |n| n.to_string_lossy().to_string());
        refs.push(json!({"name": name, "kind": "source", "model": m, "objectives": objectives, "minimized": minimized}));
    }
    let recipe = layout.decode(&layout.initial())?;
    let yaml = serde_norway::to_string(&recipe)?;
    let plan = MergePlan::build(&recipe, yaml, None, exp.seed)?;
    materialize(&plan, resident, runtime)?;
    let (objectives, minimized) = score(estimators, runtime, None, "baseline:initial")?;
    refs.push(json!({"name": format!("{} at the start point", exp.merge.method), "kind": "baseline", "objectives": objectives, "minimized": minimized}));
    write_atomic(&path, &serde_json::to_string_pretty(&refs)?)?;
    Ok(refs)
}

/// The run's reference points, if written (`evomerge status`, `report`).
pub fn read_references(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join(REFERENCES)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

/// The table a finished run ends with: its best candidate (one objective) or the candidate
/// with the best mean objective (several), per stage, against every reference.
fn print_standing(refs: &[serde_json::Value], run_dir: &Path) {
    let ps = read_evaluations(run_dir);
    let dfs = read_evaluations(&run_dir.join(DATAFLOW_DIR));
    let mut rows: Vec<(String, &serde_json::Value)> = vec![];
    if let Some(b) = best_by_mean(&ps) {
        rows.push((format!("searched: candidate {}", b["id"]), b));
    }
    if let Some(b) = best_by_mean(&dfs) {
        rows.push((format!("searched + data flow: {}", b["id"]), b));
    }
    let Some(first) = rows.first().map(|r| r.1) else { return };
    let names: Vec<String> = first["objectives"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    let multi = names.len() > 1;
    print!("\n{:<32}", "");
    for n in &names {
        print!(" {n:>14}");
    }
    println!("{}", if multi { format!(" {:>14}", "mean") } else { String::new() });
    let row = |label: &str, v: &serde_json::Value| {
        print!("{label:<32}");
        let vals: Vec<f64> = names.iter().map(|n| v["objectives"][n].as_f64().unwrap_or(f64::NAN)).collect();
        for x in &vals {
            print!(" {x:>14.4}");
        }
        if multi {
            print!(" {:>14.4}", vals.iter().sum::<f64>() / vals.len() as f64);
        }
        println!();
    };
    for (label, r) in &rows {
        row(label, r);
    }
    for r in refs {
        row(&format!("{}: {}", r["kind"].as_str().unwrap_or(""), r["name"].as_str().unwrap_or("")), r);
    }
    let best = rows.iter().filter_map(|r| mean_minimized(r.1)).fold(f64::INFINITY, f64::min);
    let beaten = refs.iter().filter(|r| mean_minimized(r).is_some_and(|m| best < m)).count();
    println!(
        "the best searched candidate beats {beaten} of {} references{}",
        refs.len(),
        if multi { " on the mean of the objectives" } else { "" }
    );
}

fn cancel_flag() -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

pub fn search(args: SearchArgs) -> Result<()> {
    let mut exp = Experiment::load(&args.experiment)?;
    if let Some(s) = args.seed {
        exp.seed = s;
    }
    if let Some(d) = args.device {
        exp.device = d;
    }
    let mut s = setup(exp, args.dry_run)?;
    if args.dry_run {
        calibrate(&mut s, true, None, 1)?;
        println!(
            "{}: {} genes, {} objective(s), model {} ({} layers), about {:.2} GiB of memory, candidates merged {}; nothing run",
            s.exp.name,
            s.space.dim(),
            s.estimators.len(),
            s.base.dir().display(),
            s.layout.groups().last().map_or(0, |g| g.1),
            gib(s.memory),
            if s.in_place { "in place (inputs held in the model's layout)" } else { "from the memory-mapped checkpoints" }
        );
        if s.exp.objectives.iter().any(|o| o.estimator.needs_calibration()) {
            println!(
                "anchor / IRT estimators: fitted on the source models and {} random merges, scored on every item before the first generation",
                s.exp.calibration.candidates
            );
        }
        let n = worker_count(args.workers, s.exp.device, &s.base, s.memory, runtime_bytes(&s.base));
        println!("candidates scored {n} at a time (--workers)");
        return Ok(());
    }
    let run_dir = match args.run_dir {
        Some(d) => d,
        None => {
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            s.exp.run_root.join(format!("{stamp}-{}", s.exp.name))
        }
    };
    if run_dir.join(CONFIG).exists() {
        bail!("{} already holds a run; continue it with `evomerge resume {}`", run_dir.display(), run_dir.display());
    }
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let resolved = s.exp.to_toml()?;
    write_atomic(&run_dir.join(CONFIG), &resolved)?;
    write_atomic(&run_dir.join(CONFIG_HASH), &config_hash(&resolved))?;
    eprintln!("run directory: {}", run_dir.display());
    calibrate(&mut s, false, Some(&run_dir), args.workers)?;
    let cancel = cancel_flag()?;
    let runner = Runner::new(optimizer(&s)?, s.exp.budget.clone(), Some(run_dir.join(CHECKPOINT)), cancel.clone());
    drive(s, &run_dir, runner, cancel, args.progress, args.workers)
}

pub fn resume(args: ResumeArgs) -> Result<()> {
    let cfg = args.run_dir.join(CONFIG);
    let exp = Experiment::from_run_dir(&args.run_dir)?;
    // The run's configuration must be the one it started with: a changed budget is fine to
    // continue with --force, anything else changes the trajectory.
    let recorded = std::fs::read_to_string(args.run_dir.join(CONFIG_HASH)).unwrap_or_default();
    if recorded.trim() != config_hash(&exp.to_toml()?) && !args.force {
        bail!(
            "{} changed since the run started; resuming would not continue the same search (use --force to accept)",
            cfg.display()
        );
    }
    let mut s = setup(exp, false)?;
    calibrate(&mut s, false, Some(&args.run_dir), args.workers)?;
    let cancel = cancel_flag()?;
    let fresh = optimizer(&s)?;
    let ckpt = args.run_dir.join(CHECKPOINT);
    let runner = if !ckpt.exists() && !prev_path(&ckpt).exists() {
        // Stopped during the first generation: the optimizer's start state follows from the
        // config and seed, and the candidates already scored are replayed.
        Runner::new(fresh, s.exp.budget.clone(), Some(ckpt), cancel.clone())
    } else {
        Runner::resume(ckpt, fresh.name(), s.exp.budget.clone(), cancel.clone(), &mut Progress::new(SearchProgress::Off, None, Some(&args.run_dir)))?
    };
    drive(s, &args.run_dir, runner, cancel, args.progress, args.workers)
}
