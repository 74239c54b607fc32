//! A metadata store for stock NIXL agents, with etcd behind it.
//!
//! NIXL 1.5 picks its metadata backend from the environment; with
//! `NIXL_TCPSTORE_ENDPOINT=host:port` it speaks PyTorch's c10d TCPStore
//! protocol to that address. This module serves the subset NIXL uses
//! (VALIDATE, PING, SET, GET, CHECK, DELETE_KEY; see [`codec`]) and keeps the
//! keys in etcd through the library's [`Client`]:
//!
//! * keys: broadcast metadata `/nixl/agents/{label}/{agent}/NULL_AGENT` is
//!   written with [`Client::publish_nixl`], i.e. in NIXL's etcd layout
//!   (`{nixl_namespace}/{agent}/{label}` plus the marker), so agents on NIXL's
//!   etcd backend and this library's `*_nixl` calls see the same agents; any
//!   other key is kept verbatim under [`keymap::VERBATIM_PREFIX`].
//! * lifetime: every key is under a lease of the process that wrote it (one
//!   [`Client`] per writer). A loopback writer is known by its pid (its
//!   socket in `/proc`) and its keys are revoked the moment it exits (pidfd);
//!   its connections may break and reconnect meanwhile. A remote writer is
//!   known by its address and the nonce of its PING (NIXL sends its pid);
//!   its keys go `remote_grace` after its last connection closed. If the
//!   store itself dies, the leases expire within their TTL.
//! * reads: from a live copy of the two prefixes (one long-lived watch
//!   each); CHECK of an absent key waits up to `check_wait` for it.

pub mod codec;
pub mod keymap;
mod mirror;
pub mod peers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};

use crate::client::Client;
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::session::Session;
use crate::{nixl_layout, runtime};

use codec::{Limits, Query, Stop};
use keymap::Mapped;
use mirror::Mirror;

/// The port `nixl-etcd serve` listens on by default (PyTorch's TCPStore
/// default is 29500; this one is apart from it).
pub const DEFAULT_PORT: u16 = 29479;

/// How the store behaves; [`StoreOptions::default`] is what `nixl-etcd
/// serve` uses.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Longest a CHECK waits for an absent key before answering NOT_READY
    /// (NIXL re-asks 100 ms later). Zero: answer at once.
    pub check_wait: Duration,
    /// How long a remote writer's keys outlive its last connection.
    pub remote_grace: Duration,
    /// Once a query started, how long its rest may take to arrive.
    pub stall: Duration,
    /// Longest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Most keys in one CHECK.
    pub max_check_keys: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            check_wait: Duration::from_millis(DEFAULT_CHECK_WAIT_MS),
            remote_grace: Duration::from_secs(10),
            stall: Duration::from_secs(5),
            max_key_bytes: 4096,
            max_check_keys: 1024,
        }
    }
}

/// Default of [`StoreOptions::check_wait`], in milliseconds.
pub const DEFAULT_CHECK_WAIT_MS: u64 = 1000;

/// Who wrote a key: the lease its keys are under belongs to this writer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum WriterId {
    /// A process on this host, watched with a pidfd.
    Pid(u32),
    /// A remote process: its address and its PING nonce (NIXL's pid).
    Remote(std::net::IpAddr, u32),
    /// A client that sent no PING and whose process is unknown: one
    /// connection.
    Conn(SocketAddr),
}

impl std::fmt::Display for WriterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterId::Pid(p) => write!(f, "process {p}"),
            WriterId::Remote(ip, n) => write!(f, "remote process {n} at {ip}"),
            WriterId::Conn(a) => write!(f, "connection {a}"),
        }
    }
}

struct Writer {
    client: Client,
    /// Open connections of a remote writer (unused for pids).
    conns: AtomicUsize,
    /// Bumped at each connect, so a grace timer knows it was overtaken.
    generation: AtomicUsize,
}

struct Shared {
    cfg: Config,
    opts: StoreOptions,
    limits: Limits,
    /// The client the store was started with: reads, and deletes of keys
    /// no writer of this store holds.
    base: Client,
    nixl: Arc<Mirror>,
    verbatim: Arc<Mirror>,
    writers: Mutex<HashMap<WriterId, Arc<Writer>>>,
    /// etcd key -> the writer whose lease holds it.
    holders: StdMutex<HashMap<String, WriterId>>,
    stop: watch::Sender<bool>,
    connections: AtomicUsize,
}

