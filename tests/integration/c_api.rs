//! Every exported call and its error paths, through the C ABI, against a real
//! etcd started by the harness.

use crate::common;

use std::ffi::CString;
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use crate::capi::{blob, last_error, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, EtcdServer};
use nixl_etcd::ffi::*;

fn client(etcd: &EtcdServer, ns: &str, extra: &str) -> Handle {
    open(&etcd.options_json(ns, extra)).unwrap_or_else(|f| panic!("open: {f:?}"))
}

#[test]
fn register_then_lookup_round_trips_binary_metadata() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("roundtrip");
    let a = client(&etcd, &ns, "");
    let b = client(&etcd, &ns, "");
    let md = blob(1, 8192);
    assert!(md.contains(&0));
    a.register("prefill_engine", 0, &md).unwrap();
    assert_eq!(b.lookup("prefill_engine", 0).unwrap(), md);
    // Empty metadata is valid and comes back empty.
    a.register("prefill_engine", 1, &[]).unwrap();
    assert_eq!(b.lookup("prefill_engine", 1).unwrap(), Vec::<u8>::new());
    // Registering again replaces: the reader's cache catches the change from
    // its watch (a lookup may serve the old value until the event arrives).
    let md2 = blob(2, 5000);
    a.register("prefill_engine", 0, &md2).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || {
        b.lookup("prefill_engine", 0).is_ok_and(|v| v == md2)
    }));
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn record_is_readable_with_etcdctl_and_bound_to_the_lease() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("record");
    let a = client(&etcd, &ns, r#""host":"node1.example.com""#);
    let md = blob(3, 64);
    a.register("prefill_engine", 2, &md).unwrap();
    let key = format!("{ns}/prefill_engine/rank_2");
    let value = etcdctl_ok(&etcd, &["get", &key, "--print-value-only"]);
    let rec: serde_json::Value = serde_json::from_str(value.trim()).expect("record is JSON");
    assert_eq!(rec["format"], 1);
    assert_eq!(rec["engine_id"], "prefill_engine");
    assert_eq!(rec["rank"], 2);
    assert_eq!(rec["host"], "node1.example.com");
    assert_eq!(rec["pid"], std::process::id());
    assert_eq!(rec["metadata_len"], 64);
    assert!(rec["incarnation"].as_str().unwrap().len() >= 8);
    assert!(rec["registered_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let json = etcdctl_ok(&etcd, &["get", &key, "-w", "json"]);
    let resp: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let lease = resp["kvs"][0]["lease"].as_i64().unwrap_or(0);
    assert_ne!(lease, 0, "the record must be attached to a lease: {json}");
    let ttl = etcdctl_ok(&etcd, &["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("remaining"), "{ttl}");
    a.close().unwrap();
}

#[test]
fn lookup_of_an_absent_engine_is_not_found_at_once() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, &unique_namespace("absent"), "");
    let t = Instant::now();
    let err = a.lookup("decode_engine", 0).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_NOT_FOUND);
    assert!(
        err.message
            .starts_with("Engine decode_engine not found in ETCD"),
        "{}",
        err.message
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    a.close().unwrap();
}

#[test]
fn wait_returns_when_another_client_registers() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("wait");
    let decode = client(&etcd, &ns, "");
    let prefill = client(&etcd, &ns, "");
    let md = blob(4, 8192);
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let got = decode.wait("prefill_engine", 3, 20_000);
        (got, t.elapsed(), decode)
    });
    std::thread::sleep(Duration::from_millis(300));
    let registered_at = Instant::now();
    prefill.register("prefill_engine", 3, &md).unwrap();
    let (got, waited, decode) = waiter.join().unwrap();
    assert_eq!(got.unwrap(), md);
    // It returned because of the register, not a timeout.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert!(registered_at.elapsed() < Duration::from_secs(5));
    // Already present: wait returns at once.
    assert_eq!(decode.wait("prefill_engine", 3, 1000).unwrap(), md);
    decode.close().unwrap();
    prefill.close().unwrap();
}

