//! `evomerge score` and `evomerge generate`: run one checkpoint on a text or token ids.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{self, DeviceSpec, GenerateOptions, LanguageModel, RuntimeKind, StopReason, Tokenizer};
use serde_json::json;

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge score --model merged/ --text \"Q: what is 12 + 7? A: 19\"\n  \
evomerge score --model merged/ --token-ids 1,261,297 --json\n\n\
The text is encoded with the model's tokenizer.json, special tokens (BOS) included as the\n\
tokenizer's post-processor adds them. Log-probs are natural logs.")]
pub struct ScoreArgs {
    /// Checkpoint directory or Hugging Face id in the local cache.
    #[arg(long, short)]
    pub model: String,
    /// Text to score (encoded with the model's tokenizer).
    #[arg(long, conflicts_with = "token_ids", required_unless_present = "token_ids")]
    pub text: Option<String>,
    /// Comma-separated token ids to score.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub token_ids: Option<Vec<u32>>,
    /// Print one JSON object: token_ids, logprobs (entry i = log P(token_ids[i+1] | token_ids[..=i])), top_ids, sum_logprob.
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

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  evomerge generate --model merged/ --prompt \"Q: what is 3 + 4? A:\" --max-new-tokens 8 --stop $'\\n'\n\n\
Greedy decoding with a KV cache; stops at the model's EOS tokens (config.json and\n\
generation_config.json), at a --stop string, or after --max-new-tokens.")]
pub struct GenerateArgs {
    /// Checkpoint directory or Hugging Face id in the local cache.
    #[arg(long, short)]
    pub model: String,
    /// Prompt text (encoded with the model's tokenizer, BOS as configured).
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Stop when the generated text contains this string (repeatable); the output ends before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object: prompt_ids, new_ids, text, stop_reason.
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

fn open(model_ref: &str, runtime: RuntimeKind, device: DeviceSpec) -> Result<(PathBuf, Box<dyn LanguageModel>)> {
    let dir = resolve_model(model_ref, None)?;
    let m = model::open_dir(runtime, device, &dir).with_context(|| format!("opening model '{model_ref}'"))?;
    Ok((dir, m))
}

fn tokenizer(dir: &Path) -> Result<Option<Tokenizer>> {
    if dir.join("tokenizer.json").is_file() { Ok(Some(Tokenizer::from_dir(dir)?)) } else { Ok(None) }
}

/// log-softmax of one row in f64: (log p of every entry's normalizer, argmax).
fn lse_argmax(row: &[f32]) -> (f64, usize) {
    let (mut best, mut arg) = (f32::NEG_INFINITY, 0);
    for (i, &v) in row.iter().enumerate() {
        if v > best {
            best = v;
            arg = i;
        }
    }
    let max = f64::from(best);
    let sum: f64 = row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    (max + sum.ln(), arg)
}

pub fn score(args: ScoreArgs) -> Result<()> {
    let (dir, mut m) = open(&args.model, args.runtime, args.device)?;
    let tok = tokenizer(&dir)?;
    let ids = match (&args.text, &args.token_ids) {
        (Some(text), _) => match &tok {
            Some(t) => t.encode(text, true)?,
            None => bail!("{} has no tokenizer.json; pass --token-ids instead of --text", dir.display()),
        },
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --text or --token-ids"),
    };
    if ids.is_empty() {
        bail!("nothing to score: the input encodes to zero tokens");
    }
    let logits = m.logits(&ids)?;
    let v = m.info().dims.vocab;
    let mut logprobs = Vec::with_capacity(ids.len() - 1);
    let mut top_ids = Vec::with_capacity(ids.len());
    let mut top_logprobs = Vec::with_capacity(ids.len());
    for (i, row) in logits.chunks_exact(v).enumerate() {
        let (lse, arg) = lse_argmax(row);
        top_ids.push(arg as u32);
        top_logprobs.push(f64::from(row[arg]) - lse);
        if let Some(&next) = ids.get(i + 1) {
            logprobs.push(f64::from(row[next as usize]) - lse);
        }
    }
    let sum: f64 = logprobs.iter().sum();
    let show = |id: u32| tok.as_ref().and_then(|t| t.decode(&[id], false).ok()).unwrap_or_default();
    if args.json {
        let mut out = json!({
            "model": args.model,
            "token_ids": ids,
            "logprobs": logprobs,
            "top_ids": top_ids,
            "top_logprobs": top_logprobs,
            "sum_logprob": sum,
        });
        if tok.is_some() {
            out["tokens"] = json!(ids.iter().map(|&i| show(i)).collect::<Vec<_>>());
        }
        println!("{out}");
        return Ok(());
    }
    println!("{:>5} {:>8}  {:<14} {:>10}   {:>8}  {:<14} {:>10}", "pos", "id", "token", "logprob", "next top", "", "logprob");
    for (i, &id) in ids.iter().enumerate() {
        let lp = if i == 0 { "-".to_string() } else { format!("{:.4}", logprobs[i - 1]) };
        println!(
            "{:>5} {:>8}  {:<14} {:>10}   {:>8}  {:<14} {:>10.4}",
            i,
            id,
            format!("{:?}", show(id)),
            lp,
            top_ids[i],
            format!("{:?}", show(top_ids[i])),
            top_logprobs[i]
        );
    }
    let n = logprobs.len().max(1) as f64;
    println!("sum log-prob {sum:.4} over {} predicted tokens (perplexity {:.3})", logprobs.len(), (-sum / n).exp());
    Ok(())
}

/// EOS ids from config.json and generation_config.json.
fn eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let mut eos = evomerge_engine::io::ModelConfig::from_dir(dir)?.eos_token_ids;
    if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}/generation_config.json", dir.display()))?;
        match &v["eos_token_id"] {
            serde_json::Value::Array(a) => eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32)),
            x => eos.extend(x.as_u64().map(|x| x as u32)),
        }
    }
    eos.sort_unstable();
    eos.dedup();
    Ok(eos)
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let (dir, mut m) = open(&args.model, args.runtime, args.device)?;
    let Some(tok) = tokenizer(&dir)? else { bail!("{} has no tokenizer.json", dir.display()) };
    let prompt = tok.encode(&args.prompt, true)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to zero tokens");
    }
    let opts = GenerateOptions { max_new_tokens: args.max_new_tokens, eos: eos_ids(&dir)?, share_prefix: false, batch_size: 0 };
    let stops = &args.stop;
    let hit = |ids: &[u32]| -> bool { !stops.is_empty() && tok.decode(ids, false).is_ok_and(|t| stops.iter().any(|s| t.contains(s.as_str()))) };
    let out = m.generate(std::slice::from_ref(&prompt), &opts, &|_, ids| hit(ids))?;
    let g = &out[0];
    let mut text = tok.decode(&g.tokens, true)?;
    if g.reason == StopReason::Stop
        && let Some(cut) = stops.iter().filter_map(|s| text.find(s.as_str())).min()
    {
        text.truncate(cut);
    }
    if args.json {
        println!("{}", json!({"model": args.model, "prompt_ids": prompt, "new_ids": g.tokens, "text": text, "stop_reason": g.reason}));
    } else {
        println!("{text}");
        eprintln!("[{} new tokens, stopped: {:?}]", g.tokens.len(), g.reason);
    }
    Ok(())
}
