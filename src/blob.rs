//! Metadata too large for one etcd request: stored in chunks beside the
//! record, one generation per registration, so that no reader ever sees a
//! partial or mixed blob.
//!
//! Layout, for the record `{ns}/{engine}/rank_{r}`:
//! `{ns}.blobs/{engine}/rank_{r}/{generation}/{index:06}`, raw bytes. The
//! chunks live beside the namespace, not under it, so informers that list or
//! watch `{ns}/` never carry them; a reader fetches them only for the records
//! it reads. A grant on the prefix `{ns}` (no trailing `/`) covers both.
//!
//! Write order (all under the client's lease): the chunks of a new
//! generation; then, in one transaction, the record naming that generation
//! (with the blob's SHA-256) and the delete of the previous generation.
//! Chunk keys are never overwritten, so a reader that reads the generation a
//! record names, at that record's revision, gets exactly that blob; it checks
//! the count, the sizes and the checksum before anything is served.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, Status};
pub use crate::limits::{DEFAULT_MAX_METADATA_BYTES, MAX_METADATA_BYTES_LIMIT};

/// Room kept in each chunk request for the key, the lease and gRPC framing.
const CHUNK_OVERHEAD: usize = 1024;
/// Chunks read per request when fetching: bounds one response's size.
const FETCH_BYTES_PER_REQUEST: usize = 16 << 20;

/// What a record says of its chunked metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Unique per registration; names the folder of its chunks.
    pub generation: String,
    pub chunks: u32,
    /// Size of every chunk but the last.
    pub chunk_size: usize,
    /// SHA-256 of the whole metadata, lowercase hex.
    pub sha256: String,
}

/// The folder of every generation of one rank's chunks (trailing `/`).
pub fn rank_prefix(namespace: &str, engine_id: &str, rank: u32) -> String {
    format!("{namespace}.blobs/{engine_id}/rank_{rank}/")
}

/// The folder of one generation's chunks (trailing `/`).
pub fn generation_prefix(namespace: &str, engine_id: &str, rank: u32, generation: &str) -> String {
    format!("{}{generation}/", rank_prefix(namespace, engine_id, rank))
}

/// Whether `key` is a chunk key of `namespace`.
pub fn is_chunk_key(namespace: &str, key: &str) -> bool {
    key.strip_prefix(namespace)
        .is_some_and(|rest| rest.starts_with(".blobs/"))
}

/// Raw bytes per chunk so that one chunk put fits in `max_request_bytes`.
pub fn chunk_size(max_request_bytes: usize, prefix_len: usize) -> usize {
    max_request_bytes
        .saturating_sub(prefix_len + 6 + CHUNK_OVERHEAD)
        .max(1)
}

pub fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = Sha256::digest(data);
    let mut out = String::with_capacity(64);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Splits `metadata` into chunk key-values under `prefix` (a generation
/// folder) and returns them with the reference the record will carry.
pub fn split(
    metadata: &[u8],
    prefix: &str,
    generation: &str,
    chunk: usize,
) -> (Vec<(String, Vec<u8>)>, BlobRef) {
    let kvs: Vec<(String, Vec<u8>)> = metadata
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| (format!("{prefix}{i:06}"), c.to_vec()))
        .collect();
    let blob = BlobRef {
        generation: generation.to_owned(),
        chunks: kvs.len() as u32,
        chunk_size: chunk,
        sha256: sha256_hex(metadata),
    };
    (kvs, blob)
}

