//! Fuzzing the parsers of what users hand evomerge (issue 23): safetensors headers and the
//! checkpoint built on them, the sharded index, `config.json`, mergekit YAML and experiment
//! TOML. Each target mutates valid inputs (the fixtures) with a seeded generator, structure-aware
//! where it matters (JSON fields, TOML values, YAML lines) and byte-wise elsewhere, and asserts
//! that nothing panics: every input is either accepted or refused with an error.
//!
//! `EVOMERGE_FUZZ_CASES` sets the cases per target (default 1,000, what CI runs);
//! `EVOMERGE_FUZZ_SEED` the seed. A failing case is written to `$TMPDIR/evomerge-fuzz-*` and
//! named in the panic. The `evaluations.jsonl` replay target lives in `run/src/stage.rs`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use evomerge_engine::io::ModelConfig;
use evomerge_engine::recipe::{MergePlan, Recipe};
use evomerge_engine::{Checkpoint, TensorSource};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::common::{copy_model, fixtures};

fn cases() -> u64 {
    std::env::var("EVOMERGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
}

fn rng(target: u64) -> ChaCha8Rng {
    let seed: u64 = std::env::var("EVOMERGE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    ChaCha8Rng::seed_from_u64(seed ^ target.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn below(r: &mut ChaCha8Rng, n: usize) -> usize {
    (r.next_u64() % n.max(1) as u64) as usize
}

/// Runs `f` on every case, turning a panic into a test failure that keeps the input.
fn fuzz(name: &str, target: u64, mut case: impl FnMut(&mut ChaCha8Rng) -> Vec<u8>, check: impl Fn(&[u8])) {
    let mut r = rng(target);
    let n = cases();
    let t0 = std::time::Instant::now();
    for i in 0..n {
        let input = case(&mut r);
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let keep = std::env::temp_dir().join(format!("evomerge-fuzz-{name}-{i}"));
            std::fs::write(&keep, &input).ok();
            panic!("{name}: case {i} panicked; its input is in {}", keep.display());
        }
    }
    eprintln!("fuzz {name}: {n} cases in {:.1} s", t0.elapsed().as_secs_f64());
}

/// A JSON value a hostile file might hold where a number, string or list was expected.
fn odd_json(r: &mut ChaCha8Rng) -> Value {
    match below(r, 14) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(0),
        3 => json!(1e12),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(0.5),
        7 => json!("x"),
        8 => json!([]),
        9 => json!({}),
        10 => json!(true),
        11 => json!([u64::MAX, 3]),
        12 => json!(r.next_u64() % 100_000),
        _ => json!(1e308),
    }
}

/// Mutates a JSON object: a key set to an odd value, removed, or a value nested one level down.
fn mutate_json(r: &mut ChaCha8Rng, v: &mut Value) {
    let Some(obj) = v.as_object_mut() else { return };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let k = keys[below(r, keys.len())].clone();
    match below(r, 4) {
        0 => {
            obj.remove(&k);
        }
        1 if obj[&k].is_object() => mutate_json(r, obj.get_mut(&k).expect("key")),
        _ => {
            obj.insert(k, odd_json(r));
        }
    }
}

/// Byte-level damage in the first `within` bytes: flips, insertions, deletions, truncation.
fn mutate_bytes(r: &mut ChaCha8Rng, b: &mut Vec<u8>, within: usize) {
    for _ in 0..1 + below(r, 4) {
        let w = within.min(b.len());
        match below(r, 4) {
            0 if w > 0 => {
                let i = below(r, w);
                b[i] ^= 1 << below(r, 8);
            }
            1 => {
                let i = below(r, w + 1);
                b.insert(i, (r.next_u64() & 0xFF) as u8);
            }
            2 if w > 0 => {
                let i = below(r, w);
                b.remove(i);
            }
            _ => {
                let n = below(r, b.len() + 1);
                b.truncate(n);
            }
        }
    }
}

/// A safetensors file from a header and its data section (header padded to 8 bytes).
fn safetensors_bytes(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut hs = serde_json::to_string(header).expect("json").into_bytes();
    while !hs.len().is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(data);
    out
}

