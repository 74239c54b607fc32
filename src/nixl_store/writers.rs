//! Writers: who wrote a key, the lease its keys are under, how the store
//! learns that it is gone, and the queue that carries its writes to etcd.
//!
//! Liveness comes only from what the store observes. A process on this
//! host that the store can see (its socket in `/proc`) and watch with a
//! pidfd keeps its keys until it exits. Any other writer (another host,
//! another PID namespace, no pidfd) is followed by its connections: TCP
//! keep-alive and `TCP_USER_TIMEOUT` close a connection whose host died,
//! and the keys go `remote_grace` after its last connection closed.
//!
//! No lock is held across an etcd round trip: the registry's lock covers
//! map lookups only, and each writer's lease is granted and its writes sent
//! by that writer's own task, so a slow etcd stalls only the writer waiting
//! for it (and the connection for at most `write_wait`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, OnceCell};

use super::error::StoreError;
use super::options::Liveness;
use super::peers;
use super::queue::{Queue, Write};
use super::{until_true, Shared};
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::session::Session;

/// Who wrote a key: the lease its keys are under belongs to this writer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum WriterId {
    /// A process on this host, watched with a pidfd.
    Pid(u32),
    /// A process followed by its connections: their address and its PING
    /// nonce (NIXL's pid).
    Remote(IpAddr, u32),
    /// A client that sent no PING: its one connection.
    Conn(SocketAddr),
    /// The store itself: deletes of keys no writer of this store holds.
    Store,
}

impl std::fmt::Display for WriterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterId::Pid(p) => write!(f, "process {p}"),
            WriterId::Remote(ip, n) => write!(f, "process {n} at {ip}"),
            WriterId::Conn(a) => write!(f, "connection {a}"),
            WriterId::Store => write!(f, "the store"),
        }
    }
}

/// A connection's writer identity, found at its PING or first write.
pub(super) struct Identity {
    pub id: WriterId,
    /// For [`WriterId::Pid`]: the pidfd that tells when the process exits.
    pidfd: Option<OwnedFd>,
}

/// How far a writer's queue has been sent.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every write up to this sequence number is in etcd (or was replaced
    /// by a later one).
    through: u64,
    /// The last write etcd refused for good.
    failed: Option<(u64, Error)>,
}

pub(super) struct Writer {
    pub id: WriterId,
    session: OnceCell<Arc<Session>>,
    /// Open connections (writers followed by their connections).
    conns: AtomicUsize,
    /// Bumped at each attach, so a grace timer knows it was overtaken.
    generation: AtomicUsize,
    queue: StdMutex<Queue>,
    wake: Notify,
    progress: watch::Sender<Progress>,
    retired: watch::Sender<bool>,
    /// Told once that etcd is slow for this writer (until it catches up).
    queued_warned: AtomicBool,
}

impl Writer {
    fn new(id: WriterId, session: Option<Arc<Session>>) -> Arc<Writer> {
        Arc::new(Writer {
            id,
            session: OnceCell::new_with(session),
            conns: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            queue: StdMutex::new(Queue::default()),
            wake: Notify::new(),
            progress: watch::channel(Progress::default()).0,
            retired: watch::channel(false).0,
            queued_warned: AtomicBool::new(false),
        })
    }

