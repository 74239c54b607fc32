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
    // A certificate problem does not go away by asking again.
    if tls_failure(e).is_some() || tls_alert(e).is_some() || tls_eof(e) {
        return false;
    }
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

/// The errors in `e`'s chain (etcd-client's error does not expose a
/// status's sources: start there). An `io::Error` wrapping another error is
/// followed into it (its `source` skips the wrapped error itself).
fn chain(e: &EtcdError) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut src: Option<&(dyn std::error::Error + 'static)> = match e {
        EtcdError::GRpcStatus(s) => std::error::Error::source(s),
        other => std::error::Error::source(other),
    };
    while let Some(s) = src {
        out.push(s);
        if let Some(inner) = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            out.push(inner);
        }
        src = s.source();
    }
    out
}

/// The TLS check that failed, in words, if `e` is a TLS failure.
fn tls_failure(e: &EtcdError) -> Option<rustls::Error> {
    chain(e)
        .into_iter()
        .find_map(|s| s.downcast_ref::<rustls::Error>().cloned())
}

/// A TLS alert the server sent after the handshake (TLS 1.3 servers refuse
/// a client certificate then), reported only as text in an HTTP/2 error.
fn tls_alert(e: &EtcdError) -> Option<String> {
    let c = cause(e);
    let (_, rest) = c.split_once("received fatal alert: ")?;
    Some(
        rest.split(|ch: char| !ch.is_ascii_alphanumeric())
            .next()
            .unwrap_or("")
            .to_owned(),
    )
}

/// The server closed the connection during the TLS handshake: it does not
/// speak TLS.
fn tls_eof(e: &EtcdError) -> bool {
    cause(e).contains("tls handshake eof")
}

/// A message for a failed TLS handshake that says which check failed and
/// which setting to look at.
fn tls_message(err: &rustls::Error, cfg: &Config) -> String {
    use rustls::{AlertDescription as A, CertificateError as C};
    let endpoints = cfg.endpoints.join(",");
    let ca = match &cfg.ca_cert {
        Some(p) => format!("the CA in VLLM_NIXL_ETCD_CA_CERT={}", p.display()),
        None => "the system's CA roots (VLLM_NIXL_ETCD_CA_CERT is unset)".to_owned(),
    };
    let cert = match &cfg.cert {
        Some(p) => format!("the client certificate VLLM_NIXL_ETCD_CERT={}", p.display()),
        None => "no client certificate (VLLM_NIXL_ETCD_CERT and VLLM_NIXL_ETCD_KEY are unset)"
            .to_owned(),
    };
    let what = match err {
 rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => format!(
                "check failed: unknown CA: the server's certificate is not signed by {ca}; give the CA that signed etcd's --cert-file"
            ),
            C::Expired | C::ExpiredContext { .. } => {
                "check failed: expired: the server's certificate has expired; renew etcd's --cert-file"
                    .to_owned()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "check failed: not yet valid: the server's certificate is not valid yet; check the clocks of both machines"
                    .to_owned()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "check failed: name mismatch: the server's certificate is not valid for the host in {endpoints}; use a host name or address that the certificate lists (subjectAltName), or reissue it"
            ),
            C::Revoked => "check failed: the server's certificate is revoked".to_owned(),
            _ => format!("check failed: the server's certificate was refused (verified against {ca})"),
        },
 rustls::Error::AlertReceived(alert) => match alert {
            A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateExpired
            | A::CertificateUnknown | A::CertificateRevoked | A::UnsupportedCertificate
            | A::AccessDenied => format!(
                "the server refused the client certificate (TLS alert {alert:?}); etcd requires one signed by its --trusted-ca-file (--client-cert-auth), this client sent {cert}"
            ),
            _ => format!("the server ended the handshake (TLS alert {alert:?})"),
        },
 rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => format!(
            "the server at {endpoints} does not speak TLS; if etcd serves plaintext, use http:// endpoints"
        ),
        _ => "the TLS handshake failed".to_owned(),
    };
    format!("ETCD connection failed: TLS with {endpoints}: {what} [{err}]")
}

