//! The log callback: the library's log lines routed to the host's logger.

use std::ffi::{c_char, c_void};

use super::boundary::{c_text, ffi_export};
use super::status::nixl_etcd_status;
use crate::logging;

/// Level of a log line (`nixl_etcd_log_callback`'s `level`).
pub type nixl_etcd_log_level = i32;
/// Something failed.
pub const NIXL_ETCD_LOG_ERROR: nixl_etcd_log_level = 1;
/// Something is wrong but the library carries on (e.g. etcd unreachable).
pub const NIXL_ETCD_LOG_WARNING: nixl_etcd_log_level = 2;
/// Registrations and other milestones (the default level).
pub const NIXL_ETCD_LOG_INFO: nixl_etcd_log_level = 3;
/// Every lookup and write (`VLLM_LOGGING_LEVEL=DEBUG`).
pub const NIXL_ETCD_LOG_DEBUG: nixl_etcd_log_level = 4;
/// Finer than DEBUG (`RUST_LOG=nixl_etcd=trace`).
pub const NIXL_ETCD_LOG_TRACE: nixl_etcd_log_level = 5;

/// Receives one log line: its level, its target (the library's module
/// that logged it, e.g. "nixl_etcd::client") and its message (the text
/// without the level prefix). Both strings are valid only during the call.
pub type nixl_etcd_log_callback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        level: nixl_etcd_log_level,
        target: *const c_char,
        message: *const c_char,
    ),
>;

/// The C log callback and its user data.
struct CLogCallback {
    f: unsafe extern "C" fn(*mut c_void, nixl_etcd_log_level, *const c_char, *const c_char),
    user_data: *mut c_void,
}
// SAFETY: the host promises that the callback and `user_data` may be used
// from any thread (documented on `nixl_etcd_set_log_callback`).
unsafe impl Send for CLogCallback {}
// SAFETY: as for Send: calls from several threads at once are allowed.
unsafe impl Sync for CLogCallback {}

impl CLogCallback {
    fn call(&self, level: log::Level, target: &str, message: &str) {
        let (target, message) = (c_text(target), c_text(message));
        let level = match level {
            log::Level::Error => NIXL_ETCD_LOG_ERROR,
            log::Level::Warn => NIXL_ETCD_LOG_WARNING,
            log::Level::Info => NIXL_ETCD_LOG_INFO,
            log::Level::Debug => NIXL_ETCD_LOG_DEBUG,
            log::Level::Trace => NIXL_ETCD_LOG_TRACE,
        };
        // SAFETY: a valid function pointer from the host; both strings live
        // until it returns.
        unsafe { (self.f)(self.user_data, level, target.as_ptr(), message.as_ptr()) };
    }
}

/// Sends the library's log lines to `callback(user_data, level, target,
/// message)` instead of stderr; NULL restores stderr. The level filter stays
/// the same (`VLLM_LOGGING_LEVEL`, else `RUST_LOG`, else INFO). The callback
/// runs on whatever thread logs, possibly on several threads at once, and
/// must not block for long; a line logged by a library call made from inside
/// the callback goes to stderr. Once this returns, the previous callback is
/// not running (except on this thread, when called from inside it) and is
/// never called again. In a Rust host that installed its own `log` logger,
/// lines keep going to that logger and the callback is not called.
///
/// # Safety
/// `callback` is NULL or a function that may be called from any thread;
/// `user_data` stays valid, and usable from any thread, until this is called
/// again and returns.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_set_log_callback(
    callback: nixl_etcd_log_callback,
    user_data: *mut c_void,
) -> nixl_etcd_status {
    ffi_export!(;
    {
        let sink = callback.map(|f| {
            let cb = CLogCallback { f, user_data };
            Box::new(move |level: log::Level, target: &str, message: &str| {
                cb.call(level, target, message)
            }) as logging::Sink
        });
        logging::set_sink(sink);
        Ok(())
    })
}
