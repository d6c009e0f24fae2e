//! What every runtime shares above its tensor ops: request checks, the plan of scoring passes
//! (shared prefixes run once), the greedy decoding loop and the attention masks. A runtime
//! (burn in `runtime/`, LibTorch in `torch/`) implements [`Passes`]: one forward pass
//! ([`Passes::hidden`]), the head's row statistics, the greedy pick and a batch gather of its
//! key/value tensors; the rest are the provided methods here.
//!
//! ```text
//! root          the longest token prefix most requests start with (a fixed few-shot prefix,
//!               a task description), run once as a batch of one; every row that continues it
//!               attends to its keys, broadcast by the matmul (not copied per row)
//! contexts      each distinct context, after the root, runs once; its last position scores
//!               the first token of every continuation of it (a single-token continuation
//!               costs no pass of its own)
//! continuations the rest of each continuation, as rows that continue their context's cache
//!               (gathered per row; right padding masked by position)
//! ```
//!
//! A context with one continuation runs together with it in one row: there is nothing to
//! share. Only tokens that are equal are shared: the plan works on token ids, so a context
//! that tokenizes differently next to its continuation (lm-eval's joint encoding) is simply a
//! different prefix. Unshared scoring is the same machinery with one row per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::path::LayerPath;
use super::spec::Dims;
use super::{GenerateOptions, Generation, HeldPart, ModelInfo, ScoreRequest, ScoreResult, StopReason};
use crate::error::{EngineError, Result};

/// A shared root is used only when it saves at least this many tokens: it costs one more
/// forward pass of a single row, which reads every weight once (on the 0.5 B model on two
/// cores, about what a few dozen tokens cost inside a batch).
const ROOT_MIN_SAVED: usize = 64;

/// Most bytes a root's keys and values may take (f32, all hops); a longer shared prefix is
/// shared only up to this length, so sharing never needs more memory than this on top of
/// what unshared scoring needs.
const ROOT_KV_MAX_BYTES: usize = 1 << 30;

/// One forward batch: token ids `[b, s]`, their positions, and which key columns (of the
/// whole sequence so far, cache included) are real tokens.
pub(crate) struct Step<'a> {
    pub ids: &'a [u32],
    pub b: usize,
    pub s: usize,
    pub positions: &'a [usize],
    pub key_valid: Option<&'a [bool]>,
    /// Positions of the key columns `[b, t]` where they are not the column indices (a row that
    /// continues a gathered, right-padded cache); see [`mask`].
    pub key_pos: Option<&'a [usize]>,
    /// Which positions `[b, s]` are real tokens, where some are padding (`None`: all are). A
    /// runtime may leave the others out of its per-token work; nothing reads their outputs.
    pub real: Option<&'a [bool]>,
}

/// Key/value tensors of every hop, `[batch, kv_heads, len, head_dim]`.
pub(crate) struct KvCache<T> {
    pub entries: Vec<Option<(T, T)>>,
    pub len: usize,
}

/// What every runtime tracks besides its tensors: why it refuses work (a weight swap failed
/// half way) and the tokens it ran ([`super::LanguageModel::tokens_run`]).
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub poisoned: Option<String>,
    pub tokens_run: AtomicU64,
}

/// One row of a forward pass.
pub(crate) struct Row {
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub start: usize,
    /// Scored columns: (column, target token, request, index in the request's continuation).
    pub scored: Vec<(usize, u32, usize, usize)>,
    /// The row of the parent pass whose keys this row continues: (row, its start, its length).
    pub parent: Option<(usize, usize, usize)>,
}

/// Which inputs start from a shared root, and its length.
pub(crate) struct RootPlan {
    pub len: usize,
    pub rooted: Vec<bool>,
}

impl RootPlan {
    /// No root: every one of `n` inputs runs from its first token.
    pub fn none(n: usize) -> Self {
        Self { len: 0, rooted: vec![false; n] }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Additive attention mask `[b, s, t]` (row-major): 0 where query i may see key column j,
/// `mask_value` elsewhere. Without `st.key_pos`, query i is column `past + i` and a column is
/// its own position (the sequence has no gaps); with it, queries are at `st.positions` and
/// keys at `key_pos`, which is how rows that continue a gathered, padded cache mask.
pub(crate) fn mask(st: &Step<'_>, past: usize, window: Option<usize>, mask_value: f32) -> Vec<f32> {
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
                    *v = mask_value;
                }
            }
        }
    }
    m
}

