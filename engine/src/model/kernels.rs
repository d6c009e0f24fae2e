//! Backend-specific fast paths of the forward pass.
//!
//! burn-ndarray multiplies through `matrixmultiply`, which packs the whole right-hand matrix
//! on every call and splits work by rows: for decoding (one to a few rows against a weight
//! matrix) that means a single thread re-copying every weight. [`Kernels::linear`] gives the CPU
//! backend a row-streaming kernel for one or two rows: each thread owns a band of output
//! columns and reads each weight row segment once for all input rows (eight weight rows per
//! pass). Above two rows, [`banded_gemm`] runs the `gemm` crate (candle's GEMM) on fixed-width
//! column bands in parallel: matrixmultiply parallelizes a few-dozen-row product poorly on two
//! cores (one thread packs, bands of rows are too short to share). Measured in
//! `scripts/bench-forward` and `scripts/bench-loop` (BENCHMARKS.md).
//!
//! The CPU backend also packs a pass ([`Kernels::PACKED`]): its per-token work (norms, linears,
//! the MLP) runs on the real tokens only, padding left out ([`Packing`]); only the keys and
//! values keep the padded `[b, kv, t, d]` layout of the cache. Its attention takes the queries
//! token-major, straight from the q|k|v projection ([`Kernels::qkv_heads`]), and reads every
//! tensor in place ([`Host`]) rather than copying it to the host per layer.

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Largest row count the small-`m` kernel takes; above it [`banded_gemm`] is faster (0.5 B
/// model's linears per forward, 2 cores: 1 row 0.094 s against 0.115 s, 2 rows 0.106 against
/// 0.125 s, 3 rows 0.128 against 0.119 s, 8 rows 0.21 against 0.16 s).
const SMALL_M: usize = 2;

/// Output columns per task of [`banded_gemm`]. Fixed, not derived from the thread count, so
/// every output element comes from the same `gemm` call shape on any machine size (the result
/// does not depend on `--threads`).
const GEMM_BAND: usize = 256;

/// Narrower bands for products with fewer than [`GEMM_NARROW_BELOW`] columns: 896 columns in
/// bands of 256 are 4 tasks of unequal width (one thread idles a quarter of the time on two
/// cores). Measured, 240 rows on 2 cores (GFLOP/s, bands of 256 → 64): 896 columns
/// 165–180 → 200–204, 1,152 columns 186 → 209, the MLP's down projection (k 4,864) 170–175 →
/// 191–197; 9,728 columns 181–186 → 176–177, so wide products keep 256.
const GEMM_BAND_NARROW: usize = 64;
const GEMM_NARROW_BELOW: usize = 4096;

/// A bf16 copy of a linear weight for [`small_m_matmul`], made by the CPU backend on the first
/// few-row product after each change of the weight (the runtime drops it on every write), and
/// only when every value is exactly a bf16 — weights read from a bf16 checkpoint or merged
/// candidates rounded to bf16. The kernel then reads half the bytes and computes the same
/// products in the same order: the output is bit-identical to the f32 weight's. Costs half the
/// f32 weight's memory while it lives (1 GB for a 0.5 B model); an f32 checkpoint's weights
/// get no copy (`None` is remembered, so the check runs once).
#[derive(Debug, Default)]
pub(crate) struct HalfCopy(OnceLock<Option<Vec<u16>>>);

impl HalfCopy {
    /// The bf16 bits of `w`, made on first use; `None` if some value is not exactly a bf16.
    fn get(&self, w: &[f32]) -> Option<&[u16]> {
        // Check first, then convert straight into one buffer: no per-chunk parts to concatenate
        // (which held the copy twice at its peak).
        self.0
            .get_or_init(|| w.par_iter().all(|v| v.to_bits() & 0xffff == 0).then(|| w.par_iter().map(|v| (v.to_bits() >> 16) as u16).collect()))
            .as_deref()
    }
}

/// A shared root's keys and values `[1, kv, len, d]` and its mask, for [`Kernels::attention`].
pub(crate) struct Root<'a, B: Backend> {
    pub k: &'a Tensor<B, 4>,
    pub v: &'a Tensor<B, 4>,
    pub mask: Option<Tensor<B, 5>>,
}

/// The inputs of [`Kernels::attention`].
pub(crate) struct Attention<'a, B: Backend> {
    /// The queries as [`Kernels::qkv_heads`] made them (the backend's own layout).
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub mask: Tensor<B, 5>,
    pub root: Option<Root<'a, B>>,
    pub scale: f64,
    pub g: usize,
    pub packing: &'a Packing,
}

/// Which tokens of a forward batch `[b, s]` the per-token work runs on: every position, or, on
/// a backend that packs ([`Kernels::PACKED`]), only the real tokens (a right-padded scoring
/// pass of rows of unequal length, the left-padded prompts of a generation).
pub(crate) struct Packing {
    pub b: usize,
    pub s: usize,
    /// Per packed token, its index `r·s + i` in the batch, ascending.
    pub at: Vec<usize>,
    /// Row `r`'s packed tokens are `row[r] .. row[r + 1]`.
    pub row: Vec<usize>,
}

impl Packing {
    /// `real`: which positions `[b, s]` are tokens (`None`: all); `pack`: leave the others out.
    pub fn new(b: usize, s: usize, real: Option<&[bool]>, pack: bool) -> Self {
        let at: Vec<usize> = match real {
            Some(real) if pack => (0..b * s).filter(|&p| real[p]).collect(),
            _ => (0..b * s).collect(),
        };
        let mut row = vec![0usize; b + 1];
        for &p in &at {
            row[p / s.max(1) + 1] += 1;
        }
        for r in 0..b {
            row[r + 1] += row[r];
        }
        Self { b, s, at, row }
    }

    /// Tokens the per-token work runs on.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// The packed row of batch index `r·s + i`, `None` for padding.
    pub fn packed_index(&self, p: usize) -> Option<usize> {
        if self.at.len() == self.b * self.s {
            return Some(p).filter(|&p| p < self.at.len());
        }
        self.at.binary_search(&p).ok()
    }
}

