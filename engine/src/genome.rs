//! Genome layout: the one place where a search's `Vec<f64>` and a merge recipe meet.
//!
//! Built from the merge method's [`ParamSpec`]s and a [`GenomeConfig`] (which parameters to
//! search, how finely). Genes, in order:
//!
//! ```text
//! for each searched parameter p (config order)
//!   for each model m           (per-model parameters; one pass for global ones)
//!     for each filter f        (config filters, then "rest" = tensors no filter matches)
//!       for each layer group g (layers_per_group consecutive layers; the last group may be shorter)
//!         gene "p[m=<model>,f=<filter>,g=<first>-<last>]" in the parameter's search bounds
//! ```
//!
//! Decoding writes a mergekit recipe: per layer, a gradient of length `layers` (so layer `l`
//! reads exactly entry `l`; mergekit's `t = l/(n−1)` scaled by `n−1`), stepped per group or,
//! with `smooth`, interpolated linearly between group centres. Filters become mergekit filter
//! lists (first match wins, "rest" last). Tensors outside the layers (embeddings, final norm, LM
//! head) take layer 0's value, as mergekit evaluates them at `t = 0`. Filters are substrings,
//! as in mergekit: `attention` also matches `post_attention_layernorm` (use `self_attn`). The recipe is what the
//! merge executor runs and what a run directory stores, so every candidate is reproducible with
//! `evomerge merge` (and with mergekit).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::arch::{Architecture, Section};
use crate::error::{EngineError, Result};
use crate::io::OpenedCheckpoints;
use crate::merge::{self, Kind, MergeMethod, Scope};
use crate::recipe::MergePlan;
use crate::recipe::param::{FilteredValue, ParamSetting, Value};
use crate::recipe::schema::{InputModel, ParamMap, Recipe};

/// Which parameters a search varies, and how finely (the `[genome]` table of an experiment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenomeConfig {
    /// Parameters to search (names from the method's parameter list).
    pub search: Vec<String>,
    /// Consecutive layers sharing one gene (1 = per layer; ≥ the layer count = one gene).
    #[serde(default = "one")]
    pub layers_per_group: usize,
    /// Tensor-name substrings with their own genes (e.g. `["self_attn", "mlp"]`); the tensors
    /// no filter matches share one more set.
    #[serde(default)]
    pub filters: Vec<String>,
    /// Interpolate linearly between group centres instead of steps.
    #[serde(default)]
    pub smooth: bool,
    /// Search intervals overriding the method's defaults, by parameter name.
    #[serde(default)]
    pub bounds: BTreeMap<String, [f64; 2]>,
    /// Values of parameters that are not searched, by name (global scope, or every model).
    #[serde(default)]
    pub fixed: BTreeMap<String, f64>,
}

fn one() -> usize {
    1
}

/// One gene.
#[derive(Debug, Clone, PartialEq)]
pub struct Gene {
    pub name: String,
    pub param: &'static str,
    /// Index into the layout's models (per-model parameters).
    pub model: Option<usize>,
    /// Index into the filters; `None` = the rest.
    pub filter: Option<usize>,
    pub group: usize,
    pub lower: f64,
    pub upper: f64,
    /// Start value: the parameter's default clamped into the bounds, else the midpoint.
    pub init: f64,
}

/// The genome ⇄ recipe mapping of one experiment.
#[derive(Debug, Clone)]
pub struct GenomeLayout {
    method: &'static dyn MergeMethod,
    models: Vec<String>,
    base: Option<String>,
    layers: usize,
    groups: Vec<(usize, usize)>,
    filters: Vec<String>,
    smooth: bool,
    fixed: BTreeMap<String, f64>,
    genes: Vec<Gene>,
    /// A representative tensor per (filter or rest) for reading values back.
    probes: Vec<String>,
}

fn bad(reason: impl Into<String>) -> EngineError {
    EngineError::recipe("genome", reason)
}

