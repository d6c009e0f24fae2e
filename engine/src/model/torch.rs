//! The LibTorch runtime (`--features libtorch`, `--runtime libtorch`): the forward pass on
//! PyTorch's own kernels through `tch` — MKL/oneDNN on the CPU, cuBLAS and the fused
//! `scaled_dot_product_attention` on NVIDIA GPUs, bf16/f16 checkpoints kept in their dtype on
//! the GPU.
//!
//! Only tensor ops live here. Everything else is the burn runtime's: the checks and the
//! architecture data (`spec.rs`, `load.rs`'s `check_tensors`), RoPE tables (`rope.rs`), the
//! weight-buffer layout merges write into (`runtime/slots.rs`), and the scoring plans, shared
//! prefixes and decoding loop (`passes.rs`). Weights are stored as the burn runtime stores
//! them — linear weights `[in, out]`, q|k|v and gate|up fused — so one layout serves both.
//!
//! tch panics where PyTorch raises (out of memory, a kernel missing for a dtype); every entry
//! point runs under `catch_unwind` and turns such a panic into an error naming the device.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;

use tch::{Device, Kind, Tensor};

use super::passes::{self, Health, KvCache, Passes, Step};
use super::path::LayerPath;
use super::rope::Rope;
use super::runtime::{LayerFlags, SlotId, check_models, check_tensors, layout, read, read_embed_head, read_layer, transpose_concat};
use super::spec::{Dims, ModelSpec, sliding_window};
use super::{
    DeviceSpec, GenerateOptions, Generation, HeldFill, HeldMerge, HeldPart, HeldParts, LanguageModel, ModelInfo, ScoreRequest, ScoreResult,
    WeightBuffer, WeightFill,
};
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::io::ModelConfig;
use crate::source::{Tensor as HostTensor, TensorSource};

/// The PyTorch version this runtime is built and tested against (`torch==2.11.0` from PyPI).
pub const TORCH_VERSION: &str = "2.11.0";

/// A key or value tensor of the cache (`Tensor` is not `Clone`: clones share storage).
pub(crate) struct Kv(Tensor);

impl Clone for Kv {
    fn clone(&self) -> Self {
        Kv(self.0.shallow_clone())
    }
}

struct LayerW {
    in_norm: Tensor,
    post_norm: Tensor,
    /// `[hidden, (heads + 2·kv_heads)·head_dim]`.
    wqkv: Tensor,
    bqkv: Option<Tensor>,
    /// `[heads·head_dim, hidden]`.
    wo: Tensor,
    bo: Option<Tensor>,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// `[hidden, 2·intermediate]` (gate then up).
    wgu: Tensor,
    /// `[intermediate, hidden]`.
    wdown: Tensor,
    window: Option<usize>,
}

struct ModelW {
    label: String,
    config: ModelConfig,
    arch: &'static crate::arch::Architecture,
    /// `[vocab, hidden]`.
    embed: Tensor,
    norm: Tensor,
    /// `[hidden, vocab]`.
    head: Tensor,
    head_tensor: &'static str,
    layers: Vec<LayerW>,
    rope: Rope,
    eps: f64,
}

impl ModelW {
    fn flags(&self) -> Vec<LayerFlags> {
        self.layers
            .iter()
            .map(|l| LayerFlags { bqkv: l.bqkv.is_some(), bo: l.bo.is_some(), q_norm: l.q_norm.is_some(), k_norm: l.k_norm.is_some() })
            .collect()
    }

    /// The tensor behind `id` (which [`layout`] produced for this model).
    fn slot_mut(&mut self, id: SlotId) -> Option<&mut Tensor> {
        use super::runtime::LayerSlot as S;
        Some(match id {
            SlotId::Embed => &mut self.embed,
            SlotId::Norm => &mut self.norm,
            SlotId::Head => &mut self.head,
            SlotId::Layer(l, s) => {
                let layer = self.layers.get_mut(l)?;
                match s {
                    S::InNorm => &mut layer.in_norm,
                    S::PostNorm => &mut layer.post_norm,
                    S::Wqkv => &mut layer.wqkv,
                    S::Bqkv => layer.bqkv.as_mut()?,
                    S::Wo => &mut layer.wo,
                    S::Bo => layer.bo.as_mut()?,
                    S::QNorm => layer.q_norm.as_mut()?,
                    S::KNorm => layer.k_norm.as_mut()?,
                    S::Wgu => &mut layer.wgu,
                    S::Wdown => &mut layer.wdown,
                }
            }
        })
    }
}

