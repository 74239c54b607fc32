//! The C ABI: thin wrappers over [`crate::Client`], each inside one panic
//! boundary. Handles are opaque tokens looked up in a registry, so a call on a
//! closed handle returns `CLOSED` instead of touching freed memory.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{Client, Found};
use crate::config::{self, Config};
use crate::error::{Error, Result, Status};

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

/// An open client. Opaque: only pointers to it are handed out.
pub struct nixl_etcd_client {
    _private: [u8; 0],
}

/// Bytes returned by the library; release with `nixl_etcd_buffer_free`.
/// `data` is NULL when `len` is 0.
#[repr(C)]
pub struct nixl_etcd_buffer {
    pub data: *mut u8,
    pub len: usize,
}

static CLIENTS: Mutex<Option<HashMap<usize, Arc<Client>>>> = Mutex::new(None);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(e: &Error) {
    // Messages never hold NUL; if one did, cut it there rather than fail.
    let msg = e.message.split('\0').next().unwrap_or_default();
    let c = CString::new(msg).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The panic boundary around every exported call that returns a status.
fn guard(f: impl FnOnce() -> Result<()>) -> nixl_etcd_status {
    let err = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return NIXL_ETCD_OK,
        Ok(Err(e)) => e,
        Err(p) => Error::internal(format!(
            "nixl-etcd caught a panic: {}; this is a bug, please report it",
            panic_message(&*p)
        )),
    };
    set_last_error(&err);
    err.status as i32
}

fn lookup_client(c: *mut nixl_etcd_client) -> Result<Arc<Client>> {
    if c.is_null() {
        return Err(Error::invalid(
            "client is NULL; open one with nixl_etcd_open",
        ));
    }
    let clients = CLIENTS.lock().unwrap_or_else(|e| e.into_inner());
    clients
        .as_ref()
        .and_then(|m| m.get(&(c as usize)).cloned())
        .ok_or_else(|| {
            Error::new(
                Status::ErrClosed,
                "this nixl-etcd client handle is closed or was never opened; open a new one \
                 with nixl_etcd_open",
            )
        })
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn str_arg<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|e| Error::invalid(format!("{name} is not valid UTF-8: {e}")))
}

/// # Safety
/// `data` is NULL or valid for `len` bytes.
unsafe fn bytes_arg<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8]> {
    match (data.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(Error::invalid(format!(
            "{name} is NULL but its length is {len}"
        ))),
        (false, _) if len > isize::MAX as usize => Err(Error::invalid(format!(
            "{name} length {len} is not a valid size"
        ))),
        (false, _) => Ok(std::slice::from_raw_parts(data, len)),
    }
}

fn out_buffer<'a>(out: *mut nixl_etcd_buffer) -> Result<&'a mut nixl_etcd_buffer> {
    // SAFETY: the caller passes NULL or a valid, writable buffer struct.
    let out = unsafe { out.as_mut() }.ok_or_else(|| Error::invalid("out buffer is NULL"))?;
    out.data = std::ptr::null_mut();
    out.len = 0;
    Ok(out)
}

fn fill(out: &mut nixl_etcd_buffer, found: Found) {
    if found.metadata.is_empty() {
        return;
    }
    let boxed = found.metadata.into_boxed_slice();
    out.len = boxed.len();
    out.data = Box::into_raw(boxed).cast::<u8>();
}

/// Opens a client. `options_json`: NULL or "" to configure from the environment
/// only, or a JSON object that overrides it key by key (`endpoints`,
/// `namespace`, `timeout_s`, `lease_ttl_s`, `host`, `max_request_bytes`).
/// Connects and grants the client's lease within the timeout, or fails with
/// `NIXL_ETCD_ERR_CONNECTION` ("ETCD connection failed: <cause>").
///
/// # Safety
/// `options_json` is NULL or a NUL-terminated string; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_open(
    options_json: *const c_char,
    out: *mut *mut nixl_etcd_client,
) -> nixl_etcd_status {
    guard(|| {
        let out = unsafe { out.as_mut() }.ok_or_else(|| Error::invalid("out is NULL"))?;
        *out = std::ptr::null_mut();
        crate::logging::init();
        let options = if options_json.is_null() {
            None
        } else {
            Some(unsafe { str_arg(options_json, "options_json") }?)
        };
        let client = Client::open(Config::load(options)?)?;
        let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) as usize;
        CLIENTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(handle, Arc::new(client));
        *out = handle as *mut nixl_etcd_client;
        Ok(())
    })
}

