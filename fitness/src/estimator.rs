//! [`FitnessEstimator`]: what a search calls per candidate. A [`TaskEstimator`] scores one task
//! on a fixed item subset and estimates the full-set metric:
//!
//! | method | items scored per candidate | estimate |
//! |---|---|---|
//! | `full` | all | the metric |
//! | `random` | k, seeded, the same for every candidate | mean |
//! | `anchor` | k cluster representatives (k-means++ on the calibration models' correctness) | cluster-mass-weighted mean |
//! | `irt` / `pirt` / `gpirt` | k, seeded | 2PL IRT fitted on the calibration models (tinyBenchmarks), 1–8 ability dimensions chosen by cross-validation |
//! | `gpirt_anchor` | k anchor points | gp-IRT with the anchors' weighted mean as its direct estimate |
//!
//! On real merges of the demo zoo (BENCHMARKS.md, "Fitness estimators on real merges"),
//! `gpirt_anchor` and `gpirt` are the most accurate at 5–10 % of the items, and every IRT-based
//! method needs calibration merges besides the three sources (`[calibration]` in a search).
//!
//! Calibration = item-level results of the run's own source models (plus any candidates the
//! caller adds) on every item, as a [`Responses`] matrix — which is why this works for any task,
//! not only tasks someone already fitted. [`successive_halving`] spends a budget across a
//! population instead: everyone on a small subset, the best on larger ones.

use std::time::Instant;

use evomerge_engine::model::{LanguageModel, Tokenizer};
/// Objective directions are the search's own type: minimization is applied in one place.
pub use evomerge_search::Direction;
use serde::{Deserialize, Serialize};

use crate::estimators::sim::random_items;
use crate::estimators::{AnchorPoints, Estimate, Irt, IrtConfig, Responses, weighted_mean};
use crate::tasks::{EvalOptions, ItemResult, Kind, ResultCache, SpecError, Task, TaskError};

/// A named objective.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Objective {
    pub name: String,
    pub direction: Direction,
}

/// One candidate's fitness, with what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fitness {
    /// One value per objective, in the estimator's objective order.
    pub values: Vec<f64>,
    pub std_errors: Vec<f64>,
    /// Items scored for this candidate (cache hits excluded).
    pub items: usize,
    /// Tokens run through the model (a shared prefix counted once).
    pub tokens: usize,
    /// What `tokens` would have been without prefix sharing.
    #[serde(default)]
    pub tokens_unshared: usize,
    pub seconds: f64,
    /// Item-level results (the replayable record).
    pub records: Vec<ItemResult>,
}

/// Scores candidates. Object-safe; the search sees only this.
pub trait FitnessEstimator {
    fn objectives(&self) -> &[Objective];
    /// Scores `model`; `fingerprint` identifies its weights (cache key).
    fn evaluate(&mut self, model: &mut dyn LanguageModel, fingerprint: &str) -> Result<Fitness, TaskError>;
}

/// How a [`TaskEstimator`] turns a subset into an estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Method {
    Full,
    Random {
        k: usize,
        seed: u64,
    },
    Anchor {
        k: usize,
        seed: u64,
    },
    Irt {
        k: usize,
        seed: u64,
    },
    Pirt {
        k: usize,
        seed: u64,
    },
    Gpirt {
        k: usize,
        seed: u64,
    },
    /// gp-IRT on anchor points instead of a random subset (tinyBenchmarks' gp-IRT is defined
    /// for either; the direct part is the anchors' cluster-mass-weighted mean).
    GpirtAnchor {
        k: usize,
        seed: u64,
    },
}

impl Method {
    /// Whether the method is fitted on calibration results (every method but `full` and
    /// `random`).
    pub fn needs_calibration(&self) -> bool {
        !matches!(self, Method::Full | Method::Random { .. })
    }
}

#[derive(Clone)]
enum Fitted {
    Mean,
    Weighted(Vec<f64>),
    /// `naive`: weights of the direct estimate gp-IRT mixes in (uniform on a random subset).
    Irt {
        irt: Irt,
        gp_lambda: Option<f64>,
        p: bool,
        naive: Vec<f64>,
    },
}

/// One task, one estimation method. A clone shares nothing (its own result cache): one per
/// worker when candidates are scored in parallel.
#[derive(Clone)]
pub struct TaskEstimator {
    task: Task,
    tok: Tokenizer,
    prefix: u32,
    opts: EvalOptions,
    objectives: Vec<Objective>,
    items: Vec<usize>,
    fitted: Fitted,
    cache: ResultCache,
}

