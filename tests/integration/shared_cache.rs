//! The process's shared cache: clients of one process with the same etcd
//! identity share one list and one cached copy per engine and one watch
//! stream; a client holds only the engines read in its process; an engine
//! nobody reads leaves the cache with its watch. Counted on etcd's own
//! metrics (`/metrics`), against a real etcd.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixl_etcd::{Client, Config, EventKind, Status};

use crate::capi::blob;
use crate::common::{unique_namespace, wait_until, EtcdServer};

/// gRPC watch streams open on the server, and the watches on them.
const STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

fn md(engine: u32, rank: u32) -> Vec<u8> {
    blob(engine * 100 + rank, 512)
}

/// Registers `engines` engines of 2 ranks each through one client.
fn register_fleet(prefill: &Client, engines: u32) {
    for e in 0..engines {
        for r in 0..2 {
            prefill.register(&format!("p{e}"), r, &md(e, r)).unwrap();
        }
    }
}

#[test]
fn clients_of_one_process_share_one_watch_stream_and_one_copy_of_each_record() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("shared");
    let prefill = etcd.client(&ns, "");
    register_fleet(&prefill, 10);
    // Eight decode ranks in this process, each reading both ranks of 6 of
    // the 10 engines.
    let decode: Vec<Client> = (0..8).map(|_| etcd.client(&ns, "")).collect();
    for d in &decode {
        for e in 0..6u32 {
            for r in 0..2 {
                let found = d.lookup(&format!("p{e}"), r).unwrap();
                assert_eq!(*found.metadata, md(e, r));
            }
        }
    }
    // One copy of each record, handed to every client.
    let a = decode[0].lookup("p3", 1).unwrap();
    let b = decode[7].lookup("p3", 1).unwrap();
    assert!(Arc::ptr_eq(&a.metadata, &b.metadata));
    // What was read, not the namespace: 6 engines of 2 ranks.
    for d in &decode {
        assert_eq!(d.cache_footprint(), (6, 12));
    }
    // One watch stream for the process, one watch per engine read.
    assert!(
        wait_until(Duration::from_secs(10), || etcd.metric(WATCHERS) == 6.0),
        "{} watches on etcd, expected 6",
        etcd.metric(WATCHERS)
    );
    assert_eq!(etcd.metric(STREAMS), 1.0);
    // The shared copy follows changes: every client sees the new bytes.
    prefill.register("p2", 0, b"new metadata").unwrap();
    for d in &decode {
        assert_eq!(&*d.lookup("p2", 0).unwrap().metadata, b"new metadata");
    }
    // Closing some clients leaves the others' cache and stream in place.
    for d in &decode[..7] {
        d.close().unwrap();
    }
    prefill.unregister("p4", 1).unwrap();
    assert_eq!(
        decode[7].lookup("p4", 1).unwrap_err().status,
        Status::ErrNotFound
    );
    assert_eq!(&*decode[7].lookup("p4", 0).unwrap().metadata, &md(4, 0)[..]);
    assert_eq!(etcd.metric(STREAMS), 1.0);
    // The last client of the process closes: its stream and watches go.
    decode[7].close().unwrap();
    prefill.close().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || etcd.metric(STREAMS) == 0.0),
        "{} watch streams left after every client closed",
        etcd.metric(STREAMS)
    );
}

#[test]
fn changes_from_another_process_reach_every_client_through_the_one_stream() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("sharedwatch");
    let decode: Vec<Client> = (0..4).map(|_| etcd.client(&ns, "")).collect();
    for d in &decode {
        assert_eq!(d.lookup("p0", 0).unwrap_err().status, Status::ErrNotFound);
    }
    // Another etcd identity (the same server named by its host name) has a
    // cache of its own, like another process: its writes reach the decode
    // clients only through their one watch stream.
    let by_name = format!("http://localhost:{}", etcd.client_port());
    let opts = serde_json::json!({"endpoints": by_name, "namespace": ns}).to_string();
    let writer = Client::open(Config::from_sources(|_| None, Some(&opts)).unwrap()).unwrap();
    writer.register("p0", 0, &md(0, 0)).unwrap();
    for d in &decode {
        assert!(wait_until(Duration::from_secs(10), || d
            .lookup("p0", 0)
            .is_ok_and(|f| *f.metadata == md(0, 0))));
    }
    assert_eq!(etcd.metric(STREAMS), 1.0);
    writer.close().unwrap();
    for d in &decode {
        assert!(wait_until(Duration::from_secs(10), || d
            .lookup("p0", 0)
            .is_err_and(|e| e.status == Status::ErrNotFound)));
    }
    decode.iter().for_each(|d| d.close().unwrap());
}

#[test]
fn an_engine_nobody_reads_leaves_the_cache_with_its_watch() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("idle");
    // The process's first client of this identity sets the idle time.
    let prefill = etcd.client(&ns, r#""cache_idle_s":1"#);
    register_fleet(&prefill, 3);
    let decode = etcd.client(&ns, r#""cache_idle_s":1"#);
    for e in 0..3u32 {
        assert_eq!(
            *decode.lookup(&format!("p{e}"), 0).unwrap().metadata,
            md(e, 0)
        );
    }
    // p1 is subscribed to: it stays however long nobody looks it up.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let sub = decode
        .subscribe(
            Some("p1"),
            Box::new(move |ev| sink.lock().unwrap().push((ev.kind, ev.rank))),
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || etcd
        .metric(WATCHERS)
        == 3.0));
    // p2 keeps being read; p0 is not: p0 leaves, with its watch.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let _ = decode.lookup("p2", 1);
            decode.cache_footprint() == (2, 4) && etcd.metric(WATCHERS) == 2.0
        }),
        "footprint {:?}, {} watches",
        decode.cache_footprint(),
        etcd.metric(WATCHERS)
    );
    // The subscription still receives p1's changes.
    prefill.register("p1", 1, b"p1 again").unwrap();
    assert!(wait_until(Duration::from_secs(10), || seen
        .lock()
        .unwrap()
        .contains(&(EventKind::Updated, 1))));
    // Nothing is lost: p0, read again, is listed again, current.
    prefill
        .register("p0", 0, b"p0 changed while uncached")
        .unwrap();
    assert_eq!(
        &*decode.lookup("p0", 0).unwrap().metadata,
        b"p0 changed while uncached"
    );
    assert_eq!(decode.cache_footprint(), (3, 6));
    // Unsubscribed and unread, p1 leaves too.
    decode.unsubscribe(sub).unwrap();
    assert!(wait_until(Duration::from_secs(30), || {
        let _ = decode.lookup("p2", 1);
        let _ = decode.lookup("p0", 1);
        decode.cache_footprint() == (2, 4)
    }));
    decode.close().unwrap();
    prefill.close().unwrap();
}
