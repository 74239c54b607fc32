//! Through etcd's gRPC proxy (`etcd grpc-proxy start`), in front of a
//! 3-member cluster: registrations, reads and waits pass through it, and the
//! lease is renewed, not lost. The proxy answers a keep-alive at the cadence
//! of its own keep-alive of the lease (every third of the TTL), not at once.

use std::time::Duration;

use crate::common::{etcdctl_endpoints, unique_namespace, wait_until, EtcdCluster, GrpcProxy};
use nixl_etcd::{Client, Config};

const TTL_S: u64 = 3;

fn client(endpoint: &str, ns: &str) -> Client {
    let opts = format!(
        r#"{{"endpoints":"{endpoint}","namespace":"{ns}","lease_ttl_s":{TTL_S},"timeout_s":5}}"#
    );
    Client::open(Config::from_sources(|_| None, Some(&opts)).unwrap()).unwrap()
}

/// The lease a key is attached to, as the cluster itself says.
fn lease_of(cluster: &EtcdCluster, key: &str) -> i64 {
    let out = etcdctl_endpoints(&cluster.endpoints(), &["get", key, "-w", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

/// A new client through `proxy`, after checking that it reads `rank_0`'s
/// exact bytes.
fn reads_through(proxy: &GrpcProxy, ns: &str, rank0: &[u8]) -> Client {
    let reader = client(&proxy.endpoint(), ns);
    let found = reader.lookup("prefill_engine", 0).unwrap();
    assert_eq!(found.metadata.as_slice(), rank0);
    reader
}

/// Waits for `n` more renewals than `from` (each renewal is one request).
fn renewals(c: &Client, from: u64, n: u64) -> bool {
    wait_until(Duration::from_secs(20 * TTL_S), || {
        c.requests_issued() >= from + n
    })
}

#[test]
fn through_the_proxy_the_lease_is_renewed_not_regranted() {
    let cluster = EtcdCluster::start(3);
    let proxy = GrpcProxy::start(&cluster.endpoints());
    let ns = unique_namespace("proxy-renew");
    let owner = client(&proxy.endpoint(), &ns);
    owner
        .register("prefill_engine", 0, b"agent\0metadata")
        .unwrap();
    let lease = owner.lease_id();
    let key = format!("{ns}/prefill_engine/rank_0");
    assert_eq!(lease_of(&cluster, &key), lease);

    // Three TTLs of renewals, all on the lease granted first.
    assert!(renewals(&owner, owner.requests_issued(), 9));
    assert_eq!(
        owner.lease_id(),
        lease,
        "the lease was re-granted through the proxy"
    );
    assert_eq!(lease_of(&cluster, &key), lease);

    // A reader through the same proxy: lookup and a wait for a later rank.
    let reader = reads_through(&proxy, &ns, b"agent\0metadata");
    let waiting = std::thread::spawn(move || {
        reader
            .wait("prefill_engine", 1, Some(Duration::from_secs(60)))
            .map(|f| f.metadata.to_vec())
    });
    owner.register("prefill_engine", 1, b"rank one").unwrap();
    assert_eq!(waiting.join().unwrap().unwrap(), b"rank one");
    owner.close().unwrap();
    assert_eq!(
        lease_of(&cluster, &key),
        0,
        "close revoked the lease through the proxy"
    );
}

#[test]
fn a_member_killed_and_the_proxy_restarted_lose_nothing() {
    let mut cluster = EtcdCluster::start(3);
    let mut proxy = GrpcProxy::start(&cluster.endpoints());
    let ns = unique_namespace("proxy-faults");
    let owner = client(&proxy.endpoint(), &ns);
    owner.register("prefill_engine", 0, b"rank zero").unwrap();
    let key = format!("{ns}/prefill_engine/rank_0");

    // A member dies (the leader, the worst case): the proxy moves on.
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .expect("a leader");
    cluster.kill(leader);
    assert!(renewals(&owner, owner.requests_issued(), 6));
    assert_eq!(lease_of(&cluster, &key), owner.lease_id());

    // The proxy crashes and comes back on its port: the client reconnects,
    // its record stays (or is re-registered under a new lease, if the
    // outage outlived it), and a new reader through the proxy finds it.
    proxy.kill();
    proxy.restart();
    assert!(renewals(&owner, owner.requests_issued(), 6));
    assert!(wait_until(Duration::from_secs(20 * TTL_S), || {
        lease_of(&cluster, &key) == owner.lease_id()
    }));
    reads_through(&proxy, &ns, b"rank zero");
}