/// Models (several, for data-flow paths) on one LibTorch device, in one float kind.
pub(crate) struct TorchRuntime {
    device: Device,
    /// The weights' and activations' kind: f32 on the CPU; the checkpoint's dtype on a GPU.
    kind: Kind,
    models: Vec<ModelW>,
    path: LayerPath,
    info: ModelInfo,
    mask_value: f32,
    /// Poisoned when a weight swap failed half way; tokens run.
    health: Health,
    /// Merge inputs on the device: the model they are for and, per weight buffer, each input.
    held: Option<(usize, Vec<Vec<Tensor>>)>,
}

/// Runs `f`, turning a tch panic (PyTorch raised: out of memory, no kernel) into an error.
fn guarded<T>(device: DeviceSpec, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            let first = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("a LibTorch operation failed").trim().to_string();
            Err(EngineError::Device { device: device.to_string(), reason: format!("LibTorch: {first}") })
        }
    }
}

/// The version of the LibTorch this process loaded, read beside its `libtorch_cpu.so`
/// (`torch/version.py` of a pip install, `build-version` of a LibTorch archive); `None` when
/// neither is there.
fn loaded_version() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let lib = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.ends_with("/libtorch_cpu.so"))?;
    let root = std::path::Path::new(lib).parent()?.parent()?;
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        let line = py.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|v| v.trim().to_string())
}

/// The LibTorch device for `spec`, checked: the LibTorch version this build expects, and for a
/// CUDA device a CUDA LibTorch and the GPU.
fn torch_device(spec: DeviceSpec) -> Result<Device> {
    let version = loaded_version().unwrap_or_else(|| "(version unknown)".into());
    if loaded_version().is_some_and(|v| !v.starts_with(TORCH_VERSION)) {
        return Err(EngineError::Device {
            device: spec.to_string(),
            reason: format!(
                "evomerge's libtorch runtime expects PyTorch {TORCH_VERSION} but loaded LibTorch {version}; \
                 point LD_LIBRARY_PATH at the lib/ folder of torch=={TORCH_VERSION}"
            ),
        });
    }
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(i) => {
            let n = tch::Cuda::device_count();
            if !tch::utils::has_cuda() || n == 0 {
                return Err(EngineError::Device {
                    device: spec.to_string(),
                    reason: format!("LibTorch {version} sees no CUDA device (a CPU-only LibTorch, or no NVIDIA driver)"),
                });
            }
            if i as i64 >= n {
                return Err(EngineError::Device { device: spec.to_string(), reason: format!("LibTorch sees {n} CUDA device(s)") });
            }
            Ok(Device::Cuda(i))
        }
    }
}

fn dims_i64<const D: usize>(shape: [usize; D]) -> [i64; D] {
    shape.map(|d| d as i64)
}

impl TorchRuntime {
    pub(crate) fn new(spec: DeviceSpec, models: &[ModelSpec<'_>]) -> Result<Self> {
        let device = torch_device(spec)?;
        let kind = match (device, models[0].config.dtype) {
            (Device::Cuda(_), Some(DType::BF16)) => Kind::BFloat16,
            (Device::Cuda(_), Some(DType::F16)) => Kind::Half,
            _ => Kind::Float,
        };
        let dims = check_models(models)?;
        let _no_grad = tch::no_grad_guard();
        let loaded = guarded(spec, || models.iter().map(|m| load_model(m, device, kind)).collect::<Result<Vec<_>>>())?;
        let info = ModelInfo {
            labels: loaded.iter().map(|m| m.label.clone()).collect(),
            layers: loaded.iter().map(|m| m.layers.len()).collect(),
            dims,
            max_context: models[0].config.max_position_embeddings,
            device: spec,
            eos_token_ids: models[0].config.eos_token_ids.clone(),
        };
        let path = LayerPath::identity(0, loaded[0].layers.len());
        let mask_value = if kind == Kind::Half { -65504.0 } else { -1e30 };
        Ok(Self { device, kind, models: loaded, path, info, mask_value, health: Health::default(), held: None })
    }

    fn upload(&self, data: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(data).view(shape).to_device(self.device)
    }

    fn ids(&self, idx: &[i64]) -> Tensor {
        Tensor::from_slice(idx).to_device(self.device)
    }

    fn head(&self, h: &Tensor) -> Tensor {
        let m = &self.models[self.path.head_model];
        rms_norm(h, &m.norm, m.eps).matmul(&m.head)
    }

    fn guard<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _no_grad = tch::no_grad_guard();
        guarded(self.info.device, f)
    }