/// A running store. Dropping it does not stop it; call [`NixlStore::stop`].
pub struct NixlStore {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl NixlStore {
    /// Starts serving on `listen` (`host:port`; port 0 picks a free one).
    /// Returns once the listener is bound and the first copy of the keys is
    /// read (or etcd did not answer within the client's timeout).
    pub fn start(client: &Client, listen: &str, opts: StoreOptions) -> Result<NixlStore> {
        let addr: SocketAddr = listen
            .parse()
            .or_else(|_| {
                use std::net::ToSocketAddrs;
                listen
                    .to_socket_addrs()
                    .map_err(|e| e.to_string())
                    .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
            })
            .map_err(|e| {
                Error::invalid(format!(
                    "invalid listen address {listen:?} for the NIXL store: {e}; give \
                     HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT} (port 0: any free port)"
                ))
            })?;
        let cfg = client.config().clone();
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            limits: Limits {
                max_key_bytes: opts.max_key_bytes,
                max_value_bytes: cfg.max_metadata_bytes,
                max_check_keys: opts.max_check_keys,
                stall: opts.stall,
            },
            nixl: Mirror::new(format!("{}/", cfg.nixl_namespace)),
            verbatim: Mirror::new(format!("{}/", keymap::VERBATIM_PREFIX)),
            base: client.clone(),
            writers: Mutex::new(HashMap::new()),
            holders: StdMutex::new(HashMap::new()),
            stop,
            connections: AtomicUsize::new(0),
            opts,
            cfg,
        });
        let s = shared.clone();
        let bound = runtime::block_on(async move {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                Error::invalid(format!(
                    "the NIXL store cannot listen on {addr}: {e}; choose another --listen \
                     address or port"
                ))
            })?;
            let bound = listener
                .local_addr()
                .map_err(|e| Error::internal(format!("listener address: {e}")))?;
            let session = s.base.session().clone();
            for m in [s.nixl.clone(), s.verbatim.clone()] {
                tokio::spawn(m.run(session.clone(), s.stop.subscribe()));
            }
            // The store stops with the client it was started with.
            let (s2, mut closed) = (s.clone(), session.closed());
            tokio::spawn(async move {
                let mut stopped = s2.stop.subscribe();
                tokio::select! {
                    _ = until_true(&mut closed) => {
                        let _ = shutdown(&s2).await;
                    }
                    _ = until_true(&mut stopped) => {}
                }
            });
            tokio::spawn(accept_loop(s.clone(), listener));
            // Serve once the first copy is in, or after the client's timeout.
            let mut nixl = s.nixl.changes();
            let _ = tokio::time::timeout(s.cfg.timeout, async {
                while !(s.nixl.is_live() && s.verbatim.is_live()) {
                    tokio::select! {
                        _ = nixl.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
            })
            .await;
            Ok(bound)
        })?;
        log::info!(
            "NIXL TCPStore metadata store listening on {bound}: set \
             NIXL_TCPSTORE_ENDPOINT={bound} for NIXL agents (etcd {}, NIXL namespace {:?})",
            shared.cfg.endpoints.join(","),
            shared.cfg.nixl_namespace
        );
        Ok(NixlStore {
            addr: bound,
            shared,
        })
    }

    /// The address bound: what `NIXL_TCPSTORE_ENDPOINT` should say.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Stops listening, closes every connection and revokes every writer's
    /// lease (their keys disappear at once). Idempotent.
    pub fn stop(&self) -> Result<()> {
        let s = self.shared.clone();
        runtime::block_on(async move { shutdown(&s).await })
    }
}

/// Stops serving and revokes every writer's lease. Idempotent.
async fn shutdown(s: &Arc<Shared>) -> Result<()> {
    if s.stop.send_replace(true) {
        return Ok(());
    }
    let writers: Vec<(WriterId, Arc<Writer>)> = s.writers.lock().await.drain().collect();
    let n = writers.len();
    let mut first_err = None;
    for (id, w) in writers {
        let c = w.client.clone();
        let r = tokio::task::spawn_blocking(move || c.close())
            .await
            .unwrap_or_else(|_| Err(Error::internal("closing a writer panicked")));
        if let Err(e) = r {
            log::warn!("nixl-etcd store: could not revoke the lease of {id}: {e}");
            first_err.get_or_insert(e);
        }
    }
    log::info!("NIXL TCPStore metadata store stopped: revoked the leases of {n} writer(s)");
    first_err.map_or(Ok(()), Err)
}

