//! The forward pass: embeddings, hops along the layer path with the KV cache, head, scoring.

#[allow(unused_imports)]
use super::*;

/// RoPE's cos and sin `[b·s, d/2]` on the host, and as tensors `[b, 1, s, d/2]` where the
/// backend does not pack.
type RopeTables<B> = (Vec<f32>, Vec<f32>, Option<(Tensor<B, 4>, Tensor<B, 4>)>);

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

    /// The rows of a packed pass's hidden states that hold batch positions `rows` (`r·s + i`).
    fn packed_rows(&self, packing: &Packing, rows: Vec<usize>) -> Result<Tensor<B, 1, Int>> {
        let idx = rows
            .into_iter()
            .map(|p| {
                packing.packed_index(p).map(|i| i as i64).ok_or_else(|| EngineError::InvalidInput(format!("position {p} of the pass is padding")))
            })
            .collect::<Result<Vec<i64>>>()?;
        Ok(self.rows(idx))
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
    type Hidden = Packed<B>;

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

    fn hidden(&self, st: &Step<'_>, mut cache: Option<&mut KvCache<Tensor<B, 4>>>, root: Option<&KvCache<Tensor<B, 4>>>) -> Result<Packed<B>> {
        let Dims { heads, kv_heads, head_dim, .. } = self.info.dims;
        let (b, s) = (st.b, st.s);
        self.check_ids(st.ids)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        let packing = Packing::new(b, s, st.real, B::PACKED);
        let ids: Vec<i64> = packing.at.iter().map(|&p| i64::from(st.ids[p])).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [packing.len()]), &self.device);
        // `[tokens, hidden]`: the per-token work runs on the packed tokens.
        let mut x = self.models[self.path.embed_model].embed.clone().select(0, ids);

        let mut masks: HashMap<Option<usize>, Tensor<B, 5>> = HashMap::new();
        let mut root_masks: HashMap<usize, Tensor<B, 5>> = HashMap::new();
        let mut ropes: HashMap<usize, RopeTables<B>> = HashMap::new();
        let g = heads / kv_heads;
        let scale = (head_dim as f64).powf(-0.5);
        for (hop_i, hop) in self.path.hops.iter().enumerate() {
            let model = &self.models[hop.model];
            let layer = &model.layers[hop.layer];
            if hop.scale != 1.0 {
                x = x.mul_scalar(hop.scale);
            }
            let mask = masks.entry(layer.window).or_insert_with(|| self.mask(st, past, layer.window)).clone();
            let (cos, sin, tables) = ropes.entry(hop.model).or_insert_with(|| {
                let (c, sn) = model.rope.tables(st.positions);
                let h = head_dim / 2;
                let tables = (!B::PACKED)
                    .then(|| (upload::<B, 4>(c.clone(), [b, 1, s, h], &self.device), upload::<B, 4>(sn.clone(), [b, 1, s, h], &self.device)));
                (c, sn, tables)
            });

            // Attention.
            let h = rms_norm(x.clone(), &layer.in_norm, model.eps);
            let qkv = linear(h, &layer.wqkv, layer.bqkv.as_ref());
            let norms = layer.q_norm.as_ref().zip(layer.k_norm.as_ref());
            let heads_in = Heads { packing: &packing, heads, kv_heads, head_dim, cos, sin, tables: tables.as_ref(), norms, eps: model.eps };
            let (q, mut k, mut v) = <B as Kernels>::qkv_heads(qkv, &heads_in);
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.entries[hop_i].take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                c.entries[hop_i] = Some((k.clone(), v.clone()));
            }
            let root = root.and_then(|r| r.entries[hop_i].as_ref()).map(|(rk, rv)| {
                let len = rk.dims()[2];
                let mask = layer.window.map(|w| root_masks.entry(w).or_insert_with(|| self.root_mask(st, len, w)).clone());
                Root { k: rk, v: rv, mask }
            });
            let a = <B as Kernels>::attention(Attention { q, k, v, mask, root, scale, g, packing: &packing });
            x = x + linear(a, &layer.wo, layer.bo.as_ref());

            // MLP.
            let inter = layer.wdown.w.dims()[0];
            let h = rms_norm(x.clone(), &layer.post_norm, model.eps);
            let gu = linear(h, &layer.wgu, None);
            let act = <B as Kernels>::swiglu(gu, inter);
            x = x + linear(act, &layer.wdown, None);
        }
        if let Some(c) = cache {
            c.len = past + s;
        }
        Ok(Packed { h: x, packing })
    }

    fn head_host(&self, h: Packed<B>) -> Result<Vec<f32>> {
        let rows = (0..h.packing.b * h.packing.s).collect();
        let rows = self.packed_rows(&h.packing, rows)?;
        Ok(to_host_f32(self.head(h.h.select(0, rows))))
    }

    fn select_batch(&self, t: &Tensor<B, 4>, rows: &[i64]) -> Tensor<B, 4> {
        t.clone().select(0, self.rows(rows.to_vec()))
    }

    fn row_stats(&self, h: Packed<B>, rows: Vec<i64>, targets: &[i64]) -> Result<(Vec<f32>, Vec<f32>, Vec<i64>)> {
        let rows = self.packed_rows(&h.packing, rows.into_iter().map(|r| r as usize).collect())?;
        let logits = self.head(h.h.select(0, rows));
        Ok(<B as Kernels>::row_stats(logits, targets))
    }

    fn next_tokens(&self, h: Packed<B>, b: usize, s: usize) -> Result<Vec<u32>> {
        let rows = self.packed_rows(&h.packing, (0..b).map(|r| r * s + s - 1).collect())?;
        let logits = self.head(h.h.select(0, rows));
        let finite = logits.clone().is_finite().all().into_scalar();
        if !finite.elem::<bool>() {
            return Err(Passes::non_finite(self, "logits"));
        }
        Ok(to_host_i64(logits.argmax(1)).into_iter().map(|t| t as u32).collect())
    }
}
