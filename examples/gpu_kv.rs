//! KV blocks in GPU memory moved between two engines that found each other
//! through nixl-etcd: a prefill process and a decode process, each a NIXL agent
//! (UCX backend) with its own CUDA context on the same GPU.
//!
//!   gpu_kv prefill ENGINE_ID [--blocks N] [--block-kib K] [--device D] [--timeout-s S]
//!   gpu_kv decode  ENGINE_ID [--device D] [--iters N] [--timeout-s S] [--prewarm 1]
//!                  [--warmup 1]
//!
//! With `--prewarm 1` the decode is started before the prefill: the library's
//! pre-warm (`nixl_etcd::prewarm`) follows the engine, and loads the
//! prefill's agent when its ADDED event arrives (before any request); the
//! request (the READ) then finds the agent loaded. Without it a decode started
//! first waits for the engine and loads the agent on the request's path. Both
//! print a `FIRST` line: ms from the prefill's registration (its record's
//! `registered_at_ms`) to the decode knowing of it, to the agent loaded, and to
//! the first READ complete, and the handshake left on the request's path.
//! With `--warmup 1` (and `--prewarm 1`) the pre-warm also runs the engine's
//! warm-up (`PrewarmOptions::warmup`): two READs of one block, from the layout
//! the prefill published, before the request; its `first_ms` then shows what
//! is left of the first transfer's set-up.
//!
//! The prefill allocates its KV blocks with cuMemAlloc (1 GiB by default: 512
//! blocks of 2 MiB), fills every 32-bit word with a value that depends on the
//! block and the position (a kernel compiled at run time with NVRTC), takes a
//! checksum of it on the device, registers the memory with NIXL as VRAM and
//! publishes its agent metadata as (ENGINE_ID, rank 0) and its KV layout
//! (address, block size, count, checksum) as (ENGINE_ID.kv, rank 0). Nothing
//! else travels between the two processes.
//!
//! The decode waits for both records, loads the prefill's agent, allocates the
//! same amount of GPU memory, poisons it, READs every block with one NIXL
//! transfer request (one descriptor per block), and checks every word on the
//! device against the pattern and the prefill's checksum. It then times the
//! same request again (`--iters`), poisons, moves and checks once more,
//! notifies the prefill and prints one `RESULT` line.
//!
//! Without NVRTC both sides fall back to the host: the prefill fills through
//! host copies, the decode copies every block back and compares on the CPU.
//! etcd and the namespace come from the guide's environment
//! (VLLM_NIXL_ETCD_ENDPOINTS, ...); CUDA and NIXL are loaded at run time.

#[path = "common/mod.rs"]
mod common;
use common::layout_engine;

use std::ffi::{CStr, CString};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{result as cu, sys as cusys, CudaContext, CudaFunction, LaunchConfig};
use cudarc::driver::{DriverError, PushKernelArg};
use cudarc::nvrtc::{result as rtc, sys as rtcsys, Ptx};
use nixl_etcd::nixl::nixl_sys::{Agent, Backend, MemType, XferOp};
use nixl_etcd::prewarm::{Prewarm, PrewarmOptions, Ranks, WarmupHook};
use nixl_etcd::Client;

const DONE: &[u8] = b"gpu-kv-blocks-read";

/// The pattern and the kernels; `kv_word` is mirrored by [`kv_word`].
const KERNELS: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ u32 kv_word(u64 block, u64 word) {
    u32 x = (u32)block * 0x9E3779B1u ^ (u32)word * 0x85EBCA77u;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    return x ^ (u32)(block >> 32);
}

extern "C" __global__ void kv_fill(u32 *buf, u64 words, u64 words_per_block) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride)
        buf[i] = kv_word(i / words_per_block, i % words_per_block);
}

/* out[0] += mismatching words, out[1] = min index of one, out[2] += sum of words */
extern "C" __global__ void kv_check(const u32 *buf, u64 words, u64 words_per_block, u64 *out) {
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 bad = 0, first = ~0ull, sum = 0;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
        u32 v = buf[i];
        sum += v;
        if (v != kv_word(i / words_per_block, i % words_per_block)) {
            if (bad == 0) first = i;
            bad++;
        }
    }
    if (bad) {
        atomicAdd(&out[0], bad);
        atomicMin(&out[1], first);
    }
    atomicAdd(&out[2], sum);
}
"#;

