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

use std::borrow::Cow;
use std::collections::HashMap;

use burn::tensor::activation;
use burn::tensor::backend::Backend;
use burn::tensor::{DType as BurnDType, Element, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::kernels::{HalfCopy, Kernels};
use super::path::LayerPath;
use super::rope::Rope;
use super::spec::{Dims, ModelSpec, check_supported, sliding_window};
use super::{
    DeviceSpec, GenerateOptions, Generation, HeldFill, HeldMerge, HeldPart, HeldParts, LanguageModel, ModelInfo, ScoreRequest, ScoreResult, StopReason, WeightBuffer, WeightFill,
    WeightPart,
};
use crate::dtype::DType;
use burn::tensor::FloatDType;
use crate::arch::Architecture;
use crate::error::{EngineError, Result};
use crate::io::ModelConfig;
use crate::source::{Tensor as HostTensor, TensorSource};

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

/// Key/value tensors of every hop, `[batch, kv_heads, len, head_dim]`.
struct KvCache<B: Backend> {
    entries: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

/// A model (or several, for data-flow paths) on one burn backend.
pub(crate) struct Runtime<B: Backend> {
    device: B::Device,
    models: Vec<ModelW<B>>,
    path: LayerPath,
    info: ModelInfo,
    mask_value: f32,
    /// Set when a weight swap failed after the old weights were released.
    poisoned: Option<String>,
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
fn transpose_concat(parts: &[&HostTensor], name: &str) -> Result<(Vec<f32>, usize, usize)> {
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

fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, w: &Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    let var = x.clone().square().mean_dim(D - 1);
    x * (var + eps).sqrt().recip() * w.clone().unsqueeze::<D>()
}

fn linear<B: Kernels>(x: Tensor<B, 2>, w: &Linear<B>, b: Option<&Tensor<B, 1>>) -> Tensor<B, 2> {
    let y = <B as Kernels>::linear(x, &w.w, &w.half);
    match b {
        Some(b) => y + b.clone().unsqueeze::<2>(),
        None => y,
    }
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

/// One forward batch: token ids `[b, s]`, their positions, and which key columns (of the
/// whole sequence so far, cache included) are real tokens.
struct Step<'a> {
    ids: &'a [u32],
    b: usize,
    s: usize,
    positions: &'a [usize],
    key_valid: Option<&'a [bool]>,
}

impl<B: Kernels> Runtime<B> {
    pub(crate) fn new(device: B::Device, spec: DeviceSpec, models: &[ModelSpec<'_>]) -> Result<Self> {
        let dims = Dims::of(models[0].config);
        let mut loaded = Vec::with_capacity(models.len());
        for m in models {
            check_supported(m)?;
            if Dims::of(m.config) != dims {
                return Err(EngineError::UnsupportedModel {
                    model: m.label.to_string(),
                    reason: format!(
                        "its shapes {:?} differ from '{}' {:?}; only models of one shape can share a runtime",
                        Dims::of(m.config),
                        models[0].label,
                        dims
                    ),
                });
            }
            check_tensors(m)?;
            loaded.push(load_model::<B>(m, &device)?);
        }
        let layers: Vec<usize> = loaded.iter().map(|m| m.layers.len()).collect();
        let info = ModelInfo {
            labels: loaded.iter().map(|m| m.label.clone()).collect(),
            layers,
            dims,
            max_context: loaded[0].max_context,
            device: spec,
            eos_token_ids: models[0].config.eos_token_ids.clone(),
        };
        let mask_value = match <B::FloatElem as Element>::dtype() {
            BurnDType::F16 => -65504.0,
            _ => -1e30,
        };
        let path = LayerPath::identity(0, loaded[0].layers.len());
        Ok(Self { device, models: loaded, path, info, mask_value, poisoned: None, held: None })
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.info.dims.vocab;
        match ids.iter().find(|&&t| t as usize >= v) {
            Some(t) => Err(EngineError::InvalidInput(format!("token id {t} is out of the vocabulary (size {v})"))),
            None => Ok(()),
        }
    }

    fn check_len(&self, len: usize, what: &str) -> Result<()> {
        if len > self.info.max_context {
            return Err(EngineError::InvalidInput(format!(
                "{what} of {len} tokens is longer than the model's context ({} positions)",
                self.info.max_context
            )));
        }
        Ok(())
    }

    fn non_finite(&self, what: &str) -> EngineError {
        EngineError::NonFinite { model: self.models[self.path.head_model].label.clone(), what: what.into() }
    }

    /// Additive attention mask `[b, 1, 1, s, t]`: 0 where query i (absolute column
    /// `past + i`) may see key column j, `mask_value` elsewhere.
    fn mask(&self, st: &Step<'_>, past: usize, window: Option<usize>) -> Tensor<B, 5> {
        let (b, s) = (st.b, st.s);
        let t = past + s;
        let mut m = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                let q = past + i;
                let row = &mut m[(r * s + i) * t..(r * s + i + 1) * t];
                for (j, v) in row.iter_mut().enumerate() {
                    let visible = j <= q
                        && window.is_none_or(|w| q - j < w)
                        && st.key_valid.is_none_or(|kv| kv[r * t + j]);
                    if !visible {
                        *v = self.mask_value;
                    }
                }
            }
        }
        upload::<B, 5>(m, [b, 1, 1, s, t], &self.device)
    }

    /// Hidden states `[b·s, hidden]` after the last hop (before the final norm).
    fn hidden(&self, st: &Step<'_>, mut cache: Option<&mut KvCache<B>>) -> Result<Tensor<B, 2>> {
        let Dims { hidden, heads, kv_heads, head_dim, .. } = self.info.dims;
        let (b, s) = (st.b, st.s);
        self.check_ids(st.ids)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let ids: Vec<i64> = st.ids.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b * s]), &self.device);
        let mut x = self.models[self.path.embed_model].embed.clone().select(0, ids).reshape([b, s, hidden]);

        let mut masks: HashMap<Option<usize>, Tensor<B, 5>> = HashMap::new();
        let mut ropes: HashMap<usize, (Tensor<B, 4>, Tensor<B, 4>)> = HashMap::new();
        let g = heads / kv_heads;
        let scale = (head_dim as f64).powf(-0.5);
        for (hop_i, hop) in self.path.hops.iter().enumerate() {
            let model = &self.models[hop.model];
            let layer = &model.layers[hop.layer];
            if hop.scale != 1.0 {
                x = x.mul_scalar(hop.scale);
            }
            let mask = masks.entry(layer.window).or_insert_with(|| self.mask(st, past, layer.window)).clone();
            let (cos, sin) = ropes
                .entry(hop.model)
                .or_insert_with(|| {
                    let (c, sn) = model.rope.tables(st.positions);
                    let h = head_dim / 2;
                    (upload::<B, 4>(c, [b, 1, s, h], &self.device), upload::<B, 4>(sn, [b, 1, s, h], &self.device))
                })
                .clone();

            // Attention.
            let h = rms_norm(x.clone(), &layer.in_norm, model.eps).reshape([b * s, hidden]);
            let qkv = linear(h, &layer.wqkv, layer.bqkv.as_ref());
            let q = qkv.clone().narrow(1, 0, heads * head_dim).reshape([b, s, heads, head_dim]);
            let k = qkv.clone().narrow(1, heads * head_dim, kv_heads * head_dim).reshape([b, s, kv_heads, head_dim]);
            let v = qkv.narrow(1, (heads + kv_heads) * head_dim, kv_heads * head_dim).reshape([b, s, kv_heads, head_dim]);
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (rms_norm(q, qn, model.eps), rms_norm(k, kn, model.eps)),
                _ => (q, k),
            };
            let q = rope(q.swap_dims(1, 2), &cos, &sin);
            let mut k = rope(k.swap_dims(1, 2), &cos, &sin);
            let mut v = v.swap_dims(1, 2);
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.entries[hop_i].take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                c.entries[hop_i] = Some((k.clone(), v.clone()));
            }
            let t = past + s;
            // GQA: the g query heads of one KV head are consecutive (transformers' repeat_kv).
            let q = q.reshape([b, kv_heads, g * s, head_dim]);
            let att = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale).reshape([b, kv_heads, g, s, t]) + mask;
            let att = activation::softmax(att, 4).reshape([b, kv_heads, g * s, t]);
            let a = att.matmul(v).reshape([b, heads, s, head_dim]).swap_dims(1, 2).reshape([b * s, heads * head_dim]);
            let a = linear(a, &layer.wo, layer.bo.as_ref()).reshape([b, s, hidden]);
            x = x + a;

            // MLP.
            let inter = layer.wdown.w.dims()[0];
            let h = rms_norm(x.clone(), &layer.post_norm, model.eps).reshape([b * s, hidden]);
            let gu = linear(h, &layer.wgu, None);
            let act = activation::silu(gu.clone().narrow(1, 0, inter)) * gu.narrow(1, inter, inter);
            x = x + linear(act, &layer.wdown, None).reshape([b, s, hidden]);
        }
        if let Some(c) = cache {
            c.len = past + s;
        }
        Ok(x.reshape([b * s, hidden]))
    }

    /// Final norm + LM head on selected rows `[n, hidden]` → logits `[n, vocab]`.
    fn head(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let m = &self.models[self.path.head_model];
        linear(rms_norm(h, &m.norm, m.eps), &m.head, None)
    }

    fn rows(&self, idx: Vec<i64>) -> Tensor<B, 1, Int> {
        let n = idx.len();
        Tensor::from_data(TensorData::new(idx, [n]), &self.device)
    }

    /// Scores one length-sorted batch.
    fn score_batch(&self, reqs: &[&ScoreRequest]) -> Result<Vec<ScoreResult>> {
        let b = reqs.len();
        let s = reqs.iter().map(|r| r.context.len() + r.continuation.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; b * s];
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (r, q) in reqs.iter().enumerate() {
            let full: Vec<u32> = q.context.iter().chain(&q.continuation).copied().collect();
            ids[r * s..r * s + full.len()].copy_from_slice(&full);
            // Right padding repeats the last token: causal attention never lets a real token
            // see a later column, so padding needs no mask.
            let last = full[full.len() - 1];
            ids[r * s + full.len()..(r + 1) * s].fill(last);
            for (i, &tok) in q.continuation.iter().enumerate() {
                rows.push((r * s + q.context.len() - 1 + i) as i64);
                targets.push(i64::from(tok));
            }
        }
        let positions: Vec<usize> = (0..b).flat_map(|_| 0..s).collect();
        let h = self.hidden(&Step { ids: &ids, b, s, positions: &positions, key_valid: None }, None)?;
        let logits = self.head(h.select(0, self.rows(rows)));
        let (lse, tgt, am) = <B as Kernels>::row_stats(logits, &targets);
        if lse.iter().chain(&tgt).any(|v| !v.is_finite()) {
            return Err(self.non_finite("logits"));
        }
        let mut out = Vec::with_capacity(b);
        let mut k = 0;
        for q in reqs {
            let m = q.continuation.len();
            let logprobs: Vec<f64> = (k..k + m).map(|i| f64::from(tgt[i]) - f64::from(lse[i])).collect();
            let greedy = (k..k + m).all(|i| am[i] == targets[i]);
            k += m;
            out.push(ScoreResult { sum: logprobs.iter().sum(), logprobs, greedy });
        }
        Ok(out)
    }

    /// Greedy argmax of the last position of each row, checked for NaN/inf.
    fn next_tokens(&self, h: Tensor<B, 2>, b: usize, s: usize) -> Result<Vec<u32>> {
        let rows: Vec<i64> = (0..b).map(|r| (r * s + s - 1) as i64).collect();
        let logits = self.head(h.select(0, self.rows(rows)));
        let finite = logits.clone().is_finite().all().into_scalar();
        if !finite.elem::<bool>() {
            return Err(self.non_finite("logits"));
        }
        Ok(to_host_i64(logits.argmax(1)).into_iter().map(|t| t as u32).collect())
    }

    /// Swaps model `index` for the tensors of `spec`; other models, the path and the tables
    /// stay. Shapes are checked from metadata first; then the old weights are released before
    /// the new ones upload, so peak memory stays at one copy and the allocator (mimalloc with
    /// purging off; burn-cuda's pool on GPU) hands the same memory back. If reading a tensor
    /// fails after that, the runtime refuses further work rather than run a half-loaded model.
    fn replace_model(&mut self, index: usize, spec: &ModelSpec<'_>) -> Result<()> {
        check_tensors(spec)?;
        self.models[index].release();
        match load_model::<B>(spec, &self.device) {
            Ok(fresh) => {
                self.models[index] = fresh;
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(format!("loading weights from '{}' failed half way: {e}", spec.label));
                Err(e)
            }
        }
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(EngineError::InvalidInput(format!("model unusable: {why}; load weights again"))),
            None => Ok(()),
        }
    }
}

