//! Parameter settings as mergekit writes them, and their evaluation for one tensor.
//!
//! A setting is a scalar (`0.5`, `true`), a **gradient** (`[0, 0.5, 1]`: piecewise-linear over
//! the layers of a slice), or a **filtered list** (`[{filter: self_attn, value: ...}, {value:
//! ...}]`: the first entry whose `filter` is a substring of the tensor name, or that has no
//! filter, applies). Inside a slice of `n` layers, layer `k` sits at `t = k/(n−1)` (1 when
//! `n = 1`); weights outside the layers (embeddings, final norm, LM head) at `t = 0`. A
//! gradient of length `L` is interpolated at `t·(L−1)` (numpy's `interp`).

use crate::merge::error::MergeError;
use serde::{Deserialize, Serialize};

/// A scalar or a gradient.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Number(f64),
    Gradient(Vec<f64>),
}

/// One entry of a filtered list.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilteredValue {
    #[serde(default)]
    pub filter: Option<String>,
    pub value: Value,
}

/// A parameter setting.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ParamSetting {
    Plain(Value),
    Filtered(Vec<FilteredValue>),
}

impl Value {
    /// The value at relative position `t ∈ [0, 1]`.
    pub fn at(&self, t: f64) -> Result<f64, MergeError> {
        match self {
            Value::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
            Value::Number(x) => Ok(*x),
            Value::Gradient(g) => interp(g, t),
        }
    }
}

/// Piecewise-linear interpolation of `g` (evenly spaced over [0, 1]) at `t`.
pub fn interp(g: &[f64], t: f64) -> Result<f64, MergeError> {
    match g.len() {
        0 => Err(MergeError::EmptyGradient),
        1 => Ok(g[0]),
        n => {
            let x = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i = (x.floor() as usize).min(n - 2);
            let f = x - i as f64;
            Ok(g[i] + (g[i + 1] - g[i]) * f)
        }
    }
}

impl ParamSetting {
    /// The value for `tensor` at position `t`, or `None` when no filter entry matches.
    pub fn resolve(&self, tensor: &str, t: f64) -> Result<Option<f64>, MergeError> {
        match self {
            ParamSetting::Plain(v) => v.at(t).map(Some),
            ParamSetting::Filtered(entries) => {
                entries.iter().find(|e| e.filter.as_ref().is_none_or(|f| tensor.contains(f.as_str()))).map(|e| e.value.at(t)).transpose()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> ParamSetting {
        serde_norway::from_str(y).expect("yaml")
    }

    #[test]
    fn gradient_interpolates_like_numpy() {
        let g = [0.0, 0.5, 1.0];
        for (t, want) in [(0.0, 0.0), (1.0 / 3.0, 1.0 / 3.0), (0.5, 0.5), (2.0 / 3.0, 2.0 / 3.0), (1.0, 1.0)] {
            assert!((interp(&g, t).expect("ok") - want).abs() < 1e-12);
        }
        assert_eq!(interp(&[1.0, 0.0, 0.0, 1.0], 0.5).expect("ok"), 0.0);
        assert_eq!(interp(&[2.0], 0.7).expect("ok"), 2.0);
    }

    #[test]
    fn settings_parse_in_every_form() {
        assert_eq!(parse("0.3").resolve("x", 0.0).expect("ok"), Some(0.3));
        assert_eq!(parse("true").resolve("x", 0.0).expect("ok"), Some(1.0));
        assert_eq!(parse("[0, 1]").resolve("x", 0.25).expect("ok"), Some(0.25));
        let f = parse("[{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.2}, {value: 0.5}]");
        assert_eq!(f.resolve("model.layers.1.self_attn.q_proj.weight", 1.0).expect("ok"), Some(1.0));
        assert_eq!(f.resolve("model.layers.1.mlp.up_proj.weight", 1.0).expect("ok"), Some(0.2));
        assert_eq!(f.resolve("model.norm.weight", 0.0).expect("ok"), Some(0.5));
        let no_default = parse("[{filter: mlp, value: 0.2}]");
        assert_eq!(no_default.resolve("model.norm.weight", 0.0).expect("ok"), None);
    }
}
