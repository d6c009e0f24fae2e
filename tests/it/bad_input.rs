//! Bad input gives a clear error naming the file or tensor, exit code 2, no panic, and no
//! output directory.

use std::path::Path;
use std::process::Command;

use crate::common::{bin, copy_model, fixtures};

/// Runs `evomerge merge` on `yaml` (written to a temp dir, `{F}` → fixtures path) and returns
/// (exit code, stderr, output dir).
fn fail(yaml: &str, setup: impl FnOnce(&Path)) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    setup(tmp.path());
    let recipe = tmp.path().join("r.yaml");
    std::fs::write(&recipe, yaml.replace("{F}", &fixtures().display().to_string()).replace("{T}", &tmp.path().display().to_string())).expect("write");
    let out = tmp.path().join("out");
    let o = Command::new(bin()).arg("merge").arg(&recipe).arg("--out").arg(&out).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!out.exists(), "output written despite error: {err}");
    (o.status.code(), err)
}

const TA: &str = "merge_method: task_arithmetic\nbase_model: {F}/models/llama-tiny-base\nmodels:\n  - model: {A}\n    parameters: {weight: 0.5}\n  - model: {F}/models/llama-tiny-b\n    parameters: {weight: 0.5}\n";

fn with_a(a: &str) -> String {
    TA.replace("{A}", a)
}

fn assert_fails(code: Option<i32>, err: &str, needles: &[&str]) {
    assert_eq!(code, Some(2), "{err}");
    for n in needles {
        assert!(err.contains(n), "'{n}' not in: {err}");
    }
}

#[test]
fn missing_model_directory() {
    let (c, e) = fail(&with_a("{T}/nope"), |_| {});
    assert_fails(c, &e, &["nope", "not found"]);
}

#[test]
fn truncated_safetensors() {
    let (c, e) = fail(&with_a("{T}/m"), |t| {
        copy_model("llama-tiny-a", &t.join("m"));
        let f = t.join("m/model.safetensors");
        let len = std::fs::metadata(&f).expect("meta").len();
        std::fs::OpenOptions::new().write(true).open(&f).expect("open").set_len(len - 100).expect("truncate");
    });
    assert_fails(c, &e, &["model.safetensors", "truncated"]);
}

#[test]
fn header_length_past_the_end() {
    let (c, e) = fail(&with_a("{T}/m"), |t| {
        copy_model("llama-tiny-a", &t.join("m"));
        let f = t.join("m/model.safetensors");
        let mut bytes = std::fs::read(&f).expect("read");
        bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&f, bytes).expect("write");
    });
    assert_fails(c, &e, &["model.safetensors", "corrupt"]);
}

#[test]
fn unknown_dtype_in_header() {
    let (c, e) = fail(&with_a("{T}/m"), |t| {
        copy_model("llama-tiny-a", &t.join("m"));
        let f = t.join("m/model.safetensors");
        let bytes = std::fs::read(&f).expect("read");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).expect("utf8");
        let bad = header.replacen("\"F32\"", "\"Q7\" ", 1); // same length keeps offsets valid
        let mut out = bytes[..8].to_vec();
        out.extend_from_slice(bad.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&f, out).expect("write");
    });
    assert_fails(c, &e, &["model.safetensors", "Q7"]);
}

#[test]
fn shape_mismatch_names_the_tensor() {
    // a model with hidden size 32 instead of 64: same architecture, different shapes
    let (c, e) = fail(&with_a("{T}/m"), |t| {
        let dir = t.join("m");
        copy_model("llama-tiny-a", &dir);
        // rewrite one tensor's shape [128, 64] -> [64, 128] (same byte size)
        crate::common::edit_safetensors_header(&dir.join("model.safetensors"), |h| {
            h["model.layers.1.mlp.up_proj.weight"]["shape"] = serde_json::json!([64, 128]);
        });
    });
    assert_fails(c, &e, &["model.layers.1.mlp.up_proj.weight", "[64, 128]", "[128, 64]"]);
}

/// Model A copied to `{T}/m` with its config claiming another architecture.
fn relabelled_a(arch: &str, model_type: &str) -> (Option<i32>, String) {
    fail(&with_a("{T}/m"), |t| {
        let dir = t.join("m");
        copy_model("llama-tiny-a", &dir);
        let cfg = std::fs::read_to_string(dir.join("config.json")).expect("cfg");
        let cfg = cfg.replace("LlamaForCausalLM", arch).replace("\"llama\"", &format!("\"{model_type}\""));
        std::fs::write(dir.join("config.json"), cfg).expect("write");
    })
}

