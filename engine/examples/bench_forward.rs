//! Forward-pass benchmark (run through `scripts/bench-forward`, not a test).
//!
//! `bench_forward MODEL_DIR [REPS]`: log-likelihood scoring of a batch of 8 × 128 random tokens
//! (every position scored, as perplexity) and a 32-token greedy decode from one 8-token prompt,
//! f32 on the CPU backend. Prints tokens/s (median of REPS) and the ratio to transformers 5.23 /
//! torch 2.15 CPU on this machine class (issue 4): 46.6 tokens/s scoring, 1.9 tokens/s decode
//! (2.2 decode-only).
//!
//! `RUNTIME=libtorch` (an example built with `--features libtorch`) runs LibTorch instead of
//! burn; `DEVICE=cuda:0` a GPU; `SCORE_LEN=512` longer scored sequences. For
//! `scripts/bench-gpu`: `EXPERT=DIR` (a second checkpoint of the same shape) adds the in-memory
//! merge per candidate (task arithmetic of the model and EXPERT, inputs held on the runtime's
//! device when it merges there) and a search-loop candidate (that merge, then 25 questions × 4
//! choices after a shared 400-token few-shot prefix, scored with shared prefixes);
//! `MATMUL=N` adds an N×N×N matmul in the runtime's dtype (TFLOP/s).

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
    let swaps_n: usize = std::env::var("SWAPS").ok().map(|s| s.parse()).transpose()?.unwrap_or(3);
    for _ in 0..reps.min(swaps_n) {
        let t = Instant::now();
        m.load_weights(0, &ck)?;
        swaps.push(t.elapsed().as_secs_f64());
    }
    let params = ck.raw_bytes() as f64 / 2.0;
    let swap = if swaps.is_empty() { f64::NAN } else { median(swaps) };
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
    let opts = GenerateOptions { max_new_tokens: 32, eos: vec![], share_prefix: false, batch_size: 0 };
    let (mut total, mut prefill) = (Vec::new(), Vec::new());
    for r in 0..=if only == "score" { 0 } else { reps.min(3) } {
        let t = Instant::now();
        let g = m.generate(
            std::slice::from_ref(&prompt),
            &GenerateOptions { max_new_tokens: 1, eos: vec![], share_prefix: false, batch_size: 0 },
            &|_, _| false,
        )?;
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
    if let Ok(expert) = std::env::var("EXPERT") {
        candidates(m.as_mut(), device, &dir, std::path::Path::new(&expert), &mut next)?;
    }
    if let Some(n) = std::env::var("MATMUL").ok().map(|s| s.parse::<usize>()).transpose()? {
        // both runtimes compute in f32 on the CPU, in the checkpoint's dtype on a GPU
        let dtype = if device == DeviceSpec::Cpu { evomerge_engine::DType::F32 } else { ck.config.dtype.unwrap_or(evomerge_engine::DType::F32) };
        let secs = matmul(runtime, device, dtype, n)?;
        println!("matmul {n}^3 ({runtime}, {dtype:?} on {device}): {:.3} TFLOP/s", 2.0 * (n as f64).powi(3) / secs / 1e12);
    }
    Ok(())
}

