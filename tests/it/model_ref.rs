//! The forward pass against an independent reference written here: a naive f64 transformer,
//! token by token, following the same layer path. It covers what the transformers fixtures
//! (Llama only) do not: Qwen2 q/k/v biases and tied embeddings, Qwen3 per-head q/k RMSNorm,
//! Mistral sliding-window attention, and data-flow paths that repeat layers, mix two models and
//! scale hops — including generation through the per-hop KV cache.

use std::collections::BTreeMap;
use std::path::Path;

use evomerge_engine::io::ModelConfig;
use evomerge_engine::model::{self, GenerateOptions, Hop, LanguageModel, LayerPath};
use evomerge_engine::{Checkpoint, TensorSource};
use serde_json::Value;

use crate::common::{fixtures, load};

/// A model as plain f64 arrays.
pub(crate) struct RefModel {
    cfg: ModelConfig,
    t: BTreeMap<String, Vec<f64>>,
}

impl RefModel {
    fn open(dir: &Path) -> Self {
        let t = load(dir).into_iter().map(|(k, v)| (k, v.into_iter().map(f64::from).collect())).collect();
        Self { cfg: ModelConfig::from_dir(dir).expect("config"), t }
    }

    fn w(&self, name: &str) -> &[f64] {
        self.t.get(name).unwrap_or_else(|| panic!("reference: no tensor {name}"))
    }
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// `W [out, in] · x (+ b)`.
fn mv(w: &[f64], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let n = x.len();
    (0..w.len() / n).map(|o| w[o * n..(o + 1) * n].iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + b.map_or(0.0, |b| b[o])).collect()
}

fn rope(v: &mut [f64], pos: usize, theta: f64) {
    let d = v.len();
    let h = d / 2;
    for i in 0..h {
        let a = pos as f64 / theta.powf((2 * i) as f64 / d as f64);
        let (c, s) = (a.cos(), a.sin());
        let (x1, x2) = (v[i], v[i + h]);
        v[i] = x1 * c - x2 * s;
        v[i + h] = x2 * c + x1 * s;
    }
}

/// Logits `[n][vocab]` of `ids` along `path` over `models`.
fn reference(models: &[RefModel], path: &LayerPath, ids: &[u32], window: Option<usize>) -> Vec<Vec<f64>> {
    let c = &models[0].cfg;
    let (hd, nh, nkv, hid) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.hidden_size);
    let g = nh / nkv;
    let emb = models[path.embed_model].w("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| emb[t as usize * hid..(t as usize + 1) * hid].to_vec()).collect();
    for hop in &path.hops {
        let m = &models[hop.model];
        let eps = m.cfg.rms_norm_eps;
        let p = format!("model.layers.{}.", hop.layer);
        let w = |n: &str| m.w(&format!("{p}{n}"));
        let opt = |n: &str| m.t.get(&format!("{p}{n}")).map(Vec::as_slice);
        for x in &mut xs {
            x.iter_mut().for_each(|v| *v *= f64::from(hop.scale));
        }
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rms(x, w("input_layernorm.weight"), eps);
            let mut q = mv(w("self_attn.q_proj.weight"), &h, opt("self_attn.q_proj.bias"));
            let mut k = mv(w("self_attn.k_proj.weight"), &h, opt("self_attn.k_proj.bias"));
            let v = mv(w("self_attn.v_proj.weight"), &h, opt("self_attn.v_proj.bias"));
            for (vec, norm) in [(&mut q, "self_attn.q_norm.weight"), (&mut k, "self_attn.k_norm.weight")] {
                for head in vec.chunks_mut(hd) {
                    if let Some(nw) = opt(norm) {
                        let r = rms(head, nw, eps);
                        head.copy_from_slice(&r);
                    }
                    rope(head, pos, m.cfg.rope_theta);
                }
            }
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        let mut out = Vec::new();
        for i in 0..xs.len() {
            let mut a = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / g;
                let keys: Vec<usize> = (0..=i).filter(|&j| window.is_none_or(|win| i - j < win)).collect();
                let scores: Vec<f64> =
                    keys.iter().map(|&j| (0..hd).map(|d| qs[i][head * hd + d] * ks[j][kvh * hd + d]).sum::<f64>() / (hd as f64).sqrt()).collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&j, ej) in keys.iter().zip(&e) {
                    for d in 0..hd {
                        a[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = mv(w("self_attn.o_proj.weight"), &a, None);
            let x1: Vec<f64> = xs[i].iter().zip(&o).map(|(x, o)| x + o).collect();
            let h = rms(&x1, w("post_attention_layernorm.weight"), eps);
            let gate = mv(w("mlp.gate_proj.weight"), &h, None);
            let up = mv(w("mlp.up_proj.weight"), &h, None);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = mv(w("mlp.down_proj.weight"), &act, None);
            out.push(x1.iter().zip(&down).map(|(x, d)| x + d).collect());
        }
        xs = out;
    }
    let hm = &models[path.head_model];
    let head = hm.t.get("lm_head.weight").map_or_else(|| hm.w("model.embed_tokens.weight"), Vec::as_slice);
    xs.iter().map(|x| mv(head, &rms(x, hm.w("model.norm.weight"), hm.cfg.rms_norm_eps), None)).collect()
}

/// Writes a variant of a fixture model: config edits plus extra/removed tensors.
pub fn variant(src: &str, dst: &Path, edit: impl Fn(&mut serde_json::Map<String, Value>), extra: &[(&str, usize, f32)], drop: &[&str]) {
    std::fs::create_dir_all(dst).expect("mkdir");
    let dir = fixtures().join("models").join(src);
    let mut cfg: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("cfg")).expect("json");
    edit(&mut cfg);
    std::fs::write(dst.join("config.json"), serde_json::to_string_pretty(&cfg).expect("ser")).expect("write cfg");
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let ck = Checkpoint::open(&dir, src).expect("open");
    for n in ck.tensor_names() {
        if !drop.contains(&n.as_str()) {
            let t = ck.read_f32(&n).expect("read");
            tensors.insert(n, (t.shape, t.data));
        }
    }
    // Deterministic "random" extras: a sine pattern around `center` (norm weights ~1, biases ~0).
    for (k, (pattern, len, center)) in extra.iter().enumerate() {
        for l in 0..4 {
            let name = pattern.replace("{layer}", &l.to_string());
            let data = (0..*len).map(|i| center + 0.3 * ((i * 7 + l * 13 + k * 5) as f32).sin()).collect();
            tensors.insert(name, (vec![*len], data));
        }
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, (s, d))| (n, s, d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("view")))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dst.join("model.safetensors")).expect("write");
}

