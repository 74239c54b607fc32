//! Why the store closes a connection: each cause says what happened and
//! what to check or change.

use std::fmt;

use super::codec::Stop;
use crate::error::Error;

#[derive(Debug)]
pub enum StoreError {
    /// What the peer sent could not be read (see [`Stop`]).
    Wire(Stop),
    /// The first query was not VALIDATE: not a TCPStore client.
    NotValidated(&'static str),
    BadMagic(u32),
    /// A key that is not UTF-8.
    BadKey,
    /// A value over `--max-value-bytes`, or one that does not fit in one
    /// etcd request with its key.
    TooLarge(Error),
    /// A new writer over `--max-writers`.
    TooManyWriters {
        limit: usize,
    },
    /// etcd refused a write for good (permissions, size); NIXL sees the
    /// closed connection.
    Refused {
        query: &'static str,
        key: String,
        error: Error,
    },
    Io(std::io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Wire(Stop::TooLong {
                what: "value",
                len,
                limit,
            }) => write!(
                f,
                "a SET value of {len} bytes, over --max-value-bytes {limit} (by default what one \
                 etcd request holds: option max_request_bytes, etcd's --max-request-bytes); \
                 raise both, or publish less metadata"
            ),
            StoreError::Wire(Stop::TooLong {
                what: "CHECK key list",
                len,
                limit,
            }) => write!(
                f,
                "a CHECK of {len} keys, over --max-check-keys {limit}; raise it if a client \
                 really checks that many keys at once"
            ),
            StoreError::Wire(stop) => write!(f, "{stop}"),
            StoreError::NotValidated(q) => write!(
                f,
                "{q} before VALIDATE: a TCPStore client validates first (is this a TCPStore \
                 client? NIXL_TCPSTORE_ENDPOINT must point here, not another service)"
            ),
            StoreError::BadMagic(m) => write!(
                f,
                "VALIDATE with magic {m:#x}, not {:#x}: not a TCPStore client of this protocol",
                super::codec::MAGIC
            ),
            StoreError::BadKey => write!(f, "a key that is not UTF-8"),
            StoreError::TooLarge(e) => write!(f, "{e}"),
            StoreError::TooManyWriters { limit } => write!(
                f,
                "a new writer refused: {limit} writers hold keys through this store, the limit \
                 (--max-writers / max_writers); raise it, or run one store per node"
            ),
            StoreError::Refused { query, key, error } => write!(
                f,
                "{query} {key} refused by etcd: {error}; the connection is closed so that NIXL \
                 sees the failure"
            ),
            StoreError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl From<Stop> for StoreError {
    fn from(s: Stop) -> Self {
        StoreError::Wire(s)
    }
}
