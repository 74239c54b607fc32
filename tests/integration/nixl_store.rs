//! The NIXL TCPStore front end (`nixl_store`, `nixl-etcd serve`) against a
//! real etcd: the protocol subset NIXL uses, the key mapping, bad input,
//! writer lifetime (pid tracking, reconnects, remote grace, a killed store)
//! and an etcd restart. Stock NIXL agents are in python/tests/test_nixl_store.py.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{etcdctl_ok, holds_for, keys_under, unique_namespace, wait_until, EtcdServer};
use nixl_etcd::nixl_store::codec::{self, Query};
use nixl_etcd::nixl_store::{Liveness, NixlStore, StoreOptions};
use nixl_etcd::{Client, Config};

const BIN: &str = env!("CARGO_BIN_EXE_nixl-etcd");
const LONG: Duration = Duration::from_secs(30);

fn config(etcd: &EtcdServer, nixl_ns: &str, extra: &str) -> Config {
    let extra = if extra.is_empty() {
        format!(r#""nixl_namespace":"{nixl_ns}""#)
    } else {
        format!(r#""nixl_namespace":"{nixl_ns}",{extra}"#)
    };
    Config::load(Some(&etcd.options_json(&unique_namespace("ranks"), &extra))).unwrap()
}

fn store(etcd: &EtcdServer, nixl_ns: &str, extra: &str, opts: StoreOptions) -> (Client, NixlStore) {
    let client = Client::open(config(etcd, nixl_ns, extra)).unwrap();
    let store = NixlStore::start(&client, "127.0.0.1:0", opts).unwrap();
    (client, store)
}

/// A TCPStore client speaking what NIXL's backend sends.
struct Peer {
    s: TcpStream,
}

impl Peer {
    fn connect(addr: SocketAddr) -> Peer {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        // As NIXL's client: a query right after a SET is not held back.
        s.set_nodelay(true).unwrap();
        let mut p = Peer { s };
        p.send(&Query::Validate(codec::MAGIC));
        p
    }
    fn send(&mut self, q: &Query) {
        self.s.write_all(&codec::encode(q)).unwrap();
    }
    fn ping(&mut self, n: u32) -> u32 {
        self.send(&Query::Ping(n));
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_ne_bytes(b)
    }
    fn set(&mut self, k: &str, v: &[u8]) {
        self.send(&Query::Set(k.into(), v.to_vec()));
    }
    fn get(&mut self, k: &str) -> Vec<u8> {
        self.send(&Query::Get(k.into()));
        let mut n = [0u8; 8];
        self.s.read_exact(&mut n).unwrap();
        let mut v = vec![0u8; u64::from_ne_bytes(n) as usize];
        self.s.read_exact(&mut v).unwrap();
        v
    }
    fn check(&mut self, keys: &[&str]) -> u8 {
        self.send(&Query::Check(
            keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
        ));
        let mut b = [0u8; 1];
        self.s.read_exact(&mut b).unwrap();
        b[0]
    }
    fn delete(&mut self, k: &str) -> i64 {
        self.send(&Query::Delete(k.into()));
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).unwrap();
        i64::from_ne_bytes(b)
    }
    /// True once the store closed the connection (EOF or reset).
    fn closed_by_store(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// `etcdctl get KEY -w json`: (value, lease) or None.
fn etcd_get(etcd: &EtcdServer, key: &str) -> Option<(Vec<u8>, i64)> {
    use base64::Engine as _;
    let json = etcdctl_ok(etcd, &["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let kv = v["kvs"].get(0)?;
    let value = base64::engine::general_purpose::STANDARD
        .decode(kv["value"].as_str().unwrap_or(""))
        .unwrap();
    Some((value, kv["lease"].as_i64().unwrap_or(0)))
}

const MD_A: &str = "/nixl/agents/metadata/A/NULL_AGENT";

#[test]
fn the_protocol_subset_nixl_uses_maps_onto_nixls_etcd_layout() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("nixl");
    let (client, store) = store(&etcd, &ns, "", StoreOptions::default());
    let mut p = Peer::connect(store.local_addr());
    assert_eq!(p.ping(0xdead_beef), 0xdead_beef);
    let md = blob(451, 7);
    assert_eq!(p.check(&[MD_A]), codec::NOT_READY);
    assert_eq!(p.get(MD_A), b"");
    p.set(MD_A, &md);
    p.set("/nixl/agents/part/A/NULL_AGENT", b"partial\0bytes");
    p.set("/nixl/agents/metadata/A/B", b"to B only");
    assert_eq!(
        p.check(&[MD_A, "/nixl/agents/part/A/NULL_AGENT"]),
        codec::READY
    );
    assert_eq!(p.get(MD_A), md);

    // NIXL's etcd layout, each key under a lease.
    let (v, lease) = etcd_get(&etcd, &format!("{ns}/A/metadata")).unwrap();
    assert_eq!(v, md);
    assert_ne!(lease, 0);
    let (v, marker_lease) = etcd_get(&etcd, &format!("{ns}/A/")).unwrap();
    assert_eq!((v.as_slice(), marker_lease), (&b""[..], lease));
    assert_eq!(
        etcd_get(&etcd, &format!("{ns}/A/part")).unwrap().0,
        b"partial\0bytes"
    );
    let verbatim = "/nixl-etcd/tcpstore/nixl/agents/metadata/A/B";
    let (v, vlease) = etcd_get(&etcd, verbatim).unwrap();
    assert_eq!((v.as_slice(), vlease), (&b"to B only"[..], lease));

    // This library's NIXL-layout calls see it, and the store sees theirs.
    assert_eq!(client.fetch_nixl("A", None, None).unwrap(), md);
    client
        .publish_nixl("C", Some("metadata"), b"from the API")
        .unwrap();
    // The store serves reads from its watch-fed copy: as NIXL does, CHECK
    // until the key is there, then GET (a write made around the store shows
    // up once its watch event arrives, which a loaded machine delays).
    let c_key = "/nixl/agents/metadata/C/NULL_AGENT";
    assert!(wait_until(LONG, || p.check(&[c_key]) == 0));
    assert_eq!(p.get(c_key), b"from the API");

    // A second connection reads the same.
    let mut q = Peer::connect(store.local_addr());
    assert_eq!(q.get("/nixl/agents/part/A/NULL_AGENT"), b"partial\0bytes");
    assert_eq!(
        q.get(verbatim.trim_start_matches("/nixl-etcd/tcpstore")),
        b"to B only"
    );

    // Invalidate: a label alone, then the metadata takes the whole agent.
    assert_eq!(p.delete("/nixl/agents/part/A/NULL_AGENT"), 1);
    assert_eq!(p.delete("/nixl/agents/part/A/NULL_AGENT"), 0);
    assert!(etcd_get(&etcd, &format!("{ns}/A/part")).is_none());
    assert!(etcd_get(&etcd, &format!("{ns}/A/")).is_some());
    assert_eq!(p.delete(MD_A), 1);
    assert_eq!(keys_under(&etcd, &format!("{ns}/A/")), Vec::<String>::new());
    assert_eq!(q.check(&[MD_A]), codec::NOT_READY);
    assert_eq!(q.get(MD_A), b"");
    assert_eq!(p.delete(MD_A), 0);
    assert_eq!(p.delete("/nixl/agents/metadata/A/B"), 1);
    assert!(etcd_get(&etcd, verbatim).is_none());
    store.stop().unwrap();
    client.close().unwrap();
}

#[test]
fn check_waits_briefly_for_a_key_published_meanwhile() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("wait");
    let opts = StoreOptions {
        check_wait: Duration::from_secs(4),
        ..StoreOptions::default()
    };
    let (client, store) = store(&etcd, &ns, "", opts);
    let mut fetcher = Peer::connect(store.local_addr());
    let other = Client::open(client.config().clone()).unwrap();
    let publisher = std::thread::spawn(move || {
        // Published by another client straight into etcd, while the CHECK
        // below is waiting (it answers only when the key is there).
        std::thread::sleep(Duration::from_millis(300));
        other.publish_nixl("W", None, b"late").unwrap();
        other
    });
    assert_eq!(
        fetcher.check(&["/nixl/agents/metadata/W/NULL_AGENT"]),
        codec::READY
    );
    assert_eq!(fetcher.get("/nixl/agents/metadata/W/NULL_AGENT"), b"late");
    publisher.join().unwrap().close().unwrap();
    store.stop().unwrap();
    client.close().unwrap();
}

#[test]
fn bad_input_closes_that_connection_only() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("bad");
    let opts = StoreOptions {
        stall: Duration::from_millis(300),
        max_value_bytes: Some(4096),
        ..StoreOptions::default()
    };
    let (client, store) = store(&etcd, &ns, "", opts);
    let addr = store.local_addr();
    let mut good = Peer::connect(addr);
    good.set(MD_A, b"ok");
    assert_eq!(good.ping(9), 9); // the SET is applied

    let raw = |bytes: &[u8]| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        s.write_all(bytes).unwrap();
        Peer { s }
    };
    let validate = codec::encode(&Query::Validate(codec::MAGIC));
    let with_validate = |rest: &[u8]| [validate.as_slice(), rest].concat();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("unknown type", with_validate(&[42, 0, 0, 0])),
        ("no VALIDATE first", codec::encode(&Query::Get(MD_A.into()))),
        (
            // Refused at its first byte: the 64 MiB are never read.
            "a SET of 64 MiB before VALIDATE",
            [
                &[codec::SET][..],
                &1u64.to_ne_bytes(),
                b"k",
                &(64u64 << 20).to_ne_bytes(),
            ]
            .concat(),
        ),
        ("wrong magic", codec::encode(&Query::Validate(0x1234))),
        (
            "value over max_value_bytes",
            with_validate(&codec::encode(&Query::Set(MD_A.into(), vec![1; 4097]))),
        ),
        (
            "key length u64::MAX",
            with_validate(&[&[codec::GET][..], &u64::MAX.to_ne_bytes()].concat()),
        ),
        (
            "CHECK of 2^40 keys",
            with_validate(&[&[codec::CHECK][..], &(1u64 << 40).to_ne_bytes()].concat()),
        ),
    ];
    // Stops mid-message and stays connected: closed after the stall limit.
    let mut half = codec::encode(&Query::Set(MD_A.into(), vec![9; 100]));
    half.truncate(30);
    cases.push(("stalled mid-message", with_validate(&half)));
    for (what, bytes) in &cases {
        let mut p = raw(bytes);
        assert!(p.closed_by_store(), "{what}: still open");
    }
    // Closes mid-message.
    {
        let _gone = raw(&with_validate(&half));
    }
    // A thousand idle connections do not stop anyone else.
    let idle: Vec<Peer> = (0..1000).map(|_| Peer::connect(addr)).collect();
    assert!(wait_until(LONG, || store.connections() >= 1001));
    let mut late = Peer::connect(addr);
    assert_eq!(late.get(MD_A), b"ok");
    assert_eq!(good.get(MD_A), b"ok");
    // The oversized value was not stored; the good one is intact.
    assert_eq!(
        etcd_get(&etcd, &format!("{ns}/A/metadata")).unwrap().0,
        b"ok"
    );
    drop(idle);
    assert!(wait_until(LONG, || store.connections() == 2));
    store.stop().unwrap();
    client.close().unwrap();
}

