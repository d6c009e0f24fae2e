//! Training: next-token cross-entropy on the answer part of `<s>question answer</s>`, AdamW
//! with linear warm-up and cosine decay, batches drawn from a seeded stream over a task mixture.

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use evomerge_datasets::{Gold, Item};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng as _, SeedableRng};

use crate::model::{Dims, TinyLlama};
use crate::vocab;

/// One training stage.
#[derive(Debug, Clone)]
pub struct Stage {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f32,
    pub seed: u64,
}

/// Prompt ids (`<s>` + question) and continuation ids (` ` + answer + `</s>`) of an item.
pub fn encode_item(item: &Item) -> (Vec<u32>, Vec<u32>) {
    let mut prompt = vec![vocab::BOS];
    prompt.extend(vocab::encode(&item.question));
    let answer = match &item.gold {
        Gold::Text(t) => t.clone(),
        Gold::Choice(i) => item.choices.get(*i).cloned().unwrap_or_default(),
    };
    let mut cont = vocab::encode(&format!(" {answer}"));
    cont.push(vocab::EOS);
    (prompt, cont)
}

/// Inputs, targets and target mask `[batch, time]` of items, right-padded.
struct Batch<B: Backend> {
    inputs: Tensor<B, 2, Int>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
}

fn batch<B: Backend>(items: &[&Item], dev: &B::Device) -> Batch<B> {
    let encoded: Vec<_> = items.iter().map(|i| encode_item(i)).collect();
    let t = encoded.iter().map(|(p, c)| p.len() + c.len() - 1).max().unwrap_or(1);
    let (mut inp, mut tgt, mut mask) = (vec![], vec![], vec![]);
    for (p, c) in &encoded {
        let seq: Vec<u32> = p.iter().chain(c).copied().collect();
        for j in 0..t {
            inp.push(seq.get(j).copied().unwrap_or(vocab::PAD) as i64);
            tgt.push(seq.get(j + 1).copied().unwrap_or(vocab::PAD) as i64);
            mask.push(if j + 1 >= p.len() && j + 1 < seq.len() { 1.0f32 } else { 0.0 });
        }
    }
    let n = items.len();
    Batch {
        inputs: Tensor::from_data(TensorData::new(inp, [n, t]), dev),
        targets: Tensor::from_data(TensorData::new(tgt, [n, t]), dev),
        mask: Tensor::from_data(TensorData::new(mask, [n, t]), dev),
    }
}

/// Per-row summed log-likelihood of the targets and the count of masked positions whose argmax
/// is not the target (0 means greedy decoding reproduces the answer and stops).
fn loss_and_misses<B: Backend>(model: &TinyLlama<B>, d: &Dims, b: &Batch<B>) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [n, t] = b.inputs.dims();
    let logits = model.forward(d, b.inputs.clone());
    let logp = log_softmax(logits, 2);
    let picked = logp.clone().gather(2, b.targets.clone().reshape([n, t, 1])).reshape([n, t]);
    let nll = -(picked * b.mask.clone()).sum() / b.mask.clone().sum();
    let argmax = logp.argmax(2).reshape([n, t]);
    let wrong = argmax.not_equal(b.targets.clone()).float() * b.mask.clone();
    (nll, wrong)
}

/// Fraction of `items` a model answers exactly under greedy decoding. Teacher-forced: greedy
/// generation yields the gold continuation (and stops at `</s>`) exactly when every gold token
/// is the argmax given the gold prefix, so one batched forward decides it.
pub fn accuracy<B: Backend>(model: &TinyLlama<B>, d: &Dims, items: &[Item], dev: &B::Device) -> f64 {
    let mut right = 0usize;
    for chunk in items.chunks(128) {
        let refs: Vec<&Item> = chunk.iter().collect();
        let b = batch::<B>(&refs, dev);
        let (_, wrong) = loss_and_misses(model, d, &b);
        let per_row: Vec<f32> = wrong.sum_dim(1).into_data().to_vec().unwrap_or_default();
        right += per_row.iter().filter(|&&w| w == 0.0).count();
    }
    right as f64 / items.len().max(1) as f64
}

/// Learning rate at `step`: linear warm-up, then cosine decay to a tenth of the peak.
fn lr_at(s: &Stage, step: usize) -> f64 {
    if step < s.warmup {
        return s.lr * (step + 1) as f64 / s.warmup as f64;
    }
    let p = (step - s.warmup) as f64 / (s.steps - s.warmup).max(1) as f64;
    s.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// Trains `model` for one stage on `pools` (each a task's training items, drawn with the given
/// weights). `report(step, loss)` is called every 50 steps and at the end.
pub fn train<B: AutodiffBackend>(
    mut model: TinyLlama<B>,
    d: &Dims,
    stage: &Stage,
    pools: &[(&[Item], f64)],
    dev: &B::Device,
    mut report: impl FnMut(usize, f64),
) -> TinyLlama<B> {
    let mut rng = ChaCha8Rng::seed_from_u64(stage.seed);
    let mut optim = AdamWConfig::new().with_weight_decay(stage.weight_decay).with_epsilon(1e-8).init();
    let total: f64 = pools.iter().map(|p| p.1).sum();
    for step in 0..stage.steps {
        let items: Vec<&Item> = (0..stage.batch)
            .map(|_| {
                let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
                let pool = pools.iter().find(|p| {
                    u -= p.1;
                    u < 0.0
                });
                let pool = pool.unwrap_or(&pools[pools.len() - 1]).0;
                &pool[(rng.next_u64() % pool.len() as u64) as usize]
            })
            .collect();
        let b = batch::<B>(&items, dev);
        let (loss, _) = loss_and_misses(&model, d, &b);
        if step % 50 == 0 || step + 1 == stage.steps {
            let v: Vec<f32> = loss.clone().into_data().to_vec().unwrap_or_default();
            report(step, v.first().copied().unwrap_or(f32::NAN) as f64);
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr_at(stage, step), model, grads);
    }
    model
}
