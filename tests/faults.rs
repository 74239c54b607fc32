//! Reliability under faults, against a real 3-member etcd cluster on
//! loopback: members killed and restarted, the whole cluster restarted,
//! wiped and hung, registrant processes killed, clients closed under
//! blocked waiters, many threads with a fork. Every load call is recorded
//! with its time; each test appends its row to `target/faults.md`:
//!
//! | scenario | calls attempted | calls failed | longest gap | time to recover | records lost |
//!
//! * longest gap: per client, the longest time between two successful
//!   registers (writes always reach etcd; reads may come from the cache), the
//!   worst client;
//! * time to recover: from the moment the fault is repaired (the member or
//!   cluster is back and healthy, SIGCONT) until every client completed a
//!   register that started after it; for a member kill, from the kill (the
//!   cluster keeps a quorum, so nothing needs repairing);
//! * records lost: registrations that a fresh client does not find in etcd
//!   as their owner last wrote them, once the faults are over.
//!
//! The tests run one at a time (they share two cores and measure time).
//! Slow: about 20-40 s each.

mod capi;
mod common;
mod faultkit;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{unique_namespace, EtcdCluster};
use faultkit::{Load, LoadSpec, Row};

/// One fault test at a time: each runs a 3-member cluster and measures time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Tens of thousands of registers would each log the guide's INFO line;
    // WARNING keeps what matters here (lost leases, broken watches). Read
    // once, at the first open of this process; set before any client exists.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::env::set_var("VLLM_LOGGING_LEVEL", "WARNING"));
    guard
}

/// The client timeout of the load (VLLM_NIXL_ETCD_TIMEOUT).
const TIMEOUT_S: f64 = 3.0;
const CLIENTS: usize = 4;
const THREADS: usize = 3;

fn load_spec(cluster: &EtcdCluster, ns: &str, extra: &str) -> LoadSpec {
    let mut opts = format!("\"timeout_s\":{TIMEOUT_S},\"lease_ttl_s\":5");
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    LoadSpec {
        clients: CLIENTS,
        threads: THREADS,
        options: cluster.options_json(ns, &opts),
        wait_ms: 1000,
        pause: Duration::from_millis(20),
    }
}

/// What a write may take beyond the timeout before a client counts as
/// stuck: thread wake-ups on two busy cores.
const SLACK: Duration = Duration::from_millis(500);

/// A client may go without a successful write only as long as one call can
/// fail: a write in flight on a member that forwarded it to a leader that
/// just died is held by etcd (its own request timeout is 7 s) until the
/// client's timeout ends it.
fn assert_gap_within_timeout(gap: Duration) {
    assert!(
        gap <= Duration::from_secs_f64(TIMEOUT_S) + SLACK,
        "a client could not write for {gap:?} (timeout {TIMEOUT_S} s + slack {SLACK:?})"
    );
}

/// Every load client reads, for every rank of its peer, what that rank's
/// owner last wrote (within a few seconds): no cache kept an old value.
fn assert_caches_current(out: &faultkit::Outcome) {
    let stale = out.stale_reads(Duration::from_secs(8));
    assert!(stale.is_empty(), "caches serve old values: {stale:#?}");
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn sleep(d: Duration) {
    std::thread::sleep(d)
}

/// Scenario 1: SIGKILL the leader; restart it; later SIGKILL a follower; restart it.
/// The cluster keeps a quorum throughout: no client may go without a
/// successful write for longer than its timeout, and nothing is lost.
#[test]
fn slow_kill_leader_then_follower_and_restart_them() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let ns = unique_namespace("faults-kill");
    let spec = load_spec(&cluster, &ns, "");
    let load = Load::start(spec.clone());
    sleep(Duration::from_secs(3));

    let leader = cluster
        .wait_leader(Duration::from_secs(10))
        .expect("a leader");
    let killed_leader_at = load.now();
    cluster.kill(leader);
    println!(
        "{:.3}s: killed leader member {leader}",
        secs(killed_leader_at)
    );
    sleep(Duration::from_secs(4));
    cluster.restart(leader);
    let leader_back_at = load.now();
    println!("{:.3}s: member {leader} back", secs(leader_back_at));
    sleep(Duration::from_secs(3));

    let new_leader = cluster
        .wait_leader(Duration::from_secs(10))
        .expect("a leader");
    let follower = (0..3).find(|&i| i != new_leader).unwrap();
    let killed_follower_at = load.now();
    cluster.kill(follower);
    println!(
        "{:.3}s: killed follower member {follower}",
        secs(killed_follower_at)
    );
    sleep(Duration::from_secs(4));
    cluster.restart(follower);
    let follower_back_at = load.now();
    println!("{:.3}s: member {follower} back", secs(follower_back_at));
    sleep(Duration::from_secs(3));

    let out = load.finish();
    let lost = out.lost_records(&spec.options, Duration::from_secs(10));
    let gaps = out.longest_write_gap();
    let worst_gap = gaps.iter().max().copied().unwrap();
    let recover = [
        killed_leader_at,
        leader_back_at,
        killed_follower_at,
        follower_back_at,
    ]
    .iter()
    .map(|&at| out.recovered_after(at).expect("every client wrote again"))
    .max()
    .unwrap();
    println!("failures ({}):\n{}", out.failures().len(), out.error_log());
    println!(
        "write gaps per client: {gaps:?}; call gaps {:?}",
        out.longest_call_gap()
    );
    faultkit::report(&Row {
        id: "1",
        scenario: "1. SIGKILL leader, restart; SIGKILL follower, restart".into(),
        attempted: out.attempted(),
        failed: out.failures().len(),
        longest_gap: Some(worst_gap),
        recover: Some(recover),
        lost: lost.len(),
        notes: format!(
            "{CLIENTS} clients x {THREADS} threads, timeout {TIMEOUT_S} s; failures: {}",
            if out.failures().is_empty() {
                "none".into()
            } else {
                out.failure_summary()
            }
        ),
    });
    assert!(out.corrupt.is_empty(), "{:#?}", out.corrupt);
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert_gap_within_timeout(worst_gap);
    assert_caches_current(&out);
    out.close_all();
}

