//! A whole run: setup, calibration, the parameter-space stage, the references, the data-flow
//! stage. [`start`] creates a run directory, [`resume`] continues one, [`dry_run`] checks an
//! experiment and runs nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use evomerge_engine::Checkpoint;
use evomerge_engine::dataflow::DataFlowLayout;
use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{self, DeviceSpec, ModelSpec, RuntimeKind};
use evomerge_search::runner::prev_path;
use evomerge_search::{CmaEs, CmaEsConfig, GeneKind, Nsga2, Nsga2Config, Optimizer, RandomSearch, Runner, SearchSpace, Termination};

use crate::broker::coordinator::coordinator_name;
use crate::broker::{BrokerPool, BrokerUrl, RunInfo, reclaim_after_ms, sources_hash};
use crate::calibration::calibrate;
use crate::error::{Result, RunError};
use crate::evaluate::{StageKind, Worker, objectives};
use crate::experiment::{Experiment, FirstPopulation, Mode, OptimizerKind, OptimizerSpec};
use crate::observer::{Notice, Quiet, RunObserver};
use crate::pool::{LocalPool, WorkerRef};
use crate::records::Reference;
use crate::references::references;
use crate::resources::{runtime_bytes, worker_count};
use crate::run_dir::{BEST, CALIBRATION, CHECKPOINT, CONFIG, CONFIG_HASH, RunDir, config_hash};
use crate::setup::Setup;
use crate::stage::{EventLog, run_stage, run_stage_async};
use crate::summary::{RunSummary, SUMMARY, summarize};

/// How a run is carried out (nothing here changes its results).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Candidates (and calibration merges) scored at once; 0 = auto
    /// ([`crate::resources::worker_count`]).
    pub workers: usize,
    /// Set (by Ctrl-C, say) to stop at the next batch with a checkpoint written.
    pub cancel: Arc<AtomicBool>,
    /// Run even though a source model holds NaN or infinite values ([`Setup::check_finite`]).
    pub allow_nonfinite: bool,
    /// Coordinate through this broker: candidates of the parameter-space stage go to workers
    /// anywhere (`evomerge worker`), and this process's own `workers` take part.
    pub broker: Option<BrokerUrl>,
    /// With a broker: score nothing here (`--workers 0`); calibration and the references
    /// still run here.
    pub coordinator_only: bool,
    /// One worker per device (`--devices cuda:0,cuda:1`; repeating `cpu` gives CPU workers);
    /// empty: `workers` copies of the run's device. The parameter-space stage's workers.
    pub devices: Vec<DeviceSpec>,
    /// Run the forward pass on this runtime instead of the experiment's (`--runtime`); a new
    /// run records it in its resolved config, a resumed one only uses it.
    pub runtime: Option<RuntimeKind>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Every stage ran to its end; the references it was compared with and what it found
    /// (also written to `summary.json`).
    Finished { references: Vec<Reference>, summary: Box<RunSummary> },
    /// Cancelled: a checkpoint was written; `resume` continues.
    Interrupted,
}

/// What `search --dry-run` found.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRun {
    pub name: String,
    pub genes: usize,
    pub objectives: usize,
    pub model: PathBuf,
    pub layers: usize,
    /// Estimated peak host memory (bytes).
    pub memory: u64,
    pub in_place: bool,
    /// Random merges the anchor / IRT estimators will be calibrated on (`None`: no such estimator).
    pub calibration_merges: Option<usize>,
    pub workers: usize,
    /// The parameter-space optimizer (resolved: `auto` made concrete) and its evaluation budget.
    pub optimizer: String,
    pub budget: Option<u64>,
    /// The data-flow stage, when the experiment has one.
    pub dataflow: Option<DryRunDataFlow>,
}

/// What `search --dry-run` found of the data-flow stage.
#[derive(Debug, Clone, PartialEq)]
pub struct DryRunDataFlow {
    pub genes: usize,
    pub models: usize,
    pub layers: usize,
    pub optimizer: String,
    pub budget: Option<u64>,
}

/// An optimizer kind's name as experiments spell it.
fn kind_name(o: &OptimizerSpec, n_obj: usize) -> String {
    serde_json::to_value(o.kind_for(n_obj)).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_else(|| "?".into())
}

