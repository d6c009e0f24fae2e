//! The model runtime: a decoder-only transformer forward pass that agrees with Hugging Face
//! transformers, follows data-flow [`LayerPath`]s, scores log-likelihoods in batches and
//! generates greedily with a KV cache.
//!
//! ```text
//! ModelSpec (config + architecture + TensorSource: checkpoint dir or merged tensors in memory)
//!     │ open(DeviceSpec, &[ModelSpec])        weights uploaded once, linear weights stored
//!     ▼                                        transposed ([in, out]) and fused (qkv, gate|up)
//! Box<dyn LanguageModel>  ── Runtime<B: burn Backend> (ndarray on CPU, burn-cuda on NVIDIA)
//!     │ set_path(LayerPath)                    hops (model, layer, scale) over all loaded models
//!     ▼
//! logits / score (context, continuation) / generate (prompts, KV cache, stops)
//! ```
//!
//! One implementation serves Llama, Mistral (sliding-window attention), Qwen2 (q/k/v biases,
//! tied embeddings) and Qwen3 (per-head q/k RMSNorm): the differences are read from the config
//! and from which tensors the checkpoint holds. The backend generic stays in this module;
//! callers hold a `Box<dyn LanguageModel>`.

mod device;
mod kernels;
mod passes;
mod path;
pub mod rope;
mod runtime;
mod spec;
mod tokenizer;
#[cfg(feature = "libtorch")]
mod torch;

use std::path::Path;

pub use device::DeviceSpec;
pub use path::{Hop, LayerPath};
pub use spec::{Dims, ModelSpec};
pub use tokenizer::Tokenizer;

pub(crate) use runtime::transpose_concat_into;

use crate::error::{EngineError, Result};
use crate::source::TensorSource;

/// One log-likelihood request: score `continuation` given `context` (lm-eval-harness
/// `loglikelihood`). The context must hold at least one token (BOS where the model uses one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// The answer to a [`ScoreRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreResult {
    /// log P(continuation[i] | context, continuation[..i]), natural log.
    pub logprobs: Vec<f64>,
    /// Sum of `logprobs`.
    pub sum: f64,
    /// Every continuation token was the argmax at its position (lm-eval's `is_greedy`).
    pub greedy: bool,
}

/// Settings of greedy generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Token ids that end a generation (kept out of the output).
    pub eos: Vec<u32>,
    /// Run the prefix that most prompts share once and start every prompt from its keys and
    /// values (several prompts only; the greedy ids are those of unshared generation up to
    /// float rounding).
    pub share_prefix: bool,
    /// Prompts decoded together, in order (0: all of them). The shared prefix still runs once
    /// for all of them, not once per batch.
    pub batch_size: usize,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The caller's stop test (stop sequences) said so.
    Stop,
    /// The model's context is full.
    ContextFull,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub reason: StopReason,
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// One label per loaded model (index = `Hop::model`).
    pub labels: Vec<String>,
    /// Layer count of each loaded model.
    pub layers: Vec<usize>,
    pub dims: Dims,
    /// Longest sequence (positions) the model accepts.
    pub max_context: usize,
    pub device: DeviceSpec,
    /// End-of-sequence ids of the first model's `config.json` (generation stops there).
    pub eos_token_ids: Vec<u32>,
}

/// One weight buffer of a loaded model, row-major `[rows, cols]` f32, and the checkpoint
/// tensors whose values it holds ([`LanguageModel::weight_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightBuffer {
    pub rows: usize,
    pub cols: usize,
    /// Side by side, covering columns `0 .. cols` in order.
    pub parts: Vec<WeightPart>,
}

/// A checkpoint tensor's place in a [`WeightBuffer`]: columns `col .. col + width` of every row.
///
/// `transposed` (linear weights, which the runtime stores `[in, out]`): the tensor is
/// `[width, rows]` and `buffer[i][col + o] = tensor[o][i]`. Otherwise the tensor is
/// `[rows, width]` (a 1-D tensor counts as one row) and `buffer[i][col + c] = tensor[i][c]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightPart {
    pub tensor: String,
    pub col: usize,
    pub width: usize,
    pub transposed: bool,
}

impl WeightBuffer {
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }
}

/// An elementwise merge of inputs held on the runtime's device ([`LanguageModel::hold_inputs`]),
/// for one [`WeightPart`] (`col`, `width`) of a buffer. Input `k` is the `k`-th held input.
/// The f32 operations and their order are those of the CPU kernels (`merge::generalized`'s
/// fused task arithmetic, `merge::linear`), so a backend that computes f32 exactly as IEEE
/// (burn-ndarray) gives the same bits.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldMerge {
    /// `x_base + finish(((0 + (x₀ − x_base)·w₀) + (x₁ − x_base)·w₁) + …)`, finish = `/ divisor`
    /// (if any) then `· lambda` (if any).
    TaskArithmetic { base: usize, terms: Vec<(usize, f32)>, divisor: Option<f32>, lambda: Option<f32> },
    /// `((0 + w₀·x₀) + w₁·x₁) + …`, then `/ divisor` (if any).
    Linear { terms: Vec<(usize, f32)>, divisor: Option<f32> },
}

