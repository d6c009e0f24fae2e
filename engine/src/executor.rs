//! Running a [`MergePlan`]: tensor by tensor, streamed to disk or collected in memory.
//!
//! Each task is first offered to the method's [`crate::merge::MergeMethod::merge_streaming`], which reads the
//! inputs chunk by chunk from the memory map ([`InputReader`]) and hands output chunks to a
//! writer thread (encoded into a small pool of recycled buffers); methods that need whole
//! tensors (SLERP, model stock, ...) decode them into reused f32 buffers instead. Either way
//! only the tensor in flight is in memory. The output directory is written
//! atomically ([`OutputDir`]): config (the donor's, with layer count and dtype updated),
//! tokenizer and generation files copied from the donor, the recipe (`mergekit_config.yml`)
//! and a model card.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::time::Instant;

use crate::buffer::HugeBuf;
use crate::dtype;
use crate::error::{EngineError, Result};
use crate::io::writer::{pretty, write_file};
use crate::io::{OutputDir, ShardedWriter, TensorEntry};
use crate::merge::base::{InputReader, Scratch, StreamInput};
use crate::merge::rng::tensor_seed;
use crate::merge::{MergeError, MergeInput};
use crate::recipe::{MergePlan, TensorTask};
use crate::source::{MemorySource, Tensor};

/// Files copied from the donor model when present.
pub const DONOR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// How to write the output.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Maximum bytes of tensor data per shard.
    pub shard_size: u64,
    /// Replace an existing non-empty output directory.
    pub overwrite: bool,
    /// Checked between tensors: when set, the merge stops with [`EngineError::Interrupted`]
    /// and the staging directory is removed.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self { shard_size: 5_000_000_000, overwrite: false, cancel: None }
    }
}

/// Progress events (for bars and logs).
#[derive(Debug, Clone)]
pub enum MergeProgress<'a> {
    Started { tensors: usize, bytes_out: u64 },
    Tensor { index: usize, name: &'a str, bytes_out: u64 },
    Writing,
}

/// What a finished merge did.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub tensors: usize,
    pub shards: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
    /// Seconds spent decoding inputs (whole-tensor path), in merge kernels (streamed tensors:
    /// reading included), and encoding + handing to the writer.
    pub phases: Phases,
}

/// Where a merge spent its time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub decode: f64,
    pub merge: f64,
    pub write: f64,
}

impl MergeSummary {
    /// (bytes read + written) per second, in GB/s.
    pub fn gb_per_s(&self) -> f64 {
        (self.bytes_in + self.bytes_out) as f64 / self.seconds.max(1e-9) / 1e9
    }
}

/// Buffers reused from tensor to tensor, so that a merge faults in its working memory once
/// (sized by the largest tensor) instead of once per tensor.
#[derive(Debug, Default)]
pub struct Workspace {
    inputs: Vec<HugeBuf<f32>>,
    out: HugeBuf<f32>,
    scratch: Scratch,
    phases: Phases,
}

/// Encoded bytes on their way to the writer thread; buffers come back for reuse.
struct Part {
    name: String,
    bytes: HugeBuf<u8>,
}

/// The compute side of the writer thread: encodes into recycled buffers and hands them over.
struct PartSender {
    tx: SyncSender<Part>,
    recycled: Receiver<HugeBuf<u8>>,
    /// The last tensor warned about for NaN / infinite values (once per tensor).
    warned: std::cell::RefCell<String>,
}

impl PartSender {
    /// Encodes `data` and queues it; `false` if the writer thread has stopped (its error is
    /// reported when it is joined). Waits for one of the pool's buffers to come back, so the
    /// memory in flight is bounded and buffers are reused (a fresh buffer would fault in new
    /// pages on every use).
    fn send(&self, name: &str, dtype: dtype::DType, data: &[f32]) -> bool {
        let Ok(mut bytes) = self.recycled.recv() else {
            return false;
        };
        bytes.resize(data.len() * dtype.size());
        if !dtype::encode_to_checked(dtype, data, &mut bytes) && *self.warned.borrow() != name {
            tracing::warn!("tensor '{name}' of the merge holds NaN or infinite values (a source holds them, or the merge overflowed)");
            *self.warned.borrow_mut() = name.to_string();
        }
        self.tx.send(Part { name: name.to_string(), bytes }).is_ok()
    }
}