/// The inputs of [`Kernels::qkv_heads`].
pub(crate) struct Heads<'a, B: Backend> {
    pub packing: &'a Packing,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// RoPE tables `[b·s, head_dim/2]`.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// The same as tensors `[b, 1, s, head_dim/2]`, for a backend that does not pack (made
    /// once per pass; uploaded here if missing).
    pub tables: Option<&'a (Tensor<B, 4>, Tensor<B, 4>)>,
    /// Per-head RMSNorm weights of queries and keys (Qwen3).
    pub norms: Option<(&'a Tensor<B, 1>, &'a Tensor<B, 1>)>,
    pub eps: f64,
}

/// Backends with optional fast paths; the defaults are plain burn ops.
pub(crate) trait Kernels: Backend {
    /// Whether a pass runs its per-token work on real tokens only ([`Packing`]). Without it,
    /// padded positions run like tokens (the GPU default: one dense batch).
    const PACKED: bool = false;

    /// Splits the fused projection `qkv [tokens, (heads + 2·kv)·d]` into heads, applies the
    /// per-head norms (Qwen3) and RoPE: queries in the backend's own layout for
    /// [`Kernels::attention`] (the default: `[b, kv, g·s, d]`, the g query heads of each KV head
    /// stacked, as transformers' `repeat_kv` pairs them), keys and values `[b, kv, s, d]` (the
    /// cache's layout; padded positions of a packed pass hold zeros, which no query sees).
    fn qkv_heads(qkv: Tensor<Self, 2>, a: &Heads<'_, Self>) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        qkv_heads_by_ops(qkv, a)
    }

    /// `x [m, k] · w [k, n]`; `half` may hold (or be given) a bf16 copy of `w`.
    fn linear(x: Tensor<Self, 2>, w: &Tensor<Self, 2>, _half: &HalfCopy) -> Tensor<Self, 2> {
        x.matmul(w.clone())
    }

    /// A host buffer of `t`'s size whose contents will be overwritten, then uploaded in its
    /// place. The default allocates (a GPU tensor has no host memory to reuse).
    fn host_buffer<const D: usize>(t: Tensor<Self, D>) -> Vec<f32> {
        vec![0.0; t.shape().num_elements()]
    }

    /// Per row of `logits [n, vocab]`: log-sum-exp, the logit of `targets[row]`, and the argmax
    /// (host vectors). The default runs burn ops on the device and downloads `n` values of each.
    fn row_stats(logits: Tensor<Self, 2>, targets: &[i64]) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
        row_stats_by_ops(logits, targets)
    }

    /// Attention of the queries `q` ([`Kernels::qkv_heads`]) over a shared root's keys and
    /// values `[1, kv, len, d]` (if any; additive mask `[b, 1, 1, s, len]` where a window hides
    /// some of it) and the row's own `k`, `v` `[b, kv, t, d]` (additive `mask [b, 1, 1, s, t]`):
    /// `softmax(q·kᵀ·scale + mask) · v` over both, token-major `[tokens, heads·d]` (the
    /// packed tokens of `a.packing`). The default runs burn ops.
    fn attention(a: Attention<Self>) -> Tensor<Self, 2> {
        let [b, kv, gs, d] = a.q.dims();
        let (g, s) = (a.g, gs / a.g);
        attention_by_ops(a).reshape([b, kv * g, s, d]).swap_dims(1, 2).reshape([b * s, kv * g * d])
    }

    /// RMSNorm of each row of `x [rows, n]`: `x · (mean(x²) + eps)^-½ · w` (f32). The default
    /// runs burn ops.
    fn rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let var = x.clone().square().mean_dim(1);
        x * (var + eps).sqrt().recip() * w.clone().unsqueeze::<2>()
    }

    /// The gated MLP activation of `gu [rows, 2·inter]` (gate, then up): `silu(gate) ⊙ up`,
    /// `[rows, inter]`. The default runs burn ops.
    fn swiglu(gu: Tensor<Self, 2>, inter: usize) -> Tensor<Self, 2> {
        burn::tensor::activation::silu(gu.clone().narrow(1, 0, inter)) * gu.narrow(1, inter, inter)
    }

    /// `t` (f32) rounded to `dtype`'s precision and returned in f32 (device merges round
    /// through the output dtype as the host path does). The default casts on the device.
    fn round_through(t: Tensor<Self, 2>, dtype: crate::dtype::DType) -> Tensor<Self, 2> {
        use burn::tensor::FloatDType;
        let to = match dtype {
            crate::dtype::DType::F32 => return t,
            crate::dtype::DType::F16 => FloatDType::F16,
            crate::dtype::DType::BF16 => FloatDType::BF16,
        };
        t.cast(to).cast(FloatDType::F32)
    }
}

/// RMSNorm over the last dimension of `x` ([`Kernels::rms_norm`] on its rows).
pub(crate) fn rms_norm<B: Kernels, const D: usize>(x: Tensor<B, D>, w: &Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let dims = x.dims();
    let n = dims[D - 1];
    let rows = x.shape().num_elements() / n.max(1);
    <B as Kernels>::rms_norm(x.reshape([rows, n]), w, eps).reshape(dims)
}

/// Rotate-half RoPE on `[b, heads, s, d]` with `cos`/`sin` `[b, 1, s, d/2]`.
fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let h = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, h);
    let x2 = x.narrow(3, h, h);
    let a = x1.clone() * cos.clone() - x2.clone() * sin.clone();
    let b = x2 * cos.clone() + x1 * sin.clone();
    Tensor::cat(vec![a, b], 3)
}

/// A CPU tensor's elements as one row-major f32 slice: its own storage when that already is
/// one (no copy), else a copy.
enum Host {
    Storage(NdArrayTensor),
    Copy(Vec<f32>),
}

impl Host {
    fn of<const D: usize>(t: Tensor<NdArray<f32>, D>) -> Self {
        let prim = t.into_primitive().tensor();
        if let NdArrayTensor::F32(storage) = &prim
            && storage.view().to_slice().is_some()
        {
            return Self::Storage(prim);
        }
        Self::Copy(super::runtime::to_host_f32(Tensor::<NdArray<f32>, D>::from_primitive(TensorPrimitive::Float(prim))))
    }

