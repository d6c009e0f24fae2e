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

pub mod error;
pub mod extract;
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

pub use error::SpecError;
pub use extract::{Extract, Extractor, Normalize, Normalizer};
pub use spec::{Kind, Metric, PRESETS, Preprocess, TaskSpec};
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
    /// Tokens the model processed (prompts + continuations + generated).
    pub tokens: usize,
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
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { limit: None, batch_size: 8 }
    }
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

impl Task {
    /// Loads the spec's data (`data` overrides the spec's path), few-shot pool and templates,
    /// and renders every prompt once so that template errors surface now.
    pub fn load(spec: TaskSpec, data: Option<&std::path::Path>, fewshot_data: Option<&std::path::Path>) -> Result<Self, TaskError> {
        let name = spec.name.clone();
        let err = |reason: SpecError| TaskError::Spec { task: name.clone(), reason: Box::new(reason) };
        let path = data.map(std::path::Path::to_path_buf).or_else(|| spec.data.path.clone()).ok_or_else(|| err(SpecError::NoData))?;
        let (items, skipped) = read_items(&path, &spec.data.fields, spec.data.on_error)?;
        let fs_path = fewshot_data.map(std::path::Path::to_path_buf).or_else(|| spec.data.fewshot_path.clone());
        let (fewshot_pool, pool_is_data) = match (&fs_path, spec.prompt.fewshot) {
            (_, 0) => (vec![], false),
            (Some(p), _) => (read_items(p, &spec.data.fields, spec.data.on_error)?.0, false),
            (None, _) => (items.clone(), true),
        };
        let need = spec.prompt.fewshot + usize::from(pool_is_data);
        if spec.prompt.fewshot > 0 && fewshot_pool.len() < need {
            return Err(err(SpecError::FewShot { asked: spec.prompt.fewshot, available: fewshot_pool.len() }));
        }
        let template = Template::parse(&spec.prompt.template).map_err(&err)?;
        let choice = Template::parse(&spec.prompt.choice).map_err(&err)?;
        let target = spec.prompt.target.as_deref().map(Template::parse).transpose().map_err(&err)?;
        let continuation = spec.prompt.continuation.as_deref().map(Template::parse).transpose().map_err(&err)?;
        let extractor = Extractor::new(&spec.generation.extract).map_err(&err)?;
        let normalizer = Normalizer::new(&spec.metric.normalize).map_err(&err)?;
        let task = Self { spec, items, skipped, fewshot_pool, pool_is_data, template, choice, target, continuation, extractor, normalizer };
        for (i, item) in task.items.iter().enumerate() {
            if task.spec.kind == Kind::MultipleChoice {
                task.requests(i, item).map_err(&err)?;
            } else {
                task.context(i, item).map_err(&err)?;
            }
            if task.spec.kind == Kind::Generation && !matches!(item.gold, Gold::Text(_)) {
                return Err(err(SpecError::GenerationNeedsText(item.id.clone())));
            }
        }
        Ok(task)
    }

