//! `config.json` of a Hugging Face causal LM, in both transformers-4 and transformers-5 form.
//!
//! transformers 5 moved `rope_theta` / `rope_scaling` into `rope_parameters` and renamed
//! `torch_dtype` to `dtype`; Hub checkpoints use either. The raw JSON object is kept (key order
//! preserved) so that an exported model's config is the donor's with only the keys evomerge
//! changes (layer count, dtype) rewritten.

use std::path::Path;

use serde_json::{Map, Value};

use crate::dtype::DType;
use crate::error::{EngineError, Result};

/// RoPE frequency scaling as configured (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The parsed fields evomerge needs, plus the raw object.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub raw: Map<String, Value>,
    pub model_type: String,
    pub architectures: Vec<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    pub attention_bias: bool,
    /// The checkpoint dtype (`dtype` or `torch_dtype`), if stated.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(m: &Map<String, Value>, k: &str) -> Option<usize> {
    m.get(k).and_then(Value::as_u64).map(|v| v as usize)
}

fn get_f64(m: &Map<String, Value>, k: &str) -> Option<f64> {
    m.get(k).and_then(Value::as_f64)
}

/// An optional non-negative integer key: absent or `null` is `None`; any other type is an
/// error (not silently the default).
fn opt_usize(m: &Map<String, Value>, k: &str) -> std::result::Result<Option<usize>, ConfigError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| ConfigError::WrongType { key: k.to_string(), expected: "a non-negative integer" })
        }
    }
}

/// An optional number key, as [`opt_usize`].
fn opt_f64(m: &Map<String, Value>, k: &str) -> std::result::Result<Option<f64>, ConfigError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| ConfigError::WrongType { key: k.to_string(), expected: "a number" }),
    }
}

/// Why a `config.json` cannot be used (wrapped with its path in [`EngineError::BadJson`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("missing integer key '{0}'")]
    MissingInteger(String),
    #[error("missing key 'model_type'")]
    NoModelType,
    #[error("num_attention_heads is 0")]
    NoHeads,
    #[error("unsupported dtype '{0}'")]
    UnsupportedDtype(String),
    #[error("rope scaling '{0}' needs 'factor'")]
    RopeFactor(String),
    #[error("unsupported rope scaling type '{0}' (supported: default, linear, llama3)")]
    RopeType(String),
    /// A key of the wrong JSON type (a string where a number belongs, say).
    #[error("'{key}' must be {expected}")]
    WrongType { key: String, expected: &'static str },
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        Self::parse(&text).map_err(|e| EngineError::BadJson { path, reason: e.to_string() })
    }

    /// Parses the text of a `config.json`.
    pub fn parse(text: &str) -> std::result::Result<Self, ConfigError> {
        let raw: Map<String, Value> = serde_json::from_str(text).map_err(|e| ConfigError::InvalidJson(e.to_string()))?;
        let need = |k: &str| get_usize(&raw, k).ok_or_else(|| ConfigError::MissingInteger(k.to_string()));
        let model_type = raw.get("model_type").and_then(Value::as_str).ok_or(ConfigError::NoModelType)?.to_string();
        let architectures = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(ConfigError::NoHeads);
        }
        let head_dim = opt_usize(&raw, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        // transformers 5: rope_parameters {rope_theta, rope_type, factor, ...};
        // transformers 4: top-level rope_theta + optional rope_scaling {type|rope_type, ...}.
        let rope_params = raw.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = rope_params.and_then(|p| get_f64(p, "rope_theta")).or_else(|| get_f64(&raw, "rope_theta")).unwrap_or(10000.0);
        let scaling_obj = raw.get("rope_scaling").and_then(Value::as_object).or(rope_params);
        let rope_scaling = match scaling_obj {
            Some(s) => parse_rope_scaling(s)?,
            None => None,
        };
        let dtype = match raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(Value::as_str) {
            Some(s) => Some(DType::parse(s).ok_or_else(|| ConfigError::UnsupportedDtype(s.to_string()))?),
            None => None,
        };
        let eos_token_ids = match raw.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => vec![],
        };
        let use_sliding = raw.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(true);
        Ok(Self {
            model_type,
            architectures,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: opt_usize(&raw, "num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            vocab_size: need("vocab_size")?,
            max_position_embeddings: opt_usize(&raw, "max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: opt_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            sliding_window: get_usize(&raw, "sliding_window").filter(|_| use_sliding),
            attention_bias: raw.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            dtype,
            bos_token_id: get_usize(&raw, "bos_token_id").map(|v| v as u32),
            eos_token_ids,
            raw,
        })
    }

    /// The token that stands for an empty context in log-likelihood scoring (lm-eval's
    /// prefix token): BOS, else the first EOS, else 0.
    pub fn prefix_token(&self) -> u32 {
        self.bos_token_id.or_else(|| self.eos_token_ids.first().copied()).unwrap_or(0)
    }

    /// The config as it should be written for a merged model with `layers` layers and `dtype`.
    ///
    /// The key that carried the dtype is kept (`dtype` for transformers 5, `torch_dtype` for 4;
    /// `dtype` when neither was present).
    pub fn to_output_json(&self, layer_count_key: &str, layers: usize, dtype: DType) -> Value {
        let mut raw = self.raw.clone();
        raw.insert(layer_count_key.to_string(), Value::from(layers));
        let key = if raw.contains_key("torch_dtype") && !raw.contains_key("dtype") { "torch_dtype" } else { "dtype" };
        raw.insert(key.to_string(), Value::from(dtype.hf_name()));
        Value::Object(raw)
    }
}

