//! Hostile input, table-driven over the whole C ABI: NULL for every pointer
//! of every export, ids that are empty, over-long, path-like, with control
//! characters, invalid UTF-8 or an embedded NUL (through raw pointers),
//! rank UINT32_MAX, negative and huge timeouts, malformed option JSON, and
//! records planted in etcd with etcdctl that are garbage, of an unknown
//! format version, huge, or claim another engine. Every case must be a clear
//! error (a status and a message) or a documented success, never a crash,
//! and must write nothing it should not.

use crate::capi;
use crate::common;

use std::ffi::{c_char, c_void, CStr};
use std::io::Write;
use std::process::{Command, Stdio};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use crate::capi::{blob, last_error, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, EtcdServer};
use nixl_etcd::ffi::*;

const INVALID: i32 = NIXL_ETCD_ERR_INVALID_ARGUMENT;

fn client(etcd: &EtcdServer, ns: &str) -> Handle {
    open(&etcd.options_json(ns, "\"timeout_s\":2")).unwrap()
}

fn empty_buf() -> nixl_etcd_buffer {
    nixl_etcd_buffer {
        data: null_mut(),
        len: 0,
    }
}

/// Every key in etcd (the server is private to the test).
fn all_keys(etcd: &EtcdServer) -> Vec<String> {
    etcdctl_ok(etcd, &["get", "--prefix", "", "--keys-only"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// `etcdctl put key` with the value on stdin (binary and huge values).
fn plant(etcd: &EtcdServer, key: &str, value: &[u8]) {
    let mut child = Command::new(
        std::env::var("NIXL_ETCD_TEST_ETCDCTL_BIN").unwrap_or_else(|_| "/usr/bin/etcdctl".into()),
    )
    .env("ETCDCTL_API", "3")
    .args(["--endpoints", &etcd.endpoint(), "put", key])
    // etcdctl reads an empty value only as an argument.
    .args(value.is_empty().then_some(""))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("run etcdctl");
    child.stdin.take().unwrap().write_all(value).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "etcdctl put {key} ({} bytes): {}",
        value.len(),
        String::from_utf8_lossy(&out.stderr)
    );
}

unsafe extern "C" fn noop(_: *mut c_void, _: *const nixl_etcd_event) {}

/// One row of a table: what was called, its status, the status and message
/// fragment expected.
struct Case {
    call: &'static str,
    got: i32,
    message: String,
    want: i32,
    says: &'static str,
}

fn case(call: &'static str, got: i32, want: i32, says: &'static str) -> Case {
    let message = if got == NIXL_ETCD_OK {
        String::new()
    } else {
        last_error()
    };
    Case {
        call,
        got,
        message,
        want,
        says,
    }
}

fn check_all(cases: Vec<Case>) {
    let mut wrong = Vec::new();
    for c in &cases {
        if c.got != c.want || !c.message.contains(c.says) {
            wrong.push(format!(
                "{}: status {} (want {}), message {:?} (want it to say {:?})",
                c.call, c.got, c.want, c.message, c.says
            ));
        }
        if c.got != NIXL_ETCD_OK && c.message.is_empty() {
            wrong.push(format!("{}: failed without a message", c.call));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} cases wrong:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn null_for_every_pointer_of_every_export() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("null");
    let h = client(&etcd, &ns);
    let c = h.0;
    let e = c"e".as_ptr();
    let md = b"md".as_ptr();
    let mut buf = empty_buf();
    let mut rec: nixl_etcd_record = unsafe { std::mem::zeroed() };
    let mut id = 0u64;
    let mut n = 0usize;
    let mut ranks = [0u32; 4];
    let mut h2 = null_mut();
    let cases = unsafe {
        vec![
            case(
                "open(out NULL)",
                nixl_etcd_open(null(), null_mut()),
                INVALID,
                "out is NULL",
            ),
            case("close(NULL)", nixl_etcd_close(null_mut()), NIXL_ETCD_OK, ""),
            case(
                "register(c NULL)",
                nixl_etcd_register(null_mut(), e, 0, md, 2),
                INVALID,
                "client is NULL",
            ),
            case(
                "register(engine NULL)",
                nixl_etcd_register(c, null(), 0, md, 2),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "register(metadata NULL, len 2)",
                nixl_etcd_register(c, e, 0, null(), 2),
                INVALID,
                "metadata is NULL",
            ),
            case(
                "register(metadata NULL, len 0)",
                nixl_etcd_register(c, e, 0, null(), 0),
                NIXL_ETCD_OK,
                "",
            ),
            case(
                "unregister(c NULL)",
                nixl_etcd_unregister(null_mut(), e, 0),
                INVALID,
                "client is NULL",
            ),
            case(
                "unregister(engine NULL)",
                nixl_etcd_unregister(c, null(), 0),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "lookup(c NULL)",
                nixl_etcd_lookup(null_mut(), e, 0, &mut buf),
                INVALID,
                "client is NULL",
            ),
            case(
                "lookup(engine NULL)",
                nixl_etcd_lookup(c, null(), 0, &mut buf),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "lookup(out NULL)",
                nixl_etcd_lookup(c, e, 0, null_mut()),
                INVALID,
                "out buffer is NULL",
            ),
            case(
                "wait(c NULL)",
                nixl_etcd_wait(null_mut(), e, 0, 10, &mut buf),
                INVALID,
                "client is NULL",
            ),
            case(
                "wait(engine NULL)",
                nixl_etcd_wait(c, null(), 0, 10, &mut buf),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "wait(out NULL)",
                nixl_etcd_wait(c, e, 0, 10, null_mut()),
                INVALID,
                "out buffer is NULL",
            ),
            case(
                "publish_nixl(c NULL)",
                nixl_etcd_publish_nixl(null_mut(), e, null(), md, 2),
                INVALID,
                "client is NULL",
            ),
            case(
                "publish_nixl(agent NULL)",
                nixl_etcd_publish_nixl(c, null(), null(), md, 2),
                INVALID,
                "agent_name is NULL",
            ),
            case(
                "publish_nixl(blob NULL, len 2)",
                nixl_etcd_publish_nixl(c, e, null(), null(), 2),
                INVALID,
                "blob is NULL",
            ),
            case(
                "publish_nixl(label NULL: default)",
                nixl_etcd_publish_nixl(c, e, null(), md, 2),
                NIXL_ETCD_OK,
                "",
            ),
            case(
                "fetch_nixl(c NULL)",
                nixl_etcd_fetch_nixl(null_mut(), e, null(), 0, &mut buf),
                INVALID,
                "client is NULL",
            ),
            case(
                "fetch_nixl(agent NULL)",
                nixl_etcd_fetch_nixl(c, null(), null(), 0, &mut buf),
                INVALID,
                "agent_name is NULL",
            ),
            case(
                "fetch_nixl(out NULL)",
                nixl_etcd_fetch_nixl(c, e, null(), 0, null_mut()),
                INVALID,
                "out",
            ),
            case(
                "unpublish_nixl(c NULL)",
                nixl_etcd_unpublish_nixl(null_mut(), e),
                INVALID,
                "client is NULL",
            ),
            case(
                "unpublish_nixl(agent NULL)",
                nixl_etcd_unpublish_nixl(c, null()),
                INVALID,
                "agent_name is NULL",
            ),
            case(
                "lookup_record(c NULL)",
                nixl_etcd_lookup_record(null_mut(), e, 0, &mut rec),
                INVALID,
                "client is NULL",
            ),
            case(
                "lookup_record(engine NULL)",
                nixl_etcd_lookup_record(c, null(), 0, &mut rec),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "lookup_record(out NULL)",
                nixl_etcd_lookup_record(c, e, 0, null_mut()),
                INVALID,
                "out record is NULL",
            ),
            case(
                "recheck(c NULL)",
                nixl_etcd_recheck(null_mut(), e, 0, &mut rec),
                INVALID,
                "client is NULL",
            ),
            case(
                "recheck(engine NULL)",
                nixl_etcd_recheck(c, null(), 0, &mut rec),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "recheck(out NULL)",
                nixl_etcd_recheck(c, e, 0, null_mut()),
                INVALID,
                "out record is NULL",
            ),
            case(
                "subscribe(c NULL)",
                nixl_etcd_subscribe(null_mut(), e, Some(noop), null_mut(), &mut id),
                INVALID,
                "client is NULL",
            ),
            case(
                "subscribe(callback NULL)",
                nixl_etcd_subscribe(c, e, None, null_mut(), &mut id),
                INVALID,
                "callback is NULL",
            ),
            case(
                "subscribe(id NULL)",
                nixl_etcd_subscribe(c, e, Some(noop), null_mut(), null_mut()),
                INVALID,
                "subscription_id is NULL",
            ),
            case(
                "subscribe(engine NULL: all engines)",
                nixl_etcd_subscribe(c, null(), Some(noop), null_mut(), &mut id),
                NIXL_ETCD_OK,
                "",
            ),
            case(
                "unsubscribe(c NULL)",
                nixl_etcd_unsubscribe(null_mut(), id),
                INVALID,
                "client is NULL",
            ),
            case(
                "unsubscribe(unknown id)",
                nixl_etcd_unsubscribe(c, u64::MAX),
                NIXL_ETCD_ERR_NOT_FOUND,
                "no subscription",
            ),
            case(
                "wait_engine(c NULL)",
                nixl_etcd_wait_engine(null_mut(), e, 10, null_mut()),
                INVALID,
                "client is NULL",
            ),
            case(
                "wait_engine(engine NULL)",
                nixl_etcd_wait_engine(c, null(), 10, null_mut()),
                INVALID,
                "engine_id is NULL",
            ),
            case(
                "target_ranks(n NULL)",
                nixl_etcd_target_ranks(2, 0, 4, ranks.as_mut_ptr(), 4, null_mut()),
                INVALID,
                "n is NULL",
            ),
            case(
                "target_ranks(out NULL, cap 4)",
                nixl_etcd_target_ranks(2, 0, 4, null_mut(), 4, &mut n),
                INVALID,
                "out is NULL",
            ),
            case(
                "target_ranks(out NULL, cap 0)",
                nixl_etcd_target_ranks(2, 0, 4, null_mut(), 0, &mut n),
                INVALID,
                "room for 0",
            ),
            case(
                "handle never opened",
                nixl_etcd_lookup(0xdead_beef as *mut _, e, 0, &mut buf),
                NIXL_ETCD_ERR_CLOSED,
                "closed or was never opened",
            ),
            case(
                "handle usize::MAX",
                nixl_etcd_register(usize::MAX as *mut _, e, 0, md, 2),
                NIXL_ETCD_ERR_CLOSED,
                "closed or was never opened",
            ),
            // (Handles are tokens counted from 1: a small number may be a
            // live handle of another test in this process.)
            case(
                "close(handle never opened)",
                nixl_etcd_close((usize::MAX - 1) as *mut _),
                NIXL_ETCD_ERR_CLOSED,
                "already closed",
            ),
            case(
                "open(options NULL: environment)",
                {
                    // The environment's endpoint is not running here; what
                    // matters is a status, a message and `out` left NULL.
                    let st = nixl_etcd_open(null(), &mut h2);
                    if st == NIXL_ETCD_OK {
                        nixl_etcd_close(h2);
                        h2 = null_mut();
                        INVALID
                    } else {
                        st
                    }
                },
                NIXL_ETCD_ERR_CONNECTION,
                "ETCD connection failed",
            ),
        ]
    };
    assert!(h2.is_null());
    assert!(buf.data.is_null() && buf.len == 0);
    assert!(rec.engine_id.is_null() && rec.metadata.data.is_null());
    #[cfg(feature = "nixl")]
    let cases = {
        let mut cases = cases;
        let mut name: *mut c_char = null_mut();
        let agent = std::ptr::dangling_mut::<c_void>(); // never dereferenced: earlier checks fail
        unsafe {
            cases.extend([
                case(
                    "publish_agent(c NULL)",
                    nixl_etcd_publish_agent(null_mut(), e, 0, agent),
                    INVALID,
                    "client is NULL",
                ),
                case(
                    "publish_agent(engine NULL)",
                    nixl_etcd_publish_agent(c, null(), 0, agent),
                    INVALID,
                    "engine_id is NULL",
                ),
                case(
                    "publish_agent(agent NULL)",
                    nixl_etcd_publish_agent(c, e, 0, null_mut()),
                    INVALID,
                    "agent is NULL",
                ),
                case(
                    "load_remote_agent(c NULL)",
                    nixl_etcd_load_remote_agent(null_mut(), agent, e, 0, 10, &mut name),
                    INVALID,
                    "client is NULL",
                ),
                case(
                    "load_remote_agent(agent NULL)",
                    nixl_etcd_load_remote_agent(c, null_mut(), e, 0, 10, &mut name),
                    INVALID,
                    "agent is NULL",
                ),
                case(
                    "load_remote_agent(engine NULL)",
                    nixl_etcd_load_remote_agent(c, agent, null(), 0, 10, &mut name),
                    INVALID,
                    "engine_id is NULL",
                ),
                case(
                    "load_remote_agent(name NULL)",
                    nixl_etcd_load_remote_agent(c, agent, e, 0, 10, null_mut()),
                    INVALID,
                    "remote_agent is NULL",
                ),
            ]);
        }
        assert!(name.is_null());
        cases
    };
    check_all(cases);
    // The frees and static strings take anything.
    unsafe {
        nixl_etcd_buffer_free(null_mut());
        nixl_etcd_record_free(null_mut());
        nixl_etcd_string_free(null_mut());
        let mut zeroed = empty_buf();
        nixl_etcd_buffer_free(&mut zeroed);
        nixl_etcd_buffer_free(&mut zeroed);
        let mut rec: nixl_etcd_record = std::mem::zeroed();
        nixl_etcd_record_free(&mut rec);
        nixl_etcd_record_free(&mut rec);
        for s in [i32::MIN, -10, -9, -1, 0, 1, i32::MAX] {
            assert!(!CStr::from_ptr(nixl_etcd_status_str(s))
                .to_bytes()
                .is_empty());
        }
        assert!(!CStr::from_ptr(nixl_etcd_version()).to_bytes().is_empty());
        let _ = nixl_etcd_enabled();
    }
    // A filled record and buffer, freed twice: the second is a no-op.
    h.register("e", 1, b"abc").unwrap();
    unsafe {
        let mut rec: nixl_etcd_record = std::mem::zeroed();
        assert_eq!(nixl_etcd_lookup_record(c, e, 1, &mut rec), NIXL_ETCD_OK);
        nixl_etcd_record_free(&mut rec);
        nixl_etcd_record_free(&mut rec);
        let mut buf = empty_buf();
        assert_eq!(nixl_etcd_lookup(c, e, 1, &mut buf), NIXL_ETCD_OK);
        nixl_etcd_buffer_free(&mut buf);
        nixl_etcd_buffer_free(&mut buf);
    }
    h.close().unwrap();
}

/// Ids as raw bytes (NUL-terminated here), for the cases a Rust string
/// cannot hold.
fn bad_ids() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut v: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", b"".to_vec(), "empty"),
        ("201 bytes", vec![b'x'; 201], "over the limit"),
        (
            "67 three-byte chars (201 bytes)",
            "引".repeat(67).into_bytes(),
            "over the limit",
        ),
        ("slash", b"a/b".to_vec(), "path separator"),
        ("leading slash", b"/a".to_vec(), "path separator"),
        ("backslash", b"a\\b".to_vec(), "path separator"),
        ("dot-dot", b"..".to_vec(), "'..'"),
        ("dot-dot inside", b"a..b".to_vec(), "'..'"),
        ("parent path", b"../etc".to_vec(), ""),
        ("lone dot", b".".to_vec(), "'.'"),
        ("tab", b"a\tb".to_vec(), "control character"),
        ("newline", b"a\nb".to_vec(), "control character"),
        ("escape", b"a\x1b[31m".to_vec(), "control character"),
        ("DEL", b"a\x7f".to_vec(), "control character"),
        (
            "C1 control (U+0085)",
            "a\u{85}b".as_bytes().to_vec(),
            "control character",
        ),
        ("leading space", b" a".to_vec(), "whitespace"),
        ("trailing space", b"a ".to_vec(), "whitespace"),
        ("invalid UTF-8", vec![b'a', 0xff, 0xfe], "UTF-8"),
        ("overlong UTF-8 '/'", vec![b'a', 0xc0, 0xaf], "UTF-8"),
        ("UTF-16 surrogate", vec![0xed, 0xa0, 0x80], "UTF-8"),
        ("truncated UTF-8", vec![b'a', 0xe5, 0xbc], "UTF-8"),
    ];
    for (_, bytes, _) in v.iter_mut() {
        bytes.push(0);
    }
    v
}

#[test]
fn bad_ids_for_every_id_argument_are_refused_and_write_nothing() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("ids");
    let h = client(&etcd, &ns);
    let c = h.0;
    let good = c"good".as_ptr();
    let md = b"md".as_ptr();
    let mut wrong = Vec::new();
    for (what, bytes, says) in bad_ids() {
        let id = bytes.as_ptr() as *const c_char;
        let mut buf = empty_buf();
        let mut rec: nixl_etcd_record = unsafe { std::mem::zeroed() };
        let mut sub = 0u64;
        let mut ws = 0u32;
        let calls: Vec<(&str, i32, String)> = unsafe {
            let mut calls = Vec::new();
            let mut call = |name: &'static str, st: i32| calls.push((name, st, last_error()));
            call("register", nixl_etcd_register(c, id, 0, md, 2));
            call("unregister", nixl_etcd_unregister(c, id, 0));
            call("lookup", nixl_etcd_lookup(c, id, 0, &mut buf));
            call("wait", nixl_etcd_wait(c, id, 0, 10, &mut buf));
            call("lookup_record", nixl_etcd_lookup_record(c, id, 0, &mut rec));
            call("recheck", nixl_etcd_recheck(c, id, 0, &mut rec));
            call(
                "subscribe",
                nixl_etcd_subscribe(c, id, Some(noop), null_mut(), &mut sub),
            );
            call("wait_engine", nixl_etcd_wait_engine(c, id, 10, &mut ws));
            call(
                "publish_nixl agent",
                nixl_etcd_publish_nixl(c, id, null(), md, 2),
            );
            call(
                "fetch_nixl agent",
                nixl_etcd_fetch_nixl(c, id, null(), 0, &mut buf),
            );
            call("unpublish_nixl agent", nixl_etcd_unpublish_nixl(c, id));
            // Labels follow their own rules: '..', '\\' or a leading space
            // are a fine etcd key segment there, an empty label means
            // "metadata".
            if !matches!(
                what,
                "empty"
                    | "dot-dot"
                    | "dot-dot inside"
                    | "lone dot"
                    | "leading space"
                    | "trailing space"
                    | "backslash"
            ) {
                call(
                    "publish_nixl label",
                    nixl_etcd_publish_nixl(c, good, id, md, 2),
                );
                call(
                    "fetch_nixl label",
                    nixl_etcd_fetch_nixl(c, good, id, 0, &mut buf),
                );
            }
            calls
        };
        for (name, st, msg) in calls {
            // Label errors have their own wording; UTF-8 errors are the same.
            let says = if name.ends_with("label") && says != "UTF-8" {
                "label"
            } else {
                says
            };
            if st != INVALID || !msg.contains(says) {
                wrong.push(format!(
                    "{what}: {name} gave {st}: {msg:?} (want {INVALID}, saying {says:?})"
                ));
            }
        }
        assert!(
            buf.data.is_null() && rec.engine_id.is_null() && sub == 0,
            "{what}: buf {:?} rec {:?} sub {sub}",
            buf.data,
            rec.engine_id
        );
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let keys = all_keys(&etcd);
    assert!(keys.is_empty(), "bad ids wrote keys: {keys:?}");

    // Unusual but valid ids round-trip, under exactly the key they name.
    let max = "x".repeat(200);
    let ok_ids = [
        "引擎",
        "e.1",
        "host:5600",
        "a b",
        "UPPER_lower-09",
        "~!@#$%^&*()=+[]{};',<>?",
        max.as_str(),
    ];
    for (r, id) in ok_ids.iter().enumerate() {
        h.register(id, r as u32, &blob(r as u32, 64))
            .unwrap_or_else(|e| panic!("{id:?}: {e:?}"));
        assert_eq!(h.lookup(id, r as u32).unwrap(), blob(r as u32, 64));
    }
    let keys = all_keys(&etcd);
    for (r, id) in ok_ids.iter().enumerate() {
        assert!(
            keys.contains(&format!("{ns}/{id}/rank_{r}")),
            "{id:?} not at its key: {keys:?}"
        );
    }

    // An embedded NUL ends a C string: the library sees only what precedes
    // it, and nothing after it reaches etcd.
    let cut = b"emb\0edded/../x\0";
    unsafe {
        let id = cut.as_ptr() as *const c_char;
        assert_eq!(
            nixl_etcd_register(c, id, 0, md, 2),
            NIXL_ETCD_OK,
            "{}",
            last_error()
        );
        let mut buf = empty_buf();
        assert_eq!(nixl_etcd_lookup(c, id, 0, &mut buf), NIXL_ETCD_OK);
        nixl_etcd_buffer_free(&mut buf);
        let label = b"la\0bel/x\0";
        assert_eq!(
            nixl_etcd_publish_nixl(c, good, label.as_ptr().cast(), md, 2),
            NIXL_ETCD_OK,
            "{}",
            last_error()
        );
    }
    assert_eq!(h.lookup("emb", 0).unwrap(), b"md");
    let keys = all_keys(&etcd);
    assert!(keys.contains(&format!("{ns}/emb/rank_0")));
    assert!(
        keys.contains(&"/nixl/agents//good/la".to_owned()),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("edded") || k.contains("bel")),
        "{keys:?}"
    );
    h.close().unwrap();
}

