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
    /// `best` (lowest mean of the minimized objectives: the single objective's best, or the
    /// front member the run's summary names), a candidate id, or `front:K` (K-th member of the
    /// Pareto front, by first objective); `dfs:best` or `dfs:ID` for a data-flow candidate.
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
    Ok((Experiment::from_run_dir(run_dir)?, read_evaluations(run_dir)))
}

/// The records of `dir/evaluations.jsonl` (a run directory or its `dataflow/` stage), in file
/// order, one per candidate id; a line cut by a crash is skipped. Empty when there is no file.
pub fn read_evaluations(dir: &Path) -> Vec<Value> {
    let evals = std::fs::read_to_string(dir.join("evaluations.jsonl")).unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    evals.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| seen.insert(v["id"].as_u64())).collect()
}

/// A record's minimized objective values (`None` for a failure).
pub fn minimized(v: &Value) -> Option<Vec<f64>> {
    if !v["failure"].is_null() {
        return None;
    }
    v["minimized"].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect())
}

/// Scored records ordered best first (one objective) or the Pareto front (several), sorted by
/// the first minimized objective.
pub fn ranked(recs: &[Value]) -> Vec<&Value> {
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

/// Candidates per hour of wall time: from the run's last generation event in `log.jsonl` (the
/// runner's clock, across sessions; right when candidates are scored several at a time), else
/// from the records' own seconds.
fn throughput(run_dir: &Path, recs: &[Value]) -> f64 {
    let last = std::fs::read_to_string(run_dir.join("log.jsonl")).ok().and_then(|t| {
        t.lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "generation")
            .find_map(|v| Some((v["evaluations"].as_f64()?, v["seconds"].as_f64()?)))
    });
    let (n, seconds) = match last {
        Some((n, s)) if s > 0.0 => (n, s),
        _ => (recs.len() as f64, recs.iter().filter_map(|r| r["seconds"].as_f64()).sum()),
    };
    if seconds > 0.0 { n / seconds * 3600.0 } else { 0.0 }
}

pub fn status(args: StatusArgs) -> Result<()> {
    let (exp, recs) = read_records(&args.run_dir)?;
    let failures = recs.iter().filter(|r| !r["failure"].is_null()).count();
    let per_hour = throughput(&args.run_dir, &recs);
    let top: Vec<&Value> = ranked(&recs).into_iter().take(args.top).collect();
    let multi = exp.objectives.len() > 1;
    let calibration = crate::commands::search::calibration_progress(&args.run_dir, &exp);
    if args.json {
        println!(
            "{}",
            json!({"name": exp.name, "evaluations": recs.len(), "failures": failures, "candidates_per_hour": per_hour,
                   "budget": exp.budget, "pareto": multi, "top": top,
                   "calibration": calibration.map(|(rows, of)| json!({"rows": rows, "of": of})),
                   "references": crate::commands::search::read_references(&args.run_dir)})
        );
        return Ok(());
    }
    println!(
        "{}: {} evaluations ({} failed), {:.0} candidates/hour; budget {}",
        exp.name,
        recs.len(),
        failures,
        per_hour,
        exp.budget.max_evaluations.map_or("unbounded".into(), |m| format!("{m} evaluations"))
    );
    if let Some((rows, of)) = calibration {
        println!("calibration (anchor / IRT estimators): {rows} of {of} rows scored");
    }
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
    let dfs = read_evaluations(&args.run_dir.join(crate::commands::search::DATAFLOW_DIR));
    if let Some(b) = crate::commands::search::best_by_mean(&dfs) {
        println!("data-flow stage: {} evaluations; best candidate {} (lowest mean minimized objective):", dfs.len(), b["id"]);
        print!("{:>12}", b["id"].to_string());
        for n in &names {
            print!(" {:>24.6}", b["objectives"][n].as_f64().unwrap_or(f64::NAN));
        }
        println!("\n  path: {}", b["path"].as_str().unwrap_or("?"));
    }
    let refs = crate::commands::search::read_references(&args.run_dir);
    if !refs.is_empty() {
        println!("references (same items):");
        let width = refs.iter().filter_map(|r| r["name"].as_str()).map(str::len).max().unwrap_or(12).max(12);
        for r in &refs {
            print!("{:<width$}", r["name"].as_str().unwrap_or("?"));
            for n in &names {
                print!(" {:>24.6}", r["objectives"][n].as_f64().unwrap_or(f64::NAN));
            }
            println!();
        }
    }
    Ok(())
}