/// Checks `exp` as far as running it would (models, genome, tasks, memory, estimators fitted
/// on the sources); runs nothing and writes nothing.
pub fn dry_run(exp: Experiment, opts: &RunOptions) -> Result<DryRun> {
    let workers = opts.workers;
    let mut s = setup(exp, true, opts)?;
    calibrate(&mut s, true, None, 1, &mut Quiet)?;
    let needs_cal = s.exp.objectives.iter().any(|o| o.estimator.needs_calibration());
    let n_obj = s.estimators.len();
    let dataflow = match &s.exp.dataflow {
        Some(df) => {
            let counts = s.exp.dataflow_layer_counts()?;
            let l = DataFlowLayout::new(&counts, &df.genome)?;
            Some(DryRunDataFlow {
                genes: l.genes().len(),
                models: counts.len(),
                layers: l.total_layers(),
                optimizer: kind_name(&df.optimizer, n_obj),
                budget: df.budget.max_evaluations,
            })
        }
        None => None,
    };
    Ok(DryRun {
        optimizer: kind_name(&s.exp.optimizer, n_obj),
        budget: s.exp.budget.max_evaluations,
        dataflow,
        name: s.exp.name.clone(),
        genes: s.space.dim(),
        objectives: s.estimators.len(),
        model: s.base.dir().to_path_buf(),
        layers: s.layout.groups().last().map_or(0, |g| g.1),
        memory: s.memory,
        in_place: s.in_place,
        calibration_merges: needs_cal.then_some(s.exp.calibration.candidates),
        workers: worker_count(workers, s.exp.device, &s.base, s.memory, runtime_bytes(&s.base)),
    })
}

/// [`Setup::new`], then the sources' weights checked for NaN / inf unless the options allow them.
fn setup(mut exp: Experiment, dry_run: bool, opts: &RunOptions) -> Result<Setup> {
    if let Some(r) = opts.runtime {
        exp.runtime = r;
    }
    for &d in opts.devices.iter().chain(&exp.devices).chain(std::iter::once(&exp.device)) {
        model::check_device(exp.runtime, d)?;
    }
    let s = Setup::new(exp, dry_run)?;
    if !opts.allow_nonfinite {
        s.check_finite()?;
    }
    Ok(s)
}

fn holds_a_run(dir: &Path) -> RunError {
    RunError::RunDir(format!("{} already holds a run; continue it with `evomerge resume {}`", dir.display(), dir.display()))
}

/// Starts a run of `exp` in `run_dir` (default `<run_root>/<UTC start minute>-<name>`, e.g.
/// `runs/2026-12-06T18-13-demo`, with `-2`, `-3`, … when that minute's name is taken): checks
/// it, writes the resolved configuration, calibrates, runs every stage.
pub fn start(exp: Experiment, run_dir: Option<PathBuf>, opts: &RunOptions, observer: &mut dyn RunObserver) -> Result<(RunDir, RunEnd)> {
    let mut s = setup(exp, false, opts)?;
    let run_dir = RunDir::new(match run_dir {
        Some(d) => d,
        None => {
            let stamp = chrono::Utc::now().format("%Y-%m-%dT%H-%M");
            let name = |k: usize| s.exp.run_root.join(if k < 2 { format!("{stamp}-{}", s.exp.name) } else { format!("{stamp}-{}-{k}", s.exp.name) });
            (1..).map(name).find(|d| !d.exists()).unwrap_or_else(|| name(1))
        }
    });
    let dir = run_dir.path();
    if run_dir.file(CONFIG).exists() {
        return Err(holds_a_run(dir));
    }
    std::fs::create_dir_all(dir).map_err(RunError::io(dir))?;
    let _lock = run_dir.lock()?;
    if run_dir.file(CONFIG).exists() {
        // another process created it since the check above
        return Err(holds_a_run(dir));
    }
    let resolved = s.exp.to_toml()?;
    run_dir.write(CONFIG, &resolved)?;
    run_dir.write(CONFIG_HASH, &config_hash(&resolved))?;
    observer.notice(&Notice::RunDirectory(dir.to_path_buf()));
    calibrate(&mut s, false, Some(dir), opts.workers, observer)?;
    let runner = Runner::new(optimizer(&s)?, s.exp.budget.clone(), Some(run_dir.file(CHECKPOINT)), opts.cancel.clone());
    let end = drive(s, &run_dir, runner, opts, observer)?;
    Ok((run_dir, end))
}

