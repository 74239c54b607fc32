//! Reading ranks: from the informer cache when it holds them, else from
//! etcd; waits and subscriptions sleep on the informers' changes (no polling).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{log_handshake, Client, Found, Inner};
use crate::cache::{self, Entry, Informer};
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::events::Callback;
use crate::keys;
use crate::metrics;

impl Client {
    /// The record of (`engine_id`, `rank`), or `NOT_FOUND` at once.
    pub fn lookup(&self, engine_id: &str, rank: u32) -> Result<Found> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let cfg = self.config();
        // A cache hit is answered on the calling thread, without the runtime.
        self.check_usable()?;
        if let Some(hit) = self.inner.cache.cached(engine_id, rank) {
            metrics::get().lookup(if hit.is_ok() { "cache" } else { "error" });
            log_handshake(started);
            return hit;
        }
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let found =
            self.call(Op::Lookup, cfg.timeout, async move {
                // A cache hit costs no round trip. A miss asks etcd: the cache may
                // lag a registration that another client just made.
                let (informer, listed_now) = inner.cache.informer_listed(&id).await?;
                let wanted = (id.clone(), rank);
                if let Some(hit) = informer.get(&wanted) {
                    return hit;
                }
                if listed_now {
                    // Its list was this lookup's read.
                    return Err(not_found(inner.session.cfg(), &id, rank, &key));
                }
                if !informer.listed() {
                    // Another reader's first list of the engine (or a retry of
                    // it) is under way: its result is this lookup's answer.
                    return wait_for(&informer, || match informer.listed() {
                        true => Some(informer.get(&wanted).unwrap_or_else(|| {
                            Err(not_found(inner.session.cfg(), &id, rank, &key))
                        })),
                        false => informer.list_error().map(Err),
                    })
                    .await;
                }
                get_record(&inner, &key, Read::Linearizable)
                    .await?
                    .ok_or_else(|| not_found(inner.session.cfg(), &id, rank, &key))
            });
        metrics::get().lookup(if found.is_ok() { "etcd" } else { "error" });
        let found = found?;
        log_handshake(started);
        Ok(found)
    }

    /// The record of (`engine_id`, `rank`) as etcd has it now, never from the
    /// cache; `NOT_FOUND` (the guide's "Engine ... not found in ETCD") when it
    /// is gone. For a reader whose transfer to the rank just failed: the cache
    /// learns of a restart one watch event late, the transport error comes
    /// first. A new incarnation means the rank restarted (reload it); the
    /// same one, with the transfer failing, means its process is gone while
    /// its lease runs out. Read from the member this client talks to, without
    /// a round of consensus, so that it answers while etcd has no quorum.
    pub fn recheck(&self, engine_id: &str, rank: u32) -> Result<Found> {
        keys::validate_engine_id(engine_id)?;
        let cfg = self.config();
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        self.call(Op::Lookup, cfg.timeout, async move {
            get_record(&inner, &key, Read::Serializable)
                .await?
                .ok_or_else(|| not_found(inner.session.cfg(), &id, rank, &key))
        })
    }

    /// Returns as soon as (`engine_id`, `rank`) is registered: a get, then a
    /// watch from the revision after it. `timeout` `None` means the configured
    /// timeout.
    pub fn wait(&self, engine_id: &str, rank: u32, timeout: Option<Duration>) -> Result<Found> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let cfg = self.config();
        let limit = timeout.unwrap_or(cfg.timeout);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let waiting = async move {
            // The informer lists the engine, then watches it: no polling.
            let informer = inner.informer(Some(&id))?;
            let wanted = (id.clone(), rank);
            wait_for(&informer, || {
                informer.get(&wanted).or_else(|| refused(&informer))
            })
            .await
        };
        let id = engine_id.to_owned();
        let found = self
            .call(Op::Wait, limit, waiting)
            .map_err(|e| match e.status {
                Status::ErrTimeout => Error::new(
                    Status::ErrTimeout,
                    format!(
                        "Timeout waiting for engine {id} (rank {rank}) after {:.1} s; check \
                         that it started and registered, that both sides use the same \
                         VLLM_NIXL_ETCD_ENDPOINTS and VLLM_NIXL_ETCD_NAMESPACE, or increase \
                         VLLM_NIXL_ETCD_TIMEOUT",
                        limit.as_secs_f64()
                    ),
                ),
                _ => e,
            });
        let result = match &found {
            Ok(_) => "found",
            Err(e) if e.status == Status::ErrTimeout => "timeout",
            Err(_) => "error",
        };
        metrics::get().wait(result, started.elapsed().as_secs_f64());
        let found = found?;
        log_handshake(started);
        Ok(found)
    }

    /// Calls `callback` for every change to the records of `engine_id` (all
    /// engines if `None`): first ADDED for each record present now, then every
    /// change as its watch event arrives. Callbacks run on this client's event
    /// thread, one at a time, in order per key.
    pub fn subscribe(&self, engine_id: Option<&str>, callback: Callback) -> Result<u64> {
        if let Some(e) = engine_id {
            keys::validate_engine_id(e)?;
        }
        let inner = self.inner.clone();
        let engine = engine_id.map(str::to_owned);
        let informer = self.call(Op::Lookup, self.config().timeout, async move {
            inner.cache.informer(engine.as_deref(), true)
        })?;
        informer
            .subscribe(&self.inner.hub, engine_id.map(str::to_owned), callback)
            .map_err(|e| Error::internal(format!("cannot start the event thread: {e}")))
    }

    /// Ends a subscription. Once this returns its callback is not running and
    /// will not run again (unless called from that callback itself).
    pub fn unsubscribe(&self, id: u64) -> Result<()> {
        self.check_usable()?;
        if self.inner.hub.unsubscribe(id) {
            Ok(())
        } else {
            Err(Error::new(
                Status::ErrNotFound,
                format!("no subscription {id} on this client (already unsubscribed?)"),
            ))
        }
    }
}

