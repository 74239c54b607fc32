//! Our side of the interop tests with stock NIXL (tests/nixl_interop.rs): a
//! NIXL agent (UCX, DRAM) whose metadata goes through nixl-etcd's NIXL-native
//! calls (`publish_nixl`, `fetch_nixl`, `unpublish_nixl`) instead of NIXL's
//! built-in etcd exchange. Its peer, tests/interop/stock_agent.py, uses only
//! the built-in exchange; the two find each other because this library writes
//! and reads the same keys: `{ns}/{agent}/` (marker) and `{ns}/{agent}/metadata`.
//!
//!   nixl_interop publish AGENT SIZE     [--options JSON] [--timeout-s S]
//!   nixl_interop fetch REMOTE ADDR LEN  [--options JSON] [--timeout-s S]
//!
//! `publish` creates agent AGENT with a registered DRAM buffer of SIZE bytes
//! holding the shared pattern, publishes its metadata, prints
//! `{"ready":true,"addr":..,"len":..,...}` and then obeys stdin, one command a
//! line: `unpublish` (prints `{"unpublished_at":T,...}`), `close` (prints
//! `{"closed_at":T,...}`); EOF exits (closing the client). T is the Unix time
//! just before the call, so a peer can time the invalidation from it.
//!
//! `fetch` waits for REMOTE's metadata (written by stock NIXL's
//! `send_local_metadata`), loads it into its own agent, READs LEN bytes at the
//! remote ADDR, checks the pattern and prints
//! `{"fetched_ms":..,"verified":LEN,...}`.
//!
//! The pattern (the same in stock_agent.py): byte i = (i * 7 + 3) % 251.
//!
//! etcd comes from the guide's environment (VLLM_NIXL_ETCD_ENDPOINTS, ...),
//! the NIXL namespace from NIXL_ETCD_NAMESPACE or the option `nixl_namespace`
//! of `--options` (a JSON object, the options of `nixl_etcd_open`). Every
//! stdout line is one JSON object; a failure prints `{"error":..}` and exits 1
//! (2 for bad arguments).

use std::io::BufRead;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nixl_etcd::nixl::nixl_sys::{Agent, MemType, XferOp};
use nixl_etcd::{Client, Config};
use serde_json::json;

/// The label of the full metadata blob, as stock NIXL names it.
const LABEL: &str = "metadata";

