//! Weight buffers ↔ the runtime's tensors: the layout merges write into, and in-place rewrites.

#[allow(unused_imports)]
use super::*;
use crate::model::WeightPart;

/// Which weight tensor of a loaded model a [`WeightBuffer`] is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SlotId {
    Embed,
    Norm,
    Head,
    Layer(usize, LayerSlot),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum LayerSlot {
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
pub(super) enum Slot<'a, B: Backend> {
    Vector(&'a mut Tensor<B, 1>),
    Matrix(&'a mut Tensor<B, 2>),
}

/// Which optional tensors a loaded layer holds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerFlags {
    pub bqkv: bool,
    pub bo: bool,
    pub q_norm: bool,
    pub k_norm: bool,
}

/// The weight buffers of `m` in layout order, with the checkpoint tensors in each.
pub(super) fn weight_buffers<B: Backend>(m: &ModelW<B>) -> Vec<(WeightBuffer, SlotId)> {
    let flags: Vec<LayerFlags> = m
        .layers
        .iter()
        .map(|l| LayerFlags { bqkv: l.bqkv.is_some(), bo: l.bo.is_some(), q_norm: l.q_norm.is_some(), k_norm: l.k_norm.is_some() })
        .collect();
    layout(&m.config, m.head_tensor, &flags)
}

/// The weight buffers of a model (config, the checkpoint tensor its head was read from, and
/// the optional tensors of each layer) in layout order, with the checkpoint tensors in each.
/// One place decides the order for every runtime, so [`LanguageModel::weight_layout`] and
/// [`LanguageModel::write_weights`] agree, and merges write the same buffers on any runtime.
pub(crate) fn layout(config: &ModelConfig, head_tensor: &str, flags: &[LayerFlags]) -> Vec<(WeightBuffer, SlotId)> {
    let d = Dims::of(config);
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
        (linear(d.hidden, &[(head_tensor.to_string(), d.vocab)]), SlotId::Head),
    ];
    for (l, layer) in flags.iter().enumerate() {
        let n = |s: &str| format!("model.layers.{l}.{s}");
        let mut push = |b: WeightBuffer, s: LayerSlot| out.push((b, SlotId::Layer(l, s)));
        push(vector(n("input_layernorm.weight"), d.hidden), LayerSlot::InNorm);
        push(vector(n("post_attention_layernorm.weight"), d.hidden), LayerSlot::PostNorm);
        let qkv = [(n("self_attn.q_proj.weight"), q), (n("self_attn.k_proj.weight"), kv), (n("self_attn.v_proj.weight"), kv)];
        push(linear(d.hidden, &qkv), LayerSlot::Wqkv);
        if layer.bqkv {
            let parts = vec![
                part(n("self_attn.q_proj.bias"), 0, q, false),
                part(n("self_attn.k_proj.bias"), q, kv, false),
                part(n("self_attn.v_proj.bias"), q + kv, kv, false),
            ];
            push(WeightBuffer { rows: 1, cols: q + 2 * kv, parts }, LayerSlot::Bqkv);
        }
        push(linear(q, &[(n("self_attn.o_proj.weight"), d.hidden)]), LayerSlot::Wo);
        if layer.bo {
            push(vector(n("self_attn.o_proj.bias"), d.hidden), LayerSlot::Bo);
        }
        if layer.q_norm {
            push(vector(n("self_attn.q_norm.weight"), d.head_dim), LayerSlot::QNorm);
        }
        if layer.k_norm {
            push(vector(n("self_attn.k_norm.weight"), d.head_dim), LayerSlot::KNorm);
        }
        let gu = [(n("mlp.gate_proj.weight"), d.intermediate), (n("mlp.up_proj.weight"), d.intermediate)];
        push(linear(d.hidden, &gu), LayerSlot::Wgu);
        push(linear(d.intermediate, &[(n("mlp.down_proj.weight"), d.hidden)]), LayerSlot::Wdown);
    }
    out
}

/// The tensor behind `id` (which [`weight_buffers`] produced for `m`).
pub(super) fn slot_mut<B: Backend>(m: &mut ModelW<B>, id: SlotId) -> Option<Slot<'_, B>> {
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
    pub(super) fn rewrite<const D: usize>(
        t: &mut Tensor<B, D>,
        buf: &WeightBuffer,
        index: usize,
        device: &B::Device,
        fill: &mut WeightFill<'_>,
    ) -> Result<()> {
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
