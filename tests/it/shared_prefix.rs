//! Shared-prefix scoring (a common root once, each distinct context once, continuations from
//! its cache) gives the results of unshared scoring: log-likelihoods within 1e-5 on the CPU,
//! the same greedy flags and generated ids, for every architecture feature (Qwen2 biases,
//! Qwen3 q/k norms, Mistral's sliding window), a bf16 checkpoint, a data-flow path, batch
//! sizes 1 to 8, and every preset kind through the task layer; and it runs fewer tokens.

use std::path::{Path, PathBuf};

use evomerge_engine::model::{self, GenerateOptions, LanguageModel, ScoreRequest, ScoreResult, Tokenizer};
use evomerge_fitness::tasks::{EvalOptions, FewshotSampler, Task, TaskResult, TaskSpec};
use serde_json::Value;

use crate::common::{fixtures, run_ok, tol};
use crate::model_ref::variant;

/// Deterministic token ids in `1 .. vocab`.
fn tokens(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + (x % u64::from(vocab - 1)) as u32
        })
        .collect()
}

/// Requests that exercise every part of the plan: a 30-token root shared by most contexts;
/// contexts outside it; several continuations per context (multi- and single-token); contexts
/// with one continuation; contexts that differ only in their last token (as a context that
/// tokenizes differently next to its continuation would); a context that is a prefix of another.
fn requests(vocab: u32) -> Vec<ScoreRequest> {
    let root = tokens(1, 30, vocab);
    let with_root = |seed: u64, n: usize| -> Vec<u32> { root.iter().copied().chain(tokens(seed, n, vocab)).collect() };
    let mut out = Vec::new();
    for item in 0..6u64 {
        let ctx = with_root(100 + item, 3 + item as usize * 2);
        for choice in 0..4u64 {
            out.push(ScoreRequest { context: ctx.clone(), continuation: tokens(200 + item * 10 + choice, 1 + (choice as usize % 3) * 2, vocab) });
        }
    }
    // single-token continuations only
    let ctx = with_root(300, 5);
    for c in 0..3u64 {
        out.push(ScoreRequest { context: ctx.clone(), continuation: tokens(310 + c, 1, vocab) });
    }
    // one continuation per context (winogrande-like), last context token differing
    let mut a = with_root(400, 6);
    let mut b = a.clone();
    *a.last_mut().expect("token") = 7;
    *b.last_mut().expect("token") = 8;
    out.push(ScoreRequest { context: a.clone(), continuation: tokens(410, 4, vocab) });
    out.push(ScoreRequest { context: b, continuation: tokens(410, 4, vocab) });
    // a context that is a prefix of another one
    out.push(ScoreRequest { context: a[..a.len() - 2].to_vec(), continuation: a[a.len() - 2..].to_vec() });
    // outside the root
    for c in 0..3u64 {
        out.push(ScoreRequest { context: tokens(500, 12, vocab), continuation: tokens(510 + c, 2 + c as usize, vocab) });
    }
    out.push(ScoreRequest { context: vec![root[0]], continuation: tokens(520, 5, vocab) });
    out
}

/// Within 1e-5, relative to the value beyond 1: other matrix shapes round f32 differently, and
/// the qwen2 variant's tied head gives logits near 60, whose rounding alone is a few 1e-6
/// (measured worst: 1.4e-5 at a log-probability of -14; every other model stays under 1e-5).
fn assert_same(what: &str, shared: &[ScoreResult], plain: &[ScoreResult]) {
    assert_eq!(shared.len(), plain.len(), "{what}: result count");
    for (i, (s, p)) in shared.iter().zip(plain).enumerate() {
        assert_eq!(s.logprobs.len(), p.logprobs.len(), "{what}: request {i}");
        for (x, y) in s.logprobs.iter().zip(&p.logprobs) {
            assert!((x - y).abs() <= tol(1e-5, 2e-2) * y.abs().max(1.0), "{what}: request {i}: {x} vs {y}");
        }
        assert_eq!(s.greedy, p.greedy, "{what}: request {i} greedy");
    }
}

