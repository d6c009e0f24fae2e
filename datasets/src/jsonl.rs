//! JSON Lines datasets with a declarative field mapping.
//!
//! ```toml
//! [fields]            # FieldMap, e.g. for ARC-style rows
//! id = "id"
//! question = "question"
//! choices = "choices.text"   # dotted paths reach into nested objects; or one column per
//!                            # choice: choices = ["option1", "option2"] (WinoGrande)
//! gold = "answerKey"
//! gold_kind = "letter"       # index | letter | text | choice_text
//! ```
//!
//! Every bad row is reported with its file and line; [`OnError::Skip`] collects them and goes
//! on, [`OnError::Stop`] returns the first. A gold answer that cannot be parsed (a letter past the
//! choices, an index out of range) is a bad row, never a silently wrong item.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::item::{Gold, Item};

/// How the gold field encodes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoldKind {
    /// 0-based index into the choices (a number or a numeric string).
    Index,
    /// "A", "B", ... (or "1", "2", ... as some datasets write them: 1-based).
    Letter,
    /// Free text answer (generation).
    Text,
    /// The text of the correct choice.
    ChoiceText,
}

/// Which JSON field holds what (dotted paths for nested fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMap {
    /// Defaults to the 1-based line number.
    #[serde(default)]
    pub id: Option<String>,
    pub question: String,
    /// Where the choices are; absent for generation tasks.
    #[serde(default)]
    pub choices: Option<Choices>,
    pub gold: String,
    pub gold_kind: GoldKind,
    /// More fields to keep for prompt templates (dotted paths; the template name is the path).
    #[serde(default)]
    pub extra: Vec<String>,
}

/// The choices of a row: one field holding an array of strings, or one field per choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Choices {
    Array(String),
    Columns(Vec<String>),
}

/// What to do with a bad row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    Skip,
    Stop,
}

/// A row that could not become an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct RowError {
    pub path: PathBuf,
    pub line: usize,
    pub reason: RowProblem,
}

/// What is wrong with a row (the field mapping's names are quoted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowProblem {
    /// The row is not JSON (or, in a parquet file, cannot be read): the parser's message.
    #[error("{0}")]
    Unreadable(String),
    #[error("missing field '{0}'")]
    MissingField(String),
    #[error("field '{0}' is not text")]
    NotText(String),
    #[error("field '{0}' is not an array")]
    NotAnArray(String),
    #[error("a choice in '{0}' is not text")]
    ChoiceNotText(String),
    #[error("choice field '{0}' is not text")]
    ChoiceFieldNotText(String),
    #[error("field '{0}' is not text or a number")]
    GoldNotText(String),
    #[error("gold '{gold}' is past the {choices} choices")]
    GoldPastChoices { gold: String, choices: usize },
    #[error("gold '{0}' is not an index")]
    NotAnIndex(String),
    #[error("gold '{0}' is not a letter")]
    NotALetter(String),
    #[error("gold '{0}' is not one of the choices")]
    NotAChoice(String),
    #[error("no choices")]
    NoChoices,
}

