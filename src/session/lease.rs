//! The session's lease: kept alive in the background on a schedule driven
//! by its deadline; re-granted, with every key it held re-written, if it is
//! lost; revoked at close. Everything written under it goes through [`Held`].

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::MutexGuard;
use tokio::time::Instant;

use super::{Conn, Session};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::etcd_error::{self, Op};
use crate::metrics;

/// What the session guards: the lease and everything attached to it.
/// Where a client's lease stands ([`LeaseHealth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCondition {
    /// Renewed within its TTL.
    Kept,
    /// Renewals fail or answer late (etcd unreachable or slow); the lease
    /// holds until its TTL runs out.
    Renewing,
    /// Not renewed before its TTL ran out, or etcd no longer knows it: the
    /// client's records are gone from etcd until a re-grant puts them back.
    Lost,
}

/// The state of a client's lease, for an operator or a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseHealth {
    pub condition: LeaseCondition,
    /// Since when it has been in `condition` (when it was granted, for `Kept`
    /// at start).
    pub since: std::time::SystemTime,
    /// How many times it was lost and granted again.
    pub regrants: u64,
}

impl LeaseHealth {
    pub(super) fn new() -> LeaseHealth {
        LeaseHealth {
            condition: LeaseCondition::Kept,
            since: std::time::SystemTime::now(),
            regrants: 0,
        }
    }
}

/// Moves the session's lease health to `condition` (the time changes only
/// with the condition).
fn health_to(session: &Session, condition: LeaseCondition) {
    let mut h = session.health.lock().unwrap_or_else(|e| e.into_inner());
    if h.condition != condition {
        h.condition = condition;
        h.since = std::time::SystemTime::now();
    }
}

pub(super) struct LeaseState {
    pub(super) lease_id: i64,
    /// Every key held under the lease (rank records, chunks, NIXL-layout
    /// keys), with the value written: all re-written under a new lease if
    /// the old one is lost.
    registrations: BTreeMap<String, Vec<u8>>,
    /// Rank record key -> the folder of the chunk generation it names, for
    /// records whose metadata is chunked.
    generations: BTreeMap<String, String>,
}

impl LeaseState {
    pub(super) fn new(lease_id: i64) -> LeaseState {
        LeaseState {
            lease_id,
            registrations: BTreeMap::new(),
            generations: BTreeMap::new(),
        }
    }
}

/// A key to delete in the same transaction as a write: exact, or every key
/// under a prefix.
#[derive(Debug, Clone)]
pub(crate) enum Delete {
    Key(String),
    Prefix(String),
}

/// The session's lease state, locked (see `Session::lock`): writes under
/// the lease, and what the lease holds, one caller at a time.
pub(crate) struct Held<'a> {
    conn: &'a Conn,
    st: MutexGuard<'a, LeaseState>,
}