impl std::fmt::Debug for TaskEstimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEstimator").field("task", &self.task.spec.name).field("items", &self.items.len()).finish()
    }
}

impl TaskEstimator {
    /// Builds the estimator. `calibration` (models × all items, scores in [0, 1]) is needed by
    /// `anchor` and the IRT methods; it comes from [`TaskEstimator::responses`] on the source
    /// models.
    pub fn new(task: Task, tok: Tokenizer, prefix: u32, method: Method, calibration: Option<&Responses>) -> Result<Self, TaskError> {
        let n = task.items.len();
        let err = |reason: String| TaskError::Spec { task: task.spec.name.clone(), reason: Box::new(SpecError::Estimator(reason)) };
        let need_cal = |cal: Option<&Responses>| -> Result<Responses, TaskError> {
            let c = cal.ok_or_else(|| err("this estimator needs calibration results of the source models".into()))?;
            if c.items != n {
                return Err(err(format!("calibration covers {} items, the task has {n}", c.items)));
            }
            Ok(c.clone())
        };
        let check_k = |k: usize| if k == 0 || k > n { Err(err(format!("subset of {k} items from {n}"))) } else { Ok(k) };
        if method.needs_calibration() && task.spec.kind == Kind::Perplexity {
            return Err(err("anchor / IRT estimators need a 0-1 metric, not perplexity".into()));
        }
        let (items, fitted) = match method {
            Method::Full => ((0..n).collect(), Fitted::Mean),
            Method::Random { k, seed } => (random_items(n, check_k(k)?, seed), Fitted::Mean),
            Method::Anchor { k, seed } => {
                let a = AnchorPoints::fit(&need_cal(calibration)?, check_k(k)?, seed);
                (a.items, Fitted::Weighted(a.weights))
            }
            Method::Irt { k, seed } | Method::Pirt { k, seed } | Method::Gpirt { k, seed } => {
                let cal = need_cal(calibration)?;
                let items = random_items(n, check_k(k)?, seed);
                let (irt, _) = Irt::fit_cross_validated(&cal, &IrtConfig { seed, ..IrtConfig::default() }, &items);
                let naive = vec![1.0 / k as f64; k];
                let gp_lambda = matches!(method, Method::Gpirt { .. }).then(|| irt.choose_lambda(&cal, &items, &naive));
                (items, Fitted::Irt { irt, gp_lambda, p: !matches!(method, Method::Irt { .. }), naive })
            }
            Method::GpirtAnchor { k, seed } => {
                let cal = need_cal(calibration)?;
                let a = AnchorPoints::fit(&cal, check_k(k)?, seed);
                let (irt, _) = Irt::fit_cross_validated(&cal, &IrtConfig { seed, ..IrtConfig::default() }, &a.items);
                let gp_lambda = Some(irt.choose_lambda(&cal, &a.items, &a.weights));
                (a.items, Fitted::Irt { irt, gp_lambda, p: true, naive: a.weights })
            }
        };
        let spec = &task.spec;
        let objectives = vec![Objective {
            name: format!("{}/{}", spec.name, spec.metric.name.name()),
            direction: if spec.metric.name.higher_is_better() { Direction::Maximize } else { Direction::Minimize },
        }];
        Ok(Self { task, tok, prefix, opts: EvalOptions::default(), objectives, items, fitted, cache: ResultCache::default() })
    }

    /// The items a candidate is scored on.
    pub fn subset(&self) -> &[usize] {
        &self.items
    }

    /// Every item's score for each model: the calibration matrix.
    pub fn responses(task: &Task, tok: &Tokenizer, prefix: u32, models: &mut [Box<dyn LanguageModel>]) -> Result<Responses, TaskError> {
        let mut data = Vec::with_capacity(models.len() * task.items.len());
        for m in models.iter_mut() {
            data.extend(Self::item_scores(task, tok, prefix, m.as_mut())?);
        }
        Ok(Responses::new(models.len(), task.items.len(), data))
    }

    /// One model's score on every item of `task`, in item order: one row of the calibration matrix.
    pub fn item_scores(task: &Task, tok: &Tokenizer, prefix: u32, model: &mut dyn LanguageModel) -> Result<Vec<f64>, TaskError> {
        let r = task.evaluate(model, tok, prefix, &crate::tasks::EvalOptions::default())?;
        Ok(r.items.iter().map(|i| i.score).collect())
    }

