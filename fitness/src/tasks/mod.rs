//! Evaluation tasks on a real model: multiple choice by log-likelihood, generation with answer
//! extraction, and log-likelihood of reference text — with lm-eval-harness's conventions.
//!
//! ```text
//! TaskSpec (TOML / preset) ─► Task::load: items (JSONL / parquet), few-shot pool, templates
//!        │ evaluate(model, tokenizer)
//!        ▼
//! requests: MC → (context, " " + choice) pairs, scored in length-sorted batches
//!           generation → prompts, greedy with stop strings, extract → exact match
//!           perplexity → (prefix token, text) rolling windows
//!        ▼
//! TaskResult { metric, value, stderr, items: per-item results (replayable record) }
//! ```
//!
//! lm-eval details kept: the context's trailing whitespace moves to the continuation before
//! tokenizing, and the continuation's tokens are those of `encode(context + continuation)`
//! past `encode(context)`; an empty context is the prefix token (BOS, else EOS); BOS is added
//! only when the spec says `add_bos`; `acc_norm` divides by the choice's length in characters;
//! argmax ties go to the first choice; the standard error is the sample standard deviation
//! (n − 1) over √n; inputs longer than the model's context lose tokens from the left (the
//! context keeps at least one; generation prompts leave room for `max_new_tokens`). Deviation: few-shot examples are drawn with evomerge's seeded generator,
//! not Python's `random.sample`, so the examples differ from lm-eval's for the same seed.
//!
//! Files: `mod.rs` the types and small helpers; `prompts.rs` loading a task and rendering its
//! prompts; `scoring.rs` running it on a model; `cache.rs` the per-item result cache.

mod cache;
pub mod error;
pub mod extract;
mod prompts;
mod scoring;
pub mod spec;
pub mod template;

use std::collections::HashMap;
use std::time::Instant;

use evomerge_datasets::{Gold, Item, RowError, read_items};
use evomerge_engine::EngineError;
use evomerge_engine::model::{GenerateOptions, LanguageModel, ScoreRequest, Tokenizer};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use cache::ResultCache;
pub use error::SpecError;
pub use extract::{Extract, Extractor, Normalize, Normalizer};
pub use spec::{FewshotSampler, Kind, Metric, PRESETS, Preprocess, TaskSpec};
use template::{ChoiceCtx, Template};

/// Errors of task loading and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task '{task}': {reason}")]
    Spec { task: String, reason: Box<SpecError> },
    #[error(transparent)]
    Data(#[from] evomerge_datasets::DatasetError),
    #[error(transparent)]
    Model(#[from] EngineError),
}

/// A loaded task: spec, items, few-shot pool, compiled templates and extractors.
#[derive(Debug, Clone)]
pub struct Task {
    pub spec: TaskSpec,
    pub items: Vec<Item>,
    /// Rows skipped under `on_error = "skip"`.
    pub skipped: Vec<RowError>,
    fewshot_pool: Vec<Item>,
    /// Whether the pool is the evaluated data (then an item never serves as its own example).
    pool_is_data: bool,
    template: Template,
    choice: Template,
    target: Option<Template>,
    /// Multiple-input multiple choice: the continuation shared by every choice's context.
    continuation: Option<Template>,
    extractor: Extractor,
    normalizer: Normalizer,
}

/// One item's outcome: the metric's per-item value plus what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// Per-item metric value (0/1 for accuracies, the log-likelihood for perplexity tasks).
    pub score: f64,
    /// The model's answer: chosen index, extracted text.
    pub prediction: String,
    /// Multiple choice: log-likelihood of each choice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logliks: Vec<f64>,
    /// Perplexity tasks: tokens and UTF-8 bytes of the scored text.
    #[serde(default)]
    pub tokens: usize,
    #[serde(default)]
    pub bytes: usize,
}

/// A task's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub metric: String,
    pub value: f64,
    /// Standard error of `value` (none for corpus-level perplexity).
    pub stderr: Option<f64>,
    pub higher_is_better: bool,
    pub n: usize,
    /// Tokens the model processed (prompts + continuations + generated), a shared prefix
    /// counted once.
    pub tokens: usize,
    /// What `tokens` would have been had every request run in full (no prefix sharing); for
    /// generation, the prompts' and the generated tokens.
    #[serde(default)]
    pub tokens_unshared: usize,
    pub seconds: f64,
    pub items: Vec<ItemResult>,
}

/// Evaluation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Only the first `limit` items (lm-eval `--limit`).
    pub limit: Option<usize>,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Run every prefix that several requests share once ([`LanguageModel::score_shared`],
    /// [`GenerateOptions::share_prefix`]); results equal unshared scoring up to float rounding.
    pub share_prefix: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { limit: None, batch_size: 8, share_prefix: share_prefix_default() }
    }
}

/// Prefix sharing is on unless the environment says `EVOMERGE_PREFIX_SHARING=0` (to measure
/// what it saves, or to rule it out).
pub fn share_prefix_default() -> bool {
    std::env::var("EVOMERGE_PREFIX_SHARING").map_or(true, |v| v.trim() != "0")
}

/// Tokens a scoring run cost: really run through the model, and had nothing been shared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCount {
    pub run: usize,
    pub unshared: usize,
}

/// Mean and standard error (sample std, n − 1, over √n) of per-item scores.
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// Index of the largest value; ties go to the first (numpy's argmax).
fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation;
/// continuation tokens are `encode(context + continuation)` past `encode(context)`. An empty
/// context becomes `[prefix]`.
pub fn encode_pair(tok: &Tokenizer, context: &str, continuation: &str, add_bos: bool, prefix: u32) -> Result<(Vec<u32>, Vec<u32>), EngineError> {
    let trimmed = context.trim_end();
    let (ctx, cont) = (trimmed, format!("{}{continuation}", &context[trimmed.len()..]));
    if ctx.is_empty() {
        return Ok((vec![prefix], tok.encode(&cont, add_bos)?));
    }
    let whole = tok.encode(&format!("{ctx}{cont}"), add_bos)?;
    let c = tok.encode(ctx, add_bos)?;
    let split = c.len().min(whole.len());
    Ok((c, whole[split..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_is_sample_std_over_sqrt_n() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, 0.75);
        // sample variance 0.25 → se = sqrt(0.25 / 4)
        assert!((se - 0.25).abs() < 1e-12);
        assert!(mean_stderr(&[1.0]).1.is_nan());
    }

    #[test]
    fn argmax_ties_go_first() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5]), 1);
        assert_eq!(argmax(&[2.0]), 0);
    }
}
