//! `evomerge eval` and the fitness tasks on the fixture models: multiple-choice scoring equals
//! the transformers references, presets run on real-format samples (JSONL and parquet give the
//! same result), perplexity equals the runtime's own log-likelihoods, bad task input is a
//! clear error.

use std::path::PathBuf;

use evomerge_engine::model::{self, ScoreRequest, Tokenizer};
use evomerge_fitness::tasks::{EvalOptions, Task, TaskSpec};
use serde_json::Value;

use crate::common::{fixtures, run, run_ok};

fn data(name: &str) -> PathBuf {
    fixtures().join("datasets").join(name)
}

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn eval_json(args: &[&str]) -> Value {
    let all: Vec<&str> = ["eval"].into_iter().chain(args.iter().copied()).chain(["--json"]).collect();
    serde_json::from_str(&run_ok(&all)).expect("one JSON object")
}

const FIXTURE_MC: &str = r#"
name = "fixture_mc"
kind = "multiple_choice"
[data.fields]
id = "id"
question = "context"
choices = "choices"
gold = "label"
gold_kind = "index"
[prompt]
template = "{question}"
add_bos = true
[metric]
name = "acc"
"#;

#[test]
fn multiple_choice_log_likelihoods_equal_the_transformers_references() {
    let spec = TaskSpec::parse(FIXTURE_MC, None).expect("spec");
    let task = Task::load(spec, Some(&data("fixture_mc.jsonl")), None).expect("task");
    let dir = model_dir("llama-tiny-a");
    let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dir).expect("model");
    let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
    let r = task.evaluate(m.as_mut(), &tok, 1, &EvalOptions::default()).expect("eval");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("refs/llama-tiny-a.json")).expect("refs")).expect("json");
    for (item, mc) in r.items.iter().zip(refs["multiple_choice"].as_array().expect("mc")) {
        for (got, c) in item.logliks.iter().zip(mc["choices"].as_array().expect("choices")) {
            let want = c["sum_logprob"].as_f64().expect("sum");
            assert!((got - want).abs() < crate::common::tol(1e-4, 1e-2), "{}: {got} vs {want}", c["text"]);
        }
    }
    assert_eq!(r.value, 1.0, "label = the reference's best choice");
    assert_eq!(r.n, 2);
}

