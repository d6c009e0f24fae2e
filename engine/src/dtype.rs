//! Floating-point storage dtypes and bulk conversions to and from `f32`.
//!
//! Merges compute in `f32` (as mergekit does with `dtype: float32`); checkpoints store f32, f16
//! or bf16. Conversions go through `half`'s slice routines (vectorized where the CPU allows) and
//! are split into chunks across the rayon pool for large tensors.

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Elements per parallel conversion chunk (big enough to amortize scheduling).
const CHUNK: usize = 1 << 16;

/// A floating-point storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors header spelling (`F32`, `F16`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The transformers `config.json` spelling (`float32`, `float16`, `bfloat16`).
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    /// Parses the names users and configs write: `float32`, `fp32`, `f32`, `bfloat16`, `bf16`, ...
    pub fn parse(s: &str) -> Option<DType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Maps a safetensors dtype; `None` for dtypes evomerge does not merge.
    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// Decodes little-endian `bytes` of `dtype` into `out` (`out.len()` elements).
///
/// The byte slice may be unaligned (safetensors data offsets are not aligned to the element
/// size in general); unaligned chunks go through an aligned copy.
pub fn decode_into(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    let sz = dtype.size();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let src = &bytes[c * CHUNK * sz..(c * CHUNK + dst.len()) * sz];
        match dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
                Ok(s) => dst.copy_from_slice(s),
                Err(_) => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(src),
            },
            DType::F16 => decode_half::<f16>(src, dst),
            DType::BF16 => match bytemuck::try_cast_slice::<u8, u16>(src) {
                Ok(s) => bf16_slice_to_f32(s, dst),
                Err(_) => {
                    let tmp: Vec<u16> = src.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                    bf16_slice_to_f32(&tmp, dst);
                }
            },
        }
    });
}

// bf16 conversions. `half` 2.7 computes the same values but its slice conversions do not
// vectorize well (6.7 G elements/s decoding here); these loops are written branch-free and run
// under `pulp`'s run-time CPU dispatch, so the compiler may use AVX2 / AVX-512 for them
// (14.6 G elements/s). Results are `half`'s bit for bit (tests below).

/// bf16 bits → f32 as `half::bf16::to_f32`: exact, a NaN gets its quiet bit set.
#[inline(always)]
fn bf16_bits_to_f32(b: u16) -> f32 {
    let quiet = u16::from((b & 0x7fff) > 0x7f80) << 6;
    f32::from_bits(u32::from(b | quiet) << 16)
}

/// f32 → bf16 bits as `half::bf16::from_f32`: round to nearest, ties to even; a NaN keeps the
/// high half of its payload with the quiet bit set.
#[inline(always)]
fn f32_to_bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
    // round up when the dropped half is above 0x8000, or exactly 0x8000 with an odd kept half
    let up = u32::from((x & 0x8000) != 0) & u32::from((x & 0x1_7fff) != 0);
    let rounded = (x >> 16).wrapping_add(up);
    (if nan { (x >> 16) | 0x40 } else { rounded }) as u16
}

fn bf16_slice_to_f32(src: &[u16], dst: &mut [f32]) {
    pulp::Arch::new().dispatch(|| dst.iter_mut().zip(src).for_each(|(d, &b)| *d = bf16_bits_to_f32(b)));
}

fn f32_slice_to_bf16(src: &[f32], dst: &mut [u16]) {
    pulp::Arch::new().dispatch(|| dst.iter_mut().zip(src).for_each(|(d, &x)| *d = f32_to_bf16_bits(x)));
}

/// `dst[i] = src[i]` rounded through bf16.
fn round_bf16(src: &[f32], dst: &mut [f32]) {
    pulp::Arch::new().dispatch(|| dst.iter_mut().zip(src).for_each(|(d, &x)| *d = bf16_bits_to_f32(f32_to_bf16_bits(x))));
}

fn round_bf16_in_place(v: &mut [f32]) {
    pulp::Arch::new().dispatch(|| v.iter_mut().for_each(|x| *x = bf16_bits_to_f32(f32_to_bf16_bits(*x))));
}

/// Decodes one little-endian element (`bytes` holds exactly `dtype.size()` bytes), without
/// [`decode_into`]'s parallel split: for sampling single positions, where a rayon call per
/// element cost more than the decoding.
pub fn decode_one(dtype: DType, bytes: &[u8]) -> f32 {
    match (dtype, bytes) {
        (DType::F32, &[a, b, c, d]) => f32::from_le_bytes([a, b, c, d]),
        (DType::F16, &[a, b]) => f16::from_le_bytes([a, b]).to_f32(),
        (DType::BF16, &[a, b]) => bf16::from_le_bytes([a, b]).to_f32(),
        _ => panic!("decode_one: {} bytes for one {dtype}", bytes.len()),
    }
}

