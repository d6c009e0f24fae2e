//! The coordinator's side: a [`Scorer`] that publishes a batch's candidates on the run's tasks
//! stream and collects their records from the results stream (and from this process's own
//! workers, which take tasks from the same stream), then hands them back in the batch's order.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use evomerge_fitness::Objective;
use evomerge_search::Candidate;
use redis::Commands;

use super::worker::handle;
use super::{
    BrokerUrl, Conn, Heartbeat, Keys, RUNS, ResultMsg, RunInfo, StatusBoard, TaskMsg, WORKERS_FILE, WorkerStatus, done, host, now, retrying, take,
    worker_statuses,
};
use crate::error::{Result, RunError};
use crate::evaluate::StageKind;
use crate::pool::{AsyncScored, AsyncScorer, Scorer, WorkerRef};
use crate::records::EvaluationRecord;
use crate::run_dir::write_atomic;

/// Scores candidates through the broker; `local` workers of this process take part.
pub struct BrokerPool<'w, 'a> {
    conn: Conn,
    keys: Keys,
    info: RunInfo,
    objectives: Vec<Objective>,
    local: &'w mut [WorkerRef<'a>],
    local_conns: Vec<Conn>,
    board: StatusBoard,
    _heartbeat: Heartbeat,
    cancel: Arc<AtomicBool>,
    results: Results,
    run_dir: PathBuf,
    /// Asynchronous mode: what was submitted and is not back yet, and whether the stream
    /// must be brought in line with it.
    flight: std::collections::BTreeMap<u64, TaskMsg>,
    unpublished: bool,
    local_done: std::collections::VecDeque<EvaluationRecord>,
    checked: Instant,
    /// Capacity last computed, and when.
    capacity: (Instant, usize),
    /// When `workers.json` was last written (asynchronous mode: every few seconds).
    workers_written: Instant,
}

impl std::fmt::Debug for BrokerPool<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerPool").field("run", &self.keys.run).field("local", &self.local.len()).finish_non_exhaustive()
    }
}

/// `host:dir`, naming a coordinator.
pub fn coordinator_name(run_dir: &Path) -> String {
    let dir = std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf());
    format!("{}:{}", host(), dir.display())
}

