//! Register and lookup of large metadata (8 MiB and 64 MiB, stored in
//! chunks), through the C ABI, against its floor: a raw etcd-client doing the
//! same etcd work in the same run.
//!
//! Run with `cargo bench --bench large`. Starts a private single-member etcd
//! (default `--max-request-bytes`, 1.5 MiB) and, for each size, takes N
//! samples (default 20, `NIXL_ETCD_BENCH_SAMPLES`) of, interleaved:
//! - register: `nixl_etcd_register` of a new blob over the same rank (new
//!   chunk generation, record, old generation dropped); floor: the same chunk
//!   puts with the lease, four in flight, then one put of a small record;
//! - cold lookup: `nixl_etcd_lookup` by a client that never asked about the
//!   engine (its informer lists the engine and fetches the chunks at the
//!   record's revision, then the checksum is checked and the blob copied
//!   into the caller's buffer); floor: a get of the record, then range gets
//!   of the chunks, 16 MiB per request.
//!
//! Prints a markdown table and writes `target/perf/large.md` and
//! `large.json`. Nothing here is a timed assertion.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "../tests/capi/mod.rs"]
mod capi;

use std::path::PathBuf;
use std::time::Instant;

use etcd_client::{GetOptions, PutOptions};
use nixl_etcd::blob;
use nixl_etcd::ffi::{nixl_etcd_buffer, nixl_etcd_buffer_free, nixl_etcd_lookup, NIXL_ETCD_OK};

const MIB: usize = 1 << 20;
const SIZES: [usize; 2] = [8 * MIB, 64 * MIB];
/// etcd's default request limit, which the library assumes too.
const MAX_REQUEST: usize = 1536 * 1024;
const IN_FLIGHT: usize = 4;

type R<T> = Result<T, String>;

