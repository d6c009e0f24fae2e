//! Candidates merged in place (`evomerge_engine::resident`) equal the streamed path (merge into
//! memory, swap into the runtime) bit for bit, for every weight-buffer shape the runtime has:
//! Llama, Qwen2 (q/k/v biases, tied embeddings), Qwen3 (q/k norms), f32 and bf16 inputs.

use std::path::{Path, PathBuf};

use evomerge_engine::Checkpoint;
use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::model::{self, DeviceSpec, LanguageModel, ModelSpec};
use evomerge_engine::recipe::{MergePlan, Recipe};
use evomerge_engine::resident::ResidentMerge;
use serde_json::json;

use crate::common::fixtures;
use crate::model_ref::variant;

const IDS: [u32; 9] = [1, 51, 28, 267, 266, 273, 20, 285, 286];

fn plan(text: &str) -> MergePlan {
    let r = Recipe::parse(text, "test").expect("parse");
    MergePlan::build(&r, text.to_string(), None, 7).expect("plan")
}

fn open(dir: &Path) -> Box<dyn LanguageModel> {
    let ck = Checkpoint::open(dir, "base").expect("open");
    model::open(crate::common::test_runtime(), DeviceSpec::Cpu, &[ModelSpec::from_checkpoint(&ck)]).expect("runtime")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Base, a, b of one architecture: the fixtures, or variants of them.
fn models(tmp: &Path, arch: &str) -> [PathBuf; 3] {
    let names = ["llama-tiny-base", "llama-tiny-a", "llama-tiny-b"];
    match arch {
        "llama" => names.map(|n| fixtures().join("models").join(n)),
        "qwen2" | "qwen3" => {
            let mut out = vec![];
            for (i, n) in names.iter().enumerate() {
                let dst = tmp.join(format!("{arch}-{n}"));
                let shift = 0.05 * i as f32; // extras differ from model to model
                let edit = |c: &mut serde_json::Map<String, serde_json::Value>| {
                    c.insert("model_type".into(), arch.into());
                    if arch == "qwen2" {
                        c.insert("architectures".into(), json!(["Qwen2ForCausalLM"]));
                        c.insert("tie_word_embeddings".into(), true.into());
                    } else {
                        c.insert("architectures".into(), json!(["Qwen3ForCausalLM"]));
                    }
                };
                if arch == "qwen2" {
                    let extra = [
                        ("model.layers.{layer}.self_attn.q_proj.bias", 64, shift),
                        ("model.layers.{layer}.self_attn.k_proj.bias", 32, -shift),
                        ("model.layers.{layer}.self_attn.v_proj.bias", 32, 2.0 * shift),
                    ];
                    variant(n, &dst, edit, &extra, &["lm_head.weight"]);
                } else {
                    let extra = [
                        ("model.layers.{layer}.self_attn.q_norm.weight", 16, 1.0 + shift),
                        ("model.layers.{layer}.self_attn.k_norm.weight", 16, 1.0 - shift),
                    ];
                    variant(n, &dst, edit, &extra, &[]);
                }
                out.push(dst);
            }
            [out[0].clone(), out[1].clone(), out[2].clone()]
        }
        _ => unreachable!(),
    }
}

fn recipes(m: &[PathBuf; 3], dtype: &str) -> Vec<String> {
    let [base, a, b] = m.clone().map(|p| p.display().to_string());
    vec![
        format!(
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: [0.9, 0.2, 0.6]}}\n  - model: {b}\n    parameters:\n      weight:\n        - filter: self_attn\n          value: 0.3\n        - value: -0.4\nparameters: {{lambda: 1.3}}\ndtype: {dtype}\n"
        ),
        format!(
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.25}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\nparameters: {{normalize: true}}\ndtype: {dtype}\n"
        ),
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [0.2, 0.8]}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {base}\n    parameters: {{weight: 0.1}}\ndtype: {dtype}\n"
        ),
    ]
}

/// Streams `text` into `streamed`, merges it in place into `in_place`; both give the same logits.
fn check_same(text: &str, resident: &ResidentMerge, streamed: &mut dyn LanguageModel, in_place: &mut dyn LanguageModel, what: &str) {
    let p = plan(text);
    streamed.load_weights(0, &merge_to_memory(&p).expect("merge")).expect("load");
    resident.materialize(&p, in_place, 0).expect("materialize");
    let (a, b) = (streamed.logits(&IDS).expect("logits"), in_place.logits(&IDS).expect("logits"));
    assert!(a.iter().all(|x| x.is_finite()), "{what}: finite");
    assert_eq!(bits(&a), bits(&b), "{what}: in place differs from streamed");
    // One row goes through the small-row kernel, which reads a bf16 copy of bf16-exact weights
    // (bf16 recipes): the copy made for the previous candidate must not outlive the rewrite.
    let (a, b) = (streamed.logits(&IDS[..1]).expect("logits"), in_place.logits(&IDS[..1]).expect("logits"));
    assert_eq!(bits(&a), bits(&b), "{what}: one-row logits in place differ from streamed");
}