/// Resolves once `rx` holds true (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

async fn accept_loop(s: Arc<Shared>, listener: TcpListener) {
    let mut stop = s.stop.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(s.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause, then go on.
                    log::warn!("nixl-etcd store: accept failed: {e}; check the open-file limit");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = until_true(&mut stop) => return,
        }
    }
}

/// What one connection knows about its peer.
struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    nonce: Option<u32>,
    writer: Option<WriterId>,
    /// Counted in its remote writer's open connections.
    attached: bool,
    /// The peer's pid, being looked up since its PING (before its first write).
    lookup: Option<tokio::task::JoinHandle<Option<u32>>>,
}

impl Conn {
    /// Starts looking up the peer process in the background.
    fn start_lookup(&mut self) {
        if self.lookup.is_none() && self.writer.is_none() {
            let (local, peer, nonce) = (self.local, self.peer, self.nonce);
            self.lookup = Some(tokio::task::spawn_blocking(move || {
                peers::loopback_peer_pid(local, peer, nonce)
            }));
        }
    }
}

async fn serve_connection(s: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    s.connections.fetch_add(1, Ordering::Relaxed);
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut conn = Conn {
        peer,
        local,
        nonce: None,
        writer: None,
        attached: false,
        lookup: None,
    };
    let mut stop = s.stop.subscribe();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let result = tokio::select! {
        r = serve_queries(&s, &mut conn, &mut rd, &mut wr) => r,
        _ = until_true(&mut stop) => Ok(()),
    };
    if let Err(why) = result {
        log::warn!("nixl-etcd store: closing the connection from {peer}: {why}");
    }
    let _ = wr.shutdown().await;
    s.connections.fetch_sub(1, Ordering::Relaxed);
    if let (Some(id), true) = (conn.writer, conn.attached) {
        disconnected(&s, id).await;
    }
}

async fn serve_queries(
    s: &Arc<Shared>,
    conn: &mut Conn,
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::result::Result<(), String> {
    let mut validated = false;
    loop {
        let q = match codec::read_query(rd, &s.limits).await {
            Ok(q) => q,
            Err(Stop::Closed) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        if !validated {
            match q {
                Query::Validate(codec::MAGIC) => {
                    validated = true;
                    continue;
                }
                Query::Validate(m) => {
                    return Err(format!(
                        "VALIDATE with magic {m:#x}, not {:#x}: not a TCPStore client of this \
                         protocol",
                        codec::MAGIC
                    ))
                }
                other => {
                    return Err(format!(
                        "{} before VALIDATE: a TCPStore client validates first",
                        other.name()
                    ))
                }
            }
        }
        let reply: Vec<u8> = match q {
            Query::Validate(_) => Vec::new(),
            Query::Ping(n) => {
                conn.nonce = Some(n);
                if conn.peer.ip().is_loopback() {
                    conn.start_lookup();
                }
                reattach(s, conn).await;
                n.to_ne_bytes().to_vec()
            }
            Query::Set(key, value) => {
                set(s, conn, &key, value).await?;
                Vec::new()
            }
            Query::Get(key) => {
                let v = get(s, &key).await?;
                let mut out = Vec::with_capacity(8 + v.len());
                out.extend_from_slice(&(v.len() as u64).to_ne_bytes());
                out.extend_from_slice(&v);
                out
            }
            Query::Check(keys) => vec![check(s, &keys).await?],
            Query::Delete(key) => delete(s, &key).await?.to_ne_bytes().to_vec(),
        };
        if !reply.is_empty() {
            wr.write_all(&reply)
                .await
                .map_err(|e| format!("write error: {e}"))?;
        }
    }
}

fn map_key(s: &Shared, key: &[u8]) -> std::result::Result<Mapped, String> {
    keymap::map(&s.cfg.nixl_namespace, &s.cfg.namespace, key)
        .ok_or_else(|| "a key that is not UTF-8".to_string())
}

fn mirror_of<'a>(s: &'a Shared, m: &Mapped) -> &'a Arc<Mirror> {
    match m {
        Mapped::Broadcast { .. } => &s.nixl,
        Mapped::Verbatim { .. } => &s.verbatim,
    }
}

