//! Scenario 7: many threads on shared clients, with forks in the middle: 64
//! threads x 1,000 mixed calls through the C ABI on 4 clients of a 3-member cluster,
//! while the main thread forks three times; each child (holding only the
//! forking thread, and whatever locks the others held at that instant) must
//! see its inherited handle CLOSED, open its own client and work, then exit.
//! No call may fail, no child may hang, and the process's open fds and RSS
//! must come back to where they were (no leak).
//!
//! The library logs at its default level (INFO, one line per register), as
//! an engine would: the logger's locks are among those a fork can catch
//! held. Slow: about 10-60 s.
//!
//! Also `fork_while_threads_call_never_hangs_the_child`: 200 forks while 16
//! threads call the library; before `runtime::guard_fork`, about 6 % of
//! those children hung on a lock another thread held at the fork.

mod capi;
mod common;
mod faultkit;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capi::{blob, open, Handle};
use common::{unique_namespace, EtcdCluster};
use nixl_etcd::ffi::*;

const THREADS: u32 = 64;
const CALLS: u32 = 1000;
const CLIENTS: usize = 4;
/// Forks at these fractions of all calls.
const FORK_AT: [f64; 3] = [0.25, 0.5, 0.75];
/// A child that has not exited by then is hung (a lock held across fork).
const CHILD_LIMIT: Duration = Duration::from_secs(30);

/// The tests of this file one at a time: one measures fds and RSS.
static SERIAL: Mutex<()> = Mutex::new(());

/// Failures by (call, status), their messages, and each child's (exit code,
/// time to exit).
type StormResult = (
    BTreeMap<(&'static str, i32), usize>,
    Vec<String>,
    Vec<(i32, Duration)>,
);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn engine(c: usize) -> String {
    format!("stress_c{c}")
}

/// One thread's calls: `rounds` x mixed calls on `clients[t % 4]`, checking
/// every answer. Returns the count of each (call, status), and problems.
fn run_thread(
    clients: &[Handle],
    t: u32,
    rounds: u32,
    done: &AtomicUsize,
) -> (BTreeMap<(&'static str, i32), usize>, Vec<String>) {
    let c = t as usize % CLIENTS;
    let h = clients[c];
    let own = engine(c);
    let agent = format!("stress_agent_{t}");
    let mut seen = BTreeMap::new();
    let mut problems = Vec::new();
    let mut mine = blob(t, 256);
    let mut note = |call: &'static str, st: i32, ok: &[i32], problems: &mut Vec<String>| {
        *seen.entry((call, st)).or_insert(0) += 1;
        if !ok.contains(&st) {
            problems.push(format!(
                "thread {t}: {call} gave {st}: {}",
                capi::last_error()
            ));
        }
    };
    let status = |r: Result<(), capi::Failure>| r.map_or_else(|e| e.status, |_| NIXL_ETCD_OK);
    for i in 0..rounds {
        match i % 100 {
            52 => note(
                "publish_nixl",
                status(h.publish_nixl(&agent, None, &mine)),
                &[NIXL_ETCD_OK],
                &mut problems,
            ),
            53 => {
                let got = h.fetch_nixl(&agent, None, 2000);
                note(
                    "fetch_nixl",
                    status(got.map(|_| ())),
                    &[NIXL_ETCD_OK],
                    &mut problems,
                );
            }
            77 => {
                let r = h.subscribe(Some(&own)).and_then(|s| h.unsubscribe(s.id));
                note(
                    "subscribe+unsubscribe",
                    status(r),
                    &[NIXL_ETCD_OK],
                    &mut problems,
                );
            }
            99 => note(
                "unregister",
                status(h.unregister(&own, t)),
                &[NIXL_ETCD_OK],
                &mut problems,
            ),
            // Own rank: registered at 0, 20, 40..., unregistered at 99.
            n if n % 20 == 0 => {
                mine = blob(t * 100_000 + i, 256 + (i as usize % 5) * 64);
                note(
                    "register",
                    status(h.register(&own, t, &mine)),
                    &[NIXL_ETCD_OK],
                    &mut problems,
                );
            }
            n if n % 20 == 1 => {
                // Read-your-writes, from the cache.
                let got = h.lookup(&own, t);
                if got.as_ref().ok() != Some(&mine) {
                    problems.push(format!(
                        "thread {t}: own rank read back as {:?}",
                        got.as_ref().map(|v| v.len())
                    ));
                }
                note(
                    "lookup",
                    status(got.map(|_| ())),
                    &[NIXL_ETCD_OK],
                    &mut problems,
                );
            }
            n if n % 20 == 10 => note(
                "wait",
                status(h.wait(&own, t, 5000).map(|_| ())),
                &[NIXL_ETCD_OK],
                &mut problems,
            ),
            n if n % 20 == 5 => {
                let peer = (t + 1) % THREADS;
                let r = h.lookup_record(&engine(peer as usize % CLIENTS), peer);
                if let Ok(rec) = &r {
                    if rec.rank != peer || rec.metadata.is_empty() {
                        problems.push(format!("thread {t}: peer record {rec:?}"));
                    }
                }
                note(
                    "lookup_record",
                    status(r.map(|_| ())),
                    &[NIXL_ETCD_OK, NIXL_ETCD_ERR_NOT_FOUND],
                    &mut problems,
                );
            }
            _ => {
                // Any thread's rank, on any engine: there, or not (yet).
                let other = (t * 7 + i) % THREADS;
                let r = h.lookup(&engine(other as usize % CLIENTS), other);
                note(
                    "lookup",
                    status(r.map(|_| ())),
                    &[NIXL_ETCD_OK, NIXL_ETCD_ERR_NOT_FOUND],
                    &mut problems,
                );
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    (seen, problems)
}

/// Runs `rounds` calls on each of 64 threads; forks at each of `fork_at`
/// (fractions of the calls) with the given child body. Returns the calls'
/// statuses, problems, and each child's exit code and time.
fn run_all(
    clients: &[Handle],
    rounds: u32,
    fork_at: &[f64],
    child: impl Fn() -> i32,
) -> StormResult {
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Arc<Vec<Handle>> = Arc::new(clients.to_vec());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (clients, done) = (clients.clone(), done.clone());
            std::thread::spawn(move || run_thread(&clients, t, rounds, &done))
        })
        .collect();
    let total = (THREADS * rounds) as usize;
    let mut children = Vec::new();
    for frac in fork_at {
        let target = (total as f64 * frac) as usize;
        let reached = common::wait_until(Duration::from_secs(120), || {
            done.load(Ordering::Relaxed) >= target
        });
        assert!(reached, "the threads did not reach {target} calls");
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // The child: only this thread exists. A watchdog in case a lock
            // inherited from a vanished thread hangs it.
            unsafe { libc::alarm(CHILD_LIMIT.as_secs() as u32) };
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&child)).unwrap_or(99);
            unsafe { libc::_exit(code) };
        }
        children.push(std::thread::spawn(move || reap(pid)));
    }
    let exits: Vec<_> = children.into_iter().map(|c| c.join().unwrap()).collect();
    let mut seen = BTreeMap::new();
    let mut problems = Vec::new();
    for t in threads {
        let (s, p) = t.join().expect("a stress thread panicked");
        for (k, n) in s {
            *seen.entry(k).or_insert(0) += n;
        }
        problems.extend(p);
    }
    (seen, problems, exits)
}

