//! Experiment files (`evomerge search EXPERIMENT.toml`), strict TOML: unknown keys are errors.
//!
//! ```toml
//! name = "ties-tiny"
//! seed = 0
//! device = "cpu"
//! run_root = "runs"                  # run directories go to <run_root>/<timestamp>-<name>
//!
//! [merge]
//! method = "ties"
//! base_model = "models/base"         # paths relative to this file, or hub ids in the cache
//! models = ["models/a", "models/b"]
//!
//! [genome]                           # evomerge_engine::genome::GenomeConfig
//! search = ["weight", "density"]
//! layers_per_group = 2
//! fixed = { normalize = 1.0 }
//!
//! [[objectives]]
//! task = "arc_challenge"             # preset or task TOML
//! data = "data/arc.jsonl"
//! estimator = { method = "random", k = 50, seed = 0 }
//!
//! [optimizer]
//! kind = "cmaes"                     # auto (default) | cmaes | nsga2 | nsga3 | random
//! population = 8
//!
//! [budget]
//! max_evaluations = 64
//!
//! [calibration]                      # only used by anchor / IRT estimators
//! candidates = 64                    # random merges scored on every item before the search
//!
//! [dataflow]                         # optional second stage (Sakana's data-flow search)
//! models = ["best", "models/a"]      # "best" = the best merge of the stage above
//! genome = { model_a = 0, repeats = 2, scales = "target" }
//! optimizer = { kind = "nsga2", population = 8 }
//! budget = { max_evaluations = 32 }
//! ```

use std::path::{Path, PathBuf};

use evomerge_engine::Checkpoint;
use evomerge_engine::dataflow::DataFlowConfig;
use evomerge_engine::genome::{GenomeConfig, GenomeLayout};
use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{DeviceSpec, RuntimeKind};
use evomerge_fitness::Method;
use evomerge_search::Budget;
use serde::{Deserialize, Serialize};

use crate::error::{Result, RunError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceSpec,
    /// Which runtime runs the forward pass: "burn" (default) or "libtorch" (a build with
    /// `--features libtorch`); `--runtime` overrides it.
    #[serde(default, skip_serializing_if = "is_burn")]
    pub runtime: RuntimeKind,
    /// One worker per device for the parameter-space stage (`["cuda:0", "cuda:1"]`; repeating
    /// "cpu" gives CPU workers); `--devices` overrides it. Empty: `--workers` on `device`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
    #[serde(default = "runs")]
    pub run_root: PathBuf,
    pub merge: MergeSection,
    pub genome: GenomeConfig,
    pub objectives: Vec<ObjectiveSpec>,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub budget: Budget,
    /// Optional second stage: data-flow search over the best merge and other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataflow: Option<DataFlowSection>,
    /// What anchor / IRT estimators are fitted on, besides the source models.
    #[serde(default, skip_serializing_if = "CalibrationSpec::is_default")]
    pub calibration: CalibrationSpec,
}

/// `[calibration]`: anchor points and IRT models are fitted on item-level results of the source
/// models plus `candidates` merges drawn uniformly (seeded by the run's seed) from the genome's
/// bounds and scored on every item of every such objective before the first generation. Three
/// source models alone make a poor IRT fit; merges of the same sources are what the estimator
/// will be asked about (BENCHMARKS.md, "Fitness estimators on real merges of the zoo").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSpec {
    #[serde(default = "calibration_candidates")]
    pub candidates: usize,
}

/// 64: with 16, the IRT estimators on the zoo's merges fitted only 1–4 ability dimensions and
/// ranked no better than random subsets on `add`; with 64 every IRT-based estimator beats
/// random subsets on error and ranking (BENCHMARKS.md, 2026-11-25). The cost, 64 full-set
/// scorings, is what 640 candidates cost on a 10 % subset.
fn calibration_candidates() -> usize {
    64
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        Self { candidates: calibration_candidates() }
    }
}

