//! nixl-etcd: publish and discover NIXL agent metadata per (engine_id, rank)
//! through etcd, for disaggregated LLM inference.
//!
//! The C ABI lives in [`ffi`] (header `include/nixl_etcd.h`); it is a thin
//! layer over the safe [`Client`].

pub mod blob;
pub mod cache;
pub mod client;
pub mod config;
pub mod connect;
pub mod error;
mod etcd_error;
pub mod events;
pub mod ffi;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metrics;
#[cfg(feature = "nixl")]
pub mod nixl;
pub mod nixl_layout;
pub mod nixl_store;
#[cfg(feature = "nixl")]
pub mod prewarm;
pub mod record;
mod runtime;
pub mod secret;
mod session;
pub mod sign;
pub mod tp;

pub use client::{Client, Found};
pub use client::{LeaseCondition, LeaseHealth};
pub use config::Config;
pub use error::{Error, Result, Status};
/// The cause of an etcd-client error in one line (gRPC message and sources).
pub use etcd_error::cause as etcd_cause;
pub use events::{Event, EventKind};
pub use record::Record;