/// The fixture model's safetensors header and data section.
fn fixture_safetensors() -> (Value, Vec<u8>) {
    let bytes = std::fs::read(fixtures().join("models/llama-tiny-a/model.safetensors")).expect("fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).expect("header"), bytes[8 + n..].to_vec())
}

/// Opens the checkpoint in `dir` and, if it opens, validates it and reads every tensor.
fn open_and_read(dir: &Path) {
    if let Ok(ck) = Checkpoint::open(dir, "fuzz") {
        let _ = ck.validate();
        let _ = ck.first_non_finite();
        for name in ck.tensor_names() {
            let _ = ck.read_f32(&name);
        }
    }
}

#[test]
fn fuzz_safetensors_headers_and_checkpoints() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    copy_model("llama-tiny-a", &dir);
    let (header, data) = fixture_safetensors();
    let names: Vec<String> = header.as_object().expect("object").keys().filter(|k| *k != "__metadata__").cloned().collect();
    let file = dir.join("model.safetensors");
    fuzz(
        "safetensors",
        1,
        |r| {
            let mut h = header.clone();
            match below(r, 3) {
                // a field of one tensor: dtype, shape or offsets set to something odd
                0 => {
                    let t = &names[below(r, names.len())];
                    let field = ["dtype", "shape", "data_offsets"][below(r, 3)];
                    h[t][field] = match (field, below(r, 3)) {
                        ("dtype", _) => json!(["I32", "U8", "BOOL", "F64", "I64", "F8_E4M3", "Q7", "bf16", ""][below(r, 9)]),
                        ("shape", 0) => json!([0]),
                        ("shape", 1) => json!([u64::MAX / 2, 4]),
                        ("data_offsets", 0) => json!([8, 4]),
                        ("data_offsets", 1) => json!([0, u64::MAX]),
                        _ => odd_json(r),
                    };
                    safetensors_bytes(&h, &data)
                }
                // a whole tensor removed or renamed
                1 => {
                    let t = names[below(r, names.len())].clone();
                    let v = h.as_object_mut().expect("object").remove(&t).expect("tensor");
                    if below(r, 2) == 0 {
                        h[format!("{t}.renamed")] = v;
                    }
                    safetensors_bytes(&h, &data)
                }
                // bytes of the header, its length or the data damaged
                _ => {
                    let mut b = safetensors_bytes(&h, &data);
                    let header_end = 8 + u64::from_le_bytes(b[..8].try_into().expect("8")) as usize;
                    if below(r, 4) == 0 {
                        let lens = [0u64, 1, 7, 8, u64::MAX, u64::MAX / 2, (header_end - 8) as u64 + 1, b.len() as u64];
                        b[..8].copy_from_slice(&lens[below(r, lens.len())].to_le_bytes());
                    } else {
                        mutate_bytes(r, &mut b, header_end);
                    }
                    b
                }
            }
        },
        |bytes| {
            std::fs::write(&file, bytes).expect("write");
            open_and_read(&dir);
        },
    );
}

#[test]
fn fuzz_sharded_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    copy_model("llama-tiny-a", &dir);
    let shard = "model-00001-of-00001.safetensors";
    std::fs::rename(dir.join("model.safetensors"), dir.join(shard)).expect("rename");
    let (header, _) = fixture_safetensors();
    let names: Vec<String> = header.as_object().expect("object").keys().filter(|k| *k != "__metadata__").cloned().collect();
    let index: Value =
        json!({"metadata": {"total_size": 0}, "weight_map": names.iter().map(|n| (n.clone(), json!(shard))).collect::<serde_json::Map<_, _>>()});
    let path = dir.join("model.safetensors.index.json");
    fuzz(
        "index",
        2,
        |r| {
            let mut v = index.clone();
            let map = v["weight_map"].as_object_mut().expect("map");
            for _ in 0..1 + below(r, 3) {
                let t = names[below(r, names.len())].clone();
                match below(r, 6) {
                    0 => {
                        map.remove(&t);
                    }
                    1 => {
                        map.insert(t, json!(["model-00002-of-00002.safetensors", "../m/model.safetensors", "/etc/passwd", "", "."][below(r, 5)]));
                    }
                    2 => {
                        map.insert(format!("{t}.extra"), json!(shard));
                    }
                    3 => {
                        map.insert(t, odd_json(r));
                    }
                    _ => {}
                }
            }
            if below(r, 8) == 0 {
                mutate_json(r, &mut v);
            }
            let mut b = serde_json::to_vec(&v).expect("json");
            if below(r, 6) == 0 {
                let n = b.len();
                mutate_bytes(r, &mut b, n);
            }
            b
        },
        |bytes| {
            std::fs::write(&path, bytes).expect("write");
            open_and_read(&dir);
        },
    );
}

