//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use evomerge_engine::recipe::{MergePlan, Recipe};
use evomerge_engine::{Checkpoint, TensorSource};

/// `tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// All tensors of a checkpoint directory as f32.
pub fn load(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let ck = Checkpoint::open(dir, dir.display().to_string()).expect("open checkpoint");
    ck.tensor_names().into_iter().map(|n| (n.clone(), ck.read_f32(&n).expect("read").data)).collect()
}

/// A fixture model by name (`llama-tiny-a`, ...).
pub fn model(name: &str) -> BTreeMap<String, Vec<f32>> {
    load(&fixtures().join("models").join(name))
}

/// Plans a fixture recipe (model paths relative to the fixtures folder, as mergekit ran it).
pub fn plan(recipe: &str, seed: u64) -> MergePlan {
    let path = fixtures().join("merges").join(format!("{recipe}.yaml"));
    let text = std::fs::read_to_string(&path).expect("recipe");
    let r = Recipe::parse(&text, recipe).expect("parse");
    MergePlan::build(&r, text, Some(&fixtures()), seed).expect("plan")
}

/// Copies a fixture model into `dst` (for tests that damage it).
pub fn copy_model(name: &str, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(fixtures().join("models").join(name)).expect("ls") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
}

/// `experiments/search-tiny.toml` in `dir` with absolute paths and a budget of `evaluations`.
pub fn tiny_experiment(dir: &Path, evaluations: u64) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("experiments");
    let text = std::fs::read_to_string(src.join("search-tiny.toml")).expect("experiment");
    let text = text
        .replace("max_evaluations = 12", &format!("max_evaluations = {evaluations}"))
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("\"tasks/", &format!("\"{}/", src.join("tasks").display()));
    let path = dir.join("experiment.toml");
    std::fs::write(&path, text).expect("write experiment");
    path
}

/// Rewrites the JSON header of the safetensors file `f` with `edit` (padded to 8 bytes, the
/// data section kept as it is).
pub fn edit_safetensors_header(f: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(f).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    edit(&mut h);
    let mut hs = serde_json::to_string(&h).expect("ser").into_bytes();
    while !(hs.len() + 8).is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(f, out).expect("write");
}

/// Path to the built `evomerge` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_evomerge"))
}

/// Runs `evomerge ARGS`: (exit code, stdout, stderr); a panic is a test failure.
pub fn run(args: &[&str]) -> (Option<i32>, String, String) {
    run_env(args, &[])
}

/// [`run`] with extra environment variables (`EVOMERGE_MEMORY_BYTES`, ...).
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let o = std::process::Command::new(bin()).args(args).envs(env.iter().copied()).output().expect("run evomerge");
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(!err.contains("panicked"), "panic: {err}");
    (o.status.code(), out, err)
}

/// Runs `evomerge ARGS`, which must succeed; returns its stdout.
pub fn run_ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    out
}

/// The device the model tests run on: `cpu` unless `EVOMERGE_TEST_DEVICE` names another
/// (`EVOMERGE_TEST_DEVICE=cuda:0` runs the parity suites on a GPU in a `--features cuda` build).
pub fn test_device() -> evomerge_engine::model::DeviceSpec {
    match std::env::var("EVOMERGE_TEST_DEVICE") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|e| panic!("EVOMERGE_TEST_DEVICE={s}: {e}")),
        _ => evomerge_engine::model::DeviceSpec::Cpu,
    }
}

/// The runtime the model tests run on: `EVOMERGE_TEST_RUNTIME=libtorch` (a `--features
/// libtorch` build) runs them on LibTorch; default burn.
pub fn test_runtime() -> evomerge_engine::model::RuntimeKind {
    match std::env::var("EVOMERGE_TEST_RUNTIME") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|e| panic!("EVOMERGE_TEST_RUNTIME={s}: {e}")),
        _ => evomerge_engine::model::RuntimeKind::Burn,
    }
}

/// A numeric tolerance: `cpu` on the CPU backend, `gpu` on CUDA. burn-cuda runs f32 matmuls on
/// tensor cores in TF32 (cubek-matmul's `adjust_dtypes`), as PyTorch does with `allow_tf32`: on an
/// H100, logits then differ from transformers' f32 by up to 2.5e-2 (measured, BENCHMARKS.md).
pub fn tol(cpu: f64, gpu: f64) -> f64 {
    if test_device() == evomerge_engine::model::DeviceSpec::Cpu { cpu } else { gpu }
}

/// Writes a NaN into the first element of f32 tensor `tensor` of the checkpoint in `dir`.
pub fn poison(dir: &Path, tensor: &str) {
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let at = 8 + n + header[tensor]["data_offsets"][0].as_u64().expect("offsets") as usize;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&f, bytes).expect("write");
}