impl GenomeLayout {
    /// `models` are the recipe's `models:` references (per-model genes follow their order);
    /// `arch` and `layers` describe them.
    pub fn new(method_name: &str, models: Vec<String>, base: Option<String>, arch: &Architecture, layers: usize, cfg: &GenomeConfig) -> Result<Self> {
        let method = merge::method(method_name)
            .ok_or_else(|| bad(format!("unknown merge method '{method_name}' (known: {})", merge::method_names().join(", "))))?;
        if layers == 0 || models.is_empty() {
            return Err(bad("needs at least one model with at least one layer"));
        }
        let specs = method.params();
        if cfg.layers_per_group == 0 {
            return Err(bad("layers_per_group = 0: a group holds at least one layer"));
        }
        if let Some(name) = cfg.bounds.keys().find(|b| !cfg.search.contains(b)) {
            return Err(bad(format!("bounds are given for '{name}', which is not searched (add it to genome.search, or fix it)")));
        }
        let per = cfg.layers_per_group;
        let groups: Vec<(usize, usize)> = (0..layers).step_by(per).map(|s| (s, (s + per).min(layers))).collect();
        // A probe tensor per filter (and one for the rest), so that every filter is known to
        // match something and values can be read back.
        let layer_names: Vec<String> = arch.section(Section::Layer).map(|w| w.name_for(0)).collect();
        let mut probes = Vec::new();
        for f in &cfg.filters {
            let p = layer_names
                .iter()
                .find(|n| n.contains(f.as_str()))
                .ok_or_else(|| bad(format!("filter '{f}' matches no layer tensor of {} (e.g. {})", arch.name, layer_names[0])))?;
            probes.push(p.clone());
        }
        let rest = layer_names.iter().find(|n| !cfg.filters.iter().any(|f| n.contains(f.as_str())));
        if let Some(r) = rest {
            probes.push(r.clone());
        }
        let filter_slots: Vec<Option<usize>> = (0..cfg.filters.len()).map(Some).chain(rest.is_some().then_some(None)).collect();
        for name in cfg.fixed.keys().chain(cfg.bounds.keys()).chain(&cfg.search) {
            if !specs.iter().any(|s| s.name == name) {
                let known: Vec<&str> = specs.iter().map(|s| s.name).collect();
                return Err(bad(format!("{method_name} has no parameter '{name}' (it has: {})", known.join(", "))));
            }
        }
        let mut genes = Vec::new();
        for name in &cfg.search {
            if cfg.fixed.contains_key(name) {
                return Err(bad(format!("'{name}' is both searched and fixed")));
            }
            // Checked just above: every searched name is one of the method's parameters.
            let Some(spec) = specs.iter().find(|s| s.name == name) else { continue };
            let Kind::Float { min, max } = spec.kind else {
                return Err(bad(format!("'{name}' is not a real number; fix it (genome.fixed) instead of searching it")));
            };
            let [lo, hi] = cfg.bounds.get(name).copied().unwrap_or([spec.search.0, spec.search.1]);
            if !(lo < hi && lo >= min && hi <= max) {
                return Err(bad(format!("bounds [{lo}, {hi}] of '{name}' must be increasing and inside its range [{min}, {max}]")));
            }
            let init = spec.default.map_or((lo + hi) / 2.0, |d| d.clamp(lo, hi));
            let model_slots: Vec<Option<usize>> = match spec.scope {
                Scope::PerModel => (0..models.len()).map(Some).collect(),
                Scope::Global => vec![None],
            };
            for m in &model_slots {
                for f in &filter_slots {
                    for (g, (s, e)) in groups.iter().enumerate() {
                        let mname = m.map_or("all".to_string(), |m| models[m].clone());
                        let fname = f.map_or("rest", |f| cfg.filters[f].as_str());
                        genes.push(Gene {
                            name: format!("{name}[m={mname},f={fname},g={s}-{}]", e - 1),
                            param: spec.name,
                            model: *m,
                            filter: *f,
                            group: g,
                            lower: lo,
                            upper: hi,
                            init,
                        });
                    }
                }
            }
        }
        if genes.is_empty() {
            return Err(bad("no parameter to search (genome.search is empty)"));
        }
        Ok(Self { method, models, base, layers, groups, filters: cfg.filters.clone(), smooth: cfg.smooth, fixed: cfg.fixed.clone(), genes, probes })
    }

