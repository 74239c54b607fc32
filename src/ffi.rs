//! The C ABI: thin wrappers over [`crate::Client`], each inside one panic
//! boundary. Handles are opaque tokens looked up in a registry, so a call on a
//! closed handle returns `CLOSED` instead of touching freed memory.

#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{Client, Found};
use crate::config::{self, Config};
use crate::error::{Error, Result, Status};
use crate::events::{Event, EventKind};

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

/// A rank's whole record; release with `nixl_etcd_record_free`.
#[repr(C)]
pub struct nixl_etcd_record {
    pub engine_id: *mut c_char,
    pub rank: u32,
    /// The engine's declared number of ranks; 0 when not declared.
    pub world_size: u32,
    /// `VLLM_NIXL_SIDE_CHANNEL_HOST` of the registrant, else its host name.
    pub host: *mut c_char,
    pub pid: u32,
    /// Unique per registering client: a new value means the rank restarted.
    pub incarnation: *mut c_char,
    /// Registration time, milliseconds since the Unix epoch.
    pub registered_at_ms: u64,
    /// etcd's mod_revision of the record.
    pub revision: i64,
    pub metadata: nixl_etcd_buffer,
}

/// The open handles. Also taken across `fork` (see `runtime::guard_fork`).
pub(crate) static CLIENTS: Mutex<Option<HashMap<usize, Arc<Client>>>> = Mutex::new(None);
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

/// A C timeout: < 0 means "the client's configured timeout".
fn timeout_arg(timeout_ms: i64) -> Option<Duration> {
    u64::try_from(timeout_ms).ok().map(Duration::from_millis)
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
    fill_bytes(out, &found.metadata);
}

fn fill_bytes(out: &mut nixl_etcd_buffer, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let boxed: Box<[u8]> = Box::from(bytes);
    out.len = boxed.len();
    out.data = Box::into_raw(boxed).cast::<u8>();
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn opt_str_arg<'a>(p: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    str_arg(p, name).map(Some)
}

/// Opens a client. `options_json`: NULL or "" to configure from the environment
/// only, or a JSON object that overrides it key by key. The option keys are
/// `endpoints`, `namespace`, `timeout_s`, `lease_ttl_s`, `host`,
/// `max_request_bytes`, `max_metadata_bytes`, `world_size`, `nixl_namespace`,
/// `ca_cert`, `cert`, `key`, `username`, `password`, `password_file`,
/// `hmac_key_file`, `hmac_previous_key_file`. An unknown key or a wrong type
/// is `NIXL_ETCD_ERR_INVALID_ARGUMENT` naming the key.
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
    // Subscription callbacks may close their own client: that is allowed.
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
/// Metadata up to `max_metadata_bytes` (default 64 MiB) is accepted; above
/// what fits in one etcd request (`max_request_bytes`) it is stored in chunks
/// beside the record, and readers get it whole or not at all. Over the
/// maximum: `NIXL_ETCD_ERR_TOO_LARGE`, nothing written.
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
        let timeout = timeout_arg(timeout_ms);
        fill(out, client.wait(engine_id, rank, timeout)?);
        Ok(())
    })
}

/// Publishes `blob` (`len` bytes, opaque, may contain NUL bytes) in the key
/// layout of NIXL's built-in etcd exchange, so that peers still using it find
/// the agent unchanged: the marker `{ns}/{agent_name}/` (empty) and
/// `{ns}/{agent_name}/{label}` (the raw blob, not encoded), written in one
/// etcd transaction and both under the client's lease. `ns` is the open
/// option `nixl_namespace`, else `NIXL_ETCD_NAMESPACE`, else "/nixl/agents/",
/// used verbatim (the default gives "/nixl/agents//A/metadata"). `label` NULL
/// or "" means "metadata". A blob that does not fit in one etcd request is
/// `TOO_LARGE` and nothing is written. Publishing again replaces.
///
/// # Safety
/// `agent_name` is NULL or NUL-terminated; `label` is NULL or NUL-terminated;
/// `blob` is NULL (with `len` 0) or valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_publish_nixl(
    c: *mut nixl_etcd_client,
    agent_name: *const c_char,
    label: *const c_char,
    blob: *const u8,
    len: usize,
) -> nixl_etcd_status {
    guard(|| {
        let client = lookup_client(c)?;
        let agent_name = unsafe { str_arg(agent_name, "agent_name") }?;
        let label = unsafe { opt_str_arg(label, "label") }?;
        let blob = unsafe { bytes_arg(blob, len, "blob") }?;
        client.publish_nixl(agent_name, label, blob)
    })
}

