//! Scale-out over Redis Streams, end to end: a coordinator (`search --broker`) and `evomerge
//! worker` processes on the fixture models give the records of a one-process run, also when a
//! worker is killed mid-candidate, when the coordinator is killed and resumed, and when Redis
//! restarts empty; bad input ends with exit code 2. Each test starts its own `redis-server`
//! on a free loopback port (`.ci/run` installs it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{bin, run, run_ok};

/// A `redis-server` of the test's own, on a free loopback port, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl Redis {
    fn start() -> Self {
        Self::start_on(free_port(), None)
    }

    fn start_on(port: u16, password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.arg("--dir").arg(dir.path());
        if let Some(p) = password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}; the broker tests need it (apt-get install redis-server; .ci/run installs it)"));
        let r = Self { child, port, dir, password: password.map(String::from) };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "redis-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).expect("client").get_connection().expect("connect")
    }

    /// Stops the server (its data goes: it saves nothing) and starts an empty one on the port.
    fn restart_empty(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        let fresh = Self::start_on(self.port, self.password.as_deref());
        let old = std::mem::replace(self, fresh);
        drop(old);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
        let _ = &self.dir;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `experiments/search-tiny.toml` with absolute paths and a budget of `evaluations`.
fn experiment(dir: &Path, evaluations: u64) -> PathBuf {
    crate::common::tiny_experiment(dir, evaluations)
}

/// Records by candidate id, without timings; every line must parse, and ids are unique.
fn records(run: &Path) -> BTreeMap<u64, Value> {
    let text = std::fs::read_to_string(run.join("evaluations.jsonl")).expect("evaluations");
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let mut v: Value = serde_json::from_str(l).expect("a whole JSON line");
        let o = v.as_object_mut().expect("object");
        o.remove("seconds");
        o.remove("materialize_seconds");
        let id = v["id"].as_u64().expect("id");
        assert!(out.insert(id, v).is_none(), "candidate {id} recorded twice");
    }
    out
}

fn records_len(run: &Path) -> usize {
    std::fs::read_to_string(run.join("evaluations.jsonl")).map(|t| t.lines().count()).unwrap_or(0)
}

