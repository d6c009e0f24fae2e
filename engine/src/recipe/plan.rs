//! From a recipe to a [`MergePlan`]: one [`TensorTask`] per output tensor.
//!
//! Models are resolved (local path, else relative to the recipe's folder, else the HF cache),
//! opened lazily and validated: same architecture, every required tensor present with a
//! supported dtype, equal shapes across the inputs of every task. Slices are expanded as
//! mergekit does: output layer `o` of slice `j` merges layer `start_s + k` of every source `s`;
//! weights before the layers (embeddings) come from the first slice's sources, weights after
//! them (final norm, LM head) from the last slice's. Parameters are looked up source → slice →
//! global, evaluated at the tensor's position (see [`super::param`]), defaulted from the
//! method's [`ParamSpec`]s and range-checked — so a plan that builds will merge.

use std::path::Path;
use std::sync::Arc;

use super::schema::{ParamMap, Recipe};
use crate::arch::Section;
use crate::dtype::DType;
use crate::error::{EngineError, Result};
use crate::io::{Checkpoint, OpenedCheckpoints};
use crate::merge::{self, BaseRole, MergeMethod, ParamSpec, Params, Scope};
use crate::source::TensorSource;

/// One output tensor: its inputs and resolved parameters.
#[derive(Debug, Clone)]
pub struct TensorTask {
    /// Output tensor name.
    pub name: String,
    pub shape: Vec<usize>,
    /// `(model index, tensor name in that model)`.
    pub inputs: Vec<(usize, String)>,
    /// Position of the base model in `inputs`.
    pub base: Option<usize>,
    pub params: Params,
    /// Parallel to `inputs`.
    pub model_params: Vec<Params>,
}

/// A validated, fully resolved merge.
#[derive(Debug)]
pub struct MergePlan {
    pub method: &'static dyn MergeMethod,
    /// Opened models, indexed by `TensorTask::inputs` (shared with the [`OpenedCheckpoints`]
    /// they came from: a search opens each source once, not once per candidate).
    pub models: Vec<Arc<Checkpoint>>,
    /// The references as written in the recipe, parallel to `models`.
    pub model_refs: Vec<String>,
    pub tasks: Vec<TensorTask>,
    /// Index of the model whose config and tokenizer the output takes.
    pub donor: usize,
    pub out_layers: usize,
    pub out_dtype: DType,
    pub seed: u64,
    /// The recipe's YAML text, copied into the output.
    pub recipe_text: String,
}

struct Source {
    model: usize,
    start: usize,
    params: ParamMap,
}

struct Slice {
    sources: Vec<Source>,
    base: Option<usize>,
    params: ParamMap,
    len: usize,
}