/// llama-tiny-a turned into a Qwen2 (q/k/v biases, tied embeddings), Qwen3 (per-head q/k
/// norms) or Mistral (sliding window `window`) checkpoint in `dst`.
pub(crate) fn arch_variant(arch: &str, dst: &Path, window: usize) {
    match arch {
        "qwen2" => variant(
            "llama-tiny-a",
            dst,
            |c| {
                c.insert("model_type".into(), "qwen2".into());
                c.insert("architectures".into(), serde_json::json!(["Qwen2ForCausalLM"]));
                c.insert("tie_word_embeddings".into(), true.into());
            },
            &[
                ("model.layers.{layer}.self_attn.q_proj.bias", 64, 0.0),
                ("model.layers.{layer}.self_attn.k_proj.bias", 32, 0.0),
                ("model.layers.{layer}.self_attn.v_proj.bias", 32, 0.0),
            ],
            &["lm_head.weight"],
        ),
        "qwen3" => variant(
            "llama-tiny-a",
            dst,
            |c| {
                c.insert("model_type".into(), "qwen3".into());
                c.insert("architectures".into(), serde_json::json!(["Qwen3ForCausalLM"]));
            },
            &[("model.layers.{layer}.self_attn.q_norm.weight", 16, 1.0), ("model.layers.{layer}.self_attn.k_norm.weight", 16, 1.0)],
            &[],
        ),
        "mistral" => variant(
            "llama-tiny-a",
            dst,
            |c| {
                c.insert("model_type".into(), "mistral".into());
                c.insert("architectures".into(), serde_json::json!(["MistralForCausalLM"]));
                c.insert("sliding_window".into(), window.into());
            },
            &[],
            &[],
        ),
        other => panic!("no variant for {other}"),
    }
}

fn assert_close(got: &[f32], want: &[Vec<f64>], tol: f64, what: &str) {
    let v = want[0].len();
    let mut worst = 0f64;
    for (p, row) in want.iter().enumerate() {
        for (j, w) in row.iter().enumerate() {
            worst = worst.max((f64::from(got[p * v + j]) - w).abs());
        }
    }
    assert!(worst <= tol, "{what}: max |logit - reference| = {worst:e}");
}

const IDS: [u32; 14] = [1, 51, 28, 267, 266, 273, 20, 285, 286, 33, 265, 28, 273, 27];

#[test]
fn llama_fixture_agrees_with_the_naive_reference() {
    // Ties the reference itself to transformers: it must reproduce the fixture model too.
    let dir = fixtures().join("models").join("llama-tiny-a");
    let r = RefModel::open(&dir);
    let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dir).expect("open");
    let want = reference(&[r], &LayerPath::identity(0, 4), &IDS, None);
    assert_close(&m.logits(&IDS).expect("logits"), &want, crate::common::tol(1e-4, 5e-2), "llama");
}

