//! The handshake left on a request's path, with and without pre-warm, on this
//! machine's CPU (real NIXL agents with UCX over DRAM, a private etcd).
//!
//! Run with `cargo bench --features nixl --bench prewarm` (N rounds of each
//! mode, alternated; default 30, `NIXL_ETCD_BENCH_SAMPLES`). One decode client
//! and NIXL agent; each round a new prefill agent registers a new engine, and
//! a "request" for it comes once the registration is visible:
//!
//! - cold (the floor: what a request pays without pre-warm): the engine is one
//!   the pre-warm does not follow; the request waits for its record and loads
//!   the agent into NIXL (`Client::load_remote_agent`);
//! - pre-warm: the engine matches the pre-warm's pattern; the request comes
//!   once the pre-warm loaded it and asks `Prewarm::remote`.
//!
//! Prints p50/p90/max of the time on the request's path for both and their
//! ratio, and for pre-warm the lag from registration to loaded (off the path).
//! Nothing here is a timed assertion: the process fails only when a call fails.

#[path = "../tests/common/mod.rs"]
mod common;
// Percentiles as the performance report takes them (its rows are unused here).
#[allow(dead_code)]
#[path = "perf/stats.rs"]
mod stats;

use std::time::{Duration, Instant};

use common::{unique_namespace, EtcdServer};
use nixl_etcd::nixl::nixl_sys::Agent;
use nixl_etcd::prewarm::{Prewarm, PrewarmOptions};
use nixl_etcd::{Client, Config};

const DEFAULT_ROUNDS: usize = 30;
const ROUNDS_ENV: &str = "NIXL_ETCD_BENCH_SAMPLES";
const LONG: Duration = Duration::from_secs(60);

type R<T> = Result<T, String>;

/// A client of `endpoint`: the prefill names etcd by host name, so that it
/// is another identity with its own cache, and its records reach the decode
/// through etcd's watch as another process's would.
fn open(endpoint: &str, ns: &str) -> R<Client> {
    let opts = format!("{{\"endpoints\":\"{endpoint}\",\"namespace\":\"{ns}\"}}");
    let cfg = Config::from_sources(|_| None, Some(&opts)).map_err(|e| e.to_string())?;
    Client::open(cfg).map_err(|e| e.to_string())
}

fn rounds() -> R<usize> {
    match std::env::var(ROUNDS_ENV) {
        Err(_) => Ok(DEFAULT_ROUNDS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{ROUNDS_ENV}={v:?}: expected a positive integer")),
        },
    }
}

/// p50, p90 and max of samples in milliseconds (`pct` keeps the unit).
fn summary(ms: Vec<f64>) -> (f64, f64, f64) {
    let s = stats::Series::new(ms);
    (s.pct(50.0), s.pct(90.0), s.pct(100.0))
}

fn run() -> R<()> {
    let n = rounds()?;
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-bench");
    let decode = open(&etcd.endpoint(), &ns)?;
    let prefill = open(&format!("http://localhost:{}", etcd.client_port()), &ns)?;
    let pid = std::process::id();
    let agent = Agent::new(&format!("bench-decode-{pid}")).map_err(|e| e.message)?;
    let _ucx = agent.create_backend("UCX", &[]).map_err(|e| e.message)?;
    let opts = PrewarmOptions {
        engines: vec!["warm-*".into()],
        ..Default::default()
    };
    let pw = Prewarm::start(&decode, agent, opts).map_err(|e| e.to_string())?;
    let (mut cold, mut warm, mut lag, mut load) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        for prewarmed in [false, true] {
            let engine = format!("{}-{i}", if prewarmed { "warm" } else { "cold" });
            let p = Agent::new(&format!("bench-{engine}-{pid}")).map_err(|e| e.message)?;
            let _p_ucx = p.create_backend("UCX", &[]).map_err(|e| e.message)?;
            prefill
                .publish_agent(&engine, 0, &p)
                .map_err(|e| e.to_string())?;
            let registered = Instant::now();
            let remote = if prewarmed {
                // The request comes once the pre-warm has loaded the agent.
                pw.wait_remote(&engine, 0, Some(LONG))
                    .map_err(|e| e.to_string())?;
                lag.push(registered.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                let remote = pw.remote(&engine, 0).ok_or("pre-warmed agent gone")?;
                warm.push(t.elapsed().as_secs_f64() * 1e3);
                let l = pw.loaded().into_iter().find(|l| l.engine_id == engine);
                load.push(l.map_or(0.0, |l| l.load_time.as_secs_f64() * 1e3));
                remote
            } else {
                // The request comes once the registration is visible.
                decode
                    .wait(&engine, 0, Some(LONG))
                    .map_err(|e| e.to_string())?;
                let guard = pw.agent().ok_or("no agent")?;
                let t = Instant::now();
                let remote = decode
                    .load_remote_agent(&guard, &engine, 0, Some(LONG))
                    .map_err(|e| e.to_string())?;
                cold.push(t.elapsed().as_secs_f64() * 1e3);
                remote
            };
            if remote != p.name() {
                return Err(format!(
                    "{engine}: loaded {remote}, registered {}",
                    p.name()
                ));
            }
            // The prefill leaves; the decode forgets its agent before it goes.
            prefill.unregister(&engine, 0).map_err(|e| e.to_string())?;
            if prewarmed {
                if !common::wait_until(LONG, || pw.remote(&engine, 0).is_none()) {
                    return Err(format!("{engine}: the pre-warm kept it after it left"));
                }
            } else {
                let guard = pw.agent().ok_or("no agent")?;
                guard.invalidate_remote(&remote).map_err(|e| e.message)?;
            }
        }
    }
    let (c50, c90, cmax) = summary(cold);
    let (w50, w90, wmax) = summary(warm);
    let (l50, l90, lmax) = summary(lag);
    let (n50, n90, nmax) = summary(load);
    println!("handshake on the request's path, {n} rounds of each (ms): p50 / p90 / max");
    println!("  cold (wait + NIXL load, the floor) {c50:9.4} / {c90:9.4} / {cmax:9.4}");
    println!("  pre-warm (Prewarm::remote)         {w50:9.4} / {w90:9.4} / {wmax:9.4}");
    println!("  ratio pre-warm / cold at p50: {:.5}", w50 / c50);
    println!("off the path, pre-warm: registration -> loaded {l50:.3} / {l90:.3} / {lmax:.3}; NIXL load {n50:.3} / {n90:.3} / {nmax:.3}");
    drop(pw);
    decode.close().map_err(|e| e.to_string())?;
    prefill.close().map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench prewarm failed: {e}");
        std::process::exit(1);
    }
}
