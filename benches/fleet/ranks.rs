//! One rank of the fleet, the same in one process and in many: a prefill
//! rank opens its client and registers an 8 KiB blob; a decode rank opens
//! its client and waits for its target rank of every prefill engine,
//! checking every byte.

use std::time::{Duration, Instant};

use nixl_etcd::{Client, Config, Status};

/// Ranks per engine, on both sides.
pub const TP: usize = 8;
/// Bytes of NIXL agent metadata each prefill rank registers.
pub const BLOB_BYTES: usize = 8 * 1024;
/// Bound of every call (open included): generous, so that a slow start is
/// measured rather than reported as a timeout.
const CALL_TIMEOUT_S: u64 = 120;
/// Bound of each decode rank's wait for one target.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// One rank of the fleet, on one side.
#[derive(Clone, Copy, Debug)]
pub enum Rank {
    Prefill { engine: usize, rank: usize },
    Decode { engine: usize, rank: usize },
}

pub fn prefill_engine(e: usize) -> String {
    format!("prefill_{e}")
}

/// The metadata of prefill (engine, rank): distinct per rank, with NUL bytes.
pub fn blob(engine: usize, rank: usize) -> Vec<u8> {
    (0..BLOB_BYTES)
        .map(|i| ((i * 31 + engine * 7 + rank * 13) % 251) as u8)
        .collect()
}

/// Every prefill rank's metadata, built before the start so that checking
/// the bytes costs a comparison, not a rebuild (all-to-all makes
/// ranks x engines checks).
pub struct Expected(Vec<Vec<u8>>);

impl Expected {
    pub fn new(engines: usize) -> Expected {
        Expected(
            (0..engines)
                .flat_map(|e| (0..TP).map(move |r| blob(e, r)))
                .collect(),
        )
    }

    fn of(&self, engine: usize, rank: usize) -> &[u8] {
        &self.0[engine * TP + rank]
    }

    pub fn engines(&self) -> usize {
        self.0.len() / TP
    }
}

/// Resident memory of this process (KiB).
pub fn vm_rss_kib() -> f64 {
    rss_kib_of("self").expect("VmRSS in /proc/self/status")
}

/// Resident memory of process `pid` ("self" for this one), from
/// /proc/PID/status (KiB).
pub fn rss_kib_of(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
}

/// Gives freed heap back to the OS, so that an RSS baseline does not hide
/// the memory the next clients reuse.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn options(endpoint: &str, namespace: &str) -> String {
    serde_json::json!({
        "endpoints": endpoint,
        "namespace": namespace,
        "world_size": TP,
        "timeout_s": CALL_TIMEOUT_S,
    })
    .to_string()
}

/// Opens the rank's client; a prefill rank also registers its blob.
pub fn open_rank(rank: Rank, opts: &str) -> Result<Client, String> {
    let cfg = Config::from_sources(|_| None, Some(opts))
        .map_err(|e| format!("{rank:?}: bad options {opts}: {e}"))?;
    let client = Client::open(cfg).map_err(|e| format!("{rank:?}: open failed: {e}"))?;
    if let Rank::Prefill { engine, rank: r } = rank {
        let id = prefill_engine(engine);
        if let Err(e) = client.register(&id, r as u32, &blob(engine, r)) {
            let _ = client.close();
            return Err(format!("{rank:?}: register of {id} rank {r} failed: {e}"));
        }
    }
    Ok(client)
}

/// Waits for the decode rank's target ranks of every prefill engine and
/// checks each record's bytes. Returns the longest single wait, and for what.
pub fn discover(
    client: &Client,
    expected: &Expected,
    me: (usize, usize),
) -> Result<(f64, String), String> {
    let (engine, rank) = me;
    let who = format!("decode_{engine} rank {rank}");
    let targets = nixl_etcd::tp::target_ranks(TP as u32, rank as u32, TP as u32)
        .map_err(|e| format!("{who}: target_ranks: {e}"))?;
    let mut slowest = (0.0, String::new());
    for e in 0..expected.engines() {
        let id = prefill_engine(e);
        for &t in &targets {
            let asked = Instant::now();
            let found = client
                .wait(&id, t, Some(WAIT_LIMIT))
                .map_err(|err| format!("{who}: wait for {id} rank {t}: {err}"))?;
            let took = asked.elapsed().as_secs_f64();
            if took > slowest.0 {
                slowest = (took, format!("{who} waiting for {id} rank {t}"));
            }
            if found.record.engine_id != id || found.record.rank != t {
                return Err(format!(
                    "{who}: asked for {id} rank {t}, got {} rank {}",
                    found.record.engine_id, found.record.rank
                ));
            }
            if *found.metadata != expected.of(e, t as usize) {
                return Err(format!("{who}: WRONG BYTES from {id} rank {t}"));
            }
        }
    }
    Ok(slowest)
}

/// After close, no record may be left in etcd: one fresh client looks every
/// prefill rank up. Returns how many were left.
pub fn left_behind(endpoint: &str, namespace: &str, engines: usize) -> Result<usize, String> {
    let cfg = Config::from_sources(|_| None, Some(&options(endpoint, namespace)))
        .map_err(|e| format!("probe options: {e}"))?;
    let probe = Client::open(cfg).map_err(|e| format!("probe open: {e}"))?;
    let mut left = 0;
    for e in 0..engines {
        for r in 0..TP {
            match probe.lookup(&prefill_engine(e), r as u32) {
                Ok(_) => left += 1,
                Err(err) if err.status == Status::ErrNotFound => {}
                Err(err) => {
                    let _ = probe.close();
                    return Err(format!("probe lookup prefill_{e} rank {r}: {err}"));
                }
            }
        }
    }
    probe.close().map_err(|e| format!("probe close: {e}"))?;
    Ok(left)
}
