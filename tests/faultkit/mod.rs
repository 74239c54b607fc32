//! Continuous load for the fault tests: several clients (each opened through
//! the C ABI), each with a few threads that register / lookup / wait in a
//! loop, recording every call's result with its start and end time. After a
//! run it answers the questions of the reliability table: how many calls
//! failed, the longest gap between a client's successful writes, how long
//! after a fault every client wrote again, and whether any registration was
//! lost.
//!
//! Use it from a test file with `mod capi; mod common; mod faultkit;`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::capi::{open, Handle};
use nixl_etcd::ffi::{NIXL_ETCD_ERR_NOT_FOUND, NIXL_ETCD_OK};

/// Bytes of each registered value.
pub const VALUE_LEN: usize = 1024;
/// A load thread stops by itself after this long, whatever the test does.
pub const HARD_CAP: Duration = Duration::from_secs(150);

/// One call through the C ABI, as a load thread saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub client: usize,
    pub thread: usize,
    pub op: &'static str,
    /// Since the load started.
    pub start: Duration,
    pub end: Duration,
    pub status: i32,
    /// `nixl_etcd_last_error()` for a failure, else empty.
    pub message: String,
}

impl Call {
    /// A failure: anything but OK, except a lookup's NOT_FOUND (a peer not
    /// registered yet, or gone while etcd was wiped, is an answer).
    pub fn failed(&self) -> bool {
        !(self.status == NIXL_ETCD_OK
            || (self.op == "lookup" && self.status == NIXL_ETCD_ERR_NOT_FOUND))
    }

    pub fn duration(&self) -> Duration {
        self.end.saturating_sub(self.start)
    }
}

/// What one load thread registered: the sequence number of its last
/// successful register, and those attempted after it (a register that failed
/// at the client may still have reached etcd).
#[derive(Debug, Clone, Default)]
pub struct Slot {
    pub client: usize,
    pub thread: usize,
    pub last_ok: Option<u64>,
    pub pending: Vec<u64>,
}

/// The engine a load client registers its threads' ranks under.
pub fn engine(client: usize) -> String {
    format!("load_c{client}")
}

/// The value thread `thread` of client `client` registers at step `seq`:
/// a readable tag, then bytes with NULs, `VALUE_LEN` in all.
pub fn value(client: usize, thread: usize, seq: u64) -> Vec<u8> {
    let mut v = format!("c{client}/t{thread}/s{seq};").into_bytes();
    let mut x = (seq as u32) ^ ((client as u32) << 20) ^ ((thread as u32) << 10) | 1;
    while v.len() < VALUE_LEN {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.push(if v.len() % 9 == 0 { 0 } else { x as u8 });
    }
    v
}

/// Parses a value back into (client, thread, seq); None if it is not one.
pub fn parse_value(v: &[u8]) -> Option<(usize, usize, u64)> {
    let end = v.iter().position(|&b| b == b';')?;
    let tag = std::str::from_utf8(&v[..end]).ok()?;
    let mut parts = tag.split('/');
    let c = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let t = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let s = parts.next()?.strip_prefix('s')?.parse().ok()?;
    (value(c, t, s) == v).then_some((c, t, s))
}

/// Shape of a load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub clients: usize,
    pub threads: usize,
    /// Options JSON every client is opened with.
    pub options: String,
    /// `timeout_ms` of each wait.
    pub wait_ms: i64,
    /// Sleep between two rounds of a thread.
    pub pause: Duration,
}

/// A running load.
pub struct Load {
    pub t0: Instant,
    pub spec: LoadSpec,
    pub clients: Vec<Handle>,
    stop: Arc<AtomicBool>,
    threads: Vec<Worker>,
}

/// A load thread: its calls, its slot, its errors.
type Worker = JoinHandle<(Vec<Call>, Slot, Vec<String>)>;