/// The value of a key: from the live copy, or from etcd before the first copy.
async fn lookup(s: &Shared, m: &Mapped) -> Option<Vec<u8>> {
    let key = m.etcd_key();
    if let Some(v) = mirror_of(s, m).get(key) {
        return v;
    }
    let session = s.base.session().clone();
    let k = key.to_owned();
    let got = tokio::time::timeout(s.cfg.timeout, async move {
        session.etcd().kv_client().get(k, None).await
    })
    .await;
    match got {
        Ok(Ok(resp)) => resp.kvs().first().map(|kv| kv.value().to_vec()),
        Ok(Err(e)) => {
            log::warn!(
                "nixl-etcd store: cannot read {key} from etcd: {}; answering absent",
                etcd_error::cause(&e)
            );
            None
        }
        Err(_) => None,
    }
}

async fn get(s: &Shared, key: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let m = map_key(s, key)?;
    Ok(lookup(s, &m).await.unwrap_or_default())
}

async fn check(s: &Shared, keys: &[Vec<u8>]) -> std::result::Result<u8, String> {
    let mapped = keys
        .iter()
        .map(|k| map_key(s, k))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut changes = (s.nixl.changes(), s.verbatim.changes());
    let started = tokio::time::Instant::now();
    let deadline = started + s.opts.check_wait;
    let show = |r: &str| {
        log::debug!(
            "nixl-etcd store: CHECK of {} key(s) ({}) -> {r} after {:.1} ms",
            keys.len(),
            String::from_utf8_lossy(keys.first().map(Vec::as_slice).unwrap_or(b"")),
            started.elapsed().as_secs_f64() * 1000.0
        )
    };
    loop {
        changes.0.borrow_and_update();
        changes.1.borrow_and_update();
        let mut ready = true;
        for m in &mapped {
            if lookup(s, m).await.is_none() {
                ready = false;
                break;
            }
        }
        if ready {
            show("READY");
            return Ok(codec::READY);
        }
        tokio::select! {
            _ = changes.0.changed() => {}
            _ = changes.1.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                show("NOT_READY");
                return Ok(codec::NOT_READY);
            }
        }
    }
}

/// The writer this connection writes as, created (with its own lease) on
/// its first write.
async fn writer_of(s: &Arc<Shared>, conn: &mut Conn) -> Result<(WriterId, Arc<Writer>)> {
    if conn.writer.is_none() {
        conn.start_lookup();
        let pid = match conn.lookup.take() {
            Some(task) => task.await.unwrap_or(None),
            None => None,
        };
        let id = match (pid, conn.nonce) {
            (Some(pid), _) => WriterId::Pid(pid),
            (None, Some(n)) => WriterId::Remote(conn.peer.ip(), n),
            (None, None) => WriterId::Conn(conn.peer),
        };
        conn.writer = Some(id);
    }
    let id = conn.writer.clone().expect("set above");
    let mut writers = s.writers.lock().await;
    if let Some(w) = writers.get(&id) {
        if !conn.attached {
            attach(conn, w);
        }
        return Ok((id, w.clone()));
    }
    let cfg = s.cfg.clone();
    let client = tokio::task::spawn_blocking(move || Client::open(cfg))
        .await
        .map_err(|_| Error::internal("opening a writer's client panicked"))??;
    let w = Arc::new(Writer {
        client,
        conns: AtomicUsize::new(1),
        generation: AtomicUsize::new(0),
    });
    conn.attached = true;
    writers.insert(id.clone(), w.clone());
    drop(writers);
    log::info!(
        "nixl-etcd store: {id} writes through {}; its keys are under lease {:x}",
        conn.peer,
        w.client.session().lease_id().await
    );
    if let WriterId::Pid(pid) = id {
        let s2 = s.clone();
        tokio::spawn(async move {
            let mut stop = s2.stop.subscribe();
            tokio::select! {
                _ = peers::exited(pid) => retire(&s2, &WriterId::Pid(pid), "exited").await,
                _ = until_true(&mut stop) => {}
            }
        });
    }
    Ok((id, w))
}