#[test]
fn fuzz_config_json() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("m");
    copy_model("llama-tiny-a", &dir);
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let config: Value = serde_json::from_str(&text).expect("json");
    let path = dir.join("config.json");
    fuzz(
        "config",
        3,
        |r| {
            let mut v = config.clone();
            for _ in 0..1 + below(r, 3) {
                mutate_json(r, &mut v);
            }
            let mut b = serde_json::to_vec(&v).expect("json");
            if below(r, 10) == 0 {
                let n = b.len();
                mutate_bytes(r, &mut b, n);
            }
            b
        },
        |bytes| {
            let _ = ModelConfig::parse(&String::from_utf8_lossy(bytes));
            // one case in 20 goes on to open the model with this config (the file checks)
            if bytes.len() % 20 == 0 {
                std::fs::write(&path, bytes).expect("write");
                open_and_read(&dir);
            }
        },
    );
}

#[test]
fn fuzz_mergekit_yaml() {
    let merges = fixtures().join("merges");
    let recipes: Vec<String> = std::fs::read_dir(&merges)
        .expect("merges")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| std::fs::read_to_string(p).expect("yaml"))
        .collect();
    let methods = ["linear", "slerp", "ties", "dare_ties", "task_arithmetic", "passthrough", "model_stock", "della", "nope"];
    let values = ["-1", "0", "1e308", ".nan", ".inf", "~", "[]", "{}", "\"x\"", "999999999999", "0.5", "!!binary AAAA", "*a", "&a 1"];
    fuzz(
        "yaml",
        4,
        |r| {
            let text = &recipes[below(r, recipes.len())];
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            for _ in 0..1 + below(r, 3) {
                let i = below(r, lines.len());
                match below(r, 5) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    2 => {
                        // a value replaced
                        if let Some((k, _)) = lines[i].split_once(':') {
                            lines[i] = format!("{k}: {}", values[below(r, values.len())]);
                        }
                    }
                    3 => {
                        let (from, to) = (methods[below(r, methods.len())], methods[below(r, methods.len())]);
                        lines[i] = lines[i].replace(from, to);
                    }
                    _ => lines[i] = format!("{}{}", " ".repeat(below(r, 4)), lines[i].trim_start()),
                }
                if lines.is_empty() {
                    break;
                }
            }
            let mut b = lines.join("\n").into_bytes();
            if below(r, 10) == 0 {
                let n = b.len();
                mutate_bytes(r, &mut b, n);
            }
            b
        },
        |bytes| {
            let text = String::from_utf8_lossy(bytes).into_owned();
            if let Ok(recipe) = Recipe::parse(&text, "fuzz") {
                let _ = MergePlan::build(&recipe, text, Some(&fixtures()), 1);
            }
        },
    );
}

#[test]
fn fuzz_experiment_toml() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = crate::common::tiny_experiment(tmp.path(), 8);
    let text = std::fs::read_to_string(&exp).expect("experiment");
    let values = ["0", "-1", "1e308", "nan", "inf", "-inf", "9223372036854775807", "\"x\"", "[]", "{}", "true", "0.5", "\"../../etc\"", "\"nsga2\""];
    let path = tmp.path().join("fuzz.toml");
    fuzz(
        "experiment",
        5,
        |r| {
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            for _ in 0..1 + below(r, 3) {
                let i = below(r, lines.len());
                match below(r, 4) {
                    0 => {
                        lines.remove(i);
                    }
                    1 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    _ => {
                        if let Some((k, _)) = lines[i].split_once('=') {
                            lines[i] = format!("{k}= {}", values[below(r, values.len())]);
                        }
                    }
                }
                if lines.is_empty() {
                    break;
                }
            }
            let mut b = lines.join("\n").into_bytes();
            if below(r, 10) == 0 {
                let n = b.len();
                mutate_bytes(r, &mut b, n);
            }
            b
        },
        |bytes| {
            std::fs::write(&path, bytes).expect("write");
            if let Ok(e) = evomerge_run::Experiment::load(&path) {
                let _ = e.to_toml();
                let _ = e.layout();
            }
        },
    );
}