    /// A writer whose writes go under the store's own client (deletes of
    /// keys no writer holds).
    pub fn for_store(s: &Arc<Shared>) -> Arc<Writer> {
        let w = Writer::new(WriterId::Store, Some(s.base.session().clone()));
        tokio::spawn(flush_loop(s.clone(), w.clone()));
        w
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This writer's lease, granted on first use over the store's connection.
    async fn session(&self, s: &Shared) -> Result<&Arc<Session>> {
        self.session
            .get_or_try_init(|| async {
                let limit = s.cfg.timeout;
                let conn = s.base.session().conn();
                let (session, lease, ttl) =
                    match tokio::time::timeout(limit, Session::grant_on(conn)).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(etcd_error::timed_out(
                                Op::Connect,
                                limit,
                                &s.cfg.endpoints.join(","),
                            ))
                        }
                    };
                log::info!(
                    "nixl-etcd store: {} writes through this store; its keys are under lease \
                     {lease:x} (ttl {ttl} s)",
                    self.id
                );
                Ok(session)
            })
            .await
    }

    /// Queues `w`: the store's copy and the key holders change at once,
    /// etcd when this writer's task sends it. Returns its sequence number.
    pub fn enqueue(&self, s: &Shared, w: Write) -> u64 {
        let mut holders = s.writers.holders();
        match &w {
            Write::Put { kvs } => {
                let mut moved: HashMap<WriterId, Vec<String>> = HashMap::new();
                for (k, v) in kvs {
                    s.mirror_for(k).put_local(k, v, None);
                    match holders.insert(k.clone(), self.id.clone()) {
                        Some(p) if p != self.id => moved.entry(p).or_default().push(k.clone()),
                        _ => {}
                    }
                }
                for (p, keys) in moved {
                    release_from(s, &p, keys);
                }
            }
            Write::Delete { key, prefix } => {
                s.mirror_for(key).delete_local(key, *prefix, None);
                if *prefix {
                    holders.retain(|k, _| !k.starts_with(key.as_str()));
                } else {
                    holders.remove(key);
                }
            }
        }
        drop(holders);
        let seq = self.queue().push(w);
        self.wake.notify_one();
        seq
    }

    /// Waits up to `limit` for write `seq` to reach etcd. `None`: not yet
    /// (it stays queued); `Some(Err)`: etcd refused it for good.
    pub async fn wait(&self, seq: u64, limit: Duration) -> Option<Result<()>> {
        let mut rx = self.progress.subscribe();
        let done = tokio::time::timeout(limit, rx.wait_for(|p| p.through >= seq)).await;
        match done {
            Ok(Ok(p)) => Some(match &p.failed {
                Some((failed, e)) if *failed == seq => Err(e.clone()),
                _ => Ok(()),
            }),
            _ => None,
        }
    }

    /// Tells once per slow spell that a write is queued behind etcd.
    pub fn note_queued(&self, what: &str, limit: Duration) {
        if !self.queued_warned.swap(true, Ordering::AcqRel) {
            log::warn!(
                "nixl-etcd store: etcd has not acknowledged {what} of {} within {} ms; the write \
                 stays queued and is sent when etcd answers (readers of this store see it now); \
                 check etcd at the configured endpoints",
                self.id,
                limit.as_millis()
            );
        }
    }
}

/// Every writer of the store, and which one holds each key.
#[derive(Default)]
pub(super) struct Writers {
    map: StdMutex<HashMap<WriterId, Arc<Writer>>>,
    /// etcd key -> the writer whose lease holds it (or will, once sent).
    holders: StdMutex<HashMap<String, WriterId>>,
    pidfd_warned: AtomicBool,
}

impl Writers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<WriterId, Arc<Writer>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, WriterId>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: &WriterId) -> Option<Arc<Writer>> {
        self.map().get(id).cloned()
    }

    /// Writer `id`, if it exists, with a new connection counted in it.
    pub fn attach(&self, id: &WriterId) -> Option<Arc<Writer>> {
        let map = self.map();
        let w = map.get(id)?;
        attach(w);
        Some(w.clone())
    }

    /// The writer holding `key`, if any.
    pub fn holder_of(&self, key: &str) -> Option<Arc<Writer>> {
        let id = self.holders().get(key).cloned()?;
        self.get(&id)
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Every writer, removed from the registry (the store is stopping).
    fn drain(&self) -> Vec<Arc<Writer>> {
        self.map().drain().map(|(_, w)| w).collect()
    }
}

/// Who is behind a connection from `peer` (to `local`) that sent PING
/// `nonce`: a process of this host watched by pidfd, when the store can
/// see it and `liveness` allows; otherwise the connection's address and
/// nonce.
pub(super) async fn identify(
    s: &Shared,
    peer: SocketAddr,
    local: SocketAddr,
    nonce: Option<u32>,
) -> Identity {
    if s.opts.liveness == Liveness::Auto && peers::is_loopback(peer.ip()) {
        let pid = tokio::task::spawn_blocking(move || peers::loopback_peer_pid(local, peer, nonce))
            .await
            .unwrap_or(None);
        if let Some(pid) = pid {
            match peers::pidfd_open(pid) {
                Ok(fd) => {
                    return Identity {
                        id: WriterId::Pid(pid),
                        pidfd: Some(fd),
                    }
                }
                Err(e) => {
                    if !s.writers.pidfd_warned.swap(true, Ordering::AcqRel) {
                        log::warn!(
                            "nixl-etcd store: cannot watch process {pid} with a pidfd \
                             (pidfd_open: {e}; Linux 5.3 or later and a seccomp profile that \
                             allows it are needed); following such writers by their connections \
                             instead: their keys go {:.0} s after their last connection closed",
                            s.opts.remote_grace.as_secs_f64()
                        );
                    }
                }
            }
        }
    }
    let id = match nonce {
        Some(n) => WriterId::Remote(peer.ip(), n),
        None => WriterId::Conn(peer),
    };
    Identity { id, pidfd: None }
}

