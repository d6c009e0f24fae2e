//! Writes a random checkpoint shaped like a real model, for benchmarks (never committed).
//!
//! `cargo run --release -p evomerge-engine --example random_model -- OUT_DIR [SEED] [VARIANT_OF_SEED]`
//!
//! Shape: Qwen2-0.5B (hidden 896, 24 layers, intermediate 4864, 14 heads / 2 KV heads, vocab
//! 151936, tied embeddings), bf16. Weights ~ N(0, 0.02²)-ish (uniform with that std), norms 1.
//! With `VARIANT_OF_SEED`, the model is the base of that seed plus a task vector of std 0.002
//! drawn from `SEED`, so two variants of one base have realistic, independent task vectors.

use std::path::PathBuf;

use evomerge_engine::dtype::{self, DType};
use evomerge_engine::io::{OutputDir, ShardedWriter, TensorEntry};
use evomerge_engine::merge::rng::{CounterRng, tensor_seed};
use rayon::prelude::*;

const HIDDEN: usize = 896;
const INTER: usize = 4864;
const LAYERS: usize = 24;
const KV: usize = 128;
const VOCAB: usize = 151_936;

fn shapes() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN]),
            ("self_attn.q_proj.bias", vec![HIDDEN]),
            ("self_attn.k_proj.weight", vec![KV, HIDDEN]),
            ("self_attn.k_proj.bias", vec![KV]),
            ("self_attn.v_proj.weight", vec![KV, HIDDEN]),
            ("self_attn.v_proj.bias", vec![KV]),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN]),
            ("mlp.gate_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.up_proj.weight", vec![INTER, HIDDEN]),
            ("mlp.down_proj.weight", vec![HIDDEN, INTER]),
            ("input_layernorm.weight", vec![HIDDEN]),
            ("post_attention_layernorm.weight", vec![HIDDEN]),
        ] {
            v.push((format!("{p}{n}"), s));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![HIDDEN]));
    v
}

fn fill(name: &str, n: usize, seed: u64, std: f32, offset: f32) -> Vec<f32> {
    let rng = CounterRng::new(tensor_seed(seed, name), 0);
    let a = std * 3f32.sqrt(); // uniform(-a, a) has this std
    (0..n).into_par_iter().map(|i| offset + a * (2.0 * rng.uniform(i as u64) as f32 - 1.0)).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first().map(PathBuf::from) else {
        eprintln!("usage: random_model OUT_DIR [SEED] [VARIANT_OF_SEED]");
        std::process::exit(2);
    };
    let seed: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let variant_of: Option<u64> = args.get(2).and_then(|s| s.parse().ok());
    let dir = OutputDir::create(&out, true).unwrap_or_else(|e| panic!("{e}"));
    let specs = shapes();
    let entries: Vec<TensorEntry> = specs.iter().map(|(n, s)| TensorEntry { name: n.clone(), shape: s.clone(), dtype: DType::BF16 }).collect();
    let mut w = ShardedWriter::new(dir.path(), entries, 5_000_000_000).unwrap_or_else(|e| panic!("{e}"));
    for (name, shape) in &specs {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm");
        let base_seed = variant_of.unwrap_or(seed);
        let mut v = fill(name, n, base_seed, if is_norm { 0.05 } else { 0.02 }, if is_norm { 1.0 } else { 0.0 });
        if variant_of.is_some() {
            let d = fill(name, n, seed.wrapping_add(1_000_003), 0.002, 0.0);
            v.par_iter_mut().zip(&d).for_each(|(x, y)| *x += y);
        }
        w.write_next(name, &dtype::encode(DType::BF16, &v)).unwrap_or_else(|e| panic!("{e}"));
    }
    w.finish().unwrap_or_else(|e| panic!("{e}"));
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643
    });
    std::fs::write(dir.path().join("config.json"), serde_json::to_string_pretty(&config).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    dir.commit().unwrap_or_else(|e| panic!("{e}"));
    println!("wrote {}", out.display());
}