/// A writer in another process: a python3 TCPStore client that sends
/// VALIDATE, PING (its pid, as NIXL does), SETs each key, then closes its
/// connection if asked and waits on stdin.
fn writer_process(addr: SocketAddr, keys: &[&str], close_after: bool) -> Child {
    let script = r#"
import os, socket, struct, sys
host, port = sys.argv[1].rsplit(':', 1)
s = socket.create_connection((host, int(port)))
s.sendall(bytes([0]) + struct.pack('=I', 0x3C85F7CE))
s.sendall(bytes([13]) + struct.pack('=I', os.getpid()))
assert s.recv(4) == struct.pack('=I', os.getpid())
for k in sys.argv[3:]:
    kb, vb = k.encode(), ('value of ' + k).encode()
    s.sendall(bytes([1]) + struct.pack('=Q', len(kb)) + kb + struct.pack('=Q', len(vb)) + vb)
# A CHECK answered means every SET before it was applied.
kb = sys.argv[3].encode()
s.sendall(bytes([5]) + struct.pack('=Q', 1) + struct.pack('=Q', len(kb)) + kb)
assert s.recv(1) == b'\x00'
if sys.argv[2] == 'close':
    s.close()
print('written', flush=True)
sys.stdin.read()
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(addr.to_string())
        .arg(if close_after { "close" } else { "keep" })
        .args(keys)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "written");
    child
}