    fn slice(&self) -> &[f32] {
        match self {
            Self::Storage(NdArrayTensor::F32(storage)) => storage.view().to_slice().unwrap_or_default(),
            Self::Storage(_) => &[],
            Self::Copy(v) => v,
        }
    }
}

/// `e^x` in f32 without a library call, so that loops of it vectorize: `2^n · e^r` with
/// `n = round(x·log₂e)`, `r = x − n·ln 2` (Cody–Waite, two constants) and Cephes' degree-7
/// polynomial for `e^r` (relative error below 3·10⁻⁷, tested). `x < −87` gives 0 (every
/// masked score), `x > 88` gives `e^88`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let two_n = f32::from_bits(((t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { e * two_n }
}

/// Accumulators the vectorized reductions keep side by side (one AVX-512 register of f32).
const LANES: usize = 16;

/// The largest of `x` (NaN never wins; `-inf` when empty), over [`LANES`] running maxima so
/// that the loop vectorizes.
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &z| a.max(z));
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    lanes.iter().fold(tail, |a, &z| a.max(z))
}

/// Softmax of one score row in place, unnormalized: `sc[..len]` (root keys, additive
/// `root_mask`) and `sc[len..]` (own keys, additive `mask`) are scaled and masked, then
/// `e^(x − max)`; returns `1 / Σ`, by which the caller scales the weighted values.
#[inline(always)]
fn softmax_row(sc: &mut [f32], len: usize, scale: f32, root_mask: Option<&[f32]>, mask: &[f32]) -> f32 {
    let (root, own) = sc.split_at_mut(len);
    match root_mask {
        Some(m) => root.iter_mut().zip(m).for_each(|(x, m)| *x = *x * scale + m),
        None => root.iter_mut().for_each(|x| *x *= scale),
    }
    own.iter_mut().zip(mask).for_each(|(x, m)| *x = *x * scale + m);
    let max = max_of(sc);
    let mut sums = [0f32; LANES];
    let mut chunks = sc.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_f32(c[l] - max);
            sums[l] += c[l];
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - max);
        sum += *x;
    }
    1.0 / (sums.iter().sum::<f32>() + sum)
}

impl Kernels for NdArray<f32> {
    const PACKED: bool = true;

