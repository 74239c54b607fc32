//! Signed records against a real etcd: with a shared key every record is
//! signed and every read verified; a forged, altered or replayed record is
//! refused with BAD_SIGNATURE and never reaches a caller, the cache or a
//! subscriber; keys rotate through a previous key accepted for a while.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::capi::{blob, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, wait_until, EtcdServer};
use nixl_etcd::ffi::*;

fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, key).unwrap();
    path
}

fn signed(etcd: &EtcdServer, ns: &str, key: &Path, previous: Option<&Path>) -> Handle {
    let mut extra = format!("\"hmac_key_file\":\"{}\"", key.display());
    if let Some(p) = previous {
        extra.push_str(&format!(",\"hmac_previous_key_file\":\"{}\"", p.display()));
    }
    open(&etcd.options_json(ns, &extra)).unwrap_or_else(|f| panic!("open: {f:?}"))
}

fn value_of(etcd: &EtcdServer, key: &str) -> String {
    let out = etcdctl_ok(etcd, &["get", key, "--print-value-only"]);
    out.trim_end_matches('\n').to_owned()
}

#[test]
fn forged_altered_and_replayed_records_are_refused_and_never_served() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("signed");
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "k", "shared-key-0123456789abcdef");
    let writer = signed(&etcd, &ns, &k, None);
    let reader = signed(&etcd, &ns, &k, None);
    let events = reader.subscribe(Some("e")).unwrap();

    // A signed record reads back; its value ends with the signature.
    writer.register("e", 0, &blob(1, 4096)).unwrap();
    assert_eq!(reader.wait("e", 0, 5000).unwrap(), blob(1, 4096));
    let good = value_of(&etcd, &format!("{ns}/e/rank_0"));
    assert!(good.contains(",\"sig\":\""), "{good}");
    let ev = events.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((ev.kind, ev.rank), (NIXL_ETCD_EVENT_ADDED, 0));

    // Forged with etcdctl: a well-formed record with no signature.
    let unsigned = good[..good.rfind(",\"sig\":\"").unwrap()].to_owned() + "}";
    let forged = unsigned.replace("\"rank\":0", "\"rank\":1");
    etcdctl_ok(&etcd, &["put", &format!("{ns}/e/rank_1"), &forged]);
    let fresh = signed(&etcd, &ns, &k, None);
    let f = fresh.lookup("e", 1).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_SIGNATURE, "{f:?}");
    assert!(
        f.message.contains(&format!("{ns}/e/rank_1")) && f.message.contains("missing signature"),
        "{}",
        f.message
    );
    let f = reader.wait("e", 1, 2000).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_SIGNATURE, "{f:?}");

    // Replayed: rank 0's signed value copied under rank 2 (the signature
    // binds the key).
    let replayed = good.replace("\"rank\":0", "\"rank\":2");
    etcdctl_ok(&etcd, &["put", &format!("{ns}/e/rank_2"), &replayed]);
    etcdctl_ok(&etcd, &["put", &format!("{ns}/e/rank_3"), &good]);
    for rank in [2, 3] {
        assert!(wait_until(Duration::from_secs(5), || {
            reader
                .lookup("e", rank)
                .is_err_and(|f| f.status == NIXL_ETCD_ERR_BAD_SIGNATURE)
        }));
    }

    // Altered: rank 0's record with another host, signature kept. The
    // reader's cache drops the record (REMOVED) rather than serve it.
    let altered = good.replacen("\"host\":\"", "\"host\":\"evil-", 1);
    etcdctl_ok(&etcd, &["put", &format!("{ns}/e/rank_0"), &altered]);
    let ev = events.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((ev.kind, ev.rank), (NIXL_ETCD_EVENT_REMOVED, 0), "{ev:?}");
    let f = reader.lookup("e", 0).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_SIGNATURE, "{f:?}");
    assert!(f.message.contains("wrong signature"), "{}", f.message);

    // No forged record ever reached the subscriber.
    writer.register("e", 4, b"after").unwrap();
    let ev = events.rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((ev.kind, ev.rank), (NIXL_ETCD_EVENT_ADDED, 4), "{ev:?}");
    assert!(events.rx.try_recv().is_err());

    // A client without the key reads signed records (the signature is an
    // extra member), so signing can be rolled out reader-first.
    let plain = open(&etcd.options_json(&ns, "")).unwrap();
    assert_eq!(plain.lookup("e", 4).unwrap(), b"after");
    for h in [plain, fresh, writer] {
        h.close().unwrap();
    }
    reader.unsubscribe(events.id).unwrap();
    reader.close().unwrap();
}

