//! Scale-out over a Redis Streams broker (Valkey works too): the coordinator (`search` /
//! `resume` with `--broker`) hands out candidates, workers anywhere score them.
//!
//! ```text
//! evomerge:runs                     set of the runs on the broker (their ids)
//! evomerge:run:{RUN}:info           RunInfo (JSON): the resolved experiment, the sources' hash,
//!                                   the calibration rows, the reclaim time, finished or not
//! evomerge:run:{RUN}:tasks          stream of TaskMsg, consumer group "workers"
//! evomerge:run:{RUN}:results        stream of ResultMsg (read by the coordinator)
//! evomerge:run:{RUN}:workers        hash: consumer name → WorkerStatus (JSON)
//! ```
//!
//! Redis is transport, never the record: the coordinator writes `evaluations.jsonl` in candidate
//! order and tells the optimizer exactly as a one-process run does, so the results do not
//! depend on who scored what. Delivery is at-least-once: a worker reads a task with
//! `XREADGROUP`, scores it, adds its result, then `XACK`s it. A worker that dies leaves its task
//! pending; its heartbeats stop refreshing the task's idle time, and after
//! [`RunInfo::reclaim_after_ms`] another worker takes it over with `XAUTOCLAIM`. A task
//! delivered more than [`MAX_DELIVERIES`] times is recorded as a failed candidate. Duplicate
//! results are dropped by (stage, candidate id, fingerprint).

pub mod coordinator;
pub mod worker;

use std::path::Path;
use std::time::Duration;

use redis::{Commands, RedisError};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RunError};
use crate::records::EvaluationRecord;

pub use coordinator::BrokerPool;
pub use worker::{WorkerOptions, WorkerSummary, run_worker};

/// The consumer group of a run's tasks stream.
pub const GROUP: &str = "workers";
/// Deliveries of one task before it is recorded as a failure (it ended that many workers).
pub const MAX_DELIVERIES: usize = 3;
/// Default time after which a task whose worker stopped sending heartbeats is taken over
/// (`EVOMERGE_RECLAIM_AFTER_MS` on the coordinator sets another).
pub const RECLAIM_AFTER_MS: u64 = 5_000;

/// The reclaim time a coordinator publishes: `EVOMERGE_RECLAIM_AFTER_MS`, else the default;
/// at least 200 ms.
pub fn reclaim_after_ms() -> u64 {
    std::env::var("EVOMERGE_RECLAIM_AFTER_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(RECLAIM_AFTER_MS).max(200)
}

/// How often a worker refreshes the idle time of the tasks it holds (and its status): a
/// quarter of the reclaim time, at most a second, so that a live worker's task is never
/// taken over.
pub fn heartbeat(reclaim_after_ms: u64) -> Duration {
    Duration::from_millis((reclaim_after_ms / 4).clamp(50, 1000))
}

/// `EVOMERGE_WORKER_DELAY_MS`: a pause before candidate `id` is scored, for fault-injection
/// tests (`N`: N ms) and the uneven-load benchmark (`LO-HI`: between LO and HI ms, the same
/// for a candidate wherever it is scored); 0 when unset.
pub fn worker_delay(id: u64) -> Duration {
    let spec = std::env::var("EVOMERGE_WORKER_DELAY_MS").unwrap_or_default();
    let ms = match spec.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi): (u64, u64) = (lo.trim().parse().unwrap_or(0), hi.trim().parse().unwrap_or(0));
            // splitmix64 of the id: uniform enough, and no RNG state
            let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + z % (hi.saturating_sub(lo) + 1)
        }
        None => spec.trim().parse().unwrap_or(0),
    };
    Duration::from_millis(ms)
}

/// A broker URL, checked: `redis://[user:pass@]host[:port][/db]`, `rediss://` (TLS),
/// `valkey://`, `valkeys://`, `redis+unix:///path`, `unix:///path`.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl(String);

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokerUrl({})", self.shown())
    }
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map(|(s, _)| s);
        match scheme {
            Some("redis" | "rediss" | "valkey" | "valkeys" | "redis+unix" | "unix") => Ok(Self(url.to_string())),
            Some(s) => Err(RunError::Broker(format!(
                "--broker {}: unknown scheme '{s}://' (use redis://, rediss:// for TLS, valkey://, or unix://)",
                Self(url.to_string()).shown()
            ))),
            None => Err(RunError::Broker(format!("--broker {url}: not a URL (redis://host:port)"))),
        }
    }

    /// The URL with its password hidden, for messages.
    pub fn shown(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else { return self.0.clone() };
        match rest.split_once('@') {
            Some((cred, host)) => {
                let user = cred.split_once(':').map_or("", |(u, _)| u);
                format!("{scheme}://{user}:***@{host}")
            }
            None => self.0.clone(),
        }
    }
}

