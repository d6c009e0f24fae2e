//! Setup of a run: the experiment's models, genome, tasks and runtime, and the one
//! materialization path candidates take (chosen here, once).

use evomerge_engine::dataflow::DataFlowLayout;
use evomerge_engine::genome::GenomeLayout;
use evomerge_engine::io::{ModelConfig, resolve_model};
use evomerge_engine::model::{self, DeviceSpec, LanguageModel, ModelSpec, Tokenizer};
use evomerge_engine::resident::ResidentMerge;
use evomerge_engine::{Checkpoint, Materializer, OpenedCheckpoints, TensorSource};
use evomerge_fitness::TaskEstimator;
use evomerge_fitness::tasks::{Task, TaskSpec};
use evomerge_search::{GeneKind, SearchSpace};

use crate::error::{Result, RunError};
use crate::experiment::Experiment;
use crate::resources::{device_merge, gib, memory_available, memory_needed, runtime_bytes};

/// Everything a run needs, built from an experiment.
pub struct Setup {
    pub exp: Experiment,
    pub layout: GenomeLayout,
    pub space: SearchSpace,
    /// One per objective, built by calibration (empty before).
    pub estimators: Vec<TaskEstimator>,
    /// The objectives' tasks until calibration turns them into estimators.
    pub(crate) tasks: Vec<Task>,
    pub tok: Tokenizer,
    pub prefix: u32,
    /// The source checkpoints, opened once for every plan of the run.
    pub opened: OpenedCheckpoints,
    pub runtime: Box<dyn LanguageModel>,
    /// Runtimes of further workers opened by calibration, which the stages reuse.
    pub(crate) spare: Vec<Box<dyn LanguageModel>>,
    /// How candidates become the runtime's weights.
    pub materializer: Materializer,
    /// Candidates are merged in place (resident inputs; not built in a dry run).
    pub in_place: bool,
    /// The base model (its config and size size the workers and the data-flow stage).
    pub base: Checkpoint,
    /// Estimated peak host memory of the run (bytes).
    pub memory: u64,
}

/// The data-flow stage as far as it can be checked before the first stage runs: its models
/// exist and share the base's hidden size and vocabulary, and its genome settings lay out (a
/// bad `[dataflow]` used to surface only after the whole parameter-space stage).
fn check_dataflow(exp: &Experiment, base: &Checkpoint) -> Result<()> {
    let Some(df) = &exp.dataflow else { return Ok(()) };
    let mut counts = vec![];
    for m in &df.models {
        if m == crate::run_dir::BEST {
            counts.push(base.config.num_hidden_layers);
            continue;
        }
        let cfg = ModelConfig::from_dir(&resolve_model(m, None)?)?;
        if (cfg.hidden_size, cfg.vocab_size) != (base.config.hidden_size, base.config.vocab_size) {
            return Err(RunError::Experiment(format!(
                "dataflow.models: '{m}' has hidden size {} and vocabulary {}, the merge {} and {}; the stage's models must share both",
                cfg.hidden_size, cfg.vocab_size, base.config.hidden_size, base.config.vocab_size
            )));
        }
        counts.push(cfg.num_hidden_layers);
    }
    DataFlowLayout::new(&counts, &df.genome)?;
    Ok(())
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("exp", &self.exp.name)
            .field("genes", &self.space.dim())
            .field("in_place", &self.in_place)
            .finish_non_exhaustive()
    }
}

impl Setup {
    /// Loads everything a run needs; `dry_run` skips building the resident inputs.
    pub fn new(exp: Experiment, dry_run: bool) -> Result<Self> {
        let (base, layout) = exp.layout()?;
        let need = memory_needed(&base);
        if let Some(avail) = memory_available().filter(|&a| exp.device == DeviceSpec::Cpu && need > a) {
            return Err(RunError::Resources(format!(
                "this search needs about {:.1} GiB of memory ({} in f32: the resident model plus one merged candidate) \
                 but {:.1} GiB are available; use a smaller model, free memory, or a GPU (--device cuda:0)",
                gib(need),
                base.label(),
                gib(avail)
            )));
        }
        let genes = layout.genes();
        let space = SearchSpace::new(
            genes.iter().map(|g| g.name.clone()).collect(),
            genes.iter().map(|g| g.lower).collect(),
            genes.iter().map(|g| g.upper).collect(),
            vec![GeneKind::Real; genes.len()],
        )?;
        check_dataflow(&exp, &base)?;
        let prefix = base.config.prefix_token();
        let tok = Tokenizer::from_dir(base.dir())?;
        let mut tasks = Vec::new();
        for o in &exp.objectives {
            let spec = TaskSpec::load(&o.task)?;
            tasks.push(Task::load(spec, o.data.as_deref(), o.fewshot_data.as_deref())?);
        }
        let runtime = model::open(exp.runtime, exp.device, &[ModelSpec::from_checkpoint(&base)])?;
        let mut s = Setup {
            exp,
            layout,
            space,
            estimators: vec![],
            tasks,
            tok,
            prefix,
            opened: OpenedCheckpoints::default(),
            runtime,
            spare: vec![],
            materializer: Materializer::Streamed,
            in_place: false,
            base,
            memory: 0,
        };
        s.choose_materializer(!dry_run)?;
        Ok(s)
    }

