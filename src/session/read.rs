//! Reads of key ranges: paged, at one revision; and the chunks of a chunked
//! blob (see `blob` for their layout).

use etcd_client::{GetOptions, KeyValue};

use super::Conn;
use crate::blob::{self, BlobRef, Chunks};
use crate::error::Result;
use crate::etcd_error::{self, Op};

/// The key just past every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Reads every key under `prefix` in pages of up to `page` keys, all at one
/// revision (`revision`, else the first page's), so the result is one
/// consistent snapshot; stops early once more than `max` keys were read.
/// Returns the key-values, sorted by key, and the revision read at. A page
/// too large to receive is asked for again in halves; a member that is down
/// is skipped (see `retry_transient`).
pub(crate) async fn read_range(
    conn: &Conn,
    kv: &etcd_client::KvClient,
    prefix: &str,
    mut page: i64,
    mut revision: Option<i64>,
    max: usize,
) -> std::result::Result<(Vec<KeyValue>, i64), etcd_client::Error> {
    let end = prefix_end(prefix);
    let mut from = prefix.as_bytes().to_vec();
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
        if let Some(rev) = revision {
            opts = opts.with_revision(rev);
        }
        let attempt = || {
            conn.count();
            let mut kv = kv.clone();
            let (from, opts) = (from.clone(), opts.clone());
            async move { kv.get(from, Some(opts)).await }
        };
        let mut resp = match etcd_error::retry_transient(conn.cfg(), attempt).await {
            Err(etcd_client::Error::GRpcStatus(s))
                if s.code() == tonic::Code::OutOfRange
                    && !s.message().contains("compacted")
                    && page > 1 =>
            {
                page /= 2;
                continue;
            }
            other => other?,
        };
        let at = *revision.get_or_insert_with(|| resp.header().map(|h| h.revision()).unwrap_or(0));
        let more = resp.more();
        out.extend(resp.take_kvs());
        match out.last() {
            Some(last) if more && out.len() <= max => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((out, at)),
        }
    }
}

/// Reads every chunk under `prefix` as of `revision` (the revision of the
/// record naming them, so they are all there even if a newer registration
/// has since replaced them). If etcd compacted that revision away, reads the
/// latest instead and says so (`false`): the chunks may then be gone, the
/// record superseded.
pub(crate) async fn fetch_chunks(
    conn: &Conn,
    prefix: &str,
    blob: &BlobRef,
    revision: i64,
) -> Result<(Chunks, bool)> {
    let cfg = conn.cfg();
    match fetch_at(conn, prefix, blob, Some(revision)).await {
        Err(e) if etcd_error::is_compacted(&e) => {
            log::debug!("revision {revision} of {prefix} was compacted; reading the latest");
            let chunks = fetch_at(conn, prefix, blob, None).await;
            Ok((
                chunks.map_err(|e| etcd_error::map(e, Op::Lookup, cfg))?,
                false,
            ))
        }
        other => Ok((
            other.map_err(|e| etcd_error::map(e, Op::Lookup, cfg))?,
            true,
        )),
    }
}

async fn fetch_at(
    conn: &Conn,
    prefix: &str,
    blob: &BlobRef,
    revision: Option<i64>,
) -> std::result::Result<Chunks, etcd_client::Error> {
    let kv = conn
        .etcd_uncounted()
        .kv_client()
        .max_decoding_message_size(blob::max_chunk_response(blob.chunk_size));
    let page = blob::chunks_per_request(blob.chunk_size);
    // More chunks than the record names: stop reading, assemble refuses.
    let max = blob.chunks as usize;
    let (kvs, _) = read_range(conn, &kv, prefix, page, revision, max).await?;
    // Taken, not copied: a chunk is up to a request's size.
    Ok(kvs.into_iter().map(|kv| kv.into_key_value()).collect())
}
