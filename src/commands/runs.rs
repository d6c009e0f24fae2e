//! `evomerge status RUN_DIR` and `evomerge export RUN_DIR`: read a run directory (also while
//! the run is live: only complete lines of `evaluations.jsonl` are read).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use evomerge_engine::executor::{self, MergeOptions};
use evomerge_engine::recipe::MergePlan;
use evomerge_search::pareto::nondominated_ranks;
use serde_json::{Value, json};

use crate::experiment::Experiment;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A run directory written by `evomerge search`.
    pub run_dir: PathBuf,
    /// Rows of the table (best candidates, or the Pareto front).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge export runs/try1 --pick best --out merged/\n  \
evomerge export runs/try1 --pick 17 --out cand17/ --dtype bfloat16\n  evomerge export runs/pareto --pick front:0 --out f0/")]
pub struct ExportArgs {
    /// A run directory written by `evomerge search`.
    pub run_dir: PathBuf,
    /// `best`, a candidate id, or `front:K` (K-th member of the Pareto front, by first objective).
    #[arg(long, default_value = "best")]
    pub pick: String,
    /// Output checkpoint directory (created atomically).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Output dtype (float32, bfloat16, float16); default: the base model's.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
}

/// The scored and failed records of a run, in file order.
pub fn read_records(run_dir: &Path) -> Result<(Experiment, Vec<Value>)> {
    let exp = Experiment::from_run_dir(run_dir)?;
    let evals = std::fs::read_to_string(run_dir.join("evaluations.jsonl")).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    let recs = evals
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| seen.insert(v["id"].as_u64()))
        .collect();
    Ok((exp, recs))
}

fn minimized(v: &Value) -> Option<Vec<f64>> {
    if !v["failure"].is_null() {
        return None;
    }
    v["minimized"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect())
}

/// Scored records ordered best first (one objective) or the Pareto front (several).
fn ranked(recs: &[Value]) -> Vec<&Value> {
    let scored: Vec<&Value> = recs.iter().filter(|r| minimized(r).is_some()).collect();
    let points: Vec<Vec<f64>> = scored.iter().filter_map(|r| minimized(r)).collect();
    let mut out: Vec<(&Value, Vec<f64>)> = if points.first().is_some_and(|p| p.len() > 1) {
        let ranks = nondominated_ranks(&points);
        scored.into_iter().zip(points).zip(ranks).filter(|(_, r)| *r == 0).map(|(x, _)| x).collect()
    } else {
        scored.into_iter().zip(points).collect()
    };
    out.sort_by(|a, b| a.1[0].total_cmp(&b.1[0]));
    out.into_iter().map(|(r, _)| r).collect()
}

pub fn status(args: StatusArgs) -> Result<()> {
    let (exp, recs) = read_records(&args.run_dir)?;
    let failures = recs.iter().filter(|r| !r["failure"].is_null()).count();
    let seconds: f64 = recs.iter().filter_map(|r| r["seconds"].as_f64()).sum();
    let per_hour = if seconds > 0.0 { recs.len() as f64 / seconds * 3600.0 } else { 0.0 };
    let top: Vec<&Value> = ranked(&recs).into_iter().take(args.top).collect();
    let multi = exp.objectives.len() > 1;
    if args.json {
        println!(
            "{}",
            json!({"name": exp.name, "evaluations": recs.len(), "failures": failures, "candidates_per_hour": per_hour,
                   "budget": exp.budget, "pareto": multi, "top": top})
        );
        return Ok(());
    }
    println!(
        "{}: {} evaluations ({} failed), {:.0} candidates/hour of evaluation time; budget {}",
        exp.name,
        recs.len(),
        failures,
        per_hour,
        exp.budget.max_evaluations.map_or("unbounded".into(), |m| format!("{m} evaluations"))
    );
    println!("{}", if multi { "Pareto front:" } else { "best candidates:" });
    let names: Vec<String> = top.first().and_then(|r| r["objectives"].as_object()).map(|o| o.keys().cloned().collect()).unwrap_or_default();
    print!("{:>6} {:>5}", "id", "gen");
    for n in &names {
        print!(" {n:>24}");
    }
    println!(" {:>7}", "items");
    for r in top {
        print!("{:>6} {:>5}", r["id"].to_string(), r["generation"].to_string());
        for n in &names {
            print!(" {:>24.6}", r["objectives"][n].as_f64().unwrap_or(f64::NAN));
        }
        println!(" {:>7}", r["items"].to_string());
    }
    Ok(())
}

pub fn export(args: ExportArgs) -> Result<()> {
    let (exp, recs) = read_records(&args.run_dir)?;
    let ranked = ranked(&recs);
    let pick = match args.pick.as_str() {
        "best" => ranked.first().copied().context("no scored candidate in the run yet")?,
        p if p.starts_with("front:") => {
            let k: usize = p[6..].parse().with_context(|| format!("'{p}': expected front:K"))?;
            ranked.get(k).copied().with_context(|| format!("the front has {} members", ranked.len()))?
        }
        id => {
            let id: u64 = id.parse().with_context(|| format!("--pick '{id}': expected best, front:K or a candidate id"))?;
            recs.iter().find(|r| r["id"].as_u64() == Some(id)).with_context(|| format!("no candidate {id} in the run"))?
        }
    };
    if let Some(f) = pick["failure"].as_str() {
        bail!("candidate {} failed ({f}); pick another", pick["id"]);
    }
    let genome: Vec<f64> = pick["genome"].as_array().context("record without genome")?.iter().filter_map(Value::as_f64).collect();
    let (_, layout) = exp.layout()?;
    let mut recipe = layout.decode(&genome)?;
    recipe.out_dtype = args.dtype.clone();
    let yaml = serde_norway::to_string(&recipe)?;
    let plan = MergePlan::build(&recipe, yaml, None, exp.seed)?;
    let opts = MergeOptions { overwrite: args.force, ..Default::default() };
    executor::execute(&plan, &args.out, &opts, &mut |_| {})?;
    // The card gets the search result: run, candidate, scores with their estimators.
    let card = args.out.join("README.md");
    let mut text = std::fs::read_to_string(&card).unwrap_or_default();
    text.push_str(&format!(
        "\n## Search result\n\nCandidate {} (generation {}) of run `{}` ({} optimizer, {} evaluations in the run).\n\n",
        pick["id"],
        pick["generation"],
        exp.name,
        serde_json::to_value(exp.optimizer.kind)?.as_str().unwrap_or("?"),
        recs.len()
    ));
    text.push_str("| objective | value | std. error | estimator | items scored |\n|---|---|---|---|---|\n");
    let ses = pick["std_errors"].as_array().cloned().unwrap_or_default();
    for (i, (name, v)) in pick["objectives"].as_object().into_iter().flatten().enumerate() {
        let est = exp.objectives.get(i).map(|o| serde_json::to_string(&o.estimator).unwrap_or_default()).unwrap_or_default();
        let se = ses.get(i).and_then(Value::as_f64).filter(|x| x.is_finite()).map_or("-".into(), |x| format!("{x:.6}"));
        text.push_str(&format!("| {name} | {:.6} | {se} | `{est}` | {} |\n", v.as_f64().unwrap_or(f64::NAN), pick["items"]));
    }
    std::fs::write(&card, text).with_context(|| format!("writing {}", card.display()))?;
    println!("exported candidate {} to {}", pick["id"], args.out.display());
    Ok(())
}
