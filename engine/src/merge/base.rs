//! The [`MergeMethod`] trait and the parameter declarations every method makes.
//!
//! A method declares its parameters once, as [`ParamSpec`]s (name, scope, kind, valid range,
//! default, the range a search explores). Recipes are validated against them and the search
//! genome is built from them; nothing else lists a method's parameters.

use std::fmt::Debug;

use crate::buffer::HugeBuf;

/// Whether a parameter is set once for the merge or once per input model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    PerModel,
}

/// The value type of a parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A real number in `[min, max]`.
    Float { min: f64, max: f64 },
    /// An integer in `[min, max]`.
    Int { min: i64, max: i64 },
    /// `true`/`false` (stored as 1.0/0.0).
    Bool,
}

/// One parameter of a merge method.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: Kind,
    /// `None` = required.
    pub default: Option<f64>,
    /// The interval a search explores by default (within the valid range).
    pub search: (f64, f64),
    /// Accepted for mergekit compatibility but without numerical effect.
    pub inert: bool,
    pub doc: &'static str,
}

impl ParamSpec {
    /// A real parameter.
    pub const fn float(name: &'static str, scope: Scope, min: f64, max: f64, default: Option<f64>, search: (f64, f64), doc: &'static str) -> Self {
        Self { name, scope, kind: Kind::Float { min, max }, default, search, inert: false, doc }
    }

    /// A boolean parameter.
    pub const fn bool(name: &'static str, scope: Scope, default: bool, doc: &'static str) -> Self {
        Self { name, scope, kind: Kind::Bool, default: Some(if default { 1.0 } else { 0.0 }), search: (0.0, 1.0), inert: false, doc }
    }

    /// An integer parameter.
    pub const fn int(name: &'static str, scope: Scope, min: i64, max: i64, default: i64, doc: &'static str) -> Self {
        Self { name, scope, kind: Kind::Int { min, max }, default: Some(default as f64), search: (min as f64, max as f64), inert: false, doc }
    }

    /// Marks the parameter as accepted-but-inert.
    pub const fn inert(mut self) -> Self {
        self.inert = true;
        self
    }

    /// Checks `v` against the kind and range.
    pub fn check(&self, v: f64) -> Result<(), String> {
        let ok = match self.kind {
            Kind::Float { min, max } => v.is_finite() && v >= min && v <= max,
            Kind::Int { min, max } => v.fract() == 0.0 && v >= min as f64 && v <= max as f64,
            Kind::Bool => v == 0.0 || v == 1.0,
        };
        if ok {
            return Ok(());
        }
        Err(match self.kind {
            Kind::Float { min, max } => format!("{} = {v} is outside [{min}, {max}]", self.name),
            Kind::Int { min, max } => format!("{} = {v} is not an integer in [{min}, {max}]", self.name),
            Kind::Bool => format!("{} = {v} is not a boolean", self.name),
        })
    }
}

/// Resolved parameter values for one tensor (defaults filled in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub Vec<(&'static str, f64)>);

impl Params {
    /// The value of `name`; 0.0 when the method did not declare it (a programming error that
    /// the registry test rules out).
    pub fn get(&self, name: &str) -> f64 {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).unwrap_or(0.0)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.get(name) != 0.0
    }

    pub fn set(&mut self, name: &'static str, v: f64) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = v,
            None => self.0.push((name, v)),
        }
    }
}

/// What a method does with `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRole {
    /// Needs one (task-vector methods).
    Required,
    /// Uses one if given.
    Optional,
    /// Has no notion of a base model (it is merged like any other input if listed).
    Unused,
}

/// Everything a method sees for one output tensor.
#[derive(Debug)]
pub struct MergeInput<'a> {
    /// Output tensor name (for messages and random streams).
    pub tensor: &'a str,
    pub shape: &'a [usize],
    /// The input tensors, in recipe order (the base model included if it is an input).
    pub tensors: Vec<&'a [f32]>,
    /// Position of the base model in `tensors`.
    pub base: Option<usize>,
    /// Per-model parameters, parallel to `tensors` (the base's may hold only defaults).
    pub model_params: Vec<Params>,
    /// Global parameters.
    pub params: Params,
    /// Seed of the random streams of this tensor (recipe seed mixed with the tensor name).
    pub seed: u64,
}

impl MergeInput<'_> {
    /// `(tensor, params)` of every non-base input.
    pub fn others(&self) -> impl Iterator<Item = (&[f32], &Params)> {
        self.tensors
            .iter()
            .zip(&self.model_params)
            .enumerate()
            .filter(move |(i, _)| Some(*i) != self.base)
            .map(|(_, (t, p))| (*t, p))
    }

    /// The base tensor, or an error naming the method.
    pub fn base_tensor(&self) -> Result<&[f32], String> {
        self.base.map(|b| self.tensors[b]).ok_or_else(|| "needs a base_model".to_string())
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A merge method: one file per method, its math in the doc comment.
pub trait MergeMethod: Send + Sync + Debug {
    /// The id used in recipes (`merge_method:`).
    fn name(&self) -> &'static str;
    /// Paper or reference for the math.
    fn reference(&self) -> &'static str;
    /// Every parameter the method reads.
    fn params(&self) -> Vec<ParamSpec>;
    fn base_role(&self) -> BaseRole;
    /// Exact number of inputs required (including the base when it is an input), if fixed.
    fn input_count(&self) -> Option<std::ops::RangeInclusive<usize>> {
        None
    }
    /// True when output element `e` depends only on element `e` of the inputs and on the
    /// parameters, so that merging any contiguous chunk gives that chunk of the whole-tensor
    /// result. The executor then streams such tensors chunk by chunk from the memory map to
    /// the writer, without whole-tensor f32 buffers.
    fn elementwise(&self) -> bool {
        false
    }
    /// Merges one tensor into `out` (`input.numel()` elements; its prior content is garbage).
    /// `scratch` holds reusable buffers so that large tensors do not fault in fresh memory on
    /// every call. Errors are plain reasons; the caller adds tensor and method.
    fn merge(&self, input: &MergeInput, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), String>;
}

/// Reusable f32 buffers (kept across tensors by the executor).
#[derive(Debug, Default)]
pub struct Scratch {
    bufs: Vec<HugeBuf<f32>>,
}

impl Scratch {
    /// `n` buffers of `len` elements each (contents unspecified).
    pub fn buffers(&mut self, n: usize, len: usize) -> &mut [HugeBuf<f32>] {
        if self.bufs.len() < n {
            self.bufs.resize_with(n, HugeBuf::default);
        }
        for b in &mut self.bufs[..n] {
            b.resize(len);
        }
        &mut self.bufs[..n]
    }
}

/// Runs `m` with a fresh scratch and returns the output (convenient for tests and small tensors).
pub fn merge_to_vec(m: &dyn MergeMethod, input: &MergeInput) -> Result<Vec<f32>, String> {
    let mut out = vec![0f32; input.numel()];
    m.merge(input, &mut Scratch::default(), &mut out)?;
    Ok(out)
}
