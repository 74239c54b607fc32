//! One etcd session, in the style of etcd's `concurrency.Session`: the
//! connection, one lease kept alive in the background, and every key held
//! under that lease. The session is the only owner of the lease state:
//! writes under the lease, what a re-grant re-writes, and the revoke all go
//! through it (see [`Held`]).

mod lease;
mod read;

pub use lease::{LeaseCondition, LeaseHealth};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::Op;
use crate::runtime;

use lease::{keep_alive, revoke, LeaseState};
pub(crate) use lease::{Delete, Held};
pub(crate) use read::{fetch_chunks, read_range};

/// What every etcd request needs, bundled: the connection, the
/// configuration, and the counter of requests issued. Cheap to clone
/// (background tasks hold their own copy).
#[derive(Clone)]
pub(crate) struct Conn {
    etcd: etcd_client::Client,
    cfg: Config,
    requests: Arc<AtomicU64>,
}

impl Conn {
    /// The etcd client, counting one request per use.
    pub fn etcd(&self) -> &etcd_client::Client {
        self.count();
        &self.etcd
    }

    /// The etcd client, for a caller that counts its requests itself.
    pub fn etcd_uncounted(&self) -> &etcd_client::Client {
        &self.etcd
    }

    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// Counts one request (an RPC or a stream message sent).
    pub fn count(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests issued so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A connection with its lease.
pub(crate) struct Session {
    conn: Conn,
    /// The process that opened the session; a forked child may not use it.
    pid: u32,
    lease: Mutex<LeaseState>,
    /// Where the lease stands, for `Client::lease_health` (a plain lock: read
    /// from any thread without the runtime).
    health: std::sync::Mutex<lease::LeaseHealth>,
    closed_tx: watch::Sender<bool>,
}

impl Session {
    /// Connects, grants the lease and starts renewing it, within the
    /// configured timeout. Returns the session, its lease and the TTL etcd
    /// granted. Must run on the runtime.
    pub async fn open(cfg: Config) -> Result<(Arc<Session>, i64, i64)> {
        let timeout = cfg.timeout;
        let endpoints = cfg.endpoints.join(",");
        let connect = async {
            let etcd = crate::connect::connect(&cfg).await?;
            // Connect and grant: two requests.
            let conn = Conn {
                etcd,
                cfg: cfg.clone(),
                requests: Arc::new(AtomicU64::new(1)),
            };
            Session::grant_on(&conn).await
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                Status::ErrConnection,
                format!(
                    "ETCD connection failed: no answer from {endpoints} within {:.1} s; \
                     check that etcd is running and reachable, and \
                     VLLM_NIXL_ETCD_ENDPOINTS",
                    timeout.as_secs_f64()
                ),
            )),
        }
    }

    /// A session of its own (a lease, renewed in the background) over an
    /// existing connection: the NIXL store's writers share the store's
    /// connection. Returns the session, its lease and the TTL etcd granted.
    pub async fn grant_on(conn: &Conn) -> Result<(Arc<Session>, i64, i64)> {
        let granted = lease::grant(conn, Op::Connect).await?;
        let (lease_id, ttl) = (granted.id(), granted.ttl());
        let (closed_tx, _) = watch::channel(false);
        let session = Arc::new(Session {
            conn: conn.clone(),
            pid: std::process::id(),
            lease: Mutex::new(LeaseState::new(lease_id)),
            health: std::sync::Mutex::new(lease::LeaseHealth::new()),
            closed_tx,
        });
        // Detached: it holds the session weakly and stops once the session
        // is closed or dropped, never half-way through a re-grant.
        tokio::spawn(keep_alive(Arc::downgrade(&session), ttl));
        Ok((session, lease_id, ttl))
    }

    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    pub fn cfg(&self) -> &Config {
        &self.conn.cfg
    }

    /// The etcd client, counting one request per use.
    pub fn etcd(&self) -> &etcd_client::Client {
        self.conn.etcd()
    }

    /// The process that opened the session.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_closed(&self) -> bool {
        *self.closed_tx.borrow()
    }

    /// Turns true when the session is closed.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed_tx.subscribe()
    }

    /// The lease everything is attached to now (changes if it was lost).
    pub fn lease_health(&self) -> lease::LeaseHealth {
        *self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn lease_id(&self) -> i64 {
        self.lease.lock().await.lease_id
    }

    /// The lease state, locked: writes under the lease and changes to what
    /// it holds happen through the guard, one at a time.
    pub async fn lock(&self) -> Held<'_> {
        Held::new(&self.conn, self.lease.lock().await)
    }

    /// Marks the session closed and stops renewing the lease. False if
    /// there is nothing to close: it was closed already, or it belongs to
    /// the parent of a forked process (whose lease is not the child's to
    /// revoke).
    pub fn begin_close(&self) -> bool {
        if self.pid != std::process::id() || self.closed_tx.send_replace(true) {
            return false;
        }
        // The keep-alive task is not aborted: a re-grant in flight finishes
        // (the lease it granted is the one `revoke` then revokes), and the
        // task stops at its next step.
        true
    }

    /// Forgets every key and revokes the lease (everything under it
    /// disappears at once), within the configured timeout. After
    /// [`Session::begin_close`].
    pub async fn revoke(&self) -> Result<()> {
        let lease_id = {
            let mut st = self.lock().await;
            st.release_all();
            st.lease_id()
        };
        revoke(self.etcd(), self.cfg(), lease_id).await
    }
}

impl Drop for Session {
    /// The session was dropped without being closed: revoke the lease all
    /// the same, so its keys go now, not when the process exits. On a
    /// caller's thread this waits for the revoke (bounded by the timeout);
    /// inside the runtime it cannot block, so the revoke runs as a task.
    fn drop(&mut self) {
        if !self.begin_close() {
            return;
        }
        let lease_id = self.lease.get_mut().lease_id;
        let (etcd, cfg) = (self.conn.etcd.clone(), self.conn.cfg.clone());
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
