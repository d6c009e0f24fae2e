//! Generalized task arithmetic: one method, eight presets (task_arithmetic, ties, dare_ties,
//! dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear), as mergekit 0.1.5's
//! `GeneralizedTaskArithmeticMerge`.
//!
//! For each non-base model i with weight wᵢ and task vector δᵢ = xᵢ − base:
//!
//! 1. **sparsify** δᵢ (magnitude / outliers / random / DELLA, see [`super::sparsify`]), with
//!    optional L1 rescale;
//! 2. **weight**: Dᵢ = wᵢ·δᵢ;
//! 3. **sign consensus** (TIES "sum" election, presets with `consensus`): per element the
//!    majority sign is `+1` where Σᵢ Dᵢ ≥ 0 else `−1`; mᵢ = [sign(Dᵢ) = majority] (a zero never
//!    matches); mixed = Σᵢ mᵢ·Dᵢ, divisor = Σᵢ mᵢ·wᵢ (0 → 1). Without consensus:
//!    mixed = Σᵢ Dᵢ, divisor = Σᵢ wᵢ (|·| < 1e-8 → 1);
//! 4. **normalize** (if set): mixed /= divisor;
//! 5. **λ**: mixed *= λ; result = base + mixed.
//!
//! Arithmetic is f32 in mergekit's order, so deterministic presets equal mergekit's output
//! bit for bit on the fixtures. `int8_mask` is accepted and has no numerical effect.
//!
//! References: task arithmetic (Ilharco et al. 2022, arXiv:2212.04089), TIES
//! (arXiv:2306.01708), DARE (arXiv:2311.03099), Model Breadcrumbs (arXiv:2312.06795), DELLA
//! (arXiv:2406.11617).
//!
//! Files: `mod.rs` the presets and the [`MergeMethod`] impl; `streamed.rs` the streamed path
//! (chunks of the inputs, rank cuts, the consensus kernels); `whole.rs` the whole-tensor path
//! and the fused plain task-arithmetic kernel.

mod streamed;
mod whole;

use crate::merge::error::MergeError;
#[allow(unused_imports)]
use streamed::*;
pub use whole::plain_divisor;
#[allow(unused_imports)]
use whole::*;

use rayon::prelude::*;

use crate::buffer::HugeBuf;

use super::base::{BaseRole, ChunkSink, MergeInput, MergeMethod, ParamSpec, Params, STREAM_CHUNK, Scope, Scratch, StreamInput, stream_elementwise};
use super::rng::CounterRng;
use super::select::{RankSearch, SMALL, gather, key, sample_positions};
use super::sparsify::{Sparsifier, sparsify, window};

const CHUNK: usize = 1 << 14;

/// A preset of the generalized task-arithmetic method.
#[derive(Debug, Clone, Copy)]
pub struct GeneralizedTaskArithmetic {
    name: &'static str,
    reference: &'static str,
    sparsifier: Option<Sparsifier>,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
}

const fn preset(
    name: &'static str,
    reference: &'static str,
    sparsifier: Option<Sparsifier>,
    consensus: bool,
    default_normalize: bool,
    default_rescale: bool,
) -> GeneralizedTaskArithmetic {
    GeneralizedTaskArithmetic { name, reference, sparsifier, consensus, default_normalize, default_rescale }
}

