//! The run driven in-process on the fixture models: a two-generation search, its records,
//! references and best recipe; an interrupted run with a line cut by a crash, resumed, giving
//! the uninterrupted run's records; and `evaluate` reproducing a recorded candidate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use evomerge_search::{Candidate, Outcome};

use crate::calibration::calibrate;
use crate::evaluate::{StageKind, evaluate};
use crate::observer::{Notice, RunObserver, Stage};
use crate::records::{EvaluationRecord, LogEvent};
use crate::{Experiment, RunDir, RunEnd, RunOptions, Setup};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `experiments/search-tiny.toml` (TIES on the fixture models, perplexity, CMA-ES with 4 per
/// generation) with absolute paths and a budget of `evaluations`.
fn experiment(dir: &Path, evaluations: u64) -> Experiment {
    let root = root();
    let text = std::fs::read_to_string(root.join("experiments/search-tiny.toml")).expect("experiment");
    let text = text
        .replace("max_evaluations = 12", &format!("max_evaluations = {evaluations}"))
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("\"tasks/", &format!("\"{}/", root.join("experiments/tasks").display()));
    let path = dir.join("experiment.toml");
    std::fs::write(&path, text).expect("write");
    Experiment::load(&path).expect("load")
}

/// Counts what the run reports, and sets `cancel` after `stop_after` outcomes.
#[derive(Default)]
struct Collect {
    generations: usize,
    told: usize,
    finished: Vec<Stage>,
    stop_after: Option<(usize, Arc<AtomicBool>)>,
}

impl RunObserver for Collect {
    fn notice(&mut self, n: &Notice) {
        if let Notice::StageFinished { stage, .. } = n {
            self.finished.push(*stage);
        }
    }
    fn event(&mut self, e: &LogEvent) {
        if matches!(e, LogEvent::Generation { .. }) {
            self.generations += 1;
        }
    }
    fn evaluated(&mut self, _c: &Candidate, _o: &Outcome) {
        self.told += 1;
        if let Some((n, flag)) = &self.stop_after
            && self.told >= *n
        {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Records as their JSON lines without their timings (NaN standard errors compare equal).
fn untimed(recs: Vec<EvaluationRecord>) -> Vec<String> {
    recs.into_iter()
        .map(|mut r| {
            r.seconds = 0.0;
            if let crate::RecordOutcome::Scored(s) = &mut r.outcome {
                s.materialize_seconds = 0.0;
            }
            serde_json::to_string(&r).expect("json")
        })
        .collect()
}

#[test]
fn a_two_generation_search_runs_in_process_and_a_crashed_run_resumes_to_the_same_records() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = RunOptions { workers: 1, ..Default::default() };

    // Uninterrupted: two generations of 4.
    let mut seen = Collect::default();
    let (run, end) = crate::start(experiment(tmp.path(), 8), Some(tmp.path().join("whole")), &opts, &mut seen).expect("run");
    let RunEnd::Finished { references, .. } = end else { panic!("interrupted") };
    let whole = run.evaluations();
    assert_eq!(whole.len(), 8);
    assert_eq!(whole.iter().map(|r| r.generation).max(), Some(1), "two generations");
    assert!(whole.iter().all(|r| r.scores().is_some()), "{whole:?}");
    assert_eq!(seen.generations, 2);
    assert_eq!(seen.finished, vec![Stage::Params]);
    assert_eq!(references.len(), 4, "three sources and the baseline");
    assert_eq!(run.references(), references, "references.json holds what the run returned");
    // best.yaml is the best record's recipe
    let best = crate::best_by_mean(&whole).expect("best");
    let (_, layout) = run.experiment().expect("exp").layout().expect("layout");
    let yaml = serde_norway::to_string(&layout.decode(&best.genome).expect("decode")).expect("yaml");
    assert_eq!(std::fs::read_to_string(run.file("best.yaml")).expect("best.yaml"), yaml);

    // Interrupted after 5 outcomes (mid second generation), then a crash cuts a sixth line.
    let cancel = Arc::new(AtomicBool::new(false));
    let opts_cut = RunOptions { workers: 1, cancel: cancel.clone(), ..Default::default() };
    let mut stopper = Collect { stop_after: Some((5, cancel)), ..Default::default() };
    let (cut, end) = crate::start(experiment(tmp.path(), 8), Some(tmp.path().join("cut")), &opts_cut, &mut stopper).expect("run");
    assert_eq!(end, RunEnd::Interrupted);
    assert_eq!(cut.evaluations().len(), 5);
    let evals = cut.file(crate::run_dir::EVALUATIONS);
    let sixth = serde_json::to_string(&whole[5]).expect("json");
    let mut text = std::fs::read_to_string(&evals).expect("read");
    text.push_str(&sixth[..sixth.len() / 2]);
    std::fs::write(&evals, text).expect("cut");

    let mut resumed = Collect::default();
    let end = crate::resume(cut.path(), false, &opts, &mut resumed).expect("resume");
    assert!(matches!(end, RunEnd::Finished { .. }));
    assert_eq!(untimed(cut.evaluations()), untimed(whole.clone()), "the resumed run recorded what the whole run did");
    let text = std::fs::read_to_string(&evals).expect("read");
    assert!(text.lines().all(|l| serde_json::from_str::<EvaluationRecord>(l).is_ok()), "the cut line is gone:\n{text}");
    assert_eq!(text.lines().count(), 8);
    assert_eq!(std::fs::read(cut.file("best.yaml")).expect("cut best"), std::fs::read(run.file("best.yaml")).expect("best"));
    // A finished run resumes to nothing new.
    crate::resume(cut.path(), false, &opts, &mut Collect::default()).expect("resume again");
    assert_eq!(cut.evaluations().len(), 8);
}

#[test]
fn evaluate_reproduces_a_recorded_candidate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = RunOptions { workers: 1, ..Default::default() };
    let (run, _) = crate::start(experiment(tmp.path(), 4), Some(tmp.path().join("r")), &opts, &mut Collect::default()).expect("run");
    let recorded = run.evaluations().pop().expect("a record");

    // What a worker does: the run's setup, then one candidate.
    let mut s = Setup::new(run.experiment().expect("exp"), false).expect("setup");
    calibrate(&mut s, false, None, 1, &mut crate::Quiet).expect("estimators");
    let kind = StageKind::Params { layout: &s.layout, opened: &s.opened, materializer: &s.materializer, seed: s.exp.seed };
    let c = Candidate { id: recorded.id, generation: recorded.generation, genome: recorded.genome.clone() };
    let record = evaluate(&kind, &c, s.runtime.as_mut(), &mut s.estimators);
    assert_eq!(untimed(vec![record]), untimed(vec![recorded]));
    assert_eq!(s.opened.len(), 3, "the sources were opened once");
    // An out-of-bounds genome is a failed record, not an error.
    let bad = Candidate { id: 99, generation: 0, genome: vec![f64::NAN; c.genome.len()] };
    let r = evaluate(&kind, &bad, s.runtime.as_mut(), &mut s.estimators);
    assert!(r.failure().is_some_and(|f| f.contains("outside")), "{r:?}");
}

/// Run directories written by the release before this crate (`run/tests/data/README.md`).
fn release_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/release-f9ec06e").join(name)
}

#[test]
fn run_directories_of_the_previous_release_load_and_every_record_round_trips_byte_for_byte() {
    for name in ["tiny", "demo"] {
        let dir = release_dir(name);
        let run = RunDir::new(&dir);
        let exp = run.experiment().expect("config.resolved.toml");
        for stage in [dir.clone(), run.dataflow_dir()] {
            let Ok(text) = std::fs::read_to_string(stage.join(crate::run_dir::EVALUATIONS)) else { continue };
            for line in text.lines() {
                let r: EvaluationRecord = serde_json::from_str(line).expect("a record");
                assert_eq!(serde_json::to_string(&r).expect("json"), line, "{name}");
            }
            let log = std::fs::read_to_string(stage.join(crate::run_dir::LOG)).expect("log");
            for line in log.lines() {
                let e: LogEvent = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {line}: {e}"));
                assert_eq!(serde_json::to_string(&e).expect("json"), line);
            }
        }
        let refs = std::fs::read_to_string(run.file(crate::run_dir::REFERENCES)).expect("references");
        assert_eq!(serde_json::to_string_pretty(&run.references()).expect("json"), refs);
        assert_eq!(run.references().len(), exp.source_count() + 1);
    }
    // What the release printed at the end of these runs.
    let demo = RunDir::new(release_dir("demo"));
    assert_eq!(demo.evaluations().len(), 160);
    assert_eq!(crate::best_by_mean(&demo.evaluations()).map(|r| r.id), Some(67));
    assert_eq!(crate::best_by_mean(&demo.dataflow_evaluations()).map(|r| r.id), Some(0));
    assert!(crate::ranked(&demo.evaluations()).len() > 1, "a two-objective front");
    let tiny = RunDir::new(release_dir("tiny"));
    let recs = tiny.evaluations();
    let best = crate::best_by_mean(&recs).expect("best");
    assert_eq!((best.id, best.objective("text_ppl/perplexity").map(|v| (v * 1e6).round() / 1e6)), (2, Some(2022.625998)));
}

#[test]
fn a_run_of_the_previous_release_resumes_with_a_larger_budget() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("tiny");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let root = std::fs::canonicalize(root()).expect("root");
    for entry in std::fs::read_dir(release_dir("tiny")).expect("read") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("text");
        // its models and task, where this checkout has them (the release kept the task's path
        // relative to the directory it was started from)
        let text = text
            .replace("/work/main", &root.display().to_string())
            .replace("\"experiments/tasks/", &format!("\"{}/experiments/tasks/", root.display()))
            .replace("max_evaluations = 12", "max_evaluations = 16");
        std::fs::write(dir.join(path.file_name().expect("name")), text).expect("write");
    }
    let old = std::fs::read_to_string(dir.join(crate::run_dir::EVALUATIONS)).expect("old");
    let opts = RunOptions { workers: 1, ..Default::default() };
    let refused = crate::resume(&dir, false, &opts, &mut Collect::default()).expect_err("the budget changed");
    assert!(refused.to_string().contains("changed since the run started"), "{refused}");
    let end = crate::resume(&dir, true, &opts, &mut Collect::default()).expect("resume");
    assert!(matches!(end, RunEnd::Finished { .. }));
    let new = std::fs::read_to_string(dir.join(crate::run_dir::EVALUATIONS)).expect("new");
    assert!(new.starts_with(&old), "the release's records are kept as they were");
    let recs = RunDir::new(&dir).evaluations();
    assert_eq!(recs.len(), 16);
    assert!(recs.iter().all(|r| r.scores().is_some()));
}

