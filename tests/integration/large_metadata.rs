//! Metadata past one etcd request: stored in chunks beside the record, read
//! back whole through the C ABI (lookup, wait, events), never torn, nothing
//! left behind by a writer that dies half-way. Against real etcd servers,
//! with the default request limit and with a small one.

use crate::common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::capi::{blob, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, wait_until, EtcdServer};
use nixl_etcd::ffi::*;
use nixl_etcd::Config;

const MIB: usize = 1 << 20;

fn client(etcd: &EtcdServer, ns: &str, extra: &str) -> Handle {
    open(&etcd.options_json(ns, extra)).unwrap_or_else(|f| panic!("open: {f:?}"))
}

/// Keys under `prefix`, counted with etcdctl.
fn count_keys(etcd: &EtcdServer, prefix: &str) -> usize {
    etcdctl_ok(etcd, &["get", "--prefix", "--keys-only", prefix])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Sizes around etcd's request limit and around the largest inline record,
/// then 8 MiB and 64 MiB (the default maximum), each registered by one
/// client and read by a cold lookup of another, a waiter started before the
/// register, a subscriber's event, and the writer itself.
fn boundary_sizes_round_trip(etcd: &EtcdServer, limit: usize, extra: &str) {
    let ns = unique_namespace("chunks");
    let opts = |more: &str| {
        let mut o = String::from("\"host\":\"h\"");
        for part in [extra, more] {
            if !part.is_empty() {
                o.push(',');
                o.push_str(part);
            }
        }
        o
    };
    let cfg = Config::load(Some(&etcd.options_json(&ns, &opts("")))).unwrap();
    let inline = nixl_etcd::client::inline_limit(&cfg, "big", 0);
    assert!(inline < limit, "inline {inline} limit {limit}");
    let sizes = [
        0,
        1,
        inline - 1,
        inline,
        inline + 1,
        limit - 1,
        limit,
        limit + 1,
        8 * MIB,
        64 * MIB,
    ];
    let writer = client(etcd, &ns, &opts(""));
    let watcher = client(etcd, &ns, &opts(""));
    let events = watcher.subscribe(Some("big")).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let rank = i as u32;
        let md = blob(1000 + rank, size);
        let waiter = {
            let h = client(etcd, &ns, &opts(""));
            thread::spawn(move || {
                let got = h.wait("big", rank, 60_000);
                h.close().unwrap();
                got
            })
        };
        writer
            .register("big", rank, &md)
            .unwrap_or_else(|f| panic!("register {size} bytes: {f:?}"));
        let reader = client(etcd, &ns, &opts(""));
        let got = reader.lookup("big", rank).unwrap();
        assert!(got == md, "lookup of {size} bytes differs");
        reader.close().unwrap();
        let waited = waiter.join().unwrap().unwrap();
        assert!(waited == md, "wait of {size} bytes differs");
        assert!(writer.lookup("big", rank).unwrap() == md);
        let ev = events
            .rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an event per register");
        assert_eq!((ev.kind, ev.rank), (NIXL_ETCD_EVENT_ADDED, rank));
        assert!(ev.metadata == md, "event of {size} bytes differs");
        // Chunked exactly when over the inline limit, in one generation.
        let folder = format!("{ns}.blobs/big/rank_{rank}/");
        let chunk_keys = count_keys(etcd, &folder);
        if size > inline {
            let per_chunk = nixl_etcd::blob::chunk_size(limit, folder.len() + 17);
            assert_eq!(chunk_keys, size.div_ceil(per_chunk), "{size} bytes");
        } else {
            assert_eq!(chunk_keys, 0, "{size} bytes stored inline");
        }
    }
    // Replacing a chunked blob drops the old generation's chunks; replacing
    // it with a small one drops them all.
    let rank = sizes.len() as u32 - 1;
    let before = count_keys(etcd, &format!("{ns}.blobs/big/rank_{rank}/"));
    writer.register("big", rank, &blob(7, 64 * MIB)).unwrap();
    assert_eq!(
        count_keys(etcd, &format!("{ns}.blobs/big/rank_{rank}/")),
        before
    );
    writer.register("big", rank, &blob(8, 100)).unwrap();
    assert_eq!(count_keys(etcd, &format!("{ns}.blobs/big/rank_{rank}/")), 0);
    // Unregister takes the chunks with the record; close takes the rest.
    writer.unregister("big", 8).unwrap();
    assert_eq!(count_keys(etcd, &format!("{ns}.blobs/big/rank_8/")), 0);
    watcher.unsubscribe(events.id).unwrap();
    watcher.close().unwrap();
    writer.close().unwrap();
    assert_eq!(count_keys(etcd, &ns), 0, "keys left after close");
}