/// Columns `col .. col + width` of a weight buffer and how they are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldPart {
    pub col: usize,
    pub width: usize,
    pub merge: HeldMerge,
}

/// The parts of weight buffer `index`, side by side covering all its columns in order.
pub type HeldParts<'a> = dyn FnMut(usize) -> Result<Vec<HeldPart>> + 'a;

/// Writes input `k` of weight buffer `index` in the buffer's layout: `fill(index, k, values)`.
pub type HeldFill<'a> = dyn FnMut(usize, usize, &mut [f32]) -> Result<()> + 'a;

/// Writes the values of weight buffer `index` (of [`LanguageModel::weight_layout`]) into the
/// slice, overwriting every element.
pub type WeightFill<'a> = dyn FnMut(usize, &mut [f32]) -> Result<()> + 'a;

/// A runnable language model, object-safe so that callers do not see the backend.
pub trait LanguageModel: Send {
    fn info(&self) -> &ModelInfo;

    /// The layer path the forward pass follows.
    fn path(&self) -> &LayerPath;

    /// Follows `path` from now on (validated against the loaded models; no weights move).
    fn set_path(&mut self, path: LayerPath) -> Result<()>;

    /// Full next-token logits of one sequence, row-major `[tokens.len(), vocab]`.
    fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>>;

    /// Log-likelihoods of continuations, `batch_size` sequences per forward pass (sorted by
    /// length so that padding is small). Results are in request order.
    fn score(&mut self, requests: &[ScoreRequest], batch_size: usize) -> Result<Vec<ScoreResult>>;

    /// [`score`](Self::score) with every prefix that several requests share run through the
    /// model once: a common root (a fixed few-shot prefix) once per call, each distinct
    /// context once, and only the continuations after it per request (single-token
    /// continuations read off the context's last position). Results agree with `score` up to
    /// float rounding (other matrix shapes sum in another order). `batch_size` bounds the
    /// contexts of a pass; the continuations after them take as many rows per pass as fit in
    /// that pass's positions.
    fn score_shared(&mut self, requests: &[ScoreRequest], batch_size: usize) -> Result<Vec<ScoreResult>>;

    /// Tokens run through the model since it was opened, padding excluded: what scoring and
    /// generation really computed (a shared prefix counts once).
    fn tokens_run(&self) -> u64;

    /// Greedy continuations of a batch of prompts (left-padded, KV cache). `stop(i, tokens)` is
    /// asked after every new token of prompt `i`; returning true ends that generation
    /// (text-level stop sequences live there).
    fn generate(&mut self, prompts: &[Vec<u32>], opts: &GenerateOptions, stop: &dyn Fn(usize, &[u32]) -> bool) -> Result<Vec<Generation>>;

    /// Replaces the weights of loaded model `model` by those of `source` (same shapes), tensor
    /// by tensor, keeping everything else (other models, path, tables) in place.
    fn load_weights(&mut self, model: usize, source: &dyn TensorSource) -> Result<()>;

    /// The weight buffers of loaded model `model`, in a fixed order, and which checkpoint
    /// tensors fill each: what a caller needs to compute weights straight into the runtime's
    /// layout ([`write_weights`](Self::write_weights)).
    fn weight_layout(&self, model: usize) -> Result<Vec<WeightBuffer>>;

    /// Rewrites model `model`'s weights in place, buffer by buffer in layout order:
    /// `fill(index, values)` must overwrite all of buffer `index`. On the CPU the buffers are
    /// the tensors' own memory (no allocation, no copy); on a GPU they are host staging
    /// buffers uploaded after each fill. If `fill` fails, the runtime refuses further work
    /// until weights are loaded again.
    fn write_weights(&mut self, model: usize, fill: &mut WeightFill<'_>) -> Result<()>;

    /// Copies `count` merge inputs of every weight buffer of model `model` to the runtime's
    /// device (in its float dtype), for [`merge_held`](Self::merge_held): `fill(index, k,
    /// values)` writes input `k` of buffer `index` in the buffer's layout. Replaces inputs held
    /// before. Returns `false` (holding nothing) where the runtime does not merge on its device.
    fn hold_inputs(&mut self, model: usize, count: usize, fill: &mut HeldFill<'_>) -> Result<bool> {
        let _ = (model, count, fill);
        Ok(false)
    }

    /// Frees the inputs held by [`hold_inputs`](Self::hold_inputs), if any.
    fn release_held(&mut self) {}

    /// Merges the held inputs into model `model`'s weights on the device, buffer by buffer,
    /// rounding through `round` (the merge's output dtype). Returns `false`, changing nothing,
    /// when no inputs are held for `model`.
    fn merge_held(&mut self, model: usize, parts: &mut HeldParts<'_>, round: crate::dtype::DType) -> Result<bool> {
        let _ = (model, parts, round);
        Ok(false)
    }
}

/// Which implementation runs the forward pass: burn (ndarray on the CPU, burn-cuda on NVIDIA;
/// always built) or LibTorch (PyTorch's kernels through tch; `--features libtorch`). Both
/// implement the same [`LanguageModel`] and give the same results up to float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    #[default]
    Burn,
    Libtorch,
}

