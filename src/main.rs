//! `evomerge`: the command-line front end. Commands parse arguments, call one library
//! function each, and print; all logic lives in the workspace's library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod exit;
mod experiment;

// Keeps freed memory for reuse: see evomerge_engine::alloc (measured there).
#[global_allocator]
static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;

/// Evolutionary model-merge search for LLMs: merge Hugging Face checkpoints the way mergekit
/// does, much faster, and run them (score, generate) with a forward pass that matches
/// transformers (search over merge recipes comes in later releases).
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
    /// Show a run's best candidates (or Pareto front), evaluations, failures, throughput.
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
    let cli = Cli::parse();
    let filter = std::env::var("EVOMERGE_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: --threads {n}: {e}");
            return ExitCode::from(exit::ERROR);
        }
    }
    let result = match cli.command {
        Command::Merge(args) => commands::merge::run(args),
        Command::Score(args) => commands::run_model::score(args),
        Command::Generate(args) => commands::run_model::generate(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Search(args) => commands::search::search(args),
        Command::Resume(args) => commands::search::resume(args),
        Command::Status(args) => commands::runs::status(args),
        Command::Export(args) => commands::runs::export(args),
        Command::Report(args) => commands::report::run(args),
        Command::Zoo(args) => commands::zoo::run(args),
    };
    exit::report(result)
}