/// Waits for child `pid` (SIGKILL after [`CHILD_LIMIT`] + 5 s); returns its
/// exit code (1000 + signal if killed) and how long it lived.
fn reap(pid: libc::pid_t) -> (i32, Duration) {
    let started = Instant::now();
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if started.elapsed() > CHILD_LIMIT + Duration::from_secs(5) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::waitpid(pid, &mut status, 0) };
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1000 + libc::WTERMSIG(status)
    };
    (code, started.elapsed())
}

/// The child's work: the inherited handle is refused, its own client works.
fn child_body(options: &str, inherited: Handle) -> i32 {
    match inherited.lookup(&engine(0), 0) {
        Err(e) if e.status == NIXL_ETCD_ERR_CLOSED => {}
        _ => return 10,
    }
    let own = match open(options) {
        Ok(h) => h,
        Err(_) => return 11,
    };
    let pid = std::process::id();
    let id = format!("stress_child_{pid}");
    if own.register(&id, 0, &blob(pid, 512)).is_err() {
        return 12;
    }
    if own.wait(&id, 0, 5000).ok() != Some(blob(pid, 512)) {
        return 13;
    }
    if own
        .lookup(&engine(1), 1)
        .is_err_and(|e| e.status != NIXL_ETCD_ERR_NOT_FOUND)
    {
        return 14;
    }
    // Closing the inherited handle must not touch the parent's lease.
    if unsafe { nixl_etcd_close(inherited.0) } != NIXL_ETCD_OK {
        return 15;
    }
    if own.close().is_err() {
        return 16;
    }
    0
}