impl<'a> Held<'a> {
    pub(super) fn new(conn: &'a Conn, st: MutexGuard<'a, LeaseState>) -> Held<'a> {
        Held { conn, st }
    }

    pub fn lease_id(&self) -> i64 {
        self.st.lease_id
    }

    /// Whether `key` is held under the lease.
    pub fn holds(&self, key: &str) -> bool {
        self.st.registrations.contains_key(key)
    }

    /// Notes keys written under the lease, to re-write them if it is lost.
    pub fn hold(&mut self, kvs: impl IntoIterator<Item = (String, Vec<u8>)>) {
        self.st.registrations.extend(kvs);
    }

    /// Stops holding `key` (it was deleted, or another lease holds it now).
    pub fn release(&mut self, key: &str) {
        self.st.registrations.remove(key);
    }

    /// Stops holding every key under `prefix`.
    pub fn release_prefix(&mut self, prefix: &str) {
        self.st.registrations.retain(|k, _| !k.starts_with(prefix));
    }

    pub fn release_all(&mut self) {
        self.st.registrations.clear();
    }

    /// The chunk folder the rank record `key` names, if its metadata is chunked.
    pub fn generation(&self, key: &str) -> Option<String> {
        self.st.generations.get(key).cloned()
    }

    pub fn set_generation(&mut self, key: &str, generation: Option<String>) {
        match generation {
            Some(g) => self.st.generations.insert(key.to_owned(), g),
            None => self.st.generations.remove(key),
        };
    }

    /// Writes every `(key, value)` of `kvs` under the lease, all in one
    /// transaction when there are several (a reader sees all of them or
    /// none), and returns the write's revision. If etcd no longer knows the
    /// lease, re-grants it (re-writing everything held) and writes again.
    /// The caller holds the keys ([`Held::hold`]) once this succeeds.
    pub async fn put_attached(&mut self, kvs: &[(String, Vec<u8>)], op: Op) -> Result<i64> {
        self.write_attached(kvs, &[], op).await
    }

    /// [`Held::put_attached`], with `deletes` applied in the same transaction.
    pub async fn write_attached(
        &mut self,
        kvs: &[(String, Vec<u8>)],
        deletes: &[Delete],
        op: Op,
    ) -> Result<i64> {
        let conn = self.conn;
        // A refusal names the key(s) written.
        let keys = kvs
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(deletes.iter().map(|d| match d {
                Delete::Key(k) | Delete::Prefix(k) => k.as_str(),
            }))
            .collect::<Vec<_>>()
            .join(", ");
        let map = |e| etcd_error::map_key(e, op, conn.cfg(), &keys);
        match write_values(conn, self.st.lease_id, kvs, deletes).await {
            Err(e) if etcd_error::is_lease_not_found(&e) => {
                regrant(conn, &mut self.st, "etcd no longer knows it").await?;
                write_values(conn, self.st.lease_id, kvs, deletes)
                    .await
                    .map_err(map)
            }
            other => other.map_err(map),
        }
    }

    /// Writes every `(key, value)` of `kvs` under the lease, each in its
    /// own request (each must fit in one), a few at a time. For metadata
    /// chunks, which no reader looks at before the record naming them exists.
    pub async fn put_each(&mut self, kvs: &[(String, Vec<u8>)], op: Op) -> Result<()> {
        let conn = self.conn;
        match put_each_under(conn, self.st.lease_id, kvs).await {
            Err(e) if etcd_error::is_lease_not_found(&e) => {
                regrant(conn, &mut self.st, "etcd no longer knows it").await?;
                put_each_under(conn, self.st.lease_id, kvs)
                    .await
                    .map_err(|e| etcd_error::map(e, op, conn.cfg()))
            }
            other => other.map_err(|e| etcd_error::map(e, op, conn.cfg())),
        }
    }
}

/// Chunks sent at once: etcd batches concurrent proposals into one disk
/// write, so a few in flight cut a large blob's write time.
const CHUNKS_IN_FLIGHT: usize = 4;

