//! The pre-warm's agent and its lock: a binary semaphore, so that a C caller
//! can take and release it in two calls.

use std::sync::{Condvar, Mutex};

use crate::nixl::nixl_sys::{raw::nixl_capi_agent_t, Agent};

/// The agent, and a lock that a C caller can take and release in two calls.
pub(super) struct AgentSlot {
    pub(super) raw: nixl_capi_agent_t,
    /// Keeps an agent given to [`super::Prewarm::start`] alive.
    pub(super) owned: Mutex<Option<Agent>>,
    pub(super) busy: Mutex<bool>,
    pub(super) freed: Condvar,
}

// SAFETY: the raw agent is used by one thread at a time, under `busy`.
unsafe impl Send for AgentSlot {}
unsafe impl Sync for AgentSlot {}

impl AgentSlot {
    pub(super) fn lock(&self) {
        let mut busy = relock(self.busy.lock());
        while *busy {
            busy = relock(self.freed.wait(busy));
        }
        *busy = true;
    }

    pub(super) fn unlock(&self) -> bool {
        let mut busy = relock(self.busy.lock());
        let was = std::mem::replace(&mut *busy, false);
        self.freed.notify_one();
        was
    }
}

pub(super) fn relock<G>(r: std::result::Result<G, std::sync::PoisonError<G>>) -> G {
    r.unwrap_or_else(|e| e.into_inner())
}

/// Exclusive use of the pre-warm's agent; released on drop.
pub struct AgentGuard<'a> {
    pub(super) slot: &'a AgentSlot,
    pub(super) agent: &'a Agent,
}

impl std::ops::Deref for AgentGuard<'_> {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        self.agent
    }
}

impl Drop for AgentGuard<'_> {
    fn drop(&mut self) {
        self.slot.unlock();
    }
}