/// What a worker needs to join a run, published by the coordinator once calibration is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run: String,
    /// Where the coordinator runs it (`host:run directory`): one run id, one coordinator.
    pub coordinator: String,
    /// The resolved experiment (`config.resolved.toml`).
    pub experiment: String,
    /// [`sources_hash`] of the run's source models.
    pub sources: String,
    /// `calibration.jsonl` as the coordinator fitted its estimators on (empty: no calibration).
    pub calibration: String,
    /// A task whose worker sent no heartbeat for this long is taken over.
    pub reclaim_after_ms: u64,
    pub finished: bool,
}

/// One candidate to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMsg {
    pub run: String,
    pub stage: String,
    pub id: u64,
    pub generation: u64,
    pub genome: Vec<f64>,
    /// The stage's fingerprint of the genome (checked by the worker and on the way back).
    pub fingerprint: String,
}

/// A worker's record of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMsg {
    pub run: String,
    pub stage: String,
    pub fingerprint: String,
    pub worker: String,
    pub record: EvaluationRecord,
}

/// What `status` shows of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub name: String,
    pub device: String,
    pub candidates: u64,
    /// Seconds spent scoring since it joined.
    pub busy_seconds: f64,
    /// Unix seconds.
    pub joined: f64,
    pub last_seen: f64,
    /// Still taking candidates (false once it left).
    pub active: bool,
}

impl WorkerStatus {
    /// Busy seconds over the time since it joined (until it was last seen).
    pub fn busy_fraction(&self) -> f64 {
        let span = (self.last_seen - self.joined).max(1e-9);
        (self.busy_seconds / span).min(1.0)
    }
}

/// The keys of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub run: String,
}

/// The set of runs on a broker.
pub const RUNS: &str = "evomerge:runs";

impl Keys {
    pub fn new(run: &str) -> Self {
        Self { run: run.to_string() }
    }
    pub fn info(&self) -> String {
        format!("evomerge:run:{}:info", self.run)
    }
    pub fn tasks(&self) -> String {
        format!("evomerge:run:{}:tasks", self.run)
    }
    pub fn results(&self) -> String {
        format!("evomerge:run:{}:results", self.run)
    }
    pub fn workers(&self) -> String {
        format!("evomerge:run:{}:workers", self.run)
    }
}

