//! Whole-engine waits: until every rank 0..world_size-1 is registered.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use super::read::{refused, wait_for};
use super::{log_handshake, Client};
use crate::cache::Entry;
use crate::error::{Error, Result, Status};
use crate::etcd_error::Op;
use crate::keys;

impl Client {
    /// Returns the engine's world size once ranks 0..world_size-1 are all
    /// registered. The world size comes from the records (open option
    /// `world_size` of the registrant).
    pub fn wait_engine(&self, engine_id: &str, timeout: Option<Duration>) -> Result<u32> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let limit = timeout.unwrap_or(self.config().timeout);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let last_seen = Arc::new(StdMutex::new(EngineState::default()));
        let seen = last_seen.clone();
        let waiting = async move {
            let informer = inner.informer(Some(&id))?;
            wait_for(&informer, || {
                let state = informer.with_engine(&id, EngineState::of);
                let done = state.complete();
                *seen.lock().unwrap_or_else(|e| e.into_inner()) = state;
                done.map(Ok).or_else(|| refused(&informer))
            })
            .await
        };
        let size = self
            .call(Op::Wait, limit, waiting)
            .map_err(|e| match e.status {
                Status::ErrTimeout => {
                    let state = last_seen.lock().unwrap_or_else(|e| e.into_inner());
                    Error::new(
                        Status::ErrTimeout,
                        format!(
                            "Timeout waiting for engine {engine_id} after {:.1} s: {}; check that \
                         every rank started and registered, or increase VLLM_NIXL_ETCD_TIMEOUT",
                            limit.as_secs_f64(),
                            state.describe_missing()
                        ),
                    )
                }
                _ => e,
            })?;
        log_handshake(started);
        Ok(size)
    }
}

/// What a whole-engine wait has seen of an engine.
#[derive(Debug, Default, Clone)]
struct EngineState {
    ranks: Vec<u32>,
    world_size: Option<u32>,
}

impl EngineState {
    fn of(slots: Vec<(u32, &Result<Entry>)>) -> EngineState {
        let mut ranks: Vec<u32> = Vec::new();
        let (mut of_rank0, mut largest) = (None, None);
        for (rank, slot) in slots {
            if let Ok(e) = slot {
                ranks.push(rank);
                if rank == 0 {
                    of_rank0 = e.record.world_size;
                }
                largest = largest.max(e.record.world_size);
            }
        }
        ranks.sort_unstable();
        // Rank 0's declaration wins; else the largest any rank declared.
        EngineState {
            ranks,
            world_size: of_rank0.or(largest),
        }
    }

    fn complete(&self) -> Option<u32> {
        let w = self.world_size?;
        (0..w)
            .all(|r| self.ranks.binary_search(&r).is_ok())
            .then_some(w)
    }

    fn describe_missing(&self) -> String {
        match self.world_size {
            None if self.ranks.is_empty() => "no rank is registered".to_owned(),
            None => format!(
                "ranks {:?} are registered but none declares the world size (open option \
                 world_size)",
                self.ranks
            ),
            Some(w) => {
                let missing: Vec<String> = (0..w)
                    .filter(|r| self.ranks.binary_search(r).is_err())
                    .map(|r| r.to_string())
                    .collect();
                format!("missing rank(s) {} of world size {w}", missing.join(", "))
            }
        }
    }
}
