//! The forward pass: embeddings, hops along the layer path with the KV cache, head, scoring.

#[allow(unused_imports)]
use super::*;

impl<B: Kernels> Runtime<B> {
    pub(crate) fn new(device: B::Device, spec: DeviceSpec, models: &[ModelSpec<'_>]) -> Result<Self> {
        let dims = check_models(models)?;
        let loaded = models.iter().map(|m| load_model::<B>(m, &device)).collect::<Result<Vec<_>>>()?;
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
        Ok(Self { device, models: loaded, path, info, mask_value, health: Health::default(), held: None })
    }

    /// [`passes::mask`] as a tensor `[b, 1, 1, s, t]`.
    fn mask(&self, st: &Step<'_>, past: usize, window: Option<usize>) -> Tensor<B, 5> {
        upload::<B, 5>(super::super::passes::mask(st, past, window, self.mask_value), [st.b, 1, 1, st.s, past + st.s], &self.device)
    }

    /// [`passes::root_mask`] as a tensor `[b, 1, 1, s, len]`.
    fn root_mask(&self, st: &Step<'_>, len: usize, window: usize) -> Tensor<B, 5> {
        upload::<B, 5>(super::super::passes::root_mask(st, len, window, self.mask_value), [st.b, 1, 1, st.s, len], &self.device)
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
                self.health.poisoned = Some(format!("loading weights from '{}' failed half way: {e}", spec.label));
                Err(e)
            }
        }
    }
}

impl<B: Kernels> Passes for Runtime<B> {
    type Kv = Tensor<B, 4>;
    type Hidden = Tensor<B, 2>;

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

    fn hidden(&self, st: &Step<'_>, mut cache: Option<&mut KvCache<Tensor<B, 4>>>, root: Option<&KvCache<Tensor<B, 4>>>) -> Result<Tensor<B, 2>> {
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

    fn head_host(&self, h: Tensor<B, 2>) -> Result<Vec<f32>> {
        Ok(to_host_f32(self.head(h)))
    }

    fn select_batch(&self, t: &Tensor<B, 4>, rows: &[i64]) -> Tensor<B, 4> {
        t.clone().select(0, self.rows(rows.to_vec()))
    }

    fn row_stats(&self, h: Tensor<B, 2>, rows: Vec<i64>, targets: &[i64]) -> Result<(Vec<f32>, Vec<f32>, Vec<i64>)> {
        let logits = self.head(h.select(0, self.rows(rows)));
        Ok(<B as Kernels>::row_stats(logits, targets))
    }

    fn next_tokens(&self, h: Tensor<B, 2>, b: usize, s: usize) -> Result<Vec<u32>> {
        let rows: Vec<i64> = (0..b).map(|r| (r * s + s - 1) as i64).collect();
        let logits = self.head(h.select(0, self.rows(rows)));
        let finite = logits.clone().is_finite().all().into_scalar();
        if !finite.elem::<bool>() {
            return Err(Passes::non_finite(self, "logits"));
        }
        Ok(to_host_i64(logits.argmax(1)).into_iter().map(|t| t as u32).collect())
    }
}
