//! The demo zoo: its training model computes what the runtime (and so transformers) computes,
//! its tokenizer file encodes as the trainer does, training lowers the loss, and the committed
//! zoo loads and has the skills its card claims.

use burn::tensor::{Int, Tensor, TensorData};
use burn_ndarray::{NdArray, NdArrayDevice};
use evomerge_engine::model::{self, DeviceSpec, Tokenizer};
use evomerge_zoo::{Dims, Stage, TinyLlama, export, skills, train, vocab};

use crate::common::{run_ok, test_device};

type B = NdArray<f32>;

fn small() -> Dims {
    Dims { hidden: 32, layers: 2, heads: 4, intermediate: 48, ..Dims::default() }
}

#[test]
fn exported_zoo_model_runs_identically_in_the_runtime() {
    let d = small();
    let dev = NdArrayDevice::Cpu;
    // Random weights with a larger spread than the init, so that every part of the forward matters.
    let mut m = TinyLlama::<B>::init(&d, 3, &dev);
    m.norm = burn::module::Param::from_tensor(Tensor::from_data(
        TensorData::new((0..d.hidden).map(|i| 0.5 + i as f32 / d.hidden as f32).collect::<Vec<f32>>(), [d.hidden]),
        &dev,
    ));
    let dir = tempfile::tempdir().expect("tmp");
    export(&m, &d, dir.path(), "test").expect("export");
    let ids: Vec<u32> = {
        let mut v = vec![vocab::BOS];
        v.extend(vocab::encode("Q: what is 12 + 7? A: 19"));
        v
    };
    let want: Vec<f32> = m
        .forward(&d, Tensor::<B, 2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, ids.len()]), &dev))
        .into_data()
        .to_vec()
        .expect("logits");
    let mut rt = model::open_dir(crate::common::test_runtime(), test_device(), dir.path()).expect("runtime opens the zoo checkpoint");
    let got = rt.logits(&ids).expect("logits");
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < crate::common::tol(1e-4, 5e-2) as f32, "max |runtime - trainer| = {worst:e}");
    // The tokenizer file encodes (with <s>) exactly as the trainer does.
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    assert_eq!(tok.encode("Q: what is 12 + 7? A: 19", true).expect("encode"), ids);
    assert_eq!(tok.encode(" cba", false).expect("encode"), vocab::encode(" cba"));
}

#[test]
fn a_few_training_steps_lower_the_loss() {
    let d = small();
    let dev = NdArrayDevice::Cpu;
    let s = skills(0, 400);
    let stage = Stage { steps: 40, batch: 16, lr: 3e-3, warmup: 5, weight_decay: 0.0, seed: 1 };
    let mut losses = vec![];
    let m = TinyLlama::<burn::backend::Autodiff<B>>::init(&d, 0, &dev);
    train::train(m, &d, &stage, &[(s[1].1.train.as_slice(), 1.0)], &dev, |_, l| losses.push(l));
    let (first, last) = (losses[0], *losses.last().expect("losses"));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

fn zoo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets").join("zoo")
}

/// `evomerge eval` of `model` on the zoo task `skill` (validation split), with `extra` flags.
fn accuracy(model: &std::path::Path, skill: &str, extra: &[&str]) -> f64 {
    let task = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tasks").join(format!("zoo-{skill}.toml"));
    let (model, task) = (model.display().to_string(), task.display().to_string());
    let mut args = vec!["eval", "-m", &model, "--task", &task, "--json"];
    args.extend_from_slice(extra);
    let out = run_ok(&args);
    serde_json::from_str::<serde_json::Value>(out.trim()).expect("json")["value"].as_f64().expect("value")
}

#[test]
fn committed_zoo_loads_and_each_expert_has_its_skill() {
    let z = zoo();
    for m in ["base", "expert-add", "expert-reverse"] {
        model::open_dir(crate::common::test_runtime(), DeviceSpec::Cpu, &z.join(m)).unwrap_or_else(|e| panic!("{m}: {e}"));
    }
    // Accuracy through the product's own evaluation path (tokenizer, batched generation with
    // EOS, extraction) equals what the trainer measured teacher-forced (zoo.json): greedy
    // decoding reproduces the answer exactly when every answer token is the argmax.
    let zoo_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(z.join("zoo.json")).expect("zoo.json")).expect("json");
    let recorded = |m: &str, skill: &str| -> f64 {
        zoo_json["validation_accuracy"].as_array().expect("acc").iter().find(|r| r[0] == m && r[1] == skill).expect("entry")[2]
            .as_f64()
            .expect("value")
    };
    for m in ["expert-add", "expert-reverse"] {
        for skill in ["add", "reverse"] {
            let (got, want) = (accuracy(&z.join(m), skill, &[]), recorded(m, skill));
            assert!((got - want).abs() < 0.01, "{m} on {skill}: eval {got} vs zoo.json {want}");
        }
    }
    assert!(recorded("expert-add", "add") > recorded("expert-reverse", "add") + 0.15, "the addition expert adds better");
    assert!(recorded("expert-reverse", "reverse") > recorded("expert-add", "reverse") + 0.15, "the reversal expert reverses better");
}

/// The premise of the demo: each expert forgets the other's skill, and task arithmetic of the
/// two wins both back. Through the product's own `merge` and `eval` (200 validation items per
/// skill), the merge at weights 0.5 / 0.5 beats each expert on the mean of the two skills by
/// a wide margin (≈ 0.85 vs ≈ 0.6 when the zoo was trained).
#[test]
fn committed_zoo_experts_merge_into_a_model_with_both_skills() {
    let z = zoo();
    let tmp = tempfile::tempdir().expect("tmp");
    let recipe = tmp.path().join("ta.yaml");
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {z}/base\nmodels:\n  - model: {z}/expert-add\n    parameters: {{weight: 0.5}}\n  - model: {z}/expert-reverse\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
        z = z.display()
    );
    std::fs::write(&recipe, yaml).expect("recipe");
    let merged = tmp.path().join("merged");
    run_ok(&["merge", &recipe.display().to_string(), "--out", &merged.display().to_string()]);
    let mean = |m: &std::path::Path| (accuracy(m, "add", &["--limit", "200"]) + accuracy(m, "reverse", &["--limit", "200"])) / 2.0;
    let m = mean(&merged);
    for e in ["expert-add", "expert-reverse"] {
        let x = mean(&z.join(e));
        assert!(m > x + 0.15, "merge {m:.3} vs {e} {x:.3}: the experts no longer leave room for a merge");
    }
}
