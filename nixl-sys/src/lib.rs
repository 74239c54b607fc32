//! Raw bindings to NIXL's C API (`nixl_capi_*`).
//!
//! Placeholder: the bindings arrive with the NIXL integration issue. The core
//! library (`nixl-etcd`) never depends on NIXL; see `README.md` here.
