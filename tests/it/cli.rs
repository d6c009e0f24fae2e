//! `evomerge merge` end to end through the binary.

use std::process::Command;

use crate::common::{bin, fixtures, load};

fn merge(recipe: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin())
        .current_dir(fixtures())
        .args(["merge", &format!("merges/{recipe}.yaml"), "--out"])
        .arg(out)
        .args(extra)
        .output()
        .expect("run evomerge")
}

#[test]
fn merge_writes_a_loadable_checkpoint_equal_to_mergekit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("ties");
    let o = merge("ties", &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("merged 39 tensors"), "{stdout}");
    // written files
    for f in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "mergekit_config.yml"]
    {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(load(&out), load(&fixtures().join("merges").join("ties")));
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["num_hidden_layers"], 4);
    assert_eq!(cfg["dtype"], "float32");
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    // local models by folder name and path, no Hub metadata for them, no bare link (issue 24)
    assert!(card.contains("ties") && card.contains("llama-tiny-base (local checkpoint `models/llama-tiny-base`) (base)"), "{card}");
    let front_matter = card.split("---").nth(1).expect("front matter");
    assert!(!front_matter.contains("base_model:") && !card.contains("](https://github.com/)"), "{card}");
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).expect("recipe"),
        std::fs::read_to_string(fixtures().join("merges/ties.yaml")).expect("yaml")
    );
}

#[test]
fn sharded_bf16_output_reads_back_through_the_index() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = tmp.path().join("r.yaml");
    let text = std::fs::read_to_string(fixtures().join("merges/task_arithmetic.yaml"))
        .expect("yaml")
        .replace("out_dtype: float32", "out_dtype: bfloat16")
        .replace("models/", &format!("{}/models/", fixtures().display()));
    std::fs::write(&yaml, text).expect("write");
    let out = tmp.path().join("out");
    let o = Command::new(bin()).args(["merge"]).arg(&yaml).arg("--out").arg(&out).args(["--shard-size", "100KB"]).output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).expect("index")).expect("json");
    let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().expect("map").values().filter_map(|v| v.as_str()).collect();
    assert!(shards.len() > 3, "{shards:?}");
    assert_eq!(index["metadata"]["total_size"], 186_432 * 2);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["dtype"], "bfloat16");
    // values = mergekit's f32 result rounded to bf16
    let got = load(&out);
    let want = load(&fixtures().join("merges/task_arithmetic"));
    for (k, w) in &want {
        let rounded = evomerge_engine::dtype::decode(evomerge_engine::DType::BF16, &evomerge_engine::dtype::encode(evomerge_engine::DType::BF16, w));
        assert_eq!(&got[k], &rounded, "{k}");
    }
}

#[test]
fn dry_run_validates_and_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("x");
    let o = merge("slerp_gradient", &out, &["--dry-run"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("recipe OK") && s.contains("would write 39 tensors"), "{s}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).expect("ls").count(), 0, "no staging leftovers");
}

#[test]
fn existing_output_is_refused_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("o");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("keep.txt"), "mine").expect("write");
    let o = merge("linear", &out, &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert!(out.join("keep.txt").is_file());
    let o = merge("linear", &out, &["--force"]);
    assert!(o.status.success());
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").is_file());
}

#[test]
fn help_describes_the_merge_command() {
    let o = Command::new(bin()).args(["merge", "--help"]).output().expect("run");
    let s = String::from_utf8_lossy(&o.stdout);
    for word in ["--out", "--dry-run", "--shard-size", "--seed", "mergekit"] {
        assert!(s.contains(word), "{word} missing from help:\n{s}");
    }
}

#[test]
fn readme_first_command_works() {
    // README: cargo run --release -- search experiments/demo.toml
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("readme");
    assert!(readme.contains("cargo run --release -- search experiments/demo.toml"), "README and test disagree");
    // The demo file itself, with a smaller budget and item subset (this binary is a debug build).
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(root.join("experiments/demo.toml")).expect("demo.toml");
    assert!(text.contains("max_evaluations = 160") && text.contains("max_evaluations = 64") && text.contains("k = 100"));
    let text = text
        .replace("max_evaluations = 160", "max_evaluations = 16")
        .replace("max_evaluations = 64", "max_evaluations = 8")
        .replace("k = 100", "k = 10")
        .replace("\"../", &format!("\"{}/", root.display()))
        .replace("\"tasks/", &format!("\"{}/experiments/tasks/", root.display()));
    let exp = tmp.path().join("demo.toml");
    std::fs::write(&exp, text).expect("write");
    let run = tmp.path().join("run");
    let o = Command::new(bin())
        .args(["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--progress", "off"])
        .output()
        .expect("run");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for needle in [
        "searched: candidate",
        "searched + data flow",
        "source: expert-add",
        "source: expert-reverse",
        "baseline: task_arithmetic at the start point",
        "references",
    ] {
        assert!(out.contains(needle), "'{needle}' not in:\n{out}");
    }
}

#[test]
fn a_closed_stdout_is_a_normal_end_not_a_panic() {
    // `evomerge status RUN | head -0`: the reader is gone before the first line is printed.
    let run = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("run/tests/data/release-f9ec06e/demo");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let o = Command::new(bin()).arg("status").arg(&run).stdout(writer).stderr(std::process::Stdio::piped()).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}
