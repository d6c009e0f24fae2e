//! `evomerge search` / `evomerge resume` end to end on the fixture models: the run directory,
//! a best recipe that reproduces its score, and kill -9 at arbitrary moments + resume giving the
//! same evaluations as an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, run_env, run_ok};

/// `experiments/search-tiny.toml` with absolute paths and a budget of `evaluations`.
fn experiment(dir: &Path, evaluations: u64) -> PathBuf {
    crate::common::tiny_experiment(dir, evaluations)
}

/// Valid records by candidate id, without timings.
fn records(run: &Path) -> BTreeMap<u64, Value> {
    let text = std::fs::read_to_string(run.join("evaluations.jsonl")).expect("evaluations");
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|mut v| {
            let o = v.as_object_mut().expect("object");
            o.remove("seconds");
            o.remove("materialize_seconds");
            (v["id"].as_u64().expect("id"), v)
        })
        .collect()
}

#[test]
fn search_writes_the_run_directory_and_the_best_recipe_reproduces_its_score() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    let exp = experiment(tmp.path(), 8);
    let stdout = run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()]);
    for f in ["config.resolved.toml", "config.sha256", "checkpoint.json", "evaluations.jsonl", "best.yaml", "log.jsonl"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // Not a terminal: progress is JSON lines on stdout, one per generation, then "finished".
    let events: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "generation").count(), 2, "8 evaluations of 4");
    assert!(events.iter().any(|e| e["event"] == "finished"));
    // The references (both sources, the base, the default-parameter merge) after the stage.
    let refs = &events.iter().find(|e| e["event"] == "references").expect("references")["references"];
    assert_eq!(refs.as_array().map(Vec::len), Some(4), "{refs}");
    assert!(run.join("references.json").is_file());
    // generation events carry the pick's objectives by name, in their own units
    assert!(
        events
            .iter()
            .any(|e| e["mean_minimized"].is_number() && e["candidates_per_hour"].is_number() && e["best"]["text_ppl/perplexity"].is_number())
    );
    let recs = records(&run);
    assert_eq!(recs.len(), 8);
    let best = recs.values().map(|r| r["objectives"]["text_ppl/perplexity"].as_f64().expect("ppl")).fold(f64::INFINITY, f64::min);
    // The last line is the run's summary (issue 24: piped output had none), also summary.json.
    let summary = events.last().expect("events");
    assert_eq!(summary["event"], "summary", "{summary}");
    assert_eq!(summary["references"].as_array().map(Vec::len), Some(4), "{summary}");
    let stage = &summary["stages"][0];
    assert_eq!((stage["stage"].as_str(), stage["evaluations"].as_u64()), (Some("params"), Some(8)), "{summary}");
    assert_eq!(stage["best"]["objectives"]["text_ppl/perplexity"].as_f64(), Some(best), "{summary}");
    assert!(stage["start"]["name"].as_str().is_some_and(|n| n.contains("start point")), "{summary}");
    let start = stage["start"]["mean_minimized"].as_f64().expect("start");
    assert_eq!(stage["improved"].as_bool(), Some(best < start * (1.0 - 1e-9)), "{summary}");
    assert_eq!(summary["pick"], "best");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary.json")).expect("json");
    assert_eq!(file["stages"], summary["stages"]);
    // Candidate 0 is CMA-ES's start point, the method at default parameters: it scores as the
    // baseline reference, so the run cannot end worse than where it started (issue 24).
    let baseline = refs.as_array().expect("refs").iter().find(|r| r["kind"] == "baseline").expect("baseline")["objectives"]["text_ppl/perplexity"]
        .as_f64()
        .expect("ppl");
    let first = recs[&0]["objectives"]["text_ppl/perplexity"].as_f64().expect("ppl");
    assert!((first - baseline).abs() <= 1e-9 * baseline && best <= baseline, "candidate 0: {first}, baseline {baseline}, best {best}");
    // Export: the recipe merges with `evomerge merge`, and the merged model scores the same.
    let out = tmp.path().join("best-model");
    run_ok(&["merge", &run.join("best.yaml").display().to_string(), "--out", &out.display().to_string()]);
    let task = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tasks/text-ppl.toml");
    let v: Value = serde_json::from_str(&run_ok(&["eval", "--model", &out.display().to_string(), "--task", &task.display().to_string(), "--json"]))
        .expect("json");
    let got = v["value"].as_f64().expect("value");
    assert!((got - best).abs() <= 1e-9 * best, "exported model: {got} vs recorded {best}");
    // A second search into the same directory is refused.
    let (code, _, err) = crate::common::run(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("evomerge resume"));
}

#[test]
fn kill_and_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 16);
    let full = tmp.path().join("full");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &full.display().to_string()]);
    let want = records(&full);
    assert_eq!(want.len(), 16);
    for (k, kill_after) in [3usize, 6, 9].into_iter().enumerate() {
        let run = tmp.path().join(format!("killed{k}"));
        search_killed_after(&exp, &run, &run, kill_after);
        run_ok(&["resume", &run.display().to_string()]);
        let got = records(&run);
        assert_eq!(got.len(), want.len(), "kill after {kill_after}: evaluation count");
        for (id, w) in &want {
            assert_eq!(&got[id], w, "kill after {kill_after}: candidate {id} differs");
        }
    }
}