/// Continues the run in `run_dir` from its checkpoint; already-scored candidates are replayed
/// from its records. The configuration must be the one it started with unless `force` (a
/// changed budget is fine to continue; anything else changes the trajectory).
pub fn resume(run_dir: &Path, force: bool, opts: &RunOptions, observer: &mut dyn RunObserver) -> Result<RunEnd> {
    let run_dir = RunDir::new(run_dir);
    let exp = run_dir.experiment()?;
    let _lock = run_dir.lock()?;
    let recorded = std::fs::read_to_string(run_dir.file(CONFIG_HASH)).unwrap_or_default();
    if recorded.trim() != config_hash(&exp.to_toml()?) && !force {
        return Err(RunError::RunDir(format!(
            "{} changed since the run started; resuming would not continue the same search (use --force to accept)",
            run_dir.file(CONFIG).display()
        )));
    }
    let mut s = setup(exp, false, opts)?;
    calibrate(&mut s, false, Some(run_dir.path()), opts.workers, observer)?;
    let fresh = optimizer(&s)?;
    let runner = open_runner(fresh, &run_dir.file(CHECKPOINT), s.exp.budget.clone(), &opts.cancel, run_dir.path(), observer)?;
    drive(s, &run_dir, runner, opts, observer)
}

/// A runner for `checkpoint`: fresh when none was written (stopped during the first
/// generation: the start state follows from the config and seed), else restored from it.
fn open_runner(
    fresh: Box<dyn Optimizer>,
    checkpoint: &Path,
    budget: evomerge_search::Budget,
    cancel: &Arc<AtomicBool>,
    dir: &Path,
    observer: &mut dyn RunObserver,
) -> Result<Runner> {
    if !checkpoint.exists() && !prev_path(checkpoint).exists() {
        return Ok(Runner::new(fresh, budget, Some(checkpoint.to_path_buf()), cancel.clone()));
    }
    let mut log = EventLog::new(dir, None, &[], observer);
    Ok(Runner::resume(checkpoint.to_path_buf(), fresh.name(), budget, cancel.clone(), &mut log)?)
}

/// The parameter-space optimizer of a setup.
fn optimizer(s: &Setup) -> Result<Box<dyn Optimizer>> {
    let x0: Vec<f64> = s.layout.genes().iter().map(|g| (g.init - g.lower) / (g.upper - g.lower)).collect();
    let sources = if s.exp.optimizer.seed_sources { s.layout.source_genomes() } else { vec![] };
    make_optimizer(&s.exp.optimizer, s.space.clone(), x0, sources, s.exp.objectives.len(), s.exp.seed)
}

