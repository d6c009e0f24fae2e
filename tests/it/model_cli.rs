//! `evomerge score` / `evomerge generate` end to end, and the runtime's bad-input errors.

use std::path::Path;

use serde_json::Value;

use crate::common::{fixtures, run};
use crate::model_ref::variant;

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn refs(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("refs").join(format!("{name}.json"))).expect("refs")).expect("json")
}

#[test]
fn score_json_matches_transformers() {
    let r = refs("llama-tiny-b");
    for seq in r["sequences"].as_array().expect("seqs") {
        let (code, out, err) = run(&["score", "--model", &model("llama-tiny-b"), "--text", seq["text"].as_str().expect("text"), "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: Value = serde_json::from_str(&out).expect("one JSON object");
        assert_eq!(v["token_ids"], seq["input_ids"], "tokenization (BOS included)");
        let lps = v["logprobs"].as_array().expect("logprobs");
        assert_eq!(lps.len(), seq["input_ids"].as_array().expect("ids").len() - 1);
        let sum: f64 = lps.iter().map(|x| x.as_f64().expect("f64")).sum();
        let want = seq["sum_logprob_next_token"].as_f64().expect("sum");
        assert!((sum - want).abs() < 1e-4, "{sum} vs {want}");
        assert_eq!(v["top_ids"].as_array().expect("top").last(), Some(&seq["argmax_last"]));
    }
    // Token ids in, human table out.
    let (code, out, _) = run(&["score", "-m", &model("llama-tiny-b"), "--token-ids", "1,261,297,259,16"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("sum log-prob") && out.lines().count() >= 7, "{out}");
}

#[test]
fn generate_json_matches_transformers_greedy() {
    let r = refs("llama-tiny-a");
    for g in r["greedy"].as_array().expect("greedy") {
        let prompt = g["prompt"].as_str().expect("prompt");
        let (code, out, err) = run(&["generate", "--model", &model("llama-tiny-a"), "--prompt", prompt, "--max-new-tokens", "10", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["prompt_ids"], g["prompt_ids"]);
        assert_eq!(v["new_ids"], g["new_ids"]);
    }
    // A stop string ends the generation and is cut from the text.
    let (code, out, _) = run(&["generate", "-m", &model("llama-tiny-a"), "--prompt", "the cat", "--stop", "~", "--json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["stop_reason"], "stop");
    assert!(!v["text"].as_str().expect("text").contains('~'));
}

fn assert_fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = run(args);
    assert_eq!(code, Some(2), "{err}");
    for n in needles {
        assert!(err.contains(n), "'{n}' not in: {err}");
    }
}

fn broken(dst: &Path, edit: impl Fn(&mut serde_json::Map<String, Value>), extra: &[(&str, usize, f32)], drop: &[&str]) -> String {
    variant("llama-tiny-a", dst, edit, extra, drop);
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("models/llama-tiny-a").join(f), dst.join(f)).expect("tokenizer");
    }
    dst.display().to_string()
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    // Token id out of vocabulary.
    assert_fails(&["score", "-m", &model("llama-tiny-a"), "--token-ids", "1,300"], &["token id 300", "vocabulary (size 300)"]);
    // Unsupported architecture: named, with the supported list.
    let gpt2 = broken(
        &t.join("gpt2"),
        |c| {
            c.insert("model_type".into(), "gpt2".into());
            c.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
        },
        &[],
        &[],
    );
    assert_fails(&["score", "-m", &gpt2, "--text", "hi"], &["GPT2LMHeadModel", "llama, mistral, qwen2, qwen3"]);
    // Missing tensor.
    let missing = broken(&t.join("missing"), |_| {}, &[], &["model.layers.2.mlp.up_proj.weight"]);
    assert_fails(&["score", "-m", &missing, "--text", "hi"], &["model.layers.2.mlp.up_proj.weight"]);
    // Prompt longer than the context.
    let short = broken(
        &t.join("short"),
        |c| {
            c.insert("max_position_embeddings".into(), 8.into());
        },
        &[],
        &[],
    );
    assert_fails(&["score", "-m", &short, "--text", "the robot merged two apples. the owl"], &["longer than the model's context (8 positions)"]);
    assert_fails(&["generate", "-m", &short, "--prompt", "the robot merged two apples"], &["prompt 0", "longer than the model's context"]);
    // NaN weights: a typed, candidate-scoped error, not garbage numbers.
    let nan = broken(&t.join("nan"), |_| {}, &[("model.layers.{layer}.input_layernorm.weight", 64, f32::NAN)], &[]);
    assert_fails(&["score", "-m", &nan, "--text", "the cat"], &["non-finite"]);
    assert_fails(&["generate", "-m", &nan, "--prompt", "the cat"], &["non-finite"]);
    // A device this build does not have.
    if !cfg!(feature = "cuda") {
        assert_fails(&["score", "-m", &model("llama-tiny-a"), "--text", "x", "--device", "cuda:0"], &["cuda:0", "without CUDA support"]);
    }
    assert_fails(&["score", "-m", &model("llama-tiny-a"), "--text", "x", "--device", "tpu"], &["tpu"]);
    // --text without a tokenizer.
    let no_tok = t.join("notok");
    variant("llama-tiny-a", &no_tok, |_| {}, &[], &[]);
    assert_fails(&["score", "-m", &no_tok.display().to_string(), "--text", "x"], &["tokenizer.json", "--token-ids"]);
}

#[test]
fn non_finite_errors_are_candidate_scoped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("nan");
    variant("llama-tiny-a", &dir, |_| {}, &[("model.norm.weight", 64, f32::INFINITY)], &[]);
    let mut m = evomerge_engine::model::open_dir(crate::common::test_runtime(), evomerge_engine::model::DeviceSpec::Cpu, &dir).expect("opens");
    let e = m.logits(&[1, 2, 3]).expect_err("inf logits");
    assert!(e.is_candidate_scoped(), "{e}");
    assert!(matches!(e, evomerge_engine::EngineError::NonFinite { .. }));
}

/// `--runtime libtorch`: in a build with the feature, the same scores as the default runtime;
/// without it, an error that names the feature (never a loader crash or a silent fallback).
#[test]
fn runtime_libtorch_scores_or_names_its_feature() {
    let text = refs("llama-tiny-b")["sequences"][0]["text"].as_str().expect("text").to_string();
    let m = model("llama-tiny-b");
    let args = |rt: &'static str| -> Vec<String> {
        ["score", "--model", &m, "--text", &text, "--json", "--runtime", rt].iter().map(|s| s.to_string()).collect()
    };
    let call = |rt: &'static str| {
        let a = args(rt);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, burn, err) = call("burn");
    assert_eq!(code, Some(0), "{err}");
    let (code, torch, err) = call("libtorch");
    if cfg!(feature = "libtorch") {
        assert_eq!(code, Some(0), "{err}");
        let lp = |s: &str| -> Vec<f64> {
            let v: Value = serde_json::from_str(s).expect("json");
            v["logprobs"].as_array().expect("logprobs").iter().map(|x| x.as_f64().expect("f64")).collect()
        };
        for (a, b) in lp(&burn).iter().zip(lp(&torch)) {
            assert!((a - b).abs() < 1e-4, "burn {a} vs libtorch {b}");
        }
    } else {
        assert_ne!(code, Some(0));
        assert!(err.contains("--features libtorch"), "{err}");
    }
    // A CUDA device LibTorch does not see (a CPU-only LibTorch, no driver, no GPU here): a clear
    // error, not a crash; where a GPU is there, it scores.
    let (code, _, err) = run(&["score", "--model", &m, "--text", "x", "--runtime", "libtorch", "--device", "cuda:0"]);
    assert!(
        code == Some(0) || (code == Some(2) && err.contains("cuda:0") && (err.contains("CUDA") || err.contains("--features libtorch"))),
        "{code:?} {err}"
    );
    let (code, _, err) = run(&["score", "--model", &m, "--text", "x", "--runtime", "tpu"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected 'burn' or 'libtorch'"), "{err}");
}
