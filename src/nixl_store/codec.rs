//! The subset of PyTorch's c10d TCPStore wire protocol that NIXL 1.5's
//! TCPStore metadata backend speaks.
//!
//! A query is one type byte, then its fields in native byte order; a string
//! (key or value) is a `u64` length then that many bytes. Replies: GET a
//! `u64` length then the value, CHECK one byte, DELETE_KEY an `i64`, PING the
//! `u32` nonce back; VALIDATE and SET have none.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const VALIDATE: u8 = 0;
pub const SET: u8 = 1;
pub const GET: u8 = 3;
pub const CHECK: u8 = 5;
pub const DELETE_KEY: u8 = 8;
pub const PING: u8 = 13;

/// The magic number VALIDATE carries (c10d's `validationMagicNumber`).
pub const MAGIC: u32 = 0x3C85_F7CE;
/// CHECK replies.
pub const READY: u8 = 0;
pub const NOT_READY: u8 = 1;

/// One decoded query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Validate(u32),
    Set(Vec<u8>, Vec<u8>),
    Get(Vec<u8>),
    Check(Vec<Vec<u8>>),
    Delete(Vec<u8>),
    Ping(u32),
}

impl Query {
    pub fn name(&self) -> &'static str {
        match self {
            Query::Validate(_) => "VALIDATE",
            Query::Set(..) => "SET",
            Query::Get(_) => "GET",
            Query::Check(_) => "CHECK",
            Query::Delete(_) => "DELETE_KEY",
            Query::Ping(_) => "PING",
        }
    }
}

/// Bounds on what one query may carry.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_check_keys: usize,
    /// Once a query's type byte has arrived, the rest must follow within this.
    pub stall: Duration,
}

/// Why reading a query stopped.
#[derive(Debug)]
pub enum Stop {
    /// The peer closed the connection between two queries.
    Closed,
    /// The peer closed the connection inside a query.
    Truncated(&'static str),
    Unknown(u8),
    TooLong {
        what: &'static str,
        len: u64,
        limit: usize,
    },
    /// The rest of a query did not arrive in time.
    Stalled(&'static str, Duration),
    /// A first query that is not VALIDATE (its type byte).
    NotValidate(u8),
    Io(std::io::Error),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Closed => write!(f, "the peer closed the connection"),
            Stop::Truncated(q) => write!(
                f,
                "the peer closed the connection in the middle of a {q} query"
            ),
            Stop::Unknown(t) => write!(
                f,
                "unknown query type {t} (this store serves the TCPStore subset NIXL uses: \
                 VALIDATE, SET, GET, CHECK, DELETE_KEY, PING; is the client NIXL's TCPStore \
                 backend?)"
            ),
            Stop::TooLong { what, len, limit } => {
                write!(f, "a {what} of {len} bytes, over the limit of {limit}")
            }
            Stop::Stalled(q, d) => write!(
                f,
                "the rest of a {q} query did not arrive within {:.1} s",
                d.as_secs_f64()
            ),
            Stop::NotValidate(t) => {
                write!(
                    f,
                    "a first query of type {t} ({}), not VALIDATE",
                    query_name(*t)
                )
            }
            Stop::Io(e) => write!(f, "read error: {e}"),
        }
    }
}

/// The name of query type `t`, or "unknown".
pub fn query_name(t: u8) -> &'static str {
    match t {
        VALIDATE => "VALIDATE",
        SET => "SET",
        GET => "GET",
        CHECK => "CHECK",
        DELETE_KEY => "DELETE_KEY",
        PING => "PING",
        _ => "unknown",
    }
}

