//! One engine of the restart storm (`benches/storm`): a real NIXL agent (UCX,
//! DRAM) that finds its peers only through nixl-etcd, and says what happens
//! to it as JSON lines on stdout. It runs until its stdin closes.
//!
//!   storm_engine prefill ENGINE [--blocks N] [--block-kib K] [--stale-pattern 1]
//!   storm_engine decode  ENGINE --prefills P0,P1,.. [--seed S] [--xfer-timeout-ms MS]
//!
//! A prefill fills its KV blocks with a pattern of its incarnation and
//! registers (layout + agent metadata) as one record, so a reader can never
//! pair a layout with another process's agent. With `--stale-pattern 1` it
//! serves the pattern of an incarnation it is not: every read of it must be
//! counted stale. It loads the agent of each decode that notifies it, and
//! releases it when that decode restarts or leaves.
//!
//! A decode sends requests without pause: it picks a prefill it sees alive,
//! loads its agent if needed, READs one block and checks every byte against
//! the pattern of the incarnation it loaded. A failed transfer makes it ask
//! etcd at once (`Client::recheck`): restarted -> reload and read again;
//! same incarnation or gone -> drop it (its requests fail until it is back).
//!
//! Lines: {"ev":"registered"|"waiting"|"req"|"load"|"drop"|"held"|"released", "t": ms
//! since the Unix epoch, ...}.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nixl_etcd::nixl::nixl_sys::{Agent, Backend, MemType, XferOp};
use nixl_etcd::{Client, Config, Event, EventKind, Status};
use serde_json::{json, Value};

#[path = "../benches/storm/shared.rs"]
mod shared;
use shared::{now_ms, Rng};

/// The layout before the agent metadata in a prefill's record: address,
/// block size, block count, little-endian u64 each.
const HEADER: usize = 24;