/// Issue 23, defect 4: a last line cut after its candidate was told (the file cut by hand, or
/// by a crash of the machine that lost unsynced data) is scored again by `resume`, not lost.
#[test]
fn resume_scores_again_a_told_candidate_whose_line_was_cut() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 8);
    let run = tmp.path().join("run");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()]);
    let want = records(&run);
    let path = run.join("evaluations.jsonl");
    let text = std::fs::read_to_string(&path).expect("read");
    let last = text.trim_end().rfind('\n').map_or(0, |i| i + 1);
    let cut = last + text[last..].find("\"objectives\"").expect("objectives");
    std::fs::write(&path, &text[..cut]).expect("cut the last line");
    let (code, _, err) = run_env(&["resume", &run.display().to_string()], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("told to the optimizer but its record was cut"), "{err}");
    assert_eq!(records(&run), want);
    assert!(std::fs::read_to_string(&path).expect("read").lines().all(|l| serde_json::from_str::<Value>(l).is_ok()));
}

fn records_len(run: &Path) -> usize {
    std::fs::read_to_string(run.join("evaluations.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

/// Starts `search EXP --run-dir RUN` and kills it (SIGKILL: no handler runs) once `watch`
/// holds `n` evaluation lines (or the search ended, or two minutes passed).
fn search_killed_after(exp: &Path, run: &Path, watch: &Path, n: usize) {
    killed_when(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()], || records_len(watch) >= n);
}

/// Runs `evomerge ARGS` and kills it (SIGKILL) once `ready()` holds (or it ended, or two
/// minutes passed).
fn killed_when(args: &[&str], ready: impl Fn() -> bool) {
    let mut child = Command::new(bin()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let t0 = Instant::now();
    while !ready() && t0.elapsed() < Duration::from_secs(120) {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().ok();
    child.wait().expect("reap");
}

#[test]
fn nsga2_finds_a_front_that_status_lists_and_export_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 12);
    let tasks = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tasks");
    // A second objective (before [optimizer], so that it is not read as part of a later table).
    let second = format!("[[objectives]]\ntask = \"{}\"\n\n[optimizer]", tasks.join("arc-question-ppl.toml").display());
    let text = std::fs::read_to_string(&exp).expect("read").replace("kind = \"cmaes\"", "kind = \"nsga2\"").replace("[optimizer]", &second);
    std::fs::write(&exp, text).expect("write");
    let run = tmp.path().join("run");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()]);
    assert_eq!(records(&run).len(), 12);
    // With seed_sources, the first population holds each source model as a genome (its weights
    // at 1, the other's at 0; densities at their start), next to the start point; not without.
    let first_weights = |run: &Path| -> Vec<Vec<f64>> {
        records(run)
            .values()
            .filter(|r| r["generation"] == 0)
            .map(|r| {
                let g: Vec<f64> = r["genome"].as_array().expect("genome").iter().map(|x| x.as_f64().expect("f")).collect();
                g[..g.len() / 2].to_vec() // weight genes (both models), then density genes
            })
            .collect()
    };
    assert!(first_weights(&run).iter().all(|w| w.iter().any(|&x| x != 0.0 && x != 1.0)), "no source genome by default");
    let seeded = tmp.path().join("seeded.toml");
    std::fs::write(&seeded, std::fs::read_to_string(&exp).expect("read").replace("kind = \"nsga2\"", "kind = \"nsga2\"\nseed_sources = true"))
        .expect("write");
    let run2 = tmp.path().join("run-seeded");
    run_ok(&["search", &seeded.display().to_string(), "--run-dir", &run2.display().to_string()]);
    let weights = first_weights(&run2);
    let groups = weights[0].len() / 2;
    for m in 0..2 {
        let source: Vec<f64> = (0..2 * groups).map(|i| if i / groups == m { 1.0 } else { 0.0 }).collect();
        assert!(weights.contains(&source), "source {m} ({source:?}) not in the first population {weights:?}");
    }
    let st: Value = serde_json::from_str(&run_ok(&["status", &run.display().to_string(), "--json"])).expect("json");
    assert_eq!(st["pareto"], true);
    let front = st["top"].as_array().expect("front");
    assert!(!front.is_empty());
    // No front member dominates another, and none is listed twice (issue 24).
    let pts: Vec<Vec<f64>> = front.iter().map(|r| r["minimized"].as_array().expect("m").iter().map(|x| x.as_f64().expect("f")).collect()).collect();
    for (i, a) in pts.iter().enumerate() {
        for (j, b) in pts.iter().enumerate() {
            assert!(!(a[0] <= b[0] && a[1] <= b[1] && (a[0] < b[0] || a[1] < b[1])), "{a:?} dominates {b:?}");
            assert!(i == j || a != b, "{a:?} twice on the front");
        }
    }
    // the front is in the run directory too, as front.json
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(run.join("front.json")).expect("front.json")).expect("json");
    let ids = |v: &Value| v.as_array().expect("array").iter().map(|r| r["id"].as_u64().expect("id")).collect::<Vec<_>>();
    assert_eq!(ids(&saved)[..front.len()], ids(&st["top"])[..], "status --json's front is front.json's (status shows --top of it)");
    let out = tmp.path().join("front0");
    // a --pick that is none of the forms lists them all (issue 24: it showed a parse error and
    // left out the dfs: forms)
    for bad in ["front:x", "nonsense"] {
        let (code, _, err) = crate::common::run(&["export", &run.display().to_string(), "--pick", bad, "--out", &out.display().to_string()]);
        assert_eq!(code, Some(2));
        assert!(err.contains("front:K") && err.contains("dfs:best") && !err.contains("invalid digit"), "{err}");
    }
    run_ok(&["export", &run.display().to_string(), "--pick", "front:0", "--out", &out.display().to_string()]);
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    // best.yaml with two objectives: the balanced pick, the recipe `export --pick best` writes
    let balanced = tmp.path().join("balanced");
    run_ok(&["export", &run.display().to_string(), "--pick", "best", "--out", &balanced.display().to_string()]);
    let best_yaml = std::fs::read_to_string(run.join("best.yaml")).expect("best.yaml for a two-objective run");
    assert_eq!(best_yaml, std::fs::read_to_string(balanced.join("mergekit_config.yml")).expect("recipe"));
    assert!(card.contains("text_ppl/perplexity") && card.contains("arc_question_ppl/perplexity"), "{card}");
    // `best` with several objectives: the lowest mean minimized objective, the candidate the
    // summary and the data-flow stage call best — not front:0 (the first objective's best).
    // The recorded objectives are rewritten so that the two differ: candidate 1 is best on the
    // first objective only, candidate 2 best on the mean, the others dominated by 2.
    let path = run.join("evaluations.jsonl");
    let text = std::fs::read_to_string(&path).expect("evaluations");
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("record");
            v["minimized"] = match v["id"].as_u64() {
                Some(1) => serde_json::json!([0.0, 10.0]),
                Some(2) => serde_json::json!([1.0, 1.0]),
                _ => serde_json::json!([5.0, 5.0]),
            };
            v.to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").expect("rewrite");
    let export = |pick: &str| {
        run_ok(&[
            "export",
            &run.display().to_string(),
            "--pick",
            pick,
            "--out",
            &tmp.path().join(format!("x-{}", pick.replace(':', ""))).display().to_string(),
        ])
    };
    assert!(export("front:0").contains("exported candidate 1 "));
    let msg = export("best");
    assert!(msg.contains("exported candidate 2 "), "{msg}");
}

