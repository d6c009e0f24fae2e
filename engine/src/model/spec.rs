//! What the runtime needs to build a model: [`ModelSpec`] (config + architecture + tensors) and
//! the derived [`Dims`] / per-layer attention kind.

use serde_json::Value;

use crate::arch::Architecture;
use crate::error::{EngineError, Result};
use crate::io::{Checkpoint, ModelConfig};
use crate::source::TensorSource;

/// A model to load: its config, architecture and a source of its tensors (a checkpoint
/// directory or tensors a merge produced in memory).
#[derive(Clone, Copy)]
pub struct ModelSpec<'a> {
    pub label: &'a str,
    pub config: &'a ModelConfig,
    pub arch: &'static Architecture,
    pub tensors: &'a dyn TensorSource,
}

impl std::fmt::Debug for ModelSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSpec").field("label", &self.label).field("arch", &self.arch.name).finish()
    }
}

impl<'a> ModelSpec<'a> {
    pub fn from_checkpoint(ck: &'a Checkpoint) -> Self {
        Self { label: ck.label(), config: &ck.config, arch: ck.arch, tensors: ck }
    }
}

/// Shapes shared by every model in one runtime (layers of different models can only be mixed
/// when these agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
}

impl Dims {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate: cfg.intermediate_size,
            vocab: cfg.vocab_size,
        }
    }
}

/// Checks what the forward pass supports, with the model named in the error.
pub(crate) fn check_supported(spec: &ModelSpec<'_>) -> Result<()> {
    let cfg = spec.config;
    let unsupported = |reason: String| EngineError::UnsupportedModel { model: spec.label.to_string(), reason };
    let act = cfg.raw.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
    if !matches!(act, "silu" | "swish") {
        return Err(unsupported(format!("activation '{act}' is not supported (supported: silu)")));
    }
    if cfg.num_key_value_heads == 0 || !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
        return Err(unsupported(format!(
            "{} attention heads are not a multiple of {} key/value heads",
            cfg.num_attention_heads, cfg.num_key_value_heads
        )));
    }
    if !cfg.head_dim.is_multiple_of(2) {
        return Err(unsupported(format!("head_dim {} is odd (RoPE needs pairs)", cfg.head_dim)));
    }
    Ok(())
}

/// Sliding-window size of layer `layer`, or `None` for full causal attention.
///
/// transformers 5 writes `layer_types`; older configs: Mistral slides on every layer when
/// `sliding_window` is set; Qwen2/Qwen3 only with `use_sliding_window` and from layer
/// `max_window_layers` on.
pub(crate) fn sliding_window(cfg: &ModelConfig, arch: &Architecture, layer: usize) -> Option<usize> {
    let window = cfg.sliding_window?;
    if let Some(types) = cfg.raw.get("layer_types").and_then(Value::as_array) {
        return (types.get(layer).and_then(Value::as_str) == Some("sliding_attention")).then_some(window);
    }
    match arch.name.as_str() {
        "mistral" => Some(window),
        "qwen2" | "qwen3" => {
            let from = cfg.raw.get("max_window_layers").and_then(Value::as_u64).map_or(usize::MAX, |v| v as usize);
            (layer >= from).then_some(window)
        }
        _ => None,
    }
}