/// Everything a finished load recorded.
pub struct Outcome {
    pub spec: LoadSpec,
    pub clients: Vec<Handle>,
    pub calls: Vec<Call>,
    pub slots: Vec<Slot>,
    /// Values read that were not what the key may hold (must stay empty).
    pub corrupt: Vec<String>,
    /// When the load stopped, since it started.
    pub stopped_at: Duration,
}

impl Load {
    /// Opens the clients and starts every thread.
    pub fn start(spec: LoadSpec) -> Load {
        let clients: Vec<Handle> = (0..spec.clients)
            .map(|c| open(&spec.options).unwrap_or_else(|e| panic!("open client {c}: {e:?}")))
            .collect();
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (c, &h) in clients.iter().enumerate() {
            for t in 0..spec.threads {
                let peer = (c + 1) % spec.clients;
                let stop = stop.clone();
                let spec = spec.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("load-c{c}-t{t}"))
                        .spawn(move || run_thread(h, c, t, peer, &spec, t0, &stop))
                        .expect("spawn a load thread"),
                );
            }
        }
        Load {
            t0,
            spec,
            clients,
            stop,
            threads,
        }
    }

    /// Time since the load started.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Stops every thread and collects what they recorded.
    pub fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Release);
        let stopped_at = self.t0.elapsed();
        let mut calls = Vec::new();
        let mut slots = Vec::new();
        let mut corrupt = Vec::new();
        for h in self.threads {
            let (c, s, bad) = h.join().expect("a load thread panicked");
            calls.extend(c);
            slots.push(s);
            corrupt.extend(bad);
        }
        calls.sort_by_key(|c| c.start);
        Outcome {
            spec: self.spec,
            clients: self.clients,
            calls,
            slots,
            corrupt,
            stopped_at,
        }
    }
}

fn run_thread(
    h: Handle,
    c: usize,
    t: usize,
    peer: usize,
    spec: &LoadSpec,
    t0: Instant,
    stop: &AtomicBool,
) -> (Vec<Call>, Slot, Vec<String>) {
    let mut calls = Vec::new();
    let mut corrupt = Vec::new();
    let mut slot = Slot {
        client: c,
        thread: t,
        ..Slot::default()
    };
    let (own, other) = (engine(c), engine(peer));
    let rank = t as u32;
    let mut seq = 0u64;
    let check_peer = |v: &[u8], what: &str, at: Duration, corrupt: &mut Vec<String>| {
        if !matches!(parse_value(v), Some((pc, pt, _)) if pc == peer && pt == t) {
            corrupt.push(format!(
                "{:.3}s c{c} t{t} {what} of {other} rank {rank}: {} bytes that are not its value",
                at.as_secs_f64(),
                v.len()
            ));
        }
    };
    while !stop.load(Ordering::Acquire) && t0.elapsed() < HARD_CAP {
        seq += 1;
        let v = value(c, t, seq);
        let start = t0.elapsed();
        let r = h.register(&own, rank, &v);
        let end = t0.elapsed();
        match &r {
            Ok(()) => {
                slot.last_ok = Some(seq);
                slot.pending.clear();
            }
            Err(_) => slot.pending.push(seq),
        }
        calls.push(record(c, t, "register", start, end, r.map(|_| ())));

        let start = t0.elapsed();
        let r = h.lookup(&other, rank);
        let end = t0.elapsed();
        if let Ok(v) = &r {
            check_peer(v, "lookup", end, &mut corrupt);
        }
        calls.push(record(c, t, "lookup", start, end, r.map(|_| ())));

        let start = t0.elapsed();
        let r = h.wait(&other, rank, spec.wait_ms);
        let end = t0.elapsed();
        if let Ok(v) = &r {
            check_peer(v, "wait", end, &mut corrupt);
        }
        calls.push(record(c, t, "wait", start, end, r.map(|_| ())));

        std::thread::sleep(spec.pause);
    }
    (calls, slot, corrupt)
}

