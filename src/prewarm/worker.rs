//! The pre-warm's worker: applies each event to the agent (load, drop,
//! reload) and keeps at most `max_engines` engines loaded.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::agent_lock::{relock, AgentSlot};
use super::select::{wants_rank, Filter};
use super::warmup::{Warmup, WarmupHook};
use super::{Loaded, Ranks};
use crate::events::{Event, EventKind};
use crate::nixl::nixl_sys;

#[derive(Default)]
pub(super) struct State {
    /// Engines holding a slot, with their loaded ranks.
    pub(super) loaded: HashMap<String, HashMap<u32, Loaded>>,
    /// Engines seen beyond the cap, oldest first, with their latest records.
    pub(super) waiting: VecDeque<(String, HashMap<u32, Event>)>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
    pub(super) agent: AgentSlot,
    pub(super) filter: Filter,
    pub(super) ranks: Ranks,
    pub(super) max_engines: usize,
    pub(super) connect: bool,
    pub(super) warmup: Mutex<Option<WarmupHook>>,
    pub(super) own_incarnation: String,
}

impl Shared {
    /// Whether an event concerns a rank this pre-warm loads: checked in the
    /// subscription's callback, before the event goes to the worker.
    pub(super) fn wants(&self, ev: &Event) -> bool {
        ev.incarnation != self.own_incarnation
            && self.filter.matches(&ev.engine_id)
            && wants_rank(self.ranks, ev.rank, ev.world_size)
    }

    /// Applies an event [`Shared::wants`].
    pub(super) fn apply(&self, ev: Event) {
        if self.admit(&ev) {
            self.load_or_drop(&ev);
        }
        // A slot may be free (an engine left, or a load failed): it goes to
        // the oldest waiting engine.
        loop {
            let mut state = relock(self.state.lock());
            if state.loaded.len() >= self.max_engines {
                break;
            }
            let Some((engine, records)) = state.waiting.pop_front() else {
                break;
            };
            state.loaded.insert(engine, HashMap::new());
            drop(state);
            for ev in records.into_values() {
                self.load_or_drop(&ev);
            }
        }
        self.changed.notify_all();
    }

    /// Whether the event's engine holds a slot (taking a free one for a new
    /// engine); otherwise keeps its latest records until one frees.
    fn admit(&self, ev: &Event) -> bool {
        let mut state = relock(self.state.lock());
        if state.loaded.contains_key(&ev.engine_id) {
            return true;
        }
        let pos = state.waiting.iter().position(|(e, _)| *e == ev.engine_id);
        match (pos, ev.kind) {
            (Some(i), EventKind::Removed) => {
                state.waiting[i].1.remove(&ev.rank);
                if state.waiting[i].1.is_empty() {
                    state.waiting.remove(i);
                }
            }
            (Some(i), _) => {
                state.waiting[i].1.insert(ev.rank, ev.clone());
            }
            (None, EventKind::Removed) => {}
            (None, _) if state.loaded.len() < self.max_engines => {
                state.loaded.insert(ev.engine_id.clone(), HashMap::new());
                return true;
            }
            (None, _) => {
                log::info!(
                    "nixl-etcd pre-warm: engine {} appeared but {} engines are loaded already \
                     (max_engines); it is loaded when one leaves, or on a request's path",
                    ev.engine_id,
                    self.max_engines
                );
                let e = ev.engine_id.clone();
                state
                    .waiting
                    .push_back((e, HashMap::from([(ev.rank, ev.clone())])));
            }
        }
        false
    }

