//! NIXL conveniences (cargo feature `nixl`): publish a NIXL agent's metadata
//! for (engine_id, rank), and wait for + load a remote rank's metadata into a
//! local agent. NIXL is loaded at run time through `nixl-sys`.

use std::time::Duration;

use crate::client::Client;
use crate::error::{Error, Result, Status};

pub use nixl_sys;

/// A NIXL failure (or NIXL missing) as this crate's error.
pub fn nixl_error(e: nixl_sys::Error) -> Error {
    Error::new(Status::ErrNixl, e.message)
}

impl Client {
    /// Publishes the local metadata of `agent` for (`engine_id`, `rank`).
    pub fn publish_agent(&self, engine_id: &str, rank: u32, agent: &nixl_sys::Agent) -> Result<()> {
        let md = agent.local_metadata().map_err(nixl_error)?;
        self.register(engine_id, rank, &md)
    }

    /// Waits for (`engine_id`, `rank`) and loads its metadata into `agent`;
    /// returns the remote agent's name, to use in transfers.
    pub fn load_remote_agent(
        &self,
        agent: &nixl_sys::Agent,
        engine_id: &str,
        rank: u32,
        timeout: Option<Duration>,
    ) -> Result<String> {
        let found = self.wait(engine_id, rank, timeout)?;
        agent
            .load_remote_metadata(&found.metadata)
            .map_err(nixl_error)
    }

    /// [`Client::publish_agent`] for an agent created elsewhere.
    ///
    /// # Safety
    /// `agent` is a live `nixl_capi_agent_t`, not used concurrently.
    pub unsafe fn publish_raw_agent(
        &self,
        engine_id: &str,
        rank: u32,
        agent: nixl_sys::raw::nixl_capi_agent_t,
    ) -> Result<()> {
        let md = nixl_sys::local_metadata_of(agent).map_err(nixl_error)?;
        self.register(engine_id, rank, &md)
    }

    /// [`Client::load_remote_agent`] for an agent created elsewhere.
    ///
    /// # Safety
    /// `agent` is a live `nixl_capi_agent_t`, not used concurrently.
    pub unsafe fn load_remote_into_raw_agent(
        &self,
        agent: nixl_sys::raw::nixl_capi_agent_t,
        engine_id: &str,
        rank: u32,
        timeout: Option<Duration>,
    ) -> Result<String> {
        let found = self.wait(engine_id, rank, timeout)?;
        nixl_sys::load_remote_metadata_into(agent, &found.metadata).map_err(nixl_error)
    }
}
