//! One evaluation item.

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
}
