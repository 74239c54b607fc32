//! The C examples (the guide's Terminal 1 and Terminal 2), built with their
//! Makefile against the library and run against a private etcd. Also the
//! lease promise: a registrant killed with SIGKILL disappears within TTL + 1 s.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{build_c_examples, keys_under, unique_namespace, EtcdServer};

fn env_for(etcd: &EtcdServer, ns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("VLLM_NIXL_USE_ETCD", "1".into()),
        ("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint()),
        ("VLLM_NIXL_ETCD_NAMESPACE", ns.into()),
        ("VLLM_NIXL_ETCD_TIMEOUT", "10".into()),
    ]
}

/// Starts `prefill` and waits for its "holding" line.
fn start_prefill(
    etcd: &EtcdServer,
    ns: &str,
    engine: &str,
    ranks: u32,
    extra_env: &[(&str, &str)],
) -> Child {
    let dir = build_c_examples();
    let mut cmd = Command::new(dir.join("prefill"));
    cmd.args([engine, &ranks.to_string()])
        .envs(env_for(etcd, ns))
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("prefill starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "prefill exited before holding"
        );
        if line.contains("holding") {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

#[test]
fn prefill_and_decode_find_each_other_and_verify_every_byte() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("examples");
    let mut prefill = start_prefill(&etcd, &ns, "prefill_engine", 4, &[]);
    assert_eq!(keys_under(&etcd, &ns).len(), 4);
    let dir = build_c_examples();
    let out = Command::new(dir.join("decode"))
        .args(["prefill_engine", "4"])
        .envs(env_for(&etcd, &ns))
        .env("VLLM_LOGGING_LEVEL", "DEBUG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "decode failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches("8192 bytes verified").count(), 4, "{stdout}");
    assert!(stdout.contains("ETCD handshake completed in"), "{stdout}");
    // The guide's DEBUG lines, exactly.
    assert!(
        stderr.contains("DEBUG: Discovering engine prefill_engine through ETCD"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DEBUG: ETCD handshake completed in "),
        "{stderr}"
    );
    // SIGTERM: prefill closes its client, which revokes the lease at once.
    unsafe { libc::kill(prefill.id() as i32, libc::SIGTERM) };
    let status = prefill.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(keys_under(&etcd, &ns).is_empty());
}

#[test]
fn prefill_logs_the_guides_info_lines() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("logs");
    let dir = build_c_examples();
    let out = Command::new(dir.join("prefill"))
        .args(["prefill_engine", "2", "--hold", "0"])
        .envs(env_for(&etcd, &ns))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches("INFO: Initialized NIXL ETCD coordinator: engine_id=prefill_engine")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        stderr
            .matches("INFO: Registered NIXL agent with ETCD")
            .count(),
        2,
        "{stderr}"
    );
    // At ERROR level the INFO lines are gone.
    let out = Command::new(dir.join("prefill"))
        .args(["prefill_engine", "1", "--hold", "0"])
        .envs(env_for(&etcd, &ns))
        .env("VLLM_LOGGING_LEVEL", "ERROR")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("INFO:"));
}

#[test]
fn decode_reports_the_guides_timeout_message() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("decode-timeout");
    let dir = build_c_examples();
    let out = Command::new(dir.join("decode"))
        .args(["prefill_engine", "1", "--timeout-ms", "300"])
        .envs(env_for(&etcd, &ns))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Timeout waiting for engine prefill_engine"),
        "{stderr}"
    );
}

#[test]
fn a_registrant_killed_with_sigkill_vanishes_within_ttl_plus_one_second() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("sigkill");
    let ttl = 2;
    let mut prefill = start_prefill(
        &etcd,
        &ns,
        "prefill_engine",
        3,
        &[("VLLM_NIXL_ETCD_LEASE_TTL", "2")],
    );
    // Renewals keep it alive well past the TTL.
    std::thread::sleep(Duration::from_secs(ttl + 1));
    assert_eq!(keys_under(&etcd, &ns).len(), 3);
    prefill.kill().unwrap();
    let killed = Instant::now();
    prefill.wait().unwrap();
    let gone = common::wait_until(Duration::from_secs(ttl + 3), || {
        keys_under(&etcd, &ns).is_empty()
    });
    let took = killed.elapsed();
    assert!(gone, "records still there after {took:?}");
    assert!(
        took <= Duration::from_secs(ttl + 1),
        "records vanished after {took:?}, TTL is {ttl} s"
    );
    eprintln!("records of the SIGKILLed registrant vanished after {took:?} (TTL {ttl} s)");
}
