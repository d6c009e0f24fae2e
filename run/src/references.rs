//! The reference points a searched merge must beat: every source model, and the merge method
//! at its default parameters (the genome's initial point, the "hand-set" baseline), scored by
//! the same estimators on the same items as the candidates. Written to `references.json`; a
//! finished run that is resumed reads them back.

use std::path::Path;

use evomerge_engine::io::resolve_model;
use evomerge_engine::model::LanguageModel;
use evomerge_engine::{Checkpoint, TensorSource};
use evomerge_fitness::{FitnessEstimator, TaskEstimator};

use crate::error::{Result, RunError};
use crate::records::{Objectives, Reference};
use crate::run_dir::{REFERENCES, RunDir};
use crate::setup::Setup;

/// Objective values and minimized values of the runtime's model 0, after loading `source`
/// into it (`None`: it holds the weights already).
fn score(
    estimators: &mut [TaskEstimator],
    runtime: &mut dyn LanguageModel,
    source: Option<&dyn TensorSource>,
    key: &str,
) -> Result<(Objectives, Vec<f64>)> {
    if let Some(source) = source {
        runtime.load_weights(0, source)?;
    }
    let (mut objectives, mut minimized) = (vec![], vec![]);
    for e in estimators.iter_mut() {
        let f = e.evaluate(runtime, key)?;
        for (o, v) in e.objectives().iter().zip(&f.values) {
            objectives.push((o.name.clone(), *v));
            minimized.push(o.direction.to_minimized(*v));
        }
    }
    Ok((Objectives(objectives), minimized))
}

/// The run's references: read from `references.json`, else scored with the setup's runtime
/// and estimators and written there.
pub fn references(s: &mut Setup, run_dir: &RunDir) -> Result<Vec<Reference>> {
    let path = run_dir.file(REFERENCES);
    if let Some(v) = std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<Vec<Reference>>(&t).ok()) {
        return Ok(v);
    }
    let exp = &s.exp;
    let mut refs = vec![];
    for m in exp.sources() {
        let ck = Checkpoint::open(&resolve_model(m, None)?, m.clone())?;
        let (objectives, minimized) = score(&mut s.estimators, s.runtime.as_mut(), Some(&ck), &format!("source:{m}"))?;
        let name = Path::new(m).file_name().map_or(m.clone(), |n| n.to_string_lossy().to_string());
        refs.push(Reference { name, kind: "source".into(), model: Some(m.clone()), objectives, minimized });
    }
    let plan = s.layout.plan(&s.layout.initial(), &s.opened, exp.seed)?;
    s.materializer.materialize(&plan, s.runtime.as_mut(), 0)?;
    let (objectives, minimized) = score(&mut s.estimators, s.runtime.as_mut(), None, "baseline:initial")?;
    refs.push(Reference { name: format!("{} at the start point", exp.merge.method), kind: "baseline".into(), model: None, objectives, minimized });
    let text = serde_json::to_string_pretty(&refs).map_err(|e| RunError::bad_file(&path, e))?;
    run_dir.write(REFERENCES, &text)?;
    Ok(refs)
}
