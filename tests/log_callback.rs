//! `nixl_etcd_set_log_callback`: the library's log lines reach the host's
//! callback (level, target, message), exactly, from any thread, and none go
//! to stderr meanwhile; NULL restores stderr; once a new callback is set the
//! old one is never called again. Its own test binary: the logger is
//! process-wide.

mod capi;
mod common;

use std::ffi::{c_char, c_void, CStr};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{unique_namespace, EtcdServer};
use nixl_etcd::ffi::*;

/// (callback tag, level, target, message), in arrival order.
type Line = (&'static str, i32, String, String);
static LINES: Mutex<Vec<Line>> = Mutex::new(Vec::new());

/// The module that logs registrations.
const WRITE: &str = "nixl_etcd::client::write";

static TAG_A: &str = "A";
static TAG_B: &str = "B";

unsafe extern "C" fn collect(
    user_data: *mut c_void,
    level: nixl_etcd_log_level,
    target: *const c_char,
    message: *const c_char,
) {
    let tag = *user_data.cast::<&'static str>();
    let text = |p: *const c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
    LINES
        .lock()
        .unwrap()
        .push((tag, level, text(target), text(message)));
}

fn set(tag: Option<&'static &'static str>) {
    let (cb, data) = match tag {
        Some(t) => (
            Some(collect as unsafe extern "C" fn(_, _, _, _)),
            t as *const &str as *mut c_void,
        ),
        None => (None, std::ptr::null_mut()),
    };
    assert_eq!(
        unsafe { nixl_etcd_set_log_callback(cb, data) },
        NIXL_ETCD_OK
    );
}

/// Everything written to fd 2 while `f` runs.
fn stderr_of(f: impl FnOnce()) -> String {
    let mut file = tempfile::tempfile().unwrap();
    // SAFETY: dup/dup2 on this process's own descriptors.
    let saved = unsafe { libc::dup(2) };
    assert!(saved >= 0);
    assert!(unsafe { libc::dup2(file.as_raw_fd(), 2) } >= 0);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    // SAFETY: as above; puts the saved stderr back.
    assert!(unsafe { libc::dup2(saved, 2) } >= 0);
    unsafe { libc::close(saved) };
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    let mut out = String::new();
    use std::io::Seek;
    file.rewind().unwrap();
    file.read_to_string(&mut out).unwrap();
    out
}

fn take_lines() -> Vec<Line> {
    std::mem::take(&mut *LINES.lock().unwrap())
}

#[test]
fn log_lines_reach_the_callback_exactly_and_not_stderr() {
    std::env::set_var("VLLM_LOGGING_LEVEL", "INFO");
    // Warned about at open (a WARNING line).
    std::env::set_var("NIXL_ETCD_ENDPOINTS", "http://nixl-builtin:2379");
    let etcd = EtcdServer::start();
    let options = etcd.options_json(&unique_namespace("logcb"), "");

    // 1. Lines of several threads at once reach the callback, none stderr.
    let stderr = stderr_of(|| {
        set(Some(&TAG_A));
        let c = capi::open(&options).unwrap();
        std::thread::scope(|s| {
            for i in 0..4 {
                s.spawn(move || c.register(&format!("engine{i}"), 0, b"x").unwrap());
            }
        });
        c.close().unwrap();
    });
    assert_eq!(
        stderr, "",
        "lines went to stderr while the callback was set"
    );
    let lines = take_lines();
    let warning = "NIXL_ETCD_ENDPOINTS is set: NIXL's built-in etcd exchange is active in this \
                   process too and writes lease-less keys for every NIXL agent it creates; unset \
                   it and set VLLM_NIXL_ETCD_ENDPOINTS instead";
    let expect = |level: i32, target: &str, message: &str| {
        (TAG_A, level, target.to_owned(), message.to_owned())
    };
    assert_eq!(
        lines[0],
        expect(NIXL_ETCD_LOG_WARNING, "nixl_etcd::client", warning),
        "{lines:#?}"
    );
    let mut rest = lines[1..].to_vec();
    rest.sort();
    let mut want: Vec<Line> = (0..4)
        .flat_map(|i| {
            [
                expect(
                    NIXL_ETCD_LOG_INFO,
                    WRITE,
                    &format!("Initialized NIXL ETCD coordinator: engine_id=engine{i}"),
                ),
                expect(NIXL_ETCD_LOG_INFO, WRITE, "Registered NIXL agent with ETCD"),
            ]
        })
        .collect();
    want.sort();
    assert_eq!(rest, want);

    // 2. A new callback replaces the old one: once set returns, the old one
    // never runs again, however busy the logging threads are.
    let c = capi::open(&options).unwrap();
    c.register("busy", 0, b"x").unwrap();
    take_lines();
    let stop = Arc::new(AtomicBool::new(false));
    let stderr = stderr_of(|| {
        std::thread::scope(|s| {
            let stop2 = stop.clone();
            s.spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    c.register("busy", 0, b"x").unwrap();
                }
            });
            // Wait until A has received lines from the busy thread.
            while !LINES.lock().unwrap().iter().any(|l| l.0 == TAG_A) {
                std::thread::yield_now();
            }
            set(Some(&TAG_B));
            let a_count = LINES
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.0 == TAG_A)
                .count();
            while LINES
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.0 == TAG_B)
                .count()
                < 3
            {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
            let lines = LINES.lock().unwrap();
            assert_eq!(
                lines.iter().filter(|l| l.0 == TAG_A).count(),
                a_count,
                "the old callback ran after it was replaced"
            );
        });
    });
    assert_eq!(stderr, "");
    assert!(take_lines().iter().all(|l| *l
        == (
            l.0,
            NIXL_ETCD_LOG_INFO,
            WRITE.to_owned(),
            "Registered NIXL agent with ETCD".to_owned()
        )));

    // 3. NULL restores stderr, in the guide's format.
    let stderr = stderr_of(|| {
        set(None);
        c.register("after", 0, b"x").unwrap();
    });
    c.close().unwrap();
    assert_eq!(
        stderr,
        "INFO: Initialized NIXL ETCD coordinator: engine_id=after\n\
         INFO: Registered NIXL agent with ETCD\n"
    );
    assert_eq!(take_lines(), []);
}
