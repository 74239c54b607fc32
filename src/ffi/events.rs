//! Change events: subscriptions and the C callback they call.

use std::ffi::{c_char, c_void};

use super::boundary::{c_text, ffi_export};
use super::handles::nixl_etcd_client;
use super::status::nixl_etcd_status;
use crate::events::{Event, EventKind};

/// Kind of a change event (`nixl_etcd_event.kind`).
pub type nixl_etcd_event_kind = i32;
/// A rank appeared.
pub const NIXL_ETCD_EVENT_ADDED: nixl_etcd_event_kind = 1;
/// The same incarnation registered new metadata.
pub const NIXL_ETCD_EVENT_UPDATED: nixl_etcd_event_kind = 2;
/// The rank restarted (new incarnation): drop the old remote agent, then load
/// the new metadata.
pub const NIXL_ETCD_EVENT_REPLACED: nixl_etcd_event_kind = 3;
/// The rank is gone (unregistered, closed, or its lease expired).
pub const NIXL_ETCD_EVENT_REMOVED: nixl_etcd_event_kind = 4;

/// One change, valid only during the callback (copy what you keep).
#[repr(C)]
pub struct nixl_etcd_event {
    pub kind: nixl_etcd_event_kind,
    pub engine_id: *const c_char,
    pub rank: u32,
    /// The incarnation added, or the one removed.
    pub incarnation: *const c_char,
    pub host: *const c_char,
    /// NULL (and 0) for REMOVED.
    pub metadata: *const u8,
    pub metadata_len: usize,
    /// etcd revision of the change.
    pub revision: i64,
}

/// Receives change events; see `nixl_etcd_subscribe`.
pub type nixl_etcd_event_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, event: *const nixl_etcd_event)>;

/// The C callback and its user data, handed to the event thread.
struct CCallback {
    f: unsafe extern "C" fn(*mut c_void, *const nixl_etcd_event),
    user_data: *mut c_void,
}
// SAFETY: the subscriber promises that `user_data` may be used from the
// library's event thread (documented on `nixl_etcd_subscribe`).
unsafe impl Send for CCallback {}
// SAFETY: as for Send; the event thread calls it one event at a time.
unsafe impl Sync for CCallback {}

impl CCallback {
    fn call(&self, ev: &Event) {
        let engine_id = c_text(&ev.engine_id);
        let incarnation = c_text(&ev.incarnation);
        let host = c_text(&ev.host);
        let kind = match ev.kind {
            EventKind::Added => NIXL_ETCD_EVENT_ADDED,
            EventKind::Updated => NIXL_ETCD_EVENT_UPDATED,
            EventKind::Replaced => NIXL_ETCD_EVENT_REPLACED,
            EventKind::Removed => NIXL_ETCD_EVENT_REMOVED,
        };
        let c_event = nixl_etcd_event {
            kind,
            engine_id: engine_id.as_ptr(),
            rank: ev.rank,
            incarnation: incarnation.as_ptr(),
            host: host.as_ptr(),
            metadata: if ev.metadata.is_empty() {
                std::ptr::null()
            } else {
                ev.metadata.as_ptr()
            },
            metadata_len: ev.metadata.len(),
            revision: ev.revision,
        };
        // SAFETY: a valid function pointer from the subscriber; the event and
        // its strings live until it returns.
        unsafe { (self.f)(self.user_data, &c_event) };
    }
}

/// Calls `callback(user_data, event)` for every change to the records of
/// `engine_id` (NULL: every engine in the namespace): first ADDED for each
/// record present now, then each change as etcd reports it. Kinds: ADDED,
/// UPDATED (same incarnation), REPLACED (a restart: drop the old remote
/// agent), REMOVED.
///
/// Callbacks run on this client's event thread ("nixl-etcd-events"), one at a
/// time; events for one key arrive in order. They must not block: while one
/// runs, no other event of this client is delivered. They may call back into
/// the library (lookups, register, even unsubscribe or close of this client);
/// a `nixl_etcd_wait` in a callback delays every later event of this client.
/// The event and its pointers are valid only during the call.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `callback` is a valid function;
/// `user_data` stays valid, and usable from another thread, until
/// `nixl_etcd_unsubscribe` or `nixl_etcd_close` returns.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_subscribe(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    callback: nixl_etcd_event_callback,
    user_data: *mut c_void,
    subscription_id: *mut u64,
) -> nixl_etcd_status {
    ffi_export!(
        id_out = out(subscription_id),
        f = func(callback),
        client = handle(c),
        engine = opt_text(engine_id);
    {
        let cb = CCallback { f, user_data };
        *id_out = client.subscribe(engine, Box::new(move |ev| cb.call(ev)))?;
        Ok(())
    })
}

/// Ends a subscription. Once this returns, its callback is not running and is
/// never called again (when called from that very callback, the callback
/// finishes normally). `NOT_FOUND` for an unknown id.
///
/// # Safety
/// `c` is NULL or a handle from `nixl_etcd_open`.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_unsubscribe(
    c: *mut nixl_etcd_client,
    subscription_id: u64,
) -> nixl_etcd_status {
    ffi_export!(client = handle(c); client.unsubscribe(subscription_id))
}
