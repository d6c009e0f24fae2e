//! `evomerge worker`: joins a run on a broker, loads the run's source models once, then takes
//! candidates, scores them and sends their records back until the run finishes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evomerge_engine::io::resolve_model;
use evomerge_engine::model::{DeviceSpec, LanguageModel, RuntimeKind};
use evomerge_fitness::TaskEstimator;
use redis::Commands;

use super::{BrokerUrl, Conn, Heartbeat, Keys, MAX_DELIVERIES, RUNS, ResultMsg, RunInfo, Taken, WorkerStatus, done, host, now, retrying, take};
use crate::calibration::calibrate;
use crate::error::{Result, RunError};
use crate::evaluate::{StageKind, evaluate, failed};
use crate::experiment::Experiment;
use crate::observer::{Notice, RunObserver};
use crate::run_dir::CALIBRATION;
use crate::setup::Setup;

/// How a worker joins.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub broker: BrokerUrl,
    /// The device it scores on (default: the run's).
    pub device: Option<DeviceSpec>,
    /// The runtime it scores with (default: the run's).
    pub runtime: Option<RuntimeKind>,
    /// The run to join (default: the only run on the broker; waits for one when there is none).
    pub run: Option<String>,
    /// Set (Ctrl-C) to leave after the candidate in hand.
    pub cancel: Arc<AtomicBool>,
    /// Leave after this many candidates (tests, benchmarks).
    pub max_candidates: Option<u64>,
}

/// [`WorkerSummary::reason`] of a worker stopped by Ctrl-C / SIGTERM.
pub const INTERRUPTED: &str = "interrupted";

/// What a worker did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSummary {
    pub run: String,
    pub name: String,
    pub candidates: u64,
    pub busy_fraction: f64,
    /// Why it left: the run finished, Ctrl-C, its candidate limit.
    pub reason: String,
}

/// Scores one task taken from the stream: `None` when the entry is not a candidate this worker
/// may score (malformed, another run's, another stage's, a genome that does not match its
/// fingerprint), logged; a failed record when it was delivered more than [`MAX_DELIVERIES`]
/// times (every worker that took it stopped before finishing it).
pub(crate) fn handle(
    kind: &StageKind<'_>,
    run: &str,
    worker: &str,
    taken: &Taken,
    runtime: &mut dyn LanguageModel,
    estimators: &mut [TaskEstimator],
) -> Option<ResultMsg> {
    let Some(task) = &taken.task else {
        tracing::warn!("broker: dropped malformed task entry {}", taken.entry);
        return None;
    };
    let stage = kind.stage().name();
    if task.run != run || task.stage != stage || kind.fingerprint(&task.genome) != task.fingerprint {
        tracing::warn!(
            "broker: dropped task entry {} (run '{}', stage '{}': not a {stage} candidate of run '{run}')",
            taken.entry,
            task.run,
            task.stage
        );
        return None;
    }
    let c = evomerge_search::Candidate { id: task.id, generation: task.generation, genome: task.genome.clone() };
    std::thread::sleep(super::worker_delay(task.id));
    let record = if taken.deliveries > MAX_DELIVERIES {
        failed(
            &c,
            format!(
                "delivered to {} workers, none of which finished it (each was killed or crashed while scoring it); recorded as failed",
                taken.deliveries - 1
            ),
        )
    } else {
        evaluate(kind, &c, runtime, estimators)
    };
    Some(ResultMsg { run: run.to_string(), stage: stage.into(), fingerprint: task.fingerprint.clone(), worker: worker.to_string(), record })
}

