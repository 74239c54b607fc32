//! Self-test of the etcd test harness in `tests/common`.

use crate::common;

use crate::common::{etcdctl, etcdctl_ok, unique_namespace, EtcdServer};
use std::time::Duration;

#[test]
fn put_get_survives_kill_and_restart() {
    let mut server = EtcdServer::builder()
        .max_request_bytes(4 * 1024 * 1024)
        .start();
    assert!(server.is_running());
    assert!(server.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(
        server.endpoints_json(),
        format!("\"endpoints\":\"{}\"", server.endpoint())
    );
    let first_pid = server.pid();

    let ns = unique_namespace("harness");
    assert!(ns.starts_with("/nixl-etcd-test/harness-"));
    assert_ne!(ns, unique_namespace("harness"));
    let key = format!("{ns}/k");

    etcdctl_ok(&server, &["put", &key, "hello"]);
    let got = etcdctl_ok(&server, &["get", &key, "--print-value-only"]);
    assert_eq!(got.trim(), "hello");

    server.kill();
    assert!(!server.is_running());
    let down = etcdctl(
        &server,
        &[
            "--dial-timeout",
            "500ms",
            "--command-timeout",
            "1s",
            "get",
            &key,
        ],
    );
    assert!(
        !down.status.success(),
        "etcdctl should fail while etcd is down"
    );

    server.restart();
    assert!(server.is_running());
    assert_ne!(server.pid(), first_pid);
    assert!(server.data_dir().join("member").is_dir());
    let got = etcdctl_ok(&server, &["get", &key, "--print-value-only"]);
    assert_eq!(got.trim(), "hello", "key must survive kill + restart");

    server.stop();
    assert!(!server.is_running());
}

#[test]
fn pause_and_resume() {
    let mut server = EtcdServer::start();
    assert!(server.is_healthy(Duration::from_millis(500)));

    server.pause();
    assert!(server.is_running(), "a paused etcd is still a live process");
    assert!(
        !server.is_healthy(Duration::from_millis(500)),
        "a paused etcd must not answer /health"
    );

    server.resume();
    assert!(
        common::wait_until(Duration::from_secs(5), || server
            .is_healthy(Duration::from_millis(500))),
        "etcd must answer /health again after resume"
    );
    let ns = unique_namespace("pause");
    etcdctl_ok(&server, &["put", &format!("{ns}/k"), "v"]);

    // Dropping a paused server must not hang or leak the process.
    let pid = server.pid();
    server.pause();
    drop(server);
    // SAFETY: signal 0 only probes whether the pid still exists.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    assert!(!alive, "etcd {pid} still exists after drop");
}

#[test]
fn cluster_of_three_survives_losing_its_leader() {
    use crate::common::{etcdctl_endpoints, EtcdCluster};
    use std::time::Instant;

    let mut cluster = EtcdCluster::start(3);
    assert_eq!(cluster.len(), 3);
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.split(',').count(), 3);
    for i in 0..3 {
        assert!(endpoints.contains(&cluster.member(i).endpoint()));
        assert!(cluster.member(i).is_healthy(Duration::from_millis(500)));
    }

    let ns = unique_namespace("cluster");
    let key = format!("{ns}/k");
    etcdctl_ok(cluster.member(0), &["put", &key, "replicated"]);
    let got = etcdctl_ok(
        cluster.member(2),
        &["get", &key, "--print-value-only", "--consistency", "l"],
    );
    assert_eq!(
        got.trim(),
        "replicated",
        "a put on member 0 is read on member 2"
    );

    let leader = cluster
        .wait_leader(Duration::from_secs(5))
        .expect("a 3-member cluster has a leader");
    cluster.kill(leader);
    assert!(!cluster.member_mut(leader).is_running());
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let survivor_endpoints = cluster.endpoints_of(&survivors);

    let started = Instant::now();
    let key2 = format!("{ns}/after-failover");
    let mut last = String::new();
    let mut ok = false;
    while started.elapsed() < Duration::from_secs(10) {
        let out = etcdctl_endpoints(
            &survivor_endpoints,
            &[
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "2s",
                "put",
                &key2,
                "v2",
            ],
        );
        if out.status.success() {
            ok = true;
            break;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "no put succeeded on the survivors within 10 s of killing leader {leader}: {last}\n{}",
        cluster.logs(2000)
    );
    let new_leader = cluster
        .wait_leader(Duration::from_secs(5))
        .expect("the survivors elect a leader");
    assert_ne!(new_leader, leader);

    cluster.restart(leader);
    assert!(cluster.member_mut(leader).is_running());
    let got = etcdctl_ok(
        cluster.member(leader),
        &["get", &key2, "--print-value-only", "--consistency", "l"],
    );
    assert_eq!(got.trim(), "v2", "the restarted member catches up");

    cluster.pause(survivors[0]);
    assert!(!cluster
        .member(survivors[0])
        .is_healthy(Duration::from_millis(300)));
    cluster.resume(survivors[0]);
    cluster
        .wait_all_healthy()
        .expect("healthy again after resume");

    let pids: Vec<u32> = (0..3).map(|i| cluster.member(i).pid()).collect();
    drop(cluster);
    for pid in pids {
        // SAFETY: signal 0 only probes whether the pid still exists.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "etcd member {pid} still exists after drop");
    }
}
