//! Candidates merged straight into a loaded model's weights: the search loop's hot path.
//!
//! [`crate::executor::merge_to_memory`] followed by [`LanguageModel::load_weights`] decodes
//! every input from its memory map, merges into fresh f32 tensors in checkpoint layout, then
//! transposes and fuses them into fresh runtime tensors: three passes over the model and two
//! model-sized allocations per candidate. For a search, whose candidates differ only in
//! parameters, [`ResidentMerge`] does the layout work once:
//!
//! ```text
//! setup      every input tensor of the plan, copied once in its checkpoint dtype into the
//!            runtime's layout (linear weights transposed to [in, out]; tied embeddings twice)
//! candidate  per weight buffer of the runtime, in parallel over blocks of rows:
//!              decode the block's inputs (L2-sized) → the method's elementwise merge →
//!              round through the output dtype → write into the runtime tensor's own memory
//! ```
//!
//! One pass, no allocation, no transpose per candidate. Only methods whose output element
//! depends on the same element of the inputs alone ([`MergeMethod::elementwise`]: linear,
//! task arithmetic, nearswap, passthrough) can be merged in another layout; the others keep the
//! streamed path. Values equal the streamed path's bit for bit (the same kernel on the same
//! f32 inputs, the same rounding), which `tests/it` checks.
//!
//! Memory: the resident copies take Σ over inputs of the model's size in its checkpoint dtype
//! (plus a tied embedding a second time), in place of the streamed path's merged f32 copy.

use std::collections::HashMap;
use std::path::PathBuf;

use rayon::prelude::*;

use crate::dtype::{self, DType};
use crate::error::{EngineError, Result};
use crate::merge::MergeInput;
use crate::merge::base::Scratch;
use crate::merge::generalized::plain_divisor;
use crate::merge::linear;
use crate::merge::rng::tensor_seed;
use crate::model::{HeldMerge, HeldPart, LanguageModel, WeightBuffer, WeightPart, transpose_concat_into};
use crate::recipe::{MergePlan, TensorTask};

/// Elements of one block of rows: the decoded inputs of a block stay in L2.
const BLOCK: usize = 1 << 14;

/// One input tensor in a part's layout (`[rows, width]`), in its checkpoint dtype.
struct Resident {
    dtype: DType,
    bytes: Vec<u8>,
}

/// Key of a resident copy: plan model index, tensor name in that model, transposed.
type Key = (usize, String, bool);

/// The inputs of a merge plan held in a loaded model's weight layout, ready to merge any plan
/// with the same models and tensors into the model in place.
pub struct ResidentMerge {
    layout: Vec<WeightBuffer>,
    /// Directories of the plan's models, parallel to `MergePlan::models`.
    models: Vec<PathBuf>,
    arrays: HashMap<Key, Resident>,
    bytes: u64,
    /// Set by [`ResidentMerge::hold_on_device`]: per weight buffer, the plan models whose
    /// inputs the device holds, in held order.
    on_device: std::sync::OnceLock<Vec<Vec<usize>>>,
}

impl std::fmt::Debug for ResidentMerge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResidentMerge({} buffers, {} inputs, {} bytes)", self.layout.len(), self.arrays.len(), self.bytes)
    }
}

/// Why a plan cannot be merged in place (the run then streams its candidates instead).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NotResident {
    #[error("{0} is not an elementwise method")]
    NotElementwise(&'static str),
    #[error("the merge has no tensor '{0}'")]
    NoTensor(String),
    #[error("'{tensor}' has shape {shape:?}, the runtime expects {rows} x {width}")]
    Shape { tensor: String, shape: Vec<usize>, rows: usize, width: usize },
    #[error("input '{input}' of model {model} has shape {shape:?}, the output {output:?}")]
    InputShape { input: String, model: usize, shape: Vec<usize>, output: Vec<usize> },
    /// An input tensor could not be read: the engine's message.
    #[error("{0}")]
    Input(String),
}

