//! The whole-tensor path and the fused plain task-arithmetic kernel.

#[allow(unused_imports)]
use super::*;
use crate::merge::error::MergeError;

/// The divisor of the plain (no consensus) combination: Σᵢ wᵢ as an f32 sum in model order,
/// 1 when |Σᵢ wᵢ| < 1e-8 (mergekit's rule).
pub fn plain_divisor(weights: impl IntoIterator<Item = f32>) -> f32 {
    let wsum: f32 = weights.into_iter().sum();
    if wsum.abs() < 1e-8 { 1.0 } else { wsum }
}

/// Step 4–5 of the method for the plain (no consensus) combination.
#[derive(Clone, Copy)]
pub(super) struct Finish {
    normalize: bool,
    divisor: f32,
    lambda: f32,
}

/// Plain task arithmetic over `K` raw models in one pass per element:
/// `base + finish(((0 + (x₀ − base)·w₀) + (x₁ − base)·w₁) + …)`, the same f32 operations in the
/// same order as the general kernel (so the same bits), without its temporaries.
pub(super) fn fused_task_arithmetic<const K: usize>(base: &[f32], models: &[&[f32]], weights: &[f32], fin: Finish, out: &mut [f32]) {
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

pub(super) fn fused_loop<const K: usize>(base: &[f32], models: &[&[f32]], w: [f32; K], out: &mut [f32], finish: impl Fn(f32) -> f32 + Sync) {
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
pub(super) enum TaskVectors<'a> {
    /// Raw models: δᵢ = xᵢ − base computed on the fly.
    Models(&'a [&'a [f32]]),
    /// Sparsified task vectors.
    Sparsified(&'a [&'a [f32]]),
}

impl GeneralizedTaskArithmetic {
    pub(super) fn combine(&self, input: &MergeInput, base: &[f32], tv: TaskVectors, scales: &[f32], out: &mut [f32]) {
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
    pub(super) fn combine_parts(
        &self,
        params: &Params,
        model_params: &[Params],
        others: &[usize],
        base: &[f32],
        tv: TaskVectors,
        scales: &[f32],
        out: &mut [f32],
    ) {
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
    pub(super) fn stream_deltas(
        &self,
        input: &StreamInput,
        b: usize,
        others: &[usize],
        scratch: &mut Scratch,
        mut f: impl FnMut(usize, &mut [HugeBuf<f32>]) -> Result<(), MergeError>,
    ) -> Result<(), MergeError> {
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
