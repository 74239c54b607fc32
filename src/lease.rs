//! The client's lease, kept alive in the background on a schedule driven by
//! its deadline; re-granted, with everything re-registered, if it is lost.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{Inner, LeaseState};
use crate::error::Result;
use crate::etcd_error::{self, Op};

/// A key to delete in the same transaction as a write: exact, or every key
/// under a prefix.
#[derive(Debug, Clone)]
pub(crate) enum Delete {
    Key(String),
    Prefix(String),
}

/// Writes every `(key, value)` of `kvs` under the client's lease, all in one
/// transaction when there are several (a reader sees all of them or none),
/// and returns the write's revision. If etcd no longer knows the lease,
/// re-grants it (re-registering everything) and writes again. The caller
/// records the keys in `st.registrations` once this succeeds.
pub(crate) async fn put_attached(
    inner: &Inner,
    st: &mut LeaseState,
    kvs: &[(String, Vec<u8>)],
    op: Op,
) -> Result<i64> {
    write_attached(inner, st, kvs, &[], op).await
}

/// [`put_attached`], with `deletes` applied in the same transaction.
pub(crate) async fn write_attached(
    inner: &Inner,
    st: &mut LeaseState,
    kvs: &[(String, Vec<u8>)],
    deletes: &[Delete],
    op: Op,
) -> Result<i64> {
    // A refusal names the key(s) written.
    let keys = kvs
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(deletes.iter().map(|d| match d {
            Delete::Key(k) | Delete::Prefix(k) => k.as_str(),
        }))
        .collect::<Vec<_>>()
        .join(", ");
    let map = |e| etcd_error::map_key(e, op, &inner.cfg, &keys);
    match write_values(inner, st.lease_id, kvs, deletes).await {
        Err(e) if etcd_error::is_lease_not_found(&e) => {
            regrant(inner, st, "etcd no longer knows it").await?;
            write_values(inner, st.lease_id, kvs, deletes)
                .await
                .map_err(map)
        }
        other => other.map_err(map),
    }
}

/// Chunks sent at once: etcd batches concurrent proposals into one disk
/// write, so a few in flight cut a large blob's write time.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Writes every `(key, value)` of `kvs` under the client's lease, each in
/// its own request (each must fit in one), a few at a time. For metadata
/// chunks, which no reader looks at before the record naming them exists.
pub(crate) async fn put_each(
    inner: &Inner,
    st: &mut LeaseState,
    kvs: &[(String, Vec<u8>)],
    op: Op,
) -> Result<()> {
    match put_each_under(inner, st.lease_id, kvs).await {
        Err(e) if etcd_error::is_lease_not_found(&e) => {
            regrant(inner, st, "etcd no longer knows it").await?;
            put_each_under(inner, st.lease_id, kvs)
                .await
                .map_err(|e| etcd_error::map(e, op, &inner.cfg))
        }
        other => other.map_err(|e| etcd_error::map(e, op, &inner.cfg)),
    }
}

async fn put_each_under(
    inner: &Inner,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
) -> std::result::Result<(), etcd_client::Error> {
    for batch in kvs.chunks(CHUNKS_IN_FLIGHT) {
        let mut set = tokio::task::JoinSet::new();
        for (key, value) in batch {
            let (key, value) = (key.clone(), value.clone());
            let etcd = inner.etcd().clone();
            let cfg = inner.cfg.clone();
            set.spawn(async move {
                etcd_error::retry_transient(&cfg, || {
                    let mut client = etcd.kv_client();
                    let opts = etcd_client::PutOptions::new().with_lease(lease_id);
                    let (k, v) = (key.clone(), value.clone());
                    async move { client.put(k, v, Some(opts)).await }
                })
                .await
            });
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok(r) => {
                    r?;
                }
                Err(e) => {
                    return Err(etcd_client::Error::IoError(std::io::Error::other(format!(
                        "a chunk write stopped: {e}"
                    ))))
                }
            }
        }
    }
    Ok(())
}