#[test]
fn a_killed_writer_loses_its_keys_and_a_reconnecting_one_keeps_them() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("pid");
    // A long TTL: only the pid watch can delete the keys in this test.
    let (client, store) = store(&etcd, &ns, r#""lease_ttl_s":600"#, StoreOptions::default());
    let addr = store.local_addr();
    let mut killed = writer_process(addr, &[MD_A], false);
    let mut closed = writer_process(addr, &["/nixl/agents/metadata/B/NULL_AGENT"], true);
    let a = format!("{ns}/A/");
    let b = format!("{ns}/B/");
    assert_eq!(keys_under(&etcd, &a).len(), 2);
    assert_eq!(keys_under(&etcd, &b).len(), 2);
    // B closed its connection but lives: its keys stay.
    assert!(wait_until(LONG, || store.connections() == 1));
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(wait_until(LONG, || keys_under(&etcd, &a).is_empty()));
    assert_eq!(keys_under(&etcd, &b).len(), 2);
    // B exits normally (closing stdin): its keys go as well.
    drop(closed.stdin.take());
    closed.wait().unwrap();
    assert!(wait_until(LONG, || keys_under(&etcd, &b).is_empty()));
    store.stop().unwrap();
    client.close().unwrap();
}

fn spawn_serve(etcd: &EtcdServer, ns: &str, extra: &str) -> (Child, SocketAddr) {
    let opts = etcd.options_json(&unique_namespace("ranks"), extra);
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--nixl-namespace", ns])
        .args(["--options", &opts])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr = ready_addr(&mut child);
    (child, addr)
}

