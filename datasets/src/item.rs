//! One evaluation item.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gold {
    /// Index into `choices` (multiple choice).
    Choice(usize),
    /// Free text (generation tasks: exact match after normalization).
    Text(String),
}

/// A question with its choices (empty for generation tasks) and gold answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub question: String,
    pub choices: Vec<String>,
    pub gold: Gold,
    /// Further text fields a prompt template may use (`FieldMap::extra`: subject, context, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl Item {
    /// A text field by template name: `question`, `gold` (text answers), or an extra field.
    pub fn field(&self, name: &str) -> Option<&str> {
        match name {
            "question" => Some(&self.question),
            "gold" | "answer" => match &self.gold {
                Gold::Text(t) => Some(t),
                Gold::Choice(i) => self.choices.get(*i).map(String::as_str),
            },
            other => self.fields.get(other).map(String::as_str),
        }
    }
}
