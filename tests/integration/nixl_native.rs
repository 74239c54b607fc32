//! The NIXL-native key layout (`nixl_etcd_publish_nixl`, `_fetch_nixl`,
//! `_unpublish_nixl`), through the C ABI, against a private etcd: the exact
//! keys and raw bytes NIXL's built-in etcd exchange writes, under the client's
//! lease.

use std::ffi::CString;
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

use crate::capi::{blob, last_error, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, wait_until, EtcdServer};
use base64::Engine as _;
use nixl_etcd::ffi::*;

/// NIXL's default namespace, and the keys it gives agent `A`.
const NS: &str = "/nixl/agents/";
const MARKER_A: &str = "/nixl/agents//A/";
const METADATA_A: &str = "/nixl/agents//A/metadata";

fn client(etcd: &EtcdServer, extra: &str) -> Handle {
    // The rank namespace is unique per test; the NIXL namespace is the
    // default unless `extra` sets `nixl_namespace`.
    let opts = etcd.options_json(&unique_namespace("nixl"), extra);
    open(&opts).unwrap_or_else(|f| panic!("open {opts}: {f:?}"))
}

/// One key as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kv {
    key: String,
    value: Vec<u8>,
    lease: i64,
    mod_revision: i64,
}

fn b64(v: &serde_json::Value) -> Vec<u8> {
    // etcdctl's JSON leaves an empty value out.
    let s = v.as_str().unwrap_or("");
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64: {s:?}: {e}"))
}

/// Every key under `prefix`, in key order, read with `etcdctl -w json`
/// (base64 keys and values: the bytes exactly as stored).
fn kvs_under(etcd: &EtcdServer, prefix: &str) -> Vec<Kv> {
    let json = etcdctl_ok(etcd, &["get", "--prefix", prefix, "-w", "json"]);
    let resp: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let Some(kvs) = resp["kvs"].as_array() else {
        return Vec::new();
    };
    kvs.iter()
        .map(|kv| Kv {
            key: String::from_utf8(b64(&kv["key"])).unwrap(),
            value: b64(&kv["value"]),
            lease: kv["lease"].as_i64().unwrap_or(0),
            mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
        })
        .collect()
}

