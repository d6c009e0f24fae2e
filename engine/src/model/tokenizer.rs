//! Tokenization with the `tokenizers` crate from a model's `tokenizer.json`.
//!
//! Special tokens follow the tokenizer's own post-processor, as `AutoTokenizer` does: a
//! `TemplateProcessing` that prepends `<s>` (Llama) adds BOS when `add_special_tokens` is on; a
//! Qwen tokenizer adds nothing. Continuations for log-likelihood scoring are encoded without
//! special tokens (lm-eval-harness).

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// A loaded `tokenizer.json`.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(EngineError::Tokenizer { path: path.to_path_buf(), reason: "file not found".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| EngineError::Tokenizer { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Self { inner, path: path.to_path_buf() })
    }

    fn err(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tokenizer { path: self.path.clone(), reason: e.to_string() }
    }

    /// Token ids of `text`; `special` adds the post-processor's special tokens (BOS).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, special).map_err(|e| self.err(e))?.get_ids().to_vec())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| self.err(e))
    }

    /// The text of one token (as the vocabulary spells it, e.g. `Ġthe`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