#[test]
fn resume_refuses_a_changed_config_unless_forced() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 4);
    let run = tmp.path().join("run");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string()]);
    let cfg = run.join("config.resolved.toml");
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    std::fs::write(&cfg, text.replace("max_evaluations = 4", "max_evaluations = 8")).expect("edit");
    let (code, _, err) = crate::common::run(&["resume", &run.display().to_string()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("changed since the run started"));
    run_ok(&["resume", &run.display().to_string(), "--force"]);
    assert_eq!(records(&run).len(), 8, "the larger budget was used");
}

#[test]
fn bad_experiments_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let good = std::fs::read_to_string(experiment(tmp.path(), 4)).expect("read");
    let cases: [(&str, &str, &[&str]); 4] = [
        ("layers_per_group", "layers_per_grup", &["layers_per_grup"]),
        ("method = \"ties\"", "method = \"tie\"", &["unknown merge method 'tie'", "ties"]),
        ("search = [\"weight\", \"density\"]", "search = [\"weight\", \"densty\"]", &["no parameter 'densty'"]),
        ("fixed = { normalize = 1.0 }", "fixed = { normalize = 1.0 }\nbounds = { density = [0.0, 2.0] }", &["inside its range"]),
    ];
    for (from, to, needles) in cases {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, good.replace(from, to)).expect("write");
        let run = tmp.path().join("never");
        let (code, _, err) = crate::common::run(&["search", &path.display().to_string(), "--run-dir", &run.display().to_string()]);
        assert_eq!(code, Some(2), "{to}: {err}");
        for n in needles {
            assert!(err.contains(n), "{to}: '{n}' not in {err}");
        }
        assert!(!run.exists(), "{to}: a run directory was created");
    }
    // seed_sources belongs to the parameter-space optimizer; the data-flow stage starts at model A.
    let df = dataflow_experiment(tmp.path(), 4, 4);
    std::fs::write(&df, std::fs::read_to_string(&df).expect("read").replace("population = 4 }", "population = 4, seed_sources = true }"))
        .expect("write");
    let (code, _, err) = crate::common::run(&["search", &df.display().to_string(), "--dry-run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("dataflow.optimizer.seed_sources"), "{err}");
    // Not enough memory for the resident model + one candidate: refused up front, with numbers.
    let exp = experiment(tmp.path(), 4);
    let (code, _, err) = run_env(&["search", &exp.display().to_string(), "--dry-run"], &[("EVOMERGE_MEMORY_BYTES", "100000")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("GiB of memory") && err.contains("available"), "{err}");
    let dry = run_ok(&["search", &exp.display().to_string(), "--dry-run"]);
    // a tiny model's figure in MiB (issue 24: it read "about 0.00 GiB")
    assert!(dry.contains("MiB of memory") && dry.contains("nothing run") && !dry.contains("0.00 GiB"), "{dry}");
    // it names the optimizer, the budget and whether a data-flow stage follows (issue 24)
    assert!(dry.contains("parameter space: cmaes, ") && dry.contains("no data-flow stage"), "{dry}");
}

/// The tiny experiment plus a data-flow stage over the best merge and both fixture models.
fn dataflow_experiment(dir: &Path, ps: u64, dfs: u64) -> PathBuf {
    let exp = experiment(dir, ps);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let text = std::fs::read_to_string(&exp).expect("read")
        + &format!(
            "\n[dataflow]\nmodels = [\"best\", \"{}\", \"{}\"]\ngenome = {{ model_a = 0, repeats = 1, scales = \"target\" }}\n\
             optimizer = {{ kind = \"nsga2\", population = 4 }}\nbudget = {{ max_evaluations = {dfs} }}\n",
            root.join("llama-tiny-a").display(),
            root.join("llama-tiny-b").display()
        );
    std::fs::write(&exp, text).expect("write");
    exp
}

#[test]
fn dataflow_stage_runs_resumes_after_a_kill_and_exports_a_checkpoint_that_scores_the_same() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = dataflow_experiment(tmp.path(), 4, 12);
    let full = tmp.path().join("full");
    let dry = run_ok(&["search", &exp.display().to_string(), "--dry-run"]);
    assert!(dry.contains("then a data-flow stage: ") && dry.contains("over 3 models (12 layers), nsga2, 12 evaluations"), "{dry}");
    let out = run_ok(&["search", &exp.display().to_string(), "--run-dir", &full.display().to_string(), "--progress", "off"]);
    assert!(out.contains("data-flow stage") && out.contains("searched + data flow"), "{out}");
    // the closing lines say whether the stage found a better path, and how to export the pick
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).expect("summary")).expect("json");
    let dfs = &summary["stages"][1];
    assert_eq!((dfs["stage"].as_str(), dfs["evaluations"].as_u64()), (Some("dataflow"), Some(12)), "{summary}");
    let improved = dfs["improved"].as_bool().expect("improved");
    assert!(out.contains(if improved { "data-flow stage: improved on its start" } else { "data-flow stage: kept the start path" }), "{out}");
    assert_eq!(summary["pick"], if improved { "dfs:best" } else { "best" });
    assert!(out.contains(&format!("--pick {}", summary["pick"].as_str().expect("pick"))), "{out}");
    let dfs_dir = full.join("dataflow");
    for f in ["checkpoint.json", "evaluations.jsonl", "best_path.json"] {
        assert!(dfs_dir.join(f).is_file(), "dataflow/{f} missing");
    }
    let want = records(&dfs_dir);
    assert_eq!(want.len(), 12);
    assert!(want.values().all(|r| r["path"].as_str().is_some_and(|p| p.starts_with("m0:0"))), "paths start at model A's first layer");
    // Candidate 0 is the start point: model A (the best merge) itself, so it scores what the
    // best parameter-space candidate scored.
    let ps = records(&full);
    let best_ps = ps.values().map(|r| r["minimized"][0].as_f64().expect("m")).fold(f64::INFINITY, f64::min);
    assert!((want[&0]["minimized"][0].as_f64().expect("m") - best_ps).abs() <= 1e-9 * best_ps.abs(), "identity path");

    // kill -9 during the data-flow stage, then resume: same records as the uninterrupted run.
    let run = tmp.path().join("killed");
    search_killed_after(&exp, &run, &run.join("dataflow"), 5);
    run_ok(&["resume", &run.display().to_string(), "--progress", "off"]);
    assert_eq!(records(&run), records(&full), "parameter-space stage");
    assert_eq!(records(&run.join("dataflow")), want, "data-flow stage");

    // Export the best path: a plain checkpoint whose score equals the recorded one (scales
    // folded into o_proj / down_proj, exact up to RMSNorm's epsilon).
    let best = want.values().min_by(|a, b| a["minimized"][0].as_f64().expect("m").total_cmp(&b["minimized"][0].as_f64().expect("m"))).expect("best");
    let model = tmp.path().join("dfs+model"); // `+` must not reach a recipe as LoRA syntax
    let msg = run_ok(&["export", &full.display().to_string(), "--pick", "dfs:best", "--out", &model.display().to_string()]);
    assert!(msg.contains("layers"), "{msg}");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).expect("config")).expect("json");
    let hops = best["path"].as_str().expect("path").split(' ').count();
    assert_eq!(cfg["num_hidden_layers"].as_u64(), Some(hops as u64), "one layer per hop");
    let task = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tasks/text-ppl.toml");
    let v: Value = serde_json::from_str(&run_ok(&["eval", "--model", &model.display().to_string(), "--task", &task.display().to_string(), "--json"]))
        .expect("json");
    let got = v["value"].as_f64().expect("value");
    let rec = best["objectives"]["text_ppl/perplexity"].as_f64().expect("ppl");
    assert!((got - rec).abs() <= 1e-4 * rec, "exported path: {got} vs recorded {rec}");
    let card = std::fs::read_to_string(model.join("README.md")).expect("card");
    assert!(card.contains("Data-flow search result") && card.contains("RMSNorm"), "{card}");
    // The card's two steps, run as written (issue 24: the recipe named a folder the export had
    // deleted), reproduce the exported weights.
    let steps: Vec<&str> = card.lines().filter(|l| l.starts_with("evomerge merge ")).collect();
    assert_eq!(steps.len(), 2, "{card}");
    let again = tmp.path().join("reproduced");
    for step in steps {
        let step = step.replace("reproduced/", &again.display().to_string());
        let args: Vec<&str> = step.split(' ').skip(1).collect();
        run_ok(&args);
    }
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).expect("weights");
    assert!(weights(&again) == weights(&model), "the two steps do not reproduce the export");

    // status shows the stage; report writes the plots and the summary.
    let st = run_ok(&["status", &full.display().to_string()]);
    assert!(st.contains("data-flow stage: 12 evaluations") && st.contains("path: m0:0"), "{st}");
    // and so does --json (issue 24: it left the data-flow stage out)
    let st: Value = serde_json::from_str(&run_ok(&["status", &full.display().to_string(), "--json"])).expect("json");
    assert_eq!(st["dataflow"]["evaluations"], 12, "{st}");
    assert!(st["dataflow"]["best"]["path"].as_str().is_some_and(|p| p.starts_with("m0:0")), "{st}");
    run_ok(&["report", &full.display().to_string()]);
    for f in ["index.md", "objective-text_ppl_perplexity.svg", "parameters.svg", "path.svg"] {
        let p = full.join("report").join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(f.ends_with(".md") || text.starts_with("<svg"), "{f} is not an SVG");
    }
    let index = std::fs::read_to_string(full.join("report/index.md")).expect("index");
    assert!(index.contains("best data-flow candidate") && index.contains("source: llama-tiny-a"), "{index}");
    // --references adds points (e.g. hand-set merges) to the table; bad files are named.
    let extra = tmp.path().join("grid.json");
    std::fs::write(&extra, r#"[{"name": "hand-set 0.5/0.5", "kind": "grid", "objectives": {"text_ppl/perplexity": 123.25}}]"#).expect("write");
    run_ok(&["report", &full.display().to_string(), "--references", &extra.display().to_string()]);
    let index = std::fs::read_to_string(full.join("report/index.md")).expect("index");
    assert!(index.contains("| grid: hand-set 0.5/0.5 | 123.2500 |") && index.contains("source: llama-tiny-a"), "{index}");
    std::fs::write(&extra, r#"[{"name": "no objectives"}]"#).expect("write");
    let (code, _, err) = crate::common::run(&["report", &full.display().to_string(), "--references", &extra.display().to_string()]);
    assert_ne!(code, Some(0));
    assert!(err.contains("grid.json") && err.contains("entry 0"), "{err}");
}

/// Candidates merged in place (task arithmetic: elementwise) score exactly as candidates
/// merged from the memory maps (forced by a memory cap under the resident inputs' need).
#[test]
fn in_place_and_streamed_candidates_record_the_same_evaluations() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 8);
    let text = std::fs::read_to_string(&exp)
        .expect("read")
        .replace("method = \"ties\"", "method = \"task_arithmetic\"")
        .replace("search = [\"weight\", \"density\"]", "search = [\"weight\"]");
    std::fs::write(&exp, text).expect("write");
    let e = exp.display().to_string();
    // The base model in f32 is 4 bytes per parameter: the streamed path needs ≈ 8 per
    // parameter, the resident one 4 + 3·4 = 16; a cap of 10 leaves only the streamed path.
    let params =
        std::fs::metadata(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama-tiny-base/model.safetensors")).expect("size").len()
            / 4;
    let cap = (10 * params).to_string();
    let dry = run_ok(&["search", &e, "--dry-run"]);
    assert!(dry.contains("merged in place"), "{dry}");
    let capped = [("EVOMERGE_MEMORY_BYTES", cap.as_str())];
    let (code, dry, _) = run_env(&["search", &e, "--dry-run"], &capped);
    assert!(code == Some(0) && dry.contains("from the memory-mapped checkpoints"), "{dry}");

    let (a, b) = (tmp.path().join("in-place"), tmp.path().join("streamed"));
    run_ok(&["search", &e, "--run-dir", &a.display().to_string(), "--progress", "off"]);
    let (code, _, err) = run_env(&["search", &e, "--run-dir", &b.display().to_string(), "--progress", "off"], &capped);
    assert_eq!(code, Some(0), "{err}");
    let (ra, rb) = (records(&a), records(&b));
    assert_eq!(ra.len(), 8);
    assert_eq!(ra, rb, "in-place and streamed candidates scored differently");
    // the GPU path (inputs held by the runtime, merged with burn ops), here on burn-ndarray
    let c = tmp.path().join("device");
    let (code, _, err) =
        run_env(&["search", &e, "--run-dir", &c.display().to_string(), "--progress", "off", "--log", "info"], &[("EVOMERGE_DEVICE_MERGE", "1")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("merged there"), "the device path was not taken: {err}");
    assert_eq!(records(&c), ra, "candidates merged on the device scored differently");
}

/// An experiment file in `dir` with a p-IRT-estimated objective on the zoo (a 0-1 metric, 40
/// items of the add skill), random search over 3 candidates and `calibration` calibration merges.
fn irt_experiment(dir: &Path, name: &str, calibration: usize) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let zoo = root.join("datasets/zoo");
    let data = dir.join("add.jsonl");
    let lines: Vec<String> =
        std::fs::read_to_string(zoo.join("data/add-validation.jsonl")).expect("data").lines().take(40).map(String::from).collect();
    std::fs::write(&data, lines.join("\n")).expect("write data");
    let text = format!(
        "name = \"irt\"\nseed = 3\n[merge]\nmethod = \"task_arithmetic\"\nbase_model = \"{z}/base\"\nmodels = [\"{z}/expert-add\", \"{z}/expert-reverse\"]\n\
         [genome]\nsearch = [\"weight\"]\nlayers_per_group = 2\n\
         [[objectives]]\ntask = \"{t}\"\ndata = \"{d}\"\nestimator = {{ method = \"pirt\", k = 10, seed = 0 }}\n\
         [optimizer]\nkind = \"random\"\npopulation = 3\n[budget]\nmax_evaluations = 3\n[calibration]\ncandidates = {calibration}\n",
        z = zoo.display(),
        t = root.join("experiments/tasks/zoo-add.toml").display(),
        d = data.display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).expect("write experiment");
    p.display().to_string()
}

