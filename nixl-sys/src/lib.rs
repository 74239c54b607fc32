//! Bindings to NIXL's C API (`libnixl_capi.so`, functions `nixl_capi_*`).
//!
//! The library is loaded at run time ([`api`]), so this crate builds on a
//! machine without NIXL; a missing library or symbol is an [`Error`], never an
//! abort. [`raw`] holds the bindgen output; [`Agent`] and friends are a safe
//! layer for agents, backends, memory registration, metadata, transfers and
//! notifications.

pub mod raw {
    #![allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

mod agent;
mod loader;

pub use agent::{
    invalidate_remote_of, load_remote_metadata_into, local_metadata_of, make_connection_of,
    read_of, Agent, Backend, MemType, Notification, Registration, XferOp, XferReq,
};
pub use loader::{api, library_path, Error, Result};
