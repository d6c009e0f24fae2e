//! The `LanguageModel` impl: scoring, generation, weight loads and swaps, device merges.

#[allow(unused_imports)]
use super::*;

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
        self.health.tokens_run.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions, stop: &dyn Fn(usize, &[u32]) -> bool) -> Result<Vec<Generation>> {
        self.generate_planned(prompts, opts, stop)
    }

    fn load_weights(&mut self, model: usize, source: &dyn TensorSource) -> Result<()> {
        if model >= self.models.len() {
            return Err(EngineError::InvalidInput(format!("load_weights: no loaded model {model}")));
        }
        // The config and architecture stay those of the loaded model; only tensors change.
        self.health.poisoned = None;
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
            self.health.poisoned = Some(format!("rewriting the weights of '{}' failed half way: {e}", self.models[model].label));
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
            for part in super::super::passes::tiled(parts(index)?, buf.cols, index)? {
                cols.push(held_part(inputs, &part, index)?);
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
pub(super) fn held_part<B: Backend>(inputs: &[Tensor<B, 2>], part: &HeldPart, index: usize) -> Result<Tensor<B, 2>> {
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