use burn::tensor::ElementConversion;

/// A tensor of the spec, borrowed when the source holds f32 already (merged candidates).
fn read<'a>(spec: &ModelSpec<'a>, name: &str) -> Result<Cow<'a, HostTensor>> {
    spec.tensors.get_f32(name)
}

fn read_opt<'a>(spec: &ModelSpec<'a>, name: &str) -> Result<Option<Cow<'a, HostTensor>>> {
    match spec.tensors.meta(name) {
        Some(_) => read(spec, name).map(Some),
        None => Ok(None),
    }
}

fn vector<B: Backend>(t: Cow<'_, HostTensor>, device: &B::Device) -> Tensor<B, 1> {
    let n = t.numel();
    upload(t.into_owned().data, [n], device)
}

fn matrix_t<B: Backend>(parts: &[&HostTensor], name: &str, device: &B::Device) -> Result<Tensor<B, 2>> {
    let (data, inn, out) = transpose_concat(parts, name)?;
    Ok(upload(data, [inn, out], device))
}

/// Checks, from metadata only, that `spec` holds every tensor the forward pass needs with the
/// shapes its config implies (and optional groups complete), so that loading cannot fail half
/// way for a shape reason.
fn check_tensors(spec: &ModelSpec<'_>) -> Result<()> {
    let cfg = spec.config;
    let d = Dims::of(cfg);
    let src = spec.tensors;
    let need = |name: &str, shape: &[usize]| -> Result<()> {
        match src.meta(name) {
            None => Err(EngineError::MissingTensor { model: spec.label.to_string(), tensor: name.to_string() }),
            Some((got, _)) if got != shape => Err(EngineError::ShapeMismatch {
                tensor: name.to_string(),
                model: spec.label.to_string(),
                got,
                reference: "its config.json".into(),
                expected: shape.to_vec(),
            }),
            Some(_) => Ok(()),
        }
    };
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    need("model.embed_tokens.weight", &[d.vocab, d.hidden])?;
    need("model.norm.weight", &[d.hidden])?;
    if !cfg.tie_word_embeddings || src.meta("lm_head.weight").is_some() {
        need("lm_head.weight", &[d.vocab, d.hidden])?;
    }
    let unsupported = |reason: String| EngineError::UnsupportedModel { model: spec.label.to_string(), reason };
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}.");
        for (n, shape) in [
            ("self_attn.q_proj.weight", vec![q, d.hidden]),
            ("self_attn.k_proj.weight", vec![kv, d.hidden]),
            ("self_attn.v_proj.weight", vec![kv, d.hidden]),
            ("self_attn.o_proj.weight", vec![d.hidden, q]),
            ("mlp.gate_proj.weight", vec![d.intermediate, d.hidden]),
            ("mlp.up_proj.weight", vec![d.intermediate, d.hidden]),
            ("mlp.down_proj.weight", vec![d.hidden, d.intermediate]),
            ("input_layernorm.weight", vec![d.hidden]),
            ("post_attention_layernorm.weight", vec![d.hidden]),
        ] {
            need(&format!("{p}{n}"), &shape)?;
        }
        let has = |n: &str| src.meta(&format!("{p}{n}")).is_some();
        let biases = [has("self_attn.q_proj.bias"), has("self_attn.k_proj.bias"), has("self_attn.v_proj.bias")];
        if biases.contains(&true) {
            if biases.contains(&false) {
                return Err(unsupported(format!("layer {l} has biases on only some of q/k/v")));
            }
            need(&format!("{p}self_attn.q_proj.bias"), &[q])?;
            need(&format!("{p}self_attn.k_proj.bias"), &[kv])?;
            need(&format!("{p}self_attn.v_proj.bias"), &[kv])?;
        }
        if has("self_attn.o_proj.bias") {
            need(&format!("{p}self_attn.o_proj.bias"), &[d.hidden])?;
        }
        match (has("self_attn.q_norm.weight"), has("self_attn.k_norm.weight")) {
            (true, true) => {
                need(&format!("{p}self_attn.q_norm.weight"), &[d.head_dim])?;
                need(&format!("{p}self_attn.k_norm.weight"), &[d.head_dim])?;
            }
            (false, false) => {}
            _ => return Err(unsupported(format!("layer {l} has only one of q_norm / k_norm"))),
        }
    }
    Ok(())
}

