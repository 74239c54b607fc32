//! Pre-warm (builds with NIXL support): a decode's NIXL agent loads the
//! prefill ranks it may read as they appear, before any request needs them.

use std::ffi::{c_char, c_void};

use super::boundary::{c_text, ffi_export, nonnull};
use super::handles::nixl_etcd_client;
use super::status::nixl_etcd_status;
use crate::error::{Error, Result};
use crate::prewarm::{
    read_twice, MemType, Prewarm, PrewarmOptions, Ranks, Warmup, WarmupHook, DEFAULT_MAX_ENGINES,
};

/// Host memory, for `nixl_etcd_prewarm_read` (NIXL's `DRAM_SEG`).
pub const NIXL_ETCD_MEM_DRAM: u32 = 0;
/// GPU memory, for `nixl_etcd_prewarm_read` (NIXL's `VRAM_SEG`; the device
/// is the CUDA device).
pub const NIXL_ETCD_MEM_VRAM: u32 = 1;

/// An engine's warm-up, see `nixl_etcd_prewarm_set_warmup`. Returns 0 when
/// it succeeded; anything else is logged as a failure.
pub type nixl_etcd_prewarm_warmup_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        agent: *mut c_void,
        engine_id: *const c_char,
        rank: u32,
        remote_agent: *const c_char,
    ) -> i32,
>;

/// The C warm-up and its user data, handed to the pre-warm's thread.
struct CWarmup {
    f: unsafe extern "C" fn(*mut c_void, *mut c_void, *const c_char, u32, *const c_char) -> i32,
    user_data: *mut c_void,
}
// SAFETY: the caller promises that `user_data` may be used from the
// pre-warm's thread (documented on `nixl_etcd_prewarm_set_warmup`).
unsafe impl Send for CWarmup {}
// SAFETY: as for Send; the pre-warm calls it one rank at a time.
unsafe impl Sync for CWarmup {}

impl CWarmup {
    fn call(&self, w: &Warmup<'_>) -> std::result::Result<(), String> {
        let engine_id = c_text(&w.loaded.engine_id);
        let remote = c_text(&w.loaded.remote);
        // SAFETY: a valid function from the caller; the strings live until
        // it returns; the agent is held under the pre-warm's lock.
        let rc = unsafe {
            (self.f)(
                self.user_data,
                w.agent().cast(),
                engine_id.as_ptr(),
                w.loaded.rank,
                remote.as_ptr(),
            )
        };
        match rc {
            0 => Ok(()),
            rc => Err(format!("the engine's warm-up returned {rc}")),
        }
    }
}

fn mem_type(m: u32, what: &str) -> Result<MemType> {
    match m {
        NIXL_ETCD_MEM_DRAM => Ok(MemType::Dram),
        NIXL_ETCD_MEM_VRAM => Ok(MemType::Vram),
        _ => Err(Error::invalid(format!(
            "{what} is {m}: not NIXL_ETCD_MEM_DRAM (0) or NIXL_ETCD_MEM_VRAM (1)"
        ))),
    }
}

/// A running pre-warm. Opaque: only pointers to it are handed out.
pub struct nixl_etcd_prewarm {
    inner: Prewarm,
}

fn prewarm<'a>(p: *mut nixl_etcd_prewarm) -> Result<&'a Prewarm> {
    let p = nonnull(p, "prewarm")?;
    // SAFETY: a pointer from `nixl_etcd_prewarm_start`, not yet freed (the
    // caller's contract).
    Ok(unsafe { &(*p).inner })
}

