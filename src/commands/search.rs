//! `evomerge search EXPERIMENT.toml` and `evomerge resume RUN_DIR`: arguments and what the
//! user sees. The run itself is `evomerge_run` (setup, calibration, stages, run directory).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use evomerge_engine::model::{DeviceSpec, RuntimeKind};
use evomerge_run::broker::BrokerUrl;
use evomerge_run::records::LogEvent;
use evomerge_run::resources::gib;
use evomerge_run::{Experiment, Notice, RunDir, RunEnd, RunObserver, RunOptions, RunSummary, Stage};
use evomerge_search::{Candidate, Outcome};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  evomerge search experiments/demo.toml\n  evomerge search experiments/search-tiny.toml --run-dir runs/try1 --workers 1\n  \
evomerge search experiments/demo.toml --run-dir runs/big --broker redis://head:6379 --workers 0   (then: evomerge worker --broker redis://head:6379)\n\n\
The experiment file format is documented in experiments/README.md. Ctrl-C writes a checkpoint;\n\
`evomerge resume RUN_DIR` continues the run."
)]
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
    #[command(flatten)]
    pub scoring: Scoring,
    /// Search even though a source model holds NaN or infinite values (refused by default:
    /// every candidate that uses such a tensor fails).
    #[arg(long)]
    pub allow_nonfinite: bool,
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
    #[command(flatten)]
    pub scoring: Scoring,
    /// Continue even though a source model holds NaN or infinite values.
    #[arg(long)]
    pub allow_nonfinite: bool,
}

/// A byte count for people: GiB from 1 GiB up, else MiB.
fn bytes(b: u64) -> String {
    if b >= 1 << 30 { format!("{:.2} GiB", gib(b)) } else { format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)) }
}

/// Where a run's candidates are scored (`search` and `resume`).
#[derive(Debug, Args)]
pub struct Scoring {
    /// Candidates (and calibration merges) scored at once, each on its own copy of the model
    /// (default or 0: one per core for models up to 32 M parameters on the CPU, where one core
    /// runs a forward pass as fast as all of them, memory permitting; else 1). With --broker,
    /// 0 means this process scores no candidate itself. Results do not depend on it.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// One worker per device, e.g. cuda:0,cuda:1,cuda:2 (each GPU holds its own model and merge
    /// inputs); repeating cpu gives CPU workers (cpu,cpu is --workers 2). Default: the
    /// experiment's `devices`, else --workers.
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with = "workers")]
    pub devices: Vec<DeviceSpec>,
    /// Coordinate a scale-out run through a Redis (or Valkey) broker:
    /// redis://[user:pass@]host:port[/db], rediss:// for TLS. Workers join with
    /// `evomerge worker --broker URL`; see README "Scale out".
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// Runtime of the forward pass: burn (default) or libtorch (PyTorch's kernels; a build
    /// with `--features libtorch`). Overrides the experiment's `runtime`.
    #[arg(long)]
    pub runtime: Option<RuntimeKind>,
}

impl Scoring {
    /// The run options; `--workers 0` with a broker: score nothing here.
    fn options(self, allow_nonfinite: bool) -> Result<RunOptions> {
        let broker = self.broker.as_deref().map(BrokerUrl::parse).transpose()?;
        let coordinator_only = broker.is_some() && self.workers == Some(0);
        let workers = self.workers.unwrap_or(0);
        Ok(RunOptions { workers, cancel: cancel_flag()?, allow_nonfinite, broker, coordinator_only, devices: self.devices, runtime: self.runtime })
    }
}

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

/// The run's observer: a bar or JSON lines, and the human-facing lines.
struct Progress {
    mode: SearchProgress,
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(mode: SearchProgress) -> Self {
        Self { mode: mode.resolved(), bar: indicatif::ProgressBar::hidden() }
    }

    /// Plain-text lines go to stdout unless stdout carries JSON lines.
    fn text(&self) -> bool {
        self.mode != SearchProgress::Jsonl
    }
}