/// Uploads a model whose tensors [`check_tensors`] accepted.
fn load_model<B: Backend>(spec: &ModelSpec<'_>, device: &B::Device) -> Result<ModelW<B>> {
    let cfg = spec.config;
    let d = Dims::of(cfg);
    let embed_name = "model.embed_tokens.weight";
    let embed_h = read(spec, embed_name)?;
    let (head, head_tensor) = match (cfg.tie_word_embeddings, read_opt(spec, "lm_head.weight")?) {
        (_, Some(h)) => (matrix_t::<B>(&[&*h], "lm_head.weight", device)?, "lm_head.weight"),
        (true, None) => (matrix_t::<B>(&[&*embed_h], embed_name, device)?, embed_name),
        (false, None) => {
            return Err(EngineError::MissingTensor { model: spec.label.to_string(), tensor: "lm_head.weight".into() });
        }
    };
    let embed = upload::<B, 2>(embed_h.into_owned().data, [d.vocab, d.hidden], device);
    let norm = vector::<B>(read(spec, "model.norm.weight")?, device);
    let layers_n = cfg.num_hidden_layers;
    let mut layers = Vec::with_capacity(layers_n);
    for l in 0..layers_n {
        let p = format!("model.layers.{l}.");
        let r = |n: &str| read(spec, &format!("{p}{n}"));
        let ro = |n: &str| read_opt(spec, &format!("{p}{n}"));
        let (q, k, v) = (r("self_attn.q_proj.weight")?, r("self_attn.k_proj.weight")?, r("self_attn.v_proj.weight")?);
        let wqkv = Linear::new(matrix_t::<B>(&[&*q, &*k, &*v], &format!("{p}self_attn.qkv"), device)?);
        let bqkv = match (ro("self_attn.q_proj.bias")?, ro("self_attn.k_proj.bias")?, ro("self_attn.v_proj.bias")?) {
            (Some(bq), Some(bk), Some(bv)) => {
                let data: Vec<f32> = bq.data.iter().chain(&bk.data).chain(&bv.data).copied().collect();
                let n = data.len();
                Some(upload::<B, 1>(data, [n], device))
            }
            _ => None, // check_tensors: all three or none
        };
        let o = r("self_attn.o_proj.weight")?;
        let (gate, up, down) = (r("mlp.gate_proj.weight")?, r("mlp.up_proj.weight")?, r("mlp.down_proj.weight")?);
        let (q_norm, k_norm) = (ro("self_attn.q_norm.weight")?, ro("self_attn.k_norm.weight")?);
        layers.push(LayerW {
            in_norm: vector::<B>(r("input_layernorm.weight")?, device),
            post_norm: vector::<B>(r("post_attention_layernorm.weight")?, device),
            wqkv,
            bqkv,
            wo: Linear::new(matrix_t::<B>(&[&*o], "o_proj", device)?),
            bo: ro("self_attn.o_proj.bias")?.map(|t| vector::<B>(t, device)),
            q_norm: q_norm.map(|t| vector::<B>(t, device)),
            k_norm: k_norm.map(|t| vector::<B>(t, device)),
            wgu: Linear::new(matrix_t::<B>(&[&*gate, &*up], "gate_up", device)?),
            wdown: Linear::new(matrix_t::<B>(&[&*down], "down_proj", device)?),
            window: sliding_window(cfg, spec.arch, l),
        });
    }
    Ok(ModelW {
        label: spec.label.to_string(),
        config: cfg.clone(),
        arch: spec.arch,
        embed,
        norm,
        head: Linear::new(head),
        head_tensor,
        layers,
        rope: Rope::new(d.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref()),
        eps: cfg.rms_norm_eps,
        max_context: cfg.max_position_embeddings,
    })
}