fn record(
    client: usize,
    thread: usize,
    op: &'static str,
    start: Duration,
    end: Duration,
    r: Result<(), crate::capi::Failure>,
) -> Call {
    let (status, message) = match r {
        Ok(()) => (NIXL_ETCD_OK, String::new()),
        Err(f) => (f.status, f.message),
    };
    Call {
        client,
        thread,
        op,
        start,
        end,
        status,
        message,
    }
}

impl Outcome {
    pub fn attempted(&self) -> usize {
        self.calls.len()
    }

    pub fn failures(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.failed()).collect()
    }

    /// Per client, the longest interval between two consecutive successful
    /// registers (by completion time): how long that client could not
    /// write. Registers always reach etcd; lookups and waits may be served
    /// from the cache, so they would hide an outage.
    pub fn longest_write_gap(&self) -> Vec<Duration> {
        (0..self.spec.clients)
            .map(|c| {
                let mut ends: Vec<Duration> = self
                    .calls
                    .iter()
                    .filter(|k| k.client == c && k.op == "register" && !k.failed())
                    .map(|k| k.end)
                    .collect();
                ends.sort();
                ends.windows(2)
                    .map(|w| w[1] - w[0])
                    .max()
                    .unwrap_or(self.stopped_at)
            })
            .collect()
    }

    /// Same, over every successful call of the client (lookups and waits
    /// included).
    pub fn longest_call_gap(&self) -> Vec<Duration> {
        (0..self.spec.clients)
            .map(|c| {
                let mut ends: Vec<Duration> = self
                    .calls
                    .iter()
                    .filter(|k| k.client == c && !k.failed())
                    .map(|k| k.end)
                    .collect();
                ends.sort();
                ends.windows(2)
                    .map(|w| w[1] - w[0])
                    .max()
                    .unwrap_or(self.stopped_at)
            })
            .collect()
    }

    /// How long after `at` every client had completed a successful register
    /// that started at or after `at`; None if some client never did.
    pub fn recovered_after(&self, at: Duration) -> Option<Duration> {
        let mut worst = Duration::ZERO;
        for c in 0..self.spec.clients {
            let first = self
                .calls
                .iter()
                .filter(|k| k.client == c && k.op == "register" && !k.failed() && k.start >= at)
                .map(|k| k.end)
                .min()?;
            worst = worst.max(first - at);
        }
        Some(worst)
    }

    /// The longest call.
    pub fn longest_call(&self) -> Option<&Call> {
        self.calls.iter().max_by_key(|c| c.duration())
    }

    /// Every failure, one line each, with its time.
    pub fn error_log(&self) -> String {
        let mut s = String::new();
        for k in self.failures() {
            let _ = writeln!(
                s,
                "  {:8.3}s +{:.3}s c{} t{} {:<8} status {} {}",
                k.start.as_secs_f64(),
                k.duration().as_secs_f64(),
                k.client,
                k.thread,
                k.op,
                k.status,
                k.message
            );
        }
        s
    }

    /// Failures by (op, status), for a compact summary.
    pub fn failure_summary(&self) -> String {
        let mut by: BTreeMap<(&str, i32), usize> = BTreeMap::new();
        for k in self.failures() {
            *by.entry((k.op, k.status)).or_default() += 1;
        }
        by.iter()
            .map(|((op, st), n)| format!("{op}:{st} x{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Registrations not in etcd as their owner last wrote them, read by a
    /// fresh client (no cache: its first lookup of each engine lists etcd).
    /// Polls up to `within` for re-registrations in flight; returns what is
    /// still missing or wrong then, one line each.
    pub fn lost_records(&self, observer_options: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let observer = open(observer_options).expect("open the observer client");
            let mut lost = Vec::new();
            for s in &self.slots {
                let Some(last) = s.last_ok else { continue };
                let got = observer.lookup(&engine(s.client), s.thread as u32);
                let ok = match &got {
                    Ok(v) => matches!(parse_value(v), Some((c, t, seq))
                        if c == s.client && t == s.thread
                            && (seq == last || s.pending.contains(&seq))),
                    Err(_) => false,
                };
                if !ok {
                    lost.push(format!(
                        "{} rank {}: last registered s{last} (then tried {:?}), etcd gives {:?}",
                        engine(s.client),
                        s.thread,
                        s.pending,
                        got.map(|v| parse_value(&v))
                    ));
                }
            }
            observer.close().expect("close the observer");
            if lost.is_empty() || Instant::now() >= deadline {
                return lost;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Reads that disagree with what each rank's owner last wrote: every
    /// load client looks up every rank of its peer engine (from its cache
    /// when it holds one). Polls up to `within`; returns what still
    /// disagrees then.
    pub fn stale_reads(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let mut stale = Vec::new();
            for (c, h) in self.clients.iter().enumerate() {
                let peer = (c + 1) % self.spec.clients;
                for s in self.slots.iter().filter(|s| s.client == peer) {
                    let Some(last) = s.last_ok else { continue };
                    let got = h.lookup(&engine(peer), s.thread as u32);
                    let seq = got.as_ref().ok().and_then(|v| parse_value(v)).map(|v| v.2);
                    if !matches!(seq, Some(q) if q == last || s.pending.contains(&q)) {
                        stale.push(format!(
                            "client {c} reads {} rank {} as {:?}; its owner last wrote s{last} \
                             (then tried {:?})",
                            engine(peer),
                            s.thread,
                            got.map(|v| parse_value(&v)),
                            s.pending
                        ));
                    }
                }
            }
            if stale.is_empty() || Instant::now() >= deadline {
                return stale;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Closes every load client.
    pub fn close_all(&self) {
        for h in &self.clients {
            h.close().expect("close a load client");
        }
    }
}

/// One row of the reliability table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Sort key and file name of the row ("1", "2", ...).
    pub id: &'static str,
    pub scenario: String,
    pub attempted: usize,
    pub failed: usize,
    /// Longest gap between a client's successful writes (worst client);
    /// None: not applicable.
    pub longest_gap: Option<Duration>,
    /// Until every client wrote again after the fault was repaired (or what
    /// the scenario's notes say); None: not applicable.
    pub recover: Option<Duration>,
    pub lost: usize,
    pub notes: String,
}

const TABLE_HEADER: &str = "| scenario | calls attempted | calls failed | longest gap | time to recover | records lost | notes |\n|---|---|---|---|---|---|---|\n";

/// `target/faults.md`, the reliability table: the latest row of every
/// scenario, each kept in `target/faults/<id>.row` (several test binaries
/// write rows).
pub fn table_path() -> std::path::PathBuf {
    crate::common::repo_root().join("target").join("faults.md")
}

fn secs_or_na(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.2} s", d.as_secs_f64()))
        .unwrap_or_else(|| "n/a".into())
}

/// Stores `row`, rewrites `target/faults.md` from every stored row and
/// prints it.
pub fn report(row: &Row) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let line = format!(
        "| {} | {} | {} | {} | {} | {} | {} |\n",
        row.scenario,
        row.attempted,
        row.failed,
        secs_or_na(row.longest_gap),
        secs_or_na(row.recover),
        row.lost,
        row.notes
    );
    let rows = table_path().with_extension("").join("rows");
    let _ = std::fs::create_dir_all(&rows);
    let _ = std::fs::write(rows.join(format!("{}.row", row.id)), &line);
    let mut names: Vec<_> = std::fs::read_dir(&rows)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    let mut table = TABLE_HEADER.to_owned();
    for p in names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "row"))
    {
        table.push_str(&std::fs::read_to_string(p).unwrap_or_default());
    }
    let _ = std::fs::write(table_path(), &table);
    println!(
        "this run: {line}\n{} (latest row of each scenario):\n{table}",
        table_path().display()
    );
}
