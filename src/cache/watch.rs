//! Listing and watching for a process's shared cache. Every informer of the
//! cache is listed once, then watched from the revision after its list on
//! ONE gRPC watch stream (etcd multiplexes watches by id), so a process holds
//! one stream however many engines it reads. A cancelled watch (compaction)
//! re-lists its informer; a broken stream re-lists them all, and until they
//! are back the last known records are served (stale).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{
    EventType, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use tokio::sync::mpsc;

use super::informer::Informer;
use super::{complete, Entry, RankId, Slot};
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::keys;
use crate::metrics;
use crate::session::{self, Conn};
use crate::sign::Signer;

/// The informers of a shared cache, by prefix.
pub(super) type Informers = Mutex<HashMap<String, Arc<Informer>>>;

/// Asks the stream task to watch the informer's prefix from a revision (the
/// one after its list).
pub(super) struct Watch(Weak<Informer>, i64);

/// What listing and watching need, shared by the stream task and the listers.
#[derive(Clone)]
pub(super) struct Ctx {
    pub conn: Conn,
    pub signer: Option<Arc<Signer>>,
    pub watches: mpsc::UnboundedSender<Watch>,
    /// Informers serving stale records (for one "reachable again" line).
    stale: Arc<AtomicUsize>,
    /// The runtime the listers run on (a list may be handed over from a
    /// caller's future that is being dropped).
    runtime: tokio::runtime::Handle,
}

impl Ctx {
    pub fn new(conn: Conn, signer: Option<Arc<Signer>>) -> (Ctx, mpsc::UnboundedReceiver<Watch>) {
        let (watches, rx) = mpsc::unbounded_channel();
        let stale = Arc::new(AtomicUsize::new(0));
        (
            Ctx {
                conn,
                signer,
                watches,
                stale,
                runtime: tokio::runtime::Handle::current(),
            },
            rx,
        )
    }

    /// Lists the informer in the background after `delay`, then watches it.
    pub fn relist(&self, inf: Weak<Informer>, delay: Duration) {
        self.runtime.spawn(list(inf, self.clone(), delay));
    }

