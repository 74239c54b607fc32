//! End to end: a prefill process and a decode process, each with its own NIXL
//! agent (UCX, DRAM), find each other only through nixl-etcd and a real etcd;
//! decode READs the prefill's "KV blocks", notifies it, and checks every byte.
//!
//!   kv_transfer prefill ENGINE_ID [--blocks N] [--block-kib K] [--timeout-s S]
//!   kv_transfer decode  ENGINE_ID [--timeout-s S] [--prewarm 1]
//!
//! etcd and the namespace come from the guide's environment
//! (VLLM_NIXL_ETCD_ENDPOINTS, ...). The prefill publishes its agent metadata
//! as (ENGINE_ID, rank 0) and its KV layout (address, block size, count) as
//! (ENGINE_ID.kv, rank 0), like vLLM's handshake payload; it exits once the
//! decode side's notification arrives.
//!
//! With `--prewarm 1` the decode starts the library's pre-warm
//! (`nixl_etcd::prewarm`) on the engine, prints `decode: ready`, and its
//! request finds the prefill's agent loaded on its ADDED event.

#[path = "common/mod.rs"]
mod common;
use common::layout_engine;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nixl_etcd::nixl::nixl_sys::{Agent, MemType, XferOp};
use nixl_etcd::prewarm::{Prewarm, PrewarmOptions};
use nixl_etcd::Client;

const DONE: &[u8] = b"kv-blocks-read";

/// The byte at `offset` of block `block`: differs per block and position.
fn pattern(block: usize, offset: usize) -> u8 {
    (block.wrapping_mul(131) ^ offset.wrapping_mul(31) ^ (offset >> 8)) as u8
}

struct Args {
    role: String,
    engine: String,
    blocks: usize,
    block_bytes: usize,
    timeout: Duration,
    prewarm: bool,
}

fn parse() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let usage =
        "usage: kv_transfer prefill|decode ENGINE_ID [--blocks N] [--block-kib K] [--timeout-s S] \
         [--prewarm 0|1]";
    let (role, engine) = match (argv.first(), argv.get(1)) {
        (Some(r), Some(e)) if r == "prefill" || r == "decode" => (r.clone(), e.clone()),
        _ => return Err(usage.into()),
    };
    let mut args = Args {
        role,
        engine,
        blocks: 64,
        block_bytes: 1 << 20,
        timeout: Duration::from_secs(60),
        prewarm: false,
    };
    let mut rest = argv[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = value.parse().map_err(|_| format!("bad {flag} {value}"))?;
        match flag.as_str() {
            "--blocks" if n > 0 => args.blocks = n as usize,
            "--block-kib" if n > 0 => args.block_bytes = n as usize * 1024,
            "--timeout-s" => args.timeout = Duration::from_secs(n),
            "--prewarm" => args.prewarm = n != 0,
            _ => return Err(format!("bad option {flag} {value}\n{usage}")),
        }
    }
    Ok(args)
}

fn prefill(args: &Args, client: &Client) -> Result<(), String> {
    let agent = Agent::new(&format!("{}-rank0-{}", args.engine, std::process::id()))
        .map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let total = args.blocks * args.block_bytes;
    let kv: Vec<u8> = (0..total)
        .map(|i| pattern(i / args.block_bytes, i % args.block_bytes))
        .collect();
    let reg = agent
        .register(MemType::Dram, &[(kv.as_ptr() as usize, total, 0)], &ucx)
        .map_err(|e| e.to_string())?;
    client
        .publish_agent(&args.engine, 0, &agent)
        .map_err(|e| e.to_string())?;
    let layout = format!(
        "{{\"addr\":{},\"block_bytes\":{},\"blocks\":{}}}",
        kv.as_ptr() as usize,
        args.block_bytes,
        args.blocks
    );
    client
        .register(&layout_engine(&args.engine), 0, layout.as_bytes())
        .map_err(|e| e.to_string())?;
    println!(
        "prefill: agent {} published {} KV blocks of {} bytes ({} bytes) for {} rank 0, waiting for decode",
        agent.name(),
        args.blocks,
        args.block_bytes,
        total,
        args.engine
    );
    let notes = agent
        .wait_notification(None, DONE, args.timeout)
        .map_err(|e| e.to_string())?;
    let from = notes
        .iter()
        .find(|n| n.message == DONE)
        .map(|n| n.from.clone())
        .unwrap_or_default();
    println!("prefill: notification from {from}: decode read every block");
    drop(reg);
    Ok(())
}

