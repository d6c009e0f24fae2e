//! The ask/tell contract shared by every optimizer, and the serializable checkpoint form.

use serde::{Deserialize, Serialize};

use crate::cmaes::CmaEs;
use crate::error::SearchError;
use crate::nsga2::Nsga2;
use crate::random::RandomSearch;
use crate::space::SearchSpace;

/// A genome to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Unique over the optimizer's life (restarts included).
    pub id: u64,
    pub generation: u64,
    /// Inside the space's bounds.
    pub genome: Vec<f64>,
}

/// What became of a candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Objective values, already in minimization form (see [`crate::Direction`]).
    Scored(Vec<f64>),
    /// The candidate could not be evaluated (NaN logits, out of memory, ...).
    Failed(String),
}

/// The result for one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub id: u64,
    pub outcome: Outcome,
}

impl Evaluation {
    pub fn scored(id: u64, values: Vec<f64>) -> Self {
        Self { id, outcome: Outcome::Scored(values) }
    }

    pub fn failed(id: u64, reason: impl Into<String>) -> Self {
        Self { id, outcome: Outcome::Failed(reason.into()) }
    }

    /// The single objective (validated finite), or `None` for a failure.
    pub(crate) fn single(&self, expected: usize) -> Result<Option<Vec<f64>>, SearchError> {
        match &self.outcome {
            Outcome::Failed(_) => Ok(None),
            Outcome::Scored(v) => {
                if v.len() != expected {
                    return Err(SearchError::ObjectiveCount { id: self.id, got: v.len(), expected });
                }
                if let Some((index, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    return Err(SearchError::NonFiniteObjective { id: self.id, index, value });
                }
                Ok(Some(v.clone()))
            }
        }
    }
}

/// Told candidates: `(id, what was pending for it, objectives or None for a failure)`.
pub(crate) type Told<T> = Vec<(u64, T, Option<Vec<f64>>)>;

/// Validates a batch of tells against the pending candidates and removes the told ones:
/// `(id, pending value, objectives or None for a failure)`. Unknown or repeated ids and bad
/// objectives are errors, and then nothing is removed.
pub(crate) fn take_told<T>(
    pending: &mut std::collections::BTreeMap<u64, T>,
    evaluations: &[Evaluation],
    objectives: usize,
) -> Result<Told<T>, SearchError> {
    let mut checked: Vec<(u64, Option<Vec<f64>>)> = Vec::with_capacity(evaluations.len());
    for e in evaluations {
        if !pending.contains_key(&e.id) || checked.iter().any(|(id, _)| *id == e.id) {
            return Err(SearchError::UnknownCandidate(e.id));
        }
        checked.push((e.id, e.single(objectives)?));
    }
    Ok(checked.into_iter().filter_map(|(id, v)| pending.remove(&id).map(|t| (id, t, v))).collect())
}

/// The best genome and value of the first objective told so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BestSoFar(Option<(Vec<f64>, f64)>);

impl BestSoFar {
    /// Records `value` if it improves on the best; the genome is built only then.
    pub(crate) fn offer(&mut self, value: f64, genome: impl FnOnce() -> Vec<f64>) -> bool {
        if self.0.as_ref().is_some_and(|(_, b)| value >= *b) {
            return false;
        }
        self.0 = Some((genome(), value));
        true
    }

    pub fn get(&self) -> Option<(&[f64], f64)> {
        self.0.as_ref().map(|(g, v)| (g.as_slice(), *v))
    }
}

/// Why an optimizer considers itself finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StopReason {
    /// Recent best values differ by less than `tol_fun`.
    TolFun,
    /// The search distribution is narrower than `tol_x` in every coordinate.
    TolX,
    /// The covariance condition number exceeded 1e14.
    ConditionCov,
    /// No improvement of the best value for many generations.
    TolStagnation,
}

