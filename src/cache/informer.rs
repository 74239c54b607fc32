//! One watched prefix (one engine, or the whole namespace): its records,
//! the changes applied to them, and the clients' event hubs they are
//! published to. Shared by every client of the process that reads it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Instant;

use tokio::sync::watch;

use super::{Entry, RankId, Slot};
use crate::error::Error;
use crate::events::{Event, EventKind, Hub};

#[derive(Default)]
struct State {
    entries: HashMap<RankId, Slot>,
    /// Revisions of deletes applied, so that a late watch event of an older
    /// put cannot bring the record back.
    tombstones: HashMap<RankId, i64>,
}

impl State {
    fn revision(&self, id: &RankId) -> i64 {
        let live = self
            .entries
            .get(id)
            .and_then(|s| s.as_ref().ok())
            .map(|e| e.revision);
        live.or(self.tombstones.get(id).copied()).unwrap_or(0)
    }
}

/// Milliseconds since the first call, for "last read" stamps.
pub(super) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub(crate) struct Informer {
    pub(super) prefix: String,
    state: RwLock<State>,
    /// Listed at least once: absence in `entries` then means "not registered
    /// as of the last list or event".
    listed: AtomicBool,
    /// Bumped after every applied change; waiters sleep on it.
    changes: watch::Sender<u64>,
    /// Why the last list failed, until one succeeds (for readers waiting on
    /// the first list).
    list_error: Mutex<Option<Error>>,
    /// The highest revision read from etcd by a list or a watch event (not
    /// this process's own writes), to notice etcd's history going back.
    pub(super) seen: AtomicI64,
    /// Serving the last known records while etcd cannot be reached.
    pub(super) stale: AtomicBool,
    /// When a client last read it (see [`now_ms`]); an informer nobody reads
    /// or subscribes to is dropped after the idle time.
    last_read: AtomicU64,
    /// The event hubs of the clients subscribed through it.
    hubs: Mutex<Vec<Weak<Hub>>>,
}

impl Informer {
    pub(super) fn new(prefix: String) -> Informer {
        let (changes, _) = watch::channel(0);
        Informer {
            prefix,
            state: RwLock::new(State::default()),
            listed: AtomicBool::new(false),
            changes,
            list_error: Mutex::new(None),
            seen: AtomicI64::new(0),
            stale: AtomicBool::new(false),
            last_read: AtomicU64::new(now_ms()),
            hubs: Mutex::new(Vec::new()),
        }
    }

    pub fn get(&self, id: &RankId) -> Option<Slot> {
        self.touch();
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(id)
            .cloned()
    }

    /// Marks the informer read now.
    pub fn touch(&self) {
        self.last_read.store(now_ms(), Ordering::Relaxed);
    }

    pub(super) fn idle_ms(&self) -> u64 {
        now_ms().saturating_sub(self.last_read.load(Ordering::Relaxed))
    }