/// The 32-bit word at position `word` of block `block` (as the kernel).
fn kv_word(block: u64, word: u64) -> u32 {
    let mut x = (block as u32).wrapping_mul(0x9E37_79B1) ^ (word as u32).wrapping_mul(0x85EB_CA77);
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B_3C6D);
    x ^= x >> 12;
    x ^ (block >> 32) as u32
}

fn drv<T>(r: Result<T, DriverError>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("CUDA {what}: {e:?}"))
}

struct Args {
    role: String,
    engine: String,
    blocks: usize,
    block_bytes: usize,
    device: usize,
    iters: usize,
    timeout: Duration,
    prewarm: bool,
    warmup: bool,
}

fn parse() -> Result<Args, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: gpu_kv prefill|decode ENGINE_ID [--blocks N] [--block-kib K] \
                 [--device D] [--iters N] [--timeout-s S] [--prewarm 0|1] [--warmup 0|1]";
    let (role, engine) = match (argv.first(), argv.get(1)) {
        (Some(r), Some(e)) if r == "prefill" || r == "decode" => (r.clone(), e.clone()),
        _ => return Err(usage.into()),
    };
    let mut args = Args {
        role,
        engine,
        blocks: 512,
        block_bytes: 2 << 20,
        device: 0,
        iters: 10,
        timeout: Duration::from_secs(120),
        prewarm: false,
        warmup: false,
    };
    let mut rest = argv[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or(format!("{flag} needs a value"))?;
        let n: u64 = value.parse().map_err(|_| format!("bad {flag} {value}"))?;
        match flag.as_str() {
            "--blocks" if n > 0 => args.blocks = n as usize,
            "--block-kib" if n > 0 => args.block_bytes = n as usize * 1024,
            "--device" => args.device = n as usize,
            "--iters" => args.iters = n as usize,
            "--timeout-s" if n > 0 => args.timeout = Duration::from_secs(n),
            "--prewarm" => args.prewarm = n != 0,
            "--warmup" => args.warmup = n != 0,
            _ => return Err(format!("bad option {flag} {value}\n{usage}")),
        }
    }
    if args.warmup && !args.prewarm {
        return Err("--warmup 1 needs --prewarm 1: the warm-up runs in the pre-warm".into());
    }
    Ok(args)
}

/// Device memory from cuMemAlloc (not a stream-ordered pool: CUDA IPC, which
/// UCX uses between processes, needs plain allocations); freed on drop.
struct GpuBuf {
    ctx: Arc<CudaContext>,
    ptr: cusys::CUdeviceptr,
    len: usize,
}

