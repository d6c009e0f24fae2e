//! `evomerge eval --model DIR --task SPEC`: one task's metric with its standard error.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use evomerge_engine::io::{ModelConfig, resolve_model};
use evomerge_engine::model::{self, DeviceSpec, RuntimeKind, Tokenizer};
use evomerge_fitness::tasks::{EvalOptions, FewshotSampler, Task, TaskSpec};

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
    /// Few-shot examples per item (overrides the task file's prompt.fewshot).
    #[arg(long, value_name = "N")]
    pub fewshot: Option<usize>,
    /// How the few-shot examples are chosen: per_item (seeded draw per item) or first_n (the
    /// same first N for every item, lm-eval's first_n sampler); overrides the task file.
    #[arg(long, value_name = "SAMPLER", value_parser = parse_sampler)]
    pub fewshot_sampler: Option<FewshotSampler>,
    /// Run every request in full instead of running shared prefixes once (to measure what
    /// sharing saves; results agree up to float rounding). EVOMERGE_PREFIX_SHARING=0 does the
    /// same for every command.
    #[arg(long)]
    pub no_prefix_sharing: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object with the metric, its standard error and every item's result.
    #[arg(long)]
    pub json: bool,
    /// Device: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Runtime of the forward pass: burn, or libtorch (PyTorch's kernels; a build with
    /// `--features libtorch`).
    #[arg(long, default_value = "burn")]
    pub runtime: RuntimeKind,
}

fn parse_sampler(s: &str) -> Result<FewshotSampler, String> {
    match s {
        "per_item" => Ok(FewshotSampler::PerItem),
        "first_n" => Ok(FewshotSampler::FirstN),
        _ => Err(format!("'{s}' is not a few-shot sampler: per_item or first_n")),
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    let mut spec = TaskSpec::load(&args.task).map_err(anyhow::Error::msg)?;
    if let Some(n) = args.fewshot {
        spec.prompt.fewshot = n;
    }
    if let Some(s) = args.fewshot_sampler {
        spec.prompt.fewshot_sampler = s;
    }
    let task = Task::load(spec, args.data.as_deref(), args.fewshot_data.as_deref())?;
    for s in &task.skipped {
        eprintln!("warning: skipped {s}");
    }
    let dir = resolve_model(&args.model, None)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let prefix = cfg.prefix_token();
    let mut m = model::open_dir(args.runtime, args.device, &dir).with_context(|| format!("opening model '{}'", args.model))?;
    let share_prefix = !args.no_prefix_sharing && evomerge_fitness::tasks::share_prefix_default();
    let opts = EvalOptions { limit: args.limit, batch_size: args.batch_size.max(1), share_prefix };
    let r = task.evaluate(m.as_mut(), &tok, prefix, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let se = r.stderr.map(|s| format!(" ± {s:.4}")).unwrap_or_default();
    println!(
        "{}: {} = {:.4}{se}  ({} items, {} tokens run ({:.0} % of {} unshared), {:.1} s; {} is better)",
        r.task,
        r.metric,
        r.value,
        r.n,
        r.tokens,
        100.0 * r.tokens as f64 / r.tokens_unshared.max(1) as f64,
        r.tokens_unshared,
        r.seconds,
        if r.higher_is_better { "higher" } else { "lower" }
    );
    Ok(())
}
