//! The C ABI (header `include/nixl_etcd.h`, generated from this folder by
//! cbindgen): thin wrappers over [`crate::Client`], one module per concern.
//! Every export's body is one [`ffi_export!`](boundary) invocation: the
//! panic boundary, the NULL checks and the argument conversions live there,
//! once. Handles are opaque tokens looked up in a table, so a call on a
//! closed handle returns `CLOSED` instead of touching freed memory.
//!
//! Adding an export: write it in the module of its concern, as
//! `#[no_mangle] pub unsafe extern "C" fn` whose body is `ffi_export!`, with
//! a `# Safety` section saying what each pointer must be; then regenerate
//! the header (`NIXL_ETCD_WRITE_HEADER=1 cargo build --release`) and list it
//! in docs/c-api.md.

#![allow(non_camel_case_types)]

mod boundary;
mod events;
mod handles;
mod log;
mod metrics;
mod nixl;
#[cfg(feature = "nixl")]
mod prewarm;
mod records;
mod status;
mod store;

pub use events::*;
pub use handles::*;
pub use log::*;
pub use metrics::*;
pub use nixl::*;
#[cfg(feature = "nixl")]
pub use prewarm::*;
pub use records::*;
pub use status::*;
pub use store::*;
