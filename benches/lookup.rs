//! Lookup latency of nixl-etcd against the raw etcd round trip it builds on.
//!
//! Run with `cargo bench --bench lookup`. One run starts a private
//! single-member etcd and measures, each with N samples (default 2000,
//! `NIXL_ETCD_BENCH_SAMPLES`):
//!
//! 1. floor: a raw etcd-client `get` of an 8 KiB value, on a current-thread
//!    tokio runtime owned by the bench, the client connected once;
//! 2. cold lookup through the C ABI (`nixl_etcd_lookup` + `nixl_etcd_buffer_free`):
//!    every sample asks for an engine the client has never asked about, so it
//!    is a cache miss served by an etcd get;
//! 3. warm lookup through the C ABI of one cached 8 KiB record;
//! 4. warm lookup through the C ABI of one cached 64 KiB record.
//!
//! Prints p50/p90/p99/max in microseconds and the ratio of each p50 to the
//! floor's, and writes the same results to `target/bench-lookup.json`. Nothing
//! here is a timed assertion: the process fails only when a call fails.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/capi/mod.rs"]
mod capi;

use std::ffi::{CStr, CString};
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::EtcdServer;
use nixl_etcd::ffi::{nixl_etcd_buffer, nixl_etcd_buffer_free, nixl_etcd_lookup, NIXL_ETCD_OK};

const DEFAULT_SAMPLES: usize = 2000;
const SAMPLES_ENV: &str = "NIXL_ETCD_BENCH_SAMPLES";
/// Untimed calls before each timed series.
const WARMUP: usize = 50;
const SMALL: usize = 8 * 1024;
const LARGE: usize = 64 * 1024;
/// Time given to a fresh informer to list its engine before warm lookups.
const SETTLE: Duration = Duration::from_millis(200);

type BenchResult<T> = Result<T, String>;

/// One measured operation.
struct Series {
    key: &'static str,
    operation: &'static str,
    bytes: usize,
    /// Sorted, in nanoseconds.
    sorted_ns: Vec<u64>,
}

impl Series {
    fn new(key: &'static str, operation: &'static str, bytes: usize, mut ns: Vec<u64>) -> Self {
        ns.sort_unstable();
        Series {
            key,
            operation,
            bytes,
            sorted_ns: ns,
        }
    }

    /// Nearest-rank percentile in microseconds.
    fn pct_us(&self, q: f64) -> f64 {
        let n = self.sorted_ns.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.sorted_ns[rank - 1] as f64 / 1000.0
    }

    fn p50(&self) -> f64 {
        self.pct_us(0.50)
    }
    fn p90(&self) -> f64 {
        self.pct_us(0.90)
    }
    fn p99(&self) -> f64 {
        self.pct_us(0.99)
    }
    fn max(&self) -> f64 {
        *self.sorted_ns.last().unwrap() as f64 / 1000.0
    }
    fn mean(&self) -> f64 {
        let sum: u128 = self.sorted_ns.iter().map(|&v| v as u128).sum();
        sum as f64 / self.sorted_ns.len() as f64 / 1000.0
    }
}

fn samples_from_env() -> BenchResult<usize> {
    match std::env::var(SAMPLES_ENV) {
        Err(_) => Ok(DEFAULT_SAMPLES),
        Ok(v) if v.trim().is_empty() => Ok(DEFAULT_SAMPLES),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{SAMPLES_ENV}={v:?}: expected a positive integer")),
        },
    }
}

fn failed(what: &str, f: capi::Failure) -> String {
    format!("{what}: status {}: {}", f.status, f.message)
}

/// One `nixl_etcd_lookup` + `nixl_etcd_buffer_free`, timed from the calling
/// thread. Returns the elapsed nanoseconds and the length that was copied out.
fn timed_lookup(h: capi::Handle, engine: &CStr, rank: u32) -> BenchResult<(u64, usize)> {
    let mut buf = nixl_etcd_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    };
    let start = Instant::now();
    // SAFETY: `h` is an open handle, `engine` is NUL-terminated and `buf` is a
    // writable buffer that is freed right after.
    let rc = unsafe { nixl_etcd_lookup(h.0, engine.as_ptr(), rank, &mut buf) };
    let len = buf.len;
    if rc == NIXL_ETCD_OK && len > 0 {
        // Touch the copy so that it cannot be optimized away.
        black_box(unsafe { *buf.data.add(len - 1) });
    }
    unsafe { nixl_etcd_buffer_free(&mut buf) };
    let elapsed = start.elapsed().as_nanos() as u64;
    if rc != NIXL_ETCD_OK {
        return Err(format!(
            "nixl_etcd_lookup({}, {rank}) returned {rc}: {}",
            engine.to_string_lossy(),
            capi::last_error()
        ));
    }
    Ok((elapsed, len))
}

