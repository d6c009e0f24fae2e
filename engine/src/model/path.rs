//! [`LayerPath`]: the data-flow route of the hidden state through layers of loaded models.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// One step of the path: run layer `layer` of loaded model `model`, after multiplying the
/// hidden state entering it by `scale` (Sakana's data-flow merge, one entry of W).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hop {
    pub model: usize,
    pub layer: usize,
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

/// Embedding of `embed_model`, the hops in order, final norm and LM head of `head_model`.
/// The standard model is [`LayerPath::identity`]. Layers are shared by reference: a layer that
/// appears twice is not copied (its KV cache entries are, one per hop).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerPath {
    pub embed_model: usize,
    pub head_model: usize,
    pub hops: Vec<Hop>,
}

impl LayerPath {
    /// Every layer of `model`, in order, at scale 1.
    pub fn identity(model: usize, layers: usize) -> Self {
        Self { embed_model: model, head_model: model, hops: (0..layers).map(|layer| Hop { model, layer, scale: 1.0 }).collect() }
    }

    /// Checks every reference against the loaded models' layer counts and every scale.
    pub fn validate(&self, layer_counts: &[usize]) -> Result<()> {
        let n = layer_counts.len();
        for (what, m) in [("embed_model", self.embed_model), ("head_model", self.head_model)] {
            if m >= n {
                return Err(EngineError::InvalidInput(format!("layer path: {what} {m} but {n} model(s) are loaded")));
            }
        }
        for (i, h) in self.hops.iter().enumerate() {
            let Some(&layers) = layer_counts.get(h.model) else {
                return Err(EngineError::InvalidInput(format!("layer path hop {i}: model {} but {n} model(s) are loaded", h.model)));
            };
            if h.layer >= layers {
                return Err(EngineError::InvalidInput(format!("layer path hop {i}: layer {} but model {} has {layers} layers", h.layer, h.model)));
            }
            if !h.scale.is_finite() {
                return Err(EngineError::InvalidInput(format!("layer path hop {i}: scale {} is not finite", h.scale)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_validation() {
        let p = LayerPath::identity(0, 3);
        assert_eq!(p.hops.len(), 3);
        p.validate(&[3]).expect("valid");
        assert!(p.validate(&[2]).is_err());
        let mut q = p.clone();
        q.hops.push(Hop { model: 1, layer: 0, scale: 0.5 });
        assert!(q.validate(&[3]).expect_err("model 1 missing").to_string().contains("model 1"));
        q.validate(&[3, 1]).expect("two models");
        q.hops[0].scale = f32::NAN;
        assert!(q.validate(&[3, 1]).is_err());
        let json = serde_json::to_string(&p).expect("json");
        assert_eq!(serde_json::from_str::<LayerPath>(&json).expect("back"), p);
    }
}
