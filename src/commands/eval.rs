//! `evomerge eval --model DIR --task SPEC`: one task's metric with its standard error.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use evomerge_engine::io::{ModelConfig, resolve_model};
use evomerge_engine::model::{self, DeviceSpec, Tokenizer};
use evomerge_fitness::tasks::{EvalOptions, Task, TaskSpec};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge eval --model merged/ --task arc_challenge --data ARC-Challenge/test-00000-of-00001.parquet\n  \
evomerge eval --model merged/ --task gsm8k --data gsm8k/test.jsonl --fewshot-data gsm8k/train.jsonl --limit 100\n  \
evomerge eval --model merged/ --task my_task.toml --json\n\n\
Presets (lm-eval-harness prompt formats): arc_challenge, arc_easy, mmlu, hellaswag, gsm8k, winogrande,\n\
mgsm_direct_{bn,de,en,es,fr,ja,ru,sw,te,th,zh}.\n\
A task file is TOML (see fitness/tasks/*.toml for commented examples). Data: .jsonl or .parquet,\n\
local files or files inside the Hugging Face cache; nothing is downloaded.")]
pub struct EvalArgs {
    /// Checkpoint directory or Hugging Face id in the local cache.
    #[arg(long, short)]
    pub model: String,
    /// A preset name or a task TOML file.
    #[arg(long, short)]
    pub task: String,
    /// Dataset file (.jsonl / .parquet); overrides the task file's data.path.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Few-shot examples file (default: the task file's, else the data itself).
    #[arg(long)]
    pub fewshot_data: Option<PathBuf>,
    /// Evaluate only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object with the metric, its standard error and every item's result.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let spec = TaskSpec::load(&args.task).map_err(anyhow::Error::msg)?;
    let task = Task::load(spec, args.data.as_deref(), args.fewshot_data.as_deref())?;
    for s in &task.skipped {
        eprintln!("warning: skipped {s}");
    }
    let dir = resolve_model(&args.model, None)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let prefix = cfg.prefix_token();
    let mut m = model::open_dir(args.device, &dir).with_context(|| format!("opening model '{}'", args.model))?;
    let opts = EvalOptions { limit: args.limit, batch_size: args.batch_size.max(1) };
    let r = task.evaluate(m.as_mut(), &tok, prefix, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let se = r.stderr.map(|s| format!(" ± {s:.4}")).unwrap_or_default();
    println!(
        "{}: {} = {:.4}{se}  ({} items, {} tokens, {:.1} s; {} is better)",
        r.task,
        r.metric,
        r.value,
        r.n,
        r.tokens,
        r.seconds,
        if r.higher_is_better { "higher" } else { "lower" }
    );
    Ok(())
}
