//! The queries: GET and CHECK read the store's copy; SET and DELETE_KEY
//! queue a write on the writer's queue and wait for etcd at most
//! `write_wait`.

use std::sync::Arc;

use super::error::StoreError;
use super::keymap::{self, Mapped};
use super::queue::Write;
use super::server::Conn;
use super::writers::Writer;
use super::{codec, Shared};
use crate::error::{Error, Status};
use crate::etcd_error;
use crate::nixl_layout;

fn map_key(s: &Shared, key: &[u8]) -> Result<Mapped, StoreError> {
    keymap::map(&s.cfg.nixl_namespace, &s.cfg.namespace, key).ok_or(StoreError::BadKey)
}

fn shown(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The value of a key: from the live copy, or from etcd before the first copy.
async fn lookup(s: &Shared, m: &Mapped) -> Option<Vec<u8>> {
    let key = m.etcd_key();
    if let Some(v) = s.mirror_for(key).get(key) {
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

pub(super) async fn get(s: &Shared, key: &[u8]) -> Result<Vec<u8>, StoreError> {
    let m = map_key(s, key)?;
    Ok(lookup(s, &m).await.unwrap_or_default())
}

pub(super) async fn check(s: &Shared, keys: &[Vec<u8>]) -> Result<u8, StoreError> {
    let mapped = keys
        .iter()
        .map(|k| map_key(s, k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut changes = (s.nixl.changes(), s.verbatim.changes());
    let started = tokio::time::Instant::now();
    let deadline = started + s.opts.check_wait;
    let show = |r: &str| {
        log::debug!(
            "nixl-etcd store: CHECK of {} key(s) ({}) -> {r} after {:.1} ms",
            keys.len(),
            shown(keys.first().map(Vec::as_slice).unwrap_or(b"")),
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

/// Waits for write `seq` of `w` up to the write wait. Not acknowledged in
/// time: it stays queued (one log line per slow spell); refused by etcd
/// for good: the connection is closed, which NIXL sees.
async fn settle(
    s: &Shared,
    w: &Writer,
    seq: u64,
    query: &'static str,
    key: String,
) -> Result<(), StoreError> {
    match w.wait(seq, s.opts.write_wait).await {
        Some(Ok(())) => Ok(()),
        Some(Err(error)) => Err(StoreError::Refused { query, key, error }),
        None => {
            w.note_queued(&format!("{query} {key}"), s.opts.write_wait);
            Ok(())
        }
    }
}

pub(super) async fn set(
    s: &Arc<Shared>,
    conn: &mut Conn,
    key: &[u8],
    value: Vec<u8>,
) -> Result<(), StoreError> {
    let m = map_key(s, key)?;
    let started = std::time::Instant::now();
    let len = value.len();
    let write = match &m {
        Mapped::Broadcast { agent, label, key } => {
            // What `Client::publish_nixl` writes: the blob and the marker,
            // in one transaction under the writer's lease.
            let marker = nixl_layout::marker_key(&s.cfg.nixl_namespace, agent);
            nixl_layout::check_fits(s.cfg.max_request_bytes, agent, label, key, &marker, len)
                .map_err(StoreError::TooLarge)?;
            Write::Put {
                kvs: vec![(key.clone(), value), (marker, Vec::new())],
            }
        }
        Mapped::Verbatim { key } => {
            let limit = s.cfg.max_request_bytes.saturating_sub(key.len() + 512);
            if len > limit {
                return Err(StoreError::TooLarge(Error::new(
                    Status::ErrTooLarge,
                    format!(
                        "a value of {len} bytes for {key} is over the {limit} bytes that fit in \
                         one etcd request with its key (max_request_bytes={}); nothing was \
                         written",
                        s.cfg.max_request_bytes
                    ),
                )));
            }
            Write::Put {
                kvs: vec![(key.clone(), value)],
            }
        }
    };
    let w = conn.writer(s).await?;
    let seq = w.enqueue(s, write);
    settle(s, &w, seq, "SET", shown(key)).await?;
    log::debug!(
        "nixl-etcd store: SET {} -> {} ({len} bytes) by {} in {:.1} ms",
        shown(key),
        m.etcd_key(),
        w.id,
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// DELETE_KEY: the `metadata` label of an agent takes the whole agent
/// (marker and every label, as NIXL's invalidate does on its etcd backend,
/// so peers watching the marker drop it); any other key goes alone. Returns
/// 1 if the key existed (in the store's copy, which holds every write made
/// through this store and etcd's within a millisecond).
pub(super) async fn delete(s: &Arc<Shared>, key: &[u8]) -> Result<i64, StoreError> {
    let m = map_key(s, key)?;
    let (target, prefix) = match &m {
        Mapped::Broadcast { agent, label, .. } if label == nixl_layout::DEFAULT_LABEL => {
            (nixl_layout::marker_key(&s.cfg.nixl_namespace, agent), true)
        }
        other => (other.etcd_key().to_owned(), false),
    };
    let existed = lookup(s, &m).await.is_some();
    // Through the holder's queue, after its own writes of the key.
    let w = match s.writers.holder_of(m.etcd_key()) {
        Some(w) => w,
        None => s.own.get_or_init(|| Writer::for_store(s)).clone(),
    };
    let seq = w.enqueue(
        s,
        Write::Delete {
            key: target.clone(),
            prefix,
        },
    );
    settle(s, &w, seq, "DELETE_KEY", shown(key)).await?;
    log::debug!(
        "nixl-etcd store: DELETE_KEY {} -> {target} (existed: {existed})",
        shown(key)
    );
    Ok(existed as i64)
}
