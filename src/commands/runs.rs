//! `evomerge status RUN_DIR` and `evomerge export RUN_DIR`: read a run directory (also while
//! the run is live: only complete lines of `evaluations.jsonl` are read).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use evomerge_engine::executor::{self, MergeOptions};
use evomerge_engine::recipe::MergePlan;
use evomerge_run::broker;
use evomerge_run::records::LogEvent;
use evomerge_run::run_dir::BEST;
use evomerge_run::run_dir::write_atomic;
use evomerge_run::{EvaluationRecord, RunDir, best_by_mean, ranked};
use serde_json::json;

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
    /// Read the workers of a scale-out run live from its broker (default: as the coordinator
    /// last wrote them to RUN_DIR/workers.json, once per generation).
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
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

/// Candidates per hour of wall time: from the run's last generation event in `log.jsonl` (the
/// runner's clock, across sessions; right when candidates are scored several at a time), else
/// from the records' own seconds.
fn throughput(run: &RunDir, recs: &[EvaluationRecord]) -> f64 {
    let last = run.log_events().into_iter().rev().find_map(|e| match e {
        LogEvent::Generation { evaluations, seconds, .. } => Some((evaluations as f64, seconds)),
        _ => None,
    });
    let (n, seconds) = match last {
        Some((n, s)) if s > 0.0 => (n, s),
        _ => (recs.len() as f64, recs.iter().map(|r| r.seconds).filter(|s| !s.is_nan()).sum()),
    };
    if seconds > 0.0 { n / seconds * 3600.0 } else { 0.0 }
}

/// A record's objective `name`, NaN when absent.
fn value(r: &EvaluationRecord, name: &str) -> f64 {
    r.objective(name).unwrap_or(f64::NAN)
}