/// The task that fills `part` and the keys of its inputs, or why the plan cannot be merged
/// in place.
fn part_inputs<'p>(
    plan: &'p MergePlan,
    tasks: &HashMap<&str, &'p TensorTask>,
    buf: &WeightBuffer,
    part: &WeightPart,
) -> std::result::Result<(&'p TensorTask, Vec<Key>), NotResident> {
    let task = tasks.get(part.tensor.as_str()).ok_or_else(|| NotResident::NoTensor(part.tensor.clone()))?;
    let numel: usize = task.shape.iter().product();
    if numel != buf.rows * part.width || task.shape.len() > 2 || (task.shape.len() == 2 && task.shape[usize::from(!part.transposed)] != part.width) {
        return Err(NotResident::Shape { tensor: part.tensor.clone(), shape: task.shape.clone(), rows: buf.rows, width: part.width });
    }
    let keys = task.inputs.iter().map(|(m, n)| (*m, n.clone(), part.transposed)).collect::<Vec<_>>();
    for (m, n, _) in &keys {
        let (_, shape, _) = plan.models[*m].raw(n).map_err(|e| NotResident::Input(e.to_string()))?;
        if shape != task.shape.as_slice() {
            return Err(NotResident::InputShape { input: n.clone(), model: *m, shape: shape.to_vec(), output: task.shape.clone() });
        }
    }
    Ok((task, keys))
}

fn task_map(plan: &MergePlan) -> HashMap<&str, &TensorTask> {
    plan.tasks.iter().map(|t| (t.name.as_str(), t)).collect()
}

impl ResidentMerge {
    /// Bytes the resident inputs of `plan` take for `layout`, or why the plan cannot be merged
    /// in place (a method that is not elementwise, a tensor the runtime needs but the merge
    /// lacks).
    pub fn bytes_needed(plan: &MergePlan, layout: &[WeightBuffer]) -> std::result::Result<u64, NotResident> {
        if !plan.method.elementwise() {
            return Err(NotResident::NotElementwise(plan.method.name()));
        }
        let tasks = task_map(plan);
        let mut seen: HashMap<Key, u64> = HashMap::new();
        for buf in layout {
            for part in &buf.parts {
                let (_, keys) = part_inputs(plan, &tasks, buf, part)?;
                for k in keys {
                    let size = plan.models[k.0].raw(&k.1).map_err(|e| NotResident::Input(e.to_string()))?.0.size();
                    seen.insert(k, (buf.rows * part.width * size) as u64);
                }
            }
        }
        Ok(seen.values().sum())
    }

    /// Copies the inputs of `plan` into `layout` (the runtime's [`LanguageModel::weight_layout`]).
    /// Later plans must use the same models (by directory) and input tensors.
    pub fn new(plan: &MergePlan, layout: Vec<WeightBuffer>) -> Result<Self> {
        let bytes = Self::bytes_needed(plan, &layout).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        let tasks = task_map(plan);
        let mut arrays: HashMap<Key, Resident> = HashMap::new();
        for buf in &layout {
            for part in &buf.parts {
                let (_, keys) = part_inputs(plan, &tasks, buf, part).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
                for key in keys {
                    if arrays.contains_key(&key) {
                        continue;
                    }
                    let (dt, _, raw) = plan.models[key.0].raw(&key.1)?;
                    let data = if key.2 { transposed(dt, raw, part.width, buf.rows) } else { raw.to_vec() };
                    arrays.insert(key, Resident { dtype: dt, bytes: data });
                }
            }
        }
        Ok(Self { layout, models: plan.models.iter().map(|m| m.dir().to_path_buf()).collect(), arrays, bytes, on_device: Default::default() })
    }