/// Merges one tensor to f32; the result lives in `ws` until the next call.
pub fn merge_tensor<'w>(plan: &MergePlan, task: &TensorTask, ws: &'w mut Workspace) -> Result<&'w [f32]> {
    let t0 = Instant::now();
    let numel: usize = task.shape.iter().product();
    if ws.inputs.len() < task.inputs.len() {
        ws.inputs.resize_with(task.inputs.len(), HugeBuf::default);
    }
    for ((m, n), buf) in task.inputs.iter().zip(ws.inputs.iter_mut()) {
        let (dt, _, bytes) = plan.models[*m].raw(n)?;
        buf.resize(numel);
        dtype::decode_into(dt, bytes, buf);
    }
    ws.out.resize(numel);
    let t1 = Instant::now();
    ws.phases.decode += (t1 - t0).as_secs_f64();
    let input = MergeInput {
        tensor: &task.name,
        shape: &task.shape,
        tensors: ws.inputs[..task.inputs.len()].iter().map(|b| &b[..]).collect(),
        base: task.base,
        model_params: task.model_params.clone(),
        params: task.params.clone(),
        seed: tensor_seed(plan.seed, &task.name),
    };
    plan.method.merge(&input, &mut ws.scratch, &mut ws.out).map_err(|reason| merge_error(plan, task, reason))?;
    ws.phases.merge += t1.elapsed().as_secs_f64();
    Ok(&ws.out)
}

/// Output buffers in flight between the compute and writer threads.
const POOL: usize = 3;

/// Reads a task's inputs straight from the checkpoints' memory maps.
struct RawReader<'a> {
    inputs: Vec<(dtype::DType, &'a [u8])>,
}

impl InputReader for RawReader<'_> {
    fn count(&self) -> usize {
        self.inputs.len()
    }

    fn read(&self, i: usize, start: usize, out: &mut [f32]) {
        let (dt, bytes) = self.inputs[i];
        let sz = dt.size();
        dtype::decode_into(dt, &bytes[start * sz..(start + out.len()) * sz], out);
    }

    fn read_points(&self, i: usize, positions: &[usize], out: &mut [f32]) {
        let (dt, bytes) = self.inputs[i];
        let sz = dt.size();
        for (o, &p) in out.iter_mut().zip(positions) {
            *o = dtype::decode_one(dt, &bytes[p * sz..(p + 1) * sz]);
        }
    }
}

/// Streams a task through [`crate::merge::MergeMethod::merge_streaming`]; `Ok(None)` when the method
/// declines (use the whole-tensor path), `Ok(Some(false))` when the writer stopped.
fn stream_task(plan: &MergePlan, task: &TensorTask, ws: &mut Workspace, out: &PartSender) -> Result<Option<bool>> {
    let mut writer_stopped = false;
    let t = Instant::now();
    let mut sink = |chunk: &[f32]| -> std::result::Result<(), MergeError> {
        if out.send(&task.name, plan.out_dtype, chunk) {
            Ok(())
        } else {
            writer_stopped = true;
            Err(MergeError::SinkClosed)
        }
    };
    let streamed = stream(plan, task, ws, &mut sink)?;
    ws.phases.merge += t.elapsed().as_secs_f64();
    match streamed {
        _ if writer_stopped => Ok(Some(false)),
        Ok(true) => Ok(Some(true)),
        Ok(false) => Ok(None),
        Err(reason) => Err(merge_error(plan, task, reason)),
    }
}

/// Runs `task` through the method's streaming path, reading its inputs straight from the
/// checkpoints' memory maps. The outer error is reading the inputs; the inner one is the
/// method's (or the sink's) reason.
fn stream(
    plan: &MergePlan,
    task: &TensorTask,
    ws: &mut Workspace,
    sink: &mut dyn FnMut(&[f32]) -> std::result::Result<(), MergeError>,
) -> Result<std::result::Result<bool, MergeError>> {
    let reader = RawReader { inputs: task.inputs.iter().map(|(m, n)| plan.models[*m].raw(n).map(|(d, _, b)| (d, b))).collect::<Result<_>>()? };
    let input = StreamInput {
        tensor: &task.name,
        shape: &task.shape,
        reader: &reader,
        base: task.base,
        model_params: &task.model_params,
        params: &task.params,
        seed: tensor_seed(plan.seed, &task.name),
    };
    Ok(plan.method.merge_streaming(&input, &mut ws.scratch, sink))
}