fn attach(conn: &mut Conn, w: &Writer) {
    w.conns.fetch_add(1, Ordering::AcqRel);
    w.generation.fetch_add(1, Ordering::AcqRel);
    conn.attached = true;
}

/// A remote process that reconnects (its PING nonce and address match a
/// writer in its grace period) gets its writer back, keys and all.
async fn reattach(s: &Shared, conn: &mut Conn) {
    let (Some(n), false) = (conn.nonce, conn.attached) else {
        return;
    };
    if conn.peer.ip().is_loopback() {
        // Known by its pid, on its first write.
        return;
    }
    let id = WriterId::Remote(conn.peer.ip(), n);
    if let Some(w) = s.writers.lock().await.get(&id) {
        attach(conn, w);
        conn.writer = Some(id);
    }
}

/// A connection of writer `id` closed. Remote writers keep their keys for
/// the grace period after their last connection; processes on this host
/// keep them until they exit.
async fn disconnected(s: &Arc<Shared>, id: WriterId) {
    if matches!(id, WriterId::Pid(_)) {
        return;
    }
    let Some(w) = s.writers.lock().await.get(&id).cloned() else {
        return;
    };
    if w.conns.fetch_sub(1, Ordering::AcqRel) != 1 {
        return;
    }
    let generation = w.generation.load(Ordering::Acquire);
    let s2 = s.clone();
    let grace = s.opts.remote_grace;
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        if w.conns.load(Ordering::Acquire) == 0
            && w.generation.load(Ordering::Acquire) == generation
        {
            retire(&s2, &id, "closed its last connection").await;
        }
    });
}

/// Revokes the lease of writer `id`: all its keys go at once.
async fn retire(s: &Arc<Shared>, id: &WriterId, why: &str) {
    let Some(w) = s.writers.lock().await.remove(id) else {
        return;
    };
    let n = {
        let mut holders = s.holders.lock().unwrap_or_else(|e| e.into_inner());
        let before = holders.len();
        holders.retain(|_, h| h != id);
        before - holders.len()
    };
    let c = w.client.clone();
    match tokio::task::spawn_blocking(move || c.close()).await {
        Ok(Ok(())) => {
            log::info!("nixl-etcd store: {id} {why}; revoked its lease, its {n} key(s) are deleted")
        }
        Ok(Err(e)) => log::warn!(
            "nixl-etcd store: {id} {why}, but revoking its lease failed: {e}; its keys go when \
             the lease expires"
        ),
        Err(_) => log::warn!("nixl-etcd store: revoking the lease of {id} panicked"),
    }
}

/// Notes that `keys` are now held by `id`, and drops them from what any
/// other writer re-writes if its lease is lost.
async fn hold(s: &Shared, id: &WriterId, keys: &[&str]) {
    let previous: Vec<WriterId> = {
        let mut holders = s.holders.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .filter_map(|k| holders.insert((*k).to_owned(), id.clone()))
            .filter(|p| p != id)
            .collect()
    };
    for p in previous {
        if let Some(w) = s.writers.lock().await.get(&p).cloned() {
            let mut st = w.client.session().lock().await;
            for k in keys {
                st.release(k);
            }
        }
    }
}

