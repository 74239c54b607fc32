//! The process-wide tokio runtime, re-created in a forked child; and the
//! locks held across `fork` (see [`hold_across_fork`]).

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::sync::{Mutex, MutexGuard, Once};

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
    // Not under the slot's lock: it may log (stderr), see `before_fork`.
    drop(slot);
    guard_fork();
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
    if tokio::runtime::Handle::try_current().is_err() {
        // Outside any runtime (a C caller's thread): drive the future right
        // here, with no hand-off to a worker thread and back. A panic in it
        // is caught like one in a task.
        let run = std::panic::AssertUnwindSafe(|| handle.block_on(fut));
        return std::panic::catch_unwind(run)
            .unwrap_or_else(|_| Err(Error::internal("a nixl-etcd call panicked; this is a bug")));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(Error::internal("a nixl-etcd task panicked; this is a bug")))
}

/// Takes a process-wide lock of a layer above this one and returns its
/// guard, held across `fork` (see [`hold_across_fork`]).
pub type ForkLock = fn() -> Box<dyn Any>;

/// The locks registered with [`hold_across_fork`], taken in this order.
static FORK_LOCKS: Mutex<Vec<ForkLock>> = Mutex::new(Vec::new());

/// Registers a process-wide lock to take just before `fork` and release
/// right after it (see `guard_fork`): the layers above this one (the C
/// API's handle table) register theirs, instead of this module knowing
/// them. The lock must be one the library never holds while it logs or
/// waits on the runtime's slot. Registering the same function twice is a
/// no-op.
pub fn hold_across_fork(lock: ForkLock) {
    let mut locks = FORK_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    if !locks.iter().any(|l| std::ptr::fn_addr_eq(*l, lock)) {
        locks.push(lock);
    }
}

/// What the forking thread holds from just before `fork` until just after it,
/// in the parent and in the child.
struct HeldAcrossFork {
    // Dropped in this order (fields drop in declaration order).
    _registered: Vec<Box<dyn Any>>,
    _runtime: MutexGuard<'static, Option<(u32, &'static tokio::runtime::Runtime)>>,
    _locks: MutexGuard<'static, Vec<ForkLock>>,
    _stderr: std::io::StderrLock<'static>,
}

thread_local! {
    static HELD: RefCell<Option<HeldAcrossFork>> = const { RefCell::new(None) };
}

/// Makes `fork` safe while other threads are inside the library.
///
/// Fault found by `tests/stress.rs`: a child starts with only the forking
/// thread, and with every lock as it was at that instant; a process-wide lock
/// held by another thread then (the handle registry at each C call, the
/// runtime slot at each call that reaches etcd, stderr while the logger
/// writes a line; the handle registry is registered by the C API through
/// [`hold_across_fork`]) stays locked in the child forever, and the child's first
/// call, or its first log line, hung (6 % of forks made while 16 threads
/// called the library at INFO, 26 % at DEBUG). `pthread_atfork` handlers take
/// these locks before `fork` (waiting out the short sections that hold them)
/// and release them right after, in both processes, so the child starts with
/// them free. The price: a fork waits while another thread is blocked
/// writing to a stalled stderr (as every logging thread then does).
/// Installed once, with the first runtime.
fn guard_fork() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are plain functions of this library that
        // neither panic nor fork.
        let rc =
            unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
        if rc != 0 {
            log::warn!("pthread_atfork failed ({rc}); forking while calls run is not protected");
        }
    });
}

extern "C" fn before_fork() {
    // stderr first: the library never writes to it while holding either of
    // the others, which it never holds together.
    let stderr = std::io::stderr().lock();
    // The list stays locked across fork too: a registration racing the fork
    // cannot leave it locked in the child.
    let locks = FORK_LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    let registered = locks.iter().map(|take| take()).collect();
    let held = HeldAcrossFork {
        _registered: registered,
        _runtime: RUNTIME.lock().unwrap_or_else(|e| e.into_inner()),
        _locks: locks,
        _stderr: stderr,
    };
    // Without thread-local storage (a thread being torn down) the guards drop
    // at once: no protection, but no harm either.
    let _ = HELD.try_with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn after_fork() {
    let _ = HELD.try_with(|h| h.borrow_mut().take());
}