/// Errors of the dataset readers.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Row(#[from] RowError),
    #[error("{0}: no items")]
    Empty(PathBuf),
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Collects items from numbered rows, applying `on_error` (shared by the JSONL and parquet
/// readers; `line` is the 1-based line or row number).
pub(crate) fn collect_rows(
    path: &Path,
    rows: impl Iterator<Item = (usize, Result<Value, RowProblem>)>,
    map: &FieldMap,
    on_error: OnError,
) -> Result<(Vec<Item>, Vec<RowError>), DatasetError> {
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (line, row) in rows {
        match row.and_then(|r| item_from_row(&r, map, line)) {
            Ok(item) => items.push(item),
            Err(reason) => {
                let e = RowError { path: path.to_path_buf(), line, reason };
                match on_error {
                    OnError::Stop => return Err(e.into()),
                    OnError::Skip => skipped.push(e),
                }
            }
        }
    }
    if items.is_empty() {
        return Err(DatasetError::Empty(path.to_path_buf()));
    }
    Ok((items, skipped))
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Builds an item from one parsed row.
pub fn item_from_row(row: &Value, map: &FieldMap, line: usize) -> Result<Item, RowProblem> {
    let field = |p: &str| lookup(row, p).ok_or_else(|| RowProblem::MissingField(p.to_string()));
    let question = as_text(field(&map.question)?).ok_or_else(|| RowProblem::NotText(map.question.clone()))?;
    let choices: Vec<String> = match &map.choices {
        None => vec![],
        Some(Choices::Array(p)) => field(p)?
            .as_array()
            .ok_or_else(|| RowProblem::NotAnArray(p.clone()))?
            .iter()
            .map(|c| as_text(c).ok_or_else(|| RowProblem::ChoiceNotText(p.clone())))
            .collect::<Result<_, _>>()?,
        Some(Choices::Columns(ps)) => {
            ps.iter().map(|p| as_text(field(p)?).ok_or_else(|| RowProblem::ChoiceFieldNotText(p.clone()))).collect::<Result<_, _>>()?
        }
    };
    let raw = as_text(field(&map.gold)?).ok_or_else(|| RowProblem::GoldNotText(map.gold.clone()))?;
    let in_range = |i: usize| {
        if i < choices.len() { Ok(Gold::Choice(i)) } else { Err(RowProblem::GoldPastChoices { gold: raw.clone(), choices: choices.len() }) }
    };
    let gold = match map.gold_kind {
        GoldKind::Text => Gold::Text(raw.clone()),
        GoldKind::Index => in_range(raw.trim().parse::<usize>().map_err(|_| RowProblem::NotAnIndex(raw.clone()))?)?,
        GoldKind::Letter => {
            let t = raw.trim();
            let i = match (t.len(), t.chars().next()) {
                (1, Some(c)) if c.is_ascii_uppercase() => c as usize - 'A' as usize,
                _ => t.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).ok_or_else(|| RowProblem::NotALetter(raw.clone()))?,
            };
            in_range(i)?
        }
        GoldKind::ChoiceText => in_range(choices.iter().position(|c| c == &raw).ok_or_else(|| RowProblem::NotAChoice(raw.clone()))?)?,
    };
    if map.choices.is_some() && choices.is_empty() {
        return Err(RowProblem::NoChoices);
    }
    let id = match &map.id {
        Some(p) => as_text(field(p)?).ok_or_else(|| RowProblem::NotText(p.clone()))?,
        None => line.to_string(),
    };
    let mut fields = std::collections::BTreeMap::new();
    for p in &map.extra {
        let v = as_text(field(p)?).ok_or_else(|| RowProblem::NotText(p.clone()))?;
        fields.insert(p.clone(), v);
    }
    Ok(Item { id, question, choices, gold, fields })
}

/// Reads a JSONL file; returns the items and (with [`OnError::Skip`]) the skipped rows.
pub fn read_jsonl(path: &Path, map: &FieldMap, on_error: OnError) -> Result<(Vec<Item>, Vec<RowError>), DatasetError> {
    let f = std::fs::File::open(path).map_err(|err| DatasetError::Io { path: path.to_path_buf(), err })?;
    let mut lines = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let text = line.map_err(|err| DatasetError::Io { path: path.to_path_buf(), err })?;
        if !text.trim().is_empty() {
            lines.push((i + 1, serde_json::from_str::<Value>(&text).map_err(|e| RowProblem::Unreadable(format!("invalid JSON: {e}")))));
        }
    }
    collect_rows(path, lines.into_iter(), map, on_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kind: GoldKind, choices: Option<&str>) -> FieldMap {
        FieldMap {
            id: Some("id".into()),
            question: "q".into(),
            choices: choices.map(|c| Choices::Array(c.into())),
            gold: "a".into(),
            gold_kind: kind,
            extra: vec![],
        }
    }

    fn write(lines: &[&str]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), lines.join("\n")).expect("write");
        f
    }

    #[test]
    fn reads_every_gold_kind() {
        let f = write(&[
            r#"{"id": "1", "q": "2+2?", "c": {"text": ["3", "4"]}, "a": "B"}"#,
            r#"{"id": 2, "q": "1+1?", "c": {"text": ["2", "5"]}, "a": "1"}"#,
        ]);
        let (items, skipped) = read_jsonl(f.path(), &map(GoldKind::Letter, Some("c.text")), OnError::Stop).expect("read");
        assert!(skipped.is_empty());
        assert_eq!(items[0].gold, Gold::Choice(1));
        assert_eq!(items[1].gold, Gold::Choice(0), "numeric letters are 1-based");
        assert_eq!(items[1].id, "2");
        let f = write(&[r#"{"id": "x", "q": "2+2?", "c": ["3", "4"], "a": "4"}"#]);
        let (items, _) = read_jsonl(f.path(), &map(GoldKind::ChoiceText, Some("c")), OnError::Stop).expect("read");
        assert_eq!(items[0].gold, Gold::Choice(1));
        let (items, _) = read_jsonl(f.path(), &map(GoldKind::Text, None), OnError::Stop).expect("read");
        assert_eq!(items[0].gold, Gold::Text("4".into()));
    }

    #[test]
    fn choices_from_one_column_each() {
        // WinoGrande rows: option1 / option2, answer "1" / "2"
        let f = write(&[
            r#"{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup", "option2": "the table", "answer": "2"}"#,
        ]);
        let m: FieldMap =
            toml::from_str("question = 'sentence'\nchoices = ['option1', 'option2']\ngold = 'answer'\ngold_kind = 'letter'\n").expect("map");
        assert_eq!(m.choices, Some(Choices::Columns(vec!["option1".into(), "option2".into()])));
        let (items, _) = read_jsonl(f.path(), &m, OnError::Stop).expect("read");
        assert_eq!(items[0].choices, vec!["the cup", "the table"]);
        assert_eq!(items[0].gold, Gold::Choice(1));
        let bad: FieldMap =
            toml::from_str("question = 'sentence'\nchoices = ['option1', 'option3']\ngold = 'answer'\ngold_kind = 'letter'\n").expect("map");
        let e = read_jsonl(f.path(), &bad, OnError::Stop).expect_err("missing column").to_string();
        assert!(e.contains("missing field 'option3'"), "{e}");
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let f = write(&[
            r#"{"id": "1", "q": "ok", "c": ["a", "b"], "a": 1}"#,
            r#"{"id": "2", "q": "bad gold", "c": ["a", "b"], "a": 5}"#,
            r#"not json"#,
            r#"{"id": "4", "c": ["a"], "a": 0}"#,
        ]);
        let m = map(GoldKind::Index, Some("c"));
        let (items, skipped) = read_jsonl(f.path(), &m, OnError::Skip).expect("skip");
        assert_eq!(items.len(), 1);
        let lines: Vec<usize> = skipped.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert_eq!(skipped[0].reason, RowProblem::GoldPastChoices { gold: "5".into(), choices: 2 }, "{}", skipped[0]);
        assert_eq!(skipped[2].reason, RowProblem::MissingField("q".into()), "{}", skipped[2]);
        let err = read_jsonl(f.path(), &m, OnError::Stop).expect_err("stop").to_string();
        assert!(err.contains(&format!("{}:2:", f.path().display())), "{err}");
    }

    #[test]
    fn empty_files_and_unknown_mapping_keys_are_errors() {
        let f = write(&[""]);
        assert!(matches!(read_jsonl(f.path(), &map(GoldKind::Text, None), OnError::Skip), Err(DatasetError::Empty(_))));
        let e = toml::from_str::<FieldMap>("question = 'q'\ngold = 'a'\ngold_kind = 'text'\nchoises = 'c'\n").expect_err("typo");
        assert!(e.to_string().contains("choises"), "{e}");
    }
}
