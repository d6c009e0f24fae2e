//! Exploration harness (not a test, not the product): how much room a zoo configuration leaves
//! for merging. Trains a base once, then for each expert configuration trains both experts and
//! measures (greedy accuracy, validation split, both skills): the sources, a grid of global
//! task-arithmetic weights, and a seeded random search over per-layer weights; then the grid's
//! and the search's picks on the test split. Defaults are `ZooConfig::standard`; environment
//! variables change them (HIDDEN, LAYERS, INTER, HEADS, BASE_STEPS, BASE_LR, BASE_MIX=add,rev,sort,
//! ADD_DIGITS, REV_LEN; EXPERTS = space-separated `lr:steps:sort-replay[:other-skill-replay]`;
//! NVAL validation items per skill, SEARCH random per-layer candidates). This is how the
//! committed zoo's configuration was chosen (BENCHMARKS.md, "Choosing the demo zoo").
//!   EXPERTS="3e-4:300:0.3 1e-3:300:0" cargo run --release -p evomerge-zoo --example merge_room
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Param};
use burn::tensor::Tensor;
use burn_ndarray::{NdArray, NdArrayDevice};
use evomerge_zoo::model::Layer;
use evomerge_zoo::train::{self, Stage};
use evomerge_zoo::{Dims, TinyLlama, ZooConfig, skills};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};

type B = NdArray<f32>;
type T = Autodiff<B>;