/// Unix time in seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This host's name (for worker names and the coordinator's address).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// SHA-256 over each source model's `config.json` and its safetensors files' names, sizes and
/// headers (tensor names, dtypes, shapes, offsets): what a worker must have to score the same
/// candidates, without reading the weights.
pub fn sources_hash(models: &[std::path::PathBuf]) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut h = sha2::Sha256::new();
    for dir in models {
        let cfg = dir.join("config.json");
        h.update(std::fs::read(&cfg).map_err(RunError::io(&cfg))?);
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(RunError::io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        for f in files {
            let mut file = std::fs::File::open(&f).map_err(RunError::io(&f))?;
            let size = file.metadata().map_err(RunError::io(&f))?.len();
            let mut len = [0u8; 8];
            file.read_exact(&mut len).map_err(RunError::io(&f))?;
            let n = u64::from_le_bytes(len).min(size.saturating_sub(8)).min(100 << 20);
            let mut header = vec![0u8; n as usize];
            file.read_exact(&mut header).map_err(RunError::io(&f))?;
            h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
            h.update(size.to_le_bytes());
            h.update(&header);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A connection to the broker that reconnects after the broker or the network went away.
pub struct Conn {
    url: BrokerUrl,
    client: redis::Client,
    con: Option<redis::Connection>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("url", &self.url).field("connected", &self.con.is_some()).finish()
    }
}

/// A broker error in words, with the URL (password hidden).
fn broker_error(url: &BrokerUrl, e: &RedisError) -> RunError {
    let why = if e.is_connection_refusal() {
        "connection refused (is redis-server running there?)".to_string()
    } else if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed) || e.code() == Some("WRONGPASS") || e.code() == Some("NOAUTH") {
        format!("authentication failed: {e}")
    } else {
        e.to_string()
    };
    RunError::Broker(format!("broker {}: {why}", url.shown()))
}

/// Installs rustls's ring provider once (rediss://).
fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Conn {
    /// Connects and checks the broker answers (and takes the credentials) now.
    pub fn open(url: &BrokerUrl) -> Result<Self> {
        tls_provider();
        let client = redis::Client::open(url.0.as_str()).map_err(|e| broker_error(url, &e))?;
        let mut c = Self { url: url.clone(), client, con: None };
        c.connect().map_err(|e| broker_error(url, &e))?;
        let _: String = c.query(&mut redis::cmd("PING")).map_err(|e| broker_error(url, &e))?;
        Ok(c)
    }

    pub fn url(&self) -> &BrokerUrl {
        &self.url
    }

    fn connect(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            let con = self.client.get_connection_with_timeout(Duration::from_secs(5))?;
            self.con = Some(con);
        }
        Ok(self.con.as_mut().expect("just connected"))
    }

    /// Runs `f` on the connection; a connection-level error drops it (the next call reconnects).
    pub fn with<T>(&mut self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> redis::RedisResult<T> {
        let con = self.connect()?;
        let r = f(con);
        if let Err(e) = &r
            && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_unrecoverable_error())
        {
            self.con = None;
        }
        r
    }

    pub fn query<T: redis::FromRedisValue>(&mut self, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
        self.with(|c| cmd.query(c))
    }

    /// The run's info, if the broker has it.
    pub fn info(&mut self, keys: &Keys) -> redis::RedisResult<Option<Result<RunInfo, String>>> {
        let text: Option<String> = self.with(|c| c.get(keys.info()))?;
        Ok(text.map(|t| serde_json::from_str(&t).map_err(|e| e.to_string())))
    }

    /// Creates the run's consumer group (and stream) unless it exists.
    pub fn ensure_group(&mut self, keys: &Keys) -> redis::RedisResult<()> {
        let r: redis::RedisResult<()> = self.with(|c| c.xgroup_create_mkstream(keys.tasks(), GROUP, "0"));
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            r => r,
        }
    }
}

/// Whether a broker error is about the connection (retry after reconnecting) rather than the
/// request.
pub fn transient(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.code() == Some("LOADING")
}

/// Retries `f` while the broker is unreachable (restarting, a network blip), with growing
/// waits up to 5 s, until `give_up` says so; warns once per outage. Other errors return.
pub fn retrying<T>(
    conn: &mut Conn,
    what: &str,
    give_up: &dyn Fn() -> bool,
    mut f: impl FnMut(&mut Conn) -> redis::RedisResult<T>,
) -> std::result::Result<T, RedisError> {
    let mut wait = Duration::from_millis(50);
    let mut warned = false;
    loop {
        match f(conn) {
            Err(e) if transient(&e) && !give_up() => {
                if !warned {
                    tracing::warn!("broker {}: {what}: {e}; retrying", conn.url.shown());
                    warned = true;
                }
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            r => {
                if warned && r.is_ok() {
                    tracing::warn!("broker {}: reconnected", conn.url.shown());
                }
                return r;
            }
        }
    }
}

/// A task taken from the stream.
#[derive(Debug)]
pub(crate) struct Taken {
    pub entry: String,
    /// `None`: the entry was not a task of this run (logged and acknowledged).
    pub task: Option<TaskMsg>,
    pub deliveries: usize,
}

/// Parses a stream entry's `msg` field.
fn parse_entry<T: serde::de::DeserializeOwned>(e: &redis::streams::StreamId) -> Option<T> {
    let v = e.map.get("msg")?;
    let bytes: Vec<u8> = redis::from_redis_value_ref(v).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Takes one task for `consumer`: first one whose worker stopped sending heartbeats (held for
/// `reclaim_ms` without one), else a new one (waiting up to `block_ms`; 0 = do not wait).
pub(crate) fn take(conn: &mut Conn, keys: &Keys, consumer: &str, reclaim_ms: u64, block_ms: usize) -> redis::RedisResult<Option<Taken>> {
    let claimed: redis::streams::StreamAutoClaimReply = conn.with(|c| {
        c.xautoclaim_options(keys.tasks(), GROUP, consumer, reclaim_ms, "0-0", redis::streams::StreamAutoClaimOptions::default().count(1))
    })?;
    if let Some(e) = claimed.claimed.into_iter().next() {
        let pending: redis::streams::StreamPendingCountReply = conn.with(|c| c.xpending_count(keys.tasks(), GROUP, &e.id, &e.id, 1))?;
        let deliveries = pending.ids.first().map_or(1, |p| p.times_delivered);
        return Ok(Some(Taken { task: parse_entry(&e), entry: e.id, deliveries }));
    }
    let mut opts = redis::streams::StreamReadOptions::default().group(GROUP, consumer).count(1);
    if block_ms > 0 {
        opts = opts.block(block_ms);
    }
    let read: Option<redis::streams::StreamReadReply> = conn.with(|c| c.xread_options(&[keys.tasks()], &[">"], &opts))?;
    let Some(e) = read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()) else { return Ok(None) };
    Ok(Some(Taken { task: parse_entry(&e), entry: e.id, deliveries: 1 }))
}

/// Acknowledges and deletes a task entry (its result is on the results stream or in hand).
pub(crate) fn done(conn: &mut Conn, keys: &Keys, entry: &str) -> redis::RedisResult<()> {
    conn.with(|c| redis::pipe().xack(keys.tasks(), GROUP, &[entry]).ignore().xdel(keys.tasks(), &[entry]).ignore().query::<()>(c))
}

/// Keeps the tasks that `consumers` hold from being taken over while they work on them
/// (`XCLAIM … JUSTID` to themselves resets a task's idle time without counting a delivery),
/// and publishes the status of each, every `interval` ([`heartbeat`]).
pub(crate) struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat").finish_non_exhaustive()
    }
}