impl RunObserver for Progress {
    fn notice(&mut self, n: &Notice) {
        match n {
            Notice::RunDirectory(d) => eprintln!("run directory: {}", d.display()),
            Notice::CalibrationRowsRead { read, total } => eprintln!("calibration: {read} of {total} rows read from calibration.jsonl"),
            Notice::CalibrationStarted { sources, merges } => eprintln!(
                "calibrating anchor / IRT estimators: {sources} source models and {merges} random merges, every item of each such objective"
            ),
            Notice::CalibrationDone { seconds } => eprintln!("calibration done in {seconds:.1} s"),
            Notice::Warning(w) => eprintln!("warning: {w}"),
            Notice::Broker(line) => eprintln!("{line}"),
            Notice::Workers(n) if self.text() => println!("{n} workers: candidates are scored {n} at a time (--workers to choose)"),
            Notice::StageFinished { termination, evaluations, dir, best, .. } if self.text() => {
                println!("stage finished ({termination}): {evaluations} evaluations in {}", dir.display());
                if let Some((_, file)) = best {
                    println!("its pick (lowest mean minimized objective) is written to {}", file.display());
                }
            }
            Notice::DataFlowStage { genes, models, layers } if self.text() => {
                println!("data-flow stage: {genes} genes over {models} models ({layers} layers)")
            }
            _ => {}
        }
    }

    fn event(&mut self, e: &LogEvent) {
        if self.mode == SearchProgress::Jsonl
            && let Ok(line) = serde_json::to_string(e)
        {
            println!("{line}");
        }
        if let LogEvent::Generation { generation, evaluations, best, .. } = e {
            self.bar.set_position(*evaluations);
            // the pick so far, every objective in its own units (in the objectives' order; the
            // names would leave no room for the bar on an 80-column terminal)
            let best = best.as_ref().map_or("-".into(), |o| o.0.iter().map(|(_, v)| format!("{v:.4}")).collect::<Vec<_>>().join(" / "));
            self.bar.set_message(format!("gen {generation} best {best}"));
        }
    }

    fn stage_started(&mut self, _stage: Stage, budget: Option<u64>) {
        if self.mode == SearchProgress::Bar {
            let b = budget.map_or_else(indicatif::ProgressBar::no_length, indicatif::ProgressBar::new);
            b.set_style(
                indicatif::ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} candidates (eta {eta}) {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            self.bar = b;
        }
    }

    fn evaluated(&mut self, _c: &Candidate, _o: &Outcome) {
        self.bar.inc(1);
    }

    fn stage_ended(&mut self, _stage: Stage) {
        self.bar.finish_and_clear();
        self.bar = indicatif::ProgressBar::hidden();
    }
}

pub(crate) fn cancel_flag() -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("installing the Ctrl-C handler")?;
    Ok(cancel)
}

/// Ends the process the way an interrupted run does: exit 130, with how to continue.
fn interrupted(run_dir: &std::path::Path) -> ! {
    eprintln!("interrupted: checkpoint written; continue with `evomerge resume {}`", run_dir.display());
    std::process::exit(i32::from(crate::exit::INTERRUPTED));
}

pub fn search(args: SearchArgs) -> Result<()> {
    let mut exp = Experiment::load(&args.experiment)?;
    if let Some(s) = args.seed {
        exp.seed = s;
    }
    if let Some(d) = args.device {
        exp.device = d;
    }
    if let Some(r) = args.scoring.runtime {
        exp.runtime = r;
    }
    if args.dry_run {
        let (device, runtime) = (exp.device, exp.runtime);
        let opts = RunOptions { workers: args.scoring.workers.unwrap_or(0), allow_nonfinite: args.allow_nonfinite, ..Default::default() };
        let d = evomerge_run::dry_run(exp, &opts)?;
        println!(
            "{}: {} genes, {} objective(s), model {} ({} layers) on {device} ({runtime} runtime), about {} of memory, candidates merged {}; nothing run",
            d.name,
            d.genes,
            d.objectives,
            d.model.display(),
            d.layers,
            bytes(d.memory),
            if d.in_place { "in place (inputs held in the model's layout)" } else { "from the memory-mapped checkpoints" }
        );
        if let Some(n) = d.calibration_merges {
            println!("anchor / IRT estimators: fitted on the source models and {n} random merges, scored on every item before the first generation");
        }
        let budget = |b: Option<u64>| b.map_or("no evaluation limit".into(), |b| format!("{b} evaluations"));
        println!("parameter space: {}, {}", d.optimizer, budget(d.budget));
        match &d.dataflow {
            Some(df) => println!(
                "then a data-flow stage: {} genes over {} models ({} layers), {}, {}",
                df.genes,
                df.models,
                df.layers,
                df.optimizer,
                budget(df.budget)
            ),
            None => println!("no data-flow stage ([dataflow] adds one)"),
        }
        println!("candidates scored {} at a time (--workers)", d.workers);
        return Ok(());
    }
    let opts = args.scoring.options(args.allow_nonfinite)?;
    let mut progress = Progress::new(args.progress);
    let (run_dir, end) = evomerge_run::start(exp, args.run_dir, &opts, &mut progress)?;
    finish(&run_dir, end, &progress)
}

