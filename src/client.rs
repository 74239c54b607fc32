//! The safe core: one client = one etcd connection + one lease (in the style
//! of etcd's `concurrency.Session`) + what it registered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use etcd_client::{ConnectOptions, EventType, PutOptions, WatchOptions};
use tokio::sync::{watch, Mutex};

use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::keys;
use crate::lease;
use crate::record::Record;
use crate::runtime;

/// A registration this client holds: the value it wrote, re-written under a
/// new lease if the old one is lost.
pub(crate) type Registrations = BTreeMap<(String, u32), Vec<u8>>;

/// What the lease session guards: the lease and everything attached to it.
pub(crate) struct LeaseState {
    pub lease_id: i64,
    pub registrations: Registrations,
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
}

/// A record found in etcd, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub record: Record,
    pub metadata: Vec<u8>,
    /// etcd's mod_revision of the key.
    pub revision: i64,
}

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
        let timeout = cfg.timeout;
        let endpoints = cfg.endpoints.join(",");
        let connect = async {
            let opts = ConnectOptions::new()
                .with_connect_timeout(timeout)
                .with_keep_alive(Duration::from_secs(5), timeout);
            let etcd = etcd_client::Client::connect(&cfg.endpoints, Some(opts))
                .await
                .map_err(|e| etcd_error::map(e, Op::Connect, &cfg))?;
            let granted = etcd
                .lease_client()
                .grant(cfg.lease_ttl_s, None)
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
        let inner = Arc::new(Inner {
            incarnation: new_incarnation(),
            pid: std::process::id(),
            state: Mutex::new(LeaseState {
                lease_id,
                registrations: BTreeMap::new(),
            }),
            closed_tx,
            keepalive: StdMutex::new(None),
            announced: StdMutex::new(Default::default()),
            etcd,
            cfg,
        });
        let task = tokio::spawn(lease::keep_alive(inner.clone(), ttl));
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
    /// registering again replaces.
    pub fn register(&self, engine_id: &str, rank: u32, metadata: &[u8]) -> Result<()> {
        keys::validate_engine_id(engine_id)?;
        let cfg = &self.inner.cfg;
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let bound = Record::encoded_size_bound(metadata.len(), engine_id, &cfg.host);
        // Room for the key and the gRPC framing around the value.
        let limit = cfg.max_request_bytes.saturating_sub(key.len() + 512);
        if bound > limit {
            return Err(Error::new(
                Status::ErrTooLarge,
                format!(
                    "metadata of {} bytes for engine {engine_id} rank {rank} encodes to about \
                     {bound} bytes, over the {limit} bytes that fit in one etcd request \
                     (max_request_bytes={}); nothing was written",
                    metadata.len(),
                    cfg.max_request_bytes
                ),
            ));
        }
        let value = Record::new(
            engine_id,
            rank,
            &cfg.host,
            &self.inner.incarnation,
            metadata,
        )
        .to_json();
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        self.call(Op::Register, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            lease::put_attached(&inner, &mut st, &key, value.clone()).await?;
            st.registrations.insert((id, rank), value);
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

    /// Removes a registration this client made.
    pub fn unregister(&self, engine_id: &str, rank: u32) -> Result<()> {
        keys::validate_engine_id(engine_id)?;
        let cfg = &self.inner.cfg;
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        self.call(Op::Unregister, cfg.timeout, async move {
            let mut st = inner.state.lock().await;
            if !st.registrations.contains_key(&(id.clone(), rank)) {
                return Err(Error::new(
                    Status::ErrNotFound,
                    format!(
                        "Engine {id} rank {rank} is not registered by this client; only the \
                         client that registered a rank can unregister it"
                    ),
                ));
            }
            inner
                .etcd
                .kv_client()
                .delete(key.as_bytes(), None)
                .await
                .map_err(|e| etcd_error::map(e, Op::Unregister, &inner.cfg))?;
            st.registrations.remove(&(id, rank));
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
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let found = self.call(Op::Lookup, cfg.timeout, async move {
            let (found, _) = get_record(&inner, &key, &id, rank).await?;
            found.ok_or_else(|| not_found(&inner.cfg, &id, rank, &key))
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
        let key = keys::rank_key(&cfg.namespace, engine_id, rank);
        let inner = self.inner.clone();
        let id = engine_id.to_owned();
        let waiting = async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                match wait_once(&inner, &key, &id, rank).await {
                    Ok(found) => return Ok(found),
                    // etcd restarting or a member down: re-arm on a fresh stream.
                    Err(e) if e.status == Status::ErrConnection => {
                        log::debug!("wait for {key}: {e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => return Err(e),
                }
            }
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

    /// Revokes the lease (everything registered disappears at once) and stops
    /// background work. Further calls return `CLOSED`. Idempotent.
    pub fn close(&self) -> Result<()> {
        if self.inner.pid != std::process::id() {
            // A forked child: the lease belongs to the parent; leave it alone.
            return Ok(());
        }
        if self.inner.closed_tx.send_replace(true) {
            return Ok(());
        }
        if let Some(task) = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
        let inner = self.inner.clone();
        runtime::block_on(async move {
            let limit = inner.cfg.timeout;
            let revoke = async {
                let mut st = inner.state.lock().await;
                st.registrations.clear();
                let id = st.lease_id;
                match inner.etcd.lease_client().revoke(id).await {
                    // Already gone (expired, or etcd was wiped): nothing is
                    // attached to it any more.
                    Err(e) if etcd_error::is_lease_not_found(&e) => Ok(id),
                    other => other
                        .map(|_| id)
                        .map_err(|e| etcd_error::map(e, Op::Close, &inner.cfg)),
                }
            };
            match tokio::time::timeout(limit, revoke).await {
                Ok(Ok(id)) => {
                    log::debug!("revoked lease {id:x}; all records of this client are gone");
                    Ok(())
                }
                Ok(Err(e)) => Err(close_failed(&inner.cfg, e)),
                Err(_) => Err(close_failed(
                    &inner.cfg,
                    etcd_error::timed_out(Op::Close, limit, &inner.cfg.endpoints.join(",")),
                )),
            }
        })
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

/// Reads one rank's record; also returns the revision the read saw.
async fn get_record(
    inner: &Inner,
    key: &str,
    engine_id: &str,
    rank: u32,
) -> Result<(Option<Found>, i64)> {
    let resp = inner
        .etcd
        .kv_client()
        .get(key.as_bytes(), None)
        .await
        .map_err(|e| etcd_error::map(e, Op::Lookup, &inner.cfg))?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    match resp.kvs().first() {
        None => Ok((None, revision)),
        Some(kv) => Ok((Some(decode(key, kv, engine_id, rank)?), revision)),
    }
}

fn decode(key: &str, kv: &etcd_client::KeyValue, engine_id: &str, rank: u32) -> Result<Found> {
    let record = Record::from_json(key, kv.value(), engine_id, rank)?;
    let metadata = record.decode_metadata(key)?;
    Ok(Found {
        record,
        metadata,
        revision: kv.mod_revision(),
    })
}

/// One get + watch round; returns on the first put of the key.
async fn wait_once(inner: &Inner, key: &str, engine_id: &str, rank: u32) -> Result<Found> {
    let (found, revision) = get_record(inner, key, engine_id, rank).await?;
    if let Some(found) = found {
        return Ok(found);
    }
    // Start right after the get: the watch is current (no catch-up delay in
    // etcd) and misses nothing written since.
    let opts = WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = inner
        .etcd
        .watch_client()
        .watch(key.as_bytes(), Some(opts))
        .await
        .map_err(|e| etcd_error::map(e, Op::Wait, &inner.cfg))?;
    loop {
        let msg = stream
            .message()
            .await
            .map_err(|e| etcd_error::map(e, Op::Wait, &inner.cfg))?;
        let Some(msg) = msg else {
            return Err(Error::new(
                Status::ErrConnection,
                "ETCD connection failed: the watch stream ended",
            ));
        };
        if msg.canceled() {
            return Err(Error::new(
                Status::ErrConnection,
                format!("etcd cancelled the watch on {key}: {}", msg.cancel_reason()),
            ));
        }
        for ev in msg.events() {
            if let (EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                return decode(key, kv, engine_id, rank);
            }
        }
    }
}

/// Writes `value` at `key` under `lease_id` (see `lease::put_attached` for the
/// variant that recovers a lost lease).
pub(crate) async fn put_value(
    inner: &Inner,
    lease_id: i64,
    key: &str,
    value: Vec<u8>,
) -> Result<()> {
    inner
        .etcd
        .kv_client()
        .put(
            key.as_bytes(),
            value,
            Some(PutOptions::new().with_lease(lease_id)),
        )
        .await
        .map(|_| ())
        .map_err(|e| etcd_error::map(e, Op::Register, &inner.cfg))
}
