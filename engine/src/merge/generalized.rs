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

use rayon::prelude::*;

use crate::buffer::HugeBuf;

use super::base::{BaseRole, MergeInput, MergeMethod, ParamSpec, Scope, Scratch};
use super::rng::CounterRng;
use super::sparsify::{Sparsifier, sparsify};

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

    fn merge(&self, input: &MergeInput, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), String> {
        let base = input.base_tensor()?;
        let normalize = input.params.flag("normalize");
        let rescale = input.params.flag("rescale");
        let lambda = input.params.get("lambda") as f32;
        let weights: Vec<f32> = input.others().map(|(_, p)| p.get("weight") as f32).collect();
        // per-model L1 rescale factors of the sparsified task vectors (1 without rescale)
        let mut scales = vec![1f32; weights.len()];
        let rows = input.shape.first().copied().unwrap_or(1);
        // Task vectors: borrowed models when nothing is sparsified (fused below), else owned
        // sparsified deltas.
        let deltas: Option<&[HugeBuf<f32>]> = match self.sparsifier {
            None => None,
            Some(method) => {
                let bufs = scratch.buffers(weights.len(), base.len());
                for (i, ((x, p), d)) in input.others().zip(bufs.iter_mut()).enumerate() {
                    d.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(base.par_chunks(CHUNK))).for_each(|(d, (x, b))| {
                        d.iter_mut().zip(x.iter().zip(b)).for_each(|(o, (a, b))| *o = a - b);
                    });
                    let rng = CounterRng::new(input.seed, i as u64);
                    scales[i] = sparsify(d, rows, method, p.get("density"), p.get("gamma"), p.get("epsilon"), rescale, rng)?;
                }
                Some(&*bufs)
            }
        };
        let models: Vec<&[f32]> = input.others().map(|(x, _)| x).collect();
        let consensus = self.consensus;
        let wsum: f32 = weights.iter().sum();
        let plain_div = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
        let finish = |mixed: f32, divisor: f32| {
            let m = if normalize { mixed / divisor } else { mixed };
            if lambda != 1.0 { m * lambda } else { m }
        };
        // Model-major over a chunk: vectorizable loops, and f32 sums in model order, as
        // mergekit's `sum(dim=0)` (so deterministic presets stay bit-exact).
        // Temporaries are per worker (for_each_init), not per chunk: 100+ KB allocations per
        // chunk would be served by mmap and fault fresh pages every time.
        let k = weights.len();
        out.par_chunks_mut(CHUNK).enumerate().for_each_init(
            || (vec![0f32; k * CHUNK], vec![0f32; CHUNK], vec![0f32; CHUNK], vec![0f32; CHUNK]),
            |(dw, total, mixed, div), (c, o)| {
            let (s, len) = (c * CHUNK, o.len());
            let b = &base[s..s + len];
            let (dw, total, mixed, div) = (&mut dw[..k * len], &mut total[..len], &mut mixed[..len], &mut div[..len]);
            total.fill(0.0);
            for (i, (di, &w)) in dw.chunks_mut(len).zip(&weights).enumerate() {
                match deltas {
                    Some(ds) => {
                        let sc = scales[i];
                        if sc == 1.0 {
                            di.iter_mut().zip(&ds[i][s..s + len]).for_each(|(d, x)| *d = x * w);
                        } else {
                            di.iter_mut().zip(&ds[i][s..s + len]).for_each(|(d, x)| *d = (x * sc) * w);
                        }
                    }
                    None => di.iter_mut().zip(&models[i][s..s + len]).zip(b).for_each(|((d, x), y)| *d = (x - y) * w),
                }
                total.iter_mut().zip(di.iter()).for_each(|(t, d)| *t += d);
            }
            if consensus {
                // keep Dᵢ where its sign is the majority's (a zero, even -0, never matches)
                mixed.fill(0.0);
                div.fill(0.0);
                for (di, &w) in dw.chunks(len).zip(&weights) {
                    for j in 0..len {
                        let d = di[j];
                        let keep = if total[j] >= 0.0 { d > 0.0 } else { d < 0.0 };
                        mixed[j] += if keep { d } else { 0.0 };
                        div[j] += if keep { w } else { 0.0 };
                    }
                }
                for j in 0..len {
                    o[j] = b[j] + finish(mixed[j], if div[j] == 0.0 { 1.0 } else { div[j] });
                }
            } else {
                for j in 0..len {
                    o[j] = b[j] + finish(total[j], plain_div);
                }
            }
        });
        Ok(())
    }
}