/// The lease of `key` as etcd reports it (0: none, or no such key).
fn lease_of(endpoints: &str, key: &str) -> i64 {
    let out = common::etcdctl_endpoints(endpoints, &["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

/// etcd's current revision (of the first member that answers).
fn revision(cluster: &EtcdCluster) -> i64 {
    let out =
        common::etcdctl_endpoints(&cluster.endpoints(), &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["Status"]["header"]["revision"].as_i64().unwrap_or(0)
}

fn load_keys(ns: &str) -> Vec<String> {
    (0..CLIENTS)
        .flat_map(|c| (0..THREADS).map(move |t| format!("{ns}/{}/rank_{t}", faultkit::engine(c))))
        .collect()
}

/// Kills every member (SIGKILL) and, `down` later, starts them all again;
/// `wipe` deletes their data dirs first (a new, empty cluster on the same
/// ports). Returns when every member is healthy.
fn bring_back_all(
    cluster: &mut EtcdCluster,
    down: Duration,
    wipe: bool,
    while_down: impl FnOnce(),
) {
    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    while_down();
    if wipe {
        for i in 0..cluster.len() {
            let dir = cluster.member(i).data_dir();
            if dir.exists() {
                std::fs::remove_dir_all(&dir).expect("delete a member's data dir");
            }
        }
    }
    sleep(down);
    for i in 0..cluster.len() {
        cluster.restart_no_wait(i);
    }
    if let Err(e) = cluster.wait_all_healthy() {
        panic!("the cluster did not come back: {e}\n{}", cluster.logs(3000));
    }
}

/// Scenario 2: The whole cluster killed and started again on the same data dirs:
/// clients reconnect by themselves, leases survive (or are re-granted),
/// every registration is back, and waits blocked across the outage return
/// once what they wait for is registered.
#[test]
fn slow_whole_cluster_restart_keeps_everything() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let ns = unique_namespace("faults-restart");
    let spec = load_spec(&cluster, &ns, "");
    let load = Load::start(spec.clone());
    // Waiters blocked across the restart, for ranks registered after it.
    let waiter = capi::open(&spec.options).unwrap();
    let late = capi::open(&spec.options).unwrap();
    let t0 = Instant::now();
    let waiters: Vec<_> = (0..3u32)
        .map(|r| std::thread::spawn(move || (waiter.wait("late_engine", r, 40_000), t0.elapsed())))
        .collect();
    sleep(Duration::from_secs(3));
    let keys = load_keys(&ns);
    let leases_before: Vec<i64> = keys
        .iter()
        .map(|k| lease_of(&cluster.endpoints(), k))
        .collect();

    let down_at = load.now();
    bring_back_all(&mut cluster, Duration::from_secs(2), false, || ());
    let back_at = load.now();
    println!(
        "{:.3}s: cluster down; {:.3}s: back",
        secs(down_at),
        secs(back_at)
    );
    // The late ranks, registered by a client opened before the restart.
    let registered_at = t0.elapsed();
    for r in 0..3u32 {
        late.register("late_engine", r, &capi::blob(r, 2048))
            .unwrap_or_else(|e| panic!("register after the restart: {e:?}"));
    }
    sleep(Duration::from_secs(4));

    let out = load.finish();
    for (r, w) in waiters.into_iter().enumerate() {
        let (got, when) = w.join().unwrap();
        assert_eq!(
            got.as_deref().ok(),
            Some(&capi::blob(r as u32, 2048)[..]),
            "waiter {r}: {got:?}"
        );
        assert!(
            when >= registered_at && when - registered_at < Duration::from_secs(3),
            "waiter {r} returned at {when:?}, registered at {registered_at:?}"
        );
    }
    let lost = out.lost_records(&spec.options, Duration::from_secs(10));
    let leases_after: Vec<i64> = keys
        .iter()
        .map(|k| lease_of(&cluster.endpoints(), k))
        .collect();
    let kept = leases_before
        .iter()
        .zip(&leases_after)
        .filter(|(b, a)| b == a && **a != 0)
        .count();
    assert!(
        leases_after.iter().all(|&l| l != 0),
        "a key without a lease: {leases_after:?}"
    );
    let recover = out
        .recovered_after(back_at)
        .expect("every client wrote again");
    println!("failures ({}):\n{}", out.failures().len(), out.error_log());
    faultkit::report(&Row {
        id: "2",
        scenario: "2. whole cluster SIGKILLed, restarted on its data dirs".into(),
        attempted: out.attempted(),
        failed: out.failures().len(),
        longest_gap: out.longest_write_gap().into_iter().max(),
        recover: Some(recover),
        lost: lost.len(),
        notes: format!(
            "down {:.1} s; leases kept {kept}/{}; 3 waiters blocked across it returned; failures: {}",
            secs(back_at - down_at),
            keys.len(),
            if out.failures().is_empty() { "none".into() } else { out.failure_summary() }
        ),
    });
    assert!(out.corrupt.is_empty(), "{:#?}", out.corrupt);
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert_caches_current(&out);
    out.close_all();
    late.close().unwrap();
    waiter.close().unwrap();
}

/// Scenario 3: etcd wiped: every member killed, its data deleted, a new empty cluster
/// started on the same ports. Every client re-creates its registrations
/// from its own state (new lease), and every cache drops what the old
/// cluster held.
#[test]
fn slow_wiped_cluster_gets_every_registration_back() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let ns = unique_namespace("faults-wipe");
    let spec = load_spec(&cluster, &ns, "");
    let load = Load::start(spec.clone());
    sleep(Duration::from_secs(4));
    let keys = load_keys(&ns);
    let leases_before: Vec<i64> = keys
        .iter()
        .map(|k| lease_of(&cluster.endpoints(), k))
        .collect();
    let revision_before = revision(&cluster);
    // A rank whose owner goes away while etcd is down: nobody registers it
    // again, so after the wipe its peers must see it gone.
    let ghost = capi::open(&spec.options).unwrap();
    ghost.register("ghost_engine", 0, b"ghost").unwrap();
    let watcher = capi::open(&spec.options).unwrap();
    let ghost_events = watcher.subscribe(Some("ghost_engine")).unwrap();
    let added = ghost_events
        .rx
        .recv_timeout(Duration::from_secs(5))
        .expect("ADDED ghost");
    assert_eq!(added.kind, nixl_etcd::ffi::NIXL_ETCD_EVENT_ADDED);
    assert_eq!(watcher.lookup("ghost_engine", 0).unwrap(), b"ghost");

    let down_at = load.now();
    bring_back_all(&mut cluster, Duration::from_millis(500), true, || {
        // Revoking fails (etcd is down); the handle is released all the same.
        let _ = ghost.close();
    });
    let back_at = load.now();
    println!(
        "{:.3}s: cluster wiped; {:.3}s: back (empty)",
        secs(down_at),
        secs(back_at)
    );
    // Short, so that the new cluster's revision stays below the old one: a
    // cache must not take the old records for newer than the new ones.
    sleep(Duration::from_millis(1500));

    let out = load.finish();
    let ghost_removed = ghost_events.rx.recv_timeout(Duration::from_secs(8));
    assert!(
        matches!(&ghost_removed, Ok(e) if e.kind == nixl_etcd::ffi::NIXL_ETCD_EVENT_REMOVED),
        "the ghost rank's subscriber got {ghost_removed:?}, not REMOVED"
    );
    assert_eq!(
        watcher.lookup("ghost_engine", 0).unwrap_err().status,
        nixl_etcd::ffi::NIXL_ETCD_ERR_NOT_FOUND
    );
    watcher.close().unwrap();
    let revision_after = revision(&cluster);
    println!("etcd revision before the wipe {revision_before}, after {revision_after}");
    assert!(
        revision_after < revision_before,
        "the test must leave etcd's revision below the old one \
         ({revision_after} >= {revision_before})"
    );
    let lost = out.lost_records(&spec.options, Duration::from_secs(10));
    let leases_after: Vec<i64> = keys
        .iter()
        .map(|k| lease_of(&cluster.endpoints(), k))
        .collect();
    let recover = out
        .recovered_after(back_at)
        .expect("every client wrote again");
    println!("failures ({}):\n{}", out.failures().len(), out.error_log());
    faultkit::report(&Row {
        id: "3",
        scenario: "3. etcd wiped (new empty cluster, same ports)".into(),
        attempted: out.attempted(),
        failed: out.failures().len(),
        longest_gap: out.longest_write_gap().into_iter().max(),
        recover: Some(recover),
        lost: lost.len(),
        notes: format!(
            "every key re-registered under a new lease; etcd revision {revision_before} -> \
             {revision_after}; a rank whose owner closed meanwhile: REMOVED to its subscriber; \
             failures: {}",
            if out.failures().is_empty() {
                "none".into()
            } else {
                out.failure_summary()
            }
        ),
    });
    assert!(out.corrupt.is_empty(), "{:#?}", out.corrupt);
    assert!(lost.is_empty(), "lost: {lost:#?}");
    for ((k, b), a) in keys.iter().zip(&leases_before).zip(&leases_after) {
        assert!(*a != 0 && a != b, "{k}: lease before {b:x}, after {a:x}");
    }
    assert_caches_current(&out);
    out.close_all();
}

/// Scenario 4: etcd hung: every member SIGSTOPped for twice the timeout. Every call
/// returns within its bound plus a small slack (register and lookup: the
/// client timeout; wait: its own timeout_ms), with TIMEOUT or CONNECTION
/// when it fails; nothing hangs. After SIGCONT the same clients recover.
#[test]
fn slow_hung_cluster_times_out_and_recovers() {
    let _serial = serial();
    let mut cluster = EtcdCluster::start(3);
    let ns = unique_namespace("faults-hang");
    let spec = load_spec(&cluster, &ns, "");
    let load = Load::start(spec.clone());
    // A client for calls that must reach etcd (the load's reads come from
    // the cache), and one to close during the hang.
    let probe = capi::open(&spec.options).unwrap();
    probe.register("probe_engine", 0, b"before").unwrap();
    let doomed = capi::open(&spec.options).unwrap();
    sleep(Duration::from_secs(3));

    let paused_at = load.now();
    for i in 0..3 {
        cluster.pause(i);
    }
    // Every kind of call at once, each timed against its own bound.
    let timeout = Duration::from_secs_f64(TIMEOUT_S);
    let opts = spec.options.clone();
    type Probe = (
        &'static str,
        Duration,
        Box<dyn FnOnce() -> Result<(), capi::Failure> + Send>,
    );
    let probes: Vec<Probe> = vec![
        (
            "lookup (not cached)",
            timeout,
            Box::new(move || probe.lookup("never_seen", 0).map(|_| ())),
        ),
        (
            "wait 1000 ms",
            Duration::from_millis(1000),
            Box::new(move || probe.wait("never_seen", 1, 1000).map(|_| ())),
        ),
        (
            "register",
            timeout,
            Box::new(move || probe.register("probe_engine", 1, b"x")),
        ),
        (
            "unregister",
            timeout,
            Box::new(move || probe.unregister("probe_engine", 0)),
        ),
        (
            "wait_engine 1000 ms",
            Duration::from_millis(1000),
            Box::new(move || probe.wait_engine("never_seen", 1000).map(|_| ())),
        ),
        (
            "publish_nixl",
            timeout,
            Box::new(move || probe.publish_nixl("probe_agent", None, b"x")),
        ),
        (
            "fetch_nixl 0 ms (one read)",
            timeout,
            Box::new(move || probe.fetch_nixl("nobody", None, 0).map(|_| ())),
        ),
        (
            "open",
            timeout,
            Box::new(move || capi::open(&opts).map(|h| drop(h.close()))),
        ),
        ("close", timeout, Box::new(move || doomed.close())),
    ];
    let probes: Vec<_> = probes
        .into_iter()
        .map(|(name, bound, call)| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = call();
                (name, bound, r, t.elapsed())
            })
        })
        .collect();
    sleep(Duration::from_secs_f64(2.0 * TIMEOUT_S));
    let probes: Vec<_> = probes.into_iter().map(|p| p.join().unwrap()).collect();
    for i in 0..3 {
        cluster.resume(i);
    }
    let resumed_at = load.now();
    println!(
        "{:.3}s: paused; {:.3}s: resumed",
        secs(paused_at),
        secs(resumed_at)
    );
    sleep(Duration::from_secs(6));

    let out = load.finish();
    let lost = out.lost_records(&spec.options, Duration::from_secs(10));
    let recover = out
        .recovered_after(resumed_at)
        .expect("every client wrote again");
    let bound = |op: &str| match op {
        "wait" => Duration::from_millis(spec.wait_ms as u64),
        _ => Duration::from_secs_f64(TIMEOUT_S),
    };
    let over: Vec<_> = out
        .calls
        .iter()
        .filter(|k| k.duration() > bound(k.op) + SLACK)
        .collect();
    let wrong: Vec<_> = out
        .failures()
        .into_iter()
        .filter(|k| {
            k.status != nixl_etcd::ffi::NIXL_ETCD_ERR_TIMEOUT
                && k.status != nixl_etcd::ffi::NIXL_ETCD_ERR_CONNECTION
        })
        .collect();
    let longest = out.longest_call().cloned().unwrap();
    // The same client works after SIGCONT.
    probe.register("probe_engine", 2, b"after").unwrap();
    assert_eq!(probe.lookup("probe_engine", 2).unwrap(), b"after");
    // A TIMEOUT means "outcome unknown": the unregister that timed out
    // reached a stopped member, which may run it once resumed (etcd cannot
    // cancel a request it received). Recorded, not judged.
    let unregister_applied = common::etcdctl_endpoints(
        &cluster.endpoints(),
        &["get", &format!("{ns}/probe_engine/rank_0"), "--keys-only"],
    )
    .stdout
    .iter()
    .all(|b| b.is_ascii_whitespace());
    probe.close().unwrap();
    println!("failures ({}):\n{}", out.failures().len(), out.error_log());
    faultkit::report(&Row {
        id: "4",
        scenario: "4. every member SIGSTOPped for 2x the timeout, then SIGCONT".into(),
        attempted: out.attempted(),
        failed: out.failures().len(),
        longest_gap: out.longest_write_gap().into_iter().max(),
        recover: Some(recover),
        lost: lost.len(),
        notes: format!(
            "hung {:.1} s; longest call {:.2} s ({}; bound {:.1} s + slack {:.1} s); {} probes \
             reaching etcd during the hang (lookup, wait, register, unregister, wait_engine, \
             publish/fetch_nixl, open, close): TIMEOUT/CONNECTION within their bound (the \
             unregister that timed out was {} applied when etcd resumed); failures: {}",
            secs(resumed_at - paused_at),
            secs(longest.duration()),
            longest.op,
            secs(bound(longest.op)),
            secs(SLACK),
            probes.len(),
            if unregister_applied { "still" } else { "not" },
            if out.failures().is_empty() {
                "none".into()
            } else {
                out.failure_summary()
            }
        ),
    });
    let mut bad_probes = Vec::new();
    for (name, bound, r, took) in &probes {
        println!(
            "during the hang: {name}: {:?} after {took:?}",
            r.as_ref().map_err(|f| f.status)
        );
        let status_ok = matches!(r, Err(f) if f.status == nixl_etcd::ffi::NIXL_ETCD_ERR_TIMEOUT
            || f.status == nixl_etcd::ffi::NIXL_ETCD_ERR_CONNECTION);
        if !status_ok || *took > *bound + SLACK {
            bad_probes.push(format!(
                "{name}: {r:?} after {took:?} (bound {bound:?} + {SLACK:?})"
            ));
        }
    }
    assert!(
        bad_probes.is_empty(),
        "calls during the hang: {bad_probes:#?}"
    );
    assert!(
        over.is_empty(),
        "calls past their bound + {SLACK:?}: {over:#?}"
    );
    assert!(
        wrong.is_empty(),
        "failures other than TIMEOUT/CONNECTION: {wrong:#?}"
    );
    assert!(out.corrupt.is_empty(), "{:#?}", out.corrupt);
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert_caches_current(&out);
    out.close_all();
}

