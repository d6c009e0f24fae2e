//! Data-flow-space genomes (Sakana AI, "Evolutionary Optimization of Model Merging Recipes",
//! 2024, §3.2): which layers of which models the hidden state passes through, and how it is
//! scaled on each hop. Decoded to a [`LayerPath`] that the model runtime executes.
//!
//! Layout. The `N = Σ_m L_m` layers of the loaded models are numbered in order (model 0's
//! layers, then model 1's, …). Model `A` (the one whose embeddings, first layer, last layer,
//! final norm and head the path uses) is fixed; the path always starts with `A`'s layer 0 and
//! ends with `A`'s last layer. In between lie `T = r · (N − 2)` slots: every other layer, in
//! order, repeated `r` times. Genome:
//! - `T` indicator genes `I_t ∈ [−1, 1]` ([`GeneKind`] binary in the search): slot `t` is on
//!   the path iff `I_t > 0`.
//! - scale genes, by [`ScaleMode`]:
//!   - `matrix`: Sakana's `W ∈ ℝ^{N×N}`; the hidden state going from layer `i` to layer `j` is
//!     multiplied by `W_{ij}` (N² genes);
//!   - `target`: the lighter variant for large N: `W_{ij} = w_j`, one factor per layer
//!     entered (N genes);
//!   - `none`: every hop at scale 1.
//!
//!   Scales are identity-centred: they start at 1 within `scale_bounds`.
//!
//! Decoding: walk the slots in order, keep those whose indicator is on; each kept layer `j`
//! entered from the previous layer `i` of the path gets scale `W_{ij}`. The first hop (from
//! the embeddings into `A`'s layer 0) has scale 1. The initial genome switches on exactly `A`'s
//! own middle layers in the first repeat, so it decodes to `A` itself at every scale 1.
//!
//! [`GeneKind`]: https://docs.rs/evomerge-search (search crate; binary genes are on iff > 0)

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::model::{Hop, LayerPath};

/// How hop scales are parameterized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMode {
    /// One factor per (from-layer, to-layer) pair: N² genes.
    #[default]
    Matrix,
    /// One factor per layer entered: N genes.
    Target,
    /// No scale genes.
    None,
}

/// The `[dataflow]` section of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFlowConfig {
    /// Index of model `A` among the data-flow models (embeddings, first/last layer, head).
    #[serde(default)]
    pub model_a: usize,
    /// Times the layer sequence is repeated (`r`).
    #[serde(default = "two")]
    pub repeats: usize,
    #[serde(default)]
    pub scales: ScaleMode,
    /// Bounds of every scale gene.
    #[serde(default = "scale_bounds")]
    pub scale_bounds: [f64; 2],
}

fn two() -> usize {
    2
}
fn scale_bounds() -> [f64; 2] {
    [0.5, 1.5]
}

impl Default for DataFlowConfig {
    fn default() -> Self {
        Self { model_a: 0, repeats: two(), scales: ScaleMode::default(), scale_bounds: scale_bounds() }
    }
}

/// One gene of a data-flow genome.
#[derive(Debug, Clone, PartialEq)]
pub struct DfsGene {
    pub name: String,
    /// An on/off indicator (on iff > 0) rather than a real.
    pub binary: bool,
    pub lower: f64,
    pub upper: f64,
    pub init: f64,
}

/// The data-flow genome over a set of loaded models.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFlowLayout {
    layer_counts: Vec<usize>,
    offsets: Vec<usize>,
    cfg: DataFlowConfig,
    /// (repeat, model, layer) of each slot.
    slots: Vec<(usize, usize, usize)>,
}

