//! One client shared by many threads, and several clients in one process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::capi::{blob, open};
use crate::common::{unique_namespace, EtcdServer};
use nixl_etcd::ffi::NIXL_ETCD_ERR_NOT_FOUND;

#[test]
fn thirty_two_threads_times_a_hundred_mixed_calls_on_one_client() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("threads");
    let shared = open(&etcd.options_json(&ns, "")).unwrap();
    let observer = open(&etcd.options_json(&ns, "")).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..32u32)
        .map(|t| {
            let calls = calls.clone();
            std::thread::spawn(move || {
                let engine = format!("engine_{}", t % 4);
                let rank = t;
                let mut last = Vec::new();
                for i in 0..100u32 {
                    match i % 5 {
                        0 | 3 => {
                            last = blob(t * 1000 + i, 1024 + (i as usize % 7) * 512);
                            shared.register(&engine, rank, &last).unwrap();
                        }
                        1 => assert!(
                            shared.lookup(&engine, rank).unwrap() == last,
                            "thread {t} call {i}: lookup is stale"
                        ),
                        2 => assert!(
                            shared.wait(&engine, rank, 5000).unwrap() == last,
                            "thread {t} call {i}: wait is stale"
                        ),
                        _ => {
                            // A peer's rank: present or not yet, never an error.
                            let peer = (t + 1) % 32;
                            match shared.lookup(&format!("engine_{}", peer % 4), peer) {
                                Ok(v) => assert!(!v.is_empty()),
                                Err(e) => assert_eq!(e.status, NIXL_ETCD_ERR_NOT_FOUND, "{e:?}"),
                            }
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                // Every other thread ends unregistered.
                if t % 2 == 1 {
                    shared.unregister(&engine, rank).unwrap();
                    None
                } else {
                    Some((engine, rank, last))
                }
            })
        })
        .collect();
    let finals: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(calls.load(Ordering::Relaxed), 3200);
    for (t, fin) in finals.into_iter().enumerate() {
        let t = t as u32;
        match fin {
            Some((engine, rank, md)) => assert_eq!(observer.lookup(&engine, rank).unwrap(), md),
            None => assert_eq!(
                observer
                    .lookup(&format!("engine_{}", t % 4), t)
                    .unwrap_err()
                    .status,
                NIXL_ETCD_ERR_NOT_FOUND
            ),
        }
    }
    shared.close().unwrap();
    observer.close().unwrap();
}

#[test]
fn many_clients_in_one_process_are_independent() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("clients");
    let clients: Vec<_> = (0..8)
        .map(|_| open(&etcd.options_json(&ns, "")).unwrap())
        .collect();
    for (i, c) in clients.iter().enumerate() {
        c.register("e", i as u32, &blob(i as u32, 256)).unwrap();
    }
    // Closing one removes only its own records.
    let mut clients = clients.into_iter();
    clients.next().unwrap().close().unwrap();
    let rest: Vec<_> = clients.collect();
    assert_eq!(
        rest[0].lookup("e", 0).unwrap_err().status,
        NIXL_ETCD_ERR_NOT_FOUND
    );
    for i in 1..8u32 {
        assert_eq!(rest[0].lookup("e", i).unwrap(), blob(i, 256));
    }
    for c in rest {
        c.close().unwrap();
    }
}