pub fn status(args: StatusArgs) -> Result<()> {
    let run = RunDir::new(&args.run_dir);
    let exp = run.experiment()?;
    let recs = run.evaluations();
    let failures = recs.iter().filter(|r| r.failure().is_some()).count();
    let per_hour = throughput(&run, &recs);
    // Records written before prefix sharing have no unshared count: they ran every token.
    let tokens: usize = recs.iter().filter_map(|r| r.scores()).map(|s| s.tokens).sum();
    let unshared: usize = recs.iter().filter_map(|r| r.scores()).map(|s| if s.tokens_unshared > 0 { s.tokens_unshared } else { s.tokens }).sum();
    let top: Vec<&EvaluationRecord> = ranked(&recs).into_iter().take(args.top).collect();
    let multi = exp.objectives.len() > 1;
    let calibration = run.calibration_progress(&exp);
    let refs = run.references();
    let workers = match &args.broker {
        Some(url) => {
            let mut conn = broker::Conn::open(&broker::BrokerUrl::parse(url)?)?;
            let keys = broker::Keys::new(&evomerge_run::driver::run_id(&run));
            broker::worker_statuses(&mut conn, &keys).with_context(|| format!("reading the workers of run '{}'", keys.run))?
        }
        None => broker::read_worker_statuses(run.path()),
    };
    let dfs = run.dataflow_evaluations();
    if args.json {
        let workers: Vec<_> = workers.iter().map(|w| json!({"status": w, "busy_fraction": w.busy_fraction()})).collect();
        // the data-flow stage, when the experiment has one: its evaluations and best path
        let dataflow = exp.dataflow.as_ref().map(|d| {
            json!({"evaluations": dfs.len(), "failures": dfs.iter().filter(|r| r.failure().is_some()).count(),
                   "budget": d.budget, "best": best_by_mean(&dfs)})
        });
        println!(
            "{}",
            json!({"name": exp.name, "evaluations": recs.len(), "failures": failures, "candidates_per_hour": per_hour,
                   "budget": exp.budget, "pareto": multi, "top": top,
                   "tokens": tokens, "tokens_unshared": unshared,
                   "calibration": calibration.map(|(rows, of)| json!({"rows": rows, "of": of})),
                   "dataflow": dataflow, "references": refs, "workers": workers})
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
    if unshared > tokens {
        println!("scoring: {tokens} tokens run, {:.1} % of the {unshared} without shared prefixes", 100.0 * tokens as f64 / unshared as f64);
    }
    println!("{}", if multi { "Pareto front:" } else { "best candidates:" });
    let names: Vec<String> = top.first().and_then(|r| r.scores()).map(|s| s.objectives.names().map(String::from).collect()).unwrap_or_default();
    print!("{:>6} {:>5}", "id", "gen");
    for n in &names {
        print!(" {n:>24}");
    }
    println!(" {:>7}", "items");
    for r in top {
        print!("{:>6} {:>5}", r.id, r.generation);
        for n in &names {
            print!(" {:>24.6}", value(r, n));
        }
        println!(" {:>7}", r.scores().map_or(0, |s| s.items));
    }
    if let Some(b) = best_by_mean(&dfs) {
        println!("data-flow stage: {} evaluations; best candidate {} (lowest mean minimized objective):", dfs.len(), b.id);
        print!("{:>12}", b.id);
        for n in &names {
            print!(" {:>24.6}", value(b, n));
        }
        println!("\n  path: {}", b.scores().and_then(|s| s.path.as_deref()).unwrap_or("?"));
    }
    if !refs.is_empty() {
        println!("references (same items):");
        let width = refs.iter().map(|r| r.name.len()).max().unwrap_or(12).max(12);
        for r in &refs {
            print!("{:<width$}", r.name);
            for n in &names {
                print!(" {:>24.6}", r.objectives.get(n).unwrap_or(f64::NAN));
            }
            println!();
        }
    }
    if !workers.is_empty() {
        print_workers(&workers);
    }
    Ok(())
}

/// The workers of a scale-out run: device, candidates, busy fraction, last seen.
fn print_workers(workers: &[broker::WorkerStatus]) {
    let now = broker::now();
    println!("workers:");
    println!("{:<32} {:<8} {:>10} {:>6} {:>12}  state", "name", "device", "candidates", "busy", "last seen");
    for w in workers {
        let ago = now - w.last_seen;
        let state = if !w.active {
            "left"
        } else if ago > 10.0 {
            "silent"
        } else {
            "active"
        };
        println!("{:<32} {:<8} {:>10} {:>5.0}% {:>10.0} s  {state}", w.name, w.device, w.candidates, w.busy_fraction() * 100.0, ago.max(0.0));
    }
}

/// The data-flow export's step-1 recipe (the parameter-space pick) and the folder it writes.
const PS_CONFIG: &str = "parameter_space_config.yml";
const PS_MERGE: &str = "parameter-space-merge";

/// What `--pick` takes, for its errors.
const PICKS: &str = "expected best, a candidate id, front:K (K-th member of the Pareto front), dfs:best or dfs:ID (the data-flow stage)";

pub fn export(args: ExportArgs) -> Result<()> {
    if let Some(p) = args.pick.strip_prefix("dfs:") {
        return export_dataflow(&args, p);
    }
    let run = RunDir::new(&args.run_dir);
    let (exp, recs) = (run.experiment()?, run.evaluations());
    let ranked = ranked(&recs);
    let pick = match args.pick.as_str() {
        // The candidate the run's summary and its data-flow stage call best: lowest mean
        // minimized objective (with several objectives, front:0 is only the first one's best).
        "best" => best_by_mean(&recs).context("no scored candidate in the run yet")?,
        p if p.starts_with("front:") => {
            let Ok(k) = p[6..].parse::<usize>() else { bail!("--pick '{p}': {PICKS}") };
            ranked.get(k).copied().with_context(|| format!("the front has {} members", ranked.len()))?
        }
        id => {
            let Ok(id) = id.parse::<u64>() else { bail!("--pick '{id}': {PICKS}") };
            recs.iter().find(|r| r.id == id).with_context(|| format!("no candidate {id} in the run"))?
        }
    };
    let Some(scores) = pick.scores() else {
        bail!("candidate {} failed ({}); pick another", pick.id, pick.failure().unwrap_or_default());
    };
    let (_, layout) = exp.layout()?;
    let mut recipe = layout.decode(&pick.genome)?;
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
        pick.id,
        pick.generation,
        exp.name,
        serde_json::to_value(exp.optimizer.kind_for(exp.objectives.len()))?.as_str().unwrap_or("?"),
        recs.len()
    ));
    text.push_str("| objective | value | std. error | estimator | items scored |\n|---|---|---|---|---|\n");
    for (i, (name, v)) in scores.objectives.0.iter().enumerate() {
        let est = exp.objectives.get(i).map(|o| serde_json::to_string(&o.estimator).unwrap_or_default()).unwrap_or_default();
        let se = scores.std_errors.get(i).filter(|x| x.is_finite()).map_or("-".into(), |x| format!("{x:.6}"));
        text.push_str(&format!("| {name} | {v:.6} | {se} | `{est}` | {} |\n", scores.items));
    }
    write_atomic(&card, &text)?;
    println!("exported candidate {} to {}", pick.id, args.out.display());
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
    let run = RunDir::new(&args.run_dir);
    let exp = run.experiment()?;
    let df = exp.dataflow.clone().context("this run has no data-flow stage")?;
    let recs = run.dataflow_evaluations();
    let rec = match pick {
        "best" => best_by_mean(&recs).context("no scored data-flow candidate yet")?,
        id => {
            let Ok(id) = id.parse::<u64>() else { bail!("--pick 'dfs:{id}': {PICKS}") };
            recs.iter().find(|r| r.id == id).with_context(|| format!("no data-flow candidate {id}"))?
        }
    };
    let Some(scores) = rec.scores() else {
        bail!("data-flow candidate {} failed ({}); pick another", rec.id, rec.failure().unwrap_or_default());
    };
    if args.out.exists() && !args.force {
        bail!("{} exists; pass --force to replace it", args.out.display());
    }
    let dtype = args.dtype.clone().unwrap_or_else(|| "float32".into());
    // The best parameter-space merge, when the path uses it, is written next to the output
    // first (the passthrough recipe reads checkpoints from disk) and removed afterwards. The
    // recipe the export keeps names it `parameter-space-merge`, relative (a folder beside the
    // recipe: evomerge looks there; mergekit in the current directory), which step 1 of the
    // card's two steps writes from OUT/parameter_space_config.yml. Relative, so that no `+`
    // of the output's path reaches the recipe (mergekit reads `a+b` as a LoRA).
    // Plain characters only: the name becomes a model reference in a recipe (`+` means LoRA there).
    let name: String = args
        .out
        .file_name()
        .map_or("export".into(), |n| n.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect());
    let tmp = args.out.with_file_name(format!(".{name}.parameter-space-merge"));
    let out_abs = std::path::absolute(&args.out).with_context(|| format!("{}: not a usable path", args.out.display()))?;
    let (mut paths, mut written) = (vec![], vec![]);
    let mut ps_yaml = None;
    for m in &df.models {
        if m == BEST {
            let best = run.best_params_candidate()?;
            let (_, layout) = exp.layout()?;
            let mut recipe = layout.decode(&best.genome)?;
            recipe.out_dtype = Some("float32".into());
            let yaml = serde_norway::to_string(&recipe)?;
            let plan = MergePlan::build(&recipe, yaml.clone(), None, exp.seed)?;
            let _ = std::fs::remove_dir_all(&tmp);
            executor::execute(&plan, &tmp, &MergeOptions::default(), &mut |_| {})?;
            ps_yaml = Some((best.id, yaml));
            paths.push(tmp.display().to_string());
            written.push(PS_MERGE.to_string());
        } else {
            let p = evomerge_engine::io::resolve_model(m, None)?.display().to_string();
            written.push(p.clone());
            paths.push(p);
        }
    }
    let result = (|| -> Result<String> {
        let layers: Vec<usize> =
            paths.iter().map(|p| evomerge_engine::io::ModelConfig::from_dir(Path::new(p)).map(|c| c.num_hidden_layers)).collect::<Result<_, _>>()?;
        let layout = evomerge_engine::dataflow::DataFlowLayout::new(&layers, &df.genome)?;
        let path = layout.decode(&rec.genome)?;
        let yaml = dataflow_recipe(&path, &paths, &dtype);
        let recipe = evomerge_engine::recipe::Recipe::parse(&yaml, "data-flow export")?;
        // merged from the temporary folder; the recipe written beside it names the kept name
        let plan = MergePlan::build(&recipe, dataflow_recipe(&path, &written, &dtype), None, exp.seed)?;
        let opts = MergeOptions { overwrite: args.force, ..Default::default() };
        executor::execute(&plan, &args.out, &opts, &mut |_| {})?;
        Ok(evomerge_engine::dataflow::describe(&path))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    let described = result?;
    let card = args.out.join("README.md");
    // the card names the kept folder, not the temporary one the merge read
    let mut text = std::fs::read_to_string(&card).unwrap_or_default().replace(&tmp.display().to_string(), PS_MERGE);
    if let Some(n) = tmp.file_name() {
        text = text.replace(&*n.to_string_lossy(), PS_MERGE);
    }
    text.push_str(&format!(
        "\n## Data-flow search result\n\nCandidate {} of the data-flow stage of run `{}`. Its layers are the hops of the path \
         (a layer that repeats is duplicated):\n\n`{described}`\n\n(`mK:L×s`: layer L of model K, hidden state scaled by s on entry.) \
         Models: {}.\n\nHop scales are folded into `o_proj` and `down_proj` (divided by the running product of scales); \
         this is exact up to the RMSNorm ε, because the norms remove the scale of their input.\n",
        rec.id,
        exp.name,
        df.models.iter().enumerate().map(|(i, m)| format!("{i} = `{m}`")).collect::<Vec<_>>().join(", ")
    ));
    if let Some((id, yaml)) = &ps_yaml {
        write_atomic(&args.out.join(PS_CONFIG), yaml)?;
        let o = out_abs.display();
        text.push_str(&format!(
            "\nModel `best` is parameter-space candidate {id}. The path's recipe (`mergekit_config.yml`) reads it from \
             `{PS_MERGE}` beside the recipe, which the export does not keep (it would double its size). Two steps \
             reproduce this checkpoint:\n\n```sh\nevomerge merge {o}/{PS_CONFIG} --out {o}/{PS_MERGE}\n\
             evomerge merge {o}/mergekit_config.yml --out reproduced/\n```\n\nWith mergekit, run both from this folder \
             (it reads relative paths from the current directory): `mergekit-yaml {PS_CONFIG} {PS_MERGE}`, then \
             `mergekit-yaml mergekit_config.yml ../reproduced`. Step 1's recipe (`{PS_CONFIG}`):\n\n```yaml\n{yaml}```\n"
        ));
    }
    text.push_str("\n| objective | value |\n|---|---|\n");
    for (n, v) in &scores.objectives.0 {
        text.push_str(&format!("| {n} | {v:.6} |\n"));
    }
    write_atomic(&card, &text)?;
    println!("exported data-flow candidate {} to {} ({} layers: {described})", rec.id, args.out.display(), described.split(' ').count());
    if ps_yaml.is_some() {
        println!("its recipe uses the parameter-space pick: README.md gives the two steps that reproduce it with evomerge merge or mergekit-yaml");
    }
    Ok(())
}