/// A `c_examples/prefill` process holding `ranks` ranks of `engine`;
/// SIGKILLed when dropped.
struct Prefill {
    child: std::process::Child,
}

impl Prefill {
    fn start(options: &str, engine: &str, ranks: u32) -> Prefill {
        use std::io::BufRead;
        let dir = common::build_c_examples();
        let mut child = std::process::Command::new(dir.join("prefill"))
            .args([engine, &ranks.to_string(), "--options", options])
            .env("VLLM_LOGGING_LEVEL", "WARNING")
            .env("VLLM_NIXL_USE_ETCD", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start c_examples/prefill");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!(
                    "prefill exited before holding its ranks: {:?}",
                    child.wait()
                );
            }
            if line.contains("holding") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Prefill { child }
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prefill {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Scenario 5: A registrant process SIGKILLed: its records vanish within TTL + 1 s
/// (its lease expires), subscribers get REMOVED for each rank, a wait for a
/// rank that is gone keeps waiting and returns when the rank comes back, and
/// a wait already blocked on a rank that never exists is not disturbed.
#[test]
fn slow_sigkilled_registrant_vanishes_and_waiters_keep_waiting() {
    let _serial = serial();
    let cluster = EtcdCluster::start(3);
    let ns = unique_namespace("faults-sigkill");
    const TTL_S: u64 = 2;
    const RANKS: u32 = 4;
    let opts = cluster.options_json(
        &ns,
        &format!("\"timeout_s\":{TIMEOUT_S},\"lease_ttl_s\":{TTL_S}"),
    );
    let engine = "prefill_killed";
    let mut calls = 0usize;
    let mut prefill = Prefill::start(&opts, engine, RANKS);

    let watcher = capi::open(&opts).unwrap();
    let events = watcher.subscribe(Some(engine)).unwrap();
    let next_event = || events.rx.recv_timeout(Duration::from_secs(TTL_S + 3));
    let mut incarnations = std::collections::BTreeMap::new();
    for _ in 0..RANKS {
        let e = next_event().expect("ADDED for every rank");
        assert_eq!(e.kind, nixl_etcd::ffi::NIXL_ETCD_EVENT_ADDED);
        incarnations.insert(e.rank, e.incarnation);
    }
    let reader = capi::open(&opts).unwrap();
    let before: Vec<Vec<u8>> = (0..RANKS)
        .map(|r| reader.lookup(engine, r).unwrap())
        .collect();
    calls += RANKS as usize;
    // Blocked before the kill, on a rank that never exists: must run to its
    // own deadline, neither woken nor failed by the registrant's death.
    const ABSENT_MS: u64 = 9000;
    let started = Instant::now();
    let absent =
        std::thread::spawn(move || (reader.wait(engine, 7, ABSENT_MS as i64), started.elapsed()));
    calls += 1;
    sleep(Duration::from_millis(300));

    let killed = Instant::now();
    prefill.sigkill();
    let gone = common::wait_until(Duration::from_secs(TTL_S + 5), || {
        common::etcdctl_endpoints(
            &cluster.endpoints(),
            &["get", "--prefix", &format!("{ns}/{engine}/"), "--keys-only"],
        )
        .stdout
        .iter()
        .all(|b| b.is_ascii_whitespace())
    });
    let gone_after = killed.elapsed();
    assert!(gone, "the killed registrant's records are still in etcd");
    let mut removed = 0;
    while removed < RANKS {
        let e = next_event().expect("REMOVED for every rank");
        assert_eq!(e.kind, nixl_etcd::ffi::NIXL_ETCD_EVENT_REMOVED, "{e:?}");
        assert_eq!(incarnations.get(&e.rank), Some(&e.incarnation));
        removed += 1;
    }
    let removed_after = killed.elapsed();
    println!("records gone {gone_after:?} after SIGKILL; last REMOVED at {removed_after:?}");
    assert!(
        gone_after <= Duration::from_secs(TTL_S + 1),
        "gone after {gone_after:?}"
    );
    assert!(
        removed_after <= Duration::from_secs(TTL_S + 1),
        "REMOVED after {removed_after:?}"
    );
    for r in 0..RANKS {
        assert_eq!(
            reader.lookup(engine, r).unwrap_err().status,
            nixl_etcd::ffi::NIXL_ETCD_ERR_NOT_FOUND
        );
        calls += 1;
    }

    // Waits for the ranks that are gone keep waiting...
    let (tx, rx) = std::sync::mpsc::channel();
    for r in 0..RANKS {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let got = reader.wait(engine, r, 30_000);
            let _ = tx.send((r, got, Instant::now()));
        });
        calls += 1;
    }
    sleep(Duration::from_millis(1500));
    assert!(
        rx.try_recv().is_err(),
        "a wait for a rank that is gone returned early"
    );
    // ... and return when the rank comes back.
    let back = Instant::now();
    let _prefill = Prefill::start(&opts, engine, RANKS);
    let mut returned = Duration::ZERO;
    for _ in 0..RANKS {
        let (r, got, at) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every wait returns");
        assert_eq!(
            got.as_deref().ok(),
            Some(&before[r as usize][..]),
            "rank {r}: {got:?}"
        );
        returned = returned.max(at.saturating_duration_since(back));
    }
    for _ in 0..RANKS {
        let e = next_event().expect("ADDED again for every rank");
        assert_eq!(e.kind, nixl_etcd::ffi::NIXL_ETCD_EVENT_ADDED, "{e:?}");
        assert_ne!(
            incarnations.get(&e.rank),
            Some(&e.incarnation),
            "a new incarnation"
        );
    }
    let (absent_got, absent_took) = absent.join().unwrap();
    assert_eq!(
        absent_got.unwrap_err().status,
        nixl_etcd::ffi::NIXL_ETCD_ERR_TIMEOUT
    );
    assert!(
        absent_took >= Duration::from_millis(ABSENT_MS - 20)
            && absent_took <= Duration::from_millis(ABSENT_MS) + SLACK,
        "the wait for a rank that never exists ended after {absent_took:?} (timeout {ABSENT_MS} ms)"
    );
    faultkit::report(&Row {
        id: "5",
        scenario: format!(
            "5. registrant process (c_examples/prefill, {RANKS} ranks) SIGKILLed, TTL {TTL_S} s"
        ),
        attempted: calls,
        failed: 0,
        longest_gap: None,
        recover: Some(returned),
        lost: 0,
        notes: format!(
            "records gone from etcd {:.2} s after SIGKILL, {RANKS} REMOVED by {:.2} s; waits for \
             the gone ranks held, returned {:.2} s after the prefill was started again (the \
             time to recover); a wait on an absent rank ran its full {:.1} s",
            secs(gone_after),
            secs(removed_after),
            secs(returned),
            secs(absent_took)
        ),
    });
    watcher.close().unwrap();
    reader.close().unwrap();
}