    /// Attention of `q [b, heads, s, d]` over a shared root's `rk`, `rv` `[1, kv, len, d]`
    /// (masked by `rmask [b, 1, 1, s, len]` where a window hides some of it) and the rows' own
    /// `k`, `v` `[b, kv, t, d]` (`mask [b, 1, 1, s, t]`), one softmax over both; the root is
    /// broadcast by the matmul, not copied per row. `[b, heads, s, d]`.
    #[allow(clippy::too_many_arguments)]
    fn rooted_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, rk: &Tensor, rv: &Tensor, rmask: Option<&Tensor>, scale: f64) -> Tensor {
        let [b, heads, s, d] = q.size()[..] else { unreachable!("4-D queries") };
        let kv = k.size()[1];
        let (g, t, len) = (heads / kv, k.size()[2], rk.size()[2]);
        let q = q.reshape([b, kv, g * s, d]);
        let mut shared = q.matmul(&rk.transpose(2, 3)).to_kind(Kind::Float).reshape([b, kv, g, s, len]) * scale;
        if let Some(m) = rmask {
            shared += m;
        }
        let own = q.matmul(&k.transpose(2, 3)).to_kind(Kind::Float).reshape([b, kv, g, s, t]) * scale + mask;
        let att = Tensor::cat(&[shared, own], 4).softmax(4, Kind::Float).to_kind(q.kind());
        let a_root = att.narrow(4, 0, len).reshape([b, kv, g * s, len]).matmul(rv);
        let a_own = att.narrow(4, len, t).reshape([b, kv, g * s, t]).matmul(v);
        (a_root + a_own).reshape([b, heads, s, d])
    }

    fn merge_part(inputs: &[Tensor], part: &HeldPart, index: usize) -> Result<Tensor> {
        let x = |k: usize| -> Result<Tensor> {
            let t = inputs.get(k).ok_or_else(|| EngineError::InvalidInput(format!("merge_held: weight buffer {index} holds no input {k}")))?;
            Ok(t.narrow(1, part.col as i64, part.width as i64).to_kind(Kind::Float))
        };
        Ok(match &part.merge {
            HeldMerge::TaskArithmetic { base, terms, divisor, lambda } => {
                let b = x(*base)?;
                let mut t = b.zeros_like();
                for &(k, w) in terms {
                    t += (x(k)? - &b) * f64::from(w);
                }
                if let Some(d) = divisor {
                    t /= f64::from(*d);
                }
                if let Some(l) = lambda {
                    t *= f64::from(*l);
                }
                b + t
            }
            HeldMerge::Linear { terms, divisor } => {
                let mut t: Option<Tensor> = None;
                for &(k, w) in terms {
                    let xk = x(k)?;
                    let acc = t.take().unwrap_or_else(|| xk.zeros_like());
                    t = Some(acc + xk * f64::from(w));
                }
                let t = t.ok_or_else(|| EngineError::InvalidInput(format!("merge_held: weight buffer {index}: a linear merge of no inputs")))?;
                match divisor {
                    Some(d) => t / f64::from(*d),
                    None => t,
                }
            }
        })
    }
}

/// RMSNorm over the last dimension, in f32 as transformers computes it, the weight applied
/// in the model's kind.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    w * (x32 * (var + eps).rsqrt()).to_kind(x.kind())
}