/// Closes a client: revokes its lease (everything it registered disappears at
/// once), wakes its blocked `nixl_etcd_wait` calls with `CLOSED`, stops its
/// background work and releases it. The handle is invalid afterwards; using
/// it returns `CLOSED`. NULL is a no-op. The client is released even when
/// revoking fails (then its records vanish when the lease expires).
///
/// # Safety
/// `c` is NULL or a handle from `nixl_etcd_open`.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_close(c: *mut nixl_etcd_client) -> nixl_etcd_status {
    guard(|| {
        if c.is_null() {
            return Ok(());
        }
        let client = CLIENTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|m| m.remove(&(c as usize)))
            .ok_or_else(|| {
                Error::new(
                    Status::ErrClosed,
                    "this nixl-etcd client handle is already closed",
                )
            })?;
        client.close()
    })
}

/// Publishes `metadata` (`len` bytes, may contain NUL bytes) for
/// (`engine_id`, `rank`) under the client's lease. Registering again replaces.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `metadata` is NULL (with `len` 0) or
/// valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_register(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    metadata: *const u8,
    len: usize,
) -> nixl_etcd_status {
    guard(|| {
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        let metadata = unsafe { bytes_arg(metadata, len, "metadata") }?;
        client.register(engine_id, rank, metadata)
    })
}

/// Removes a registration made by this client.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_unregister(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
) -> nixl_etcd_status {
    guard(|| {
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        client.unregister(engine_id, rank)
    })
}

/// Copies the metadata of (`engine_id`, `rank`) into `out` (free it with
/// `nixl_etcd_buffer_free`). `NOT_FOUND` at once when absent.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_lookup(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    out: *mut nixl_etcd_buffer,
) -> nixl_etcd_status {
    guard(|| {
        let out = out_buffer(out)?;
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        fill(out, client.lookup(engine_id, rank)?);
        Ok(())
    })
}

/// Like `nixl_etcd_lookup`, but waits until (`engine_id`, `rank`) is
/// registered, up to `timeout_ms` (< 0: `VLLM_NIXL_ETCD_TIMEOUT`). Returns as
/// soon as the record exists (a get, then a watch: no polling). `TIMEOUT` on
/// expiry, `CLOSED` if the client is closed meanwhile.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_wait(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    timeout_ms: i64,
    out: *mut nixl_etcd_buffer,
) -> nixl_etcd_status {
    guard(|| {
        let out = out_buffer(out)?;
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
        fill(out, client.wait(engine_id, rank, timeout)?);
        Ok(())
    })
}

/// Releases a buffer filled by the library and resets it to {NULL, 0}.
/// NULL, or a buffer already freed, is a no-op.
///
/// # Safety
/// `buf` is NULL or points to a buffer filled by this library (or zeroed).
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_buffer_free(buf: *mut nixl_etcd_buffer) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(buf) = (unsafe { buf.as_mut() }) else {
            return;
        };
        if !buf.data.is_null() && buf.len > 0 {
            let slice = std::ptr::slice_from_raw_parts_mut(buf.data, buf.len);
            drop(unsafe { Box::from_raw(slice) });
        }
        buf.data = std::ptr::null_mut();
        buf.len = 0;
    }));
}

/// The message of this thread's last failed call ("" if none). Valid until the
/// next failing call on this thread.
#[no_mangle]
pub extern "C" fn nixl_etcd_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// A static description of a status ("unknown status" for unknown numbers).
#[no_mangle]
pub extern "C" fn nixl_etcd_status_str(status: nixl_etcd_status) -> *const c_char {
    Status::from_i32(status)
        .map(|s| s.as_cstr().as_ptr())
        .unwrap_or(c"unknown status".as_ptr())
}

/// The library's version, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn nixl_etcd_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Whether `VLLM_NIXL_USE_ETCD` enables etcd coordination (1, true, yes, on).
#[no_mangle]
pub extern "C" fn nixl_etcd_enabled() -> bool {
    catch_unwind(|| config::etcd_enabled_from(std::env::var(config::ENV_USE_ETCD).ok().as_deref()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_constants_match_the_status_enum() {
        let pairs = [
            (NIXL_ETCD_OK, Status::Ok),
            (NIXL_ETCD_ERR_INVALID_ARGUMENT, Status::ErrInvalidArgument),
            (NIXL_ETCD_ERR_CONNECTION, Status::ErrConnection),
            (NIXL_ETCD_ERR_NOT_FOUND, Status::ErrNotFound),
            (NIXL_ETCD_ERR_TIMEOUT, Status::ErrTimeout),
            (NIXL_ETCD_ERR_TOO_LARGE, Status::ErrTooLarge),
            (NIXL_ETCD_ERR_CLOSED, Status::ErrClosed),
            (NIXL_ETCD_ERR_INTERNAL, Status::ErrInternal),
            (NIXL_ETCD_ERR_BAD_RECORD, Status::ErrBadRecord),
        ];
        for (c, s) in pairs {
            assert_eq!(c, s as i32);
        }
    }
}
