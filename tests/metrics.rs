//! The library's metrics (`nixl_etcd::metrics`, C `nixl_etcd_metrics`): each
//! counter moves by exactly what the calls did. Its own test binary: the
//! counters are process-wide, and no other test may move them meanwhile.

mod common;

use std::ffi::CStr;
use std::sync::mpsc;
use std::time::Duration;

use common::{unique_namespace, EtcdServer};
use nixl_etcd::{EventKind, Status};

/// The value of one sample line (`name{labels}`), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

/// The exposition through the C API, as a scrape gets it.
fn scrape() -> String {
    use nixl_etcd::ffi::*;
    let mut buf = nixl_etcd_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    };
    // SAFETY: a writable buffer, freed below.
    assert_eq!(unsafe { nixl_etcd_metrics(&mut buf) }, NIXL_ETCD_OK);
    // SAFETY: `len` bytes at `data`, from the library.
    let text = unsafe { std::slice::from_raw_parts(buf.data, buf.len) }.to_vec();
    unsafe { nixl_etcd_buffer_free(&mut buf) };
    String::from_utf8(text).unwrap()
}

#[test]
fn each_counter_moves_by_what_the_calls_did() {
    use nixl_etcd::ffi::*;
    // SAFETY: NULL out pointer: refused, nothing written.
    assert_eq!(
        unsafe { nixl_etcd_metrics(std::ptr::null_mut()) },
        NIXL_ETCD_ERR_INVALID_ARGUMENT
    );
    // SAFETY: a static string.
    let err = unsafe { CStr::from_ptr(nixl_etcd_last_error()) };
    assert_eq!(err.to_str().unwrap(), "out buffer is NULL");

    let etcd = EtcdServer::start();
    let ns = unique_namespace("metrics");
    let before = scrape();
    let prefill = etcd.client(&ns, "");
    let decode = etcd.client(&ns, "");
    let (tx, rx) = mpsc::channel();
    decode
        .subscribe(
            Some("p"),
            Box::new(move |ev| {
                let _ = tx.send(ev.kind);
            }),
        )
        .unwrap();
    prefill.register("p", 0, b"zero").unwrap();
    prefill.register("p", 1, b"one").unwrap();
    decode.register("d", 0, b"decode").unwrap();
    assert_eq!(
        decode
            .wait("p", 1, Some(Duration::from_secs(60)))
            .unwrap()
            .metadata
            .as_slice(),
        b"one"
    );
    // A followed engine: from the cache, on the calling thread; one it does
    // not follow: from etcd.
    assert_eq!(decode.lookup("p", 0).unwrap().metadata.as_slice(), b"zero");
    assert_eq!(
        decode.lookup("d", 0).unwrap().metadata.as_slice(),
        b"decode"
    );
    let gone = decode.lookup("p", 9).unwrap_err();
    assert_eq!(gone.status, Status::ErrNotFound);
    let late = decode
        .wait("p", 7, Some(Duration::from_millis(300)))
        .unwrap_err();
    assert_eq!(late.status, Status::ErrTimeout);
    for _ in 0..2 {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)).unwrap(),
            EventKind::Added
        );
    }
    let after = scrape();

    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta("nixl_etcd_registrations_total{result=\"ok\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        delta("nixl_etcd_waits_total{result=\"found\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("nixl_etcd_waits_total{result=\"timeout\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(delta("nixl_etcd_wait_seconds_count"), 2.0, "{after}");
    assert_eq!(
        delta("nixl_etcd_lookups_total{answered=\"cache\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("nixl_etcd_lookups_total{answered=\"etcd\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("nixl_etcd_lookups_total{answered=\"error\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta("nixl_etcd_events_total{kind=\"added\"}"),
        2.0,
        "{after}"
    );
    assert_eq!(delta("nixl_etcd_lease_grants_total"), 2.0, "{after}");
    assert_eq!(delta("nixl_etcd_lease_regrants_total"), 0.0, "{after}");
    assert!(delta("nixl_etcd_watch_starts_total") >= 1.0, "{after}");
    for family in [
        "registrations",
        "lookups",
        "waits",
        "wait_seconds",
        "events",
        "lease_grants",
        "lease_regrants",
        "keepalive_failures",
        "watch_starts",
        "watch_restarts",
    ] {
        assert!(
            after.contains(&format!("# HELP nixl_etcd_{family} ")),
            "{family}: {after}"
        );
    }
    assert!(after.ends_with("# EOF\n"), "{after}");
    prefill.close().unwrap();
    decode.close().unwrap();
}