/// An ask/tell optimizer. All optimizers minimize.
///
/// - [`ask`](Self::ask) returns the candidates of the current generation that have not been
///   told yet, creating the next generation when none is pending; asking twice without telling
///   returns the same candidates (so a resumed run re-asks exactly what was pending).
/// - [`tell`](Self::tell) accepts evaluations in any order and in batches; the generation is
///   complete when all its candidates are told. Unknown ids and non-finite objectives are
///   errors (nothing is applied from a batch with an error). **Failures** are ranked last: a
///   failed candidate counts as worse than every scored one.
pub trait Optimizer: std::fmt::Debug {
    fn name(&self) -> &'static str;
    fn space(&self) -> &SearchSpace;
    fn ask(&mut self) -> Vec<Candidate>;
    fn tell(&mut self, evaluations: Vec<Evaluation>) -> Result<(), SearchError>;
    /// `Some` once a stopping criterion holds.
    fn stop(&self) -> Option<StopReason>;
    /// Best genome and (minimized) value told so far, single-objective optimizers.
    fn best(&self) -> Option<(&[f64], f64)>;
    /// Evaluations told so far.
    fn evaluations(&self) -> u64;
    /// Completed generations.
    fn generation(&self) -> u64;
    /// The whole state, for checkpoints.
    fn state(&self) -> OptimizerState;
    /// Asynchronous (steady-state) mode: one new candidate, made from what has been told so
    /// far, while others are still being scored; each is told on its own, in any order, with
    /// [`tell`](Self::tell). `None`: this optimizer has no sound asynchronous update (CMA-ES:
    /// its rank-μ update assumes a whole generation sampled from one distribution). An
    /// optimizer is driven either by `ask` or by `ask_one`, never both.
    fn ask_one(&mut self) -> Option<Candidate> {
        None
    }
    /// Candidates asked and not yet told (what a resumed asynchronous run scores again).
    fn in_flight(&self) -> Vec<Candidate> {
        vec![]
    }
}

/// Checkpoint format version of [`OptimizerState`] JSON.
pub const FORMAT_VERSION: u32 = 1;

/// The serializable state of any optimizer (externally tagged: `{"cmaes": {…}}`; an internally
/// tagged enum would buffer the state, which cannot hold the RNG's u128 counters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerState {
    Random(Box<RandomSearch>),
    Cmaes(Box<CmaEs>),
    Nsga2(Box<Nsga2>),
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: u32,
    state: OptimizerState,
}

impl OptimizerState {
    /// JSON with the format version (floats round-trip exactly).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Envelope { format: FORMAT_VERSION, state: self.clone() }).unwrap_or_default()
    }

    /// Parses [`to_json`](Self::to_json) output, refusing other format versions.
    pub fn from_json(text: &str) -> Result<Self, SearchError> {
        // The version first (the state holds u128 RNG counters, which serde_json::Value cannot).
        #[derive(Deserialize)]
        struct Version {
            format: Option<u32>,
        }
        let v: Version = serde_json::from_str(text).map_err(|e| SearchError::BadCheckpoint(format!("not a checkpoint: {e}")))?;
        match v.format {
            Some(FORMAT_VERSION) => {}
            Some(f) => return Err(SearchError::BadCheckpoint(format!("format version {f}, this build reads {FORMAT_VERSION}"))),
            None => return Err(SearchError::BadCheckpoint("no format version".into())),
        }
        let e: Envelope = serde_json::from_str(text).map_err(|e| SearchError::BadCheckpoint(e.to_string()))?;
        Ok(e.state)
    }

    /// The optimizer's name (`random`, `cmaes`, `nsga2`, `nsga3`).
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerState::Random(_) => "random",
            OptimizerState::Cmaes(_) => "cmaes",
            OptimizerState::Nsga2(n) => n.name(),
        }
    }

    /// Restores an optimizer, requiring it to be `expected` (a checkpoint of another optimizer
    /// is an error).
    pub fn restore(self, expected: &str) -> Result<Box<dyn Optimizer>, SearchError> {
        if self.name() != expected {
            return Err(SearchError::BadCheckpoint(format!("checkpoint holds a '{}' optimizer, expected '{expected}'", self.name())));
        }
        Ok(match self {
            OptimizerState::Random(r) => r,
            OptimizerState::Cmaes(c) => c,
            OptimizerState::Nsga2(n) => n,
        })
    }
}
