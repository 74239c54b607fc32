//! Fleet discovery: the informer cache, change events, whole-engine waits,
//! tensor-parallel targets and full records, against a real etcd.

use crate::capi;

use std::time::{Duration, Instant};

use crate::capi::{blob, open, target_ranks, OwnedEvent};
use crate::common::{unique_namespace, wait_until, EtcdServer};
use nixl_etcd::ffi::*;

fn next(rx: &std::sync::mpsc::Receiver<OwnedEvent>) -> OwnedEvent {
    rx.recv_timeout(Duration::from_secs(10))
        .expect("an event within 10 s")
}

fn numbered(i: u32) -> Vec<u8> {
    let mut v = i.to_le_bytes().to_vec();
    v.extend(blob(i, 60));
    v
}

#[test]
fn cache_hits_are_served_while_etcd_is_stopped_and_catch_up_after() {
    let mut etcd = EtcdServer::start();
    let ns = unique_namespace("stale");
    let prefill = open(&etcd.options_json(&ns, r#""lease_ttl_s":30"#)).unwrap();
    let decode = open(&etcd.options_json(&ns, r#""timeout_s":2"#)).unwrap();
    prefill
        .register("prefill_engine", 0, &blob(1, 8192))
        .unwrap();
    assert_eq!(decode.lookup("prefill_engine", 0).unwrap(), blob(1, 8192));
    // The informer of the engine holds the record once a subscriber to the
    // engine is handed it (subscriptions replay the informer's cache).
    let sub = decode.subscribe(Some("prefill_engine")).unwrap();
    let seen = next(&sub.rx);
    assert_eq!((seen.kind, seen.rank), (NIXL_ETCD_EVENT_ADDED, 0));
    assert_eq!(seen.metadata, blob(1, 8192));
    decode.unsubscribe(sub.id).unwrap();
    // With etcd frozen, only the cache can answer.
    etcd.pause();
    for _ in 0..20 {
        assert_eq!(decode.lookup("prefill_engine", 0).unwrap(), blob(1, 8192));
        assert_eq!(
            decode.wait("prefill_engine", 0, 100).unwrap(),
            blob(1, 8192)
        );
    }
    // A record it never saw is a clean error at the client's timeout, not a hang.
    let err = decode.lookup("prefill_engine", 1).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT, "{err:?}");
    etcd.resume();
    // Catches up: a rank registered after the outage reaches the waiter.
    prefill
        .register("prefill_engine", 1, &blob(2, 8192))
        .unwrap();
    assert_eq!(
        decode.wait("prefill_engine", 1, 10_000).unwrap(),
        blob(2, 8192)
    );
    // Same with the server killed and restarted.
    etcd.kill();
    assert_eq!(decode.lookup("prefill_engine", 1).unwrap(), blob(2, 8192));
    etcd.restart();
    assert!(wait_until(Duration::from_secs(10), || prefill
        .register("prefill_engine", 2, &blob(3, 100))
        .is_ok()));
    assert_eq!(
        decode.wait("prefill_engine", 2, 10_000).unwrap(),
        blob(3, 100)
    );
    prefill.close().unwrap();
    decode.close().unwrap();
}

#[test]
fn a_deleted_or_replaced_record_is_never_served_after_its_event() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("nostale");
    let prefill = open(&etcd.options_json(&ns, "")).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    let sub = decode.subscribe(Some("prefill_engine")).unwrap();
    for i in 0..50u32 {
        prefill.register("prefill_engine", 0, &numbered(i)).unwrap();
        let ev = next(&sub.rx);
        // The first register, and the first after each unregister, adds the
        // rank; the others update it (same incarnation).
        let want = if i % 10 == 0 {
            NIXL_ETCD_EVENT_ADDED
        } else {
            NIXL_ETCD_EVENT_UPDATED
        };
        assert_eq!(ev.kind, want, "round {i}");
        assert!(
            ev.metadata == numbered(i),
            "event {i} carries the new value"
        );
        // The event arrived: the cache must not serve anything older.
        assert!(
            decode.lookup("prefill_engine", 0).unwrap() == numbered(i),
            "round {i}"
        );
        if i % 10 == 9 {
            prefill.unregister("prefill_engine", 0).unwrap();
            assert_eq!(next(&sub.rx).kind, NIXL_ETCD_EVENT_REMOVED);
            let err = decode.lookup("prefill_engine", 0).unwrap_err();
            assert_eq!(err.status, NIXL_ETCD_ERR_NOT_FOUND, "round {i}");
        }
    }
    decode.unsubscribe(sub.id).unwrap();
    prefill.close().unwrap();
    decode.close().unwrap();
}

#[test]
fn events_arrive_in_order_across_a_thousand_updates() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("order");
    let prefill = open(&etcd.options_json(&ns, "")).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    let sub = decode.subscribe(Some("prefill_engine")).unwrap();
    for i in 0..1000u32 {
        prefill.register("prefill_engine", 0, &numbered(i)).unwrap();
    }
    let mut last_rev = 0;
    for i in 0..1000u32 {
        let ev = next(&sub.rx);
        let want = if i == 0 {
            NIXL_ETCD_EVENT_ADDED
        } else {
            NIXL_ETCD_EVENT_UPDATED
        };
        assert_eq!(ev.kind, want, "event {i}");
        assert_eq!(
            &ev.metadata[..4],
            &i.to_le_bytes(),
            "event {i} out of order"
        );
        assert!(ev.revision > last_rev);
        last_rev = ev.revision;
    }
    prefill.close().unwrap();
    assert_eq!(next(&sub.rx).kind, NIXL_ETCD_EVENT_REMOVED);
    assert!(
        sub.rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "no extra events"
    );
    decode.close().unwrap();
}

#[test]
fn a_restarted_rank_is_replaced_and_the_old_clients_close_keeps_it() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("replaced");
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    let old = open(&etcd.options_json(&ns, r#""host":"node1""#)).unwrap();
    old.register("prefill_engine", 0, b"before restart")
        .unwrap();
    let sub = decode.subscribe(Some("prefill_engine")).unwrap();
    let added = next(&sub.rx);
    assert_eq!(added.kind, NIXL_ETCD_EVENT_ADDED);
    assert_eq!(added.host, "node1");
    // The restarted process: a new client, a new incarnation.
    let new = open(&etcd.options_json(&ns, r#""host":"node1""#)).unwrap();
    new.register("prefill_engine", 0, b"after restart").unwrap();
    let replaced = next(&sub.rx);
    assert_eq!(replaced.kind, NIXL_ETCD_EVENT_REPLACED);
    assert_ne!(replaced.incarnation, added.incarnation);
    assert_eq!(replaced.metadata, b"after restart");
    let rec = decode.lookup_record("prefill_engine", 0).unwrap();
    assert_eq!(rec.incarnation, replaced.incarnation);
    // Closing the old client revokes its lease; the key now belongs to the new one.
    old.close().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        decode.lookup("prefill_engine", 0).unwrap(),
        b"after restart"
    );
    new.close().unwrap();
    let removed = next(&sub.rx);
    assert_eq!(removed.kind, NIXL_ETCD_EVENT_REMOVED);
    assert_eq!(removed.incarnation, replaced.incarnation);
    decode.close().unwrap();
}

#[test]
fn subscribers_see_existing_records_all_engines_and_stop_on_unsubscribe() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("subs");
    let prefill = open(&etcd.options_json(&ns, "")).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    prefill.register("engine_a", 0, b"a0").unwrap();
    let all = decode.subscribe(None).unwrap();
    let first = next(&all.rx);
    assert_eq!(
        (first.kind, first.engine_id.as_str(), first.rank),
        (NIXL_ETCD_EVENT_ADDED, "engine_a", 0)
    );
    prefill.register("engine_b", 3, b"b3").unwrap();
    let ev = next(&all.rx);
    assert_eq!(
        (ev.kind, ev.engine_id.as_str(), ev.rank),
        (NIXL_ETCD_EVENT_ADDED, "engine_b", 3)
    );
    decode.unsubscribe(all.id).unwrap();
    // After unsubscribe, nothing more. A second subscriber on the same
    // stream is the barrier: events are dispatched one after the other to
    // every subscriber, so once it has the event after rank 4's, the first
    // would hold rank 4's had it still been subscribed.
    let later = decode.subscribe(None).unwrap();
    let replay: Vec<(String, u32)> = (0..2)
        .map(|_| next(&later.rx))
        .map(|e| (e.engine_id, e.rank))
        .collect();
    assert_eq!(
        replay,
        [("engine_a".to_owned(), 0), ("engine_b".to_owned(), 3)]
    );
    prefill.register("engine_b", 4, b"b4").unwrap();
    prefill.register("engine_b", 5, b"b5").unwrap();
    assert_eq!(next(&later.rx).rank, 4);
    assert_eq!(next(&later.rx).rank, 5);
    decode.unsubscribe(later.id).unwrap();
    assert!(all.rx.try_recv().is_err());
    let err = decode.unsubscribe(all.id).unwrap_err();
    assert_eq!(err.status, NIXL_ETCD_ERR_NOT_FOUND);
    // Bad arguments.
    let mut id = 0;
    assert_eq!(
        unsafe {
            nixl_etcd_subscribe(
                decode.0,
                std::ptr::null(),
                None,
                std::ptr::null_mut(),
                &mut id,
            )
        },
        NIXL_ETCD_ERR_INVALID_ARGUMENT
    );
    assert!(decode.subscribe(Some("../x")).is_err());
    prefill.close().unwrap();
    decode.close().unwrap();
}

/// A callback that calls back into the library (lookup on the same client).
unsafe extern "C" fn lookup_in_callback(
    user_data: *mut std::ffi::c_void,
    ev: *const nixl_etcd_event,
) {
    let (client, tx) = &*(user_data as *const (capi::Handle, std::sync::mpsc::Sender<Vec<u8>>));
    let ev = &*ev;
    if ev.kind == NIXL_ETCD_EVENT_ADDED {
        let engine = std::ffi::CStr::from_ptr(ev.engine_id).to_str().unwrap();
        let _ = tx.send(client.lookup(engine, ev.rank).unwrap_or_default());
    }
}

#[test]
fn callbacks_may_call_back_into_the_library() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("reentry");
    let prefill = open(&etcd.options_json(&ns, "")).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let ctx = Box::new((decode, tx));
    let mut id = 0;
    let e = std::ffi::CString::new("prefill_engine").unwrap();
    let rc = unsafe {
        nixl_etcd_subscribe(
            decode.0,
            e.as_ptr(),
            Some(lookup_in_callback),
            &*ctx as *const _ as *mut _,
            &mut id,
        )
    };
    assert_eq!(rc, NIXL_ETCD_OK);
    prefill
        .register("prefill_engine", 1, &blob(9, 1000))
        .unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        blob(9, 1000)
    );
    decode.close().unwrap();
    prefill.close().unwrap();
    drop(ctx);
}

