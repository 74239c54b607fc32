//! The first transfer after a prefill appears, against the ones after it,
//! with and without pre-warm, on this machine's CPU (real NIXL agents with
//! UCX over DRAM, a private etcd).
//!
//!   cargo bench --features nixl --bench prewarm [-- --json PATH]
//!
//! N rounds of each mode, alternated (default 30, `NIXL_ETCD_BENCH_SAMPLES`).
//! Each round a new prefill agent registers a new engine with 1 MiB of "KV
//! blocks", and a request comes once the registration is visible: it gets the
//! remote agent and READs one 64 KiB block (the first transfer). Later
//! requests come as the first did, after an idle gap (LATER_GAP, while the
//! decode's thread sleeps), each READing one block (steady: what the
//! hundredth request pays); then 10 READs back to back (a busy engine). On
//! this VM a READ after an idle gap costs several times one back to back,
//! connection or not: the vCPU sleeps. Modes, each with a decode agent of
//! its own:
//!
//! - `cold` (no pre-warm): the request waits for the record and loads the
//!   agent into NIXL (`Client::load_remote_agent`), then reads;
//! - `prewarm_load`: the pre-warm loaded the agent before the request
//!   (`PrewarmOptions::connect` off), the first READ connects;
//! - `prewarm_connect`: the pre-warm loaded the agent and connected to it;
//! - `prewarm`: as `prewarm_connect`, and the pre-warm ran the engine's
//!   warm-up (`PrewarmOptions::warmup`: `Warmup::read` of WARMUP_BYTES at
//!   another block of the region, from the layout the bench knows as an
//!   engine knows its peer's from its payload).
//!
//! Prints, per mode, p50 over the rounds of the first request (handshake left
//! on its path + its first READ), of a later request, of a READ back to back,
//! the ratios first/steady and first/back-to-back, and the handshake alone.
//! `--json` writes `{"prewarm": [{"mode", "first_ms", "steady_ms", "ratio",
//! "back_to_back_ms", "handshake_ms"}...]}`. Nothing here is a timed
//! assertion: the process fails only when a call fails.

#[path = "../tests/common/mod.rs"]
mod common;
// Percentiles as the performance report takes them (its rows are unused here).
#[allow(dead_code)]
#[path = "perf/stats.rs"]
mod stats;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{unique_namespace, EtcdServer};
use nixl_etcd::nixl::nixl_sys::{Agent, Backend, MemType, XferOp};
use nixl_etcd::prewarm::{Prewarm, PrewarmOptions, WarmupHook};
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

const BLOCKS: usize = 16;
const BLOCK: usize = 64 << 10;
const STEADY_READS: usize = 10;
const LATER_REQUESTS: usize = 5;
const LATER_GAP: Duration = Duration::from_millis(20);
/// The warm-up READ's size: a few bytes set up what every size uses.
const WARMUP_BYTES: usize = 64;

fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One decode agent with a local block registered, and its pre-warm (for
/// `cold`, a pre-warm of engines that never appear: it only holds the lock).
struct Decode<'a> {
    mode: &'static str,
    agent: &'a Agent,
    ucx: Backend,
    local: usize,
    pw: Prewarm,
    first: Vec<f64>,
    steady: Vec<f64>,
    busy: Vec<f64>,
    handshake: Vec<f64>,
}