#[test]
fn every_size_up_to_the_maximum_round_trips_with_etcds_default_limit() {
    let etcd = EtcdServer::builder()
        .arg("--quota-backend-bytes=4294967296")
        .start();
    boundary_sizes_round_trip(&etcd, 1536 * 1024, "");
}

#[test]
fn every_size_up_to_the_maximum_round_trips_with_a_64_kib_limit() {
    let etcd = EtcdServer::builder()
        .max_request_bytes(64 * 1024)
        .arg("--quota-backend-bytes=4294967296")
        .start();
    boundary_sizes_round_trip(&etcd, 64 * 1024, r#""max_request_bytes":65536"#);
}

#[test]
fn over_the_maximum_is_too_large_with_the_sizes_and_nothing_is_written() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("toolarge");
    let a = client(&etcd, &ns, "");
    let err = a.register("e", 0, &vec![1u8; 64 * MIB + 1]).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE);
    assert!(
        err.message.contains("67108865 bytes") && err.message.contains("67108864 bytes"),
        "{}",
        err.message
    );
    assert_eq!(count_keys(&etcd, &ns), 0);
    let small = client(&etcd, &ns, r#""max_metadata_bytes":1000"#);
    let err = small.register("e", 0, &[0u8; 1001]).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TOO_LARGE, "{}", err.message);
    assert_eq!(count_keys(&etcd, &ns), 0);
    a.close().unwrap();
    small.close().unwrap();
}

/// Round `n`'s blob: its number in the first 8 bytes, then bytes derived
/// from it, so a reader can tell a whole blob from a torn or mixed one.
fn round_blob(n: u64, len: usize) -> Vec<u8> {
    let mut v = blob(n as u32, len);
    v[..8].copy_from_slice(&n.to_le_bytes());
    v
}

fn check_round(md: &[u8], len: usize) -> Result<u64, String> {
    if md.len() != len {
        return Err(format!("{} bytes, expected {len}", md.len()));
    }
    let n = u64::from_le_bytes(md[..8].try_into().unwrap());
    if md != round_blob(n, len).as_slice() {
        return Err(format!("blob of round {n} is torn or mixed"));
    }
    Ok(n)
}