/// p-IRT rather than gp-IRT, whose λ may pick the plain subset mean and so hide the fit:
/// `[calibration]` merges are drawn from the run's seed, so two runs record the same
/// evaluations (what exact resume relies on), and they are used: without them the same
/// candidates get other estimates.
#[test]
fn calibration_merges_are_deterministic_and_feed_the_irt_fit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let write = |name: &str, calibration: usize| irt_experiment(tmp.path(), name, calibration);
    let (cal, none) = (write("cal", 3), write("none", 0));
    let dry = run_ok(&["search", &cal, "--dry-run", "--workers", "3"]);
    assert!(dry.contains("fitted on the source models and 3 random merges"), "{dry}");
    assert!(dry.contains("candidates scored 3 at a time"), "{dry}");
    let mut runs = vec![];
    for (name, exp) in [("a", &cal), ("b", &cal), ("c", &none)] {
        let run = tmp.path().join(name);
        let (code, _, err) = crate::common::run(&["search", exp, "--run-dir", &run.display().to_string(), "--progress", "off"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(err.contains("random merges, every item"), exp == &cal, "{err}");
        runs.push(records(&run));
    }
    assert_eq!(runs[0].len(), 3);
    assert_eq!(runs[0], runs[1], "the same calibrated run twice recorded different evaluations");
    let genomes = |r: &BTreeMap<u64, Value>| r.values().map(|v| v["genome"].clone()).collect::<Vec<_>>();
    assert_eq!(genomes(&runs[0]), genomes(&runs[2]), "same seed, same candidates");
    let objectives = |r: &BTreeMap<u64, Value>| r.values().map(|v| v["objectives"].clone()).collect::<Vec<_>>();
    assert_ne!(objectives(&runs[0]), objectives(&runs[2]), "calibration merges changed no estimate");
}

/// Calibration rows are kept in `RUN_DIR/calibration.jsonl` as they are scored: a search killed
/// during calibration resumes from the rows it has (a line cut by the kill is scored again),
/// records what an uninterrupted run records, and a later resume scores no row again. Rows
/// scored by three workers equal rows scored by one.
#[test]
fn calibration_survives_a_kill_and_is_not_scored_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = irt_experiment(tmp.path(), "cal", 12);
    let full = tmp.path().join("full");
    // one worker here, three in the killed run: calibration rows must not depend on it
    run_ok(&["search", &exp, "--run-dir", &full.display().to_string(), "--progress", "off", "--workers", "1"]);
    let want_cal = std::fs::read_to_string(full.join("calibration.jsonl")).expect("calibration.jsonl");
    assert_eq!(want_cal.lines().count(), 1 + 3 + 12, "a header, 3 sources and 12 merges");
    let want = records(&full);

    let run = tmp.path().join("killed");
    let cal_lines = || std::fs::read_to_string(run.join("calibration.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
    killed_when(&["search", &exp, "--run-dir", &run.display().to_string(), "--progress", "off", "--workers", "3"], || cal_lines() >= 7);
    let whole = std::fs::read_to_string(run.join("calibration.jsonl"))
        .map_or(0, |t| t.lines().skip(1).take_while(|l| serde_json::from_str::<Value>(l).is_ok()).count());
    let st = run_ok(&["status", &run.display().to_string()]);
    assert!(st.contains(&format!("calibration (anchor / IRT estimators): {} of 15 rows scored", whole.min(15))), "{st}");
    // as if the kill had cut a line in half
    let mut text = std::fs::read_to_string(run.join("calibration.jsonl")).expect("calibration.jsonl");
    text.push_str("{\"row\": 99, \"sco");
    std::fs::write(run.join("calibration.jsonl"), text).expect("write");
    let (code, _, err) = crate::common::run(&["resume", &run.display().to_string(), "--progress", "off", "--workers", "3"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("rows read from calibration.jsonl"), "{err}");
    assert_eq!(std::fs::read_to_string(run.join("calibration.jsonl")).expect("read"), want_cal, "calibration rows");
    assert_eq!(records(&run), want, "evaluations after resuming a killed calibration");
    // Resuming again reads every row and scores none.
    let (code, _, err) = crate::common::run(&["resume", &run.display().to_string(), "--progress", "off"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("15 of 15 rows read") && !err.contains("random merges, every item"), "{err}");
    let st: Value = serde_json::from_str(&run_ok(&["status", &run.display().to_string(), "--json"])).expect("json");
    assert_eq!(st["calibration"], serde_json::json!({"rows": 15, "of": 15}));
}

/// Candidates scored several at a time (one model copy per worker) are recorded exactly as one
/// at a time, in both stages; three workers on a population of four also leave a batch short.
/// `--devices cpu,cpu,cpu` is the same as `--workers 3`; a device this build cannot open is
/// refused before a run directory is made.
#[test]
fn parallel_workers_record_the_same_evaluations_as_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = dataflow_experiment(tmp.path(), 8, 8).display().to_string();
    let mut got = vec![];
    for (w, how) in [("1", "--workers"), ("3", "--workers"), ("cpu,cpu,cpu", "--devices")] {
        let run = tmp.path().join(format!("w{}", got.len()));
        let (code, out, err) = crate::common::run(&["search", &exp, "--run-dir", &run.display().to_string(), "--progress", "off", how, w]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.contains("scored 3 at a time"), w != "1", "{out}");
        got.push((records(&run), records(&run.join("dataflow"))));
    }
    assert_eq!(got[0].0.len(), 8);
    assert_eq!(got[0].1.len(), 8);
    assert_eq!(got[0], got[1], "3 workers recorded other evaluations than 1");
    assert_eq!(got[0], got[2], "--devices cpu,cpu,cpu recorded other evaluations than 1 worker");
    if !cfg!(feature = "cuda") {
        let run = tmp.path().join("cuda");
        let (code, _, err) = crate::common::run(&["search", &exp, "--run-dir", &run.display().to_string(), "--devices", "cpu,cuda:1"]);
        assert_eq!(code, Some(2));
        assert!(err.contains("built without CUDA support"), "{err}");
        assert!(!run.exists(), "nothing written");
    }
}

/// CMA-ES in data-flow space starts at model A's own path: with a small step every sampled
/// path keeps A's on/off genes, so no layer of the other models appears. (The start point was
/// once handed over in unit coordinates, which CMA-ES read as gene values: every "off" gene at
/// 0.25 > 0 switched on, and every path ran through all three models.)
#[test]
fn cmaes_dataflow_stage_starts_at_model_a() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = dataflow_experiment(tmp.path(), 4, 8);
    let text = std::fs::read_to_string(&exp).expect("read").replace(
        "optimizer = { kind = \"nsga2\", population = 4 }\nbudget",
        "optimizer = { kind = \"cmaes\", population = 4, sigma0 = 0.02 }\nbudget",
    );
    assert!(text.contains("sigma0 = 0.02"));
    std::fs::write(&exp, text).expect("write");
    let run = tmp.path().join("run");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--progress", "off"]);
    let recs = records(&run.join("dataflow"));
    assert_eq!(recs.len(), 8);
    // The first generation samples around model A (with σ₀ = 0.02 no indicator flips; later
    // generations may: the margin keeps each flip's probability ≥ 1/(nλ)).
    for r in recs.values().filter(|r| r["generation"] == 0) {
        let path = r["path"].as_str().expect("path");
        assert!(path.starts_with("m0:0") && !path.contains("m1:") && !path.contains("m2:"), "{path}");
    }
    // CMA-ES with margin asks indicators as levels (on = 1, off = −1), not thresholded reals
    let genome = |r: &Value| -> Vec<f64> { r["genome"].as_array().expect("genome").iter().map(|x| x.as_f64().expect("f")).collect() };
    let indicators = |g: &[f64]| g.iter().take_while(|x| **x == 1.0 || **x == -1.0).count();
    assert!(recs.values().all(|r| indicators(&genome(r)) >= 8), "{:?}", genome(recs.values().next().expect("a record")));
}

/// Without --run-dir a run goes to `<run_root>/<UTC minute>-<name>`, a second one started in
/// the same minute to `…-2` (issue 24: the name was epoch seconds).
#[test]
fn default_run_directories_are_named_by_the_start_time() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 4);
    let root = tmp.path().join("my-runs");
    let text: String = std::fs::read_to_string(&exp)
        .expect("read")
        .lines()
        .map(|l| if l.starts_with("run_root = ") { format!("run_root = \"{}\"\n", root.display()) } else { format!("{l}\n") })
        .collect();
    assert!(text.contains("my-runs"), "{text}");
    std::fs::write(&exp, text).expect("write");
    for _ in 0..2 {
        run_ok(&["search", &exp.display().to_string(), "--progress", "off"]);
    }
    let mut names: Vec<String> =
        std::fs::read_dir(&root).expect("runs").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    for n in &names {
        let (stamp, rest) = n.split_at(16);
        let ok = stamp.len() == 16
            && stamp.chars().enumerate().all(|(i, c)| {
                if [4, 7, 13].contains(&i) {
                    c == '-'
                } else if i == 10 {
                    c == 'T'
                } else {
                    c.is_ascii_digit()
                }
            })
            && (rest == "-search-tiny" || rest == "-search-tiny-2");
        assert!(ok, "{n}");
    }
}

