//! The forward pass: embeddings, hops along the layer path with the KV cache, head, scoring.

#[allow(unused_imports)]
use super::*;

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
        Ok(Self { device, models: loaded, path, info, mask_value, poisoned: None, held: None, tokens_run: Default::default() })
    }

    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.info.dims.vocab;
        match ids.iter().find(|&&t| t as usize >= v) {
            Some(t) => Err(EngineError::InvalidInput(format!("token id {t} is out of the vocabulary (size {v})"))),
            None => Ok(()),
        }
    }

    pub(super) fn check_len(&self, len: usize, what: &str) -> Result<()> {
        if len > self.info.max_context {
            return Err(EngineError::InvalidInput(format!(
                "{what} of {len} tokens is longer than the model's context ({} positions)",
                self.info.max_context
            )));
        }
        Ok(())
    }

    pub(super) fn non_finite(&self, what: &str) -> EngineError {
        EngineError::NonFinite { model: self.models[self.path.head_model].label.clone(), what: what.into() }
    }

    /// Additive attention mask `[b, 1, 1, s, t]`: 0 where query i may see key column j,
    /// `mask_value` elsewhere. Without `st.key_pos`, query i is column `past + i` and a column
    /// is its own position (the sequence has no gaps); with it, queries are at `st.positions`
    /// and keys at `key_pos`, which is how rows that continue a gathered, padded cache mask.
    pub(super) fn mask(&self, st: &Step<'_>, past: usize, window: Option<usize>) -> Tensor<B, 5> {
        let (b, s) = (st.b, st.s);
        let t = past + s;
        let mut m = vec![0f32; b * s * t];
        for r in 0..b {
            for i in 0..s {
                let q = st.key_pos.map_or(past + i, |_| st.positions[r * s + i]);
                let row = &mut m[(r * s + i) * t..(r * s + i + 1) * t];
                for (j, v) in row.iter_mut().enumerate() {
                    let k = st.key_pos.map_or(j, |kp| kp[r * t + j]);
                    let visible = k <= q && window.is_none_or(|w| q - k < w) && st.key_valid.is_none_or(|kv| kv[r * t + j]);
                    if !visible {
                        *v = self.mask_value;
                    }
                }
            }
        }
        upload::<B, 5>(m, [b, 1, 1, s, t], &self.device)
    }

    /// Mask `[b, 1, 1, s, len]` of a shared root prefix (keys at positions `0 .. len`, before
    /// every query): only a sliding window hides any of it.
    fn root_mask(&self, st: &Step<'_>, len: usize, window: usize) -> Tensor<B, 5> {
        let mut m = vec![0f32; st.b * st.s * len];
        for (row, &q) in m.chunks_mut(len).zip(st.positions) {
            for (j, v) in row.iter_mut().enumerate() {
                if q.saturating_sub(j) >= window {
                    *v = self.mask_value;
                }
            }
        }
        upload::<B, 5>(m, [st.b, 1, 1, st.s, len], &self.device)
    }

    /// Hidden states `[b·s, hidden]` after the last hop (before the final norm).
    ///
    /// `cache` holds each row's own earlier keys and values and receives the new ones. `root`
    /// (batch 1) is a prefix every row continues: its keys are attended by all rows without
    /// being copied per row (the scores against it and against the row's own keys share one
    /// softmax), so a prefix shared by many sequences runs through the model once.
    pub(super) fn hidden(&self, st: &Step<'_>, mut cache: Option<&mut KvCache<B>>, root: Option<&KvCache<B>>) -> Result<Tensor<B, 2>> {
        let Dims { hidden, heads, kv_heads, head_dim, .. } = self.info.dims;
        let (b, s) = (st.b, st.s);
        self.check_ids(st.ids)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let ids: Vec<i64> = st.ids.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b * s]), &self.device);
        let mut x = self.models[self.path.embed_model].embed.clone().select(0, ids).reshape([b, s, hidden]);

        let mut masks: HashMap<Option<usize>, Tensor<B, 5>> = HashMap::new();
        let mut root_masks: HashMap<usize, Tensor<B, 5>> = HashMap::new();
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
            // GQA: the g query heads of one KV head are consecutive (transformers' repeat_kv).
            let q = q.reshape([b, kv_heads, g * s, head_dim]);
            let root = root.and_then(|r| r.entries[hop_i].as_ref()).map(|(rk, rv)| {
                let len = rk.dims()[2];
                let mask = layer.window.map(|w| root_masks.entry(w).or_insert_with(|| self.root_mask(st, len, w)).clone());
                Root { k: rk, v: rv, mask }
            });
            let a = <B as Kernels>::attention(Attention { q, k, v, mask, root, scale, g });
            let a = a.reshape([b, heads, s, head_dim]).swap_dims(1, 2).reshape([b * s, heads * head_dim]);
            let a = linear(a, &layer.wo, layer.bo.as_ref()).reshape([b, s, hidden]);
            x = x + a;

            // MLP.
            let inter = layer.wdown.w.dims()[0];
            let h = rms_norm(x.clone(), &layer.post_norm, model.eps).reshape([b * s, hidden]);
            let gu = linear(h, &layer.wgu, None);
            let act = <B as Kernels>::swiglu(gu, inter);
            x = x + linear(act, &layer.wdown, None).reshape([b, s, hidden]);
        }
        if let Some(c) = cache {
            c.len = past + s;
        }
        Ok(x.reshape([b * s, hidden]))
    }

    /// Final norm + LM head on selected rows `[n, hidden]` → logits `[n, vocab]`.
    pub(super) fn head(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let m = &self.models[self.path.head_model];
        linear(rms_norm(h, &m.norm, m.eps), &m.head, None)
    }

    pub(super) fn rows(&self, idx: Vec<i64>) -> Tensor<B, 1, Int> {
        let n = idx.len();
        Tensor::from_data(TensorData::new(idx, [n]), &self.device)
    }

    /// Greedy argmax of the last position of each row, checked for NaN/inf.
    pub(super) fn next_tokens(&self, h: Tensor<B, 2>, b: usize, s: usize) -> Result<Vec<u32>> {
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
    pub(super) fn replace_model(&mut self, index: usize, spec: &ModelSpec<'_>) -> Result<()> {
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

    pub(super) fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(EngineError::InvalidInput(format!("model unusable: {why}; load weights again"))),
            None => Ok(()),
        }
    }
}
