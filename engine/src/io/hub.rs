//! Resolving a model reference to a local checkpoint directory.
//!
//! A reference is either a path (absolute, or relative to the current directory, or relative to
//! a base directory such as the recipe's folder) or a Hugging Face hub id `org/name` with an
//! optional `@revision`. Hub ids are looked up in the standard HF cache layout
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`:
//! `models--org--name/refs/<rev>` → `snapshots/<commit>/`) through the `hf-hub` crate's
//! [`hf_hub::Cache`]. evomerge never downloads at run time: a model that is not cached is an
//! error that says how to fetch it. `HF_HUB_OFFLINE` is therefore always honoured; it only
//! changes the wording of the hint.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// The hub cache directory from the environment, as `huggingface_hub` computes it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache").join("huggingface").join("hub")
}

fn looks_like_hub_id(s: &str) -> bool {
    let id = s.split('@').next().unwrap_or(s);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !p.starts_with('.'))
}

/// Resolves `reference` to a directory containing `config.json`.
///
/// Local paths win over hub ids (a folder `org/name` next to the recipe is used as is).
pub fn resolve_model(reference: &str, base_dir: Option<&Path>) -> Result<PathBuf> {
    let p = Path::new(reference);
    let mut candidates = vec![p.to_path_buf()];
    if let Some(b) = base_dir.filter(|_| p.is_relative()) {
        candidates.push(b.join(p));
    }
    for c in &candidates {
        if c.is_dir() {
            return Ok(c.clone());
        }
    }
    if !looks_like_hub_id(reference) {
        let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
        return Err(EngineError::ModelNotFound { model: reference.to_string(), reason: format!("no such directory (tried {})", tried.join(", ")) });
    }
    resolve_in_cache(reference, &hub_cache_dir())
}

/// Looks a hub id (`org/name[@revision]`) up in the cache rooted at `cache_dir`.
pub fn resolve_in_cache(reference: &str, cache_dir: &Path) -> Result<PathBuf> {
    let (id, rev) = match reference.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (reference, "main"),
    };
    let repo = hf_hub::Repo::with_revision(id.to_string(), hf_hub::RepoType::Model, rev.to_string());
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    match cache.repo(repo).get("config.json") {
        Some(cfg) => Ok(cfg.parent().map(Path::to_path_buf).unwrap_or_default()),
        None => {
            let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v != "0" && !v.is_empty());
            Err(EngineError::ModelNotFound {
                model: reference.to_string(),
                reason: format!(
                    "not a local directory and not in the Hugging Face cache {} (revision '{rev}'){}; \
                     evomerge runs offline: fetch it first, e.g. `huggingface-cli download {id}`",
                    cache_dir.display(),
                    if offline { ", HF_HUB_OFFLINE is set" } else { "" }
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognized() {
        assert!(looks_like_hub_id("Qwen/Qwen2-0.5B"));
        assert!(looks_like_hub_id("org/name@v1.0"));
        assert!(!looks_like_hub_id("models/a/b"));
        assert!(!looks_like_hub_id("./x"));
        assert!(!looks_like_hub_id("../x/y"));
    }

    #[test]
    fn resolves_a_cached_snapshot() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = tmp.path().join("models--org--tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).expect("mkdir");
        std::fs::create_dir_all(repo.join("refs")).expect("mkdir");
        std::fs::write(repo.join("refs").join("main"), "abc123").expect("write");
        std::fs::write(snap.join("config.json"), "{}").expect("write");
        assert_eq!(resolve_in_cache("org/tiny", tmp.path()).expect("resolve"), snap);
        let err = resolve_in_cache("org/other", tmp.path()).expect_err("missing");
        assert!(err.to_string().contains("huggingface-cli download org/other"), "{err}");
    }
}
