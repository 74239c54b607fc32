//! Fleet start-up: E prefill engines and E decode engines of TP ranks each,
//! every rank with its own client, all in this process and all released at
//! once. Each prefill rank opens its client and registers an 8 KiB blob; each
//! decode rank opens its client and waits for its target rank of every
//! prefill engine, checking every byte. Measured per size: the time until
//! the last decode rank has all of its targets, the etcd requests each client
//! issued, and the resident memory each client added.
//!
//! Clients are opened from a pool of OS threads (each handles many ranks),
//! since a blocking open per thread for 1024 ranks would measure thread
//! creation rather than the library.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nixl_etcd::{Client, Config, Status};

use crate::stats::FleetRow;

/// Ranks per engine, on both sides.
const TP: usize = 8;
/// Engines per side at each size: 32, 128 and 512 clients per side.
const ENGINES: [usize; 3] = [4, 16, 64];
/// Bytes of NIXL agent metadata each prefill rank registers.
const BLOB_BYTES: usize = 8 * 1024;
/// OS threads that open, wait on and close the clients of one size.
const POOL_THREADS: usize = 32;
/// Bound of every call (open included): generous, so that a slow start is
/// measured rather than reported as a timeout.
const CALL_TIMEOUT_S: u64 = 60;
/// Bound of each decode rank's wait for one target.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// One rank of the fleet, on one side.
#[derive(Clone, Copy, Debug)]
enum Rank {
    Prefill { engine: usize, rank: usize },
    Decode { engine: usize, rank: usize },
}

/// A rank with its open client.
struct Opened {
    rank: Rank,
    client: Client,
}

/// What one pool thread did.
#[derive(Default)]
struct Worker {
    opened: Vec<Opened>,
    /// Time of each open (connect and lease grant), this thread's ranks.
    open_s: Vec<f64>,
    /// When this thread's last client was open (and, on the prefill side,
    /// registered).
    all_open_at: Option<Instant>,
    /// When each of this thread's prefill ranks was registered.
    registered_at: Vec<Instant>,
    /// When each of this thread's decode ranks had all of its targets.
    discovered_at: Vec<Instant>,
    /// The longest single wait of this thread's decode ranks, and for what.
    slowest_wait: (f64, String),
    failures: Vec<String>,
}

fn prefill_engine(e: usize) -> String {
    format!("prefill_{e}")
}

/// The metadata of prefill (engine, rank): distinct per rank, with NUL bytes.
fn blob(engine: usize, rank: usize) -> Vec<u8> {
    (0..BLOB_BYTES)
        .map(|i| ((i * 31 + engine * 7 + rank * 13) % 251) as u8)
        .collect()
}

/// Resident memory of this process, from /proc/self/status (bytes).
fn vm_rss_bytes() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024.0
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// CPU seconds (user + system) this process has used.
fn cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Gives freed heap back to the OS, so that the next size's RSS baseline
/// does not hide the memory its clients reuse.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the soft limit on open files towards `want` (up to the hard
/// limit); every client holds a connection to etcd.
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            eprintln!("fleet: getrlimit(RLIMIT_NOFILE) failed");
            return;
        }
        let cur: u64 = lim.rlim_cur;
        if cur >= want {
            return;
        }
        let new = want.min(lim.rlim_max);
        lim.rlim_cur = new;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            eprintln!("fleet: could not raise the open-file limit from {cur} to {new}");
        } else {
            eprintln!("fleet: raised the open-file soft limit from {cur} to {new}");
        }
        if new < want {
            eprintln!(
                "fleet: the open-file hard limit {new} is below the {want} this fleet may \
                 need; opens may fail with 'Too many open files'"
            );
        }
    }
}

fn options(endpoint: &str, namespace: &str) -> String {
    serde_json::json!({
        "endpoints": endpoint,
        "namespace": namespace,
        "world_size": TP,
        "timeout_s": CALL_TIMEOUT_S,
    })
    .to_string()
}

