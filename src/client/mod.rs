//! The client API: one client = one etcd session (connection + lease, see
//! `session`) + the informer cache + event delivery. The calls are split by
//! what they do: `write` (register, unregister: the chunked-write
//! protocol), `read` (lookup, wait, subscribe), `engine` (whole-engine
//! waits), `layout` (NIXL's own key layout).

mod engine;
mod layout;
mod read;
mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use crate::cache::{Cache, Entry};
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::events::Hub;
use crate::runtime;
use crate::session::Session;
pub use crate::session::{LeaseCondition, LeaseHealth};
use crate::sign::Signer;

pub use write::inline_limit;

pub(crate) struct Inner {
    session: Arc<Session>,
    incarnation: String,
    /// Engines this client already announced with the guide's "Initialized" line.
    announced: StdMutex<std::collections::HashSet<String>>,
    cache: Cache,
    hub: Arc<Hub>,
    /// Signs every record written and verifies every record read, when a
    /// shared key is configured (`VLLM_NIXL_ETCD_HMAC_KEY_FILE`).
    signer: Option<Arc<Signer>>,
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
        let endpoints = cfg.endpoints.join(",");
        let (session, lease_id, ttl) = Session::open(cfg).await?;
        let inner = Arc::new(Inner {
            incarnation: new_incarnation(),
            announced: StdMutex::new(Default::default()),
            cache: Cache::new(session.conn(), signer.clone()),
            signer,
            hub: Arc::new(Hub::default()),
            session,
        });
        log::debug!(
            "nixl-etcd client connected to {endpoints}: namespace={} lease={lease_id:x} ttl={ttl}s \
             incarnation={}",
            inner.session.cfg().namespace,
            inner.incarnation
        );
        Ok(Client { inner })
    }

    pub fn config(&self) -> &Config {
        self.inner.session.cfg()
    }

    /// etcd requests this client issued so far (RPCs and stream messages
    /// sent), for benchmarks and capacity planning.
    pub fn requests_issued(&self) -> u64 {
        self.inner.session.conn().requests()
    }

    /// Engines (or namespaces) cached by this client's process, shared by its
    /// clients of the same etcd identity, and the records they hold.
    pub fn cache_footprint(&self) -> (usize, usize) {
        self.inner.cache.footprint()
    }

    /// Unique per client; a peer seeing a new one knows the rank restarted.
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    /// Where this client's lease stands: kept, renewing (renewals failing or
    /// late) or lost (its TTL ran out; re-granting), since when, and how many
    /// times it was lost and granted again. No etcd call.
    pub fn lease_health(&self) -> LeaseHealth {
        self.inner.session.lease_health()
    }

    /// The lease everything is attached to now (changes if it was lost).
    pub fn lease_id(&self) -> i64 {
        runtime::block_on({
            let inner = self.inner.clone();
            async move { Ok(inner.session.lease_id().await) }
        })
        .unwrap_or(0)
    }

    fn check_usable(&self) -> Result<()> {
        let session = &self.inner.session;
        if session.pid() != std::process::id() {
            return Err(Error::new(
                Status::ErrClosed,
                format!(
                    "this nixl-etcd client was opened by process {} before a fork; open a new \
                     client in process {}",
                    session.pid(),
                    std::process::id()
                ),
            ));
        }
        if session.is_closed() {
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
        let mut closed = self.inner.session.closed();
        let endpoints = self.config().endpoints.join(",");
        runtime::block_on(async move {
            tokio::select! {
                r = tokio::time::timeout(limit, fut) => r.unwrap_or_else(|_| {
                    Err(etcd_error::timed_out(op, limit, &endpoints))
                }),
                _ = closed.wait_for(|c| *c) => Err(Error::closed()),
            }
        })
    }

    /// Revokes the lease (everything registered disappears at once) and stops
    /// background work. Further calls return `CLOSED`. Idempotent. Dropping
    /// the last clone without calling it does the same (see `Drop for
    /// Session`).
    pub fn close(&self) -> Result<()> {
        if !self.inner.begin_close() {
            return Ok(());
        }
        let inner = self.inner.clone();
        runtime::block_on(async move { inner.session.revoke().await })
    }

    /// The client's etcd session, for the NIXL TCPStore front end
    /// (`nixl_store`), which holds keys under this client's lease.
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.inner.session
    }
}

impl Inner {
    /// Marks the client closed and stops its background work (renewal,
    /// informers, event delivery). False if there is nothing to close: it
    /// was closed already, or it belongs to the parent of a forked process
    /// (whose lease is not the child's to revoke).
    fn begin_close(&self) -> bool {
        if !self.session.begin_close() {
            return false;
        }
        self.cache.stop();
        self.hub.stop();
        true
    }
}

impl Drop for Inner {
    /// The last clone was dropped without `close`: stop the informers and
    /// the event thread; dropping the session then revokes the lease.
    fn drop(&mut self) {
        if self.session.pid() == std::process::id() && !self.session.is_closed() {
            self.cache.stop();
            self.hub.stop();
        }
    }
}

fn log_handshake(started: Instant) {
    log::debug!(
        "ETCD handshake completed in {:.3} seconds",
        started.elapsed().as_secs_f64()
    );
}
