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

use super::base::{BaseRole, ChunkSink, MergeInput, MergeMethod, ParamSpec, Params, STREAM_CHUNK, Scope, Scratch, StreamInput, stream_elementwise};
use super::select::{RankSearch, SMALL, gather, key, sample_positions};
use super::rng::CounterRng;
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

    fn merge(&self, input: &MergeInput, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), String> {
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
    fn merge_streaming(&self, input: &StreamInput, scratch: &mut Scratch, sink: &mut ChunkSink) -> Result<bool, String> {
        let Some(method) = self.sparsifier else {
            stream_elementwise(self, input, scratch, sink)?;
            return Ok(true);
        };
        let b = input.base.ok_or("needs a base_model")?;
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

impl GeneralizedTaskArithmetic {
    /// Rank-based sparsifiers: materialize and sparsify δᵢ, then stream the combination.
    fn stream_materialized(&self, input: &StreamInput, method: Sparsifier, b: usize, others: &[usize], scratch: &mut Scratch, sink: &mut ChunkSink) -> Result<(), String> {
        let n = input.numel();
        let k = others.len();
        let rescale = input.params.flag("rescale");
        let rows = input.shape.first().copied().unwrap_or(1);
        let (deltas, chunks) = scratch.split(k, n, 2, STREAM_CHUNK.min(n.max(1)));
        let (base, out) = chunks.split_at_mut(1);
        let (base, out) = (&mut base[0], &mut out[0]);
        let mut start = 0;
        while start < n {
            let len = STREAM_CHUNK.min(n - start);
            base.resize(len);
            input.reader.read(b, start, base);
            for (d, &i) in deltas.iter_mut().zip(others) {
                let d = &mut d[start..start + len];
                input.reader.read(i, start, d);
                d.par_chunks_mut(CHUNK).zip(base.par_chunks(CHUNK)).for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(x, y)| *x -= y));
            }
            start += len;
        }
        let mut scales = vec![1f32; k];
        for (slot, (d, &i)) in deltas.iter_mut().zip(others).enumerate() {
            let p = &input.model_params[i];
            let rng = CounterRng::new(input.seed, slot as u64);
            scales[slot] = sparsify(d, rows, method, p.get("density"), p.get("gamma"), p.get("epsilon"), rescale, rng)?;
        }
        let mut start = 0;
        while start < n {
            let len = STREAM_CHUNK.min(n - start);
            base.resize(len);
            out.resize(len);
            input.reader.read(b, start, base);
            let view: Vec<&[f32]> = deltas.iter().map(|d| &d[start..start + len]).collect();
            self.combine_parts(input.params, input.model_params, others, base, TaskVectors::Sparsified(&view), &scales, out);
            sink(out)?;
            start += len;
        }
        Ok(())
    }

    /// TIES' magnitude top-k (no rescale) on a large tensor in two streaming passes, without
    /// task-vector buffers: δᵢ = xᵢ − base is recomputed from the inputs in L2-sized
    /// sub-chunks, which reads fewer bytes than writing and rereading f32 buffers and never
    /// touches fresh memory (the embedding's δ buffers alone were 1.1 GB).
    ///
    /// Pass 1 finds each model's cut, the key at ascending rank `r = n − k` of `|δᵢ|`, by the
    /// sample-bracketed selection of [`super::select`], keeping the in-bracket keys of every
    /// sub-chunk so that the ties at the cut can be numbered in index order afterwards.
    /// Pass 2 keeps the keys above the cut and the ties whose stable rank is ≥ `r` (the same
    /// elements as [`sparsify`]), and combines exactly as [`Self::combine_parts`]: the output
    /// equals the whole-tensor path bit for bit.
    fn stream_topk<const K: usize>(&self, input: &StreamInput, b: usize, others: &[usize], sink: &mut ChunkSink) -> Result<(), String> {
        let n = input.numel();
        let nsub = n.div_ceil(SUB);
        let mut cuts = [Cut::ALL; K];
        let mut searches: Vec<(usize, RankSearch)> = Vec::new();
        let positions = sample_positions(n);
        let mut base_sample = vec![0f32; positions.len()];
        input.reader.read_points(b, &positions, &mut base_sample);
        for (slot, &i) in others.iter().enumerate() {
            let density = input.model_params[i].get("density");
            if density >= 1.0 {
                continue;
            }
            if density <= 0.0 {
                cuts[slot] = Cut::NONE;
                continue;
            }
            let (r, _) = window(Sparsifier::Magnitude, n, density, 0.0);
            if r == 0 {
                continue;
            }
            let mut sample = vec![0f32; positions.len()];
            input.reader.read_points(i, &positions, &mut sample);
            let mut keys: Vec<u32> = sample.iter().zip(&base_sample).map(|(x, y)| key(x - y)).collect();
            keys.sort_unstable();
            searches.push((slot, RankSearch::new(&keys, n, r)));
        }
        // pass 1, repeated for the (rare) searches whose rank fell outside their bracket
        while !searches.is_empty() {
            let brackets: Vec<(u32, u32)> = searches.iter().map(|(_, s)| s.bracket()).collect();
            let slots: Vec<usize> = searches.iter().map(|(slot, _)| *slot).collect();
            // per sub-chunk, per search: (keys below the bracket, keys inside it in index order)
            let parts: Vec<Vec<(usize, Vec<u32>)>> = (0..nsub)
                .into_par_iter()
                .map(|s| {
                    let (from, len) = (s * SUB, SUB.min(n - s * SUB));
                    with_sub_chunk(input, b, from, len, 2, |y, rest| {
                        let (d, hits) = rest.split_at_mut(SUB);
                        let d = &mut d[..len];
                        let hits: &mut [u32] = bytemuck::cast_slice_mut(hits);
                        slots
                            .iter()
                            .zip(&brackets)
                            .map(|(&slot, &(lo, hi))| {
                                read_delta(input, others[slot], from, y, d);
                                let (below, m) = gather(d, lo, hi, hits);
                                (below, hits[..m].to_vec())
                            })
                            .collect()
                    })
                })
                .collect();
            let mut missed = Vec::new();
            for (j, (slot, mut search)) in searches.into_iter().enumerate() {
                let below: usize = parts.iter().map(|p| p[j].0).sum();
                let inside: Vec<u32> = parts.iter().flat_map(|p| p[j].1.iter().copied()).collect();
                search.add(below, &inside);
                match search.resolve() {
                    Some(rk) => {
                        let ties: Vec<usize> = parts.iter().map(|p| p[j].1.iter().filter(|&&k| k == rk.key).count()).collect();
                        cuts[slot] = Cut::new(rk.key, search.rank() - rk.below, &ties);
                    }
                    None => {
                        search.widen();
                        missed.push((slot, search));
                    }
                }
            }
            searches = missed;
        }
        // pass 2: sparsify, weight, elect and combine per sub-chunk, emit per chunk
        self.stream_combine::<K>(input, b, others, |slot, s, _, d| cuts[slot].apply(s, d), sink)
    }

    /// Pass 2 of the fused paths ([`Self::stream_topk`], [`Self::stream_dare`]): per L2-sized
    /// sub-chunk (in parallel), δᵢ = xᵢ − base is decoded, `sparsify(slot, sub-chunk index,
    /// first element, δ)` edits it in place, and the sub-chunk is weighted, elected and
    /// combined ([`Combine`]); the output goes to `sink` chunk by chunk, in order.
    fn stream_combine<const K: usize>(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        sparsify: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
        sink: &mut ChunkSink,
    ) -> Result<(), String> {
        let n = input.numel();
        let weights: [f32; K] = std::array::from_fn(|slot| input.model_params[others[slot]].get("weight") as f32);
        let combine = Combine::new(input.params, &weights, self.consensus);
        let mut out = vec![0f32; STREAM_CHUNK.min(n)];
        let mut start = 0;
        while start < n {
            let len = STREAM_CHUNK.min(n - start);
            out[..len].par_chunks_mut(SUB).enumerate().for_each(|(c, o)| {
                let (from, len, s) = (start + c * SUB, o.len(), start / SUB + c);
                with_sub_chunk(input, b, from, len, K, |y, ds| {
                    for (slot, d) in ds.chunks_mut(SUB).enumerate() {
                        let d = &mut d[..len];
                        read_delta(input, others[slot], from, y, d);
                        sparsify(slot, s, from, d);
                    }
                    let ds: [&[f32]; K] = std::array::from_fn(|slot| &ds[slot * SUB..slot * SUB + len]);
                    combine.run(y, ds, o);
                })
            });
            sink(&out[..len])?;
            start += len;
        }
        Ok(())
    }

    /// DARE for up to four task vectors, fused per L2-sized sub-chunk like
    /// [`Self::stream_topk`]: pass 1 (only with `rescale`) sums |δ| and the kept |δ| per
    /// sub-chunk (f64, added in sub-chunk order: the same factors whatever the thread count),
    /// pass 2 redraws the same counter-based masks, rescales, weights and combines with the
    /// f32 operations of [`Self::combine_parts`].
    fn stream_dare<const K: usize>(&self, input: &StreamInput, b: usize, others: &[usize], sink: &mut ChunkSink) -> Result<(), String> {
        let n = input.numel();
        let nsub = n.div_ceil(SUB);
        let masks: [(f64, CounterRng); K] =
            std::array::from_fn(|slot| (input.model_params[others[slot]].get("density"), CounterRng::new(input.seed, slot as u64)));
        let mut scales = [1f32; K];
        if input.params.flag("rescale") {
            let sums: Vec<[(f64, f64); K]> = (0..nsub)
                .into_par_iter()
                .map(|s| {
                    let (from, len) = (s * SUB, SUB.min(n - s * SUB));
                    with_sub_chunk(input, b, from, len, 1, |y, d| {
                        let d = &mut d[..len];
                        std::array::from_fn(|slot| {
                            let (density, rng) = masks[slot];
                            if density >= 1.0 {
                                return (0.0, 0.0);
                            }
                            read_delta(input, others[slot], from, y, d);
                            l1_sums(d, from, density, rng)
                        })
                    })
                })
                .collect();
            for slot in 0..K {
                let (before, after) = sums.iter().fold((0f64, 0f64), |(a, b), s| (a + s[slot].0, b + s[slot].1));
                if masks[slot].0 < 1.0 && before >= 1e-7 && after >= 1e-7 {
                    scales[slot] = before as f32 / after as f32;
                }
            }
        }
        self.stream_combine::<K>(
            input,
            b,
            others,
            |slot, _, from, d| {
                let (density, rng) = masks[slot];
                apply_random(d, from, density, rng);
                let sc = scales[slot];
                if sc != 1.0 {
                    d.iter_mut().for_each(|v| *v *= sc);
                }
            },
            sink,
        )
    }

    /// DARE in two streaming passes (see [`MergeMethod::merge_streaming`]).
    fn stream_random(&self, input: &StreamInput, b: usize, others: &[usize], scratch: &mut Scratch, sink: &mut ChunkSink) -> Result<(), String> {
        let k = others.len();
        let masks: Vec<(f64, CounterRng)> =
            (0..k).map(|slot| (input.model_params[others[slot]].get("density"), CounterRng::new(input.seed, slot as u64))).collect();
        let mut scales = vec![1f32; k];
        if input.params.flag("rescale") {
            let mut l1 = vec![(0f64, 0f64); k];
            self.stream_deltas(input, b, others, scratch, |start, ds| {
                for (slot, d) in ds[..k].iter().enumerate() {
                    let (density, rng) = masks[slot];
                    if density < 1.0 {
                        let (before, after) = l1_sums(d, start, density, rng);
                        l1[slot].0 += before;
                        l1[slot].1 += after;
                    }
                }
                Ok(())
            })?;
            for (slot, (before, after)) in l1.into_iter().enumerate() {
                if before >= 1e-7 && after >= 1e-7 {
                    scales[slot] = before as f32 / after as f32;
                }
            }
        }
        // pass 2 (the base chunk rides in slot k, the output in slot k + 1)
        self.stream_deltas(input, b, others, scratch, |start, ds| {
            let len = ds[0].len();
            let (ds, out) = ds.split_at_mut(k + 1);
            for (d, &(density, rng)) in ds[..k].iter_mut().zip(&masks) {
                apply_random(d, start, density, rng);
            }
            let view: Vec<&[f32]> = ds.iter().map(|d| &d[..]).collect();
            self.combine_parts(input.params, input.model_params, others, view[k], TaskVectors::Sparsified(&view[..k]), &scales, &mut out[0][..len]);
            sink(&out[0][..len])
        })
    }
}

