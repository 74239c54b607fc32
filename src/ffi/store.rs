//! The NIXL TCPStore metadata store, served in the caller's process.

use std::ffi::c_char;

use super::boundary::ffi_export;
use super::handles::nixl_etcd_client;
use super::status::nixl_etcd_status;
use crate::nixl_store::{NixlStore, StoreOptions};

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
    ffi_export!(port = out(port), client = handle(c), listen = opt_text(listen);
    {
        let listen = listen.unwrap_or("127.0.0.1:0");
        let store = NixlStore::start(&client, listen, StoreOptions::default())?;
        *port = store.local_addr().port();
        Ok(())
    })
}

/// [`nixl_etcd_serve_nixl_store`] with the store's options as a JSON object
/// (NULL or "": the defaults), the keys of `nixl-etcd serve`'s store flags:
/// `{"max_connections": 64, "remote_grace": 5, "liveness": "connection"}`
/// (docs/nixl-store.md lists every key). A bad key or value is
/// `NIXL_ETCD_ERR_INVALID_ARGUMENT`, naming it.
///
/// # Safety
/// `listen` and `options_json` are NULL or NUL-terminated; `port` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn nixl_etcd_serve_nixl_store_opts(
    c: *mut nixl_etcd_client,
    listen: *const c_char,
    options_json: *const c_char,
    port: *mut u16,
) -> nixl_etcd_status {
    ffi_export!(port = out(port), client = handle(c), listen = opt_text(listen),
                options_json = opt_text(options_json);
    {
        let opts = StoreOptions::from_json(options_json.unwrap_or(""))?;
        let store = NixlStore::start(&client, listen.unwrap_or("127.0.0.1:0"), opts)?;
        *port = store.local_addr().port();
        Ok(())
    })
}