async fn set(
    s: &Arc<Shared>,
    conn: &mut Conn,
    key: &[u8],
    value: Vec<u8>,
) -> std::result::Result<(), String> {
    let m = map_key(s, key)?;
    let started = std::time::Instant::now();
    let shown = String::from_utf8_lossy(key).into_owned();
    let refused = |e: Error| {
        format!(
            "SET {shown} ({} bytes) refused: {e}; the connection is closed so that NIXL sees \
             the failure",
            value.len()
        )
    };
    let (id, w) = writer_of(s, conn).await.map_err(refused)?;
    match &m {
        Mapped::Broadcast { agent, label, key } => {
            // What `Client::publish_nixl` writes (the blob and the marker, in
            // one transaction under the writer's lease), done here without
            // blocking a thread.
            let marker = nixl_layout::marker_key(&s.cfg.nixl_namespace, agent);
            nixl_layout::check_fits(
                s.cfg.max_request_bytes,
                agent,
                label,
                key,
                &marker,
                value.len(),
            )
            .map_err(refused)?;
            let kvs = vec![(key.clone(), value.clone()), (marker.clone(), Vec::new())];
            put_attached(w.client.session(), kvs)
                .await
                .map_err(refused)?;
            s.nixl.put_local(key, &value);
            s.nixl.put_local(&marker, b"");
            hold(s, &id, &[key, &marker]).await;
        }
        Mapped::Verbatim { key } => {
            let kv = vec![(key.clone(), value.clone())];
            put_attached(w.client.session(), kv)
                .await
                .map_err(refused)?;
            s.verbatim.put_local(key, &value);
            hold(s, &id, &[key]).await;
        }
    }
    log::debug!(
        "nixl-etcd store: SET {shown} -> {} ({} bytes) by {id} in {:.1} ms",
        m.etcd_key(),
        value.len(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Writes `kv` under the writer's lease (re-written by the lease machinery
/// if the lease is ever lost), bounded by the client's timeout.
async fn put_attached(session: &Arc<Session>, kv: Vec<(String, Vec<u8>)>) -> Result<()> {
    let limit = session.cfg().timeout;
    let session = session.clone();
    tokio::time::timeout(limit, async move {
        let mut st = session.lock().await;
        st.put_attached(&kv, Op::PublishNixl).await?;
        st.hold(kv);
        Ok(())
    })
    .await
    .unwrap_or_else(|_| {
        Err(Error::new(
            Status::ErrTimeout,
            "etcd did not answer in time".to_string(),
        ))
    })
}

/// DELETE_KEY: the `metadata` label of an agent takes the whole agent
/// (marker and every label, as NIXL's invalidate does on its etcd backend,
/// so peers watching the marker drop it); any other key goes alone. Returns
/// 1 if the key existed.
async fn delete(s: &Arc<Shared>, key: &[u8]) -> std::result::Result<i64, String> {
    let m = map_key(s, key)?;
    let shown = String::from_utf8_lossy(key).into_owned();
    let (target, prefix) = match &m {
        Mapped::Broadcast { agent, label, .. } if label == nixl_layout::DEFAULT_LABEL => {
            (nixl_layout::marker_key(&s.cfg.nixl_namespace, agent), true)
        }
        other => (other.etcd_key().to_owned(), false),
    };
    let holder = s
        .holders
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(m.etcd_key())
        .cloned();
    let writer = match &holder {
        Some(id) => s.writers.lock().await.get(id).cloned(),
        None => None,
    };
    let base = s.base.session().clone();
    let exact = m.etcd_key().to_owned();
    let (t, limit) = (target.clone(), s.cfg.timeout);
    let work = async move {
        // Under the holder's lease lock: a lease re-grant never re-writes a
        // key being deleted.
        let mut guard = match &writer {
            Some(w) => Some(w.client.session().lock().await),
            None => None,
        };
        let mut opts = etcd_client::DeleteOptions::new().with_prev_key();
        if prefix {
            opts = opts.with_prefix();
        }
        let resp = etcd_error::retry_transient(base.cfg(), || {
            let mut kv = base.etcd().kv_client();
            let (t, opts) = (t.clone(), opts.clone());
            async move { kv.delete(t, Some(opts)).await }
        })
        .await
        .map_err(|e| etcd_error::map(e, Op::UnpublishNixl, base.cfg()))?;
        if let Some(st) = guard.as_mut() {
            if prefix {
                st.release_prefix(&t);
            } else {
                st.release(&t);
            }
        }
        Ok::<_, Error>(
            resp.prev_kvs()
                .iter()
                .any(|kv| kv.key() == exact.as_bytes()),
        )
    };
    let existed = tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| {
            Err(Error::new(
                Status::ErrTimeout,
                "etcd did not answer in time",
            ))
        })
        .map_err(|e| format!("DELETE_KEY {shown} failed: {e}; closing the connection"))?;
    let mirror = mirror_of(s, &m);
    if prefix {
        mirror.remove_prefix_local(&target);
        s.holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !k.starts_with(&target));
    } else {
        mirror.remove_local(&target);
        s.holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&target);
    }
    log::debug!("nixl-etcd store: DELETE_KEY {shown} -> {target} (existed: {existed})");
    Ok(existed as i64)
}