/// Starts pre-warming into the NIXL agent `agent` (a `nixl_capi_agent_t`):
/// the client follows the engines `engines` names (comma-separated exact ids,
/// or prefixes ending in `*`; NULL or "" for every engine) and, on a rank's
/// ADDED event, loads its metadata into `agent` and connects to it (before
/// any request: the first transfer finds the connection made); on
/// REMOVED it drops that remote agent, on REPLACED it drops it and loads the
/// new one. Only the ranks that local rank `local_rank` of a `local_tp`-way
/// engine reads under vLLM's mapping are loaded (`local_tp` 0: every rank);
/// records this client registered itself are skipped. At most `max_engines`
/// engines are loaded at once (0: 16); one beyond waits until one leaves.
/// From now on use `agent` only between `nixl_etcd_prewarm_lock` and
/// `nixl_etcd_prewarm_unlock`: the pre-warm loads into it from its own thread.
/// Free with `nixl_etcd_prewarm_free` (before the agent and the client).
/// Only in builds with NIXL support (`NIXL_ETCD_WITH_NIXL`).
///
/// # Safety
/// `agent` is NULL or a live NIXL agent that outlives the pre-warm;
/// `engines` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_start(
    c: *mut nixl_etcd_client,
    agent: *mut c_void,
    engines: *const c_char,
    local_tp: u32,
    local_rank: u32,
    max_engines: u32,
    out: *mut *mut nixl_etcd_prewarm,
) -> nixl_etcd_status {
    ffi_export!(
        out = out(out),
        client = handle(c),
        agent = nonnull(agent),
        engines = opt_text(engines);
    {
        let opts = PrewarmOptions {
            engines: engines
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_owned)
                .collect(),
            ranks: match local_tp {
                0 => Ranks::All,
                _ => Ranks::Tp { local_tp, local_rank },
            },
            max_engines: match max_engines {
                0 => DEFAULT_MAX_ENGINES,
                n => n as usize,
            },
            connect: true,
            warmup: None,
        };
        // SAFETY: a live agent that outlives the pre-warm, used by the caller
        // only under the pre-warm's lock (the caller's contract); not NULL.
        let inner = unsafe { Prewarm::start_raw(&client, agent.cast(), opts) }?;
        *out = Box::into_raw(Box::new(nixl_etcd_prewarm { inner }));
        Ok(())
    })
}

/// The remote agent's name for (`engine_id`, `rank`) once the pre-warm has
/// loaded it, in `*remote_agent` (free with `nixl_etcd_string_free`):
/// with `timeout_ms` 0 it answers at once (`NIXL_ETCD_ERR_NOT_FOUND` if not
/// loaded), above 0 it waits up to that long (`NIXL_ETCD_ERR_TIMEOUT`), below
/// 0 up to the client's timeout. No etcd or NIXL call.
///
/// # Safety
/// `p` is NULL or from `nixl_etcd_prewarm_start`, not freed; `engine_id` is
/// NULL or NUL-terminated; `remote_agent` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_remote(
    p: *mut nixl_etcd_prewarm,
    engine_id: *const c_char,
    rank: u32,
    timeout_ms: i64,
    remote_agent: *mut *mut c_char,
) -> nixl_etcd_status {
    ffi_export!(
        out = out(remote_agent),
        engine_id = text(engine_id),
        timeout = timeout(timeout_ms);
    {
        let p = prewarm(p)?;
        let name = match timeout {
            Some(t) if t.is_zero() => p.remote(engine_id, rank).ok_or_else(|| {
                Error::new(
                    crate::error::Status::ErrNotFound,
                    format!("engine {engine_id} rank {rank} is not pre-warmed (not loaded)"),
                )
            })?,
            t => p.wait_remote(engine_id, rank, t)?,
        };
        *out = c_text(&name).into_raw();
        Ok(())
    })
}

/// Takes the pre-warm's agent lock, waiting while it loads into the agent:
/// call before using the agent, and `nixl_etcd_prewarm_unlock` after.
///
/// # Safety
/// `p` is NULL or from `nixl_etcd_prewarm_start`, not freed.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_lock(p: *mut nixl_etcd_prewarm) -> nixl_etcd_status {
    ffi_export!(; {
        prewarm(p)?.lock();
        Ok(())
    })
}

