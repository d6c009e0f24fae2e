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
#[allow(unsafe_code, clippy::too_many_arguments)]
fn gemm_band(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, c0: usize, width: usize, out: &mut [f32]) {
    assert!(x.len() == m * k && w.len() == k * n && c0 + width <= n && out.len() == m * width);
    if m == 0 || width == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let rhs = &w[c0..];
    // SAFETY: `gemm` reads `x[r * k + j]` for r < m, j < k (in bounds: x.len() == m·k), reads
    // `rhs[j * n + c]` for j < k, c < width, whose largest index (k − 1)·n + width − 1 is below
    // rhs.len() = k·n − c0 because c0 + width ≤ n, and writes `out[r * width + c]` for r < m,
    // c < width (out.len() == m·width). `read_dst = false`: `out` is only written. The three
    // regions do not overlap (`out` is a unique borrow). No threads: Parallelism::None.
    unsafe {
        gemm::gemm(
            m,
            width,
            k,
            out.as_mut_ptr(),
            1,
            width as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
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
