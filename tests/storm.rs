//! The restart storm in CI (`benches/storm`, a binary of its own: eight
//! engine processes and three etcd members share the machine with nothing
//! else). It asserts the storm's goals that do not depend on timing; the
//! long storm and its latencies are the benchmark.

#[path = "common/mod.rs"]
mod common;
#[path = "../benches/storm/shared.rs"]
mod shared;
#[path = "../benches/storm/run.rs"]
mod storm;

use storm::{run, Options};

fn short(seed: u64) -> Options {
    let mut o = Options::new(30.0, seed);
    o.quorum_loss_s = 8.0;
    o
}

/// 30 s of kills, a stall past the TTL, an etcd leader kill and a quorum
/// loss: no stale transfer, no failure but those the faults cause, every
/// restarted engine serves again, and at the end every living pair serves
/// with nobody touching an engine; no prefill still holds a restarted
/// decode.
#[test]
fn a_fleet_heals_itself_through_a_storm() {
    let r = run(&short(7));
    let report = serde_json::to_string_pretty(&r.to_json()).unwrap();
    assert!(
        r.kills >= 4 && r.stalls == 1 && r.leader_kills == 1,
        "{report}"
    );
    assert!(r.quorum_loss.seconds >= 8.0, "{report}");
    assert!(r.ok > 0, "{report}");
    assert_eq!(r.stale_transfers, 0, "{report}");
    assert_eq!(r.unexpected_failures(), 0, "{report}");
    assert_eq!(r.unrecovered, 0, "{report}");
    assert!(!r.detection_ms.is_empty(), "{report}");
    // The stalled prefill came back as itself; its peers kept its agent.
    assert!(r.served_after_stall > 0, "{report}");
    assert_eq!(r.reloads_after_stall, 0, "{report}");
    assert_eq!(
        (r.unserved_pairs, r.manual_restarts, r.stale_holds),
        (0, 0, 0),
        "{report}"
    );
}

/// The stale-transfer counter counts: a prefill made to serve the pattern of
/// an incarnation it is not is caught on every read of it, and only there.
#[test]
fn a_transfer_from_a_stale_agent_is_counted() {
    let mut o = Options::new(3.0, 3);
    o.prefills = 2;
    o.decodes = 1;
    o.stale_prefill = true;
    o.kill_every_s = (1e6, 1e6);
    o.etcd_and_stall_faults = false;
    // prefill-0 is never served well: no need to wait for it.
    o.settle_limit_s = 1.0;
    let r = run(&o);
    let report = serde_json::to_string_pretty(&r.to_json()).unwrap();
    assert!(r.stale_transfers > 0, "{report}");
    assert_eq!(
        r.failed.get("stale").copied(),
        Some(r.stale_transfers),
        "{report}"
    );
    assert!(r.ok > 0, "reads of the honest prefill pass: {report}");
}
