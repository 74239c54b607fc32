//! The listener and the connections: accept (within `max_connections`, with
//! TCP keep-alive set), then one task per connection reading queries in
//! order and answering them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::codec::{self, Limits, Query, Stop};
use super::error::StoreError;
use super::mirror::Mirror;
use super::options::StoreOptions;
use super::writers::{self, Identity, Writer, Writers};
use super::{keymap, ops, until_true, Shared};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::runtime;

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
        let addr = parse_listen(listen)?;
        let cfg = client.config().clone();
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            limits: Limits {
                max_key_bytes: opts.max_key_bytes,
                max_value_bytes: opts.max_value_bytes.unwrap_or(cfg.max_request_bytes),
                max_check_keys: opts.max_check_keys,
                stall: opts.stall,
            },
            nixl: Mirror::new(format!("{}/", cfg.nixl_namespace)),
            verbatim: Mirror::new(format!("{}/", keymap::VERBATIM_PREFIX)),
            base: client.clone(),
            writers: Writers::default(),
            own: std::sync::OnceLock::new(),
            stop,
            connections: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
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
        let o = &shared.opts;
        log::info!(
            "NIXL TCPStore metadata store listening on {bound}: set \
             NIXL_TCPSTORE_ENDPOINT={bound} for NIXL agents (etcd {}, NIXL namespace {:?}); a \
             writer followed by its connection loses its keys within {:.0} s of its host's \
             death (keep-alive {:.0} s + grace {:.0} s)",
            shared.cfg.endpoints.join(","),
            shared.cfg.nixl_namespace,
            o.dead_host_bound().as_secs_f64(),
            o.keepalive_detection().as_secs_f64(),
            o.remote_grace.as_secs_f64(),
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

    /// Writers (processes with keys) known now.
    pub fn writers(&self) -> usize {
        self.shared.writers.len()
    }

    /// Stops listening, closes every connection and revokes every writer's
    /// lease (their keys disappear at once). Idempotent.
    pub fn stop(&self) -> Result<()> {
        let s = self.shared.clone();
        runtime::block_on(async move { shutdown(&s).await })
    }
}

fn parse_listen(listen: &str) -> Result<SocketAddr> {
    listen
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
                "invalid listen address {listen:?} for the NIXL store: {e}; give HOST:PORT, \
                 e.g. 127.0.0.1:{} (port 0: any free port)",
                super::DEFAULT_PORT
            ))
        })
}

/// Stops serving and revokes every writer's lease. Idempotent.
async fn shutdown(s: &Arc<Shared>) -> Result<()> {
    if s.stop.send_replace(true) {
        return Ok(());
    }
    let (n, first_err) = writers::close_all(s).await;
    log::info!("NIXL TCPStore metadata store stopped: revoked the leases of {n} writer(s)");
    first_err.map_or(Ok(()), Err)
}

async fn accept_loop(s: Arc<Shared>, listener: TcpListener) {
    let mut stop = s.stop.subscribe();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => admit(&s, stream, peer),
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

/// Serves a new connection, or closes it at once past `max_connections`.
fn admit(s: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let open = s.connections.load(Ordering::Acquire);
    if open >= s.opts.max_connections {
        let n = s.refused.fetch_add(1, Ordering::Relaxed) + 1;
        // The first, then one line per hundred: a flood does not flood the log.
        if n == 1 || n % 100 == 0 {
            log::warn!(
                "nixl-etcd store: refused the connection from {peer}: {open} connections are \
                 open, the limit (--max-connections / max_connections); {n} refused so far; \
                 raise the limit, or look for a client that leaks connections"
            );
        }
        drop(stream);
        return;
    }
    s.connections.fetch_add(1, Ordering::AcqRel);
    let _ = stream.set_nodelay(true);
    if let Err(e) = keep_alive(&stream, &s.opts) {
        log::warn!(
            "nixl-etcd store: cannot set TCP keep-alive on the connection from {peer}: {e}; a \
             dead host behind it is noticed only when the store writes to it"
        );
    }
    tokio::spawn(serve_connection(s.clone(), stream, peer));
}

/// Keep-alive probes and `TCP_USER_TIMEOUT`: a half-open connection (its
/// host died, its cable was cut) errors out after `keepalive_detection`.
fn keep_alive(stream: &TcpStream, o: &StoreOptions) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(o.keepalive_idle)
        .with_interval(o.keepalive_interval)
        .with_retries(o.keepalive_count);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(Some(o.keepalive_detection()))
}