/// Under `slow_close_is_clean_under_valgrind` (wider time bounds, no row).
fn under_valgrind() -> bool {
    std::env::var_os("NIXL_ETCD_UNDER_VALGRIND").is_some()
}

/// Scenario 6: `nixl_etcd_close` while 8 threads are blocked in waits and 4 more
/// call the client in a loop: every wait returns CLOSED promptly, the racing
/// calls end with CLOSED, and every export on the stale handle then returns
/// CLOSED (never touching freed memory: also run under valgrind by
/// `slow_close_is_clean_under_valgrind`).
#[test]
fn close_wakes_blocked_waiters_and_racing_calls() {
    let _serial = serial();
    use nixl_etcd::ffi::*;
    let valgrind = under_valgrind();
    let prompt = if valgrind {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    let etcd = common::EtcdServer::start();
    let ns = unique_namespace("faults-close");
    let h = capi::open(&etcd.options_json(&ns, "\"timeout_s\":5")).unwrap();
    h.register("present", 0, &capi::blob(1, 4096)).unwrap();
    let _sub = h.subscribe(Some("churn")).unwrap();

    let waiters: Vec<_> = (0..8u32)
        .map(|r| {
            std::thread::spawn(move || {
                let got = h.wait("absent", r, 60_000);
                (got.map(|_| ()), Instant::now())
            })
        })
        .collect();
    let churners: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                let mut statuses = std::collections::BTreeMap::<i32, usize>::new();
                for i in 0..1_000_000u32 {
                    let st = match i % 4 {
                        0 => h.register("churn", t, &capi::blob(i, 512)).map(|_| ()),
                        1 => h.lookup("present", 0).map(|_| ()),
                        2 => h.wait("present", 0, 1000).map(|_| ()),
                        _ => h.lookup_record("churn", t).map(|_| ()),
                    }
                    .map_or_else(|e| e.status, |_| NIXL_ETCD_OK);
                    *statuses.entry(st).or_default() += 1;
                    if st == NIXL_ETCD_ERR_CLOSED {
                        break;
                    }
                }
                statuses
            })
        })
        .collect();
    sleep(if valgrind {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(500)
    });
    let closed_at = Instant::now();
    assert_eq!(
        unsafe { nixl_etcd_close(h.0) },
        NIXL_ETCD_OK,
        "{}",
        capi::last_error()
    );
    let close_took = closed_at.elapsed();

    let mut slowest = Duration::ZERO;
    let mut attempted = 0;
    let mut unexpected = Vec::new();
    for w in waiters {
        let (got, at) = w.join().unwrap();
        attempted += 1;
        assert_eq!(got.unwrap_err().status, NIXL_ETCD_ERR_CLOSED);
        slowest = slowest.max(at.saturating_duration_since(closed_at));
    }
    for c in churners {
        let statuses = c.join().unwrap();
        attempted += statuses.values().sum::<usize>();
        assert!(statuses.contains_key(&NIXL_ETCD_ERR_CLOSED), "{statuses:?}");
        for (st, n) in statuses {
            if ![NIXL_ETCD_OK, NIXL_ETCD_ERR_NOT_FOUND, NIXL_ETCD_ERR_CLOSED].contains(&st) {
                unexpected.push((st, n));
            }
        }
    }
    assert!(
        slowest <= prompt,
        "a blocked wait returned {slowest:?} after close"
    );
    assert!(unexpected.is_empty(), "racing calls failed: {unexpected:?}");

    // Every export on the closed handle: CLOSED, nothing touched.
    let c = h.0;
    let id = c"present".as_ptr();
    let mut buf = nixl_etcd_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    };
    let mut rec: nixl_etcd_record = unsafe { std::mem::zeroed() };
    let (mut sub_id, mut ws) = (0u64, 0u32);
    let stale: [(&str, i32); 11] = unsafe {
        [
            ("register", nixl_etcd_register(c, id, 0, b"x".as_ptr(), 1)),
            ("unregister", nixl_etcd_unregister(c, id, 0)),
            ("lookup", nixl_etcd_lookup(c, id, 0, &mut buf)),
            ("wait", nixl_etcd_wait(c, id, 0, 10, &mut buf)),
            ("lookup_record", nixl_etcd_lookup_record(c, id, 0, &mut rec)),
            (
                "subscribe",
                nixl_etcd_subscribe(
                    c,
                    id,
                    Some(noop_callback),
                    std::ptr::null_mut(),
                    &mut sub_id,
                ),
            ),
            ("unsubscribe", nixl_etcd_unsubscribe(c, 1)),
            ("wait_engine", nixl_etcd_wait_engine(c, id, 10, &mut ws)),
            (
                "publish_nixl",
                nixl_etcd_publish_nixl(c, id, std::ptr::null(), b"x".as_ptr(), 1),
            ),
            (
                "fetch_nixl",
                nixl_etcd_fetch_nixl(c, id, std::ptr::null(), 0, &mut buf),
            ),
            ("close", nixl_etcd_close(c)),
        ]
    };
    for (name, st) in stale {
        assert_eq!(st, NIXL_ETCD_ERR_CLOSED, "{name} on a closed handle");
    }
    assert!(buf.data.is_null() && rec.engine_id.is_null());
    println!("close took {close_took:?}; the slowest blocked wait returned {slowest:?} after it");
    if !valgrind {
        faultkit::report(&Row {
            id: "6",
            scenario: "6. nixl_etcd_close under 8 blocked waits + 4 racing threads".into(),
            attempted,
            failed: 0,
            longest_gap: None,
            recover: Some(slowest),
            lost: 0,
            notes: format!(
                "every wait returned CLOSED (the time to recover: the slowest, after close); close \
                 took {:.3} s; all 11 handle-taking exports on the stale handle: CLOSED; clean \
                 under valgrind (slow_close_is_clean_under_valgrind)",
                secs(close_took)
            ),
        });
    }
}

