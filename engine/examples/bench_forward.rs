//! Forward-pass benchmark (run through `scripts/bench-forward`, not a test).
//!
//! `bench_forward MODEL_DIR [REPS]`: log-likelihood scoring of a batch of 8 × 128 random tokens
//! (every position scored, as perplexity) and a 32-token greedy decode from one 8-token prompt,
//! f32 on the CPU backend. Prints tokens/s (median of REPS) and the ratio to transformers 5.23 /
//! torch 2.15 CPU on this machine class (issue 4): 46.6 tokens/s scoring, 1.9 tokens/s decode
//! (2.2 decode-only).
//!
//! `RUNTIME=libtorch` (an example built with `--features libtorch`) runs LibTorch instead of
//! burn; `DEVICE=cuda:0` a GPU; `SCORE_LEN=512` longer scored sequences.

use std::time::Instant;

#[global_allocator]
static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;

use evomerge_engine::model::{self, DeviceSpec, GenerateOptions, ScoreRequest};

const REF_SCORE: f64 = 46.6;
const REF_DECODE: f64 = 1.9;
const REF_DECODE_ONLY: f64 = 2.2;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    evomerge_engine::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).ok_or("usage: bench_forward MODEL_DIR [REPS]")?);
    let reps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    // Profiling aid: BENCH_ONLY=score or BENCH_ONLY=decode runs one workload.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let t = Instant::now();
    let ck = evomerge_engine::Checkpoint::open(&dir, dir.display().to_string())?;
    let runtime: model::RuntimeKind = std::env::var("RUNTIME").unwrap_or_else(|_| "burn".into()).parse()?;
    let device: DeviceSpec = std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into()).parse()?;
    let len: usize = std::env::var("SCORE_LEN").ok().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let mut m = model::open(runtime, device, &[model::ModelSpec::from_checkpoint(&ck)])?;
    println!("load: {:.2} s ({} layers, vocab {}; {runtime} on {device})", t.elapsed().as_secs_f64(), m.info().layers[0], m.info().dims.vocab);
    // A weight swap (what a search does per candidate): decode + transpose + upload in place.
    let mut swaps = Vec::new();
    for _ in 0..reps.min(3) {
        let t = Instant::now();
        m.load_weights(0, &ck)?;
        swaps.push(t.elapsed().as_secs_f64());
    }
    let params = ck.raw_bytes() as f64 / 2.0;
    let swap = median(swaps);
    println!("weight swap: {swap:.2} s ({:.2} GB/s of f32 weights written)", params * 4.0 / swap / 1e9);
    let vocab = m.info().dims.vocab as u64;
    // Deterministic pseudo-random ids (SplitMix64).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % vocab) as u32
    };
    let reqs: Vec<ScoreRequest> = (0..8)
        .map(|_| {
            let t: Vec<u32> = (0..len).map(|_| next()).collect();
            ScoreRequest { context: t[..1].to_vec(), continuation: t[1..].to_vec() }
        })
        .collect();
    let tokens = 8.0 * len as f64;
    let mut score_t = vec![f64::NAN];
    for r in 0..=if only == "decode" { 0 } else { reps } {
        let t = Instant::now();
        let out = m.score(&reqs, 8)?;
        let s = t.elapsed().as_secs_f64();
        assert_eq!(out.len(), 8);
        if r > 0 {
            score_t.push(s); // the first run warms allocations and page tables
        }
        if only == "decode" {
            break;
        }
    }
    if score_t.len() > 1 {
        score_t.remove(0);
    }
    let score_tps = tokens / median(score_t);
    let prompt: Vec<u32> = (0..8).map(|_| next()).collect();
    let opts = GenerateOptions { max_new_tokens: 32, eos: vec![], share_prefix: false };
    let (mut total, mut prefill) = (Vec::new(), Vec::new());
    for r in 0..=if only == "score" { 0 } else { reps.min(3) } {
        let t = Instant::now();
        let g = m.generate(std::slice::from_ref(&prompt), &GenerateOptions { max_new_tokens: 1, eos: vec![], share_prefix: false }, &|_, _| false)?;
        let p = t.elapsed().as_secs_f64();
        assert_eq!(g[0].tokens.len(), 1);
        let t = Instant::now();
        let g = m.generate(std::slice::from_ref(&prompt), &opts, &|_, _| false)?;
        let s = t.elapsed().as_secs_f64();
        assert_eq!(g[0].tokens.len(), 32);
        if r > 0 {
            total.push(s);
            prefill.push(p);
        }
    }
    if total.is_empty() {
        total.push(f64::NAN);
        prefill.push(f64::NAN);
    }
    let (total, prefill) = (median(total), median(prefill));
    let decode_tps = 32.0 / total;
    let decode_only = 31.0 / (total - prefill);
    println!("{:<28} {:>10} {:>10} {:>8}", "workload", "tokens/s", "reference", "ratio");
    let label = format!("score 8x{len} ({runtime})");
    println!("{label:<28} {score_tps:>10.1} {REF_SCORE:>10.1} {:>7.2}x", score_tps / REF_SCORE);
    println!("{:<28} {:>10.2} {:>10.1} {:>7.2}x", "greedy 32 tokens", decode_tps, REF_DECODE, decode_tps / REF_DECODE);
    println!("{:<28} {:>10.2} {:>10.1} {:>7.2}x", "  decode only", decode_only, REF_DECODE_ONLY, decode_only / REF_DECODE_ONLY);
    Ok(())
}