#[test]
fn arc_preset_reads_jsonl_and_parquet_alike() {
    let m = model_dir("llama-tiny-a").display().to_string();
    let j = eval_json(&["--model", &m, "--task", "arc_challenge", "--data", &data("arc_sample.jsonl").display().to_string()]);
    let p = eval_json(&["--model", &m, "--task", "arc_challenge", "--data", &data("arc_sample.parquet").display().to_string()]);
    assert_eq!(j["metric"], "acc_norm");
    assert_eq!(j["n"], 8);
    assert_eq!(j["items"], p["items"], "parquet rows == JSONL rows");
    let v = j["value"].as_f64().expect("value");
    assert!((0.0..=1.0).contains(&v));
    let correct = j["items"].as_array().expect("items").iter().filter(|i| i["score"] == 1.0).count();
    assert_eq!(v, correct as f64 / 8.0);
    assert!(j["stderr"].as_f64().expect("stderr") > 0.0 || correct == 0 || correct == 8);
    // --limit takes the first items.
    let l = eval_json(&["--model", &m, "--task", "arc_challenge", "--data", &data("arc_sample.jsonl").display().to_string(), "--limit", "3"]);
    assert_eq!(l["n"], 3);
    // (equal up to float rounding: which items share a pass decides how prefixes are shared)
    for (a, b) in l["items"].as_array().expect("items").iter().zip(&j["items"].as_array().expect("items")[..3]) {
        assert_eq!((&a["id"], &a["prediction"], &a["score"]), (&b["id"], &b["prediction"], &b["score"]));
        for (x, y) in a["logliks"].as_array().expect("logliks").iter().zip(b["logliks"].as_array().expect("logliks")) {
            let (x, y) = (x.as_f64().expect("ll"), y.as_f64().expect("ll"));
            assert!((x - y).abs() <= crate::common::tol(1e-5, 2e-2) * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn gsm8k_preset_generates_extracts_and_matches() {
    let m = model_dir("llama-tiny-b").display().to_string();
    let r = eval_json(&["--model", &m, "--task", "gsm8k", "--data", &data("gsm8k_sample.jsonl").display().to_string(), "--limit", "2"]);
    assert_eq!(r["metric"], "exact_match");
    assert_eq!(r["n"], 2);
    // A random tiny model does not write "#### N": lm-eval's "[invalid]", scored 0.
    for item in r["items"].as_array().expect("items") {
        assert_eq!(item["prediction"], "[invalid]");
        assert_eq!(item["score"], 0.0);
    }
}

/// lm-eval's WinoGrande: the sentence up to the blank + each option is that choice's context,
/// the rest of the sentence after the blank the one continuation; each choice's
/// log-likelihood is the runtime's own score of exactly that pair.
#[test]
fn winogrande_puts_each_option_in_the_context_and_scores_the_rest() {
    let spec = TaskSpec::load("winogrande").expect("preset");
    let task = Task::load(spec, Some(&data("winogrande_sample.jsonl")), None).expect("task");
    let reqs = task.requests(0, &task.items[0]).expect("requests");
    let ctx: Vec<&str> = reqs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        ctx,
        ["The trophy doesn't fit into the brown suitcase because the trophy", "The trophy doesn't fit into the brown suitcase because the suitcase"]
    );
    assert!(reqs.iter().all(|r| r.1 == " is too large."), "{reqs:?}");
    assert_eq!(task.items[1].gold, evomerge_datasets::Gold::Choice(1), "answer \"2\" = option2");

    let dir = model_dir("llama-tiny-a");
    let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dir).expect("model");
    let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
    let r = task.evaluate(m.as_mut(), &tok, 1, &EvalOptions::default()).expect("eval");
    assert_eq!((r.metric.as_str(), r.n), ("acc", 4));
    for (i, (item, res)) in task.items.iter().zip(&r.items).enumerate() {
        let reqs = task.requests(i, item).expect("requests");
        for ((c, cont, _), got) in reqs.iter().zip(&res.logliks) {
            let (context, continuation) = evomerge_fitness::tasks::encode_pair(&tok, c, cont, false, 1).expect("encode");
            let want = m.score(&[ScoreRequest { context, continuation }], 1).expect("score")[0].sum;
            assert!((got - want).abs() < crate::common::tol(1e-5, 1e-3), "item {i}: {got} vs {want}");
        }
        let pick = if res.logliks[1] > res.logliks[0] { 1 } else { 0 };
        assert_eq!(res.score, f64::from(u8::from(evomerge_datasets::Gold::Choice(pick) == item.gold)), "item {i}");
    }
}

/// lm-eval's hellaswag: query = preprocess(activity_label + ": " + ctx_a + " " +
/// ctx_b.capitalize()), choices = preprocess(ending); strings worked out by hand from utils.py.
#[test]
fn hellaswag_builds_lm_evals_query_and_cleans_brackets() {
    let task = Task::load(TaskSpec::load("hellaswag").expect("preset"), Some(&data("hellaswag_sample.jsonl")), None).expect("task");
    let r0 = task.requests(0, &task.items[0]).expect("requests");
    assert_eq!(r0[0].0, "Roof shingle removal: A man is sitting on a roof. He");
    assert_eq!(r0[3].1, " starts pulling up roofing on a roof.");
    let r1 = task.requests(1, &task.items[1]).expect("requests");
    // strip; " [title]" → ". "; "[...]" removed; "  " → " " (once, left to right); checked
    // against lm-eval's utils.py run on these rows
    assert_eq!(r1[0].0, "Personal Care and Style: How to dye your hair. Wash your hair a day before. don't condition it.");
    let conts: Vec<&str> = r1.iter().map(|r| r.1.as_str()).collect();
    // "[substeps] Dye" keeps the space after the removed bracket, as lm-eval's does
    assert_eq!(conts, ["  Dye sticks to unwashed hair.", " Rinse it. twice.", " Skip the dye.", " Cut it."]);
    assert_eq!(r1[1].2, "Rinse it. twice.".len() as f64, "acc_norm length of the cleaned choice");
}

/// mgsm_direct_en: "Question: …\nAnswer:", greedy until "Question:", gold = answer_number, exact
/// match ignoring case and punctuation.
#[test]
fn mgsm_direct_prompts_like_lm_eval_and_scores_the_number() {
    let spec = TaskSpec::load("mgsm_direct_en").expect("preset");
    let task = Task::load(spec, Some(&data("mgsm_sample.jsonl")), None).expect("task");
    let p = task.context(1, &task.items[1]).expect("prompt");
    assert_eq!(p, "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?\nAnswer:");
    assert_eq!(task.items[2].field("answer"), Some("70000"));
    let m = model_dir("llama-tiny-b").display().to_string();
    let r = eval_json(&["--model", &m, "--task", "mgsm_direct_en", "--data", &data("mgsm_sample.jsonl").display().to_string()]);
    assert_eq!((r["metric"].as_str(), r["n"].as_u64()), (Some("exact_match"), Some(3)));
    for item in r["items"].as_array().expect("items") {
        let pred = item["prediction"].as_str().expect("prediction");
        assert!(!pred.contains("Question:"), "generation is cut at the stop string: {pred:?}");
    }
}

#[test]
fn perplexity_equals_the_runtime_log_likelihoods() {
    let spec = TaskSpec::parse(
        "name = 'ppl'\nkind = 'perplexity'\n[data.fields]\nid = 'id'\nquestion = 'text'\ngold = 'text'\ngold_kind = 'text'\n[metric]\nname = 'perplexity'\n",
        None,
    )
    .expect("spec");
    let task = Task::load(spec, Some(&data("text_sample.jsonl")), None).expect("task");
    let dir = model_dir("llama-tiny-base");
    let mut m = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &dir).expect("model");
    let tok = Tokenizer::from_dir(&dir).expect("tok");
    let r = task.evaluate(m.as_mut(), &tok, 1, &EvalOptions::default()).expect("eval");
    let (mut ll, mut n) = (0.0, 0usize);
    for item in &task.items {
        let ids = tok.encode(&item.question, false).expect("encode");
        n += ids.len();
        ll += m.score(&[ScoreRequest { context: vec![1], continuation: ids }], 1).expect("score")[0].sum;
    }
    assert!((r.value - (-ll / n as f64).exp()).abs() < crate::common::tol(1e-6, 1e-3) * r.value, "{} vs {}", r.value, (-ll / n as f64).exp());
    assert!(!r.higher_is_better && r.stderr.is_none());
}

#[test]
fn bad_task_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = |args: &[&str]| {
        let all: Vec<&str> = ["eval"].into_iter().chain(args.iter().copied()).collect();
        let (code, _, err) = run(&all);
        (code, err)
    };
    let m = model_dir("llama-tiny-a").display().to_string();
    let arc = data("arc_sample.jsonl").display().to_string();
    // Unknown field in a template.
    let spec = tmp.path().join("t.toml");
    std::fs::write(&spec, FIXTURE_MC.replace("template = \"{question}\"", "template = \"{questoin}\"")).expect("write");
    let (c, e) = run(&["-m", &m, "-t", &spec.display().to_string(), "--data", &data("fixture_mc.jsonl").display().to_string()]);
    assert_eq!(c, Some(2));
    assert!(e.contains("no field 'questoin'"), "{e}");
    // No data given.
    let (c, e) = run(&["-m", &m, "-t", "arc_challenge"]);
    assert_eq!(c, Some(2));
    assert!(e.contains("--data"), "{e}");
    // Unknown preset.
    let (c, e) = run(&["-m", &m, "-t", "arc_chalenge", "--data", &arc]);
    assert_eq!(c, Some(2));
    assert!(e.contains("neither a file nor a preset"), "{e}");
    // A gold answer that cannot be parsed: file and line named.
    let bad = tmp.path().join("bad.jsonl");
    let mut text = std::fs::read_to_string(data("arc_sample.jsonl")).expect("read");
    text = text.replacen("\"answerKey\": \"C\"", "\"answerKey\": \"Q\"", 1);
    std::fs::write(&bad, text).expect("write");
    let (c, e) = run(&["-m", &m, "-t", "arc_challenge", "--data", &bad.display().to_string()]);
    assert_eq!(c, Some(2));
    assert!(e.contains(&format!("{}:1:", bad.display())) && e.contains("past the 4 choices"), "{e}");
    // Empty dataset.
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").expect("write");
    let (c, e) = run(&["-m", &m, "-t", "arc_challenge", "--data", &empty.display().to_string()]);
    assert_eq!(c, Some(2));
    assert!(e.contains("no items"), "{e}");
    // Too many few-shot examples for the data.
    let (c, e) = run(&["-m", &m, "-t", "gsm8k", "--data", &data("fixture_mc.jsonl").display().to_string()]);
    assert_eq!(c, Some(2), "{e}");
    // An empty few-shot set, per item or first N.
    for sampler in ["per_item", "first_n"] {
        let (c, e) = run(&[
            "-m",
            &m,
            "-t",
            "arc_easy",
            "--data",
            &arc,
            "--fewshot",
            "2",
            "--fewshot-sampler",
            sampler,
            "--fewshot-data",
            &empty.display().to_string(),
        ]);
        assert_eq!(c, Some(2), "{e}");
        assert!(e.contains("no items") || e.contains("few-shot examples asked"), "{sampler}: {e}");
    }
    // first_n over the data itself needs one more item than shots (an item is never its own
    // example): 8 items give at most 7 shots.
    let (c, e) = run(&["-m", &m, "-t", "arc_easy", "--data", &arc, "--fewshot", "8", "--fewshot-sampler", "first_n"]);
    assert_eq!(c, Some(2), "{e}");
    assert!(e.contains("8 few-shot examples asked, 8 available"), "{e}");
}
