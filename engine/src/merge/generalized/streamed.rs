//! The streamed path: chunks of the memory-mapped inputs, rank cuts and the consensus kernels.

#[allow(unused_imports)]
use super::*;
use crate::merge::error::MergeError;

impl GeneralizedTaskArithmetic {
    /// Rank-based sparsifiers: materialize and sparsify δᵢ, then stream the combination.
    pub(super) fn stream_materialized(
        &self,
        input: &StreamInput,
        method: Sparsifier,
        b: usize,
        others: &[usize],
        scratch: &mut Scratch,
        sink: &mut ChunkSink,
    ) -> Result<(), MergeError> {
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
    pub(super) fn stream_topk<const K: usize>(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        sink: &mut ChunkSink,
    ) -> Result<(), MergeError> {
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
    pub(super) fn stream_combine<const K: usize>(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        sparsify: impl Fn(usize, usize, usize, &mut [f32]) + Sync,
        sink: &mut ChunkSink,
    ) -> Result<(), MergeError> {
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
    pub(super) fn stream_dare<const K: usize>(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        sink: &mut ChunkSink,
    ) -> Result<(), MergeError> {
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
    pub(super) fn stream_random(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        scratch: &mut Scratch,
        sink: &mut ChunkSink,
    ) -> Result<(), MergeError> {
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
pub(super) const SUB: usize = 1 << 14;

thread_local! {
    /// Per-thread decoded inputs and task vectors of one sub-chunk.
    static STREAM_TMP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f(base, scratch)` on the calling thread's sub-chunk buffers ([`STREAM_TMP`], reused):
/// `base` holds input `b`'s elements `from .. from + len`, decoded; `scratch` is `extra` further
/// buffers of [`SUB`] elements each.
pub(super) fn with_sub_chunk<R>(input: &StreamInput, b: usize, from: usize, len: usize, extra: usize, f: impl FnOnce(&[f32], &mut [f32]) -> R) -> R {
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
pub(super) fn read_delta(input: &StreamInput, i: usize, from: usize, base: &[f32], d: &mut [f32]) {
    input.reader.read(i, from, d);
    d.iter_mut().zip(base).for_each(|(x, y)| *x -= y);
}

/// One model's magnitude cut for [`GeneralizedTaskArithmetic::stream_topk`]: keep the keys
/// (`|δ|` bits) above `key`, and of the elements whose key equals `key`, those with a 0-based
/// occurrence number (in index order) of at least `drop`.
#[derive(Debug, Clone)]
pub(super) struct Cut {
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
    pub(super) fn new(key: u32, drop: usize, ties: &[usize]) -> Self {
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
    pub(super) fn apply(&self, s: usize, d: &mut [f32]) {
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
pub(super) struct Combine<const K: usize> {
    weights: [f32; K],
    consensus: bool,
    normalize: bool,
    lambda: f32,
    plain_div: f32,
}

impl<const K: usize> Combine<K> {
    pub(super) fn new(params: &Params, weights: &[f32; K], consensus: bool) -> Self {
        Combine {
            weights: *weights,
            consensus,
            normalize: params.flag("normalize"),
            lambda: params.get("lambda") as f32,
            plain_div: plain_divisor(weights.iter().copied()),
        }
    }

    pub(super) fn run(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32]) {
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

    pub(super) fn elect(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32], finish: impl Fn(f32, f32) -> f32) {
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

    pub(super) fn elect_plain(&self, base: &[f32], ds: [&[f32]; K], out: &mut [f32], finish: impl Fn(f32) -> f32) {
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
pub(super) fn apply_random(d: &mut [f32], start: usize, density: f64, rng: CounterRng) {
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
pub(super) fn l1_sums(d: &[f32], start: usize, density: f64, rng: CounterRng) -> (f64, f64) {
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
