//! The restart storm, shared by the benchmark (`benches/storm/main.rs`) and
//! its CI test (`tests/storm.rs`): a 3-member etcd cluster, P prefill and D
//! decode engines (`examples/storm_engine.rs`, real NIXL agents), and a
//! seeded schedule of faults, while the decodes send requests without pause.
//! Everything is read from the engines' JSON lines into one [`Report`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{unique_namespace, EtcdCluster};
use crate::shared::{now_ms, Rng};

pub struct Options {
    pub seconds: f64,
    pub seed: u64,
    pub prefills: usize,
    pub decodes: usize,
    /// The engines' lease TTL (VLLM_NIXL_ETCD_LEASE_TTL).
    pub ttl_s: u64,
    /// How long etcd has no quorum (two of three members down).
    pub quorum_loss_s: f64,
    /// Pause between two engine kills: uniform in this range.
    pub kill_every_s: (f64, f64),
    /// The stall, the leader kill and the quorum loss (engine kills follow
    /// `kill_every_s`).
    pub etcd_and_stall_faults: bool,
    /// How long the fleet has after the storm to serve every pair again.
    pub settle_limit_s: f64,
    /// Prefill 0 serves the pattern of an incarnation it is not (every read
    /// of it must be counted stale).
    pub stale_prefill: bool,
    /// The engine program (`examples/storm_engine`).
    pub engine: PathBuf,
}

impl Options {
    pub fn new(seconds: f64, seed: u64) -> Options {
        Options {
            seconds,
            seed,
            prefills: 4,
            decodes: 4,
            ttl_s: 3,
            quorum_loss_s: 15.0,
            kill_every_s: (2.0, 5.0),
            etcd_and_stall_faults: true,
            settle_limit_s: 40.0,
            stale_prefill: false,
            engine: engine_program(),
        }
    }
}

/// `target/<profile>/examples/storm_engine`, beside the running test or bench.
pub fn engine_program() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    profile.join("examples/storm_engine")
}

/// What one storm did, from the engines' own lines.
#[derive(Default)]
pub struct Report {
    pub seconds: f64,
    pub seed: u64,
    pub requests: u64,
    pub ok: u64,
    /// How long each request took at its decode (pick, load if needed, READ,
    /// check): the pace at which a decode notices anything.
    pub request_ms: Vec<f64>,
    /// By cause: `in_flight_on_killed` (the transfer failed under a request
    /// because its prefill was killed or stopped), `engine_gone` (no live
    /// prefill to send to), `etcd_unavailable` (etcd could not answer and the
    /// cache had nothing), `transfer_unexplained` (a transfer failed to an
    /// engine nobody hurt), `other`.
    pub failed: BTreeMap<String, u64>,
    pub stale_transfers: u64,
    /// From a prefill's SIGKILL to each decode that had it loaded dropping it.
    pub detection_ms: Vec<f64>,
    /// How those decodes learned it: transport error, etcd event, ...
    pub detected_by: BTreeMap<String, u64>,
    /// From a restarted engine's registration to its first good transfer.
    pub recovery_ms: Vec<f64>,
    /// Restarted engines that never transferred before the end.
    pub unrecovered: u64,
    pub quorum_loss: QuorumWindow,
    pub kills: u64,
    pub stalls: u64,
    /// Requests served by a stalled prefill after its SIGCONT (it came back
    /// as itself), and how many times a decode process that had loaded it
    /// loaded it again (its peers should keep their agents).
    pub served_after_stall: u64,
    pub reloads_after_stall: u64,
    pub leader_kills: u64,
    /// Living (decode, prefill) pairs with no good transfer in the settle
    /// time after the storm, and the engines all of whose pairs failed.
    pub unserved_pairs: u64,
    pub manual_restarts: u64,
    /// Decode incarnations a prefill still held at the end though they were
    /// not the decode's living one.
    pub stale_holds: u64,
    pub settle_s: f64,
}

#[derive(Default)]
pub struct QuorumWindow {
    pub seconds: f64,
    pub requests: u64,
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
}

pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(((s.len() - 1) as f64) * p).round() as usize]
}