/// Copies the raw blob at `{ns}/{agent_name}/{label}` into `out` (free it
/// with `nixl_etcd_buffer_free`), waiting up to `timeout_ms` (< 0:
/// `VLLM_NIXL_ETCD_TIMEOUT`; 0: no wait, one read) for it to exist: a get,
/// then a watch on that exact key (no polling). Reads whatever wrote the key: this library or
/// NIXL's built-in exchange. `label` NULL or "" means "metadata". `TIMEOUT`
/// on expiry, `CLOSED` if the client is closed meanwhile.
///
/// # Safety
/// `agent_name` is NULL or NUL-terminated; `label` is NULL or NUL-terminated;
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_fetch_nixl(
    c: *mut nixl_etcd_client,
    agent_name: *const c_char,
    label: *const c_char,
    timeout_ms: i64,
    out: *mut nixl_etcd_buffer,
) -> nixl_etcd_status {
    guard(|| {
        let out = out_buffer(out)?;
        let client = lookup_client(c)?;
        let agent_name = unsafe { str_arg(agent_name, "agent_name") }?;
        let label = unsafe { opt_str_arg(label, "label") }?;
        let timeout = timeout_arg(timeout_ms);
        fill_bytes(out, &client.fetch_nixl(agent_name, label, timeout)?);
        Ok(())
    })
}

/// Deletes everything under `{ns}/{agent_name}/` (the marker and every
/// label, in one etcd request), as NIXL's invalidate does: peers of NIXL's
/// built-in exchange, which watch the marker, drop the agent. `NOT_FOUND` if
/// this client did not publish the agent.
///
/// # Safety
/// `agent_name` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_unpublish_nixl(
    c: *mut nixl_etcd_client,
    agent_name: *const c_char,
) -> nixl_etcd_status {
    guard(|| {
        let client = lookup_client(c)?;
        let agent_name = unsafe { str_arg(agent_name, "agent_name") }?;
        client.unpublish_nixl(agent_name)
    })
}

/// A C string from library-made text (ids, hosts): cut at a NUL if any.
fn c_text(s: &str) -> CString {
    CString::new(s.split('\0').next().unwrap_or_default()).unwrap_or_default()
}

/// Copies the record of (`engine_id`, `rank`) with all its fields into `out`
/// (release with `nixl_etcd_record_free`). Served from the cache when it holds
/// the record, like `nixl_etcd_lookup`; `NOT_FOUND` at once when absent.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_lookup_record(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    out: *mut nixl_etcd_record,
) -> nixl_etcd_status {
    guard(|| {
        let out = unsafe { out.as_mut() }.ok_or_else(|| Error::invalid("out record is NULL"))?;
        *out = nixl_etcd_record {
            engine_id: std::ptr::null_mut(),
            rank: 0,
            world_size: 0,
            host: std::ptr::null_mut(),
            pid: 0,
            incarnation: std::ptr::null_mut(),
            registered_at_ms: 0,
            revision: 0,
            metadata: nixl_etcd_buffer {
                data: std::ptr::null_mut(),
                len: 0,
            },
        };
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        let found = client.lookup(engine_id, rank)?;
        let rec = found.record.clone();
        out.engine_id = c_text(&rec.engine_id).into_raw();
        out.rank = rec.rank;
        out.world_size = rec.world_size.unwrap_or(0);
        out.host = c_text(&rec.host).into_raw();
        out.pid = rec.pid;
        out.incarnation = c_text(&rec.incarnation).into_raw();
        out.registered_at_ms = rec.registered_at_ms;
        out.revision = found.revision;
        fill(&mut out.metadata, found);
        Ok(())
    })
}

/// Releases what `nixl_etcd_lookup_record` filled and zeroes it. NULL, or a
/// record already freed, is a no-op.
///
/// # Safety
/// `rec` is NULL or a record filled by this library (or zeroed).
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_record_free(rec: *mut nixl_etcd_record) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(rec) = (unsafe { rec.as_mut() }) else {
            return;
        };
        for p in [&mut rec.engine_id, &mut rec.host, &mut rec.incarnation] {
            if !p.is_null() {
                drop(unsafe { CString::from_raw(*p) });
                *p = std::ptr::null_mut();
            }
        }
        unsafe { nixl_etcd_buffer_free(&mut rec.metadata) };
    }));
}