/// Three objectives and no optimizer kind: `auto` runs NSGA-III (reference directions), and
/// its settings are checked before a run directory is made.
#[test]
fn three_objectives_run_nsga3_by_default_and_bad_settings_are_refused_up_front() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 8);
    let tasks = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tasks");
    let more = format!(
        "[[objectives]]\ntask = \"{0}\"\n\n[[objectives]]\ntask = \"{1}\"\nestimator = {{ method = \"random\", k = 2, seed = 1 }}\n\n[optimizer]",
        tasks.join("arc-question-ppl.toml").display(),
        tasks.join("text-ppl.toml").display()
    );
    let text = std::fs::read_to_string(&exp).expect("read").replace("kind = \"cmaes\"\n", "").replace("[optimizer]", &more);
    std::fs::write(&exp, &text).expect("write");
    let run = tmp.path().join("run");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--progress", "off"]);
    assert_eq!(records(&run).len(), 8);
    let checkpoint: Value = serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint.json")).expect("checkpoint")).expect("json");
    let state = checkpoint["optimizer"].as_str().expect("the optimizer's state");
    assert!(state.contains("\"nsga3\":true") && state.contains("\"directions\""), "NSGA-III ran");
    let st: Value = serde_json::from_str(&run_ok(&["status", &run.display().to_string(), "--json"])).expect("json");
    assert_eq!(st["pareto"], true);
    let cases: [(&str, &str, &str); 5] = [
        (
            "population = 4",
            "population = 4\npartitions = 12",
            "91 reference directions (12 partitions, 3 objectives) need a population of at least 91, not 4",
        ),
        ("population = 4", "kind = \"nsga2\"\npopulation = 4\nmargin = 0.1", "optimizer.margin = 0.1: the margin is CMA-ES's"),
        ("population = 4", "kind = \"nsga2\"\npopulation = 4\npartitions = 3", "only NSGA-III has reference directions"),
        ("population = 4", "kind = \"cmaes\"\npopulation = 4", "\"nsga3\" (three or more)"),
        ("population = 4", "kind = \"nsga4\"\npopulation = 4", "expected one of `auto`, `cmaes`, `nsga2`, `nsga3`, `random`"),
    ];
    for (from, to, needle) in cases {
        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, text.replace(from, to)).expect("write");
        let never = tmp.path().join("never");
        let (code, _, err) = crate::common::run(&["search", &bad.display().to_string(), "--run-dir", &never.display().to_string()]);
        assert_eq!(code, Some(2), "{to}: {err}");
        assert!(err.contains(needle), "{to}: '{needle}' not in {err}");
        assert!(!never.exists(), "{to}: a run directory was created");
    }
}