impl Report {
    pub fn to_json(&self) -> Value {
        let num = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
        json!({
            "seconds": self.seconds,
            "seed": self.seed,
            "requests": self.requests,
            "ok": self.ok,
            "request_ms_p50": num(percentile(&self.request_ms, 0.5)),
            "request_ms_p99": num(percentile(&self.request_ms, 0.99)),
            "failed": self.failed,
            "stale_transfers": self.stale_transfers,
            "detection_ms_p50": num(percentile(&self.detection_ms, 0.5)),
            "detection_ms_p99": num(percentile(&self.detection_ms, 0.99)),
            "detection_samples": self.detection_ms.len(),
            "detected_by": self.detected_by,
            "recovery_ms_p50": num(percentile(&self.recovery_ms, 0.5)),
            "recovery_ms_p99": num(percentile(&self.recovery_ms, 0.99)),
            "recovery_samples": self.recovery_ms.len(),
            "unrecovered": self.unrecovered,
            "quorum_loss": {
                "seconds": self.quorum_loss.seconds,
                "requests": self.quorum_loss.requests,
                "ok": self.quorum_loss.ok,
                "failed": self.quorum_loss.failed,
            },
            "kills": self.kills,
            "stalls": self.stalls,
            "served_after_stall": self.served_after_stall,
            "reloads_after_stall": self.reloads_after_stall,
            "leader_kills": self.leader_kills,
            "unserved_pairs": self.unserved_pairs,
            "manual_restarts": self.manual_restarts,
            "stale_holds": self.stale_holds,
            "settle_s": self.settle_s,
        })
    }

    /// Failures other than those the storm causes by design.
    pub fn unexpected_failures(&self) -> u64 {
        self.failed
            .iter()
            .filter(|(cause, _)| !matches!(cause.as_str(), "in_flight_on_killed" | "engine_gone"))
            .map(|(_, n)| n)
            .sum()
    }
}

/// One engine process and what the storm did to it.
struct Engine {
    name: String,
    prefill: bool,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    /// Its current process's incarnation, once registered.
    inc: Option<String>,
    /// Restart it at this time (it was killed).
    restart_at: Option<Instant>,
    /// SIGCONT it at this time (it is stopped).
    resume_at: Option<Instant>,
    generation: u32,
}

type Line = (String, u32, Value);

struct Storm<'a> {
    o: &'a Options,
    cluster: EtcdCluster,
    ns: String,
    logs: tempfile::TempDir,
    engines: Vec<Engine>,
    tx: mpsc::Sender<Line>,
    rx: mpsc::Receiver<Line>,
    lines: Vec<Line>,
    /// When each prefill incarnation was killed or stopped: (from, to) ms;
    /// a stall ends a little after its SIGCONT, a kill never.
    hurt: HashMap<String, Vec<(f64, f64)>>,
    /// (prefill, incarnation, kill time) of every prefill SIGKILL.
    prefill_kills: Vec<(String, String, f64)>,
    /// (engine, generation, incarnation, registration time) of restarts.
    restarts: Vec<(String, u32, String, f64)>,
    /// Engine processes killed, by (name, generation).
    killed: HashSet<(String, u32)>,
    /// The stalled prefill's incarnation, and when it was resumed (ms).
    stalled: Option<(String, f64)>,
    report: Report,
}

