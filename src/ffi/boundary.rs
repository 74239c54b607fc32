//! The one export macro, [`ffi_export!`], and what it expands to: the panic
//! boundary, the thread's last error, and the conversion of C arguments
//! (NULL checks, UTF-8, lengths, clearing of output parameters).

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use super::handles::{self, nixl_etcd_client};
use super::records::nixl_etcd_buffer;
use super::status::{nixl_etcd_status, NIXL_ETCD_OK};
use crate::client::Client;
use crate::error::{Error, Result};

/// The body of an export. Converts the listed arguments in order (each
/// `name = kind(c_arg, ...)`; a failure returns its status at once, with
/// the message naming the C argument), then runs `body` with the converted
/// values bound; all inside one panic boundary, so no panic reaches C. A
/// failing status leaves its message in `nixl_etcd_last_error`.
///
/// Kinds: `handle(c)` an open client; `text(p)` a required UTF-8 string;
/// `opt_text(p)` NULL or a string; `bytes(p, len)`; `buffer(out)` and
/// `record(out)` output structs, cleared; `out(p)` a required output,
/// cleared; `opt_out(p)` NULL or an output, cleared; `func(f)` a required
/// callback; `nonnull(p)` a required opaque pointer; `timeout(ms)` (< 0: the
/// configured timeout).
///
/// `ffi_export!(void; body)`: the boundary alone, for the `*_free` calls.
macro_rules! ffi_export {
    (@handle $c:ident) => { $crate::ffi::boundary::handle($c) };
    (@text $p:ident) => {
        // SAFETY: the export's contract (its `# Safety` section): `$p` is
        // NULL or a NUL-terminated string valid for the call.
        unsafe { $crate::ffi::boundary::text($p, stringify!($p)) }
    };
    (@opt_text $p:ident) => {
        // SAFETY: as for `text`.
        unsafe { $crate::ffi::boundary::opt_text($p, stringify!($p)) }
    };
    (@bytes $p:ident, $len:expr) => {
        // SAFETY: the export's contract: `$p` is NULL (with a length of 0)
        // or valid for that many bytes during the call.
        unsafe { $crate::ffi::boundary::bytes($p, $len, stringify!($p)) }
    };
    (@buffer $p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or writable.
        unsafe { $crate::ffi::boundary::buffer($p, stringify!($p)) }
    };
    (@record $p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or writable.
        unsafe { $crate::ffi::boundary::record($p, stringify!($p)) }
    };
    (@out $p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or writable.
        unsafe { $crate::ffi::boundary::out($p, stringify!($p)) }
    };
    (@opt_out $p:ident) => {
        // SAFETY: the export's contract: `$p` is NULL or writable.
        Ok::<_, $crate::error::Error>(unsafe { $crate::ffi::boundary::opt_out($p) })
    };
    (@func $f:ident) => {
        $f.ok_or_else(|| $crate::error::Error::invalid(concat!(stringify!($f), " is NULL")))
    };
    (@nonnull $p:ident) => {
        $crate::ffi::boundary::nonnull($p, stringify!($p))
    };
    (@timeout $ms:ident) => {
        Ok::<_, $crate::error::Error>($crate::ffi::boundary::timeout($ms))
    };
    (void; $body:expr) => {{
        let _ = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body));
    }};
    ($($var:ident = $kind:ident($arg:ident $(, $more:expr)*)),* ; $body:expr) => {
        $crate::ffi::boundary::guard(|| {
            $(let $var = ffi_export!(@$kind $arg $(, $more)*)?;)*
            $body
        })
    };
}
pub(crate) use ffi_export;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(e: &Error) {
    // Messages never hold NUL; if one did, cut it there rather than fail.
    let msg = e.message.split('\0').next().unwrap_or_default();
    let c = CString::new(msg).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

/// This thread's last failure message.
pub(super) fn last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The panic boundary around every exported call that returns a status.
pub(crate) fn guard(f: impl FnOnce() -> Result<()>) -> nixl_etcd_status {
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

pub(crate) fn handle(c: *mut nixl_etcd_client) -> Result<Arc<Client>> {
    handles::lookup(c)
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn text<'a>(p: *const c_char, name: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    // SAFETY: not NULL, and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Error::invalid(format!("{name} is not valid UTF-8: {e}")))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
pub(crate) unsafe fn opt_text<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { text(p, name) }.map(Some)
}

/// A C timeout: < 0 means "the client's configured timeout".
pub(crate) fn timeout(timeout_ms: i64) -> Option<Duration> {
    u64::try_from(timeout_ms).ok().map(Duration::from_millis)
}

/// # Safety
/// `data` is NULL or valid for `len` bytes during the call.
pub(crate) unsafe fn bytes<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8]> {
    match (data.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(Error::invalid(format!(
            "{name} is NULL but its length is {len}"
        ))),
        (false, _) if len > isize::MAX as usize => Err(Error::invalid(format!(
            "{name} length {len} is not a valid size"
        ))),
        // SAFETY: not NULL, valid for `len` bytes (caller's contract), and
        // `len` is a valid slice length.
        (false, _) => Ok(unsafe { std::slice::from_raw_parts(data, len) }),
    }
}

/// An output value, cleared on entry (see the header's conventions).
pub(crate) trait Cleared {
    const CLEARED: Self;
}
impl<T> Cleared for *mut T {
    const CLEARED: Self = std::ptr::null_mut();
}
impl Cleared for u16 {
    const CLEARED: Self = 0;
}
impl Cleared for u32 {
    const CLEARED: Self = 0;
}
impl Cleared for u64 {
    const CLEARED: Self = 0;
}
impl Cleared for usize {
    const CLEARED: Self = 0;
}
impl Cleared for nixl_etcd_buffer {
    const CLEARED: Self = nixl_etcd_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    };
}