/// Opens the rank's client; a prefill rank also registers its blob.
fn open_rank(rank: Rank, opts: &str) -> Result<Client, String> {
    let cfg = Config::from_sources(|_| None, Some(opts))
        .map_err(|e| format!("{rank:?}: bad options {opts}: {e}"))?;
    let client = Client::open(cfg).map_err(|e| format!("{rank:?}: open failed: {e}"))?;
    if let Rank::Prefill { engine, rank: r } = rank {
        let id = prefill_engine(engine);
        if let Err(e) = client.register(&id, r as u32, &blob(engine, r)) {
            let _ = client.close();
            return Err(format!("{rank:?}: register of {id} rank {r} failed: {e}"));
        }
    }
    Ok(client)
}

/// Waits for the decode rank's target ranks of every prefill engine and
/// checks each record's bytes. Returns the longest single wait, and for what.
fn discover(client: &Client, engines: usize, me: (usize, usize)) -> Result<(f64, String), String> {
    let (engine, rank) = me;
    let who = format!("decode_{engine} rank {rank}");
    let targets = nixl_etcd::tp::target_ranks(TP as u32, rank as u32, TP as u32)
        .map_err(|e| format!("{who}: target_ranks: {e}"))?;
    let mut slowest = (0.0, String::new());
    for e in 0..engines {
        let id = prefill_engine(e);
        for &t in &targets {
            let asked = Instant::now();
            let found = client
                .wait(&id, t, Some(WAIT_LIMIT))
                .map_err(|err| format!("{who}: wait for {id} rank {t}: {err}"))?;
            let took = asked.elapsed().as_secs_f64();
            if took > slowest.0 {
                slowest = (took, format!("{who} waiting for {id} rank {t}"));
            }
            if found.record.engine_id != id || found.record.rank != t {
                return Err(format!(
                    "{who}: asked for {id} rank {t}, got {} rank {}",
                    found.record.engine_id, found.record.rank
                ));
            }
            let want = blob(e, t as usize);
            if *found.metadata != want[..] {
                let first_diff = found
                    .metadata
                    .iter()
                    .zip(&want)
                    .position(|(a, b)| a != b)
                    .unwrap_or(found.metadata.len().min(want.len()));
                return Err(format!(
                    "{who}: WRONG BYTES from {id} rank {t}: {} bytes, expected \
                     {}, first difference at byte {first_diff}",
                    found.metadata.len(),
                    want.len()
                ));
            }
        }
    }
    Ok(slowest)
}

/// One pool thread: waits for the start, opens its ranks (prefill ranks
/// register at once), then runs its decode ranks' discovery.
fn work(ranks: Vec<Rank>, opts: String, engines: usize, ready: &Barrier, go: &Barrier) -> Worker {
    let mut w = Worker::default();
    ready.wait();
    go.wait();
    for rank in ranks {
        let t = Instant::now();
        match open_rank(rank, &opts) {
            Ok(client) => {
                w.open_s.push(t.elapsed().as_secs_f64());
                if let Rank::Prefill { .. } = rank {
                    w.registered_at.push(Instant::now());
                }
                w.opened.push(Opened { rank, client });
            }
            Err(e) => w.failures.push(e),
        }
    }
    w.all_open_at = Some(Instant::now());
    for o in &w.opened {
        if let Rank::Decode { engine, rank } = o.rank {
            match discover(&o.client, engines, (engine, rank)) {
                Ok(slowest) => {
                    w.discovered_at.push(Instant::now());
                    if slowest.0 > w.slowest_wait.0 {
                        w.slowest_wait = slowest;
                    }
                }
                Err(e) => w.failures.push(e),
            }
        }
    }
    w
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[i.min(v.len()) - 1]
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }
}