    fn estimate(&self, scores: &[f64]) -> Estimate {
        match &self.fitted {
            Fitted::Mean => {
                let (m, se) = crate::tasks::mean_stderr(scores);
                Estimate { value: m, std_error: if se.is_nan() { 0.0 } else { se } }
            }
            Fitted::Weighted(w) => weighted_mean(scores, w),
            Fitted::Irt { irt, gp_lambda, p, naive } => {
                let naive = weighted_mean(scores, naive);
                match (gp_lambda, p) {
                    (Some(l), _) => irt.estimate_gp(&self.items, scores, naive, *l),
                    (None, true) => irt.estimate_p(&self.items, scores),
                    (None, false) => irt.estimate(&self.items, scores),
                }
            }
        }
    }
}

impl FitnessEstimator for TaskEstimator {
    fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    fn evaluate(&mut self, model: &mut dyn LanguageModel, fingerprint: &str) -> Result<Fitness, TaskError> {
        let t0 = Instant::now();
        let before = self.cache.len();
        let (records, tokens) = self.task.evaluate_cached(model, &self.tok, self.prefix, &self.items, &self.opts, &mut self.cache, fingerprint)?;
        let scored = self.cache.len() - before;
        let (value, se) = if self.task.spec.kind == Kind::Perplexity {
            let r = self.task.aggregate(records.clone(), tokens, 0.0);
            (r.value, f64::NAN)
        } else {
            let scores: Vec<f64> = records.iter().map(|r| r.score).collect();
            let e = self.estimate(&scores);
            (e.value, e.std_error)
        };
        Ok(Fitness {
            values: vec![value],
            std_errors: vec![se],
            items: scored,
            tokens: tokens.run,
            tokens_unshared: tokens.unshared,
            seconds: t0.elapsed().as_secs_f64(),
            records,
        })
    }
}

/// Successive halving over a population (Jamieson & Talwalkar 2016): every candidate is scored
/// on the first `start` items of `order`, the best `1/eta` move on to `eta` times as many, until
/// the survivors have seen every item or one is left. `score(c, items)` returns candidate `c`'s
/// per-item scores (callers cache them, so promotion re-scores nothing). Returns each
/// candidate's estimate (mean over the items it saw) and how many items that was.
pub fn successive_halving(
    candidates: usize,
    order: &[usize],
    start: usize,
    eta: usize,
    mut score: impl FnMut(usize, &[usize]) -> Result<Vec<f64>, TaskError>,
) -> Result<Vec<(f64, usize)>, TaskError> {
    let eta = eta.max(2);
    let mut out = vec![(f64::NAN, 0usize); candidates];
    let mut alive: Vec<usize> = (0..candidates).collect();
    let mut budget = start.clamp(1, order.len().max(1));
    loop {
        for &c in &alive {
            let s = score(c, &order[..budget])?;
            out[c] = (s.iter().sum::<f64>() / s.len().max(1) as f64, budget);
        }
        if alive.len() <= 1 || budget >= order.len() {
            return Ok(out);
        }
        alive.sort_by(|&a, &b| out[b].0.total_cmp(&out[a].0));
        alive.truncate((alive.len() / eta).max(1));
        budget = (budget * eta).min(order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successive_halving_promotes_the_best_and_spends_less() {
        // Candidate c answers item i correctly iff (i * 7 + c) % 10 < c: higher c, better.
        let truth = |c: usize, i: usize| f64::from(u8::from((i * 7 + c) % 10 < c));
        let order: Vec<usize> = (0..64).collect();
        let mut calls = 0usize;
        let r = successive_halving(8, &order, 8, 2, |c, items| {
            calls += items.len();
            Ok(items.iter().map(|&i| truth(c, i)).collect())
        })
        .expect("sh");
        let best = (0..8).max_by(|&a, &b| r[a].0.total_cmp(&r[b].0)).expect("best");
        assert_eq!(best, 7);
        assert_eq!(r[7].1, 64, "the winner saw every item");
        assert_eq!(r[0].1, 8, "the worst only the first rung");
        assert!(calls < 8 * 64, "{calls} item scores vs {} for everyone on everything", 8 * 64);
    }
}