    /// Bytes held by the resident inputs.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Merges `plan` into loaded model `model` of `runtime`, whose layout this was built for.
    pub fn materialize(&self, plan: &MergePlan, runtime: &mut dyn LanguageModel, model: usize) -> Result<()> {
        let dirs: Vec<&std::path::Path> = plan.models.iter().map(|m| m.dir()).collect();
        if dirs != self.models.iter().map(PathBuf::as_path).collect::<Vec<_>>() || !plan.method.elementwise() {
            return Err(EngineError::InvalidInput("this merge's models or method differ from those held resident".into()));
        }
        let tasks = task_map(plan);
        // Resolve every part before touching the runtime, so that a mismatch fails cleanly.
        let mut jobs: Vec<Vec<(&WeightPart, &TensorTask, Vec<&Resident>)>> = Vec::with_capacity(self.layout.len());
        for buf in &self.layout {
            let mut parts = vec![];
            for part in &buf.parts {
                let (task, keys) = part_inputs(plan, &tasks, buf, part).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
                let inputs = keys
                    .iter()
                    .map(|k| self.arrays.get(k).ok_or_else(|| EngineError::InvalidInput(format!("input '{}' of model {} is not resident", k.1, k.0))))
                    .collect::<Result<Vec<_>>>()?;
                parts.push((part, task, inputs));
            }
            jobs.push(parts);
        }
        if let Some(held) = self.on_device.get() {
            let mut parts = |index: usize| -> Result<Vec<HeldPart>> {
                jobs[index]
                    .iter()
                    .map(|(part, task, _)| {
                        let models: Vec<usize> = task.inputs.iter().map(|(m, _)| *m).collect();
                        if models != held[index] {
                            return Err(EngineError::InvalidInput(format!("'{}' reads other models than the device holds", task.name)));
                        }
                        Ok(HeldPart { col: part.col, width: part.width, merge: held_merge(plan, task)? })
                    })
                    .collect()
            };
            if runtime.merge_held(model, &mut parts, plan.out_dtype)? {
                return Ok(());
            }
        }
        runtime.write_weights(model, &mut |index, out| {
            let buf = &self.layout[index];
            fill_buffer(plan, buf, &jobs[index], out)
        })
    }

    /// Copies the resident inputs to `runtime`'s device so that [`materialize`](Self::materialize)
    /// merges there (burn tensor ops: on a GPU the merge never leaves device memory). Only
    /// `task_arithmetic` and `linear`, and only when every part of a weight buffer reads the
    /// same models in the same order; returns `false` (nothing held) otherwise or where the
    /// runtime does not merge on its device. Memory: the inputs in the runtime's float dtype.
    pub fn hold_on_device(&self, plan: &MergePlan, runtime: &mut dyn LanguageModel, model: usize) -> Result<bool> {
        if !matches!(plan.method.name(), "task_arithmetic" | "linear") {
            return Ok(false);
        }
        let tasks = task_map(plan);
        let mut held: Vec<Vec<usize>> = Vec::with_capacity(self.layout.len());
        let mut sources: Vec<Vec<(&WeightPart, Vec<&Resident>)>> = Vec::with_capacity(self.layout.len());
        for buf in &self.layout {
            let mut models: Option<Vec<usize>> = None;
            let mut parts = vec![];
            for part in &buf.parts {
                let (_, keys) = part_inputs(plan, &tasks, buf, part).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
                let ms: Vec<usize> = keys.iter().map(|k| k.0).collect();
                if models.as_ref().is_some_and(|m| *m != ms) {
                    return Ok(false);
                }
                let inputs = keys
                    .iter()
                    .map(|k| self.arrays.get(k).ok_or_else(|| EngineError::InvalidInput(format!("input '{}' of model {} is not resident", k.1, k.0))))
                    .collect::<Result<Vec<_>>>()?;
                parts.push((part, inputs));
                models = Some(ms);
            }
            held.push(models.unwrap_or_default());
            sources.push(parts);
        }
        let count = held.first().map_or(0, Vec::len);
        if count == 0 || held.iter().any(|m| m.len() != count) {
            return Ok(false);
        }
        let done = runtime.hold_inputs(model, count, &mut |index, k, out| {
            let cols = self.layout[index].cols;
            for (part, inputs) in &sources[index] {
                let res = inputs[k];
                let sz = res.dtype.size();
                for (r, row) in res.bytes.chunks(part.width * sz).enumerate() {
                    dtype::decode_into(res.dtype, row, &mut out[r * cols + part.col..r * cols + part.col + part.width]);
                }
            }
            Ok(())
        })?;
        if done && self.on_device.set(held.clone()).is_err() && self.on_device.get() != Some(&held) {
            return Err(EngineError::InvalidInput("the device inputs were held for another plan".into()));
        }
        Ok(done)
    }
}

