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