fn merge_error(plan: &MergePlan, task: &TensorTask, reason: MergeError) -> EngineError {
    EngineError::Merge { tensor: task.name.clone(), method: plan.method.name().to_string(), reason }
}

/// Runs the plan into memory (f32, rounded through the output dtype so values equal what
/// [`execute`] writes). Streams like [`execute`] (inputs decoded chunk by chunk from the memory
/// maps, merged and rounded into the output tensor) where the method can; the rest takes the
/// whole-tensor path.
pub fn merge_to_memory(plan: &MergePlan) -> Result<MemorySource> {
    let mut src = MemorySource::new("merged");
    let mut ws = Workspace::default();
    for task in &plan.tasks {
        let numel: usize = task.shape.iter().product();
        let mut data: Vec<f32> = Vec::with_capacity(numel);
        let mut sink = |chunk: &[f32]| -> std::result::Result<(), MergeError> {
            dtype::round_extend(plan.out_dtype, chunk, &mut data);
            Ok(())
        };
        let streamed = stream(plan, task, &mut ws, &mut sink)?.map_err(|reason| merge_error(plan, task, reason))?;
        if !streamed || data.len() != numel {
            data.clear();
            let out = merge_tensor(plan, task, &mut ws)?;
            dtype::round_extend(plan.out_dtype, out, &mut data);
        }
        src.insert(task.name.clone(), Tensor::new(task.shape.clone(), data));
    }
    Ok(src)
}

/// Runs the plan and writes a complete Hugging Face model directory at `out`.
pub fn execute(plan: &MergePlan, out: &Path, opts: &MergeOptions, progress: &mut dyn FnMut(MergeProgress)) -> Result<MergeSummary> {
    let start = Instant::now();
    let donor_files = donor_files(plan)?;
    let dir = OutputDir::create(out, opts.overwrite)?;
    let entries: Vec<TensorEntry> =
        plan.tasks.iter().map(|t| TensorEntry { name: t.name.clone(), shape: t.shape.clone(), dtype: plan.out_dtype }).collect();
    let bytes_out: u64 = entries.iter().map(TensorEntry::bytes).sum();
    progress(MergeProgress::Started { tensors: entries.len(), bytes_out });
    let writer = ShardedWriter::new(dir.path(), entries, opts.shard_size)?;
    let shards = writer.shard_count();
    let mut ws = Workspace::default();
    // A writer thread copies finished bytes into the shard files while the next tensor is
    // computed; a pool of POOL recycled buffers caps the memory in flight.
    let (tx, rx) = sync_channel::<Part>(POOL);
    let (back_tx, back_rx) = channel::<HugeBuf<u8>>();
    for _ in 0..POOL {
        let _ = back_tx.send(HugeBuf::default());
    }
    std::thread::scope(|s| -> Result<()> {
        let handle = s.spawn(move || -> Result<ShardedWriter> {
            let mut writer = writer;
            for part in rx {
                writer.write_part(&part.name, &part.bytes)?;
                let _ = back_tx.send(part.bytes);
            }
            Ok(writer)
        });
        let sender = PartSender { tx, recycled: back_rx, warned: Default::default() };
        let computed = (|| -> Result<()> {
            for (i, task) in plan.tasks.iter().enumerate() {
                if opts.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(EngineError::Interrupted);
                }
                let sent = match stream_task(plan, task, &mut ws, &sender)? {
                    Some(sent) => sent,
                    None => {
                        merge_tensor(plan, task, &mut ws)?;
                        let t = Instant::now();
                        let sent = sender.send(&task.name, plan.out_dtype, &ws.out);
                        ws.phases.write += t.elapsed().as_secs_f64();
                        sent
                    }
                };
                if !sent {
                    break; // the writer failed: its error is reported below
                }
                let bytes_out = (task.shape.iter().product::<usize>() * plan.out_dtype.size()) as u64;
                progress(MergeProgress::Tensor { index: i, name: &task.name, bytes_out });
            }
            Ok(())
        })();
        drop(sender);
        let written = handle.join().map_err(|_| EngineError::Output { path: out.to_path_buf(), reason: "writer thread panicked".into() })?;
        computed?;
        progress(MergeProgress::Writing);
        written?.finish()
    })?;
    write_side_files(plan, dir.path(), &donor_files)?;
    dir.commit()?;
    Ok(MergeSummary {
        tensors: plan.tasks.len(),
        shards,
        bytes_in: plan.input_bytes(),
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
        phases: ws.phases,
    })
}