/// Reads the first query, which must be VALIDATE, and returns its magic.
/// Anything else is refused at its type byte: before VALIDATE at most its
/// 5 bytes are read, never a length a stranger chose.
pub async fn read_validate<R: AsyncRead + Unpin>(r: &mut R, stall: Duration) -> Result<u32, Stop> {
    let mut t = [0u8; 1];
    match r.read(&mut t).await {
        Ok(0) => return Err(Stop::Closed),
        Ok(_) => {}
        Err(e) => return Err(Stop::Io(e)),
    }
    if t[0] != VALIDATE {
        return Err(Stop::NotValidate(t[0]));
    }
    match tokio::time::timeout(stall, read_u32(r, "VALIDATE")).await {
        Ok(m) => m,
        Err(_) => Err(Stop::Stalled("VALIDATE", stall)),
    }
}

/// Reads one query. Waits without limit for its first byte (an idle
/// connection is fine); the rest must come within `limits.stall`.
pub async fn read_query<R: AsyncRead + Unpin>(r: &mut R, limits: &Limits) -> Result<Query, Stop> {
    let mut t = [0u8; 1];
    match r.read(&mut t).await {
        Ok(0) => return Err(Stop::Closed),
        Ok(_) => {}
        Err(e) => return Err(Stop::Io(e)),
    }
    let t = t[0];
    let name = query_name(t);
    if name == "unknown" {
        return Err(Stop::Unknown(t));
    }
    match tokio::time::timeout(limits.stall, read_body(r, t, name, limits)).await {
        Ok(q) => q,
        Err(_) => Err(Stop::Stalled(name, limits.stall)),
    }
}

async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    t: u8,
    name: &'static str,
    limits: &Limits,
) -> Result<Query, Stop> {
    let q = match t {
        VALIDATE => Query::Validate(read_u32(r, name).await?),
        PING => Query::Ping(read_u32(r, name).await?),
        SET => {
            let key = read_bytes(r, name, "key", limits.max_key_bytes).await?;
            let value = read_bytes(r, name, "value", limits.max_value_bytes).await?;
            Query::Set(key, value)
        }
        GET => Query::Get(read_bytes(r, name, "key", limits.max_key_bytes).await?),
        DELETE_KEY => Query::Delete(read_bytes(r, name, "key", limits.max_key_bytes).await?),
        CHECK => {
            let n = read_u64(r, name).await?;
            if n > limits.max_check_keys as u64 {
                return Err(Stop::TooLong {
                    what: "CHECK key list",
                    len: n,
                    limit: limits.max_check_keys,
                });
            }
            let mut keys = Vec::with_capacity(n as usize);
            for _ in 0..n {
                keys.push(read_bytes(r, name, "key", limits.max_key_bytes).await?);
            }
            Query::Check(keys)
        }
        _ => return Err(Stop::Unknown(t)),
    };
    Ok(q)
}

async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    name: &'static str,
) -> Result<(), Stop> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Stop::Truncated(name)),
        Err(e) => Err(Stop::Io(e)),
    }
}

async fn read_u32<R: AsyncRead + Unpin>(r: &mut R, name: &'static str) -> Result<u32, Stop> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b, name).await?;
    Ok(u32::from_ne_bytes(b))
}

async fn read_u64<R: AsyncRead + Unpin>(r: &mut R, name: &'static str) -> Result<u64, Stop> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b, name).await?;
    Ok(u64::from_ne_bytes(b))
}

async fn read_bytes<R: AsyncRead + Unpin>(
    r: &mut R,
    name: &'static str,
    what: &'static str,
    limit: usize,
) -> Result<Vec<u8>, Stop> {
    let len = read_u64(r, name).await?;
    if len > limit as u64 {
        return Err(Stop::TooLong { what, len, limit });
    }
    let mut v = vec![0u8; len as usize];
    read_exact(r, &mut v, name).await?;
    Ok(v)
}