/// The shared pattern: byte i = (i * 7 + 3) % 251.
fn pattern(i: usize) -> u8 {
    ((i as u64 * 7 + 3) % 251) as u8
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn emit(v: serde_json::Value) {
    // println! flushes a line at a time only on a terminal; be explicit.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

enum Mode {
    Publish {
        agent: String,
        size: usize,
    },
    Fetch {
        remote: String,
        addr: usize,
        len: usize,
    },
}

struct Args {
    mode: Mode,
    options: Option<String>,
    timeout: Duration,
}

const USAGE: &str =
    "usage: nixl_interop publish AGENT SIZE [--options JSON] [--timeout-s S]\n       \
                     nixl_interop fetch REMOTE ADDR LEN [--options JSON] [--timeout-s S]";

fn parse() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &str, what: &str| -> Result<usize, String> {
        match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("bad {what} {s:?}\n{USAGE}")),
        }
    };
    let (mode, rest) = match argv.first().map(String::as_str) {
        Some("publish") if argv.len() >= 3 => (
            Mode::Publish {
                agent: argv[1].clone(),
                size: num(&argv[2], "SIZE")?,
            },
            &argv[3..],
        ),
        Some("fetch") if argv.len() >= 4 => (
            Mode::Fetch {
                remote: argv[1].clone(),
                addr: num(&argv[2], "ADDR")?,
                len: num(&argv[3], "LEN")?,
            },
            &argv[4..],
        ),
        _ => return Err(USAGE.into()),
    };
    let mut args = Args {
        mode,
        options: None,
        timeout: Duration::from_secs(30),
    };
    let mut rest = rest.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .ok_or(format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--options" => args.options = Some(value.clone()),
            "--timeout-s" => args.timeout = Duration::from_secs(num(value, "--timeout-s")? as u64),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn open(args: &Args) -> Result<Client, String> {
    if std::env::var_os("NIXL_ETCD_ENDPOINTS").is_some_and(|v| !v.is_empty()) {
        // libnixl then runs its own exchange in this process as well.
        eprintln!(
            "nixl_interop: warning: NIXL_ETCD_ENDPOINTS is set, so NIXL's built-in etcd \
             exchange also runs in this process"
        );
    }
    Config::load(args.options.as_deref())
        .and_then(Client::open)
        .map_err(|e| e.to_string())
}

fn publish(args: &Args, name: &str, size: usize) -> Result<(), String> {
    let agent = Agent::new(name).map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let buf: Vec<u8> = (0..size).map(pattern).collect();
    let addr = buf.as_ptr() as usize;
    let reg = agent
        .register(MemType::Dram, &[(addr, size, 0)], &ucx)
        .map_err(|e| e.to_string())?;
    let md = agent.local_metadata().map_err(|e| e.to_string())?;
    let client = open(args)?;
    client
        .publish_nixl(name, Some(LABEL), &md)
        .map_err(|e| e.to_string())?;
    emit(json!({
        "ready": true,
        "addr": addr,
        "len": size,
        "md_len": md.len(),
        "lease": client.lease_id(),
        "nixl_namespace": client.config().nixl_namespace,
        "pid": std::process::id(),
    }));

    // Serve reads of `buf` and obey the test until stdin closes.
    let mut closed = false;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        let started = unix_now();
        let t = Instant::now();
        match line.trim() {
            "" => continue,
            "unpublish" => {
                client.unpublish_nixl(name).map_err(|e| e.to_string())?;
                emit(json!({
                    "unpublished_at": started,
                    "call_ms": t.elapsed().as_secs_f64() * 1e3,
                }));
            }
            "close" => {
                client.close().map_err(|e| e.to_string())?;
                closed = true;
                emit(json!({
                    "closed_at": started,
                    "call_ms": t.elapsed().as_secs_f64() * 1e3,
                }));
            }
            other => emit(json!({ "error": format!("unknown command {other:?}") })),
        }
    }
    if !closed {
        client.close().map_err(|e| e.to_string())?;
    }
    drop(reg);
    drop(buf);
    Ok(())
}

fn fetch(args: &Args, remote: &str, addr: usize, len: usize) -> Result<(), String> {
    let agent = Agent::new(&format!("nixl-interop-reader-{}", std::process::id()))
        .map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let client = open(args)?;

    let started = Instant::now();
    let md = client
        .fetch_nixl(remote, Some(LABEL), Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let fetched = started.elapsed();
    let loaded = agent.load_remote_metadata(&md).map_err(|e| e.to_string())?;
    if loaded != remote {
        return Err(format!(
            "the metadata at {remote}'s key names agent {loaded:?}, not {remote:?}"
        ));
    }

    let mut local = vec![0u8; len];
    let base = local.as_mut_ptr() as usize;
    let reg = agent
        .register(MemType::Dram, &[(base, len, 0)], &ucx)
        .map_err(|e| e.to_string())?;
    let xfer = agent
        .transfer(
            XferOp::Read,
            (MemType::Dram, MemType::Dram),
            &[(base, len, 0)],
            remote,
            &[(addr, len, 0)],
            &ucx,
            None,
        )
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    xfer.run(args.timeout).map_err(|e| e.to_string())?;
    let moved = t.elapsed();
    drop(xfer);
    drop(reg);

    if let Some(i) = (0..len).find(|&i| local[i] != pattern(i)) {
        let bad = (0..len).filter(|&i| local[i] != pattern(i)).count();
        return Err(format!(
            "{bad} of {len} bytes differ; first at {i}: got {}, expected {}",
            local[i],
            pattern(i)
        ));
    }
    let _ = client.close();
    emit(json!({
        "fetched_ms": fetched.as_secs_f64() * 1e3,
        "md_len": md.len(),
        "remote": loaded,
        "read_ms": moved.as_secs_f64() * 1e3,
        "verified": len,
    }));
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            emit(json!({ "error": e }));
            eprintln!("nixl_interop: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.mode {
        Mode::Publish { agent, size } => publish(&args, agent, *size),
        Mode::Fetch { remote, addr, len } => fetch(&args, remote, *addr, *len),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            emit(json!({ "error": e }));
            eprintln!("nixl_interop: {e}");
            ExitCode::FAILURE
        }
    }
}