pub fn export(args: ExportArgs) -> Result<()> {
    if let Some(p) = args.pick.strip_prefix("dfs:") {
        return export_dataflow(&args, p);
    }
    let (exp, recs) = read_records(&args.run_dir)?;
    let ranked = ranked(&recs);
    let pick = match args.pick.as_str() {
        // The candidate the run's summary and its data-flow stage call best: lowest mean
        // minimized objective (with several objectives, front:0 is only the first one's best).
        "best" => super::search::best_by_mean(&recs).context("no scored candidate in the run yet")?,
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

/// The passthrough recipe that writes a data-flow path as an ordinary checkpoint: one slice
/// per hop (`paths[model]`, layer range `[l, l+1]`). Hop scales are folded into the weights:
/// the hidden state entering hop k is the stored state times `C_k` (the product of the scales
/// so far), and since RMSNorm ignores the scale of its input (up to its ε), only the residual
/// branches see it: `o_proj` and `down_proj` of hop k are multiplied by `1 / C_k`. The final
/// norm removes `C_K` as well, so logits agree up to the norms' ε.
pub fn dataflow_recipe(path: &evomerge_engine::model::LayerPath, paths: &[String], dtype: &str) -> String {
    let mut y = format!("merge_method: passthrough\ndtype: {dtype}\nslices:\n");
    let mut c = 1.0f64;
    for h in &path.hops {
        c *= f64::from(h.scale);
        let inv = 1.0 / c;
        y.push_str(&format!(
            "  - sources:\n      - model: {}\n        layer_range: [{}, {}]\n        parameters:\n          scale:\n            - filter: o_proj\n              value: {inv}\n            - filter: down_proj\n              value: {inv}\n            - value: 1.0\n",
            serde_json::to_string(&paths[h.model]).unwrap_or_default(),
            h.layer,
            h.layer + 1
        ));
    }
    y
}

fn export_dataflow(args: &ExportArgs, pick: &str) -> Result<()> {
    let exp = Experiment::from_run_dir(&args.run_dir)?;
    let df = exp.dataflow.clone().context("this run has no data-flow stage")?;
    let recs = read_evaluations(&args.run_dir.join(crate::commands::search::DATAFLOW_DIR));
    let rec = match pick {
        "best" => crate::commands::search::best_by_mean(&recs).context("no scored data-flow candidate yet")?,
        id => {
            let id: u64 = id.parse().with_context(|| format!("--pick dfs:{id}: expected dfs:best or dfs:ID"))?;
            recs.iter().find(|r| r["id"].as_u64() == Some(id)).with_context(|| format!("no data-flow candidate {id}"))?
        }
    };
    if let Some(f) = rec["failure"].as_str() {
        bail!("data-flow candidate {} failed ({f}); pick another", rec["id"]);
    }
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let dtype = args.dtype.clone().unwrap_or_else(|| "float32".into());
    // The best parameter-space merge, when the path uses it, is written next to the output
    // first (the passthrough recipe reads checkpoints from disk) and removed afterwards.
    // Plain characters only: the name becomes a model reference in a recipe (`+` means LoRA there).
    let name: String = args
        .out
        .file_name()
        .map_or("export".into(), |n| n.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect());
    let tmp = args.out.with_file_name(format!(".{name}.parameter-space-merge"));
    let mut paths = vec![];
    let mut ps_yaml = None;
    for m in &df.models {
        if m == crate::commands::search::BEST {
            let (genome, best) = crate::commands::search::best_params_candidate(&args.run_dir)?;
            let (_, layout) = exp.layout()?;
            let mut recipe = layout.decode(&genome)?;
            recipe.out_dtype = Some("float32".into());
            let yaml = serde_norway::to_string(&recipe)?;
            let plan = MergePlan::build(&recipe, yaml.clone(), None, exp.seed)?;
            let _ = std::fs::remove_dir_all(&tmp);
            executor::execute(&plan, &tmp, &MergeOptions::default(), &mut |_| {})?;
            ps_yaml = Some((best["id"].clone(), yaml));
            paths.push(tmp.display().to_string());
        } else {
            paths.push(evomerge_engine::io::resolve_model(m, None)?.display().to_string());
        }
    }
    let result = (|| -> Result<String> {
        let layers: Vec<usize> = paths
            .iter()
            .map(|p| evomerge_engine::io::ModelConfig::from_dir(Path::new(p)).map(|c| c.num_hidden_layers))
            .collect::<Result<_, _>>()?;
        let layout = evomerge_engine::dataflow::DataFlowLayout::new(&layers, &df.genome)?;
        let genome: Vec<f64> = rec["genome"].as_array().context("record without genome")?.iter().filter_map(Value::as_f64).collect();
        let path = layout.decode(&genome)?;
        let yaml = dataflow_recipe(&path, &paths, &dtype);
        let recipe = evomerge_engine::recipe::Recipe::parse(&yaml, "data-flow export")?;
        let plan = MergePlan::build(&recipe, yaml.clone(), None, exp.seed)?;
        let opts = MergeOptions { overwrite: args.force, ..Default::default() };
        executor::execute(&plan, &args.out, &opts, &mut |_| {})?;
        Ok(evomerge_engine::dataflow::describe(&path))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let described = result?;
    let card = args.out.join("README.md");
    let mut text = std::fs::read_to_string(&card).unwrap_or_default();
    text.push_str(&format!(
        "\n## Data-flow search result\n\nCandidate {} of the data-flow stage of run `{}`. Its layers are the hops of the path \
         (a layer that repeats is duplicated):\n\n`{described}`\n\n(`mK:L×s`: layer L of model K, hidden state scaled by s on entry.) \
         Models: {}.\n\nHop scales are folded into `o_proj` and `down_proj` (divided by the running product of scales); \
         this is exact up to the RMSNorm ε, because the norms remove the scale of their input.\n",
        rec["id"],
        exp.name,
        df.models.iter().enumerate().map(|(i, m)| format!("{i} = `{m}`")).collect::<Vec<_>>().join(", ")
    ));
    if let Some((id, yaml)) = ps_yaml {
        text.push_str(&format!(
            "\nModel `best` is parameter-space candidate {id}, which mergekit can reproduce with:\n\n```yaml\n{yaml}```\n\n\
             The passthrough recipe above reads it from a temporary directory that the export removed.\n"
        ));
    }
    text.push_str("\n| objective | value |\n|---|---|\n");
    for (n, v) in rec["objectives"].as_object().into_iter().flatten() {
        text.push_str(&format!("| {n} | {:.6} |\n", v.as_f64().unwrap_or(f64::NAN)));
    }
    std::fs::write(&card, text).with_context(|| format!("writing {}", card.display()))?;
    println!("exported data-flow candidate {} to {} ({} layers: {described})", rec["id"], args.out.display(), described.split(' ').count());
    Ok(())
}
