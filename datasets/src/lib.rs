//! evomerge-datasets: task data as typed items.
//!
//! ```text
//! JSONL file ──(FieldMap: which field is question / choices / gold)──► Vec<Item>
//! synthetic::{arithmetic, reverse, sort_letters}(seed) ──► Splits { train, validation, test }
//! ```
//!
//! Built so far: the item type, the JSONL reader with a declarative field mapping (errors name
//! the file and line; skip or stop on bad rows), and the seeded synthetic generators used by the
//! demo model zoo. Parquet (HF datasets) and shipped sample sets come with the fitness issue.

pub mod item;
pub mod jsonl;
pub mod synthetic;

pub use item::{Gold, Item};
pub use jsonl::{DatasetError, FieldMap, GoldKind, OnError, RowError, read_jsonl};
pub use synthetic::Splits;