fn emit(mut line: Value) {
    line["t"] = json!(now_ms());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// FNV-1a of the incarnation: the seed of its pattern.
fn seed_of(incarnation: &str) -> u64 {
    incarnation.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Byte `i` of block `block` of the incarnation whose seed is `seed`.
fn pattern(seed: u64, block: usize, i: usize) -> u8 {
    ((seed >> ((i % 8) * 8)) as u8) ^ (i as u8).wrapping_mul(31) ^ (block as u8)
}

struct Args {
    role: String,
    engine: String,
    blocks: usize,
    block_bytes: usize,
    stale_pattern: bool,
    prefills: Vec<String>,
    seed: u64,
    xfer_timeout: Duration,
}

fn parse() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (role, engine) = match (argv.first(), argv.get(1)) {
        (Some(r), Some(e)) if r == "prefill" || r == "decode" => (r.clone(), e.clone()),
        _ => return Err("usage: storm_engine prefill|decode ENGINE [options]".into()),
    };
    let mut a = Args {
        role,
        engine,
        blocks: 16,
        block_bytes: 64 << 10,
        stale_pattern: false,
        prefills: Vec::new(),
        seed: 1,
        xfer_timeout: Duration::from_millis(1000),
    };
    let mut rest = argv[2..].iter();
    while let Some(flag) = rest.next() {
        let v = rest.next().ok_or(format!("{flag} needs a value"))?;
        let n = || v.parse::<u64>().map_err(|_| format!("bad {flag} {v}"));
        match flag.as_str() {
            "--blocks" => a.blocks = n()?.max(1) as usize,
            "--block-kib" => a.block_bytes = n()?.max(1) as usize * 1024,
            "--stale-pattern" => a.stale_pattern = n()? != 0,
            "--prefills" => a.prefills = v.split(',').map(str::to_owned).collect(),
            "--seed" => a.seed = n()?,
            "--xfer-timeout-ms" => a.xfer_timeout = Duration::from_millis(n()?),
            _ => return Err(format!("bad option {flag}")),
        }
    }
    Ok(a)
}

/// Set once stdin closes: the storm is over for this engine.
fn watch_stdin() -> Arc<AtomicBool> {
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    std::thread::spawn(move || {
        for _ in std::io::stdin().lock().lines() {}
        flag.store(true, Ordering::Release);
    });
    over
}

fn etcd_away(status: Status) -> bool {
    matches!(status, Status::ErrConnection | Status::ErrTimeout)
}

/// Retries `op` while etcd cannot answer (a restart during a quorum loss
/// waits for it, as a supervised engine would), saying so once.
fn until_etcd<T>(
    over: &AtomicBool,
    what: &str,
    mut op: impl FnMut() -> nixl_etcd::Result<T>,
) -> Result<T, String> {
    let mut said = false;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(e) if etcd_away(e.status) && !over.load(Ordering::Acquire) => {
                if !said {
                    emit(json!({"ev": "waiting", "what": what, "error": e.message}));
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

fn events(client: &Client) -> Result<mpsc::Receiver<Event>, String> {
    let (tx, rx) = mpsc::channel();
    client
        .subscribe(
            None,
            Box::new(move |ev: &Event| {
                let _ = tx.send(ev.clone());
            }),
        )
        .map_err(|e| e.to_string())?;
    Ok(rx)
}

fn prefill(a: &Args, client: &Client, over: &Arc<AtomicBool>) -> Result<(), String> {
    let agent =
        Agent::new(&format!("{}-{}", a.engine, std::process::id())).map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let inc = client.incarnation().to_owned();
    let seed = seed_of(&if a.stale_pattern {
        format!("not-{inc}")
    } else {
        inc.clone()
    });
    let total = a.blocks * a.block_bytes;
    let kv: Vec<u8> = (0..total)
        .map(|i| pattern(seed, i / a.block_bytes, i % a.block_bytes))
        .collect();
    let _reg = agent
        .register(MemType::Dram, &[(kv.as_ptr() as usize, total, 0)], &ucx)
        .map_err(|e| e.to_string())?;
    let mut record = Vec::with_capacity(HEADER);
    for v in [kv.as_ptr() as u64, a.block_bytes as u64, a.blocks as u64] {
        record.extend_from_slice(&v.to_le_bytes());
    }
    record.extend(agent.local_metadata().map_err(|e| e.to_string())?);
    let changes = events(client)?;
    until_etcd(over, "register", || client.register(&a.engine, 0, &record))?;
    emit(json!({"ev": "registered", "engine": a.engine, "inc": inc}));

    // Decode engine -> (its incarnation, its agent loaded here).
    let mut held: HashMap<String, (String, String)> = HashMap::new();
    let release = |held: &mut HashMap<String, (String, String)>, d: &str, why: &str| {
        if let Some((inc, name)) = held.remove(d) {
            let _ = agent.invalidate_remote(&name);
            emit(
                json!({"ev": "released", "engine": a.engine, "decode": d, "inc": inc, "why": why}),
            );
        }
    };
    while !over.load(Ordering::Acquire) {
        for ev in changes.try_iter() {
            let old = held.get(&ev.engine_id).map(|(i, _)| i.clone());
            match ev.kind {
                EventKind::Removed if old.as_deref() == Some(&ev.incarnation) => {
                    release(&mut held, &ev.engine_id, "removed")
                }
                EventKind::Replaced if old.is_some_and(|i| i != ev.incarnation) => {
                    release(&mut held, &ev.engine_id, "replaced")
                }
                _ => {}
            }
        }
        // "done DECODE INCARNATION" from each READ: hold that decode's agent.
        for n in agent.notifications().unwrap_or_default() {
            let msg = String::from_utf8_lossy(&n.message).into_owned();
            let mut parts = msg.split(' ');
            let (Some("done"), Some(d), Some(dinc)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if held.get(d).is_some_and(|(i, _)| i == dinc) {
                continue;
            }
            // Its record, from the cache: it registered before reading.
            let Ok(rec) = client.lookup(d, 0) else {
                continue;
            };
            if rec.record.incarnation != dinc {
                continue; // restarted since: its new incarnation will notify
            }
            release(&mut held, d, "replaced");
            if let Ok(name) = agent.load_remote_metadata(&rec.metadata) {
                held.insert(d.to_owned(), (dinc.to_owned(), name));
                emit(json!({"ev": "held", "engine": a.engine, "decode": d, "inc": dinc}));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// A prefill's agent loaded into the decode's.
struct Loaded {
    inc: String,
    name: String,
    addr: usize,
    block_bytes: usize,
    blocks: usize,
}

/// A prefill the decode stopped sending to: its transfer failed with etcd
/// still naming the same record (its process is gone while its lease runs
/// out), or its record was removed. Cleared by a newer record, or by the same
/// one outliving its lease TTL (its owner kept renewing: it is alive), which
/// a thread of its own asks etcd (the requests never wait for it).
struct Suspect {
    revision: i64,
}

/// Asks etcd, a TTL after each suspicion, whether the suspected record is
/// still there; sends back (prefill, revision) for each that is: alive.
/// A suspicion to check: (prefill, revision of its record, since when).
type Check = (String, i64, Instant);

fn checker(
    client: Client,
    ttl: Duration,
    over: Arc<AtomicBool>,
) -> (mpsc::Sender<Check>, mpsc::Receiver<(String, i64)>) {
    let (tx, rx) = mpsc::channel::<Check>();
    let (alive_tx, alive_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut queue = std::collections::VecDeque::new();
        while !over.load(Ordering::Acquire) {
            queue.extend(rx.try_iter());
            let Some((p, revision, since)) = queue.pop_front() else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let due = since + ttl + Duration::from_secs(1);
            if Instant::now() < due {
                queue.push_front((p, revision, since));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            match client.recheck(&p, 0) {
                Ok(r) if r.revision == revision => {
                    let _ = alive_tx.send((p, revision));
                }
                Ok(_) => {} // a newer record: its event clears it
                Err(e) if e.status == Status::ErrNotFound => {} // gone
                Err(_) => queue.push_back((p, revision, Instant::now())), // etcd away: later
            }
        }
    });
    (tx, alive_rx)
}

struct Decode<'a> {
    a: &'a Args,
    client: &'a Client,
    agent: &'a Agent,
    ucx: Backend,
    local: Vec<u8>,
    loaded: HashMap<String, Loaded>,
    /// Prefill -> revision of its record, from the events.
    view: HashMap<String, i64>,
    suspect: HashMap<String, Suspect>,
    checks: mpsc::Sender<Check>,
    rng: Rng,
    /// The incarnation the current request is for.
    target: Option<String>,
}

enum Failure {
    /// No record in etcd (or the cache), or one the decode knows is dead.
    EngineGone,
    /// etcd could not answer and the cache had nothing.
    EtcdUnavailable(String),
    /// The transfer failed under the request (the prefill died or stalled).
    Transfer(String),
    Other(String),
}

impl Decode<'_> {
    fn drop_remote(&mut self, p: &str, why: &str, invalidate: bool) {
        let inc = self.loaded.get(p).map(|l| l.inc.clone());
        if invalidate {
            if let Some(l) = self.loaded.remove(p) {
                let _ = self.agent.invalidate_remote(&l.name);
            }
        }
        if let Some(inc) = inc {
            emit(
                json!({"ev": "drop", "engine": self.a.engine, "prefill": p, "inc": inc, "why": why}),
            );
        }
    }

    fn apply(&mut self, ev: Event) {
        if !self.a.prefills.contains(&ev.engine_id) {
            return;
        }
        let p = ev.engine_id.as_str();
        let loaded_inc = self.loaded.get(p).map(|l| l.inc.clone());
        match ev.kind {
            EventKind::Removed => {
                self.view.remove(p);
                if loaded_inc.as_deref() == Some(&ev.incarnation) && !self.suspect.contains_key(p) {
                    // Kept loaded: a stalled engine comes back as itself.
                    self.drop_remote(p, "removed", false);
                }
            }
            _ => {
                self.view.insert(p.to_owned(), ev.revision);
                if self
                    .suspect
                    .get(p)
                    .is_some_and(|s| ev.revision > s.revision)
                {
                    self.suspect.remove(p);
                }
                if loaded_inc.is_some_and(|i| i != ev.incarnation) {
                    self.drop_remote(p, "replaced", true);
                }
            }
        }
    }

    /// Whether requests may go to `p` whose record has `revision`.
    fn usable(&mut self, p: &str, revision: i64) -> bool {
        match self.suspect.get(p) {
            Some(s) if s.revision >= revision => false,
            Some(_) => {
                self.suspect.remove(p);
                true
            }
            None => true,
        }
    }

    fn suspect(&mut self, p: &str, revision: i64) {
        self.suspect.insert(p.to_owned(), Suspect { revision });
        let _ = self.checks.send((p.to_owned(), revision, Instant::now()));
    }

    /// A prefill its record and the decode's suspicion allow, as the
    /// decode's events show them (no etcd call: etcd may be away); `None`
    /// when there is none.
    fn pick(&mut self) -> Option<String> {
        let mut alive: Vec<String> = self
            .view
            .iter()
            .filter(|(p, rev)| self.suspect.get(*p).is_none_or(|s| s.revision < **rev))
            .map(|(p, _)| p.clone())
            .collect();
        if alive.is_empty() {
            return None;
        }
        alive.sort();
        let i = self.rng.below(alive.len());
        Some(alive.swap_remove(i))
    }

    fn load(&mut self, p: &str, found: &nixl_etcd::Found) -> Result<(), Failure> {
        if self
            .loaded
            .get(p)
            .is_some_and(|l| l.inc == found.record.incarnation)
        {
            return Ok(());
        }
        if self.loaded.contains_key(p) {
            self.drop_remote(p, "replaced", true);
        }
        let md = &found.metadata;
        if md.len() < HEADER {
            return Err(Failure::Other(format!("{p}: record of {} bytes", md.len())));
        }
        let word = |i: usize| u64::from_le_bytes(md[i * 8..i * 8 + 8].try_into().unwrap()) as usize;
        // Fails when the agent cannot be reached (a dead prefill whose lease
        // runs on): the caller asks etcd, as for a failed transfer.
        let name = self
            .agent
            .load_remote_metadata(&md[HEADER..])
            .map_err(|e| Failure::Transfer(format!("load {p}: {e}")))?;
        emit(
            json!({"ev": "load", "engine": self.a.engine, "prefill": p, "inc": found.record.incarnation}),
        );
        self.loaded.insert(
            p.to_owned(),
            Loaded {
                inc: found.record.incarnation.clone(),
                name,
                addr: word(0),
                block_bytes: word(1),
                blocks: word(2),
            },
        );
        Ok(())
    }

    /// One READ of a random block of `p`, checked byte for byte: Ok(true)
    /// when every byte is the pattern of the loaded incarnation.
    fn read(&mut self, p: &str) -> Result<bool, (String, bool)> {
        let blocks = self.loaded[p].blocks as u64;
        let block = self.rng.below(blocks as usize);
        let l = &self.loaded[p];
        let bs = l.block_bytes.min(self.local.len());
        let (remote, addr, seed) = (
            l.name.clone(),
            l.addr + block * l.block_bytes,
            seed_of(&l.inc),
        );
        let note = format!("done {} {}", self.a.engine, self.client.incarnation());
        self.local[..bs].fill(0);
        let xfer = self
            .agent
            .transfer(
                XferOp::Read,
                (MemType::Dram, MemType::Dram),
                &[(self.local.as_mut_ptr() as usize, bs, 0)],
                &remote,
                &[(addr, bs, 0)],
                &self.ucx,
                Some(note.as_bytes()),
            )
            .map_err(|e| (e.to_string(), true))?;
        // Polled with short sleeps: eight engines share two cores.
        let deadline = Instant::now() + self.a.xfer_timeout;
        let mut done = xfer.post().map_err(|e| (e.to_string(), true))?;
        while !done {
            if Instant::now() >= deadline {
                return Err(("transfer timed out".into(), false));
            }
            std::thread::sleep(Duration::from_micros(50));
            done = xfer.done().map_err(|e| (e.to_string(), true))?;
        }
        drop(xfer);
        Ok(self.local[..bs]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern(seed, block, i)))
    }

    fn request(&mut self, p: &str) -> Result<(String, bool), Failure> {
        let found = match self.client.lookup(p, 0) {
            Ok(f) => f,
            Err(e) if e.status == Status::ErrNotFound => return Err(Failure::EngineGone),
            Err(e) if etcd_away(e.status) => return Err(Failure::EtcdUnavailable(e.message)),
            Err(e) => return Err(Failure::Other(e.to_string())),
        };
        self.target = Some(found.record.incarnation.clone());
        if !self.usable(p, found.revision) {
            return Err(Failure::EngineGone);
        }
        if let Err(f) = self.load(p, &found) {
            let Failure::Transfer(e) = f else {
                return Err(f);
            };
            self.after_failure(p, &found, &e, true)?;
        }
        let inc = found.record.incarnation.clone();
        match self.read(p) {
            Ok(good) => return Ok((inc, good)),
            Err((e, hard)) => self.after_failure(p, &found, &e, hard)?,
        }
        self.target = Some(self.loaded[p].inc.clone());
        // Restarted under the request: read the new incarnation once.
        let inc = self.loaded[p].inc.clone();
        self.read(p)
            .map(|good| (inc, good))
            .map_err(|(e, _)| Failure::Transfer(e))
    }

    /// A transfer to `p` failed: ask etcd now instead of waiting for the
    /// lease. Ok when it restarted and the new incarnation is loaded.
    fn after_failure(
        &mut self,
        p: &str,
        found: &nixl_etcd::Found,
        error: &str,
        hard: bool,
    ) -> Result<(), Failure> {
        match self.client.recheck(p, 0) {
            Ok(now) if now.record.incarnation != found.record.incarnation => {
                self.drop_remote(p, "restarted", true);
                self.load(p, &now)
            }
            Ok(now) => {
                self.suspect(p, now.revision);
                self.drop_remote(p, "transport", hard);
                Err(Failure::Transfer(error.to_owned()))
            }
            Err(e) => {
                let gone = e.status == Status::ErrNotFound;
                self.suspect(p, found.revision);
                // Kept loaded after a timeout: a stalled engine whose lease ran
                // out comes back as itself.
                self.drop_remote(p, if gone { "gone" } else { "transport" }, hard);
                Err(Failure::Transfer(error.to_owned()))
            }
        }
    }
}

fn decode(a: &Args, client: &Client, over: &Arc<AtomicBool>) -> Result<(), String> {
    if a.prefills.is_empty() {
        return Err("decode needs --prefills".into());
    }
    let agent =
        Agent::new(&format!("{}-{}", a.engine, std::process::id())).map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let mut local = vec![0u8; a.block_bytes];
    let _reg = agent
        .register(
            MemType::Dram,
            &[(local.as_mut_ptr() as usize, local.len(), 0)],
            &ucx,
        )
        .map_err(|e| e.to_string())?;
    let changes = events(client)?;
    let md = agent.local_metadata().map_err(|e| e.to_string())?;
    until_etcd(over, "register", || client.register(&a.engine, 0, &md))?;
    let inc = client.incarnation().to_owned();
    emit(json!({"ev": "registered", "engine": a.engine, "inc": inc}));
    let ttl = Duration::from_secs(client.config().lease_ttl_s.max(1) as u64);
    let (checks, alive) = checker(client.clone(), ttl, over.clone());
    let mut d = Decode {
        a,
        client,
        agent: &agent,
        ucx,
        local,
        loaded: HashMap::new(),
        view: HashMap::new(),
        suspect: HashMap::new(),
        checks,
        rng: Rng(a.seed ^ seed_of(&inc)),
        target: None,
    };
    while !over.load(Ordering::Acquire) {
        for ev in changes.try_iter() {
            d.apply(ev);
        }
        for (p, revision) in alive.try_iter() {
            if d.suspect.get(&p).is_some_and(|s| s.revision == revision) {
                d.suspect.remove(&p);
            }
        }
        let started = Instant::now();
        d.target = None;
        let (p, outcome) = match d.pick() {
            Some(p) => {
                let r = d.request(&p);
                (p, r)
            }
            None => (String::new(), Err(Failure::EngineGone)),
        };
        let mut line = json!({"ev": "req", "engine": a.engine, "prefill": p});
        match outcome {
            Ok((pinc, good)) => {
                line["ok"] = json!(good);
                line["inc"] = json!(pinc);
                line["stale"] = json!(!good);
            }
            Err(f) => {
                let (cause, detail) = match f {
                    Failure::EngineGone => ("engine_gone", String::new()),
                    Failure::EtcdUnavailable(e) => ("etcd_unavailable", e),
                    Failure::Transfer(e) => ("transfer", e),
                    Failure::Other(e) => ("other", e),
                };
                line["ok"] = json!(false);
                line["cause"] = json!(cause);
                line["detail"] = json!(detail);
                if let Some(inc) = d.target.take() {
                    line["inc"] = json!(inc);
                }
            }
        }
        line["ms"] = json!(started.elapsed().as_secs_f64() * 1e3);
        // Failed without a transfer (nothing alive, etcd away): do not spin.
        let pause = line["ok"] == json!(false) && line["cause"] != json!("transfer");
        emit(line);
        if pause {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("storm_engine: {e}");
            return ExitCode::from(2);
        }
    };
    let over = watch_stdin();
    let result = Config::load(None)
        .map_err(|e| e.to_string())
        .and_then(|cfg| until_etcd(&over, "open", || Client::open(cfg.clone())))
        .and_then(|client| {
            let r = match a.role.as_str() {
                "prefill" => prefill(&a, &client, &over),
                _ => decode(&a, &client, &over),
            };
            let _ = client.close();
            r
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storm_engine {} {}: {e}", a.role, a.engine);
            ExitCode::FAILURE
        }
    }
}