#[test]
fn readers_never_see_a_torn_or_mixed_blob_while_a_writer_replaces_it() {
    const ROUNDS: u64 = 200;
    const LEN: usize = 8 * MIB;
    let etcd = EtcdServer::builder()
        .arg("--quota-backend-bytes=8589934592")
        .start();
    let ns = unique_namespace("torn");
    let writer = client(&etcd, &ns, "");
    writer.register("e", 0, &round_blob(0, LEN)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    // Two readers looking up in a loop, one waiting (a fresh client each
    // time, so every wait reads etcd), one following events.
    for kind in ["lookup", "lookup", "wait"] {
        let (done, verified) = (done.clone(), verified.clone());
        let opts = etcd.options_json(&ns, "");
        readers.push(thread::spawn(move || -> Result<u64, String> {
            let mut last = 0;
            let mut h = open(&opts).unwrap();
            while !done.load(Ordering::Acquire) {
                let md = match kind {
                    "lookup" => h.lookup("e", 0),
                    _ => {
                        let fresh = open(&opts).unwrap();
                        let got = fresh.wait("e", 0, 30_000);
                        std::mem::replace(&mut h, fresh).close().unwrap();
                        got
                    }
                }
                .map_err(|f| format!("{kind}: {f:?}"))?;
                let n = check_round(&md, LEN).map_err(|e| format!("{kind}: {e}"))?;
                if n < last {
                    return Err(format!("{kind}: went back from round {last} to {n}"));
                }
                last = n;
                verified.fetch_add(1, Ordering::Relaxed);
            }
            h.close().unwrap();
            Ok(last)
        }));
    }
    let subscriber = client(&etcd, &ns, "");
    let events = subscriber.subscribe(Some("e")).unwrap();
    for n in 1..=ROUNDS {
        writer.register("e", 0, &round_blob(n, LEN)).unwrap();
        // Compaction now and then: readers whose revision was compacted read
        // the latest generation instead, or skip to the newer record.
        if n % 50 == 0 {
            let status = etcdctl_ok(&etcd, &["endpoint", "status", "-w", "json"]);
            let rev = status
                .split("\"revision\":")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|s| s.parse::<u64>().ok())
                .expect("revision in endpoint status");
            etcdctl_ok(&etcd, &["compact", &rev.to_string()]);
        }
    }
    // Every reader ends on the last round.
    let lookup_end = client(&etcd, &ns, "");
    assert!(wait_until(Duration::from_secs(30), || {
        lookup_end
            .lookup("e", 0)
            .is_ok_and(|md| check_round(&md, LEN) == Ok(ROUNDS))
    }));
    done.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap().unwrap();
    }
    let mut seen_events = 0;
    let mut last = 0;
    while let Ok(ev) = events.rx.recv_timeout(Duration::from_secs(10)) {
        let n = check_round(&ev.metadata, LEN).unwrap();
        assert!(n >= last, "events went back from {last} to {n}");
        last = n;
        seen_events += 1;
        if n == ROUNDS {
            break;
        }
    }
    assert_eq!(last, ROUNDS, "the subscriber saw the last round");
    let reads = verified.load(Ordering::Relaxed) + seen_events;
    println!("{reads} whole reads verified over {ROUNDS} rounds, none torn or mixed");
    assert!(reads >= ROUNDS, "only {reads} reads");
    subscriber.close().unwrap();
    lookup_end.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn a_writer_killed_mid_write_leaves_nothing_visible_and_nothing_after_its_lease() {
    let etcd = EtcdServer::builder()
        .max_request_bytes(64 * 1024)
        .arg("--quota-backend-bytes=4294967296")
        .start();
    let ns = unique_namespace("crash");
    let dir = common::build_c_examples();
    let options = etcd.options_json(&ns, r#""max_request_bytes":65536,"lease_ttl_s":2"#);
    let mut child = Command::new(dir.join("prefill"))
        .args(["doomed", "1", "--size", &(64 * MIB).to_string()])
        .args(["--options", &options])
        .env("LD_LIBRARY_PATH", common::target_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let chunks = format!("{ns}.blobs/doomed/rank_0/");
    // Killed once some of its 1,000-odd chunks are in etcd.
    assert!(
        wait_until(Duration::from_secs(30), || count_keys(&etcd, &chunks) > 0),
        "the writer wrote no chunk"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let written = count_keys(&etcd, &chunks);
    let expected = 64 * MIB / nixl_etcd::blob::chunk_size(65536, chunks.len() + 17);
    assert!(
        written > 0 && written < expected,
        "killed after {written} of about {expected} chunks"
    );
    // Nothing visible: no record, so no reader ever looks at the chunks.
    let reader = client(&etcd, &ns, "");
    assert_eq!(
        reader.lookup("doomed", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    assert_eq!(count_keys(&etcd, &format!("{ns}/")), 0);
    // Nothing behind once the lease (TTL 2 s) expires.
    assert!(
        wait_until(Duration::from_secs(10), || count_keys(&etcd, &ns) == 0),
        "{} keys left after the lease expired",
        count_keys(&etcd, &ns)
    );
    reader.close().unwrap();
}

#[test]
fn chunked_metadata_survives_the_loss_of_the_lease() {
    let etcd = EtcdServer::builder().max_request_bytes(64 * 1024).start();
    let ns = unique_namespace("regrant");
    let extra = r#""max_request_bytes":65536,"lease_ttl_s":2"#;
    let writer = client(&etcd, &ns, extra);
    let md = blob(42, 3 * MIB);
    writer.register("e", 0, &md).unwrap();
    let lease = etcdctl_ok(&etcd, &["get", &format!("{ns}/e/rank_0"), "-w", "json"]);
    let lease_id: i64 = lease
        .split("\"lease\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("the record has a lease");
    etcdctl_ok(&etcd, &["lease", "revoke", &format!("{lease_id:x}")]);
    // The writer re-grants and re-writes chunks and record; a new reader
    // reads the same bytes.
    let reader_opts = etcd.options_json(&ns, "");
    assert!(wait_until(Duration::from_secs(15), || {
        let r = open(&reader_opts).unwrap();
        let ok = r.lookup("e", 0).is_ok_and(|got| got == md);
        r.close().unwrap();
        ok
    }));
    writer.close().unwrap();
}

#[test]
fn forged_chunk_references_are_bad_records_never_a_crash() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("forged");
    let reader = client(&etcd, &ns, "");
    let zeros = "0".repeat(64);
    let record = |rank: u32, len: u64, blob: &str| {
        format!(
            r#"{{"format":1,"engine_id":"e","rank":{rank},"host":"h","pid":1,"incarnation":"i","registered_at_ms":1,"metadata_len":{len},"metadata":"","blob":{blob}}}"#
        )
    };
    let cases = [
        // A billion one-byte chunks claimed, none there.
        (
            record(
                0,
                1 << 30,
                &format!(
                    r#"{{"generation":"g0","chunks":1073741824,"chunk_size":1,"sha256":"{zeros}"}}"#
                ),
            ),
            "number 0, the record says 1073741824",
        ),
        // One chunk claimed 1 GiB long; a tiny one is there.
        (
            record(
                1,
                1 << 30,
                &format!(
                    r#"{{"generation":"g1","chunks":1,"chunk_size":1073741824,"sha256":"{zeros}"}}"#
                ),
            ),
            "hold 3 bytes",
        ),
        // Over the 1 GiB bound, a generation that escapes its folder, sizes
        // that do not add up.
        (
            record(
                2,
                (1 << 30) + 1,
                &format!(
                    r#"{{"generation":"g2","chunks":2,"chunk_size":1073741824,"sha256":"{zeros}"}}"#
                ),
            ),
            "cannot hold",
        ),
        (
            record(
                3,
                10,
                &format!(
                    r#"{{"generation":"../x","chunks":1,"chunk_size":10,"sha256":"{zeros}"}}"#
                ),
            ),
            "not a plain id",
        ),
        (
            record(
                4,
                10,
                &format!(r#"{{"generation":"g4","chunks":5,"chunk_size":10,"sha256":"{zeros}"}}"#),
            ),
            "cannot hold",
        ),
    ];
    etcdctl_ok(
        &etcd,
        &["put", &format!("{ns}.blobs/e/rank_1/g1/000000"), "abc"],
    );
    for (rank, (value, want)) in cases.iter().enumerate() {
        etcdctl_ok(&etcd, &["put", &format!("{ns}/e/rank_{rank}"), value]);
        let f = reader.lookup("e", rank as u32).unwrap_err();
        assert_eq!(f.status, NIXL_ETCD_ERR_BAD_RECORD, "rank {rank}: {f:?}");
        assert!(f.message.contains(want), "rank {rank}: {}", f.message);
    }
    reader.close().unwrap();
}