#[test]
fn architecture_mismatch() {
    let (c, e) = relabelled_a("MistralForCausalLM", "mistral");
    assert_fails(c, &e, &["architecture mismatch", "mistral", "llama"]);
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let (c, e) = relabelled_a("GPT2LMHeadModel", "gpt2");
    assert_fails(c, &e, &["GPT2LMHeadModel", "llama, mistral, qwen2, qwen3", "config.json"]);
}

#[test]
fn unknown_merge_method() {
    let (c, e) = fail(&with_a("{F}/models/llama-tiny-a").replace("task_arithmetic", "tie"), |_| {});
    assert_fails(c, &e, &["unknown merge method 'tie'", "ties"]);
}

#[test]
fn unknown_yaml_key() {
    let (c, e) = fail(&format!("{}dtyp: float32\n", with_a("{F}/models/llama-tiny-a")), |_| {});
    assert_fails(c, &e, &["dtyp"]);
}

#[test]
fn unknown_parameter() {
    let (c, e) = fail(
        &with_a("{F}/models/llama-tiny-a")
            .replace("{weight: 0.5}\n  - model: {F}/models/llama-tiny-b", "{weight: 0.5, densty: 0.3}\n  - model: {F}/models/llama-tiny-b"),
        |_| {},
    );
    assert_fails(c, &e, &["unknown parameter 'densty'", "weight"]);
}

#[test]
fn parameter_out_of_range() {
    let yaml = with_a("{F}/models/llama-tiny-a").replace("task_arithmetic", "ties").replace("{weight: 0.5}", "{weight: 0.5, density: 1.5}");
    let (c, e) = fail(&yaml, |_| {});
    assert_fails(c, &e, &["density = 1.5", "[0, 1]"]);
}

#[test]
fn missing_required_parameter() {
    let (c, e) = fail("merge_method: linear\nmodels:\n  - model: {F}/models/llama-tiny-a\n  - model: {F}/models/llama-tiny-b\n", |_| {});
    assert_fails(c, &e, &["missing required parameter 'weight'"]);
}

#[test]
fn output_directory_not_writable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").expect("write");
    let o =
        Command::new(bin()).current_dir(fixtures()).args(["merge", "merges/linear.yaml", "--out"]).arg(blocker.join("out")).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("output") && err.contains("file/out"), "{err}");
}

#[test]
fn missing_recipe_file() {
    let o = Command::new(bin()).args(["merge", "/nonexistent/r.yaml", "--out", "/tmp/never"]).output().expect("run");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/r.yaml"));
}

#[test]
fn unsupported_tokenizer_source() {
    let yaml = format!("{}tokenizer_source: union\n", with_a("{F}/models/llama-tiny-a"));
    let (c, e) = fail(&yaml, |_| {});
    assert_fails(c, &e, &["tokenizer_source", "union"]);
}