impl MergePlan {
    /// Reads `path` and plans it; relative model paths also resolve against its folder.
    pub fn from_file(path: &Path, seed: u64) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        let recipe = Recipe::parse(&text, &path.display().to_string())?;
        Self::build(&recipe, text, path.parent(), seed)
    }

    /// Plans a parsed recipe, opening its models.
    pub fn build(recipe: &Recipe, recipe_text: String, base_dir: Option<&Path>, seed: u64) -> Result<Self> {
        Self::build_with(recipe, recipe_text, base_dir, seed, &OpenedCheckpoints::default())
    }

    /// Plans a parsed recipe over checkpoints opened (and validated) once in `opened`: the
    /// search's path from a genome to a plan, with no file opened per candidate.
    pub fn build_with(recipe: &Recipe, recipe_text: String, base_dir: Option<&Path>, seed: u64, opened: &OpenedCheckpoints) -> Result<Self> {
        let method = merge::method(&recipe.merge_method).ok_or_else(|| {
            EngineError::recipe(
                "merge_method",
                format!("unknown merge method '{}' (known: {})", recipe.merge_method, merge::method_names().join(", ")),
            )
        })?;
        let specs = method.params();
        check_param_names(method, &specs, &recipe.parameters, "parameters", true)?;

        let model_refs = recipe.model_refs();
        let mut models = Vec::with_capacity(model_refs.len());
        for r in &model_refs {
            models.push(opened.get(r, base_dir)?);
        }
        for (m, r) in models.iter().zip(&model_refs).skip(1) {
            if m.arch.name != models[0].arch.name {
                return Err(EngineError::ArchitectureMismatch {
                    model: r.clone(),
                    got: m.arch.name.clone(),
                    reference: model_refs[0].clone(),
                    expected: models[0].arch.name.clone(),
                });
            }
        }
        let idx = |r: &str| model_refs.iter().position(|x| x == r).unwrap_or(0);
        let base_global = recipe.base_model.as_deref().map(idx);
        if method.base_role() == BaseRole::Required && base_global.is_none() && recipe.slices.iter().flatten().all(|s| s.base_model.is_none()) {
            return Err(EngineError::recipe("base_model", format!("merge method '{}' needs a base_model", method.name())));
        }

        let slices = expand_slices(recipe, &models, &model_refs, base_global, method, &specs)?;
        let donor = base_global.unwrap_or(0);
        let arch = models[donor].arch;
        let donor_cfg = &models[donor].config;
        let out_dtype = match recipe.out_dtype.as_deref().or(recipe.dtype.as_deref()) {
            Some(s) => DType::parse(s)
                .ok_or_else(|| EngineError::recipe("out_dtype", format!("unsupported dtype '{s}' (use float32, float16 or bfloat16)")))?,
            None => models[donor].dtype(),
        };
        if let Some(d) = recipe.dtype.as_deref() {
            DType::parse(d).ok_or_else(|| EngineError::recipe("dtype", format!("unsupported dtype '{d}'")))?;
        }
        if let Some(t) = recipe.tokenizer_source.as_deref() {
            let ok = t == "base" || model_refs.get(donor).is_some_and(|d| d == t);
            if !ok {
                return Err(EngineError::recipe(
                    "tokenizer_source",
                    format!("'{t}' is not supported yet: evomerge copies the tokenizer of the base (or first) model, '{}'", model_refs[donor]),
                ));
            }
        }

        let mut tasks = Vec::new();
        let ctx = TaskCtx { method, specs: &specs, models: &models, refs: &model_refs, global: &recipe.parameters };
        let (first, last) = (&slices[0], &slices[slices.len() - 1]);
        for w in arch.section(Section::Pre).filter(|w| arch.is_stored(w, donor_cfg)) {
            ctx.push(&mut tasks, first, &w.name, |_| w.name.clone(), 0.0, w.optional)?;
        }
        let mut out_layer = 0;
        for s in &slices {
            for k in 0..s.len {
                let t = if s.len > 1 { k as f64 / (s.len - 1) as f64 } else { 1.0 };
                for w in arch.section(Section::Layer) {
                    let out = w.name_for(out_layer);
                    ctx.push(&mut tasks, s, &out, |src| w.name_for(src.start + k), t, w.optional)?;
                }
                out_layer += 1;
            }
        }
        for w in arch.section(Section::Post).filter(|w| arch.is_stored(w, donor_cfg)) {
            ctx.push(&mut tasks, last, &w.name, |_| w.name.clone(), 0.0, w.optional)?;
        }
        Ok(Self { method, models, model_refs, tasks, donor, out_layers: out_layer, out_dtype, seed, recipe_text })
    }

    /// Total bytes the merge reads (all inputs of all tasks, at their storage dtype).
    pub fn input_bytes(&self) -> u64 {
        self.tasks
            .iter()
            .flat_map(|t| t.inputs.iter().map(move |(m, n)| (t, *m, n)))
            .map(|(t, m, n)| {
                let dt = self.models[m].raw(n).map(|(d, _, _)| d.size()).unwrap_or(4);
                (t.shape.iter().product::<usize>() * dt) as u64
            })
            .sum()
    }

    /// Total bytes the merge writes.
    pub fn output_bytes(&self) -> u64 {
        self.tasks.iter().map(|t| (t.shape.iter().product::<usize>() * self.out_dtype.size()) as u64).sum()
    }
}