async fn put_each_under(
    conn: &Conn,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
) -> std::result::Result<(), etcd_client::Error> {
    for batch in kvs.chunks(CHUNKS_IN_FLIGHT) {
        let mut set = tokio::task::JoinSet::new();
        for (key, value) in batch {
            let (key, value) = (key.clone(), value.clone());
            let etcd = conn.etcd().clone();
            let cfg = conn.cfg().clone();
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
    conn: &Conn,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
    deletes: &[Delete],
) -> std::result::Result<i64, etcd_client::Error> {
    etcd_error::retry_transient(conn.cfg(), || {
        write_values_once(conn, lease_id, kvs, deletes)
    })
    .await
}

async fn write_values_once(
    conn: &Conn,
    lease_id: i64,
    kvs: &[(String, Vec<u8>)],
    deletes: &[Delete],
) -> std::result::Result<i64, etcd_client::Error> {
    let opts = || etcd_client::PutOptions::new().with_lease(lease_id);
    let revision = match (kvs, deletes) {
        ([(key, value)], []) => conn
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
            conn.etcd()
                .kv_client()
                .txn(txn)
                .await?
                .header()
                .map(|h| h.revision())
        }
    };
    Ok(revision.unwrap_or(0))
}

/// Grants a lease of the configured TTL; a member that is down is skipped
/// (retried). A failure is reported as part of `op`.
pub(super) async fn grant(conn: &Conn, op: Op) -> Result<etcd_client::LeaseGrantResponse> {
    let cfg = conn.cfg();
    let ttl = cfg.lease_ttl_s;
    let granted = etcd_error::retry_transient(cfg, || {
        let mut leases = conn.etcd().lease_client();
        async move { leases.grant(ttl, None).await }
    })
    .await
    .map_err(|e| etcd_error::map(e, op, cfg))?;
    metrics::get().lease_grants.inc();
    Ok(granted)
}

/// Grants a new lease and re-writes every registration under it.
async fn regrant(conn: &Conn, st: &mut LeaseState, why: &str) -> Result<()> {
    let cfg = conn.cfg();
    let granted = grant(conn, Op::KeepAlive).await?;
    let old = st.lease_id;
    // Metadata chunks first, so every record is back after the chunks it
    // names; then the rest in reverse key order: a key sorts after every
    // prefix of it, so each NIXL agent's labels are back before its marker
    // `{ns}/{agent}/` (a peer never sees the marker without the blob).
    let ns = &cfg.namespace;
    let (chunks, rest): (Vec<_>, Vec<_>) = st
        .registrations
        .iter()
        .partition(|(k, _)| crate::blob::is_chunk_key(ns, k));
    let chunks: Vec<(String, Vec<u8>)> = chunks
        .into_iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    put_each_under(conn, granted.id(), &chunks)
        .await
        .map_err(|e| etcd_error::map(e, Op::KeepAlive, cfg))?;
    for (key, value) in rest.into_iter().rev() {
        write_values(conn, granted.id(), &[(key.clone(), value.clone())], &[])
            .await
            .map_err(|e| etcd_error::map(e, Op::KeepAlive, cfg))?;
    }
    st.lease_id = granted.id();
    metrics::get().lease_regrants.inc();
    log::warn!(
        "ETCD lease {old:x} was lost ({why}); granted lease {:x} (ttl {} s) and re-registered \
         {} key(s)",
        granted.id(),
        granted.ttl(),
        st.registrations.len()
    );
    // Best effort: if the old lease still exists somewhere, drop it.
    let _ = conn.etcd().lease_client().revoke(old).await;
    Ok(())
}

/// A re-grant succeeded: kept again, one more re-grant.
fn regranted(session: &Session) {
    let mut h = session.health.lock().unwrap_or_else(|e| e.into_inner());
    h.condition = LeaseCondition::Kept;
    h.since = std::time::SystemTime::now();
    h.regrants += 1;
}

/// Background task: asks etcd to renew the lease every third of its TTL and
/// takes every answer as a renewal. An answer may come late without harm:
/// etcd's gRPC proxy answers at the cadence of its own keep-alive, not at
/// once, so the stream and its outstanding request are kept, and a warning
/// comes only when half the TTL has passed without an answer. On a broken
/// stream it reconnects quickly; once the deadline has passed, or etcd says
/// the lease is gone, it re-grants and re-registers. It holds the session
/// weakly: once the session is dropped it stops (the drop revokes the lease).
/// A close is seen under the lease lock, so a re-grant is never cut half-way
/// (which would leave a lease nobody revokes, holding the keys for its TTL).
pub(super) async fn keep_alive(session: Weak<Session>, granted_ttl: i64) {
    let mut ttl = Duration::from_secs(granted_ttl.max(1) as u64);
    let mut last_ok = Instant::now();
    let mut renewer: Option<Renewer> = None;
    let mut warned = false;
    let mut next = last_ok + ttl / 3;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        if session.is_closed() {
            return;
        }
        let conn = &session.conn;
        let lease_id = session.lease.lock().await.lease_id;
        let wait = (ttl / 3).min((last_ok + ttl).saturating_duration_since(Instant::now()));
        let step = renew(conn, lease_id, &mut renewer, wait).await;
        let now = Instant::now();
        match step {
            Ok(Answer::Renewed(new_ttl)) => {
                ttl = Duration::from_secs(new_ttl.max(1) as u64);
                last_ok = now;
                health_to(&session, LeaseCondition::Kept);
                if warned {
                    log::info!("ETCD lease {lease_id:x} renewed again; etcd is reachable");
                    warned = false;
                }
                next = now + ttl / 3;
                continue;
            }
            Ok(Answer::Gone) => {
                renewer = None;
                let mut st = session.lease.lock().await;
                if session.is_closed() {
                    return;
                }
                if st.lease_id == lease_id {
                    health_to(&session, LeaseCondition::Lost);
                    match regrant(conn, &mut st, "etcd no longer knows it").await {
                        Ok(()) => regranted(&session),
                        Err(e) => log::warn!("could not re-grant the ETCD lease: {e}; retrying"),
                    }
                }
                last_ok = Instant::now();
                next = Instant::now() + Duration::from_millis(200);
                continue;
            }
            Ok(Answer::Pending) => {
                if !warned && now > last_ok + ttl / 2 {
                    metrics::get().keepalive_failures.inc();
                    health_to(&session, LeaseCondition::Renewing);
                    log::warn!(
                        "renewing ETCD lease {lease_id:x} timed out; check etcd at {}",
                        conn.cfg().endpoints.join(",")
                    );
                    warned = true;
                }
            }
            Err(e) => {
                renewer = None;
                metrics::get().keepalive_failures.inc();
                if now <= last_ok + ttl {
                    health_to(&session, LeaseCondition::Renewing);
                }
                if !warned {
                    log::warn!(
                        "could not renew ETCD lease {lease_id:x}: {e}; records stay until it \
                         expires, retrying"
                    );
                    warned = true;
                }
            }
        }
        if now > last_ok + ttl {
            // Past the deadline: etcd has expired the lease, or will before it
            // hears from us. Re-grant as soon as etcd answers.
            renewer = None;
            let mut st = session.lease.lock().await;
            if session.is_closed() {
                return;
            }
            if st.lease_id == lease_id {
                health_to(&session, LeaseCondition::Lost);
                match regrant(conn, &mut st, "not renewed before its TTL ran out").await {
                    Ok(()) => {
                        regranted(&session);
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

/// A keep-alive stream for one lease, and whether a request on it is still
/// waiting for its answer.
struct Renewer {
    lease_id: i64,
    keeper: etcd_client::LeaseKeeper,
    answers: etcd_client::LeaseKeepAliveStream,
    outstanding: bool,
}

/// What a renewal attempt heard back.
enum Answer {
    /// Renewed; the TTL etcd granted.
    Renewed(i64),
    /// etcd no longer knows the lease.
    Gone,
    /// No answer yet: the request stays outstanding on the stream.
    Pending,
}

/// Asks for a renewal (unless a request is still outstanding) and waits up to
/// `wait` for an answer.
async fn renew(
    conn: &Conn,
    lease_id: i64,
    renewer: &mut Option<Renewer>,
    wait: Duration,
) -> Result<Answer> {
    let map = |e| etcd_error::map(e, Op::KeepAlive, conn.cfg());
    let answer = async {
        if renewer.as_ref().map(|r| r.lease_id) != Some(lease_id) {
            let (keeper, answers) = conn.etcd().lease_client().keep_alive(lease_id).await?;
            *renewer = Some(Renewer {
                lease_id,
                keeper,
                answers,
                outstanding: false,
            });
        }
        let r = renewer.as_mut().expect("renewer just set");
        if !r.outstanding {
            conn.count();
            r.keeper.keep_alive().await?;
            r.outstanding = true;
        }
        let message = r.answers.message().await;
        r.outstanding = false;
        match message? {
            Some(resp) if resp.ttl() > 0 => Ok(Answer::Renewed(resp.ttl())),
            Some(_) => Ok(Answer::Gone),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the lease keep-alive stream ended".into(),
            )),
        }
    };
    match tokio::time::timeout(wait, answer).await {
        Err(_) => Ok(Answer::Pending),
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) if etcd_error::is_lease_not_found(&e) => Ok(Answer::Gone),
        Ok(Err(e)) => Err(map(e)),
    }
}

/// Revokes `lease_id`, within the configured timeout. A lease etcd no longer
/// knows (expired, or etcd was wiped) counts as revoked.
pub(super) async fn revoke(etcd: &etcd_client::Client, cfg: &Config, lease_id: i64) -> Result<()> {
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