/// The writer `who` names, created (within `max_writers`) if it is new,
/// with the caller's connection counted in it.
pub(super) fn writer_for(
    s: &Arc<Shared>,
    who: Identity,
) -> std::result::Result<Arc<Writer>, StoreError> {
    let mut map = s.writers.map();
    if let Some(w) = map.get(&who.id) {
        attach(w);
        return Ok(w.clone());
    }
    if map.len() >= s.opts.max_writers {
        return Err(StoreError::TooManyWriters {
            limit: s.opts.max_writers,
        });
    }
    let w = Writer::new(who.id.clone(), None);
    attach(&w);
    map.insert(who.id.clone(), w.clone());
    drop(map);
    tokio::spawn(flush_loop(s.clone(), w.clone()));
    if let (WriterId::Pid(pid), Some(fd)) = (&who.id, who.pidfd) {
        let (s2, id, pid) = (s.clone(), who.id.clone(), *pid);
        tokio::spawn(async move {
            let mut stop = s2.stop.subscribe();
            tokio::select! {
                _ = peers::exited(pid, fd) => retire(&s2, &id, "exited", None).await,
                _ = until_true(&mut stop) => {}
            }
        });
    }
    Ok(w)
}

/// A connection of `w` opened (or was identified as `w`'s). Under the
/// registry's lock, so that a grace that runs out meanwhile sees it.
fn attach(w: &Writer) {
    w.conns.fetch_add(1, Ordering::AcqRel);
    w.generation.fetch_add(1, Ordering::AcqRel);
}

/// A connection of `w` closed. A writer followed by its connections keeps
/// its keys for the grace period after its last one; a process watched by
/// pidfd keeps them until it exits.
pub(super) fn detach(s: &Arc<Shared>, w: &Arc<Writer>) {
    if w.conns.fetch_sub(1, Ordering::AcqRel) != 1
        || matches!(w.id, WriterId::Pid(_) | WriterId::Store)
    {
        return;
    }
    let generation = w.generation.load(Ordering::Acquire);
    let (s2, w) = (s.clone(), w.clone());
    let grace = s.opts.remote_grace;
    tokio::spawn(async move {
        let mut stop = s2.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = until_true(&mut stop) => return,
        }
        let why = format!(
            "has had no connection for {:.1} s (--remote-grace)",
            grace.as_secs_f64()
        );
        retire(&s2, &w.id, &why, Some(generation)).await;
    });
}

/// Revokes the lease of writer `id`: all its keys go at once. Writes still
/// queued are dropped (and leave the store's copy). With `idle_since`, only
/// if no connection attached since that generation (checked under the
/// registry's lock, which attaching takes too).
pub(super) async fn retire(s: &Arc<Shared>, id: &WriterId, why: &str, idle_since: Option<usize>) {
    let w = {
        let mut map = s.writers.map();
        let idle = |w: &Arc<Writer>| {
            idle_since.is_none_or(|g| {
                w.conns.load(Ordering::Acquire) == 0 && w.generation.load(Ordering::Acquire) == g
            })
        };
        match map.get(id) {
            Some(w) if idle(w) => map.remove(id),
            _ => None,
        }
    };
    let Some(w) = w else {
        return;
    };
    let n = {
        let mut holders = s.writers.holders();
        let before = holders.len();
        holders.retain(|_, h| h != id);
        before - holders.len()
    };
    match close(s, &w).await {
        Ok(()) => {
            log::info!("nixl-etcd store: {id} {why}; revoked its lease, its {n} key(s) are deleted")
        }
        Err(e) => log::warn!(
            "nixl-etcd store: {id} {why}, but revoking its lease failed: {e}; its keys go when \
             the lease expires (within {} s)",
            s.cfg.lease_ttl_s
        ),
    }
}

/// Stops `w`'s task, forgets its queued writes and revokes its lease.
async fn close(s: &Shared, w: &Writer) -> Result<()> {
    w.retired.send_replace(true);
    let dropped = w.queue().drain();
    for write in dropped {
        forget(s, write);
    }
    let Some(session) = w.session.get() else {
        return Ok(());
    };
    if !session.begin_close() {
        return Ok(());
    }
    session.revoke().await
}

/// A write that will never reach etcd leaves the store's copy.
fn forget(s: &Shared, write: Write) {
    match write {
        Write::Put { kvs } => {
            for (k, _) in kvs {
                s.mirror_for(&k).forget_pending(&k);
            }
        }
        Write::Delete { key, .. } => s.mirror_for(&key).forget_pending(&key),
    }
}

/// Revokes every writer's lease (the store is stopping). Returns how many
/// there were and the first failure.
pub(super) async fn close_all(s: &Arc<Shared>) -> (usize, Option<Error>) {
    let writers = s.writers.drain();
    let n = writers.len();
    let mut first_err = None;
    for w in writers {
        if let Err(e) = close(s, &w).await {
            log::warn!(
                "nixl-etcd store: could not revoke the lease of {}: {e}",
                w.id
            );
            first_err.get_or_insert(e);
        }
    }
    (n, first_err)
}

