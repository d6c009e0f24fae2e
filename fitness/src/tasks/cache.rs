//! Per-(weights, task, item) results: no item is scored twice for the same weights.

#[allow(unused_imports)]
use super::*;

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