#[test]
fn serve_prints_a_ready_line_and_sigterm_revokes_every_lease() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("sigterm");
    let (mut serve, addr) = spawn_serve(&etcd, &ns, r#""lease_ttl_s":600"#);
    let mut p = Peer::connect(addr);
    p.set(MD_A, b"blob");
    assert_eq!(p.check(&[MD_A]), codec::READY);
    let (_, lease) = etcd_get(&etcd, &format!("{ns}/A/metadata")).unwrap();
    assert_ne!(lease, 0);
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    serve
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut rest)
        .unwrap();
    let status = serve.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(
        rest.contains("stopped (signal 15); every lease revoked"),
        "{rest}"
    );
    assert_eq!(keys_under(&etcd, &format!("{ns}/")), Vec::<String>::new());
    assert!(p.closed_by_store());
}

#[test]
fn a_killed_store_leaves_keys_that_expire_with_their_lease() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("storekill");
    let (mut serve, addr) = spawn_serve(&etcd, &ns, r#""lease_ttl_s":2"#);
    let mut p = Peer::connect(addr);
    p.set(MD_A, b"blob");
    assert_eq!(p.check(&[MD_A]), codec::READY);
    let (_, lease) = etcd_get(&etcd, &format!("{ns}/A/metadata")).unwrap();
    let ttl = etcdctl_ok(&etcd, &["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("granted with TTL(2s)"), "{ttl}");
    serve.kill().unwrap();
    serve.wait().unwrap();
    assert!(p.closed_by_store());
    assert!(wait_until(LONG, || keys_under(&etcd, &format!("{ns}/")).is_empty()));
}

#[test]
fn with_etcd_down_reads_come_from_the_copy_and_writes_resume_after() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("down");
    let (client, store) = store(&etcd, &ns, r#""timeout_s":2"#, StoreOptions::default());
    let addr = store.local_addr();
    let mut p = Peer::connect(addr);
    p.set(MD_A, b"before");
    assert_eq!(p.check(&[MD_A]), codec::READY);
    etcd.kill();
    let mut r = Peer::connect(addr);
    assert_eq!(r.get(MD_A), b"before");
    assert_eq!(r.check(&[MD_A]), codec::READY);
    // A write during the outage is queued, not refused: the connection
    // stays open (no grace clock starts), readers of the store see it, and
    // it reaches etcd once etcd is back.
    let mut w = Peer::connect(addr);
    assert_eq!(w.ping(4242), 4242);
    w.set("/nixl/agents/metadata/D/NULL_AGENT", b"during");
    assert_eq!(
        w.check(&["/nixl/agents/metadata/D/NULL_AGENT"]),
        codec::READY
    );
    assert_eq!(r.get("/nixl/agents/metadata/D/NULL_AGENT"), b"during");
    etcd.restart();
    assert!(wait_until(LONG, || etcd_get(
        &etcd,
        &format!("{ns}/D/metadata")
    )
    .is_some_and(|(v, lease)| v == b"during" && lease != 0)));
    assert_eq!(w.ping(4243), 4243);
    // Writes go straight through again; the earlier keys are still there.
    let mut e = Peer::connect(addr);
    e.set("/nixl/agents/metadata/E/NULL_AGENT", b"after");
    assert_eq!(
        e.check(&["/nixl/agents/metadata/E/NULL_AGENT"]),
        codec::READY
    );
    assert!(wait_until(LONG, || etcd_get(
        &etcd,
        &format!("{ns}/E/metadata")
    )
    .is_some()));
    assert_eq!(
        etcd_get(&etcd, &format!("{ns}/A/metadata")).unwrap().0,
        b"before"
    );
    assert_eq!(r.get("/nixl/agents/metadata/E/NULL_AGENT"), b"after");
    store.stop().unwrap();
    client.close().unwrap();
}

/// A local address that is not loopback, if this machine has one.
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("10.255.255.255:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_remote_writer_keeps_its_keys_across_a_reconnect_and_loses_them_after_the_grace() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address on this machine: remote peers cannot be tested");
        return;
    };
    let etcd = EtcdServer::start();
    let ns = unique_namespace("remote");
    let client = Client::open(config(&etcd, &ns, r#""lease_ttl_s":600"#)).unwrap();
    let opts = StoreOptions {
        remote_grace: Duration::from_secs(2),
        ..StoreOptions::default()
    };
    let store = NixlStore::start(&client, &format!("{ip}:0"), opts).unwrap();
    let addr = store.local_addr();
    let a = format!("{ns}/A/");
    {
        let mut p = Peer::connect(addr);
        assert_eq!(p.ping(777), 777);
        p.set(MD_A, b"remote");
        assert_eq!(p.check(&[MD_A]), codec::READY);
    }
    // Reconnects (same PING nonce) before the grace ends: keys kept, and
    // the grace starts again from its new last close.
    let mut again = Peer::connect(addr);
    assert_eq!(again.ping(777), 777);
    assert!(wait_until(LONG, || store.connections() == 1));
    // Past the grace of the first connection, the keys are still there.
    assert!(holds_for(Duration::from_secs(3), || keys_under(&etcd, &a)
        .len()
        == 2));
    drop(again);
    assert!(wait_until(LONG, || keys_under(&etcd, &a).is_empty()));
    store.stop().unwrap();
    client.close().unwrap();
}

/// Writers followed by their connections: each PING nonce is a writer of
/// its own, though every peer of this test is one process.
fn by_connection(opts: StoreOptions) -> StoreOptions {
    StoreOptions {
        liveness: Liveness::Connection,
        ..opts
    }
}

#[test]
fn etcd_paused_during_one_writers_first_write_stalls_no_other_writer() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("stall");
    // A long timeout: in the first store, a writer's connect to a paused
    // etcd held the store-wide lock for all of it.
    let (client, store) = store(
        &etcd,
        &ns,
        r#""timeout_s":60,"lease_ttl_s":600"#,
        by_connection(StoreOptions::default()),
    );
    let addr = store.local_addr();
    let mut a = Peer::connect(addr);
    assert_eq!(a.ping(1), 1);
    a.set(MD_A, b"a1");
    assert_eq!(a.check(&[MD_A]), codec::READY);
    assert!(wait_until(LONG, || etcd_get(
        &etcd,
        &format!("{ns}/A/metadata")
    )
    .is_some()));

    etcd.pause();
    // B's first write needs a lease: etcd does not answer.
    let mut b = Peer::connect(addr);
    assert_eq!(b.ping(2), 2);
    b.set("/nixl/agents/metadata/B/NULL_AGENT", b"b1");
    // Meanwhile A and every reader are answered, from the store's copy.
    assert_eq!(a.ping(1), 1);
    a.set(MD_A, b"a2");
    assert_eq!(a.check(&[MD_A]), codec::READY);
    let mut reader = Peer::connect(addr);
    assert_eq!(reader.ping(3), 3);
    assert_eq!(reader.get(MD_A), b"a2");
    assert_eq!(reader.get("/nixl/agents/metadata/B/NULL_AGENT"), b"b1");
    // B's connection is open and answers too.
    assert_eq!(b.ping(2), 2);
    assert!(etcd.is_paused());

    etcd.resume();
    assert!(wait_until(LONG, || {
        let a = etcd_get(&etcd, &format!("{ns}/A/metadata"));
        let b = etcd_get(&etcd, &format!("{ns}/B/metadata"));
        matches!((a, b), (Some((va, la)), Some((vb, lb)))
            if va == b"a2" && vb == b"b1" && la != 0 && lb != 0 && la != lb)
    }));
    assert_eq!(store.writers(), 2);
    store.stop().unwrap();
    client.close().unwrap();
}

#[test]
fn a_get_after_a_set_sees_it_on_any_connection() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("race");
    let (client, store) = store(&etcd, &ns, "", by_connection(StoreOptions::default()));
    let addr = store.local_addr();
    let (mut x, mut y) = (Peer::connect(addr), Peer::connect(addr));
    assert_eq!(x.ping(10), 10);
    assert_eq!(y.ping(11), 11);
    // Two writers overwrite one key in turn; each write is read back at once
    // on the other connection. A watch event lagging behind an acknowledged
    // write must never show the older value.
    for i in 0..300u32 {
        let v = format!("value {i}");
        let (w, r) = if i % 2 == 0 {
            (&mut x, &mut y)
        } else {
            (&mut y, &mut x)
        };
        w.set(MD_A, v.as_bytes());
        assert_eq!(w.check(&[MD_A]), codec::READY);
        assert_eq!(r.get(MD_A), v.as_bytes(), "write {i}");
    }
    let last = b"value 299".to_vec();
    assert!(wait_until(LONG, || etcd_get(
        &etcd,
        &format!("{ns}/A/metadata")
    )
    .is_some_and(|(v, _)| v == last)));
    // Deleted, then read back at once: absent, and it stays absent.
    assert_eq!(x.delete(MD_A), 1);
    assert_eq!(y.get(MD_A), b"");
    assert_eq!(y.check(&[MD_A]), codec::NOT_READY);
    store.stop().unwrap();
    client.close().unwrap();
}