/// In-memory merges (task arithmetic of the loaded model and `expert`) and search-loop
/// candidates (a merge, then a multiple-choice workload scored with shared prefixes).
fn candidates(
    m: &mut dyn model::LanguageModel,
    device: DeviceSpec,
    base: &std::path::Path,
    expert: &std::path::Path,
    next: &mut dyn FnMut() -> u32,
) -> Result<(), Box<dyn std::error::Error>> {
    use evomerge_engine::recipe::MergePlan;
    use evomerge_engine::resident::ResidentMerge;
    let tmp = std::env::temp_dir().join(format!("bench-forward-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let recipe = |w: f64| -> Result<MergePlan, Box<dyn std::error::Error>> {
        let f = tmp.join("recipe.yaml");
        let text = format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: {w}\ndtype: bfloat16\n",
            base.display(),
            expert.display()
        );
        std::fs::write(&f, text)?;
        Ok(MergePlan::from_file(&f, 0)?)
    };
    let t = Instant::now();
    let plan = recipe(0.5)?;
    let resident = ResidentMerge::new(&plan, m.weight_layout(0)?)?;
    // as the search does: held on a GPU, merged on the host into the weights on the CPU
    let on_device = device != DeviceSpec::Cpu && resident.hold_on_device(&plan, m, 0)?;
    println!(
        "merge inputs held: {:.1} s ({}, {:.2} GB on the host)",
        t.elapsed().as_secs_f64(),
        if on_device { "merged on the device" } else { "merged on the host" },
        resident.bytes() as f64 / 1e9
    );
    // 400 tokens of few-shot prefix (fewer where the model's context is short: the fixtures)
    let prefix: Vec<u32> = (0..400.min(m.info().max_context.saturating_sub(40))).map(|_| next()).collect();
    let reqs: Vec<ScoreRequest> = (0..25)
        .flat_map(|_| {
            let q: Vec<u32> = prefix.iter().copied().chain((0..30).map(|_| next())).collect();
            (0..4).map(|_| ScoreRequest { context: q.clone(), continuation: (0..6).map(|_| next()).collect() }).collect::<Vec<_>>()
        })
        .collect();
    let (mut merges, mut cands) = (vec![], vec![]);
    for k in 0..6 {
        let plan = recipe(0.3 + 0.1 * k as f64)?;
        let t = Instant::now();
        resident.materialize(&plan, m, 0)?;
        let _ = m.logits(&[1])?; // waits for the device: the merge is done
        let merge = t.elapsed().as_secs_f64();
        let out = m.score_shared(&reqs, 8)?;
        assert_eq!(out.len(), reqs.len());
        if k > 0 {
            merges.push(merge);
            cands.push(t.elapsed().as_secs_f64());
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("in-memory merge per candidate: {:.1} ms (median of 5)", median(merges) * 1e3);
    println!("search-loop candidate (merge + 100 requests, shared prefixes): {:.2} s (median of 5)", median(cands));
    Ok(())
}

/// Seconds of one `n`×`n`×`n` matmul on `runtime`'s `device` in `dtype` (median of 10, after a
/// warm-up), synchronized by reading one element back.
#[cfg_attr(not(any(feature = "cuda", feature = "libtorch")), allow(unused_variables))]
fn matmul(runtime: model::RuntimeKind, device: DeviceSpec, dtype: evomerge_engine::DType, n: usize) -> Result<f64, Box<dyn std::error::Error>> {
    let reps = 10;
    match runtime {
        #[cfg(feature = "libtorch")]
        model::RuntimeKind::Libtorch => {
            let _guard = tch::no_grad_guard();
            let dev = match device {
                DeviceSpec::Cpu => tch::Device::Cpu,
                DeviceSpec::Cuda(i) => tch::Device::Cuda(i),
            };
            let kind = match (device, dtype) {
                (DeviceSpec::Cpu, _) => tch::Kind::Float,
                (_, evomerge_engine::DType::BF16) => tch::Kind::BFloat16,
                (_, evomerge_engine::DType::F16) => tch::Kind::Half,
                _ => tch::Kind::Float,
            };
            let n = n as i64;
            let (a, b) = (tch::Tensor::randn([n, n], (kind, dev)), tch::Tensor::randn([n, n], (kind, dev)));
            let run = || {
                let t = Instant::now();
                let c = a.matmul(&b);
                let _ = c.double_value(&[0, 0]);
                t.elapsed().as_secs_f64()
            };
            run();
            Ok(median((0..reps).map(|_| run()).collect()))
        }
        _ => match device {
            DeviceSpec::Cpu => burn_matmul::<burn::backend::NdArray<f32>>(&Default::default(), n, reps),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(i) => {
                use burn::backend::Cuda;
                use burn::backend::cuda::CudaDevice;
                let dev = CudaDevice::new(i);
                match dtype {
                    evomerge_engine::DType::BF16 => burn_matmul::<Cuda<burn::tensor::bf16, i32>>(&dev, n, reps),
                    evomerge_engine::DType::F16 => burn_matmul::<Cuda<burn::tensor::f16, i32>>(&dev, n, reps),
                    evomerge_engine::DType::F32 => burn_matmul::<Cuda<f32, i32>>(&dev, n, reps),
                }
            }
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err("built without --features cuda".into()),
        },
    }
}

fn burn_matmul<B: burn::tensor::backend::Backend>(dev: &B::Device, n: usize, reps: usize) -> Result<f64, Box<dyn std::error::Error>> {
    use burn::tensor::{Distribution, Tensor};
    let a = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), dev);
    let b = Tensor::<B, 2>::random([n, n], Distribution::Normal(0.0, 1.0), dev);
    let run = || {
        let t = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = c.slice([0..1, 0..1]).into_data();
        t.elapsed().as_secs_f64()
    };
    run();
    Ok(median((0..reps).map(|_| run()).collect()))
}