    /// One parallel pass per output: queries token-major `[tokens, heads·d]` (what the
    /// attention below reads), keys and values into the padded cache layout.
    fn qkv_heads(qkv: Tensor<Self, 2>, a: &Heads<'_, Self>) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let Packing { b, s, ref at, ref row } = *a.packing;
        let (heads, kv, d) = (a.heads, a.kv_heads, a.head_dim);
        let (w, half, n) = ((heads + 2 * kv) * d, d / 2, at.len());
        let device = qkv.device();
        let x = Host::of(qkv);
        let x = x.slice();
        let norms = a.norms.map(|(qn, kn)| (super::runtime::to_host_f32(qn.clone()), super::runtime::to_host_f32(kn.clone())));
        let eps = a.eps as f32;
        // One head `x [d]` → `out [d]`: RMSNorm (if any, as the rms_norm kernel computes it),
        // then rotate-half RoPE with the position's tables (as `rope` computes it).
        let head = |x: &[f32], out: &mut [f32], norm: Option<&[f32]>, p: usize| {
            let (cos, sin) = (&a.cos[p * half..(p + 1) * half], &a.sin[p * half..(p + 1) * half]);
            let r = norm.map_or(1.0, |_| (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt().recip());
            let val = |j: usize| norm.map_or(x[j], |w| x[j] * r * w[j]);
            for j in 0..half {
                let (x1, x2) = (val(j), val(j + half));
                out[j] = x1 * cos[j] - x2 * sin[j];
                out[j + half] = x2 * cos[j] + x1 * sin[j];
            }
        };
        let mut q = vec![0f32; n * heads * d];
        q.par_chunks_mut((heads * d).max(1)).zip(x.par_chunks(w.max(1))).zip(at.par_iter()).for_each(|((qo, xr), &p)| {
            for h in 0..heads {
                head(&xr[h * d..(h + 1) * d], &mut qo[h * d..(h + 1) * d], norms.as_ref().map(|n| &n.0[..]), p);
            }
        });
        let (mut k, mut v) = (vec![0f32; b * kv * s * d], vec![0f32; b * kv * s * d]);
        k.par_chunks_mut((s * d).max(1)).zip(v.par_chunks_mut((s * d).max(1))).enumerate().for_each(|(pair, (ko, vo))| {
            let (r, h) = (pair / kv, pair % kv);
            for pk in row[r]..row[r + 1] {
                let (p, xr) = (at[pk], &x[pk * w..(pk + 1) * w]);
                let i = p - r * s;
                head(&xr[(heads + h) * d..(heads + h + 1) * d], &mut ko[i * d..(i + 1) * d], norms.as_ref().map(|n| &n.1[..]), p);
                vo[i * d..(i + 1) * d].copy_from_slice(&xr[(heads + kv + h) * d..(heads + kv + h + 1) * d]);
            }
        });
        let t4 = |data: Vec<f32>, shape: [usize; 4]| Tensor::<Self, 4>::from_data(TensorData::new(data, shape), &device);
        (t4(q, [n, 1, heads, d]), t4(k, [b, kv, s, d]), t4(v, [b, kv, s, d]))
    }
    /// burn-ndarray 0.21 has no bf16 arrays: rounds on the host (in the tensor's own memory).
    fn round_through(t: Tensor<Self, 2>, dtype: crate::dtype::DType) -> Tensor<Self, 2> {
        if dtype == crate::dtype::DType::F32 {
            return t;
        }
        let (shape, device) = (t.dims(), t.device());
        let mut v = super::runtime::to_host_f32(t);
        crate::dtype::round_in_place(dtype, &mut v);
        Tensor::from_data(TensorData::new(v, shape), &device)
    }

    /// The tensor's own allocation (zero-copy when nothing else holds it, as after a forward
    /// pass), so rewriting weights touches no fresh memory.
    fn host_buffer<const D: usize>(t: Tensor<Self, D>) -> Vec<f32> {
        super::runtime::to_host_f32(t)
    }

    /// One parallel pass over the logits in their own memory; burn-ndarray would materialize
    /// `logits − max` and its exponential (two vocabulary-wide temporaries per row, ≈ 0.1 s per
    /// batch of 56 rows against a 152 K vocabulary).
    fn row_stats(logits: Tensor<Self, 2>, targets: &[i64]) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
        let v = logits.dims()[1];
        let x = super::runtime::to_host_f32(logits);
        let rows: Vec<(f32, f32, i64)> = x
            .par_chunks(v.max(1))
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                // NaN never wins the max, so a NaN row keeps a finite max and its sum turns
                // NaN (the caller's non-finite check); ties keep the first index.
                pulp::Arch::new().dispatch(|| {
                    let max = max_of(row);
                    let arg = row.iter().position(|&z| z == max).unwrap_or(0);
                    let mut sums = [0f64; LANES];
                    let chunks = row.chunks_exact(LANES);
                    let mut sum: f64 = chunks.remainder().iter().map(|&z| f64::from(exp_f32(z - max))).sum();
                    for c in chunks {
                        for l in 0..LANES {
                            sums[l] += f64::from(exp_f32(c[l] - max));
                        }
                    }
                    sum += sums.iter().sum::<f64>();
                    let lse = max + sum.ln() as f32;
                    let tgt = usize::try_from(t).ok().and_then(|t| row.get(t)).copied().unwrap_or(f32::NAN);
                    (lse, tgt, arg as i64)
                })
            })
            .collect();
        (rows.iter().map(|r| r.0).collect(), rows.iter().map(|r| r.1).collect(), rows.iter().map(|r| r.2).collect())
    }

    /// One task per (row, KV head), in parallel, on the row's real queries only: the scores
    /// of its g query heads against the root's and the row's own keys (two GEMMs into one
    /// score matrix, read where they lie: no per-row copies), the masked softmax in place,
    /// the weighted values (two GEMMs, the second accumulating), scaled by `1/Σ`.
    /// burn-ndarray's version makes ten single-threaded passes over batch-wide score arrays
    /// (scale, mask, concat, the softmax's four, the split's copies), which cost as much as
    /// the matrix products of the layer on two cores.
    fn attention(a: Attention<Self>) -> Tensor<Self, 2> {
        let Attention { q, k, v, mask, root, scale, g, packing } = a;
        let Packing { b, s, ref at, ref row } = *packing;
        let [_, kv, t, d] = k.dims();
        let heads = kv * g;
        let device = k.device();
        let (q, k, v, mask) = (Host::of(q), Host::of(k), Host::of(v), Host::of(mask));
        let (q, k, v, mask) = (q.slice(), k.slice(), v.slice(), mask.slice());
        let (len, rk, rv, rmask) = match root {
            Some(r) => (r.k.dims()[2], Some(Host::of(r.k.clone())), Some(Host::of(r.v.clone())), r.mask.map(Host::of)),
            None => (0, None, None, None),
        };
        let (rk, rv) = (rk.as_ref().map_or(&[][..], Host::slice), rv.as_ref().map_or(&[][..], Host::slice));
        let rmask = rmask.as_ref().map(Host::slice);
        let n = len + t;
        let scale = scale as f32;
        let outs: Vec<Vec<f32>> = (0..b * kv)
            .into_par_iter()
            .map(|pair| {
                let (r, h) = (pair / kv, pair % kv);
                let toks = row[r]..row[r + 1];
                let nr = toks.len();
                let m = g * nr;
                // queries [m, d]: query head h·g + gi of each of the row's tokens
                let mut qs = vec![0f32; m * d];
                for gi in 0..g {
                    for (j, pk) in toks.clone().enumerate() {
                        let src = pk * heads * d + (h * g + gi) * d;
                        qs[(gi * nr + j) * d..(gi * nr + j + 1) * d].copy_from_slice(&q[src..src + d]);
                    }
                }
                let mut p = vec![0f32; m * n];
                let (own_k, own_v) = (&k[pair * t * d..(pair + 1) * t * d], &v[pair * t * d..(pair + 1) * t * d]);
                if len > 0 {
                    gemm_into(&mut p, n, false, m, len, d, &qs, d, 1, &rk[h * len * d..(h + 1) * len * d], 1, d);
                }
                gemm_into(&mut p[len..], n, false, m, t, d, &qs, d, 1, own_k, 1, d);
                let mut inv = vec![0f32; m];
                pulp::Arch::new().dispatch(|| {
                    for (ri, (sc, inv)) in p.chunks_mut(n.max(1)).zip(&mut inv).enumerate() {
                        let i = at[toks.start + ri % nr.max(1)] - r * s;
                        let mrow = &mask[(r * s + i) * t..(r * s + i + 1) * t];
                        let rm = rmask.map(|m| &m[(r * s + i) * len..(r * s + i + 1) * len]);
                        *inv = softmax_row(sc, len, scale, rm, mrow);
                    }
                });
                let mut o = vec![0f32; m * d];
                if len > 0 {
                    gemm_into(&mut o, d, false, m, d, len, &p, n, 1, &rv[h * len * d..(h + 1) * len * d], d, 1);
                }
                gemm_into(&mut o, d, len > 0, m, d, t, &p[len..], n, 1, own_v, d, 1);
                for (orow, inv) in o.chunks_mut(d.max(1)).zip(&inv) {
                    orow.iter_mut().for_each(|x| *x *= inv);
                }
                o
            })
            .collect();
        let mut out = vec![0f32; at.len() * heads * d];
        for (pair, o) in outs.iter().enumerate() {
            let (r, h) = (pair / kv, pair % kv);
            let nr = row[r + 1] - row[r];
            for gi in 0..g {
                for j in 0..nr {
                    let dst = (row[r] + j) * heads * d + (h * g + gi) * d;
                    out[dst..dst + d].copy_from_slice(&o[(gi * nr + j) * d..(gi * nr + j + 1) * d]);
                }
            }
        }
        Tensor::from_data(TensorData::new(out, [at.len(), heads * d]), &device)
    }

    /// One parallel pass over the rows (burn-ndarray makes seven single-threaded passes).
    fn rms_norm(x: Tensor<Self, 2>, w: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        let [rows, n] = x.dims();
        let device = x.device();
        let mut x = super::runtime::to_host_f32(x);
        let w = super::runtime::to_host_f32(w.clone());
        let eps = eps as f32;
        x.par_chunks_mut(n.max(1)).for_each(|row| {
            let mean = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let r = (mean + eps).sqrt().recip();
            for (v, w) in row.iter_mut().zip(&w) {
                *v = *v * r * w;
            }
        });
        Tensor::from_data(TensorData::new(x, [rows, n]), &device)
    }

    /// One parallel pass, `silu(g) = g / (1 + e^-g)` as transformers computes it ([`exp_f32`]).
    /// burn's sigmoid is `exp(−ln(1 + e^−x))`: two exponentials and a logarithm per element, in
    /// nine single-threaded passes with the narrows and products, about a fifth of a scoring pass.
    fn swiglu(gu: Tensor<Self, 2>, inter: usize) -> Tensor<Self, 2> {
        let rows = gu.dims()[0];
        let device = gu.device();
        let gu = super::runtime::to_host_f32(gu);
        let mut out = vec![0f32; rows * inter];
        out.par_chunks_mut(inter.max(1)).zip(gu.par_chunks(2 * inter.max(1))).for_each(|(o, row)| {
            let (gate, up) = row.split_at(inter);
            pulp::Arch::new().dispatch(|| {
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + exp_f32(-g)) * u;
                }
            });
        });
        Tensor::from_data(TensorData::new(out, [rows, inter]), &device)
    }

    fn linear(x: Tensor<Self, 2>, w: &Tensor<Self, 2>, half: &HalfCopy) -> Tensor<Self, 2> {
        let [m, k] = x.dims();
        let n = w.dims()[1];
        let prim = w.clone().into_primitive().tensor();
        let NdArrayTensor::F32(storage) = &prim else { return x.matmul(w.clone()) };
        let view = storage.view();
        let Some(ws) = view.as_slice() else { return x.matmul(w.clone()) };
        let device = x.device();
        let xs = Host::of(x);
        let xs = xs.slice();
        let y = match (m <= SMALL_M).then(|| half.get(ws)) {
            Some(Some(h)) => small_m_matmul(xs, m, k, h, n),
            Some(None) => small_m_matmul(xs, m, k, ws, n),
            None => banded_gemm(xs, m, k, ws, n),
        };
        Tensor::from_data(TensorData::new(y, [m, n]), &device)
    }
}