    pub fn genes(&self) -> &[Gene] {
        &self.genes
    }

    pub fn dim(&self) -> usize {
        self.genes.len()
    }

    /// Layer ranges `[start, end)` of the groups.
    pub fn groups(&self) -> &[(usize, usize)] {
        &self.groups
    }

    /// The start genome.
    pub fn initial(&self) -> Vec<f64> {
        self.genes.iter().map(|g| g.init).collect()
    }

    /// Genomes that reproduce the source models (other genes at their start values), where the
    /// method and the bounds can express one:
    /// - a searched per-model `weight`: for each model, its weights at 1 and the others' at 0
    ///   (task arithmetic, TIES, DARE, …: the base plus that model's task vector, i.e. the
    ///   model itself up to sparsification; linear and the slerp family: that model alone);
    /// - slerp's searched `t`: 0 (the base model) and 1 (the other model).
    ///
    /// Values are clamped into the bounds (an upper bound below 1 gives the nearest corner); none
    /// is returned when the bounds exclude 0, as the other models could not be switched off.
    /// NSGA-II seeds its first population with them when the experiment sets
    /// `optimizer.seed_sources`, so that the trade-off's ends (each expert's skill) are on the
    /// front from the start.
    pub fn source_genomes(&self) -> Vec<Vec<f64>> {
        let start = self.initial();
        let mut out: Vec<Vec<f64>> = Vec::new();
        let mut push = |g: Vec<f64>| {
            if g != start && !out.contains(&g) {
                out.push(g);
            }
        };
        let weight: Vec<usize> = (0..self.genes.len()).filter(|&i| self.genes[i].param == "weight" && self.genes[i].model.is_some()).collect();
        if !weight.is_empty() {
            if weight.iter().any(|&i| self.genes[i].lower > 0.0 || self.genes[i].upper <= 0.0) {
                return out;
            }
            for m in 0..self.models.len() {
                let mut g = start.clone();
                for &i in &weight {
                    let gene = &self.genes[i];
                    g[i] = if gene.model == Some(m) { 1.0_f64.clamp(gene.lower, gene.upper) } else { 0.0 };
                }
                push(g);
            }
        } else if self.method.name() == "slerp" {
            // `t` is slerp's only parameter: when searched, every gene is a `t` gene.
            for end in [0.0_f64, 1.0] {
                push(self.genes.iter().map(|g| end.clamp(g.lower, g.upper)).collect());
            }
        }
        out
    }

    /// Per-layer values from one gene block (one value per group).
    fn per_layer(&self, block: &[f64]) -> Vec<f64> {
        (0..self.layers)
            .map(|l| {
                let g = self.groups.iter().position(|&(s, e)| l >= s && l < e).unwrap_or(0);
                if !self.smooth || self.groups.len() == 1 {
                    return block[g];
                }
                let centre = |g: usize| (self.groups[g].0 + self.groups[g].1 - 1) as f64 / 2.0;
                let x = l as f64;
                if x <= centre(0) {
                    return block[0];
                }
                let last = self.groups.len() - 1;
                if x >= centre(last) {
                    return block[last];
                }
                let k = (0..last).find(|&k| x >= centre(k) && x <= centre(k + 1)).unwrap_or(0);
                let f = (x - centre(k)) / (centre(k + 1) - centre(k));
                block[k] + (block[k + 1] - block[k]) * f
            })
            .collect()
    }