/// After close, no record of this size may be left in etcd: one fresh client
/// looks every prefill rank up.
fn left_behind(endpoint: &str, namespace: &str, engines: usize) -> Result<usize, String> {
    let cfg = Config::from_sources(|_| None, Some(&options(endpoint, namespace)))
        .map_err(|e| format!("probe options: {e}"))?;
    let probe = Client::open(cfg).map_err(|e| format!("probe open: {e}"))?;
    let mut left = 0;
    for e in 0..engines {
        for r in 0..TP {
            match probe.lookup(&prefill_engine(e), r as u32) {
                Ok(_) => left += 1,
                Err(err) if err.status == Status::ErrNotFound => {}
                Err(err) => {
                    let _ = probe.close();
                    return Err(format!("probe lookup prefill_{e} rank {r}: {err}"));
                }
            }
        }
    }
    probe.close().map_err(|e| format!("probe close: {e}"))?;
    Ok(left)
}

fn run_size(endpoint: &str, engines: usize) -> FleetRow {
    let per_side = engines * TP;
    let clients = 2 * per_side;
    let namespace = format!(
        "/nixl-etcd-bench/fleet-{}-{engines}x{TP}",
        std::process::id()
    );
    let opts = options(endpoint, &namespace);

    // Prefill and decode ranks alternate, so both sides start together.
    let mut ranks = Vec::with_capacity(clients);
    for e in 0..engines {
        for r in 0..TP {
            ranks.push(Rank::Prefill { engine: e, rank: r });
            ranks.push(Rank::Decode { engine: e, rank: r });
        }
    }
    let threads = POOL_THREADS.min(clients);
    let mut shares: Vec<Vec<Rank>> = vec![Vec::new(); threads];
    for (i, r) in ranks.into_iter().enumerate() {
        shares[i % threads].push(r);
    }

    trim_heap();
    let fds_before = open_fds();
    let rss_before = vm_rss_bytes();
    let cpu_before = cpu_s();

    let ready = Arc::new(Barrier::new(threads + 1));
    let go = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, share)| {
            let (opts, ready, go) = (opts.clone(), ready.clone(), go.clone());
            thread::Builder::new()
                .name(format!("fleet-{i}"))
                .spawn(move || work(share, opts, engines, &ready, &go))
                .expect("spawn a fleet thread")
        })
        .collect();
    ready.wait();
    let start = Instant::now();
    go.wait();
    let workers: Vec<Worker> = handles
        .into_iter()
        .map(|h| h.join().expect("a fleet thread panicked"))
        .collect();
    let cpu_used = cpu_s() - cpu_before;

    let mut failures: Vec<String> = workers.iter().flat_map(|w| w.failures.clone()).collect();
    let discovered: Vec<Instant> = workers
        .iter()
        .flat_map(|w| w.discovered_at.iter().copied())
        .collect();
    let all_discovered_s = discovered
        .iter()
        .max()
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let all_open_s = workers
        .iter()
        .filter_map(|w| w.all_open_at)
        .max()
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(f64::NAN);
    let mut open_s: Vec<f64> = workers.iter().flat_map(|w| w.open_s.clone()).collect();
    let since = |t: &Instant| t.duration_since(start).as_secs_f64();
    let all_registered_s = workers
        .iter()
        .flat_map(|w| w.registered_at.iter().map(since))
        .fold(f64::NAN, f64::max);
    let mut discovered_s: Vec<f64> = discovered.iter().map(since).collect();
    let slowest_wait = workers
        .iter()
        .map(|w| w.slowest_wait.clone())
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or_default();

    // Requests and memory once discovery is complete, before any close.
    let opened: Vec<Opened> = workers.into_iter().flat_map(|w| w.opened).collect();
    let (mut prefill_req, mut decode_req) = (Vec::new(), Vec::new());
    for o in &opened {
        match o.rank {
            Rank::Prefill { .. } => prefill_req.push(o.client.requests_issued()),
            Rank::Decode { .. } => decode_req.push(o.client.requests_issued()),
        }
    }
    let all_req: Vec<u64> = prefill_req.iter().chain(&decode_req).copied().collect();
    let requests_per_client = mean(&all_req);
    let rss_after = vm_rss_bytes();
    let fds_open = open_fds();
    let rss_per_client_bytes = (rss_after - rss_before) / clients as f64;

    if discovered.len() != per_side {
        failures.push(format!(
            "{} of {per_side} decode ranks discovered all their targets",
            discovered.len()
        ));
    }
    if opened.len() != clients {
        failures.push(format!("{} of {clients} clients opened", opened.len()));
    }

    // Close every client, in parallel, and check that nothing is left.
    let close_start = Instant::now();
    let mut buckets: Vec<Vec<Opened>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, o) in opened.into_iter().enumerate() {
        buckets[i % threads].push(o);
    }
    let closers: Vec<_> = buckets
        .into_iter()
        .map(|b| {
            thread::spawn(move || {
                b.into_iter()
                    .filter_map(|o| {
                        o.client
                            .close()
                            .err()
                            .map(|e| format!("{:?}: close failed: {e}", o.rank))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for c in closers {
        failures.extend(c.join().expect("a closing thread panicked"));
    }
    let close_s = close_start.elapsed().as_secs_f64();
    match left_behind(endpoint, &namespace, engines) {
        Ok(0) => {}
        Ok(n) => failures.push(format!(
            "{n} prefill record(s) still in etcd under {namespace} after every client closed"
        )),
        Err(e) => failures.push(format!("checking that the fleet left nothing: {e}")),
    }
    // Let aborted background tasks drop their connections before the next size.
    let settle = Instant::now();
    while open_fds() > fds_before + 8 && settle.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(20));
    }
    let fds_after = open_fds();

    eprintln!(
        "fleet: {engines} x {TP} per side ({clients} clients): all open in {all_open_s:.2} s \
         (one open p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms), all prefill registered at \
         {all_registered_s:.2} s, decode ranks done p50 {:.2} s, all discovered in \
         {all_discovered_s:.2} s (slowest single wait {:.2} s: {}); this process used {cpu_used:.1} \
         CPU s; {requests_per_client:.1} etcd requests/client (prefill {:.1}, decode {:.1}, \
         max {}); RSS +{:.0} KiB/client ({:.1} MiB in all); fds {fds_before} -> {fds_open} -> \
         {fds_after}; closed in {close_s:.2} s",
        pct(&mut open_s, 50.0) * 1e3,
        pct(&mut open_s, 99.0) * 1e3,
        pct(&mut open_s, 100.0) * 1e3,
        pct(&mut discovered_s, 50.0),
        slowest_wait.0,
        slowest_wait.1,
        mean(&prefill_req),
        mean(&decode_req),
        all_req.iter().max().copied().unwrap_or(0),
        rss_per_client_bytes / 1024.0,
        (rss_after - rss_before) / (1024.0 * 1024.0),
    );
    if !failures.is_empty() {
        let shown: Vec<&str> = failures.iter().take(10).map(String::as_str).collect();
        panic!(
            "fleet {engines} x {TP} per side: {} failure(s); first ones:\n  {}",
            failures.len(),
            shown.join("\n  ")
        );
    }
    FleetRow {
        engines,
        tp: TP,
        clients_per_side: per_side,
        all_discovered_s,
        requests_per_client,
        rss_per_client_bytes,
    }
}

/// Fleet start-up against the etcd at `endpoint`, at 32, 128 and 512 clients
/// per side.
pub fn run(endpoint: &str) -> Vec<FleetRow> {
    let largest = 2 * TP * ENGINES.iter().max().copied().unwrap_or(0);
    // A connection per client, its share of the process's other files, and
    // room for etcd's side when it inherits the limit.
    raise_nofile((4 * largest + 1024) as u64);
    ENGINES.iter().map(|&e| run_size(endpoint, e)).collect()
}