/// The records of the same experiment run in one process.
fn one_process(exp: &Path, dir: &Path) -> BTreeMap<u64, Value> {
    let run = dir.join("one-process");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--workers", "1"]);
    records(&run)
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(bin()).args(args).envs(env.iter().copied()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn evomerge")
}

fn coordinator(exp: &Path, run: &Path, url: &str, env: &[(&str, &str)]) -> Child {
    spawn(&["search", &exp.display().to_string(), "--run-dir", &run.display().to_string(), "--broker", url, "--workers", "0"], env)
}

fn worker(url: &str, env: &[(&str, &str)]) -> Child {
    spawn(&["worker", "--broker", url], env)
}

/// Waits for `child` (at most `secs`): its exit code and stderr.
fn finish(mut child: Child, secs: u64) -> (Option<i32>, String) {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            assert!(!err.contains("panicked"), "panic: {err}");
            return (status.code(), err);
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            child.kill().ok();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            panic!("still running after {secs} s: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(mut child: Child) {
    child.kill().ok();
    child.wait().ok();
}

fn wait_until(what: &str, secs: u64, mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Consumers of the run's group that hold a task now.
fn holders(r: &Redis, run: &str) -> Vec<String> {
    let mut c = r.conn();
    let key = format!("evomerge:run:{run}:tasks");
    let v: redis::RedisResult<Vec<(String, String, u64, u64)>> =
        redis::cmd("XPENDING").arg(&key).arg("workers").arg("-").arg("+").arg(100).query(&mut c);
    v.map(|ids| ids.into_iter().map(|(_, consumer, _, _)| consumer).collect()).unwrap_or_default()
}

fn assert_same(got: &BTreeMap<u64, Value>, want: &BTreeMap<u64, Value>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: evaluation count");
    for (id, w) in want {
        assert_eq!(&got[id], w, "{what}: candidate {id} differs");
    }
}

#[test]
fn three_worker_processes_give_the_records_of_a_one_process_run() {
    let r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 16);
    let want = one_process(&exp, tmp.path());
    let run = tmp.path().join("scaled");
    // one worker takes 1 s a candidate, three times the reclaim time: its heartbeats keep its
    // candidates from being taken over
    let coord = coordinator(&exp, &run, &r.url(), &[("EVOMERGE_RECLAIM_AFTER_MS", "300")]);
    let workers: Vec<Child> = ["1000", "0", "0"].iter().map(|d| worker(&r.url(), &[("EVOMERGE_WORKER_DELAY_MS", d)])).collect();
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("coordinating run 'scaled'"), "{err}");
    for w in workers {
        let (code, err) = finish(w, 60);
        assert_eq!(code, Some(0), "worker: {err}");
        assert!(err.contains("the run finished"), "{err}");
    }
    assert_same(&records(&run), &want, "3 workers");
    // status lists the workers (from workers.json), each having left
    let out = run_ok(&["status", &run.display().to_string(), "--json"]);
    let v: Value = serde_json::from_str(&out).expect("json");
    let ws = v["workers"].as_array().expect("workers");
    assert_eq!(ws.len(), 3, "{out}");
    let done: u64 = ws.iter().map(|w| w["status"]["candidates"].as_u64().expect("candidates")).sum();
    let scored = records(&run).values().filter(|r| r["items"].as_u64() > Some(0)).count() as u64;
    assert_eq!(done, scored, "no candidate scored twice: {}", v["workers"]);
    // a finished run's workers have left; a new worker is told there is nothing to do
    let (code, _, err) = crate::common::run(&["worker", "--broker", &r.url(), "--run", "scaled"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has finished"), "{err}");
}

#[test]
fn a_worker_killed_mid_candidate_loses_nothing() {
    let r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 12);
    let want = one_process(&exp, tmp.path());
    let run = tmp.path().join("killed-worker");
    let fast = [("EVOMERGE_RECLAIM_AFTER_MS", "800")];
    let coord = coordinator(&exp, &run, &r.url(), &fast);
    // a slow worker takes a candidate and is killed holding it; a second one takes it over
    let slow = worker(&r.url(), &[("EVOMERGE_WORKER_DELAY_MS", "60000")]);
    let slow_pid = slow.id();
    wait_until("the slow worker to hold a candidate", 120, || holders(&r, "killed-worker").iter().any(|c| c.contains(&format!("-{slow_pid}-"))));
    kill9(slow);
    let other = worker(&r.url(), &[]);
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    finish(other, 60);
    assert_same(&records(&run), &want, "a worker killed mid-candidate");
}

#[test]
fn a_candidate_that_kills_every_worker_it_meets_is_recorded_as_failed() {
    let r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 8);
    let run = tmp.path().join("poison");
    let coord = coordinator(&exp, &run, &r.url(), &[("EVOMERGE_RECLAIM_AFTER_MS", "300")]);
    // three workers in turn take the same candidate and die with it
    let mut first: Option<String> = None;
    for k in 0..3 {
        let w = worker(&r.url(), &[("EVOMERGE_WORKER_DELAY_MS", "60000")]);
        let pid = w.id();
        wait_until(&format!("worker {k} to hold a candidate"), 120, || holders(&r, "poison").iter().any(|c| c.contains(&format!("-{pid}-"))));
        let mut c = r.conn();
        let held: Vec<(String, String, u64, u64)> =
            redis::cmd("XPENDING").arg("evomerge:run:poison:tasks").arg("workers").arg("-").arg("+").arg(10).query(&mut c).expect("xpending");
        let entry = held.iter().find(|h| h.1.contains(&format!("-{pid}-"))).expect("held").0.clone();
        assert!(first.get_or_insert(entry.clone()) == &entry, "worker {k} took the same candidate");
        kill9(w);
        // past the reclaim time, the next worker takes the dead one's candidate first
        std::thread::sleep(Duration::from_millis(600));
    }
    // the fourth records it as failed, and the run goes on to its end
    let w = worker(&r.url(), &[]);
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    finish(w, 60);
    let recs = records(&run);
    assert_eq!(recs.len(), 8);
    let failed: Vec<&Value> = recs.values().filter(|r| r["failure"].is_string()).collect();
    assert_eq!(failed.len(), 1, "{recs:?}");
    assert!(failed[0]["failure"].as_str().expect("failure").contains("delivered to 3 workers"), "{:?}", failed[0]);
}

#[test]
fn a_killed_coordinator_resumes_on_the_broker_and_redis_may_restart_empty() {
    let mut r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 24);
    let want = one_process(&exp, tmp.path());
    let run = tmp.path().join("coord");
    let url = r.url();
    let workers: Vec<Child> = (0..2).map(|_| worker(&url, &[("EVOMERGE_WORKER_DELAY_MS", "30")])).collect();
    // the coordinator dies (kill -9) after a few records, and resumes with the workers still up
    let coord = coordinator(&exp, &run, &url, &[]);
    wait_until("4 records", 120, || records_len(&run) >= 4);
    kill9(coord);
    let resumed = spawn(&["resume", &run.display().to_string(), "--broker", &url, "--workers", "0"], &[]);
    // Redis loses everything mid-run: the coordinator publishes the run again
    wait_until("12 records", 120, || records_len(&run) >= 12);
    r.restart_empty();
    let (code, err) = finish(resumed, 300);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("published again"), "the coordinator saw the empty broker: {err}");
    for w in workers {
        let (code, err) = finish(w, 60);
        assert_eq!(code, Some(0), "worker: {err}");
    }
    assert_same(&records(&run), &want, "coordinator killed and resumed, Redis restarted empty");
}