/// Which weight tensor of a loaded model a [`WeightBuffer`] is.
#[derive(Debug, Clone, Copy)]
enum SlotId {
    Embed,
    Norm,
    Head,
    Layer(usize, LayerSlot),
}

#[derive(Debug, Clone, Copy)]
enum LayerSlot {
    InNorm,
    PostNorm,
    Wqkv,
    Bqkv,
    Wo,
    Bo,
    QNorm,
    KNorm,
    Wgu,
    Wdown,
}

/// A weight tensor of a loaded model, for in-place rewrites.
enum Slot<'a, B: Backend> {
    Vector(&'a mut Tensor<B, 1>),
    Matrix(&'a mut Tensor<B, 2>),
}

/// The weight buffers of `m` in layout order, with the checkpoint tensors in each. One place
/// decides the order, so [`LanguageModel::weight_layout`] and
/// [`LanguageModel::write_weights`] agree.
fn weight_buffers<B: Backend>(m: &ModelW<B>) -> Vec<(WeightBuffer, SlotId)> {
    let d = Dims::of(&m.config);
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let part = |tensor: String, col: usize, width: usize, transposed: bool| WeightPart { tensor, col, width, transposed };
    let vector = |tensor: String, n: usize| WeightBuffer { rows: 1, cols: n, parts: vec![part(tensor, 0, n, false)] };
    // [in, Σ out] from [out_k, in] linear weights, side by side
    let linear = |rows: usize, tensors: &[(String, usize)]| {
        let mut col = 0;
        let parts = tensors
            .iter()
            .map(|(t, w)| {
                col += w;
                part(t.clone(), col - w, *w, true)
            })
            .collect();
        WeightBuffer { rows, cols: col, parts }
    };
    let embed = WeightBuffer { rows: d.vocab, cols: d.hidden, parts: vec![part("model.embed_tokens.weight".into(), 0, d.hidden, false)] };
    let mut out = vec![
        (embed, SlotId::Embed),
        (vector("model.norm.weight".into(), d.hidden), SlotId::Norm),
        (linear(d.hidden, &[(m.head_tensor.to_string(), d.vocab)]), SlotId::Head),
    ];
    for (l, layer) in m.layers.iter().enumerate() {
        let n = |s: &str| format!("model.layers.{l}.{s}");
        let mut push = |b: WeightBuffer, s: LayerSlot| out.push((b, SlotId::Layer(l, s)));
        push(vector(n("input_layernorm.weight"), d.hidden), LayerSlot::InNorm);
        push(vector(n("post_attention_layernorm.weight"), d.hidden), LayerSlot::PostNorm);
        let qkv = [(n("self_attn.q_proj.weight"), q), (n("self_attn.k_proj.weight"), kv), (n("self_attn.v_proj.weight"), kv)];
        push(linear(d.hidden, &qkv), LayerSlot::Wqkv);
        if layer.bqkv.is_some() {
            let parts = vec![
                part(n("self_attn.q_proj.bias"), 0, q, false),
                part(n("self_attn.k_proj.bias"), q, kv, false),
                part(n("self_attn.v_proj.bias"), q + kv, kv, false),
            ];
            push(WeightBuffer { rows: 1, cols: q + 2 * kv, parts }, LayerSlot::Bqkv);
        }
        push(linear(q, &[(n("self_attn.o_proj.weight"), d.hidden)]), LayerSlot::Wo);
        if layer.bo.is_some() {
            push(vector(n("self_attn.o_proj.bias"), d.hidden), LayerSlot::Bo);
        }
        if layer.q_norm.is_some() {
            push(vector(n("self_attn.q_norm.weight"), d.head_dim), LayerSlot::QNorm);
        }
        if layer.k_norm.is_some() {
            push(vector(n("self_attn.k_norm.weight"), d.head_dim), LayerSlot::KNorm);
        }
        let gu = [(n("mlp.gate_proj.weight"), d.intermediate), (n("mlp.up_proj.weight"), d.intermediate)];
        push(linear(d.hidden, &gu), LayerSlot::Wgu);
        push(linear(d.intermediate, &[(n("mlp.down_proj.weight"), d.hidden)]), LayerSlot::Wdown);
    }
    out
}

/// The tensor behind `id` (which [`weight_buffers`] produced for `m`).
fn slot_mut<B: Backend>(m: &mut ModelW<B>, id: SlotId) -> Option<Slot<'_, B>> {
    Some(match id {
        SlotId::Embed => Slot::Matrix(&mut m.embed),
        SlotId::Norm => Slot::Vector(&mut m.norm),
        SlotId::Head => Slot::Matrix(m.head.weight_mut()),
        SlotId::Layer(l, s) => {
            let layer = m.layers.get_mut(l)?;
            match s {
                LayerSlot::InNorm => Slot::Vector(&mut layer.in_norm),
                LayerSlot::PostNorm => Slot::Vector(&mut layer.post_norm),
                LayerSlot::Wqkv => Slot::Matrix(layer.wqkv.weight_mut()),
                LayerSlot::Bqkv => Slot::Vector(layer.bqkv.as_mut()?),
                LayerSlot::Wo => Slot::Matrix(layer.wo.weight_mut()),
                LayerSlot::Bo => Slot::Vector(layer.bo.as_mut()?),
                LayerSlot::QNorm => Slot::Vector(layer.q_norm.as_mut()?),
                LayerSlot::KNorm => Slot::Vector(layer.k_norm.as_mut()?),
                LayerSlot::Wgu => Slot::Matrix(layer.wgu.weight_mut()),
                LayerSlot::Wdown => Slot::Matrix(layer.wdown.weight_mut()),
            }
        }
    })
}