impl GpuBuf {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<GpuBuf, String> {
        drv(ctx.bind_to_thread(), "bind context")?;
        // SAFETY: a plain allocation in the current context.
        let ptr = drv(unsafe { cu::malloc_sync(len) }, "cuMemAlloc")?;
        Ok(GpuBuf {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    fn poison(&self) -> Result<(), String> {
        // SAFETY: our allocation, `len` bytes.
        drv(
            unsafe { cu::memset_d8_sync(self.ptr, 0xA5, self.len) },
            "cuMemsetD8",
        )
    }

    fn read(&self, offset: usize, out: &mut [u32]) -> Result<(), String> {
        assert!(offset + out.len() * 4 <= self.len);
        // SAFETY: inside our allocation.
        drv(
            unsafe { cu::memcpy_dtoh_sync(out, self.ptr + offset as u64) },
            "cuMemcpyDtoH",
        )
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_sync, freed once.
        let _ = unsafe { cu::free_sync(self.ptr) };
    }
}

/// The fill and check kernels, or why they are not there (then the host
/// does both).
struct Kernels {
    fill: CudaFunction,
    check: CudaFunction,
    grid: u32,
}

/// NVRTC compiles the kernels to a CUBIN for this device's architecture (a
/// CUBIN, not PTX: newer NVRTC PTX can be too new for the driver).
fn compile_kernels(ctx: &Arc<CudaContext>) -> Result<Kernels, String> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { rtcsys::is_culib_present() } {
        return Err("libnvrtc not found".into());
    }
    let (major, minor) = drv(ctx.compute_capability(), "compute capability")?;
    let src = CString::new(KERNELS).expect("no NUL in the kernels");
    let prog = rtc::create_program(&src, None).map_err(|e| format!("NVRTC create: {e:?}"))?;
    let opts = [format!("--gpu-architecture=sm_{major}{minor}")];
    // SAFETY: `prog` is live until destroyed below; buffers sized by NVRTC.
    let cubin = unsafe {
        let compiled = rtc::compile_program(prog, &opts).map_err(|e| {
            let log = rtc::get_program_log(prog)
                .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                .unwrap_or_default();
            format!("NVRTC compile: {e:?}: {log}")
        });
        let cubin = compiled.and_then(|_| {
            let mut n = 0usize;
            rtcsys::nvrtcGetCUBINSize(prog, &mut n)
                .result()
                .map_err(|e| format!("NVRTC CUBIN size: {e:?}"))?;
            let mut buf = vec![0u8; n];
            rtcsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                .result()
                .map_err(|e| format!("NVRTC CUBIN: {e:?}"))?;
            Ok(buf)
        });
        let _ = rtc::destroy_program(prog);
        cubin?
    };
    let module = drv(ctx.load_module(Ptx::from_binary(cubin)), "load module")?;
    let sms = drv(
        ctx.attribute(cusys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        "SM count",
    )?;
    Ok(Kernels {
        fill: drv(module.load_function("kv_fill"), "kv_fill")?,
        check: drv(module.load_function("kv_check"), "kv_check")?,
        grid: (sms.max(1) as u32) * 8,
    })
}

/// A CUDA context on `device`, its kernels if NVRTC works, and a description.
fn cuda_setup(device: usize) -> Result<(Arc<CudaContext>, Option<Kernels>, String), String> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cusys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver) not found".into());
    }
    let ctx = drv(CudaContext::new(device), "context")?;
    drv(ctx.bind_to_thread(), "bind context")?;
    let (major, minor) = drv(ctx.compute_capability(), "compute capability")?;
    let name = drv(ctx.name(), "device name")?;
    let kernels = match compile_kernels(&ctx) {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("gpu_kv: no device kernels ({e}); filling and checking through the host");
            None
        }
    };
    Ok((ctx, kernels, format!("{name} (sm_{major}{minor})")))
}