/// # Safety
/// `p` is NULL or valid for writes during the call.
pub(crate) unsafe fn out<'a, T: Cleared>(p: *mut T, name: &str) -> Result<&'a mut T> {
    // SAFETY: NULL or valid for writes (caller's contract).
    let out = unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(format!("{name} is NULL")))?;
    *out = T::CLEARED;
    Ok(out)
}

/// # Safety
/// `p` is NULL or valid for writes during the call.
pub(crate) unsafe fn opt_out<'a, T: Cleared>(p: *mut T) -> Option<&'a mut T> {
    // SAFETY: NULL or valid for writes (caller's contract).
    let out = unsafe { p.as_mut() }?;
    *out = T::CLEARED;
    Some(out)
}

/// # Safety
/// `p` is NULL or valid for writes during the call.
pub(crate) unsafe fn buffer<'a>(
    p: *mut nixl_etcd_buffer,
    name: &str,
) -> Result<&'a mut nixl_etcd_buffer> {
    // SAFETY: the caller's contract, passed on.
    unsafe { out(p, &format!("{name} buffer")) }
}

/// # Safety
/// `p` is NULL or valid for writes during the call.
pub(crate) unsafe fn record<'a>(
    p: *mut super::records::nixl_etcd_record,
    name: &str,
) -> Result<&'a mut super::records::nixl_etcd_record> {
    // SAFETY: NULL or valid for writes (caller's contract).
    let out =
        unsafe { p.as_mut() }.ok_or_else(|| Error::invalid(format!("{name} record is NULL")))?;
    *out = super::records::nixl_etcd_record::CLEARED;
    Ok(out)
}

// Only the `nixl` feature's exports take an opaque pointer of the caller's.
#[cfg_attr(not(feature = "nixl"), allow(dead_code))]
pub(crate) fn nonnull<T>(p: *mut T, name: &str) -> Result<*mut T> {
    match p.is_null() {
        true => Err(Error::invalid(format!("{name} is NULL"))),
        false => Ok(p),
    }
}

/// A C string from library-made text (ids, hosts, log lines): cut at a NUL
/// if any.
pub(crate) fn c_text(s: &str) -> CString {
    CString::new(s.split('\0').next().unwrap_or_default()).unwrap_or_default()
}
