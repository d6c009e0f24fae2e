//! The zoo's model: a Llama decoder written with burn tensor ops so that burn's autodiff can
//! train it, computing exactly what transformers' `LlamaForCausalLM` computes (pre-norm
//! RMSNorm `x · rsqrt(mean(x²) + ε) · w`, rotate-half RoPE, causal softmax attention, SwiGLU
//! MLP, untied LM head). Weights are stored `[in, out]` and transposed to transformers'
//! `[out, in]` on export.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};
use serde::{Deserialize, Serialize};

/// Shape of a zoo model (also written as its `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
    pub eps: f32,
}

impl Default for Dims {
    fn default() -> Self {
        Self { vocab: 128, hidden: 64, layers: 4, heads: 4, intermediate: 192, max_positions: 64, rope_theta: 10_000.0, eps: 1e-5 }
    }
}

impl Dims {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    pub input_norm: Param<Tensor<B, 1>>,
    pub wq: Param<Tensor<B, 2>>,
    pub wk: Param<Tensor<B, 2>>,
    pub wv: Param<Tensor<B, 2>>,
    pub wo: Param<Tensor<B, 2>>,
    pub post_norm: Param<Tensor<B, 1>>,
    pub gate: Param<Tensor<B, 2>>,
    pub up: Param<Tensor<B, 2>>,
    pub down: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct TinyLlama<B: Backend> {
    pub embed: Param<Tensor<B, 2>>,
    pub layers: Vec<Layer<B>>,
    pub norm: Param<Tensor<B, 1>>,
    pub head: Param<Tensor<B, 2>>,
}

/// Normal(0, std) values from a seeded stream (Box–Muller), so that initial weights depend on
/// the seed only, not on a backend's random generator.
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
        })
        .collect()
}

fn matrix<B: Backend>(rng: &mut ChaCha8Rng, rows: usize, cols: usize, std: f32, dev: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(normal(rng, rows * cols, std), [rows, cols]), dev))
}

fn ones<B: Backend>(n: usize, dev: &B::Device) -> Param<Tensor<B, 1>> {
    Param::from_tensor(Tensor::ones([n], dev))
}

impl<B: Backend> TinyLlama<B> {
    /// Initial weights: N(0, 0.02) as transformers' `initializer_range`, output projections
    /// scaled by 1/√(2·layers) (GPT-2), norms at one.
    pub fn init(d: &Dims, seed: u64, dev: &B::Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, f) = (d.hidden, d.intermediate);
        let out_std = 0.02 / (2.0 * d.layers as f32).sqrt();
        let embed = matrix(&mut rng, d.vocab, h, 0.02, dev);
        let layers = (0..d.layers)
            .map(|_| Layer {
                input_norm: ones(h, dev),
                wq: matrix(&mut rng, h, h, 0.02, dev),
                wk: matrix(&mut rng, h, h, 0.02, dev),
                wv: matrix(&mut rng, h, h, 0.02, dev),
                wo: matrix(&mut rng, h, h, out_std, dev),
                post_norm: ones(h, dev),
                gate: matrix(&mut rng, h, f, 0.02, dev),
                up: matrix(&mut rng, h, f, 0.02, dev),
                down: matrix(&mut rng, f, h, out_std, dev),
            })
            .collect();
        let norm = ones(h, dev);
        let head = matrix(&mut rng, h, d.vocab, 0.02, dev);
        Self { embed, layers, norm, head }
    }

    /// Logits `[batch, time, vocab]` of token ids `[batch, time]` (positions 0..time).
    pub fn forward(&self, d: &Dims, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let dev = tokens.device();
        let (h, nh, hd) = (d.hidden, d.heads, d.head_dim());
        let (cos, sin) = rope_tables::<B>(d, t, &dev);
        let mask = causal_mask::<B>(t, &dev);
        let mut x = burn::tensor::module::embedding(self.embed.val(), tokens).reshape([b * t, h]);
        let heads = |m: Tensor<B, 2>| m.reshape([b, t, nh, hd]).swap_dims(1, 2);
        for l in &self.layers {
            let n = rms_norm(x.clone(), l.input_norm.val(), d.eps);
            let q = rope(heads(n.clone().matmul(l.wq.val())), &cos, &sin);
            let k = rope(heads(n.clone().matmul(l.wk.val())), &cos, &sin);
            let v = heads(n.matmul(l.wv.val()));
            let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f32).sqrt()) + mask.clone();
            let attn = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, h]);
            x = x + attn.matmul(l.wo.val());
            let n = rms_norm(x.clone(), l.post_norm.val(), d.eps);
            let mlp = (silu(n.clone().matmul(l.gate.val())) * n.matmul(l.up.val())).matmul(l.down.val());
            x = x + mlp;
        }
        rms_norm(x, self.norm.val(), d.eps).matmul(self.head.val()).reshape([b, t, d.vocab])
    }
}

/// `x · rsqrt(mean(x²) + ε) · w` over the last dimension.
fn rms_norm<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f32) -> Tensor<B, 2> {
    let inv = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt().recip();
    x * inv * w.unsqueeze::<2>()
}

/// cos and sin `[1, 1, time, head_dim]` of transformers' default RoPE (frequencies repeated
/// for both halves).
fn rope_tables<B: Backend>(d: &Dims, t: usize, dev: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let hd = d.head_dim();
    let half = hd / 2;
    let (mut c, mut s) = (Vec::with_capacity(t * hd), Vec::with_capacity(t * hd));
    for p in 0..t {
        for i in 0..hd {
            let inv = 1.0 / d.rope_theta.powf((2 * (i % half)) as f32 / hd as f32);
            let a = p as f32 * inv;
            c.push(a.cos());
            s.push(a.sin());
        }
    }
    let mk = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [t, hd]), dev).reshape([1, 1, t, hd]);
    (mk(c), mk(s))
}

/// `x · cos + rotate_half(x) · sin`, rotate_half(x) = (−x₂, x₁).
fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let hd = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, hd / 2);
    let x2 = x.clone().narrow(3, hd / 2, hd / 2);
    let rot = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rot * sin.clone()
}

/// Additive causal mask `[1, 1, time, time]`: 0 on and below the diagonal, a large negative above.
fn causal_mask<B: Backend>(t: usize, dev: &B::Device) -> Tensor<B, 4> {
    let v: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { -1e9 } else { 0.0 }).collect();
    Tensor::<B, 2>::from_data(TensorData::new(v, [t, t]), dev).reshape([1, 1, t, t])
}