impl DataFlowLayout {
    pub fn new(layer_counts: &[usize], cfg: &DataFlowConfig) -> Result<Self> {
        let bad = |m: String| Err(EngineError::InvalidInput(format!("dataflow: {m}")));
        if layer_counts.is_empty() {
            return bad("no models".into());
        }
        let a = cfg.model_a;
        let Some(&la) = layer_counts.get(a) else {
            return bad(format!("model_a = {a} but there are {} model(s)", layer_counts.len()));
        };
        if la < 2 {
            return bad(format!("model {a} has {la} layer(s); the path needs its first and last"));
        }
        if cfg.repeats == 0 {
            return bad("repeats must be at least 1".into());
        }
        let [lo, hi] = cfg.scale_bounds;
        if !(lo.is_finite() && hi.is_finite() && lo < hi && lo <= 1.0 && 1.0 <= hi) {
            return bad(format!("scale_bounds [{lo}, {hi}] must be finite, increasing and contain 1"));
        }
        let mut offsets = Vec::with_capacity(layer_counts.len());
        let mut n = 0;
        for &c in layer_counts {
            offsets.push(n);
            n += c;
        }
        let mut slots = vec![];
        for rep in 0..cfg.repeats {
            for (m, &c) in layer_counts.iter().enumerate() {
                for l in 0..c {
                    if m == a && (l == 0 || l == la - 1) {
                        continue;
                    }
                    slots.push((rep, m, l));
                }
            }
        }
        Ok(Self { layer_counts: layer_counts.to_vec(), offsets, cfg: cfg.clone(), slots })
    }

    /// Total layers N of the loaded models.
    pub fn total_layers(&self) -> usize {
        self.layer_counts.iter().sum()
    }

    fn global(&self, model: usize, layer: usize) -> usize {
        self.offsets[model] + layer
    }

    fn scale_genes(&self) -> usize {
        let n = self.total_layers();
        match self.cfg.scales {
            ScaleMode::Matrix => n * n,
            ScaleMode::Target => n,
            ScaleMode::None => 0,
        }
    }

    /// Every gene: the slot indicators, then the scales.
    pub fn genes(&self) -> Vec<DfsGene> {
        let a = self.cfg.model_a;
        let mut g: Vec<DfsGene> = self
            .slots
            .iter()
            .map(|&(rep, m, l)| DfsGene {
                name: format!("on.r{rep}.m{m}.l{l}"),
                binary: true,
                lower: -1.0,
                upper: 1.0,
                init: if rep == 0 && m == a { 0.5 } else { -0.5 },
            })
            .collect();
        let [lo, hi] = self.cfg.scale_bounds;
        let name = |i: usize| {
            let m = self.offsets.iter().rposition(|&o| o <= i).unwrap_or(0);
            format!("m{m}.l{}", i - self.offsets[m])
        };
        let n = self.total_layers();
        match self.cfg.scales {
            ScaleMode::Matrix => {
                for i in 0..n {
                    for j in 0..n {
                        g.push(DfsGene { name: format!("w.{}>{}", name(i), name(j)), binary: false, lower: lo, upper: hi, init: 1.0 });
                    }
                }
            }
            ScaleMode::Target => {
                for j in 0..n {
                    g.push(DfsGene { name: format!("w.>{}", name(j)), binary: false, lower: lo, upper: hi, init: 1.0 });
                }
            }
            ScaleMode::None => {}
        }
        g
    }

    /// The initial genome (model `A` itself).
    pub fn initial(&self) -> Vec<f64> {
        self.genes().iter().map(|g| g.init).collect()
    }

    /// The path a genome encodes.
    pub fn decode(&self, x: &[f64]) -> Result<LayerPath> {
        let want = self.slots.len() + self.scale_genes();
        if x.len() != want {
            return Err(EngineError::InvalidInput(format!("dataflow genome has {} genes, expected {want}", x.len())));
        }
        let (ind, w) = x.split_at(self.slots.len());
        let n = self.total_layers();
        let scale = |i: usize, j: usize| -> f32 {
            match self.cfg.scales {
                ScaleMode::Matrix => w[i * n + j] as f32,
                ScaleMode::Target => w[j] as f32,
                ScaleMode::None => 1.0,
            }
        };
        let a = self.cfg.model_a;
        let last = self.layer_counts[a] - 1;
        let mut hops = vec![Hop { model: a, layer: 0, scale: 1.0 }];
        let mut prev = self.global(a, 0);
        let on = self.slots.iter().zip(ind).filter(|(_, v)| **v > 0.0).map(|(s, _)| (s.1, s.2));
        for (m, l) in on.chain(std::iter::once((a, last))) {
            let j = self.global(m, l);
            hops.push(Hop { model: m, layer: l, scale: scale(prev, j) });
            prev = j;
        }
        Ok(LayerPath { embed_model: a, head_model: a, hops })
    }
}

