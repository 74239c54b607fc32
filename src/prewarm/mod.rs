//! Pre-warm (cargo feature `nixl`): a decode loads the NIXL agents of the
//! prefill ranks it may read when their records appear, before any request
//! needs them, so that the first transfer finds the remote agent loaded.
//!
//! One subscription (per named engine, or one to every engine for prefixes)
//! feeds one worker thread, which loads, drops and reloads remote agents
//! under a lock that the caller takes for its own use of the agent (NIXL
//! agents made through its C API are not thread-safe).

mod agent_lock;
mod select;
mod warmup;
mod worker;

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The memory kinds a warm-up READ names.
pub use crate::nixl::nixl_sys::MemType;
pub use agent_lock::AgentGuard;
use agent_lock::{relock, AgentSlot};
use select::Filter;
pub use warmup::{read_twice, Warmup, WarmupFn, WarmupHook};
use worker::{Shared, State};

use crate::client::Client;
use crate::error::{Error, Result, Status};
use crate::events::Event;
use crate::nixl::nixl_error;
use crate::nixl::nixl_sys::{self, raw::nixl_capi_agent_t, Agent};
use crate::tp;

/// Default of [`PrewarmOptions::max_engines`].
pub const DEFAULT_MAX_ENGINES: usize = 16;

/// Which ranks of a followed engine to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranks {
    /// Every rank.
    All,
    /// The ranks that local rank `local_rank` of a `local_tp`-way engine reads
    /// under vLLM's mapping ([`tp::target_ranks`]), given the remote engine's
    /// `world_size` (taken as `local_tp` when its registrant did not declare it).
    Tp { local_tp: u32, local_rank: u32 },
}

/// What to pre-warm.
#[derive(Debug, Clone)]
pub struct PrewarmOptions {
    /// Engines to follow: exact ids, or prefixes ending in `*` (`*` alone:
    /// every engine). Empty: every engine. Records of the client's own
    /// incarnation (what it registered itself) are never loaded.
    pub engines: Vec<String>,
    pub ranks: Ranks,
    /// At most this many engines loaded at a time; an engine beyond it waits
    /// (its records are kept, not loaded) until one leaves.
    pub max_engines: usize,
    /// After loading a rank, connect to it (NIXL's `makeConnection`: the
    /// transport's endpoint, a UCX connection per remote agent), so that the
    /// first transfer does not pay for it. Costs one connection per loaded
    /// rank, as the first transfer would. On by default.
    pub connect: bool,
    /// The engine's warm-up, run on each rank after it is loaded and
    /// connected (see [`Warmup::read`]): what the first transfer would set
    /// up on its path (UCX's lanes and protocols, CUDA IPC mappings) is set
    /// up ahead. None by default: the library knows no remote address.
    pub warmup: Option<WarmupHook>,
}

impl Default for PrewarmOptions {
    fn default() -> Self {
        PrewarmOptions {
            engines: Vec::new(),
            ranks: Ranks::All,
            max_engines: DEFAULT_MAX_ENGINES,
            connect: true,
            warmup: None,
        }
    }
}

/// One remote rank whose agent is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub engine_id: String,
    pub rank: u32,
    pub incarnation: String,
    /// The remote agent's name, to use in transfers.
    pub remote: String,
    /// When NIXL finished loading it, and how long the load took.
    pub loaded_at: SystemTime,
    pub load_time: Duration,
    /// How long connecting to it took, when the pre-warm connected
    /// ([`PrewarmOptions::connect`]); `None` when it did not (off, or NIXL
    /// could not: the first transfer connects then).
    pub connect_time: Option<Duration>,
    /// How long the engine's warm-up took ([`PrewarmOptions::warmup`]);
    /// `None` without one, or when it failed.
    pub warmup_time: Option<Duration>,
}

enum Msg {
    Event(Event),
    Stop,
}

/// A running pre-warm; stops (unsubscribes, joins its worker) on drop. The
/// remote agents it loaded stay loaded.
pub struct Prewarm {
    shared: Arc<Shared>,
    client: Client,
    subs: Vec<u64>,
    tx: Option<mpsc::Sender<Msg>>,
    worker: Option<JoinHandle<()>>,
}

