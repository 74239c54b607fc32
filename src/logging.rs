//! Logging through `log`, with the guide's levels. A host process that already
//! installed a logger keeps it. Our logger writes to stderr unless a sink is
//! set ([`set_sink`]; the C API's `nixl_etcd_set_log_callback`): then every
//! line that passes the level filter goes to the sink instead.

use std::cell::Cell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

use log::LevelFilter;

pub const ENV_LOGGING_LEVEL: &str = "VLLM_LOGGING_LEVEL";

/// Receives each log line instead of stderr: (level, target, message). The
/// target is the Rust module path of the line (`nixl_etcd::...`); the message
/// is the line's text without the level prefix. Called on whatever thread
/// logs, possibly several at once.
pub type Sink = Box<dyn Fn(log::Level, &str, &str) + Send + Sync>;

/// One installed sink and the number of lines being handed to it now.
struct Slot {
    sink: Sink,
    in_flight: AtomicUsize,
}

/// The current sink; NULL: stderr. Slots are never freed (a thread may still
/// hold a pointer it loaded just before a swap), so a reader never touches
/// freed memory; each `set_sink` leaks one small slot.
static SINK: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    /// The slot whose sink this thread is running now (NULL: none). A line
    /// logged from inside a sink goes to stderr, never back into a sink.
    static IN_SINK: Cell<*const Slot> = const { Cell::new(std::ptr::null()) };
}

/// Routes our log lines to `sink` (`None`: back to stderr). Once this
/// returns, the previous sink is not running on any other thread and is
/// never called again. Installs our logger first if no logger is installed;
/// when the host installed its own `log` logger, lines keep going there and
/// the sink is not called.
pub fn set_sink(sink: Option<Sink>) {
    init();
    guard_fork();
    let new = sink.map_or(std::ptr::null_mut(), |sink| {
        Box::into_raw(Box::new(Slot {
            sink,
            in_flight: AtomicUsize::new(0),
        }))
    });
    let old = SINK.swap(new, Ordering::SeqCst);
    if old.is_null() {
        return;
    }
    // SAFETY: slots are never freed (see `SINK`).
    let old = unsafe { &*old };
    // A sink that replaces itself from inside its own call counts once.
    let own = IN_SINK
        .try_with(|s| usize::from(std::ptr::eq(s.get(), old)))
        .unwrap_or(0);
    // Every new line sees the swap (see `to_sink`): only lines already
    // inside the old sink remain, and they finish.
    while old.in_flight.load(Ordering::SeqCst) > own {
        std::thread::yield_now();
    }
}

/// Hands `record` to the sink, if one is set and this thread is not already
/// inside one. False: the caller writes the line to stderr.
fn to_sink(record: &log::Record) -> bool {
    let Ok(outside) = IN_SINK.try_with(|s| s.get().is_null()) else {
        return false;
    };
    if !outside {
        return false;
    }
    loop {
        let p = SINK.load(Ordering::SeqCst);
        if p.is_null() {
            return false;
        }
        // SAFETY: slots are never freed (see `SINK`).
        let slot = unsafe { &*p };
        slot.in_flight.fetch_add(1, Ordering::SeqCst);
        if SINK.load(Ordering::SeqCst) != p {
            // Replaced meanwhile: `set_sink` may be waiting on this count.
            slot.in_flight.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        IN_SINK.with(|s| s.set(p));
        let message = record.args().to_string();
        // A panicking sink loses its line, never the caller's thread.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            (slot.sink)(record.level(), record.target(), &message)
        }));
        IN_SINK.with(|s| s.set(std::ptr::null()));
        slot.in_flight.fetch_sub(1, Ordering::SeqCst);
        return true;
    }
}

/// A forked child has only the forking thread: counts of lines that other
/// threads of the parent were handing to the sink would never drop, and a
/// `set_sink` in the child would wait on them forever.
fn guard_fork() {
    static ONCE: Once = Once::new();
    extern "C" fn in_child() {
        let p = SINK.load(Ordering::SeqCst);
        // SAFETY: slots are never freed (see `SINK`).
        if let Some(slot) = unsafe { p.as_ref() } {
            slot.in_flight.store(0, Ordering::SeqCst);
        }
    }
    ONCE.call_once(|| {
        // SAFETY: the handler is a plain function of this library that
        // neither panics nor forks.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            log::warn!(
                "pthread_atfork failed ({rc}); setting the log sink in a forked child may hang"
            );
        }
    });
}

/// Our logger: env_logger's filter and stderr format, or the sink.
struct Logger {
    stderr: env_logger::Logger,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.stderr.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        if self.stderr.matches(record) && !to_sink(record) {
            self.stderr.log(record);
        }
    }

    fn flush(&self) {
        self.stderr.flush();
    }
}

/// `VLLM_LOGGING_LEVEL` names (DEBUG, INFO, WARNING, ERROR) to a filter.
pub fn level_from_vllm(value: &str) -> Option<LevelFilter> {
    match value.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Some(LevelFilter::Trace),
        "DEBUG" => Some(LevelFilter::Debug),
        "INFO" => Some(LevelFilter::Info),
        "WARNING" | "WARN" => Some(LevelFilter::Warn),
        "ERROR" | "CRITICAL" => Some(LevelFilter::Error),
        _ => None,
    }
}

fn level_name(level: log::Level) -> &'static str {
    match level {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARNING",
        log::Level::Info => "INFO",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
}

/// Installs a stderr logger once per process, unless the host has one.
/// Level: `VLLM_LOGGING_LEVEL`, else `RUST_LOG`, else INFO for this crate.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut builder = env_logger::Builder::new();
        let vllm = std::env::var(ENV_LOGGING_LEVEL).ok();
        match (
            vllm.as_deref().and_then(level_from_vllm),
            std::env::var("RUST_LOG"),
        ) {
            (Some(level), _) => {
                builder.filter_module("nixl_etcd", level);
            }
            (None, Ok(spec)) if !spec.trim().is_empty() => {
                builder.parse_filters(&spec);
            }
            _ => {
                builder.filter_module("nixl_etcd", LevelFilter::Info);
            }
        }
        builder.format(|buf, record| {
            writeln!(buf, "{}: {}", level_name(record.level()), record.args())
        });
        let stderr = builder.build();
        let max = stderr.filter();
        // Fails only when the host installed a logger first: ours then stays out.
        if log::set_boxed_logger(Box::new(Logger { stderr })).is_ok() {
            log::set_max_level(max);
        }
        if let Some(v) = vllm.filter(|v| level_from_vllm(v).is_none()) {
            log::warn!(
                "{ENV_LOGGING_LEVEL}={v} is not a level; use DEBUG, INFO, WARNING or ERROR \
                 (using INFO)"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_levels_map() {
        assert_eq!(level_from_vllm("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(level_from_vllm("info"), Some(LevelFilter::Info));
        assert_eq!(level_from_vllm("WARNING"), Some(LevelFilter::Warn));
        assert_eq!(level_from_vllm("ERROR"), Some(LevelFilter::Error));
        assert_eq!(level_from_vllm("loud"), None);
    }
}
