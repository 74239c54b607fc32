//! Fleet start-up as separate processes, one per engine (its TP ranks, one
//! client each), as an inference fleet runs: each process is this bench
//! started with `--worker`. The parent starts them all, waits until each is
//! ready, says "go" to all at once, and collects one JSON line from each
//! when its ranks are done; each process then keeps its clients open until
//! its stdin closes, so that etcd's watch streams are counted with every
//! process up.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ranks::{self, Rank, TP};
use crate::{Probe, Row};

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    decode: bool,
}

impl Worker {
    fn line(&mut self) -> String {
        let mut l = String::new();
        let _ = self.stdout.read_line(&mut l);
        l
    }
}

/// One size: `engines` engine processes per side, reaching etcd at
/// `endpoint` (a proxy or etcd itself), read on etcd's side through `probe`.
pub fn run_size(endpoint: &str, engines: usize, mode: &'static str, probe: &Probe) -> Row {
    let namespace = format!(
        "/nixl-etcd-bench/procs-{}-{engines}x{TP}-{}",
        std::process::id(),
        mode.len()
    );
    let exe = std::env::current_exe().expect("the bench's own path");
    let mut workers: Vec<Worker> = Vec::with_capacity(2 * engines);
    for e in 0..engines {
        for side in ["prefill", "decode"] {
            let mut child = Command::new(&exe)
                .args(["--worker", side, &e.to_string(), &engines.to_string()])
                .args([endpoint, &namespace])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start a worker process");
            let stdin = child.stdin.take();
            let stdout = BufReader::new(child.stdout.take().expect("worker stdout"));
            workers.push(Worker {
                child,
                stdin,
                stdout,
                decode: side == "decode",
            });
        }
    }
    for w in workers.iter_mut() {
        let l = w.line();
        assert_eq!(l.trim(), "ready", "a worker did not start");
    }
    let etcd_cpu_before = probe.cpu_s();
    let start = now_ms();
    for w in workers.iter_mut() {
        let stdin = w.stdin.as_mut().expect("worker stdin");
        stdin
            .write_all(b"go\n")
            .and_then(|_| stdin.flush())
            .expect("say go");
    }
    let results: Vec<(bool, serde_json::Value)> = workers
        .iter_mut()
        .map(|w| {
            let l = w.line();
            let v: serde_json::Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("a worker's result {l:?}: {e}"));
            (w.decode, v)
        })
        .collect();
    let (watch_streams, etcd_rss_mib) = (probe.streams(), probe.rss_mib());
    let etcd_cpu_s = probe.cpu_s() - etcd_cpu_before;
    let failures: Vec<String> = results
        .iter()
        .flat_map(|(_, v)| v["failures"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    let discovered_s = results
        .iter()
        .filter(|(d, _)| *d)
        .filter_map(|(_, v)| v["done_ms"].as_f64())
        .fold(f64::NAN, f64::max)
        - start;
    let f = |key: &str| -> Vec<f64> {
        results
            .iter()
            .filter_map(|(_, v)| v[key].as_f64())
            .collect()
    };
    let requests: f64 = f("requests").iter().sum();
    let rss_added: f64 = f("rss_added_kib").iter().sum();
    let base: Vec<f64> = f("rss_base_kib");
    let cached: f64 = f("cached_records").iter().copied().fold(0.0, f64::max);
    let clients = (2 * engines * TP) as f64;
    let (renewals_per_s, etcd_cpu_us_per_renewal) = (f64::NAN, f64::NAN);
    // Done: every process closes its clients and exits.
    for w in workers.iter_mut() {
        w.stdin.take();
    }
    for w in workers.iter_mut() {
        let _ = w.child.wait();
    }
    let left = ranks::left_behind(endpoint, &namespace, engines);
    eprintln!(
        "fleet [{mode}]: {engines} x {TP} per side in {} processes: all discovered in \
         {:.2} s; {:.1} requests/client; RSS +{:.0} KiB/client over a process base of {:.0} \
         KiB; {watch_streams} watch streams on etcd; left behind: {left:?}",
        2 * engines,
        discovered_s / 1e3,
        requests / clients,
        rss_added / clients,
        base.iter().sum::<f64>() / base.len().max(1) as f64
    );
    assert!(
        failures.is_empty(),
        "fleet [{mode}] {engines} x {TP}: {} failure(s); first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        left,
        Ok(0),
        "records left in etcd after every process closed"
    );
    Row {
        mode,
        processes: 2 * engines,
        clients: engines * TP,
        engines,
        tp: TP,
        discovered_s: discovered_s / 1e3,
        requests_per_client: requests / clients,
        rss_kib_per_client: rss_added / clients,
        watch_streams,
        etcd_rss_mib,
        etcd_cpu_s,
        renewals_per_s,
        etcd_cpu_us_per_renewal,
        cached_records_per_process: cached as usize,
    }
}

/// The worker process: `--worker SIDE ENGINE ENGINES ENDPOINT NAMESPACE`.
pub fn worker(args: &[String]) {
    let [side, engine, engines, endpoint, namespace] = args else {
        panic!("--worker SIDE ENGINE ENGINES ENDPOINT NAMESPACE, got {args:?}");
    };
    let engine: usize = engine.parse().expect("ENGINE");
    let engines: usize = engines.parse().expect("ENGINES");
    let decode = side == "decode";
    let opts = ranks::options(endpoint, namespace);
    let rank = move |r| match decode {
        true => Rank::Decode { engine, rank: r },
        false => Rank::Prefill { engine, rank: r },
    };
    let expected = std::sync::Arc::new(ranks::Expected::new(engines));
    ranks::trim_heap();
    let base = ranks::vm_rss_kib();
    println!("ready");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("go");
    // One thread per rank, as an engine's ranks start together.
    let done: Vec<_> = (0..TP)
        .map(|r| {
            let (opts, expected) = (opts.clone(), expected.clone());
            thread::spawn(move || {
                let client = ranks::open_rank(rank(r), &opts)?;
                if decode {
                    ranks::discover(&client, &expected, (engine, r))?;
                }
                Ok::<_, String>(client)
            })
        })
        .collect();
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for d in done {
        match d.join().expect("a rank thread panicked") {
            Ok(c) => clients.push(c),
            Err(e) => failures.push(e),
        }
    }
    let done_ms = now_ms();
    let requests: u64 = clients.iter().map(|c| c.requests_issued()).sum();
    let cached = clients.first().map_or(0, |c| c.cache_footprint().1);
    let line = serde_json::json!({
        "done_ms": done_ms,
        "requests": requests,
        "rss_base_kib": base,
        "rss_added_kib": ranks::vm_rss_kib() - base,
        "cached_records": cached,
        "failures": failures,
    });
    println!("{line}");
    // Hold the clients until the parent has counted etcd's watch streams.
    let mut rest = String::new();
    while std::io::stdin().read_line(&mut rest).is_ok_and(|n| n > 0) {}
    for c in clients {
        let _ = c.close();
    }
}