/// Rotate-half RoPE on `[b, heads, s, d]` with `cos`/`sin` `[b, 1, s, d/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let h = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, h), x.narrow(3, h, h));
    Tensor::cat(&[&x1 * cos - &x2 * sin, &x2 * cos + &x1 * sin], 3)
}

/// A model whose tensors [`check_tensors`] accepted, on `device` in `kind`, in the burn
/// runtime's layout.
fn load_model(spec: &ModelSpec<'_>, device: Device, kind: Kind) -> Result<ModelW> {
    let put = |data: &[f32], shape: &[i64]| Tensor::from_slice(data).view(shape).to_device(device).to_kind(kind);
    let vector = |t: Cow<'_, HostTensor>| put(&t.data, &[t.numel() as i64]);
    let matrix_t = |parts: &[&HostTensor], name: &str| -> Result<Tensor> {
        let (data, inn, out) = transpose_concat(parts, name)?;
        Ok(put(&data, &[inn as i64, out as i64]))
    };
    let cfg = spec.config;
    let d = Dims::of(cfg);
    let (embed_h, head_h, head_tensor) = read_embed_head(spec)?;
    let head = matrix_t(&[head_h.as_deref().unwrap_or(&embed_h)], head_tensor)?;
    let embed = put(&embed_h.data, &[d.vocab as i64, d.hidden as i64]);
    let norm = vector(read(spec, "model.norm.weight")?);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let h = read_layer(spec, l)?;
        layers.push(LayerW {
            in_norm: vector(h.in_norm),
            post_norm: vector(h.post_norm),
            wqkv: matrix_t(&[&*h.q, &*h.k, &*h.v], &format!("model.layers.{l}.self_attn.qkv"))?,
            bqkv: h.bqkv.map(|b| put(&b, &[b.len() as i64])),
            wo: matrix_t(&[&*h.o], "o_proj")?,
            bo: h.bo.map(vector),
            q_norm: h.q_norm.map(vector),
            k_norm: h.k_norm.map(vector),
            wgu: matrix_t(&[&*h.gate, &*h.up], "gate_up")?,
            wdown: matrix_t(&[&*h.down], "down_proj")?,
            window: sliding_window(cfg, spec.arch, l),
        });
    }
    Ok(ModelW {
        label: spec.label.to_string(),
        config: cfg.clone(),
        arch: spec.arch,
        embed,
        norm,
        head,
        head_tensor,
        layers,
        rope: Rope::new(d.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref()),
        eps: cfg.rms_norm_eps,
    })
}

impl Passes for TorchRuntime {
    type Kv = Kv;
    type Hidden = Tensor;

    fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    fn layer_path(&self) -> &LayerPath {
        &self.path
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn non_finite(&self, what: &str) -> EngineError {
        EngineError::NonFinite { model: self.models[self.path.head_model].label.clone(), what: what.into() }
    }

    fn hidden(&self, st: &Step<'_>, mut cache: Option<&mut KvCache<Kv>>, root: Option<&KvCache<Kv>>) -> Result<Tensor> {
        let Dims { hidden, heads, kv_heads, head_dim, .. } = self.info.dims;
        let (b, s) = (st.b as i64, st.s as i64);
        self.check_ids(st.ids)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        self.guard(|| {
            let ids: Vec<i64> = st.ids.iter().map(|&t| i64::from(t)).collect();
            let mut x = self.models[self.path.embed_model].embed.index_select(0, &self.ids(&ids)).reshape([b, s, hidden as i64]);
            let mut masks: HashMap<Option<usize>, Tensor> = HashMap::new();
            let mut root_masks: HashMap<usize, Tensor> = HashMap::new();
            let mut ropes: HashMap<usize, (Tensor, Tensor)> = HashMap::new();
            let scale = (head_dim as f64).powf(-0.5);
            // the mask would be exactly causal: column i sees columns 0 ..= i (passes::mask with
            // no cache, no padding to hide, keys at their column indices)
            let causal = past == 0 && st.key_valid.is_none() && st.key_pos.is_none();
            let (hd, q_w, kv_w) = (head_dim as i64, (heads * head_dim) as i64, (kv_heads * head_dim) as i64);
            for (hop_i, hop) in self.path.hops.iter().enumerate() {
                let model = &self.models[hop.model];
                let layer = &model.layers[hop.layer];
                if hop.scale != 1.0 {
                    x *= f64::from(hop.scale);
                }
                let mut mask = || {
                    masks
                        .entry(layer.window)
                        .or_insert_with(|| {
                            let t = (past + st.s) as i64;
                            // [b, 1, s, t] additive, in the activations' kind
                            self.upload(&passes::mask(st, past, layer.window, self.mask_value), &[b, 1, s, t]).to_kind(self.kind)
                        })
                        .shallow_clone()
                };
                let (cos, sin) = ropes.entry(hop.model).or_insert_with(|| {
                    let (c, sn) = model.rope.tables(st.positions);
                    let shape = [b, 1, s, hd / 2];
                    (self.upload(&c, &shape).to_kind(self.kind), self.upload(&sn, &shape).to_kind(self.kind))
                });

                // Attention.
                let h = rms_norm(&x, &layer.in_norm, model.eps).reshape([b * s, hidden as i64]);
                let mut qkv = h.matmul(&layer.wqkv);
                if let Some(bias) = &layer.bqkv {
                    qkv += bias;
                }
                let q = qkv.narrow(1, 0, q_w).reshape([b, s, heads as i64, hd]);
                let k = qkv.narrow(1, q_w, kv_w).reshape([b, s, kv_heads as i64, hd]);
                let v = qkv.narrow(1, q_w + kv_w, kv_w).reshape([b, s, kv_heads as i64, hd]);
                let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                    (Some(qn), Some(kn)) => (rms_norm(&q, qn, model.eps), rms_norm(&k, kn, model.eps)),
                    _ => (q, k),
                };
                let q = rope(&q.transpose(1, 2), cos, sin);
                let mut k = rope(&k.transpose(1, 2), cos, sin);
                let mut v = v.transpose(1, 2);
                if let Some(c) = cache.as_deref_mut() {
                    if let Some((pk, pv)) = c.entries[hop_i].take() {
                        k = Tensor::cat(&[pk.0, k], 2);
                        v = Tensor::cat(&[pv.0, v], 2);
                    }
                    c.entries[hop_i] = Some((Kv(k.shallow_clone()), Kv(v.shallow_clone())));
                }
                let a = match root.and_then(|r| r.entries[hop_i].as_ref()) {
                    // Plain causal attention (every row from position 0, no padding to hide, no
                    // window): no mask tensor, so PyTorch may pick its fused causal kernels.
                    None if causal && layer.window.is_none() => {
                        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, scale, true)
                    }
                    // GQA inside SDPA (query head h reads KV head h / g, as transformers' repeat_kv).
                    None => Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&mask()), 0.0, false, scale, true),
                    Some((rk, rv)) => {
                        let len = rk.0.size()[2] as usize;
                        let rmask = layer.window.map(|w| {
                            root_masks
                                .entry(w)
                                .or_insert_with(|| self.upload(&passes::root_mask(st, len, w, self.mask_value), &[b, 1, 1, s, len as i64]))
                                .shallow_clone()
                        });
                        Self::rooted_attention(&q, &k, &v, &mask().to_kind(Kind::Float).unsqueeze(1), &rk.0, &rv.0, rmask.as_ref(), scale)
                    }
                };
                let a = a.transpose(1, 2).reshape([b * s, q_w]);
                let mut a = a.matmul(&layer.wo);
                if let Some(bias) = &layer.bo {
                    a += bias;
                }
                x += a.reshape([b, s, hidden as i64]);

                // MLP.
                let inter = layer.wdown.size()[0];
                let h = rms_norm(&x, &layer.post_norm, model.eps).reshape([b * s, hidden as i64]);
                let gu = h.matmul(&layer.wgu);
                let act = gu.narrow(1, 0, inter).silu() * gu.narrow(1, inter, inter);
                x += act.matmul(&layer.wdown).reshape([b, s, hidden as i64]);
            }
            Ok(x.reshape([b * s, hidden as i64]))
        })
        .inspect(|_| {
            if let Some(c) = cache {
                c.len = past + st.s;
            }
        })
    }

    fn head_host(&self, h: Tensor) -> Result<Vec<f32>> {
        self.guard(|| host_f32(&self.head(&h)))
    }

    fn select_batch(&self, t: &Kv, rows: &[i64]) -> Kv {
        let _no_grad = tch::no_grad_guard();
        Kv(t.0.index_select(0, &self.ids(rows)))
    }

    fn row_stats(&self, h: Tensor, rows: Vec<i64>, targets: &[i64]) -> Result<(Vec<f32>, Vec<f32>, Vec<i64>)> {
        self.guard(|| {
            let logits = self.head(&h.index_select(0, &self.ids(&rows))).to_kind(Kind::Float);
            let lse = logits.logsumexp([1], false);
            let tgt = logits.gather(1, &self.ids(targets).unsqueeze(1), false).squeeze_dim(1);
            let am = logits.argmax(1, false);
            Ok((host_f32(&lse)?, host_f32(&tgt)?, host_i64(&am)?))
        })
    }

    fn next_tokens(&self, h: Tensor, b: usize, s: usize) -> Result<Vec<u32>> {
        let rows: Vec<i64> = (0..b).map(|r| (r * s + s - 1) as i64).collect();
        let (finite, am) = self.guard(|| {
            let logits = self.head(&h.index_select(0, &self.ids(&rows))).to_kind(Kind::Float);
            let finite = logits.isfinite().all().int64_value(&[]) != 0;
            Ok((finite, host_i64(&logits.argmax(1, false))?))
        })?;
        if !finite {
            return Err(Passes::non_finite(self, "logits"));
        }
        Ok(am.into_iter().map(|t| t as u32).collect())
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view(-1))
        .map_err(|e| EngineError::InvalidInput(format!("LibTorch: {e}")))
}

