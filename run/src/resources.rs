//! Sizing a run: memory, how many candidates are scored at once, where merges run.

use evomerge_engine::Checkpoint;
use evomerge_engine::model::DeviceSpec;

/// Bytes of memory available to a run: `EVOMERGE_MEMORY_BYTES` if set (a cap the user chooses),
/// else `MemAvailable` from /proc/meminfo; `None` when unknown.
pub fn memory_available() -> Option<u64> {
    if let Some(v) = std::env::var("EVOMERGE_MEMORY_BYTES").ok().and_then(|v| v.parse().ok()) {
        return Some(v);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Parameters of a checkpoint.
pub fn param_count(base: &Checkpoint) -> u64 {
    base.raw_bytes() / base.dtype().size() as u64
}

/// Host memory of the loaded model's f32 weights (plus the transposed copy of a tied embedding).
pub fn runtime_bytes(base: &Checkpoint) -> u64 {
    let tied = if base.config.tie_word_embeddings { (base.config.vocab_size * base.config.hidden_size) as u64 * 4 } else { 0 };
    param_count(base) * 4 + tied
}

/// Host memory a CPU run holds at its peak when candidates are merged from the memory maps:
/// the loaded model and one merged candidate in f32. Activations and the page cache of the
/// memory-mapped sources come on top and are not counted.
pub fn memory_needed(base: &Checkpoint) -> u64 {
    runtime_bytes(base) + param_count(base) * 4
}

/// Whether resident inputs also go to the runtime's device, where candidates are then merged
/// with burn ops (task arithmetic, linear): on a GPU. EVOMERGE_DEVICE_MERGE=1 does the same on
/// the CPU, which is how the tests check that path (the plain-Rust kernels are faster there);
/// =0 keeps a GPU run on the host path (to compare).
pub fn device_merge(device: DeviceSpec) -> bool {
    match std::env::var("EVOMERGE_DEVICE_MERGE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => device != DeviceSpec::Cpu,
    }
}

pub fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Largest model (parameters) for which `--workers 0` scores one candidate per core.
pub const SMALL_MODEL_PARAMS: u64 = 32_000_000;

/// How many candidates are scored at once: `requested` unless 0 (auto). Auto: on the CPU, one
/// per core for models of at most [`SMALL_MODEL_PARAMS`] parameters — their matrices are too
/// small for the runtime's parallel loops to use the other cores (the demo zoo runs as fast on
/// one core as on two, BENCHMARKS.md) — as far as the available memory, less `reserved`, holds
/// `per_worker` bytes for each worker beyond the first; larger models, and GPUs, one at a time.
pub fn worker_count(requested: usize, device: DeviceSpec, base: &Checkpoint, reserved: u64, per_worker: u64) -> usize {
    if requested > 0 {
        return requested;
    }
    if device != DeviceSpec::Cpu || param_count(base) > SMALL_MODEL_PARAMS {
        return 1;
    }
    let cores = rayon::current_num_threads();
    let by_memory = memory_available().map_or(cores, |a| 1 + (a.saturating_sub(reserved) / per_worker.max(1)) as usize);
    cores.min(by_memory).max(1)
}
