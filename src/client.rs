//! The safe core: one client = one etcd connection + one lease (in the style
//! of etcd's `concurrency.Session`) + what it registered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Mutex};

use crate::blob;
use crate::cache::{Cache, Entry, Informer};
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::events::{Callback, Hub};
use crate::keys;
use crate::lease::{self, Delete};
use crate::nixl_layout;
use crate::record::Record;
use crate::runtime;
use crate::sign::Signer;

/// Every key this client holds in etcd (rank records and NIXL-layout keys),
/// with the value it wrote: all re-written under a new lease if the old one
/// is lost.
pub(crate) type Registrations = BTreeMap<String, Vec<u8>>;

/// What the lease session guards: the lease and everything attached to it.
pub(crate) struct LeaseState {
    pub lease_id: i64,
    pub registrations: Registrations,
    /// Rank record key -> the folder of the chunk generation it names, for
    /// records whose metadata is chunked.
    pub generations: BTreeMap<String, String>,
}

pub(crate) struct Inner {
    pub cfg: Config,
    pub etcd: etcd_client::Client,
    pub incarnation: String,
    /// The process that opened the client; a forked child may not use it.
    pub pid: u32,
    pub state: Mutex<LeaseState>,
    pub closed_tx: watch::Sender<bool>,
    pub keepalive: StdMutex<Option<tokio::task::JoinHandle<()>>>,
    /// Engines this client already announced with the guide's "Initialized" line.
    announced: StdMutex<std::collections::HashSet<String>>,
    pub cache: Cache,
    pub hub: Arc<Hub>,
    /// etcd requests issued by this client (RPCs and stream messages sent).
    pub requests: Arc<AtomicU64>,
    /// Signs every record written and verifies every record read, when a
    /// shared key is configured (`VLLM_NIXL_ETCD_HMAC_KEY_FILE`).
    pub signer: Option<Arc<Signer>>,
}

/// A record found in etcd or in the cache, decoded.
pub type Found = Entry;

/// A connected client. Cheap to clone; all clones share one lease.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

fn new_incarnation() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS; mixing in time, pid and a counter keeps
    // ids unique across clients, restarts and forks.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

impl Client {
    /// Connects, grants the lease and starts renewing it. Blocks up to the
    /// configured timeout.
    pub fn open(cfg: Config) -> Result<Client> {
        runtime::block_on(Self::open_async(cfg))
    }