fn decode_half<H: bytemuck::Pod>(src: &[u8], dst: &mut [f32])
where
    [H]: HalfFloatSliceExt,
{
    match bytemuck::try_cast_slice::<u8, H>(src) {
        Ok(s) => s.convert_to_f32_slice(dst),
        Err(_) => {
            let mut tmp = vec![H::zeroed(); dst.len()];
            bytemuck::cast_slice_mut::<H, u8>(&mut tmp).copy_from_slice(src);
            tmp.convert_to_f32_slice(dst);
        }
    }
}

fn encode_half<H: bytemuck::Pod>(src: &[f32], dst: &mut [u8])
where
    [H]: HalfFloatSliceExt,
{
    match bytemuck::try_cast_slice_mut::<u8, H>(dst) {
        Ok(d) => d.convert_from_f32_slice(src),
        Err(_) => {
            let mut tmp = vec![H::zeroed(); src.len()];
            tmp.convert_from_f32_slice(src);
            dst.copy_from_slice(bytemuck::cast_slice(&tmp));
        }
    }
}

/// Decodes `bytes` of `dtype` into a new `Vec<f32>`.
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out);
    out
}

/// Encodes `src` as little-endian `dtype` bytes (round to nearest even for f16/bf16, as torch).
pub fn encode(dtype: DType, src: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(dtype, src, &mut out);
    out
}

/// Encodes into `out` (resized; its allocation is reused across calls).
pub fn encode_into(dtype: DType, src: &[f32], out: &mut Vec<u8>) {
    out.resize(src.len() * dtype.size(), 0);
    encode_to(dtype, src, out);
}

/// Encodes into `out`, which holds exactly `src.len() × dtype.size()` bytes.
pub fn encode_to(dtype: DType, src: &[f32], out: &mut [u8]) {
    encode_chunks(dtype, src, out, |_| true);
}

/// [`encode_to`], also telling whether every value is finite: each chunk is checked right
/// after it is encoded, while it is in cache, so the check costs no second pass over memory.
pub fn encode_to_checked(dtype: DType, src: &[f32], out: &mut [u8]) -> bool {
    encode_chunks(dtype, src, out, all_finite)
}

/// No NaN or infinity in `s`: an exponent of all ones, tested branch-free so that it
/// vectorizes.
fn all_finite(s: &[f32]) -> bool {
    s.iter().fold(0u32, |acc, x| acc | u32::from(x.to_bits() & 0x7f80_0000 == 0x7f80_0000)) == 0
}

fn encode_chunks(dtype: DType, src: &[f32], out: &mut [u8], check: impl Fn(&[f32]) -> bool + Sync) -> bool {
    let sz = dtype.size();
    debug_assert_eq!(out.len(), src.len() * sz);
    out.par_chunks_mut(CHUNK * sz)
        .zip(src.par_chunks(CHUNK))
        .map(|(dst, s)| {
            match dtype {
                DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(s)),
                DType::F16 => encode_half::<f16>(s, dst),
                DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, u16>(dst) {
                    Ok(d) => f32_slice_to_bf16(s, d),
                    Err(_) => {
                        let mut tmp = vec![0u16; s.len()];
                        f32_slice_to_bf16(s, &mut tmp);
                        dst.iter_mut().zip(tmp.iter().flat_map(|b| b.to_le_bytes())).for_each(|(d, b)| *d = b);
                    }
                },
            }
            check(s)
        })
        .reduce(|| true, |a, b| a && b)
}

/// Writes `src` rounded through `dtype` into `dst` (same length), serially: the per-block
/// twin of [`round_extend`] for callers that are already parallel.
pub fn round_into(dtype: DType, src: &[f32], dst: &mut [f32]) {
    match dtype {
        DType::F32 => dst.copy_from_slice(src),
        DType::F16 => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = f16::from_f32(x).to_f32()),
        DType::BF16 => round_bf16(src, dst),
    }
}

/// Rounds `v` through `dtype` in place (serially, like [`round_into`]).
pub fn round_in_place(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        DType::BF16 => round_bf16_in_place(v),
    }
}