impl CalibrationSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// `[dataflow]`: the data-flow stage (Sakana's DFS), run after the parameter-space stage in
/// `RUN_DIR/dataflow/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFlowSection {
    /// Models the path may use, in order: `"best"` (the best merge of the parameter-space
    /// stage, kept in memory), model paths or hub ids. They must share hidden size and vocabulary.
    pub models: Vec<String>,
    #[serde(default)]
    pub genome: DataFlowConfig,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub budget: Budget,
    /// NSGA-II / NSGA-III's first data-flow population besides the start path: `"local"` (half of it the start path with one layer switched on or off and the hop
    /// scales jittered, the rest uniform; what a new experiment gets) or `"uniform"` (every
    /// genome uniform: runs made before this setting, whose resolved configuration lacks it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_population: Option<FirstPopulation>,
}

/// See [`DataFlowSection::first_population`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirstPopulation {
    Local,
    Uniform,
}

fn runs() -> PathBuf {
    PathBuf::from("runs")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSection {
    pub method: String,
    #[serde(default)]
    pub base_model: Option<String>,
    pub models: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectiveSpec {
    /// Preset name or task TOML path.
    pub task: String,
    #[serde(default)]
    pub data: Option<PathBuf>,
    #[serde(default)]
    pub fewshot_data: Option<PathBuf>,
    #[serde(default = "full")]
    pub estimator: Method,
}

fn full() -> Method {
    Method::Full
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// By the number of objectives: CMA-ES for one, NSGA-II for two, NSGA-III for more
    /// ([`OptimizerSpec::kind_for`]).
    #[default]
    Auto,
    Cmaes,
    Nsga2,
    /// NSGA-II with reference-direction survival (Deb & Jain 2014): spreads fronts of three
    /// or more objectives, where crowding distance leaves them thin.
    Nsga3,
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default)]
    pub kind: OptimizerKind,
    /// Candidates per generation (CMA-ES: λ, default 4 + ⌊3 ln n⌋; NSGA-II / NSGA-III: even,
    /// default 40; random: default 8).
    #[serde(default)]
    pub population: Option<usize>,
    /// CMA-ES initial step, as a fraction of each gene's range.
    #[serde(default = "sigma0")]
    pub sigma0: f64,
    /// NSGA-II: open the first population with the source models as genomes (each expert
    /// alone, where the method and bounds can express it; `GenomeLayout::source_genomes`), next
    /// to the start point. The front then reaches the ends of the trade-off from the first
    /// generation; measured on the demo zoo it widens the front but spreads the population
    /// away from the balanced merges (BENCHMARKS.md), hence off by default. Parameter-space
    /// stage only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed_sources: bool,
    /// `sync` (default): a generation at a time, records in candidate order, results
    /// independent of the workers. `async`: candidates scored as workers free up and told as
    /// they finish (steady-state NSGA-II, random search; not CMA-ES), records in the order
    /// told; keeps uneven workers busy (README "Scale out").
    #[serde(default, skip_serializing_if = "Mode::is_sync")]
    pub mode: Mode,
    /// NSGA-III: Das–Dennis partitions of the reference directions (`C(M + p − 1, p)` of them
    /// for M objectives; the population must hold them). Default: the most that fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<usize>,
    /// CMA-ES with margin on binary genes (the data-flow stage's layer indicators): the least
    /// probability of each gene flipping, default `1/(n λ)`; 0 turns the margin off
    /// (indicators thresholded, as before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

impl OptimizerSpec {
    /// The optimizer that runs for `objectives` objectives (`auto` resolved).
    pub fn kind_for(&self, objectives: usize) -> OptimizerKind {
        match (self.kind, objectives) {
            (OptimizerKind::Auto, 0 | 1) => OptimizerKind::Cmaes,
            (OptimizerKind::Auto, 2) => OptimizerKind::Nsga2,
            (OptimizerKind::Auto, _) => OptimizerKind::Nsga3,
            (k, _) => k,
        }
    }
}

/// How a stage's optimizer meets its workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Sync,
    Async,
}

impl Mode {
    fn is_sync(&self) -> bool {
        *self == Mode::Sync
    }
}

fn sigma0() -> f64 {
    0.3
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self { kind: OptimizerKind::Auto, population: None, sigma0: sigma0(), seed_sources: false, mode: Mode::Sync, partitions: None, margin: None }
    }
}

/// `path` with `.` and `dir/..` pairs removed, without touching the filesystem (the folder
/// may not exist yet): `experiments/../runs` is `runs`.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