impl Storm<'_> {
    fn spawn(&mut self, i: usize) {
        let o = self.o;
        let prefills: Vec<String> = (0..o.prefills).map(|p| format!("prefill-{p}")).collect();
        let e = &mut self.engines[i];
        e.generation += 1;
        let mut cmd = Command::new(&o.engine);
        if e.prefill {
            cmd.args(["prefill", &e.name]);
            if o.stale_prefill && e.name == "prefill-0" {
                cmd.args(["--stale-pattern", "1"]);
            }
        } else {
            cmd.args(["decode", &e.name, "--prefills", &prefills.join(",")]);
            cmd.args([
                "--seed",
                &(o.seed ^ u64::from(e.generation) << 8 ^ i as u64).to_string(),
            ]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.path().join(format!("{}.log", e.name)))
            .expect("engine log");
        cmd.env("VLLM_NIXL_ETCD_ENDPOINTS", self.cluster.endpoints())
            .env("VLLM_NIXL_ETCD_NAMESPACE", &self.ns)
            .env("VLLM_NIXL_ETCD_LEASE_TTL", o.ttl_s.to_string())
            .env("VLLM_NIXL_ETCD_TIMEOUT", "2")
            .env_remove("NIXL_ETCD_ENDPOINTS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", o.engine.display()));
        let out = child.stdout.take().expect("piped stdout");
        e.stdin = child.stdin.take();
        e.child = Some(child);
        e.inc = None;
        let (tx, name, generation) = (self.tx.clone(), e.name.clone(), e.generation);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((name.clone(), generation, v));
                }
            }
        });
    }

    /// What the storm did, among the engines' lines (for the kept logs).
    fn note(&mut self, mut v: Value) {
        v["t"] = json!(now_ms());
        self.lines.push(("storm".into(), 0, v));
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        if let Some(c) = &self.engines[i].child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    fn kill(&mut self, i: usize, restart_in: f64) {
        let t = now_ms();
        self.signal(i, libc::SIGKILL);
        let e = &mut self.engines[i];
        if let Some(mut c) = e.child.take() {
            let _ = c.wait();
        }
        e.stdin = None;
        e.restart_at = Some(Instant::now() + Duration::from_secs_f64(restart_in));
        let (name, prefill, inc) = (e.name.clone(), e.prefill, e.inc.take());
        self.killed.insert((name.clone(), e.generation));
        self.note(json!({"ev": "kill", "engine": name, "inc": inc}));
        if let (true, Some(inc)) = (prefill, inc) {
            self.hurt
                .entry(inc.clone())
                .or_default()
                .push((t, f64::INFINITY));
            self.prefill_kills.push((name, inc, t));
        }
        self.report.kills += 1;
    }

    fn running(&self, i: usize) -> bool {
        let e = &self.engines[i];
        e.child.is_some() && e.resume_at.is_none()
    }

    /// Reads what the engines said until `until`, and does what is due.
    fn pump(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            for i in 0..self.engines.len() {
                if self.engines[i].restart_at.is_some_and(|t| t <= now) {
                    self.engines[i].restart_at = None;
                    self.spawn(i);
                }
                if self.engines[i].resume_at.is_some_and(|t| t <= now) {
                    self.engines[i].resume_at = None;
                    self.signal(i, libc::SIGCONT);
                }
            }
            let left = until.saturating_duration_since(now);
            if left.is_zero() {
                return;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(20))) {
                Ok(line) => self.take(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
            }
        }
    }

    fn take(&mut self, (name, generation, v): Line) {
        if v["ev"] == "registered" {
            if let Some(e) = self
                .engines
                .iter_mut()
                .find(|e| e.name == name && e.generation == generation)
            {
                let inc = v["inc"].as_str().unwrap_or_default().to_owned();
                e.inc = Some(inc.clone());
                if generation > 1 {
                    let t = v["t"].as_f64().unwrap_or_default();
                    self.restarts.push((name.clone(), generation, inc, t));
                }
            }
        }
        self.lines.push((name, generation, v));
    }

    fn leader(&mut self) -> usize {
        self.cluster
            .wait_leader(Duration::from_secs(30))
            .expect("the etcd cluster has a leader")
    }
}