#[test]
fn slow_64_threads_x_1000_calls_with_forks_no_error_no_hang_no_leak() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = EtcdCluster::start(3);
    let ns = unique_namespace("stress");
    let options = cluster.options_json(&ns, "\"timeout_s\":10");
    // The runtime and logger exist from here on: the fd baseline.
    open(&options).unwrap().close().unwrap();
    let fds_before_open = open_fds();

    let clients: Vec<Handle> = (0..CLIENTS).map(|_| open(&options).unwrap()).collect();
    // Warm-up: connections, informers, event threads, allocator arenas.
    let (_, problems, _) = run_all(&clients, 100, &[], || 0);
    assert!(problems.is_empty(), "warm-up: {problems:#?}");
    let (fds_warm, rss_warm) = (open_fds(), rss_bytes());

    let started = Instant::now();
    let inherited = clients[0];
    let opts = options.clone();
    let (seen, problems, exits) = run_all(&clients, CALLS, &FORK_AT, move || {
        child_body(&opts, inherited)
    });
    let took = started.elapsed();
    let (fds_after, rss_after) = (open_fds(), rss_bytes());
    for c in &clients {
        c.close().unwrap();
    }
    // Connections close on their tasks: give them a moment.
    common::wait_until(Duration::from_secs(5), || open_fds() <= fds_before_open);
    // (bounded: gives up after 5 s, and the assertion below judges.)
    let fds_closed = open_fds();

    let attempted: usize = seen.values().sum();
    let failed: usize = seen
        .iter()
        .filter(|((call, st), _)| {
            *st != NIXL_ETCD_OK
                && !(*st == NIXL_ETCD_ERR_NOT_FOUND && matches!(*call, "lookup" | "lookup_record"))
        })
        .map(|(_, n)| n)
        .sum();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rss_growth = rss_after.saturating_sub(rss_warm);
    println!("calls by (call, status): {seen:?}");
    println!(
        "{attempted} calls in {took:?}; children {exits:?}; fds: {fds_before_open} before open, \
         {fds_warm} warm, {fds_after} after, {fds_closed} after close; RSS {:.1} MiB warm, \
         {:.1} MiB after",
        mib(rss_warm),
        mib(rss_after)
    );
    // Under scripts/valgrind.sh the numbers are valgrind's: no table row.
    let report = if std::env::var_os("NIXL_ETCD_UNDER_VALGRIND").is_some() {
        |_: &faultkit::Row| ()
    } else {
        faultkit::report
    };
    report(&faultkit::Row {
        id: "7",
        scenario: format!(
            "7. {THREADS} threads x {CALLS} mixed calls on {CLIENTS} shared clients, {} forks",
            FORK_AT.len()
        ),
        attempted,
        failed,
        longest_gap: None,
        recover: None,
        lost: 0,
        notes: format!(
            "{:.1} s; children (inherited handle CLOSED, own client works) exited {:?} in \
             {:.2}-{:.2} s; open fds {fds_warm} -> {fds_after} (after close {fds_closed}, before \
             open {fds_before_open}); RSS {:.1} -> {:.1} MiB",
            took.as_secs_f64(),
            exits.iter().map(|e| e.0).collect::<Vec<_>>(),
            exits
                .iter()
                .map(|e| e.1.as_secs_f64())
                .fold(f64::MAX, f64::min),
            exits.iter().map(|e| e.1.as_secs_f64()).fold(0.0, f64::max),
            mib(rss_warm),
            mib(rss_after)
        ),
    });
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    assert_eq!(failed, 0);
    assert_eq!(attempted, (THREADS * CALLS) as usize);
    for (code, took) in &exits {
        assert_eq!(
            *code, 0,
            "a forked child failed or hung (code {code}, after {took:?}; 1014 = SIGALRM: hung)"
        );
    }
    assert!(
        fds_after <= fds_warm + 4,
        "fds grew from {fds_warm} to {fds_after}"
    );
    // (2 of slack: the runtime's own descriptors may come and go.)
    assert!(
        fds_closed <= fds_before_open + 2,
        "closing every client left fds open: {fds_closed} > {fds_before_open}"
    );
    assert!(
        rss_growth < 64 << 20,
        "RSS grew by {:.1} MiB over {attempted} calls",
        mib(rss_growth)
    );
}

/// Many forks while 16 threads register and look up on one client: every
/// child (inherited handle CLOSED, then a client of its own that registers)
/// must finish. A child that inherits a lock held by a thread it does not
/// have hangs; its watchdog (SIGALRM) then fails the test.
#[test]
fn fork_while_threads_call_never_hangs_the_child() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const FORKS: usize = 200;
    let etcd = common::EtcdServer::start();
    let options = etcd.options_json(&unique_namespace("forks"), "");
    let h = open(&options).unwrap();
    h.register("busy", 0, b"x").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..16u32)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Bounded: stops when told, or after 2 minutes at most.
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120)
                {
                    let _ = match t % 4 {
                        0 => h.register("busy", t, b"y"),
                        _ => h.lookup("busy", 0).map(|_| ()),
                    };
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    let started = Instant::now();
    for i in 0..FORKS {
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe { libc::alarm(5) };
            let ok = std::panic::catch_unwind(|| {
                let inherited = h.lookup("busy", 0).map_err(|e| e.status);
                let own = open(&options);
                let registered = own.as_ref().is_ok_and(|o| {
                    o.register("forked", std::process::id(), b"z").is_ok() && o.close().is_ok()
                });
                inherited == Err(NIXL_ETCD_ERR_CLOSED) && registered
            });
            unsafe { libc::_exit(if ok.unwrap_or(false) { 0 } else { 3 }) };
        }
        let (code, took) = reap(pid);
        if code != 0 {
            failures.push(format!(
                "fork {i}: code {code} after {took:?} (1014: hung, SIGALRM)"
            ));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "{FORKS} forks under 16 busy threads in {:?}",
        started.elapsed()
    );
    h.close().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {FORKS} children failed: {failures:#?}",
        failures.len()
    );
}