fn parse_rope_scaling(s: &Map<String, Value>) -> std::result::Result<Option<RopeScaling>, ConfigError> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || get_f64(s, "factor").ok_or_else(|| ConfigError::RopeFactor(kind.to_string()));
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: get_f64(s, "low_freq_factor").unwrap_or(1.0),
            high_freq_factor: get_f64(s, "high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: get_usize(s, "original_max_position_embeddings").unwrap_or(8192),
        })),
        other => Err(ConfigError::RopeType(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,
        "vocab_size":300,"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},"dtype":"float32"}"#;
    const V4: &str = r#"{"architectures":["Qwen2ForCausalLM"],"model_type":"qwen2","hidden_size":896,
        "intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
        "vocab_size":151936,"rope_theta":1000000.0,"torch_dtype":"bfloat16","tie_word_embeddings":true,
        "rope_scaling":{"type":"linear","factor":2.0},"eos_token_id":[151643,151645]}"#;

    #[test]
    fn reads_transformers_5_keys() {
        let c = ModelConfig::parse(V5).expect("parse");
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.dtype, Some(DType::F32));
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn reads_transformers_4_keys() {
        let c = ModelConfig::parse(V4).expect("parse");
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.dtype, Some(DType::BF16));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        assert_eq!(c.eos_token_ids, vec![151643, 151645]);
    }

    #[test]
    fn output_json_keeps_the_dtype_key_style() {
        let c = ModelConfig::parse(V4).expect("parse");
        let out = c.to_output_json("num_hidden_layers", 6, DType::F16);
        assert_eq!(out["torch_dtype"], "float16");
        assert!(out.get("dtype").is_none());
        assert_eq!(out["num_hidden_layers"], 6);
        let c = ModelConfig::parse(V5).expect("parse");
        assert_eq!(c.to_output_json("num_hidden_layers", 4, DType::BF16)["dtype"], "bfloat16");
    }

    #[test]
    fn keys_of_the_wrong_type_are_errors_not_defaults() {
        let mut cfg: Map<String, Value> = serde_json::from_str(V5).expect("json");
        cfg.insert("rms_norm_eps".into(), Value::String("1e-6".into()));
        let err = ModelConfig::parse(&Value::Object(cfg.clone()).to_string()).expect_err("string eps");
        assert_eq!(err, ConfigError::WrongType { key: "rms_norm_eps".into(), expected: "a number" });
        cfg.insert("rms_norm_eps".into(), Value::Null);
        cfg.insert("max_position_embeddings".into(), serde_json::json!(-5));
        let err = ModelConfig::parse(&Value::Object(cfg.clone()).to_string()).expect_err("negative");
        assert!(err.to_string().contains("'max_position_embeddings' must be a non-negative integer"), "{err}");
        cfg.remove("max_position_embeddings");
        assert_eq!(ModelConfig::parse(&Value::Object(cfg).to_string()).expect("null is absent").rms_norm_eps, 1e-6);
    }

    #[test]
    fn missing_keys_are_named() {
        let err = ModelConfig::parse(r#"{"model_type":"llama"}"#).expect_err("bad");
        assert_eq!(err, ConfigError::MissingInteger("hidden_size".into()));
    }
}
