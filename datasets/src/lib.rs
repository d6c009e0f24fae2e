//! evomerge-datasets: task data as typed items.
//!
//! ```text
//! JSONL / parquet file ──(FieldMap: which field is question / choices / gold / extra)──► Vec<Item>
//! synthetic::{arithmetic, reverse, sort_letters}(seed) ──► Splits { train, validation, test }
//! ```
//!
//! The item type, JSONL and parquet readers with one declarative field mapping (errors name the
//! file and line/row; skip or stop on bad rows), and the seeded synthetic generators used by
//! the demo model zoo.

pub mod item;
pub mod jsonl;
pub mod parquet;
pub mod synthetic;

use std::path::Path;

pub use item::{Gold, Item};
pub use jsonl::{Choices, DatasetError, FieldMap, GoldKind, OnError, RowError, RowProblem, read_jsonl};
pub use parquet::read_parquet;

/// Reads a dataset file by its extension: `.jsonl` / `.json` (JSON Lines) or `.parquet`.
pub fn read_items(path: &Path, map: &FieldMap, on_error: OnError) -> Result<(Vec<Item>, Vec<RowError>), DatasetError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_parquet(path, map, on_error),
        Some("jsonl" | "json") => read_jsonl(path, map, on_error),
        other => Err(DatasetError::Format {
            path: path.to_path_buf(),
            reason: format!("unknown dataset format '{}' (use .jsonl or .parquet)", other.unwrap_or("")),
        }),
    }
}
pub use synthetic::Splits;
