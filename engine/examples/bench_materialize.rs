//! Where a candidate's materialization time goes (profiling aid for `scripts/bench-loop`).
//!
//! `bench_materialize RECIPE.yaml BASE_DIR`: plan, merge into memory, swap into a resident model.

use std::time::Instant;

use evomerge_engine::executor::merge_to_memory;
use evomerge_engine::model::{self, DeviceSpec, ModelSpec};
use evomerge_engine::recipe::MergePlan;
use evomerge_engine::Checkpoint;

#[global_allocator]
static GLOBAL: evomerge_engine::alloc::Allocator = evomerge_engine::alloc::Allocator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    evomerge_engine::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let (recipe, base) = (std::path::Path::new(&args[1]), std::path::Path::new(&args[2]));
    let ck = Checkpoint::open(base, "base")?;
    let mut m = model::open(DeviceSpec::Cpu, &[ModelSpec::from_checkpoint(&ck)])?;
    for rep in 0..3 {
        let t = Instant::now();
        let plan = MergePlan::from_file(recipe, 0)?;
        let t_plan = t.elapsed().as_secs_f64();
        let merged = merge_to_memory(&plan)?;
        let t_merge = t.elapsed().as_secs_f64() - t_plan;
        m.load_weights(0, &merged)?;
        let t_load = t.elapsed().as_secs_f64() - t_plan - t_merge;
        println!("rep {rep}: plan {t_plan:.3} s, merge_to_memory {t_merge:.3} s, load_weights {t_load:.3} s");
    }
    Ok(())
}
