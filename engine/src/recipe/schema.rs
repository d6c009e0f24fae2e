//! mergekit's YAML recipe schema (`MergeConfiguration`), accepted strictly.
//!
//! ```yaml
//! merge_method: ties
//! base_model: org/base            # path or hub id
//! models:                         # or `slices:` (list of {sources: [{model, layer_range}]})
//!   - model: org/a
//!     parameters: {weight: 1.0, density: 0.5}
//! parameters: {normalize: true}   # global; per-model parameters here act as defaults
//! dtype: float32                  # evomerge always computes in f32; this sets the output
//! out_dtype: bfloat16             # default: dtype, else the donor model's dtype
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::param::ParamSetting;
use crate::error::{EngineError, Result};

/// A parameter map (`parameters:`) at any level.
pub type ParamMap = BTreeMap<String, ParamSetting>;

/// A whole recipe.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub merge_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slices: Option<Vec<OutputSlice>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<InputModel>>,
    #[serde(default, skip_serializing_if = "ParamMap::is_empty")]
    pub parameters: ParamMap,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<serde_norway::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An entry of `models:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputModel {
    pub model: String,
    #[serde(default, skip_serializing_if = "ParamMap::is_empty")]
    pub parameters: ParamMap,
}

/// An entry of `slices:`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSlice {
    pub sources: Vec<InputSlice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(default, skip_serializing_if = "ParamMap::is_empty")]
    pub parameters: ParamMap,
}

/// A source of a slice: layers `[start, end)` of a model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSlice {
    pub model: String,
    pub layer_range: [usize; 2],
    #[serde(default, skip_serializing_if = "ParamMap::is_empty")]
    pub parameters: ParamMap,
}

impl Recipe {
    /// Parses YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let r: Recipe = serde_norway::from_str(text).map_err(|e| EngineError::recipe(origin, e.to_string()))?;
        r.check_shape(origin)?;
        Ok(r)
    }

    /// Reads and parses a recipe file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn check_shape(&self, origin: &str) -> Result<()> {
        let err = |m: String| Err(EngineError::recipe(origin, m));
        match (&self.models, &self.slices) {
            (Some(_), Some(_)) => return err("give either `models:` or `slices:`, not both".into()),
            (None, None) => return err("needs `models:` or `slices:`".into()),
            (Some(m), None) if m.is_empty() => return err("`models:` is empty".into()),
            (None, Some(s)) if s.is_empty() || s.iter().any(|s| s.sources.is_empty()) => {
                return err("`slices:` (and each slice's `sources:`) must not be empty".into());
            }
            _ => {}
        }
        for s in self.slices.iter().flatten() {
            for src in &s.sources {
                if src.layer_range[0] >= src.layer_range[1] {
                    return err(format!("layer_range {:?} of {} is empty", src.layer_range, src.model));
                }
            }
            let len = s.sources[0].layer_range[1] - s.sources[0].layer_range[0];
            if s.sources.iter().any(|x| x.layer_range[1] - x.layer_range[0] != len) {
                return err("all sources of a slice must span the same number of layers".into());
            }
        }
        if self.tokenizer.is_some() {
            return err("`tokenizer:` is not supported yet (evomerge copies the base/first model's tokenizer)".into());
        }
        if self.chat_template.is_some() {
            return err("`chat_template:` is not supported yet (the donor model's template is kept)".into());
        }
        for m in self.model_refs() {
            if m.contains('+') {
                return err(format!("model '{m}': LoRA references (model+lora) are not supported"));
            }
        }
        Ok(())
    }

    /// Every model reference, in first-appearance order, base model included.
    pub fn model_refs(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut push = |m: &String| {
            if !out.contains(m) {
                out.push(m.clone());
            }
        };
        for m in self.models.iter().flatten() {
            push(&m.model);
        }
        for s in self.slices.iter().flatten() {
            for src in &s.sources {
                push(&src.model);
            }
            if let Some(b) = &s.base_model {
                push(b);
            }
        }
        if let Some(b) = &self.base_model {
            push(b);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Recipe::parse("merge_method: linear\nmodels: [{model: a}]\nmodel_stock: 1\n", "r.yaml").expect_err("bad");
        assert!(e.to_string().contains("model_stock"), "{e}");
        let e = Recipe::parse("merge_method: linear\nmodels: [{model: a, paramters: {}}]\n", "r.yaml").expect_err("bad");
        assert!(e.to_string().contains("paramters"), "{e}");
    }

    #[test]
    fn models_xor_slices() {
        assert!(Recipe::parse("merge_method: linear\n", "r").is_err());
        let both = "merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n";
        assert!(Recipe::parse(both, "r").is_err());
    }

    #[test]
    fn slices_parse_and_refs_are_ordered() {
        let r = Recipe::parse(
            "merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - {model: b, layer_range: [0, 2]}\n      - {model: a, layer_range: [2, 4]}\nparameters: {t: 0.5}\n",
            "r",
        )
        .expect("parse");
        assert_eq!(r.model_refs(), vec!["b".to_string(), "a".to_string()]);
        let uneven = "merge_method: slerp\nslices:\n  - sources:\n      - {model: b, layer_range: [0, 2]}\n      - {model: a, layer_range: [0, 3]}\n";
        assert!(Recipe::parse(uneven, "r").is_err());
    }
}