impl Inner {
    /// The informer covering `engine` (`None`: the whole namespace), started
    /// on first use. Must run on the runtime.
    pub(super) fn informer(&self, engine: Option<&str>) -> Result<Arc<Informer>> {
        self.cache.informer(engine, false)
    }
}

fn not_found(cfg: &Config, engine_id: &str, rank: u32, key: &str) -> Error {
    Error::new(
        Status::ErrNotFound,
        format!(
            "Engine {engine_id} not found in ETCD (rank {rank}, key {key}); check that both \
             sides use the same VLLM_NIXL_ETCD_ENDPOINTS ({}) and VLLM_NIXL_ETCD_NAMESPACE, \
             and that the engine registered",
            cfg.endpoints.join(",")
        ),
    )
}

#[derive(Clone, Copy)]
enum Read {
    /// Through the leader: the newest record.
    Linearizable,
    /// From the member the client talks to, without a round of consensus: it
    /// answers while etcd has no quorum (a recheck must not wait out an
    /// outage), at worst a moment behind the cluster.
    Serializable,
}

/// Reads one rank's record from etcd.
async fn get_record(inner: &Inner, key: &str, read: Read) -> Result<Option<Found>> {
    let session = &inner.session;
    let cfg = session.cfg();
    let resp = etcd_error::retry_transient(cfg, || {
        let mut kv = session.etcd().kv_client();
        let opts = match read {
            Read::Linearizable => None,
            Read::Serializable => Some(etcd_client::GetOptions::new().with_serializable()),
        };
        async move { kv.get(key, opts).await }
    })
    .await
    .map_err(|e| etcd_error::map_key(e, Op::Lookup, cfg, key))?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let (_, slot) = Entry::decode(&cfg.namespace, inner.signer.as_deref(), kv)
        .ok_or_else(|| Error::bad_record(key, "the key is not a rank record"))?;
    let revision = kv.mod_revision();
    match cache::complete(session.conn(), slot, revision).await? {
        Some(slot) => slot.map(Some),
        // Replaced while we read it: read the newer record.
        None => Box::pin(get_record(inner, key, read)).await,
    }
}

/// A wait ends at once when etcd refuses to let this user read: waiting
/// longer cannot help.
pub(super) fn refused<T>(informer: &Informer) -> Option<Result<T>> {
    informer
        .list_error()
        .filter(|e| e.status == Status::ErrPermission)
        .map(Err)
}

/// Sleeps on the informer's changes until `check` finds something.
pub(super) async fn wait_for<T>(
    informer: &Informer,
    check: impl Fn() -> Option<Result<T>>,
) -> Result<T> {
    let mut changes = informer.changes();
    loop {
        changes.borrow_and_update();
        if let Some(found) = check() {
            return found;
        }
        if changes.changed().await.is_err() {
            return Err(Error::closed());
        }
    }
}
