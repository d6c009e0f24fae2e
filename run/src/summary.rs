//! What a finished run found: per stage its pick and whether it improved on where the stage
//! started, the run's pick, and every reference beside it. Written to `summary.json`, sent as
//! the last JSON line of `--progress jsonl` (`"event": "summary"`) and drawn as the closing
//! table on a terminal.

use serde::Serialize;

use crate::observer::Stage;
use crate::records::{EvaluationRecord, Objectives, Reference, best_by_mean};
use crate::run_dir::RunDir;

/// `summary.json` in the run directory.
pub const SUMMARY: &str = "summary.json";

/// One scored point: a candidate (with its id) or a reference (with its name).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub objectives: Objectives,
    /// The mean of the minimized objectives (the value itself, negated when maximized, with one
    /// objective): what "best" means throughout a run.
    pub mean_minimized: f64,
}

impl Point {
    /// The mean of the objectives as they are (the closing table's "mean" column).
    pub fn mean_value(&self) -> f64 {
        let v: Vec<f64> = self.objectives.0.iter().map(|x| x.1).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }

    fn of_record(r: &EvaluationRecord) -> Option<Self> {
        Some(Self { id: Some(r.id), name: None, objectives: r.scores()?.objectives.clone(), mean_minimized: r.mean_minimized()? })
    }

    fn of_reference(r: &Reference) -> Option<Self> {
        Some(Self { id: None, name: Some(r.name.clone()), objectives: r.objectives.clone(), mean_minimized: r.mean_minimized()? })
    }
}

/// One stage of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageSummary {
    /// `params` or `dataflow`.
    pub stage: &'static str,
    pub evaluations: usize,
    pub failures: usize,
    /// Distinct genomes (data flow: distinct paths) among the evaluations: an optimizer may
    /// propose a point twice (scored once), and data-flow genomes that differ only below the
    /// indicator threshold are the same path.
    pub distinct: usize,
    /// Where the stage started: the merge method at its default parameters (parameter space),
    /// the parameter-space pick on its own layers (data flow).
    pub start: Option<Point>,
    /// The stage's pick: lowest mean minimized objective (`best.yaml`, `dataflow/best_path.json`).
    pub best: Option<Point>,
    /// Whether `best` is better than `start` (beyond rounding). `false` means the stage kept
    /// its start point.
    pub improved: Option<bool>,
}

impl StageSummary {
    pub fn is_dataflow(&self) -> bool {
        self.stage == Stage::DataFlow.name()
    }

    /// Evaluations that repeated an earlier point (see `distinct`).
    pub fn repeats(&self) -> usize {
        self.evaluations - self.distinct.min(self.evaluations)
    }

    /// Whether the stage improved on its start, in words (the closing table and the report).
    pub fn verdict(&self) -> &'static str {
        match self.improved {
            Some(true) => "improved on its start",
            Some(false) if self.is_dataflow() => "kept the start path: no path scored better than the parameter-space pick",
            Some(false) => "nothing scored better than the start point",
            None => "no start point to compare with",
        }
    }
}

/// A reference and whether the run's pick beats it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReferenceSummary {
    pub name: String,
    pub kind: String,
    pub objectives: Objectives,
    pub mean_minimized: Option<f64>,
    /// The run's pick has a lower mean minimized objective.
    pub beaten: bool,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    pub stages: Vec<StageSummary>,
    /// The stage whose pick is the run's result (`params` or `dataflow`) and its `--pick` form
    /// for `evomerge export`.
    pub pick_stage: Option<&'static str>,
    pub pick: Option<String>,
    pub references: Vec<ReferenceSummary>,
}

/// Relative margin under which a stage's best counts as its start (a data-flow start path
/// scores what the parameter-space pick scored, up to float rounding).
const SAME: f64 = 1e-9;

fn improved(best: Option<&Point>, start: Option<&Point>) -> Option<bool> {
    let (b, s) = (best?.mean_minimized, start?.mean_minimized);
    Some(b < s - SAME * s.abs().max(1.0))
}

fn stage(stage: Stage, recs: &[EvaluationRecord], start: Option<Point>) -> StageSummary {
    let best = best_by_mean(recs).and_then(Point::of_record);
    // a data-flow candidate is its path (genomes that differ below the thresholds are one path)
    let key = |r: &EvaluationRecord| match r.scores().and_then(|s| s.path.clone()) {
        Some(p) => p,
        None => r.genome.iter().map(|x| format!("{:x}", x.to_bits())).collect::<Vec<_>>().join(","),
    };
    let distinct = recs.iter().map(key).collect::<std::collections::HashSet<_>>().len();
    StageSummary {
        stage: stage.name(),
        evaluations: recs.len(),
        failures: recs.iter().filter(|r| r.failure().is_some()).count(),
        distinct,
        improved: improved(best.as_ref(), start.as_ref()),
        start,
        best,
    }
}

/// The summary of what `run_dir` holds now, with `references` (the run's own, plus any a
/// report adds).
pub fn summarize(run_dir: &RunDir, references: &[Reference]) -> RunSummary {
    let baseline = references.iter().find(|r| r.kind == "baseline").and_then(Point::of_reference);
    let params = stage(Stage::Params, &run_dir.evaluations(), baseline);
    let mut stages = vec![];
    let dfs = run_dir.dataflow_evaluations();
    let df = (!dfs.is_empty()).then(|| stage(Stage::DataFlow, &dfs, params.best.clone()));
    stages.push(params);
    stages.extend(df);
    // The run's pick: the data-flow stage's when it improved on its start, else the
    // parameter-space stage's.
    let chosen = stages.iter().rev().find(|s| s.best.is_some() && (!s.is_dataflow() || s.improved == Some(true)));
    let pick_mean = chosen.and_then(|s| s.best.as_ref()).map(|b| b.mean_minimized);
    let references = references
        .iter()
        .map(|r| {
            let m = r.mean_minimized();
            ReferenceSummary {
                name: r.name.clone(),
                kind: r.kind.clone(),
                objectives: r.objectives.clone(),
                mean_minimized: m,
                beaten: matches!((pick_mean, m), (Some(p), Some(m)) if p < m),
            }
        })
        .collect();
    RunSummary {
        pick_stage: chosen.map(|s| s.stage),
        pick: chosen.map(|s| if s.is_dataflow() { "dfs:best".into() } else { "best".into() }),
        stages,
        references,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(m: f64) -> Point {
        Point { id: Some(0), name: None, objectives: Objectives(vec![("x".into(), m)]), mean_minimized: m }
    }

    #[test]
    fn a_stage_improves_only_beyond_rounding() {
        assert_eq!(improved(Some(&point(1.0)), Some(&point(1.0 + 1e-13))), Some(false));
        assert_eq!(improved(Some(&point(0.9)), Some(&point(1.0))), Some(true));
        assert_eq!(improved(Some(&point(-0.8)), Some(&point(-0.8))), Some(false));
        assert_eq!(improved(Some(&point(-0.81)), Some(&point(-0.8))), Some(true));
        assert_eq!(improved(None, Some(&point(1.0))), None);
    }
}