    /// The first list of a new informer, in the caller's own future (no
    /// hand-off to another task on a cold read). Should it fail, or the
    /// caller give up half-way, a background lister takes over.
    pub async fn list_first(&self, inf: &Arc<Informer>) -> bool {
        struct Handover<'a>(Option<(&'a Ctx, Weak<Informer>)>);
        impl Drop for Handover<'_> {
            fn drop(&mut self) {
                if let Some((ctx, inf)) = self.0.take() {
                    ctx.relist(inf, Duration::from_millis(100));
                }
            }
        }
        let mut handover = Handover(Some((self, Arc::downgrade(inf))));
        let listed = list_once(self, inf).await.is_ok();
        if listed {
            handover.0 = None;
        }
        listed
    }

    /// The informer serves its last known records until its next list.
    fn mark_stale(&self, inf: &Informer) {
        if inf.listed() && !inf.stale.swap(true, Ordering::AcqRel) {
            self.stale.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Lists the informer (retrying with backoff while etcd cannot be reached),
/// then asks the stream task to watch it. Ends early once the informer is
/// dropped.
async fn list(inf: Weak<Informer>, ctx: Ctx, mut delay: Duration) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let Some(informer) = inf.upgrade() else {
            return;
        };
        if list_once(&ctx, &informer).await.is_ok() {
            return;
        }
        delay = backoff;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One list of the informer: on success its records are reconciled and its
/// watch asked for; on failure the error is kept for its readers.
async fn list_once(ctx: &Ctx, informer: &Arc<Informer>) -> Result<()> {
    let cfg = ctx.conn.cfg();
    let listing = list_prefix(&ctx.conn, &informer.prefix, ctx.signer.as_deref());
    let listed = tokio::time::timeout(cfg.timeout, listing)
        .await
        .map_err(|_| etcd_error::timed_out(Op::Lookup, cfg.timeout, &cfg.endpoints.join(",")))
        .and_then(|r| r);
    match listed {
        Ok((fresh, revision)) => {
            if informer.list_error().is_some() {
                informer.set_list_error(None);
            }
            informer.reconcile(fresh, revision);
            if informer.stale.swap(false, Ordering::AcqRel)
                && ctx.stale.fetch_sub(1, Ordering::AcqRel) == 1
            {
                log::info!(
                    "ETCD is reachable again; the cache of {} caught up",
                    cfg.namespace
                );
            }
            let _ = ctx
                .watches
                .send(Watch(Arc::downgrade(informer), revision + 1));
            Ok(())
        }
        Err(e) => {
            log::debug!("cache of {}: {e}; listing again", informer.prefix);
            informer.set_list_error(Some(e.clone()));
            ctx.mark_stale(informer);
            Err(e)
        }
    }
}

/// Records per page of a list: a whole fleet's namespace in one or two requests.
const LIST_PAGE: i64 = 1024;
/// Largest response accepted (gRPC's default is 4 MiB; a page of records can
/// be larger). A page over it is fetched again in halves.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Lists every rank record under `prefix` as one snapshot (see
/// [`session::read_range`]); returns the records and the revision they were
/// read at.
async fn list_prefix(
    conn: &Conn,
    prefix: &str,
    signer: Option<&Signer>,
) -> Result<(HashMap<RankId, Slot>, i64)> {
    let (cfg, namespace) = (conn.cfg(), conn.cfg().namespace.as_str());
    let kv = conn
        .etcd_uncounted()
        .kv_client()
        .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let (kvs, revision) = session::read_range(conn, &kv, prefix, LIST_PAGE, None, usize::MAX)
        .await
        .map_err(|e| etcd_error::map_key(e, Op::Lookup, cfg, prefix))?;
    let mut fresh = HashMap::new();
    for (id, slot) in kvs
        .iter()
        .filter_map(|kv| Entry::decode(namespace, signer, kv))
    {
        // Chunks as of the list's revision: there even if replaced since.
        match complete(conn, slot, revision).await? {
            Some(slot) => {
                fresh.insert(id, slot);
            }
            None => {
                return Err(Error::new(
                    Status::ErrConnection,
                    "a record's chunks were replaced during the list; listing again",
                ))
            }
        }
    }
    Ok((fresh, revision))
}

/// The open watch stream and the watches on it.
#[derive(Default)]
struct Streams {
    open: Option<(WatchRequestSender, WatchResponseStream)>,
    /// Creates sent, in order: etcd answers them in the order sent.
    pending: VecDeque<Weak<Informer>>,
    active: HashMap<i64, Weak<Informer>>,
}

impl Streams {
    async fn next(&mut self) -> std::result::Result<Option<WatchResponse>, etcd_client::Error> {
        match self.open.as_mut() {
            Some((_, rx)) => rx.message().await,
            None => std::future::pending().await,
        }
    }

    /// The stream broke: every informer on it is re-listed (they serve their
    /// last known records meanwhile).
    fn broke(&mut self, ctx: &Ctx, why: &Error, backoff: &mut Duration) {
        self.open = None;
        let all: Vec<_> = self
            .pending
            .drain(..)
            .chain(self.active.drain().map(|(_, w)| w))
            .collect();
        let live: Vec<_> = all.iter().filter_map(Weak::upgrade).collect();
        if live
            .iter()
            .any(|i| i.listed() && !i.stale.load(Ordering::Acquire))
        {
            let cfg = ctx.conn.cfg();
            log::warn!(
                "ETCD watch on {} broke: {why}; serving the last known records (stale) until \
                 etcd at {} answers again",
                cfg.namespace,
                cfg.endpoints.join(",")
            );
        }
        for inf in &live {
            ctx.mark_stale(inf);
        }
        for w in all {
            metrics::get().watch_restarts.inc();
            ctx.relist(w, *backoff);
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
    }
}

/// The stream task of one shared cache: opens the watch stream on the first
/// watch asked for, adds every later one to it, routes each response to its
/// informer, and every `sweep` drops informers nobody reads (through
/// `informers`) and cancels their watches. Ends when the cache is dropped.
pub(super) async fn run(
    ctx: Ctx,
    mut asked: mpsc::UnboundedReceiver<Watch>,
    informers: Weak<Informers>,
    idle: Option<Duration>,
) {
    let mut streams = Streams::default();
    let mut backoff = Duration::from_millis(100);
    let sweep_every = idle.map_or(Duration::from_secs(3600), |i| {
        (i / 4).max(Duration::from_millis(200))
    });
    let mut sweep = tokio::time::interval(sweep_every);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            w = asked.recv() => {
                let Some(Watch(inf, revision)) = w else { return };
                if let Err(e) = add(&ctx, &mut streams, &inf, revision).await {
                    streams.pending.push_back(inf);
                    streams.broke(&ctx, &e, &mut backoff);
                }
            }
            msg = streams.next() => match msg {
                Ok(Some(resp)) => {
                    if resp.created() {
                        backoff = Duration::from_millis(100);
                    }
                    route(&ctx, &mut streams, resp).await;
                }
                Ok(None) => {
                    let e = Error::new(Status::ErrConnection, "the watch stream ended");
                    streams.broke(&ctx, &e, &mut backoff);
                }
                Err(e) => {
                    let e = etcd_error::map(e, Op::Lookup, ctx.conn.cfg());
                    streams.broke(&ctx, &e, &mut backoff);
                }
            },
            _ = sweep.tick() => {
                let Some(informers) = informers.upgrade() else { return };
                if let Some(idle) = idle {
                    drop_idle(&informers, idle);
                }
                cancel_dropped(&mut streams).await;
            }
        }
    }
}

/// Sends the watch of `inf` from `revision`, opening the stream if needed.
async fn add(ctx: &Ctx, streams: &mut Streams, inf: &Weak<Informer>, revision: i64) -> Result<()> {
    let Some(informer) = inf.upgrade() else {
        return Ok(());
    };
    let cfg = ctx.conn.cfg();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision);
    let prefix = informer.prefix.as_bytes();
    ctx.conn.count();
    match streams.open.as_mut() {
        Some((tx, _)) => tx
            .watch(prefix, Some(opts))
            .await
            .map_err(|e| etcd_error::map(e, Op::Lookup, cfg))?,
        None => {
            let stream = etcd_error::retry_transient(cfg, || {
                let mut watch = ctx
                    .conn
                    .etcd_uncounted()
                    .watch_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES);
                let opts = opts.clone();
                async move { watch.watch(prefix, Some(opts)).await }
            })
            .await
            .map_err(|e| etcd_error::map(e, Op::Lookup, cfg))?;
            streams.open = Some(stream.split());
        }
    }
    metrics::get().watch_starts.inc();
    streams.pending.push_back(inf.clone());
    Ok(())
}