#[test]
fn wait_times_out_with_the_guides_message() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, &unique_namespace("timeout"), r#""timeout_s":1.5"#);
    let t = Instant::now();
    let err = a.wait("prefill_engine", 0, 400).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        err.message
            .starts_with("Timeout waiting for engine prefill_engine"),
        "{}",
        err.message
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    // timeout_ms < 0 means the configured timeout (1.5 s here).
    let t = Instant::now();
    let err = a.wait("prefill_engine", 0, -1).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    a.close().unwrap();
}

#[test]
fn unregister_removes_only_this_clients_records() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("unregister");
    let a = client(&etcd, &ns, "");
    let b = client(&etcd, &ns, "");
    a.register("e", 0, b"abc").unwrap();
    let err = b.unregister("e", 0).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_NOT_FOUND);
    assert!(
        err.message.contains("not registered by this client"),
        "{}",
        err.message
    );
    assert_eq!(b.lookup("e", 0).unwrap(), b"abc");
    a.unregister("e", 0).unwrap();
    // The owner sees its own delete at once; another client once the delete
    // event reaches its cache.
    assert_eq!(
        a.lookup("e", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    assert!(common::wait_until(Duration::from_secs(5), || b
        .lookup("e", 0)
        .is_err_and(|e| e.status == NIXL_ETCD_ERR_NOT_FOUND)));
    assert_eq!(
        a.unregister("e", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn close_removes_everything_at_once_and_invalidates_the_handle() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("close");
    let a = client(&etcd, &ns, r#""lease_ttl_s":60"#);
    let b = client(&etcd, &ns, "");
    for r in 0..4 {
        a.register("prefill_engine", r, &blob(r, 100)).unwrap();
    }
    a.close().unwrap();
    // Gone at once, though the lease TTL is 60 s.
    for r in 0..4 {
        assert_eq!(
            b.lookup("prefill_engine", r).unwrap_err().status,
            NIXL_ETCD_ERR_NOT_FOUND
        );
    }
    let keys = etcdctl_ok(&etcd, &["get", "--prefix", &ns, "--keys-only"]);
    assert!(keys.trim().is_empty(), "{keys}");
    // The closed handle is refused, not dereferenced.
    let err = a.lookup("prefill_engine", 0).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_CLOSED);
    assert_eq!(
        a.register("x", 0, b"1").unwrap_err().status,
        NIXL_ETCD_ERR_CLOSED
    );
    assert_eq!(a.close().unwrap_err().status, NIXL_ETCD_ERR_CLOSED);
    assert_eq!(unsafe { nixl_etcd_close(null_mut()) }, NIXL_ETCD_OK);
    b.close().unwrap();
}

#[test]
fn close_wakes_blocked_waiters_with_closed() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, &unique_namespace("closewait"), "");
    let waiters: Vec<_> = (0..4)
        .map(|r| {
            std::thread::spawn(move || {
                let t = Instant::now();
                (a.wait("never", r, 30_000), t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    a.close().unwrap();
    for w in waiters {
        let (res, took) = w.join().unwrap();
        let err = res.unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_CLOSED, "{}", err.message);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}

#[test]
fn unreachable_etcd_is_a_connection_error_with_the_guides_message() {
    let port = common::free_port();
    let t = Instant::now();
    let err = open(&format!(
        r#"{{"endpoints":"127.0.0.1:{port}","timeout_s":3}}"#
    ))
    .unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_CONNECTION);
    assert!(
        err.message.starts_with("ETCD connection failed: "),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("Connection refused"),
        "{}",
        err.message
    );
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[test]
fn calls_fail_cleanly_while_etcd_is_down_and_work_after_it_returns() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("down");
    let a = client(&etcd, &ns, r#""timeout_s":2"#);
    a.register("e", 0, b"before").unwrap();
    etcd.kill();
    let t = Instant::now();
    let err = a.lookup("e", 0).unwrap_err();
    assert!(
        err.status == NIXL_ETCD_ERR_CONNECTION || err.status == NIXL_ETCD_ERR_TIMEOUT,
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let err = a.register("e", 1, b"x").unwrap_err();
    assert!(
        err.status == NIXL_ETCD_ERR_CONNECTION || err.status == NIXL_ETCD_ERR_TIMEOUT,
        "{err:?}"
    );
    etcd.restart();
    assert!(common::wait_until(Duration::from_secs(10), || a
        .lookup("e", 0)
        .is_ok()));
    assert_eq!(a.lookup("e", 0).unwrap(), b"before");
    a.register("e", 1, b"after").unwrap();
    assert_eq!(a.lookup("e", 1).unwrap(), b"after");
    a.close().unwrap();
}

#[test]
fn bad_arguments_are_invalid_argument_never_a_crash() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, &unique_namespace("badargs"), "");
    let e = CString::new("e").unwrap();
    let mut buf = nixl_etcd_buffer {
        data: null_mut(),
        len: 0,
    };
    let mut h = null_mut();
    unsafe {
        assert_eq!(
            nixl_etcd_open(null(), null_mut()),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out is NULL"));
        let bad_utf8 = [0x66u8, 0xff, 0xfe, 0];
        assert_eq!(
            nixl_etcd_open(bad_utf8.as_ptr().cast(), &mut h),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        assert!(h.is_null());
        assert_eq!(
            nixl_etcd_register(a.0, null(), 0, b"x".as_ptr(), 1),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("engine_id is NULL"));
        assert_eq!(
            nixl_etcd_register(a.0, bad_utf8.as_ptr().cast(), 0, b"x".as_ptr(), 1),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            nixl_etcd_register(a.0, e.as_ptr(), 0, null(), 5),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("metadata is NULL"));
        assert_eq!(
            nixl_etcd_register(null_mut(), e.as_ptr(), 0, b"x".as_ptr(), 1),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("client is NULL"));
        assert_eq!(
            nixl_etcd_lookup(a.0, e.as_ptr(), 0, null_mut()),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out buffer is NULL"));
        assert_eq!(
            nixl_etcd_wait(a.0, null(), 0, 10, &mut buf),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            nixl_etcd_unregister(a.0, null(), 0),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        // A handle that was never opened is refused.
        assert_eq!(
            nixl_etcd_lookup(0xdead_beef as *mut _, e.as_ptr(), 0, &mut buf),
            NIXL_ETCD_ERR_CLOSED
        );
        nixl_etcd_buffer_free(null_mut());
        nixl_etcd_buffer_free(&mut buf);
    }
    // Ids that could escape or alias the namespace.
    for id in [
        "",
        "a/b",
        "..",
        "../x",
        ".",
        "a\\b",
        "tab\there",
        &"x".repeat(201),
    ] {
        let err = a.register(id, 0, b"x").unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{id:?}");
        assert!(err.message.contains("engine_id"), "{}", err.message);
        assert_eq!(
            a.lookup(id, 0).unwrap_err().status,
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            a.wait(id, 0, 10).unwrap_err().status,
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
    }
    let keys = etcdctl_ok(&etcd, &["get", "--prefix", "", "--keys-only"]);
    assert!(keys.trim().is_empty(), "nothing may be written: {keys}");
    a.close().unwrap();
}

#[test]
fn bad_options_name_the_key() {
    let etcd = EtcdServer::start();
    let cases = [
        (r#"{"bogus":1}"#, "unknown option \"bogus\""),
        (r#"{"timeout_s":"10"}"#, "option \"timeout_s\""),
        (r#"{"lease_ttl_s":-3}"#, "option \"lease_ttl_s\""),
        (r#"{"endpoints":"nohostport"}"#, "has no port"),
        (
            r#"{"endpoints":"https://127.0.0.1:2379,http://127.0.0.1:2380"}"#,
            "mixes https:// and plaintext",
        ),
        (r#"{"namespace":"/a/../b"}"#, "namespace"),
        ("not json", "not valid JSON"),
    ];
    for (opts, want) in cases {
        let err = open(opts).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{opts}");
        assert!(err.message.contains(want), "{opts}: {}", err.message);
    }
    // An empty string means: environment only (pointing at this etcd).
    let _ = etcd;
}

#[test]
fn oversize_metadata_is_too_large_and_nothing_is_written() {
    let etcd = EtcdServer::builder().max_request_bytes(64 * 1024).start();
    let ns = unique_namespace("large");
    let a = client(
        &etcd,
        &ns,
        r#""max_request_bytes":65536,"max_metadata_bytes":100000"#,
    );
    // Over one request: stored in chunks, read back whole.
    a.register("e", 0, &blob(5, 100_000)).unwrap();
    assert_eq!(a.lookup("e", 0).unwrap(), blob(5, 100_000));
    // Over the maximum: refused with both sizes, nothing written.
    let err = a.register("e", 1, &blob(6, 100_001)).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE);
    assert!(
        err.message.contains("100001 bytes") && err.message.contains("100000 bytes"),
        "{}",
        err.message
    );
    assert_eq!(
        a.lookup("e", 1).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    // A client that believes the request limit is larger gets TOO_LARGE
    // from etcd.
    let b = client(&etcd, &ns, "");
    let err = b.register("e", 2, &blob(7, 100 * 1024)).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE, "{}", err.message);
    assert_eq!(
        a.lookup("e", 2).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    a.close().unwrap();
    b.close().unwrap();
    let left = etcdctl_ok(&etcd, &["get", "--prefix", "--keys-only", &ns]);
    assert!(left.trim().is_empty(), "keys left after close: {left}");
}

#[test]
fn unreadable_records_are_bad_record_errors() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("badrecord");
    let a = client(&etcd, &ns, "");
    let cases = [
        ("rank_0", "this is not json".to_string(), "unreadable"),
        ("rank_1", r#"{"format":99}"#.to_string(), "format version 99"),
        (
            "rank_2",
            r#"{"format":1,"engine_id":"other","rank":2,"host":"h","pid":1,"incarnation":"i","registered_at_ms":1,"metadata_len":0,"metadata":""}"#.to_string(),
            "expected engine",
        ),
    ];
    for (suffix, value, want) in &cases {
        etcdctl_ok(&etcd, &["put", &format!("{ns}/e/{suffix}"), value]);
        let rank: u32 = suffix[5..].parse().unwrap();
        let err = a.lookup("e", rank).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_BAD_RECORD);
        assert!(err.message.contains(want), "{}", err.message);
        assert_eq!(
            a.wait("e", rank, 100).unwrap_err().status,
            NIXL_ETCD_ERR_BAD_RECORD
        );
    }
    a.close().unwrap();
}

#[test]
fn errors_are_thread_local_and_statuses_have_names() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, &unique_namespace("tls"), "");
    let err = a.lookup("missing_here", 0).unwrap_err();
    assert!(err.message.contains("missing_here"));
    std::thread::spawn(move || {
        // Another thread's failure is not this thread's.
        assert_eq!(last_error(), "");
        let e2 = a.lookup("other_thread", 0).unwrap_err();
        assert!(e2.message.contains("other_thread"));
    })
    .join()
    .unwrap();
    assert!(last_error().contains("missing_here"));
    // A successful call leaves the last error as it was.
    a.register("x", 0, b"1").unwrap();
    assert!(last_error().contains("missing_here"));
    let name = |s| {
        unsafe { std::ffi::CStr::from_ptr(nixl_etcd_status_str(s)) }
            .to_str()
            .unwrap()
    };
    assert_eq!(name(NIXL_ETCD_OK), "ok");
    assert_eq!(name(NIXL_ETCD_ERR_NOT_FOUND), "not found");
    assert_eq!(name(NIXL_ETCD_ERR_TIMEOUT), "timeout");
    assert_eq!(name(12345), "unknown status");
    let v = unsafe { std::ffi::CStr::from_ptr(nixl_etcd_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    a.close().unwrap();
}

#[test]
fn checked_in_header_is_current() {
    let generated = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/nixl_etcd.h")).unwrap();
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/nixl_etcd.h"))
            .unwrap();
    assert!(
        generated == checked_in,
        "include/nixl_etcd.h is stale: run `NIXL_ETCD_WRITE_HEADER=1 cargo build` and commit it"
    );
}

/// The header's rule for output parameters: each is cleared on entry and
/// written only when the call returns OK, so after a failure it holds its
/// cleared value (NULL, 0, an empty buffer), never a stale or partial one.
#[test]
fn every_output_parameter_is_cleared_when_the_call_fails() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("outparams");
    let h = client(&etcd, &ns, "");
    let c = h.0;
    let absent = CString::new("absent_engine").unwrap();
    let garbage = 0x5a5a_5a5a_usize as *mut u8;
    let stale_buffer = || nixl_etcd_buffer {
        data: garbage,
        len: 77,
    };
    let cleared = |b: &nixl_etcd_buffer| b.data.is_null() && b.len == 0;
    unsafe {
        let mut out = garbage as *mut nixl_etcd_client;
        let bad = CString::new("{not json").unwrap();
        assert_eq!(
            nixl_etcd_open(bad.as_ptr(), &mut out),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(out.is_null());

        let mut buf = stale_buffer();
        assert_eq!(
            nixl_etcd_lookup(c, absent.as_ptr(), 0, &mut buf),
            NIXL_ETCD_ERR_NOT_FOUND
        );
        assert!(cleared(&buf));

        let mut buf = stale_buffer();
        assert_eq!(
            nixl_etcd_wait(c, absent.as_ptr(), 0, 0, &mut buf),
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert!(cleared(&buf));

        let mut buf = stale_buffer();
        assert_eq!(
            nixl_etcd_fetch_nixl(c, absent.as_ptr(), null(), 0, &mut buf),
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert!(cleared(&buf));

        let mut rec: nixl_etcd_record = std::mem::zeroed();
        rec.engine_id = garbage.cast();
        rec.rank = 9;
        rec.world_size = 9;
        rec.revision = 9;
        rec.metadata = stale_buffer();
        assert_eq!(
            nixl_etcd_lookup_record(c, absent.as_ptr(), 0, &mut rec),
            NIXL_ETCD_ERR_NOT_FOUND
        );
        assert!(rec.engine_id.is_null() && rec.host.is_null() && rec.incarnation.is_null());
        assert_eq!(
            (rec.rank, rec.world_size, rec.pid, rec.revision),
            (0, 0, 0, 0)
        );
        assert!(cleared(&rec.metadata));

        let mut id = 99u64;
        assert_eq!(
            nixl_etcd_subscribe(c, absent.as_ptr(), None, null_mut(), &mut id),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(id, 0);

        let mut world_size = 99u32;
        assert_eq!(
            nixl_etcd_wait_engine(c, absent.as_ptr(), 10, &mut world_size),
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert_eq!(world_size, 0);
        let mut world_size = 99u32;
        assert_eq!(
            nixl_etcd_wait_engine(c, null(), 10, &mut world_size),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(world_size, 0);

        let mut n = 99usize;
        assert_eq!(
            nixl_etcd_target_ranks(3, 0, 2, null_mut(), 0, &mut n),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(n, 0);

        let mut port = 99u16;
        let bad_listen = CString::new("not an address").unwrap();
        assert_eq!(
            nixl_etcd_serve_nixl_store(c, bad_listen.as_ptr(), &mut port),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(port, 0);
        let mut port = 99u16;
        let bad_opts = CString::new(r#"{"max_connections": 0}"#).unwrap();
        assert_eq!(
            nixl_etcd_serve_nixl_store_opts(c, null(), bad_opts.as_ptr(), &mut port),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(port, 0);
        let err = last_error();
        assert!(err.contains("max_connections (--max-connections)"), "{err}");
        let not_json = CString::new("max_connections=4").unwrap();
        assert_eq!(
            nixl_etcd_serve_nixl_store_opts(c, null(), not_json.as_ptr(), &mut port),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            nixl_etcd_serve_nixl_store_opts(c, null(), bad_opts.as_ptr(), null_mut()),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );

        #[cfg(feature = "nixl")]
        {
            let mut name = garbage.cast::<std::ffi::c_char>();
            assert_eq!(
                nixl_etcd_load_remote_agent(c, null_mut(), absent.as_ptr(), 0, 0, &mut name),
                NIXL_ETCD_ERR_INVALID_ARGUMENT
            );
            assert!(name.is_null());
        }
    }
    h.close().unwrap();
}
