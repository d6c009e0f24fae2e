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

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
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
    pub q: Tensor<B, 4>,
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub mask: Tensor<B, 5>,
    pub root: Option<Root<'a, B>>,
    pub scale: f64,
    pub g: usize,
}

/// Backends with optional fast paths; the defaults are plain burn ops.
pub(crate) trait Kernels: Backend {
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

    /// Attention of the queries `q [b, kv, g·s, d]` (the g query heads of each KV head
    /// stacked) over a shared root's keys and values `[1, kv, len, d]` (if any; additive mask
    /// `[b, 1, 1, s, len]` where a window hides some of it) and the row's own `k`, `v`
    /// `[b, kv, t, d]` (additive `mask [b, 1, 1, s, t]`): `softmax(q·kᵀ·scale + mask) · v`
    /// over both, as `[b, kv, g·s, d]`. The default runs burn ops.
    fn attention(a: Attention<Self>) -> Tensor<Self, 4> {
        attention_by_ops(a)
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

impl Kernels for NdArray<f32> {
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
                let (mut max, mut arg) = (f32::NEG_INFINITY, 0usize);
                for (j, &z) in row.iter().enumerate() {
                    // NaN never wins, so a NaN row keeps a finite max and its sum turns NaN
                    // (the caller's non-finite check); ties keep the first index.
                    if z > max {
                        max = z;
                        arg = j;
                    }
                }
                let sum: f64 = row.iter().map(|&z| f64::from((z - max).exp())).sum();
                let lse = max + sum.ln() as f32;
                let tgt = usize::try_from(t).ok().and_then(|t| row.get(t)).copied().unwrap_or(f32::NAN);
                (lse, tgt, arg as i64)
            })
            .collect();
        (rows.iter().map(|r| r.0).collect(), rows.iter().map(|r| r.1).collect(), rows.iter().map(|r| r.2).collect())
    }

    /// One task per (row, KV head), in parallel: the scores of its g·s queries against the
    /// root's and its own keys by one GEMM, the masked softmax in place (one buffer, no
    /// batch-wide temporaries), the weighted values by a second GEMM. burn-ndarray's version
    /// makes ten single-threaded passes over batch-wide score arrays (scale, mask, concat,
    /// the softmax's four, the split's copies), which cost as much as the matrix products of
    /// the layer on two cores.
    fn attention(a: Attention<Self>) -> Tensor<Self, 4> {
        let Attention { q, k, v, mask, root, scale, g } = a;
        let [b, kv, gs, d] = q.dims();
        let (s, t) = (gs / g, k.dims()[2]);
        let device = q.device();
        let host = super::runtime::to_host_f32::<Self, 4>;
        let (q, k, v, mask) = (host(q), host(k), host(v), super::runtime::to_host_f32(mask));
        let (len, rk, rv, rmask) = match root {
            Some(r) => (r.k.dims()[2], host(r.k.clone()), host(r.v.clone()), r.mask.map(super::runtime::to_host_f32)),
            None => (0, vec![], vec![], None),
        };
        let n = len + t;
        let scale = scale as f32;
        let mut out = vec![0f32; b * kv * gs * d];
        out.par_chunks_mut(gs * d).enumerate().for_each(|(pair, o)| {
            let (r, h) = (pair / kv, pair % kv);
            // keys and values side by side: the root's, then the row's own
            let mut keys = Vec::with_capacity(n * d);
            let mut vals = Vec::with_capacity(n * d);
            keys.extend_from_slice(&rk[h * len * d..(h + 1) * len * d]);
            keys.extend_from_slice(&k[pair * t * d..(pair + 1) * t * d]);
            vals.extend_from_slice(&rv[h * len * d..(h + 1) * len * d]);
            vals.extend_from_slice(&v[pair * t * d..(pair + 1) * t * d]);
            let mut p = vec![0f32; gs * n];
            gemm_into(&mut p, gs, n, d, &q[pair * gs * d..(pair + 1) * gs * d], d, 1, &keys, 1, d);
            for (row, sc) in p.chunks_mut(n).enumerate() {
                let i = row % s;
                let (root_part, own) = sc.split_at_mut(len);
                let mut max = f32::NEG_INFINITY;
                let root_mask = rmask.as_ref().map(|m| &m[(r * s + i) * len..(r * s + i + 1) * len]);
                for (j, x) in root_part.iter_mut().enumerate() {
                    *x = *x * scale + root_mask.map_or(0.0, |m| m[j]);
                    max = max.max(*x);
                }
                for (x, m) in own.iter_mut().zip(&mask[(r * s + i) * t..(r * s + i + 1) * t]) {
                    *x = *x * scale + m;
                    max = max.max(*x);
                }
                let mut sum = 0f32;
                for x in sc.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for x in sc.iter_mut() {
                    *x /= sum;
                }
            }
            gemm_into(o, gs, d, n, &p, n, 1, &vals, d, 1);
        });
        Tensor::from_data(TensorData::new(out, [b, kv, gs, d]), &device)
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

    /// One parallel pass, `silu(g) = g / (1 + e^-g)` as transformers computes it. burn's
    /// sigmoid is `exp(−ln(1 + e^−x))`: two exponentials and a logarithm per element, in nine
    /// single-threaded passes with the narrows and products, about a fifth of a scoring pass.
    fn swiglu(gu: Tensor<Self, 2>, inter: usize) -> Tensor<Self, 2> {
        let rows = gu.dims()[0];
        let device = gu.device();
        let gu = super::runtime::to_host_f32(gu);
        let mut out = vec![0f32; rows * inter];
        out.par_chunks_mut(inter.max(1)).zip(gu.par_chunks(2 * inter.max(1))).for_each(|(o, row)| {
            let (gate, up) = row.split_at(inter);
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
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
        let xs = super::runtime::to_host_f32(x);
        let y = match (m <= SMALL_M).then(|| half.get(ws)) {
            Some(Some(h)) => small_m_matmul(&xs, m, k, h, n),
            Some(None) => small_m_matmul(&xs, m, k, ws, n),
            None => banded_gemm(&xs, m, k, ws, n),
        };
        Tensor::from_data(TensorData::new(y, [m, n]), &device)
    }
}

/// [`Kernels::attention`] with burn ops (the default; the reference of the CPU fast path).
fn attention_by_ops<B: Backend>(a: Attention<B>) -> Tensor<B, 4> {
    let Attention { q, k, v, mask, root, scale, g } = a;
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
/// of `w`, one band per rayon task, each into its own buffer, then gathered into `y [m, n]`.
pub(crate) fn banded_gemm(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == k * n, "banded_gemm: x is {} (want {m}×{k}), w is {} (want {k}×{n})", x.len(), w.len());
    let bands: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(GEMM_BAND))
        .into_par_iter()
        .map(|b| {
            let c0 = b * GEMM_BAND;
            let width = GEMM_BAND.min(n - c0);
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
    gemm_into(out, m, width, k, x, k, 1, &w[c0..], n, 1);
}

/// `out [m, n] = a [m, k] · b [k, n]`, row-major `out`; `a[i][j]` at `a[i·a_rs + j·a_cs]`,
/// `b[j][c]` at `b[j·b_rs + c·b_cs]`; one thread.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn gemm_into(out: &mut [f32], m: usize, n: usize, k: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 };
    assert!(out.len() == m * n && a.len() >= last(m, k, a_rs, a_cs) && b.len() >= last(k, n, b_rs, b_cs), "gemm_into: shapes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // SAFETY: `gemm` reads `a[i·a_rs + j·a_cs]` (i < m, j < k) and `b[j·b_rs + c·b_cs]`
    // (j < k, c < n), whose largest indices are below the lengths asserted above, and writes
    // `out[i·n + c]` (out.len() == m·n). `read_dst = false`; `out` is a unique borrow, so it
    // overlaps neither input. No threads: Parallelism::None.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
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
    /// without a window mask, one and several rows.
    #[test]
    fn fused_attention_matches_burn_ops() {
        type B = NdArray<f32>;
        let dev = Default::default();
        let val = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 - 1001.0) / 700.0).collect() };
        for (b, kv, g, s, t, len, window) in
            [(1, 1, 1, 1, 1, 0, false), (3, 2, 3, 4, 9, 0, false), (2, 2, 2, 3, 5, 7, false), (4, 1, 7, 5, 5, 11, true)]
        {
            let d = 8;
            let t4 = |n: [usize; 4], seed| Tensor::<B, 4>::from_data(TensorData::new(val(n.iter().product(), seed), n), &dev);
            let mask: Vec<f32> = (0..b * s * t).map(|i| if (i * 31) % 7 == 3 { -1e30 } else { 0.0 }).collect();
            let mask = Tensor::<B, 5>::from_data(TensorData::new(mask, [b, 1, 1, s, t]), &dev);
            let (rk, rv) = (t4([1, kv, len, d], 5), t4([1, kv, len, d], 6));
            let rmask = window.then(|| {
                let m: Vec<f32> = (0..b * s * len).map(|i| if i % 5 == 0 { -1e30 } else { 0.0 }).collect();
                Tensor::<B, 5>::from_data(TensorData::new(m, [b, 1, 1, s, len]), &dev)
            });
            let make = || Attention {
                q: t4([b, kv, g * s, d], 1),
                k: t4([b, kv, t, d], 2),
                v: t4([b, kv, t, d], 3),
                mask: mask.clone(),
                root: (len > 0).then(|| Root { k: &rk, v: &rv, mask: rmask.clone() }),
                scale: 0.35,
                g,
            };
            let got = super::super::runtime::to_host_f32(<B as Kernels>::attention(make()));
            let want = super::super::runtime::to_host_f32(attention_by_ops(make()));
            assert_eq!(got.len(), want.len());
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "b {b} kv {kv} g {g} s {s} t {t} root {len}: {x} vs {y}");
            }
        }
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
        // n spans two full bands and a partial one; m above SMALL_M; odd k.
        for (m, k, n) in [(9, 37, 2 * GEMM_BAND + 77), (33, 5, 100), (12, 130, GEMM_BAND)] {
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