    /// Applies one event of an engine holding a slot: drops the rank's old
    /// agent (REMOVED, REPLACED, UPDATED), loads the new one, and frees the
    /// slot when the engine has no rank left.
    fn load_or_drop(&self, ev: &Event) {
        let old = {
            let state = relock(self.state.lock());
            state
                .loaded
                .get(&ev.engine_id)
                .and_then(|r| r.get(&ev.rank))
                .cloned()
        };
        self.agent.lock();
        if let Some(old) = &old {
            // SAFETY: a live agent (the caller's contract), under the lock.
            if let Err(e) = unsafe { nixl_sys::invalidate_remote_of(self.agent.raw, &old.remote) } {
                log::warn!(
                    "nixl-etcd pre-warm: could not drop the NIXL agent {} of engine {} rank {} \
                     ({}): {}",
                    old.remote,
                    ev.engine_id,
                    ev.rank,
                    old.incarnation,
                    e.message
                );
            }
        }
        let started = Instant::now();
        let loaded = match ev.kind {
            EventKind::Removed => None,
            // SAFETY: as above.
            _ => match unsafe { nixl_sys::load_remote_metadata_into(self.agent.raw, &ev.metadata) }
            {
                Ok(remote) => Some(remote),
                Err(e) => {
                    log::warn!(
                        "nixl-etcd pre-warm: could not load engine {} rank {} (incarnation {}) \
                         into NIXL: {}; the first request to it loads it on its path",
                        ev.engine_id,
                        ev.rank,
                        ev.incarnation,
                        e.message
                    );
                    None
                }
            },
        };
        let connected = loaded.as_ref().filter(|_| self.connect).and_then(|remote| {
            let started = Instant::now();
            // SAFETY: as above.
            match unsafe { nixl_sys::make_connection_of(self.agent.raw, remote) } {
                Ok(()) => Some(started.elapsed()),
                Err(e) => {
                    log::debug!(
                        "nixl-etcd pre-warm: could not connect to engine {} rank {} ahead \
                         ({}); the first transfer connects",
                        ev.engine_id,
                        ev.rank,
                        e.message
                    );
                    None
                }
            }
        });
        let loaded = loaded.map(|remote| {
            let mut l = Loaded {
                engine_id: ev.engine_id.clone(),
                rank: ev.rank,
                incarnation: ev.incarnation.clone(),
                remote,
                loaded_at: SystemTime::now(),
                load_time: started.elapsed() - connected.unwrap_or_default(),
                connect_time: connected,
                warmup_time: None,
            };
            l.warmup_time = self.warm_up(&l);
            l
        });
        self.agent.unlock();
        let mut state = relock(self.state.lock());
        let Some(ranks) = state.loaded.get_mut(&ev.engine_id) else {
            return;
        };
        match loaded {
            Some(l) => {
                log::debug!(
                    "nixl-etcd pre-warmed engine {} rank {}: NIXL agent {} loaded{}{}",
                    ev.engine_id,
                    ev.rank,
                    l.remote,
                    if connected.is_some() {
                        " and connected"
                    } else {
                        ""
                    },
                    if l.warmup_time.is_some() {
                        ", warmed up"
                    } else {
                        ""
                    }
                );
                ranks.insert(ev.rank, l);
            }
            None => {
                ranks.remove(&ev.rank);
            }
        }
        if ranks.is_empty() {
            state.loaded.remove(&ev.engine_id);
        }
    }

    /// Runs the engine's warm-up on a rank just loaded (the agent's lock is
    /// held); how long it took, or `None` when there is none or it failed
    /// (logged: the first transfer then sets up what it would have).
    pub(super) fn warm_up(&self, l: &Loaded) -> Option<Duration> {
        let hook = relock(self.warmup.lock()).clone()?;
        let started = Instant::now();
        let call = Warmup {
            agent: self.agent.raw,
            loaded: l,
        };
        // The engine's code: a panic in it must not end the pre-warm.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| (hook.0)(&call)))
            .unwrap_or_else(|_| Err("it panicked".into()));
        match outcome {
            Ok(()) => Some(started.elapsed()),
            Err(e) => {
                log::warn!(
                    "nixl-etcd pre-warm: the warm-up of engine {} rank {} (NIXL agent {}) \
                     failed: {e}; its first transfer sets up what the warm-up would have",
                    l.engine_id,
                    l.rank,
                    l.remote
                );
                None
            }
        }
    }
}