#[test]
fn connections_and_writers_past_their_caps_are_refused_and_others_go_on() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("caps");
    let opts = by_connection(StoreOptions {
        max_connections: 4,
        max_writers: 2,
        ..StoreOptions::default()
    });
    let (client, store) = store(&etcd, &ns, "", opts);
    let addr = store.local_addr();
    let mut w1 = Peer::connect(addr);
    assert_eq!(w1.ping(1), 1);
    w1.set(MD_A, b"one");
    let mut w2 = Peer::connect(addr);
    assert_eq!(w2.ping(2), 2);
    w2.set("/nixl/agents/metadata/B/NULL_AGENT", b"two");
    assert_eq!(
        w2.check(&["/nixl/agents/metadata/B/NULL_AGENT"]),
        codec::READY
    );
    // A third writer is refused: its connection is closed.
    let mut w3 = Peer::connect(addr);
    assert_eq!(w3.ping(3), 3);
    w3.set("/nixl/agents/metadata/C/NULL_AGENT", b"three");
    assert!(w3.closed_by_store());
    // Four connections are open: a fifth is closed at once.
    let _r1 = Peer::connect(addr);
    let _r2 = Peer::connect(addr);
    assert!(wait_until(LONG, || store.connections() == 4));
    let mut over = Peer::connect(addr);
    assert!(over.closed_by_store());
    // The writers within the caps go on.
    w1.set(MD_A, b"one again");
    // A SET has no reply: w1's next answer says the store has applied it.
    assert_eq!(w1.ping(1), 1);
    assert_eq!(w2.get(MD_A), b"one again");
    assert_eq!(keys_under(&etcd, &format!("{ns}/C/")), Vec::<String>::new());
    store.stop().unwrap();
    client.close().unwrap();
}

