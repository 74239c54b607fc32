//! NIXL: its own key layout (publish, fetch, unpublish), and with the
//! `nixl` feature a NIXL agent's metadata published and loaded directly.

use std::ffi::c_char;
#[cfg(feature = "nixl")]
use std::ffi::c_void;

#[cfg(feature = "nixl")]
use super::boundary::c_text;
use super::boundary::ffi_export;
use super::handles::nixl_etcd_client;
use super::records::{fill_bytes, nixl_etcd_buffer};
use super::status::nixl_etcd_status;

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
    ffi_export!(
        client = handle(c),
        agent_name = text(agent_name),
        label = opt_text(label),
        blob = bytes(blob, len);
        client.publish_nixl(agent_name, label, blob)
    )
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
    ffi_export!(
        out = buffer(out),
        client = handle(c),
        agent_name = text(agent_name),
        label = opt_text(label),
        timeout = timeout(timeout_ms);
    {
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
    ffi_export!(client = handle(c), agent_name = text(agent_name);
        client.unpublish_nixl(agent_name)
    )
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
    ffi_export!(client = handle(c), engine_id = text(engine_id), agent = nonnull(agent);
        // SAFETY: a live NIXL agent not used concurrently (the caller's
        // contract), not NULL.
        unsafe { client.publish_raw_agent(engine_id, rank, agent.cast()) }
    )
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
    ffi_export!(
        out = out(remote_agent),
        client = handle(c),
        engine_id = text(engine_id),
        agent = nonnull(agent),
        timeout = timeout(timeout_ms);
    {
        // SAFETY: a live NIXL agent not used concurrently (the caller's
        // contract), not NULL.
        let name =
            unsafe { client.load_remote_into_raw_agent(agent.cast(), engine_id, rank, timeout) }?;
        *out = c_text(&name).into_raw();
        Ok(())
    })
}