/// Appends `src` rounded through `dtype` (what writing then reading it would give) to `out`,
/// in parallel: the in-memory twin of [`encode_to`] + [`decode_into`].
pub fn round_extend(dtype: DType, src: &[f32], out: &mut Vec<f32>) {
    let start = out.len();
    out.resize(start + src.len(), 0.0);
    let dst = &mut out[start..];
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| round_into(dtype, s, d));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_extend_equals_encode_then_decode() {
        let v: Vec<f32> = (0..70_000).map(|i| (i as f32 * 0.37).sin() * 3.3 + 1e-3 * i as f32).collect();
        for d in [DType::F32, DType::F16, DType::BF16] {
            let mut out = vec![7.0];
            round_extend(d, &v, &mut out);
            assert_eq!(out[0], 7.0);
            assert_eq!(&out[1..], &decode(d, &encode(d, &v))[..], "{d:?}");
        }
    }

    #[test]
    fn checked_encoding_finds_nan_and_inf_in_any_chunk_and_encodes_the_same() {
        let v: Vec<f32> = (0..3 * CHUNK + 5).map(|i| (i as f32 * 0.37).sin() * 1e30).collect();
        for d in [DType::F32, DType::F16, DType::BF16] {
            let mut out = vec![0u8; v.len() * d.size()];
            assert!(encode_to_checked(d, &v, &mut out), "{d}: large finite values are finite");
            assert_eq!(out, encode(d, &v), "{d}");
            for (at, bad) in [(0, f32::NAN), (CHUNK + 3, f32::INFINITY), (3 * CHUNK + 4, f32::NEG_INFINITY), (2 * CHUNK - 1, -f32::NAN)] {
                let mut w = v.clone();
                w[at] = bad;
                assert!(!encode_to_checked(d, &w, &mut out), "{d}: {bad} at {at}");
                assert_eq!(out, encode(d, &w), "{d}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::parse(d.hf_name()), Some(d));
            assert_eq!(DType::parse(d.safetensors_name()), Some(d));
        }
        assert_eq!(DType::parse("int8"), None);
    }

    #[test]
    fn encode_decode_round_trips_representable_values() {
        let v: Vec<f32> = (0..200_000).map(|i| ((i % 512) as f32 - 256.0) * 0.125).collect();
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(decode(d, &encode(d, &v)), v, "{d}");
        }
    }

    #[test]
    fn bf16_conversions_are_halfs_bit_for_bit() {
        // Every bf16 pattern decodes as `half` decodes it (NaNs quieted).
        for b in 0..=u16::MAX {
            assert_eq!(bf16_bits_to_f32(b).to_bits(), bf16::from_bits(b).to_f32().to_bits(), "{b:#06x}");
        }
        // Every high half with the low halves that decide rounding: zero, one, below / at /
        // above the halfway point, all ones (NaN, infinity and ±0 high halves included).
        for hi in 0..=u32::from(u16::MAX) {
            for lo in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff] {
                let x = f32::from_bits(hi << 16 | lo);
                let want = bf16::from_f32(x);
                assert_eq!(f32_to_bf16_bits(x), want.to_bits(), "{:#010x}", x.to_bits());
                let (mut one, mut v) = ([0f32], [x]);
                round_bf16(&[x], &mut one);
                round_bf16_in_place(&mut v);
                assert_eq!(one[0].to_bits(), want.to_f32().to_bits());
                assert_eq!(v[0].to_bits(), want.to_f32().to_bits());
            }
        }
    }

    #[test]
    fn decode_one_equals_decode() {
        let v = [1.5f32, -2.25, 3.0e-3, f32::MAX, -0.0];
        for d in [DType::F32, DType::F16, DType::BF16] {
            let bytes = encode(d, &v);
            let one: Vec<f32> = bytes.chunks(d.size()).map(|b| decode_one(d, b)).collect();
            assert_eq!(one.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), decode(d, &bytes).iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{d}");
        }
    }

    #[test]
    fn decode_handles_unaligned_bytes() {
        let v = [1.5f32, -2.25, 3.0];
        for d in [DType::F32, DType::F16, DType::BF16] {
            let mut bytes = vec![0u8];
            bytes.extend_from_slice(&encode(d, &v));
            assert_eq!(decode(d, &bytes[1..]), v, "{d}");
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly between two bf16 values (1 and 1 + 2^-7): ties to even -> 1.
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(decode(DType::BF16, &encode(DType::BF16, &[x])), [1.0]);
    }
}
