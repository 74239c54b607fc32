//! Informer cache, in the style of client-go informers: list a prefix once,
//! then watch it from the next revision; re-list and reconcile after a
//! compaction or a reconnect. Reads are served from memory; while etcd is
//! unreachable the last known records keep being served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::sync::watch;

use crate::blob;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::events::{Event, EventKind, Hub};
use crate::keys;
use crate::record::Record;
use crate::session::{self, Conn};
use crate::sign::Signer;

/// A decoded record, shared by the cache and every reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The record without its base64 copy of the metadata.
    pub record: Arc<Record>,
    pub metadata: Arc<Vec<u8>>,
    /// etcd's mod_revision of the key.
    pub revision: i64,
}

impl Entry {
    /// Decodes a key-value read from etcd under `namespace`; `None` if the
    /// key is not a rank record. With a `signer`, a record whose signature
    /// is missing or wrong is an error slot, never an entry.
    pub fn decode(
        namespace: &str,
        signer: Option<&Signer>,
        kv: &KeyValue,
    ) -> Option<(RankId, Result<Entry>)> {
        let key = std::str::from_utf8(kv.key()).ok()?;
        let (engine, rank) = keys::parse_rank_key(namespace, key)?;
        // Only a signed value needs a copy (the record without its signature).
        let verified = match signer {
            Some(s) => s
                .open(key, kv.value())
                .map(std::borrow::Cow::Owned)
                .map_err(|e| Error::bad_signature(key, e)),
            None => Ok(std::borrow::Cow::Borrowed(kv.value())),
        };
        let entry = verified.and_then(|value| Record::from_json(key, &value, engine, rank));
        let entry = entry.map(|(record, md)| Entry {
            record: Arc::new(record),
            metadata: Arc::new(md),
            revision: kv.mod_revision(),
        });
        Some(((engine.to_owned(), rank), entry))
    }
}

/// Turns a decoded entry whose metadata is in chunks into a complete one:
/// reads the chunks its record names as of `revision` (the record's) and
/// checks them. `Ok(None)`: the chunks are gone because a newer
/// registration replaced them (only when that revision was compacted); the
/// newer record follows. `Err`: etcd could not be read; a slot holding an
/// error: the chunks do not match the record.
pub(crate) async fn complete(conn: &Conn, slot: Slot, revision: i64) -> Result<Option<Slot>> {
    let entry = match slot {
        Ok(e) if e.record.blob.is_some() => e,
        other => return Ok(Some(other)),
    };
    let rec = &entry.record;
    let Some(blob) = rec.blob.as_ref() else {
        return Ok(Some(Ok(entry)));
    };
    let ns = &conn.cfg().namespace;
    let key = keys::rank_key(ns, &rec.engine_id, rec.rank);
    let prefix = blob::generation_prefix(ns, &rec.engine_id, rec.rank, &blob.generation);
    let (chunks, pinned) = session::fetch_chunks(conn, &prefix, blob, revision).await?;
    if !pinned && chunks.is_empty() && blob.chunks > 0 {
        return Ok(None);
    }
    let assembled = blob::assemble(&key, &prefix, blob, rec.metadata_len, &chunks);
    Ok(Some(assembled.map(|md| Entry {
        metadata: Arc::new(md),
        ..entry
    })))
}

pub type RankId = (String, u32);
/// A rank's slot: the record, or why it could not be read.
type Slot = Result<Entry>;