impl Prewarm {
    /// Starts pre-warming into `agent`, which the pre-warm owns from now on:
    /// use it through [`Prewarm::agent`]; [`Prewarm::stop`] gives it back.
    pub fn start(client: &Client, agent: Agent, opts: PrewarmOptions) -> Result<Prewarm> {
        let raw = agent.as_raw();
        Self::start_inner(client, raw, Some(agent), opts)
    }

    /// [`Prewarm::start`] for an agent created elsewhere (a C engine's
    /// `nixl_capi_agent_t`).
    ///
    /// # Safety
    /// `agent` is a live NIXL agent that outlives the pre-warm and that the
    /// caller uses only between [`Prewarm::lock`] and [`Prewarm::unlock`].
    pub unsafe fn start_raw(
        client: &Client,
        agent: nixl_capi_agent_t,
        opts: PrewarmOptions,
    ) -> Result<Prewarm> {
        if agent.is_null() {
            return Err(Error::invalid("NIXL agent is NULL"));
        }
        Self::start_inner(client, agent, None, opts)
    }

    fn start_inner(
        client: &Client,
        raw: nixl_capi_agent_t,
        owned: Option<Agent>,
        opts: PrewarmOptions,
    ) -> Result<Prewarm> {
        // NIXL must be loadable before anything is followed.
        nixl_sys::api().map_err(nixl_error)?;
        let filter = Filter::parse(&opts.engines)?;
        if opts.max_engines == 0 {
            return Err(Error::invalid(
                "pre-warm max_engines is 0: nothing would be loaded; give at least 1",
            ));
        }
        if let Ranks::Tp {
            local_tp,
            local_rank,
        } = opts.ranks
        {
            tp::target_ranks(local_tp, local_rank, local_tp)?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            agent: AgentSlot {
                raw,
                owned: Mutex::new(owned),
                busy: Mutex::new(false),
                freed: Condvar::new(),
            },
            filter,
            ranks: opts.ranks,
            max_engines: opts.max_engines,
            connect: opts.connect,
            warmup: Mutex::new(opts.warmup.clone()),
            own_incarnation: client.incarnation().to_owned(),
        });
        let (tx, rx) = mpsc::channel::<Msg>();
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nixl-etcd-prewarm".into())
                .spawn(move || {
                    while let Ok(Msg::Event(ev)) = rx.recv() {
                        shared.apply(ev);
                    }
                })
                .map_err(|e| Error::internal(format!("cannot start the pre-warm thread: {e}")))?
        };
        let mut me = Prewarm {
            shared,
            client: client.clone(),
            subs: Vec::new(),
            tx: Some(tx),
            worker: Some(worker),
        };
        // Exact ids alone: one subscription each (only those engines are
        // read); any prefix: one subscription to every engine.
        let targets: Vec<Option<String>> = if me.shared.filter.prefixes.is_empty() {
            me.shared.filter.ids.iter().cloned().map(Some).collect()
        } else {
            vec![None]
        };
        for engine in targets {
            let tx = Mutex::new(me.tx.clone().expect("set above"));
            let shared = me.shared.clone();
            let id = client.subscribe(
                engine.as_deref(),
                Box::new(move |ev: &Event| {
                    if shared.wants(ev) {
                        let _ = relock(tx.lock()).send(Msg::Event(ev.clone()));
                    }
                }),
            )?;
            me.subs.push(id);
        }
        log::info!(
            "nixl-etcd pre-warm started: engines {:?}, ranks {:?}, max_engines {}",
            opts.engines,
            opts.ranks,
            opts.max_engines
        );
        Ok(me)
    }

    /// The remote agent's name for (`engine_id`, `rank`) if the pre-warm has
    /// loaded it; no etcd or NIXL call.
    pub fn remote(&self, engine_id: &str, rank: u32) -> Option<String> {
        let state = relock(self.shared.state.lock());
        state
            .loaded
            .get(engine_id)
            .and_then(|r| r.get(&rank))
            .map(|l| l.remote.clone())
    }

    /// Waits up to `timeout` (`None`: the client's configured timeout) for
    /// the pre-warm to load (`engine_id`, `rank`). `ErrTimeout` says why it
    /// may not come.
    pub fn wait_remote(
        &self,
        engine_id: &str,
        rank: u32,
        timeout: Option<Duration>,
    ) -> Result<String> {
        let timeout = timeout.unwrap_or(self.client.config().timeout);
        let deadline = Instant::now() + timeout;
        let mut state = relock(self.shared.state.lock());
        loop {
            if let Some(l) = state.loaded.get(engine_id).and_then(|r| r.get(&rank)) {
                return Ok(l.remote.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = if !self.shared.filter.matches(engine_id) {
                    "it matches none of the pre-warm's engines"
                } else if state.waiting.iter().any(|(e, _)| e == engine_id) {
                    "it waits for a slot (max_engines reached)"
                } else {
                    "check that the engine registered this rank and that this rank is one the \
                     pre-warm's TP mapping selects"
                };
                return Err(Error::new(
                    Status::ErrTimeout,
                    format!(
                        "pre-warm did not load engine {engine_id} rank {rank} within {timeout:?}: \
                         {why}"
                    ),
                ));
            }
            state = relock(self.shared.changed.wait_timeout(state, left)).0;
        }
    }

    /// Every remote rank loaded now.
    pub fn loaded(&self) -> Vec<Loaded> {
        let state = relock(self.shared.state.lock());
        let mut all: Vec<Loaded> = state
            .loaded
            .values()
            .flat_map(|r| r.values().cloned())
            .collect();
        all.sort_by(|a, b| (&a.engine_id, a.rank).cmp(&(&b.engine_id, b.rank)));
        all
    }

    /// Exclusive use of the agent given to [`Prewarm::start`] (waits for a
    /// load in progress). `None` for an agent given to `start_raw`.
    pub fn agent(&self) -> Option<AgentGuard<'_>> {
        let owned = relock(self.shared.agent.owned.lock());
        // The agent lives in the slot until `stop` takes it back, which needs
        // `self` by value: no guard outlives it.
        let agent: *const Agent = owned.as_ref()?;
        drop(owned);
        self.shared.agent.lock();
        Some(AgentGuard {
            slot: &self.shared.agent,
            // SAFETY: see above.
            agent: unsafe { &*agent },
        })
    }

    /// Sets (or with `None` clears) the warm-up for the ranks loaded from now
    /// on, and runs it now on those loaded already; returns once it ran.
    /// Not while holding the agent lock.
    pub fn set_warmup(&self, hook: Option<WarmupHook>) {
        *relock(self.shared.warmup.lock()) = hook;
        self.shared.agent.lock();
        for l in self.loaded() {
            let took = self.shared.warm_up(&l);
            let mut state = relock(self.shared.state.lock());
            let same = state
                .loaded
                .get_mut(&l.engine_id)
                .and_then(|r| r.get_mut(&l.rank))
                .filter(|now| now.remote == l.remote);
            if let Some(now) = same {
                now.warmup_time = took;
            }
        }
        self.shared.agent.unlock();
    }

    /// Takes the agent lock (blocks while the pre-warm loads); for callers of
    /// `start_raw`, before they use their agent.
    pub fn lock(&self) {
        self.shared.agent.lock();
    }

    /// Releases the agent lock; `false` if it was not held.
    pub fn unlock(&self) -> bool {
        self.shared.agent.unlock()
    }

    /// Stops following (no callback runs after this returns, no load is in
    /// progress) and gives back the agent given to [`Prewarm::start`].
    pub fn stop(mut self) -> Option<Agent> {
        self.halt();
        relock(self.shared.agent.owned.lock()).take()
    }

    fn halt(&mut self) {
        for id in self.subs.drain(..) {
            // A closed client has ended its subscriptions already.
            let _ = self.client.unsubscribe(id);
        }
        // Subscriptions' callbacks may keep a sender alive: stop explicitly.
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Msg::Stop);
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Prewarm {
    fn drop(&mut self) {
        self.halt();
    }
}