impl Experiment {
    /// Reads and checks an experiment file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| RunError::Reading { path: path.to_path_buf(), err })?;
        let mut e: Experiment = toml::from_str(&text).map_err(|err| RunError::bad_file(path, err))?;
        let base = path.parent().unwrap_or(Path::new("."));
        // The name becomes a folder of run_root (`<time>-<name>`): one plain path component.
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if e.name.is_empty() || e.name.starts_with('.') || !e.name.chars().all(plain) {
            return Err(RunError::Experiment(format!(
                "{}: name = {:?}: use letters, digits, '-', '_' and '.' (not first); the run directory is <run_root>/<time>-<name>",
                path.display(),
                e.name
            )));
        }
        // Local model paths become absolute, so that the resolved config and the recipes a run
        // writes work from any directory; anything else is a hub id.
        let local = |r: &str| {
            let p = base.join(r);
            match std::fs::canonicalize(&p) {
                Ok(abs) if Path::new(r).is_relative() => abs.display().to_string(),
                _ => r.to_string(),
            }
        };
        e.merge.models = e.merge.models.iter().map(|m| local(m)).collect();
        e.merge.base_model = e.merge.base_model.as_deref().map(local);
        if let Some(df) = &mut e.dataflow {
            // a new experiment's default, written into its resolved configuration
            df.first_population.get_or_insert(FirstPopulation::Local);
            df.models = df.models.iter().map(|m| if m == "best" { m.clone() } else { local(m) }).collect();
            if df.models.is_empty() {
                return Err(RunError::Experiment(format!("{}: dataflow.models is empty", path.display())));
            }
            if df.genome.model_a >= df.models.len() {
                return Err(RunError::Experiment(format!(
                    "{}: dataflow.genome.model_a = {} but dataflow.models has {}",
                    path.display(),
                    df.genome.model_a,
                    df.models.len()
                )));
            }
            if df.optimizer.seed_sources {
                return Err(RunError::Experiment(format!(
                    "{}: dataflow.optimizer.seed_sources is a parameter-space setting (the data-flow stage starts from model A)",
                    path.display()
                )));
            }
        }
        // Task files and data become absolute too: `resume` and `export` may run from another
        // directory than `search` did.
        let abs_base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        for o in &mut e.objectives {
            for p in [&mut o.data, &mut o.fewshot_data].into_iter().flatten() {
                if p.is_relative() {
                    *p = abs_base.join(&*p);
                }
            }
            if !o.task.ends_with(".toml") {
                continue;
            }
            if Path::new(&o.task).is_relative() {
                o.task = abs_base.join(&o.task).display().to_string();
            }
        }
        if e.run_root.is_relative() {
            e.run_root = lexically_normal(&base.join(&e.run_root));
        }
        e.check_settings().map_err(|why| RunError::Experiment(format!("{}: {why}", path.display())))?;
        if e.objectives.is_empty() {
            return Err(RunError::Experiment(format!("{}: at least one [[objectives]] entry is needed", path.display())));
        }
        if e.merge.models.is_empty() {
            return Err(RunError::Experiment(format!("{}: merge.models is empty", path.display())));
        }
        Ok(e)
    }

    /// The resolved configuration as written to `config.resolved.toml`.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| RunError::Experiment(format!("writing the resolved configuration: {e}")))
    }

    /// The experiment of a run directory (its `config.resolved.toml`).
    pub fn from_run_dir(run_dir: &Path) -> Result<Self> {
        let cfg = run_dir.join(crate::run_dir::CONFIG);
        let text = std::fs::read_to_string(&cfg).map_err(|e| RunError::RunDir(format!("{} is not a run directory: {e}", run_dir.display())))?;
        Self::from_resolved(&text, &cfg)
    }

    /// A resolved configuration (what [`Experiment::to_toml`] wrote); `origin` names where it
    /// came from in errors.
    pub fn from_resolved(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| RunError::bad_file(origin, e))
    }

    /// Budgets and optimizer settings that could never run, refused before anything is written
    /// (both stages: a bad data-flow setting would otherwise surface only after the whole
    /// parameter-space stage).
    fn check_settings(&self) -> std::result::Result<(), String> {
        let mut stages = vec![("", &self.budget, &self.optimizer)];
        if let Some(df) = &self.dataflow {
            stages.push(("dataflow.", &df.budget, &df.optimizer));
        }
        for (at, b, o) in stages {
            if b.max_evaluations == Some(0) {
                return Err(format!("{at}budget.max_evaluations = 0: nothing would run"));
            }
            if b.max_generations == Some(0) {
                return Err(format!("{at}budget.max_generations = 0: nothing would run"));
            }
            if let Some(s) = b.max_seconds.filter(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(format!("{at}budget.max_seconds = {s}: give a positive number of seconds"));
            }
            if !(o.sigma0.is_finite() && o.sigma0 > 0.0) {
                return Err(format!("{at}optimizer.sigma0 = {}: give a positive fraction of each gene's range", o.sigma0));
            }
            let n_obj = self.objectives.len();
            let kind = o.kind_for(n_obj);
            match (kind, o.population) {
                (OptimizerKind::Cmaes, Some(p)) if p < 2 => return Err(format!("{at}optimizer.population = {p}: CMA-ES needs at least 2")),
                (OptimizerKind::Nsga2 | OptimizerKind::Nsga3, Some(p)) if p < 4 || p % 2 == 1 => {
                    return Err(format!("{at}optimizer.population = {p}: NSGA-II and NSGA-III need an even population of at least 4"));
                }
                (OptimizerKind::Random, Some(0)) => return Err(format!("{at}optimizer.population = 0: nothing would run")),
                _ => {}
            }
            if kind == OptimizerKind::Cmaes && n_obj > 1 {
                return Err(format!(
                    "CMA-ES optimizes one objective; use {at}optimizer.kind = \"nsga2\" (two objectives), \"nsga3\" (three or more), \"random\" \
                     or \"auto\" for {n_obj}"
                ));
            }
            if kind == OptimizerKind::Nsga3 {
                evomerge_search::nsga3_directions(n_obj, o.population.unwrap_or(40), o.partitions).map_err(|e| format!("{at}optimizer: {e}"))?;
            } else if let Some(p) = o.partitions {
                return Err(format!("{at}optimizer.partitions = {p}: only NSGA-III has reference directions (kind = \"nsga3\")"));
            }
            if let Some(m) = o.margin {
                if kind != OptimizerKind::Cmaes {
                    return Err(format!("{at}optimizer.margin = {m}: the margin is CMA-ES's (kind = \"cmaes\")"));
                }
                if !(0.0..0.5).contains(&m) {
                    return Err(format!("{at}optimizer.margin = {m}: give a probability in [0, 0.5) (0 turns the margin off)"));
                }
            }
            if o.mode == Mode::Async && kind == OptimizerKind::Cmaes {
                return Err(format!(
                    "{at}optimizer.mode = \"async\": CMA-ES has no sound asynchronous update (its rank-μ update assumes a whole generation \
                     sampled from one distribution); use kind = \"nsga2\" or \"random\", or mode = \"sync\""
                ));
            }
        }
        Ok(())
    }

    /// The merge's source models (its models and the base): the first calibration rows.
    pub fn source_count(&self) -> usize {
        self.merge.models.len() + usize::from(self.merge.base_model.is_some())
    }

    /// The source models' references: the models, then the base.
    pub fn sources(&self) -> impl Iterator<Item = &String> {
        self.merge.models.iter().chain(self.merge.base_model.as_ref())
    }

    /// Layer counts of the data-flow stage's models, in order (`"best"` has the base model's);
    /// empty without a data-flow stage.
    pub fn dataflow_layer_counts(&self) -> Result<Vec<usize>> {
        let Some(df) = &self.dataflow else { return Ok(vec![]) };
        let base = self.merge.base_model.as_ref().unwrap_or(&self.merge.models[0]);
        df.models
            .iter()
            .map(|m| {
                let r = if m == crate::run_dir::BEST { base } else { m };
                Ok(evomerge_engine::io::ModelConfig::from_dir(&resolve_model(r, None)?)?.num_hidden_layers)
            })
            .collect()
    }

    /// The base model (the first model when there is none) and the genome layout over it.
    pub fn layout(&self) -> Result<(Checkpoint, GenomeLayout)> {
        let base_ref = self.merge.base_model.clone().unwrap_or_else(|| self.merge.models[0].clone());
        let base = Checkpoint::open(&resolve_model(&base_ref, None)?, base_ref)?;
        let layout = GenomeLayout::new(
            &self.merge.method,
            self.merge.models.clone(),
            self.merge.base_model.clone(),
            base.arch,
            base.num_layers(),
            &self.genome,
        )?;
        Ok((base, layout))
    }
}