#[test]
fn qwen2_qwen3_and_mistral_features_agree_with_the_reference() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cases: Vec<(&str, Option<usize>)> = vec![("qwen2", None), ("qwen3", None), ("mistral", Some(4))];
    for (arch, window) in cases {
        let dst = tmp.path().join(arch);
        arch_variant(arch, &dst, window.unwrap_or(0));
        let r = RefModel::open(&dst);
        let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dst).unwrap_or_else(|e| panic!("{arch}: {e}"));
        let want = reference(&[r], &LayerPath::identity(0, 4), &IDS, window);
        assert_close(&m.logits(&IDS).expect("logits"), &want, crate::common::tol(1e-4, 5e-2), arch);
        // The feature matters: without it the reference differs clearly.
        if arch == "mistral" {
            let full = reference(&[RefModel::open(&dst)], &LayerPath::identity(0, 4), &IDS, None);
            let d = (full[13][0] - want[13][0]).abs() + (full[13][1] - want[13][1]).abs();
            assert!(d > 1e-3, "window 4 should change the last position");
        }
    }
}

pub(crate) fn two_models() -> (Box<dyn LanguageModel>, Vec<RefModel>) {
    let f = fixtures().join("models");
    let (a, b) = (f.join("llama-tiny-a"), f.join("llama-tiny-b"));
    let (ca, cb) = (Checkpoint::open(&a, "a").expect("a"), Checkpoint::open(&b, "b").expect("b"));
    let m = model::open(
        crate::common::test_runtime(),
        crate::common::test_device(),
        &[model::ModelSpec::from_checkpoint(&ca), model::ModelSpec::from_checkpoint(&cb)],
    )
    .expect("open two");
    (m, vec![RefModel::open(&a), RefModel::open(&b)])
}

pub(crate) fn dfs_path() -> LayerPath {
    LayerPath {
        embed_model: 0,
        head_model: 0,
        hops: vec![
            Hop { model: 0, layer: 0, scale: 1.0 },
            Hop { model: 0, layer: 1, scale: 0.8 },
            Hop { model: 1, layer: 1, scale: 1.0 },
            Hop { model: 1, layer: 1, scale: 1.25 },
            Hop { model: 1, layer: 2, scale: 1.0 },
            Hop { model: 0, layer: 3, scale: 0.9 },
        ],
    }
}

#[test]
fn identity_path_reproduces_the_plain_model_exactly() {
    let (mut two, _) = two_models();
    let f = fixtures().join("models");
    for (i, name) in ["llama-tiny-a", "llama-tiny-b"].iter().enumerate() {
        let mut alone = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &f.join(name)).expect("open");
        two.set_path(LayerPath::identity(i, 4)).expect("path");
        assert_eq!(two.logits(&IDS).expect("two"), alone.logits(&IDS).expect("alone"), "{name}: bit-identical");
    }
}

#[test]
fn data_flow_path_matches_the_reference_and_generates_through_the_cache() {
    let (mut m, refs) = two_models();
    let path = dfs_path();
    m.set_path(path.clone()).expect("path");
    let want = reference(&refs, &path, &IDS, None);
    assert_close(&m.logits(&IDS).expect("logits"), &want, crate::common::tol(1e-4, 5e-2), "data-flow path");

    // Greedy generation with the per-hop KV cache == argmax of full recomputation.
    let prompt = IDS[..6].to_vec();
    let out = m
        .generate(std::slice::from_ref(&prompt), &GenerateOptions { max_new_tokens: 6, eos: vec![], share_prefix: false, batch_size: 0 }, &|_, _| {
            false
        })
        .expect("generate");
    let mut seq = prompt.clone();
    let v = m.info().dims.vocab;
    for _ in 0..6 {
        let logits = m.logits(&seq).expect("logits");
        let last = &logits[(seq.len() - 1) * v..];
        let arg = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).expect("vocab") as u32;
        seq.push(arg);
    }
    assert_eq!(out[0].tokens, seq[6..].to_vec());
}

#[test]
fn load_weights_swaps_one_model_in_place() {
    let (mut two, _) = two_models();
    let f = fixtures().join("models");
    let base = Checkpoint::open(&f.join("llama-tiny-base"), "base").expect("base");
    two.load_weights(1, &base).expect("swap");
    two.set_path(LayerPath::identity(1, 4)).expect("path");
    let mut alone = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &f.join("llama-tiny-base")).expect("open");
    assert_eq!(two.logits(&IDS).expect("swapped"), alone.logits(&IDS).expect("alone"));
    assert!(two.load_weights(5, &base).is_err());
    // A source that lacks a tensor is refused before anything is released: the model still runs.
    let mut partial = evomerge_engine::MemorySource::new("partial");
    for n in base.tensor_names().into_iter().filter(|n| !n.contains("layers.3.mlp")) {
        partial.insert(n.clone(), base.read_f32(&n).expect("read"));
    }
    let err = two.load_weights(1, &partial).expect_err("incomplete source");
    assert!(err.to_string().contains("model.layers.3.mlp"), "{err}");
    assert_eq!(two.logits(&IDS).expect("still usable"), alone.logits(&IDS).expect("alone"));
}