impl<'w, 'a> BrokerPool<'w, 'a> {
    /// Attaches to the broker as the coordinator of `info.run` (refused when another
    /// coordinator's run of that id is live there) and publishes the run's info.
    pub fn attach(
        url: &BrokerUrl,
        info: RunInfo,
        objectives: Vec<Objective>,
        run_dir: &Path,
        local: &'w mut [WorkerRef<'a>],
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let mut conn = Conn::open(url)?;
        let keys = Keys::new(&info.run);
        let err = |e: redis::RedisError| RunError::Broker(format!("broker {}: {e}", url.shown()));
        if let Some(Ok(old)) = conn.info(&keys).map_err(err)?
            && old.coordinator != info.coordinator
            && !old.finished
        {
            return Err(RunError::Broker(format!(
                "broker {} already has a live run '{}' coordinated by {}; give this run another directory name",
                url.shown(),
                info.run,
                old.coordinator
            )));
        }
        publish_info(&mut conn, &keys, &info).map_err(err)?;
        let pid = std::process::id();
        let mut local_conns = vec![];
        let mut board = vec![];
        for k in 0..local.len() {
            local_conns.push(Conn::open(url)?);
            let t = now();
            board.push(WorkerStatus {
                name: format!("{}-{pid}-local{k}", host()),
                device: "local".into(),
                candidates: 0,
                busy_seconds: 0.0,
                joined: t,
                last_seen: t,
                active: true,
            });
        }
        let board: StatusBoard = Arc::new(Mutex::new(board));
        let heartbeat = Heartbeat::start(url, &keys, board.clone(), super::heartbeat(info.reclaim_after_ms))?;
        Ok(Self {
            conn,
            keys,
            info,
            objectives,
            local,
            local_conns,
            board,
            _heartbeat: heartbeat,
            cancel,
            results: Results { cursor: "0".into(), ..Default::default() },
            run_dir: run_dir.to_path_buf(),
            flight: Default::default(),
            unpublished: false,
            local_done: Default::default(),
            checked: Instant::now(),
            capacity: (Instant::now(), 0),
            workers_written: Instant::now(),
        })
    }

    /// The run has ended: workers are told (and leave), its streams are removed.
    pub fn finish(mut self) -> Result<()> {
        self.info.finished = true;
        self.write_workers_file();
        let (keys, info) = (self.keys.clone(), serde_json::to_string(&self.info).unwrap_or_default());
        self.conn
            .with(|c| {
                redis::pipe()
                    .set(keys.info(), info)
                    .ignore()
                    .expire(keys.info(), 86_400)
                    .ignore()
                    .expire(keys.workers(), 86_400)
                    .ignore()
                    .srem(RUNS, &keys.run)
                    .ignore()
                    .del(&[keys.tasks(), keys.results()])
                    .ignore()
                    .query::<()>(c)
            })
            .map_err(|e| RunError::Broker(format!("broker {}: {e}", self.conn.url().shown())))
    }

    /// Leaves `RUN_DIR/workers.json` (what `status` shows); once the run finished, every
    /// worker is shown as having left.
    fn write_workers_file(&mut self) {
        let cancel = self.cancel.clone();
        let keys = self.keys.clone();
        let finished = self.info.finished;
        // this process's workers as they are now (the broker has their last heartbeat)
        let local: Vec<WorkerStatus> = self.board.lock().map(|b| b.clone()).unwrap_or_default();
        if let Ok(mut list) =
            retrying(&mut self.conn, "reading the workers", &|| cancel.load(Ordering::Relaxed), |c| worker_statuses(c, &keys)).map(|mut list| {
                for w in &mut list {
                    if let Some(l) = local.iter().find(|l| l.name == w.name) {
                        *w = WorkerStatus { last_seen: now(), ..l.clone() };
                    }
                }
                list
            })
            && let Ok(text) = serde_json::to_string_pretty(
                list.iter_mut()
                    .map(|w| {
                        w.active &= !finished;
                        &*w
                    })
                    .collect::<Vec<_>>()
                    .as_slice(),
            )
        {
            let _ = write_atomic(&self.run_dir.join(WORKERS_FILE), &text);
        }
    }

    /// This process's workers take tasks (one each when `once`, else until none is left for
    /// them); their records come back in the order the workers finish them.
    fn drain_local(&mut self, kind: &StageKind<'_>, once: bool) -> Vec<EvaluationRecord> {
        let (keys, run, reclaim) = (&self.keys, self.info.run.as_str(), self.info.reclaim_after_ms);
        let board = &self.board;
        let cancel = &self.cancel;
        let out: Mutex<Vec<EvaluationRecord>> = Mutex::new(vec![]);
        let out_ref = &out;
        rayon::scope(|s| {
            for (k, ((rt, est), conn)) in self.local.iter_mut().zip(self.local_conns.iter_mut()).enumerate() {
                s.spawn(move |_| {
                    let name = board.lock().map(|b| b[k].name.clone()).unwrap_or_default();
                    while !cancel.load(Ordering::Relaxed) {
                        let taken = match take(conn, keys, &name, reclaim, 0) {
                            Ok(Some(t)) => t,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!("local worker {k}: {e}");
                                break;
                            }
                        };
                        let t0 = Instant::now();
                        if let Some(r) = handle(kind, run, &name, &taken, &mut **rt, est) {
                            out_ref.lock().unwrap_or_else(PoisonError::into_inner).push(r.record);
                        }
                        if let Ok(mut b) = board.lock() {
                            b[k].candidates += 1;
                            b[k].busy_seconds += t0.elapsed().as_secs_f64();
                        }
                        let _ = done(conn, keys, &taken.entry);
                        if once {
                            break;
                        }
                    }
                });
            }
        });
        out.into_inner().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes the run again if the broker lost it (checked every half second); true when
    /// it did.
    fn republished(&mut self, checked: &mut Instant) -> bool {
        if checked.elapsed() < Duration::from_millis(500) {
            return false;
        }
        *checked = Instant::now();
        let cancel = self.cancel.clone();
        let (keys, info) = (&self.keys, &self.info);
        if retrying(&mut self.conn, "checking the run", &|| cancel.load(Ordering::Relaxed), |c| wiped(c, keys, info)).unwrap_or(false) {
            tracing::warn!("broker {}: the run was gone (restarted empty?); its candidates are published again", self.conn.url().shown());
            self.results.cursor = "0".into();
            return true;
        }
        false
    }
}

/// What came back on the results stream.
#[derive(Debug, Default)]
struct Results {
    /// Position in the stream.
    cursor: String,
    /// Records by (stage, candidate id): (fingerprint, record).
    arrived: HashMap<(String, u64), (String, EvaluationRecord)>,
    /// Entries read, deleted once their batch is recorded (at the next batch).
    consumed: Vec<String>,
}

