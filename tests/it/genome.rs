//! Genome → recipe → in-memory merge → model runtime, with no disk in between: a genome that
//! encodes the fixture TIES recipe reproduces mergekit's merge bit for bit and transformers'
//! logits of it.

use std::collections::BTreeMap;

use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::genome::{GenomeConfig, GenomeLayout};
use evomerge_engine::model::{self, ModelSpec};
use evomerge_engine::recipe::MergePlan;
use evomerge_engine::{Architecture, Checkpoint, TensorSource};

use crate::common::{fixtures, load};

#[test]
fn ties_genome_reproduces_mergekit_and_runs_in_memory() {
    let f = fixtures();
    let base = Checkpoint::open(&f.join("models/llama-tiny-base"), "base").expect("base");
    let cfg = GenomeConfig {
        search: vec!["weight".into(), "density".into()],
        layers_per_group: 2,
        filters: vec![],
        smooth: false,
        bounds: BTreeMap::new(),
        fixed: BTreeMap::from([("normalize".to_string(), 1.0)]),
    };
    let layout = GenomeLayout::new(
        "ties",
        vec!["models/llama-tiny-a".into(), "models/llama-tiny-b".into()],
        Some("models/llama-tiny-base".into()),
        Architecture::registry().iter().find(|a| a.name == "llama").expect("llama"),
        4,
        &cfg,
    )
    .expect("layout");
    // The fixture: A weight 1.0, B weight 0.5, both density 0.5.
    let genome: Vec<f64> = layout
        .genes()
        .iter()
        .map(|g| match (g.param, g.model) {
            ("weight", Some(0)) => 1.0,
            ("weight", _) => 0.5,
            _ => 0.5,
        })
        .collect();
    let recipe = layout.decode(&genome).expect("decode");
    let yaml = serde_norway::to_string(&recipe).expect("yaml");
    let plan = MergePlan::build(&recipe, yaml, Some(&f), 0).expect("plan");
    let merged = merge_to_memory(&plan).expect("merge");
    let want = load(&f.join("merges/ties"));
    for (name, w) in &want {
        assert_eq!(&merged.read_f32(name).expect("tensor").data, w, "{name}: bit-exact with mergekit");
    }
    // The candidate runs straight from memory.
    let spec = ModelSpec { label: "candidate", config: &base.config, arch: base.arch, tensors: &merged };
    let mut m = model::open(crate::common::test_runtime(), crate::common::test_device(), &[spec]).expect("open in memory");
    let mut on_disk = model::open_dir(crate::common::test_runtime(), crate::common::test_device(), &f.join("merges/ties")).expect("open dir");
    let ids = [1, 261, 297, 259, 16];
    assert_eq!(m.logits(&ids).expect("mem"), on_disk.logits(&ids).expect("disk"));
}