/// Hands one response of the stream to the informer whose watch it is for.
async fn route(ctx: &Ctx, streams: &mut Streams, resp: WatchResponse) {
    let id = resp.watch_id();
    if resp.created() {
        match streams.pending.pop_front() {
            Some(inf) => {
                streams.active.insert(id, inf);
            }
            None => log::debug!("watch {id} created that this cache did not ask for"),
        }
    }
    if resp.canceled() {
        if let Some(inf) = streams.active.remove(&id) {
            if let Some(i) = inf.upgrade() {
                log::debug!(
                    "watch on {} cancelled ({}; compacted at {}); listing again",
                    i.prefix,
                    resp.cancel_reason(),
                    resp.compact_revision()
                );
                ctx.relist(inf, Duration::ZERO);
            }
        }
        return;
    }
    if resp.events().is_empty() {
        return;
    }
    let Some(inf) = streams.active.get(&id).and_then(Weak::upgrade) else {
        return;
    };
    if let Err(e) = apply_events(ctx, &inf, &resp).await {
        // The chunks of a record could not be read: watch the informer again
        // from a fresh list rather than skip the record.
        log::debug!("cache of {}: {e}; listing again", inf.prefix);
        if let Some((tx, _)) = streams.open.as_mut() {
            let _ = tx.cancel(id).await;
        }
        streams.active.remove(&id);
        ctx.mark_stale(&inf);
        ctx.relist(Arc::downgrade(&inf), Duration::from_millis(100));
    }
}

async fn apply_events(ctx: &Ctx, inf: &Informer, resp: &WatchResponse) -> Result<()> {
    let namespace = ctx.conn.cfg().namespace.as_str();
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        inf.seen.fetch_max(kv.mod_revision(), Ordering::AcqRel);
        match ev.event_type() {
            EventType::Put => {
                if let Some((id, slot)) = Entry::decode(namespace, ctx.signer.as_deref(), kv) {
                    let rev = kv.mod_revision();
                    // None: superseded; the newer put is further on.
                    if let Some(slot) = complete(&ctx.conn, slot, rev).await? {
                        inf.apply(id, Some(slot), rev);
                    }
                }
            }
            EventType::Delete => {
                let key = String::from_utf8_lossy(kv.key());
                if let Some((engine, rank)) = keys::parse_rank_key(namespace, &key) {
                    inf.apply((engine.to_owned(), rank), None, kv.mod_revision());
                }
            }
        }
    }
    Ok(())
}

/// Drops the informers that no client has read for `idle` and that no
/// subscription or call in progress holds.
fn drop_idle(informers: &Informers, idle: Duration) {
    let limit = idle.as_millis() as u64;
    informers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|prefix, inf| {
            let keep = Arc::strong_count(inf) > 1 || inf.subscribed() || inf.idle_ms() < limit;
            if !keep {
                log::debug!(
                    "dropping the cache of {prefix}: not read for {:.0} s",
                    inf.idle_ms() as f64 / 1e3
                );
            }
            keep
        });
}

/// Cancels the watches of informers that were dropped.
async fn cancel_dropped(streams: &mut Streams) {
    let dropped: Vec<i64> = streams
        .active
        .iter()
        .filter(|(_, w)| w.strong_count() == 0)
        .map(|(id, _)| *id)
        .collect();
    for id in dropped {
        streams.active.remove(&id);
        if let Some((tx, _)) = streams.open.as_mut() {
            let _ = tx.cancel(id).await;
        }
    }
}