impl<B: Kernels> Runtime<B> {
    /// Rewrites one weight tensor through `fill`: the tensor's memory is taken out, filled and
    /// put back ([`Kernels::host_buffer`]: the same allocation on the CPU).
    fn rewrite<const D: usize>(t: &mut Tensor<B, D>, buf: &WeightBuffer, index: usize, device: &B::Device, fill: &mut WeightFill<'_>) -> Result<()> {
        let dims = t.dims();
        let shape: [usize; D] = if D == 1 { [buf.numel(); D] } else { std::array::from_fn(|i| if i == 0 { buf.rows } else { buf.cols }) };
        if dims != shape {
            return Err(EngineError::InvalidInput(format!("weight buffer {index}: runtime holds {dims:?}, layout says {shape:?}")));
        }
        let old = std::mem::replace(t, Tensor::empty([0; D], device));
        let mut host = B::host_buffer(old);
        fill(index, &mut host)?;
        *t = upload(host, shape, device);
        Ok(())
    }
}

impl<B: Kernels> LanguageModel for Runtime<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn path(&self) -> &LayerPath {
        &self.path
    }

    fn set_path(&mut self, path: LayerPath) -> Result<()> {
        path.validate(&self.info.layers)?;
        self.path = path;
        Ok(())
    }

    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_usable()?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidInput("no tokens to score".into()));
        }
        self.check_len(tokens.len(), "a sequence")?;
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let h = self.hidden(&Step { ids: tokens, b: 1, s: tokens.len(), positions: &positions, key_valid: None }, None)?;
        let logits = to_host_f32(self.head(h));
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.non_finite("logits"));
        }
        Ok(logits)
    }

    fn score(&mut self, requests: &[ScoreRequest], batch_size: usize) -> Result<Vec<ScoreResult>> {
        self.check_usable()?;
        for (i, r) in requests.iter().enumerate() {
            if r.context.is_empty() || r.continuation.is_empty() {
                return Err(EngineError::InvalidInput(format!(
                    "score request {i}: context and continuation must both hold at least one token"
                )));
            }
            self.check_len(r.context.len() + r.continuation.len(), &format!("score request {i}"))?;
        }
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len() + requests[i].continuation.len()));
        let mut out: Vec<Option<ScoreResult>> = vec![None; requests.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let reqs: Vec<&ScoreRequest> = chunk.iter().map(|&i| &requests[i]).collect();
            for (&i, r) in chunk.iter().zip(self.score_batch(&reqs)?) {
                out[i] = Some(r);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        stop: &dyn Fn(usize, &[u32]) -> bool,
    ) -> Result<Vec<Generation>> {
        self.check_usable()?;
        if prompts.is_empty() {
            return Ok(vec![]);
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(EngineError::InvalidInput(format!("prompt {i} is empty")));
            }
            self.check_len(p.len(), &format!("prompt {i}"))?;
        }
        let b = prompts.len();
        let s = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // Left padding: every prompt ends in the last column, so one new column per step.
        let mut ids = vec![0u32; b * s];
        let mut positions = vec![0usize; b * s];
        let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
        for (r, p) in prompts.iter().enumerate() {
            let pad = s - p.len();
            ids[r * s..r * s + pad].fill(p[0]);
            ids[r * s + pad..(r + 1) * s].copy_from_slice(p);
            for c in pad..s {
                positions[r * s + c] = c - pad;
            }
            valid.push((0..s).map(|c| c >= pad).collect());
        }
        let flat = |v: &[Vec<bool>]| -> Vec<bool> { v.iter().flatten().copied().collect() };
        let mut cache = KvCache { entries: vec![None; self.path.hops.len()], len: 0 };
        let kv = flat(&valid);
        let any_pad = kv.iter().any(|v| !v);
        let h = self.hidden(
            &Step { ids: &ids, b, s, positions: &positions, key_valid: any_pad.then_some(kv.as_slice()) },
            Some(&mut cache),
        )?;
        let mut next = self.next_tokens(h, b, s)?;
        let mut out: Vec<Generation> = (0..b).map(|_| Generation { tokens: vec![], reason: StopReason::MaxTokens }).collect();
        let mut done = vec![opts.max_new_tokens == 0; b];
        let mut step = 0;
        loop {
            for r in 0..b {
                if done[r] {
                    continue;
                }
                let t = next[r];
                if opts.eos.contains(&t) {
                    out[r].reason = StopReason::Eos;
                    done[r] = true;
                    continue;
                }
                out[r].tokens.push(t);
                if stop(r, &out[r].tokens) {
                    out[r].reason = StopReason::Stop;
                    done[r] = true;
                } else if out[r].tokens.len() >= opts.max_new_tokens {
                    done[r] = true;
                }
            }
            step += 1;
            if done.iter().all(|&d| d) {
                break;
            }
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + step;
            if longest > self.info.max_context {
                for r in 0..b {
                    if !done[r] {
                        out[r].reason = StopReason::ContextFull;
                    }
                }
                break;
            }
            let pos: Vec<usize> = prompts.iter().map(|p| p.len() + step - 1).collect();
            for v in &mut valid {
                v.push(true);
            }
            let kv = flat(&valid);
            let h = self.hidden(
                &Step { ids: &next, b, s: 1, positions: &pos, key_valid: any_pad.then_some(kv.as_slice()) },
                Some(&mut cache),
            )?;
            next = self.next_tokens(h, b, 1)?;
        }
        Ok(out)
    }

    fn load_weights(&mut self, model: usize, source: &dyn TensorSource) -> Result<()> {
        if model >= self.models.len() {
            return Err(EngineError::InvalidInput(format!("load_weights: no loaded model {model}")));
        }
        // The config and architecture stay those of the loaded model; only tensors change.
        self.poisoned = None;
        let (config, arch) = (self.models[model].config.clone(), self.models[model].arch);
        let spec = ModelSpec { label: source.label(), config: &config, arch, tensors: source };
        self.replace_model(model, &spec)
    }

    fn weight_layout(&self, model: usize) -> Result<Vec<WeightBuffer>> {
        let m = self.models.get(model).ok_or_else(|| EngineError::InvalidInput(format!("weight_layout: no loaded model {model}")))?;
        Ok(weight_buffers(m).into_iter().map(|(b, _)| b).collect())
    }

    fn write_weights(&mut self, model: usize, fill: &mut WeightFill<'_>) -> Result<()> {
        self.check_usable()?;
        if model >= self.models.len() {
            return Err(EngineError::InvalidInput(format!("write_weights: no loaded model {model}")));
        }
        let device = self.device.clone();
        let mut result = Ok(());
        let m = &mut self.models[model];
        for (index, (buf, id)) in weight_buffers(m).into_iter().enumerate() {
            result = match slot_mut(m, id) {
                Some(Slot::Vector(t)) => Self::rewrite(t, &buf, index, &device, fill),
                Some(Slot::Matrix(t)) => Self::rewrite(t, &buf, index, &device, fill),
                None => Err(EngineError::InvalidInput(format!("weight buffer {index} has no tensor"))),
            };
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = &result {
            self.poisoned = Some(format!("rewriting the weights of '{}' failed half way: {e}", self.models[model].label));
        }
        result
    }

    fn hold_inputs(&mut self, model: usize, count: usize, fill: &mut HeldFill<'_>) -> Result<bool> {
        let m = self.models.get(model).ok_or_else(|| EngineError::InvalidInput(format!("hold_inputs: no loaded model {model}")))?;
        self.held = None;
        let mut held = Vec::new();
        for (index, (buf, _)) in weight_buffers(m).into_iter().enumerate() {
            let mut inputs = Vec::with_capacity(count);
            for k in 0..count {
                let mut host = vec![0f32; buf.numel()];
                fill(index, k, &mut host)?;
                inputs.push(upload::<B, 2>(host, [buf.rows, buf.cols], &self.device));
            }
            held.push(inputs);
        }
        self.held = Some((model, held));
        Ok(true)
    }

    fn release_held(&mut self) {
        self.held = None;
    }

    fn merge_held(&mut self, model: usize, parts: &mut HeldParts<'_>, round: DType) -> Result<bool> {
        self.check_usable()?;
        let Some((held_model, held)) = &self.held else { return Ok(false) };
        if *held_model != model {
            return Ok(false);
        }
        let m = &mut self.models[model];
        // Compute every buffer before replacing any, so that a bad part leaves the model as it was.
        let mut merged = Vec::new();
        for (index, (buf, id)) in weight_buffers(m).into_iter().enumerate() {
            let inputs = held.get(index).ok_or_else(|| EngineError::InvalidInput(format!("merge_held: no inputs held for weight buffer {index}")))?;
            let mut cols = Vec::new();
            let mut at = 0;
            for part in parts(index)? {
                if part.col != at || part.col + part.width > buf.cols {
                    return Err(EngineError::InvalidInput(format!("merge_held: parts of weight buffer {index} do not tile its {} columns", buf.cols)));
                }
                at += part.width;
                cols.push(held_part(inputs, &part, index)?);
            }
            if at != buf.cols {
                return Err(EngineError::InvalidInput(format!("merge_held: parts of weight buffer {index} cover {at} of {} columns", buf.cols)));
            }
            let y = if cols.len() == 1 { cols.remove(0) } else { Tensor::cat(cols, 1) };
            merged.push((B::round_through(y, round), id));
        }
        for (y, id) in merged {
            match slot_mut(m, id) {
                Some(Slot::Vector(t)) => {
                    let dtype = t.dtype();
                    *t = y.cast(FloatDType::from(dtype)).reshape([t.dims()[0]]);
                }
                Some(Slot::Matrix(t)) => {
                    let dtype = t.dtype();
                    *t = y.cast(FloatDType::from(dtype));
                }
                None => return Err(EngineError::InvalidInput("merge_held: a weight buffer has no tensor".into())),
            }
        }
        Ok(true)
    }
}