/// Shared scoring of `reqs` equals unshared at batch sizes 1, 3 and 8 and runs fewer tokens.
fn check_scoring(what: &str, m: &mut dyn LanguageModel, reqs: &[ScoreRequest]) {
    let unshared: usize = reqs.iter().map(|r| r.context.len() + r.continuation.len()).sum();
    let plain = m.score(reqs, 8).expect("score");
    for bs in [1, 3, 8] {
        let before = m.tokens_run();
        let shared = m.score_shared(reqs, bs).expect("score_shared");
        let ran = (m.tokens_run() - before) as usize;
        assert_same(&format!("{what}, batch {bs}"), &shared, &plain);
        assert!(ran * 2 < unshared, "{what}: {ran} tokens run of {unshared}");
    }
}

fn variants(dir: &Path) -> Vec<(String, PathBuf)> {
    let f = fixtures().join("models");
    let mut out = vec![("llama".to_string(), f.join("llama-tiny-a")), ("llama bf16".to_string(), f.join("llama-tiny-a-bf16"))];
    // Mistral's window (6) is shorter than the root and than most contexts: the root's and the
    // gathered contexts' keys fall out of it.
    for (arch, window) in [("qwen2", 0), ("qwen3", 0), ("mistral", 6)] {
        let dst = dir.join(arch);
        crate::model_ref::arch_variant(arch, &dst, window);
        out.push((if window > 0 { format!("{arch} window {window}") } else { arch.to_string() }, dst));
    }
    out
}

#[test]
fn shared_scoring_equals_unshared_on_every_architecture_and_batch_size() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, dir) in variants(tmp.path()) {
        let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let reqs = requests(m.info().dims.vocab as u32);
        check_scoring(&name, m.as_mut(), &reqs);
    }
}

#[test]
fn shared_scoring_follows_a_data_flow_path() {
    let (mut m, _) = crate::model_ref::two_models();
    m.set_path(crate::model_ref::dfs_path()).expect("path");
    let reqs = requests(m.info().dims.vocab as u32);
    check_scoring("data-flow path", m.as_mut(), &reqs);
}

#[test]
fn shared_generation_gives_the_unshared_greedy_ids() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cases: Vec<(String, Box<dyn LanguageModel>)> = variants(tmp.path())
        .into_iter()
        .map(|(n, d)| {
            let m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &d).expect("open");
            (n, m)
        })
        .collect();
    let (mut two, _) = crate::model_ref::two_models();
    two.set_path(crate::model_ref::dfs_path()).expect("path");
    cases.push(("data-flow path".into(), two));
    for (name, mut m) in cases {
        let vocab = m.info().dims.vocab as u32;
        let root = tokens(1, 40, vocab);
        // six prompts on the root (lengths differ: left padding after the root), two outside
        let mut prompts: Vec<Vec<u32>> =
            (0..6u64).map(|i| root.iter().copied().chain(tokens(600 + i, 1 + 3 * i as usize, vocab)).collect()).collect();
        prompts.push(tokens(700, 9, vocab));
        prompts.push(tokens(701, 4, vocab));
        let stop_at = |i: usize, ids: &[u32]| i == 2 && ids.len() == 3;
        let before = m.tokens_run();
        let plain =
            m.generate(&prompts, &GenerateOptions { max_new_tokens: 8, eos: vec![], share_prefix: false, batch_size: 0 }, &stop_at).expect("plain");
        let plain_ran = m.tokens_run() - before;
        let before = m.tokens_run();
        let shared =
            m.generate(&prompts, &GenerateOptions { max_new_tokens: 8, eos: vec![], share_prefix: true, batch_size: 0 }, &stop_at).expect("shared");
        let ran = m.tokens_run() - before;
        assert_eq!(shared, plain, "{name}: greedy ids and stop reasons");
        assert_eq!(shared[2].tokens.len(), 3, "{name}: the stop test sees the caller's index");
        assert!(ran + 5 * 40 == plain_ran, "{name}: {ran} tokens run, {plain_ran} unshared (the root of 40 runs once, not 6 times)");
        // Decoded two prompts at a time: the root still runs once for all three batches.
        let before = m.tokens_run();
        let batched =
            m.generate(&prompts, &GenerateOptions { max_new_tokens: 8, eos: vec![], share_prefix: true, batch_size: 2 }, &stop_at).expect("batched");
        assert_eq!(batched, plain, "{name}: batches of 2, greedy ids and stop reasons");
        assert_eq!(m.tokens_run() - before, ran, "{name}: batches of 2 run the root once too");
    }
}

