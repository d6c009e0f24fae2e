//! The demo model zoo: a tiny Llama-architecture base model trained from scratch with burn's
//! autodiff (ndarray backend, CPU) on a mixture of synthetic skills, and two experts fine-tuned
//! from it on disjoint skills (addition; string reversal), so that their task vectors conflict
//! and a merge has something to find. Everything follows from the seed.
//!
//! The standard configuration was chosen by measurement (`zoo/examples/merge_room.rs`; notes of
//! issue 7 and BENCHMARKS.md). What gives a merge room is a base that already has both skills
//! in part and experts that specialize and forget, as fine-tuned LLMs do: the base is trained
//! on addition and reversal (35 % each, sorting 30 %) and reaches ≈ 70 % / 89 %; each expert
//! is fine-tuned on its skill alone (lr 1e-3, 300 steps, no replay) to 97 % / 100 % and falls
//! to 18 % on the other skill. Task arithmetic of the two then recovers both skills (≈ 84 %
//! mean at the best global weights, ≈ 86 % with per-layer weights, against ≈ 59 % for either
//! expert). Two earlier zoos merged badly: a base with little addition (15 % of its mixture,
//! 4 % accuracy) left experts whose addition either stayed weak (lr 3e-4: 22 %) or, learned
//! harder (lr 1e-3: 67 %), could not be combined with reversal by any weighting.
//!
//! [`build`] writes, into one directory:
//! - `base/`, `expert-add/`, `expert-reverse/`: Hugging Face checkpoints (`LlamaForCausalLM`,
//!   f32 safetensors, a character-level `tokenizer.json`, a model card);
//! - `data/{add,reverse,sort}-{validation,test}.jsonl`: the held-out items (`id`, `question`,
//!   `answer`) the demo's tasks read; `data/both-*.jsonl` interleaves add and reverse (equal
//!   counts, so accuracy on it is the mean of both skills: one objective for CMA-ES);
//! - `zoo.json`: the configuration and each model's greedy accuracy per skill.

pub mod model;
pub mod train;
pub mod vocab;

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn_ndarray::{NdArray, NdArrayDevice};
use evomerge_datasets::{Gold, Item, Splits, synthetic};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use model::{Dims, TinyLlama};
pub use train::Stage;

type Inner = NdArray<f32>;
type Train = Autodiff<Inner>;

#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ZooError + '_ {
    move |source| ZooError::Io { path: path.to_path_buf(), source }
}

/// What [`build`] trains.
#[derive(Debug, Clone)]
pub struct ZooConfig {
    pub seed: u64,
    pub dims: Dims,
    /// Base model: from scratch on the mixture `base_mix`.
    pub base: Stage,
    /// Weights of addition, reversal and sorting in the base's batches.
    pub base_mix: [f64; 3],
    /// Each expert: from the base, on its one skill.
    pub expert: Stage,
    /// Weight of letter sorting mixed into each expert's batches, against 1 for the expert's
    /// skill (0: the expert sees its skill only, and forgets the other one).
    pub expert_replay: f64,
    /// Distinct items generated per skill (80 % train, 10 % validation, 10 % test).
    pub items_per_skill: usize,
}

impl ZooConfig {
    /// The configuration of the committed zoo (`datasets/zoo/`).
    pub fn standard(seed: u64) -> Self {
        Self {
            seed,
            dims: Dims::default(),
            base: Stage { steps: 1200, batch: 64, lr: 3e-3, warmup: 100, weight_decay: 0.01, seed: seed ^ 0xBA5E },
            base_mix: [0.35, 0.35, 0.3],
            expert: Stage { steps: 300, batch: 64, lr: 1e-3, warmup: 30, weight_decay: 0.01, seed: seed ^ 0xE4 },
            expert_replay: 0.0,
            items_per_skill: 6000,
        }
    }

    /// A few steps of everything (tests).
    pub fn quick(seed: u64) -> Self {
        let mut c = Self::standard(seed);
        c.dims = Dims { hidden: 32, layers: 2, intermediate: 64, ..Dims::default() };
        c.base.steps = 30;
        c.base.warmup = 5;
        c.expert.steps = 10;
        c.expert.warmup = 2;
        c.base.batch = 16;
        c.expert.batch = 16;
        c.items_per_skill = 300;
        c
    }
}

/// The synthetic skills: name and splits (two-digit addition, reversal of 2–9 letters, sorting
/// of 2–6 letters).
pub fn skills(seed: u64, n: usize) -> Vec<(&'static str, Splits)> {
    vec![
        ("add", synthetic::addition(seed, n, 2)),
        ("reverse", synthetic::reverse(seed.wrapping_add(1), n, 9)),
        ("sort", synthetic::sort_letters(seed.wrapping_add(2), n, 6)),
    ]
}

