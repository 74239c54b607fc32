//! A metadata store for stock NIXL agents, with etcd behind it.
//!
//! NIXL 1.5 picks its metadata backend from the environment; with
//! `NIXL_TCPSTORE_ENDPOINT=host:port` it speaks PyTorch's c10d TCPStore
//! protocol to that address. This module serves the subset NIXL uses
//! (VALIDATE, PING, SET, GET, CHECK, DELETE_KEY; see [`codec`]) and keeps the
//! keys in etcd:
//!
//! * keys ([`keymap`]): broadcast metadata `/nixl/agents/{label}/{agent}/NULL_AGENT`
//!   lands in NIXL's etcd layout (`{nixl_namespace}/{agent}/{label}` plus the
//!   marker), as `Client::publish_nixl` writes it; any other key is kept
//!   verbatim under [`keymap::VERBATIM_PREFIX`].
//! * lifetime (`writers`): every key is under a lease of the writer that
//!   wrote it. A process on this host that the store can see is watched with
//!   a pidfd; any other writer is followed by its connections (TCP
//!   keep-alive, then a grace period). If the store itself dies, the leases
//!   expire within their TTL.
//! * writes (`queue`, `writers`): queued per writer and sent in order by the
//!   writer's own task; a SET waits at most `write_wait` for etcd, so an
//!   outage never closes a connection nor deletes a live writer's keys.
//! * reads (`mirror`): from a live copy of the two prefixes (one long-lived
//!   watch each, newest revision per key); CHECK of an absent key waits up
//!   to `check_wait` for it.
//!
//! Modules: `server` (listener, connections), `ops` (the queries),
//! `writers`, `queue`, `mirror`, [`codec`] (the wire), [`keymap`],
//! [`peers`] (`/proc` and pidfd), [`options`], `error`.

pub mod codec;
mod error;
pub mod keymap;
mod mirror;
mod ops;
pub mod options;
pub mod peers;
mod queue;
mod server;
mod writers;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::watch;

use crate::client::Client;
use crate::config::Config;
use codec::Limits;
use mirror::Mirror;
use writers::{Writer, Writers};

pub use options::{Liveness, StoreOptions, DEFAULT_CHECK_WAIT_MS, DEFAULT_PORT, OPTIONS};
pub use server::NixlStore;

/// What every part of a running store shares.
struct Shared {
    cfg: Config,
    opts: StoreOptions,
    /// What a query may carry.
    limits: Limits,
    /// The client the store was started with: its connection carries every
    /// writer's lease, and its lease the store's own deletes.
    base: Client,
    nixl: Arc<Mirror>,
    verbatim: Arc<Mirror>,
    writers: Writers,
    /// Deletes of keys no writer of this store holds.
    own: std::sync::OnceLock<Arc<Writer>>,
    stop: watch::Sender<bool>,
    connections: AtomicUsize,
    /// Connections refused at the cap, for the log.
    refused: AtomicUsize,
}

impl Shared {
    /// The copy that holds etcd key `key`.
    fn mirror_for(&self, key: &str) -> &Arc<Mirror> {
        if key.starts_with(&self.verbatim.prefix) {
            &self.verbatim
        } else {
            &self.nixl
        }
    }
}

/// Resolves once `rx` holds true (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