fn keys_under(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    kvs_under(etcd, prefix)
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// etcd's current revision.
fn revision(etcd: &EtcdServer) -> i64 {
    let json = etcdctl_ok(etcd, &["get", "/", "-w", "json"]);
    let resp: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    resp["header"]["revision"].as_i64().unwrap()
}

/// The keys attached to `lease`, as `etcdctl lease timetolive --keys` lists them.
fn lease_keys(etcd: &EtcdServer, lease: i64) -> String {
    etcdctl_ok(
        etcd,
        &["lease", "timetolive", &format!("{lease:x}"), "--keys"],
    )
}

#[test]
fn publish_writes_nixls_keys_and_raw_bytes_with_the_default_namespace() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, "");
    let md = blob(1, 8192);
    assert!(md.contains(&0));
    let before = revision(&etcd);
    a.publish_nixl("A", None, &md).unwrap();
    let kvs = kvs_under(&etcd, NS);
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    // NIXL builds keys as ns + "/" + agent + "/" + label: a double slash.
    assert_eq!(keys, [MARKER_A, METADATA_A]);
    assert!(kvs[0].value.is_empty(), "the marker is empty");
    assert_eq!(kvs[1].value, md, "the blob is stored raw");
    // One transaction: one new revision, both keys written at it.
    assert_eq!(revision(&etcd), before + 1);
    assert_eq!(kvs[0].mod_revision, before + 1);
    assert_eq!(kvs[1].mod_revision, before + 1);
    // Both under the client's lease.
    let lease = kvs[0].lease;
    assert_ne!(lease, 0, "the keys must be attached to a lease: {kvs:?}");
    assert_eq!(kvs[1].lease, lease);
    let attached = lease_keys(&etcd, lease);
    assert!(
        attached.contains(MARKER_A) && attached.contains(METADATA_A),
        "{attached}"
    );
    // "" is "metadata" too; another label is partial metadata beside it.
    let md2 = blob(2, 500);
    a.publish_nixl("A", Some(""), &md2).unwrap();
    a.publish_nixl("A", Some("part_1"), b"partial\0md").unwrap();
    let kvs = kvs_under(&etcd, NS);
    let got: Vec<(&str, &[u8])> = kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(
        got,
        [
            (MARKER_A, &b""[..]),
            (METADATA_A, &md2[..]),
            ("/nixl/agents//A/part_1", &b"partial\0md"[..]),
        ]
    );
    assert!(kvs.iter().all(|kv| kv.lease == lease), "{kvs:?}");
    // A NIXL key never shows up as a rank record.
    assert_eq!(
        a.lookup("A", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    a.close().unwrap();
}

#[test]
fn a_custom_nixl_namespace_is_used_verbatim() {
    let etcd = EtcdServer::start();
    let plain = client(&etcd, r#""nixl_namespace":"/team-x/nixl""#);
    let slashed = client(&etcd, r#""nixl_namespace":"/team-y/nixl/""#);
    let bare = client(&etcd, r#""nixl_namespace":"team-z""#);
    plain.publish_nixl("A", None, b"x").unwrap();
    slashed.publish_nixl("A", None, b"y").unwrap();
    bare.publish_nixl("A", None, b"z").unwrap();
    assert_eq!(
        keys_under(&etcd, "/team-x/"),
        ["/team-x/nixl/A/", "/team-x/nixl/A/metadata"]
    );
    assert_eq!(
        keys_under(&etcd, "/team-y/"),
        ["/team-y/nixl//A/", "/team-y/nixl//A/metadata"]
    );
    assert_eq!(
        keys_under(&etcd, "team-z"),
        ["team-z/A/", "team-z/A/metadata"]
    );
    // Nothing under NIXL's default namespace.
    assert!(keys_under(&etcd, NS).is_empty());
    // A reader with the same namespace finds it; one with the default does not.
    let reader = client(&etcd, r#""nixl_namespace":"/team-y/nixl/""#);
    assert_eq!(reader.fetch_nixl("A", None, 1000).unwrap(), b"y");
    let other = client(&etcd, "");
    assert_eq!(
        other.fetch_nixl("A", None, 200).unwrap_err().status,
        NIXL_ETCD_ERR_TIMEOUT
    );
    for h in [plain, slashed, bare, reader, other] {
        h.close().unwrap();
    }
}

#[test]
fn fetch_returns_a_blob_published_later_by_another_client() {
    let etcd = EtcdServer::start();
    let peer = client(&etcd, "");
    let publisher = client(&etcd, "");
    let md = blob(3, 40_000);
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let got = peer.fetch_nixl("A", None, 20_000);
        (got, t.elapsed(), peer)
    });
    std::thread::sleep(Duration::from_millis(300));
    let published_at = Instant::now();
    publisher.publish_nixl("A", None, &md).unwrap();
    let (got, waited, peer) = waiter.join().unwrap();
    assert_eq!(got.unwrap(), md);
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    // It returned because of the publish, not a timeout.
    assert!(
        published_at.elapsed() < Duration::from_secs(5),
        "{:?}",
        published_at.elapsed()
    );
    // Already there: at once. Labels are separate keys.
    assert_eq!(peer.fetch_nixl("A", Some("metadata"), 1000).unwrap(), md);
    publisher.publish_nixl("A", Some("part_1"), b"p1").unwrap();
    assert_eq!(peer.fetch_nixl("A", Some("part_1"), 1000).unwrap(), b"p1");
    // Publishing again replaces.
    publisher.publish_nixl("A", None, b"second").unwrap();
    assert_eq!(peer.fetch_nixl("A", None, 1000).unwrap(), b"second");
    // A key written by someone else (stock NIXL writes without a lease) is
    // read the same way.
    etcdctl_ok(
        &etcd,
        &["put", "/nixl/agents//S/metadata", "written by NIXL"],
    );
    assert_eq!(
        peer.fetch_nixl("S", None, 1000).unwrap(),
        b"written by NIXL"
    );
    peer.close().unwrap();
    publisher.close().unwrap();
}

#[test]
fn fetch_times_out_cleanly_with_the_agent_and_key() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, r#""timeout_s":1.5"#);
    let t = Instant::now();
    let err = a.fetch_nixl("ghost", None, 400).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        err.message.starts_with(
            "Timeout waiting for NIXL agent ghost (key /nixl/agents//ghost/metadata) after 0.4 s; "
        ),
        "{}",
        err.message
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1400),
        "{took:?}"
    );
    // timeout_ms < 0: the client's timeout (1.5 s here).
    let t = Instant::now();
    let err = a.fetch_nixl("ghost", Some("part_9"), -1).unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        err.message
            .contains("(key /nixl/agents//ghost/part_9) after 1.5 s"),
        "{}",
        err.message
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // timeout_ms 0: one read, no wait.
    let t = Instant::now();
    let err = a.fetch_nixl("ghost", None, 0).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(err.message.contains("after 0.0 s"), "{}", err.message);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The client works normally afterwards.
    a.publish_nixl("ghost", None, b"here").unwrap();
    assert_eq!(a.fetch_nixl("ghost", None, 0).unwrap(), b"here");
    a.close().unwrap();
}