#[test]
fn without_pidfd_a_local_writer_keeps_its_keys_while_it_lives() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("nopidfd");
    let opts = etcd.options_json(&unique_namespace("ranks"), r#""lease_ttl_s":600"#);
    // As on Linux before 5.3 (ENOSYS): the first store revoked the lease of
    // every local writer right after its write.
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--nixl-namespace", &ns])
        .args(["--remote-grace", "2", "--options", &opts])
        .env("NIXL_ETCD_STORE_TEST_PIDFD_ERRNO", "38")
        .env("VLLM_LOGGING_LEVEL", "INFO")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = ready_addr(&mut serve);
    let log = drain(serve.stderr.take().unwrap());
    let a = format!("{ns}/A/");
    let mut writer = writer_process(addr, &[MD_A], false);
    assert_eq!(keys_under(&etcd, &a).len(), 2);
    // Kept past the grace while the process lives.
    assert!(holds_for(Duration::from_secs(4), || keys_under(&etcd, &a)
        .len()
        == 2));
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert!(wait_until(LONG, || keys_under(&etcd, &a).is_empty()));
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    serve.wait().unwrap();
    let log = log.join().unwrap();
    assert!(
        log.contains("cannot watch process") && log.contains("Function not implemented"),
        "{log}"
    );
}

/// The endpoint from `serve`'s ready line.
fn ready_addr(serve: &mut Child) -> SocketAddr {
    let mut line = String::new();
    BufReader::new(serve.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("nixl-etcd serve: ready, NIXL_TCPSTORE_ENDPOINT="),
        "{line:?}"
    );
    line.split("NIXL_TCPSTORE_ENDPOINT=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads a child's stream to its end in the background.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = r.read_to_string(&mut out);
        out
    })
}