/// `report` on a run of one candidate and no data-flow stage draws what exists and says what
/// is missing; the summary says the stage kept its start (candidate 0 is the start point).
#[test]
fn report_on_a_one_candidate_run_draws_what_exists() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 1);
    // random search, one candidate a generation: candidate 0 is the start point
    let text = std::fs::read_to_string(&exp).expect("read").replace("kind = \"cmaes\"\npopulation = 4", "kind = \"random\"\npopulation = 1");
    std::fs::write(&exp, text).expect("write");
    let run = tmp.path().join("run");
    let out = run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--progress", "off"]);
    assert!(out.contains("parameter-space stage: nothing scored better than the start point (1 evaluations)"), "{out}");
    assert!(!out.contains("data-flow stage:"), "{out}");
    run_ok(&["report", &run.display().to_string()]);
    let index = std::fs::read_to_string(run.join("report/index.md")).expect("index");
    assert!(index.contains("No data-flow stage in this experiment") && index.contains("1 evaluations"), "{index}");
    for f in ["objective-text_ppl_perplexity.svg", "parameters.svg"] {
        let svg = std::fs::read_to_string(run.join("report").join(f)).expect(f);
        assert!(svg.starts_with("<svg") && !svg.contains(">-0<") && !svg.contains(">1.0<"), "{f}: '-0' or '1.0' tick labels");
    }
}