/// Mask `[b, s, len]` of a shared root prefix (keys at positions `0 .. len`, before every
/// query): only a sliding window hides any of it.
pub(crate) fn root_mask(st: &Step<'_>, len: usize, window: usize, mask_value: f32) -> Vec<f32> {
    let mut m = vec![0f32; st.b * st.s * len];
    for (row, &q) in m.chunks_mut(len).zip(st.positions) {
        for (j, v) in row.iter_mut().enumerate() {
            if q.saturating_sub(j) >= window {
                *v = mask_value;
            }
        }
    }
    m
}

/// Checks that `parts` of a weight buffer of `cols` columns lie side by side and cover them
/// all, in order ([`super::LanguageModel::merge_held`]).
pub(crate) fn tiled(parts: Vec<HeldPart>, cols: usize, index: usize) -> Result<Vec<HeldPart>> {
    let mut at = 0;
    for part in &parts {
        if part.col != at || part.col + part.width > cols {
            return Err(EngineError::InvalidInput(format!("merge_held: parts of weight buffer {index} do not tile its {cols} columns")));
        }
        at += part.width;
    }
    if at != cols {
        return Err(EngineError::InvalidInput(format!("merge_held: parts of weight buffer {index} cover {at} of {cols} columns")));
    }
    Ok(parts)
}

/// A runtime's forward pass and the few tensor steps around it; the provided methods are
/// scoring (plain and with shared prefixes) and greedy generation, the same for every runtime.
pub(crate) trait Passes {
    /// One key or value tensor of a cache entry, `[batch, kv_heads, len, head_dim]`.
    type Kv: Clone;
    /// Hidden states `[b·s, hidden]` after the last hop.
    type Hidden;

    fn model_info(&self) -> &ModelInfo;
    fn layer_path(&self) -> &LayerPath;
    fn health(&self) -> &Health;
    /// Non-finite logits of the path's head model.
    fn non_finite(&self, what: &str) -> EngineError;