/// Rebuilds a blob from the chunk key-values read under `prefix` (sorted by
/// key, as etcd returns them), checking everything the record promises.
/// `record_key` names the record in errors.
pub fn assemble(
    record_key: &str,
    prefix: &str,
    blob: &BlobRef,
    metadata_len: usize,
    chunks: &[(Vec<u8>, Vec<u8>)],
) -> Result<Vec<u8>> {
    let bad = |why: String| {
        Error::bad_record(
            record_key,
            format!("its metadata chunks under {prefix} {why}"),
        )
    };
    if chunks.len() != blob.chunks as usize {
        return Err(bad(format!(
            "number {}, the record says {}",
            chunks.len(),
            blob.chunks
        )));
    }
    // Sized by what arrived, not by what the record claims.
    let total: usize = chunks.iter().map(|(_, v)| v.len()).sum();
    let mut out = Vec::with_capacity(total.min(metadata_len));
    for (i, (key, value)) in chunks.iter().enumerate() {
        let want = format!("{prefix}{i:06}");
        if key.as_slice() != want.as_bytes() {
            return Err(bad(format!(
                "are not numbered 0..{}: found {}",
                blob.chunks,
                String::from_utf8_lossy(key)
            )));
        }
        let last = i + 1 == chunks.len();
        if (!last && value.len() != blob.chunk_size) || value.len() > blob.chunk_size {
            return Err(bad(format!(
                "have a chunk {i} of {} bytes, the record says {}",
                value.len(),
                blob.chunk_size
            )));
        }
        out.extend_from_slice(value);
    }
    if out.len() != metadata_len {
        return Err(bad(format!(
            "hold {} bytes, the record says {metadata_len}",
            out.len()
        )));
    }
    if sha256_hex(&out) != blob.sha256 {
        return Err(bad("do not match the record's SHA-256".to_owned()));
    }
    Ok(out)
}

/// Error for metadata over the configured maximum (nothing is written).
pub fn too_large(what: &str, len: usize, max: usize) -> Error {
    Error::new(
        Status::ErrTooLarge,
        format!(
            "metadata of {len} bytes for {what} is over the maximum of {max} bytes \
             (option max_metadata_bytes); nothing was written"
        ),
    )
}

/// How many chunks to read per request.
pub fn chunks_per_request(chunk_size: usize) -> i64 {
    (FETCH_BYTES_PER_REQUEST / chunk_size.max(1)).max(1) as i64
}

/// Largest response a chunk read accepts: a page of chunks and slack.
pub fn max_chunk_response(chunk_size: usize) -> usize {
    FETCH_BYTES_PER_REQUEST + (FETCH_BYTES_PER_REQUEST >> 2) + (chunk_size << 1)
}

/// Chunk key-values read from etcd, sorted by key.
pub type Chunks = Vec<(Vec<u8>, Vec<u8>)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 256) as u8).collect()
    }

    fn as_read(kvs: &[(String, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        kvs.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect()
    }

    #[test]
    fn split_then_assemble_round_trips_every_boundary() {
        for n in [1, 99, 100, 101, 1000] {
            let md = data(n);
            let (kvs, blob) = split(&md, "/ns.blobs/e/rank_0/g/", "g", 100);
            assert_eq!(kvs.len(), n.div_ceil(100));
            assert!(kvs.iter().all(|(_, v)| v.len() <= 100));
            let back = assemble("k", "/ns.blobs/e/rank_0/g/", &blob, n, &as_read(&kvs)).unwrap();
            assert_eq!(back, md);
        }
    }

    #[test]
    fn a_missing_swapped_or_foreign_chunk_is_refused() {
        let md = data(350);
        let p = "/ns.blobs/e/rank_0/g/";
        let (kvs, blob) = split(&md, p, "g", 100);
        let read = as_read(&kvs);
        let check = |chunks: Vec<(Vec<u8>, Vec<u8>)>, want: &str| {
            let e = assemble("/ns/e/rank_0", p, &blob, 350, &chunks).unwrap_err();
            assert_eq!(e.status, Status::ErrBadRecord);
            assert!(e.message.contains(want), "{} lacks {want}", e.message);
            assert!(e.message.contains("/ns/e/rank_0"));
        };
        check(read[..3].to_vec(), "number 3, the record says 4");
        let mut swapped = read.clone();
        swapped.swap(0, 1);
        check(swapped, "not numbered");
        let mut other = read.clone();
        other[2].1 = data(100).iter().map(|b| b ^ 1).collect();
        check(other, "SHA-256");
        let mut short = read.clone();
        short[1].1.pop();
        check(short, "chunk 1 of 99 bytes");
    }

    #[test]
    fn chunk_keys_stay_outside_the_namespace_prefix() {
        let p = generation_prefix("/vllm/nixl/agents", "e", 3, "abc");
        assert_eq!(p, "/vllm/nixl/agents.blobs/e/rank_3/abc/");
        assert!(!p.starts_with("/vllm/nixl/agents/"));
        assert!(is_chunk_key("/vllm/nixl/agents", &p));
        assert!(!is_chunk_key(
            "/vllm/nixl/agents",
            "/vllm/nixl/agents/e/rank_3"
        ));
        assert!(chunk_size(1536 * 1024, p.len()) < 1536 * 1024);
    }
}