    /// Holds the merge inputs in the runtime's layout when the method is elementwise and the
    /// memory is there (see `evomerge_engine::resident`); says why not otherwise. Builds the
    /// resident inputs only if `build` (and then also holds them on the runtime's device where
    /// [`device_merge`] says so). Sets the materializer, `in_place` and the peak memory.
    fn choose_materializer(&mut self, build: bool) -> Result<()> {
        let streamed = memory_needed(&self.base);
        let plan = self.layout.plan(&self.layout.initial(), &self.opened, self.exp.seed)?;
        let weights = self.runtime.weight_layout(0)?;
        let why_not = match ResidentMerge::bytes_needed(&plan, &weights) {
            Err(why) => why.to_string(),
            Ok(bytes) => {
                let need = runtime_bytes(&self.base) + bytes;
                match memory_available() {
                    Some(avail) if need > avail => {
                        format!("holding the inputs in the runtime's layout needs {:.1} GiB, {:.1} GiB are available", gib(need), gib(avail))
                    }
                    _ => {
                        (self.in_place, self.memory) = (true, need);
                        if !build {
                            return Ok(());
                        }
                        tracing::info!("merge inputs held in the runtime's layout ({:.2} GiB): candidates are merged in place", gib(bytes));
                        let resident = ResidentMerge::new(&plan, weights)?;
                        if device_merge(self.exp.device) {
                            if resident.hold_on_device(&plan, self.runtime.as_mut(), 0)? {
                                tracing::info!("merge inputs held on {}: candidates are merged there", self.exp.device);
                            } else {
                                tracing::info!("{} candidates are merged on the host and uploaded", plan.method.name());
                            }
                        }
                        self.materializer = Materializer::Resident(resident);
                        return Ok(());
                    }
                }
            }
        };
        tracing::info!("candidates are merged from the memory-mapped checkpoints and swapped in ({why_not})");
        (self.in_place, self.memory) = (false, streamed);
        Ok(())
    }

    /// Refuses source models (of the merge and of the data-flow stage) that hold NaN or
    /// infinite values: every candidate using one would fail, and that would show only after
    /// the whole budget. One pass over the stored bits of each model.
    pub fn check_finite(&self) -> Result<()> {
        let df = self.exp.dataflow.iter().flat_map(|d| d.models.iter()).filter(|m| m.as_str() != crate::run_dir::BEST);
        for m in self.exp.sources().chain(df) {
            if let Some(t) = self.opened.get(m, None)?.first_non_finite() {
                return Err(RunError::Experiment(format!(
                    "model '{m}': tensor '{t}' holds NaN or infinite values, so every candidate that uses it would fail; \
                     fix the model, or pass --allow-nonfinite to search anyway"
                )));
            }
        }
        Ok(())
    }

    /// A fresh runtime holding the base model (another worker's).
    pub(crate) fn open_runtime(&self) -> Result<Box<dyn LanguageModel>> {
        self.open_runtime_on(self.exp.device)
    }

    /// A further runtime of the base model on `device`; where candidates are merged on the
    /// device ([`device_merge`]), it holds its own copy of the resident inputs there (the host
    /// inputs are shared by every worker).
    pub(crate) fn open_runtime_on(&self, device: DeviceSpec) -> Result<Box<dyn LanguageModel>> {
        let mut rt = model::open(self.exp.runtime, device, &[ModelSpec::from_checkpoint(&self.base)])?;
        if let Materializer::Resident(resident) = &self.materializer
            && device_merge(device)
        {
            let plan = self.layout.plan(&self.layout.initial(), &self.opened, self.exp.seed)?;
            resident.hold_on_device(&plan, rt.as_mut(), 0)?;
        }
        Ok(rt)
    }
}