/// The C callback and its user data, handed to the event thread.
struct CCallback {
    f: unsafe extern "C" fn(*mut c_void, *const nixl_etcd_event),
    user_data: *mut c_void,
}
// SAFETY: the subscriber promises that `user_data` may be used from the
// library's event thread (documented on `nixl_etcd_subscribe`).
unsafe impl Send for CCallback {}
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
    guard(|| {
        let id_out = unsafe { subscription_id.as_mut() }
            .ok_or_else(|| Error::invalid("subscription_id is NULL"))?;
        *id_out = 0;
        let f = callback.ok_or_else(|| Error::invalid("callback is NULL"))?;
        let client = lookup_client(c)?;
        let engine = if engine_id.is_null() {
            None
        } else {
            Some(unsafe { str_arg(engine_id, "engine_id") }?)
        };
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
    guard(|| lookup_client(c)?.unsubscribe(subscription_id))
}

/// Waits until every rank 0..world_size-1 of `engine_id` is registered, then
/// stores the engine's world size in `*world_size` (may be NULL; 0 on failure). The world
/// size comes from the records (the registrants' open option `world_size`).
/// `timeout_ms` < 0: `VLLM_NIXL_ETCD_TIMEOUT`. On expiry `TIMEOUT`, with the
/// missing ranks named in the message.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `world_size` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_wait_engine(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    timeout_ms: i64,
    world_size: *mut u32,
) -> nixl_etcd_status {
    guard(|| {
        // SAFETY: the caller passes NULL or a writable u32.
        let mut out = unsafe { world_size.as_mut() };
        if let Some(out) = out.as_deref_mut() {
            *out = 0;
        }
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        let timeout = timeout_arg(timeout_ms);
        let size = client.wait_engine(engine_id, timeout)?;
        if let Some(out) = out {
            *out = size;
        }
        Ok(())
    })
}

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
    guard(|| {
        let n = unsafe { n.as_mut() }.ok_or_else(|| Error::invalid("n is NULL"))?;
        *n = 0;
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
        let dst = unsafe { std::slice::from_raw_parts_mut(out, ranks.len()) };
        dst.copy_from_slice(&ranks);
        Ok(())
    })
}

/// Publishes the local metadata of a NIXL agent (a `nixl_capi_agent_t` from
/// NIXL's C API) for (`engine_id`, `rank`), like `nixl_etcd_register`.
/// `NIXL_ETCD_ERR_NIXL` if NIXL cannot be loaded or the agent's metadata
/// cannot be read. Only in builds with NIXL support (`NIXL_ETCD_WITH_NIXL`).
///
/// # Safety
/// `agent` is NULL or a live NIXL agent not used concurrently;
/// `engine_id` is NULL or NUL-terminated.
#[cfg(feature = "nixl")]
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_publish_agent(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    agent: *mut c_void,
) -> nixl_etcd_status {
    guard(|| {
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        if agent.is_null() {
            return Err(Error::invalid("agent is NULL"));
        }
        unsafe { client.publish_raw_agent(engine_id, rank, agent.cast()) }
    })
}

/// Waits for (`engine_id`, `rank`) like `nixl_etcd_wait`, loads its metadata
/// into the NIXL agent `agent`, and returns the remote agent's name in
/// `*remote_agent` (free with `nixl_etcd_string_free`). Only in builds with
/// NIXL support (`NIXL_ETCD_WITH_NIXL`).
///
/// # Safety
/// `agent` is NULL or a live NIXL agent not used concurrently; `engine_id`
/// is NULL or NUL-terminated; `remote_agent` is NULL or writable.
#[cfg(feature = "nixl")]
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_load_remote_agent(
    c: *mut nixl_etcd_client,
    agent: *mut c_void,
    engine_id: *const c_char,
    rank: u32,
    timeout_ms: i64,
    remote_agent: *mut *mut c_char,
) -> nixl_etcd_status {
    guard(|| {
        let out = unsafe { remote_agent.as_mut() }
            .ok_or_else(|| Error::invalid("remote_agent is NULL"))?;
        *out = std::ptr::null_mut();
        let client = lookup_client(c)?;
        let engine_id = unsafe { str_arg(engine_id, "engine_id") }?;
        if agent.is_null() {
            return Err(Error::invalid("agent is NULL"));
        }
        let timeout = timeout_arg(timeout_ms);
        let name =
            unsafe { client.load_remote_into_raw_agent(agent.cast(), engine_id, rank, timeout) }?;
        *out = c_text(&name).into_raw();
        Ok(())
    })
}

/// Frees a string returned by the library. NULL is a no-op.
///
/// # Safety
/// `s` is NULL or a string this library returned, freed once.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_string_free(s: *mut c_char) {
    if !s.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { CString::from_raw(s) })));
    }
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

/// Serves the NIXL TCPStore metadata store in this process, with etcd
/// behind it through this client's configuration: set
/// `NIXL_TCPSTORE_ENDPOINT=127.0.0.1:<port>` before creating NIXL agents and
/// they publish and fetch through etcd. `listen` is `HOST:PORT` (NULL or ""
/// means "127.0.0.1:0", any free port); the port bound is written to `port`.
/// Each writing process's keys are under a lease of its own. The store stops,
/// revoking those leases, when the client is closed.
///
/// # Safety
/// `listen` is NULL or NUL-terminated; `port` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_serve_nixl_store(
    c: *mut nixl_etcd_client,
    listen: *const c_char,
    port: *mut u16,
) -> nixl_etcd_status {
    guard(|| {
        let port = unsafe { port.as_mut() }.ok_or_else(|| Error::invalid("port is NULL"))?;
        *port = 0;
        let client = lookup_client(c)?;
        let listen = unsafe { opt_str_arg(listen, "listen") }?.unwrap_or("127.0.0.1:0");
        let store = crate::nixl_store::NixlStore::start(
            &client,
            listen,
            crate::nixl_store::StoreOptions::default(),
        )?;
        *port = store.local_addr().port();
        Ok(())
    })
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