/// What one connection knows about its peer.
pub(super) struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    nonce: Option<u32>,
    /// Who the peer is, once known (at its PING or first write).
    identity: Option<Identity>,
    /// The writer this connection is counted in.
    writer: Option<Arc<Writer>>,
}

impl Conn {
    async fn identify(&mut self, s: &Shared) {
        if self.identity.is_none() {
            self.identity = Some(writers::identify(s, self.peer, self.local, self.nonce).await);
        }
    }

    /// The writer this connection writes as, created (with its own lease,
    /// granted by its task) on its first write.
    pub async fn writer(
        &mut self,
        s: &Arc<Shared>,
    ) -> std::result::Result<Arc<Writer>, StoreError> {
        if let Some(w) = &self.writer {
            return Ok(w.clone());
        }
        self.identify(s).await;
        let who = self.identity.take().expect("identified above");
        let w = writers::writer_for(s, who)?;
        self.writer = Some(w.clone());
        Ok(w)
    }

    /// A PING: the peer is known from now on; a writer it already is (a
    /// reconnect within the grace period) gets this connection counted.
    async fn ping(&mut self, s: &Shared, nonce: u32) {
        if self.writer.is_some() {
            return;
        }
        self.nonce = Some(nonce);
        self.identity = None;
        self.identify(s).await;
        let id = &self.identity.as_ref().expect("identified above").id;
        self.writer = s.writers.attach(id);
    }
}

async fn serve_connection(s: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut conn = Conn {
        peer,
        local,
        nonce: None,
        identity: None,
        writer: None,
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
    s.connections.fetch_sub(1, Ordering::AcqRel);
    if let Some(w) = conn.writer {
        writers::detach(&s, &w);
    }
}

async fn serve_queries(
    s: &Arc<Shared>,
    conn: &mut Conn,
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::result::Result<(), StoreError> {
    // Before VALIDATE nothing but VALIDATE is read: at most 5 bytes.
    match codec::read_validate(rd, s.opts.stall).await {
        Ok(codec::MAGIC) => {}
        Ok(m) => return Err(StoreError::BadMagic(m)),
        Err(Stop::Closed) => return Ok(()),
        Err(Stop::NotValidate(t)) => return Err(StoreError::NotValidated(codec::query_name(t))),
        Err(e) => return Err(e.into()),
    }
    loop {
        let q = match codec::read_query(rd, &s.limits).await {
            Ok(q) => q,
            Err(Stop::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let reply: Vec<u8> = match q {
            Query::Validate(_) => Vec::new(),
            Query::Ping(n) => {
                conn.ping(s, n).await;
                n.to_ne_bytes().to_vec()
            }
            Query::Set(key, value) => {
                ops::set(s, conn, &key, value).await?;
                Vec::new()
            }
            Query::Get(key) => {
                let v = ops::get(s, &key).await?;
                let mut out = Vec::with_capacity(8 + v.len());
                out.extend_from_slice(&(v.len() as u64).to_ne_bytes());
                out.extend_from_slice(&v);
                out
            }
            Query::Check(keys) => vec![ops::check(s, &keys).await?],
            Query::Delete(key) => ops::delete(s, &key).await?.to_ne_bytes().to_vec(),
        };
        if !reply.is_empty() {
            wr.write_all(&reply).await.map_err(StoreError::Io)?;
        }
    }
}
