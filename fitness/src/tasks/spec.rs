//! Task specifications in TOML, strict (unknown keys are errors), and the built-in presets.
//!
//! ```toml
//! name = "arc_challenge"
//! kind = "multiple_choice"            # multiple_choice | generation | perplexity
//! [data]
//! path = "ARC-Challenge/test.jsonl"   # .jsonl or .parquet, relative to this file
//! on_error = "stop"                   # or "skip" (bad rows reported with file:line)
//! [data.fields]                       # evomerge_datasets::FieldMap
//! question = "question"
//! choices = "choices.text"
//! gold = "answerKey"
//! gold_kind = "letter"
//! [prompt]
//! template = "Question: {question}\nAnswer:"
//! choice = "{choice}"                 # continuation text of each choice
//! target_delimiter = " "
//! fewshot = 0                         # examples from fewshot_path or the data
//! fewshot_sampler = "per_item"        # drawn per item (seeded), or "first_n" (the same for all)
//! [metric]
//! name = "acc_norm"                   # acc | acc_norm | exact_match | perplexity | bits_per_byte
//! ```
//! Presets reproduce lm-eval-harness's prompt formats; the user supplies the data file.

use std::path::{Path, PathBuf};

use evomerge_datasets::{FieldMap, OnError};
use serde::{Deserialize, Serialize};

use super::error::SpecError;
use super::extract::{Extract, Normalize};

/// What the task measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Log-likelihood of each choice as continuation of the prompt (lm-eval `multiple_choice`).
    MultipleChoice,
    /// Greedy generation, answer extraction, exact match (lm-eval `generate_until`).
    Generation,
    /// Log-likelihood of the item's text itself (label-free; lm-eval `loglikelihood_rolling`).
    Perplexity,
}

/// The task's metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Choice with the highest log-likelihood is the gold one.
    Acc,
    /// Same with log-likelihood divided by the choice's length in characters.
    AccNorm,
    ExactMatch,
    /// exp(−Σ log p / Σ tokens).
    Perplexity,
    /// −Σ log₂ p / Σ UTF-8 bytes.
    BitsPerByte,
}

impl Metric {
    /// Whether larger is better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Acc | Metric::AccNorm | Metric::ExactMatch)
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
            Metric::ExactMatch => "exact_match",
            Metric::Perplexity => "perplexity",
            Metric::BitsPerByte => "bits_per_byte",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Dataset file; relative paths are relative to the spec file (or the current directory
    /// for presets). `evomerge eval --data` overrides it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    pub fields: FieldMap,
    #[serde(default = "stop")]
    pub on_error: OnError,
    /// Where few-shot examples come from (default: the data itself, never the item asked).
    #[serde(default)]
    pub fewshot_path: Option<PathBuf>,
}

fn stop() -> OnError {
    OnError::Stop
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    #[serde(default = "question")]
    pub template: String,
    /// Continuation of each choice (multiple choice).
    #[serde(default = "choice")]
    pub choice: String,
    /// Answer text of few-shot examples (default: the gold choice, or the gold text).
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default = "space")]
    pub target_delimiter: String,
    /// Multiple-input multiple choice (lm-eval's WinoGrande): when set, each choice goes into
    /// the context (`template` uses `{choice}`) and this template is the one continuation
    /// scored after every context, preceded by `target_delimiter`.
    #[serde(default)]
    pub continuation: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub fewshot: usize,
    #[serde(default = "fewshot_seed")]
    pub fewshot_seed: u64,
    /// How the few-shot examples are chosen ([`FewshotSampler`]).
    #[serde(default)]
    pub fewshot_sampler: FewshotSampler,
    #[serde(default = "two_newlines")]
    pub fewshot_delimiter: String,
    /// Clean-up applied to every rendered prompt and choice (lm-eval's per-task `preprocess`).
    #[serde(default)]
    pub preprocess: Preprocess,
    /// Prepend the tokenizer's special tokens (BOS) to every context. lm-eval's HF models
    /// default to no (`add_bos_token=False`); models trained with BOS want yes.
    #[serde(default)]
    pub add_bos: bool,
}

/// How an item's few-shot examples are chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FewshotSampler {
    /// Drawn per item from the pool, seeded by `fewshot_seed` and the item's index, so a
    /// result does not depend on which other items are scored. lm-eval's default sampler
    /// also draws at random per item (from one generator run in document order, so its draws
    /// differ from these); the presets that use it: arc_easy, arc_challenge, hellaswag,
    /// winogrande, gsm8k. Every item has its own prefix: nothing long to share.
    #[default]
    PerItem,
    /// The first `fewshot` examples of the pool for every item (lm-eval's `first_n` sampler,
    /// the `mmlu` preset's); where the pool is the data itself, an item among them is replaced
    /// by the next one, as lm-eval does. Every item starts with the same prefix, which then
    /// runs through the model once per candidate.
    FirstN,
}

