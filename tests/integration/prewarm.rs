//! Pre-warm: a decode's NIXL agent loads the prefill ranks it reads as they
//! appear (real NIXL agents with UCX, a real etcd), drops them when they
//! leave, reloads a restarted one, and keeps at most `max_engines` engines.
#![cfg(feature = "nixl")]

use crate::capi;
use crate::common;

use std::ffi::{CStr, CString};
use std::time::Duration;

use nixl_etcd::nixl::nixl_sys::{Agent, Backend, MemType, Registration};
use nixl_etcd::prewarm::{Loaded, Prewarm, PrewarmOptions, Ranks, WarmupHook};
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
            warmup: None,
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
            warmup: None,
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

/// `len` bytes at `addr` registered with `a` as DRAM.
fn dram<'a>(a: &'a Agent, ucx: &Backend, addr: usize, len: usize) -> Registration<'a> {
    a.register(MemType::Dram, &[(addr, len, 0)], ucx).unwrap()
}

/// `a` published as `engine` rank 0, once the pre-warm has loaded it.
fn appear(prefill: &nixl_etcd::Client, pw: &Prewarm, engine: &str, a: &Agent) -> Loaded {
    prefill.publish_agent(engine, 0, a).unwrap();
    pw.wait_remote(engine, 0, Some(LONG)).unwrap();
    pw.loaded()
        .into_iter()
        .find(|l| l.engine_id == engine)
        .unwrap()
}

/// The prefill's "KV block": bytes a warm-up READ must bring over exactly.
fn block(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn the_engines_warm_up_reads_each_rank_ahead_and_a_failing_one_leaves_it_loaded() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-warmup");
    let decode = etcd.client(&ns, "");
    let prefill = etcd.client(&ns, "");
    let (d, d_ucx) = agent("wu-decode");
    let mut scratch = vec![0u8; 4096];
    let local = scratch.as_mut_ptr() as usize;
    let reg = dram(&d, &d_ucx, local, scratch.len());
    // The engines' KV addresses, as their payloads would give them.
    let layouts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, usize)>::new()));
    let known = layouts.clone();
    let hook = WarmupHook::new(move |w| {
        let addr = known
            .lock()
            .unwrap()
            .iter()
            .find(|(e, _)| *e == w.loaded.engine_id)
            .map(|(_, a)| *a)
            .ok_or_else(|| format!("no layout for {}", w.loaded.engine_id))?;
        w.read(
            (MemType::Dram, MemType::Dram),
            (local, 4096, 0),
            (addr, 4096, 0),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    });
    let opts = PrewarmOptions {
        engines: vec!["wu_*".into()],
        warmup: Some(hook),
        ..Default::default()
    };
    // SAFETY: `d` outlives the pre-warm (stopped below) and is used under
    // its lock only.
    let pw = unsafe { Prewarm::start_raw(&decode, d.as_raw(), opts) }.unwrap();

    let (p, p_ucx) = agent("wu-prefill");
    let kv = block(7);
    let _kv_reg = dram(&p, &p_ucx, kv.as_ptr() as usize, kv.len());
    layouts
        .lock()
        .unwrap()
        .push(("wu_a".into(), kv.as_ptr() as usize));
    prefill.publish_agent("wu_a", 0, &p).unwrap();
    pw.wait_remote("wu_a", 0, Some(LONG)).unwrap();
    let l = pw.loaded().remove(0);
    assert!(l.warmup_time.is_some(), "{l:?}");
    assert!(l.connect_time.is_some(), "{l:?}");
    pw.lock();
    assert_eq!(scratch, kv, "the warm-up READ brought the block over");
    pw.unlock();

    // An engine whose layout the warm-up does not know: it fails, the rank
    // stays loaded (the first transfer sets up what it would have).
    let (q, _q_ucx) = agent("wu-unknown");
    let b = appear(&prefill, &pw, "wu_b", &q);
    assert_eq!(b.warmup_time, None);
    pw.lock();
    assert!(d.has_remote(q.name()));
    pw.unlock();

    // Cleared: later ranks are loaded without one.
    pw.set_warmup(None);
    let (r, _r_ucx) = agent("wu-later");
    assert_eq!(appear(&prefill, &pw, "wu_c", &r).warmup_time, None);

    assert!(pw.stop().is_none());
    drop(reg);
    for c in [&decode, &prefill] {
        c.close().unwrap();
    }
}

