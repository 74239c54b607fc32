//! Exit statuses and one-line errors (cause, then what to check).

use nixl_etcd::{Error, Status};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_NOT_FOUND: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;
pub const EXIT_UNREACHABLE: i32 = 5;
pub const EXIT_DEGRADED: i32 = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }

    pub fn io(what: &str, e: std::io::Error) -> CliError {
        CliError::new(EXIT_FAILURE, format!("{what}: {e}"))
    }
}

/// The exit status for a library status.
pub fn code_of(status: Status) -> i32 {
    match status {
        Status::Ok => EXIT_OK,
        Status::ErrInvalidArgument => EXIT_USAGE,
        Status::ErrConnection => EXIT_UNREACHABLE,
        Status::ErrNotFound => EXIT_NOT_FOUND,
        Status::ErrTimeout => EXIT_TIMEOUT,
        _ => EXIT_FAILURE,
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> CliError {
        CliError::new(code_of(e.status), e.message)
    }
}

/// The cause of an etcd-client error in one line: the gRPC message and the
/// chain of sources under it ("tcp connect error: Connection refused").
pub fn etcd_cause(e: &etcd_client::Error) -> String {
    nixl_etcd::etcd_cause(e).replace('\n', " ")
}

/// Whether another attempt may succeed (a member down, no leader for now).
pub fn is_transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
        ),
        _ => false,
    }
}

/// An error of a direct etcd request, worded as the library words its own.
pub fn etcd_error(e: &etcd_client::Error, what: &str, endpoints: &str) -> CliError {
    if is_transient(e) {
        CliError::new(
            EXIT_UNREACHABLE,
            format!(
                "ETCD connection failed: {}; check that etcd is running at {endpoints} \
                 (VLLM_NIXL_ETCD_ENDPOINTS)",
                etcd_cause(e)
            ),
        )
    } else {
        CliError::new(
            EXIT_FAILURE,
            format!(
                "etcd refused {what}: {}; check that etcd at {endpoints} is healthy",
                etcd_cause(e)
            ),
        )
    }
}

pub fn timed_out(what: &str, limit: std::time::Duration, endpoints: &str) -> CliError {
    CliError::new(
        EXIT_TIMEOUT,
        format!(
            "etcd did not complete {what} within {:.1} s; check that etcd at {endpoints} is \
             healthy and not overloaded, or increase VLLM_NIXL_ETCD_TIMEOUT",
            limit.as_secs_f64()
        ),
    )
}