    pub fn covers(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
    }

    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    pub fn list_error(&self) -> Option<Error> {
        self.list_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn set_list_error(&self, e: Option<Error>) {
        *self.list_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
        self.changes.send_modify(|g| *g += 1);
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` over the current records of `engine`.
    pub fn with_engine<T>(&self, engine: &str, f: impl FnOnce(Vec<(u32, &Slot)>) -> T) -> T {
        self.touch();
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        f(state
            .entries
            .iter()
            .filter(|((e, _), _)| e == engine)
            .map(|((_, r), s)| (*r, s))
            .collect())
    }

    /// Records held (for the memory a process's cache takes).
    pub fn len(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }

    /// True while a client's subscription receives its changes.
    pub(super) fn subscribed(&self) -> bool {
        self.hubs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .any(|h| h.listens_to(&self.prefix))
    }

    /// Adds a subscription to `hub`, replaying the current records as ADDED
    /// while holding the lock that every change is applied under.
    pub fn subscribe(
        &self,
        hub: &Arc<Hub>,
        engine: Option<String>,
        callback: crate::events::Callback,
    ) -> std::io::Result<u64> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        {
            let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
            hubs.retain(|h| h.strong_count() > 0);
            if !hubs
                .iter()
                .any(|h| std::ptr::eq(h.as_ptr(), Arc::as_ptr(hub)))
            {
                hubs.push(Arc::downgrade(hub));
            }
        }
        let mut snapshot: Vec<Event> = state
            .entries
            .values()
            .filter_map(|s| s.as_ref().ok())
            .filter(|e| engine.as_deref().is_none_or(|n| n == e.record.engine_id))
            .map(|e| event(EventKind::Added, e))
            .collect();
        snapshot.sort_by_key(|e| e.revision);
        hub.subscribe(&self.prefix, engine, callback, snapshot)
    }

    /// Publishes a change to every subscribed client. Called with the state
    /// lock held, so subscribers see changes in the order applied.
    fn publish(&self, ev: Event) {
        let hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        for hub in hubs.iter().filter_map(Weak::upgrade) {
            hub.publish(&self.prefix, ev.clone());
        }
    }

    /// Replaces the map with a fresh list taken at `revision`, emitting the
    /// differences. Changes newer than the list (this process's own writes)
    /// are kept.
    pub(super) fn reconcile(&self, mut fresh: HashMap<RankId, Slot>, revision: i64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        // A list is taken after every event this informer read, so its
        // revision is never below theirs, unless etcd's history went back:
        // etcd was wiped (a new cluster counts from 1 again) or restored
        // from an older backup. Fault found by `tests/faults.rs`: the old
        // records' higher revisions made them look newer than the new
        // cluster's, so caches kept serving pre-wipe values, and ignored the
        // new puts and deletes, until the new revisions caught up. Then the
        // list is the whole truth: nothing local is taken for newer (the
        // differences are still emitted as events).
        let seen = self.seen.fetch_max(revision, Ordering::AcqRel);
        let history_reset = revision < seen;
        if history_reset {
            log::warn!(
                "etcd's revision went back from {seen} to {revision} (etcd wiped or restored); \
                 the cache of {} starts over from etcd's records",
                self.prefix
            );
            self.seen.store(revision, Ordering::Release);
            state.tombstones.clear();
        }
        for (id, slot) in &state.entries {
            if !history_reset && matches!(slot, Ok(e) if e.revision > revision) {
                fresh.insert(id.clone(), slot.clone());
            }
        }
        state.tombstones.retain(|_, rev| *rev > revision);
        for id in state.tombstones.keys() {
            fresh.remove(id);
        }
        let mut gone: Vec<_> = state
            .entries
            .iter()
            .filter(|(k, _)| !fresh.contains_key(*k))
            .filter_map(|(_, s)| s.as_ref().ok().cloned())
            .collect();
        gone.sort_by_key(|e| e.revision);
        for old in gone {
            self.publish(event(EventKind::Removed, &old));
        }
        let mut incoming: Vec<_> = fresh.into_iter().collect();
        incoming.sort_by_key(|(_, s)| s.as_ref().map(|e| e.revision).unwrap_or(0));
        let mut next = HashMap::with_capacity(incoming.len());
        for (id, slot) in incoming {
            if let Some(ev) = change(state.entries.get(&id), &slot) {
                self.publish(ev);
            }
            next.insert(id, slot);
        }
        state.entries = next;
        self.listed.store(true, Ordering::Release);
        self.changes.send_modify(|g| *g += 1);
    }

    /// Applies a put (`Some`) or a delete (`None`) at `revision`, from the
    /// watch or from a client's own write; older news is ignored.
    pub fn apply(&self, id: RankId, slot: Option<Slot>, revision: i64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(slot) => {
                if revision <= state.revision(&id) {
                    return;
                }
                state.tombstones.remove(&id);
                if let Some(ev) = change(state.entries.get(&id), &slot) {
                    self.publish(ev);
                }
                state.entries.insert(id, slot);
            }
            None => {
                if revision < state.revision(&id) {
                    return;
                }
                if let Some(Ok(old)) = state.entries.remove(&id) {
                    let mut ev = event(EventKind::Removed, &old);
                    ev.revision = revision;
                    self.publish(ev);
                }
                state.tombstones.insert(id, revision);
            }
        }
        drop(state);
        self.changes.send_modify(|g| *g += 1);
    }
}

fn event(kind: EventKind, e: &Entry) -> Event {
    Event {
        kind,
        engine_id: e.record.engine_id.clone(),
        rank: e.record.rank,
        incarnation: e.record.incarnation.clone(),
        host: e.record.host.clone(),
        world_size: e.record.world_size,
        metadata: if kind == EventKind::Removed {
            Arc::new(Vec::new())
        } else {
            e.metadata.clone()
        },
        revision: e.revision,
    }
}

/// The event that turns `old` into `new`, if any.
fn change(old: Option<&Slot>, new: &Slot) -> Option<Event> {
    match (old, new) {
        (_, Err(e)) => {
            log::warn!("ignoring an unreadable record: {e}");
            // A readable record turned unreadable: peers must not keep using it.
            old.and_then(|o| o.as_ref().ok())
                .map(|o| event(EventKind::Removed, o))
        }
        (Some(Ok(o)), Ok(n)) if o.revision == n.revision => None,
        (Some(Ok(o)), Ok(n)) if o.record.incarnation == n.record.incarnation => {
            Some(event(EventKind::Updated, n))
        }
        (Some(Ok(_)), Ok(n)) => Some(event(EventKind::Replaced, n)),
        (_, Ok(n)) => Some(event(EventKind::Added, n)),
    }
}