#[test]
fn keys_rotate_through_a_previous_key() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("rotate");
    let dir = tempfile::tempdir().unwrap();
    let old = key_file(dir.path(), "old", "the-old-shared-key-5b1f2c9e");
    let new = key_file(dir.path(), "new", "the-new-shared-key-a7d40e13\n");
    // Before: everyone on the old key.
    let old_writer = signed(&etcd, &ns, &old, None);
    old_writer
        .register("e", 0, b"signed with the old key")
        .unwrap();
    // During: readers take the new key and keep the old one as previous;
    // writers move to the new key one by one.
    let during = signed(&etcd, &ns, &new, Some(&old));
    assert_eq!(during.lookup("e", 0).unwrap(), b"signed with the old key");
    let new_writer = signed(&etcd, &ns, &new, None);
    new_writer
        .register("e", 1, b"signed with the new key")
        .unwrap();
    assert_eq!(
        during.wait("e", 1, 5000).unwrap(),
        b"signed with the new key"
    );
    // A client on the old key alone does not accept the new key's records.
    let f = old_writer.wait("e", 1, 5000).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_SIGNATURE, "{f:?}");
    // After: the previous key is dropped; what it signed is refused, naming
    // the unknown key id.
    let after = signed(&etcd, &ns, &new, None);
    assert_eq!(after.lookup("e", 1).unwrap(), b"signed with the new key");
    let f = after.lookup("e", 0).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_SIGNATURE, "{f:?}");
    assert!(f.message.contains("unknown key"), "{}", f.message);
    for h in [old_writer, during, new_writer, after] {
        h.close().unwrap();
    }
}

#[test]
fn chunked_metadata_is_covered_by_the_signed_checksum() {
    let etcd = EtcdServer::builder().max_request_bytes(64 * 1024).start();
    let ns = unique_namespace("signedchunks");
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "k", "shared-key-for-chunks-0001");
    let extra = format!(
        "\"hmac_key_file\":\"{}\",\"max_request_bytes\":65536",
        k.display()
    );
    let writer = open(&etcd.options_json(&ns, &extra)).unwrap();
    let md = blob(9, 300_000);
    writer.register("e", 0, &md).unwrap();
    let reader = open(&etcd.options_json(&ns, &extra)).unwrap();
    assert_eq!(reader.lookup("e", 0).unwrap(), md);
    reader.close().unwrap();
    // A chunk replaced behind the record's back: the signed SHA-256 no
    // longer matches, and the blob is refused.
    let chunks = etcdctl_ok(
        &etcd,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{ns}.blobs/e/rank_0/"),
        ],
    );
    let first = chunks.lines().find(|l| !l.trim().is_empty()).unwrap();
    etcdctl_ok(&etcd, &["put", first, "tampered"]);
    // Readers read a record's chunks as of the record's revision, so the
    // forger also writes the signed record again, unchanged (it still
    // verifies), to make the tampered chunk current for it.
    let record_key = format!("{ns}/e/rank_0");
    let record = value_of(&etcd, &record_key);
    etcdctl_ok(&etcd, &["put", &record_key, &record]);
    // A reader with a cache of its own, as another process has (one of this
    // process's identity shares the writer's cache, which holds the verified
    // copy until the watch brings the re-put): etcd named by host name.
    let elsewhere = etcd
        .options_json(&ns, &extra)
        .replace("127.0.0.1", "localhost");
    let reader = open(&elsewhere).unwrap();
    let f = reader.lookup("e", 0).unwrap_err();
    assert_eq!(f.status, NIXL_ETCD_ERR_BAD_RECORD, "{f:?}");
    reader.close().unwrap();
    writer.close().unwrap();
}
