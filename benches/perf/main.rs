//! The performance benchmark: nixl-etcd against its floor (the raw
//! etcd-client, same process, same run) and against NIXL's built-in etcd
//! exchange, on a private single-member etcd and a 3-member cluster.
//!
//!   cargo bench --bench perf            (NIXL_ETCD_BENCH_SAMPLES=N, default 1000)
//!
//! Writes target/perf/perf.md (the table), target/perf/perf.json (every
//! sample) and target/perf/perf.png (the plot, by benches/perf/plot.py).

#[path = "../../tests/common/mod.rs"]
mod common;

mod nixl_builtin;
mod ops;
mod stats;

use std::fmt::Write as _;
use std::path::PathBuf;

use stats::Row;

fn samples() -> usize {
    std::env::var("NIXL_ETCD_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1000)
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/perf");
    std::fs::create_dir_all(&dir).expect("create target/perf");
    dir
}

fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn markdown(rows: &[Row], n: usize) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "nixl-etcd performance, {} ({} cores), {n} samples per operation, loopback etcd {}\n",
        std::env::var("NIXL_ETCD_BENCH_MACHINE").unwrap_or_else(|_| "this machine".into()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        etcd_version()
    );
    md.push_str("| setup | operation | ours p50 | p90 | p99 | max | floor (raw etcd-client) | floor p50 | ours/floor p50 | multi-thread floor p50 | ours/it p50 | NIXL built-in p50 | NIXL/ours p50 |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let (fop, fp50, ratio) = match &r.floor {
            Some((op, f)) => (
                op.clone(),
                fmt_us(f.p50()),
                format!("{:.2}x", r.ours.p50() / f.p50()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let (mp50, mratio) = match &r.floor_mt {
            Some(f) => (fmt_us(f.p50()), format!("{:.2}x", r.ours.p50() / f.p50())),
            None => ("-".into(), "-".into()),
        };
        let (np50, nratio) = match &r.nixl {
            Some(s) => (fmt_us(s.p50()), format!("{:.1}x", s.p50() / r.ours.p50())),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.setup,
            r.op,
            fmt_us(r.ours.p50()),
            fmt_us(r.ours.pct(90.0)),
            fmt_us(r.ours.pct(99.0)),
            fmt_us(r.ours.pct(100.0)),
            fop,
            fp50,
            ratio,
            mp50,
            mratio,
            np50,
            nratio
        );
    }
    md.push_str(
        "\nTimes in microseconds. The multi-thread floor is the raw client on a 2-worker runtime, \
         driven from the caller's thread as the library's calls are. Fleet start-up: `cargo bench \
         --bench fleet`.\n",
    );
    md
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .unwrap_or_default()
}

fn main() {
    // Keep the table readable: the library logs at WARNING unless asked.
    if std::env::var_os("VLLM_LOGGING_LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("VLLM_LOGGING_LEVEL", "WARNING");
    }
    nixl_etcd::logging::init();
    let n = samples();
    let mut rows = Vec::new();

    let single = common::EtcdServer::start();
    let mut single_rows = ops::run("single", &single.endpoint(), n);
    match nixl_builtin::run(&single.endpoint(), n.min(300)) {
        Ok(nixl) => {
            for r in single_rows.iter_mut() {
                if let Some(s) = nixl.for_op(&r.op) {
                    r.nixl = Some(s);
                }
            }
        }
        Err(e) => eprintln!("perf: NIXL built-in exchange not measured: {e}"),
    }
    rows.extend(single_rows);
    drop(single);

    let cluster = common::EtcdCluster::start(3);
    rows.extend(ops::run("cluster3", &cluster.endpoints(), n));
    drop(cluster);

    let md = markdown(&rows, n);
    print!("{md}");
    let dir = out_dir();
    std::fs::write(dir.join("perf.md"), &md).expect("write perf.md");
    let json = serde_json::json!({
        "samples": n,
        "etcd": etcd_version(),
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
    });
    let json_path = dir.join("perf.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json).unwrap()).expect("write perf.json");
    let plot = std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/perf/plot.py"))
        .arg(&json_path)
        .arg(dir.join("perf.png"))
        .status();
    match plot {
        Ok(s) if s.success() => println!("plot: {}", dir.join("perf.png").display()),
        other => eprintln!("perf: plot not drawn ({other:?}); pip install matplotlib"),
    }
    println!(
        "table: {}\njson: {}",
        dir.join("perf.md").display(),
        json_path.display()
    );
}