    async fn open_async(cfg: Config) -> Result<Client> {
        if std::env::var_os(crate::config::ENV_NIXL_ENDPOINTS).is_some_and(|v| !v.is_empty()) {
            log::warn!(
                "NIXL_ETCD_ENDPOINTS is set: NIXL's built-in etcd exchange is active in this \
                 process too and writes lease-less keys for every NIXL agent it creates; unset \
                 it and set VLLM_NIXL_ETCD_ENDPOINTS instead"
            );
        }
        // Key files are read before connecting: a bad one fails the open.
        let signer = Signer::from_config(&cfg)?.map(Arc::new);
        let timeout = cfg.timeout;
        let endpoints = cfg.endpoints.join(",");
        let connect = async {
            let etcd = crate::connect::connect(&cfg).await?;
            // The first request: a member that is down is skipped (retried).
            let ttl = cfg.lease_ttl_s;
            let granted = etcd_error::retry_transient(&cfg, || {
                let mut leases = etcd.lease_client();
                async move { leases.grant(ttl, None).await }
            })
            .await
            .map_err(|e| etcd_error::map(e, Op::Connect, &cfg))?;
            Ok::<_, Error>((etcd, granted.id(), granted.ttl()))
        };
        let (etcd, lease_id, ttl) = match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::new(
                    Status::ErrConnection,
                    format!(
                        "ETCD connection failed: no answer from {endpoints} within {:.1} s; \
                         check that etcd is running and reachable, and \
                         VLLM_NIXL_ETCD_ENDPOINTS",
                        timeout.as_secs_f64()
                    ),
                ))
            }
        };
        let (closed_tx, _) = watch::channel(false);
        // Connect and grant: two requests.
        let requests = Arc::new(AtomicU64::new(2));
        let inner = Arc::new(Inner {
            incarnation: new_incarnation(),
            pid: std::process::id(),
            state: Mutex::new(LeaseState {
                lease_id,
                registrations: BTreeMap::new(),
                generations: BTreeMap::new(),
            }),
            closed_tx,
            keepalive: StdMutex::new(None),
            announced: StdMutex::new(Default::default()),
            cache: Cache::new(requests.clone(), signer.clone()),
            signer,
            requests,
            hub: Arc::new(Hub::default()),
            etcd,
            cfg,
        });
        let task = tokio::spawn(lease::keep_alive(Arc::downgrade(&inner), ttl));
        *inner.keepalive.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        log::debug!(
            "nixl-etcd client connected to {endpoints}: namespace={} lease={lease_id:x} ttl={ttl}s \
             incarnation={}",
            inner.cfg.namespace,
            inner.incarnation
        );
        Ok(Client { inner })
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// etcd requests this client issued so far (RPCs and stream messages
    /// sent), for benchmarks and capacity planning.
    pub fn requests_issued(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Unique per client; a peer seeing a new one knows the rank restarted.
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    /// The lease everything is attached to now (changes if it was lost).
    pub fn lease_id(&self) -> i64 {
        runtime::block_on({
            let inner = self.inner.clone();
            async move { Ok(inner.state.lock().await.lease_id) }
        })
        .unwrap_or(0)
    }

    fn check_usable(&self) -> Result<()> {
        if self.inner.pid != std::process::id() {
            return Err(Error::new(
                Status::ErrClosed,
                format!(
                    "this nixl-etcd client was opened by process {} before a fork; open a new \
                     client in process {}",
                    self.inner.pid,
                    std::process::id()
                ),
            ));
        }
        if *self.inner.closed_tx.borrow() {
            return Err(Error::closed());
        }
        Ok(())
    }

    /// Runs one call on the runtime, bounded by `limit` and by close.
    fn call<T, F>(&self, op: Op, limit: Duration, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        self.check_usable()?;
        let mut closed = self.inner.closed_tx.subscribe();
        let endpoints = self.inner.cfg.endpoints.join(",");
        runtime::block_on(async move {
            tokio::select! {
                r = tokio::time::timeout(limit, fut) => r.unwrap_or_else(|_| {
                    Err(etcd_error::timed_out(op, limit, &endpoints))
                }),
                _ = closed.wait_for(|c| *c) => Err(Error::closed()),
            }
        })
    }

    /// Publishes `metadata` for (`engine_id`, `rank`) under the client's lease;
    /// registering again replaces. Metadata too large for one etcd request
    /// is stored in chunks beside the record (see `blob`); readers never see
    /// a partial or mixed blob.
    pub fn register(&self, engine_id: &str, rank: u32, metadata: &[u8]) -> Result<()> {
        keys::validate_engine_id(engine_id)?;
        let cfg = &self.inner.cfg;
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
        self.call(Op::Register, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            let revision = write_record(&inner, &mut st, &key, value, chunks, generation).await?;
            let entry = Entry { revision, ..entry };
            inner
                .cache
                .write_through(&key, (id, rank), Some(Ok(entry)), revision, &inner.hub);
            Ok(())
        })?;
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
        let cfg = &self.inner.cfg;
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        self.call(Op::Unregister, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            // Only rank records this client wrote: the NIXL layout never
            // holds a rank key (publish_nixl refuses to write one).
            if !st.registrations.contains_key(&key) {
                return Err(Error::new(
                    Status::ErrNotFound,
                    format!(
                        "Engine {id} rank {rank} is not registered by this client; only the \
                         client that registered a rank can unregister it"
                    ),
                ));
            }
            let mut deletes = vec![Delete::Key(key.clone())];
            let generation = st.generations.get(&key).cloned();
            deletes.extend(generation.clone().map(Delete::Prefix));
            let revision =
                lease::write_attached(&inner, &mut st, &[], &deletes, Op::Unregister).await?;
            st.registrations.remove(&key);
            if let Some(g) = generation {
                st.registrations.retain(|k, _| !k.starts_with(&g));
                st.generations.remove(&key);
            }
            inner
                .cache
                .write_through(&key, (id, rank), None, revision, &inner.hub);
            Ok(())
        })?;
        log::debug!("unregistered engine_id={engine_id} rank={rank}");
        Ok(())
    }

    /// The record of (`engine_id`, `rank`), or `NOT_FOUND` at once.
    pub fn lookup(&self, engine_id: &str, rank: u32) -> Result<Found> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        // A cache hit is answered on the calling thread, without the runtime.
        self.check_usable()?;
        if let Some(hit) = self.inner.cache.cached(cfg, engine_id, rank) {
            log_handshake(started);
            return hit;
        }
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let found = self.call(Op::Lookup, cfg.timeout, async move {
            // A cache hit costs no round trip. A miss asks etcd: the cache may
            // lag a registration that another client just made.
            let informer = inner.informer(Some(&id));
            let wanted = (id.clone(), rank);
            if let Some(hit) = informer.get(&wanted) {
                return hit;
            }
            if !informer.listed() {
                // First interest in this engine: the informer's first list
                // is this lookup's read, so once it returns the engine is in
                // the cache and served through an etcd outage.
                return wait_for(&informer, || match informer.listed() {
                    true => Some(
                        informer
                            .get(&wanted)
                            .unwrap_or_else(|| Err(not_found(&inner.cfg, &id, rank, &key))),
                    ),
                    false => informer.list_error().map(Err),
                })
                .await;
            }
            get_record(&inner, &key)
                .await?
                .ok_or_else(|| not_found(&inner.cfg, &id, rank, &key))
        })?;
        log_handshake(started);
        Ok(found)
    }

    /// Returns as soon as (`engine_id`, `rank`) is registered: a get, then a
    /// watch from the revision after it. `timeout` `None` means the configured
    /// timeout.
    pub fn wait(&self, engine_id: &str, rank: u32, timeout: Option<Duration>) -> Result<Found> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        let limit = timeout.unwrap_or(cfg.timeout);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let waiting = async move {
            // The informer lists the engine, then watches it: no polling.
            let informer = inner.informer(Some(&id));
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
            })?;
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
        let informer = self.call(Op::Lookup, self.inner.cfg.timeout, async move {
            Ok(inner
                .cache
                .informer(engine.as_deref(), &inner.cfg, &inner.etcd, &inner.hub, true))
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

    /// Returns the engine's world size once ranks 0..world_size-1 are all
    /// registered. The world size comes from the records (open option
    /// `world_size` of the registrant).
    pub fn wait_engine(&self, engine_id: &str, timeout: Option<Duration>) -> Result<u32> {
        keys::validate_engine_id(engine_id)?;
        log::debug!("Discovering engine {engine_id} through ETCD");
        let started = Instant::now();
        let limit = timeout.unwrap_or(self.inner.cfg.timeout);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let last_seen = Arc::new(StdMutex::new(EngineState::default()));
        let seen = last_seen.clone();
        let waiting = async move {
            let informer = inner.informer(Some(&id));
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

    /// Publishes `blob` exactly as NIXL's built-in etcd exchange does: the
    /// agent's marker `{ns}/{agent}/` (empty) and `{ns}/{agent}/{label}` (the
    /// raw blob), in one transaction, both under the client's lease. `ns` is
    /// the configured `nixl_namespace`, verbatim; `label` `None` or `""` means
    /// `"metadata"`. Publishing again replaces.
    pub fn publish_nixl(&self, agent_name: &str, label: Option<&str>, blob: &[u8]) -> Result<()> {
        nixl_layout::validate_agent_name(agent_name)?;
        let label = nixl_layout::resolve_label(label)?;
        let cfg = &self.inner.cfg;
        let ns = &cfg.nixl_namespace;
        let marker = nixl_layout::marker_key(ns, agent_name);
        let key = nixl_layout::nixl_key(ns, agent_name, label);
        if nixl_layout::overlaps_rank_records(&cfg.namespace, &marker) {
            return Err(Error::invalid(format!(
                "NIXL agent {agent_name} cannot be published under {marker}: that prefix holds \
                 the rank records of namespace {}, which unpublishing would delete; give \
                 nixl_namespace (or NIXL_ETCD_NAMESPACE) a value apart from it",
                cfg.namespace
            )));
        }
        nixl_layout::check_fits(
            cfg.max_request_bytes,
            agent_name,
            label,
            &key,
            &marker,
            blob.len(),
        )?;
        let kvs = vec![(key.clone(), blob.to_vec()), (marker.clone(), Vec::new())];
        let inner = self.inner.clone();
        self.call(Op::PublishNixl, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            lease::put_attached(&inner, &mut st, &kvs, Op::PublishNixl).await?;
            st.registrations.extend(kvs);
            Ok(())
        })?;
        log::info!("Registered NIXL agent with ETCD");
        log::debug!(
            "published NIXL agent {agent_name} label {label}: {} bytes at {key} (marker {marker})",
            blob.len()
        );
        Ok(())
    }

    /// The raw blob at `{ns}/{agent}/{label}`, as soon as it exists: a get,
    /// then a watch on that exact key from the revision after the get (no
    /// polling, no cache). `timeout` `None` means the configured timeout;
    /// zero means one get and no wait (`TIMEOUT` if the key is absent).
    pub fn fetch_nixl(
        &self,
        agent_name: &str,
        label: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        nixl_layout::validate_agent_name(agent_name)?;
        let label = nixl_layout::resolve_label(label)?;
        log::debug!("Discovering NIXL agent {agent_name} through ETCD");
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        let key = nixl_layout::nixl_key(&cfg.nixl_namespace, agent_name, label);
        let limit = timeout.unwrap_or(cfg.timeout);
        let inner = self.inner.clone();
        let k = key.clone();
        // A zero timeout still gets its one read, bounded like any call.
        let (bound, wait) = match limit.is_zero() {
            true => (cfg.timeout, false),
            false => (limit, true),
        };
        let blob = self
            .call(Op::FetchNixl, bound, async move {
                fetch_raw(&inner, &k, wait).await
            })
            .map_err(|e| match e.status {
                Status::ErrTimeout => Error::new(
                    Status::ErrTimeout,
                    format!(
                        "Timeout waiting for NIXL agent {agent_name} (key {key}) after {:.1} s; \
                         check that it started and published, that both sides use the same \
                         etcd endpoints and NIXL namespace (open option nixl_namespace, else \
                         NIXL_ETCD_NAMESPACE; here {:?}), or pass a longer timeout_ms",
                        limit.as_secs_f64(),
                        cfg.nixl_namespace
                    ),
                ),
                _ => e,
            })?;
        log_handshake(started);
        Ok(blob)
    }

    /// Deletes the agent's whole prefix `{ns}/{agent}/` (marker and every
    /// label, in one etcd request, as NIXL's invalidate does) and forgets those
    /// keys. `NOT_FOUND` if this client did not publish the agent.
    pub fn unpublish_nixl(&self, agent_name: &str) -> Result<()> {
        nixl_layout::validate_agent_name(agent_name)?;
        let cfg = &self.inner.cfg;
        let marker = nixl_layout::marker_key(&cfg.nixl_namespace, agent_name);
        let inner = self.inner.clone();
        let (id, prefix) = (agent_name.to_owned(), marker.clone());
        self.call(Op::UnpublishNixl, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            if !st.registrations.contains_key(&prefix) {
                return Err(Error::new(
                    Status::ErrNotFound,
                    format!(
                        "NIXL agent {id} is not published by this client (no key {prefix}); \
                         only the client that published an agent can unpublish it"
                    ),
                ));
            }
            // One delete-range: the marker and every label go at one revision.
            let opts = etcd_client::DeleteOptions::new().with_prefix();
            let p = prefix.as_bytes();
            etcd_error::retry_transient(&inner.cfg, || {
                let mut kv = inner.etcd().kv_client();
                let opts = opts.clone();
                async move { kv.delete(p, Some(opts)).await }
            })
            .await
            .map_err(|e| etcd_error::map(e, Op::UnpublishNixl, &inner.cfg))?;
            st.registrations.retain(|k, _| !k.starts_with(&prefix));
            Ok(())
        })?;
        log::debug!("unpublished NIXL agent {agent_name} (deleted prefix {marker})");
        Ok(())
    }

    /// Revokes the lease (everything registered disappears at once) and stops
    /// background work. Further calls return `CLOSED`. Idempotent. Dropping
    /// the last clone without calling it does the same (see `Drop for Inner`).
    pub fn close(&self) -> Result<()> {
        if !self.inner.begin_close() {
            return Ok(());
        }
        let inner = self.inner.clone();
        runtime::block_on(async move {
            let lease_id = {
                let mut st = inner.state.lock().await;
                st.registrations.clear();
                st.lease_id
            };
            revoke(inner.etcd(), &inner.cfg, lease_id).await
        })
    }
}

impl Inner {
    /// Marks the client closed and stops its background work (renewal,
    /// informers, event delivery). False if there is nothing to close: it
    /// was closed already, or it belongs to the parent of a forked process
    /// (whose lease is not the child's to revoke).
    fn begin_close(&self) -> bool {
        if self.pid != std::process::id() || self.closed_tx.send_replace(true) {
            return false;
        }
        // Not aborted: a re-grant in flight finishes (the lease it granted
        // is the one close then revokes); the task stops at its next step.
        drop(
            self.keepalive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        self.cache.stop();
        self.hub.stop();
        true
    }
}

impl Drop for Inner {
    /// The last clone was dropped without `close`: revoke the lease all the
    /// same, so the records go now, not when the process exits. On a caller's
    /// thread this waits for the revoke (bounded by the timeout), as close
    /// does; inside the runtime it cannot block, so the revoke runs as a task.
    fn drop(&mut self) {
        if !self.begin_close() {
            return;
        }
        let lease_id = self.state.get_mut().lease_id;
        let (etcd, cfg) = (self.etcd.clone(), self.cfg.clone());
        let revoke = async move {
            if let Err(e) = revoke(&etcd, &cfg, lease_id).await {
                log::debug!("revoking the lease of a dropped client: {e}");
            }
            Ok(())
        };
        if tokio::runtime::Handle::try_current().is_err() {
            let _ = runtime::block_on(revoke);
        } else if let Ok(handle) = runtime::handle() {
            handle.spawn(revoke);
        }
    }
}

/// Revokes `lease_id`, within the configured timeout. A lease etcd no longer
/// knows (expired, or etcd was wiped) counts as revoked.
async fn revoke(etcd: &etcd_client::Client, cfg: &Config, lease_id: i64) -> Result<()> {
    let attempt = etcd_error::retry_transient(cfg, || {
        let mut leases = etcd.lease_client();
        async move { leases.revoke(lease_id).await }
    });
    let result = match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if etcd_error::is_lease_not_found(&e) => Ok(()),
        Ok(Err(e)) => Err(etcd_error::map(e, Op::Close, cfg)),
        Err(_) => Err(etcd_error::timed_out(
            Op::Close,
            cfg.timeout,
            &cfg.endpoints.join(","),
        )),
    };
    match result {
        Ok(()) => {
            log::debug!("revoked lease {lease_id:x}; all records of this client are gone");
            Ok(())
        }
        Err(e) => Err(close_failed(cfg, e)),
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

/// What a whole-engine wait has seen of an engine.
#[derive(Debug, Default, Clone)]
struct EngineState {
    ranks: Vec<u32>,
    world_size: Option<u32>,
}

impl EngineState {
    fn of(slots: Vec<(u32, &crate::error::Result<Entry>)>) -> EngineState {
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

fn close_failed(cfg: &Config, e: Error) -> Error {
    log::warn!(
        "could not revoke the lease at close: {e}; its records vanish when it expires (within \
         {} s)",
        cfg.lease_ttl_s
    );
    Error::new(
        e.status,
        format!(
            "{e} (while revoking the lease at close; its records vanish within {} s)",
            cfg.lease_ttl_s
        ),
    )
}

fn log_handshake(started: Instant) {
    log::debug!(
        "ETCD handshake completed in {:.3} seconds",
        started.elapsed().as_secs_f64()
    );
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

/// Reads one rank's record from etcd.
async fn get_record(inner: &Inner, key: &str) -> Result<Option<Found>> {
    let resp = etcd_error::retry_transient(&inner.cfg, || {
        let mut kv = inner.etcd().kv_client();
        async move { kv.get(key, None).await }
    })
    .await
    .map_err(|e| etcd_error::map_key(e, Op::Lookup, &inner.cfg, key))?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let (_, slot) = Entry::decode(&inner.cfg.namespace, inner.signer.as_deref(), kv)
        .ok_or_else(|| Error::bad_record(key, "the key is not a rank record"))?;
    let revision = kv.mod_revision();
    match crate::cache::complete(&inner.etcd, &inner.cfg, &inner.requests, slot, revision).await? {
        Some(slot) => slot.map(Some),
        // Replaced while we read it: read the newer record.
        None => Box::pin(get_record(inner, key)).await,
    }
}

/// Writes a rank record, after its chunks when its metadata is chunked, and
/// drops the chunks of the generation it replaces in the same transaction;
/// returns the record's revision. On failure nothing new is visible: the
/// record was not written, and the new chunks are deleted (best effort; they
/// are under the lease anyway).
async fn write_record(
    inner: &Inner,
    st: &mut LeaseState,
    key: &str,
    value: Vec<u8>,
    chunks: Vec<(String, Vec<u8>)>,
    generation: Option<String>,
) -> Result<i64> {
    let old = st.generations.get(key).cloned();
    if let Some(g) = &generation {
        lease::put_each(inner, st, &chunks, Op::Register)
            .await
            .inspect_err(|_| forget_generation(inner, st, g))?;
        // Re-written with everything else if the lease is lost from now on.
        st.registrations.extend(chunks);
    }
    let deletes: Vec<Delete> = old.iter().cloned().map(Delete::Prefix).collect();
    let kvs = [(key.to_owned(), value)];
    let revision = match lease::write_attached(inner, st, &kvs, &deletes, Op::Register).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(g) = &generation {
                forget_generation(inner, st, g);
            }
            return Err(e);
        }
    };
    st.registrations.extend(kvs);
    if let Some(old) = old {
        st.registrations.retain(|k, _| !k.starts_with(&old));
    }
    match generation {
        Some(g) => st.generations.insert(key.to_owned(), g),
        None => st.generations.remove(key),
    };
    Ok(revision)
}

/// Drops a chunk generation no record names: from what the lease re-writes,
/// and from etcd in the background (best effort: it goes with the lease).
fn forget_generation(inner: &Inner, st: &mut LeaseState, prefix: &str) {
    st.registrations.retain(|k, _| !k.starts_with(prefix));
    let mut kv = inner.etcd().kv_client();
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let opts = etcd_client::DeleteOptions::new().with_prefix();
        if let Err(e) = kv.delete(prefix.as_bytes(), Some(opts)).await {
            log::debug!("could not delete unused chunks {prefix}: {e}");
        }
    });
}

/// The value at `key` once it exists: a get, then (if `wait`) a watch on the
/// exact key from the get's revision + 1, so the watch is current in etcd (no
/// catch-up delay) and misses nothing written since the get. Without `wait`,
/// an absent key is a `TIMEOUT` at once.
async fn fetch_raw(inner: &Inner, key: &str, wait: bool) -> Result<Vec<u8>> {
    let map = |e: etcd_client::Error| etcd_error::map(e, Op::FetchNixl, &inner.cfg);
    let resp = etcd_error::retry_transient(&inner.cfg, || {
        let mut kv = inner.etcd().kv_client();
        async move { kv.get(key, None).await }
    })
    .await
    .map_err(map)?;
    if let Some(kv) = resp.kvs().first() {
        return Ok(kv.value().to_vec());
    }
    if !wait {
        return Err(Error::new(Status::ErrTimeout, format!("{key} is absent")));
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let opts = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = etcd_error::retry_transient(&inner.cfg, || {
        let mut watch = inner.etcd().watch_client();
        let opts = opts.clone();
        async move { watch.watch(key, Some(opts)).await }
    })
    .await
    .map_err(map)?;
    loop {
        let Some(msg) = stream.message().await.map_err(map)? else {
            return Err(Error::new(
                Status::ErrConnection,
                format!("ETCD connection failed: the watch on {key} ended"),
            ));
        };
        if msg.canceled() {
            return Err(Error::new(
                Status::ErrConnection,
                format!("etcd cancelled the watch on {key}: {}", msg.cancel_reason()),
            ));
        }
        for ev in msg.events() {
            if let (etcd_client::EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                return Ok(kv.value().to_vec());
            }
        }
    }
}

/// A wait ends at once when etcd refuses to let this user read: waiting
/// longer cannot help.
fn refused<T>(informer: &Informer) -> Option<Result<T>> {
    informer
        .list_error()
        .filter(|e| e.status == Status::ErrPermission)
        .map(Err)
}

/// Sleeps on the informer's changes until `check` finds something.
async fn wait_for<T>(informer: &Informer, check: impl Fn() -> Option<Result<T>>) -> Result<T> {
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

impl Inner {
    /// The etcd client, counting one request per use.
    pub(crate) fn etcd(&self) -> &etcd_client::Client {
        self.requests.fetch_add(1, Ordering::Relaxed);
        &self.etcd
    }

    /// The informer covering `engine` (`None`: the whole namespace), started
    /// on first use. Must run on the runtime.
    fn informer(self: &Arc<Self>, engine: Option<&str>) -> Arc<Informer> {
        self.cache
            .informer(engine, &self.cfg, &self.etcd, &self.hub, false)
    }
}

/// Crate-internal access for the NIXL TCPStore front end (`nixl_store`),
/// which holds keys under this client's lease with the lease machinery.
impl Client {
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}