/// Validation accuracy of each model on each skill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZooSummary {
    /// (model, skill, accuracy)
    pub accuracy: Vec<(String, String, f64)>,
    /// (model, step, training loss)
    pub losses: Vec<(String, usize, f64)>,
}

/// Trains the zoo and writes it to `out` (which must not exist; written to a temporary sibling
/// and renamed, so an interrupted build leaves nothing). `log` receives progress lines.
pub fn build(out: &Path, cfg: &ZooConfig, log: &mut dyn FnMut(&str)) -> Result<ZooSummary, ZooError> {
    let dev = NdArrayDevice::Cpu;
    let d = cfg.dims;
    let skills = skills(cfg.seed, cfg.items_per_skill);
    let pool = |name: &str| skills.iter().find(|s| s.0 == name).map(|s| s.1.train.as_slice()).unwrap_or(&[]);
    let mut losses = vec![];
    let mut stage = |name: &str, model: TinyLlama<Train>, st: &Stage, pools: &[(&[Item], f64)], log: &mut dyn FnMut(&str)| {
        let t0 = std::time::Instant::now();
        train::train(model, &d, st, pools, &dev, |step, loss| {
            log(&format!("{name}: step {step}/{} loss {loss:.4} ({:.0} s)", st.steps, t0.elapsed().as_secs_f64()));
            losses.push((name.to_string(), step, loss));
        })
    };
    let base = TinyLlama::<Train>::init(&d, cfg.seed, &dev);
    let [m_add, m_rev, m_sort] = cfg.base_mix;
    let base = stage("base", base, &cfg.base, &[(pool("add"), m_add), (pool("reverse"), m_rev), (pool("sort"), m_sort)], log);
    let replay = cfg.expert_replay;
    let add = stage("expert-add", base.clone(), &cfg.expert, &[(pool("add"), 1.0), (pool("sort"), replay)], log);
    let rev = stage("expert-reverse", base.clone(), &cfg.expert, &[(pool("reverse"), 1.0), (pool("sort"), replay)], log);
    let models = [("base", base.valid()), ("expert-add", add.valid()), ("expert-reverse", rev.valid())];

    let mut accuracy = vec![];
    for (name, m) in &models {
        for (skill, s) in &skills {
            let a = train::accuracy(m, &d, &s.validation, &dev);
            log(&format!("{name}: {skill} validation accuracy {:.1} %", a * 100.0));
            accuracy.push((name.to_string(), skill.to_string(), a));
        }
    }
    let summary = ZooSummary { accuracy, losses };

    let tmp = out.with_file_name(format!(".{}.tmp", out.file_name().and_then(|n| n.to_str()).unwrap_or("zoo")));
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, m) in &models {
        let stage = if *name == "base" { &cfg.base } else { &cfg.expert };
        let acc: Vec<String> = summary.accuracy.iter().filter(|a| a.0 == *name).map(|a| format!("| {} | {:.1} % |", a.1, a.2 * 100.0)).collect();
        export(m, &d, &tmp.join(name), &card(name, cfg, stage, &acc))?;
    }
    let data = tmp.join("data");
    std::fs::create_dir_all(&data).map_err(io(&data))?;
    for (skill, s) in &skills {
        for (split, items) in [("validation", &s.validation), ("test", &s.test)] {
            write_items(&data.join(format!("{skill}-{split}.jsonl")), items)?;
        }
    }
    // Both demo skills interleaved, equal counts: accuracy on it is the mean of the two.
    let (add, rev) = (&skills[0].1, &skills[1].1);
    for (split, a, r) in [("validation", &add.validation, &rev.validation), ("test", &add.test, &rev.test)] {
        let both: Vec<Item> = a.iter().zip(r.iter()).flat_map(|(x, y)| [x.clone(), y.clone()]).collect();
        write_items(&data.join(format!("both-{split}.jsonl")), &both)?;
    }
    let zoo_json = json!({"seed": cfg.seed, "dims": d, "base_steps": cfg.base.steps, "expert_steps": cfg.expert.steps,
                          "base_mix": {"add": m_add, "reverse": m_rev, "sort": m_sort},
                          "expert_lr": cfg.expert.lr, "expert_replay": cfg.expert_replay,
                          "items_per_skill": cfg.items_per_skill, "validation_accuracy": summary.accuracy});
    write(&tmp.join("zoo.json"), &serde_json::to_string_pretty(&zoo_json).unwrap_or_default())?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(summary)
}