fn env<V: std::str::FromStr>(k: &str, d: V) -> V {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// `base + wa·(a − base) + wr·(r − base)` of one parameter.
fn mix<const D: usize>(b: &Param<Tensor<B, D>>, a: &Param<Tensor<B, D>>, r: &Param<Tensor<B, D>>, wa: f32, wr: f32) -> Param<Tensor<B, D>> {
    let base = b.val();
    Param::from_tensor(base.clone() + (a.val() - base.clone()).mul_scalar(wa) + (r.val() - base).mul_scalar(wr))
}

/// Task arithmetic with weights per layer (`w[i]` for layer i, the last entry for the rest).
fn merge(b: &TinyLlama<B>, a: &TinyLlama<B>, r: &TinyLlama<B>, wa: &[f32], wr: &[f32]) -> TinyLlama<B> {
    let n = b.layers.len();
    let layers = (0..n)
        .map(|i| {
            let (lb, la, lr, x, y) = (&b.layers[i], &a.layers[i], &r.layers[i], wa[i], wr[i]);
            Layer {
                input_norm: mix(&lb.input_norm, &la.input_norm, &lr.input_norm, x, y),
                wq: mix(&lb.wq, &la.wq, &lr.wq, x, y),
                wk: mix(&lb.wk, &la.wk, &lr.wk, x, y),
                wv: mix(&lb.wv, &la.wv, &lr.wv, x, y),
                wo: mix(&lb.wo, &la.wo, &lr.wo, x, y),
                post_norm: mix(&lb.post_norm, &la.post_norm, &lr.post_norm, x, y),
                gate: mix(&lb.gate, &la.gate, &lr.gate, x, y),
                up: mix(&lb.up, &la.up, &lr.up, x, y),
                down: mix(&lb.down, &la.down, &lr.down, x, y),
            }
        })
        .collect();
    let (x, y) = (wa[n], wr[n]);
    TinyLlama {
        embed: mix(&b.embed, &a.embed, &r.embed, x, y),
        layers,
        norm: mix(&b.norm, &a.norm, &r.norm, x, y),
        head: mix(&b.head, &a.head, &r.head, x, y),
    }
}

fn main() {
    let dev = NdArrayDevice::Cpu;
    let seed: u64 = env("SEED", 0);
    let std = ZooConfig::standard(seed);
    let d = Dims {
        hidden: env("HIDDEN", std.dims.hidden),
        layers: env("LAYERS", std.dims.layers),
        intermediate: env("INTER", 3 * env::<usize>("HIDDEN", std.dims.hidden)),
        heads: env("HEADS", std.dims.heads),
        ..std.dims
    };
    let n_items = std.items_per_skill;
    let mut sk = skills(seed, n_items);
    if let Ok(n) = std::env::var("ADD_DIGITS") {
        sk[0].1 = evomerge_datasets::synthetic::addition(seed, n_items, n.parse().expect("ADD_DIGITS"));
    }
    if let Ok(n) = std::env::var("REV_LEN") {
        sk[1].1 = evomerge_datasets::synthetic::reverse(seed.wrapping_add(1), n_items, n.parse().expect("REV_LEN"));
    }
    let pool = |name: &str| sk.iter().find(|s| s.0 == name).map(|s| s.1.train.as_slice()).unwrap_or(&[]);
    let default_mix = std.base_mix.map(|w| w.to_string()).join(",");
    let mixv: Vec<f64> = env::<String>("BASE_MIX", default_mix).split(',').map(|v| v.parse().expect("BASE_MIX")).collect();
    let base_stage = Stage { steps: env("BASE_STEPS", std.base.steps), lr: env("BASE_LR", std.base.lr), ..std.base.clone() };
    let t0 = std::time::Instant::now();
    let base = train::train(
        TinyLlama::<T>::init(&d, seed, &dev),
        &d,
        &base_stage,
        &[(pool("add"), mixv[0]), (pool("reverse"), mixv[1]), (pool("sort"), mixv[2])],
        &dev,
        |s, l| eprintln!("base {s} {l:.3}"),
    );
    eprintln!("base trained in {:.0} s", t0.elapsed().as_secs_f64());
    let nval: usize = env("NVAL", 300);
    let val = |name: &str| &sk.iter().find(|s| s.0 == name).expect("a zoo skill").1.validation[..nval];
    let test = |name: &str| &sk.iter().find(|s| s.0 == name).expect("a zoo skill").1.test[..];
    let acc = |m: &TinyLlama<B>, v: bool| {
        let (fa, fr) = if v { (val("add"), val("reverse")) } else { (test("add"), test("reverse")) };
        (train::accuracy(m, &d, fa, &dev), train::accuracy(m, &d, fr, &dev))
    };
    let bv = base.valid();
    let ba = acc(&bv, true);
    println!("base: add {:.3} reverse {:.3}", ba.0, ba.1);
    let default_experts = format!("{}:{}:{}", std.expert.lr, std.expert.steps, std.expert_replay);
    for spec in env::<String>("EXPERTS", default_experts).split_whitespace() {
        let p: Vec<f64> = spec.split(':').map(|v| v.parse().expect("EXPERTS: lr:steps:replay")).collect();
        let st = Stage { steps: p[1] as usize, lr: p[0], ..std.expert.clone() };
        let replay = p[2];
        let other = p.get(3).copied().unwrap_or(0.0);
        let t0 = std::time::Instant::now();
        let a = train::train(base.clone(), &d, &st, &[(pool("add"), 1.0), (pool("sort"), replay), (pool("reverse"), other)], &dev, |_, _| {}).valid();
        let r = train::train(base.clone(), &d, &st, &[(pool("reverse"), 1.0), (pool("sort"), replay), (pool("add"), other)], &dev, |_, _| {}).valid();
        let secs = t0.elapsed().as_secs_f64();
        let (aa, ra) = (acc(&a, true), acc(&r, true));
        let n = d.layers + 1;
        let mut grid = (0.0, 0.0, 0.0, (0.0, 0.0));
        let ws = [0.25f32, 0.5, 0.75, 1.0, 1.25];
        for &x in &ws {
            for &y in &ws {
                let m = merge(&bv, &a, &r, &vec![x; n], &vec![y; n]);
                let v = acc(&m, true);
                if (v.0 + v.1) / 2.0 > grid.0 {
                    grid = ((v.0 + v.1) / 2.0, x, y, v);
                }
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut u = || ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) as f32;
        let mut best = (0.0, vec![], vec![], (0.0, 0.0));
        for _ in 0..env::<usize>("SEARCH", 96) {
            let wa: Vec<f32> = (0..n).map(|_| 1.25 * u()).collect();
            let wr: Vec<f32> = (0..n).map(|_| 1.25 * u()).collect();
            let m = merge(&bv, &a, &r, &wa, &wr);
            let v = acc(&m, true);
            if (v.0 + v.1) / 2.0 > best.0 {
                best = ((v.0 + v.1) / 2.0, wa, wr, v);
            }
        }
        let gt = acc(&merge(&bv, &a, &r, &vec![grid.1; n], &vec![grid.2; n]), false);
        let st_ = acc(&merge(&bv, &a, &r, &best.1, &best.2), false);
        let (at, rt) = (acc(&a, false), acc(&r, false));
        println!(
            "{spec} ({secs:.0} s): expert-add {:.3}/{:.3} m{:.3} | expert-rev {:.3}/{:.3} m{:.3} | grid {:.3} ({}, {}) {:.3}/{:.3} | search {:.3} {:.3}/{:.3} | TEST add-exp m{:.3} rev-exp m{:.3} grid m{:.3} search m{:.3}",
            aa.0,
            aa.1,
            (aa.0 + aa.1) / 2.0,
            ra.0,
            ra.1,
            (ra.0 + ra.1) / 2.0,
            grid.0,
            grid.1,
            grid.2,
            grid.3.0,
            grid.3.1,
            best.0,
            best.3.0,
            best.3.1,
            (at.0 + at.1) / 2.0,
            (rt.0 + rt.1) / 2.0,
            (gt.0 + gt.1) / 2.0,
            (st_.0 + st_.1) / 2.0
        );
    }
}
