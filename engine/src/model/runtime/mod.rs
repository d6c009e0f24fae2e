//! The forward pass, generic over burn's `Backend`.
//!
//! Per hop (model m, layer l, scale s), as transformers' `LlamaDecoderLayer` (Qwen2/Qwen3/
//! Mistral differ only where noted):
//!
//! ```text
//! x  ← s · x
//! h  = RMSNorm(x)                               (f32: x · rsqrt(mean(x²) + ε) · w)
//! q,k,v = h·Wqkv (+ b: Qwen2)                   one fused GEMM, weights stored [in, out]
//! q,k ← RMSNorm per head (Qwen3) ; RoPE(q, k)    rotate-half form, cos/sin from rope.rs
//! a  = softmax(q·kᵀ/√d + mask) · v              GQA by grouping query heads per KV head;
//!                                               mask = causal (+ window: Mistral) (+ padding)
//! x  ← x + a·Wo
//! x  ← x + down(silu(h'·Wgate) ⊙ h'·Wup), h' = RMSNorm(x)   gate|up fused in one GEMM
//! ```
//! then the final RMSNorm and the LM head of the path's head model.
//!
//! Files: `mod.rs` the weight types and the small tensor helpers; `forward.rs` the forward
//! pass (the [`Passes`] impl: scoring plans and decoding are shared with every runtime in
//! `model/passes.rs`); `load.rs` reading and checking a model's tensors; `slots.rs` the map
//! from weight buffers to tensors (in-place rewrites); `language_model.rs` the `LanguageModel`
//! impl and device merges.

mod forward;
mod language_model;
mod load;
mod slots;

#[allow(unused_imports)]
use load::*;
#[allow(unused_imports)]
pub(crate) use load::{check_models, check_tensors, read, read_embed_head, read_layer};
#[allow(unused_imports)]
use slots::*;
#[allow(unused_imports)]
pub(crate) use slots::{LayerFlags, LayerSlot, SlotId, layout};

use std::borrow::Cow;
use std::collections::HashMap;

use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Element, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::kernels::{Attention, HalfCopy, Heads, Kernels, Packing, Root, rms_norm};
use super::passes::{Health, KvCache, Passes, Step};
use super::path::LayerPath;
use super::rope::Rope;
use super::spec::{Dims, ModelSpec, check_supported, sliding_window};
use super::{
    DeviceSpec, GenerateOptions, Generation, HeldFill, HeldMerge, HeldPart, HeldParts, LanguageModel, ModelInfo, ScoreRequest, ScoreResult,
    WeightBuffer, WeightFill,
};
use crate::arch::Architecture;
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::io::ModelConfig;
use crate::source::{Tensor as HostTensor, TensorSource};
use burn::tensor::FloatDType;

struct LayerW<B: Backend> {
    in_norm: Tensor<B, 1>,
    post_norm: Tensor<B, 1>,
    /// `[hidden, (heads + 2·kv_heads)·head_dim]`.
    wqkv: Linear<B>,
    bqkv: Option<Tensor<B, 1>>,
    /// `[heads·head_dim, hidden]`.
    wo: Linear<B>,
    bo: Option<Tensor<B, 1>>,
    q_norm: Option<Tensor<B, 1>>,
    k_norm: Option<Tensor<B, 1>>,
    /// `[hidden, 2·intermediate]` (gate then up).
    wgu: Linear<B>,
    /// `[intermediate, hidden]`.
    wdown: Linear<B>,
    window: Option<usize>,
}

/// A linear layer's weight `[in, out]` and its lazily made bf16 copy for few-row products
/// ([`HalfCopy`]). The weight is only reachable mutably through [`Linear::weight_mut`], which
/// drops the copy, so a stale copy can never be read.
struct Linear<B: Backend> {
    w: Tensor<B, 2>,
    half: HalfCopy,
}

impl<B: Backend> Linear<B> {
    fn new(w: Tensor<B, 2>) -> Self {
        Self { w, half: HalfCopy::default() }
    }

    fn weight_mut(&mut self) -> &mut Tensor<B, 2> {
        self.half = HalfCopy::default();
        &mut self.w
    }
}

impl<B: Backend> ModelW<B> {
    /// Drops every weight (replaced by empty tensors) so their memory can be reused.
    fn release(&mut self) {
        let dev = self.embed.device();
        let e1 = || Tensor::<B, 1>::empty([0], &dev);
        let e2 = || Tensor::<B, 2>::empty([0, 0], &dev);
        self.embed = e2();
        self.head = Linear::new(e2());
        self.norm = e1();
        self.layers.clear();
    }
}

struct ModelW<B: Backend> {
    label: String,
    config: ModelConfig,
    arch: &'static Architecture,
    /// `[vocab, hidden]`.
    embed: Tensor<B, 2>,
    norm: Tensor<B, 1>,
    /// `[hidden, vocab]`.
    head: Linear<B>,
    /// The checkpoint tensor the head was read from (`lm_head.weight`, or the embedding when
    /// tied).
    head_tensor: &'static str,
    layers: Vec<LayerW<B>>,
    rope: Rope,
    eps: f64,
    max_context: usize,
}

/// Hidden states after a pass `[tokens, hidden]`, one row per token of `packing` (padding left
/// out on a backend that packs).
pub(crate) struct Packed<B: Backend> {
    h: Tensor<B, 2>,
    packing: Packing,
}

