//! The fleet benchmark: E prefill and E decode engines of 8 ranks, one
//! client per rank, all-to-all (every decode rank reads its target rank of
//! every prefill engine), started together. Measured per size: the time until
//! the last decode rank has all of its targets, etcd requests per client,
//! resident memory per client, and the watch streams open on etcd; in one
//! process, and as one process per engine straight to etcd and through
//! `etcd grpc-proxy`.
//!
//!   cargo bench --bench fleet [-- --json PATH] [--sizes 32,128,512,2048]
//!                             [--modes one,procs,proxy] [--hold SECONDS]
//!
//! Sizes are ranks per side. Prints a table; `--json` writes
//! `{"fleet":[{"mode","processes","clients","engines","tp","discovered_s",
//! "requests_per_client","rss_kib_per_client","watch_streams",
//! "cached_records_per_process"}...]}`.

#[path = "../../tests/common/mod.rs"]
mod common;

mod one_process;
mod procs;
mod ranks;

use ranks::TP;

/// What etcd's process and metrics say, read while the fleet is up.
pub struct Probe<'a>(&'a common::EtcdServer);

impl Probe<'_> {
    /// gRPC watch streams open on etcd.
    pub fn streams(&self) -> f64 {
        self.0.metric("etcd_debugging_mvcc_watch_stream_total")
    }

    /// etcd's resident memory (MiB).
    pub fn rss_mib(&self) -> f64 {
        ranks::rss_kib_of(&self.0.pid().to_string()).map_or(f64::NAN, |kib| kib / 1024.0)
    }

    /// CPU seconds (user + system) etcd has used.
    pub fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.pid()));
        // Fields after the command's closing parenthesis: utime and stime are
        // the 12th and 13th, in clock ticks.
        let ticks = stat.ok().and_then(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?)
        });
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks.map_or(f64::NAN, |t| t / hz)
    }
}

/// One size in one mode.
pub struct Row {
    pub mode: &'static str,
    pub processes: usize,
    /// Ranks (clients) per side.
    pub clients: usize,
    pub engines: usize,
    pub tp: usize,
    pub discovered_s: f64,
    pub requests_per_client: f64,
    pub rss_kib_per_client: f64,
    /// etcd's `etcd_debugging_mvcc_watch_stream_total` with the fleet up.
    pub watch_streams: f64,
    /// etcd's resident memory with the fleet up (MiB).
    pub etcd_rss_mib: f64,
    /// CPU seconds etcd used from the start until all were discovered.
    pub etcd_cpu_s: f64,
    /// Lease renewals per second with the fleet idle, and etcd's CPU per
    /// renewal (measured in one process with `--hold`; NaN otherwise).
    pub renewals_per_s: f64,
    pub etcd_cpu_us_per_renewal: f64,
    /// Records held by one process's shared cache (the largest).
    pub cached_records_per_process: usize,
}

impl Row {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode,
            "processes": self.processes,
            "clients": self.clients,
            "engines": self.engines,
            "tp": self.tp,
            "discovered_s": self.discovered_s,
            "requests_per_client": self.requests_per_client,
            "rss_kib_per_client": self.rss_kib_per_client,
            "watch_streams": self.watch_streams,
            "etcd_rss_mib": self.etcd_rss_mib,
            "etcd_cpu_s": self.etcd_cpu_s,
            "renewals_per_s": self.renewals_per_s,
            "etcd_cpu_us_per_renewal": self.etcd_cpu_us_per_renewal,
            "cached_records_per_process": self.cached_records_per_process,
        })
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        nixl_etcd::logging::init();
        return procs::worker(&args[1..]);
    }
    if std::env::var_os("VLLM_LOGGING_LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("VLLM_LOGGING_LEVEL", "WARNING");
    }
    nixl_etcd::logging::init();
    let sizes: Vec<usize> = arg(&args, "--sizes")
        .unwrap_or_else(|| "32,128,512,2048".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("--sizes: ranks per side, e.g. 32,128")
        })
        .collect();
    let modes = arg(&args, "--modes").unwrap_or_else(|| "one,procs,proxy".into());
    let json = arg(&args, "--json");
    // Seconds to hold the one-process fleet idle after discovery, to measure
    // lease renewals against etcd's CPU.
    let hold = std::time::Duration::from_secs_f64(
        arg(&args, "--hold").map_or(0.0, |h| h.parse().expect("--hold SECONDS")),
    );
    let largest = sizes.iter().max().copied().unwrap_or(0);
    // A connection per client, and room for etcd and the proxy.
    one_process::raise_nofile((8 * largest + 4096) as u64);

    let etcd = common::EtcdServer::start();
    let probe = Probe(&etcd);
    let mut rows = Vec::new();
    for &size in &sizes {
        let engines = size.div_ceil(TP);
        if modes.contains("one") {
            rows.push(one_process::run_size(
                &etcd.endpoint(),
                engines,
                &probe,
                hold,
            ));
        }
        if modes.contains("procs") {
            rows.push(procs::run_size(
                &etcd.endpoint(),
                engines,
                "processes",
                &probe,
            ));
        }
        if modes.contains("proxy") {
            let proxy = common::GrpcProxy::start(&etcd.endpoint());
            rows.push(procs::run_size(
                &proxy.endpoint(),
                engines,
                "processes, proxy",
                &probe,
            ));
        }
    }
    println!(
        "| mode | ranks per side | processes | all discovered | etcd requests per client | RSS per client | watch streams on etcd | etcd RSS | etcd CPU | records cached per process |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} ({} x {}) | {} | {:.2} s | {:.1} | {:.0} KiB | {} | {:.0} MiB | {:.1} s | {} |",
            r.mode,
            r.clients,
            r.engines,
            r.tp,
            r.processes,
            r.discovered_s,
            r.requests_per_client,
            r.rss_kib_per_client,
            r.watch_streams,
            r.etcd_rss_mib,
            r.etcd_cpu_s,
            r.cached_records_per_process
        );
    }
    for r in rows.iter().filter(|r| !r.renewals_per_s.is_nan()) {
        println!(
            "idle fleet of {} clients: {:.0} lease renewals/s, etcd CPU {:.1} us per renewal",
            2 * r.clients,
            r.renewals_per_s,
            r.etcd_cpu_us_per_renewal
        );
    }
    if let Some(path) = json {
        let doc = serde_json::json!({"fleet": rows.iter().map(Row::to_json).collect::<Vec<_>>()});
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).expect("write --json");
        println!("json: {path}");
    }
}