/// Encodes a query as NIXL's client sends it (for tests and benchmarks).
pub fn encode(q: &Query) -> Vec<u8> {
    let mut out = Vec::new();
    let s = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_ne_bytes());
        out.extend_from_slice(b);
    };
    match q {
        Query::Validate(m) => {
            out.push(VALIDATE);
            out.extend_from_slice(&m.to_ne_bytes());
        }
        Query::Ping(n) => {
            out.push(PING);
            out.extend_from_slice(&n.to_ne_bytes());
        }
        Query::Set(k, v) => {
            out.push(SET);
            s(&mut out, k);
            s(&mut out, v);
        }
        Query::Get(k) => {
            out.push(GET);
            s(&mut out, k);
        }
        Query::Delete(k) => {
            out.push(DELETE_KEY);
            s(&mut out, k);
        }
        Query::Check(keys) => {
            out.push(CHECK);
            out.extend_from_slice(&(keys.len() as u64).to_ne_bytes());
            for k in keys {
                s(&mut out, k);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_key_bytes: 64,
            max_value_bytes: 1024,
            max_check_keys: 4,
            stall: Duration::from_secs(5),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn every_query_round_trips() {
        let qs = vec![
            Query::Validate(MAGIC),
            Query::Ping(1234),
            Query::Set(
                b"/nixl/agents/metadata/A/NULL_AGENT".to_vec(),
                vec![0, 1, 2],
            ),
            Query::Get(b"k".to_vec()),
            Query::Check(vec![b"a".to_vec(), b"b".to_vec()]),
            Query::Delete(b"k".to_vec()),
            Query::Set(b"".to_vec(), b"".to_vec()),
        ];
        let mut wire = Vec::new();
        for q in &qs {
            wire.extend(encode(q));
        }
        rt().block_on(async {
            let mut r = &wire[..];
            for q in &qs {
                assert_eq!(&read_query(&mut r, &limits()).await.unwrap(), q);
            }
            assert!(matches!(
                read_query(&mut r, &limits()).await,
                Err(Stop::Closed)
            ));
        });
    }

    #[test]
    fn bad_input_is_named() {
        rt().block_on(async {
            let l = limits();
            let mut r: &[u8] = &[42];
            assert!(matches!(
                read_query(&mut r, &l).await,
                Err(Stop::Unknown(42))
            ));
            let over = encode(&Query::Get(vec![b'k'; 65]));
            assert!(matches!(
                read_query(&mut &over[..], &l).await,
                Err(Stop::TooLong {
                    what: "key",
                    len: 65,
                    limit: 64
                })
            ));
            let over = encode(&Query::Set(b"k".to_vec(), vec![0; 1025]));
            assert!(matches!(
                read_query(&mut &over[..], &l).await,
                Err(Stop::TooLong {
                    what: "value",
                    len: 1025,
                    ..
                })
            ));
            let many = encode(&Query::Check(vec![b"k".to_vec(); 5]));
            assert!(matches!(
                read_query(&mut &many[..], &l).await,
                Err(Stop::TooLong {
                    what: "CHECK key list",
                    len: 5,
                    ..
                })
            ));
            // A length of u64::MAX does not allocate.
            let mut huge = vec![GET];
            huge.extend_from_slice(&u64::MAX.to_ne_bytes());
            assert!(matches!(
                read_query(&mut &huge[..], &l).await,
                Err(Stop::TooLong { .. })
            ));
            // Before VALIDATE, only VALIDATE: refused at the type byte.
            let set = encode(&Query::Set(b"k".to_vec(), vec![0; 1 << 20]));
            let mut r = &set[..];
            assert!(matches!(
                read_validate(&mut r, l.stall).await,
                Err(Stop::NotValidate(SET))
            ));
            assert_eq!(r.len(), set.len() - 1, "read past the type byte");
            let v = encode(&Query::Validate(MAGIC));
            assert_eq!(read_validate(&mut &v[..], l.stall).await.unwrap(), MAGIC);
            let whole = encode(&Query::Set(b"key".to_vec(), b"value".to_vec()));
            for cut in 1..whole.len() {
                let got = read_query(&mut &whole[..cut], &l).await;
                assert!(
                    matches!(got, Err(Stop::Truncated("SET"))),
                    "cut {cut}: {got:?}"
                );
            }
        });
    }
}