/// A model (or several, for data-flow paths) on one burn backend.
pub(crate) struct Runtime<B: Backend> {
    device: B::Device,
    models: Vec<ModelW<B>>,
    path: LayerPath,
    info: ModelInfo,
    mask_value: f32,
    /// Poisoned when a weight swap failed after the old weights were released; tokens run.
    health: Health,
    /// Merge inputs on the device ([`LanguageModel::hold_inputs`]): the model they are for and,
    /// per weight buffer, each input as `[rows, cols]`.
    held: Option<(usize, Vec<Vec<Tensor<B, 2>>>)>,
}

fn upload<B: Backend, const D: usize>(data: Vec<f32>, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

pub(super) fn to_host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    // A float tensor always converts to f32; failure would be a backend defect.
    #[allow(clippy::expect_used)]
    t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data")
}

pub(super) fn to_host_i64<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    #[allow(clippy::expect_used)]
    t.into_data().convert::<i64>().into_vec::<i64>().expect("i64 data")
}

/// `[out_k, in]` host tensors → one `[in, Σ out_k]` row-major buffer (x·W for every part).
pub(crate) fn transpose_concat(parts: &[&HostTensor], name: &str) -> Result<(Vec<f32>, usize, usize)> {
    let inn = parts[0].shape.get(1).copied().unwrap_or(0);
    for p in parts {
        if p.shape.len() != 2 || p.shape[1] != inn {
            return Err(EngineError::InvalidInput(format!("{name}: expected 2-D weights with {inn} inputs, got {:?}", p.shape)));
        }
    }
    let total: usize = parts.iter().map(|p| p.shape[0]).sum();
    let mut out = vec![0f32; inn * total];
    let views: Vec<(&[f32], usize)> = parts.iter().map(|p| (&p.data[..], p.shape[0])).collect();
    transpose_concat_into(&views, inn, &mut out);
    Ok((out, inn, total))
}

/// Row-major `[out_k, inn]` parts (data, out_k) → `[inn, Σ out_k]` row-major `out`, the parts
/// side by side, in blocks of 64 input rows so that reads and writes stay in cache. Generic
/// over the element: f32 weights here, raw checkpoint elements for `crate::resident`.
pub(crate) fn transpose_concat_into<T: Copy + Send + Sync>(parts: &[(&[T], usize)], inn: usize, out: &mut [T]) {
    let total: usize = parts.iter().map(|p| p.1).sum();
    const BLOCK: usize = 64;
    out.par_chunks_mut(BLOCK * total).enumerate().for_each(|(bi, rows)| {
        let i0 = bi * BLOCK;
        let n = rows.len() / total;
        let mut off = 0;
        for &(data, outs) in parts {
            for o in 0..outs {
                let src = &data[o * inn + i0..o * inn + i0 + n];
                for (r, &v) in src.iter().enumerate() {
                    rows[r * total + off + o] = v;
                }
            }
            off += outs;
        }
    });
}

fn linear<B: Kernels>(x: Tensor<B, 2>, w: &Linear<B>, b: Option<&Tensor<B, 1>>) -> Tensor<B, 2> {
    let y = <B as Kernels>::linear(x, &w.w, &w.half);
    match b {
        Some(b) => y + b.clone().unsqueeze::<2>(),
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GenerateOptions;
    use burn::backend::NdArray;

    /// The burn-op path, which is what CUDA runs (no packing, `qkv_heads` and `attention` by
    /// burn ops, RoPE tables as tensors), run on the CPU through a backend that has only the
    /// default kernels (ndarray in f64). It must score and generate as the CPU kernels do, with
    /// padding, a shared root and continuation passes.
    #[test]
    fn the_burn_op_path_scores_and_generates_as_the_cpu_kernels_do() -> Result<()> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama-tiny-a");
        let ck = crate::io::Checkpoint::open(&dir, "llama-tiny-a")?;
        let spec = [ModelSpec::from_checkpoint(&ck)];
        let mut fast = Runtime::<NdArray<f32>>::new(Default::default(), DeviceSpec::Cpu, &spec)?;
        let mut ops = Runtime::<NdArray<f64>>::new(Default::default(), DeviceSpec::Cpu, &spec)?;
        let vocab = fast.info.dims.vocab as u32;
        let ids = |seed: u32, n: usize| -> Vec<u32> { (0..n as u32).map(|i| (seed * 7919 + i * 104_729) % vocab).collect() };
        let root = ids(1, 40);
        let mut requests = vec![];
        for (c, own) in [3usize, 7, 12, 5].into_iter().enumerate() {
            let context: Vec<u32> = root.iter().copied().chain(ids(10 + c as u32, own)).collect();
            for (j, len) in [1usize, 4, 6].into_iter().enumerate() {
                requests.push(ScoreRequest { context: context.clone(), continuation: ids(100 + 3 * c as u32 + j as u32, len) });
            }
        }
        requests.push(ScoreRequest { context: ids(7, 9), continuation: ids(8, 3) });
        for share in [true, false] {
            for bs in [1, 3] {
                let (a, b) = (fast.score_planned(&requests, bs, share)?, ops.score_planned(&requests, bs, share)?);
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!((x.sum - y.sum).abs() <= 1e-4 * y.sum.abs().max(1.0), "request {i}, share {share}, batch {bs}: {} vs {}", x.sum, y.sum);
                }
            }
        }
        let prompts: Vec<Vec<u32>> = (0..5).map(|p| root.iter().copied().chain(ids(200 + p, 1 + 2 * p as usize)).collect()).collect();
        let opts = GenerateOptions { max_new_tokens: 6, eos: vec![], share_prefix: true, batch_size: 2 };
        let (a, b) = (fast.generate(&prompts, &opts, &|_, _| false)?, ops.generate(&prompts, &opts, &|_, _| false)?);
        assert_eq!(a, b, "greedy ids");
        Ok(())
    }
}