pub(crate) type StatusBoard = std::sync::Arc<std::sync::Mutex<Vec<WorkerStatus>>>;

impl Heartbeat {
    pub(crate) fn start(url: &BrokerUrl, keys: &Keys, board: StatusBoard, interval: Duration) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let mut conn = Conn::open(url)?;
        let keys = keys.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("evomerge-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let statuses = board.lock().map(|b| b.clone()).unwrap_or_default();
                    for mut s in statuses {
                        s.last_seen = now();
                        let _ = beat(&mut conn, &keys, &s);
                    }
                    // short sleeps: stopping must not wait a whole beat
                    for _ in 0..10 {
                        if flag.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(interval / 10);
                    }
                }
            })
            .map_err(|e| RunError::Broker(format!("starting the heartbeat thread: {e}")))?;
        Ok(Self { stop, handle: Some(handle) })
    }
}

fn beat(conn: &mut Conn, keys: &Keys, s: &WorkerStatus) -> redis::RedisResult<()> {
    let pending: redis::streams::StreamPendingCountReply = conn.with(|c| c.xpending_consumer_count(keys.tasks(), GROUP, "-", "+", 16, &s.name))?;
    let ids: Vec<String> = pending.ids.into_iter().map(|p| p.id).collect();
    if !ids.is_empty() {
        let _: redis::Value = conn.query(redis::cmd("XCLAIM").arg(keys.tasks()).arg(GROUP).arg(&s.name).arg(0).arg(&ids).arg("JUSTID"))?;
    }
    let json = serde_json::to_string(s).unwrap_or_default();
    conn.with(|c| c.hset::<_, _, _, ()>(keys.workers(), &s.name, json))
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The statuses of a run's workers (for `status` and the run directory's `workers.json`).
pub fn worker_statuses(conn: &mut Conn, keys: &Keys) -> redis::RedisResult<Vec<WorkerStatus>> {
    let all: std::collections::HashMap<String, String> = conn.with(|c| c.hgetall(keys.workers()))?;
    let mut v: Vec<WorkerStatus> = all.values().filter_map(|j| serde_json::from_str(j).ok()).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

/// The file in a run directory where the coordinator leaves its workers' statuses.
pub const WORKERS_FILE: &str = "workers.json";

/// Reads `RUN_DIR/workers.json` (empty when the run had no broker).
pub fn read_worker_statuses(run_dir: &Path) -> Vec<WorkerStatus> {
    std::fs::read_to_string(run_dir.join(WORKERS_FILE)).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        assert!(BrokerUrl::parse("redis://127.0.0.1:6379/0").is_ok());
        assert!(BrokerUrl::parse("rediss://h:6380").is_ok());
        let e = BrokerUrl::parse("http://h:6379").expect_err("scheme");
        assert!(e.to_string().contains("unknown scheme 'http://'"), "{e}");
        assert!(BrokerUrl::parse("localhost:6379").is_err());
        let u = BrokerUrl::parse("redis://alice:s3cret@h:6379/2").expect("url");
        assert_eq!(u.shown(), "redis://alice:***@h:6379/2");
        assert!(!format!("{u:?}").contains("s3cret"));
        let e = BrokerUrl::parse("ftp://bob:pw@h").expect_err("scheme");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }
}
