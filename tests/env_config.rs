//! Configuration from the guide's environment variables, through
//! `nixl_etcd_open(NULL, ...)`. One test: it changes the process environment.

mod capi;
mod common;

use std::ffi::CString;

use capi::{last_error, open};
use common::{etcdctl_ok, unique_namespace, EtcdServer};
use nixl_etcd::ffi::*;

fn open_from_env() -> Result<capi::Handle, capi::Failure> {
    let mut h = std::ptr::null_mut();
    let rc = unsafe { nixl_etcd_open(std::ptr::null(), &mut h) };
    if rc == NIXL_ETCD_OK {
        Ok(capi::Handle(h))
    } else {
        Err(capi::Failure {
            status: rc,
            message: last_error(),
        })
    }
}

#[test]
fn the_guides_environment_configures_the_client() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("env");
    std::env::set_var("VLLM_NIXL_ETCD_ENDPOINTS", format!("{},", etcd.endpoint()));
    std::env::set_var("VLLM_NIXL_ETCD_NAMESPACE", format!("{ns}/"));
    std::env::set_var("VLLM_NIXL_ETCD_TIMEOUT", "3");
    std::env::set_var("VLLM_NIXL_ETCD_LEASE_TTL", "7");
    std::env::set_var("VLLM_NIXL_SIDE_CHANNEL_HOST", "node1.example.com");

    let c = open_from_env().unwrap();
    c.register("prefill_engine", 0, b"md").unwrap();
    // Namespace normalized (trailing slash dropped), host recorded.
    let key = format!("{ns}/prefill_engine/rank_0");
    let v: serde_json::Value =
        serde_json::from_str(etcdctl_ok(&etcd, &["get", &key, "--print-value-only"]).trim())
            .unwrap();
    assert_eq!(v["host"], "node1.example.com");
    let json = etcdctl_ok(&etcd, &["get", &key, "-w", "json"]);
    let lease = serde_json::from_str::<serde_json::Value>(json.trim()).unwrap()["kvs"][0]["lease"]
        .as_i64()
        .unwrap();
    let ttl = etcdctl_ok(&etcd, &["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("granted with TTL(7s)"), "{ttl}");
    // An empty options string is the environment too; options override it.
    let empty = CString::new("").unwrap();
    let mut h = std::ptr::null_mut();
    assert_eq!(
        unsafe { nixl_etcd_open(empty.as_ptr(), &mut h) },
        NIXL_ETCD_OK
    );
    let d = capi::Handle(h);
    assert_eq!(d.lookup("prefill_engine", 0).unwrap(), b"md");
    let other_ns = open(&format!(r#"{{"namespace":"{ns}-other"}}"#)).unwrap();
    assert_eq!(
        other_ns.lookup("prefill_engine", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    // VLLM_NIXL_ETCD_TIMEOUT is the default wait timeout (timeout_ms < 0).
    let err = c.wait("absent_engine", 0, -1).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        err.message
            .starts_with("Timeout waiting for engine absent_engine (rank 0) after 3.0 s"),
        "{}",
        err.message
    );
    for h in [c, d, other_ns] {
        h.close().unwrap();
    }

    // Bad values are clear errors at open, naming the variable.
    for (var, value) in [
        ("VLLM_NIXL_ETCD_TIMEOUT", "ten"),
        ("VLLM_NIXL_ETCD_LEASE_TTL", "-1"),
        ("VLLM_NIXL_ETCD_ENDPOINTS", "http://"),
        ("VLLM_NIXL_ETCD_NAMESPACE", "/a/../b"),
    ] {
        let saved = std::env::var(var).unwrap();
        std::env::set_var(var, value);
        let err = open_from_env().unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT, "{var}={value}");
        assert!(err.message.contains(var), "{var}: {}", err.message);
        std::env::set_var(var, saved);
    }

    // VLLM_NIXL_USE_ETCD.
    std::env::remove_var("VLLM_NIXL_USE_ETCD");
    assert!(!nixl_etcd_enabled());
    for (v, want) in [
        ("1", true),
        ("true", true),
        ("yes", true),
        ("on", true),
        (" TRUE ", true),
        ("0", false),
        ("false", false),
        ("no", false),
        ("off", false),
        ("", false),
        ("2", false),
    ] {
        std::env::set_var("VLLM_NIXL_USE_ETCD", v);
        assert_eq!(nixl_etcd_enabled(), want, "{v}");
    }
}