/// The donor files the output takes, read (and the JSON ones parsed) before anything is
/// merged, so that a corrupt `tokenizer.json` is an error up front and never copied.
fn donor_files(plan: &MergePlan) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let donor = &plan.models[plan.donor];
    let mut out = vec![];
    for f in DONOR_FILES {
        let src = donor.dir().join(f);
        if !src.is_file() {
            continue;
        }
        let bytes = std::fs::read(&src).map_err(|e| EngineError::io(&src, e))?;
        if f.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| EngineError::BadJson {
                path: src.clone(),
                reason: format!("the donor's {f} is not valid JSON ({e}); it would be copied into the output"),
            })?;
        }
        out.push((*f, bytes));
    }
    Ok(out)
}

fn write_side_files(plan: &MergePlan, dir: &Path, donor_files: &[(&str, Vec<u8>)]) -> Result<()> {
    let donor = &plan.models[plan.donor];
    let cfg = donor.config.to_output_json(&donor.arch.layer_count_key, plan.out_layers, plan.out_dtype);
    write_file(&dir.join("config.json"), pretty(&cfg).as_bytes())?;
    // written, not copied: an error (ENOSPC) names the output file
    for (f, bytes) in donor_files {
        write_file(&dir.join(f), bytes)?;
    }
    write_file(&dir.join("mergekit_config.yml"), plan.recipe_text.as_bytes())?;
    write_file(&dir.join("README.md"), model_card(plan).as_bytes())
}

/// A model reference as a Hugging Face Hub id (`org/name`), or `None` for a local path: the
/// card's `base_model` metadata takes Hub ids only.
fn hub_id(r: &str) -> Option<&str> {
    let parts: Vec<&str> = r.split('/').collect();
    let plain = |p: &str| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (parts.len() == 2 && parts.iter().all(|p| plain(p)) && !Path::new(r).exists()).then_some(r)
}

/// How the card names a model: a Hub id linked to its page, a local checkpoint by its folder
/// name (with the path it was read from).
fn card_name(r: &str) -> String {
    match hub_id(r) {
        Some(id) => format!("[{id}](https://huggingface.co/{id})"),
        None => {
            let name = Path::new(r).file_name().map_or(r.to_string(), |n| n.to_string_lossy().into_owned());
            format!("{name} (local checkpoint `{r}`)")
        }
    }
}

fn model_card(plan: &MergePlan) -> String {
    let base = plan.tasks.first().and_then(|t| t.base).map(|_| plan.model_refs[plan.donor].clone());
    let mut s = String::from("---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n");
    if let Some(b) = base.as_deref().and_then(hub_id) {
        s.push_str(&format!("base_model:\n- {b}\n"));
    }
    s.push_str("---\n\n# Merged model\n\n");
    s.push_str(&format!(
        "This model was merged with evomerge {} (an evolutionary model-merge search engine; its recipe is \
         mergekit's format) using the **{}** method ({}).\n\n",
        env!("CARGO_PKG_VERSION"),
        plan.method.name(),
        plan.method.reference()
    ));
    s.push_str("## Models\n\n");
    for r in &plan.model_refs {
        let role = if Some(r) == base.as_ref() { " (base)" } else { "" };
        s.push_str(&format!("- {}{role}\n", card_name(r)));
    }
    s.push_str(&format!(
        "\n{} layers, {} tensors, dtype {}, seed {}.\n\n## Recipe\n\n```yaml\n{}\n```\n",
        plan.out_layers,
        plan.tasks.len(),
        plan.out_dtype,
        plan.seed,
        plan.recipe_text.trim_end()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_card_names_hub_models_by_id_and_local_ones_by_folder() {
        assert_eq!(hub_id("Qwen/Qwen2-0.5B"), Some("Qwen/Qwen2-0.5B"));
        assert_eq!(card_name("Qwen/Qwen2-0.5B"), "[Qwen/Qwen2-0.5B](https://huggingface.co/Qwen/Qwen2-0.5B)");
        for local in ["/data/models/base", "./base", "../zoo/base", "a/b/c", "base", "~/m/base"] {
            assert_eq!(hub_id(local), None, "{local}");
        }
        assert_eq!(card_name("/data/models/base"), "base (local checkpoint `/data/models/base`)");
    }
}
