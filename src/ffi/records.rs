//! Rank records: register, unregister, lookup, wait, whole engines; and
//! the buffers and records the library hands out, with their frees.

use std::ffi::{c_char, CString};

use super::boundary::{c_text, ffi_export, Cleared};
use super::handles::nixl_etcd_client;
use super::status::nixl_etcd_status;
use crate::client::Found;

/// Bytes returned by the library; release with `nixl_etcd_buffer_free`.
/// `data` is NULL when `len` is 0.
#[repr(C)]
pub struct nixl_etcd_buffer {
    pub data: *mut u8,
    pub len: usize,
}

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

impl Cleared for nixl_etcd_record {
    const CLEARED: Self = nixl_etcd_record {
        engine_id: std::ptr::null_mut(),
        rank: 0,
        world_size: 0,
        host: std::ptr::null_mut(),
        pid: 0,
        incarnation: std::ptr::null_mut(),
        registered_at_ms: 0,
        revision: 0,
        metadata: nixl_etcd_buffer::CLEARED,
    };
}

/// Hands `bytes` to C in `out` (left as {NULL, 0} when empty).
pub(crate) fn fill_bytes(out: &mut nixl_etcd_buffer, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let boxed: Box<[u8]> = Box::from(bytes);
    out.len = boxed.len();
    out.data = Box::into_raw(boxed).cast::<u8>();
}

fn fill(out: &mut nixl_etcd_buffer, found: Found) {
    fill_bytes(out, &found.metadata);
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
    ffi_export!(
        client = handle(c),
        engine_id = text(engine_id),
        metadata = bytes(metadata, len);
        client.register(engine_id, rank, metadata)
    )
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
    ffi_export!(client = handle(c), engine_id = text(engine_id);
        client.unregister(engine_id, rank)
    )
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
    ffi_export!(out = buffer(out), client = handle(c), engine_id = text(engine_id);
    {
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
    ffi_export!(
        out = buffer(out),
        client = handle(c),
        engine_id = text(engine_id),
        timeout = timeout(timeout_ms);
    {
        fill(out, client.wait(engine_id, rank, timeout)?);
        Ok(())
    })
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
    ffi_export!(out = record(out), client = handle(c), engine_id = text(engine_id);
    {
        fill_record(out, client.lookup(engine_id, rank)?);
        Ok(())
    })
}

/// Like `nixl_etcd_lookup_record`, but read from etcd now, never from the
/// cache; `NOT_FOUND` ("Engine ... not found in ETCD") when the rank is gone.
/// Call it when a transfer to the rank failed: a different `incarnation`
/// than the one loaded means it restarted (invalidate the remote agent and
/// load the new metadata); the same one means its process is gone while its
/// lease runs out (drop it). The cache learns of either one event later.
/// Answered by the etcd member the client talks to without a round of
/// consensus (a serializable read), so it answers while etcd has no quorum.
///
/// # Safety
/// `engine_id` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_recheck(
    c: *mut nixl_etcd_client,
    engine_id: *const c_char,
    rank: u32,
    out: *mut nixl_etcd_record,
) -> nixl_etcd_status {
    ffi_export!(out = record(out), client = handle(c), engine_id = text(engine_id);
    {
        fill_record(out, client.recheck(engine_id, rank)?);
        Ok(())
    })
}

fn fill_record(out: &mut nixl_etcd_record, found: Found) {
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
    ffi_export!(
        out = opt_out(world_size),
        client = handle(c),
        engine_id = text(engine_id),
        timeout = timeout(timeout_ms);
    {
        let size = client.wait_engine(engine_id, timeout)?;
        if let Some(out) = out {
            *out = size;
        }
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
    ffi_export!(void; {
        // SAFETY: NULL or a record this library filled (or zeroed): the
        // caller's contract.
        let Some(rec) = (unsafe { rec.as_mut() }) else {
            return;
        };
        for p in [&mut rec.engine_id, &mut rec.host, &mut rec.incarnation] {
            if !p.is_null() {
                // SAFETY: made by `CString::into_raw` in `nixl_etcd_lookup_record`,
                // and reset to NULL here, so freed once.
                drop(unsafe { CString::from_raw(*p) });
                *p = std::ptr::null_mut();
            }
        }
        // SAFETY: the record's own buffer, filled by this library or empty.
        unsafe { nixl_etcd_buffer_free(&mut rec.metadata) };
    })
}

/// Frees a string returned by the library. NULL is a no-op.
///
/// # Safety
/// `s` is NULL or a string this library returned, freed once.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: a string made by `CString::into_raw` in this library, freed
        // once (the caller's contract).
        ffi_export!(void; drop(unsafe { CString::from_raw(s) }));
    }
}

/// Releases a buffer filled by the library and resets it to {NULL, 0}.
/// NULL, or a buffer already freed, is a no-op.
///
/// # Safety
/// `buf` is NULL or points to a buffer filled by this library (or zeroed).
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_buffer_free(buf: *mut nixl_etcd_buffer) {
    ffi_export!(void; {
        // SAFETY: NULL or a buffer this library filled (or zeroed): the
        // caller's contract.
        let Some(buf) = (unsafe { buf.as_mut() }) else {
            return;
        };
        if !buf.data.is_null() && buf.len > 0 {
            let slice = std::ptr::slice_from_raw_parts_mut(buf.data, buf.len);
            // SAFETY: made by `Box::into_raw` of a boxed slice of `len` bytes in
            // `fill_bytes`, and reset below, so freed once.
            drop(unsafe { Box::from_raw(slice) });
        }
        buf.data = std::ptr::null_mut();
        buf.len = 0;
    })
}
