//! One candidate, start to end: `evaluate(candidate) -> EvaluationRecord`. A parameter-space
//! candidate is planned over the run's opened checkpoints (`GenomeLayout::plan`), merged by
//! the run's [`Materializer`] into a worker's runtime and scored by every estimator; a
//! data-flow candidate is a layer path the runtime follows. This is the call a worker makes.

use std::time::Instant;

use evomerge_engine::dataflow::{self, DataFlowLayout};
use evomerge_engine::genome::GenomeLayout;
use evomerge_engine::model::LanguageModel;
use evomerge_engine::{Materializer, OpenedCheckpoints};
use evomerge_fitness::{FitnessEstimator, Objective, TaskEstimator};
use evomerge_search::Candidate;

use crate::error::{Result, RunError};
use crate::observer::Stage;
use crate::records::{EvaluationRecord, Objectives, RecordOutcome, Scores};

/// What a stage's genomes are, and what turns one into a scoreable model.
#[derive(Debug, Clone, Copy)]
pub enum StageKind<'a> {
    /// Merge parameters: genome → plan over the opened checkpoints → the runtime's weights.
    Params { layout: &'a GenomeLayout, opened: &'a OpenedCheckpoints, materializer: &'a Materializer, seed: u64 },
    /// A data-flow path through the runtime's loaded models (no weights move).
    DataFlow { layout: &'a DataFlowLayout },
}

impl StageKind<'_> {
    pub fn stage(&self) -> Stage {
        match self {
            StageKind::Params { .. } => Stage::Params,
            StageKind::DataFlow { .. } => Stage::DataFlow,
        }
    }

    /// File holding the best candidate so far (one objective).
    pub fn best_file(&self) -> &'static str {
        match self {
            StageKind::Params { .. } => "best.yaml",
            StageKind::DataFlow { .. } => "best_path.json",
        }
    }

    /// The best file's text for `genome`: a mergekit recipe, or the layer path as JSON.
    pub fn artifact(&self, genome: &[f64]) -> Result<String> {
        let bad = |e: &dyn std::fmt::Display| RunError::Experiment(format!("writing the best candidate: {e}"));
        match self {
            StageKind::Params { layout, .. } => serde_norway::to_string(&layout.decode(genome)?).map_err(|e| bad(&e)),
            StageKind::DataFlow { layout } => serde_json::to_string_pretty(&layout.decode(genome)?).map_err(|e| bad(&e)),
        }
    }

    /// Identifies a candidate's weights (the result cache's and de-duplication's key): stage
    /// tag + the genome's bits.
    pub fn fingerprint(&self, genome: &[f64]) -> String {
        let tag = match self {
            StageKind::Params { .. } => "",
            StageKind::DataFlow { .. } => "dfs:",
        };
        format!("{tag}{}", genome.iter().map(|x| format!("{:016x}", x.to_bits())).collect::<String>())
    }

    /// A data-flow candidate's path in words.
    fn path_text(&self, genome: &[f64]) -> Result<Option<String>> {
        match self {
            StageKind::Params { .. } => Ok(None),
            StageKind::DataFlow { layout } => Ok(Some(dataflow::describe(&layout.decode(genome)?))),
        }
    }
}

/// A runtime and its own estimators: one per candidate scored at once.
pub struct Worker {
    pub runtime: Box<dyn LanguageModel>,
    pub estimators: Vec<TaskEstimator>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("runtime", &self.runtime.info()).field("estimators", &self.estimators).finish()
    }
}

/// An error and its sources, as `anyhow` prints `{:#}`: "outer: inner: ...".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Objectives, standard errors, items and tokens of one scoring.
struct Scored {
    values: Vec<f64>,
    std_errors: Vec<f64>,
    items: usize,
    tokens: usize,
    tokens_unshared: usize,
}

/// Scores candidate `c` with `runtime` and `estimators` (one worker): merge it into (or route)
/// the runtime, run every estimator, and return its record. A candidate-scoped error (an
/// unmergeable point, NaN logits) becomes a failed record; nothing is written.
pub fn evaluate(kind: &StageKind<'_>, c: &Candidate, runtime: &mut dyn LanguageModel, estimators: &mut [TaskEstimator]) -> EvaluationRecord {
    let t0 = Instant::now();
    let mut materialize_seconds = 0.0;
    let mut path = None;
    let fp = kind.fingerprint(&c.genome);
    let result = (|| -> Result<Scored> {
        match kind {
            StageKind::Params { layout, opened, materializer, seed } => {
                let plan = layout.plan(&c.genome, opened, *seed)?;
                materializer.materialize(&plan, runtime, 0)?;
            }
            StageKind::DataFlow { layout } => {
                let p = layout.decode(&c.genome)?;
                path = Some(dataflow::describe(&p));
                runtime.set_path(p)?;
            }
        }
        materialize_seconds = t0.elapsed().as_secs_f64();
        let mut s = Scored { values: vec![], std_errors: vec![], items: 0, tokens: 0, tokens_unshared: 0 };
        for e in estimators.iter_mut() {
            let f = e.evaluate(runtime, &fp)?;
            s.values.extend(&f.values);
            s.std_errors.extend(&f.std_errors);
            s.items += f.items;
            s.tokens += f.tokens;
            s.tokens_unshared += f.tokens_unshared;
        }
        Ok(s)
    })();
    record(c, &objectives(estimators), result, t0, materialize_seconds, path)
}

/// Each estimator's objective (name and direction), in order.
pub fn objectives(estimators: &[TaskEstimator]) -> Vec<Objective> {
    estimators.iter().map(|e| e.objectives()[0].clone()).collect()
}

/// A candidate that could not be scored for a reason found outside [`evaluate`] (it ended
/// every worker it was given, say): a failed record.
pub fn failed(c: &Candidate, reason: String) -> EvaluationRecord {
    EvaluationRecord { id: c.id, generation: c.generation, genome: c.genome.clone(), outcome: RecordOutcome::Failed(reason), seconds: 0.0 }
}

/// A genome scored before: its earlier values and standard errors, no work.
pub fn repeat(kind: &StageKind<'_>, c: &Candidate, objectives: &[Objective], values: Vec<f64>, std_errors: Vec<f64>) -> EvaluationRecord {
    let t0 = Instant::now();
    let mut path = None;
    let result = kind.path_text(&c.genome).map(|p| {
        path = p;
        Scored { values, std_errors, items: 0, tokens: 0, tokens_unshared: 0 }
    });
    record(c, objectives, result, t0, 0.0, path)
}

fn record(
    c: &Candidate,
    objectives: &[Objective],
    result: Result<Scored>,
    t0: Instant,
    materialize_seconds: f64,
    path: Option<String>,
) -> EvaluationRecord {
    let outcome = match result {
        Ok(s) => {
            let directions = objectives.iter();
            let minimized = s.values.iter().zip(directions.clone()).map(|(v, o)| o.direction.to_minimized(*v)).collect();
            let objectives = Objectives(directions.zip(&s.values).map(|(o, v)| (o.name.clone(), *v)).collect());
            RecordOutcome::Scored(Scores {
                objectives,
                std_errors: s.std_errors,
                minimized,
                items: s.items,
                tokens: s.tokens,
                tokens_unshared: s.tokens_unshared,
                materialize_seconds,
                path,
            })
        }
        Err(e) => RecordOutcome::Failed(error_chain(&e)),
    };
    EvaluationRecord { id: c.id, generation: c.generation, genome: c.genome.clone(), outcome, seconds: t0.elapsed().as_secs_f64() }
}