/// One READ of `BLOCK` bytes at `remote_addr` of `remote`, timed from
/// preparing the request to its completion (ms).
fn read(d: &Decode, remote: &str, remote_addr: usize) -> R<f64> {
    let t = Instant::now();
    let x = d
        .agent
        .transfer(
            XferOp::Read,
            (MemType::Dram, MemType::Dram),
            &[(d.local, BLOCK, 0)],
            remote,
            &[(remote_addr, BLOCK, 0)],
            &d.ucx,
            None,
        )
        .map_err(|e| e.message)?;
    x.run(LONG).map_err(|e| e.message)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn run(json: Option<String>) -> R<()> {
    let n = rounds()?;
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-bench");
    let decode = open(&etcd.endpoint(), &ns)?;
    let prefill = open(&format!("http://localhost:{}", etcd.client_port()), &ns)?;
    let pid = std::process::id();
    let modes = [
        ("cold", false),
        ("prewarm_load", false),
        ("prewarm_connect", true),
        ("prewarm", true),
    ];
    // Each engine's KV address, as its payload would give it.
    let layouts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let agents: Vec<Agent> = modes
        .iter()
        .map(|(m, _)| Agent::new(&format!("bench-{m}-{pid}")).map_err(|e| e.message))
        .collect::<R<_>>()?;
    let mut bufs: Vec<Vec<u8>> = modes.iter().map(|_| vec![0u8; BLOCK]).collect();
    let mut sides = Vec::new();
    let mut regs = Vec::new();
    for (((mode, connect), agent), buf) in modes.iter().zip(&agents).zip(bufs.iter_mut()) {
        let ucx = agent.create_backend("UCX", &[]).map_err(|e| e.message)?;
        let local = buf.as_mut_ptr() as usize;
        regs.push(
            agent
                .register(MemType::Dram, &[(local, BLOCK, 0)], &ucx)
                .map_err(|e| e.message)?,
        );
        let warmup = (*mode == "prewarm").then(|| {
            let layouts = layouts.clone();
            WarmupHook::new(move |w| {
                let remote = *relock(&layouts)
                    .get(&w.loaded.engine_id)
                    .ok_or("no layout")?;
                let scratch = (local, WARMUP_BYTES, 0);
                w.read(
                    (MemType::Dram, MemType::Dram),
                    scratch,
                    (remote + BLOCK, WARMUP_BYTES, 0),
                )
                .map(drop)
                .map_err(|e| e.to_string())
            })
        });
        let opts = PrewarmOptions {
            engines: vec![format!("{mode}-*")],
            connect: *connect,
            warmup,
            ..Default::default()
        };
        // SAFETY: the agent outlives the pre-warm (dropped at the end of
        // this function, after `sides`); it is used only under its lock.
        let pw = unsafe { Prewarm::start_raw(&decode, agent.as_raw(), opts) }
            .map_err(|e| e.to_string())?;
        sides.push(Decode {
            mode,
            agent,
            ucx,
            local,
            pw,
            first: vec![],
            steady: vec![],
            busy: vec![],
            handshake: vec![],
        });
    }
    for i in 0..n {
        for d in sides.iter_mut() {
            // The cold side's engines match no pre-warm's pattern.
            let engine = match d.mode {
                "cold" => format!("unfollowed-{i}"),
                m => format!("{m}-{i}"),
            };
            let p = Agent::new(&format!("bench-{engine}-{pid}")).map_err(|e| e.message)?;
            let p_ucx = p.create_backend("UCX", &[]).map_err(|e| e.message)?;
            let kv = vec![7u8; BLOCKS * BLOCK];
            let addr = kv.as_ptr() as usize;
            relock(&layouts).insert(engine.clone(), addr);
            let _kv_reg = p
                .register(MemType::Dram, &[(addr, kv.len(), 0)], &p_ucx)
                .map_err(|e| e.message)?;
            prefill
                .publish_agent(&engine, 0, &p)
                .map_err(|e| e.to_string())?;
            let remote = if d.mode == "cold" {
                // The request comes once the registration is visible.
                decode
                    .wait(&engine, 0, Some(LONG))
                    .map_err(|e| e.to_string())?;
                d.pw.lock();
                let t = Instant::now();
                let remote = decode.load_remote_agent(d.agent, &engine, 0, Some(LONG));
                d.handshake.push(t.elapsed().as_secs_f64() * 1e3);
                remote.map_err(|e| e.to_string())?
            } else {
                // The request comes once the pre-warm has loaded the agent.
                d.pw.wait_remote(&engine, 0, Some(LONG))
                    .map_err(|e| e.to_string())?;
                d.pw.lock();
                let t = Instant::now();
                let remote = d.pw.remote(&engine, 0).ok_or("pre-warmed agent gone")?;
                d.handshake.push(t.elapsed().as_secs_f64() * 1e3);
                remote
            };
            let first = read(d, &remote, addr);
            let mut later = Vec::new();
            let mut busy = Vec::new();
            let mut steady_reads = || -> R<()> {
                for b in 1..=LATER_REQUESTS {
                    d.pw.unlock();
                    std::thread::sleep(LATER_GAP);
                    d.pw.lock();
                    later.push(read(d, &remote, addr + (b % BLOCKS) * BLOCK)?);
                }
                for b in 1..=STEADY_READS {
                    busy.push(read(d, &remote, addr + (b % BLOCKS) * BLOCK)?);
                }
                Ok(())
            };
            let steady = first
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|_| steady_reads());
            let done = if d.mode == "cold" {
                d.agent.invalidate_remote(&remote).map_err(|e| e.message)
            } else {
                Ok(())
            };
            d.pw.unlock();
            let handshake = *d.handshake.last().unwrap_or(&0.0);
            d.first.push(handshake + first?);
            steady?;
            d.steady.push(summary(later).0);
            d.busy.push(summary(busy).0);
            done?;
            // The prefill leaves; the pre-warm forgets its agent before it goes.
            prefill.unregister(&engine, 0).map_err(|e| e.to_string())?;
            if d.mode != "cold" && !common::wait_until(LONG, || d.pw.remote(&engine, 0).is_none()) {
                return Err(format!("{engine}: the pre-warm kept it after it left"));
            }
        }
    }
    println!(
        "first request after a prefill appears (handshake left on its path + first 64 KiB READ) \
         against a later request (after an idle gap) and a READ back to back, p50 over {n} \
         rounds (ms)"
    );
    let mut rows = Vec::new();
    for d in &sides {
        let p50 = |v: &Vec<f64>| summary(v.clone()).0;
        let (f, s, b, h) = (
            p50(&d.first),
            p50(&d.steady),
            p50(&d.busy),
            p50(&d.handshake),
        );
        println!(
            "  {:<16} first {f:8.4}  steady {s:7.4}  first/steady {:8.2}  back-to-back {b:7.4}  \
             first/back-to-back {:8.2}  (handshake {h:.4})",
            d.mode,
            f / s,
            f / b
        );
        rows.push(format!(
            "{{\"mode\":\"{}\",\"first_ms\":{f:.6},\"steady_ms\":{s:.6},\"ratio\":{:.4},\
             \"back_to_back_ms\":{b:.6},\"handshake_ms\":{h:.6}}}",
            d.mode,
            f / s
        ));
    }
    if let Some(path) = json {
        std::fs::write(&path, format!("{{\"prewarm\":[{}]}}\n", rows.join(",")))
            .map_err(|e| format!("write {path}: {e}"))?;
        println!("wrote {path}");
    }
    // Registrations before their backends (in `sides`).
    drop(regs);
    drop(sides);
    decode.close().map_err(|e| e.to_string())?;
    prefill.close().map_err(|e| e.to_string())?;
    Ok(())
}

fn main() {
    // `cargo bench` passes --bench; `--json PATH` is ours.
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    if let Err(e) = run(json) {
        eprintln!("bench prewarm failed: {e}");
        std::process::exit(1);
    }
}