fn host_i64(t: &Tensor) -> Result<Vec<i64>> {
    Vec::<i64>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous().view(-1))
        .map_err(|e| EngineError::InvalidInput(format!("LibTorch: {e}")))
}

impl LanguageModel for TorchRuntime {
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
        self.logits_of(tokens)
    }

    fn score(&mut self, requests: &[ScoreRequest], batch_size: usize) -> Result<Vec<ScoreResult>> {
        self.check_requests(requests)?;
        self.score_planned(requests, batch_size, false)
    }

    fn score_shared(&mut self, requests: &[ScoreRequest], batch_size: usize) -> Result<Vec<ScoreResult>> {
        self.check_requests(requests)?;
        self.score_planned(requests, batch_size, true)
    }

    fn tokens_run(&self) -> u64 {
        self.health.tokens_run.load(Ordering::Relaxed)
    }

    fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions, stop: &dyn Fn(usize, &[u32]) -> bool) -> Result<Vec<Generation>> {
        self.generate_planned(prompts, opts, stop)
    }

    fn load_weights(&mut self, model: usize, source: &dyn TensorSource) -> Result<()> {
        let Some(m) = self.models.get(model) else {
            return Err(EngineError::InvalidInput(format!("load_weights: no loaded model {model}")));
        };
        self.health.poisoned = None;
        let (config, arch) = (m.config.clone(), m.arch);
        let spec = ModelSpec { label: source.label(), config: &config, arch, tensors: source };
        check_tensors(&spec)?;
        // Old weights go before the new ones arrive: peak memory stays at one copy.
        let m = &mut self.models[model];
        m.layers.clear();
        for t in [&mut m.embed, &mut m.norm, &mut m.head] {
            *t = Tensor::empty([0], (Kind::Float, Device::Cpu));
        }
        let (device, kind) = (self.device, self.kind);
        match self.guard(|| load_model(&spec, device, kind)) {
            Ok(fresh) => {
                self.models[model] = fresh;
                Ok(())
            }
            Err(e) => {
                self.health.poisoned = Some(format!("loading weights from '{}' failed half way: {e}", spec.label));
                Err(e)
            }
        }
    }

    fn weight_layout(&self, model: usize) -> Result<Vec<WeightBuffer>> {
        let m = self.models.get(model).ok_or_else(|| EngineError::InvalidInput(format!("weight_layout: no loaded model {model}")))?;
        Ok(layout(&m.config, m.head_tensor, &m.flags()).into_iter().map(|(b, _)| b).collect())
    }

    fn write_weights(&mut self, model: usize, fill: &mut WeightFill<'_>) -> Result<()> {
        self.check_usable()?;
        let Some(m) = self.models.get(model) else {
            return Err(EngineError::InvalidInput(format!("write_weights: no loaded model {model}")));
        };
        let bufs = layout(&m.config, m.head_tensor, &m.flags());
        let device = self.info.device;
        let _no_grad = tch::no_grad_guard();
        let mut host = Vec::new();
        let mut result = Ok(());
        for (index, (buf, id)) in bufs.into_iter().enumerate() {
            host.clear();
            host.resize(buf.numel(), 0f32);
            result = fill(index, &mut host).and_then(|()| {
                let t = self.models[model].slot_mut(id).ok_or_else(|| EngineError::InvalidInput(format!("weight buffer {index} has no tensor")))?;
                if t.numel() != buf.numel() {
                    return Err(EngineError::InvalidInput(format!(
                        "weight buffer {index}: runtime holds {:?}, layout says {}",
                        t.size(),
                        buf.numel()
                    )));
                }
                // Copied into the tensor's own storage (converted to its kind on the way).
                guarded(device, || {
                    t.copy_(&Tensor::from_slice(&host).view(t.size().as_slice()));
                    Ok(())
                })
            });
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = &result {
            self.health.poisoned = Some(format!("rewriting the weights of '{}' failed half way: {e}", self.models[model].label));
        }
        result
    }

    fn hold_inputs(&mut self, model: usize, count: usize, fill: &mut HeldFill<'_>) -> Result<bool> {
        let m = self.models.get(model).ok_or_else(|| EngineError::InvalidInput(format!("hold_inputs: no loaded model {model}")))?;
        let bufs = layout(&m.config, m.head_tensor, &m.flags());
        self.held = None;
        let mut held = Vec::with_capacity(bufs.len());
        for (index, (buf, _)) in bufs.iter().enumerate() {
            let mut inputs = Vec::with_capacity(count);
            for k in 0..count {
                let mut host = vec![0f32; buf.numel()];
                fill(index, k, &mut host)?;
                let shape = dims_i64([buf.rows, buf.cols]);
                inputs.push(self.guard(|| Ok(self.upload(&host, &shape).to_kind(self.kind)))?);
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
        let m = &self.models[model];
        let bufs = layout(&m.config, m.head_tensor, &m.flags());
        let _no_grad = tch::no_grad_guard();
        let device = self.info.device;
        // Every buffer is computed before any is replaced: a bad part leaves the model as it was.
        let mut merged = Vec::with_capacity(bufs.len());
        for (index, (buf, id)) in bufs.into_iter().enumerate() {
            let inputs = held.get(index).ok_or_else(|| EngineError::InvalidInput(format!("merge_held: no inputs held for weight buffer {index}")))?;
            let parts = passes::tiled(parts(index)?, buf.cols, index)?;
            let y = guarded(device, || {
                let cols = parts.iter().map(|p| Self::merge_part(inputs, p, index)).collect::<Result<Vec<_>>>()?;
                let y = if cols.len() == 1 { cols.into_iter().next().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&cols, 1) };
                Ok(match round {
                    DType::F32 => y,
                    DType::BF16 => y.to_kind(Kind::BFloat16).to_kind(Kind::Float),
                    DType::F16 => y.to_kind(Kind::Half).to_kind(Kind::Float),
                })
            })?;
            merged.push((y, id));
        }
        let kind = self.kind;
        for (y, id) in merged {
            let t = self.models[model].slot_mut(id).ok_or_else(|| EngineError::InvalidInput("merge_held: a weight buffer has no tensor".into()))?;
            *t = y.to_kind(kind).reshape(t.size().as_slice());
        }
        Ok(true)
    }
}
