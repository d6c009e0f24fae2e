//! `evomerge merge RECIPE.yaml --out DIR`: a one-shot merge from a mergekit recipe.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use evomerge_engine::executor::{self, MergeOptions, MergeProgress};
use evomerge_engine::io::OutputDir;
use evomerge_engine::recipe::MergePlan;

use super::progress::{ProgressMode, byte_bar};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge merge ties.yaml --out merged/\n  evomerge merge recipe.yaml --out merged/ --dry-run\n\n\
Model references are local directories (relative to the current directory or to the recipe's\n\
folder) or Hugging Face ids found in the local HF cache ($HF_HOME); nothing is downloaded.")]
pub struct MergeArgs {
    /// mergekit YAML recipe (`models:` or `slices:`, `merge_method`, `base_model`, `parameters`, `dtype`, `out_dtype`).
    pub recipe: PathBuf,
    /// Output directory (created atomically; must not exist or be empty unless --force).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Validate only: models exist, architectures and shapes agree, parameters are in range,
    /// and the output location is writable. Writes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Maximum size of one safetensors shard (e.g. 5GB, 500MB, 2GiB, or bytes).
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
    /// Seed of the random methods (DARE, DELLA); the same seed gives identical output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Progress display.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

/// Parses `5GB`, `500MB`, `2GiB`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 5GB, 500MB, 1048576)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit '{u}' (use B, KB, MB, GB, TB, KiB, MiB, GiB)")),
    };
    let v = n * mult;
    if v < 1.0 {
        return Err(format!("shard size '{s}' must be at least 1 byte"));
    }
    Ok(v as u64)
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

pub fn run(args: MergeArgs) -> Result<()> {
    let plan = MergePlan::from_file(&args.recipe, args.seed)?;
    if args.dry_run {
        // Probe the output location the same way a real run would, then remove the probe.
        drop(OutputDir::create(&args.out, args.force)?);
        println!("recipe OK: {} merge of {} model(s)", plan.method.name(), plan.models.len());
        for (r, m) in plan.model_refs.iter().zip(&plan.models) {
            println!("  {r}: {} ({}, {} layers, {}) at {}", m.arch.name, m.dtype(), m.num_layers(), human(m.raw_bytes()), m.dir().display());
        }
        println!(
            "would write {} tensors, {} layers, {} as {} to {}",
            plan.tasks.len(),
            plan.out_layers,
            human(plan.output_bytes()),
            plan.out_dtype,
            args.out.display()
        );
        return Ok(());
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    // A second Ctrl-C while stopping is ignored: stopping is quick (between two tensors).
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("installing the Ctrl-C handler")?;
    let opts = MergeOptions { shard_size: args.shard_size, overwrite: args.force, cancel: Some(cancel) };
    let bar = byte_bar(args.progress, plan.output_bytes());
    let summary = executor::execute(&plan, &args.out, &opts, &mut |p| match p {
        MergeProgress::Started { .. } => {}
        MergeProgress::Tensor { name, bytes_out, .. } => {
            bar.set_message(name.to_string());
            bar.inc(bytes_out);
        }
        MergeProgress::Writing => bar.set_message("writing config and tokenizer"),
    })?;
    bar.finish_and_clear();
    let p = summary.phases;
    tracing::info!(decode_s = p.decode, merge_s = p.merge, write_s = p.write, "merge phases");
    if summary.tensors == 0 {
        bail!("the recipe produced no tensors");
    }
    println!(
        "merged {} tensors ({} shard{}) in {:.2} s: read {}, wrote {}, {:.2} GB/s -> {}",
        summary.tensors,
        summary.shards,
        if summary.shards == 1 { "" } else { "s" },
        summary.seconds,
        human(summary.bytes_in),
        human(summary.bytes_out),
        summary.gb_per_s(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1048576"), Ok(1_048_576));
        assert_eq!(parse_size("1.5mb"), Ok(1_500_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }
}
