//! Pre-warm: a decode's NIXL agent loads the prefill ranks it reads as they
//! appear (real NIXL agents with UCX, a real etcd), drops them when they
//! leave, reloads a restarted one, and keeps at most `max_engines` engines.
#![cfg(feature = "nixl")]

use crate::capi;
use crate::common;

use std::ffi::{CStr, CString};
use std::time::Duration;

use nixl_etcd::nixl::nixl_sys::{Agent, Backend};
use nixl_etcd::prewarm::{Prewarm, PrewarmOptions, Ranks};
use nixl_etcd::Status;

use crate::common::{unique_namespace, EtcdServer};

const LONG: Duration = Duration::from_secs(60);

/// An agent with a UCX backend (its metadata then says how to reach it).
fn agent(name: &str) -> (Agent, Backend) {
    let a = Agent::new(&format!("{name}-{}", std::process::id())).unwrap();
    let ucx = a.create_backend("UCX", &[]).unwrap();
    (a, ucx)
}

#[test]
fn a_decode_loads_the_ranks_it_reads_as_they_appear_drops_them_as_they_leave_and_reloads_a_restart()
{
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm");
    let decode = etcd.client(&ns, "");
    let (d, _d_ucx) = agent("pw-decode");
    // What the decode's client registered itself (rank 1: one it would read,
    // another agent of its process): never pre-warmed.
    let (own, _own_ucx) = agent("pw-own");
    decode.publish_agent("prefill_self", 1, &own).unwrap();
    // Local rank 1 of a TP-2 decode reads ranks 2 and 3 of a TP-4 prefill.
    let pw = Prewarm::start(
        &decode,
        d,
        PrewarmOptions {
            engines: vec!["prefill_*".into()],
            ranks: Ranks::Tp {
                local_tp: 2,
                local_rank: 1,
            },
            max_engines: 16,
            connect: true,
        },
    )
    .unwrap();

    let prefill = etcd.client(&ns, "\"world_size\":4");
    let p: Vec<(Agent, Backend)> = (0..4).map(|r| agent(&format!("pw-p{r}"))).collect();
    let (other, _other_ucx) = agent("pw-other");
    prefill.publish_agent("other", 0, &other).unwrap();
    // Metadata NIXL refuses: logged, left to the request's path.
    prefill.register("prefill_junk", 2, b"junk").unwrap();
    for (rank, (a, _)) in p.iter().enumerate() {
        prefill.publish_agent("prefill_a", rank as u32, a).unwrap();
    }

    assert_eq!(
        pw.wait_remote("prefill_a", 2, Some(LONG)).unwrap(),
        p[2].0.name()
    );
    assert_eq!(
        pw.wait_remote("prefill_a", 3, Some(LONG)).unwrap(),
        p[3].0.name()
    );
    // Events arrive in order: "other", "prefill_self", the junk and ranks 0-1
    // were seen before rank 3 and left alone.
    for (engine, rank) in [
        ("prefill_a", 0),
        ("prefill_a", 1),
        ("other", 0),
        ("prefill_self", 1),
        ("prefill_junk", 2),
    ] {
        assert_eq!(pw.remote(engine, rank), None, "{engine} {rank}");
    }
    let loaded = pw.loaded();
    assert_eq!(
        loaded
            .iter()
            .map(|l| (l.engine_id.as_str(), l.rank, l.incarnation.as_str()))
            .collect::<Vec<_>>(),
        [
            ("prefill_a", 2, prefill.incarnation()),
            ("prefill_a", 3, prefill.incarnation())
        ]
    );
    {
        let d = pw.agent().expect("an agent given to start");
        assert!(d.has_remote(p[2].0.name()) && d.has_remote(p[3].0.name()));
        assert!(!d.has_remote(p[0].0.name()) && !d.has_remote(p[1].0.name()));
        assert!(!d.has_remote(other.name()) && !d.has_remote(own.name()));
    }

    // Rank 2 leaves: its agent is dropped from the decode's.
    prefill.unregister("prefill_a", 2).unwrap();
    assert!(common::wait_until(LONG, || pw
        .remote("prefill_a", 2)
        .is_none()));
    assert!(!pw.agent().unwrap().has_remote(p[2].0.name()));

    // Rank 3 restarts (a new client: a new incarnation, a new agent): the old
    // agent is dropped and the new one loaded.
    let restarted = etcd.client(&ns, "\"world_size\":4");
    let (p3b, _p3b_ucx) = agent("pw-p3b");
    restarted.publish_agent("prefill_a", 3, &p3b).unwrap();
    assert!(common::wait_until(LONG, || {
        pw.remote("prefill_a", 3).as_deref() == Some(p3b.name())
    }));
    assert_eq!(pw.loaded()[0].incarnation, restarted.incarnation());
    {
        let d = pw.agent().unwrap();
        assert!(d.has_remote(p3b.name()));
        assert!(!d.has_remote(p[3].0.name()));
    }

    let d = pw.stop().expect("the agent comes back");
    assert!(d.has_remote(p3b.name()), "stop leaves loaded agents loaded");
    for c in [&decode, &prefill, &restarted] {
        c.close().unwrap();
    }
}

