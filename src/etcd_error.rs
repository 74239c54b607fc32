//! Turns etcd-client errors into statuses and messages that say what to check.

use std::time::Duration;

use etcd_client::Error as EtcdError;
use tonic::Code;

use crate::config::Config;
use crate::error::{Error, Status};

/// The operation that failed, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Connect,
    Register,
    Unregister,
    Lookup,
    Wait,
    Close,
    KeepAlive,
    PublishNixl,
    FetchNixl,
    UnpublishNixl,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Connect => "connect",
            Op::Register => "register",
            Op::Unregister => "unregister",
            Op::Lookup => "lookup",
            Op::Wait => "wait",
            Op::Close => "close",
            Op::KeepAlive => "lease keep-alive",
            Op::PublishNixl => "NIXL publish",
            Op::FetchNixl => "NIXL fetch",
            Op::UnpublishNixl => "NIXL unpublish",
        }
    }
}

/// The cause in one line: the gRPC message and the chain of sources under it
/// (for a refused connection: "tcp connect error: Connection refused (os error 111)").
pub fn cause(e: &EtcdError) -> String {
    let mut out = match e {
        EtcdError::GRpcStatus(s) => s.message().to_owned(),
        other => other.to_string(),
    };
    // etcd-client's error does not expose the status's sources: start there.
    let mut src = match e {
        EtcdError::GRpcStatus(s) => std::error::Error::source(s),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

/// etcd says the lease is gone (expired, revoked, or etcd was wiped).
pub fn is_lease_not_found(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => {
            s.code() == Code::NotFound && s.message().contains("lease not found")
        }
        EtcdError::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// A read at a revision etcd has already compacted away.
pub fn is_compacted(e: &EtcdError) -> bool {
    matches!(e, EtcdError::GRpcStatus(s)
        if s.code() == Code::OutOfRange && s.message().contains("compacted"))
}

/// A failure that another attempt may not see: the member the request went
/// to is down or restarting (connection refused or reset), or has no leader
/// right now (etcd answers `Unavailable`: "no leader", "leader changed").
pub fn is_transient(e: &EtcdError) -> bool {
    match e {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        EtcdError::GRpcStatus(s) => match s.code() {
            Code::Unavailable => true,
            // A connection that broke under the request ("connection reset",
            // "broken pipe") is reported with one of these codes and the
            // transport's error as its source; a status that etcd itself
            // sent has no source, and is not retried.
            Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted => {
                std::error::Error::source(s).is_some()
            }
            _ => false,
        },
        _ => false,
    }
}

/// The connection to the member could not be opened: the request was never
/// sent.
fn is_refused(e: &EtcdError) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        EtcdError::GRpcStatus(s) => std::error::Error::source(s),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        src = s.source();
    }
    false
}

/// Runs `attempt` until it succeeds or fails for a reason other than
/// [`is_transient`], for at most `cfg.timeout` (then the last error is
/// returned; callers also bound the whole call with their own timeout).
///
/// Fault found by `tests/faults.rs`: the client's channel balances over every
/// endpoint and keeps a dead member in its set (each request sent there fails
/// at once with "connection refused"), so while one member of a 3-member
/// cluster was down about a third of the calls failed although the other
/// two served. Each attempt is balanced afresh, so another attempt usually
/// reaches a live member:
/// * a refused connection (nothing was sent) is tried again at once, up to
///   four times per endpoint, so a fully unreachable etcd still fails fast
///   with "Connection refused";
/// * other transient failures (no leader during an election, a connection
///   reset under the request) are tried again after a pause that starts at
///   2 ms and doubles up to 200 ms, until the budget is spent.
///
/// Every caller sends requests that are safe to send twice: reads, puts of
/// the same value under the same lease, deletes, lease grants (an extra
/// lease expires unused) and revokes.
pub async fn retry_transient<T, F, Fut>(cfg: &Config, mut attempt: F) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EtcdError>>,
{
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    let mut refusals_left = 4 * cfg.endpoints.len().max(1);
    let mut pause = Duration::from_millis(2);
    loop {
        let e = match attempt().await {
            Err(e) if is_transient(&e) => e,
            other => return other,
        };
        let wait = if is_refused(&e) && refusals_left > 1 {
            refusals_left -= 1;
            Duration::ZERO
        } else if is_refused(&e) {
            return Err(e);
        } else {
            let p = pause;
            pause = (pause * 2).min(Duration::from_millis(200));
            p
        };
        if tokio::time::Instant::now() + wait >= deadline {
            return Err(e);
        }
        log::debug!("etcd request failed ({}); retrying in {wait:?}", cause(&e));
        tokio::time::sleep(wait).await;
    }
}

pub fn map(e: EtcdError, op: Op, cfg: &Config) -> Error {
    log::trace!("etcd {} error: {e:?}", op.name());
    let endpoints = cfg.endpoints.join(",");
    let connection = |cause: String| {
        Error::new(
            Status::ErrConnection,
            format!(
                "ETCD connection failed: {cause}; check that etcd is running at {endpoints} \
                 (VLLM_NIXL_ETCD_ENDPOINTS)"
            ),
        )
    };
    match &e {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => connection(cause(&e)),
        EtcdError::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => {
                connection(cause(&e))
            }
            Code::DeadlineExceeded => timed_out(op, cfg.timeout, &endpoints),
            Code::ResourceExhausted => too_large(op, &cause(&e), cfg),
            Code::InvalidArgument if s.message().contains("too large") => {
                too_large(op, &cause(&e), cfg)
            }
            _ => Error::new(
                Status::ErrInternal,
                format!("etcd refused {}: {:?}: {}", op.name(), s.code(), cause(&e)),
            ),
        },
        EtcdError::InvalidUri(_) | EtcdError::InvalidArgs(_) | EtcdError::EndpointError(_) => {
            Error::invalid(format!(
                "bad etcd endpoint in {endpoints}: {}; check VLLM_NIXL_ETCD_ENDPOINTS",
                cause(&e)
            ))
        }
        _ => Error::new(
            Status::ErrConnection,
            format!("etcd {} failed: {}", op.name(), cause(&e)),
        ),
    }
}

fn too_large(op: Op, cause: &str, cfg: &Config) -> Error {
    Error::new(
        Status::ErrTooLarge,
        format!(
            "etcd refused the {} request as too large: {cause}; the client assumes a limit of \
             {} bytes (max_request_bytes), check etcd's --max-request-bytes",
            op.name(),
            cfg.max_request_bytes
        ),
    )
}

pub fn timed_out(op: Op, limit: Duration, endpoints: &str) -> Error {
    Error::new(
        Status::ErrTimeout,
        format!(
            "etcd did not complete {} within {:.1} s; check that etcd at {endpoints} is healthy \
             and not overloaded, or increase VLLM_NIXL_ETCD_TIMEOUT",
            op.name(),
            limit.as_secs_f64()
        ),
    )
}