/// Whether an etcd failure may pass by itself (an outage, a slow member).
fn transient(e: &Error) -> bool {
    matches!(e.status, Status::ErrConnection | Status::ErrTimeout)
}

/// The writer's task: grants its lease, then sends its queued writes to
/// etcd, in order, until the writer is retired or the store stops. While
/// etcd does not answer, it retries with a growing pause; the writes wait
/// in the queue and the store's copy serves them.
async fn flush_loop(s: Arc<Shared>, w: Arc<Writer>) {
    let mut retired = w.retired.subscribe();
    let mut stop = s.stop.subscribe();
    let mut pause = Duration::from_millis(100);
    let mut outage = false;
    loop {
        let step = async {
            let session = w.session(&s).await?;
            loop {
                let next = w.queue().front();
                let Some((seq, write)) = next else { break };
                match send(&s, session, &write).await {
                    Ok(()) => finish(&w, seq, None),
                    Err(e) if transient(&e) => return Err(e),
                    Err(e) => {
                        log::error!(
                            "nixl-etcd store: etcd refused a write of {} to {}: {e}; dropped",
                            w.id,
                            write.key()
                        );
                        forget(&s, write);
                        finish(&w, seq, Some(e));
                    }
                }
            }
            Ok::<(), Error>(())
        };
        let result = tokio::select! {
            r = step => r,
            _ = until_true(&mut retired) => return,
            _ = until_true(&mut stop) => return,
        };
        match result {
            Ok(()) => {
                if outage {
                    log::info!(
                        "nixl-etcd store: etcd answers again; every queued write of {} is in etcd",
                        w.id
                    );
                    outage = false;
                }
                w.queued_warned.store(false, Ordering::Release);
                pause = Duration::from_millis(100);
                tokio::select! {
                    _ = w.wake.notified() => {}
                    _ = until_true(&mut retired) => return,
                    _ = until_true(&mut stop) => return,
                }
            }
            Err(e) => {
                if !outage {
                    log::warn!(
                        "nixl-etcd store: cannot reach etcd for {}: {e}; its {} queued write(s) \
                         are served from the store's copy and sent when etcd answers; its keys \
                         are kept meanwhile",
                        w.id,
                        w.queue().len()
                    );
                    outage = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = until_true(&mut retired) => return,
                    _ = until_true(&mut stop) => return,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn finish(w: &Writer, seq: u64, failed: Option<Error>) {
    w.queue().pop(seq);
    w.progress.send_modify(|p| {
        p.through = p.through.max(seq);
        if let Some(e) = failed {
            p.failed = Some((seq, e));
        }
    });
}

/// Sends one write to etcd under `w`'s lease, bounded by the timeout, and
/// records its revision in the store's copy.
async fn send(s: &Shared, session: &Arc<Session>, write: &Write) -> Result<()> {
    let limit = s.cfg.timeout;
    let endpoints = s.cfg.endpoints.join(",");
    let work = async {
        match write {
            Write::Put { kvs } => {
                let rev = {
                    // Under the lease lock: a re-grant re-writes exactly
                    // what is held.
                    let mut st = session.lock().await;
                    let rev = st.put_attached(kvs, Op::PublishNixl).await?;
                    st.hold(kvs.iter().cloned());
                    rev
                };
                for (k, v) in kvs {
                    s.mirror_for(k).put_local(k, v, Some(rev));
                }
                Ok(())
            }
            Write::Delete { key, prefix } => {
                let mut st = session.lock().await;
                let mut opts = etcd_client::DeleteOptions::new();
                if *prefix {
                    opts = opts.with_prefix();
                }
                let cfg = session.cfg();
                let resp = etcd_error::retry_transient(cfg, || {
                    let mut kv = session.etcd().kv_client();
                    let (k, opts) = (key.clone(), opts.clone());
                    async move { kv.delete(k, Some(opts)).await }
                })
                .await
                .map_err(|e| etcd_error::map_key(e, Op::UnpublishNixl, cfg, key))?;
                if *prefix {
                    st.release_prefix(key);
                } else {
                    st.release(key);
                }
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                s.mirror_for(key).delete_local(key, *prefix, Some(rev));
                Ok(())
            }
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(etcd_error::timed_out(Op::PublishNixl, limit, &endpoints)))
}

/// Keys now held by another writer leave what `previous` re-writes if its
/// lease is lost (in the background: its lease lock may be busy).
fn release_from(s: &Shared, previous: &WriterId, keys: Vec<String>) {
    let Some(session) = s
        .writers
        .get(previous)
        .and_then(|o| o.session.get().cloned())
    else {
        return;
    };
    tokio::spawn(async move {
        let mut st = session.lock().await;
        for k in &keys {
            st.release(k);
        }
    });
}