impl Kernels {
    fn cfg(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn fill(&self, ctx: &Arc<CudaContext>, buf: &GpuBuf, block_bytes: usize) -> Result<(), String> {
        let (words, wpb) = ((buf.len / 4) as u64, (block_bytes / 4) as u64);
        let stream = ctx.default_stream();
        let mut launch = stream.launch_builder(&self.fill);
        launch.arg(&buf.ptr).arg(&words).arg(&wpb);
        // SAFETY: the kernel writes `words` u32 inside `buf`.
        drv(unsafe { launch.launch(self.cfg()) }, "kv_fill launch")?;
        drv(stream.synchronize(), "kv_fill")
    }

    /// (mismatching words, first mismatching word, sum of words).
    fn check(
        &self,
        ctx: &Arc<CudaContext>,
        buf: &GpuBuf,
        block_bytes: usize,
    ) -> Result<(u64, u64, u64), String> {
        let out = GpuBuf::new(ctx, 3 * 8)?;
        // SAFETY: 24 bytes inside `out`.
        drv(
            unsafe { cu::memcpy_htod_sync(out.ptr, &[0u64, u64::MAX, 0u64]) },
            "cuMemcpyHtoD",
        )?;
        let (words, wpb) = ((buf.len / 4) as u64, (block_bytes / 4) as u64);
        let stream = ctx.default_stream();
        let mut launch = stream.launch_builder(&self.check);
        launch.arg(&buf.ptr).arg(&words).arg(&wpb).arg(&out.ptr);
        // SAFETY: the kernel reads `buf` and updates the three counters.
        drv(unsafe { launch.launch(self.cfg()) }, "kv_check launch")?;
        drv(stream.synchronize(), "kv_check")?;
        let mut r = [0u64; 3];
        // SAFETY: 24 bytes from `out`.
        drv(
            unsafe { cu::memcpy_dtoh_sync(&mut r[..], out.ptr) },
            "cuMemcpyDtoH",
        )?;
        Ok((r[0], r[1], r[2]))
    }
}

fn expected_block(block: usize, block_bytes: usize) -> Vec<u32> {
    (0..block_bytes / 4)
        .map(|w| kv_word(block as u64, w as u64))
        .collect()
}

/// Fills through the host (no NVRTC).
fn host_fill(buf: &GpuBuf, block_bytes: usize) -> Result<(), String> {
    for b in 0..buf.len / block_bytes {
        let words = expected_block(b, block_bytes);
        // SAFETY: inside our allocation.
        drv(
            unsafe { cu::memcpy_htod_sync(buf.ptr + (b * block_bytes) as u64, &words) },
            "cuMemcpyHtoD",
        )?;
    }
    Ok(())
}

/// Checks the given blocks through the host: (mismatching words, first one,
/// sum of words).
fn host_check(
    buf: &GpuBuf,
    block_bytes: usize,
    blocks: impl Iterator<Item = usize>,
) -> Result<(u64, u64, u64), String> {
    let (mut bad, mut first, mut sum) = (0u64, u64::MAX, 0u64);
    let mut got = vec![0u32; block_bytes / 4];
    for b in blocks {
        buf.read(b * block_bytes, &mut got)?;
        for (w, v) in got.iter().enumerate() {
            sum = sum.wrapping_add(*v as u64);
            if *v != kv_word(b as u64, w as u64) {
                first = first.min((b * block_bytes / 4 + w) as u64);
                bad += 1;
            }
        }
    }
    Ok((bad, first, sum))
}

/// Every word checked: on the device when the kernels exist (plus the first,
/// middle and last block through the host, which also checks the kernel's
/// pattern against the CPU's), else all through the host.
fn verify(
    ctx: &Arc<CudaContext>,
    kernels: Option<&Kernels>,
    buf: &GpuBuf,
    block_bytes: usize,
) -> Result<(u64, u64, u64), String> {
    let blocks = buf.len / block_bytes;
    match kernels {
        Some(k) => {
            let r = k.check(ctx, buf, block_bytes)?;
            let mut sampled = vec![0, blocks / 2, blocks - 1];
            sampled.dedup();
            let (bad, first, _) = host_check(buf, block_bytes, sampled.into_iter())?;
            if bad > 0 {
                return Ok((r.0.max(bad), r.1.min(first), r.2));
            }
            Ok(r)
        }
        None => host_check(buf, block_bytes, 0..blocks),
    }
}

fn prefill(args: &Args, client: &Client) -> Result<(), String> {
    if args.block_bytes % 4 != 0 {
        return Err("--block-kib must give a multiple of 4 bytes".into());
    }
    let (ctx, kernels, gpu) = cuda_setup(args.device)?;
    let total = args.blocks * args.block_bytes;
    let kv = GpuBuf::new(&ctx, total)?;
    let t = Instant::now();
    match &kernels {
        Some(k) => k.fill(&ctx, &kv, args.block_bytes)?,
        None => host_fill(&kv, args.block_bytes)?,
    }
    let (bad, _, checksum) = verify(&ctx, kernels.as_ref(), &kv, args.block_bytes)?;
    if bad > 0 {
        return Err(format!("the fill left {bad} wrong words"));
    }
    let filled = t.elapsed();

    let agent = Agent::new(&format!(
        "{}-prefill-rank0-{}",
        args.engine,
        std::process::id()
    ))
    .map_err(|e| e.to_string())?;
    let ucx = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;
    let reg = agent
        .register(
            MemType::Vram,
            &[(kv.ptr as usize, total, args.device as u64)],
            &ucx,
        )
        .map_err(|e| e.to_string())?;
    client
        .publish_agent(&args.engine, 0, &agent)
        .map_err(|e| e.to_string())?;
    let layout = serde_json::json!({
        "addr": kv.ptr,
        "block_bytes": args.block_bytes,
        "blocks": args.blocks,
        "device": args.device,
        "checksum": checksum,
    });
    client
        .register(
            &layout_engine(&args.engine),
            0,
            layout.to_string().as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    println!(
        "prefill: ready: agent {} published {} KV blocks of {} bytes ({} bytes of VRAM on {gpu}, \
         filled and checked {} in {:.1} ms, checksum {checksum}) for {} rank 0",
        agent.name(),
        args.blocks,
        args.block_bytes,
        total,
        if kernels.is_some() {
            "on the device"
        } else {
            "through the host"
        },
        filled.as_secs_f64() * 1e3,
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
    println!("prefill: notification from {from}: decode read and checked every block");
    drop(reg);
    drop(ucx);
    drop(agent);
    drop(kv);
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

struct Layout {
    addr: usize,
    block_bytes: usize,
    blocks: usize,
    device: u64,
    checksum: u64,
}

fn parse_layout(bytes: &[u8]) -> Result<Layout, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let field = |k: &str| v[k].as_u64().ok_or(format!("layout lacks {k}"));
    Ok(Layout {
        addr: field("addr")? as usize,
        block_bytes: field("block_bytes")? as usize,
        blocks: field("blocks")? as usize,
        device: field("device")?,
        checksum: field("checksum")?,
    })
}

fn check_or_fail(
    what: &str,
    (bad, first, sum): (u64, u64, u64),
    want_sum: u64,
    block_bytes: usize,
) -> Result<(), String> {
    if bad > 0 {
        let word = first as usize;
        return Err(format!(
            "{what}: {bad} words differ; first at block {} byte {}",
            word * 4 / block_bytes,
            word * 4 % block_bytes
        ));
    }
    if sum != want_sum {
        return Err(format!(
            "{what}: checksum {sum} differs from the prefill's {want_sum}"
        ));
    }
    Ok(())
}

fn decode(args: &Args, client: &Client) -> Result<(), String> {
    let (ctx, kernels, gpu) = cuda_setup(args.device)?;
    let agent = Agent::new(&format!("{}-decode-{}", args.engine, std::process::id()))
        .map_err(|e| e.to_string())?;
    let ucx: Backend = agent
        .create_backend("UCX", &[])
        .map_err(|e| e.to_string())?;

    // The decode's KV memory, registered before any prefill exists (as an
    // engine registers its KV cache at start): sized by --blocks and
    // --block-kib, the prefill's layout must fit.
    let cap = args.blocks * args.block_bytes;
    let local = GpuBuf::new(&ctx, cap)?;
    let reg = agent
        .register(
            MemType::Vram,
            &[(local.ptr as usize, cap, args.device as u64)],
            &ucx,
        )
        .map_err(|e| e.to_string())?;

    // Pre-warm (the library's): the prefill's agent is loaded when it
    // appears, before the request.
    let warm = match args.prewarm {
        true => Some(prewarm(
            args,
            client,
            &agent,
            &ctx,
            (local.ptr as usize, cap),
        )?),
        false => {
            println!("decode: ready, waiting for {}", args.engine);
            None
        }
    };
    // The handshake: everything decode needs from the prefill, through etcd
    // (with pre-warm, only finding the agent loaded).
    let started = Instant::now();
    let started_ms = epoch_ms();
    let found = client
        .wait(&args.engine, 0, Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let waited = started.elapsed();
    let known_ms = epoch_ms();
    let remote = match &warm {
        Some(w) => w.remote.clone(),
        None => agent
            .load_remote_metadata(&found.metadata)
            .map_err(|e| e.to_string())?,
    };
    let handshake = started.elapsed();
    let loaded_ms = epoch_ms();
    let layout = client
        .wait(&layout_engine(&args.engine), 0, Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let with_layout = started.elapsed();
    let layout = parse_layout(&layout.metadata)?;
    let (bb, blocks) = (layout.block_bytes, layout.blocks);
    let total = bb * blocks;
    if total > cap {
        return Err(format!(
            "the prefill's KV ({blocks} blocks of {bb} bytes) does not fit this decode's \
             {cap} bytes: give the decode the same --blocks and --block-kib"
        ));
    }
    local.poison()?;
    let locals: Vec<_> = (0..blocks)
        .map(|b| (local.ptr as usize + b * bb, bb, args.device as u64))
        .collect();
    let remotes: Vec<_> = (0..blocks)
        .map(|b| (layout.addr + b * bb, bb, layout.device))
        .collect();
    let xfer = agent
        .transfer(
            XferOp::Read,
            (MemType::Vram, MemType::Vram),
            &locals,
            &remote,
            &remotes,
            &ucx,
            None,
        )
        .map_err(|e| e.to_string())?;

    // First transfer (includes mapping the remote memory), then a full check.
    let t = Instant::now();
    xfer.run(args.timeout).map_err(|e| e.to_string())?;
    let first = t.elapsed().as_secs_f64();
    let first_done_ms = epoch_ms();
    check_or_fail(
        "first transfer",
        verify(&ctx, kernels.as_ref(), &local, bb)?,
        layout.checksum,
        bb,
    )?;

    // Repeats of the same request, timed (stop early past 5 s in all).
    let mut times = Vec::new();
    let budget = Instant::now();
    for _ in 0..args.iters {
        let t = Instant::now();
        xfer.run(args.timeout).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64());
        if budget.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let med = median(&mut times.clone());

    // Poison, move once more, check again: the repeats moved the data too.
    local.poison()?;
    xfer.run(args.timeout).map_err(|e| e.to_string())?;
    check_or_fail(
        "last transfer",
        verify(&ctx, kernels.as_ref(), &local, bb)?,
        layout.checksum,
        bb,
    )?;

    // The same bytes copied inside one process: the device's own ceiling.
    let scratch = GpuBuf::new(&ctx, total)?;
    let mut d2d = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: two allocations of `total` bytes.
        drv(
            unsafe { cu::memcpy_dtod_sync(scratch.ptr, local.ptr, total) },
            "cuMemcpyDtoD",
        )?;
        drv(ctx.synchronize(), "synchronize")?;
        d2d.push(t.elapsed().as_secs_f64());
    }
    let d2d = median(&mut d2d);

    agent
        .notify(&remote, DONE, &ucx)
        .map_err(|e| e.to_string())?;
    drop(xfer);
    drop(reg);

    let gbps = |s: f64| total as f64 / s / 1e9;
    let check = if kernels.is_some() {
        "device kernel (every word) + host (first, middle, last block)"
    } else {
        "host (every word)"
    };
    println!("decode: GPU {gpu}");
    println!(
        "decode: loaded remote agent {remote} through nixl-etcd ({} bytes of metadata)",
        found.metadata.len()
    );
    println!(
        "decode: handshake {:.3} ms (etcd wait {:.3} ms + NIXL load {:.3} ms); with the KV layout {:.3} ms",
        handshake.as_secs_f64() * 1e3,
        waited.as_secs_f64() * 1e3,
        (handshake - waited).as_secs_f64() * 1e3,
        with_layout.as_secs_f64() * 1e3
    );
    println!(
        "decode: READ {total} bytes ({blocks} blocks of {bb}) VRAM->VRAM: first {:.3} ms ({:.2} GB/s), \
         then {} repeats median {:.3} ms ({:.2} GB/s), best {:.2} GB/s",
        first * 1e3,
        gbps(first),
        times.len(),
        med * 1e3,
        gbps(med),
        gbps(best)
    );
    println!(
        "decode: same-process cuMemcpyDtoD of the same bytes: {:.3} ms ({:.2} GB/s)",
        d2d * 1e3,
        gbps(d2d)
    );
    println!(
        "decode: verified {} of {} bytes twice ({check}); checksum {} matches the prefill's",
        total, total, layout.checksum
    );
    // From the prefill's registration (meaningful when the decode started
    // first): when the decode knew of it, had its agent loaded, and had the
    // first READ complete; and the handshake left on the request's path.
    let reg = found.record.registered_at_ms as f64;
    let (mode, known, loaded, nixl_load) = match &warm {
        Some(w) => ("prewarm", w.seen_ms, w.loaded_ms, w.loaded_ms - w.seen_ms),
        None => ("cold", known_ms, loaded_ms, loaded_ms - known_ms),
    };
    // The request's path starts when the decode asks, or when the prefill
    // registered if the decode asked before it existed.
    let on_path = loaded_ms - started_ms.max(reg);
    println!(
        "decode: {mode}: prefill registered -> known {:.3} ms -> agent loaded {:.3} ms \
         -> first READ complete {:.3} ms; handshake on the request's path {:.3} ms",
        known - reg,
        loaded - reg,
        first_done_ms - reg,
        on_path
    );
    println!(
        "FIRST mode={mode} known_ms={:.3} loaded_ms={:.3} first_read_done_ms={:.3} on_path_ms={:.3} \
         nixl_load_ms={:.3}",
        known - reg,
        loaded - reg,
        first_done_ms - reg,
        on_path,
        nixl_load
    );
    println!(
        "RESULT bytes={total} blocks={blocks} block_bytes={bb} verified_bytes={} \
         handshake_ms={:.3} etcd_wait_ms={:.3} nixl_load_ms={:.3} layout_ms={:.3} md_bytes={} \
         first_ms={:.3} first_gbps={:.2} repeats={} median_ms={:.3} median_gbps={:.2} best_gbps={:.2} \
         d2d_gbps={:.2} check={}",
        2 * total,
        handshake.as_secs_f64() * 1e3,
        waited.as_secs_f64() * 1e3,
        (handshake - waited).as_secs_f64() * 1e3,
        with_layout.as_secs_f64() * 1e3,
        found.metadata.len(),
        first * 1e3,
        gbps(first),
        times.len(),
        med * 1e3,
        gbps(med),
        gbps(best),
        gbps(d2d),
        if kernels.is_some() { "kernel" } else { "host" }
    );
    drop(scratch);
    drop(local);
    Ok(())
}

/// Wall-clock milliseconds since the epoch (the record's `registered_at_ms`
/// is one; both processes run on one host).
fn epoch_ms() -> f64 {
    ms_since_epoch(std::time::SystemTime::now())
}

fn ms_since_epoch(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// What the pre-warm did, in wall-clock ms.
struct Warm {
    remote: String,
    seen_ms: f64,
    loaded_ms: f64,
}

/// Pre-warms `agent` with the library's [`Prewarm`] following the prefill's
/// engine until its rank 0 is loaded, then stops it. With `--warmup 1` the
/// pre-warm also runs the engine's warm-up: READs of one block (from the
/// layout the prefill published) into `scratch` (address, bytes), before
/// the request.
fn prewarm(
    args: &Args,
    client: &Client,
    agent: &Agent,
    ctx: &Arc<CudaContext>,
    scratch: (usize, usize),
) -> Result<Warm, String> {
    let warmup = args.warmup.then(|| {
        let (client, engine, timeout, device, ctx) = (
            client.clone(),
            args.engine.clone(),
            args.timeout,
            args.device as u64,
            ctx.clone(),
        );
        WarmupHook::new(move |w| {
            // The pre-warm's thread: UCX's CUDA transports need the context.
            drv(ctx.bind_to_thread(), "bind context")?;
            let rec = client
                .wait(&layout_engine(&engine), 0, Some(timeout))
                .map_err(|e| e.to_string())?;
            let layout = parse_layout(&rec.metadata)?;
            let bytes = layout.block_bytes.min(scratch.1);
            let took = w
                .read(
                    (MemType::Vram, MemType::Vram),
                    (scratch.0, bytes, device),
                    (layout.addr, bytes, layout.device),
                )
                .map_err(|e| e.to_string())?;
            println!(
                "decode: pre-warm's warm-up: two READs of one block ({bytes} bytes) in {:.3} ms",
                took.as_secs_f64() * 1e3
            );
            Ok(())
        })
    });
    let opts = PrewarmOptions {
        engines: vec![args.engine.clone()],
        ranks: Ranks::All,
        max_engines: 1,
        connect: true,
        warmup,
    };
    // SAFETY: a live agent (it has memory registered, so it is lent, not
    // given), not used by this thread until the pre-warm is stopped below.
    let pw =
        unsafe { Prewarm::start_raw(client, agent.as_raw(), opts) }.map_err(|e| e.to_string())?;
    println!("decode: ready, following {} (pre-warm)", args.engine);
    let remote = pw
        .wait_remote(&args.engine, 0, Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let l = pw
        .loaded()
        .into_iter()
        .find(|l| l.rank == 0)
        .ok_or("pre-warm: rank 0 left again")?;
    let loaded_ms = ms_since_epoch(l.loaded_at);
    let warm = Warm {
        remote,
        seen_ms: loaded_ms - (l.load_time + l.connect_time.unwrap_or_default()).as_secs_f64() * 1e3,
        loaded_ms,
    };
    pw.stop();
    Ok(warm)
}

fn main() -> ExitCode {
    common::run_role(
        "gpu_kv",
        parse(),
        |a: &Args| a.role.as_str(),
        prefill,
        decode,
    )
}