/// llama-tiny-a with a 2048-position context, so that few-shot prompts are not truncated.
fn long_context_model(dir: &Path) -> PathBuf {
    let out = dir.join("llama-long");
    variant(
        "llama-tiny-a",
        &out,
        |c| {
            c.insert("max_position_embeddings".into(), 2048.into());
        },
        &[],
        &[],
    );
    std::fs::copy(fixtures().join("models/llama-tiny-a/tokenizer.json"), out.join("tokenizer.json")).expect("tokenizer");
    out
}

fn data(name: &str) -> PathBuf {
    fixtures().join("datasets").join(name)
}

fn evaluate(task: &Task, m: &mut dyn LanguageModel, tok: &Tokenizer, batch_size: usize, share_prefix: bool) -> TaskResult {
    task.evaluate(m, tok, 1, &EvalOptions { limit: None, batch_size, share_prefix }).expect("evaluate")
}

/// Every preset kind: item results of shared scoring equal unshared ones.
#[test]
fn every_task_kind_scores_the_same_items_shared() {
    let tmp = tempfile::tempdir().expect("tmp");
    let long = long_context_model(tmp.path());
    let letters = "name = 'letters'\nkind = 'multiple_choice'\n[data.fields]\nid = 'id'\nquestion = 'question'\nchoices = 'choices.text'\n\
                   gold = 'answerKey'\ngold_kind = 'letter'\n[prompt]\ntemplate = '{question}\\n{choices}\\nAnswer:'\nchoice = '{letter}'\n\
                   fewshot = 2\nfewshot_sampler = 'first_n'\n[metric]\nname = 'acc'\n";
    let ppl = "name = 'ppl'\nkind = 'perplexity'\n[data.fields]\nid = 'id'\nquestion = 'text'\ngold = 'text'\ngold_kind = 'text'\n[metric]\nname = 'perplexity'\n";
    let mut arc_fewshot = TaskSpec::load("arc_easy").expect("preset");
    arc_fewshot.prompt.fewshot = 3;
    arc_fewshot.prompt.fewshot_sampler = FewshotSampler::FirstN;
    let mut gsm_fewshot = TaskSpec::load("gsm8k").expect("preset");
    gsm_fewshot.prompt.fewshot_sampler = FewshotSampler::FirstN;
    gsm_fewshot.prompt.fewshot = 2;
    gsm_fewshot.generation.max_new_tokens = 6;
    let cases: Vec<(&str, TaskSpec, &str, Option<&str>)> = vec![
        ("arc zero-shot", TaskSpec::load("arc_easy").expect("preset"), "arc_sample.jsonl", None),
        ("arc 3-shot first_n", arc_fewshot, "arc_sample.jsonl", None),
        ("single-token letters, 2-shot", TaskSpec::parse(letters, None).expect("spec"), "arc_sample.jsonl", None),
        ("winogrande", TaskSpec::load("winogrande").expect("preset"), "winogrande_sample.jsonl", None),
        ("hellaswag", TaskSpec::load("hellaswag").expect("preset"), "hellaswag_sample.jsonl", None),
        ("gsm8k 2-shot first_n", gsm_fewshot, "gsm8k_sample.jsonl", Some("gsm8k_sample.jsonl")),
        ("perplexity", TaskSpec::parse(ppl, None).expect("spec"), "text_sample.jsonl", None),
    ];
    let tok = Tokenizer::from_dir(&long).expect("tokenizer");
    let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &long).expect("model");
    for (name, spec, file, fewshot) in cases {
        let task = Task::load(spec, Some(&data(file)), fewshot.map(data).as_deref()).expect("task");
        let plain = evaluate(&task, m.as_mut(), &tok, 8, false);
        if task.spec.kind != evomerge_fitness::tasks::Kind::Generation {
            // (generation's unshared count is prompts + generated tokens, not the steps run)
            assert_eq!(plain.tokens, plain.tokens_unshared, "{name}: unshared scoring runs every token");
        }
        let mut ran = vec![];
        for bs in [1, 8] {
            let shared = evaluate(&task, m.as_mut(), &tok, bs, true);
            ran.push(shared.tokens);
            assert_eq!(shared.tokens_unshared, plain.tokens_unshared, "{name}");
            assert!(shared.tokens <= plain.tokens, "{name}: {} tokens run, {} unshared", shared.tokens, plain.tokens);
            for (s, p) in shared.items.iter().zip(&plain.items) {
                assert_eq!((&s.id, &s.prediction, s.tokens, s.bytes), (&p.id, &p.prediction, p.tokens, p.bytes), "{name}, batch {bs}");
                for (x, y) in s.logliks.iter().zip(&p.logliks) {
                    assert!((x - y).abs() <= tol(1e-5, 2e-2) * y.abs().max(1.0), "{name}, batch {bs}: {x} vs {y}");
                }
                assert!((s.score - p.score).abs() <= tol(1e-4, 1e-1), "{name}, batch {bs}: score {} vs {}", s.score, p.score);
            }
            assert!((shared.value - plain.value).abs() <= tol(1e-6, 1e-2) * plain.value.abs().max(1.0), "{name}");
        }
        if task.spec.kind == evomerge_fitness::tasks::Kind::Generation {
            // the few-shot prefix runs once per evaluation, not once per batch of prompts
            assert_eq!(ran[0], ran[1], "{name}: tokens run at batch 1 and 8");
        }
    }
}

