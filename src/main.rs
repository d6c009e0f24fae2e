//! `evomerge`: the command-line front end. Commands parse arguments, call one library
//! function each, and print; all logic lives in the workspace's library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod exit;

// Keeps freed memory for reuse: see evomerge_engine::alloc (measured there).
#[global_allocator]
static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;

/// Evolutionary model-merge search for LLMs: search merge recipes (CMA-ES, NSGA-II, random;
/// parameter space and data-flow paths) in a resumable run directory, merge Hugging Face
/// checkpoints the way mergekit does, and run, evaluate and export them.
#[derive(Debug, Parser)]
#[command(name = "evomerge", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Log verbosity: error, warn, info, debug, trace (or a tracing filter; EVOMERGE_LOG works too).
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Merge models from a mergekit YAML recipe into a new Hugging Face checkpoint.
    Merge(commands::merge::MergeArgs),
    /// Score a text or token ids with a model: per-token log-probs and the top next token.
    Score(commands::run_model::ScoreArgs),
    /// Continue a prompt greedily with a model.
    Generate(commands::run_model::GenerateArgs),
    /// Evaluate a model on a task (preset or TOML file): metric ± standard error.
    Eval(commands::eval::EvalArgs),
    /// Search merge recipes: an experiment TOML → a run directory (checkpointed, resumable).
    Search(commands::search::SearchArgs),
    /// Continue a checkpointed run (already-scored candidates are replayed, not recomputed).
    Resume(commands::search::ResumeArgs),
    /// Score candidates of a scale-out run: join it on its broker (Redis Streams).
    Worker(commands::worker::WorkerArgs),
    /// Show a run's best candidates (or Pareto front), evaluations, failures, throughput, calibration progress.
    Status(commands::runs::StatusArgs),
    /// Write a run's candidate as a Hugging Face checkpoint (re-merged from its genome).
    Export(commands::runs::ExportArgs),
    /// Plots (SVG) and a Markdown summary of a run, written into RUN_DIR/report/.
    Report(commands::report::ReportArgs),
    /// The demo model zoo: train tiny models with distinct skills for the demo experiment.
    Zoo(commands::zoo::ZooArgs),
}

fn main() -> ExitCode {
    evomerge_engine::alloc::keep_freed_memory();
    exit::end_quietly_on_a_closed_pipe();
    let cli = Cli::parse();
    let filter = std::env::var("EVOMERGE_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // Worker threads get the main thread's usual 8 MiB of stack: the command runs on one.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(cli.threads.unwrap_or(0)).stack_size(8 << 20);
    if let Err(e) = pool.build_global() {
        eprintln!("error: --threads: {e}");
        return ExitCode::from(exit::ERROR);
    }
    // The command itself runs on a worker of the global pool: parallel loops it starts (the
    // kernels', burn-ndarray's) then begin on the calling worker, instead of waking a worker
    // and putting the main thread to sleep on every small operation. Measured on the zoo's
    // 600-item eval (tiny model, where those round trips were most of the time): 1.38 → 0.81 s
    // on one thread, 1.10 → 0.96 s on two; unchanged on a 0.5 B model (BENCHMARKS.md).
    let mut result = None;
    rayon::scope(|_| result = Some(dispatch(cli.command)));
    exit::report(result.expect("the command ran"))
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Merge(args) => commands::merge::run(args),
        Command::Score(args) => commands::run_model::score(args),
        Command::Generate(args) => commands::run_model::generate(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Search(args) => commands::search::search(args),
        Command::Resume(args) => commands::search::resume(args),
        Command::Worker(args) => commands::worker::run(args),
        Command::Status(args) => commands::runs::status(args),
        Command::Export(args) => commands::runs::export(args),
        Command::Report(args) => commands::report::run(args),
        Command::Zoo(args) => commands::zoo::run(args),
    }
}