/// A copy of `llama-tiny-a` in `t/m` whose config.json has `key` set to the JSON `value`.
fn with_config(t: &Path, key: &str, value: &str) {
    copy_model("llama-tiny-a", &t.join("m"));
    let p = t.join("m/config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    cfg[key] = serde_json::from_str(value).expect("value");
    std::fs::write(&p, cfg.to_string()).expect("write");
}

#[test]
fn a_layer_count_past_the_tensors_is_an_error_not_an_allocation() {
    // issue 23, defect 1: 1e8 and 1e12 layers aborted with an out-of-memory backtrace
    for n in ["100000000", "1000000000000", "1"] {
        let (c, e) = fail(&with_a("{T}/m"), |t| with_config(t, "num_hidden_layers", n));
        assert_fails(c, &e, &["config.json", &format!("num_hidden_layers = {n}")]);
    }
}

#[test]
fn a_config_contradicting_the_tensors_is_refused_before_anything_is_written() {
    // issue 23, defect 2: merge exited 0 with a checkpoint that could not be loaded
    for (key, value, needle) in [
        ("vocab_size", "1000", "vocab_size x hidden_size"),
        ("hidden_size", "48", "hidden_size"),
        ("head_dim", "0", "head_dim = 0"),
        ("num_key_value_heads", "0", "num_key_value_heads = 0"),
        ("num_key_value_heads", "3", "num_key_value_heads = 3"),
    ] {
        let (c, e) = fail(&with_a("{T}/m"), |t| with_config(t, key, value));
        assert_fails(c, &e, &["config.json", needle]);
    }
}

#[test]
fn a_source_with_nan_weights_is_named_by_merge_and_refused_by_search() {
    // issue 23: NaN/inf source weights passed --dry-run and were found only after the budget
    let tmp = tempfile::tempdir().expect("tmp");
    let m = tmp.path().join("m");
    copy_model("llama-tiny-a", &m);
    crate::common::poison(&m, "model.layers.1.mlp.up_proj.weight");
    let yaml = TA.replace("{A}", &m.display().to_string()).replace("{F}", &fixtures().display().to_string());
    std::fs::write(tmp.path().join("r.yaml"), yaml).expect("write");
    let o = Command::new(bin()).arg("merge").arg(tmp.path().join("r.yaml")).arg("--out").arg(tmp.path().join("out")).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("'model.layers.1.mlp.up_proj.weight' of the merge holds NaN"), "{err}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp = std::fs::read_to_string(root.join("experiments/search-tiny.toml"))
        .expect("experiment")
        .replace("\"../tests/fixtures/models/llama-tiny-a\"", &format!("\"{}\"", m.display()))
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("\"tasks/", &format!("\"{}/experiments/tasks/", root.display()));
    let exp_path = tmp.path().join("e.toml");
    std::fs::write(&exp_path, exp).expect("write");
    let (code, _, err) = crate::common::run(&["search", &exp_path.display().to_string(), "--dry-run"]);
    assert_fails(code, &err, &["model.layers.1.mlp.up_proj.weight", "NaN or infinite", "--allow-nonfinite"]);
    let (code, out, err) = crate::common::run(&["search", &exp_path.display().to_string(), "--dry-run", "--allow-nonfinite"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("nothing run"), "{out}");
}

#[test]
fn architectures_contradicting_model_type_is_an_error() {
    // issue 23, defect 8: LlamaForCausalLM with model_type qwen2 ran silently
    let (c, e) = fail(&with_a("{T}/m"), |t| with_config(t, "model_type", "\"qwen2\""));
    assert_fails(c, &e, &["config.json", "model_type = \"qwen2\"", "LlamaForCausalLM"]);
}

#[test]
fn a_corrupt_donor_tokenizer_is_refused_not_copied() {
    // issue 23, defect 8: the donor's broken tokenizer.json was copied into the output
    let yaml = TA.replace("base_model: {F}/models/llama-tiny-base", "base_model: {T}/base").replace("{A}", "{F}/models/llama-tiny-a");
    let (c, e) = fail(&yaml, |t| {
        copy_model("llama-tiny-base", &t.join("base"));
        std::fs::write(t.join("base/tokenizer.json"), "{\"model\": ").expect("corrupt");
    });
    assert_fails(c, &e, &["tokenizer.json", "not valid JSON"]);
}

/// `evomerge score` on `dir`: exit code and stderr.
fn score(dir: &Path) -> (Option<i32>, String) {
    let (code, _, err) = crate::common::run(&["score", "--model", &dir.display().to_string(), "--token-ids", "1,2,3"]);
    (code, err)
}

#[test]
fn score_checks_a_model_as_merge_does() {
    // issue 23, defect 8: a Qwen2 config over Llama tensors was refused by merge but run by
    // score (without the q/k/v biases Qwen2 has); an I32 tensor was reported as missing
    let t = tempfile::tempdir().expect("tmp");
    copy_model("llama-tiny-a", &t.path().join("m"));
    let p = t.path().join("m/config.json");
    let cfg = std::fs::read_to_string(&p).expect("cfg").replace("LlamaForCausalLM", "Qwen2ForCausalLM").replace("\"llama\"", "\"qwen2\"");
    std::fs::write(&p, cfg).expect("write");
    let (c, e) = score(&t.path().join("m"));
    assert_fails(c, &e, &["self_attn.q_proj.bias"]);

    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("m");
    copy_model("llama-tiny-a", &dir);
    crate::common::edit_safetensors_header(&dir.join("model.safetensors"), |h| {
        h["model.layers.1.mlp.up_proj.weight"]["dtype"] = serde_json::json!("I32");
    });
    let (c, e) = score(&dir);
    assert_fails(c, &e, &["model.layers.1.mlp.up_proj.weight", "I32"]);
    assert!(!e.contains("missing"), "{e}");
}