/// The accounting: zero-shot ARC runs at most 0.45× its unshared tokens, 5 shared
/// shots at most 0.12×; `--no-prefix-sharing` runs them all and agrees.
#[test]
fn eval_reports_tokens_run_and_unshared() {
    let tmp = tempfile::tempdir().expect("tmp");
    let long = long_context_model(tmp.path()).display().to_string();
    let arc = data("arc_sample.jsonl").display().to_string();
    let eval = |extra: &[&str]| -> Value {
        let mut args = vec!["eval", "--model", &long, "--task", "arc_easy", "--data", &arc, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&run_ok(&args)).expect("json")
    };
    let ratio = |v: &Value| v["tokens"].as_f64().expect("tokens") / v["tokens_unshared"].as_f64().expect("unshared");
    let zero = eval(&[]);
    assert!(ratio(&zero) <= 0.45, "zero-shot: {}", ratio(&zero));
    let five = ["--fewshot", "5", "--fewshot-sampler", "first_n", "--fewshot-data", &arc];
    let shared = eval(&five);
    assert!(ratio(&shared) <= 0.12, "5 shared shots: {}", ratio(&shared));
    let plain = eval(&[&five[..], &["--no-prefix-sharing"]].concat());
    assert_eq!(ratio(&plain), 1.0);
    let picks = |v: &Value| v["items"].as_array().expect("items").iter().map(|i| i["prediction"].clone()).collect::<Vec<_>>();
    assert_eq!(picks(&shared), picks(&plain));
    // per-item sampling gives every item its own prefix: little beyond the contexts to share
    let per_item = eval(&["--fewshot", "5", "--fewshot-data", &arc]);
    assert!(ratio(&per_item) > ratio(&shared), "per_item {} vs first_n {}", ratio(&per_item), ratio(&shared));
    let (code, _, err) = crate::common::run(&["eval", "--model", &long, "--task", "arc_easy", "--data", &arc, "--fewshot-sampler", "random"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("per_item or first_n"), "{err}");
}