/// One [`HeldPart`] of a buffer from its held `inputs`, in f32 (with the CPU kernels' order of
/// operations, see [`HeldMerge`]).
fn held_part<B: Backend>(inputs: &[Tensor<B, 2>], part: &HeldPart, index: usize) -> Result<Tensor<B, 2>> {
    let x = |k: usize| -> Result<Tensor<B, 2>> {
        let t = inputs.get(k).ok_or_else(|| EngineError::InvalidInput(format!("merge_held: weight buffer {index} holds no input {k}")))?;
        Ok(t.clone().narrow(1, part.col, part.width).cast(FloatDType::F32))
    };
    Ok(match &part.merge {
        HeldMerge::TaskArithmetic { base, terms, divisor, lambda } => {
            let b = x(*base)?;
            let mut t = b.zeros_like();
            for &(k, w) in terms {
                t = t + (x(k)? - b.clone()).mul_scalar(w);
            }
            if let Some(d) = divisor {
                t = t.div_scalar(*d);
            }
            if let Some(l) = lambda {
                t = t.mul_scalar(*l);
            }
            b + t
        }
        HeldMerge::Linear { terms, divisor } => {
            let mut t: Option<Tensor<B, 2>> = None;
            for &(k, w) in terms {
                let xk = x(k)?;
                let acc = t.take().unwrap_or_else(|| xk.zeros_like());
                t = Some(acc + xk.mul_scalar(w));
            }
            let t = t.ok_or_else(|| EngineError::InvalidInput(format!("merge_held: weight buffer {index}: a linear merge of no inputs")))?;
            match divisor {
                Some(d) => t.div_scalar(*d),
                None => t,
            }
        }
    })
}
