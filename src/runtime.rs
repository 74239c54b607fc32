//! The process-wide tokio runtime, re-created in a forked child.

use std::future::Future;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// (pid that built it, runtime). Leaked on purpose: a forked child inherits the
/// parent's runtime without its threads, and must neither use nor drop it.
static RUNTIME: Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = Mutex::new(None);

/// The runtime of this process, built on first use (and again after a fork).
pub fn handle() -> Result<tokio::runtime::Handle> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, rt)) = *slot {
        if owner == pid {
            return Ok(rt.handle().clone());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nixl-etcd")
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the nixl-etcd runtime: {e}")))?;
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    Ok(rt.handle().clone())
}

/// Runs `fut` on the runtime and blocks the calling thread until it is done.
/// Works from any thread, including one that is itself inside a runtime.
pub fn block_on<T, F>(fut: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let handle = handle()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(Error::internal("a nixl-etcd task panicked; this is a bug")))
}