/// The presets, with mergekit 0.1.5's defaults for `normalize` and `rescale`.
pub const PRESETS: [GeneralizedTaskArithmetic; 8] = [
    preset("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, false, false, false),
    preset("ties", "https://arxiv.org/abs/2306.01708", Some(Sparsifier::Magnitude), true, true, false),
    preset("dare_ties", "https://arxiv.org/abs/2311.03099", Some(Sparsifier::Random), true, false, true),
    preset("dare_linear", "https://arxiv.org/abs/2311.03099", Some(Sparsifier::Random), false, false, true),
    preset("breadcrumbs", "https://arxiv.org/abs/2312.06795", Some(Sparsifier::MagnitudeOutliers), false, false, false),
    preset("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", Some(Sparsifier::MagnitudeOutliers), true, false, false),
    preset("della", "https://arxiv.org/abs/2406.11617", Some(Sparsifier::DellaMagprune), true, true, true),
    preset("della_linear", "https://arxiv.org/abs/2406.11617", Some(Sparsifier::DellaMagprune), false, false, true),
];

impl MergeMethod for GeneralizedTaskArithmetic {
    fn name(&self) -> &'static str {
        self.name
    }

    fn reference(&self) -> &'static str {
        self.reference
    }

    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![
            ParamSpec::float("weight", Scope::PerModel, -1e6, 1e6, None, (0.0, 1.0), "scale of the model's task vector"),
            ParamSpec::bool("normalize", Scope::Global, self.default_normalize, "divide by the sum of (kept) weights"),
            ParamSpec::bool("rescale", Scope::Global, self.default_rescale, "L1-rescale each sparsified task vector"),
            ParamSpec::float("lambda", Scope::Global, -1e6, 1e6, Some(1.0), (0.5, 1.5), "scale of the merged task vector"),
            ParamSpec::bool("int8_mask", Scope::Global, false, "store masks as int8 (no numerical effect)").inert(),
        ];
        if self.sparsifier.is_some() {
            p.push(ParamSpec::float("density", Scope::PerModel, 0.0, 1.0, Some(1.0), (0.1, 1.0), "fraction of the task vector kept"));
        }
        if self.sparsifier == Some(Sparsifier::MagnitudeOutliers) {
            p.push(ParamSpec::float("gamma", Scope::PerModel, 0.0, 1.0, Some(0.01), (0.0, 0.2), "fraction of the largest entries dropped"));
        }
        if self.sparsifier == Some(Sparsifier::DellaMagprune) {
            p.push(ParamSpec::float("epsilon", Scope::PerModel, 0.0, 0.5, Some(0.15), (0.01, 0.3), "spread of keep probabilities around density"));
        }
        p
    }

    fn elementwise(&self) -> bool {
        self.sparsifier.is_none()
    }

    fn base_role(&self) -> BaseRole {
        BaseRole::Required
    }

    fn merge(&self, input: &MergeInput, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError> {
        let base = input.base_tensor()?;
        let rescale = input.params.flag("rescale");
        let k = input.others().count();
        // per-model L1 rescale factors of the sparsified task vectors (1 without rescale)
        let mut scales = vec![1f32; k];
        let rows = input.shape.first().copied().unwrap_or(1);
        let models: Vec<&[f32]> = input.others().map(|(x, _)| x).collect();
        match self.sparsifier {
            None => self.combine(input, base, TaskVectors::Models(&models), &scales, out),
            Some(method) => {
                let bufs = scratch.buffers(k, base.len());
                for (i, ((x, p), d)) in input.others().zip(bufs.iter_mut()).enumerate() {
                    d.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(base.par_chunks(CHUNK))).for_each(|(d, (x, b))| {
                        d.iter_mut().zip(x.iter().zip(b)).for_each(|(o, (a, b))| *o = a - b);
                    });
                    let rng = CounterRng::new(input.seed, i as u64);
                    scales[i] = sparsify(d, rows, method, p.get("density"), p.get("gamma"), p.get("epsilon"), rescale, rng)?;
                }
                let ds: Vec<&[f32]> = bufs.iter().map(|b| &b[..]).collect();
                self.combine(input, base, TaskVectors::Sparsified(&ds), &scales, out)
            }
        }
        Ok(())
    }

    /// Streams the output of every preset. Task arithmetic is elementwise. DARE on large
    /// tensors takes two passes over the inputs and holds nothing larger than a chunk: pass 1
    /// streams δᵢ = xᵢ − base for the L1 rescale factors (the masks are counter-based, so pass 2
    /// redraws the same ones), pass 2 masks, weights and combines chunk by chunk. The
    /// rank-based sparsifiers (TIES, breadcrumbs, DELLA) need a whole task vector to rank:
    /// δᵢ is materialized (one buffer per model, read through the reader — no f32 copies of the
    /// inputs), sparsified exactly as [`merge`](MergeMethod::merge) does, and the combination
    /// is streamed. Results equal `merge`'s bit for bit (DARE's rescale up to the order of an
    /// f64 sum).
    fn merge_streaming(&self, input: &StreamInput, scratch: &mut Scratch, sink: &mut ChunkSink) -> Result<bool, MergeError> {
        let Some(method) = self.sparsifier else {
            stream_elementwise(self, input, scratch, sink)?;
            return Ok(true);
        };
        let b = input.base.ok_or(MergeError::NoBase)?;
        let others: Vec<usize> = (0..input.reader.count()).filter(|&i| i != b).collect();
        let plain_topk = method == Sparsifier::Magnitude && !input.params.flag("rescale") && input.numel() >= SMALL;
        if method == Sparsifier::Random && input.numel() >= SMALL {
            match others.len() {
                1 => self.stream_dare::<1>(input, b, &others, sink)?,
                2 => self.stream_dare::<2>(input, b, &others, sink)?,
                3 => self.stream_dare::<3>(input, b, &others, sink)?,
                4 => self.stream_dare::<4>(input, b, &others, sink)?,
                _ => self.stream_random(input, b, &others, scratch, sink)?,
            }
        } else if plain_topk && (1..=4).contains(&others.len()) {
            match others.len() {
                1 => self.stream_topk::<1>(input, b, &others, sink)?,
                2 => self.stream_topk::<2>(input, b, &others, sink)?,
                3 => self.stream_topk::<3>(input, b, &others, sink)?,
                _ => self.stream_topk::<4>(input, b, &others, sink)?,
            }
        } else {
            self.stream_materialized(input, method, b, &others, scratch, sink)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::base::{SliceReader, merge_to_vec};
    use crate::merge::rng::tensor_seed;

    fn tensor(seed: u64, n: usize, quantum: Option<f32>) -> Vec<f32> {
        let r = CounterRng::new(tensor_seed(seed, "t"), 0);
        (0..n)
            .map(|i| {
                let v = (r.uniform(i as u64) as f32 - 0.5) * 0.1;
                quantum.map_or(v, |q| (v / q).round() * q)
            })
            .collect()
    }

    fn params(m: &GeneralizedTaskArithmetic, weights: &[f64]) -> (Params, Vec<Params>) {
        let mut g = Params::default();
        let mut per = Params::default();
        for s in m.params() {
            match s.scope {
                Scope::Global => g.set(s.name, s.default.unwrap_or(0.0)),
                Scope::PerModel => per.set(s.name, s.default.unwrap_or(0.0)),
            }
        }
        per.set("density", 0.4);
        per.set("gamma", 0.05);
        let mut mp = vec![per.clone()];
        for w in weights {
            let mut p = per.clone();
            p.set("weight", *w);
            mp.push(p);
        }
        (g, mp)
    }

    /// (whole-tensor result, streamed result or None if declined), default parameters
    fn both(m: &GeneralizedTaskArithmetic, ts: &[Vec<f32>]) -> (Vec<f32>, Option<Vec<f32>>) {
        let n = ts[0].len();
        let (g, mp) = params(m, &[0.7, 0.4]);
        whole_and_streamed(m, ts, &g, &mp, &[n / 4, 4])
    }

    /// (whole-tensor result, streamed result or None if declined); model 0 is the base
    fn whole_and_streamed(
        m: &GeneralizedTaskArithmetic,
        ts: &[Vec<f32>],
        g: &Params,
        mp: &[Params],
        shape: &[usize],
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let input = MergeInput {
            tensor: "t",
            shape,
            tensors: ts.iter().map(Vec::as_slice).collect(),
            base: Some(0),
            model_params: mp.to_vec(),
            params: g.clone(),
            seed: 9,
        };
        let whole = merge_to_vec(m, &input).expect("whole");
        let reader = SliceReader(ts.iter().map(Vec::as_slice).collect());
        let si = StreamInput { tensor: "t", shape, reader: &reader, base: Some(0), model_params: mp, params: g, seed: 9 };
        let mut streamed = Vec::new();
        let ok = m
            .merge_streaming(&si, &mut Scratch::default(), &mut |c: &[f32]| {
                streamed.extend_from_slice(c);
                Ok(())
            })
            .expect("stream");
        (whole, ok.then_some(streamed))
    }

    #[test]
    fn streaming_equals_the_whole_tensor_path() {
        // 3 chunks and a partial one; continuous values (no boundary ties)
        let n = 3 * STREAM_CHUNK + 12_344;
        assert!(n >= SMALL, "DARE must take the two-pass path");
        let ts: Vec<Vec<f32>> = (0..3).map(|s| tensor(s, n, None)).collect();
        for m in &PRESETS {
            let (whole, streamed) = both(m, &ts);
            let streamed = streamed.unwrap_or_else(|| panic!("{} declined to stream", m.name));
            if m.sparsifier == Some(Sparsifier::Random) {
                // L1 sums are reduced in another order: the rescale may differ in the last bit
                let worst = whole.iter().zip(&streamed).map(|(a, b)| (a - b).abs() / (1e-3 + a.abs())).fold(0f32, f32::max);
                assert!(worst < 1e-6, "{}: {worst}", m.name);
            } else {
                let diff: Vec<usize> = (0..n).filter(|&i| whole[i].to_bits() != streamed[i].to_bits()).collect();
                assert!(
                    diff.is_empty(),
                    "{}: {} elements differ, first at {:?}: {:?} vs {:?}",
                    m.name,
                    diff.len(),
                    diff.first(),
                    diff.first().map(|&i| whole[i]),
                    diff.first().map(|&i| streamed[i])
                );
            }
        }
    }

    #[test]
    fn streamed_ties_handles_edge_densities_weights_and_model_counts() {
        // 1 and 3 task vectors; densities that keep all, none, one element and most; a
        // negative weight; λ and normalize both ways; quantized values (ties at every cut)
        let n = 2 * STREAM_CHUNK + 777;
        let ties = PRESETS.iter().find(|p| p.name == "ties").expect("ties");
        // ((weight, density) per model, normalize, λ)
        type Case = (&'static [(f64, f64)], bool, f64);
        let cases: [Case; 4] = [
            (&[(0.8, 0.3)], true, 1.0),
            (&[(1.0, 1.0), (-0.5, 0.0), (0.9, 1e-6)], true, 0.7),
            (&[(0.6, 0.9), (0.3, 0.5), (0.2, 0.05)], false, 1.3),
            (&[(0.0, 0.5), (0.0, 0.5)], true, 1.0),
        ];
        for (case, &(models, normalize, lambda)) in cases.iter().enumerate() {
            let ts: Vec<Vec<f32>> = (0..=models.len() as u64).map(|s| tensor(s + 10, n, Some(2e-3))).collect();
            let (mut g, mut mp) = params(ties, &[]);
            g.set("normalize", normalize as u8 as f64);
            g.set("lambda", lambda);
            for &(w, density) in models {
                let mut p = mp[0].clone();
                p.set("weight", w);
                p.set("density", density);
                mp.push(p);
            }
            let (whole, streamed) = whole_and_streamed(ties, &ts, &g, &mp, &[n]);
            let streamed = streamed.unwrap_or_else(|| panic!("case {case} declined"));
            let diff = (0..n).filter(|&i| whole[i].to_bits() != streamed[i].to_bits()).count();
            assert_eq!(diff, 0, "case {case}: {diff} elements differ");
            let changed = (0..n).filter(|&i| whole[i] != ts[0][i]).count();
            assert!(case == 3 || changed > 0, "case {case} merged nothing");
        }
    }

    #[test]
    fn streaming_resolves_boundary_ties_like_the_whole_tensor_path() {
        // quantized values: every boundary magnitude repeats thousands of times
        let n = 2 * STREAM_CHUNK + 4_000;
        let ts: Vec<Vec<f32>> = (0..3).map(|s| tensor(s, n, Some(1e-3))).collect();
        for name in ["ties", "breadcrumbs", "breadcrumbs_ties"] {
            let m = PRESETS.iter().find(|p| p.name == name).expect("preset");
            let (whole, streamed) = both(m, &ts);
            let streamed = streamed.unwrap_or_else(|| panic!("{name} declined"));
            let diff = (0..n).filter(|&i| whole[i].to_bits() != streamed[i].to_bits()).count();
            assert_eq!(diff, 0, "{name}: {diff} elements differ");
        }
    }
}