#[test]
fn close_wakes_a_blocked_fetch_with_closed() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, "");
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        (a.fetch_nixl("never", None, 30_000), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    a.close().unwrap();
    let (res, took) = waiter.join().unwrap();
    let err = res.unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_CLOSED, "{}", err.message);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn unpublish_deletes_the_whole_agent_prefix_at_once() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, "");
    let b = client(&etcd, "");
    a.publish_nixl("A", None, &blob(4, 1000)).unwrap();
    a.publish_nixl("A", Some("part_1"), b"p1").unwrap();
    a.publish_nixl("AB", None, b"other agent").unwrap();
    // A key under the prefix that this client did not write: NIXL's
    // invalidate deletes it too.
    etcdctl_ok(&etcd, &["put", "/nixl/agents//A/extra", "x"]);
    // Only the publisher may unpublish.
    let err = b.unpublish_nixl("A").unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_NOT_FOUND);
    assert!(
        err.message.contains("not published by this client"),
        "{}",
        err.message
    );
    assert_eq!(keys_under(&etcd, MARKER_A).len(), 4);
    let before = revision(&etcd);
    a.unpublish_nixl("A").unwrap();
    // One request: one revision for the marker and every label.
    assert_eq!(revision(&etcd), before + 1);
    assert!(keys_under(&etcd, MARKER_A).is_empty());
    // "AB" shares the characters but not the prefix "/nixl/agents//A/".
    assert_eq!(
        keys_under(&etcd, NS),
        ["/nixl/agents//AB/", "/nixl/agents//AB/metadata"]
    );
    assert_eq!(
        a.unpublish_nixl("A").unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    assert_eq!(
        b.fetch_nixl("A", None, 200).unwrap_err().status,
        NIXL_ETCD_ERR_TIMEOUT
    );
    // Published again after an unpublish: back, under the same lease.
    a.publish_nixl("A", None, b"again").unwrap();
    assert_eq!(b.fetch_nixl("A", None, 1000).unwrap(), b"again");
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn close_deletes_everything_at_once() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, r#""lease_ttl_s":60"#);
    let ns = unique_namespace("nixl-close");
    let ranks = open(&etcd.options_json(&ns, r#""lease_ttl_s":60"#)).unwrap();
    for agent in ["A", "B", "C"] {
        a.publish_nixl(agent, None, &blob(5, 2000)).unwrap();
        a.publish_nixl(agent, Some("part_1"), b"p").unwrap();
    }
    ranks.register("prefill_engine", 0, b"rank").unwrap();
    assert_eq!(keys_under(&etcd, NS).len(), 9);
    a.close().unwrap();
    // Gone at once, though the lease TTL is 60 s.
    assert!(keys_under(&etcd, NS).is_empty());
    // Another client's keys stay.
    assert_eq!(keys_under(&etcd, &ns).len(), 1);
    assert_eq!(
        a.publish_nixl("A", None, b"x").unwrap_err().status,
        NIXL_ETCD_ERR_CLOSED
    );
    assert_eq!(
        a.fetch_nixl("A", None, 10).unwrap_err().status,
        NIXL_ETCD_ERR_CLOSED
    );
    assert_eq!(
        a.unpublish_nixl("A").unwrap_err().status,
        NIXL_ETCD_ERR_CLOSED
    );
    ranks.close().unwrap();
}

#[test]
fn oversize_blobs_are_too_large_and_nothing_is_written() {
    let etcd = EtcdServer::builder().max_request_bytes(64 * 1024).start();
    let a = client(&etcd, r#""max_request_bytes":65536"#);
    // Raw bytes, no base64: 60 KiB fits in a 64 KiB request.
    let md = blob(6, 60 * 1024);
    a.publish_nixl("A", None, &md).unwrap();
    let err = a
        .publish_nixl("big", None, &blob(7, 70 * 1024))
        .unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE);
    assert!(err.message.contains("71680 bytes"), "{}", err.message);
    assert!(
        err.message.contains("max_request_bytes=65536"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("nothing was written"),
        "{}",
        err.message
    );
    // Replacing A's blob with one too large leaves the old one.
    let err = a.publish_nixl("A", None, &blob(8, 70 * 1024)).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE);
    assert_eq!(keys_under(&etcd, NS), [MARKER_A, METADATA_A]);
    assert_eq!(kvs_under(&etcd, METADATA_A)[0].value, md);
    // A client that believes the limit is larger gets TOO_LARGE from etcd,
    // and the transaction leaves no marker without its blob.
    let b = client(&etcd, "");
    let err = b
        .publish_nixl("big", None, &blob(9, 100 * 1024))
        .unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE, "{}", err.message);
    assert_eq!(keys_under(&etcd, NS), [MARKER_A, METADATA_A]);
    a.close().unwrap();
    b.close().unwrap();
}

#[test]
fn bad_arguments_are_invalid_argument_and_write_nothing() {
    let etcd = EtcdServer::start();
    let a = client(&etcd, "");
    let agent = CString::new("A").unwrap();
    let bad_utf8 = [0x66u8, 0xff, 0xfe, 0];
    let mut buf = nixl_etcd_buffer {
        data: null_mut(),
        len: 0,
    };
    let (a0, ap, bad) = (a.0, agent.as_ptr(), bad_utf8.as_ptr().cast());
    let x = b"x".as_ptr();
    let buf_ptr: *mut nixl_etcd_buffer = &mut buf;
    type Call<'a> = Box<dyn Fn() -> nixl_etcd_status + 'a>;
    let cases: Vec<(Call, &str)> = vec![
        (
            Box::new(|| unsafe { nixl_etcd_publish_nixl(null_mut(), ap, null(), x, 1) }),
            "client is NULL",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_publish_nixl(a0, null(), null(), x, 1) }),
            "agent_name is NULL",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_publish_nixl(a0, ap, null(), null(), 5) }),
            "blob is NULL but its length is 5",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_publish_nixl(a0, bad, null(), x, 1) }),
            "agent_name is not valid UTF-8",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_publish_nixl(a0, ap, bad, x, 1) }),
            "label is not valid UTF-8",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_fetch_nixl(a0, ap, null(), 10, null_mut()) }),
            "out buffer is NULL",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_fetch_nixl(a0, null(), null(), 10, buf_ptr) }),
            "agent_name is NULL",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_fetch_nixl(a0, ap, bad, 10, buf_ptr) }),
            "label is not valid UTF-8",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_unpublish_nixl(a0, null()) }),
            "agent_name is NULL",
        ),
        (
            Box::new(|| unsafe { nixl_etcd_unpublish_nixl(null_mut(), ap) }),
            "client is NULL",
        ),
    ];
    for (call, want) in &cases {
        assert_eq!(call(), NIXL_ETCD_ERR_INVALID_ARGUMENT, "{want}");
        assert!(last_error().contains(want), "{want}: {}", last_error());
    }
    assert!(buf.data.is_null() && buf.len == 0);
    // A handle that was never opened is refused.
    let rc = unsafe { nixl_etcd_fetch_nixl(0xdead_beef as *mut _, ap, null(), 10, &mut buf) };
    assert_eq!(rc, NIXL_ETCD_ERR_CLOSED);
    // Agent names that could escape or alias the namespace.
    let long = "x".repeat(201);
    for name in [
        "",
        "a/b",
        "..",
        "../x",
        ".",
        "a\\b",
        "tab\there",
        " a",
        &long,
    ] {
        let err = a.publish_nixl(name, None, b"x").unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{name:?}");
        assert!(err.message.contains("agent_name"), "{}", err.message);
        assert!(!err.message.contains("engine_id"), "{}", err.message);
        let err = a.fetch_nixl(name, None, 10).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{name:?}");
        let err = a.unpublish_nixl(name).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{name:?}");
    }
    // Labels: no '/', no control characters, bounded.
    let long_label = "l".repeat(201);
    for label in ["a/b", "/", "tab\there", "nl\n", &long_label] {
        let err = a.publish_nixl("A", Some(label), b"x").unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{label:?}");
        assert!(err.message.contains("label"), "{}", err.message);
        let err = a.fetch_nixl("A", Some(label), 10).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{label:?}");
    }
    let keys = etcdctl_ok(&etcd, &["get", "--prefix", "", "--keys-only"]);
    assert!(keys.trim().is_empty(), "nothing may be written: {keys}");
    a.close().unwrap();

    // Bad NIXL namespaces are refused at open, naming the option.
    for (opts, want) in [
        (r#""nixl_namespace":"""#, "it is empty"),
        (r#""nixl_namespace":"/a\nb""#, "control character"),
        (r#""nixl_namespace":3"#, "option \"nixl_namespace\" must be"),
    ] {
        let err = open(&etcd.options_json("/x", opts)).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{opts}");
        assert!(err.message.contains(want), "{opts}: {}", err.message);
        assert!(err.message.contains("nixl_namespace"), "{}", err.message);
    }
    // A NIXL namespace equal to the rank namespace would let an unpublish
    // delete an engine's rank records: refused.
    let same = open(&etcd.options_json(
        "/vllm/nixl/agents",
        r#""nixl_namespace":"/vllm/nixl/agents""#,
    ))
    .unwrap();
    let err = same.publish_nixl("prefill_engine", None, b"x").unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT);
    assert!(err.message.contains("rank records"), "{}", err.message);
    same.close().unwrap();
    let keys = etcdctl_ok(&etcd, &["get", "--prefix", "", "--keys-only"]);
    assert!(keys.trim().is_empty(), "nothing may be written: {keys}");
}

#[test]
fn nixl_keys_come_back_after_a_lease_loss() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("nixl-lease");
    let owner = open(&etcd.options_json(&ns, r#""lease_ttl_s":2,"timeout_s":2"#)).unwrap();
    let md = blob(10, 4096);
    owner.publish_nixl("A", None, &md).unwrap();
    owner.publish_nixl("A", Some("part_1"), b"p\0art").unwrap();
    owner.publish_nixl("B", None, b"b").unwrap();
    owner.publish_nixl("gone", None, b"g").unwrap();
    owner.unpublish_nixl("gone").unwrap();
    owner.register("prefill_engine", 0, b"rank 0").unwrap();
    let before = kvs_under(&etcd, NS);
    assert_eq!(before.len(), 5);
    let old = before[0].lease;
    assert_ne!(old, 0);
    etcdctl_ok(&etcd, &["lease", "revoke", &format!("{old:x}")]);
    // The client notices on its next renewal, re-grants and re-writes every
    // key it holds: NIXL-layout keys and rank records alike.
    assert!(
        wait_until(Duration::from_secs(5), || kvs_under(&etcd, NS).len() == 5
            && keys_under(&etcd, &ns).len() == 1),
        "not re-registered: {:?} / {:?}",
        keys_under(&etcd, NS),
        keys_under(&etcd, &ns)
    );
    let after = kvs_under(&etcd, NS);
    let new = after[0].lease;
    assert!(new != 0 && new != old, "old {old:x} new {new:x}");
    assert!(after.iter().all(|kv| kv.lease == new), "{after:?}");
    let strip = |kvs: &[Kv]| -> Vec<(String, Vec<u8>)> {
        kvs.iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect()
    };
    assert_eq!(strip(&after), strip(&before));
    // The agent unpublished before the loss stays gone.
    assert!(keys_under(&etcd, "/nixl/agents//gone/").is_empty());
    // Each label is back no later than its marker (reverse key order).
    let rev = |k: &str| after.iter().find(|kv| kv.key == k).unwrap().mod_revision;
    assert!(rev(METADATA_A) < rev(MARKER_A));
    assert!(rev("/nixl/agents//A/part_1") < rev(MARKER_A));
    // Later publishes go under the new lease, and close still removes all.
    owner.publish_nixl("C", None, b"late").unwrap();
    assert_eq!(kvs_under(&etcd, "/nixl/agents//C/")[0].lease, new);
    owner.close().unwrap();
    assert!(keys_under(&etcd, NS).is_empty());
    assert!(keys_under(&etcd, &ns).is_empty());
}
