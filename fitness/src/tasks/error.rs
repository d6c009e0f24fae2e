//! Why a task file, template or item cannot be used. [`super::TaskError::Spec`] wraps it with
//! the task's name; the message names the template, item, field or file.

use std::path::PathBuf;

/// Errors of task specs, templates, extraction and items.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("template '{template}': unknown filter '{filter}' (before:TEXT, after:TEXT, trim, capitalize)")]
    UnknownFilter { template: String, filter: String },
    /// A `before:` / `after:` filter's marker is not in the value.
    #[error("'{marker}' not found in \"{value}\"")]
    MarkerNotFound { marker: String, value: String },
    #[error("template '{0}': unclosed '{{'")]
    Unclosed(String),
    #[error("template '{0}': empty placeholder '{{}}'")]
    EmptyPlaceholder(String),
    #[error("template '{0}': unmatched '}}' (write '}}}}' for a literal brace)")]
    Unmatched(String),
    /// A placeholder names a field the item lacks; `known` lists the ones it has.
    #[error("template '{template}': item '{item}' has no field '{field}' (fields: {known})")]
    NoField { template: String, item: String, field: String, known: String },
    /// A filter failed on an item's field.
    #[error("template '{template}': item '{item}', field '{field}': {reason}")]
    Filter { template: String, item: String, field: String, reason: Box<SpecError> },
    /// A regular expression of the task file does not compile.
    #[error("{what} '{pattern}': {reason}")]
    Regex { what: &'static str, pattern: String, reason: String },
    /// The task TOML does not parse.
    #[error("{0}")]
    Toml(String),
    #[error("preset '{name}': {reason}")]
    Preset { name: String, reason: Box<SpecError> },
    #[error("task '{name}' is neither a file nor a preset ({presets})")]
    Unknown { name: String, presets: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("metric '{metric}' does not apply to a {kind} task")]
    MetricKind { metric: String, kind: String },
    #[error("prompt.continuation (choices in the context) needs a multiple_choice task")]
    ContinuationNeedsChoices,
    #[error("a multiple_choice task needs data.fields.choices")]
    NoChoices,
    #[error("gold choice out of range")]
    GoldOutOfRange,
    #[error("no data file: give `--data FILE` (or data.path in the task file)")]
    NoData,
    #[error("{asked} few-shot examples asked, {available} available")]
    FewShot { asked: usize, available: usize },
    #[error("item '{0}': a generation task needs a text gold answer (gold_kind = \"text\")")]
    GenerationNeedsText(String),
    #[error("item '{0}': the text encodes to zero tokens")]
    NoTokens(String),
    #[error("item id '{0}' is not unique: map an id field")]
    DuplicateId(String),
    /// An estimator that cannot be built for this task as configured.
    #[error("{0}")]
    Estimator(String),
}