/// [`Kernels::qkv_heads`] with burn ops (the default; the reference of the CPU fast path).
fn qkv_heads_by_ops<B: Kernels>(qkv: Tensor<B, 2>, a: &Heads<'_, B>) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let (b, s, heads, kv, d) = (a.packing.b, a.packing.s, a.heads, a.kv_heads, a.head_dim);
    let q = qkv.clone().narrow(1, 0, heads * d).reshape([b, s, heads, d]);
    let k = qkv.clone().narrow(1, heads * d, kv * d).reshape([b, s, kv, d]);
    let v = qkv.narrow(1, (heads + kv) * d, kv * d).reshape([b, s, kv, d]);
    let (q, k) = match a.norms {
        Some((qn, kn)) => (rms_norm(q, qn, a.eps), rms_norm(k, kn, a.eps)),
        None => (q, k),
    };
    let uploaded;
    let (cos, sin) = match a.tables {
        Some((c, sn)) => (c, sn),
        None => {
            let device = q.device();
            let table = |t: &[f32]| Tensor::<B, 4>::from_data(TensorData::new(t.to_vec(), [b, 1, s, d / 2]), &device);
            uploaded = (table(a.cos), table(a.sin));
            (&uploaded.0, &uploaded.1)
        }
    };
    let q = rope(q.swap_dims(1, 2), cos, sin);
    let k = rope(k.swap_dims(1, 2), cos, sin);
    (q.reshape([b, kv, (heads / kv) * s, d]), k, v.swap_dims(1, 2))
}

/// [`Kernels::attention`] with burn ops (the default; the reference of the CPU fast path).
fn attention_by_ops<B: Backend>(a: Attention<B>) -> Tensor<B, 4> {
    let Attention { q, k, v, mask, root, scale, g, .. } = a;
    let [b, kv, gs, _] = q.dims();
    let (s, t) = (gs / g, k.dims()[2]);
    let own = q.clone().matmul(k.swap_dims(2, 3)).mul_scalar(scale).reshape([b, kv, g, s, t]) + mask;
    match root {
        None => burn::tensor::activation::softmax(own, 4).reshape([b, kv, gs, t]).matmul(v),
        Some(Root { k: rk, v: rv, mask: rmask }) => {
            let len = rk.dims()[2];
            // `[1, kv, len, d]`, broadcast over the batch by the matmul.
            let mut shared = q.matmul(rk.clone().swap_dims(2, 3)).mul_scalar(scale).reshape([b, kv, g, s, len]);
            if let Some(m) = rmask {
                shared = shared + m;
            }
            let att = burn::tensor::activation::softmax(Tensor::cat(vec![shared, own], 4), 4);
            let a_root = att.clone().narrow(4, 0, len).reshape([b, kv, gs, len]).matmul(rv.clone());
            a_root + att.narrow(4, len, t).reshape([b, kv, gs, t]).matmul(v)
        }
    }
}

/// [`Kernels::row_stats`] with burn ops (the default; the reference of the CPU fast path).
fn row_stats_by_ops<B: Backend>(logits: Tensor<B, 2>, targets: &[i64]) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let n = targets.len();
    let device = logits.device();
    let max = logits.clone().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let tgt_idx = Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(targets.to_vec(), [n, 1]), &device);
    let tgt = logits.clone().gather(1, tgt_idx);
    let am = logits.argmax(1);
    (super::runtime::to_host_f32(lse), super::runtime::to_host_f32(tgt), super::runtime::to_host_i64(am))
}