    /// The (context, continuation, length for acc_norm) of each choice. Usually one context and
    /// a continuation per choice (target delimiter + choice template; the length is the choice's
    /// in characters). With `prompt.continuation` (lm-eval's multiple-input tasks, WinoGrande)
    /// each choice goes into its own context and one continuation is scored after all of them;
    /// the length is then that of the choice's context, as lm-eval takes `len(doc_to_choice)`.
    pub fn requests(&self, index: usize, item: &Item) -> Result<Vec<(String, String, f64)>, SpecError> {
        let delim = &self.spec.prompt.target_delimiter;
        let len = |s: &str| s.chars().count().max(1) as f64;
        if let Some(cont) = &self.continuation {
            let prefix = self.fewshot_prefix(index, item)?;
            let c = format!("{delim}{}", self.pp(cont.render(item, None)?));
            return item
                .choices
                .iter()
                .enumerate()
                .map(|(i, ch)| {
                    let own = self.pp(self.template.render(item, Some(ChoiceCtx { choice: ch, index: i }))?);
                    Ok((format!("{prefix}{own}"), c.clone(), len(&own)))
                })
                .collect();
        }
        let ctx = self.context(index, item)?;
        item.choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let raw = self.pp(self.choice.render(item, Some(ChoiceCtx { choice: c, index: i }))?);
                Ok((ctx.clone(), format!("{delim}{raw}"), len(&raw)))
            })
            .collect()
    }

    /// The answer text a few-shot example shows.
    fn target_text(&self, ex: &Item) -> Result<String, SpecError> {
        let t = match (&self.continuation, &self.target, &ex.gold) {
            (Some(c), _, _) => c.render(ex, None)?,
            (None, Some(t), _) => t.render(ex, None)?,
            (None, None, Gold::Choice(i)) => {
                let c = ex.choices.get(*i).ok_or(SpecError::GoldOutOfRange)?;
                self.choice.render(ex, Some(ChoiceCtx { choice: c, index: *i }))?
            }
            (None, None, Gold::Text(t)) => t.clone(),
        };
        Ok(self.pp(t))
    }

    /// A few-shot example's prompt: multiple-input tasks show the gold choice in it.
    fn example_prompt(&self, ex: &Item) -> Result<String, SpecError> {
        let p = match (&self.continuation, &ex.gold) {
            (Some(_), Gold::Choice(i)) => {
                let c = ex.choices.get(*i).ok_or(SpecError::GoldOutOfRange)?;
                self.template.render(ex, Some(ChoiceCtx { choice: c, index: *i }))?
            }
            _ => self.template.render(ex, None)?,
        };
        Ok(self.pp(p))
    }

    /// The task's text clean-up ([`Preprocess`]) of a rendered prompt or choice.
    fn pp(&self, text: String) -> String {
        static BRACKETS: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| regex::Regex::new(r"\[.*?\]").expect("valid regex"));
        match self.spec.prompt.preprocess {
            Preprocess::None => text,
            Preprocess::Hellaswag => {
                let t = text.trim().replace(" [title]", ". ");
                BRACKETS.replace_all(&t, "").replace("  ", " ")
            }
        }
    }

    /// Description + few-shot examples (lm-eval `fewshot_context` before the item's prompt).
    fn fewshot_prefix(&self, index: usize, item: &Item) -> Result<String, SpecError> {
        let p = &self.spec.prompt;
        let mut out = p.description.clone();
        if p.fewshot > 0 {
            // Seeded per item, so that results do not depend on evaluation order or --limit.
            let mut rng = ChaCha8Rng::seed_from_u64(p.fewshot_seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut chosen: Vec<usize> = Vec::with_capacity(p.fewshot);
            while chosen.len() < p.fewshot {
                let j = (rng.next_u64() % self.fewshot_pool.len() as u64) as usize;
                let is_self = self.pool_is_data && self.fewshot_pool[j].id == item.id;
                if !is_self && !chosen.contains(&j) {
                    chosen.push(j);
                }
            }
            for j in chosen {
                let ex = &self.fewshot_pool[j];
                out.push_str(&self.example_prompt(ex)?);
                out.push_str(&p.target_delimiter);
                out.push_str(&self.target_text(ex)?);
                out.push_str(&p.fewshot_delimiter);
            }
        }
        Ok(out)
    }

    /// Description + few-shot examples + this item's prompt (lm-eval `fewshot_context`).
    pub fn context(&self, index: usize, item: &Item) -> Result<String, SpecError> {
        Ok(format!("{}{}", self.fewshot_prefix(index, item)?, self.pp(self.template.render(item, None)?)))
    }

    /// Runs the task on `model` (the first `limit` items).
    pub fn evaluate(&self, model: &mut dyn LanguageModel, tok: &Tokenizer, prefix: u32, opts: &EvalOptions) -> Result<TaskResult, TaskError> {
        let t0 = Instant::now();
        let n = opts.limit.map_or(self.items.len(), |l| l.min(self.items.len()));
        let idx: Vec<usize> = (0..n).collect();
        let (results, tokens) = self.score_items(model, tok, prefix, &idx, opts.batch_size)?;
        Ok(self.aggregate(results, tokens, t0.elapsed().as_secs_f64()))
    }

    /// Scores the items at `idx` (indices into `items`), reusing `cache` entries of the same
    /// model `fingerprint` and adding the new ones. Returns results in `idx` order and the
    /// tokens processed for the uncached items.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_cached(
        &self,
        model: &mut dyn LanguageModel,
        tok: &Tokenizer,
        prefix: u32,
        idx: &[usize],
        batch_size: usize,
        cache: &mut ResultCache,
        fingerprint: &str,
    ) -> Result<(Vec<ItemResult>, usize), TaskError> {
        let name = &self.spec.name;
        let missing: Vec<usize> = idx.iter().copied().filter(|&i| cache.get(fingerprint, name, &self.items[i].id).is_none()).collect();
        let (fresh, tokens) = self.score_items(model, tok, prefix, &missing, batch_size)?;
        for r in fresh {
            cache.insert(fingerprint, name, r);
        }
        let out = idx
            .iter()
            .map(|&i| {
                cache
                    .get(fingerprint, name, &self.items[i].id)
                    .cloned()
                    .ok_or_else(|| TaskError::Spec { task: name.clone(), reason: Box::new(SpecError::DuplicateId(self.items[i].id.clone())) })
            })
            .collect::<Result<_, _>>()?;
        Ok((out, tokens))
    }

    /// The task's metric over item results (in item order).
    pub fn aggregate(&self, results: Vec<ItemResult>, tokens: usize, seconds: f64) -> TaskResult {
        let metric = self.spec.metric.name;
        let (value, stderr) = match metric {
            Metric::Perplexity | Metric::BitsPerByte => {
                let ll: f64 = results.iter().map(|r| r.score).sum();
                let toks: usize = results.iter().map(|r| r.tokens).sum();
                let bytes: usize = results.iter().map(|r| r.bytes).sum();
                let v = if metric == Metric::Perplexity {
                    (-ll / toks.max(1) as f64).exp()
                } else {
                    -ll / (bytes.max(1) as f64 * std::f64::consts::LN_2)
                };
                (v, None)
            }
            _ => {
                let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
                let (m, se) = mean_stderr(&scores);
                (m, Some(se))
            }
        };
        TaskResult {
            task: self.spec.name.clone(),
            metric: metric.name().into(),
            value,
            stderr,
            higher_is_better: metric.higher_is_better(),
            n: results.len(),
            tokens,
            seconds,
            items: results,
        }
    }

    /// Scores the items at `idx` (few-shot examples depend on the item index, not on which
    /// other items are scored, so subsets agree with full runs).
    fn score_items(
        &self,
        model: &mut dyn LanguageModel,
        tok: &Tokenizer,
        prefix: u32,
        idx: &[usize],
        batch_size: usize,
    ) -> Result<(Vec<ItemResult>, usize), TaskError> {
        let n = idx.len();
        if n == 0 {
            return Ok((vec![], 0));
        }
        let sel: Vec<(usize, &Item)> = idx.iter().map(|&i| (i, &self.items[i])).collect();
        let opts = EvalOptions { limit: None, batch_size };
        let spec_err = |reason: SpecError| TaskError::Spec { task: self.spec.name.clone(), reason: Box::new(reason) };
        let add_bos = self.spec.prompt.add_bos;
        let max_ctx = model.info().max_context;
        let mut tokens = 0usize;
        let results: Vec<ItemResult> = match self.spec.kind {
            Kind::MultipleChoice => {
                let mut reqs = Vec::new();
                let mut spans = Vec::with_capacity(n);
                for &(i, item) in &sel {
                    let rs = self.requests(i, item).map_err(spec_err)?;
                    spans.push((reqs.len(), rs.iter().map(|r| r.2).collect::<Vec<_>>()));
                    for (ctx, cont, _) in &rs {
                        let (mut context, continuation) = encode_pair(tok, ctx, cont, add_bos, prefix)?;
                        let excess = (context.len() + continuation.len()).saturating_sub(max_ctx);
                        context.drain(..excess.min(context.len() - 1));
                        tokens += context.len() + continuation.len();
                        reqs.push(ScoreRequest { context, continuation });
                    }
                }
                let scored = model.score(&reqs, opts.batch_size)?;
                sel.iter()
                    .zip(spans)
                    .map(|(&(_, item), (start, lens))| {
                        let lls: Vec<f64> = scored[start..start + lens.len()].iter().map(|r| r.sum).collect();
                        let pick = match self.spec.metric.name {
                            Metric::AccNorm => argmax(&lls.iter().zip(&lens).map(|(l, n)| l / n).collect::<Vec<_>>()),
                            _ => argmax(&lls),
                        };
                        let gold = match item.gold {
                            Gold::Choice(g) => g,
                            Gold::Text(_) => usize::MAX,
                        };
                        ItemResult {
                            id: item.id.clone(),
                            score: f64::from(u8::from(pick == gold)),
                            prediction: pick.to_string(),
                            logliks: lls,
                            tokens: 0,
                            bytes: 0,
                        }
                    })
                    .collect()
            }
            Kind::Generation => {
                let g = &self.spec.generation;
                let mut out = Vec::with_capacity(n);
                // Greedy generation ends at the model's EOS as transformers' generate() does
                // (lm-eval adds the EOS text to `until` as well).
                let eos: Vec<u32> = model.info().eos_token_ids.clone();
                let gen_opts = GenerateOptions { max_new_tokens: g.max_new_tokens, eos };
                let prompts: Vec<Vec<u32>> = sel
                    .iter()
                    .map(|&(i, item)| {
                        let ctx = self.context(i, item).map_err(spec_err)?;
                        let mut ids = tok.encode(&ctx, add_bos)?;
                        let keep = max_ctx.saturating_sub(g.max_new_tokens).max(1);
                        ids.drain(..ids.len().saturating_sub(keep));
                        Ok(ids)
                    })
                    .collect::<Result<_, TaskError>>()?;
                let until = &g.until;
                let hit = |ids: &[u32]| !until.is_empty() && tok.decode(ids, false).is_ok_and(|t| until.iter().any(|s| t.contains(s.as_str())));
                for (chunk_i, chunk) in prompts.chunks(opts.batch_size.max(1)).enumerate() {
                    let gens = model.generate(chunk, &gen_opts, &|_, ids| hit(ids))?;
                    for (k, (p, generation)) in chunk.iter().zip(gens).enumerate() {
                        let item = sel[chunk_i * opts.batch_size.max(1) + k].1;
                        tokens += p.len() + generation.tokens.len();
                        let mut text = tok.decode(&generation.tokens, true)?;
                        if let Some(cut) = until.iter().filter_map(|s| text.find(s.as_str())).min() {
                            text.truncate(cut);
                        }
                        let pred = self.extractor.apply(&text);
                        let gold = item.field("answer").unwrap_or_default();
                        out.push(ItemResult {
                            id: item.id.clone(),
                            score: self.normalizer.exact_match(&pred, gold),
                            prediction: pred,
                            logliks: vec![],
                            tokens: 0,
                            bytes: 0,
                        });
                    }
                }
                out
            }
            Kind::Perplexity => {
                let window = model.info().max_context.saturating_sub(1).max(1);
                let mut reqs = Vec::new();
                let mut spans = Vec::with_capacity(n);
                for &(i, item) in &sel {
                    let text = self.context(i, item).map_err(spec_err)?;
                    let ids = tok.encode(&text, false)?;
                    if ids.is_empty() {
                        return Err(spec_err(SpecError::NoTokens(item.id.clone())));
                    }
                    // Disjoint windows, each conditioned on the token before it (the first on
                    // the prefix token): lm-eval's rolling windows with context length 1.
                    let start = reqs.len();
                    for w in (0..ids.len()).step_by(window) {
                        let context = if w == 0 { vec![prefix] } else { vec![ids[w - 1]] };
                        let continuation = ids[w..(w + window).min(ids.len())].to_vec();
                        reqs.push(ScoreRequest { context, continuation });
                    }
                    tokens += ids.len() + 1;
                    spans.push((start, reqs.len(), ids.len(), text.len()));
                }
                let scored = model.score(&reqs, opts.batch_size)?;
                sel.iter()
                    .zip(spans)
                    .map(|(&(_, item), (a, b, ntok, nbytes))| {
                        let ll: f64 = scored[a..b].iter().map(|r| r.sum).sum();
                        ItemResult { id: item.id.clone(), score: ll, prediction: String::new(), logliks: vec![], tokens: ntok, bytes: nbytes }
                    })
                    .collect()
            }
        };
        Ok((results, tokens))
    }
}

/// Per-(model fingerprint, task, item) results, so that no item is scored twice for the same
/// weights; serializable as the replayable record a run keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResultCache {
    entries: HashMap<String, ItemResult>,
}

impl ResultCache {
    fn key(fingerprint: &str, task: &str, item: &str) -> String {
        format!("{fingerprint}\u{1f}{task}\u{1f}{item}")
    }

    pub fn get(&self, fingerprint: &str, task: &str, item: &str) -> Option<&ItemResult> {
        self.entries.get(&Self::key(fingerprint, task, item))
    }

    pub fn insert(&mut self, fingerprint: &str, task: &str, r: ItemResult) {
        self.entries.insert(Self::key(fingerprint, task, &r.id), r);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
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
