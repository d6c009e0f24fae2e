//! `evomerge zoo train`: trains the demo model zoo (datasets/zoo/ holds the committed one).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use evomerge_zoo::{ZooConfig, build};

#[derive(Debug, Args)]
pub struct ZooArgs {
    #[command(subcommand)]
    pub command: ZooCommand,
}

#[derive(Debug, Subcommand)]
pub enum ZooCommand {
    /// Train the base model and the two experts (minutes on 2 cores) and write them to --out.
    #[command(after_help = "Example:\n  evomerge zoo train --out datasets/zoo --force\n\n\
The output holds base/, expert-add/, expert-reverse/ (Hugging Face checkpoints), data/ (the\n\
held-out items of each skill, JSONL) and zoo.json (configuration and validation accuracies).")]
    Train {
        /// Output directory (must not exist unless --force).
        #[arg(long)]
        out: PathBuf,
        /// Seed of data, initial weights and batches.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A tiny configuration and a few steps (a smoke test, not a useful zoo).
        #[arg(long)]
        quick: bool,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: ZooArgs) -> Result<()> {
    match args.command {
        ZooCommand::Train { out, seed, quick, force } => {
            if out.exists() {
                if !force {
                    bail!("{} exists; pass --force to replace it", out.display());
                }
                std::fs::remove_dir_all(&out)?;
            }
            let cfg = if quick { ZooConfig::quick(seed) } else { ZooConfig::standard(seed) };
            let summary = build(&out, &cfg, &mut |line| eprintln!("{line}"))?;
            println!("model            skill     validation accuracy");
            for (m, s, a) in &summary.accuracy {
                println!("{m:<16} {s:<9} {:>6.1} %", a * 100.0);
            }
            println!("zoo written to {}", out.display());
            Ok(())
        }
    }
}