/// Releases the agent lock. `NIXL_ETCD_ERR_INVALID_ARGUMENT` if it was not
/// held.
///
/// # Safety
/// `p` is NULL or from `nixl_etcd_prewarm_start`, not freed.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_unlock(p: *mut nixl_etcd_prewarm) -> nixl_etcd_status {
    ffi_export!(; {
        match prewarm(p)?.unlock() {
            true => Ok(()),
            false => Err(Error::invalid(
                "the pre-warm's agent lock is not held; call nixl_etcd_prewarm_lock first",
            )),
        }
    })
}

/// Stops a pre-warm: no load runs after this returns; the remote agents it
/// loaded stay loaded in the agent. NULL is a no-op. Not while holding its
/// lock.
///
/// # Safety
/// `p` is NULL or from `nixl_etcd_prewarm_start`, freed once.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_free(p: *mut nixl_etcd_prewarm) {
    ffi_export!(void; {
        if !p.is_null() {
            // SAFETY: from Box::into_raw in `nixl_etcd_prewarm_start`, freed
            // once (the caller's contract).
            drop(unsafe { Box::from_raw(p) });
        }
    })
}

/// Sets the engine's warm-up: `warmup(user_data, agent, engine_id, rank,
/// remote_agent)` runs on the pre-warm's thread, with the agent's lock held,
/// on each rank right after it is loaded and connected (and now on the ranks
/// loaded already, before this returns), so that what the first transfer
/// sets up on first use is set up ahead; `nixl_etcd_prewarm_read` is what it
/// usually does. It returns 0 when it succeeded; a failure is logged and the
/// first transfer pays for the set-up. NULL `warmup` clears it. Not while
/// holding the pre-warm's lock.
///
/// # Safety
/// `p` is NULL or from `nixl_etcd_prewarm_start`, not freed; `warmup` is
/// NULL or a valid function; `user_data` stays valid, and usable from
/// another thread, until `nixl_etcd_prewarm_free` returns or the warm-up is
/// cleared.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_prewarm_set_warmup(
    p: *mut nixl_etcd_prewarm,
    warmup: nixl_etcd_prewarm_warmup_fn,
    user_data: *mut c_void,
) -> nixl_etcd_status {
    ffi_export!(; {
        let p = prewarm(p)?;
        let hook = warmup.map(|f| {
            let cb = CWarmup { f, user_data };
            WarmupHook::new(move |w| cb.call(w))
        });
        p.set_warmup(hook);
        Ok(())
    })
}

/// A warm-up READ: reads `len` bytes at `remote_addr` (device `remote_dev`,
/// memory `remote_mem`) of the loaded remote agent `remote_agent` into
/// `local_addr` (registered with `agent`; overwritten) twice, through the
/// backend NIXL chooses, and returns once both completed. UCX sets up its
/// endpoint's lanes on the first READ of a connection and selects its
/// protocols on the second; later READs run at their steady speed. A few
/// bytes are enough. Memory: `NIXL_ETCD_MEM_DRAM` or `NIXL_ETCD_MEM_VRAM`.
///
/// # Safety
/// `agent` is NULL or a live NIXL agent not used concurrently (inside a
/// warm-up it is held for you); `remote_agent` is NULL or NUL-terminated;
/// `local_addr` is registered with `agent` and writable for `len` bytes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn nixl_etcd_prewarm_read(
    agent: *mut c_void,
    remote_agent: *const c_char,
    local_mem: u32,
    local_addr: usize,
    local_dev: u64,
    remote_mem: u32,
    remote_addr: usize,
    remote_dev: u64,
    len: usize,
) -> nixl_etcd_status {
    ffi_export!(
        agent = nonnull(agent),
        remote_agent = text(remote_agent);
    {
        let mem = (mem_type(local_mem, "local_mem")?, mem_type(remote_mem, "remote_mem")?);
        if len == 0 {
            return Err(Error::invalid("len is 0: a warm-up READ needs at least one byte"));
        }
        // SAFETY: the caller's contract.
        unsafe {
            read_twice(
                agent.cast(),
                remote_agent,
                mem,
                (local_addr, len, local_dev),
                (remote_addr, len, remote_dev),
            )
        }?;
        Ok(())
    })
}