/// Only the default (burn-op) kernels, on the CPU: the CUDA path's reference in tests
/// (`runtime::tests`).
#[cfg(test)]
impl Kernels for NdArray<f64> {}

#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda<f32, i32> {}
#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda<burn::tensor::bf16, i32> {}
#[cfg(feature = "cuda")]
impl Kernels for burn::backend::Cuda<burn::tensor::f16, i32> {}

/// Weight rows applied per pass over the accumulators of [`small_m_matmul`].
const K_UNROLL: usize = 8;

/// A weight element of [`small_m_matmul`]: f32, or bf16 bits (widened exactly).
pub(crate) trait WeightElem: Copy + Send + Sync {
    fn f32(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl WeightElem for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits(u32::from(self) << 16)
    }
}

/// `y = x · w` for few rows: `x [m, k]`, `w [k, n]`, both row-major. Column bands in parallel;
/// within a band, each weight row segment is read once and applied to every row of `x`,
/// [`K_UNROLL`] weight rows per pass so that each accumulator is loaded and stored once per
/// eight products instead of once per product (1.7× on decode). Every output still sums its
/// products in `k` order, one rounding per step: the result is the plain loop's, bit for bit.
pub(crate) fn small_m_matmul<W: WeightElem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize) -> Vec<f32> {
    let threads = rayon::current_num_threads().max(1);
    let band = (n.div_ceil(4 * threads)).next_multiple_of(16).clamp(16, 1024);
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(band))
        .into_par_iter()
        .map(|b| {
            let (c0, c1) = (b * band, ((b + 1) * band).min(n));
            let width = c1 - c0;
            let mut acc = vec![0f32; m * width];
            let ku = k / K_UNROLL * K_UNROLL;
            for kk in (0..ku).step_by(K_UNROLL) {
                let segs: [&[W]; K_UNROLL] = std::array::from_fn(|u| &w[(kk + u) * n + c0..(kk + u) * n + c1]);
                for r in 0..m {
                    let xs: [f32; K_UNROLL] = std::array::from_fn(|u| x[r * k + kk + u]);
                    for (j, a) in acc[r * width..(r + 1) * width].iter_mut().enumerate() {
                        let mut v = *a;
                        for u in 0..K_UNROLL {
                            v += xs[u] * segs[u][j].f32();
                        }
                        *a = v;
                    }
                }
            }
            for kk in ku..k {
                let seg = &w[kk * n + c0..kk * n + c1];
                for r in 0..m {
                    let xv = x[r * k + kk];
                    for (a, &wv) in acc[r * width..(r + 1) * width].iter_mut().zip(seg) {
                        *a += xv * wv.f32();
                    }
                }
            }
            (c0, acc)
        })
        .collect();
    gather_bands(bands, m, n)
}

/// `y [m, n]` from column bands `(first column, [m, width] row-major)` that tile its columns.
fn gather_bands(bands: Vec<(usize, Vec<f32>)>, m: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for (c0, band) in bands {
        let width = band.len() / m.max(1);
        for (dst, src) in y.chunks_exact_mut(n).zip(band.chunks_exact(width.max(1))) {
            dst[c0..c0 + width].copy_from_slice(src);
        }
    }
    y
}

/// `y = x · w` for `x [m, k]`, `w [k, n]`, both row-major: `gemm` on [`GEMM_BAND`]-column bands
/// ([`GEMM_BAND_NARROW`] below [`GEMM_NARROW_BELOW`] columns)
/// of `w`, one band per rayon task, each into its own buffer, then gathered into `y [m, n]`.
pub(crate) fn banded_gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let band = if n < GEMM_NARROW_BELOW { GEMM_BAND_NARROW } else { GEMM_BAND };
    assert!(x.len() == m * k && w.len() == k * n, "banded_gemm: x is {} (want {m}×{k}), w is {} (want {k}×{n})", x.len(), w.len());
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(band))
        .into_par_iter()
        .map(|b| {
            let c0 = b * band;
            let width = band.min(n - c0);
            let mut out = vec![0f32; m * width];
            gemm_band(x, m, k, w, n, c0, width, &mut out);
            (c0, out)
        })
        .collect();
    gather_bands(bands, m, n)
}

/// `out [m, width] = x [m, k] · w[:, c0..c0 + width]` (`w` is `[k, n]` row-major), one thread.
#[allow(clippy::too_many_arguments)]
fn gemm_band(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, c0: usize, width: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == k * n && c0 + width <= n && out.len() == m * width);
    gemm_into(out, width, false, m, width, k, x, k, 1, &w[c0..], n, 1);
}