/// An optimizer over `space` starting at `x0` (unit coordinates; CMA-ES's mean). NSGA-II's
/// first population also holds `seeds` (genomes in the genes' units).
pub fn make_optimizer(
    o: &OptimizerSpec,
    space: SearchSpace,
    x0: Vec<f64>,
    seeds: Vec<Vec<f64>>,
    n_obj: usize,
    seed: u64,
) -> Result<Box<dyn Optimizer>> {
    let kind = o.kind_for(n_obj);
    if n_obj > 1 && kind == OptimizerKind::Cmaes {
        return Err(RunError::Experiment(format!(
            "CMA-ES optimizes one objective; use optimizer.kind = \"nsga2\" (two objectives), \"nsga3\" (three or more) or \"random\" for {n_obj}"
        )));
    }
    // The start point (default parameters; model A itself for a data-flow stage) in the genes'
    // own units, as both optimizers take it.
    let start: Vec<f64> = x0.iter().enumerate().map(|(i, u)| space.lower[i] + u * (space.upper[i] - space.lower[i])).collect();
    // NSGA-II / NSGA-III: it is one member of the first population, with the seeds.
    let initial = || -> Vec<Vec<f64>> { std::iter::once(start.clone()).chain(seeds.clone()).collect() };
    Ok(match kind {
        // CMA-ES's mean starts there, and its first candidate is that point.
        OptimizerKind::Cmaes | OptimizerKind::Auto => Box::new(CmaEs::new(
            space,
            &CmaEsConfig {
                population: o.population,
                sigma0: o.sigma0,
                x0: Some(start.clone()),
                margin: o.margin,
                score_x0: true,
                seed,
                ..Default::default()
            },
        )?),
        OptimizerKind::Nsga2 => Box::new(Nsga2::new(
            space,
            &Nsga2Config { population: o.population.unwrap_or(40), objectives: n_obj, seed, initial: initial(), ..Default::default() },
        )?),
        OptimizerKind::Nsga3 => Box::new(Nsga2::new(
            space,
            &Nsga2Config { initial: initial(), ..Nsga2Config::nsga3(o.population.unwrap_or(40), n_obj, o.partitions, seed) },
        )?),
        // random search: the start point is candidate 0, then uniform draws
        OptimizerKind::Random => Box::new(RandomSearch::new(space, o.population.unwrap_or(8), n_obj, seed)?.with_start(start)?),
    })
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

/// `k − 1` genomes near a data-flow layout's start path (gene units): each switches one layer
/// on or off (its indicator's sign flipped) and jitters every hop scale by a normal draw of a
/// tenth of its range. A uniform genome is mostly a broken path (the demo: 9 of 64 candidates
/// at 0 % on both skills); these stay one layer away from a working one. Deterministic in `seed`.
fn local_starts(l: &DataFlowLayout, k: usize, seed: u64) -> Vec<Vec<f64>> {
    let genes = l.genes();
    let start: Vec<f64> = genes.iter().map(|g| g.init).collect();
    let indicators: Vec<usize> = (0..genes.len()).filter(|&i| genes[i].binary).collect();
    let mut rng = evomerge_search::rng::Rng::seeded(seed ^ 0x05ee_ddf5);
    (1..k)
        .map(|_| {
            let mut x = start.clone();
            for (i, g) in genes.iter().enumerate().filter(|(_, g)| !g.binary) {
                x[i] = (x[i] + 0.1 * (g.upper - g.lower) * rng.normal()).clamp(g.lower, g.upper);
            }
            if !indicators.is_empty() {
                let i = indicators[rng.below(indicators.len())];
                x[i] = -x[i];
            }
            x
        })
        .collect()
}

/// A run's id on a broker: its directory's name.
pub fn run_id(run_dir: &RunDir) -> String {
    run_dir.path().file_name().map_or_else(|| "run".to_string(), |n| n.to_string_lossy().into_owned())
}

/// What workers need to join the run (published on the broker).
fn run_info(exp: &Experiment, run_dir: &RunDir) -> Result<RunInfo> {
    let mut dirs = vec![];
    for m in exp.sources() {
        dirs.push(resolve_model(m, None)?);
    }
    Ok(RunInfo {
        run: run_id(run_dir),
        coordinator: coordinator_name(run_dir.path()),
        experiment: exp.to_toml()?,
        sources: sources_hash(&dirs)?,
        calibration: std::fs::read_to_string(run_dir.file(CALIBRATION)).unwrap_or_default(),
        reclaim_after_ms: reclaim_after_ms(),
        finished: false,
    })
}

/// Runs the parameter-space stage, scores the references, then the data-flow stage if the
/// experiment has one (in `RUN_DIR/dataflow/`, its own checkpoint and evaluations).
fn drive(mut s: Setup, run_dir: &RunDir, mut runner: Runner, opts: &RunOptions, observer: &mut dyn RunObserver) -> Result<RunEnd> {
    let n = worker_count(opts.workers, s.exp.device, &s.base, s.memory, runtime_bytes(&s.base));
    // One worker per device: `--devices` (or the experiment's `devices`), else `--workers`
    // copies of the run's device.
    let devices: Vec<DeviceSpec> = match (&opts.devices, &s.exp.devices) {
        (d, _) if !d.is_empty() => d.clone(),
        (_, d) if !d.is_empty() => d.clone(),
        _ => vec![s.exp.device; n],
    };
    let devices = if opts.coordinator_only { vec![] } else { devices };
    if devices.len() > 1 {
        observer.notice(&Notice::Workers(devices.len()));
    }
    // The run's own runtime is the first worker when it is on the first device; the
    // calibration's runtimes next (every candidate rewrites the weights it was left with).
    let own = devices.first() == Some(&s.exp.device);
    let mut extra = Vec::with_capacity(devices.len());
    for (i, &d) in devices.iter().enumerate().skip(usize::from(own)) {
        let spare = if d == s.exp.device { s.spare.pop() } else { None };
        let runtime = match spare {
            Some(rt) => rt,
            None => s.open_runtime_on(d)?,
        };
        tracing::info!("worker {i} on {d}");
        extra.push(Worker { runtime, estimators: s.estimators.clone() });
    }
    s.spare.clear();
    {
        let kind = StageKind::Params { layout: &s.layout, opened: &s.opened, materializer: &s.materializer, seed: s.exp.seed };
        let objectives = objectives(&s.estimators);
        let mut workers: Vec<WorkerRef<'_>> = vec![];
        if own {
            workers.push((s.runtime.as_mut(), s.estimators.as_mut_slice()));
        }
        workers.extend(extra.iter_mut().map(|w| (w.runtime.as_mut() as _, w.estimators.as_mut_slice())));
        let budget = s.exp.budget.max_evaluations;
        let asynchronous = s.exp.optimizer.mode == Mode::Async;
        let end = match &opts.broker {
            None => {
                let mut pool = LocalPool::new(&mut workers);
                if asynchronous {
                    run_stage_async(kind, &mut pool, run_dir.path(), &mut runner, &opts.cancel, budget, observer)?
                } else {
                    run_stage(kind, &mut pool, run_dir.path(), &mut runner, &opts.cancel, budget, observer)?
                }
            }
            Some(url) => {
                let info = run_info(&s.exp, run_dir)?;
                let local: &mut [WorkerRef<'_>] = &mut workers;
                let n_local = local.len();
                let mut pool = BrokerPool::attach(url, info, objectives, run_dir.path(), local, opts.cancel.clone())?;
                observer.notice(&Notice::Broker(format!(
                    "coordinating run '{}' on {} ({n_local} local worker{}); join with: evomerge worker --broker URL --run {}",
                    run_id(run_dir),
                    url.shown(),
                    if n_local == 1 { "" } else { "s" },
                    run_id(run_dir)
                )));
                let end = if asynchronous {
                    run_stage_async(kind, &mut pool, run_dir.path(), &mut runner, &opts.cancel, budget, observer)?
                } else {
                    run_stage(kind, &mut pool, run_dir.path(), &mut runner, &opts.cancel, budget, observer)?
                };
                if end != Termination::Interrupted {
                    pool.finish()?;
                }
                end
            }
        };
        if end == Termination::Interrupted {
            return Ok(RunEnd::Interrupted);
        }
    }
    drop(extra);
    let refs = references(&mut s, run_dir)?;
    // The data-flow stage opens its own runtime: free the resident inputs first (and their
    // device copies).
    s.materializer = evomerge_engine::Materializer::Streamed;
    s.runtime.release_held();
    observer.event(&crate::records::LogEvent::References { references: refs.clone() });
    if let Some(df) = s.exp.dataflow.clone() {
        let dir = run_dir.dataflow_dir();
        std::fs::create_dir_all(&dir).map_err(RunError::io(&dir))?;
        let best_ps = run_dir.best_params_candidate()?;
        let merged = merge_to_memory(&s.layout.plan(&best_ps.genome, &s.opened, s.exp.seed)?)?;
        let mut cks = vec![];
        for m in df.models.iter().filter(|m| m.as_str() != BEST) {
            cks.push(Checkpoint::open(&resolve_model(m, None)?, m.clone())?);
        }
        let mut it = cks.iter();
        let base = &s.base;
        let specs: Vec<ModelSpec<'_>> = df
            .models
            .iter()
            .map(|m| match m.as_str() {
                BEST => Some(ModelSpec { label: "best parameter-space merge", config: &base.config, arch: base.arch, tensors: &merged }),
                _ => it.next().map(ModelSpec::from_checkpoint),
            })
            .collect::<Option<_>>()
            .ok_or_else(|| RunError::Experiment("dataflow models".into()))?;
        let counts: Vec<usize> = specs.iter().map(|m| m.config.num_hidden_layers).collect();
        let mut rt = model::open(s.exp.runtime, s.exp.device, &specs)?;
        let df_layout = DataFlowLayout::new(&counts, &df.genome)?;
        let (space, x0) = dataflow_space(&df_layout)?;
        let seeds = match df.first_population {
            Some(FirstPopulation::Local) => local_starts(&df_layout, df.optimizer.population.unwrap_or(40) / 2, s.exp.seed),
            _ => vec![],
        };
        let fresh = make_optimizer(&df.optimizer, space, x0, seeds, s.estimators.len(), s.exp.seed)?;
        let mut runner2 = open_runner(fresh, &dir.join(CHECKPOINT), df.budget.clone(), &opts.cancel, &dir, observer)?;
        observer.notice(&Notice::DataFlowStage { genes: df_layout.genes().len(), models: counts.len(), layers: df_layout.total_layers() });
        let kind = StageKind::DataFlow { layout: &df_layout };
        // A data-flow worker holds every stage model: fewer may fit than in the first stage.
        let n = n.min(worker_count(opts.workers, s.exp.device, base, 0, runtime_bytes(base) * specs.len() as u64));
        let mut extra = (1..n)
            .map(|_| Ok(Worker { runtime: model::open(s.exp.runtime, s.exp.device, &specs)?, estimators: s.estimators.clone() }))
            .collect::<Result<Vec<_>>>()?;
        let mut workers: Vec<WorkerRef<'_>> = vec![(rt.as_mut(), s.estimators.as_mut_slice())];
        workers.extend(extra.iter_mut().map(|w| (w.runtime.as_mut() as _, w.estimators.as_mut_slice())));
        let mut pool = LocalPool::new(&mut workers);
        let (cancel, budget) = (&opts.cancel, df.budget.max_evaluations);
        let end = if df.optimizer.mode == Mode::Async {
            run_stage_async(kind, &mut pool, &dir, &mut runner2, cancel, budget, observer)?
        } else {
            run_stage(kind, &mut pool, &dir, &mut runner2, cancel, budget, observer)?
        };
        if end == Termination::Interrupted {
            return Ok(RunEnd::Interrupted);
        }
    }
    let summary = summarize(run_dir, &refs);
    let text = serde_json::to_string_pretty(&summary).map_err(|e| RunError::bad_file(run_dir.file(SUMMARY), e))?;
    run_dir.write(SUMMARY, &text)?;
    Ok(RunEnd::Finished { references: refs, summary: Box::new(summary) })
}

#[cfg(test)]
mod tests {
    use evomerge_engine::dataflow::{DataFlowConfig, ScaleMode};

    use super::*;

    #[test]
    fn local_starts_switch_one_layer_and_jitter_the_scales_within_bounds() {
        let cfg = DataFlowConfig { model_a: 0, repeats: 1, scales: ScaleMode::Target, ..Default::default() };
        let l = DataFlowLayout::new(&[4, 4, 4], &cfg).expect("layout");
        let genes = l.genes();
        let starts = local_starts(&l, 8, 3);
        assert_eq!(starts.len(), 7);
        assert_eq!(starts, local_starts(&l, 8, 3), "deterministic in the seed");
        for x in &starts {
            let flipped = genes.iter().zip(x).filter(|(g, v)| g.binary && (**v > 0.0) != (g.init > 0.0)).count();
            assert_eq!(flipped, 1, "one layer switched");
            assert!(genes.iter().zip(x).all(|(g, v)| (g.lower..=g.upper).contains(v)));
            assert!(genes.iter().zip(x).any(|(g, v)| !g.binary && *v != g.init), "scales jittered");
        }
    }
}