/// The message for etcd refusing the credentials or an operation, naming the
/// user and, where known, the key.
fn permission(e: &EtcdError, op: Op, cfg: &Config, key: Option<&str>) -> Option<Error> {
    let EtcdError::GRpcStatus(s) = e else {
        return None;
    };
    let msg = s.message();
    let user = match &cfg.username {
        Some(u) => format!("user \"{u}\""),
        None => "no user (VLLM_NIXL_ETCD_USERNAME is unset)".to_owned(),
    };
    let what = match key {
        Some(k) if k.ends_with('/') => format!("keys under {k}"),
        Some(k) => format!("key {k}"),
        None => format!("keys under {}/", cfg.namespace),
    };
    let text = if s.code() == Code::PermissionDenied || msg.contains("permission denied") {
        format!(
            "etcd denied {} of {what} to {user}: {msg}; check that the user's roles grant \
             readwrite on the prefix {}/ (etcdctl user get / role get), or use the namespace \
             the user is granted (VLLM_NIXL_ETCD_NAMESPACE)",
            op.name(),
            cfg.namespace
        )
    } else if msg.contains("authentication failed") {
        format!(
            "etcd refused the credentials of {user}: {msg}; check VLLM_NIXL_ETCD_USERNAME and \
             VLLM_NIXL_ETCD_PASSWORD (or VLLM_NIXL_ETCD_PASSWORD_FILE)"
        )
    } else if msg.contains("user name is empty") || msg.contains("user name not found") {
        format!(
            "etcd requires authentication and this client sent {user}: {msg}; set \
             VLLM_NIXL_ETCD_USERNAME and VLLM_NIXL_ETCD_PASSWORD (or VLLM_NIXL_ETCD_PASSWORD_FILE)"
        )
    } else if msg.contains("authentication is not enabled") {
        format!(
            "credentials were given ({user}) but etcd at {} does not have authentication \
             enabled: {msg}; unset VLLM_NIXL_ETCD_USERNAME or enable authentication in etcd",
            cfg.endpoints.join(",")
        )
    } else if s.code() == Code::Unauthenticated || msg.contains("invalid auth token") {
        format!(
            "etcd did not accept the authentication of {user} for {}: {msg}; check \
             VLLM_NIXL_ETCD_USERNAME and VLLM_NIXL_ETCD_PASSWORD (or \
             VLLM_NIXL_ETCD_PASSWORD_FILE)",
            op.name()
        )
    } else {
        return None;
    };
    Some(Error::new(Status::ErrPermission, text))
}

/// [`map`], naming `key` when etcd denies the operation on it.
pub fn map_key(e: EtcdError, op: Op, cfg: &Config, key: &str) -> Error {
    match permission(&e, op, cfg, Some(key)) {
        Some(err) => err,
        None => map(e, op, cfg),
    }
}

pub fn map(e: EtcdError, op: Op, cfg: &Config) -> Error {
    log::trace!("etcd {} error: {e:?}", op.name());
    if let Some(err) = permission(&e, op, cfg, None) {
        return err;
    }
    if let Some(tls) = tls_failure(&e) {
        return Error::new(Status::ErrConnection, tls_message(&tls, cfg));
    }
    let endpoints = cfg.endpoints.join(",");
    if let Some(alert) = tls_alert(&e) {
        let client_cert_alerts = [
            "BadCertificate",
            "CertificateRequired",
            "UnknownCA",
            "CertificateExpired",
            "CertificateUnknown",
            "CertificateRevoked",
            "UnsupportedCertificate",
            "AccessDenied",
        ];
        let what = if client_cert_alerts.contains(&alert.as_str()) {
            let cert = match &cfg.cert {
                Some(p) => format!("the client certificate VLLM_NIXL_ETCD_CERT={}", p.display()),
                None => "no client certificate (VLLM_NIXL_ETCD_CERT and VLLM_NIXL_ETCD_KEY are \
                         unset)"
                    .to_owned(),
            };
            format!(
                "the server refused the client certificate (TLS alert {alert}); etcd requires \
                 one signed by its --trusted-ca-file (--client-cert-auth), and this client sent \
                 {cert}"
            )
        } else {
            format!("the server ended the connection with TLS alert {alert}")
        };
        return Error::new(
            Status::ErrConnection,
            format!(
                "ETCD connection failed: TLS with {endpoints}: {what} [{}]",
                cause(&e)
            ),
        );
    }
    if tls_eof(&e) {
        return Error::new(
            Status::ErrConnection,
            format!(
                "ETCD connection failed: TLS with {endpoints}: the server closed the connection \
                 during the TLS handshake: it does not speak TLS; if etcd serves plaintext, use \
                 http:// endpoints [{}]",
                cause(&e)
            ),
        );
    }
    let connection = |cause: String| {
        // A TLS-only server drops a plaintext client's first bytes.
        let hint = if !cfg.uses_tls()
            && ["broken pipe", "connection reset", "connection closed"]
                .iter()
                .any(|w| cause.to_ascii_lowercase().contains(w))
        {
            "; if etcd serves TLS, use https:// endpoints (and VLLM_NIXL_ETCD_CA_CERT)"
        } else {
            ""
        };
        Error::new(
            Status::ErrConnection,
            format!(
                "ETCD connection failed: {cause}; check that etcd is running at {endpoints} \
                 (VLLM_NIXL_ETCD_ENDPOINTS){hint}"
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