#[test]
fn wait_engine_returns_when_every_rank_registered_in_any_order() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("engine");
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    let order = [5u32, 2, 7, 0, 3, 6, 1, 4];
    let opts = etcd.options_json(&ns, r#""world_size":8"#);
    let waiter = std::thread::spawn(move || {
        decode
            .wait_engine("prefill_tp8", 20_000)
            .map(|w| (w, decode))
    });
    let ranks: Vec<_> = order
        .iter()
        .map(|&r| {
            let opts = opts.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * r as u64));
                let c = open(&opts).unwrap();
                c.register("prefill_tp8", r, &blob(r, 512)).unwrap();
                c
            })
        })
        .collect();
    let clients: Vec<_> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    let (world, decode) = waiter.join().unwrap().unwrap();
    assert_eq!(world, 8);
    for r in 0..8 {
        assert_eq!(decode.lookup("prefill_tp8", r).unwrap(), blob(r, 512));
    }
    assert_eq!(
        decode.lookup_record("prefill_tp8", 3).unwrap().world_size,
        8
    );
    for c in clients {
        c.close().unwrap();
    }
    decode.close().unwrap();
}

#[test]
fn wait_engine_timeout_names_the_missing_ranks() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("missing");
    let prefill = open(&etcd.options_json(&ns, r#""world_size":4"#)).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    for r in [0, 1, 3] {
        prefill.register("prefill_tp4", r, b"x").unwrap();
    }
    let t = Instant::now();
    let err = decode.wait_engine("prefill_tp4", 500).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(err.status, NIXL_ETCD_ERR_TIMEOUT);
    assert!(
        err.message
            .starts_with("Timeout waiting for engine prefill_tp4"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("missing rank(s) 2 of world size 4"),
        "{}",
        err.message
    );
    let err = decode.wait_engine("nobody", 200).unwrap_err();
    assert!(
        err.message.contains("no rank is registered"),
        "{}",
        err.message
    );
    // The last rank arrives: the wait completes.
    prefill.register("prefill_tp4", 2, b"x").unwrap();
    assert_eq!(decode.wait_engine("prefill_tp4", 5000).unwrap(), 4);
    prefill.close().unwrap();
    decode.close().unwrap();
}

#[test]
fn target_rank_table_matches_vllm() {
    let table = |l: u32, r: u32| -> Vec<Vec<u32>> {
        (0..l).map(|i| target_ranks(l, i, r, 16).unwrap()).collect()
    };
    assert_eq!(
        table(8, 4),
        vec![
            vec![0],
            vec![0],
            vec![1],
            vec![1],
            vec![2],
            vec![2],
            vec![3],
            vec![3]
        ]
    );
    assert_eq!(
        table(4, 8),
        vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
    );
    assert_eq!(table(2, 2), vec![vec![0], vec![1]]);
    assert_eq!(table(1, 8), vec![vec![0, 1, 2, 3, 4, 5, 6, 7]]);
    assert_eq!(table(8, 1), vec![vec![0]; 8]);
    for (l, rank, r) in [(3, 0, 4), (4, 4, 8), (0, 0, 1), (4, 0, 6)] {
        let (err, _) = target_ranks(l, rank, r, 16).unwrap_err();
        assert_eq!(err.status, NIXL_ETCD_ERR_INVALID_ARGUMENT);
    }
    let (err, needed) = target_ranks(1, 0, 8, 2).unwrap_err();
    assert_eq!((err.status, needed), (NIXL_ETCD_ERR_INVALID_ARGUMENT, 8));
    assert!(err.message.contains("8 are needed"), "{}", err.message);
}

#[test]
fn lookup_record_returns_every_field() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("fields");
    let prefill =
        open(&etcd.options_json(&ns, r#""host":"node1.example.com","world_size":2"#)).unwrap();
    let decode = open(&etcd.options_json(&ns, "")).unwrap();
    prefill
        .register("prefill_engine", 1, &blob(4, 333))
        .unwrap();
    let rec = decode.lookup_record("prefill_engine", 1).unwrap();
    assert_eq!(rec.engine_id, "prefill_engine");
    assert_eq!(rec.rank, 1);
    assert_eq!(rec.world_size, 2);
    assert_eq!(rec.host, "node1.example.com");
    assert_eq!(rec.pid, std::process::id());
    assert_eq!(rec.incarnation.len(), 16);
    assert!(rec.revision > 0);
    assert!(rec.registered_at_ms > 1_700_000_000_000);
    assert_eq!(rec.metadata, blob(4, 333));
    assert_eq!(
        decode
            .lookup_record("prefill_engine", 7)
            .unwrap_err()
            .status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    unsafe { nixl_etcd_record_free(std::ptr::null_mut()) };
    prefill.close().unwrap();
    decode.close().unwrap();
}

#[test]
fn a_client_following_many_engines_stays_current_with_few_requests() {
    use nixl_etcd::{Client, Config};
    let etcd = EtcdServer::start();
    let ns = unique_namespace("many");
    let cfg = Config::from_sources(|_| None, Some(&etcd.options_json(&ns, ""))).unwrap();
    let prefill = Client::open(cfg.clone()).unwrap();
    let decode = Client::open(cfg).unwrap();
    for e in 0..8u32 {
        for r in 0..4u32 {
            prefill
                .register(&format!("p{e}"), r, &blob(e * 10 + r, 256))
                .unwrap();
        }
    }
    // Both clients share the process's cache, whose requests count on the
    // client that created it: the process's requests are the sum.
    let issued = || prefill.requests_issued() + decode.requests_issued();
    let before = issued();
    // A decode rank reads rank 1 of every engine.
    for e in 0..8u32 {
        let got = decode
            .wait(&format!("p{e}"), 1, Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(&*got.metadata, &blob(e * 10 + 1, 256)[..]);
    }
    // Each engine followed once (a list and a watch on the process's one
    // watch stream): requests do not grow with the number of ranks (32
    // here); a few lease renewals may fall in between.
    let used = issued() - before;
    assert!(used <= 2 * 8 + 4, "{used} requests");
    assert_eq!(decode.cache_footprint(), (8, 32));
    // The cache stays current for every engine.
    prefill.register("p7", 1, b"updated").unwrap();
    assert!(wait_until(Duration::from_secs(5), || decode
        .lookup("p7", 1)
        .is_ok_and(|f| &*f.metadata == b"updated")));
    prefill.unregister("p6", 1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || decode
        .lookup("p6", 1)
        .is_err_and(|e| e.status == nixl_etcd::Status::ErrNotFound)));
    prefill.close().unwrap();
    decode.close().unwrap();
}