fn decode(args: &Args, client: &Client) -> Result<(), String> {
    let agent = Agent::new(&format!("{}-decode-{}", args.engine, std::process::id()))
        .map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;

    // Pre-warm: the agent is given to the pre-warm until the prefill's rank
    // 0 is loaded into it, then taken back.
    let (agent, warm) = match args.prewarm {
        true => {
            let opts = PrewarmOptions {
                engines: vec![args.engine.clone()],
                ..Default::default()
            };
            let pw = Prewarm::start(client, agent, opts).map_err(|e| e.to_string())?;
            println!("decode: ready, pre-warming {}", args.engine);
            let name = pw
                .wait_remote(&args.engine, 0, Some(args.timeout))
                .map_err(|e| e.to_string())?;
            (pw.stop().ok_or("the pre-warm kept the agent")?, Some(name))
        }
        false => (agent, None),
    };

    let started = Instant::now();
    let remote = match &warm {
        Some(name) => name.clone(),
        None => client
            .load_remote_agent(&agent, &args.engine, 0, Some(args.timeout))
            .map_err(|e| e.to_string())?,
    };
    let layout = client
        .wait(&layout_engine(&args.engine), 0, Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let handshake = started.elapsed();
    let layout: serde_json::Value =
        serde_json::from_slice(&layout.metadata).map_err(|e| e.to_string())?;
    let field = |k: &str| {
        layout[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or(format!("layout lacks {k}"))
    };
    let (addr, block_bytes, blocks) = (field("addr")?, field("block_bytes")?, field("blocks")?);
    let total = block_bytes * blocks;

    let mut local = vec![0u8; total];
    let base = local.as_mut_ptr() as usize;
    let reg = agent
        .register(MemType::Dram, &[(base, total, 0)], &ucx)
        .map_err(|e| e.to_string())?;
    let locals: Vec<_> = (0..blocks)
        .map(|b| (base + b * block_bytes, block_bytes, 0))
        .collect();
    let remotes: Vec<_> = (0..blocks)
        .map(|b| (addr + b * block_bytes, block_bytes, 0))
        .collect();
    let xfer = agent
        .transfer(
            XferOp::Read,
            (MemType::Dram, MemType::Dram),
            &locals,
            &remote,
            &remotes,
            &ucx,
            Some(DONE),
        )
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    xfer.run(args.timeout).map_err(|e| e.to_string())?;
    let moved = t.elapsed();

    let mut bad = 0usize;
    for (i, byte) in local.iter().enumerate() {
        if *byte != pattern(i / block_bytes, i % block_bytes) {
            if bad == 0 {
                eprintln!(
                    "decode: first mismatch at block {} offset {}",
                    i / block_bytes,
                    i % block_bytes
                );
            }
            bad += 1;
        }
    }
    drop(xfer);
    drop(reg);
    if bad > 0 {
        return Err(format!("{bad} of {total} bytes differ"));
    }
    match warm {
        Some(_) => {
            println!("decode: remote agent {remote} was pre-warmed (loaded before the request)")
        }
        None => println!("decode: loaded remote agent {remote} through nixl-etcd"),
    }
    println!(
        "decode: ETCD handshake completed in {:.4} seconds",
        handshake.as_secs_f64()
    );
    println!(
        "decode: moved {total} bytes ({blocks} blocks of {block_bytes}) with a NIXL READ in {:.4} s ({:.2} GB/s)",
        moved.as_secs_f64(),
        total as f64 / moved.as_secs_f64() / 1e9
    );
    println!("decode: verified {total} of {total} bytes");
    Ok(())
}

fn main() -> ExitCode {
    common::run_role(
        "kv_transfer",
        parse(),
        |a: &Args| a.role.as_str(),
        prefill,
        decode,
    )
}