/// `task`'s merge as device ops ([`HeldMerge`]), with held input `k` = the task's input `k`.
fn held_merge(plan: &MergePlan, task: &TensorTask) -> Result<HeldMerge> {
    let weight = |k: usize| task.model_params[k].get("weight") as f32;
    Ok(match plan.method.name() {
        "task_arithmetic" => {
            let base = task.base.ok_or_else(|| EngineError::InvalidInput(format!("'{}': task arithmetic without a base", task.name)))?;
            let terms: Vec<(usize, f32)> = (0..task.inputs.len()).filter(|&k| k != base).map(|k| (k, weight(k))).collect();
            let lambda = task.params.get("lambda") as f32;
            HeldMerge::TaskArithmetic {
                base,
                divisor: task.params.flag("normalize").then(|| plain_divisor(terms.iter().map(|t| t.1))),
                lambda: (lambda != 1.0).then_some(lambda),
                terms,
            }
        }
        "linear" => {
            let weights: Vec<f32> = (0..task.inputs.len()).map(weight).collect();
            HeldMerge::Linear { divisor: linear::divisor(task.params.flag("normalize"), &weights), terms: weights.into_iter().enumerate().collect() }
        }
        other => return Err(EngineError::InvalidInput(format!("{other} is not merged on the device"))),
    })
}

thread_local! {
    /// Per-thread decoded inputs and merged output of one block.
    static BLOCK_BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Merges every part of `buf` into `out` (`[rows, cols]`), in parallel over blocks of rows.
fn fill_buffer(plan: &MergePlan, buf: &WeightBuffer, parts: &[(&WeightPart, &TensorTask, Vec<&Resident>)], out: &mut [f32]) -> Result<()> {
    let rows_per_block = (BLOCK / buf.cols.max(1)).max(1);
    out.par_chunks_mut(rows_per_block * buf.cols).enumerate().try_for_each(|(bi, dst)| {
        let r0 = bi * rows_per_block;
        let nrows = dst.len() / buf.cols;
        BLOCK_BUFS.with_borrow_mut(|(ins, merged)| {
            for (part, task, inputs) in parts {
                let (w, len) = (part.width, nrows * part.width);
                ins.resize(inputs.len() * len, 0.0);
                for (res, dst) in inputs.iter().zip(ins.chunks_mut(len)) {
                    let sz = res.dtype.size();
                    dtype::decode_into(res.dtype, &res.bytes[r0 * w * sz..(r0 * w + len) * sz], dst);
                }
                // a part that spans whole rows is merged straight into the destination
                let whole = part.width == buf.cols;
                if !whole {
                    merged.resize(len, 0.0);
                }
                let input = MergeInput {
                    tensor: &task.name,
                    shape: &[len],
                    tensors: ins.chunks(len).collect(),
                    base: task.base,
                    model_params: task.model_params.clone(),
                    params: task.params.clone(),
                    seed: tensor_seed(plan.seed, &task.name),
                };
                let target: &mut [f32] = if whole { &mut dst[..] } else { &mut merged[..] };
                plan.method.merge(&input, &mut Scratch::default(), target).map_err(|reason| EngineError::Merge {
                    tensor: task.name.clone(),
                    method: plan.method.name().to_string(),
                    reason,
                })?;
                if whole {
                    dtype::round_in_place(plan.out_dtype, dst);
                } else {
                    for (r, src) in merged.chunks(w).enumerate() {
                        let at = r * buf.cols + part.col;
                        dtype::round_into(plan.out_dtype, src, &mut dst[at..at + w]);
                    }
                }
            }
            Ok(())
        })
    })
}

/// Raw `[outs, inn]` elements of `dtype` → `[inn, outs]` (the runtime's layout of a linear
/// weight), moved as opaque 2- or 4-byte values.
fn transposed(dtype: DType, raw: &[u8], outs: usize, inn: usize) -> Vec<u8> {
    fn go<const N: usize>(raw: &[u8], outs: usize, inn: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; raw.len()];
        transpose_concat_into::<[u8; N]>(&[(bytemuck::cast_slice(raw), outs)], inn, bytemuck::cast_slice_mut(&mut bytes));
        bytes
    }
    match dtype {
        DType::F32 => go::<4>(raw, outs, inn),
        DType::F16 | DType::BF16 => go::<2>(raw, outs, inn),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols, dtype) in [(3, 5, DType::BF16), (70, 130, DType::F32), (1, 9, DType::F16), (129, 1, DType::F32)] {
            let size = dtype.size();
            let src: Vec<u8> = (0..rows * cols * size).map(|i| (i * 31 % 251) as u8).collect();
            let t = transposed(dtype, &src, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(&t[(c * rows + r) * size..][..size], &src[(r * cols + c) * size..][..size], "{rows}x{cols} ({r},{c})");
                }
            }
        }
    }
}