fn samples() -> usize {
    std::env::var("NIXL_ETCD_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(20)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// The raw etcd-client doing what the library does for one blob.
struct Floor {
    rt: tokio::runtime::Runtime,
    etcd: etcd_client::Client,
    lease: i64,
}

impl Floor {
    fn connect(endpoint: &str) -> R<Floor> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let (etcd, lease) = rt.block_on(async {
            let etcd = etcd_client::Client::connect([endpoint], None)
                .await
                .map_err(|e| e.to_string())?;
            let lease = etcd
                .lease_client()
                .grant(60, None)
                .await
                .map_err(|e| e.to_string())?
                .id();
            Ok::<_, String>((etcd, lease))
        })?;
        Ok(Floor { rt, etcd, lease })
    }

    /// Chunk puts (four in flight) then a small record put; seconds.
    fn register(&self, prefix: &str, data: &[u8]) -> R<f64> {
        let chunk = blob::chunk_size(MAX_REQUEST, prefix.len() + 17);
        let chunks: Vec<(String, Vec<u8>)> = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| (format!("{prefix}chunks/{i:06}"), c.to_vec()))
            .collect();
        let start = Instant::now();
        self.rt.block_on(async {
            for batch in chunks.chunks(IN_FLIGHT) {
                let mut set = tokio::task::JoinSet::new();
                for (k, v) in batch.iter().cloned() {
                    let mut kv = self.etcd.kv_client();
                    let opts = PutOptions::new().with_lease(self.lease);
                    set.spawn(async move { kv.put(k, v, Some(opts)).await });
                }
                while let Some(r) = set.join_next().await {
                    r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                }
            }
            let opts = PutOptions::new().with_lease(self.lease);
            self.etcd
                .kv_client()
                .put(format!("{prefix}record"), vec![b'r'; 400], Some(opts))
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        })?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// A get of the record, then the chunks in 16 MiB pages; seconds.
    fn lookup(&self, prefix: &str, len: usize) -> R<f64> {
        let start = Instant::now();
        let got = self.rt.block_on(async {
            let mut kv = self.etcd.kv_client().max_decoding_message_size(64 * MIB);
            kv.get(format!("{prefix}record"), None)
                .await
                .map_err(|e| e.to_string())?;
            let from = format!("{prefix}chunks/");
            let end = format!("{prefix}chunks0");
            let per = (16 * MIB / blob::chunk_size(MAX_REQUEST, prefix.len() + 17)) as i64;
            let mut key = from.into_bytes();
            let mut out = Vec::with_capacity(len);
            loop {
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(per.max(1));
                let resp = kv
                    .get(key.clone(), Some(opts))
                    .await
                    .map_err(|e| e.to_string())?;
                for kv in resp.kvs() {
                    out.extend_from_slice(kv.value());
                }
                match resp.kvs().last() {
                    Some(last) if resp.more() => {
                        key = last.key().to_vec();
                        key.push(0);
                    }
                    _ => break,
                }
            }
            Ok::<_, String>(out)
        })?;
        let t = start.elapsed().as_secs_f64();
        if got.len() != len {
            return Err(format!("floor read {} bytes of {len}", got.len()));
        }
        Ok(t)
    }
}

struct Measured {
    size: usize,
    register: (Vec<f64>, Vec<f64>),
    lookup: (Vec<f64>, Vec<f64>),
}

fn measure(etcd: &common::EtcdServer, floor: &Floor, size: usize, n: usize) -> R<Measured> {
    let ns = common::unique_namespace("large-bench");
    let opts = etcd.options_json(&ns, "\"timeout_s\":60");
    let writer = capi::open(&opts).map_err(|f| format!("open: {f:?}"))?;
    let floor_prefix = format!("{ns}-floor/");
    let mut m = Measured {
        size,
        register: (Vec::new(), Vec::new()),
        lookup: (Vec::new(), Vec::new()),
    };
    // One untimed round of each first.
    for i in 0..=n {
        let data = capi::blob(i as u32, size);
        let start = Instant::now();
        writer
            .register("big", 0, &data)
            .map_err(|f| format!("register: {f:?}"))?;
        let ours = start.elapsed().as_secs_f64();
        let theirs = floor.register(&format!("{floor_prefix}{i}/"), &data)?;
        let reader = capi::open(&opts).map_err(|f| format!("open: {f:?}"))?;
        // The C call alone (its copy into the returned buffer included);
        // the bytes are checked after the clock stops.
        let engine = c"big";
        let mut buf = nixl_etcd_buffer {
            data: std::ptr::null_mut(),
            len: 0,
        };
        let start = Instant::now();
        // SAFETY: an open handle, a NUL-terminated id, a writable buffer.
        let rc = unsafe { nixl_etcd_lookup(reader.0, engine.as_ptr(), 0, &mut buf) };
        let ours_lookup = start.elapsed().as_secs_f64();
        if rc != NIXL_ETCD_OK {
            return Err(format!("lookup: status {rc}: {}", capi::last_error()));
        }
        // SAFETY: the library filled `buf` with `len` bytes.
        let same = unsafe { std::slice::from_raw_parts(buf.data, buf.len) } == data.as_slice();
        // SAFETY: a buffer the library filled, freed once.
        unsafe { nixl_etcd_buffer_free(&mut buf) };
        reader.close().map_err(|f| format!("close: {f:?}"))?;
        if !same {
            return Err("lookup returned other bytes".into());
        }
        let theirs_lookup = floor.lookup(&format!("{floor_prefix}{i}/"), size)?;
        if i > 0 {
            m.register.0.push(ours);
            m.register.1.push(theirs);
            m.lookup.0.push(ours_lookup);
            m.lookup.1.push(theirs_lookup);
        }
    }
    writer.close().map_err(|f| format!("close: {f:?}"))?;
    Ok(m)
}

fn row(op: &str, size: usize, ours: &[f64], floor: &[f64]) -> (String, serde_json::Value) {
    let ms = |v: &[f64], p| pct(v, p) * 1e3;
    let mb_s = size as f64 / MIB as f64 / pct(ours, 50.0);
    let line = format!(
        "| {op} {} MiB | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.0} |",
        size / MIB,
        ms(ours, 50.0),
        ms(ours, 90.0),
        ms(ours, 100.0),
        ms(floor, 50.0),
        ms(floor, 90.0),
        pct(ours, 50.0) / pct(floor, 50.0),
        mb_s
    );
    let json = serde_json::json!({
        "op": op, "bytes": size, "samples": ours.len(),
        "ours_ms": {"p50": ms(ours, 50.0), "p90": ms(ours, 90.0), "max": ms(ours, 100.0)},
        "floor_ms": {"p50": ms(floor, 50.0), "p90": ms(floor, 90.0), "max": ms(floor, 100.0)},
        "ratio_p50": pct(ours, 50.0) / pct(floor, 50.0),
    });
    (line, json)
}

fn main() {
    if std::env::var_os("VLLM_LOGGING_LEVEL").is_none() {
        std::env::set_var("VLLM_LOGGING_LEVEL", "WARNING");
    }
    nixl_etcd::logging::init();
    let n = samples();
    let etcd = common::EtcdServer::builder()
        .arg("--quota-backend-bytes=8589934592")
        .start();
    let floor = Floor::connect(&etcd.endpoint()).expect("floor connects");
    let mut lines = vec![
        format!(
            "Large metadata, {n} samples per row, single etcd on loopback, \
             --max-request-bytes 1.5 MiB (ms)\n"
        ),
        "| operation | p50 | p90 | max | floor p50 | floor p90 | ratio p50 | MiB/s |".to_owned(),
        "|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    let mut json = Vec::new();
    for size in SIZES {
        let m = measure(&etcd, &floor, size, n).unwrap_or_else(|e| panic!("{size} bytes: {e}"));
        for (op, (ours, theirs)) in [("register", &m.register), ("cold lookup", &m.lookup)] {
            let (line, j) = row(op, m.size, ours, theirs);
            lines.push(line);
            json.push(j);
        }
    }
    let md = lines.join("\n") + "\n";
    print!("{md}");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/perf");
    std::fs::create_dir_all(&dir).expect("create target/perf");
    std::fs::write(dir.join("large.md"), &md).expect("write large.md");
    std::fs::write(
        dir.join("large.json"),
        serde_json::to_vec_pretty(&json).unwrap(),
    )
    .expect("write large.json");
    println!("table: {}", dir.join("large.md").display());
}