/// Puts the wanted tasks on the stream: entries already there for them stay (a worker may
/// hold them), other entries go (an earlier batch's or session's), the missing ones are added.
fn publish(conn: &mut Conn, keys: &Keys, stage: &str, wanted: &[TaskMsg]) -> redis::RedisResult<()> {
    let range: redis::streams::StreamRangeReply = conn.with(|c| c.xrange_all(keys.tasks()))?;
    let want: HashSet<(u64, &str)> = wanted.iter().map(|t| (t.id, t.fingerprint.as_str())).collect();
    let mut present = HashSet::new();
    let mut stale = vec![];
    for e in &range.ids {
        match super::parse_entry::<TaskMsg>(e) {
            Some(t) if t.stage == stage && want.contains(&(t.id, t.fingerprint.as_str())) && present.insert(t.id) => {}
            _ => stale.push(e.id.clone()),
        }
    }
    let mut pipe = redis::pipe();
    if !stale.is_empty() {
        pipe.xdel(keys.tasks(), &stale).ignore();
    }
    for t in wanted.iter().filter(|t| !present.contains(&t.id)) {
        pipe.xadd(keys.tasks(), "*", &[("msg", serde_json::to_string(t).unwrap_or_default())]).ignore();
    }
    conn.with(|c| pipe.query::<()>(c))
}

/// Reads what came back on the results stream (waiting up to `block_ms`).
fn read_results(conn: &mut Conn, keys: &Keys, results: &mut Results, block_ms: usize) -> redis::RedisResult<()> {
    let opts = redis::streams::StreamReadOptions::default().count(256).block(block_ms);
    let cursor = results.cursor.clone();
    let read: Option<redis::streams::StreamReadReply> = conn.with(|c| c.xread_options(&[keys.results()], &[cursor], &opts))?;
    for e in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
        results.cursor = e.id.clone();
        results.consumed.push(e.id.clone());
        match super::parse_entry::<ResultMsg>(&e) {
            // the first result of a candidate stands; later ones are duplicates
            Some(r) if r.run == keys.run => {
                results.arrived.entry((r.stage, r.record.id)).or_insert((r.fingerprint, r.record));
            }
            _ => tracing::warn!("broker: dropped a malformed or foreign result entry {}", e.id),
        }
    }
    Ok(())
}

/// Whether the broker lost the run (restarted empty): its info is then published again.
fn wiped(conn: &mut Conn, keys: &Keys, info: &RunInfo) -> redis::RedisResult<bool> {
    let exists: bool = conn.with(|c| c.exists(keys.info()))?;
    if exists {
        return Ok(false);
    }
    publish_info(conn, keys, info)?;
    Ok(true)
}

fn publish_info(conn: &mut Conn, keys: &Keys, info: &RunInfo) -> redis::RedisResult<()> {
    let text = serde_json::to_string(info).unwrap_or_default();
    conn.with(|c| redis::pipe().set(keys.info(), &text).ignore().persist(keys.info()).ignore().sadd(RUNS, &keys.run).ignore().query::<()>(c))?;
    conn.ensure_group(keys)
}

impl Scorer for BrokerPool<'_, '_> {
    fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    fn batch(&self) -> usize {
        // a whole generation at once: every worker anywhere gets work
        usize::MAX
    }

    fn score(&mut self, kind: &StageKind<'_>, batch: &[Candidate], todo: &[usize]) -> Vec<EvaluationRecord> {
        let stage = kind.stage().name();
        let cancel = self.cancel.clone();
        let give_up = move || cancel.load(Ordering::Relaxed);
        let keys = self.keys.clone();
        // the previous batch is recorded: its results may go
        let consumed = std::mem::take(&mut self.results.consumed);
        if !consumed.is_empty() {
            let _ = retrying(&mut self.conn, "deleting recorded results", &give_up, |c| c.with(|c| c.xdel::<_, _, ()>(keys.results(), &consumed)));
        }
        let wanted: Vec<TaskMsg> = todo
            .iter()
            .map(|&i| {
                let c = &batch[i];
                let fingerprint = kind.fingerprint(&c.genome);
                TaskMsg { run: keys.run.clone(), stage: stage.into(), id: c.id, generation: c.generation, genome: c.genome.clone(), fingerprint }
            })
            .collect();
        let slot_of: HashMap<u64, usize> = wanted.iter().enumerate().map(|(k, t)| (t.id, k)).collect();
        let mut got: Vec<Option<EvaluationRecord>> = vec![None; wanted.len()];
        let mut published = false;
        let mut checked = Instant::now();
        loop {
            for (k, t) in wanted.iter().enumerate() {
                if got[k].is_none()
                    && let Some((fp, r)) = self.results.arrived.get(&(stage.to_string(), t.id))
                    && *fp == t.fingerprint
                {
                    got[k] = Some(r.clone());
                }
            }
            let missing: Vec<TaskMsg> = wanted.iter().zip(&got).filter(|(_, r)| r.is_none()).map(|(t, _)| t.clone()).collect();
            if missing.is_empty() || give_up() {
                break;
            }
            if published && self.republished(&mut checked) {
                published = false;
            }
            if !published {
                published = retrying(&mut self.conn, "publishing candidates", &give_up, |c| publish(c, &keys, stage, &missing)).is_ok();
            }
            if !self.local.is_empty() {
                for r in self.drain_local(kind, false) {
                    if let Some(&slot) = slot_of.get(&r.id) {
                        got[slot].get_or_insert(r);
                    }
                }
            }
            let block = if self.local.is_empty() { 250 } else { 20 };
            let results = &mut self.results;
            let _ = retrying(&mut self.conn, "reading results", &give_up, |c| read_results(c, &keys, results, block));
        }
        self.write_workers_file();
        got.into_iter().map_while(|r| r).collect()
    }
}

