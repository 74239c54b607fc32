//! The library's metrics in the OpenMetrics text format.

use super::boundary::ffi_export;
use super::records::{fill_bytes, nixl_etcd_buffer};
use super::status::nixl_etcd_status;
use crate::metrics;

/// The process's nixl-etcd metrics (registrations, lookups by where they
/// were answered, waits, events by kind, lease grants and re-grants,
/// keep-alive failures, watch starts and restarts) as an OpenMetrics text
/// exposition ending in `# EOF`, in `*out` (free with
/// `nixl_etcd_buffer_free`): what a Prometheus scrape of the process
/// serves. No etcd call.
///
/// # Safety
/// `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_metrics(out: *mut nixl_etcd_buffer) -> nixl_etcd_status {
    ffi_export!(out = buffer(out); {
        fill_bytes(out, metrics::text().as_bytes());
        Ok(())
    })
}