/// Elements per sub-chunk of [`GeneralizedTaskArithmetic::stream_topk`]: the sub-chunk's
/// inputs and task vectors stay in L2.
const SUB: usize = 1 << 14;

thread_local! {
    /// Per-thread decoded inputs and task vectors of one sub-chunk.
    static STREAM_TMP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f(base, scratch)` on the calling thread's sub-chunk buffers ([`STREAM_TMP`], reused):
/// `base` holds input `b`'s elements `from .. from + len`, decoded; `scratch` is `extra` further
/// buffers of [`SUB`] elements each.
fn with_sub_chunk<R>(input: &StreamInput, b: usize, from: usize, len: usize, extra: usize, f: impl FnOnce(&[f32], &mut [f32]) -> R) -> R {
    STREAM_TMP.with_borrow_mut(|tmp| {
        tmp.resize((extra + 1) * SUB, 0.0);
        let (y, rest) = tmp.split_at_mut(SUB);
        let y = &mut y[..len];
        input.reader.read(b, from, y);
        f(y, rest)
    })
}

/// δ = x − base for elements `from .. from + d.len()` of input `i` (a sub-chunk, sequential:
/// the caller is one of many parallel sub-chunks), with `base` already decoded.
fn read_delta(input: &StreamInput, i: usize, from: usize, base: &[f32], d: &mut [f32]) {
    input.reader.read(i, from, d);
    d.iter_mut().zip(base).for_each(|(x, y)| *x -= y);
}

/// One model's magnitude cut for [`GeneralizedTaskArithmetic::stream_topk`]: keep the keys
/// (`|δ|` bits) above `key`, and of the elements whose key equals `key`, those with a 0-based
/// occurrence number (in index order) of at least `drop`.
#[derive(Debug, Clone)]
struct Cut {
    key: u32,
    drop: usize,
    /// Per sub-chunk: (ties before it, ties in it); empty when no tie needs numbering.
    ties: Vec<(usize, usize)>,
}

impl Cut {
    /// Keeps everything.
    const ALL: Cut = Cut { key: 0, drop: 0, ties: Vec::new() };
    /// Keeps nothing (keys never reach `u32::MAX`: `|x|` clears the sign bit).
    const NONE: Cut = Cut { key: u32::MAX, drop: usize::MAX, ties: Vec::new() };

    /// `ties[s]`: elements of sub-chunk `s` whose key is `key`.
    fn new(key: u32, drop: usize, ties: &[usize]) -> Self {
        let total: usize = ties.iter().sum();
        // a ±0 kept or dropped is the same value; all or no ties kept needs no numbering
        if key == 0 || drop == 0 || drop >= total {
            return Cut { key: if drop >= total { key + 1 } else { key }, drop: 0, ties: Vec::new() };
        }
        let mut before = 0;
        let ties = ties
            .iter()
            .map(|&t| {
                before += t;
                (before - t, t)
            })
            .collect();
        Cut { key, drop, ties }
    }

    /// Zeroes the dropped elements of sub-chunk `s` (its task vector `d`).
    fn apply(&self, s: usize, d: &mut [f32]) {
        let (before, here) = self.ties.get(s).copied().unwrap_or((self.drop, 0));
        // every tie in this sub-chunk kept (or none present): keep keys ≥ cut; none kept: > cut
        if here == 0 || before >= self.drop {
            let cut = self.key;
            d.iter_mut().for_each(|v| *v = if key(*v) >= cut { *v } else { 0.0 });
        } else if before + here <= self.drop {
            let cut = self.key;
            d.iter_mut().for_each(|v| *v = if key(*v) > cut { *v } else { 0.0 });
        } else {
            let mut occ = before;
            for v in d.iter_mut() {
                let k = key(*v);
                let keep = k > self.key || (k == self.key && occ >= self.drop);
                occ += (k == self.key) as usize;
                if !keep {
                    *v = 0.0;
                }
            }
        }
    }
}

/// Steps 2–5 (weight, elect, normalize, λ) for `K` sparsified task vectors, element by
/// element, with the f32 operations of [`GeneralizedTaskArithmetic::combine_parts`] in its
/// order (so the same bits).
struct Combine<const K: usize> {
    weights: [f32; K],
    consensus: bool,
    normalize: bool,
    lambda: f32,
    plain_div: f32,
}

impl<const K: usize> Combine<K> {
    fn new(params: &Params, weights: &[f32; K], consensus: bool) -> Self {
        Combine {
            weights: *weights,
            consensus,
            normalize: params.flag("normalize"),
            lambda: params.get("lambda") as f32,
            plain_div: plain_divisor(weights.iter().copied()),
        }
    }

    fn run(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32]) {
        let (normalize, lambda) = (self.normalize, self.lambda);
        // one monomorphic loop per case, so that each vectorizes
        match (self.consensus, normalize, lambda != 1.0) {
            (true, false, false) => self.elect(base, ds, out, |m, _| m),
            (true, false, true) => self.elect(base, ds, out, |m, _| m * lambda),
            (true, true, false) => self.elect(base, ds, out, |m, div| m / div),
            (true, true, true) => self.elect(base, ds, out, |m, div| (m / div) * lambda),
            (false, _, _) => {
                let div = self.plain_div;
                self.elect_plain(base, ds, out, |m| {
                    let m = if normalize { m / div } else { m };
                    if lambda != 1.0 { m * lambda } else { m }
                })
            }
        }
    }

    fn elect(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32], finish: impl Fn(f32, f32) -> f32) {
        let w = self.weights;
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let d: [f32; K] = std::array::from_fn(|i| ds[i][j] * w[i]);
            let mut total = 0.0f32;
            for di in d {
                total += di;
            }
            let (mut mixed, mut div) = (0.0f32, 0.0f32);
            for i in 0..K {
                let keep = if total >= 0.0 { d[i] > 0.0 } else { d[i] < 0.0 };
                mixed += if keep { d[i] } else { 0.0 };
                div += if keep { w[i] } else { 0.0 };
            }
            *o = b + finish(mixed, if div == 0.0 { 1.0 } else { div });
        }
    }

    fn elect_plain(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32], finish: impl Fn(f32) -> f32) {
        let w = self.weights;
        for (j, (o, &b)) in out.iter_mut().zip(base).enumerate() {
            let mut total = 0.0f32;
            for i in 0..K {
                total += ds[i][j] * w[i];
            }
            *o = b + finish(total);
        }
    }
}

/// Zeroes the elements of a chunk (starting at element `start`) that DARE drops; density ≥ 1
/// keeps all, ≤ 0 drops all (as [`sparsify`]).
fn apply_random(d: &mut [f32], start: usize, density: f64, rng: CounterRng) {
    if density >= 1.0 {
        return;
    }
    if density <= 0.0 {
        d.fill(0.0);
        return;
    }
    d.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut keep = [false; CHUNK];
        rng.keep_run((start + c * CHUNK) as u64, density, &mut keep[..chunk.len()]);
        chunk.iter_mut().zip(keep).for_each(|(v, k)| *v = if k { *v } else { 0.0 });
    })
}

/// `(Σ|δ|, Σ|δ| over the kept elements)` of a chunk starting at element `start`.
fn l1_sums(d: &[f32], start: usize, density: f64, rng: CounterRng) -> (f64, f64) {
    d.par_chunks(CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let mut keep = [false; CHUNK];
            rng.keep_run((start + c * CHUNK) as u64, density, &mut keep[..chunk.len()]);
            chunk.iter().zip(keep).fold((0f64, 0f64), |(a, b), (v, k)| {
                let x = v.abs() as f64;
                (a + x, if k { b + x } else { b })
            })
        })
        .reduce(|| (0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1))
}

/// The divisor of the plain (no consensus) combination: Σᵢ wᵢ as an f32 sum in model order,
/// 1 when |Σᵢ wᵢ| < 1e-8 (mergekit's rule).
pub fn plain_divisor(weights: impl IntoIterator<Item = f32>) -> f32 {
    let wsum: f32 = weights.into_iter().sum();
    if wsum.abs() < 1e-8 { 1.0 } else { wsum }
}

/// Step 4–5 of the method for the plain (no consensus) combination.
#[derive(Clone, Copy)]
struct Finish {
    normalize: bool,
    divisor: f32,
    lambda: f32,
}

/// Plain task arithmetic over `K` raw models in one pass per element:
/// `base + finish(((0 + (x₀ − base)·w₀) + (x₁ − base)·w₁) + …)`, the same f32 operations in the
/// same order as the general kernel (so the same bits), without its temporaries.
fn fused_task_arithmetic<const K: usize>(base: &[f32], models: &[&[f32]], weights: &[f32], fin: Finish, out: &mut [f32]) {
    let w: [f32; K] = std::array::from_fn(|i| weights[i]);
    // one monomorphic loop per case, so that each vectorizes
    let Finish { normalize, divisor, lambda } = fin;
    match (normalize, lambda != 1.0) {
        (false, false) => fused_loop(base, models, w, out, |t| t),
        (false, true) => fused_loop(base, models, w, out, |t| t * lambda),
        (true, false) => fused_loop(base, models, w, out, |t| t / divisor),
        (true, true) => fused_loop(base, models, w, out, |t| (t / divisor) * lambda),
    }
}

fn fused_loop<const K: usize>(base: &[f32], models: &[&[f32]], w: [f32; K], out: &mut [f32], finish: impl Fn(f32) -> f32 + Sync) {
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let (s, n) = (c * CHUNK, o.len());
        let b = &base[s..s + n];
        let xs: [&[f32]; K] = std::array::from_fn(|i| &models[i][s..s + n]);
        for (j, (o, &b)) in o.iter_mut().zip(b).enumerate() {
            let mut t = 0.0f32;
            for i in 0..K {
                t += (xs[i][j] - b) * w[i];
            }
            *o = b + finish(t);
        }
    })
}

thread_local! {
    /// Per-thread kernel temporaries (see [`GeneralizedTaskArithmetic::combine_parts`]).
    static KERNEL_TMP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Task vectors as a kernel sees them.
#[derive(Clone, Copy)]
enum TaskVectors<'a> {
    /// Raw models: δᵢ = xᵢ − base computed on the fly.
    Models(&'a [&'a [f32]]),
    /// Sparsified task vectors.
    Sparsified(&'a [&'a [f32]]),
}

impl GeneralizedTaskArithmetic {
    fn combine(&self, input: &MergeInput, base: &[f32], tv: TaskVectors, scales: &[f32], out: &mut [f32]) {
        let others: Vec<usize> = (0..input.tensors.len()).filter(|&i| Some(i) != input.base).collect();
        self.combine_parts(&input.params, &input.model_params, &others, base, tv, scales, out);
    }

    /// Weighting, sign consensus, normalization and λ over one span of elements.
    ///
    /// Model-major per chunk: vectorizable loops, and f32 sums in model order, as mergekit's
    /// `sum(dim=0)` (so deterministic presets stay bit-exact). Temporaries live in a
    /// thread-local buffer reused across calls: 100+ KB allocations per chunk would be served
    /// by mmap and fault in fresh pages every time.
    #[allow(clippy::too_many_arguments)]
    fn combine_parts(&self, params: &Params, model_params: &[Params], others: &[usize], base: &[f32], tv: TaskVectors, scales: &[f32], out: &mut [f32]) {
        let normalize = params.flag("normalize");
        let lambda = params.get("lambda") as f32;
        let weights: Vec<f32> = others.iter().map(|&i| model_params[i].get("weight") as f32).collect();
        let consensus = self.consensus;
        let plain_div = plain_divisor(weights.iter().copied());
        let finish = |mixed: f32, divisor: f32| {
            let m = if normalize { mixed / divisor } else { mixed };
            if lambda != 1.0 { m * lambda } else { m }
        };
        let k = weights.len();
        if let (false, TaskVectors::Models(ms)) = (consensus, tv) {
            let fin = Finish { normalize, divisor: plain_div, lambda };
            match k {
                1 => return fused_task_arithmetic::<1>(base, ms, &weights, fin, out),
                2 => return fused_task_arithmetic::<2>(base, ms, &weights, fin, out),
                3 => return fused_task_arithmetic::<3>(base, ms, &weights, fin, out),
                4 => return fused_task_arithmetic::<4>(base, ms, &weights, fin, out),
                _ => {}
            }
        }
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            KERNEL_TMP.with_borrow_mut(|tmp| {
                tmp.resize((k + 3) * CHUNK, 0.0);
                let (s, len) = (c * CHUNK, o.len());
                let b = &base[s..s + len];
                let (dw, rest) = tmp.split_at_mut(k * CHUNK);
                let (total, rest) = rest.split_at_mut(CHUNK);
                let (mixed, div) = rest.split_at_mut(CHUNK);
                let (dw, total, mixed, div) = (&mut dw[..k * len], &mut total[..len], &mut mixed[..len], &mut div[..len]);
                total.fill(0.0);
                for (i, (di, &w)) in dw.chunks_mut(len).zip(&weights).enumerate() {
                    match tv {
                        TaskVectors::Sparsified(ds) => {
                            let sc = scales[i];
                            if sc == 1.0 {
                                di.iter_mut().zip(&ds[i][s..s + len]).for_each(|(d, x)| *d = x * w);
                            } else {
                                di.iter_mut().zip(&ds[i][s..s + len]).for_each(|(d, x)| *d = (x * sc) * w);
                            }
                        }
                        TaskVectors::Models(ms) => di.iter_mut().zip(&ms[i][s..s + len]).zip(b).for_each(|((d, x), y)| *d = (x - y) * w),
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
            })
        });
    }

    /// Streams the task vectors chunk by chunk: `f(start, ds)` gets δ for every model in
    /// `others` (slots `0..k`), the base chunk itself (slot `k`) and a free buffer (slot `k+1`).
    fn stream_deltas(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        scratch: &mut Scratch,
        mut f: impl FnMut(usize, &mut [HugeBuf<f32>]) -> Result<(), String>,
    ) -> Result<(), String> {
        let n = input.numel();
        let k = others.len();
        let bufs = scratch.buffers(k + 2, STREAM_CHUNK);
        let mut start = 0;
        while start < n {
            let len = STREAM_CHUNK.min(n - start);
            for buf in bufs.iter_mut() {
                buf.resize(len);
            }
            let (ds, base) = bufs[..k + 1].split_at_mut(k);
            input.reader.read(b, start, &mut base[0]);
            for (d, &i) in ds.iter_mut().zip(others) {
                input.reader.read(i, start, d);
                d.par_chunks_mut(CHUNK).zip(base[0].par_chunks(CHUNK)).for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(x, y)| *x -= y));
            }
            f(start, bufs)?;
            start += len;
        }
        Ok(())
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
    fn whole_and_streamed(m: &GeneralizedTaskArithmetic, ts: &[Vec<f32>], g: &Params, mp: &[Params], shape: &[usize]) -> (Vec<f32>, Option<Vec<f32>>) {
        let input = MergeInput { tensor: "t", shape, tensors: ts.iter().map(Vec::as_slice).collect(), base: Some(0), model_params: mp.to_vec(), params: g.clone(), seed: 9 };
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
                assert!(diff.is_empty(), "{}: {} elements differ, first at {:?}: {:?} vs {:?}", m.name, diff.len(), diff.first(),
                    diff.first().map(|&i| whole[i]), diff.first().map(|&i| streamed[i]));
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