/// A path as text: `m0:0 m0:1 m1:1×0.93 …` (scale shown where it is not 1).
pub fn describe(path: &LayerPath) -> String {
    path.hops
        .iter()
        .map(|h| if (h.scale - 1.0).abs() < 1e-6 { format!("m{}:{}", h.model, h.layer) } else { format!("m{}:{}×{:.3}", h.model, h.layer, h.scale) })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scales: ScaleMode, repeats: usize) -> DataFlowConfig {
        DataFlowConfig { model_a: 0, repeats, scales, scale_bounds: [0.5, 1.5] }
    }

    #[test]
    fn initial_genome_is_model_a() {
        for mode in [ScaleMode::Matrix, ScaleMode::Target, ScaleMode::None] {
            let l = DataFlowLayout::new(&[4, 4], &cfg(mode, 2)).expect("layout");
            let p = l.decode(&l.initial()).expect("decode");
            assert_eq!(p, LayerPath::identity(0, 4), "{mode:?}");
        }
        // model A may be the second model
        let l = DataFlowLayout::new(&[3, 5], &DataFlowConfig { model_a: 1, ..cfg(ScaleMode::Target, 1) }).expect("layout");
        assert_eq!(l.decode(&l.initial()).expect("decode"), LayerPath::identity(1, 5));
    }

    #[test]
    fn gene_counts_follow_sakana() {
        // N = 8 layers, A's first and last are fixed: T = r · 6 slots
        let l = DataFlowLayout::new(&[4, 4], &cfg(ScaleMode::Matrix, 3)).expect("layout");
        let g = l.genes();
        assert_eq!(g.iter().filter(|g| g.binary).count(), 18);
        assert_eq!(g.iter().filter(|g| !g.binary).count(), 64);
        assert_eq!(DataFlowLayout::new(&[4, 4], &cfg(ScaleMode::Target, 1)).expect("l").genes().len(), 6 + 8);
        assert_eq!(DataFlowLayout::new(&[4, 4], &cfg(ScaleMode::None, 1)).expect("l").genes().len(), 6);
    }

    #[test]
    fn threshold_repeats_and_scales() {
        let l = DataFlowLayout::new(&[3, 3], &cfg(ScaleMode::Matrix, 2)).expect("layout");
        // slots per repeat: m0:1, m1:0, m1:1, m1:2  (m0:0 and m0:2 are fixed)
        let mut x = vec![-1.0; 8];
        x[0] = 0.0; // m0:1 exactly at the threshold: off
        x[2] = 0.3; // r0 m1:1 on
        x[4] = 1.0; // r1 m0:1 on
        x[6] = 1e-9; // r1 m1:1 on (repeat of the same layer)
        let n = 6;
        let mut w = vec![1.0; n * n];
        w[4 * n + 1] = 0.7; // m1:1 (global 4) → m0:1 (global 1)
        w[n + 4] = 1.2; // m0:1 → m1:1 (row 1)
        w[4 * n + 2] = 0.9; // m1:1 → m0:2 (the fixed last layer)
        x.extend(w);
        let p = l.decode(&x).expect("decode");
        let got: Vec<(usize, usize, f32)> = p.hops.iter().map(|h| (h.model, h.layer, h.scale)).collect();
        assert_eq!(got, vec![(0, 0, 1.0), (1, 1, 1.0), (0, 1, 0.7), (1, 1, 1.2), (0, 2, 0.9)]);
        assert_eq!(describe(&p), "m0:0 m1:1 m0:1×0.700 m1:1×1.200 m0:2×0.900");
        assert!(l.decode(&x[1..]).is_err(), "wrong length");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(DataFlowLayout::new(&[4], &DataFlowConfig { model_a: 1, ..Default::default() }).is_err());
        assert!(DataFlowLayout::new(&[1, 4], &DataFlowConfig::default()).is_err());
        assert!(DataFlowLayout::new(&[4], &DataFlowConfig { repeats: 0, ..Default::default() }).is_err());
        assert!(DataFlowLayout::new(&[4], &DataFlowConfig { scale_bounds: [1.2, 2.0], ..Default::default() }).is_err());
    }
}