fn check_param_names(method: &dyn MergeMethod, specs: &[ParamSpec], map: &ParamMap, ctx: &str, global_level: bool) -> Result<()> {
    for k in map.keys() {
        match specs.iter().find(|s| s.name == k) {
            None => {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                return Err(EngineError::recipe(
                    ctx,
                    format!("unknown parameter '{k}' for merge method '{}' (known: {})", method.name(), known.join(", ")),
                ));
            }
            Some(s) if s.scope == Scope::Global && !global_level => {
                return Err(EngineError::recipe(
                    ctx,
                    format!("'{k}' is a global parameter of '{}': set it under the top-level `parameters:`", method.name()),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn expand_slices(
    recipe: &Recipe,
    models: &[Arc<Checkpoint>],
    refs: &[String],
    base_global: Option<usize>,
    method: &dyn MergeMethod,
    specs: &[ParamSpec],
) -> Result<Vec<Slice>> {
    let idx = |r: &str| refs.iter().position(|x| x == r).unwrap_or(0);
    let uses_base = method.base_role() != BaseRole::Unused;
    let mut slices = Vec::new();
    if let Some(ms) = &recipe.models {
        let n = models[idx(&ms[0].model)].num_layers();
        let mut sources = Vec::new();
        for m in ms {
            check_param_names(method, specs, &m.parameters, &format!("models[{}].parameters", m.model), false)?;
            let mi = idx(&m.model);
            if models[mi].num_layers() != n {
                return Err(EngineError::recipe(
                    "models",
                    format!(
                        "'{}' has {} layers, '{}' has {n}: use `slices:` to merge models of different depth",
                        m.model,
                        models[mi].num_layers(),
                        ms[0].model
                    ),
                ));
            }
            sources.push(Source { model: mi, start: 0, params: m.parameters.clone() });
        }
        if let Some(b) = base_global.filter(|b| uses_base && !sources.iter().any(|s| s.model == *b)) {
            sources.push(Source { model: b, start: 0, params: ParamMap::new() });
        }
        slices.push(Slice { sources, base: base_global.filter(|_| uses_base), params: ParamMap::new(), len: n });
    }
    for (j, s) in recipe.slices.iter().flatten().enumerate() {
        check_param_names(method, specs, &s.parameters, &format!("slices[{j}].parameters"), true)?;
        let len = s.sources[0].layer_range[1] - s.sources[0].layer_range[0];
        let mut sources = Vec::new();
        for src in &s.sources {
            check_param_names(method, specs, &src.parameters, &format!("slices[{j}].sources[{}].parameters", src.model), false)?;
            let mi = idx(&src.model);
            if src.layer_range[1] > models[mi].num_layers() {
                return Err(EngineError::recipe(
                    format!("slices[{j}]"),
                    format!("layer_range {:?} is past the {} layers of '{}'", src.layer_range, models[mi].num_layers(), src.model),
                ));
            }
            sources.push(Source { model: mi, start: src.layer_range[0], params: src.parameters.clone() });
        }
        let base = s.base_model.as_deref().map(idx).or(base_global).filter(|_| uses_base);
        if let Some(b) = base.filter(|b| !sources.iter().any(|s| s.model == *b)) {
            let start = s.sources[0].layer_range[0];
            if start + len > models[b].num_layers() {
                return Err(EngineError::recipe(format!("slices[{j}]"), format!("base model '{}' has too few layers for this slice", refs[b])));
            }
            sources.push(Source { model: b, start, params: ParamMap::new() });
        }
        slices.push(Slice { sources, base, params: s.parameters.clone(), len });
    }
    if let Some(range) = method.input_count() {
        for (j, s) in slices.iter().enumerate() {
            if !range.contains(&s.sources.len()) {
                return Err(EngineError::recipe(
                    format!("slices[{j}]"),
                    format!(
                        "merge method '{}' takes {}..={} inputs (base included), got {}",
                        method.name(),
                        range.start(),
                        range.end(),
                        s.sources.len()
                    ),
                ));
            }
        }
    }
    Ok(slices)
}

struct TaskCtx<'a> {
    method: &'a dyn MergeMethod,
    specs: &'a [ParamSpec],
    models: &'a [Arc<Checkpoint>],
    refs: &'a [String],
    global: &'a ParamMap,
}

impl TaskCtx<'_> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        tasks: &mut Vec<TensorTask>,
        slice: &Slice,
        out_name: &str,
        src_name: impl Fn(&Source) -> String,
        t: f64,
        optional: bool,
    ) -> Result<()> {
        let names: Vec<String> = slice.sources.iter().map(&src_name).collect();
        // one lookup per source: the shape, or None when absent (or of an unsupported dtype)
        let shapes: Vec<Option<Vec<usize>>> =
            slice.sources.iter().zip(&names).map(|(s, n)| self.models[s.model].meta(n).map(|(shape, _)| shape)).collect();
        if optional && shapes.iter().all(Option::is_none) {
            return Ok(());
        }
        if let Some(i) = shapes.iter().position(Option::is_none) {
            return Err(EngineError::MissingTensor { model: self.refs[slice.sources[i].model].clone(), tensor: names[i].clone() });
        }
        let shapes: Vec<Vec<usize>> = shapes.into_iter().flatten().collect();
        let shape = shapes[0].clone();
        for ((s, n), got) in slice.sources.iter().zip(&names).zip(shapes).skip(1) {
            if got != shape {
                return Err(EngineError::ShapeMismatch {
                    tensor: n.clone(),
                    model: self.refs[s.model].clone(),
                    got,
                    reference: self.refs[slice.sources[0].model].clone(),
                    expected: shape,
                });
            }
        }
        let bad = |reason: String| EngineError::recipe(format!("tensor {out_name}"), reason);
        let lookup = |maps: &[&ParamMap], spec: &ParamSpec, who: &str| -> Result<f64> {
            for m in maps {
                if let Some(setting) = m.get(spec.name)
                    && let Some(v) = setting.resolve(out_name, t).map_err(|e| bad(e.to_string()))?
                {
                    spec.check(v).map_err(|e| bad(format!("{who}{e}")))?;
                    return Ok(v);
                }
            }
            spec.default.ok_or_else(|| bad(format!("{who}missing required parameter '{}' of merge method '{}'", spec.name, self.method.name())))
        };
        let mut params = Params::default();
        for spec in self.specs.iter().filter(|s| s.scope == Scope::Global) {
            params.set(spec.name, lookup(&[&slice.params, self.global], spec, "")?);
        }
        let base = slice.base.and_then(|b| slice.sources.iter().position(|s| s.model == b));
        let mut model_params = Vec::new();
        for (i, s) in slice.sources.iter().enumerate() {
            let mut p = Params::default();
            for spec in self.specs.iter().filter(|s| s.scope == Scope::PerModel) {
                let who = format!("model '{}': ", self.refs[s.model]);
                // The base model of a task-vector method needs no per-model values.
                let v = match lookup(&[&s.params, &slice.params, self.global], spec, &who) {
                    Ok(v) => v,
                    Err(_) if Some(i) == base && self.method.base_role() != BaseRole::Unused => spec.default.unwrap_or(0.0),
                    Err(e) => return Err(e),
                };
                p.set(spec.name, v);
            }
            model_params.push(p);
        }
        tasks.push(TensorTask {
            name: out_name.to_string(),
            shape,
            inputs: slice.sources.iter().zip(names).map(|(s, n)| (s.model, n)).collect(),
            base,
            params,
            model_params,
        });
        Ok(())
    }
}
