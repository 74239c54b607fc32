//! Registering a rank: the record, and for metadata too large for one etcd
//! request its chunks, written in the order that keeps readers from ever
//! seeing a partial or mixed blob (see `blob`).

use std::sync::Arc;

use super::{new_incarnation, Client, Inner};
use crate::blob;
use crate::cache::Entry;
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::Op;
use crate::keys;
use crate::metrics;
use crate::record::Record;
use crate::session::{Delete, Held};

impl Client {
    /// Publishes `metadata` for (`engine_id`, `rank`) under the client's lease;
    /// registering again replaces. Metadata too large for one etcd request
    /// is stored in chunks beside the record (see `blob`); readers never see
    /// a partial or mixed blob.
    pub fn register(&self, engine_id: &str, rank: u32, metadata: &[u8]) -> Result<()> {
        keys::validate_engine_id(engine_id)?;
        let cfg = self.config();
        if metadata.len() > cfg.max_metadata_bytes {
            return Err(blob::too_large(
                &format!("engine {engine_id} rank {rank}"),
                metadata.len(),
                cfg.max_metadata_bytes,
            ));
        }
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let incarnation = &self.inner.incarnation;
        let (mut record, chunks, generation) =
            if metadata.len() > inline_limit(cfg, engine_id, rank) {
                let generation = new_incarnation();
                let prefix = blob::generation_prefix(&cfg.namespace, engine_id, rank, &generation);
                let size = blob::chunk_size(cfg.max_request_bytes, prefix.len());
                let (chunks, blob_ref) = blob::split(metadata, &prefix, &generation, size);
                let record = Record::chunked(
                    engine_id,
                    rank,
                    &cfg.host,
                    incarnation,
                    metadata.len(),
                    blob_ref,
                );
                (record, chunks, Some(prefix))
            } else {
                let record = Record::new(engine_id, rank, &cfg.host, incarnation, metadata);
                (record, Vec::new(), None)
            };
        record.world_size = cfg.world_size;
        let value = match &self.inner.signer {
            Some(signer) => signer
                .seal(&key, &record.to_json())
                .map_err(|e| Error::internal(format!("cannot sign the record of {key}: {e}")))?,
            None => record.to_json(),
        };
        // What this client's own cache holds for the rank once the put is done.
        record.metadata = String::new();
        let entry = Entry {
            record: Arc::new(record),
            metadata: Arc::new(metadata.to_vec()),
            revision: 0,
        };
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let written = self.call(Op::Register, cfg.timeout, async move {
            let mut st = inner.session.lock().await;
            let revision = write_record(&inner, &mut st, &key, value, chunks, generation).await?;
            let entry = Entry { revision, ..entry };
            inner
                .cache
                .write_through(&key, (id, rank), Some(Ok(entry)), revision);
            Ok(())
        });
        metrics::get().registration(written.is_ok());
        written?;
        let first = self
            .inner
            .announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(engine_id.to_owned());
        if first {
            log::info!("Initialized NIXL ETCD coordinator: engine_id={engine_id}");
        }
        log::info!("Registered NIXL agent with ETCD");
        log::debug!(
            "registered engine_id={engine_id} rank={rank} bytes={} key={}",
            metadata.len(),
            keys::rank_key(&cfg.namespace, engine_id, rank)
        );
        Ok(())
    }

    /// Removes a registration this client made (its chunks with it).
    pub fn unregister(&self, engine_id: &str, rank: u32) -> Result<()> {
        keys::validate_engine_id(engine_id)?;
        let cfg = self.config();
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        self.call(Op::Unregister, cfg.timeout, async move {
            let mut st = inner.session.lock().await;
            // Only rank records this client wrote: the NIXL layout never
            // holds a rank key (publish_nixl refuses to write one).
            if !st.holds(&key) {
                return Err(Error::new(
                    Status::ErrNotFound,
                    format!(
                        "Engine {id} rank {rank} is not registered by this client; only the \
                         client that registered a rank can unregister it"
                    ),
                ));
            }
            let mut deletes = vec![Delete::Key(key.clone())];
            let generation = st.generation(&key);
            deletes.extend(generation.clone().map(Delete::Prefix));
            let revision = st.write_attached(&[], &deletes, Op::Unregister).await?;
            st.release(&key);
            if let Some(g) = generation {
                st.release_prefix(&g);
                st.set_generation(&key, None);
            }
            inner.cache.write_through(&key, (id, rank), None, revision);
            Ok(())
        })?;
        log::debug!("unregistered engine_id={engine_id} rank={rank}");
        Ok(())
    }
}

/// The largest metadata stored in the record itself; anything larger goes
/// in chunks. The record (base64 metadata and its JSON around it), its key
/// and the request's framing must fit in `max_request_bytes`.
pub fn inline_limit(cfg: &Config, engine_id: &str, rank: u32) -> usize {
    let key = keys::rank_key(&cfg.namespace, engine_id, rank);
    let limit = cfg.max_request_bytes.saturating_sub(key.len() + 512);
    let fixed = Record::encoded_size_bound(0, engine_id, &cfg.host);
    (limit.saturating_sub(fixed) / 4) * 3
}

/// Writes a rank record, after its chunks when its metadata is chunked, and
/// drops the chunks of the generation it replaces in the same transaction;
/// returns the record's revision. On failure nothing new is visible: the
/// record was not written, and the new chunks are deleted (best effort; they
/// are under the lease anyway).
async fn write_record(
    inner: &Inner,
    st: &mut Held<'_>,
    key: &str,
    value: Vec<u8>,
    chunks: Vec<(String, Vec<u8>)>,
    generation: Option<String>,
) -> Result<i64> {
    let old = st.generation(key);
    if let Some(g) = &generation {
        if let Err(e) = st.put_each(&chunks, Op::Register).await {
            forget_generation(inner, st, g);
            return Err(e);
        }
        // Re-written with everything else if the lease is lost from now on.
        st.hold(chunks);
    }
    let deletes: Vec<Delete> = old.iter().cloned().map(Delete::Prefix).collect();
    let kvs = [(key.to_owned(), value)];
    let revision = match st.write_attached(&kvs, &deletes, Op::Register).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(g) = &generation {
                forget_generation(inner, st, g);
            }
            return Err(e);
        }
    };
    st.hold(kvs);
    if let Some(old) = old {
        st.release_prefix(&old);
    }
    st.set_generation(key, generation);
    Ok(revision)
}

/// Drops a chunk generation no record names: from what the lease re-writes,
/// and from etcd in the background (best effort: it goes with the lease).
fn forget_generation(inner: &Inner, st: &mut Held<'_>, prefix: &str) {
    st.release_prefix(prefix);
    let mut kv = inner.session.etcd().kv_client();
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let opts = etcd_client::DeleteOptions::new().with_prefix();
        if let Err(e) = kv.delete(prefix.as_bytes(), Some(opts)).await {
            log::debug!("could not delete unused chunks {prefix}: {e}");
        }
    });
}
