//! vLLM forks its workers: a child of a process with an open client opens its
//! own client and works; the parent's client keeps working; the child cannot
//! touch the parent's lease through the inherited handle.

mod capi;
mod common;

use std::time::{Duration, Instant};

use capi::{blob, open};
use common::{unique_namespace, EtcdServer};
use nixl_etcd::ffi::{NIXL_ETCD_ERR_CLOSED, NIXL_ETCD_ERR_NOT_FOUND, NIXL_ETCD_OK};

fn child_main(endpoint_opts: &str, parent: capi::Handle) -> i32 {
    // The inherited handle belongs to the parent: refused, not used.
    match parent.lookup("parent_engine", 0) {
        Err(e) if e.status == NIXL_ETCD_ERR_CLOSED && e.message.contains("fork") => {}
        other => {
            eprintln!("child: inherited handle gave {other:?}");
            return 10;
        }
    }
    let own = match open(endpoint_opts) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("child: open failed: {e:?}");
            return 11;
        }
    };
    if own.register("child_engine", 0, &blob(2, 2048)).is_err() {
        return 12;
    }
    if own.lookup("parent_engine", 0).ok() != Some(blob(1, 2048)) {
        return 13;
    }
    if own.wait("child_engine", 0, 2000).ok() != Some(blob(2, 2048)) {
        return 14;
    }
    // Closing the inherited handle in the child must not revoke the parent's lease.
    if unsafe { nixl_etcd::ffi::nixl_etcd_close(parent.0) } != NIXL_ETCD_OK {
        return 15;
    }
    if own.close().is_err() {
        return 16;
    }
    0
}

#[test]
fn a_forked_child_opens_its_own_client_and_the_parent_keeps_working() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("fork");
    let opts = etcd.options_json(&ns, "");
    let parent = open(&opts).unwrap();
    parent.register("parent_engine", 0, &blob(1, 2048)).unwrap();

    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(|| child_main(&opts, parent)).unwrap_or(99);
        unsafe { libc::_exit(code) };
    }
    let started = Instant::now();
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the forked child hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(libc::WIFEXITED(status), "child died: status {status}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "child failed (see its stderr)"
    );
    // The parent's client and lease are intact.
    assert_eq!(parent.lookup("parent_engine", 0).unwrap(), blob(1, 2048));
    parent.register("parent_engine", 1, b"after fork").unwrap();
    // The child closed its client: its record is gone.
    assert_eq!(
        parent.lookup("child_engine", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    parent.close().unwrap();
}