impl RuntimeKind {
    /// Whether this binary has the runtime (LibTorch needs `--features libtorch`).
    pub fn is_compiled_in(self) -> bool {
        match self {
            RuntimeKind::Burn => true,
            RuntimeKind::Libtorch => cfg!(feature = "libtorch"),
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuntimeKind::Burn => "burn",
            RuntimeKind::Libtorch => "libtorch",
        })
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "burn" => Ok(RuntimeKind::Burn),
            "libtorch" | "torch" => Ok(RuntimeKind::Libtorch),
            other => Err(EngineError::InvalidInput(format!("unknown runtime '{other}': expected 'burn' or 'libtorch'"))),
        }
    }
}

/// Opens `models` on `device` with `runtime`; the path starts as the identity path of model 0.
pub fn open(runtime: RuntimeKind, device: DeviceSpec, models: &[ModelSpec<'_>]) -> Result<Box<dyn LanguageModel>> {
    if models.is_empty() {
        return Err(EngineError::InvalidInput("no model to open".into()));
    }
    check_device(runtime, device)?;
    match (runtime, device) {
        (RuntimeKind::Libtorch, _) => open_libtorch(device, models),
        (RuntimeKind::Burn, DeviceSpec::Cpu) => {
            let rt = runtime::Runtime::<burn::backend::NdArray<f32>>::new(Default::default(), device, models)?;
            Ok(Box::new(rt))
        }
        (RuntimeKind::Burn, DeviceSpec::Cuda(index)) => open_cuda(index, models),
    }
}

/// Whether this build can open `device` with `runtime` at all (burn on a CUDA device needs
/// `--features cuda`, LibTorch needs `--features libtorch`); whether the GPU is there is known
/// when it is opened.
pub fn check_device(runtime: RuntimeKind, device: DeviceSpec) -> Result<()> {
    match (runtime, device) {
        (RuntimeKind::Libtorch, _) if !cfg!(feature = "libtorch") => Err(EngineError::Device {
            device: device.to_string(),
            reason: "this evomerge was built without the LibTorch runtime; rebuild with `--features libtorch` (README, \"LibTorch runtime\")".into(),
        }),
        (RuntimeKind::Burn, DeviceSpec::Cuda(index)) if !cfg!(feature = "cuda") => Err(EngineError::Device {
            device: DeviceSpec::Cuda(index).to_string(),
            reason: "this evomerge was built without CUDA support; rebuild with `--features cuda` (or use `--runtime libtorch` in a libtorch build)"
                .into(),
        }),
        _ => Ok(()),
    }
}

#[cfg(feature = "libtorch")]
fn open_libtorch(device: DeviceSpec, models: &[ModelSpec<'_>]) -> Result<Box<dyn LanguageModel>> {
    Ok(Box::new(torch::TorchRuntime::new(device, models)?))
}

#[cfg(not(feature = "libtorch"))]
fn open_libtorch(device: DeviceSpec, _models: &[ModelSpec<'_>]) -> Result<Box<dyn LanguageModel>> {
    check_device(RuntimeKind::Libtorch, device).map(|()| unreachable!("checked: no LibTorch in this build"))
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize, models: &[ModelSpec<'_>]) -> Result<Box<dyn LanguageModel>> {
    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::{bf16, f16};

    use crate::dtype::DType;
    let dev = CudaDevice::new(index);
    let spec = DeviceSpec::Cuda(index);
    // Keep the checkpoint dtype on the GPU (halves memory traffic for bf16/f16 checkpoints).
    Ok(match models[0].config.dtype {
        Some(DType::BF16) => Box::new(runtime::Runtime::<Cuda<bf16, i32>>::new(dev, spec, models)?),
        Some(DType::F16) => Box::new(runtime::Runtime::<Cuda<f16, i32>>::new(dev, spec, models)?),
        _ => Box::new(runtime::Runtime::<Cuda<f32, i32>>::new(dev, spec, models)?),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(index: usize, _models: &[ModelSpec<'_>]) -> Result<Box<dyn LanguageModel>> {
    check_device(RuntimeKind::Burn, DeviceSpec::Cuda(index)).map(|()| unreachable!("checked: no CUDA in this build"))
}

/// Opens one checkpoint directory (the common case: `evomerge score --model DIR`).
pub fn open_dir(runtime: RuntimeKind, device: DeviceSpec, dir: &Path) -> Result<Box<dyn LanguageModel>> {
    let ck = crate::io::Checkpoint::open(dir, dir.display().to_string())?;
    // the same checks `merge` makes: every tensor the architecture requires, in a dtype we read
    // (a Qwen2 config over Llama tensors lacks its q/k/v biases)
    ck.validate()?;
    open(runtime, device, &[ModelSpec::from_checkpoint(&ck)])
}