unsafe extern "C" fn noop_callback(
    _: *mut std::ffi::c_void,
    _: *const nixl_etcd::ffi::nixl_etcd_event,
) {
}

/// Runs `close_wakes_blocked_waiters_and_racing_calls` again in this test
/// binary under valgrind's memcheck: a read of freed memory, an invalid
/// free or an uninitialized read fails it. Skipped (loudly) when valgrind
/// is not installed. About 30-60 s.
#[test]
fn slow_close_is_clean_under_valgrind() {
    let _serial = serial();
    if under_valgrind() {
        return;
    }
    let found = std::process::Command::new("valgrind")
        .arg("--version")
        .output();
    if !found.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: valgrind is not installed (apt-get install valgrind)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let out = std::process::Command::new("valgrind")
        .args(["--error-exitcode=97", "--trace-children=no"])
        .arg(&exe)
        .args([
            "--exact",
            "close_wakes_blocked_waiters_and_racing_calls",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("NIXL_ETCD_UNDER_VALGRIND", "1")
        .output()
        .expect("run valgrind");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("valgrind run took {:?}", started.elapsed());
    assert!(
        out.status.success(),
        "valgrind found errors ({}):\n{text}",
        out.status
    );
    assert!(text.contains("ERROR SUMMARY: 0 errors"), "{text}");
    assert!(
        text.contains("1 passed"),
        "the test did not run under valgrind:\n{text}"
    );
}