pub fn resume(args: ResumeArgs) -> Result<()> {
    let opts = args.scoring.options(args.allow_nonfinite)?;
    let mut progress = Progress::new(args.progress);
    let end = evomerge_run::resume(&args.run_dir, args.force, &opts, &mut progress)?;
    finish(&RunDir::new(&args.run_dir), end, &progress)
}

fn finish(run_dir: &RunDir, end: RunEnd, progress: &Progress) -> Result<()> {
    match end {
        RunEnd::Interrupted => interrupted(run_dir.path()),
        RunEnd::Finished { summary, .. } => {
            if progress.text() {
                print_standing(&summary, run_dir);
            } else {
                // the last JSON line: what the run found (also in RUN_DIR/summary.json)
                let mut v = serde_json::json!({"event": "summary", "run_dir": run_dir.path().display().to_string()});
                if let (Some(m), serde_json::Value::Object(fields)) = (v.as_object_mut(), serde_json::to_value(&*summary)?) {
                    m.extend(fields);
                }
                println!("{v}");
            }
            Ok(())
        }
    }
}

/// The table a finished run ends with: each stage's pick (lowest mean minimized objective:
/// the best candidate with one objective, the balanced pick with several) against every
/// reference, whether each stage improved on its start, and how to export the result.
fn print_standing(summary: &RunSummary, run_dir: &RunDir) {
    let mut rows: Vec<(String, &evomerge_run::Objectives)> = vec![];
    for st in &summary.stages {
        let Some(b) = &st.best else { continue };
        let label = if st.is_dataflow() { "searched + data flow:" } else { "searched: candidate" };
        rows.push((format!("{label} {}", b.id.unwrap_or_default()), &b.objectives));
    }
    let Some(first) = rows.first().map(|r| r.1) else {
        println!("no candidate was scored");
        return;
    };
    let names: Vec<String> = first.names().map(String::from).collect();
    let multi = names.len() > 1;
    let mut labelled: Vec<(String, &evomerge_run::Objectives)> = rows;
    labelled.extend(summary.references.iter().map(|r| (format!("{}: {}", r.kind, r.name), &r.objectives)));
    let w = labelled.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    // each column as wide as its objective's name
    let widths: Vec<usize> = names.iter().map(|n| n.chars().count().max(10)).collect();
    print!("\n{:<w$}", "");
    for (n, cw) in names.iter().zip(&widths) {
        print!("  {n:>cw$}");
    }
    println!("{}", if multi { format!("  {:>10}", "mean") } else { String::new() });
    for (label, o) in &labelled {
        print!("{label:<w$}");
        let vals: Vec<f64> = names.iter().map(|n| o.get(n).unwrap_or(f64::NAN)).collect();
        for (x, cw) in vals.iter().zip(&widths) {
            print!("  {x:>cw$.4}");
        }
        if multi {
            print!("  {:>10.4}", vals.iter().sum::<f64>() / vals.len() as f64);
        }
        println!();
    }
    println!();
    for st in &summary.stages {
        let what = if st.is_dataflow() { "data-flow stage" } else { "parameter-space stage" };
        let repeats = st.repeats();
        let mut detail = format!(
            "{} evaluations{}{}",
            st.evaluations,
            if st.failures > 0 { format!(", {} failed", st.failures) } else { String::new() },
            if repeats > 0 { format!(", {repeats} repeated an earlier point") } else { String::new() }
        );
        if let (Some(true), Some(s), Some(b)) = (st.improved, &st.start, &st.best) {
            let of = if multi { "mean of the objectives" } else { "objective" };
            detail.push_str(&format!("; {of} {:.4} -> {:.4}", s.mean_value(), b.mean_value()));
        }
        println!("{what}: {} ({detail})", st.verdict());
    }
    let beaten = summary.references.iter().filter(|r| r.beaten).count();
    println!("the run's pick beats {beaten} of {} references{}", summary.references.len(), if multi { " on the mean of the objectives" } else { "" });
    if let Some(p) = &summary.pick {
        println!("export it: evomerge export {} --pick {p} --out merged/", run_dir.path().display());
    }
}