/// `out[i·out_rs + c] (+)= Σ_j a[i][j]·b[j][c]` for `i < m`, `c < n`: `a[i][j]` at
/// `a[i·a_rs + j·a_cs]`, `b[j][c]` at `b[j·b_rs + c·b_cs]`; `accumulate` adds to what `out`
/// holds instead of overwriting it. One thread.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn gemm_into(
    out: &mut [f32],
    out_rs: usize,
    accumulate: bool,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    assert!(
        n <= out_rs && out.len() >= last(m, n, out_rs, 1) && a.len() >= last(m, k, a_rs, a_cs) && b.len() >= last(k, n, b_rs, b_cs),
        "gemm_into: shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.chunks_mut(out_rs).take(m).for_each(|r| r[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: `gemm` reads `a[i·a_rs + j·a_cs]` (i < m, j < k) and `b[j·b_rs + c·b_cs]`
    // (j < k, c < n), and reads (when accumulating) and writes `out[i·out_rs + c]`; the
    // largest of each is below the lengths asserted above. `out` is a unique borrow, so it
    // overlaps neither input. No threads: Parallelism::None.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    /// The CPU RMSNorm and SwiGLU equal the burn-ops defaults (different summation order and
    /// sigmoid formula: within f32 rounding).
    #[test]
    fn fused_rms_norm_and_swiglu_match_burn_ops() {
        type B = NdArray<f32>;
        let dev = Default::default();
        let (rows, n) = (7, 37);
        let x: Vec<f32> = (0..rows * n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 90.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i as f32) / 40.0).collect();
        let xt = || Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, n]), &dev);
        let wt = Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [n]), &dev);
        let got = super::super::runtime::to_host_f32(<B as Kernels>::rms_norm(xt(), &wt, 1e-6));
        let var = xt().square().mean_dim(1);
        let want = super::super::runtime::to_host_f32(xt() * (var + 1e-6).sqrt().recip() * wt.clone().unsqueeze::<2>());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "rms_norm {a} vs {b}");
        }
        let gu = Tensor::<B, 2>::from_data(TensorData::new(x[..rows * 36].to_vec(), [rows, 36]), &dev);
        let got = super::super::runtime::to_host_f32(<B as Kernels>::swiglu(gu.clone(), 18));
        let want = super::super::runtime::to_host_f32(burn::tensor::activation::silu(gu.clone().narrow(1, 0, 18)) * gu.narrow(1, 18, 18));
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "swiglu {a} vs {b}");
        }
    }

    /// The fused CPU attention equals burn's ops: GQA groups, padding masks, a root with and
    /// without a window mask, one and several rows, packed passes (rows with padding left out).
    #[test]
    fn fused_attention_matches_burn_ops() {
        type B = NdArray<f32>;
        let dev = Default::default();
        let val = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 700.0).collect() };
        for (b, kv, g, s, t, len, window, pad) in [
            (1, 1, 1, 1, 1, 0, false, false),
            (3, 2, 3, 4, 9, 0, false, true),
            (2, 2, 2, 3, 5, 7, false, false),
            (4, 1, 7, 5, 5, 11, true, true),
            (2, 2, 3, 6, 6, 40, false, true),
        ] {
            let (d, heads) = (8, kv * g);
            let t4 = |data: Vec<f32>, n: [usize; 4]| Tensor::<B, 4>::from_data(TensorData::new(data, n), &dev);
            let mask: Vec<f32> = (0..b * s * t).map(|i| if (i * 31) % 7 == 3 { -1e30 } else { 0.0 }).collect();
            let mask = Tensor::<B, 5>::from_data(TensorData::new(mask, [b, 1, 1, s, t]), &dev);
            let (rk, rv) = (t4(val(kv * len * d, 5), [1, kv, len, d]), t4(val(kv * len * d, 6), [1, kv, len, d]));
            let rmask = window.then(|| {
                let m: Vec<f32> = (0..b * s * len).map(|i| if i % 5 == 0 { -1e30 } else { 0.0 }).collect();
                Tensor::<B, 5>::from_data(TensorData::new(m, [b, 1, 1, s, len]), &dev)
            });
            // queries [b, kv, g·s, d] for burn's ops; token-major [tokens, heads·d] for the kernel
            let qv = val(b * kv * g * s * d, 1);
            let q_at = |r: usize, h: usize, gi: usize, i: usize| ((r * kv + h) * g * s + gi * s + i) * d;
            // with padding, odd rows leave out their last position
            let real: Vec<bool> = (0..b * s).map(|p| !pad || p % s + (p / s) % 2 < s).collect();
            let packing = Packing::new(b, s, Some(&real), true);
            let qt: Vec<f32> = packing
                .at
                .iter()
                .flat_map(|&p| (0..heads).map(move |hh| (hh, p)))
                .flat_map(|(hh, p)| {
                    let at = q_at(p / s, hh / g, hh % g, p % s);
                    qv[at..at + d].to_vec()
                })
                .collect();
            // the same keys, values, masks and root for both; queries in each one's layout
            let make = |q, packing| Attention {
                q,
                k: t4(val(b * kv * t * d, 2), [b, kv, t, d]),
                v: t4(val(b * kv * t * d, 3), [b, kv, t, d]),
                mask: mask.clone(),
                root: (len > 0).then(|| Root { k: &rk, v: &rv, mask: rmask.clone() }),
                scale: 0.35,
                g,
                packing,
            };
            let got = super::super::runtime::to_host_f32(<B as Kernels>::attention(make(t4(qt, [packing.len(), 1, heads, d]), &packing)));
            let dense = Packing::new(b, s, None, false);
            let want = super::super::runtime::to_host_f32(attention_by_ops(make(t4(qv.clone(), [b, kv, g * s, d]), &dense)));
            assert_eq!(got.len(), packing.len() * heads * d);
            for (pk, &p) in packing.at.iter().enumerate() {
                for hh in 0..heads {
                    let w = q_at(p / s, hh / g, hh % g, p % s);
                    for c in 0..d {
                        let (x, y) = (got[(pk * heads + hh) * d + c], want[w + c]);
                        assert!((x - y).abs() < 1e-5, "b {b} kv {kv} g {g} s {s} t {t} root {len}: {x} vs {y}");
                    }
                }
            }
        }
    }

    /// The CPU split of q|k|v into heads (norms, RoPE, packing) equals burn's ops, bit for bit.
    #[test]
    fn qkv_heads_match_burn_ops() {
        type B = NdArray<f32>;
        let dev = Default::default();
        let (b, s, heads, kv, d) = (3, 5, 6, 2, 8);
        let w = (heads + 2 * kv) * d;
        let x: Vec<f32> = (0..b * s * w).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 300.0).collect();
        let positions: Vec<usize> = (0..b * s).map(|p| 3 + p % s + p / s).collect();
        let (cos, sin) = super::super::rope::Rope::new(d, 10_000.0, None).tables(&positions);
        let qn = Tensor::<B, 1>::from_data(TensorData::new((0..d).map(|i| 0.5 + i as f32 / 8.0).collect::<Vec<f32>>(), [d]), &dev);
        let kn = Tensor::<B, 1>::from_data(TensorData::new((0..d).map(|i| 1.5 - i as f32 / 9.0).collect::<Vec<f32>>(), [d]), &dev);
        let real: Vec<bool> = (0..b * s).map(|p| p % s < s - p / s).collect();
        for norms in [None, Some((&qn, &kn))] {
            let packing = Packing::new(b, s, Some(&real), true);
            let packed: Vec<f32> = packing.at.iter().flat_map(|&p| x[p * w..(p + 1) * w].to_vec()).collect();
            let heads_in = |packing| Heads { packing, heads, kv_heads: kv, head_dim: d, cos: &cos, sin: &sin, tables: None, norms, eps: 1e-6 };
            let (q, k, v) = <B as Kernels>::qkv_heads(Tensor::from_data(TensorData::new(packed, [packing.len(), w]), &dev), &heads_in(&packing));
            let dense = Packing::new(b, s, None, false);
            let (wq, wk, wv) = qkv_heads_by_ops(Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [b * s, w]), &dev), &heads_in(&dense));
            let host = super::super::runtime::to_host_f32::<B, 4>;
            let (q, k, v, wq, wk, wv) = (host(q), host(k), host(v), host(wq), host(wk), host(wv));
            let g = heads / kv;
            for (pk, &p) in packing.at.iter().enumerate() {
                let (r, i) = (p / s, p % s);
                for hh in 0..heads {
                    let want = ((r * kv + hh / g) * g * s + (hh % g) * s + i) * d;
                    assert_eq!(q[(pk * heads + hh) * d..(pk * heads + hh + 1) * d], wq[want..want + d], "q of token {p} head {hh}");
                }
                for h in 0..kv {
                    let at = ((r * kv + h) * s + i) * d;
                    assert_eq!(k[at..at + d], wk[at..at + d], "k of token {p} head {h}");
                    assert_eq!(v[at..at + d], wv[at..at + d], "v of token {p} head {h}");
                }
            }
        }
    }

    #[test]
    fn exp_f32_is_accurate_and_vectorizable_edge_cases_hold() {
        let mut worst = 0f64;
        for i in 0..=350_000 {
            let x = -87.0 + f64::from(i) * 175.0 / 350_000.0;
            let got = f64::from(exp_f32(x as f32));
            let want = (x as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-1e30), 0.0, "masked scores weigh nothing");
        assert_eq!(exp_f32(-87.5), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(1e30).is_finite());
    }

    use super::*;

    #[test]
    fn row_stats_match_burn_ops() {
        type B = NdArray<f32>;
        let (n, v) = (5, 3001);
        let mut x: Vec<f32> = (0..n * v).map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 37.0).collect();
        // Row 2: a tie for the maximum (the first index wins); row 4 holds a NaN.
        x[2 * v + 10] = 100.0;
        x[2 * v + 20] = 100.0;
        x[4 * v + 7] = f32::NAN;
        let targets: Vec<i64> = vec![0, 17, 20, 3000, 5];
        let dev = Default::default();
        let t = || Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [n, v]), &dev);
        let (lse, tgt, am) = <B as Kernels>::row_stats(t(), &targets);
        let (want_lse, want_tgt, want_am) = row_stats_by_ops(t(), &targets);
        for r in 0..4 {
            assert!((lse[r] - want_lse[r]).abs() < 1e-4 * want_lse[r].abs().max(1.0), "row {r}: {} vs {}", lse[r], want_lse[r]);
            assert_eq!(tgt[r], want_tgt[r], "row {r}");
            assert_eq!(am[r], want_am[r], "row {r}");
        }
        assert_eq!(am[2], 10, "ties keep the first index");
        assert!(lse[4].is_nan(), "a NaN logit makes the row's log-sum-exp NaN (caught by the caller)");
    }

    #[test]
    fn banded_gemm_matches_naive() {
        // n spans full bands and a partial one, narrow and wide; m above SMALL_M; odd k.
        for (m, k, n) in [(9, 37, 2 * GEMM_BAND + 77), (33, 5, 100), (12, 130, GEMM_BAND), (3, 7, GEMM_NARROW_BELOW + 2 * GEMM_BAND + 5)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 11 % 17) as f32 - 8.0) / 9.0).collect();
            let y = banded_gemm(&x, m, k, &w, n);
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k).map(|kk| f64::from(x[r * k + kk]) * f64::from(w[kk * n + c])).sum();
                    assert!((f64::from(y[r * n + c]) - want).abs() < 1e-4, "m {m} n {n}: ({r},{c})");
                }
            }
        }
        assert_eq!(banded_gemm(&[1.0; 9], 9, 1, &[], 0), Vec::<f32>::new());
        assert_eq!(banded_gemm(&[], 9, 0, &[], 3), vec![0.0; 27]);
    }

    #[test]
    fn small_m_is_the_plain_loop_bit_for_bit() {
        // k = 37: four unrolled passes and a tail of five; n = 1100 spans several bands.
        for (m, k, n) in [(2, 37, 300), (3, 37, 1100)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let w: Vec<f32> = (0..k * n).map(|i| ((i * 104_729 % 2039) as f32 - 1019.0) / 311.0).collect();
            let y = small_m_matmul(&x, m, k, &w, n);
            for r in 0..m {
                for c in 0..n {
                    let mut want = 0f32;
                    for kk in 0..k {
                        want += x[r * k + kk] * w[kk * n + c];
                    }
                    assert_eq!(y[r * n + c].to_bits(), want.to_bits(), "m {m}: ({r},{c})");
                }
            }
        }
    }

    #[test]
    fn half_copy_only_for_exact_bf16_weights_and_gives_the_same_bits() {
        let (m, k, n) = (1, 29, 70);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0).collect();
        // bf16-exact weights (low 16 bits clear), including -0.0 and a large value.
        let mut w: Vec<f32> = (0..k * n).map(|i| f32::from_bits((((i * 7919) % 30_011) as u32 + 0x3c00) << 16)).collect();
        w[3] = -0.0;
        w[5] = f32::from_bits(0x4700_0000);
        let half = HalfCopy::default();
        let h = half.get(&w).expect("every value is a bf16");
        assert_eq!(h.len(), w.len());
        let (via_half, via_f32) = (small_m_matmul(&x, m, k, h, n), small_m_matmul(&x, m, k, &w, n));
        assert!(via_half.iter().zip(&via_f32).all(|(a, b)| a.to_bits() == b.to_bits()));
        // One value off the bf16 grid: no copy, and the answer is remembered.
        w[100] = 1.0 + f32::EPSILON;
        let half = HalfCopy::default();
        assert!(half.get(&w).is_none());
        assert!(half.get(&[1.0]).is_none(), "the first answer is kept until the weight changes");
    }
}
