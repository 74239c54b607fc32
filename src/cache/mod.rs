//! Informer cache, in the style of client-go informers: list a prefix once,
//! then watch it from the next revision; re-list and reconcile after a
//! compaction or a reconnect. Reads are served from memory; while etcd is
//! unreachable the last known records keep being served. One cache per
//! process and etcd identity, shared by its clients (`shared`); each
//! engine read is its own informer (`informer`), all watched on one stream
//! (`watch`); an engine nobody reads for `cache_idle_s` is dropped.

mod informer;
mod shared;
mod watch;

use std::sync::{Arc, Mutex};

use etcd_client::KeyValue;

use crate::blob;
use crate::error::{Error, Result};
use crate::keys;
use crate::record::Record;
use crate::session::{self, Conn};
use crate::sign::Signer;

pub(crate) use informer::Informer;
use shared::Shared;

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
pub(crate) type Slot = Result<Entry>;

/// A client's view of its process's shared cache (see [`shared`]): what it
/// asks for is listed and watched once per process, and its own writes are
/// applied at once. Closing the client lets go of the shared cache, which
/// stops when its last client has.
pub(crate) struct Cache {
    shared: Mutex<Option<Arc<Shared>>>,
}

impl Cache {
    /// Must run on the runtime.
    pub fn new(conn: &Conn, signer: Option<Arc<Signer>>) -> Cache {
        Cache {
            shared: Mutex::new(Some(shared::for_client(conn, signer))),
        }
    }

    fn shared(&self) -> Result<Arc<Shared>> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(Error::closed)
    }

    /// The informer that covers `engine` (`None`: the whole namespace):
    /// an existing namespace-wide one unless `exact`, else the engine's own,
    /// started now. Must run on the runtime.
    pub fn informer(&self, engine: Option<&str>, exact: bool) -> Result<Arc<Informer>> {
        Ok(self.shared()?.informer(engine, exact))
    }

    /// Same as [`Cache::informer`]; a new informer is listed in this future
    /// (a cold read makes no hand-off to another task); true if it was.
    pub async fn informer_listed(&self, engine: &str) -> Result<(Arc<Informer>, bool)> {
        Ok(self.shared()?.informer_listed(Some(engine), false).await)
    }

    /// The cached slot of (`engine`, `rank`), if an informer covering the
    /// engine exists and holds it. Runs on any thread, without the runtime.
    pub fn cached(&self, engine: &str, rank: u32) -> Option<Slot> {
        self.covering(engine)?.get(&(engine.to_owned(), rank))
    }

    /// The informer that covers `engine`, if one was started.
    pub fn covering(&self, engine: &str) -> Option<Arc<Informer>> {
        self.shared().ok()?.covering(engine)
    }

    /// Applies this client's own write to every informer that covers `key`.
    pub fn write_through(&self, key: &str, id: RankId, slot: Option<Slot>, revision: i64) {
        if let Ok(shared) = self.shared() {
            shared.write_through(key, id, slot, revision);
        }
    }

    /// Engines cached by this client's process and the records held.
    pub fn footprint(&self) -> (usize, usize) {
        self.shared().map(|s| s.footprint()).unwrap_or((0, 0))
    }

    /// Lets go of the shared cache (the client is closing).
    pub fn stop(&self) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