    /// Hidden states after the last hop (before the final norm). `cache` holds each row's own
    /// earlier keys and values and receives the new ones. `root` (batch 1) is a prefix every
    /// row continues: its keys are attended by all rows without being copied per row (the
    /// scores against it and against the row's own keys share one softmax).
    fn hidden(&self, st: &Step<'_>, cache: Option<&mut KvCache<Self::Kv>>, root: Option<&KvCache<Self::Kv>>) -> Result<Self::Hidden>;

    /// Rows `rows` (batch index) of a cache tensor.
    fn select_batch(&self, t: &Self::Kv, rows: &[i64]) -> Self::Kv;

    /// Final norm and head on rows `rows` of `h`, then per row: log-sum-exp, the logit of
    /// `targets[row]` and the argmax.
    fn row_stats(&self, h: Self::Hidden, rows: Vec<i64>, targets: &[i64]) -> Result<(Vec<f32>, Vec<f32>, Vec<i64>)>;

    /// Greedy argmax of the last position of each of the `b` rows of `s` columns, checked for
    /// NaN/inf.
    fn next_tokens(&self, h: Self::Hidden, b: usize, s: usize) -> Result<Vec<u32>>;

    /// Final norm and head on every row of `h`, as host f32 `[rows, vocab]`.
    fn head_host(&self, h: Self::Hidden) -> Result<Vec<f32>>;

    /// Counts tokens run (padding excluded) for [`super::LanguageModel::tokens_run`].
    fn add_tokens(&self, n: usize) {
        self.health().tokens_run.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Refuses work when a failed weight swap left the model half loaded.
    fn check_usable(&self) -> Result<()> {
        match &self.health().poisoned {
            Some(why) => Err(EngineError::InvalidInput(format!("model unusable: {why}; load weights again"))),
            None => Ok(()),
        }
    }

    /// [`super::LanguageModel::logits`]: full next-token logits of one sequence, checked.
    fn logits_of(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_usable()?;
        if tokens.is_empty() {
            return Err(EngineError::InvalidInput("no tokens to score".into()));
        }
        self.check_len(tokens.len(), "a sequence")?;
        let positions: Vec<usize> = (0..tokens.len()).collect();
        self.add_tokens(tokens.len());
        let h =
            self.hidden(&Step { ids: tokens, b: 1, s: tokens.len(), positions: &positions, key_valid: None, key_pos: None, real: None }, None, None)?;
        let logits = self.head_host(h)?;
        if logits.iter().any(|v| !v.is_finite()) {
            return Err(self.non_finite("logits"));
        }
        Ok(logits)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let v = self.model_info().dims.vocab;
        match ids.iter().find(|&&t| t as usize >= v) {
            Some(t) => Err(EngineError::InvalidInput(format!("token id {t} is out of the vocabulary (size {v})"))),
            None => Ok(()),
        }
    }

    fn check_len(&self, len: usize, what: &str) -> Result<()> {
        let max = self.model_info().max_context;
        if len > max {
            return Err(EngineError::InvalidInput(format!("{what} of {len} tokens is longer than the model's context ({max} positions)")));
        }
        Ok(())
    }

    fn check_requests(&self, requests: &[ScoreRequest]) -> Result<()> {
        self.check_usable()?;
        for (i, r) in requests.iter().enumerate() {
            if r.context.is_empty() || r.continuation.is_empty() {
                return Err(EngineError::InvalidInput(format!("score request {i}: context and continuation must both hold at least one token")));
            }
            self.check_len(r.context.len() + r.continuation.len(), &format!("score request {i}"))?;
        }
        Ok(())
    }

    /// The root for `inputs` (each keeps at least its last token out of it): the prefix that
    /// saves the most tokens over the inputs that share it, if that is at least
    /// [`ROOT_MIN_SAVED`]; at most [`ROOT_KV_MAX_BYTES`] of keys and values.
    ///
    /// Sorted, inputs that share a prefix are neighbours; a prefix of length v shared by k of
    /// them saves v·(k − 1) tokens, the area of a rectangle under the neighbours' common-prefix
    /// lengths: the largest one is found with a stack in one sweep.
    fn plan_root(&self, inputs: &[&[u32]]) -> RootPlan {
        let Dims { kv_heads, head_dim, .. } = self.model_info().dims;
        let per_token = self.layer_path().hops.len() * 2 * kv_heads * head_dim * 4;
        let cap = ROOT_KV_MAX_BYTES / per_token.max(1);
        let mut order: Vec<usize> = (0..inputs.len()).collect();
        order.sort_by(|&a, &b| inputs[a].cmp(inputs[b]));
        let own = |x: &[u32]| x.len().saturating_sub(1);
        let h: Vec<usize> = order
            .windows(2)
            .map(|w| {
                let (a, b) = (inputs[w[0]], inputs[w[1]]);
                common_prefix(a, b).min(own(a)).min(own(b)).min(cap)
            })
            .collect();
        // (saved, length, first input in `order`)
        let mut best = (0usize, 0usize, 0usize);
        let mut stack: Vec<usize> = Vec::new();
        for i in 0..=h.len() {
            let here = h.get(i).copied().unwrap_or(0);
            while let Some(&top) = stack.last() {
                if h[top] < here {
                    break;
                }
                stack.pop();
                let left = stack.last().map_or(0, |&s| s + 1);
                let saved = h[top] * (i - left);
                if saved > best.0 {
                    best = (saved, h[top], left);
                }
            }
            stack.push(i);
        }
        let (saved, len, first) = best;
        if len == 0 || saved < ROOT_MIN_SAVED {
            return RootPlan::none(inputs.len());
        }
        let root = &inputs[order[first]][..len];
        RootPlan { len, rooted: inputs.iter().map(|x| own(x) >= len && x.starts_with(root)).collect() }
    }

    /// Runs `tokens` as a batch of one and keeps its keys and values: a root.
    fn run_root(&self, tokens: &[u32]) -> Result<KvCache<Self::Kv>> {
        let row = Row { tokens: tokens.to_vec(), start: 0, scored: vec![], parent: None };
        self.pass(&[row], None, None, true, &mut [], &mut [])?.ok_or_else(|| EngineError::InvalidInput("an empty root prefix".into()))
    }

    /// One forward pass over `rows` (right-padded by repeating each row's last token: causal
    /// attention by position keeps real tokens from seeing it). Scored columns write
    /// `logprobs[request][index]` and clear `greedy[request]` when the target was not the
    /// argmax. `root`: the shared prefix every row continues. `parent`: the pass whose kept
    /// cache the rows continue (`Row::parent`). `keep`: return this pass's cache.
    fn pass(
        &self,
        rows: &[Row],
        root: Option<&KvCache<Self::Kv>>,
        parent: Option<&KvCache<Self::Kv>>,
        keep: bool,
        logprobs: &mut [Vec<f64>],
        greedy: &mut [bool],
    ) -> Result<Option<KvCache<Self::Kv>>> {
        let b = rows.len();
        let s = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0);
        if b == 0 || s == 0 {
            return Ok(None);
        }
        let mut ids = vec![0u32; b * s];
        let mut positions = vec![0usize; b * s];
        let (mut sel, mut targets, mut dest) = (vec![], vec![], vec![]);
        for (r, row) in rows.iter().enumerate() {
            let n = row.tokens.len();
            ids[r * s..r * s + n].copy_from_slice(&row.tokens);
            ids[r * s + n..(r + 1) * s].fill(row.tokens[n - 1]);
            for (c, p) in positions[r * s..(r + 1) * s].iter_mut().enumerate() {
                *p = row.start + c;
            }
            for &(col, target, req, i) in &row.scored {
                sel.push((r * s + col) as i64);
                targets.push(i64::from(target));
                dest.push((req, i));
            }
        }
        self.add_tokens(rows.iter().map(|r| r.tokens.len()).sum());
        let hops = self.layer_path().hops.len();
        let (mut cache, key_valid, key_pos) = match parent {
            Some(p) => {
                debug_assert!(!keep, "a pass that continues a parent is not kept");
                let idx: Vec<i64> = rows.iter().map(|r| r.parent.map_or(0, |(pr, _, _)| pr as i64)).collect();
                let entries = p.entries.iter().map(|e| e.as_ref().map(|(k, v)| (self.select_batch(k, &idx), self.select_batch(v, &idx)))).collect();
                let t = p.len + s;
                let mut valid = vec![true; b * t];
                let mut kpos = vec![0usize; b * t];
                for (r, row) in rows.iter().enumerate() {
                    let (_, pstart, plen) = row.parent.unwrap_or((0, 0, 0));
                    for j in 0..p.len {
                        valid[r * t + j] = j < plen;
                        kpos[r * t + j] = pstart + j;
                    }
                    for c in 0..s {
                        kpos[r * t + p.len + c] = row.start + c;
                    }
                }
                (Some(KvCache { entries, len: p.len }), Some(valid), Some(kpos))
            }
            None => (keep.then(|| KvCache { entries: vec![None; hops], len: 0 }), None, None),
        };
        let real: Option<Vec<bool>> =
            rows.iter().any(|r| r.tokens.len() < s).then(|| rows.iter().flat_map(|r| (0..s).map(|c| c < r.tokens.len())).collect());
        let st = Step { ids: &ids, b, s, positions: &positions, key_valid: key_valid.as_deref(), key_pos: key_pos.as_deref(), real: real.as_deref() };
        let h = self.hidden(&st, cache.as_mut(), root)?;
        if !sel.is_empty() {
            let (lse, tgt, am) = self.row_stats(h, sel, &targets)?;
            if lse.iter().chain(&tgt).any(|v| !v.is_finite()) {
                return Err(self.non_finite("logits"));
            }
            for (k, &(req, i)) in dest.iter().enumerate() {
                logprobs[req][i] = f64::from(tgt[k]) - f64::from(lse[k]);
                if am[k] != targets[k] {
                    greedy[req] = false;
                }
            }
        }
        Ok(if keep { cache } else { None })
    }

    /// Scores `requests` (validated): each request as one row, `batch_size` rows per pass
    /// (`share` false), or sharing prefixes (`share` true; `batch_size` contexts per pass).
    fn score_planned(&self, requests: &[ScoreRequest], batch_size: usize, share: bool) -> Result<Vec<ScoreResult>> {
        let bs = batch_size.max(1);
        let mut logprobs: Vec<Vec<f64>> = requests.iter().map(|r| vec![0.0; r.continuation.len()]).collect();
        let mut greedy = vec![true; requests.len()];
        if share {
            self.score_sharing(requests, bs, &mut logprobs, &mut greedy)?;
        } else {
            let mut rows: Vec<Row> = requests
                .iter()
                .enumerate()
                .map(|(j, q)| Row {
                    tokens: q.context.iter().chain(&q.continuation).copied().collect(),
                    start: 0,
                    scored: q.continuation.iter().enumerate().map(|(i, &t)| (q.context.len() - 1 + i, t, j, i)).collect(),
                    parent: None,
                })
                .collect();
            rows.sort_by_key(|r| std::cmp::Reverse(r.tokens.len()));
            for chunk in rows.chunks(bs) {
                self.pass(chunk, None, None, false, &mut logprobs, &mut greedy)?;
            }
        }
        Ok(logprobs.into_iter().zip(greedy).map(|(logprobs, greedy)| ScoreResult { sum: logprobs.iter().sum(), logprobs, greedy }).collect())
    }

    /// [`score_planned`](Self::score_planned) with shared prefixes run once.
    fn score_sharing(&self, requests: &[ScoreRequest], bs: usize, logprobs: &mut [Vec<f64>], greedy: &mut [bool]) -> Result<()> {
        // Distinct contexts, in order of first appearance, with the requests that continue each.
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
        for (j, q) in requests.iter().enumerate() {
            let g = *index.entry(q.context.as_slice()).or_insert_with(|| {
                groups.push((q.context.as_slice(), vec![]));
                groups.len() - 1
            });
            groups[g].1.push(j);
        }
        let contexts: Vec<&[u32]> = groups.iter().map(|g| g.0).collect();
        let plan = self.plan_root(&contexts);
        for rooted in [true, false] {
            let class: Vec<&(&[u32], Vec<usize>)> = groups.iter().zip(&plan.rooted).filter(|(_, r)| **r == rooted).map(|(g, _)| g).collect();
            if class.is_empty() {
                continue;
            }
            let r = if rooted { plan.len } else { 0 };
            let root = if rooted { Some(self.run_root(&class[0].0[..r])?) } else { None };
            let mut firsts: Vec<(Row, Vec<usize>)> = class
                .iter()
                .map(|(ctx, members)| {
                    let own = &ctx[r..];
                    let g = own.len();
                    if let [j] = members[..] {
                        let cont = &requests[j].continuation;
                        let tokens = own.iter().chain(&cont[..cont.len() - 1]).copied().collect();
                        let scored = cont.iter().enumerate().map(|(i, &t)| (g - 1 + i, t, j, i)).collect();
                        (Row { tokens, start: r, scored, parent: None }, vec![])
                    } else {
                        let scored = members.iter().map(|&j| (g - 1, requests[j].continuation[0], j, 0)).collect();
                        let rest = members.iter().copied().filter(|&j| requests[j].continuation.len() > 1).collect();
                        (Row { tokens: own.to_vec(), start: r, scored, parent: None }, rest)
                    }
                })
                .collect();
            firsts.sort_by_key(|(row, _)| std::cmp::Reverse(row.tokens.len()));
            let (firsts, rests): (Vec<Row>, Vec<Vec<usize>>) = firsts.into_iter().unzip();
            for (chunk, rests) in firsts.chunks(bs).zip(rests.chunks(bs)) {
                let keep = rests.iter().any(|r| !r.is_empty());
                let cache = self.pass(chunk, root.as_ref(), None, keep, logprobs, greedy)?;
                let mut seconds: Vec<Row> = chunk
                    .iter()
                    .zip(rests)
                    .enumerate()
                    .flat_map(|(k, (row, rest))| {
                        rest.iter().map(move |&j| {
                            let cont = &requests[j].continuation;
                            let m = cont.len();
                            let scored = (1..m).map(|i| (i - 1, cont[i], j, i)).collect();
                            let start = row.start + row.tokens.len();
                            Row { tokens: cont[..m - 1].to_vec(), start, scored, parent: Some((k, row.start, row.tokens.len())) }
                        })
                    })
                    .collect();
                // Continuations are short: as many rows per pass as fit in the positions of
                // the context pass (a pass costs a read of every weight however few its rows).
                let budget = chunk.len() * chunk.iter().map(|r| r.tokens.len()).max().unwrap_or(1);
                seconds.sort_by_key(|r| std::cmp::Reverse(r.tokens.len()));
                let mut seconds = seconds.into_iter().peekable();
                while let Some(longest) = seconds.peek().map(|r| r.tokens.len()) {
                    let part: Vec<Row> = seconds.by_ref().take((budget / longest.max(1)).max(1)).collect();
                    self.pass(&part, root.as_ref(), cache.as_ref(), false, logprobs, greedy)?;
                }
            }
        }
        Ok(())
    }

    /// [`super::LanguageModel::generate`]: checks the prompts, runs the prefix most of them
    /// share once (if asked) and decodes each class of prompts, `opts.batch_size` at a time.
    fn generate_planned(&self, prompts: &[Vec<u32>], opts: &GenerateOptions, stop: &dyn Fn(usize, &[u32]) -> bool) -> Result<Vec<Generation>> {
        self.check_usable()?;
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(EngineError::InvalidInput(format!("prompt {i} is empty")));
            }
            self.check_len(p.len(), &format!("prompt {i}"))?;
        }
        let all: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let plan = if opts.share_prefix && prompts.len() > 1 { self.plan_root(&all) } else { RootPlan::none(prompts.len()) };
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        for rooted in [true, false] {
            let idx: Vec<usize> = (0..prompts.len()).filter(|&i| plan.rooted[i] == rooted).collect();
            let Some(&first) = idx.first() else { continue };
            let r = if rooted { plan.len } else { 0 };
            let root = if rooted { Some(self.run_root(&prompts[first][..r])?) } else { None };
            let bs = if opts.batch_size == 0 { idx.len() } else { opts.batch_size };
            for part in idx.chunks(bs.max(1)) {
                let sub: Vec<&[u32]> = part.iter().map(|&i| all[i]).collect();
                let gens = self.decode(&sub, r, root.as_ref(), opts, &|k, t| stop(part[k], t))?;
                for (&i, g) in part.iter().zip(gens) {
                    out[i] = Some(g);
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Greedy generation of `prompts` (validated), left-padded after their shared root of
    /// `r` tokens (`root`, none when `r` is 0).
    fn decode(
        &self,
        prompts: &[&[u32]],
        r: usize,
        root: Option<&KvCache<Self::Kv>>,
        opts: &GenerateOptions,
        stop: &dyn Fn(usize, &[u32]) -> bool,
    ) -> Result<Vec<Generation>> {
        let b = prompts.len();
        let s = prompts.iter().map(|p| p.len() - r).max().unwrap_or(0);
        // Left padding: every prompt ends in the last column, so one new column per step.
        let mut ids = vec![0u32; b * s];
        let mut positions = vec![0usize; b * s];
        let mut valid: Vec<Vec<bool>> = Vec::with_capacity(b);
        for (row, p) in prompts.iter().enumerate() {
            let own = &p[r..];
            let pad = s - own.len();
            ids[row * s..row * s + pad].fill(own[0]);
            ids[row * s + pad..(row + 1) * s].copy_from_slice(own);
            for (c, p) in positions[row * s..(row + 1) * s].iter_mut().enumerate() {
                *p = r + c.saturating_sub(pad);
            }
            valid.push((0..s).map(|c| c >= pad).collect());
        }
        self.add_tokens(prompts.iter().map(|p| p.len() - r).sum());
        let flat = |v: &[Vec<bool>]| -> Vec<bool> { v.iter().flatten().copied().collect() };
        let mut cache = KvCache { entries: vec![None; self.layer_path().hops.len()], len: 0 };
        let kv = flat(&valid);
        let any_pad = kv.iter().any(|v| !v);
        // Before the first step, the valid keys are the prompts' real tokens.
        let st = Step {
            ids: &ids,
            b,
            s,
            positions: &positions,
            key_valid: any_pad.then_some(kv.as_slice()),
            key_pos: None,
            real: any_pad.then_some(kv.as_slice()),
        };
        let h = self.hidden(&st, Some(&mut cache), root)?;
        let mut next = self.next_tokens(h, b, s)?;
        let mut out: Vec<Generation> = (0..b).map(|_| Generation { tokens: vec![], reason: StopReason::MaxTokens }).collect();
        let mut done = vec![opts.max_new_tokens == 0; b];
        let mut step = 0;
        let max_context = self.model_info().max_context;
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
            let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0) + step;
            if longest > max_context {
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
            self.add_tokens(done.iter().filter(|&&d| !d).count());
            let st = Step { ids: &next, b, s: 1, positions: &pos, key_valid: any_pad.then_some(kv.as_slice()), key_pos: None, real: None };
            let h = self.hidden(&st, Some(&mut cache), root)?;
            next = self.next_tokens(h, b, 1)?;
        }
        Ok(out)
    }
}