/// A task's text clean-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    #[default]
    None,
    /// lm-eval's hellaswag `preprocess`: strip, " [title]" → ". ", drop `[...]`, "  " → " ".
    Hellaswag,
}

fn question() -> String {
    "{question}".into()
}
fn choice() -> String {
    "{choice}".into()
}
fn space() -> String {
    " ".into()
}
fn fewshot_seed() -> u64 {
    1234
}
fn two_newlines() -> String {
    "\n\n".into()
}

impl Default for PromptSpec {
    fn default() -> Self {
        Self {
            template: question(),
            choice: choice(),
            target: None,
            target_delimiter: space(),
            continuation: None,
            description: String::new(),
            fewshot: 0,
            fewshot_seed: fewshot_seed(),
            fewshot_sampler: FewshotSampler::PerItem,
            fewshot_delimiter: two_newlines(),
            preprocess: Preprocess::None,
            add_bos: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    #[serde(default = "max_new")]
    pub max_new_tokens: usize,
    /// Stop strings (the output is cut before the first).
    #[serde(default)]
    pub until: Vec<String>,
    #[serde(default = "no_extract")]
    pub extract: Extract,
}

fn max_new() -> usize {
    256
}
fn no_extract() -> Extract {
    Extract::None
}

impl Default for GenerationSpec {
    fn default() -> Self {
        Self { max_new_tokens: max_new(), until: vec![], extract: no_extract() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    pub name: Metric,
    #[serde(default, flatten)]
    pub normalize: Normalize,
}

/// A whole task file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub kind: Kind,
    pub data: DataSpec,
    #[serde(default)]
    pub prompt: PromptSpec,
    #[serde(default)]
    pub generation: GenerationSpec,
    pub metric: MetricSpec,
}

/// Built-in presets: lm-eval-harness's prompt formats (v0.4 task YAMLs).
pub const PRESETS: &[(&str, &str)] = &[
    ("arc_challenge", include_str!("../../tasks/arc_challenge.toml")),
    ("arc_easy", include_str!("../../tasks/arc_easy.toml")),
    ("mmlu", include_str!("../../tasks/mmlu.toml")),
    ("hellaswag", include_str!("../../tasks/hellaswag.toml")),
    ("gsm8k", include_str!("../../tasks/gsm8k.toml")),
    ("winogrande", include_str!("../../tasks/winogrande.toml")),
];

/// lm-eval-harness's `mgsm_direct_{lang}` (tasks/mgsm/direct, generated by its utils.py):
/// language, question prefix, answer cue. The test rows of juletxara/mgsm have no worked
/// answer, so the prompt is `{prefix} {question}\n{cue}` and the gold is `answer_number`;
/// greedy until the question prefix, leading whitespace removed, exact match ignoring case and
/// punctuation. Zero-shot, as lm-eval's default (its train-split exemplars carry the prefix in
/// the question and a worked answer: use a task file for few-shot).
pub const MGSM_DIRECT: &[(&str, &str, &str)] = &[
    ("bn", "\u{09aa}\u{09cd}\u{09b0}\u{09b6}\u{09cd}\u{09a8}:", "Answer:"),
    ("de", "Frage:", "Antwort:"),
    ("en", "Question:", "Answer:"),
    ("es", "Pregunta:", "Respuesta:"),
    ("fr", "Question :", "R\u{e9}ponse :"),
    ("ja", "\u{554f}\u{984c}\u{ff1a}", "Answer:"),
    ("ru", "\u{0417}\u{0430}\u{0434}\u{0430}\u{0447}\u{0430}:", "Answer:"),
    ("sw", "Swali:", "Answer:"),
    ("te", "\u{0c2a}\u{0c4d}\u{0c30}\u{0c36}\u{0c4d}\u{0c28}:", "Answer:"),
    ("th", "\u{0e42}\u{0e08}\u{0e17}\u{0e22}\u{0e4c}:", "Answer:"),
    ("zh", "\u{95ee}\u{9898}\u{ff1a}", "Answer:"),
];

/// The TOML of `mgsm_direct_{lang}` (see [`MGSM_DIRECT`]).
fn mgsm_direct(name: &str) -> Option<String> {
    let lang = name.strip_prefix("mgsm_direct_")?;
    let (_, q, a) = MGSM_DIRECT.iter().find(|(l, _, _)| *l == lang)?;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    Some(format!(
        "name = \"{name}\"\nkind = \"generation\"\n\
         [data.fields]\nquestion = \"question\"\ngold = \"answer_number\"\ngold_kind = \"text\"\n\
         [prompt]\ntemplate = \"{q} {{question}}\\n{a}\"\ntarget_delimiter = \"\"\n\
         [generation]\nmax_new_tokens = 256\nuntil = [\"{q}\", \"</s>\", \"<|im_end|>\"]\nextract = \"none\"\n\
         [metric]\nname = \"exact_match\"\nignore_case = true\nignore_punctuation = true\n",
        q = esc(q),
        a = esc(a)
    ))
}

/// Every preset's name (the fixed ones, then `mgsm_direct_{lang}`).
pub fn preset_names() -> Vec<String> {
    PRESETS.iter().map(|(n, _)| n.to_string()).chain(MGSM_DIRECT.iter().map(|(l, _, _)| format!("mgsm_direct_{l}"))).collect()
}

impl TaskSpec {
    /// Parses TOML text; `base` resolves relative data paths.
    pub fn parse(text: &str, base: Option<&Path>) -> Result<Self, SpecError> {
        let mut s: TaskSpec = toml::from_str(text).map_err(|e| SpecError::Toml(e.to_string()))?;
        if let Some(b) = base {
            for p in [&mut s.data.path, &mut s.data.fewshot_path].into_iter().flatten() {
                if p.is_relative() {
                    *p = b.join(&*p);
                }
            }
        }
        s.check()?;
        Ok(s)
    }

    /// A preset by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Self, SpecError> {
        let preset = |e: SpecError| SpecError::Preset { name: name_or_path.to_string(), reason: Box::new(e) };
        if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, None).map_err(preset);
        }
        if let Some(text) = mgsm_direct(name_or_path) {
            return Self::parse(&text, None).map_err(preset);
        }
        let path = Path::new(name_or_path);
        if !path.is_file() {
            return Err(SpecError::Unknown { name: name_or_path.to_string(), presets: preset_names().join(", ") });
        }
        let file = |reason: String| SpecError::File { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        Self::parse(&text, path.parent()).map_err(|e| file(e.to_string()))
    }

    fn check(&self) -> Result<(), SpecError> {
        let ok = match self.kind {
            Kind::MultipleChoice => matches!(self.metric.name, Metric::Acc | Metric::AccNorm),
            Kind::Generation => self.metric.name == Metric::ExactMatch,
            Kind::Perplexity => matches!(self.metric.name, Metric::Perplexity | Metric::BitsPerByte),
        };
        if !ok {
            return Err(SpecError::MetricKind { metric: self.metric.name.name().to_string(), kind: format!("{:?}", self.kind) });
        }
        if self.prompt.continuation.is_some() && self.kind != Kind::MultipleChoice {
            return Err(SpecError::ContinuationNeedsChoices);
        }
        if self.kind == Kind::MultipleChoice && self.data.fields.choices.is_none() {
            return Err(SpecError::NoChoices);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses() {
        for name in preset_names() {
            let s = TaskSpec::load(&name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.name, name);
        }
        let ja = TaskSpec::load("mgsm_direct_ja").expect("ja");
        assert_eq!(ja.prompt.template, "問題： {question}\nAnswer:");
        assert_eq!(ja.generation.until[0], "問題：");
        let fr = TaskSpec::load("mgsm_direct_fr").expect("fr");
        assert_eq!(fr.prompt.template, "Question : {question}\nRéponse :");
        assert_eq!(fr.prompt.target_delimiter, "");
        assert!(fr.metric.normalize.ignore_case && fr.metric.normalize.ignore_punctuation);
        assert!(TaskSpec::load("mgsm_direct_xx").is_err());
    }

    #[test]
    fn strict_keys_and_metric_kind_agreement() {
        let base = "name = 't'\nkind = 'generation'\n[data.fields]\nquestion = 'q'\ngold = 'a'\ngold_kind = 'text'\n";
        assert!(TaskSpec::parse(&format!("{base}[metric]\nname = 'exact_match'\n"), None).is_ok());
        let e = TaskSpec::parse(&format!("{base}[metric]\nname = 'acc'\n"), None).expect_err("acc on generation");
        assert!(matches!(e, SpecError::MetricKind { .. }), "{e}");
        let e = TaskSpec::parse(&format!("{base}[metric]\nname = 'exact_match'\n[prompt]\ntemplat = 'x'\n"), None).expect_err("typo");
        assert!(matches!(&e, SpecError::Toml(t) if t.contains("templat")), "{e}");
        let e = TaskSpec::load("arc_challeng").expect_err("unknown");
        assert!(matches!(&e, SpecError::Unknown { presets, .. } if presets.contains("arc_challenge")), "{e}");
    }
}