/// What a C engine's warm-up gets, checked by the test.
struct CWarmupSeen {
    local: usize,
    remote_addr: usize,
    calls: std::sync::Mutex<Vec<(String, u32, String, i32)>>,
}

unsafe extern "C" fn c_warmup(
    user: *mut std::ffi::c_void,
    agent: *mut std::ffi::c_void,
    engine_id: *const std::ffi::c_char,
    rank: u32,
    remote_agent: *const std::ffi::c_char,
) -> i32 {
    use nixl_etcd::ffi::*;
    let seen = &*(user as *const CWarmupSeen);
    let rc = nixl_etcd_prewarm_read(
        agent,
        remote_agent,
        NIXL_ETCD_MEM_DRAM,
        seen.local,
        0,
        NIXL_ETCD_MEM_DRAM,
        seen.remote_addr,
        0,
        4096,
    );
    seen.calls.lock().unwrap().push((
        CStr::from_ptr(engine_id).to_str().unwrap().to_owned(),
        rank,
        CStr::from_ptr(remote_agent).to_str().unwrap().to_owned(),
        rc,
    ));
    rc
}

#[test]
fn c_warm_up_set_after_a_rank_loaded_runs_on_it_and_reads_its_bytes() {
    use nixl_etcd::ffi::*;

    let etcd = EtcdServer::start();
    let ns = unique_namespace("prewarm-capi-warmup");
    let decode = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let prefill = capi::open(&etcd.options_json(&ns, "")).unwrap();
    let (d, d_ucx) = agent("cwu-decode");
    let mut scratch = vec![0u8; 4096];
    let reg = dram(&d, &d_ucx, scratch.as_mut_ptr() as usize, 4096);
    let (p, p_ucx) = agent("cwu-prefill");
    let kv = block(9);
    let _kv_reg = dram(&p, &p_ucx, kv.as_ptr() as usize, kv.len());
    let seen = CWarmupSeen {
        local: scratch.as_mut_ptr() as usize,
        remote_addr: kv.as_ptr() as usize,
        calls: Default::default(),
    };
    let user = &seen as *const CWarmupSeen as *mut std::ffi::c_void;
    let engines = CString::new("cwu_*").unwrap();
    let remote = CString::new(p.name()).unwrap();
    unsafe {
        // Bad arguments to the READ: clear errors, nothing read.
        assert_eq!(
            nixl_etcd_prewarm_read(std::ptr::null_mut(), remote.as_ptr(), 0, 1, 0, 0, 1, 0, 1),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert_eq!(capi::last_error(), "agent is NULL");
        assert_eq!(
            nixl_etcd_prewarm_read(d.as_raw().cast(), remote.as_ptr(), 7, 1, 0, 0, 1, 0, 1),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        assert!(
            capi::last_error().starts_with("local_mem is 7"),
            "{}",
            capi::last_error()
        );
        let mut pw = std::ptr::null_mut();
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
            NIXL_ETCD_OK
        );
        let engine = CString::new("cwu_a").unwrap();
        assert_eq!(
            nixl_etcd_publish_agent(prefill.0, engine.as_ptr(), 0, p.as_raw().cast()),
            NIXL_ETCD_OK
        );
        let mut name = std::ptr::null_mut();
        assert_eq!(
            nixl_etcd_prewarm_remote(pw, engine.as_ptr(), 0, 60_000, &mut name),
            NIXL_ETCD_OK
        );
        nixl_etcd_string_free(name);
        // Set after the rank was loaded: it runs on it before returning.
        assert_eq!(
            nixl_etcd_prewarm_set_warmup(pw, Some(c_warmup), user),
            NIXL_ETCD_OK,
            "{}",
            capi::last_error()
        );
        assert_eq!(
            *seen.calls.lock().unwrap(),
            [("cwu_a".to_owned(), 0, p.name().to_owned(), NIXL_ETCD_OK)]
        );
        assert_eq!(nixl_etcd_prewarm_lock(pw), NIXL_ETCD_OK);
        assert_eq!(scratch, kv);
        assert_eq!(nixl_etcd_prewarm_unlock(pw), NIXL_ETCD_OK);
        assert_eq!(
            nixl_etcd_prewarm_set_warmup(std::ptr::null_mut(), Some(c_warmup), user),
            NIXL_ETCD_ERR_INVALID_ARGUMENT
        );
        nixl_etcd_prewarm_free(pw);
    }
    drop(reg);
    unsafe {
        nixl_etcd_close(decode.0);
        nixl_etcd_close(prefill.0);
    }
}
