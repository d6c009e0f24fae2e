//! Reading a model's tensors into the runtime's layout, with the checks that make a bad
//! checkpoint a clear error.

#[allow(unused_imports)]
use super::*;

/// A tensor of the spec, borrowed when the source holds f32 already (merged candidates).
pub(crate) fn read<'a>(spec: &ModelSpec<'a>, name: &str) -> Result<Cow<'a, HostTensor>> {
    spec.tensors.get_f32(name)
}

pub(crate) fn read_opt<'a>(spec: &ModelSpec<'a>, name: &str) -> Result<Option<Cow<'a, HostTensor>>> {
    match spec.tensors.meta(name) {
        Some(_) => read(spec, name).map(Some),
        None => Ok(None),
    }
}

pub(super) fn vector<B: Backend>(t: Cow<'_, HostTensor>, device: &B::Device) -> Tensor<B, 1> {
    let n = t.numel();
    upload(t.into_owned().data, [n], device)
}

pub(super) fn matrix_t<B: Backend>(parts: &[&HostTensor], name: &str, device: &B::Device) -> Result<Tensor<B, 2>> {
    let (data, inn, out) = transpose_concat(parts, name)?;
    Ok(upload(data, [inn, out], device))
}

/// Checks every model a runtime opens, from metadata: supported, all of one shape (only such
/// models can share a runtime: layers of one may follow another's), every tensor there
/// ([`check_tensors`]). Returns their common shape.
pub(crate) fn check_models(models: &[ModelSpec<'_>]) -> Result<Dims> {
    let dims = Dims::of(models[0].config);
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
    }
    Ok(dims)
}

/// Checks, from metadata only, that `spec` holds every tensor the forward pass needs with the
/// shapes its config implies (and optional groups complete), so that loading cannot fail half
/// way for a shape reason.
pub(crate) fn check_tensors(spec: &ModelSpec<'_>) -> Result<()> {
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

/// The embedding, the head's own tensor (`None`: tied, the head is the embedding) and the
/// checkpoint tensor the head comes from, of a model [`check_tensors`] accepted.
pub(crate) type HostHead<'a> = (Cow<'a, HostTensor>, Option<Cow<'a, HostTensor>>, &'static str);

pub(crate) fn read_embed_head<'a>(spec: &ModelSpec<'a>) -> Result<HostHead<'a>> {
    let embed = read(spec, "model.embed_tokens.weight")?;
    match (spec.config.tie_word_embeddings, read_opt(spec, "lm_head.weight")?) {
        (_, Some(h)) => Ok((embed, Some(h), "lm_head.weight")),
        (true, None) => Ok((embed, None, "model.embed_tokens.weight")),
        (false, None) => Err(EngineError::MissingTensor { model: spec.label.to_string(), tensor: "lm_head.weight".into() }),
    }
}

/// One layer's checkpoint tensors in f32, for a runtime to upload in its layout: the tensor
/// names and the q|k|v bias concatenation live here once.
pub(crate) struct HostLayer<'a> {
    pub in_norm: Cow<'a, HostTensor>,
    pub post_norm: Cow<'a, HostTensor>,
    pub q: Cow<'a, HostTensor>,
    pub k: Cow<'a, HostTensor>,
    pub v: Cow<'a, HostTensor>,
    /// q, k, v biases side by side (Qwen2); [`check_tensors`]: all three or none.
    pub bqkv: Option<Vec<f32>>,
    pub o: Cow<'a, HostTensor>,
    pub bo: Option<Cow<'a, HostTensor>>,
    pub q_norm: Option<Cow<'a, HostTensor>>,
    pub k_norm: Option<Cow<'a, HostTensor>>,
    pub gate: Cow<'a, HostTensor>,
    pub up: Cow<'a, HostTensor>,
    pub down: Cow<'a, HostTensor>,
}

pub(crate) fn read_layer<'a>(spec: &ModelSpec<'a>, l: usize) -> Result<HostLayer<'a>> {
    let p = format!("model.layers.{l}.");
    let r = |n: &str| read(spec, &format!("{p}{n}"));
    let ro = |n: &str| read_opt(spec, &format!("{p}{n}"));
    let bqkv = match (ro("self_attn.q_proj.bias")?, ro("self_attn.k_proj.bias")?, ro("self_attn.v_proj.bias")?) {
        (Some(bq), Some(bk), Some(bv)) => Some(bq.data.iter().chain(&bk.data).chain(&bv.data).copied().collect()),
        _ => None,
    };
    Ok(HostLayer {
        in_norm: r("input_layernorm.weight")?,
        post_norm: r("post_attention_layernorm.weight")?,
        q: r("self_attn.q_proj.weight")?,
        k: r("self_attn.k_proj.weight")?,
        v: r("self_attn.v_proj.weight")?,
        bqkv,
        o: r("self_attn.o_proj.weight")?,
        bo: ro("self_attn.o_proj.bias")?,
        q_norm: ro("self_attn.q_norm.weight")?,
        k_norm: ro("self_attn.k_norm.weight")?,
        gate: r("mlp.gate_proj.weight")?,
        up: r("mlp.up_proj.weight")?,
        down: r("mlp.down_proj.weight")?,
    })
}

/// Uploads a model whose tensors [`check_tensors`] accepted.
pub(super) fn load_model<B: Backend>(spec: &ModelSpec<'_>, device: &B::Device) -> Result<ModelW<B>> {
    let cfg = spec.config;
    let d = Dims::of(cfg);
    let (embed_h, head_h, head_tensor) = read_embed_head(spec)?;
    let head = matrix_t::<B>(&[head_h.as_deref().unwrap_or(&embed_h)], head_tensor, device)?;
    let embed = upload::<B, 2>(embed_h.into_owned().data, [d.vocab, d.hidden], device);
    let norm = vector::<B>(read(spec, "model.norm.weight")?, device);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let h = read_layer(spec, l)?;
        layers.push(LayerW {
            in_norm: vector::<B>(h.in_norm, device),
            post_norm: vector::<B>(h.post_norm, device),
            wqkv: Linear::new(matrix_t::<B>(&[&*h.q, &*h.k, &*h.v], &format!("model.layers.{l}.self_attn.qkv"), device)?),
            bqkv: h.bqkv.map(|b| {
                let n = b.len();
                upload::<B, 1>(b, [n], device)
            }),
            wo: Linear::new(matrix_t::<B>(&[&*h.o], "o_proj", device)?),
            bo: h.bo.map(|t| vector::<B>(t, device)),
            q_norm: h.q_norm.map(|t| vector::<B>(t, device)),
            k_norm: h.k_norm.map(|t| vector::<B>(t, device)),
            wgu: Linear::new(matrix_t::<B>(&[&*h.gate, &*h.up], "gate_up", device)?),
            wdown: Linear::new(matrix_t::<B>(&[&*h.down], "down_proj", device)?),
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
