//! Scoring in planned forward passes, and shared-prefix scoring: a prefix that several
//! requests share runs through the model once.
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

#[allow(unused_imports)]
use super::*;

/// A shared root is used only when it saves at least this many tokens: it costs one more
/// forward pass of a single row, which reads every weight once (on the 0.5 B model on two
/// cores, about what a few dozen tokens cost inside a batch).
const ROOT_MIN_SAVED: usize = 64;

/// Most bytes a root's keys and values may take (f32, all hops); a longer shared prefix is
/// shared only up to this length, so sharing never needs more memory than this on top of
/// what unshared scoring needs.
const ROOT_KV_MAX_BYTES: usize = 1 << 30;

/// One row of a forward pass.
pub(super) struct Row {
    pub(super) tokens: Vec<u32>,
    /// Position of `tokens[0]`.
    pub(super) start: usize,
    /// Scored columns: (column, target token, request, index in the request's continuation).
    pub(super) scored: Vec<(usize, u32, usize, usize)>,
    /// The row of the parent pass whose keys this row continues: (row, its start, its length).
    pub(super) parent: Option<(usize, usize, usize)>,
}

/// Which inputs start from a shared root, and its length.
pub(super) struct RootPlan {
    pub(super) len: usize,
    pub(super) rooted: Vec<bool>,
}

impl RootPlan {
    /// No root: every one of `n` inputs runs from its first token.
    pub(super) fn none(n: usize) -> Self {
        Self { len: 0, rooted: vec![false; n] }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<B: Kernels> Runtime<B> {
    /// Tokens run through the model so far (padding excluded).
    pub(super) fn add_tokens(&self, n: usize) {
        self.tokens_run.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The root for `inputs` (each keeps at least its last token out of it): the prefix that
    /// saves the most tokens over the inputs that share it, if that is at least
    /// [`ROOT_MIN_SAVED`]; at most [`ROOT_KV_MAX_BYTES`] of keys and values.
    ///
    /// Sorted, inputs that share a prefix are neighbours; a prefix of length v shared by k of
    /// them saves v·(k − 1) tokens, the area of a rectangle under the neighbours' common-prefix
    /// lengths: the largest one is found with a stack in one sweep.
    pub(super) fn plan_root(&self, inputs: &[&[u32]]) -> RootPlan {
        let Dims { kv_heads, head_dim, .. } = self.info.dims;
        let per_token = self.path.hops.len() * 2 * kv_heads * head_dim * 4;
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
    pub(super) fn run_root(&self, tokens: &[u32]) -> Result<KvCache<B>> {
        let row = Row { tokens: tokens.to_vec(), start: 0, scored: vec![], parent: None };
        let cache = self.pass(&[row], None, None, true, &mut [], &mut [])?;
        Ok(cache.expect("kept"))
    }

    /// One forward pass over `rows` (right-padded by repeating each row's last token: causal
    /// attention by position keeps real tokens from seeing it). Scored columns write
    /// `logprobs[request][index]` and clear `greedy[request]` when the target was not the
    /// argmax. `root`: the shared prefix every row continues. `parent`: the pass whose kept
    /// cache the rows continue (`Row::parent`). `keep`: return this pass's cache.
    pub(super) fn pass(
        &self,
        rows: &[Row],
        root: Option<&KvCache<B>>,
        parent: Option<&KvCache<B>>,
        keep: bool,
        logprobs: &mut [Vec<f64>],
        greedy: &mut [bool],
    ) -> Result<Option<KvCache<B>>> {
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
        let hops = self.path.hops.len();
        let (mut cache, key_valid, key_pos) = match parent {
            Some(p) => {
                debug_assert!(!keep, "a pass that continues a parent is not kept");
                let idx = self.rows(rows.iter().map(|r| r.parent.map_or(0, |(pr, _, _)| pr as i64)).collect());
                let entries =
                    p.entries.iter().map(|e| e.as_ref().map(|(k, v)| (k.clone().select(0, idx.clone()), v.clone().select(0, idx.clone())))).collect();
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
        let st = Step { ids: &ids, b, s, positions: &positions, key_valid: key_valid.as_deref(), key_pos: key_pos.as_deref() };
        let h = self.hidden(&st, cache.as_mut(), root)?;
        if !sel.is_empty() {
            let logits = self.head(h.select(0, self.rows(sel)));
            let (lse, tgt, am) = <B as Kernels>::row_stats(logits, &targets);
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
    pub(super) fn score_planned(&self, requests: &[ScoreRequest], batch_size: usize, share: bool) -> Result<Vec<ScoreResult>> {
        let bs = batch_size.max(1);
        let mut logprobs: Vec<Vec<f64>> = requests.iter().map(|r| vec![0.0; r.continuation.len()]).collect();
        let mut greedy = vec![true; requests.len()];
        if share {
            self.score_shared(requests, bs, &mut logprobs, &mut greedy)?;
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

    fn score_shared(&self, requests: &[ScoreRequest], bs: usize, logprobs: &mut [Vec<f64>], greedy: &mut [bool]) -> Result<()> {
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
}