#[test]
fn in_place_merges_equal_the_streamed_path_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tmp");
    for arch in ["llama", "qwen2", "qwen3"] {
        let m = models(tmp.path(), arch);
        for dtype in ["bfloat16", "float32"] {
            let texts = recipes(&m, dtype);
            let (mut streamed, mut in_place) = (open(&m[0]), open(&m[0]));
            let layout = in_place.weight_layout(0).expect("layout");
            // built once from the first recipe, reused for the others with other parameters
            let resident = ResidentMerge::new(&plan(&texts[0]), layout).expect("resident");
            assert!(resident.bytes() > 0);
            let mut before = None;
            for (i, t) in texts.iter().enumerate() {
                check_same(t, &resident, streamed.as_mut(), in_place.as_mut(), &format!("{arch} {dtype} recipe {i}"));
                let now = bits(&in_place.logits(&IDS).expect("logits"));
                assert_ne!(before.as_ref(), Some(&now), "{arch} {dtype}: recipe {i} changed nothing");
                before = Some(now);
            }
        }
    }
}

#[test]
fn bf16_sources_merge_in_place_like_streamed() {
    let bf = fixtures().join("models").join("llama-tiny-a-bf16");
    let base = fixtures().join("models").join("llama-tiny-base");
    let text = format!(
        "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.7}}\ndtype: bfloat16\n",
        base.display(),
        bf.display()
    );
    let (mut streamed, mut in_place) = (open(&base), open(&base));
    let resident = ResidentMerge::new(&plan(&text), in_place.weight_layout(0).expect("layout")).expect("resident");
    check_same(&text, &resident, streamed.as_mut(), in_place.as_mut(), "bf16 input");
}

#[test]
fn methods_that_are_not_elementwise_or_other_models_are_refused() {
    let m = models(Path::new("/nonexistent"), "llama");
    let [base, a, b] = m.clone().map(|p| p.display().to_string());
    let rt = open(&m[0]);
    let ties = format!(
        "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: float32\n"
    );
    let why = ResidentMerge::bytes_needed(&plan(&ties), &rt.weight_layout(0).expect("layout")).expect_err("ties is not elementwise");
    assert_eq!(why, evomerge_engine::resident::NotResident::NotElementwise("ties"));
    assert_eq!(why.to_string(), "ties is not an elementwise method");

    // held for base + a + b; a plan over other models is refused before any weight moves
    let texts = recipes(&m, "float32");
    let mut rt = open(&m[0]);
    let resident = ResidentMerge::new(&plan(&texts[0]), rt.weight_layout(0).expect("layout")).expect("resident");
    let before = bits(&rt.logits(&IDS).expect("logits"));
    let other = format!(
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
        fixtures().join("models").join("llama-tiny-a-bf16").display()
    );
    let err = resident.materialize(&plan(&other), rt.as_mut(), 0).expect_err("other models");
    assert!(err.to_string().contains("resident"), "{err}");
    assert_eq!(bits(&rt.logits(&IDS).expect("logits")), before, "the refused merge left the weights alone");
}

#[test]
fn merges_on_the_device_equal_the_streamed_path_bit_for_bit() {
    // The burn-op merge a GPU run uses, here on burn-ndarray (f32 IEEE, as the CPU kernels):
    // same logits to the bit for every architecture, dtype and recipe, including a buffer
    // whose parts get different weights (gate vs up).
    let tmp = tempfile::tempdir().expect("tmp");
    for arch in ["llama", "qwen2", "qwen3"] {
        let m = models(tmp.path(), arch);
        for dtype in ["bfloat16", "float32"] {
            let mut texts = recipes(&m, dtype);
            let [base, a, b] = m.clone().map(|p| p.display().to_string());
            texts.push(format!(
                "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: gate_proj\n          value: 1.1\n        - value: 0.3\n  - model: {b}\n    parameters: {{weight: 0.6}}\ndtype: {dtype}\n"
            ));
            let (mut streamed, mut on_device) = (open(&m[0]), open(&m[0]));
            let ta = ResidentMerge::new(&plan(&texts[0]), on_device.weight_layout(0).expect("layout")).expect("resident");
            assert!(ta.hold_on_device(&plan(&texts[0]), on_device.as_mut(), 0).expect("hold"), "{arch}: task arithmetic held");
            for (i, t) in texts.iter().enumerate().filter(|(i, _)| *i != 2) {
                check_same(t, &ta, streamed.as_mut(), on_device.as_mut(), &format!("{arch} {dtype} recipe {i} on the device"));
            }
            // held anew for linear (every model weighted, no base)
            let (mut streamed, mut on_device) = (open(&m[0]), open(&m[0]));
            let lin = ResidentMerge::new(&plan(&texts[2]), on_device.weight_layout(0).expect("layout")).expect("resident");
            assert!(lin.hold_on_device(&plan(&texts[2]), on_device.as_mut(), 0).expect("hold"), "{arch}: linear held");
            check_same(&texts[2], &lin, streamed.as_mut(), on_device.as_mut(), &format!("{arch} {dtype} linear on the device"));
            // the inputs held for linear serve a task-arithmetic plan over the same models
            check_same(&texts[0], &lin, streamed.as_mut(), on_device.as_mut(), &format!("{arch} {dtype} task arithmetic on linear's inputs"));
            // released: the same resident inputs merge on the host again
            on_device.release_held();
            check_same(&texts[1], &lin, streamed.as_mut(), on_device.as_mut(), &format!("{arch} {dtype} after release"));
        }
    }
}