#[test]
fn engines_beyond_the_cap_wait_for_a_slot() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-cap");
    let decode = etcd.client(&ns, "");
    let (d, _d_ucx) = agent("pwc-decode");
    let pw = Prewarm::start(
        &decode,
        d,
        PrewarmOptions {
            engines: vec!["cap_*".into()],
            ranks: Ranks::All,
            max_engines: 1,
            connect: true,
        },
    )
    .unwrap();
    let prefill = etcd.client(&ns, "");
    let (x, _x_ucx) = agent("pwc-x");
    let (y, _y_ucx) = agent("pwc-y");
    prefill.publish_agent("cap_1", 0, &x).unwrap();
    prefill.publish_agent("cap_2", 0, &y).unwrap();
    assert_eq!(pw.wait_remote("cap_1", 0, Some(LONG)).unwrap(), x.name());
    assert!(common::wait_until(LONG, || {
        pw.wait_remote("cap_2", 0, Some(Duration::ZERO))
            .is_err_and(|e| e.message.contains("waits for a slot (max_engines reached)"))
    }));
    assert!(!pw.agent().unwrap().has_remote(y.name()));

    // cap_1 leaves: cap_2 takes its slot, from the record kept meanwhile.
    prefill.unregister("cap_1", 0).unwrap();
    assert_eq!(pw.wait_remote("cap_2", 0, Some(LONG)).unwrap(), y.name());
    assert_eq!(pw.remote("cap_1", 0), None);
    {
        let d = pw.agent().unwrap();
        assert!(d.has_remote(y.name()) && !d.has_remote(x.name()));
    }
    // An engine no pattern names is said so.
    let e = pw
        .wait_remote("elsewhere", 0, Some(Duration::ZERO))
        .unwrap_err();
    assert_eq!(e.status, Status::ErrTimeout);
    assert!(
        e.message
            .ends_with("it matches none of the pre-warm's engines"),
        "{}",
        e.message
    );
    drop(pw);
    decode.close().unwrap();
    prefill.close().unwrap();
}

#[test]
fn bad_options_are_refused_before_anything_is_followed() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-bad");
    let decode = etcd.client(&ns, "");
    for (opts, want) in [
        (
            PrewarmOptions {
                engines: vec!["a/*".into()],
                ..Default::default()
            },
            "pre-warm engine prefix \"a/*\": invalid engine_id \"a/\": it contains a path separator",
        ),
        (
            PrewarmOptions {
                max_engines: 0,
                ..Default::default()
            },
            "pre-warm max_engines is 0",
        ),
        (
            PrewarmOptions {
                ranks: Ranks::Tp {
                    local_tp: 2,
                    local_rank: 2,
                },
                ..Default::default()
            },
            "local_rank 2 is out of range for local_tp=2",
        ),
    ] {
        let (d, _ucx) = agent("pwb");
        let e = Prewarm::start(&decode, d, opts).err().expect("refused");
        assert_eq!(e.status, Status::ErrInvalidArgument);
        assert!(e.message.starts_with(want), "{}", e.message);
    }
    decode.close().unwrap();
}