#[test]
fn bad_broker_input_is_refused_with_exit_code_2() {
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 4);
    let exp = exp.display().to_string();
    let run_dir = tmp.path().join("r").display().to_string();
    // a scheme that is no broker
    let (code, _, err) = run(&["search", &exp, "--run-dir", &run_dir, "--broker", "http://127.0.0.1:1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown scheme 'http://'"), "{err}");
    // nothing listening
    let port = free_port();
    let (code, _, err) = run(&["worker", "--broker", &format!("redis://127.0.0.1:{port}")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("connection refused") || err.contains("Connection refused"), "{err}");
    // a wrong password, hidden in the message
    let r = Redis::start_on(free_port(), Some("right-one"));
    let (code, _, err) = run(&["worker", "--broker", &format!("redis://:wrong-one@127.0.0.1:{}", r.port)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("authentication failed") && !err.contains("wrong-one"), "{err}");
    // the right password works; a worker whose models differ from the run's is refused
    let coord = coordinator(Path::new(&exp), Path::new(&run_dir), &r.url(), &[]);
    let mut c = r.conn();
    wait_until("the run on the broker", 120, || redis::cmd("EXISTS").arg("evomerge:run:r:info").query::<bool>(&mut c).unwrap_or(false));
    let info: String = redis::cmd("GET").arg("evomerge:run:r:info").query(&mut c).expect("info");
    let mut info: Value = serde_json::from_str(&info).expect("info json");
    info["sources"] = Value::from("0000");
    info["run"] = Value::from("other");
    redis::cmd("SET").arg("evomerge:run:other:info").arg(info.to_string()).query::<()>(&mut c).expect("set");
    let (code, _, err) = run(&["worker", "--broker", &r.url(), "--run", "other"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("differ from the coordinator's"), "{err}");
    // two runs on the broker: a worker must be told which
    redis::cmd("SADD").arg("evomerge:runs").arg("other").query::<()>(&mut c).expect("sadd");
    let (code, _, err) = run(&["worker", "--broker", &r.url()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("choose one with --run"), "{err}");
    redis::cmd("SREM").arg("evomerge:runs").arg("other").query::<()>(&mut c).expect("srem");
    // a second coordinator on the same run directory is refused (the run's lock)
    let (code, _, err) = run(&["resume", &run_dir, "--broker", &r.url()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("in use by another evomerge process"), "{err}");
    let w = worker(&r.url(), &[]);
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    finish(w, 60);
}

/// `experiment` in asynchronous mode: steady-state NSGA-II.
fn async_experiment(dir: &Path, evaluations: u64) -> PathBuf {
    let exp = experiment(dir, evaluations);
    let text = std::fs::read_to_string(&exp).expect("read").replace("kind = \"cmaes\"", "kind = \"nsga2\"\nmode = \"async\"");
    std::fs::write(&exp, text).expect("write");
    exp
}

/// Record lines in file order (the order told), without timings.
fn lines(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("evaluations.jsonl")).expect("evaluations");
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("a whole JSON line");
            let o = v.as_object_mut().expect("object");
            o.remove("seconds");
            o.remove("materialize_seconds");
            v
        })
        .collect()
}

#[test]
fn asynchronous_runs_resume_exactly_after_kill_9_and_use_remote_workers() {
    let r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = async_experiment(tmp.path(), 24);
    let exp_s = exp.display().to_string();
    // two workers in one process: told a round at a time, a reproducible order; killed (-9)
    // and resumed, the same records in the same order
    let whole = tmp.path().join("whole");
    run_ok(&["search", &exp_s, "--run-dir", &whole.display().to_string(), "--workers", "2"]);
    let want = lines(&whole);
    assert_eq!(want.len(), 24);
    let killed = tmp.path().join("killed");
    let first = spawn(&["search", &exp_s, "--run-dir", &killed.display().to_string(), "--workers", "2"], &[]);
    wait_until("7 records", 120, || records_len(&killed) >= 7);
    kill9(first);
    run_ok(&["resume", &killed.display().to_string(), "--workers", "2"]);
    assert_eq!(lines(&killed), want, "async run killed and resumed");
    // through the broker, a remote worker with uneven candidate times and the coordinator's
    // own: killed (-9) and resumed, what was told is kept in its order, nothing is told twice
    let run = tmp.path().join("async-killed");
    let run_s = run.display().to_string();
    let slow = [("EVOMERGE_WORKER_DELAY_MS", "0-150")];
    let remote = worker(&r.url(), &slow);
    let first = spawn(&["search", &exp_s, "--run-dir", &run_s, "--broker", &r.url(), "--workers", "1"], &[]);
    wait_until("9 records", 120, || records_len(&run) >= 9);
    kill9(first);
    let before = lines(&run);
    let (code, err) = finish(spawn(&["resume", &run_s, "--broker", &r.url(), "--workers", "1"], &[("EVOMERGE_RECLAIM_AFTER_MS", "500")]), 300);
    assert_eq!(code, Some(0), "{err}");
    finish(remote, 60);
    let after = lines(&run);
    assert_eq!(&after[..before.len()], &before[..], "the records told before the kill stay, in order");
    let mut ids: Vec<u64> = after.iter().map(|v| v["id"].as_u64().expect("id")).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..24).collect::<Vec<u64>>(), "every candidate told once");
    // three remote workers: every candidate scored, the budget kept
    let remote_run = tmp.path().join("async-remote");
    let coord = coordinator(&exp, &remote_run, &r.url(), &[]);
    let workers: Vec<Child> = (0..3).map(|_| worker(&r.url(), &slow)).collect();
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    for w in workers {
        finish(w, 60);
    }
    let recs = records(&remote_run);
    assert_eq!(recs.keys().copied().collect::<Vec<u64>>(), (0..24).collect::<Vec<u64>>());
    assert!(recs.values().all(|r| r["objectives"].is_object()), "every candidate scored");
}

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (the TLS test makes its certificates with it)");
    assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn rediss_runs_over_tls_with_the_certificate_store_given() {
    // a CA and a server certificate for 127.0.0.1, a TLS-only redis-server
    let certs = tempfile::tempdir().expect("tmp");
    let d = certs.path();
    openssl(
        d,
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=evomerge-test-ca"],
    );
    openssl(d, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(d.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(d.join("server.crt"))
        .arg("--tls-key-file")
        .arg(d.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(d.join("ca.crt"))
        .arg("--dir")
        .arg(d)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    wait_until("the TLS port", 10, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 8);
    let want = one_process(&exp, tmp.path());
    let url = format!("rediss://localhost:{port}");
    // the CA is not in the system's store: refused, saying why
    let (code, _, err) = crate::common::run(&["worker", "--broker", &url]);
    assert_eq!(code, Some(2), "{err}");
    // with it (SSL_CERT_FILE), a coordinator and a worker run the search over TLS
    let ca = d.join("ca.crt").display().to_string();
    let env = [("SSL_CERT_FILE", ca.as_str())];
    let run = tmp.path().join("tls");
    let coord = coordinator(&exp, &run, &url, &env);
    let w = worker(&url, &env);
    let (code, err) = finish(coord, 300);
    assert_eq!(code, Some(0), "{err}");
    finish(w, 60);
    assert_same(&records(&run), &want, "over TLS");
    server.kill().ok();
    server.wait().ok();
}

#[test]
fn a_worker_drops_malformed_and_foreign_tasks_and_scores_its_run_s() {
    use evomerge_run::broker::{RunInfo, TaskMsg, sources_hash};
    let r = Redis::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let exp = experiment(tmp.path(), 4);
    let one = tmp.path().join("one-process");
    run_ok(&["search", &exp.display().to_string(), "--run-dir", &one.display().to_string(), "--workers", "1"]);
    let want = records(&one);
    // a run published by hand, as a coordinator would: its info and group
    let experiment = std::fs::read_to_string(one.join("config.resolved.toml")).expect("config");
    let fixtures = crate::common::fixtures().join("models");
    let sources: Vec<PathBuf> = ["llama-tiny-a", "llama-tiny-b", "llama-tiny-base"].iter().map(|m| fixtures.join(m)).collect();
    let info = RunInfo {
        run: "byhand".into(),
        coordinator: "test".into(),
        experiment,
        sources: sources_hash(&sources).expect("hash"),
        calibration: String::new(),
        reclaim_after_ms: 5000,
        finished: false,
    };
    let mut c = r.conn();
    let set = |c: &mut redis::Connection, info: &RunInfo| {
        redis::cmd("SET").arg("evomerge:run:byhand:info").arg(serde_json::to_string(info).expect("json")).query::<()>(c).expect("set");
    };
    set(&mut c, &info);
    redis::cmd("SADD").arg("evomerge:runs").arg("byhand").query::<()>(&mut c).expect("sadd");
    redis::cmd("XGROUP").arg("CREATE").arg("evomerge:run:byhand:tasks").arg("workers").arg("0").arg("MKSTREAM").query::<()>(&mut c).expect("group");
    let add = |c: &mut redis::Connection, msg: &str| {
        redis::cmd("XADD").arg("evomerge:run:byhand:tasks").arg("*").arg("msg").arg(msg).query::<String>(c).expect("xadd");
    };
    // garbage, a field that is not `msg`, another run's task, a genome that is not its fingerprint's
    add(&mut c, "not json at all");
    redis::cmd("XADD").arg("evomerge:run:byhand:tasks").arg("*").arg("other").arg("x").query::<String>(&mut c).expect("xadd");
    let genome = want[&0]["genome"].as_array().expect("genome").iter().map(|x| x.as_f64().expect("f64")).collect::<Vec<f64>>();
    let fingerprint: String = genome.iter().map(|x| format!("{:016x}", x.to_bits())).collect();
    let task = |run: &str, fp: &str| TaskMsg {
        run: run.into(),
        stage: "params".into(),
        id: 0,
        generation: 0,
        genome: genome.clone(),
        fingerprint: fp.into(),
    };
    add(&mut c, &serde_json::to_string(&task("other-run", &fingerprint)).expect("json"));
    add(&mut c, &serde_json::to_string(&task("byhand", "0123")).expect("json"));
    // and one real candidate: the one-process run's first
    add(&mut c, &serde_json::to_string(&task("byhand", &fingerprint)).expect("json"));
    let mut w = worker(&r.url(), &[]);
    wait_until("a result", 120, || {
        if w.try_wait().expect("wait").is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(w.stderr.as_mut().expect("stderr"), &mut err).ok();
            panic!("the worker ended early: {err}");
        }
        redis::cmd("XLEN").arg("evomerge:run:byhand:results").query::<u64>(&mut c).unwrap_or(0) >= 1
    });
    let mut finished = info.clone();
    finished.finished = true;
    set(&mut c, &finished);
    let (code, err) = finish(w, 60);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(err.matches("dropped").count(), 4, "{err}");
    let results: Vec<(String, Vec<(String, String)>)> =
        redis::cmd("XRANGE").arg("evomerge:run:byhand:results").arg("-").arg("+").query(&mut c).expect("xrange");
    assert_eq!(results.len(), 1, "only the run's own candidate is scored");
    let msg: Value = serde_json::from_str(&results[0].1[0].1).expect("result json");
    let mut got = msg["record"].clone();
    let o = got.as_object_mut().expect("object");
    o.remove("seconds");
    o.remove("materialize_seconds");
    assert_eq!(got, want[&0], "the worker's record is the one-process run's");
    // every entry was acknowledged: nothing left pending
    assert!(holders(&r, "byhand").is_empty());
}
