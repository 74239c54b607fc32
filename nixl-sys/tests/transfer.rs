//! Two real NIXL agents (UCX, DRAM) in one process: metadata exchanged by
//! hand, a READ with a notification, every byte checked. Needs NIXL (the PyPI
//! wheel, or NIXL_CAPI_LIB).

use std::time::Duration;

use nixl_sys::{Agent, MemType, XferOp};

#[test]
fn two_agents_move_bytes_over_ucx() {
    let a = Agent::new(&format!("nixl-sys-test-a-{}", std::process::id()))
        .unwrap_or_else(|e| panic!("{e}"));
    let b = Agent::new(&format!("nixl-sys-test-b-{}", std::process::id())).unwrap();
    assert!(a.plugins().unwrap().iter().any(|p| p == "UCX"));
    let ua = a.create_backend("UCX", &[]).unwrap();
    let ub = b.create_backend("UCX", &[]).unwrap();

    let len = 8 << 20;
    let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    let ra = a
        .register(MemType::Dram, &[(src.as_ptr() as usize, len, 0)], &ua)
        .unwrap();
    let rb = b
        .register(MemType::Dram, &[(dst.as_mut_ptr() as usize, len, 0)], &ub)
        .unwrap();

    // B reads A's buffer: B needs A's metadata; A needs B's to get the notification.
    let md_a = a.local_metadata().unwrap();
    assert!(md_a.len() > 300, "metadata of {} bytes", md_a.len());
    assert_eq!(b.load_remote_metadata(&md_a).unwrap(), a.name());
    assert_eq!(
        a.load_remote_metadata(&b.local_metadata().unwrap())
            .unwrap(),
        b.name()
    );
    assert!(b.has_remote(a.name()));

    let xfer = b
        .transfer(
            XferOp::Read,
            (MemType::Dram, MemType::Dram),
            &[(dst.as_mut_ptr() as usize, len, 0)],
            a.name(),
            &[(src.as_ptr() as usize, len, 0)],
            &ub,
            Some(b"read-done"),
        )
        .unwrap();
    xfer.run(Duration::from_secs(30)).unwrap();
    assert!(dst == src, "bytes differ after the transfer");
    let got = a
        .wait_notification(Some(b.name()), b"read-done", Duration::from_secs(10))
        .unwrap();
    assert!(got.iter().any(|n| n.message == b"read-done"));

    b.invalidate_remote(a.name()).unwrap();
    assert!(!b.has_remote(a.name()));
    drop(xfer);
    drop((ra, rb));
}
