//! Two processes, each with its own NIXL agent (UCX, DRAM), exchange metadata
//! only through nixl-etcd and a real etcd; decode READs 64 MiB of KV blocks,
//! notifies the prefill, and checks every byte. Needs the `nixl` feature and
//! NIXL at run time (the PyPI wheel, or NIXL_CAPI_LIB).
#![cfg(feature = "nixl")]

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{unique_namespace, EtcdServer};

fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|d| d.parent()).unwrap();
    profile.join("examples/kv_transfer")
}

#[test]
fn decode_reads_64_mib_of_kv_blocks_from_prefill_found_through_etcd() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("kv");
    let env = [
        ("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint()),
        ("VLLM_NIXL_ETCD_NAMESPACE", ns.clone()),
    ];
    let prefill = Command::new(example())
        .args([
            "prefill",
            "prefill_engine",
            "--blocks",
            "64",
            "--block-kib",
            "1024",
            "--timeout-s",
            "60",
        ])
        .envs(env.clone())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the kv_transfer example is built with --features nixl");
    // Decode starts at once: it waits for the prefill through etcd.
    let decode = Command::new(example())
        .args(["decode", "prefill_engine", "--timeout-s", "60"])
        .envs(env)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&decode.stdout);
    let err = String::from_utf8_lossy(&decode.stderr);
    assert!(decode.status.success(), "decode failed:\n{out}\n{err}");
    assert!(out.contains("verified 67108864 of 67108864 bytes"), "{out}");
    assert!(out.contains("ETCD handshake completed in"), "{out}");
    let prefill = prefill.wait_with_output().unwrap();
    let pout = String::from_utf8_lossy(&prefill.stdout);
    assert!(
        prefill.status.success(),
        "prefill failed:\n{pout}\n{}",
        String::from_utf8_lossy(&prefill.stderr)
    );
    assert!(pout.contains("decode read every block"), "{pout}");
    println!("{pout}{out}");
    // Both clients closed: their records are gone.
    assert!(common::wait_until(Duration::from_secs(5), || {
        common::etcdctl_ok(&etcd, &["get", "--prefix", &ns, "--keys-only"])
            .trim()
            .is_empty()
    }));
}

/// With pre-warm the decode starts first; the prefill's agent is loaded on
/// its ADDED event, and the request (the READ) finds it loaded.
#[test]
fn a_decode_started_first_with_prewarm_finds_the_prefill_loaded_at_its_request() {
    use std::io::{BufRead, BufReader, Read};

    let etcd = EtcdServer::start();
    let ns = unique_namespace("kv-prewarm");
    let env = [
        ("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint()),
        ("VLLM_NIXL_ETCD_NAMESPACE", ns.clone()),
    ];
    let mut decode = Command::new(example())
        .args([
            "decode",
            "prefill_engine",
            "--timeout-s",
            "60",
            "--prewarm",
            "1",
        ])
        .envs(env.clone())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(decode.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "decode: ready, pre-warming prefill_engine\n");
    let prefill = Command::new(example())
        .args([
            "prefill",
            "prefill_engine",
            "--blocks",
            "16",
            "--timeout-s",
            "60",
        ])
        .envs(env)
        .output()
        .unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = decode.wait().unwrap();
    let mut err = String::new();
    decode
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "decode failed:\n{rest}\n{err}");
    let pout = String::from_utf8_lossy(&prefill.stdout);
    let agent = pout
        .split_whitespace()
        .nth(2)
        .expect("prefill: agent NAME published ...");
    assert!(
        rest.contains(&format!(
            "decode: remote agent {agent} was pre-warmed (loaded before the request)"
        )),
        "{rest}"
    );
    assert!(
        rest.contains("decode: verified 16777216 of 16777216 bytes"),
        "{rest}"
    );
    assert!(prefill.status.success(), "{pout}");
}

use crate::capi;

/// The C exports take the `nixl_capi_agent_t` a C engine already has.
#[test]
fn c_exports_publish_an_agent_and_load_it_into_another() {
    use nixl_etcd::ffi::*;
    use nixl_etcd::nixl::nixl_sys::Agent;
    use std::ffi::{CStr, CString};

    let etcd = EtcdServer::start();
    let ns = unique_namespace("capi-nixl");
    let prefill = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let decode = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let a = Agent::new(&format!("capi-prefill-{}", std::process::id())).unwrap();
    let b = Agent::new(&format!("capi-decode-{}", std::process::id())).unwrap();
    let _ucx = (
        a.create_backend("UCX", &[]).unwrap(),
        b.create_backend("UCX", &[]).unwrap(),
    );
    let engine = CString::new("prefill_engine").unwrap();
    unsafe {
        assert_eq!(
            nixl_etcd_publish_agent(prefill.0, engine.as_ptr(), 0, a.as_raw().cast()),
            NIXL_ETCD_OK,
            "{}",
            capi::last_error()
        );
        let mut name = std::ptr::null_mut();
        assert_eq!(
            nixl_etcd_load_remote_agent(
                decode.0,
                b.as_raw().cast(),
                engine.as_ptr(),
                0,
                5000,
                &mut name
            ),
            NIXL_ETCD_OK,
            "{}",
            capi::last_error()
        );
        assert_eq!(CStr::from_ptr(name).to_str().unwrap(), a.name());
        nixl_etcd_string_free(name);
        assert!(b.has_remote(a.name()));
        // NULL agent, and a rank that never comes.
        assert_eq!(
            nixl_etcd_publish_agent(prefill.0, engine.as_ptr(), 1, std::ptr::null_mut()),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        let mut name = std::ptr::null_mut();
        assert_eq!(
            nixl_etcd_load_remote_agent(
                decode.0,
                b.as_raw().cast(),
                engine.as_ptr(),
                9,
                200,
                &mut name
            ),
            NIXL_ETCD_ERR_TIMEOUT
        );
        assert!(name.is_null());
        // Metadata that is not a NIXL agent's is a NIXL error, not a crash.
        assert_eq!(
            nixl_etcd_register(prefill.0, engine.as_ptr(), 2, b"junk".as_ptr(), 4),
            NIXL_ETCD_OK
        );
        assert_eq!(
            nixl_etcd_load_remote_agent(
                decode.0,
                b.as_raw().cast(),
                engine.as_ptr(),
                2,
                5000,
                &mut name
            ),
            NIXL_ETCD_ERR_NIXL
        );
        assert!(
            capi::last_error().contains("load_remote_md"),
            "{}",
            capi::last_error()
        );
    }
    prefill.close().unwrap();
    decode.close().unwrap();
}
