//! The lease session: renewed in the background, and when lost (etcd wiped,
//! or the lease revoked behind the client's back) re-granted with everything
//! re-registered.

use std::time::Duration;

use crate::capi::{blob, open, Handle};
use crate::common::{etcdctl_ok, unique_namespace, wait_until, EtcdServer};

fn lease_of(etcd: &EtcdServer, key: &str) -> i64 {
    let json = etcdctl_ok(etcd, &["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

fn registered(etcd: &EtcdServer, ns: &str) -> usize {
    etcdctl_ok(etcd, &["get", "--prefix", ns, "--keys-only"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// `nixl_etcd_lease_health`: (condition, since_ms, regrants).
fn health(c: &Handle) -> (u32, u64, u64) {
    use nixl_etcd::ffi::*;
    let (mut cond, mut since, mut regrants) = (9u32, 0u64, 0u64);
    // SAFETY: an open handle and writable outputs.
    let st = unsafe { nixl_etcd_lease_health(c.0, &mut cond, &mut since, &mut regrants) };
    assert_eq!(st, NIXL_ETCD_OK);
    (cond, since, regrants)
}

fn setup(etcd: &EtcdServer, ns: &str) -> (Handle, Handle) {
    let owner = open(&etcd.options_json(ns, r#""lease_ttl_s":2,"timeout_s":2"#)).unwrap();
    let reader = open(&etcd.options_json(ns, r#""timeout_s":2"#)).unwrap();
    for r in 0..3 {
        owner.register("prefill_engine", r, &blob(r, 4096)).unwrap();
    }
    (owner, reader)
}

#[test]
fn the_lease_is_renewed_past_its_ttl() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("renew");
    let (owner, reader) = setup(&etcd, &ns);
    std::thread::sleep(Duration::from_secs(5));
    for r in 0..3 {
        assert_eq!(reader.lookup("prefill_engine", r).unwrap(), blob(r, 4096));
    }
    owner.close().unwrap();
    reader.close().unwrap();
}

#[test]
fn a_revoked_lease_is_regranted_and_everything_reregistered() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("revoked");
    let (owner, reader) = setup(&etcd, &ns);
    let key = format!("{ns}/prefill_engine/rank_0");
    assert_eq!(health(&owner).0, nixl_etcd::ffi::NIXL_ETCD_LEASE_KEPT);
    assert_eq!(health(&owner).2, 0);
    let old = lease_of(&etcd, &key);
    etcdctl_ok(&etcd, &["lease", "revoke", &format!("{old:x}")]);
    assert!(wait_until(Duration::from_secs(5), || registered(
        &etcd, &ns
    ) == 3));
    // Lost, then granted again: kept, one re-grant, since the re-grant.
    assert!(wait_until(Duration::from_secs(30), || health(&owner).2 == 1));
    let (cond, since, _) = health(&owner);
    assert_eq!(cond, nixl_etcd::ffi::NIXL_ETCD_LEASE_KEPT);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        since <= now_ms && since + 60_000 > now_ms,
        "{since} {now_ms}"
    );
    let new = lease_of(&etcd, &key);
    assert!(new != 0 && new != old, "old {old:x} new {new:x}");
    for r in 0..3 {
        assert_eq!(reader.lookup("prefill_engine", r).unwrap(), blob(r, 4096));
    }
    // Later registrations go under the new lease, and close still removes all.
    owner.register("prefill_engine", 3, b"late").unwrap();
    assert_eq!(lease_of(&etcd, &format!("{ns}/prefill_engine/rank_3")), new);
    owner.close().unwrap();
    assert_eq!(registered(&etcd, &ns), 0);
    reader.close().unwrap();
}

#[test]
fn registrations_survive_an_etcd_restart() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("restart");
    let (owner, reader) = setup(&etcd, &ns);
    etcd.kill();
    // Renewals fail: renewing, then lost once the 2 s TTL has run out.
    assert!(wait_until(Duration::from_secs(30), || health(&owner).0
        == nixl_etcd::ffi::NIXL_ETCD_LEASE_LOST));
    etcd.restart();
    // Back: kept again, under the same lease or a new one.
    assert!(wait_until(Duration::from_secs(60), || health(&owner).0
        == nixl_etcd::ffi::NIXL_ETCD_LEASE_KEPT));
    // Still there after several TTLs: the client kept renewing.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(registered(&etcd, &ns), 3);
    for r in 0..3 {
        assert_eq!(reader.lookup("prefill_engine", r).unwrap(), blob(r, 4096));
    }
    owner
        .register("prefill_engine", 9, b"after restart")
        .unwrap();
    owner.close().unwrap();
    assert_eq!(registered(&etcd, &ns), 0);
    reader.close().unwrap();
}

#[test]
fn a_wiped_etcd_gets_every_registration_back() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("wiped");
    let (owner, reader) = setup(&etcd, &ns);
    let old = lease_of(&etcd, &format!("{ns}/prefill_engine/rank_0"));
    etcd.kill();
    std::fs::remove_dir_all(etcd.data_dir()).unwrap();
    etcd.restart();
    assert!(
        wait_until(Duration::from_secs(10), || registered(&etcd, &ns) == 3),
        "the client did not re-register into the new etcd"
    );
    assert!(wait_until(Duration::from_secs(5), || reader
        .lookup("prefill_engine", 2)
        .is_ok()));
    for r in 0..3 {
        assert_eq!(reader.lookup("prefill_engine", r).unwrap(), blob(r, 4096));
        let lease = lease_of(&etcd, &format!("{ns}/prefill_engine/rank_{r}"));
        assert!(
            lease != 0 && lease != old,
            "rank {r}: lease {lease:x}, old {old:x}"
        );
    }
    owner.close().unwrap();
    assert_eq!(registered(&etcd, &ns), 0);
    reader.close().unwrap();
}

/// Whether etcd still knows `lease` (`etcdctl lease timetolive`).
fn lease_exists(etcd: &EtcdServer, lease: i64) -> bool {
    let out = etcdctl_ok(etcd, &["lease", "timetolive", &format!("{lease:x}")]);
    !out.contains("already expired")
}

#[test]
fn dropping_the_last_clone_without_close_revokes_the_lease() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("dropped");
    // A TTL far longer than the wait below: only a revoke removes the records.
    let opts = etcd.options_json(&ns, r#""lease_ttl_s":300"#);
    let client = nixl_etcd::Client::open(nixl_etcd::Config::load(Some(&opts)).unwrap()).unwrap();
    let clone = client.clone();
    client.register("prefill_engine", 0, b"rank 0").unwrap();
    let lease = client.lease_id();
    assert!(lease_exists(&etcd, lease));

    // One clone dropped: the other still holds the lease and its records.
    drop(client);
    clone.register("prefill_engine", 1, b"rank 1").unwrap();
    assert_eq!(registered(&etcd, &ns), 2);

    // The last clone dropped: the lease is revoked, as close does.
    drop(clone);
    assert_eq!(registered(&etcd, &ns), 0);
    assert!(!lease_exists(&etcd, lease), "lease {lease:x} still exists");
}
