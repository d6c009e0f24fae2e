//! `evomerge worker --broker URL`: one evaluation worker of a scale-out run.

use anyhow::Result;
use clap::Args;
use evomerge_engine::model::{DeviceSpec, RuntimeKind};
use evomerge_run::broker::worker::INTERRUPTED;
use evomerge_run::broker::{BrokerUrl, WorkerOptions, run_worker};
use evomerge_run::{Notice, RunObserver};

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  evomerge worker --broker redis://head:6379\n  \
evomerge worker --broker redis://:secret@head:6379/0 --device cuda:1 --run 1765000000-demo\n\n\
The worker reads the run's resolved experiment from the broker, loads its source models once\n\
(their paths or hub ids must resolve here: a shared filesystem or the same local cache), then\n\
scores candidates until the run finishes. Ctrl-C leaves after the candidate in hand; a killed\n\
worker's candidate is taken over by another one.")]
pub struct WorkerArgs {
    /// The run's broker: redis://[user:pass@]host:port[/db], rediss:// for TLS.
    #[arg(long, value_name = "URL")]
    pub broker: String,
    /// Device to score on (cpu, cuda:N; default: the run's).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Runtime to score with: burn or libtorch (a `--features libtorch` build; default: the
    /// run's).
    #[arg(long)]
    pub runtime: Option<RuntimeKind>,
    /// Run to join (its run directory's name; default: the only run on the broker, waiting
    /// for one when there is none).
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
    /// Leave after this many candidates.
    #[arg(long, value_name = "N")]
    pub max_candidates: Option<u64>,
}

/// Prints what the worker does, on stderr.
struct Lines;

impl RunObserver for Lines {
    fn notice(&mut self, n: &Notice) {
        match n {
            Notice::Broker(line) => eprintln!("{line}"),
            Notice::Warning(w) => eprintln!("warning: {w}"),
            _ => {}
        }
    }
}

pub fn run(args: WorkerArgs) -> Result<()> {
    let opts = WorkerOptions {
        broker: BrokerUrl::parse(&args.broker)?,
        device: args.device,
        runtime: args.runtime,
        run: args.run,
        cancel: super::search::cancel_flag()?,
        max_candidates: args.max_candidates,
    };
    let s = run_worker(&opts, &mut Lines)?;
    eprintln!(
        "worker {} left run '{}': {}; {} candidates scored, busy {:.0} % of the time",
        s.name,
        s.run,
        s.reason,
        s.candidates,
        s.busy_fraction * 100.0
    );
    if s.reason == INTERRUPTED {
        // the candidate in hand was finished and sent; the run goes on without this worker
        std::process::exit(i32::from(crate::exit::INTERRUPTED));
    }
    Ok(())
}
