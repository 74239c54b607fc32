//! Change events and their delivery: one dispatcher thread per client calls
//! the subscribers' callbacks, in the order the informers applied the changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::{JoinHandle, ThreadId};

use crate::metrics;

/// What happened to a rank's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A rank appeared.
    Added = 1,
    /// The same incarnation re-registered (new metadata, same process).
    Updated = 2,
    /// The rank came back with a new incarnation (a restart): drop the old
    /// remote agent before loading the new metadata.
    Replaced = 3,
    /// The rank is gone (unregistered, closed, or its lease expired).
    Removed = 4,
}

/// One change, as delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub engine_id: String,
    pub rank: u32,
    /// The incarnation of the record added, or of the one removed.
    pub incarnation: String,
    pub host: String,
    /// The engine's number of ranks, when its registrant declared it (open
    /// option `world_size`).
    pub world_size: Option<u32>,
    /// Empty for `Removed`.
    pub metadata: Arc<Vec<u8>>,
    /// etcd revision of the change.
    pub revision: i64,
}

pub type Callback = Box<dyn Fn(&Event) + Send + Sync>;

struct Subscription {
    id: u64,
    /// The informer whose changes it receives.
    source: String,
    engine: Option<String>,
    callback: Callback,
    active: AtomicBool,
    /// Held while its callback runs, so unsubscribe can wait it out.
    running: Mutex<()>,
}

impl Subscription {
    fn deliver(&self, ev: &Event) {
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if self.active.load(Ordering::Acquire)
            && self.engine.as_deref().is_none_or(|e| e == ev.engine_id)
        {
            metrics::get().event(match ev.kind {
                EventKind::Added => "added",
                EventKind::Updated => "updated",
                EventKind::Replaced => "replaced",
                EventKind::Removed => "removed",
            });
            (self.callback)(ev);
        }
    }
}

enum Msg {
    Event {
        source: String,
        event: Arc<Event>,
    },
    /// The state a new subscriber starts from, as ADDED events.
    Replay {
        id: u64,
        events: Vec<Event>,
    },
}

/// Subscriptions of one client and its dispatcher thread (started on the
/// first subscription).
#[derive(Default)]
pub(crate) struct Hub {
    subs: RwLock<Vec<Arc<Subscription>>>,
    any: AtomicBool,
    next_id: AtomicU64,
    tx: Mutex<Option<mpsc::Sender<Msg>>>,
    thread: Mutex<Option<(ThreadId, JoinHandle<()>)>>,
    stopped: Arc<AtomicBool>,
}

impl Hub {
    /// Queues a change from the informer `source`. Cheap when nobody listens.
    pub fn publish(&self, source: &str, event: Event) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(Msg::Event {
                source: source.to_owned(),
                event: Arc::new(event),
            });
        }
    }

    /// Adds a subscription. `snapshot` (the informer's current records) is
    /// delivered first, as ADDED events. The caller holds the informer's lock,
    /// so no change slips between the snapshot and the live events.
    pub fn subscribe(
        self: &Arc<Self>,
        source: &str,
        engine: Option<String>,
        callback: Callback,
        snapshot: Vec<Event>,
    ) -> std::io::Result<u64> {
        let tx = self.ensure_thread()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.subs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(Subscription {
                id,
                source: source.to_owned(),
                engine,
                callback,
                active: AtomicBool::new(true),
                running: Mutex::new(()),
            }));
        self.any.store(true, Ordering::Release);
        if !snapshot.is_empty() {
            let _ = tx.send(Msg::Replay {
                id,
                events: snapshot,
            });
        }
        Ok(id)
    }

    /// Removes a subscription; once this returns, its callback is not running
    /// and will not run again (unless called from that very callback, which
    /// then finishes normally).
    pub fn unsubscribe(&self, id: u64) -> bool {
        let removed = {
            let mut subs = self.subs.write().unwrap_or_else(|e| e.into_inner());
            let pos = subs.iter().position(|s| s.id == id);
            pos.map(|p| subs.remove(p))
        };
        let Some(sub) = removed else {
            return false;
        };
        sub.active.store(false, Ordering::Release);
        if !self.on_dispatcher_thread() {
            drop(sub.running.lock().unwrap_or_else(|e| e.into_inner()));
        }
        true
    }

    /// Stops delivery; waits for the dispatcher unless called from it.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.any.store(false, Ordering::Release);
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((id, handle)) = thread {
            if id != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }

    /// True while a subscription receives the changes of informer `source`.
    pub fn listens_to(&self, source: &str) -> bool {
        !self.stopped.load(Ordering::Acquire)
            && self
                .subs
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|s| s.source == source)
    }

    fn on_dispatcher_thread(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(id, _)| *id == std::thread::current().id())
    }

    fn ensure_thread(self: &Arc<Self>) -> std::io::Result<mpsc::Sender<Msg>> {
        let mut tx_slot = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx_slot.as_ref() {
            return Ok(tx.clone());
        }
        if self.stopped.load(Ordering::Acquire) {
            return Err(std::io::Error::other("the client is closed"));
        }
        let (tx, rx) = mpsc::channel::<Msg>();
        let hub = Arc::downgrade(self);
        let stopped = self.stopped.clone();
        let handle = std::thread::Builder::new()
            .name("nixl-etcd-events".into())
            .spawn(move || {
                while let Ok(msg) = rx.recv() {
                    if stopped.load(Ordering::Acquire) {
                        break;
                    }
                    let Some(hub) = hub.upgrade() else { break };
                    let subs = hub.subs.read().unwrap_or_else(|e| e.into_inner()).clone();
                    match msg {
                        Msg::Event { source, event } => {
                            for s in subs.iter().filter(|s| s.source == source) {
                                s.deliver(&event);
                            }
                        }
                        Msg::Replay { id, events } => {
                            if let Some(s) = subs.iter().find(|s| s.id == id) {
                                events.iter().for_each(|e| s.deliver(e));
                            }
                        }
                    }
                }
            })?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((handle.thread().id(), handle));
        *tx_slot = Some(tx.clone());
        Ok(tx)
    }
}