/// Writes `kvs` under `lease_id` (and applies `deletes`): one put, or one
/// transaction; returns the write's revision. Sent again on a transient
/// failure (a dead member, no leader): the same values under the same lease.
async fn write_values(
    inner: &Inner,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
    deletes: &[Delete],
) -> std::result::Result<i64, etcd_client::Error> {
    etcd_error::retry_transient(&inner.cfg, || {
        write_values_once(inner, lease_id, kvs, deletes)
    })
    .await
}

async fn write_values_once(
    inner: &Inner,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
    deletes: &[Delete],
) -> std::result::Result<i64, etcd_client::Error> {
    let opts = || etcd_client::PutOptions::new().with_lease(lease_id);
    let revision = match (kvs, deletes) {
        ([(key, value)], []) => inner
            .etcd()
            .kv_client()
            .put(key.as_bytes(), value.clone(), Some(opts()))
            .await?
            .header()
            .map(|h| h.revision()),
        _ => {
            let mut ops: Vec<etcd_client::TxnOp> = kvs
                .iter()
                .map(|(k, v)| etcd_client::TxnOp::put(k.as_bytes(), v.clone(), Some(opts())))
                .collect();
            ops.extend(deletes.iter().map(|d| match d {
                Delete::Key(k) => etcd_client::TxnOp::delete(k.as_bytes(), None),
                Delete::Prefix(p) => etcd_client::TxnOp::delete(
                    p.as_bytes(),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                ),
            }));
            let txn = etcd_client::Txn::new().and_then(ops);
            inner
                .etcd()
                .kv_client()
                .txn(txn)
                .await?
                .header()
                .map(|h| h.revision())
        }
    };
    Ok(revision.unwrap_or(0))
}

/// Grants a new lease and re-writes every registration under it.
pub(crate) async fn regrant(inner: &Inner, st: &mut LeaseState, why: &str) -> Result<()> {
    let ttl = inner.cfg.lease_ttl_s;
    let granted = etcd_error::retry_transient(&inner.cfg, || {
        let mut leases = inner.etcd().lease_client();
        async move { leases.grant(ttl, None).await }
    })
    .await
    .map_err(|e| etcd_error::map(e, Op::KeepAlive, &inner.cfg))?;
    let old = st.lease_id;
    // Metadata chunks first, so every record is back after the chunks it
    // names; then the rest in reverse key order: a key sorts after every
    // prefix of it, so each NIXL agent's labels are back before its marker
    // `{ns}/{agent}/` (a peer never sees the marker without the blob).
    let ns = &inner.cfg.namespace;
    let (chunks, rest): (Vec<_>, Vec<_>) = st
        .registrations
        .iter()
        .partition(|(k, _)| crate::blob::is_chunk_key(ns, k));
    let chunks: Vec<(String, Vec<u8>)> = chunks
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    put_each_under(inner, granted.id(), &chunks)
        .await
        .map_err(|e| etcd_error::map(e, Op::KeepAlive, &inner.cfg))?;
    for (key, value) in rest.into_iter().rev() {
        write_values(inner, granted.id(), &[(key.clone(), value.clone())], &[])
            .await
            .map_err(|e| etcd_error::map(e, Op::KeepAlive, &inner.cfg))?;
    }
    st.lease_id = granted.id();
    log::warn!(
        "ETCD lease {old:x} was lost ({why}); granted lease {:x} (ttl {} s) and re-registered \
         {} key(s)",
        granted.id(),
        granted.ttl(),
        st.registrations.len()
    );
    // Best effort: if the old lease still exists somewhere, drop it.
    let _ = inner.etcd().lease_client().revoke(old).await;
    Ok(())
}

