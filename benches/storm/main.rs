//! The restart storm: a fleet of real NIXL engines on a 3-member etcd cluster
//! while engines are killed, stalled and restarted, the etcd leader is killed
//! and etcd loses its quorum; decodes send requests without pause and check
//! every byte. What it does is in `run.rs`; the engines are
//! `examples/storm_engine.rs`.
//!
//!   cargo bench --bench storm --features nixl -- [--seconds N] [--seed S] [--json PATH]
//!       [--prefills P] [--decodes D] [--ttl-s T] [--quorum-loss-s Q]
//!
//! Defaults: 180 s, seed 1, 4 + 4 engines, TTL 3 s, 15 s without quorum.
//! Builds the engine program first when it is missing.

#[path = "../../tests/common/mod.rs"]
mod common;
mod run;
mod shared;

use std::process::Command;

use run::{percentile, Options, Report};

fn parse() -> Result<(Options, Option<String>), String> {
    let mut o = Options::new(180.0, 1);
    let mut json = None;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        // `cargo bench` passes --bench to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = || format!("bad value for {flag}: {v}");
        match flag.as_str() {
            "--seconds" => o.seconds = v.parse().map_err(|_| bad())?,
            "--seed" => o.seed = v.parse().map_err(|_| bad())?,
            "--json" => json = Some(v.clone()),
            "--prefills" => o.prefills = v.parse().map_err(|_| bad())?,
            "--decodes" => o.decodes = v.parse().map_err(|_| bad())?,
            "--ttl-s" => o.ttl_s = v.parse().map_err(|_| bad())?,
            "--quorum-loss-s" => o.quorum_loss_s = v.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok((o, json))
}

/// `cargo bench` does not build examples: build the engine program once.
fn build_engine(o: &Options) {
    if o.engine.exists() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--features",
            "nixl",
            "--example",
            "storm_engine",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "building examples/storm_engine failed");
}

fn print_table(r: &Report) {
    let ms = |v: &[f64], p| {
        let x = percentile(v, p);
        if x.is_finite() {
            format!("{x:.1} ms")
        } else {
            "-".into()
        }
    };
    let causes = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            return "none".to_owned();
        }
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows = [
        ("storm", format!("{:.0} s, seed {}", r.seconds, r.seed)),
        (
            "faults",
            format!(
                "{} engine kills, {} stall(s) past the TTL, {} etcd leader kill(s), {:.1} s without quorum",
                r.kills, r.stalls, r.leader_kills, r.quorum_loss.seconds
            ),
        ),
        (
            "stalled prefill",
            format!(
                "served {} requests after its SIGCONT, loaded again by {} decodes",
                r.served_after_stall, r.reloads_after_stall
            ),
        ),
        (
            "requests",
            format!(
                "{} (each {} at p50, {} at p99)",
                r.requests,
                ms(&r.request_ms, 0.5),
                ms(&r.request_ms, 0.99)
            ),
        ),
        ("ok", r.ok.to_string()),
        (
            "failed",
            format!(
                "{} ({} not caused by the faults)",
                causes(&r.failed),
                r.unexpected_failures()
            ),
        ),
        ("stale transfers", r.stale_transfers.to_string()),
        (
            "detection p50 / p99",
            format!(
                "{} / {} ({} samples: {})",
                ms(&r.detection_ms, 0.5),
                ms(&r.detection_ms, 0.99),
                r.detection_ms.len(),
                causes(&r.detected_by)
            ),
        ),
        (
            "recovery p50 / p99",
            format!(
                "{} / {} ({} restarts, {} never recovered)",
                ms(&r.recovery_ms, 0.5),
                ms(&r.recovery_ms, 0.99),
                r.recovery_ms.len(),
                r.unrecovered
            ),
        ),
        (
            "during the quorum loss",
            format!(
                "{} requests, {} ok, failed: {}",
                r.quorum_loss.requests,
                r.quorum_loss.ok,
                causes(&r.quorum_loss.failed)
            ),
        ),
        (
            "at the end",
            format!(
                "{} unserved pairs, {} engines needing a manual restart, {} stale holds (settled in {:.1} s)",
                r.unserved_pairs, r.manual_restarts, r.stale_holds, r.settle_s
            ),
        ),
    ];
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}

fn main() {
    let (o, json) = match parse() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("storm: {e}");
            std::process::exit(2);
        }
    };
    build_engine(&o);
    let r = run::run(&o);
    print_table(&r);
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&r.to_json()).expect("json");
        std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {path}: {e}"));
        println!("wrote {path}");
    }
}