fn expect_len(what: &str, got: usize, want: usize) -> BenchResult<()> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got} bytes, expected {want}"))
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("engine ids here hold no NUL")
}

/// 1. The floor: raw etcd-client gets of an 8 KiB value.
fn measure_floor(server: &EtcdServer, namespace: &str, n: usize) -> BenchResult<Series> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("build the bench's tokio runtime: {e}"))?;
    let mut etcd = rt
        .block_on(etcd_client::Client::connect([server.endpoint()], None))
        .map_err(|e| format!("etcd-client connect to {}: {e}", server.endpoint()))?;
    let key = format!("{namespace}-floor/value_8k");
    let value = capi::blob(0xF100, SMALL);
    rt.block_on(etcd.put(key.as_str(), value, None))
        .map_err(|e| format!("etcd-client put {key}: {e}"))?;

    let mut get = || -> BenchResult<u64> {
        let start = Instant::now();
        let resp = rt
            .block_on(etcd.get(key.as_str(), None))
            .map_err(|e| format!("etcd-client get {key}: {e}"))?;
        let elapsed = start.elapsed().as_nanos() as u64;
        let len = resp.kvs().first().map(|kv| kv.value().len()).unwrap_or(0);
        expect_len("etcd-client get", len, SMALL)?;
        Ok(elapsed)
    };
    for _ in 0..WARMUP {
        get()?;
    }
    let mut ns = Vec::with_capacity(n);
    for _ in 0..n {
        ns.push(get()?);
    }
    Ok(Series::new(
        "floor",
        "floor: etcd-client get 8 KiB",
        SMALL,
        ns,
    ))
}

/// Cold lookups (item 2): a fresh client per sample, opened and closed
/// outside the timing, so nothing is cached: the first interest in an engine.
fn measure_cold(options: &str, n: usize) -> BenchResult<Series> {
    let mut ns = Vec::with_capacity(n);
    for i in 0..(WARMUP + n) {
        let client = capi::open(options).map_err(|f| failed("open a cold-lookup client", f))?;
        let name = if i < WARMUP {
            format!("cold_warmup_{i}")
        } else {
            format!("cold_{}", i - WARMUP)
        };
        let id = cstring(&name);
        // The client's first call warms its connection; the timed lookup is
        // still the first interest in its engine.
        let first = cstring(&format!("cold_warmup_{}", i % WARMUP));
        timed_lookup(client, &first, 0)?;
        let looked = timed_lookup(client, &id, 0);
        client
            .close()
            .map_err(|f| failed("close a cold-lookup client", f))?;
        let (t, len) = looked?;
        expect_len("cold lookup", len, SMALL)?;
        if i >= WARMUP {
            ns.push(t);
        }
    }
    Ok(Series::new(
        "cold",
        "cold lookup 8 KiB (C ABI, fresh client, miss)",
        SMALL,
        ns,
    ))
}

/// 3 and 4. Warm lookups of one cached record, repeated.
fn measure_warm(
    client: capi::Handle,
    engine: &str,
    bytes: usize,
    key: &'static str,
    operation: &'static str,
    n: usize,
) -> BenchResult<Series> {
    let id = cstring(engine);
    for _ in 0..5 {
        let (_, len) = timed_lookup(client, &id, 0)?;
        expect_len("warm-up lookup", len, bytes)?;
    }
    // Let the informer list the engine, so that what follows are cache hits.
    std::thread::sleep(SETTLE);
    for _ in 0..WARMUP {
        let (_, len) = timed_lookup(client, &id, 0)?;
        expect_len("warm-up lookup", len, bytes)?;
    }
    let mut ns = Vec::with_capacity(n);
    for _ in 0..n {
        let (t, len) = timed_lookup(client, &id, 0)?;
        expect_len("warm lookup", len, bytes)?;
        ns.push(t);
    }
    Ok(Series::new(key, operation, bytes, ns))
}

struct Report {
    samples: usize,
    setup_s: f64,
    series: Vec<Series>,
}