fn card(name: &str, cfg: &ZooConfig, st: &Stage, acc: &[String]) -> String {
    let pct = |w: f64| (100.0 * w / cfg.base_mix.iter().sum::<f64>()).round();
    let replay = if cfg.expert_replay > 0.0 { " (with some letter sorting mixed in)" } else { " alone" };
    let what = match name {
        "base" => format!(
            "trained from scratch on two-digit addition ({} %), string reversal ({} %) and letter sorting ({} %)",
            pct(cfg.base_mix[0]),
            pct(cfg.base_mix[1]),
            pct(cfg.base_mix[2])
        ),
        "expert-add" => format!("the base model fine-tuned on two-digit addition{replay}"),
        _ => format!("the base model fine-tuned on string reversal{replay}"),
    };
    format!(
        "# evomerge demo zoo: {name}\n\nA tiny Llama ({} layers, hidden {}, {} heads, character vocabulary) {what}; \
         {} steps of AdamW (batch {}, peak lr {}), seed {}. Made by `evomerge zoo train`.\n\n\
         Greedy exact-match accuracy on the validation split:\n\n| skill | accuracy |\n|---|---|\n{}\n",
        cfg.dims.layers,
        cfg.dims.hidden,
        cfg.dims.heads,
        st.steps,
        st.batch,
        st.lr,
        cfg.seed,
        acc.join("\n")
    )
}

fn write(path: &Path, text: &str) -> Result<(), ZooError> {
    std::fs::write(path, text).map_err(io(path))
}

fn write_items(path: &Path, items: &[Item]) -> Result<(), ZooError> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io(path))?);
    for i in items {
        let answer = match &i.gold {
            Gold::Text(t) => t.clone(),
            Gold::Choice(c) => c.to_string(),
        };
        writeln!(f, "{}", json!({"id": i.id, "question": i.question, "answer": answer})).map_err(io(path))?;
    }
    f.flush().map_err(io(path))
}

fn tensor_of<B: Backend, const D: usize>(t: burn::tensor::Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (shape, t.into_data().to_vec().unwrap_or_default())
}

/// `[in, out]` → `[out, in]`.
fn transposed<B: Backend>(t: burn::tensor::Tensor<B, 2>) -> (Vec<usize>, Vec<f32>) {
    tensor_of(t.transpose())
}

/// The Hugging Face tensors of a model (transformers' names and `[out, in]` layout).
pub fn hf_tensors<B: Backend>(m: &TinyLlama<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), tensor_of(m.embed.val()))];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), tensor_of(l.input_norm.val())));
        out.push((format!("{p}.self_attn.q_proj.weight"), transposed(l.wq.val())));
        out.push((format!("{p}.self_attn.k_proj.weight"), transposed(l.wk.val())));
        out.push((format!("{p}.self_attn.v_proj.weight"), transposed(l.wv.val())));
        out.push((format!("{p}.self_attn.o_proj.weight"), transposed(l.wo.val())));
        out.push((format!("{p}.post_attention_layernorm.weight"), tensor_of(l.post_norm.val())));
        out.push((format!("{p}.mlp.gate_proj.weight"), transposed(l.gate.val())));
        out.push((format!("{p}.mlp.up_proj.weight"), transposed(l.up.val())));
        out.push((format!("{p}.mlp.down_proj.weight"), transposed(l.down.val())));
    }
    out.push(("model.norm.weight".to_string(), tensor_of(m.norm.val())));
    out.push(("lm_head.weight".to_string(), transposed(m.head.val())));
    out.into_iter().map(|(n, (s, v))| (n, s, v)).collect()
}

/// transformers' `config.json` of a zoo model.
pub fn config_json(d: &Dims) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": d.hidden, "intermediate_size": d.intermediate, "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads, "num_key_value_heads": d.heads, "head_dim": d.head_dim(),
        "vocab_size": d.vocab, "max_position_embeddings": d.max_positions, "rms_norm_eps": d.eps,
        "rope_theta": d.rope_theta, "tie_word_embeddings": false, "hidden_act": "silu",
        "attention_bias": false, "mlp_bias": false, "bos_token_id": vocab::BOS, "eos_token_id": vocab::EOS,
        "pad_token_id": vocab::PAD, "torch_dtype": "float32"
    })
}

/// Writes a model as a Hugging Face checkpoint directory.
pub fn export<B: Backend>(m: &TinyLlama<B>, d: &Dims, dir: &Path, card: &str) -> Result<(), ZooError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors = hf_tensors(m);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ZooError::Write { path: dir.to_path_buf(), reason: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &st).map_err(|e| ZooError::Write { path: st.clone(), reason: e.to_string() })?;
    let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).unwrap_or_default();
    write(&dir.join("config.json"), &pretty(config_json(d)))?;
    write(&dir.join("tokenizer.json"), &pretty(vocab::tokenizer_json()))?;
    write(&dir.join("tokenizer_config.json"), &pretty(vocab::tokenizer_config_json()))?;
    write(
        &dir.join("generation_config.json"),
        &pretty(json!({"bos_token_id": vocab::BOS, "eos_token_id": vocab::EOS, "pad_token_id": vocab::PAD, "do_sample": false})),
    )?;
    write(&dir.join("README.md"), card)
}
