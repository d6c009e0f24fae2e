//! Architectures as data.
//!
//! Each supported architecture is a TOML file in `engine/arch/` (embedded at build time): the
//! weight-name templates with `{layer}`, which section each weight belongs to (`pre` = before
//! the layers, `layer`, `post` = after), which weights are embeddings (vocab-sized), which are
//! tied, and the config key that holds the layer count. Adding an architecture whose forward
//! pass is already implemented is adding a data file here.

use std::sync::OnceLock;

use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::io::ModelConfig;

/// Where a weight sits relative to the decoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Pre,
    Layer,
    Post,
}

/// One weight of an architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightSpec {
    /// Name template; `{layer}` stands for the layer index in `layer` weights.
    pub name: String,
    pub section: Section,
    /// Vocabulary-sized (embedding or LM head).
    #[serde(default)]
    pub embed: bool,
    /// May be absent from a checkpoint.
    #[serde(default)]
    pub optional: bool,
    /// Absent when the config has `tie_word_embeddings = true` (it is this other weight).
    #[serde(default)]
    pub tied_to: Option<String>,
}

impl WeightSpec {
    /// The concrete name for `layer` (non-layer weights ignore it).
    pub fn name_for(&self, layer: usize) -> String {
        self.name.replace("{layer}", &layer.to_string())
    }
}

/// A decoder-only architecture.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub name: String,
    /// `model_type` values in `config.json`.
    pub model_types: Vec<String>,
    /// `architectures` values in `config.json`.
    pub architectures: Vec<String>,
    pub layer_count_key: String,
    pub weights: Vec<WeightSpec>,
}

const SOURCES: &[(&str, &str)] = &[
    ("llama", include_str!("../../arch/llama.toml")),
    ("mistral", include_str!("../../arch/mistral.toml")),
    ("qwen2", include_str!("../../arch/qwen2.toml")),
    ("qwen3", include_str!("../../arch/qwen3.toml")),
];

impl Architecture {
    /// Every supported architecture, parsed once.
    pub fn registry() -> &'static [Architecture] {
        static REG: OnceLock<Vec<Architecture>> = OnceLock::new();
        REG.get_or_init(|| {
            SOURCES
                .iter()
                .map(|(file, text)| {
                    // The files are part of the source tree and covered by a unit test, so a
                    // parse failure here is a build defect, not a user error.
                    #[allow(clippy::expect_used)]
                    toml::from_str(text).unwrap_or_else(|e| panic!("engine/arch/{file}.toml: {e}"))
                })
                .collect()
        })
    }

    /// The supported names, for error messages.
    pub fn supported() -> String {
        Self::registry().iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Finds the architecture of a config: by `architectures[0]`, else by `model_type`.
    pub fn for_config(cfg: &ModelConfig, path: &std::path::Path) -> Result<&'static Architecture> {
        let reg = Self::registry();
        let by_arch = cfg.architectures.first().and_then(|a| reg.iter().find(|r| r.architectures.contains(a)));
        // A model_type that names another known architecture contradicts `architectures`
        // (an unknown one is left to `architectures`).
        if let Some(a) = by_arch
            && !a.model_types.contains(&cfg.model_type)
            && reg.iter().any(|r| r.model_types.contains(&cfg.model_type))
        {
            return Err(EngineError::BadJson {
                path: path.to_path_buf(),
                reason: format!(
                    "architectures = [\"{}\"] is {}, but model_type = \"{}\" is not (expected {})",
                    cfg.architectures[0],
                    a.name,
                    cfg.model_type,
                    a.model_types.join(" or ")
                ),
            });
        }
        by_arch.or_else(|| reg.iter().find(|r| r.model_types.contains(&cfg.model_type))).ok_or_else(|| EngineError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch: cfg.architectures.first().cloned().unwrap_or_else(|| cfg.model_type.clone()),
            supported: Self::supported(),
        })
    }

    /// Weights of one section, in declaration order.
    pub fn section(&self, s: Section) -> impl Iterator<Item = &WeightSpec> {
        self.weights.iter().filter(move |w| w.section == s)
    }

    /// Whether weight `w` is physically present in a checkpoint with this config.
    pub fn is_stored(&self, w: &WeightSpec, cfg: &ModelConfig) -> bool {
        !(w.tied_to.is_some() && cfg.tie_word_embeddings)
    }

    /// Every tensor name a checkpoint with `cfg` holds (optional weights included), in order
    /// pre → layers → post.
    pub fn tensor_names(&self, cfg: &ModelConfig, layers: usize) -> Vec<(String, &WeightSpec)> {
        let mut out = Vec::new();
        for w in self.section(Section::Pre).filter(|w| self.is_stored(w, cfg)) {
            out.push((w.name.clone(), w));
        }
        for l in 0..layers {
            for w in self.section(Section::Layer) {
                out.push((w.name_for(l), w));
            }
        }
        for w in self.section(Section::Post).filter(|w| self.is_stored(w, cfg)) {
            out.push((w.name.clone(), w));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_architecture_file_parses_and_names_are_unique() {
        let reg = Architecture::registry();
        assert_eq!(reg.len(), SOURCES.len());
        for (a, (file, _)) in reg.iter().zip(SOURCES) {
            assert_eq!(&a.name, file, "file name and `name` agree");
            let mut names: Vec<_> = a.weights.iter().map(|w| &w.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), a.weights.len(), "{}: duplicate weight", a.name);
            assert!(a.section(Section::Layer).all(|w| w.name.contains("{layer}")));
            assert!(a.section(Section::Pre).chain(a.section(Section::Post)).all(|w| !w.name.contains("{layer}")));
        }
    }

    #[test]
    fn lookup_by_architecture_and_model_type() {
        let cfg = |arch: &str, mt: &str| {
            ModelConfig::parse(&format!(
                r#"{{"architectures":["{arch}"],"model_type":"{mt}","hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":4}}"#
            ))
            .expect("config")
        };
        let p = std::path::Path::new("x");
        assert_eq!(Architecture::for_config(&cfg("Qwen2ForCausalLM", "?"), p).expect("q").name, "qwen2");
        assert_eq!(Architecture::for_config(&cfg("?", "qwen3"), p).expect("q3").name, "qwen3");
        let err = Architecture::for_config(&cfg("LlamaForCausalLM", "qwen2"), p).expect_err("contradiction").to_string();
        assert!(err.contains("model_type = \"qwen2\"") && err.contains("expected llama"), "{err}");
        let err = Architecture::for_config(&cfg("GPT2LMHeadModel", "gpt2"), p).expect_err("gpt2");
        let msg = err.to_string();
        assert!(msg.contains("GPT2LMHeadModel") && msg.contains("llama, mistral, qwen2, qwen3"), "{msg}");
    }
}