#[test]
fn a_run_directory_in_use_is_refused_and_free_again_once_its_holder_ends() {
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = RunOptions { workers: 1, ..Default::default() };
    let (run, _) = crate::start(experiment(tmp.path(), 4), Some(tmp.path().join("r")), &opts, &mut Collect::default()).expect("run");
    let held = run.lock().expect("lock a finished run");
    let err = crate::resume(run.path(), false, &opts, &mut Collect::default()).expect_err("in use");
    assert!(err.to_string().contains(&format!("in use by another evomerge process (pid {})", std::process::id())), "{err}");
    // a search into the same directory is refused too, and writes nothing
    let before = std::fs::read(run.file(crate::run_dir::EVALUATIONS)).expect("records");
    assert!(crate::start(experiment(tmp.path(), 4), Some(run.path().to_path_buf()), &opts, &mut Collect::default()).is_err());
    assert_eq!(std::fs::read(run.file(crate::run_dir::EVALUATIONS)).expect("records"), before);
    drop(held);
    crate::resume(run.path(), false, &opts, &mut Collect::default()).expect("free again");
    assert_eq!(run.evaluations().len(), 4);
}

#[test]
fn a_bad_data_flow_stage_is_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = root();
    let models = format!("\"best\", \"{}/tests/fixtures/models/llama-tiny-a\"", root.display());
    for (genome, needle) in [
        ("{ model_a = 0, repeats = 0 }", "repeats must be at least 1"),
        ("{ model_a = 0, scale_bounds = [1.5, 0.5] }", "scale_bounds [1.5, 0.5]"),
        ("{ model_a = 0 }", "not found"),
    ] {
        let mut exp = experiment(tmp.path(), 4);
        let list = if needle == "not found" { "\"best\", \"/nonexistent/model\"".to_string() } else { models.clone() };
        let text = format!("[dataflow]\nmodels = [{list}]\ngenome = {genome}\nbudget = {{ max_evaluations = 4 }}\n");
        exp.dataflow = Some(toml::from_str::<crate::experiment::DataFlowSection>(&text.replace("[dataflow]\n", "")).expect("section"));
        let err = crate::dry_run(exp.clone(), &RunOptions::default()).expect_err(genome).to_string();
        assert!(err.contains(needle), "{genome}: {err}");
        let run = tmp.path().join("never");
        assert!(crate::start(exp, Some(run.clone()), &RunOptions::default(), &mut Collect::default()).is_err());
        assert!(!run.exists(), "nothing written");
    }
}
