//! Where a candidate's materialization time goes (profiling aid for `scripts/bench-loop`).
//!
//! `bench_materialize RECIPE.yaml BASE_DIR`: the streamed path (plan, merge into memory, swap
//! into a resident model) against the in-place path (`ResidentMerge`: inputs held in the
//! runtime's layout, merged into its weight buffers), and a check that both give the same
//! logits bit for bit.

use std::time::Instant;

use evomerge_engine::Checkpoint;
use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::model::{self, DeviceSpec, ModelSpec};
use evomerge_engine::recipe::MergePlan;
use evomerge_engine::resident::ResidentMerge;

#[global_allocator]
static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    evomerge_engine::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let (recipe, base) = (std::path::Path::new(&args[1]), std::path::Path::new(&args[2]));
    let ck = Checkpoint::open(base, "base")?;
    let mut m = model::open(model::RuntimeKind::Burn, DeviceSpec::Cpu, &[ModelSpec::from_checkpoint(&ck)])?;
    let tokens: Vec<u32> = (1..9).collect();
    // ONLY_IN_PLACE=1: profile the in-place path alone (no comparison).
    let streamed_reps = if std::env::var_os("ONLY_IN_PLACE").is_some() { 0 } else { 3 };
    for rep in 0..streamed_reps {
        let t = Instant::now();
        let plan = MergePlan::from_file(recipe, 0)?;
        let t_plan = t.elapsed().as_secs_f64();
        let merged = merge_to_memory(&plan)?;
        let t_merge = t.elapsed().as_secs_f64() - t_plan;
        m.load_weights(0, &merged)?;
        let t_load = t.elapsed().as_secs_f64() - t_plan - t_merge;
        println!("streamed rep {rep}: plan {t_plan:.3} s, merge_to_memory {t_merge:.3} s, load_weights {t_load:.3} s");
    }
    let streamed = m.logits(&tokens)?;
    let t = Instant::now();
    let plan = MergePlan::from_file(recipe, 0)?;
    let resident = ResidentMerge::new(&plan, m.weight_layout(0)?)?;
    println!("resident setup: {:.3} s, {:.2} GB", t.elapsed().as_secs_f64(), resident.bytes() as f64 / 1e9);
    for rep in 0..10 {
        let t = Instant::now();
        let plan = MergePlan::from_file(recipe, 0)?;
        let t_plan = t.elapsed().as_secs_f64();
        resident.materialize(&plan, m.as_mut(), 0)?;
        println!("in place rep {rep}: plan {t_plan:.3} s, materialize {:.3} s", t.elapsed().as_secs_f64() - t_plan);
    }
    let in_place = m.logits(&tokens)?;
    // Planning a candidate: from disk (every checkpoint opened and validated, as the search did
    // before evomerge-run) against over checkpoints opened once per run (GenomeLayout::plan).
    let text = std::fs::read_to_string(recipe)?;
    let parsed = evomerge_engine::Recipe::parse(&text, "recipe")?;
    let opened = evomerge_engine::OpenedCheckpoints::default();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let time = |f: &dyn Fn() -> evomerge_engine::Result<MergePlan>| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
        (0..21)
            .map(|_| {
                let t = Instant::now();
                f()?;
                Ok(t.elapsed().as_secs_f64())
            })
            .collect()
    };
    let from_disk = median(time(&|| MergePlan::build(&parsed, text.clone(), recipe.parent(), 0))?);
    let over_opened = median(time(&|| MergePlan::build_with(&parsed, String::new(), recipe.parent(), 0, &opened))?);
    println!("plan per candidate (median of 21): from disk {:.2} ms, over opened checkpoints {:.2} ms", from_disk * 1e3, over_opened * 1e3);
    for rep in 0..2 {
        let t = Instant::now();
        m.write_weights(0, &mut |_, out| {
            use rayon::prelude::*;
            out.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.5));
            Ok(())
        })?;
        println!("write_weights with a constant fill, rep {rep}: {:.3} s", t.elapsed().as_secs_f64());
    }
    if streamed_reps == 0 {
        return Ok(());
    }
    let same = streamed.iter().zip(&in_place).all(|(a, b)| a.to_bits() == b.to_bits());
    println!("logits of both paths identical: {same}");
    if !same {
        return Err("the in-place merge differs from the streamed one".into());
    }
    Ok(())
}
