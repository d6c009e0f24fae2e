//! Running a task on a model: requests, batched scoring or generation, per-item results, the metric.

#[allow(unused_imports)]
use super::*;

impl Task {
    /// Runs the task on `model` (the first `limit` items).
    pub fn evaluate(&self, model: &mut dyn LanguageModel, tok: &Tokenizer, prefix: u32, opts: &EvalOptions) -> Result<TaskResult, TaskError> {
        let t0 = Instant::now();
        let n = opts.limit.map_or(self.items.len(), |l| l.min(self.items.len()));
        let idx: Vec<usize> = (0..n).collect();
        let (results, tokens) = self.score_items(model, tok, prefix, &idx, opts)?;
        Ok(self.aggregate(results, tokens, t0.elapsed().as_secs_f64()))
    }

    /// Scores the items at `idx` (indices into `items`), reusing `cache` entries of the same
    /// model `fingerprint` and adding the new ones (`opts.limit` is not used). Returns results
    /// in `idx` order and the tokens processed for the uncached items.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_cached(
        &self,
        model: &mut dyn LanguageModel,
        tok: &Tokenizer,
        prefix: u32,
        idx: &[usize],
        opts: &EvalOptions,
        cache: &mut ResultCache,
        fingerprint: &str,
    ) -> Result<(Vec<ItemResult>, TokenCount), TaskError> {
        let name = &self.spec.name;
        let missing: Vec<usize> = idx.iter().copied().filter(|&i| cache.get(fingerprint, name, &self.items[i].id).is_none()).collect();
        let (fresh, tokens) = self.score_items(model, tok, prefix, &missing, opts)?;
        for r in fresh {
            cache.insert(fingerprint, name, r);
        }
        let out = idx
            .iter()
            .map(|&i| {
                cache
                    .get(fingerprint, name, &self.items[i].id)
                    .cloned()
                    .ok_or_else(|| TaskError::Spec { task: name.clone(), reason: Box::new(SpecError::DuplicateId(self.items[i].id.clone())) })
            })
            .collect::<Result<_, _>>()?;
        Ok((out, tokens))
    }

    /// The task's metric over item results (in item order).
    pub fn aggregate(&self, results: Vec<ItemResult>, tokens: TokenCount, seconds: f64) -> TaskResult {
        let metric = self.spec.metric.name;
        let (value, stderr) = match metric {
            Metric::Perplexity | Metric::BitsPerByte => {
                let ll: f64 = results.iter().map(|r| r.score).sum();
                let toks: usize = results.iter().map(|r| r.tokens).sum();
                let bytes: usize = results.iter().map(|r| r.bytes).sum();
                let v = if metric == Metric::Perplexity {
                    (-ll / toks.max(1) as f64).exp()
                } else {
                    -ll / (bytes.max(1) as f64 * std::f64::consts::LN_2)
                };
                (v, None)
            }
            _ => {
                let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
                let (m, se) = mean_stderr(&scores);
                (m, Some(se))
            }
        };
        TaskResult {
            task: self.spec.name.clone(),
            metric: metric.name().into(),
            value,
            stderr,
            higher_is_better: metric.higher_is_better(),
            n: results.len(),
            tokens: tokens.run,
            tokens_unshared: tokens.unshared,
            seconds,
            items: results,
        }
    }

    /// Scores the items at `idx` (few-shot examples depend on the item index, not on which
    /// other items are scored, so subsets agree with full runs).
    pub(super) fn score_items(
        &self,
        model: &mut dyn LanguageModel,
        tok: &Tokenizer,
        prefix: u32,
        idx: &[usize],
        opts: &EvalOptions,
    ) -> Result<(Vec<ItemResult>, TokenCount), TaskError> {
        let n = idx.len();
        if n == 0 {
            return Ok((vec![], TokenCount::default()));
        }
        let sel: Vec<(usize, &Item)> = idx.iter().map(|&i| (i, &self.items[i])).collect();
        let ran_before = model.tokens_run();
        let score = |model: &mut dyn LanguageModel, reqs: &[ScoreRequest]| {
            if opts.share_prefix { model.score_shared(reqs, opts.batch_size) } else { model.score(reqs, opts.batch_size) }
        };
        let spec_err = |reason: SpecError| TaskError::Spec { task: self.spec.name.clone(), reason: Box::new(reason) };
        let add_bos = self.spec.prompt.add_bos;
        let max_ctx = model.info().max_context;
        let mut tokens = 0usize;
        let results: Vec<ItemResult> = match self.spec.kind {
            Kind::MultipleChoice => {
                let mut reqs = Vec::new();
                let mut spans = Vec::with_capacity(n);
                for &(i, item) in &sel {
                    let rs = self.requests(i, item).map_err(spec_err)?;
                    spans.push((reqs.len(), rs.iter().map(|r| r.2).collect::<Vec<_>>()));
                    for (ctx, cont, _) in &rs {
                        let (mut context, continuation) = encode_pair(tok, ctx, cont, add_bos, prefix)?;
                        let excess = (context.len() + continuation.len()).saturating_sub(max_ctx);
                        context.drain(..excess.min(context.len() - 1));
                        tokens += context.len() + continuation.len();
                        reqs.push(ScoreRequest { context, continuation });
                    }
                }
                let scored = score(model, &reqs)?;
                sel.iter()
                    .zip(spans)
                    .map(|(&(_, item), (start, lens))| {
                        let lls: Vec<f64> = scored[start..start + lens.len()].iter().map(|r| r.sum).collect();
                        let pick = match self.spec.metric.name {
                            Metric::AccNorm => argmax(&lls.iter().zip(&lens).map(|(l, n)| l / n).collect::<Vec<_>>()),
                            _ => argmax(&lls),
                        };
                        let gold = match item.gold {
                            Gold::Choice(g) => g,
                            Gold::Text(_) => usize::MAX,
                        };
                        ItemResult {
                            id: item.id.clone(),
                            score: f64::from(u8::from(pick == gold)),
                            prediction: pick.to_string(),
                            logliks: lls,
                            tokens: 0,
                            bytes: 0,
                        }
                    })
                    .collect()
            }
            Kind::Generation => {
                let g = &self.spec.generation;
                let mut out = Vec::with_capacity(n);
                // Greedy generation ends at the model's EOS as transformers' generate() does
                // (lm-eval adds the EOS text to `until` as well).
                let eos: Vec<u32> = model.info().eos_token_ids.clone();
                let gen_opts =
                    GenerateOptions { max_new_tokens: g.max_new_tokens, eos, share_prefix: opts.share_prefix, batch_size: opts.batch_size.max(1) };
                let prompts: Vec<Vec<u32>> = sel
                    .iter()
                    .map(|&(i, item)| {
                        let ctx = self.context(i, item).map_err(spec_err)?;
                        let mut ids = tok.encode(&ctx, add_bos)?;
                        let keep = max_ctx.saturating_sub(g.max_new_tokens).max(1);
                        ids.drain(..ids.len().saturating_sub(keep));
                        Ok(ids)
                    })
                    .collect::<Result<_, TaskError>>()?;
                let until = &g.until;
                let hit = |ids: &[u32]| !until.is_empty() && tok.decode(ids, false).is_ok_and(|t| until.iter().any(|s| t.contains(s.as_str())));
                // One call: the engine decodes `batch_size` prompts at a time and runs their
                // shared prefix (the few-shot examples) once for all of them.
                let gens = model.generate(&prompts, &gen_opts, &|_, ids| hit(ids))?;
                for ((p, generation), &(_, item)) in prompts.iter().zip(gens).zip(&sel) {
                    tokens += p.len() + generation.tokens.len();
                    let mut text = tok.decode(&generation.tokens, true)?;
                    if let Some(cut) = until.iter().filter_map(|s| text.find(s.as_str())).min() {
                        text.truncate(cut);
                    }
                    let pred = self.extractor.apply(&text);
                    let gold = item.field("answer").unwrap_or_default();
                    out.push(ItemResult {
                        id: item.id.clone(),
                        score: self.normalizer.exact_match(&pred, gold),
                        prediction: pred,
                        logliks: vec![],
                        tokens: 0,
                        bytes: 0,
                    });
                }
                out
            }
            Kind::Perplexity => {
                let window = model.info().max_context.saturating_sub(1).max(1);
                let mut reqs = Vec::new();
                let mut spans = Vec::with_capacity(n);
                for &(i, item) in &sel {
                    let text = self.context(i, item).map_err(spec_err)?;
                    let ids = tok.encode(&text, false)?;
                    if ids.is_empty() {
                        return Err(spec_err(SpecError::NoTokens(item.id.clone())));
                    }
                    // Disjoint windows, each conditioned on the token before it (the first on
                    // the prefix token): lm-eval's rolling windows with context length 1.
                    let start = reqs.len();
                    for w in (0..ids.len()).step_by(window) {
                        let context = if w == 0 { vec![prefix] } else { vec![ids[w - 1]] };
                        let continuation = ids[w..(w + window).min(ids.len())].to_vec();
                        reqs.push(ScoreRequest { context, continuation });
                    }
                    tokens += ids.len() + 1;
                    spans.push((start, reqs.len(), ids.len(), text.len()));
                }
                let scored = score(model, &reqs)?;
                sel.iter()
                    .zip(spans)
                    .map(|(&(_, item), (a, b, ntok, nbytes))| {
                        let ll: f64 = scored[a..b].iter().map(|r| r.sum).sum();
                        ItemResult { id: item.id.clone(), score: ll, prediction: String::new(), logliks: vec![], tokens: ntok, bytes: nbytes }
                    })
                    .collect()
            }
        };
        let run = (model.tokens_run() - ran_before) as usize;
        Ok((results, TokenCount { run, unshared: tokens }))
    }
}
