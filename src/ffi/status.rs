//! Statuses, and the calls that need no client: the last error, status
//! and version strings, whether etcd coordination is enabled, the TP mapping.

use std::ffi::c_char;

use super::boundary::{self, ffi_export};
use crate::config;
use crate::error::{Error, Status};

/// Result of every call: `NIXL_ETCD_OK` (0) or a negative `NIXL_ETCD_ERR_*`.
/// The numbers are stable (checked against [`Status`] by a test).
pub type nixl_etcd_status = i32;

pub const NIXL_ETCD_OK: nixl_etcd_status = 0;
/// NULL pointer, bad UTF-8, invalid engine id, option or environment value.
pub const NIXL_ETCD_ERR_INVALID_ARGUMENT: nixl_etcd_status = -1;
/// etcd unreachable.
pub const NIXL_ETCD_ERR_CONNECTION: nixl_etcd_status = -2;
/// No record for this engine and rank.
pub const NIXL_ETCD_ERR_NOT_FOUND: nixl_etcd_status = -3;
/// The call did not finish in time.
pub const NIXL_ETCD_ERR_TIMEOUT: nixl_etcd_status = -4;
/// Metadata larger than what can be stored; nothing was written.
pub const NIXL_ETCD_ERR_TOO_LARGE: nixl_etcd_status = -5;
/// The client is closed (or was opened by the parent of a forked process).
pub const NIXL_ETCD_ERR_CLOSED: nixl_etcd_status = -6;
/// A bug: a caught panic or an unexpected state.
pub const NIXL_ETCD_ERR_INTERNAL: nixl_etcd_status = -7;
/// A record in etcd could not be read (bad JSON, unknown format, wrong engine).
pub const NIXL_ETCD_ERR_BAD_RECORD: nixl_etcd_status = -8;
/// A NIXL call failed, or NIXL could not be loaded (builds with NIXL support).
pub const NIXL_ETCD_ERR_NIXL: nixl_etcd_status = -9;
/// etcd refused the user name or password, or the user's roles do not allow
/// the operation on the key (the message names the user and the key).
pub const NIXL_ETCD_ERR_PERMISSION: nixl_etcd_status = -10;
/// Records are signed (`VLLM_NIXL_ETCD_HMAC_KEY_FILE`) and a record in etcd
/// has no signature or a wrong one: it is never handed out (the message
/// names the key and the reason).
pub const NIXL_ETCD_ERR_BAD_SIGNATURE: nixl_etcd_status = -11;

/// The remote ranks that local rank `local_rank` of a `local_tp`-way engine
/// reads from when the remote engine is `remote_tp`-way (vLLM's mapping):
/// with local_tp >= remote_tp, the one rank local_rank / (local_tp /
/// remote_tp); else the k = remote_tp / local_tp ranks local_rank*k ..
/// local_rank*k+k-1. Writes them to `out` (room for `cap`) and their count to
/// `*n`. `INVALID_ARGUMENT` when the sizes do not divide, the rank is out of
/// range, or `cap` is too small (then `*n` still says how many are needed).
///
/// # Safety
/// `out` is NULL (with `cap` 0) or valid for `cap` elements; `n` is writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_target_ranks(
    local_tp: u32,
    local_rank: u32,
    remote_tp: u32,
    out: *mut u32,
    cap: usize,
    n: *mut usize,
) -> nixl_etcd_status {
    ffi_export!(n = out(n);
    {
        let ranks = crate::tp::target_ranks(local_tp, local_rank, remote_tp)?;
        *n = ranks.len();
        if ranks.len() > cap {
            return Err(Error::invalid(format!(
                "out has room for {cap} rank(s), {} are needed",
                ranks.len()
            )));
        }
        if out.is_null() {
            return Err(Error::invalid("out is NULL"));
        }
        // SAFETY: `out` is not NULL and valid for `cap` >= ranks.len()
        // elements (the caller's contract).
        let dst = unsafe { std::slice::from_raw_parts_mut(out, ranks.len()) };
        dst.copy_from_slice(&ranks);
        Ok(())
    })
}

/// The message of this thread's last failed call ("" if none). Valid until the
/// next failing call on this thread.
#[no_mangle]
pub extern "C" fn nixl_etcd_last_error() -> *const c_char {
    boundary::last_error()
}

/// A static description of a status ("unknown status" for unknown numbers).
#[no_mangle]
pub extern "C" fn nixl_etcd_status_str(status: nixl_etcd_status) -> *const c_char {
    Status::from_i32(status)
        .map(|s| s.as_cstr().as_ptr())
        .unwrap_or(c"unknown status".as_ptr())
}

/// The library's version, e.g. "0.2.0".
#[no_mangle]
pub extern "C" fn nixl_etcd_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Whether `VLLM_NIXL_USE_ETCD` enables etcd coordination (1, true, yes, on).
#[no_mangle]
pub extern "C" fn nixl_etcd_enabled() -> bool {
    std::panic::catch_unwind(|| {
        config::etcd_enabled_from(std::env::var(config::ENV_USE_ETCD).ok().as_deref())
    })
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C constants are literals (cbindgen reads them); each must be
    /// its status's number. The header as a whole is checked against
    /// `Status::ALL` by `tests/integration/single_source.rs`.
    #[test]
    fn c_constants_match_the_status_enum() {
        let consts = [
            NIXL_ETCD_OK,
            NIXL_ETCD_ERR_INVALID_ARGUMENT,
            NIXL_ETCD_ERR_CONNECTION,
            NIXL_ETCD_ERR_NOT_FOUND,
            NIXL_ETCD_ERR_TIMEOUT,
            NIXL_ETCD_ERR_TOO_LARGE,
            NIXL_ETCD_ERR_CLOSED,
            NIXL_ETCD_ERR_INTERNAL,
            NIXL_ETCD_ERR_BAD_RECORD,
            NIXL_ETCD_ERR_NIXL,
            NIXL_ETCD_ERR_PERMISSION,
            NIXL_ETCD_ERR_BAD_SIGNATURE,
        ];
        let numbers: Vec<i32> = Status::ALL.iter().map(|s| *s as i32).collect();
        assert_eq!(consts.to_vec(), numbers);
    }
}
