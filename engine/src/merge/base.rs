//! The [`MergeMethod`] trait and the parameter declarations every method makes.
//!
//! A method declares its parameters once, as [`ParamSpec`]s (name, scope, kind, valid range,
//! default, the range a search explores). Recipes are validated against them and the search
//! genome is built from them; nothing else lists a method's parameters.

use std::fmt::Debug;

use crate::buffer::HugeBuf;
use crate::merge::error::MergeError;

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
    pub fn check(&self, v: f64) -> Result<(), MergeError> {
        let ok = match self.kind {
            Kind::Float { min, max } => v.is_finite() && v >= min && v <= max,
            Kind::Int { min, max } => v.fract() == 0.0 && v >= min as f64 && v <= max as f64,
            Kind::Bool => v == 0.0 || v == 1.0,
        };
        if ok {
            return Ok(());
        }
        Err(match self.kind {
            Kind::Float { min, max } => MergeError::OutOfRange { name: self.name, value: v, min, max },
            Kind::Int { min, max } => MergeError::NotAnInteger { name: self.name, value: v, min, max },
            Kind::Bool => MergeError::NotABoolean { name: self.name, value: v },
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
        self.tensors.iter().zip(&self.model_params).enumerate().filter(move |(i, _)| Some(*i) != self.base).map(|(_, (t, p))| (*t, p))
    }

    /// The base tensor, or an error naming the method.
    pub fn base_tensor(&self) -> Result<&[f32], MergeError> {
        self.base.map(|b| self.tensors[b]).ok_or(MergeError::NoBase)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Lazy, chunked access to a tensor's inputs, decoded to f32 on demand.
pub trait InputReader: Sync {
    /// Number of inputs.
    fn count(&self) -> usize;
    /// Decodes elements `start .. start + out.len()` of input `i`.
    fn read(&self, i: usize, start: usize, out: &mut [f32]);
    /// Decodes single elements of input `i` at `positions` (for sampling).
    fn read_points(&self, i: usize, positions: &[usize], out: &mut [f32]);
}

/// Reads from in-memory f32 tensors (tests, and callers that already hold the inputs).
#[derive(Debug)]
pub struct SliceReader<'a>(pub Vec<&'a [f32]>);

impl InputReader for SliceReader<'_> {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn read(&self, i: usize, start: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.0[i][start..start + out.len()]);
    }
    fn read_points(&self, i: usize, positions: &[usize], out: &mut [f32]) {
        out.iter_mut().zip(positions).for_each(|(o, &p)| *o = self.0[i][p]);
    }
}

/// What a streaming merge sees: a [`MergeInput`] whose tensors are read on demand.
#[derive(Debug, Clone, Copy)]
pub struct StreamInput<'a> {
    pub tensor: &'a str,
    pub shape: &'a [usize],
    pub reader: &'a dyn InputReader,
    pub base: Option<usize>,
    pub model_params: &'a [Params],
    pub params: &'a Params,
    pub seed: u64,
}

impl std::fmt::Debug for dyn InputReader + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InputReader({} inputs)", self.count())
    }
}

impl StreamInput<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Receives a streaming merge's output, chunk by chunk, in order.
pub type ChunkSink<'a> = dyn FnMut(&[f32]) -> Result<(), MergeError> + 'a;

/// Elements per streamed chunk: small enough that the working set of a few inputs stays in
/// cache and never needs fresh memory, large enough to amortize the parallel split.
pub const STREAM_CHUNK: usize = 1 << 18;

/// Elements per sub-chunk of [`stream_elementwise`]: the inputs' slices of one sub-chunk stay
/// in L2.
const SUB_CHUNK: usize = 1 << 14;

thread_local! {
    /// Per-thread decoded input slices of one sub-chunk.
    static SUB_INPUTS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Streams an [`MergeMethod::elementwise`] method: per chunk, every sub-chunk is decoded from
/// all inputs into per-thread buffers and merged straight into the output chunk (one parallel
/// pass, working set in L2), then the chunk is emitted.
pub fn stream_elementwise<M: MergeMethod + ?Sized>(
    m: &M,
    input: &StreamInput,
    scratch: &mut Scratch,
    sink: &mut ChunkSink,
) -> Result<(), MergeError> {
    use rayon::prelude::*;
    let n = input.numel();
    let k = input.reader.count();
    let out = &mut scratch.buffers(1, STREAM_CHUNK.min(n.max(1)))[0];
    let mut start = 0;
    while start < n {
        let len = STREAM_CHUNK.min(n - start);
        out[..len].par_chunks_mut(SUB_CHUNK).enumerate().try_for_each(|(c, o)| {
            SUB_INPUTS.with_borrow_mut(|buf| {
                buf.resize(k * SUB_CHUNK, 0.0);
                let from = start + c * SUB_CHUNK;
                for (i, b) in buf.chunks_mut(SUB_CHUNK).enumerate() {
                    input.reader.read(i, from, &mut b[..o.len()]);
                }
                let sub = MergeInput {
                    tensor: input.tensor,
                    shape: &[o.len()],
                    tensors: buf.chunks(SUB_CHUNK).map(|b| &b[..o.len()]).collect(),
                    base: input.base,
                    model_params: input.model_params.to_vec(),
                    params: input.params.clone(),
                    seed: input.seed,
                };
                m.merge(&sub, &mut Scratch::default(), o)
            })
        })?;
        sink(&out[..len])?;
        start += len;
    }
    Ok(())
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
    fn merge(&self, input: &MergeInput, scratch: &mut Scratch, out: &mut [f32]) -> Result<(), MergeError>;

    /// Merges without whole-tensor buffers: reads the inputs in chunks (in as many passes as
    /// it needs) and hands the output to `sink` in order. Returns `Ok(false)`, having called
    /// `sink` never, when it cannot for this tensor; the executor then uses
    /// [`merge`](Self::merge). The default streams [`elementwise`](Self::elementwise) methods.
    fn merge_streaming(&self, input: &StreamInput, scratch: &mut Scratch, sink: &mut ChunkSink) -> Result<bool, MergeError> {
        if !self.elementwise() {
            return Ok(false);
        }
        stream_elementwise(self, input, scratch, sink)?;
        Ok(true)
    }
}

/// Reusable f32 buffers (kept across tensors by the executor).
///
/// Buffers are assigned by position, so a caller that always asks for the same layout reuses
/// the same memory.
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

    /// `n` buffers of `len` followed by `m` buffers of `len2`, as two slices.
    pub fn split(&mut self, n: usize, len: usize, m: usize, len2: usize) -> (&mut [HugeBuf<f32>], &mut [HugeBuf<f32>]) {
        let bufs = self.buffers(n + m, 0);
        let (a, b) = bufs.split_at_mut(n);
        a.iter_mut().for_each(|x| x.resize(len));
        b.iter_mut().for_each(|x| x.resize(len2));
        (a, b)
    }
}

/// Runs `m` with a fresh scratch and returns the output (convenient for tests and small tensors).
pub fn merge_to_vec(m: &dyn MergeMethod, input: &MergeInput) -> Result<Vec<f32>, MergeError> {
    let mut out = vec![0f32; input.numel()];
    m.merge(input, &mut Scratch::default(), &mut out)?;
    Ok(out)
}
