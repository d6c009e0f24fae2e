//! Parquet datasets (how the Hugging Face hub stores datasets: `data/*.parquet` in a snapshot).
//!
//! Rows are read with the `parquet` crate's record API and turned into JSON values, so the same
//! [`FieldMap`] (dotted paths, gold kinds) and the same bad-row handling as JSONL apply; a bad
//! row is reported as `file:row` (1-based).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::item::Item;
use crate::jsonl::{DatasetError, FieldMap, OnError, RowError, RowProblem, collect_rows};

/// Reads every row of a parquet file.
pub fn read_parquet(path: &Path, map: &FieldMap, on_error: OnError) -> Result<(Vec<Item>, Vec<RowError>), DatasetError> {
    let f = std::fs::File::open(path).map_err(|err| DatasetError::Io { path: path.to_path_buf(), err })?;
    let fmt = |e: parquet::errors::ParquetError| DatasetError::Format { path: path.to_path_buf(), reason: e.to_string() };
    let reader = SerializedFileReader::new(f).map_err(fmt)?;
    let rows: Vec<(usize, Result<Value, RowProblem>)> = reader
        .get_row_iter(None)
        .map_err(fmt)?
        .enumerate()
        .map(|(i, r)| (i + 1, r.map(|row| row.to_json_value()).map_err(|e| RowProblem::Unreadable(format!("unreadable row: {e}")))))
        .collect();
    collect_rows(path, rows.into_iter(), map, on_error)
}
