//! Client handles: opaque tokens looked up in a table, so a call on a closed
//! handle returns `CLOSED` instead of touching freed memory.

use std::collections::HashMap;
use std::ffi::c_char;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use super::boundary::ffi_export;
use super::status::nixl_etcd_status;
use crate::client::{Client, LeaseCondition};
use crate::config::Config;
use crate::error::{Error, Result, Status};
use crate::runtime;

/// An open client. Opaque: only pointers to it are handed out.
pub struct nixl_etcd_client {
    _private: [u8; 0],
}

type Table = Option<HashMap<usize, Arc<Client>>>;

/// The open handles. Also held across `fork` (see [`table`]).
static CLIENTS: Mutex<Table> = Mutex::new(None);
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// The handle table, locked. Its lock is registered with the runtime to be
/// held across `fork` (a child must not inherit it locked).
fn table() -> MutexGuard<'static, Table> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| runtime::hold_across_fork(hold_table));
    CLIENTS.lock().unwrap_or_else(|e| e.into_inner())
}

fn hold_table() -> Box<dyn std::any::Any> {
    Box::new(CLIENTS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The client behind a handle.
pub(crate) fn lookup(c: *mut nixl_etcd_client) -> Result<Arc<Client>> {
    if c.is_null() {
        return Err(Error::invalid(
            "client is NULL; open one with nixl_etcd_open",
        ));
    }
    table()
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

/// Opens a client. `options_json`: NULL or "" to configure from the environment
/// only, or a JSON object that overrides it key by key. The option keys are
/// `endpoints`, `namespace`, `timeout_s`, `lease_ttl_s`, `host`,
/// `max_request_bytes`, `max_metadata_bytes`, `world_size`, `nixl_namespace`,
/// `ca_cert`, `cert`, `key`, `username`, `password`, `password_file`,
/// `hmac_key_file`, `hmac_previous_key_file`, `cache_idle_s`. An unknown key or
/// a wrong type is `NIXL_ETCD_ERR_INVALID_ARGUMENT` naming the key.
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
    ffi_export!(out = out(out), options = opt_text(options_json);
    {
        crate::logging::init();
        let client = Client::open(Config::load(options)?)?;
        let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed) as usize;
        table()
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
    ffi_export!(;
    {
        if c.is_null() {
            return Ok(());
        }
        let client = table()
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

/// The lease is renewed within its TTL.
pub const NIXL_ETCD_LEASE_KEPT: u32 = 0;
/// Renewals fail or answer late; the lease holds until its TTL runs out.
pub const NIXL_ETCD_LEASE_RENEWING: u32 = 1;
/// The TTL ran out (or etcd forgot the lease): the client's records are gone
/// until the re-grant, in progress, puts them back.
pub const NIXL_ETCD_LEASE_LOST: u32 = 2;

/// Where the client's lease stands: `*condition` one of
/// `NIXL_ETCD_LEASE_KEPT`, `_RENEWING`, `_LOST`; `*since_ms` when it came to
/// that condition (milliseconds since the Unix epoch); `*regrants` how many
/// times the lease was lost and granted again (its records re-registered).
/// Each output may be NULL. No etcd call: for health checks.
///
/// # Safety
/// Each output is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_lease_health(
    c: *mut nixl_etcd_client,
    condition: *mut u32,
    since_ms: *mut u64,
    regrants: *mut u64,
) -> nixl_etcd_status {
    ffi_export!(
        condition = opt_out(condition),
        since_ms = opt_out(since_ms),
        regrants = opt_out(regrants),
        client = handle(c);
    {
        let h = client.lease_health();
        if let Some(out) = condition {
            *out = match h.condition {
                LeaseCondition::Kept => NIXL_ETCD_LEASE_KEPT,
                LeaseCondition::Renewing => NIXL_ETCD_LEASE_RENEWING,
                LeaseCondition::Lost => NIXL_ETCD_LEASE_LOST,
            };
        }
        if let Some(out) = since_ms {
            *out = h
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
        }
        if let Some(out) = regrants {
            *out = h.regrants;
        }
        Ok(())
    })
}