/// Which run to join: the one named, else the only live one (waiting for one to appear).
fn find_run(conn: &mut Conn, opts: &WorkerOptions, observer: &mut dyn RunObserver) -> Result<(Keys, RunInfo)> {
    let url = opts.broker.shown();
    let err = |e: redis::RedisError| RunError::Broker(format!("broker {url}: {e}"));
    let mut waiting = false;
    loop {
        let run = match &opts.run {
            Some(r) => Some(r.clone()),
            None => {
                let mut runs: Vec<String> = conn.with(|c| c.smembers(RUNS)).map_err(err)?;
                runs.sort();
                if runs.len() > 1 {
                    return Err(RunError::Broker(format!("broker {url} has {} runs ({}); choose one with --run", runs.len(), runs.join(", "))));
                }
                runs.pop()
            }
        };
        if let Some(run) = run {
            let keys = Keys::new(&run);
            match conn.info(&keys).map_err(err)? {
                Some(Ok(info)) if info.finished => {
                    return Err(RunError::Broker(format!("run '{run}' on broker {url} has finished; nothing to do")));
                }
                Some(Ok(info)) => return Ok((keys, info)),
                Some(Err(e)) => return Err(RunError::Broker(format!("run '{run}' on broker {url}: unreadable run info: {e}"))),
                None => {}
            }
        }
        if opts.cancel.load(Ordering::Relaxed) {
            return Err(RunError::Broker("interrupted while waiting for a run".into()));
        }
        if !waiting {
            let which = opts.run.as_deref().map_or("a run".to_string(), |r| format!("run '{r}'"));
            observer.notice(&Notice::Broker(format!("waiting for {which} on {url}")));
            waiting = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Joins a run on the broker and scores its candidates until it finishes (or `cancel`, or
/// `max_candidates`).
pub fn run_worker(opts: &WorkerOptions, observer: &mut dyn RunObserver) -> Result<WorkerSummary> {
    let mut conn = Conn::open(&opts.broker)?;
    let (keys, info) = find_run(&mut conn, opts, observer)?;
    let mut exp = Experiment::from_resolved(&info.experiment, Path::new("the run's resolved experiment (from the broker)"))?;
    let run_device = exp.device;
    if let Some(d) = opts.device {
        exp.device = d;
    }
    let device = exp.device;
    if let Some(r) = opts.runtime {
        exp.runtime = r;
    }
    evomerge_engine::model::check_device(exp.runtime, device)?;
    // the sources must resolve here, and be the run's
    let mut dirs = vec![];
    for m in exp.sources() {
        let dir = resolve_model(m, None)
            .map_err(|e| RunError::Broker(format!("run '{}': source model '{m}' is not available on this machine ({e}); workers need the run's models (a shared filesystem or the same local cache)", keys.run)))?;
        dirs.push(dir);
    }
    let hash = super::sources_hash(&dirs)?;
    if hash != info.sources {
        return Err(RunError::Broker(format!(
            "run '{}': the source models here ({}) differ from the coordinator's (their config.json or safetensors headers); refusing to score",
            keys.run,
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    observer.notice(&Notice::Broker(format!(
        "joined run '{}' of {} (coordinator {}); loading the models on {device}",
        keys.run,
        opts.broker.shown(),
        info.coordinator
    )));
    let mut s = Setup::new(exp, false)?;
    // The coordinator's calibration rows: the same fitted estimators, nothing scored again
    // (the rows are keyed by the run's device, which this worker's may differ from).
    let scratch = tempfile_dir()?;
    if !info.calibration.is_empty() {
        std::fs::write(scratch.join(CALIBRATION), &info.calibration).map_err(RunError::io(&scratch))?;
    }
    s.exp.device = run_device;
    let calibrated = calibrate(&mut s, false, Some(&scratch), 1, &mut crate::Quiet);
    s.exp.device = device;
    let _ = std::fs::remove_dir_all(&scratch);
    calibrated?;
    let name = format!("{}-{}-{}", host(), std::process::id(), device);
    let t = now();
    let status =
        WorkerStatus { name: name.clone(), device: device.to_string(), candidates: 0, busy_seconds: 0.0, joined: t, last_seen: t, active: true };
    let board = Arc::new(Mutex::new(vec![status]));
    let heartbeat = Heartbeat::start(&opts.broker, &keys, board.clone(), super::heartbeat(info.reclaim_after_ms))?;
    observer.notice(&Notice::Broker(format!("worker {name} ready")));
    let kind = StageKind::Params { layout: &s.layout, opened: &s.opened, materializer: &s.materializer, seed: s.exp.seed };
    let cancel = opts.cancel.clone();
    let give_up = || cancel.load(Ordering::Relaxed);
    let mut candidates = 0u64;
    let mut last_check = Instant::now();
    let mut last_line = Instant::now();
    let reason = loop {
        if give_up() {
            break INTERRUPTED.to_string();
        }
        if opts.max_candidates.is_some_and(|m| candidates >= m) {
            break format!("{candidates} candidates done");
        }
        if last_check.elapsed() > Duration::from_secs(1) {
            last_check = Instant::now();
            match retrying(&mut conn, "reading the run", &give_up, |c| c.info(&keys)) {
                Ok(Some(Ok(i))) if i.finished => break "the run finished".to_string(),
                Ok(Some(Ok(i))) if i.sources != info.sources || i.coordinator != info.coordinator => {
                    break format!("run '{}' was replaced on the broker by another one (coordinator {})", keys.run, i.coordinator);
                }
                // gone (the broker restarted empty): the coordinator publishes it again
                _ => {}
            }
        }
        let taken = match retrying(&mut conn, "taking a candidate", &give_up, |c| take(c, &keys, &name, info.reclaim_after_ms, 500)) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(_) if give_up() => break INTERRUPTED.to_string(),
            // the run finished (its stream was removed under a waiting read), or the broker
            // lost it (the coordinator publishes it again)
            Err(e) if e.code() == Some("NOGROUP") || e.code() == Some("UNBLOCKED") => {
                if let Ok(Some(Ok(i))) = conn.info(&keys)
                    && i.finished
                {
                    break "the run finished".to_string();
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            Err(e) => return Err(RunError::Broker(format!("broker {}: {e}", opts.broker.shown()))),
        };
        let t0 = Instant::now();
        let (rt, est) = (s.runtime.as_mut(), s.estimators.as_mut_slice());
        let result = handle(&kind, &keys.run, &name, &taken, rt, est);
        // the status first (so that it counts this candidate once the coordinator has its
        // result), then the result, then the acknowledgement: a kill between the last two
        // scores the candidate again (dropped as a duplicate), never loses it
        let status = board.lock().ok().map(|mut b| {
            b[0].candidates += u64::from(result.is_some());
            b[0].busy_seconds += t0.elapsed().as_secs_f64();
            b[0].last_seen = now();
            b[0].clone()
        });
        if let Some(status) = status {
            candidates = status.candidates;
            let json = serde_json::to_string(&status).unwrap_or_default();
            let _ = conn.with(|c| c.hset::<_, _, _, ()>(keys.workers(), &name, json));
            if last_line.elapsed() > Duration::from_secs(60) {
                last_line = Instant::now();
                observer
                    .notice(&Notice::Broker(format!("worker {name}: {candidates} candidates scored, busy {:.0} %", status.busy_fraction() * 100.0)));
            }
        }
        if let Some(result) = result {
            let json = serde_json::to_string(&result).unwrap_or_default();
            let sent = retrying(&mut conn, "sending a result", &give_up, |c| {
                c.with(|c| c.xadd::<_, _, _, _, ()>(keys.results(), "*", &[("msg", json.as_str())]))
            });
            if sent.is_err() {
                continue;
            }
        }
        let _ = retrying(&mut conn, "acknowledging", &give_up, |c| done(c, &keys, &taken.entry));
    };
    drop(heartbeat);
    let mut status = board.lock().map(|b| b[0].clone()).map_err(|_| RunError::Broker("worker status".into()))?;
    status.active = false;
    status.last_seen = now();
    let json = serde_json::to_string(&status).unwrap_or_default();
    let _ = conn.with(|c| c.hset::<_, _, _, ()>(keys.workers(), &name, json));
    Ok(WorkerSummary { run: keys.run.clone(), name, candidates, busy_fraction: status.busy_fraction(), reason })
}

/// A fresh private folder for the worker's scratch files.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("evomerge-worker-{}-{}", std::process::id(), now() as u64));
    std::fs::create_dir_all(&dir).map_err(RunError::io(&dir))?;
    Ok(dir)
}
