//! The pre-warm's warm-up: what an engine does right after a rank is loaded
//! and connected, on the pre-warm's thread, so that its first real transfer
//! finds everything the transport sets up on first use already set up.
//!
//! The library knows no remote address (an engine's KV layout travels in its
//! own payload), so the engine supplies the warm-up; [`Warmup::read`] is the
//! one it usually wants.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Loaded;
use crate::error::{Error, Result, Status};
use crate::nixl::nixl_sys::{self, raw::nixl_capi_agent_t, MemType};

/// How long one warm-up READ may take before it counts as failed.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The engine's warm-up, called once per rank the pre-warm loads (and again
/// after a restart replaces it). An error is logged; the first transfer then
/// pays for what the warm-up would have set up.
pub type WarmupFn = dyn Fn(&Warmup<'_>) -> std::result::Result<(), String> + Send + Sync;

/// A warm-up as [`super::PrewarmOptions`] holds it.
#[derive(Clone)]
pub struct WarmupHook(pub Arc<WarmupFn>);

impl fmt::Debug for WarmupHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WarmupHook(..)")
    }
}

impl WarmupHook {
    pub fn new(
        f: impl Fn(&Warmup<'_>) -> std::result::Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        WarmupHook(Arc::new(f))
    }
}

/// One rank just loaded, handed to the warm-up with the agent's lock held.
pub struct Warmup<'a> {
    pub(super) agent: nixl_capi_agent_t,
    /// The rank (its remote agent's name is `loaded.remote`).
    pub loaded: &'a Loaded,
}

impl Warmup<'_> {
    /// The agent (a `nixl_capi_agent_t`), for the engine's own NIXL calls;
    /// valid during the warm-up only.
    pub fn agent(&self) -> nixl_capi_agent_t {
        self.agent
    }

    /// [`read_twice`] from the loaded rank.
    pub fn read(
        &self,
        mem: (MemType, MemType),
        local: (usize, usize, u64),
        remote: (usize, usize, u64),
    ) -> Result<Duration> {
        // SAFETY: a live agent held under the pre-warm's lock for this call
        // (the warm-up's contract).
        unsafe { read_twice(self.agent, &self.loaded.remote, mem, local, remote) }
    }
}

/// READs `remote` (a region of the loaded remote agent `remote_agent`:
/// address, length, device) into `local` (registered with `agent`, its
/// content overwritten) twice. UCX sets up on the first READ of a connection
/// what `makeConnection` leaves (the endpoint's lanes: tens of ms over DRAM
/// here) and selects its protocols for the connected lanes on the second
/// (about 0.1 ms); from the third on a READ runs at its steady speed. A few
/// bytes are enough: what is set up serves every size.
///
/// # Safety
/// `agent` is a live `nixl_capi_agent_t` not used concurrently.
pub unsafe fn read_twice(
    agent: nixl_capi_agent_t,
    remote_agent: &str,
    mem: (MemType, MemType),
    local: (usize, usize, u64),
    remote: (usize, usize, u64),
) -> Result<Duration> {
    let started = Instant::now();
    for _ in 0..2 {
        // SAFETY: the caller's contract.
        unsafe { nixl_sys::read_of(agent, mem, &[local], remote_agent, &[remote], READ_TIMEOUT) }
            .map_err(|e| {
            Error::new(
                Status::ErrNixl,
                format!(
                    "warm-up READ from NIXL agent {remote_agent} failed: {}; check that \
                         the local region is registered with the agent and the remote one lies \
                         in the remote agent's registered memory",
                    e.message
                ),
            )
        })?;
    }
    Ok(started.elapsed())
}
