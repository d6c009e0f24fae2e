//! Checkpoints opened once and shared: every plan a search builds reads its sources through
//! one [`OpenedCheckpoints`], so no candidate re-opens (re-maps, re-validates) a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::{Checkpoint, resolve_model};
use crate::error::Result;

/// A model reference and the folder it is resolved against.
type Key = (String, Option<PathBuf>);

/// Opened, validated checkpoints keyed by reference and the folder it was resolved against.
/// Thread-safe: plans may be built on several workers at once.
#[derive(Debug, Default)]
pub struct OpenedCheckpoints {
    opened: Mutex<HashMap<Key, Arc<Checkpoint>>>,
}

impl OpenedCheckpoints {
    /// The checkpoint `reference` names (resolved as [`resolve_model`] does), opened and
    /// validated on first use.
    pub fn get(&self, reference: &str, base_dir: Option<&Path>) -> Result<Arc<Checkpoint>> {
        let key = (reference.to_string(), base_dir.map(Path::to_path_buf));
        if let Some(ck) = self.opened.lock().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return Ok(ck.clone());
        }
        // Opened outside the lock: a first open maps and checks every shard header.
        let ck = Checkpoint::open(&resolve_model(reference, base_dir)?, reference.to_string())?;
        ck.validate()?;
        let mut map = self.opened.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.entry(key).or_insert_with(|| Arc::new(ck)).clone())
    }

    /// How many checkpoints are open.
    pub fn len(&self) -> usize {
        self.opened.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none is open yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_model_is_an_error_and_nothing_is_cached() {
        let opened = OpenedCheckpoints::default();
        assert!(opened.get("/nonexistent/model/dir", None).is_err());
        assert!(opened.is_empty());
    }
}