/// Background task: renews the lease every third of its TTL. On a failed
/// renewal it retries quickly; once the deadline has passed, or etcd says the
/// lease is gone, it re-grants and re-registers. It holds the client weakly:
/// once the last clone is dropped it stops (the drop revokes the lease). A
/// close is seen under the state lock, so a re-grant is never cut half-way
/// (which would leave a lease nobody revokes, holding the keys for its TTL).
pub(crate) async fn keep_alive(client: Weak<Inner>, granted_ttl: i64) {
    let mut ttl = Duration::from_secs(granted_ttl.max(1) as u64);
    let mut last_ok = Instant::now();
    let mut stream = None;
    let mut warned = false;
    let mut next = last_ok + ttl / 3;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(inner) = client.upgrade() else {
            return;
        };
        if *inner.closed_tx.borrow() {
            return;
        }
        let lease_id = inner.state.lock().await.lease_id;
        let step = tokio::time::timeout(ttl / 3, renew(&inner, lease_id, &mut stream)).await;
        let now = Instant::now();
        match step {
            Ok(Ok(Some(new_ttl))) => {
                ttl = Duration::from_secs(new_ttl.max(1) as u64);
                last_ok = now;
                if warned {
                    log::info!("ETCD lease {lease_id:x} renewed again; etcd is reachable");
                    warned = false;
                }
                next = now + ttl / 3;
                continue;
            }
            Ok(Ok(None)) => {
                stream = None;
                let mut st = inner.state.lock().await;
                if *inner.closed_tx.borrow() {
                    return;
                }
                if st.lease_id == lease_id {
                    if let Err(e) = regrant(&inner, &mut st, "etcd no longer knows it").await {
                        log::warn!("could not re-grant the ETCD lease: {e}; retrying");
                    }
                }
                last_ok = Instant::now();
                next = Instant::now() + Duration::from_millis(200);
                continue;
            }
            Ok(Err(e)) => {
                stream = None;
                if !warned {
                    log::warn!(
                        "could not renew ETCD lease {lease_id:x}: {e}; records stay until it \
                         expires, retrying"
                    );
                    warned = true;
                }
            }
            Err(_) => {
                stream = None;
                if !warned {
                    log::warn!(
                        "renewing ETCD lease {lease_id:x} timed out; check etcd at {}",
                        inner.cfg.endpoints.join(",")
                    );
                    warned = true;
                }
            }
        }
        if now > last_ok + ttl {
            // Past the deadline: etcd has expired the lease, or will before it
            // hears from us. Re-grant as soon as etcd answers.
            let mut st = inner.state.lock().await;
            if *inner.closed_tx.borrow() {
                return;
            }
            if st.lease_id == lease_id {
                match regrant(&inner, &mut st, "not renewed before its TTL ran out").await {
                    Ok(()) => {
                        last_ok = Instant::now();
                        warned = false;
                    }
                    Err(e) => log::debug!("re-grant failed: {e}"),
                }
            }
        }
        next = Instant::now() + Duration::from_millis(250).min(ttl / 4);
    }
}

type KeepAliveStream = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal on a persistent keep-alive stream. `Ok(None)`: the lease is gone.
async fn renew(
    inner: &Inner,
    lease_id: i64,
    stream: &mut Option<(i64, KeepAliveStream)>,
) -> Result<Option<i64>> {
    let map = |e| etcd_error::map(e, Op::KeepAlive, &inner.cfg);
    match renew_on_stream(inner, lease_id, stream).await {
        Err(e) if etcd_error::is_lease_not_found(&e) => Ok(None),
        other => other.map_err(map),
    }
}

async fn renew_on_stream(
    inner: &Inner,
    lease_id: i64,
    stream: &mut Option<(i64, KeepAliveStream)>,
) -> std::result::Result<Option<i64>, etcd_client::Error> {
    if stream.as_ref().map(|(id, _)| *id) != Some(lease_id) {
        let s = inner.etcd().lease_client().keep_alive(lease_id).await?;
        *stream = Some((lease_id, s));
    }
    let (_, (keeper, responses)) = stream.as_mut().expect("stream just set");
    inner
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    keeper.keep_alive().await?;
    match responses.message().await? {
        Some(resp) if resp.ttl() > 0 => Ok(Some(resp.ttl())),
        Some(_) => Ok(None),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the lease keep-alive stream ended".into(),
        )),
    }
}
