//! Fleet start-up in one process: E prefill engines and E decode engines of
//! TP ranks each, every rank with its own client, all released at once.
//! Clients are opened from a pool of OS threads (each handles many ranks),
//! since a blocking open per thread for thousands of ranks would measure
//! thread creation rather than the library.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nixl_etcd::Client;

use crate::ranks::{self, Rank, TP};
use crate::{Probe, Row};

/// OS threads that open, wait on and close the clients of one size.
const POOL_THREADS: usize = 32;

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

/// Raises the soft limit on open files towards `want` (up to the hard
/// limit); every client holds a connection to etcd.
pub fn raise_nofile(want: u64) {
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

/// One pool thread: waits for the start, opens its ranks (prefill ranks
/// register at once), then runs its decode ranks' discovery.
fn work(
    ranks: Vec<Rank>,
    opts: String,
    expected: &ranks::Expected,
    ready: &Barrier,
    go: &Barrier,
) -> Worker {
    let mut w = Worker::default();
    ready.wait();
    go.wait();
    for rank in ranks {
        let t = Instant::now();
        match ranks::open_rank(rank, &opts) {
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
            match ranks::discover(&o.client, expected, (engine, rank)) {
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

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[i.min(v.len()) - 1]
}

pub fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }
}

/// One size: `engines` engines per side against `endpoint`, read on etcd's
/// side through `probe`; with a `hold`, the fleet then idles that long to
/// measure its lease renewals.
pub fn run_size(endpoint: &str, engines: usize, probe: &Probe, hold: Duration) -> Row {
    let per_side = engines * TP;
    let clients = 2 * per_side;
    let namespace = format!(
        "/nixl-etcd-bench/fleet-{}-{engines}x{TP}",
        std::process::id()
    );
    let opts = ranks::options(endpoint, &namespace);

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

    let expected = Arc::new(ranks::Expected::new(engines));
    ranks::trim_heap();
    let fds_before = open_fds();
    let rss_before = ranks::vm_rss_kib() * 1024.0;
    let cpu_before = cpu_s();
    let etcd_cpu_before = probe.cpu_s();

    let ready = Arc::new(Barrier::new(threads + 1));
    let go = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = shares
        .into_iter()
        .enumerate()
        .map(|(i, share)| {
            let (opts, ready, go) = (opts.clone(), ready.clone(), go.clone());
            let expected = expected.clone();
            thread::Builder::new()
                .name(format!("fleet-{i}"))
                .spawn(move || work(share, opts, &expected, &ready, &go))
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
    let rss_after = ranks::vm_rss_kib() * 1024.0;
    let fds_open = open_fds();
    let rss_per_client_bytes = (rss_after - rss_before) / clients as f64;
    let (watch_streams, etcd_rss_mib) = (probe.streams(), probe.rss_mib());
    let etcd_cpu_s = probe.cpu_s() - etcd_cpu_before;
    // Records the process's shared cache holds (all its clients).
    let cached = opened
        .iter()
        .map(|o| o.client.cache_footprint().1)
        .max()
        .unwrap_or(0);
    let (renewals_per_s, etcd_cpu_us_per_renewal) = idle(&opened, probe, hold);

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
    match ranks::left_behind(endpoint, &namespace, engines) {
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
    Row {
        mode: "one process",
        processes: 1,
        clients: per_side,
        engines,
        tp: TP,
        discovered_s: all_discovered_s,
        requests_per_client,
        rss_kib_per_client: rss_per_client_bytes / 1024.0,
        watch_streams,
        etcd_rss_mib,
        etcd_cpu_s,
        renewals_per_s,
        etcd_cpu_us_per_renewal,
        cached_records_per_process: cached,
    }
}

/// Holds the fleet idle for `hold`: its lease renewals per second, and
/// etcd's CPU per renewal. NaN without a hold.
fn idle(opened: &[Opened], probe: &Probe, hold: Duration) -> (f64, f64) {
    if hold.is_zero() {
        return (f64::NAN, f64::NAN);
    }
    let requests = || {
        opened
            .iter()
            .map(|o| o.client.requests_issued())
            .sum::<u64>()
    };
    let (r0, c0, t0) = (requests(), probe.cpu_s(), Instant::now());
    thread::sleep(hold);
    let (renewals, cpu, secs) = (
        (requests() - r0) as f64,
        probe.cpu_s() - c0,
        t0.elapsed().as_secs_f64(),
    );
    (renewals / secs, cpu * 1e6 / renewals)
}