#[test]
fn rank_uint32_max_and_extreme_timeouts() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("extremes");
    // timeout_s 1: a negative timeout_ms means this.
    let h = open(&etcd.options_json(&ns, "\"timeout_s\":1")).unwrap();
    let top = u32::MAX;
    h.register("e", top, b"top").unwrap();
    assert_eq!(h.lookup("e", top).unwrap(), b"top");
    assert_eq!(h.wait("e", top, 100).unwrap(), b"top");
    assert_eq!(h.lookup_record("e", top).unwrap().rank, top);
    assert!(all_keys(&etcd).contains(&format!("{ns}/e/rank_{top}")));
    let other = open(&etcd.options_json(&ns, "")).unwrap();
    assert_eq!(
        other.lookup("e", top).unwrap(),
        b"top",
        "a fresh client lists it too"
    );
    let sub = other.subscribe(Some("e")).unwrap();
    let ev = sub.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((ev.kind, ev.rank), (NIXL_ETCD_EVENT_ADDED, top));
    h.unregister("e", top).unwrap();
    assert_eq!(
        h.lookup("e", top).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    h.register("e", 0, b"zero").unwrap();
    h.publish_nixl("agent", None, b"blob").unwrap();

    // (timeout_ms, present: expected, absent: expected, absent's time bound)
    let within = |t: Instant, d: Duration| t.elapsed() <= d + Duration::from_millis(500);
    for ms in [i64::MIN, -1_000_000, -1] {
        // Negative: the client's timeout (1 s).
        assert_eq!(h.wait("e", 0, ms).unwrap(), b"zero");
        let t = Instant::now();
        assert_eq!(
            h.wait("absent", 0, ms).unwrap_err().status,
            NIXL_ETCD_ERR_TIMEOUT,
            "{ms}"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(950) && within(t, Duration::from_secs(1)),
            "{ms}: {:?}",
            t.elapsed()
        );
        assert_eq!(h.fetch_nixl("agent", None, ms).unwrap(), b"blob");
        let t = Instant::now();
        assert_eq!(
            h.fetch_nixl("nobody", None, ms).unwrap_err().status,
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert!(within(t, Duration::from_secs(1)));
        let t = Instant::now();
        assert_eq!(
            h.wait_engine("absent", ms).unwrap_err().status,
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert!(within(t, Duration::from_secs(1)));
    }
    // Zero: one look, no wait.
    assert_eq!(h.wait("e", 0, 0).unwrap(), b"zero");
    let t = Instant::now();
    assert_eq!(
        h.wait("absent", 1, 0).unwrap_err().status,
        NIXL_ETCD_ERR_TIMEOUT
    );
    assert_eq!(
        h.fetch_nixl("nobody", None, 0).unwrap_err().status,
        NIXL_ETCD_ERR_TIMEOUT
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Huge: present answers at once; absent blocks until close wakes it.
    for ms in [i64::MAX, i64::MAX / 2, u32::MAX as i64 * 1000] {
        assert_eq!(h.wait("e", 0, ms).unwrap(), b"zero");
        assert_eq!(h.fetch_nixl("agent", None, ms).unwrap(), b"blob");
    }
    let blocked: Vec<_> = [
        std::thread::spawn(move || {
            h.wait("absent", 2, i64::MAX)
                .map(|_| ())
                .unwrap_err()
                .status
        }),
        std::thread::spawn(move || {
            h.fetch_nixl("nobody", None, i64::MAX)
                .map(|_| ())
                .unwrap_err()
                .status
        }),
        std::thread::spawn(move || {
            h.wait_engine("absent", i64::MAX)
                .map(|_| ())
                .unwrap_err()
                .status
        }),
    ]
    .into_iter()
    .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    h.close().unwrap();
    for b in blocked {
        assert_eq!(b.join().unwrap(), NIXL_ETCD_ERR_CLOSED);
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    other.close().unwrap();

    // target_ranks at the edges: an error or an answer, never a crash (or a
    // 16 GiB list).
    let m = u32::MAX;
    for (l, r, rt) in [
        (m, 0, 1),
        (1, 0, m),
        (m, m - 1, m),
        (m, m, m),
        (0, 0, 0),
        (1, 0, 0),
        (0, 0, 1),
        (65_537, 0, 1),
        (1, 0, 65_537),
        (2, 1, 1 << 31),
    ] {
        match capi::target_ranks(l, r, rt, 8) {
            Err((f, _)) => assert_eq!(f.status, INVALID, "({l},{r},{rt}): {f:?}"),
            Ok(v) => panic!("({l},{r},{rt}) gave {v:?}"),
        }
    }
    // The largest accepted: 65,536 ranks from one, counted before copying.
    let (f, needed) = capi::target_ranks(1, 0, 65_536, 4).unwrap_err();
    assert_eq!((f.status, needed), (INVALID, 65_536));
    assert_eq!(
        capi::target_ranks(1, 0, 65_536, 65_536).unwrap().len(),
        65_536
    );
    assert_eq!(capi::target_ranks(65_536, 65_535, 1, 1).unwrap(), vec![0]);
}

#[test]
fn malformed_option_json_is_invalid_argument_naming_what_is_wrong() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let with = |extra: &str| format!("{{\"endpoints\":\"{ep}\",{extra}}}");
    let long = |n: usize| "x".repeat(n);
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "not valid JSON"),
        ("{}}".into(), "not valid JSON"),
        ("{\"timeout_s\":1,}".into(), "not valid JSON"),
        ("nul".into(), "not valid JSON"),
        ("[]".into(), "must be a JSON object"),
        ("null".into(), "must be a JSON object"),
        ("1".into(), "must be a JSON object"),
        ("\"endpoints\"".into(), "must be a JSON object"),
        ("[".repeat(100_000), "not valid JSON"),
        (format!("{{\"{}\":1}}", long(8 << 20)), "unknown option"),
        (
            with("\"Endpoints\":\"x:1\""),
            "unknown option \"Endpoints\"",
        ),
        ("{\"endpoints\":5}".into(), "option \"endpoints\" must be"),
        ("{\"endpoints\":[1]}".into(), "option \"endpoints\" must be"),
        ("{\"endpoints\":{}}".into(), "option \"endpoints\" must be"),
        ("{\"endpoints\":[]}".into(), "is empty"),
        ("{\"endpoints\":\" , \"}".into(), "is empty"),
        ("{\"endpoints\":\"host\"}".into(), "has no port"),
        ("{\"endpoints\":\"host:0\"}".into(), "no valid port"),
        ("{\"endpoints\":\"host:65536\"}".into(), "no valid port"),
        ("{\"endpoints\":\"host:-1\"}".into(), "no valid port"),
        ("{\"endpoints\":\"a b:1\"}".into(), "no valid host"),
        ("{\"endpoints\":\":2379\"}".into(), "no valid host"),
        ("{\"endpoints\":\"ftp://h:1\"}".into(), "unsupported scheme"),
        (
            "{\"endpoints\":\"https://h:1,http://h:2\"}".into(),
            "mixes https:// and plaintext",
        ),
        (with("\"timeout_s\":0"), "option \"timeout_s\""),
        (with("\"timeout_s\":-1"), "option \"timeout_s\""),
        (with("\"timeout_s\":86401"), "option \"timeout_s\""),
        (with("\"timeout_s\":1e400"), ""),
        (with("\"timeout_s\":\"5\""), "option \"timeout_s\""),
        (with("\"timeout_s\":null"), "option \"timeout_s\""),
        (with("\"timeout_s\":true"), "option \"timeout_s\""),
        (with("\"lease_ttl_s\":0"), "option \"lease_ttl_s\""),
        (with("\"lease_ttl_s\":1.5"), "option \"lease_ttl_s\""),
        (
            with("\"lease_ttl_s\":9223372036854775807"),
            "option \"lease_ttl_s\"",
        ),
        (
            with("\"lease_ttl_s\":18446744073709551616"),
            "option \"lease_ttl_s\"",
        ),
        (
            with("\"max_request_bytes\":4095"),
            "option \"max_request_bytes\"",
        ),
        (
            with("\"max_request_bytes\":2147483649"),
            "option \"max_request_bytes\"",
        ),
        (
            with("\"max_request_bytes\":-1"),
            "option \"max_request_bytes\"",
        ),
        (
            with("\"max_metadata_bytes\":-1"),
            "option \"max_metadata_bytes\"",
        ),
        (
            with("\"max_metadata_bytes\":1073741825"),
            "option \"max_metadata_bytes\"",
        ),
        (
            with("\"max_metadata_bytes\":\"64MiB\""),
            "option \"max_metadata_bytes\"",
        ),
        (with("\"world_size\":0"), "option \"world_size\""),
        (with("\"world_size\":65537"), "option \"world_size\""),
        (with("\"world_size\":4294967296"), "option \"world_size\""),
        (with("\"world_size\":2.0"), "option \"world_size\""),
        (with("\"namespace\":\"\""), "namespace"),
        (with("\"namespace\":\"/\""), "namespace"),
        (with("\"namespace\":\"/a/../b\""), "namespace"),
        (with("\"namespace\":\"/a/./b\""), "namespace"),
        (with("\"namespace\":\"/a\\u0001\""), "control character"),
        (
            with(&format!("\"namespace\":\"/{}\"", long(600))),
            "too long",
        ),
        (with("\"namespace\":7"), "option \"namespace\" must be"),
        (with("\"host\":\"\""), "option \"host\""),
        (with("\"host\":\"a b\""), "option \"host\""),
        (with("\"host\":\"a\\nb\""), "option \"host\""),
        (
            with(&format!("\"host\":\"{}\"", long(256))),
            "option \"host\"",
        ),
        (with("\"nixl_namespace\":\"\""), "NIXL namespace"),
        (
            with("\"nixl_namespace\":\"/n\\u0007\""),
            "control character",
        ),
        (
            with(&format!("\"nixl_namespace\":\"/{}\"", long(600))),
            "over the limit",
        ),
    ];
    let mut wrong = Vec::new();
    for (opts, says) in &cases {
        let mut h = null_mut();
        let c = std::ffi::CString::new(opts.as_str()).unwrap();
        let st = unsafe { nixl_etcd_open(c.as_ptr(), &mut h) };
        let msg = last_error();
        let shown: String = opts.chars().take(60).collect();
        if st != INVALID || !msg.contains(says) || msg.is_empty() || !h.is_null() {
            wrong.push(format!(
                "{shown:?}: {st} {msg:?} (want {INVALID} saying {says:?})"
            ));
        }
        if st == NIXL_ETCD_OK {
            unsafe { nixl_etcd_close(h) };
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );

    // Raw bytes: invalid UTF-8 is refused; an embedded NUL ends the
    // options (the library never sees what follows it).
    unsafe {
        let mut h = null_mut();
        let bad = b"{\"endpoints\":\"\xff\"}\0";
        assert_eq!(nixl_etcd_open(bad.as_ptr().cast(), &mut h), INVALID);
        assert!(last_error().contains("UTF-8"), "{}", last_error());
        let cut = format!("{{\"endpoints\":\"{ep}\",\"timeout_s\":2}}\0{{\"bogus\":1}}\0");
        assert_eq!(
            nixl_etcd_open(cut.as_ptr().cast(), &mut h),
            NIXL_ETCD_OK,
            "{}",
            last_error()
        );
        assert_eq!(nixl_etcd_close(h), NIXL_ETCD_OK);
        // A repeated key: the last one wins, as in most JSON readers.
        let dup = format!("{{\"endpoints\":\"x:1\",\"endpoints\":\"{ep}\"}}\0");
        assert_eq!(
            nixl_etcd_open(dup.as_ptr().cast(), &mut h),
            NIXL_ETCD_OK,
            "{}",
            last_error()
        );
        assert_eq!(nixl_etcd_close(h), NIXL_ETCD_OK);
    }
}

/// A valid record's JSON for `engine` rank `rank` with `edit` applied.
fn record_json(engine: &str, rank: u32, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let rec = nixl_etcd::Record::new(engine, rank, "node1", "0123456789abcdef", b"metadata");
    let mut v: serde_json::Value = serde_json::from_slice(&rec.to_json()).unwrap();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn records_planted_with_etcdctl_are_clear_errors_never_a_crash() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("planted");
    // Follows engine "e" from before the plants (the watch path); `fresh`
    // first reads it after them (the list path).
    let early = client(&etcd, &ns);
    early.register("e", 0, b"good rank").unwrap();
    let events = early.subscribe(Some("e")).unwrap();
    assert_eq!(
        events.rx.recv_timeout(Duration::from_secs(5)).unwrap().rank,
        0
    );

    let mut nested = "[".repeat(50_000);
    nested.push_str(&"]".repeat(50_000));
    type Make = Box<dyn Fn(u32) -> Vec<u8>>;
    let fixed = |v: Vec<u8>| -> Make { Box::new(move |_| v.clone()) };
    let cases: Vec<(&str, Make, &str)> = vec![
        ("text", fixed(b"this is not json".to_vec()), "unreadable"),
        (
            "binary",
            fixed(vec![0, 0xff, 0xfe, b'{', 0, 1, 2]),
            "unreadable",
        ),
        ("empty value", fixed(Vec::new()), "unreadable"),
        ("JSON null", fixed(b"null".to_vec()), "unreadable"),
        ("JSON array", fixed(b"[1,2,3]".to_vec()), "unreadable"),
        ("empty object", fixed(b"{}".to_vec()), "no format version"),
        ("deep nesting", fixed(nested.into_bytes()), "unreadable"),
        (
            "huge garbage (1.4 MiB)",
            fixed(vec![b'#'; 1400 * 1024]),
            "unreadable",
        ),
        (
            "format 2",
            Box::new(|r| record_json("e", r, |v| v["format"] = 2.into())),
            "format version 2",
        ),
        (
            "format 999999",
            Box::new(|r| record_json("e", r, |v| v["format"] = 999_999.into())),
            "format version 999999",
        ),
        (
            "format as text",
            Box::new(|r| record_json("e", r, |v| v["format"] = "1".into())),
            "unreadable",
        ),
        (
            "another engine",
            Box::new(|r| record_json("other", r, |_| ())),
            "expected engine",
        ),
        (
            "another rank",
            Box::new(|r| record_json("e", r + 1000, |_| ())),
            "expected engine",
        ),
        (
            "metadata not base64",
            Box::new(|r| record_json("e", r, |v| v["metadata"] = "!!!".into())),
            "not base64",
        ),
        (
            "metadata_len wrong",
            Box::new(|r| record_json("e", r, |v| v["metadata_len"] = 7.into())),
            "the record says 7",
        ),
        (
            "metadata_len u64::MAX",
            Box::new(|r| record_json("e", r, |v| v["metadata_len"] = u64::MAX.into())),
            "the record says",
        ),
        (
            "rank negative",
            Box::new(|r| record_json("e", r, |v| v["rank"] = (-1).into())),
            "unreadable",
        ),
        (
            "pid as text",
            Box::new(|r| record_json("e", r, |v| v["pid"] = "17".into())),
            "unreadable",
        ),
    ];
    let first = 1u32;
    for (i, (_, make, _)) in cases.iter().enumerate() {
        let rank = first + i as u32;
        plant(&etcd, &format!("{ns}/e/rank_{rank}"), &make(rank));
    }
    // Keys under the engine that are not rank records are ignored.
    for odd in [
        "rank_",
        "rank_x",
        "rank_-1",
        "rank_99999999999",
        "other",
        "rank_1/extra",
        "RANK_1",
    ] {
        plant(&etcd, &format!("{ns}/e/{odd}"), b"whatever");
    }
    plant(&etcd, &format!("{ns}/e"), b"no slash");
    // A valid record with a 1 MiB host is a record, however odd.
    let big_host = "h".repeat(1 << 20);
    let huge_ok = first + cases.len() as u32;
    plant(
        &etcd,
        &format!("{ns}/e/rank_{huge_ok}"),
        &record_json("e", huge_ok, |v| v["host"] = big_host.clone().into()),
    );
    // Extra fields from a newer writer of the same format are ignored.
    let extra_ok = huge_ok + 1;
    plant(
        &etcd,
        &format!("{ns}/e/rank_{extra_ok}"),
        &record_json("e", extra_ok, |v| v["added_later"] = 5.into()),
    );

    let fresh = client(&etcd, &ns);
    let mut wrong = Vec::new();
    for (i, (what, _, says)) in cases.iter().enumerate() {
        let rank = first + i as u32;
        let key = format!("{ns}/e/rank_{rank}");
        for (who, h) in [("watching client", early), ("fresh client", fresh)] {
            // The watching client may not have the watch event yet.
            let mut got = h.lookup("e", rank);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(&got, Err(f) if f.status == NIXL_ETCD_ERR_NOT_FOUND)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
                got = h.lookup("e", rank);
            }
            let results = [
                ("lookup", got.map(|_| ())),
                ("wait", h.wait("e", rank, 100).map(|_| ())),
                ("lookup_record", h.lookup_record("e", rank).map(|_| ())),
            ];
            for (call, r) in results {
                match r {
                    Err(f) if f.status == NIXL_ETCD_ERR_BAD_RECORD && f.message.contains(says) && f.message.contains(&key) => {}
                    other => wrong.push(format!("{what}: {who} {call} gave {other:?}, want BAD_RECORD saying {says:?} and the key")),
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Everything readable still reads, from both clients.
    for h in [early, fresh] {
        assert_eq!(h.lookup("e", 0).unwrap(), b"good rank");
        let rec = h.lookup_record("e", huge_ok).unwrap();
        assert_eq!(
            (rec.host.len(), &rec.metadata[..]),
            (1 << 20, &b"metadata"[..])
        );
        assert_eq!(h.lookup("e", extra_ok).unwrap(), b"metadata");
    }
    // A whole-engine wait is not fooled: unreadable ranks count as missing.
    let err = fresh.wait_engine("e", 200).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT, "{err:?}");
    // Subscribers were told about readable records only, and a fresh
    // subscription replays only those.
    let replay = fresh.subscribe(Some("e")).unwrap();
    let mut ranks: Vec<u32> = Vec::new();
    while let Ok(ev) = replay.rx.recv_timeout(Duration::from_millis(500)) {
        assert_eq!(ev.kind, NIXL_ETCD_EVENT_ADDED);
        ranks.push(ev.rank);
    }
    ranks.sort();
    assert_eq!(ranks, vec![0, huge_ok, extra_ok]);
    // Overwritten by a real registration, each rank reads again.
    for i in 0..cases.len() as u32 {
        early.register("e", first + i, &blob(i, 100)).unwrap();
    }
    // The fresh client's cache learns of each overwrite from its watch; until
    // then it still holds the unreadable record.
    for i in 0..cases.len() as u32 {
        assert!(
            common::wait_until(Duration::from_secs(10), || fresh
                .lookup("e", first + i)
                .is_ok_and(|v| v == blob(i, 100))),
            "rank {} never read again",
            first + i
        );
    }
    early.close().unwrap();
    fresh.close().unwrap();
}