/// `search --runtime libtorch` (a `--features libtorch` build): the run records its runtime and
/// scores the candidates the burn run scores, to float rounding, with candidates merged on the
/// device as on a GPU. Without the feature: refused before a run directory is made, naming it.
#[test]
fn a_search_on_the_libtorch_runtime_scores_as_burn_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 4);
    let e = exp.display().to_string();
    let (burn, torch) = (tmp.path().join("burn"), tmp.path().join("torch"));
    let t = torch.display().to_string();
    let args = ["search", &e, "--run-dir", &t, "--progress", "off", "--runtime", "libtorch"];
    let (code, dry, err) = crate::common::run(&["search", &e, "--dry-run", "--runtime", "libtorch"]);
    if cfg!(feature = "libtorch") {
        assert!(code == Some(0) && dry.contains("on cpu (libtorch runtime)"), "{dry}{err}");
    } else {
        assert!(code != Some(0) && err.contains("--features libtorch"), "the dry run must refuse what the run refuses: {err}");
    }
    if !cfg!(feature = "libtorch") {
        let (code, _, err) = crate::common::run(&args);
        assert_ne!(code, Some(0));
        assert!(err.contains("--features libtorch"), "{err}");
        assert!(!torch.exists(), "a run directory was made for a run that cannot start");
        return;
    }
    run_ok(&["search", &e, "--run-dir", &burn.display().to_string(), "--progress", "off"]);
    let (code, _, err) = run_env(&args, &[("EVOMERGE_DEVICE_MERGE", "1")]);
    assert_eq!(code, Some(0), "{err}");
    let resolved = std::fs::read_to_string(torch.join("config.resolved.toml")).expect("config");
    assert!(resolved.contains("runtime = \"libtorch\""), "{resolved}");
    let (rb, rt) = (records(&burn), records(&torch));
    assert_eq!(rb.len(), 4);
    assert_eq!(rb.keys().collect::<Vec<_>>(), rt.keys().collect::<Vec<_>>());
    for (id, b) in &rb {
        let (ob, ot) = (b["minimized"].as_array().expect("minimized"), rt[id]["minimized"].as_array().expect("minimized"));
        for (x, y) in ob.iter().zip(ot) {
            let (x, y) = (x.as_f64().expect("f64"), y.as_f64().expect("f64"));
            assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "candidate {id}: burn {x} vs libtorch {y}");
        }
        assert_eq!(b["genome"], rt[id]["genome"], "candidate {id}: the search took another path");
    }
}