/// The C exports, on an agent the caller keeps (a C engine's).
#[test]
fn c_exports_prewarm_an_agent_the_caller_keeps() {
    use nixl_etcd::ffi::*;

    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-capi");
    let decode = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let prefill = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let (d, _d_ucx) = agent("pwcapi-decode");
    let (p, _p_ucx) = agent("pwcapi-prefill");
    let engine = CString::new("capi_pw").unwrap();
    let engines = CString::new("capi_pw, unused_*").unwrap();
    let bad = CString::new("capi_pw,../up").unwrap();
    unsafe {
        let mut pw = std::ptr::null_mut();
        // NULL agent, NULL out, an id that could escape the namespace.
        assert_eq!(
            nixl_etcd_prewarm_start(
                decode.0,
                std::ptr::null_mut(),
                engines.as_ptr(),
                0,
                0,
                0,
                &mut pw
            ),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(capi::last_error(), "agent is NULL");
        assert_eq!(
            nixl_etcd_prewarm_start(
                decode.0,
                d.as_raw().cast(),
                engines.as_ptr(),
                0,
                0,
                0,
                std::ptr::null_mut()
            ),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            nixl_etcd_prewarm_start(decode.0, d.as_raw().cast(), bad.as_ptr(), 0, 0, 0, &mut pw),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(
            capi::last_error().starts_with("pre-warm engine \"../up\""),
            "{}",
            capi::last_error()
        );
        assert!(pw.is_null());

        assert_eq!(
            nixl_etcd_prewarm_start(
                decode.0,
                d.as_raw().cast(),
                engines.as_ptr(),
                0,
                0,
                0,
                &mut pw
            ),
            NIXL_ETCD_OK,
            "{}",
            capi::last_error()
        );
        assert_eq!(
            nixl_etcd_publish_agent(prefill.0, engine.as_ptr(), 0, p.as_raw().cast()),
            NIXL_ETCD_OK
        );
        let mut name = std::ptr::null_mut();
        assert_eq!(
            nixl_etcd_prewarm_remote(pw, engine.as_ptr(), 0, 60_000, &mut name),
            NIXL_ETCD_OK,
            "{}",
            capi::last_error()
        );
        assert_eq!(CStr::from_ptr(name).to_str().unwrap(), p.name());
        nixl_etcd_string_free(name);
        // The caller's own use of its agent, under the pre-warm's lock.
        assert_eq!(nixl_etcd_prewarm_lock(pw), NIXL_ETCD_OK);
        assert!(d.has_remote(p.name()));
        assert_eq!(nixl_etcd_prewarm_unlock(pw), NIXL_ETCD_OK);
        assert_eq!(nixl_etcd_prewarm_unlock(pw), NIXL_ETCD_ERR_INVALID_ARGUMENT);
        assert!(
            capi::last_error().contains("lock is not held"),
            "{}",
            capi::last_error()
        );
        // Not loaded, asked without waiting; and a NULL pre-warm.
        let other = CString::new("unused_1").unwrap();
        assert_eq!(
            nixl_etcd_prewarm_remote(pw, other.as_ptr(), 0, 0, &mut name),
            NIXL_ETCD_ERR_NOT_FOUND
        );
        assert!(name.is_null());
        assert_eq!(
            nixl_etcd_prewarm_remote(std::ptr::null_mut(), engine.as_ptr(), 0, 0, &mut name),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            nixl_etcd_prewarm_lock(std::ptr::null_mut()),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        nixl_etcd_prewarm_free(pw);
        nixl_etcd_prewarm_free(std::ptr::null_mut());
        // The loaded agent stays loaded after the pre-warm is gone.
        assert!(d.has_remote(p.name()));
    }
}