fn is_burn(r: &RuntimeKind) -> bool {
    *r == RuntimeKind::Burn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_experiments_start_the_data_flow_population_locally_and_older_runs_keep_uniform() {
        let e = Experiment::load(Path::new("../experiments/demo.toml")).expect("demo");
        assert_eq!(e.dataflow.as_ref().and_then(|d| d.first_population), Some(FirstPopulation::Local));
        let text = e.to_toml().expect("toml");
        assert!(text.contains("first_population = \"local\""), "{text}");
        // a resolved configuration written before the setting existed
        let old = Experiment::from_resolved(&text.replace("first_population = \"local\"\n", ""), Path::new("old")).expect("old");
        assert_eq!(old.dataflow.as_ref().map(|d| d.first_population), Some(None));
    }

    #[test]
    fn a_name_that_is_not_one_plain_folder_name_is_refused() {
        let text = std::fs::read_to_string("../experiments/search-tiny.toml").expect("read");
        let dir = tempfile::tempdir().expect("tmp");
        for bad in ["../escape", "a/b", "", ".hidden", "sp ace"] {
            let p = dir.path().join("e.toml");
            std::fs::write(&p, text.replace("name = \"search-tiny\"", &format!("name = {bad:?}"))).expect("write");
            let err = Experiment::load(&p).expect_err(bad).to_string();
            assert!(err.contains("name =") && err.contains("run_root"), "{bad}: {err}");
        }
    }

    #[test]
    fn settings_that_could_never_run_are_refused_when_the_file_is_read() {
        let text = std::fs::read_to_string("../experiments/demo.toml").expect("read");
        let dir = tempfile::tempdir().expect("tmp");
        let cases = [
            ("[budget]\nmax_evaluations = 160", "[budget]\nmax_evaluations = 0", "budget.max_evaluations = 0"),
            ("[budget]\nmax_evaluations = 160", "[budget]\nmax_evaluations = 160\nmax_generations = 0", "max_generations = 0"),
            ("[budget]\nmax_evaluations = 160", "[budget]\nmax_evaluations = 160\nmax_seconds = -1.0", "max_seconds = -1"),
            ("[budget]\nmax_evaluations = 160", "[budget]\nmax_evaluations = 160\nmax_seconds = nan", "max_seconds = NaN"),
            ("population = 16", "population = 15", "even population"),
            ("population = 16", "population = 2", "even population"),
            ("budget = { max_evaluations = 64 }", "budget = { max_evaluations = 0 }", "dataflow.budget.max_evaluations = 0"),
            ("kind = \"nsga2\"", "kind = \"nsga2\"\nsigma0 = 0.0", "sigma0 = 0"),
        ];
        for (from, to, needle) in cases {
            assert!(text.contains(from), "demo.toml lost '{from}'");
            let p = dir.path().join("e.toml");
            std::fs::write(&p, text.replacen(from, to, 1)).expect("write");
            let err = Experiment::load(&p).expect_err(to).to_string();
            assert!(err.contains(needle), "{to}: {err}");
        }
    }

    #[test]
    fn task_and_data_paths_are_absolute_whatever_directory_the_file_was_named_from() {
        // `cargo test` runs in run/: a relative experiment path, as a user in the repo gives it
        let e = Experiment::load(Path::new("../experiments/search-tiny.toml")).expect("load");
        assert!(Path::new(&e.objectives[0].task).is_absolute(), "{}", e.objectives[0].task);
        assert!(Path::new(&e.objectives[0].task).exists());
        assert!(e.merge.models.iter().all(|m| Path::new(m).is_absolute()));
        let demo = Experiment::load(Path::new("../experiments/demo.toml")).expect("load");
        for o in &demo.objectives {
            assert!(o.data.as_ref().is_none_or(|d| d.is_absolute() && d.exists()), "{:?}", o.data);
        }
    }
}
