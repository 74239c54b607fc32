//! Self-test of the etcd test harness in `tests/common`.

mod common;

use common::{etcdctl, etcdctl_ok, unique_namespace, EtcdServer};
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