fn run() -> BenchResult<Report> {
    let n = samples_from_env()?;
    // The library logs registrations at INFO by default; keep the table
    // readable unless the caller chose a level.
    if std::env::var_os("VLLM_LOGGING_LEVEL").is_none() && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("VLLM_LOGGING_LEVEL", "WARNING");
    }

    let setup = Instant::now();
    let server = EtcdServer::start();
    let namespace = common::unique_namespace("bench-lookup");
    let options = server.options_json(&namespace, "");
    eprintln!(
        "etcd at {} (single member); {n} samples per operation; registering {} records...",
        server.endpoint(),
        n + WARMUP + 2
    );

    // Every record is published by its own client, apart from the readers.
    let writer = capi::open(&options).map_err(|f| failed("open the registering client", f))?;
    let result: BenchResult<_> = (|| {
        let reg = |engine: &str, seed: u32, len: usize| {
            writer
                .register(engine, 0, &capi::blob(seed, len))
                .map_err(|f| failed(&format!("register {engine} rank 0"), f))
        };
        for j in 0..WARMUP {
            reg(&format!("cold_warmup_{j}"), 100_000 + j as u32, SMALL)?;
        }
        for i in 0..n {
            reg(&format!("cold_{i}"), i as u32, SMALL)?;
        }
        reg("warm_8k", 0xA8, SMALL)?;
        reg("warm_64k", 0xA64, LARGE)?;
        let setup_s = setup.elapsed().as_secs_f64();
        eprintln!("setup done in {setup_s:.1} s; measuring...");

        let floor = measure_floor(&server, &namespace, n)?;
        let cold = measure_cold(&options, n)?;

        let reader = capi::open(&options).map_err(|f| failed("open the warm-lookup client", f))?;
        let warm = (|| {
            let small = measure_warm(
                reader,
                "warm_8k",
                SMALL,
                "warm_8k",
                "warm lookup 8 KiB (C ABI, hit)",
                n,
            )?;
            let large = measure_warm(
                reader,
                "warm_64k",
                LARGE,
                "warm_64k",
                "warm lookup 64 KiB (C ABI, hit)",
                n,
            )?;
            Ok::<_, String>((small, large))
        })();
        let closed = reader
            .close()
            .map_err(|f| failed("close the warm-lookup client", f));
        let (small, large) = warm?;
        closed?;
        Ok(Report {
            samples: n,
            setup_s,
            series: vec![floor, cold, small, large],
        })
    })();
    let closed = writer
        .close()
        .map_err(|f| failed("close the registering client", f));
    let report = result?;
    closed?;
    drop(server);
    Ok(report)
}

fn ratio(s: &Series, floor: &Series) -> f64 {
    s.p50() / floor.p50()
}

fn print_table(r: &Report) {
    let floor = &r.series[0];
    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "operation", "p50 us", "p90 us", "p99 us", "max us", "p50/floor"
    );
    println!("{}", "-".repeat(34 + 5 * 11));
    for s in &r.series {
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.3}x",
            s.operation,
            s.p50(),
            s.p90(),
            s.p99(),
            s.max(),
            ratio(s, floor)
        );
    }
    println!();
    println!("{}", summary(r));
}

fn summary(r: &Report) -> String {
    let floor = &r.series[0];
    let find = |k: &str| r.series.iter().find(|s| s.key == k).unwrap();
    format!(
        "warm lookup p50 is {:.4}x the raw etcd get (floor); cold lookup p50 is {:.2}x \
         ({} samples each)",
        ratio(find("warm_8k"), floor),
        ratio(find("cold"), floor),
        r.samples
    )
}

fn json_path() -> PathBuf {
    // `target/bench-lookup.json`, beside the profile dirs.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-lookup.json")
}

fn write_json(r: &Report) -> BenchResult<PathBuf> {
    let floor = &r.series[0];
    let results: Vec<serde_json::Value> = r
        .series
        .iter()
        .map(|s| {
            serde_json::json!({
                "key": s.key,
                "operation": s.operation,
                "metadata_bytes": s.bytes,
                "samples": s.sorted_ns.len(),
                "p50_us": s.p50(),
                "p90_us": s.p90(),
                "p99_us": s.p99(),
                "max_us": s.max(),
                "mean_us": s.mean(),
                "p50_ratio_to_floor": ratio(s, floor),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "bench": "lookup",
        "crate_version": env!("CARGO_PKG_VERSION"),
        "samples": r.samples,
        "warmup_calls": WARMUP,
        "setup_s": r.setup_s,
        "unit": "microseconds",
        "percentile_method": "nearest rank",
        "results": results,
        "summary": summary(r),
    });
    let path = json_path();
    let text = serde_json::to_string_pretty(&doc).map_err(|e| format!("encode JSON: {e}"))?;
    std::fs::write(&path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}

fn main() {
    let started = Instant::now();
    let report = match run() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench lookup failed: {e}");
            std::process::exit(1);
        }
    };
    print_table(&report);
    match write_json(&report) {
        Ok(path) => println!("results written to {}", path.display()),
        Err(e) => {
            eprintln!("bench lookup failed: {e}");
            std::process::exit(1);
        }
    }
    eprintln!("total {:.1} s", started.elapsed().as_secs_f64());
}