/// One watched prefix (the whole namespace, or one engine).
#[derive(Default)]
struct State {
    entries: HashMap<RankId, Slot>,
    /// Revisions of deletes this client made itself, so that a late watch
    /// event of an older put cannot bring the record back.
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

pub(crate) struct Informer {
    prefix: String,
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
    /// this client's own writes), to notice etcd's history going back.
    seen: AtomicI64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Informer {
    pub fn get(&self, id: &RankId) -> Option<Slot> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .get(id)
            .cloned()
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

    fn set_list_error(&self, e: Option<Error>) {
        *self.list_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
        self.changes.send_modify(|g| *g += 1);
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Runs `f` over the current records of `engine`.
    pub fn with_engine<T>(&self, engine: &str, f: impl FnOnce(Vec<(u32, &Slot)>) -> T) -> T {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        f(state
            .entries
            .iter()
            .filter(|((e, _), _)| e == engine)
            .map(|((_, r), s)| (*r, s))
            .collect())
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

    pub fn stop(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }

    /// Replaces the map with a fresh list taken at `revision`, emitting the
    /// differences. Changes newer than the list (this client's own writes)
    /// are kept.
    fn reconcile(&self, mut fresh: HashMap<RankId, Slot>, revision: i64, hub: &Hub) {
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
            hub.publish(&self.prefix, event(EventKind::Removed, &old));
        }
        let mut incoming: Vec<_> = fresh.into_iter().collect();
        incoming.sort_by_key(|(_, s)| s.as_ref().map(|e| e.revision).unwrap_or(0));
        let mut next = HashMap::with_capacity(incoming.len());
        for (id, slot) in incoming {
            if let Some(ev) = change(state.entries.get(&id), &slot) {
                hub.publish(&self.prefix, ev);
            }
            next.insert(id, slot);
        }
        state.entries = next;
        self.listed.store(true, Ordering::Release);
        self.changes.send_modify(|g| *g += 1);
    }

    /// Applies a put (`Some`) or a delete (`None`) at `revision`, from the
    /// watch or from this client's own write; older news is ignored.
    pub fn apply(&self, id: RankId, slot: Option<Slot>, revision: i64, hub: &Hub) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match slot {
            Some(slot) => {
                if revision <= state.revision(&id) {
                    return;
                }
                state.tombstones.remove(&id);
                if let Some(ev) = change(state.entries.get(&id), &slot) {
                    hub.publish(&self.prefix, ev);
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
                    hub.publish(&self.prefix, ev);
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

/// Engines a client follows one by one before it follows the whole namespace.
const MAX_ENGINE_INFORMERS: usize = 4;

/// The informers of one client, created on first interest.
pub(crate) struct Cache {
    informers: Mutex<HashMap<String, Arc<Informer>>>,
    /// Verifies every record read, when records are signed.
    signer: Option<Arc<Signer>>,
    /// The client's connection (what the informers read and watch with).
    conn: Conn,
}

impl Cache {
    pub fn new(conn: Conn, signer: Option<Arc<Signer>>) -> Cache {
        Cache {
            informers: Mutex::new(HashMap::new()),
            signer,
            conn,
        }
    }

    /// The informer that covers `engine` (`None`: the whole namespace):
    /// an existing namespace-wide one, else the engine's own, started now.
    pub fn informer(&self, engine: Option<&str>, hub: &Arc<Hub>, exact: bool) -> Arc<Informer> {
        let cfg = self.conn.cfg();
        let ns_prefix = format!("{}/", cfg.namespace);
        let prefix = match engine {
            Some(e) => keys::engine_prefix(&cfg.namespace, e),
            None => ns_prefix.clone(),
        };
        let mut all = self.informers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(inf) = all.get(&prefix) {
            return inf.clone();
        }
        if !exact {
            if let Some(inf) = all.get(&ns_prefix) {
                return inf.clone();
            }
        }
        // A client that follows many engines (a decode rank reading from a
        // fleet of prefills) watches the whole namespace instead: one list
        // and one watch, however large the fleet.
        let prefix = if !exact && engine.is_some() && all.len() >= MAX_ENGINE_INFORMERS {
            log::debug!(
                "following more than {MAX_ENGINE_INFORMERS} engines: caching the whole \
                 namespace {}",
                cfg.namespace
            );
            ns_prefix
        } else {
            prefix
        };
        let (changes, _) = watch::channel(0);
        let inf = Arc::new(Informer {
            prefix: prefix.clone(),
            state: RwLock::new(State::default()),
            listed: AtomicBool::new(false),
            changes,
            list_error: Mutex::new(None),
            seen: AtomicI64::new(0),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(run(
            inf.clone(),
            self.conn.clone(),
            hub.clone(),
            self.signer.clone(),
        ));
        *inf.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        all.insert(prefix, inf.clone());
        inf
    }

    /// The cached slot of (`engine`, `rank`), if an informer covering the
    /// engine exists and holds it. Runs on any thread, without the runtime.
    pub fn cached(&self, engine: &str, rank: u32) -> Option<Slot> {
        self.covering(engine)?.get(&(engine.to_owned(), rank))
    }

    /// The informer that covers `engine`, if one was started.
    pub fn covering(&self, engine: &str) -> Option<Arc<Informer>> {
        let cfg = self.conn.cfg();
        let all = self.informers.lock().unwrap_or_else(|e| e.into_inner());
        all.get(&keys::engine_prefix(&cfg.namespace, engine))
            .or_else(|| all.get(&format!("{}/", cfg.namespace)))
            .cloned()
    }

    /// Applies this client's own write to every informer that covers `key`,
    /// so that the client reads its own writes at once.
    pub fn write_through(
        &self,
        key: &str,
        id: RankId,
        slot: Option<Slot>,
        revision: i64,
        hub: &Hub,
    ) {
        let covering: Vec<_> = self
            .informers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.covers(key))
            .cloned()
            .collect();
        for inf in covering {
            inf.apply(id.clone(), slot.clone(), revision, hub);
        }
    }

    pub fn stop(&self) {
        for inf in self
            .informers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            inf.stop();
        }
    }
}

/// The informer's life: list, watch, and on any break re-list.
async fn run(inf: Arc<Informer>, conn: Conn, hub: Arc<Hub>, signer: Option<Arc<Signer>>) {
    let cfg = conn.cfg();
    let mut stale = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        match list_then_watch(&inf, &conn, signer.as_deref(), &hub, &mut stale).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                if inf.listed() && !stale {
                    log::warn!(
                        "ETCD watch on {} broke: {e}; serving the last known records (stale) \
                         until etcd at {} answers again",
                        inf.prefix,
                        cfg.endpoints.join(",")
                    );
                    stale = true;
                } else {
                    log::debug!("informer {}: {e}; retrying in {backoff:?}", inf.prefix);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Records per page of a list: a whole fleet's namespace in one or two requests.
const LIST_PAGE: i64 = 1024;
/// Largest response accepted (gRPC's default is 4 MiB; a page of records can
/// be larger). A page over it is fetched again in halves.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Lists every rank record under `prefix` as one snapshot (see
/// [`session::read_range`]); returns the records and the revision they were
/// read at.
async fn list_prefix(
    conn: &Conn,
    prefix: &str,
    signer: Option<&Signer>,
) -> Result<(HashMap<RankId, Slot>, i64)> {
    let (cfg, namespace) = (conn.cfg(), conn.cfg().namespace.as_str());
    let kv = conn
        .etcd_uncounted()
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let (kvs, revision) = session::read_range(conn, &kv, prefix, LIST_PAGE, None, usize::MAX)
        .await
        .map_err(|e| etcd_error::map_key(e, Op::Lookup, cfg, prefix))?;
    let mut fresh = HashMap::new();
    for (id, slot) in kvs
        .iter()
        .filter_map(|kv| Entry::decode(namespace, signer, kv))
    {
        // Chunks as of the list's revision: there even if replaced since.
        match complete(conn, slot, revision).await? {
            Some(slot) => {
                fresh.insert(id, slot);
            }
            None => {
                return Err(Error::new(
                    Status::ErrConnection,
                    "a record's chunks were replaced during the list; listing again",
                ))
            }
        }
    }
    Ok((fresh, revision))
}

/// Lists the prefix, reconciles, then applies watch events until the watch
/// breaks. `Ok` means "re-list now" (compaction), `Err` a connection problem.
async fn list_then_watch(
    inf: &Informer,
    conn: &Conn,
    signer: Option<&Signer>,
    hub: &Hub,
    stale: &mut bool,
) -> Result<()> {
    let cfg = conn.cfg();
    let namespace = cfg.namespace.as_str();
    let map = |e| etcd_error::map(e, Op::Lookup, cfg);
    let listing = list_prefix(conn, &inf.prefix, signer);
    let (fresh, revision) = tokio::time::timeout(cfg.timeout, listing)
        .await
        .map_err(|_| etcd_error::timed_out(Op::Lookup, cfg.timeout, &cfg.endpoints.join(",")))
        .and_then(|r| r)
        .inspect_err(|e| inf.set_list_error(Some(e.clone())))?;
    if inf.list_error().is_some() {
        inf.set_list_error(None);
    }
    inf.reconcile(fresh, revision, hub);
    if *stale {
        log::info!(
            "ETCD is reachable again; the cache of {} caught up",
            inf.prefix
        );
        *stale = false;
    }
    conn.count();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let prefix = inf.prefix.as_bytes();
    let mut stream = etcd_error::retry_transient(cfg, || {
        let mut watch = conn
            .etcd_uncounted()
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let opts = opts.clone();
        async move { watch.watch(prefix, Some(opts)).await }
    })
    .await
    .map_err(map)?;
    loop {
        let Some(msg) = stream.message().await.map_err(map)? else {
            return Err(Error::new(Status::ErrConnection, "the watch stream ended"));
        };
        if msg.canceled() {
            log::debug!(
                "watch on {} cancelled ({}; compacted at {}); re-listing",
                inf.prefix,
                msg.cancel_reason(),
                msg.compact_revision()
            );
            return Ok(());
        }
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            inf.seen.fetch_max(kv.mod_revision(), Ordering::AcqRel);
            match ev.event_type() {
                EventType::Put => {
                    if let Some((id, slot)) = Entry::decode(namespace, signer, kv) {
                        let rev = kv.mod_revision();
                        // None: superseded; the newer put is further on.
                        if let Some(slot) = complete(conn, slot, rev).await? {
                            inf.apply(id, Some(slot), rev, hub);
                        }
                    }
                }
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key());
                    if let Some((engine, rank)) = keys::parse_rank_key(namespace, &key) {
                        inf.apply((engine.to_owned(), rank), None, kv.mod_revision(), hub);
                    }
                }
            }
        }
    }
}
