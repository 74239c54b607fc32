//! Two processes, each with its own NIXL agent (UCX, DRAM), exchange metadata
//! only through nixl-etcd and a real etcd; decode READs 64 MiB of KV blocks,
//! notifies the prefill, and checks every byte. Needs the `nixl` feature and
//! NIXL at run time (the PyPI wheel, or NIXL_CAPI_LIB).
#![cfg(feature = "nixl")]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{unique_namespace, EtcdServer};

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