/// Asynchronous mode: each candidate is published when it is asked; records come back as any
/// worker (remote or this process's) finishes one.
impl AsyncScorer for BrokerPool<'_, '_> {
    fn objectives(&self) -> &[Objective] {
        &self.objectives
    }

    /// One per live worker (this process's and those that sent a heartbeat in the last 5 s),
    /// plus one waiting, so that a worker that finishes finds the next candidate at once.
    fn capacity(&mut self) -> usize {
        if self.capacity.1 > 0 && self.capacity.0.elapsed() < Duration::from_secs(1) {
            return self.capacity.1;
        }
        let cancel = self.cancel.clone();
        let keys = self.keys.clone();
        let statuses =
            retrying(&mut self.conn, "reading the workers", &|| cancel.load(Ordering::Relaxed), |c| worker_statuses(c, &keys)).unwrap_or_default();
        let local: HashSet<String> = self.board.lock().map(|b| b.iter().map(|w| w.name.clone()).collect()).unwrap_or_default();
        let t = now();
        let remote = statuses.iter().filter(|w| w.active && t - w.last_seen < 5.0 && !local.contains(&w.name)).count();
        self.capacity = (Instant::now(), self.local.len() + remote + 1);
        self.capacity.1
    }

    fn submit(&mut self, kind: &StageKind<'_>, c: &Candidate) {
        let fingerprint = kind.fingerprint(&c.genome);
        let t = TaskMsg {
            run: self.keys.run.clone(),
            stage: kind.stage().name().into(),
            id: c.id,
            generation: c.generation,
            genome: c.genome.clone(),
            fingerprint,
        };
        self.flight.insert(c.id, t);
        self.unpublished = true;
    }

    fn next(&mut self, kind: &StageKind<'_>) -> AsyncScored {
        let stage = kind.stage().name();
        let cancel = self.cancel.clone();
        let give_up = move || cancel.load(Ordering::Relaxed);
        let keys = self.keys.clone();
        let wide = self.capacity.1;
        if self.workers_written.elapsed() > Duration::from_secs(5) {
            self.workers_written = Instant::now();
            self.write_workers_file();
        }
        loop {
            // this process's records first (in the order its workers finished them)
            while let Some(r) = self.local_done.pop_front() {
                if self.flight.remove(&r.id).is_some() {
                    return AsyncScored::Record(r);
                }
            }
            let back = self
                .flight
                .iter()
                .find_map(|(id, t)| self.results.arrived.get(&(stage.to_string(), *id)).filter(|(fp, _)| *fp == t.fingerprint).map(|_| *id));
            if let Some(id) = back {
                self.flight.remove(&id);
                if let Some((_, r)) = self.results.arrived.remove(&(stage.to_string(), id)) {
                    return AsyncScored::Record(r);
                }
            }
            if give_up() {
                return AsyncScored::Cancelled;
            }
            if AsyncScorer::capacity(self) > wide && wide > 0 {
                return AsyncScored::Wider;
            }
            let mut checked = self.checked;
            if self.republished(&mut checked) {
                self.unpublished = true;
            }
            self.checked = checked;
            if self.unpublished {
                let tasks: Vec<TaskMsg> = self.flight.values().cloned().collect();
                self.unpublished = retrying(&mut self.conn, "publishing candidates", &give_up, |c| publish(c, &keys, stage, &tasks)).is_err();
            }
            if !self.local.is_empty() {
                let done = self.drain_local(kind, true);
                self.local_done.extend(done);
                if !self.local_done.is_empty() {
                    continue;
                }
            }
            let block = if self.local.is_empty() { 250 } else { 20 };
            let results = &mut self.results;
            let _ = retrying(&mut self.conn, "reading results", &give_up, |c| read_results(c, &keys, results, block));
            // results are recorded as soon as they are handed back: read ones may go
            let consumed = std::mem::take(&mut self.results.consumed);
            if !consumed.is_empty() {
                let _ = retrying(&mut self.conn, "deleting read results", &give_up, |c| c.with(|c| c.xdel::<_, _, ()>(keys.results(), &consumed)));
            }
        }
    }
}