    /// The mergekit setting of parameter `param` for model slot `model` from `genome`.
    fn setting(&self, genome: &[f64], param: &str, model: Option<usize>) -> ParamSetting {
        let ng = self.groups.len();
        let value = |filter: Option<usize>| {
            let start = self.genes.iter().position(|g| g.param == param && g.model == model && g.filter == filter).unwrap_or(0);
            let layer_values = self.per_layer(&genome[start..start + ng]);
            if layer_values.len() == 1 { Value::Number(layer_values[0]) } else { Value::Gradient(layer_values) }
        };
        if self.filters.is_empty() {
            return ParamSetting::Plain(value(None));
        }
        let mut entries: Vec<FilteredValue> =
            (0..self.filters.len()).map(|f| FilteredValue { filter: Some(self.filters[f].clone()), value: value(Some(f)) }).collect();
        if self.genes.iter().any(|g| g.param == param && g.filter.is_none()) {
            entries.push(FilteredValue { filter: None, value: value(None) });
        }
        ParamSetting::Filtered(entries)
    }

    /// The recipe of `genome` (checked: length and bounds).
    pub fn decode(&self, genome: &[f64]) -> Result<Recipe> {
        if genome.len() != self.dim() {
            return Err(bad(format!("genome has {} values, the layout {}", genome.len(), self.dim())));
        }
        for (g, x) in self.genes.iter().zip(genome) {
            if !(x.is_finite() && *x >= g.lower && *x <= g.upper) {
                return Err(bad(format!("gene {} = {x} is outside [{}, {}]", g.name, g.lower, g.upper)));
            }
        }
        let specs = self.method.params();
        let mut global = ParamMap::new();
        let mut per_model: Vec<ParamMap> = vec![ParamMap::new(); self.models.len()];
        for (name, v) in &self.fixed {
            let scope = specs.iter().find(|s| s.name == name).map_or(Scope::Global, |s| s.scope);
            let setting = ParamSetting::Plain(Value::Number(*v));
            match scope {
                Scope::Global => {
                    global.insert(name.clone(), setting);
                }
                Scope::PerModel => per_model.iter_mut().for_each(|p| {
                    p.insert(name.clone(), setting.clone());
                }),
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for g in &self.genes {
            if seen.contains(&g.param) {
                continue;
            }
            seen.push(g.param);
            match g.model {
                None => {
                    global.insert(g.param.to_string(), self.setting(genome, g.param, None));
                }
                Some(_) => {
                    for (m, p) in per_model.iter_mut().enumerate() {
                        p.insert(g.param.to_string(), self.setting(genome, g.param, Some(m)));
                    }
                }
            }
        }
        Ok(Recipe {
            merge_method: self.method.name().to_string(),
            slices: None,
            models: Some(self.models.iter().zip(per_model).map(|(m, parameters)| InputModel { model: m.clone(), parameters }).collect()),
            parameters: global,
            base_model: self.base.clone(),
            dtype: Some("float32".into()),
            out_dtype: None,
            tokenizer_source: None,
            tokenizer: None,
            chat_template: None,
            name: None,
        })
    }

    /// The merge plan of `genome` over checkpoints opened once in `opened` (no file is opened
    /// per candidate). Its `recipe_text` is empty: a plan for memory; to write a checkpoint,
    /// render [`decode`](Self::decode)'s recipe as YAML and build with that text.
    pub fn plan(&self, genome: &[f64], opened: &OpenedCheckpoints, seed: u64) -> Result<MergePlan> {
        MergePlan::build_with(&self.decode(genome)?, String::new(), None, seed, opened)
    }

    /// Reads a genome back from a recipe this layout wrote (the value at each group's first
    /// layer, for each filter's probe tensor). `encode(decode(x)) == x` for stepped layouts.
    pub fn encode(&self, recipe: &Recipe) -> Result<Vec<f64>> {
        let models = recipe.models.as_deref().unwrap_or_default();
        self.genes
            .iter()
            .map(|g| {
                let map = match g.model {
                    None => &recipe.parameters,
                    Some(m) => &models.get(m).ok_or_else(|| bad("recipe has fewer models than the layout"))?.parameters,
                };
                let setting = map.get(g.param).ok_or_else(|| bad(format!("recipe lacks '{}'", g.param)))?;
                let probe = match g.filter {
                    Some(f) => &self.probes[f],
                    None => self.probes.last().ok_or_else(|| bad("no probe tensor"))?,
                };
                let layer = self.groups[g.group].0;
                let t = if self.layers > 1 { layer as f64 / (self.layers - 1) as f64 } else { 1.0 };
                setting.resolve(probe, t).map_err(|e| bad(e.to_string()))?.ok_or_else(|| bad(format!("no value of '{}' for {probe}", g.param)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> &'static Architecture {
        Architecture::registry().iter().find(|a| a.name == "llama").expect("llama")
    }

    fn cfg(search: &[&str], per: usize, filters: &[&str]) -> GenomeConfig {
        GenomeConfig {
            search: search.iter().map(|s| s.to_string()).collect(),
            layers_per_group: per,
            filters: filters.iter().map(|s| s.to_string()).collect(),
            smooth: false,
            bounds: BTreeMap::new(),
            fixed: BTreeMap::new(),
        }
    }

    fn layout(c: &GenomeConfig, layers: usize) -> Result<GenomeLayout> {
        GenomeLayout::new("ties", vec!["a".into(), "b".into()], Some("base".into()), llama(), layers, c)
    }

    #[test]
    fn gene_count_names_and_uneven_groups() {
        // 2 per-model params × 2 models × (2 filters + rest) × ceil(10 / 4) = 3 groups.
        let l = layout(&cfg(&["weight", "density"], 4, &["self_attn", "mlp"]), 10).expect("layout");
        assert_eq!(l.dim(), 2 * 2 * 3 * 3);
        assert_eq!(l.groups(), &[(0, 4), (4, 8), (8, 10)], "the last group is shorter");
        assert_eq!(l.genes()[0].name, "weight[m=a,f=self_attn,g=0-3]");
        assert_eq!(l.genes()[8].name, "weight[m=a,f=rest,g=8-9]");
        // One group when the group is larger than the model.
        assert_eq!(layout(&cfg(&["weight"], 64, &[]), 10).expect("l").dim(), 2);
    }

    #[test]
    fn empty_groups_and_bounds_of_unsearched_parameters_are_refused() {
        let e = layout(&cfg(&["weight"], 0, &[]), 4).expect_err("layers_per_group = 0").to_string();
        assert!(e.contains("layers_per_group = 0"), "{e}");
        let mut c = cfg(&["weight"], 1, &[]);
        c.bounds.insert("density".into(), [0.1, 0.9]);
        let e = layout(&c, 4).expect_err("bounds of an unsearched parameter").to_string();
        assert!(e.contains("'density', which is not searched"), "{e}");
    }

    #[test]
    fn decode_encode_round_trip_and_per_layer_values() {
        let l = layout(&cfg(&["weight", "density"], 3, &["mlp"]), 7).expect("layout");
        let genome: Vec<f64> = l.genes().iter().enumerate().map(|(i, g)| g.lower + (g.upper - g.lower) * ((i * 37 % 11) as f64 / 10.0)).collect();
        let recipe = l.decode(&genome).expect("decode");
        let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        // (mergekit's t = l/(n−1) scaled back by n−1 is exact up to an ulp)
        assert!(close(&l.encode(&recipe).expect("encode"), &genome));
        // Layer 5 (group 1 of [0,3) [3,6) [6,7)) of model b's MLP reads that gene exactly.
        let want = l.genes().iter().position(|g| g.param == "weight" && g.model == Some(1) && g.filter == Some(0) && g.group == 1).expect("gene");
        let b = &recipe.models.as_ref().expect("models")[1];
        let v = b.parameters["weight"].resolve("model.layers.5.mlp.up_proj.weight", 5.0 / 6.0).expect("ok").expect("some");
        assert!((v - genome[want]).abs() < 1e-12);
        // The recipe plans like a hand-written one (parameters validated by the method).
        let yaml = serde_norway::to_string(&recipe).expect("yaml");
        let back = Recipe::parse(&yaml, "decoded").expect("parses back");
        assert!(close(&l.encode(&back).expect("encode"), &genome));
    }

    #[test]
    fn source_genomes_switch_on_one_model_at_a_time() {
        let mut c = cfg(&["weight", "density"], 2, &[]);
        c.bounds.insert("weight".into(), [0.0, 1.25]);
        let l = layout(&c, 4).expect("layout");
        let sources = l.source_genomes();
        assert_eq!(sources.len(), 2, "one per model");
        for (m, g) in sources.iter().enumerate() {
            let recipe = l.decode(g).expect("in bounds");
            let models = recipe.models.as_ref().expect("models");
            for (k, input) in models.iter().enumerate() {
                let w = input.parameters["weight"].resolve("model.layers.3.mlp.up_proj.weight", 1.0).expect("ok").expect("some");
                assert_eq!(w, if k == m { 1.0 } else { 0.0 }, "model {k} in source genome {m}");
            }
            // Genes other than the weights keep their start values.
            for (i, gene) in l.genes().iter().enumerate().filter(|(_, g)| g.param == "density") {
                assert_eq!(g[i], gene.init);
            }
        }
        // An upper bound below 1 gives the nearest corner; a lower bound above 0 gives none.
        c.bounds.insert("weight".into(), [0.0, 0.5]);
        assert!(layout(&c, 4).expect("l").source_genomes().iter().all(|g| g.iter().take(4).any(|&x| x == 0.5)));
        c.bounds.insert("weight".into(), [0.2, 1.0]);
        assert!(layout(&c, 4).expect("l").source_genomes().is_empty());
        // Slerp: t = 0 (the base) and t = 1.
        let s = GenomeLayout::new("slerp", vec!["b".into()], Some("a".into()), llama(), 4, &cfg(&["t"], 4, &[])).expect("slerp");
        assert_eq!(s.source_genomes(), vec![vec![0.0], vec![1.0]]);
        // Methods without either parameter have none.
        let d = GenomeLayout::new("ties", vec!["a".into()], Some("b".into()), llama(), 4, &cfg(&["density"], 4, &[])).expect("ties");
        assert!(d.source_genomes().is_empty());
    }

    #[test]
    fn smooth_layouts_interpolate_between_group_centres() {
        let mut c = cfg(&["weight"], 2, &[]);
        c.smooth = true;
        let l = layout(&c, 6).expect("layout"); // groups [0,2) [2,4) [4,6), centres 0.5 2.5 4.5
        let block = [0.0, 1.0, 0.5];
        let v = l.per_layer(&block);
        assert_eq!(v[0], 0.0);
        for (l, want) in [(1, 0.25), (2, 0.75), (3, 0.875), (4, 0.625)] {
            assert!((v[l] - want).abs() < 1e-12, "layer {l}: {} vs {want}", v[l]);
        }
        assert_eq!(v[5], 0.5);
    }

    #[test]
    fn bad_configs_are_named() {
        let e = layout(&cfg(&["wieght"], 1, &[]), 4).expect_err("typo").to_string();
        assert!(e.contains("no parameter 'wieght'") && e.contains("density"), "{e}");
        let e = layout(&cfg(&["weight"], 1, &["ffn"]), 4).expect_err("filter").to_string();
        assert!(e.contains("filter 'ffn' matches no layer tensor"), "{e}");
        let mut c = cfg(&["density"], 1, &[]);
        c.bounds.insert("density".into(), [0.5, 1.5]);
        let e = layout(&c, 4).expect_err("bounds").to_string();
        assert!(e.contains("inside its range"), "{e}");
        let l = layout(&cfg(&["weight"], 1, &[]), 4).expect("layout");
        let mut g = l.initial();
        g[0] = 99.0;
        assert!(l.decode(&g).expect_err("out of bounds").to_string().contains("outside"));
        assert!(l.decode(&g[1..]).is_err());
        assert!(GenomeLayout::new("nope", vec!["a".into()], None, llama(), 4, &cfg(&["weight"], 1, &[])).is_err());
    }
}
