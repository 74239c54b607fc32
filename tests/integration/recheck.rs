//! `Client::recheck` / `nixl_etcd_recheck`: what etcd holds now, for a reader
//! whose transfer to a rank just failed.

use crate::common::{unique_namespace, EtcdCluster, EtcdServer};
use nixl_etcd::Status;

/// Restarted: the new incarnation; gone: the guide's "not found" message.
#[test]
fn recheck_tells_a_restart_from_a_departure() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("recheck");
    let reader = etcd.client(&ns, "");
    let first = etcd.client(&ns, "");
    first.register("prefill", 0, b"old").unwrap();
    let seen = reader.lookup("prefill", 0).unwrap();
    assert_eq!(seen.record.incarnation, first.incarnation());

    let now = reader.recheck("prefill", 0).unwrap();
    assert_eq!(
        (now.record.incarnation.as_str(), now.revision),
        (first.incarnation(), seen.revision)
    );

    first.close().unwrap();
    let err = reader.recheck("prefill", 0).unwrap_err();
    assert_eq!(err.status, Status::ErrNotFound);
    assert!(
        err.message
            .starts_with("Engine prefill not found in ETCD (rank 0, key "),
        "{}",
        err.message
    );

    let second = etcd.client(&ns, "");
    second.register("prefill", 0, b"new").unwrap();
    let now = reader.recheck("prefill", 0).unwrap();
    assert_eq!(now.record.incarnation, second.incarnation());
    assert_ne!(now.record.incarnation, first.incarnation());
    assert_eq!(now.metadata.as_slice(), b"new");
}

/// etcd gone: an error, never the cache's copy (which lookups keep serving).
#[test]
fn recheck_never_answers_from_the_cache() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("recheck-down");
    let owner = etcd.client(&ns, "");
    owner.register("prefill", 0, b"md").unwrap();
    let reader = etcd.client(&ns, "\"timeout_s\":2");
    reader.lookup("prefill", 0).unwrap();
    etcd.stop();
    assert_eq!(
        reader.lookup("prefill", 0).unwrap().metadata.as_slice(),
        b"md"
    );
    let err = reader.recheck("prefill", 0).unwrap_err();
    assert!(
        matches!(err.status, Status::ErrConnection | Status::ErrTimeout),
        "{err}"
    );
}

/// Two of three members down: recheck is answered by the one left (a
/// serializable read), present and absent alike.
#[test]
fn recheck_answers_without_quorum() {
    let mut cluster = EtcdCluster::start(3);
    let ns = unique_namespace("recheck-quorum");
    let owner = cluster.member(0).client(&ns, "");
    owner.register("prefill", 0, b"md").unwrap();
    let reader = cluster.client(&ns, "\"timeout_s\":3");
    let before = reader.recheck("prefill", 0).unwrap();
    cluster.kill(0);
    cluster.kill(1);
    let now = reader.recheck("prefill", 0).unwrap();
    assert_eq!(
        (now.record.incarnation.as_str(), now.revision),
        (owner.incarnation(), before.revision)
    );
    let err = reader.recheck("absent", 0).unwrap_err();
    assert_eq!(err.status, Status::ErrNotFound, "{err}");
}