/// Runs one storm and reports it. Panics only when the harness itself cannot
/// run (etcd or the engine program missing).
pub fn run(o: &Options) -> Report {
    assert!(
        o.engine.exists(),
        "{} is missing: build it with `cargo build --release --features nixl --example \
         storm_engine`",
        o.engine.display()
    );
    let (tx, rx) = mpsc::channel();
    let mut engines = Vec::new();
    for p in 0..o.prefills {
        engines.push((format!("prefill-{p}"), true));
    }
    for d in 0..o.decodes {
        engines.push((format!("decode-{d}"), false));
    }
    let mut s = Storm {
        o,
        cluster: EtcdCluster::start(3),
        ns: unique_namespace("storm"),
        logs: tempfile::Builder::new()
            .prefix("nixl-etcd-storm-")
            .tempdir()
            .expect("temp dir"),
        engines: engines
            .into_iter()
            .map(|(name, prefill)| Engine {
                name,
                prefill,
                child: None,
                stdin: None,
                inc: None,
                restart_at: None,
                resume_at: None,
                generation: 0,
            })
            .collect(),
        tx,
        rx,
        lines: Vec::new(),
        hurt: HashMap::new(),
        prefill_kills: Vec::new(),
        restarts: Vec::new(),
        killed: HashSet::new(),
        stalled: None,
        report: Report {
            seconds: o.seconds,
            seed: o.seed,
            ..Default::default()
        },
    };
    for i in 0..s.engines.len() {
        s.spawn(i);
    }
    // Everyone registered before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.engines.iter().any(|e| e.inc.is_none()) && Instant::now() < deadline {
        s.pump(Instant::now() + Duration::from_millis(50));
    }
    let first_line = s.lines.len();
    let storm_started = Instant::now();
    let at = |f: f64| storm_started + Duration::from_secs_f64(o.seconds * f);
    let end = at(1.0);
    let mut rng = Rng(o.seed);
    let stall_at = at(0.2);
    let leader_at = at(0.4);
    let quorum_at = at(0.55);
    let quiet = !o.etcd_and_stall_faults;
    let (mut stalled, mut leader_killed, mut quorum_lost) = (quiet, quiet, quiet);
    let mut quorum_ms = (0.0, 0.0);
    let mut next_kill = storm_started + Duration::from_secs_f64(rng.uniform(o.kill_every_s));
    let n = s.engines.len();
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_kill {
            // A running engine; prefills more often than decodes.
            let pool: Vec<usize> = (0..n).filter(|&i| s.running(i)).collect();
            if !pool.is_empty() {
                let prefer = rng.below(5) < 3;
                let side: Vec<usize> = pool
                    .iter()
                    .copied()
                    .filter(|&i| s.engines[i].prefill == prefer)
                    .collect();
                let from = if side.is_empty() { &pool } else { &side };
                let i = from[rng.below(from.len())];
                s.kill(i, rng.uniform((0.3, 1.5)));
            }
            next_kill = now + Duration::from_secs_f64(rng.uniform(o.kill_every_s));
        }
        if !stalled && now >= stall_at {
            stalled = true;
            // A stall longer than the TTL: its lease is lost meanwhile.
            let pool: Vec<usize> = (0..o.prefills).filter(|&i| s.running(i)).collect();
            if !pool.is_empty() {
                let i = pool[rng.below(pool.len())];
                s.signal(i, libc::SIGSTOP);
                let stall = o.ttl_s as f64 + 2.0;
                if let Some(inc) = s.engines[i].inc.clone() {
                    // Transfers time out up to a second after the SIGCONT.
                    let t = now_ms();
                    let window = (t, t + (stall + 2.0) * 1e3);
                    s.hurt.entry(inc.clone()).or_default().push(window);
                    s.note(json!({"ev": "stop", "engine": s.engines[i].name, "inc": inc}));
                    s.stalled = Some((inc, t + stall * 1e3));
                }
                s.engines[i].resume_at = Some(now + Duration::from_secs_f64(stall));
                s.report.stalls += 1;
            }
        }
        if !leader_killed && now >= leader_at {
            leader_killed = true;
            let l = s.leader();
            s.cluster.kill(l);
            s.note(json!({"ev": "etcd_leader_kill", "member": l}));
            s.pump(Instant::now() + Duration::from_secs(2));
            s.cluster.restart_no_wait(l);
            s.report.leader_kills += 1;
        }
        if !quorum_lost && now >= quorum_at {
            quorum_lost = true;
            let l = s.leader();
            let other = (l + 1 + rng.below(2)) % 3;
            s.cluster.kill(l);
            s.cluster.kill(other);
            s.note(json!({"ev": "quorum_lost", "members": [l, other]}));
            quorum_ms.0 = now_ms();
            // Kills and restarts go on without etcd.
            let back = Instant::now() + Duration::from_secs_f64(o.quorum_loss_s);
            while Instant::now() < back {
                let step = (Instant::now() + Duration::from_millis(200)).min(back);
                s.pump(step);
                if Instant::now() >= next_kill {
                    let pool: Vec<usize> = (0..n).filter(|&i| s.running(i)).collect();
                    if !pool.is_empty() {
                        let i = pool[rng.below(pool.len())];
                        s.kill(i, rng.uniform((0.3, 1.5)));
                    }
                    next_kill =
                        Instant::now() + Duration::from_secs_f64(rng.uniform(o.kill_every_s));
                }
            }
            quorum_ms.1 = now_ms();
            s.cluster.restart_no_wait(l);
            s.cluster.restart_no_wait(other);
            s.note(json!({"ev": "quorum_back"}));
        }
        s.pump((Instant::now() + Duration::from_millis(50)).min(end));
    }
    // The storm is over: every engine runs again, and must serve with nobody
    // touching it.
    let _ = s.cluster.wait_all_healthy();
    for i in 0..n {
        if s.engines[i].child.is_none() {
            s.engines[i].restart_at = None;
            s.spawn(i);
        }
        if s.engines[i].resume_at.take().is_some() {
            s.signal(i, libc::SIGCONT);
        }
    }
    let settle_started = now_ms();
    let settle = Instant::now();
    let limit = Duration::from_secs_f64(o.settle_limit_s);
    while settle.elapsed() < limit && !settled(&s, settle_started).healed() {
        s.pump(Instant::now() + Duration::from_millis(200));
    }
    s.report.settle_s = settle.elapsed().as_secs_f64();
    let end_state = settled(&s, settle_started);
    s.report.unserved_pairs = end_state.unserved.len() as u64;
    s.report.manual_restarts = end_state.broken_engines();
    s.report.stale_holds = end_state.stale_holds;
    // What the engines say while they exit is not the storm's.
    while let Ok(line) = s.rx.try_recv() {
        s.take(line);
    }
    let last_line = s.lines.len();
    // Engines end when their stdin closes.
    for e in s.engines.iter_mut() {
        e.stdin = None;
    }
    let bye = Instant::now() + Duration::from_secs(10);
    for e in s.engines.iter_mut() {
        if let Some(mut c) = e.child.take() {
            while Instant::now() < bye && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    while let Ok(line) = s.rx.try_recv() {
        s.take(line);
    }
    tally(&mut s, first_line..last_line, quorum_ms);
    if std::env::var_os("NIXL_ETCD_STORM_KEEP_LOGS").is_some() {
        let all: String = s
            .lines
            .iter()
            .map(|(name, generation, v)| format!("{name} {generation} {v}\n"))
            .collect();
        let _ = std::fs::write(s.logs.path().join("lines.txt"), all);
        eprintln!("storm: engine logs kept in {}", s.logs.keep().display());
    }
    s.report
}

/// Where the fleet stands after the storm.
struct EndState {
    /// (decode, prefill) living pairs with no good transfer since the settle.
    unserved: Vec<(String, String)>,
    stale_holds: u64,
    decodes: usize,
    prefills: usize,
}

impl EndState {
    fn healed(&self) -> bool {
        self.unserved.is_empty() && self.stale_holds == 0
    }

    /// Engines that served nothing at all: what an operator would restart.
    fn broken_engines(&self) -> u64 {
        let mut by_engine: HashMap<&str, usize> = HashMap::new();
        for (d, p) in &self.unserved {
            *by_engine.entry(d).or_default() += 1;
            *by_engine.entry(p).or_default() += 1;
        }
        // A decode unserved with every prefill, or a prefill with every decode.
        by_engine
            .iter()
            .filter(|(e, n)| {
                let pairs = if e.starts_with("decode") {
                    self.prefills
                } else {
                    self.decodes
                };
                **n >= pairs
            })
            .count() as u64
    }
}

fn settled(s: &Storm, since_ms: f64) -> EndState {
    let current: HashMap<&str, &str> = s
        .engines
        .iter()
        .filter_map(|e| Some((e.name.as_str(), e.inc.as_deref()?)))
        .collect();
    let mut served: HashSet<(&str, &str)> = HashSet::new();
    // Prefill -> decode -> held incarnation.
    let mut holds: HashMap<&str, HashMap<&str, &str>> = HashMap::new();
    for (name, _, v) in &s.lines {
        let t = v["t"].as_f64().unwrap_or_default();
        match v["ev"].as_str() {
            Some("req") if v["ok"] == true && t >= since_ms => {
                let p = v["prefill"].as_str().unwrap_or_default();
                if current.get(p).copied() == v["inc"].as_str() {
                    served.insert((name.as_str(), p));
                }
            }
            Some("held") => {
                let (d, inc) = (v["decode"].as_str(), v["inc"].as_str());
                if let (Some(d), Some(inc)) = (d, inc) {
                    holds.entry(name.as_str()).or_default().insert(d, inc);
                }
            }
            Some("released") => {
                let (d, inc) = (v["decode"].as_str(), v["inc"].as_str());
                if let Some(h) = holds.get_mut(name.as_str()) {
                    if h.get(d.unwrap_or_default()).copied() == inc {
                        h.remove(d.unwrap_or_default());
                    }
                }
            }
            Some("registered")
                if v["engine"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("prefill")) =>
            {
                // A new process holds nothing.
                holds.remove(name.as_str());
            }
            _ => {}
        }
    }
    let names = |prefill: bool| -> Vec<&str> {
        s.engines
            .iter()
            .filter(|e| e.prefill == prefill)
            .map(|e| e.name.as_str())
            .collect()
    };
    let (ps, ds) = (names(true), names(false));
    let unserved = ds
        .iter()
        .flat_map(|d| ps.iter().map(move |p| (*d, *p)))
        .filter(|pair| !served.contains(pair))
        .map(|(d, p)| (d.to_owned(), p.to_owned()))
        .collect();
    let stale_holds = holds
        .values()
        .flat_map(|h| h.iter())
        .filter(|(d, inc)| current.get(*d) != Some(inc))
        .count() as u64;
    EndState {
        unserved,
        stale_holds,
        decodes: ds.len(),
        prefills: ps.len(),
    }
}

fn tally(s: &mut Storm, storm: std::ops::Range<usize>, quorum_ms: (f64, f64)) {
    let r = &mut s.report;
    r.quorum_loss.seconds = (quorum_ms.1 - quorum_ms.0) / 1e3;
    // (decode, prefill, incarnation, time, why), in time order per decode.
    let mut drops: Vec<(&str, &str, &str, f64, &str)> = Vec::new();
    // First good transfer per prefill incarnation, and per decode process.
    let mut first_ok_prefill: HashMap<&str, f64> = HashMap::new();
    let mut first_ok_decode: HashMap<(&str, u32), f64> = HashMap::new();
    let mut loads: HashSet<(&str, u32, &str)> = HashSet::new();
    for (name, generation, v) in &s.lines[storm] {
        let t = v["t"].as_f64().unwrap_or_default();
        match v["ev"].as_str() {
            Some("req") => {
                r.requests += 1;
                r.request_ms.push(v["ms"].as_f64().unwrap_or_default());
                let in_quorum_loss = t >= quorum_ms.0 && t <= quorum_ms.1;
                if in_quorum_loss {
                    r.quorum_loss.requests += 1;
                }
                let inc = v["inc"].as_str().unwrap_or_default();
                if v["ok"] == true {
                    r.ok += 1;
                    if in_quorum_loss {
                        r.quorum_loss.ok += 1;
                    }
                    first_ok_prefill.entry(inc).or_insert(t);
                    if s.stalled
                        .as_ref()
                        .is_some_and(|(i, back)| i == inc && t > *back)
                    {
                        r.served_after_stall += 1;
                    }
                    first_ok_decode
                        .entry((name.as_str(), *generation))
                        .or_insert(t);
                    continue;
                }
                if v["stale"] == true {
                    r.stale_transfers += 1;
                }
                let began = t - v["ms"].as_f64().unwrap_or_default();
                let cause = match v["cause"].as_str() {
                    None if v["stale"] == true => "stale",
                    // A transfer (or the load before it) failed: fine only
                    // when its prefill was hurt, before the request (it
                    // needed an engine that is gone) or during it.
                    Some("transfer") => {
                        let windows = s.hurt.get(inc).map_or(&[][..], Vec::as_slice);
                        let hurt = windows
                            .iter()
                            .find(|(from, to)| *from <= t + 50.0 && began <= *to);
                        match hurt {
                            Some((from, _)) if *from <= began => "engine_gone",
                            Some(_) => "in_flight_on_killed",
                            None => "transfer_unexplained",
                        }
                    }
                    Some(c) => c,
                    None => "other",
                };
                *r.failed.entry(cause.to_owned()).or_default() += 1;
                if in_quorum_loss {
                    *r.quorum_loss.failed.entry(cause.to_owned()).or_default() += 1;
                }
            }
            Some("load") => {
                // A decode process loading the stalled prefill a second time.
                let inc = v["inc"].as_str().unwrap_or_default();
                let first = loads.insert((name.as_str(), *generation, inc));
                if !first && s.stalled.as_ref().is_some_and(|(i, _)| i == inc) {
                    r.reloads_after_stall += 1;
                }
            }
            Some("drop") => drops.push((
                name.as_str(),
                v["prefill"].as_str().unwrap_or_default(),
                v["inc"].as_str().unwrap_or_default(),
                t,
                v["why"].as_str().unwrap_or_default(),
            )),
            _ => {}
        }
    }
    // Each decode's first drop of a killed incarnation after the kill.
    for (p, inc, killed) in &s.prefill_kills {
        let mut seen = HashSet::new();
        for (d, dp, dinc, t, why) in &drops {
            if dp == p && dinc == inc && t >= killed && seen.insert(*d) {
                r.detection_ms.push(t - killed);
                *r.detected_by.entry((*why).to_owned()).or_default() += 1;
            }
        }
    }
    for (name, generation, inc, registered) in &s.restarts {
        let first = if name.starts_with("prefill") {
            first_ok_prefill.get(inc.as_str())
        } else {
            first_ok_decode.get(&(name.as_str(), *generation))
        };
        match first {
            Some(t) => r.recovery_ms.push((t - registered).max(0.0)),
            // Killed again before it served: nothing to recover.
            None if s.killed.contains(&(name.clone(), *generation)) => {}
            None => r.unrecovered += 1,
        }
    }
}
