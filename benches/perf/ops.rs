//! Per-operation latency: nixl-etcd through its C ABI against its floor, a
//! raw `etcd_client::Client` doing the same etcd work, measured in one run
//! against the same etcd (single member or cluster).
//!
//! Ours is timed around the exported C calls, including the copy into the
//! caller's buffer and `nixl_etcd_buffer_free` where one is returned. The
//! floor runs on a current-thread tokio runtime owned by this module, on one
//! connection made once, with one lease. Where two parties are involved
//! (a write and the watch event or wait it causes), both ends are read from
//! the same monotonic clock (`Instant`): the start just before the write, the
//! end where the event arrives (inside the subscription callback, in the
//! thread blocked in `nixl_etcd_wait`, or in the floor's watch task).
//! Samples of ours and of the floor are interleaved, so that a drift of the
//! machine or of etcd during the run affects both alike.

use std::ffi::{c_void, CStr, CString};
use std::hint::black_box;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd_client::{EventType, PutOptions, WatchOptions, WatchStream};
use nixl_etcd::ffi::{
    nixl_etcd_buffer, nixl_etcd_buffer_free, nixl_etcd_close, nixl_etcd_event, nixl_etcd_lookup,
    nixl_etcd_register, nixl_etcd_subscribe, nixl_etcd_unregister, nixl_etcd_unsubscribe,
    nixl_etcd_wait, NIXL_ETCD_EVENT_ADDED, NIXL_ETCD_EVENT_REMOVED, NIXL_ETCD_OK,
};

use crate::stats::{
    Row, Series, OP_COLD_LOOKUP, OP_DISCOVERY, OP_INVAL_CLOSE, OP_INVAL_UNREGISTER, OP_REGISTER,
    OP_WARM_LOOKUP,
};

#[path = "../../tests/capi/mod.rs"]
mod capi;

/// Metadata size of every operation.
const BLOB: usize = 8 * 1024;
/// Untimed calls before each timed series.
const WARMUP: usize = 20;
/// Warm lookups before the timed ones (they cost a microsecond each).
const WARM_WARMUP: usize = 500;
/// Samples of close -> REMOVED (each opens and closes a client).
const MAX_CLOSE_SAMPLES: usize = 200;
/// Pause before a two-party sample: the waiter is blocked in its wait, the
/// subscriber's dispatcher and the watches are idle.
const SETTLE: Duration = Duration::from_millis(1);
/// Longest a single step may take before the bench gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Cold lookups per reader client, after its one untimed warm-up lookup. A
/// client follows up to four engines one by one (beyond that it caches the
/// whole namespace, and a record registered beforehand would be a hit), so
/// 1 + 3 engines keep every timed lookup a miss.
const COLD_PER_READER: usize = 3;
/// A "cold" lookup this fast was answered from memory: the bench is wrong.
const CACHE_HIT_US: f64 = 20.0;

type R<T> = Result<T, String>;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("ids here hold no NUL")
}

fn failed(what: &str, f: capi::Failure) -> String {
    format!("{what}: status {}: {}", f.status, f.message)
}

fn check(what: &str, rc: i32) -> R<()> {
    if rc == NIXL_ETCD_OK {
        Ok(())
    } else {
        Err(format!("{what}: status {rc}: {}", capi::last_error()))
    }
}

/// Runs one phase of the bench, naming it in its error and its progress line.
fn phase<T>(setup: &str, what: &str, f: impl FnOnce() -> R<T>) -> R<T> {
    let t = Instant::now();
    let out = f().map_err(|e| format!("{what}: {e}"))?;
    eprintln!(
        "perf ops ({setup}): {what} done in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn empty_buffer() -> nixl_etcd_buffer {
    nixl_etcd_buffer {
        data: std::ptr::null_mut(),
        len: 0,
    }
}

/// Measures every operation on `endpoints` (comma-separated) and returns one
/// row per operation, each with its floor. Panics if a call fails.
pub fn run(setup: &str, endpoints: &str, n: usize) -> Vec<Row> {
    let started = Instant::now();
    match Bench::new(setup, endpoints).and_then(|mut b| b.all(n)) {
        Ok(rows) => {
            eprintln!(
                "perf ops ({setup}): {} operations in {:.1} s",
                rows.len(),
                started.elapsed().as_secs_f64()
            );
            rows
        }
        Err(e) => panic!("perf ops ({setup}, {endpoints}): {e}"),
    }
}

struct Bench {
    setup: String,
    endpoints: String,
    floor: Floor,
    /// The same on a multi-thread runtime (register and cold lookup): what
    /// the hand-off between threads costs the raw client.
    floor_mt: Floor,
    blob: Vec<u8>,
}

impl Bench {
    fn new(setup: &str, endpoints: &str) -> R<Bench> {
        let floor = Floor::connect(
            endpoints,
            &crate::common::unique_namespace(&format!("perf-{setup}-floor")),
            false,
        )?;
        let floor_mt = Floor::connect(
            endpoints,
            &crate::common::unique_namespace(&format!("perf-{setup}-floor-mt")),
            true,
        )?;
        Ok(Bench {
            setup: setup.to_owned(),
            endpoints: endpoints.to_owned(),
            floor,
            floor_mt,
            blob: capi::blob(0x8_0000, BLOB),
        })
    }

    /// Options for a client of the phase `tag`: each phase has a namespace
    /// of its own, so no phase's records weigh on another's lists.
    fn options(&self, tag: &str) -> String {
        let ns = crate::common::unique_namespace(&format!("perf-{}-{tag}", self.setup));
        serde_json::json!({ "endpoints": self.endpoints, "namespace": ns, "timeout_s": 10 })
            .to_string()
    }

    fn all(&mut self, n: usize) -> R<Vec<Row>> {
        let setup = self.setup.clone();
        let register = self.register(n)?;
        let (cold, warm, get, get_mt) = self.lookups(n)?;
        let discovery = self.discovery(n)?;
        let (unregister, close) = self.invalidation(n, n.min(MAX_CLOSE_SAMPLES))?;
        self.floor.finish();
        self.floor_mt.finish();
        Ok(vec![
            Row::new(&setup, OP_REGISTER, register.0)
                .floor("etcd-client put 8 KiB with lease", register.1)
                .floor_mt(register.2),
            Row::new(&setup, OP_COLD_LOOKUP, cold)
                .floor("etcd-client get 8 KiB", get.clone())
                .floor_mt(get_mt),
            Row::new(&setup, OP_WARM_LOOKUP, warm).floor("etcd-client get 8 KiB", get),
            Row::new(&setup, OP_DISCOVERY, discovery.0)
                .floor("etcd-client put -> watch event", discovery.1),
            Row::new(&setup, OP_INVAL_UNREGISTER, unregister.0)
                .floor("etcd-client delete -> watch event", unregister.1),
            Row::new(&setup, OP_INVAL_CLOSE, close.0)
                .floor("etcd-client lease revoke -> watch event", close.1),
        ])
    }

    /// `nixl_etcd_register` of 8 KiB, a new rank each sample; floor: a put of
    /// 8 KiB with the lease, a new key each sample.
    fn register(&mut self, n: usize) -> R<(Series, Series, Series)> {
        let opts = self.options("register");
        let client = capi::open(&opts).map_err(|f| failed("open", f))?;
        let engine = cstring("perf_register");
        let blob = self.blob.clone();
        let setup = self.setup.clone();
        let result = phase(&setup, "register", || {
            let timed_register = |rank: u32| -> R<f64> {
                let start = Instant::now();
                // SAFETY: an open handle, a NUL-terminated id, `blob` valid for its length.
                let rc = unsafe {
                    nixl_etcd_register(client.0, engine.as_ptr(), rank, blob.as_ptr(), blob.len())
                };
                let t = us(start.elapsed());
                check("nixl_etcd_register", rc).map(|_| t)
            };
            for j in 0..WARMUP {
                timed_register((n + j) as u32)?;
                self.floor.put(&format!("reg-warmup/{j}"))?;
                self.floor_mt.put(&format!("reg-warmup/{j}"))?;
            }
            let (mut ours, mut floor, mut floor_mt): (Series, Series, Series) = Default::default();
            for i in 0..n {
                ours.push(timed_register(i as u32)?);
                floor.push(self.floor.put(&format!("reg/{i}"))?);
                floor_mt.push(self.floor_mt.put(&format!("reg/{i}"))?);
            }
            Ok((ours, floor, floor_mt))
        });
        client.close().map_err(|f| failed("close", f))?;
        result
    }

    /// Cold lookups (each a miss: an engine registered beforehand by another
    /// client, asked by a reader that never asked about it), warm lookups of
    /// one cached record, and their floor: a get of 8 KiB.
    fn lookups(&mut self, n: usize) -> R<(Series, Series, Series, Series)> {
        let opts = self.options("lookup");
        let writer = capi::open(&opts).map_err(|f| failed("open the writer", f))?;
        let setup = self.setup.clone();
        let result = phase(&setup, "cold and warm lookups", || {
            for i in 0..n {
                writer
                    .register(&format!("cold_{i}"), 0, &self.blob)
                    .map_err(|f| failed("register", f))?;
            }
            writer
                .register("cold_reader_warmup", 0, &self.blob)
                .map_err(|f| failed("register", f))?;
            writer
                .register("warm", 0, &self.blob)
                .map_err(|f| failed("register", f))?;
            self.floor.put("get")?;
            self.floor_mt.put("get")?;

            let ids: Vec<CString> = (0..n).map(|i| cstring(&format!("cold_{i}"))).collect();
            let reader_warmup = cstring("cold_reader_warmup");
            for _ in 0..WARMUP {
                self.floor.get("get")?;
                self.floor_mt.get("get")?;
            }
            let (mut cold, mut get, mut get_mt): (Series, Series, Series) = Default::default();
            for chunk in ids.chunks(COLD_PER_READER) {
                let reader = capi::open(&opts).map_err(|f| failed("open a reader", f))?;
                let measured = (|| {
                    // Its connection and runtime path are warm; its cache holds
                    // nothing of the engines that follow.
                    timed_lookup(reader, &reader_warmup)?;
                    for id in chunk {
                        get.push(self.floor.get("get")?);
                        get_mt.push(self.floor_mt.get("get")?);
                        cold.push(timed_lookup(reader, id)?);
                    }
                    Ok::<_, String>(())
                })();
                reader.close().map_err(|f| failed("close a reader", f))?;
                measured?;
            }
            let hits = cold
                .samples_us
                .iter()
                .filter(|t| **t < CACHE_HIT_US)
                .count();
            if hits > 0 {
                return Err(format!(
                    "{hits} of {n} cold lookups took under {CACHE_HIT_US} us: answered from \
                     the cache, so not cold"
                ));
            }

            let reader = capi::open(&opts).map_err(|f| failed("open the warm reader", f))?;
            let warm = (|| {
                let id = cstring("warm");
                for _ in 0..WARM_WARMUP {
                    timed_lookup(reader, &id)?;
                }
                let mut warm = Series::default();
                for _ in 0..n {
                    warm.push(timed_lookup(reader, &id)?);
                }
                Ok::<_, String>(warm)
            })();
            reader
                .close()
                .map_err(|f| failed("close the warm reader", f))?;
            Ok((cold, warm?, get, get_mt))
        });
        writer.close().map_err(|f| failed("close the writer", f))?;
        result
    }

    /// A thread blocked in `nixl_etcd_wait` on client W, for a new engine each
    /// sample, returns when client R registers it: from just before R's
    /// register to W's return. Floor: a put seen by a watch made before it.
    fn discovery(&mut self, n: usize) -> R<(Series, Series)> {
        let opts = self.options("discovery");
        let waiter_client = capi::open(&opts).map_err(|f| failed("open W", f))?;
        let registrar = match capi::open(&opts) {
            Ok(h) => h,
            Err(f) => {
                let _ = waiter_client.close();
                return Err(failed("open R", f));
            }
        };
        let (job_tx, job_rx) = mpsc::channel::<CString>();
        let (done_tx, done_rx) = mpsc::channel::<R<Instant>>();
        let waiter = std::thread::Builder::new()
            .name("perf-waiter".into())
            .spawn(move || {
                let w = waiter_client;
                for engine in job_rx {
                    let mut buf = empty_buffer();
                    let limit = STEP_TIMEOUT.as_millis() as i64;
                    // SAFETY: an open handle, a NUL-terminated id, a writable buffer.
                    let rc = unsafe { nixl_etcd_wait(w.0, engine.as_ptr(), 0, limit, &mut buf) };
                    let returned = Instant::now();
                    let len = buf.len;
                    // SAFETY: the buffer nixl_etcd_wait filled (or left empty).
                    unsafe { nixl_etcd_buffer_free(&mut buf) };
                    let r = check("nixl_etcd_wait", rc).and_then(|_| match len {
                        BLOB => Ok(returned),
                        _ => Err(format!("nixl_etcd_wait returned {len} bytes, not {BLOB}")),
                    });
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
                w
            })
            .map_err(|e| format!("spawn the waiter thread: {e}"))?;

        let blob = self.blob.clone();
        let setup = self.setup.clone();
        let result = phase(&setup, "discovery", || {
            let sample = |engine: &str| -> R<f64> {
                let id = cstring(engine);
                job_tx
                    .send(id.clone())
                    .map_err(|_| "the waiter thread is gone".to_string())?;
                // Let the waiter reach its wait and block in it.
                std::thread::sleep(SETTLE);
                let start = Instant::now();
                // SAFETY: an open handle, a NUL-terminated id, `blob` valid for its length.
                let rc = unsafe {
                    nixl_etcd_register(registrar.0, id.as_ptr(), 0, blob.as_ptr(), blob.len())
                };
                check("nixl_etcd_register", rc)?;
                let returned = done_rx
                    .recv_timeout(STEP_TIMEOUT)
                    .map_err(|_| format!("the wait for {engine} did not return"))??;
                Ok(us(returned.saturating_duration_since(start)))
            };
            // The first engines get informers of their own; after them the
            // waiter follows the namespace, as a decode rank among many does.
            for j in 0..WARMUP {
                sample(&format!("disc_warmup_{j}"))?;
                self.floor.put_to_watch(&format!("disc-warmup/{j}"))?;
            }
            let (mut ours, mut floor) = (Series::default(), Series::default());
            for i in 0..n {
                ours.push(sample(&format!("disc_{i}"))?);
                floor.push(self.floor.put_to_watch(&format!("disc/{i}"))?);
            }
            Ok((ours, floor))
        });
        drop(job_tx);
        let waiter_client = waiter
            .join()
            .map_err(|_| "the waiter thread panicked".to_string())?;
        waiter_client.close().map_err(|f| failed("close W", f))?;
        registrar.close().map_err(|f| failed("close R", f))?;
        result
    }

    /// A subscriber's REMOVED after another client's `nixl_etcd_unregister`
    /// (floor: delete -> watch event), then after `nixl_etcd_close` of the
    /// registering client (floor: lease revoke -> watch event).
    #[allow(clippy::type_complexity)]
    fn invalidation(
        &mut self,
        n: usize,
        n_close: usize,
    ) -> R<((Series, Series), (Series, Series))> {
        let opts = self.options("invalidation");
        let subscriber = capi::open(&opts).map_err(|f| failed("open the subscriber", f))?;
        let (tx, rx) = mpsc::channel::<Stamp>();
        // Lives until the subscriber is closed: its callback uses it till then.
        let tx = Box::new(tx);
        let user_data = &*tx as *const mpsc::Sender<Stamp> as *mut c_void;
        let setup = self.setup.clone();
        let result = phase(&setup, "invalidation", || {
            let subscribe = |engine: &CStr| -> R<u64> {
                let mut id = 0u64;
                // SAFETY: an open handle, a NUL-terminated id, a callback whose
                // user data outlives the subscription (see `tx`).
                let rc = unsafe {
                    nixl_etcd_subscribe(
                        subscriber.0,
                        engine.as_ptr(),
                        Some(stamp_event),
                        user_data,
                        &mut id,
                    )
                };
                check("nixl_etcd_subscribe", rc).map(|_| id)
            };
            let unreg_engine = cstring("perf_unregister");
            let close_engine = cstring("perf_close");
            let sub_unreg = subscribe(&unreg_engine)?;
            let sub_close = subscribe(&close_engine)?;

            let registrar = capi::open(&opts).map_err(|f| failed("open the registrar", f))?;
            let unreg = (|| {
                let mut watch = self.floor.watch_prefix("inval/")?;
                let sample = |rank: u32| -> R<f64> {
                    registrar
                        .register("perf_unregister", rank, &self.blob)
                        .map_err(|f| failed("register", f))?;
                    await_stamp(&rx, NIXL_ETCD_EVENT_ADDED, "perf_unregister", rank)?;
                    std::thread::sleep(SETTLE);
                    let start = Instant::now();
                    // SAFETY: an open handle and a NUL-terminated id.
                    let rc =
                        unsafe { nixl_etcd_unregister(registrar.0, unreg_engine.as_ptr(), rank) };
                    check("nixl_etcd_unregister", rc)?;
                    let at = await_stamp(&rx, NIXL_ETCD_EVENT_REMOVED, "perf_unregister", rank)?;
                    Ok(us(at.saturating_duration_since(start)))
                };
                for j in 0..WARMUP {
                    sample((n + j) as u32)?;
                    self.floor
                        .delete_to_watch(&mut watch, &format!("inval/warmup-{j}"))?;
                }
                let (mut ours, mut floor) = (Series::default(), Series::default());
                for i in 0..n {
                    ours.push(sample(i as u32)?);
                    floor.push(
                        self.floor
                            .delete_to_watch(&mut watch, &format!("inval/{i}"))?,
                    );
                }
                Ok::<_, String>((ours, floor))
            })();
            registrar
                .close()
                .map_err(|f| failed("close the registrar", f))?;
            let unreg = unreg?;

            let close = (|| {
                let mut watch = self.floor.watch_prefix("revoke/")?;
                let sample = |rank: u32| -> R<f64> {
                    let owner = capi::open(&opts).map_err(|f| failed("open an owner", f))?;
                    if let Err(f) = owner.register("perf_close", rank, &self.blob) {
                        let _ = owner.close();
                        return Err(failed("register", f));
                    }
                    await_stamp(&rx, NIXL_ETCD_EVENT_ADDED, "perf_close", rank)?;
                    std::thread::sleep(SETTLE);
                    let start = Instant::now();
                    // SAFETY: an open handle, closed exactly once.
                    let rc = unsafe { nixl_etcd_close(owner.0) };
                    check("nixl_etcd_close", rc)?;
                    let at = await_stamp(&rx, NIXL_ETCD_EVENT_REMOVED, "perf_close", rank)?;
                    Ok(us(at.saturating_duration_since(start)))
                };
                for j in 0..WARMUP.min(n_close) {
                    sample((n_close + j) as u32)?;
                    self.floor
                        .revoke_to_watch(&mut watch, &format!("revoke/warmup-{j}"))?;
                }
                let (mut ours, mut floor) = (Series::default(), Series::default());
                for i in 0..n_close {
                    ours.push(sample(i as u32)?);
                    floor.push(
                        self.floor
                            .revoke_to_watch(&mut watch, &format!("revoke/{i}"))?,
                    );
                }
                Ok::<_, String>((ours, floor))
            })()?;

            for id in [sub_unreg, sub_close] {
                // SAFETY: an open handle and a subscription it returned.
                check("nixl_etcd_unsubscribe", unsafe {
                    nixl_etcd_unsubscribe(subscriber.0, id)
                })?;
            }
            Ok((unreg, close))
        });
        subscriber
            .close()
            .map_err(|f| failed("close the subscriber", f))?;
        // The subscriber is closed: no callback runs any more.
        drop(tx);
        result
    }
}

/// One `nixl_etcd_lookup` + `nixl_etcd_buffer_free`, timed on the calling
/// thread, in microseconds.
fn timed_lookup(h: capi::Handle, engine: &CStr) -> R<f64> {
    let mut buf = empty_buffer();
    let start = Instant::now();
    // SAFETY: an open handle, a NUL-terminated id, a writable buffer freed below.
    let rc = unsafe { nixl_etcd_lookup(h.0, engine.as_ptr(), 0, &mut buf) };
    let len = buf.len;
    if rc == NIXL_ETCD_OK && len > 0 {
        // Read the copy, so that it cannot be skipped.
        // SAFETY: `data` holds `len` bytes.
        black_box(unsafe { *buf.data.add(len - 1) });
    }
    // SAFETY: the buffer nixl_etcd_lookup filled (or left empty).
    unsafe { nixl_etcd_buffer_free(&mut buf) };
    let t = us(start.elapsed());
    check("nixl_etcd_lookup", rc)?;
    if len != BLOB {
        return Err(format!("nixl_etcd_lookup returned {len} bytes, not {BLOB}"));
    }
    Ok(t)
}

/// An event as the subscription callback saw it, with the instant it ran.
struct Stamp {
    kind: i32,
    engine: String,
    rank: u32,
    at: Instant,
}

/// The subscription callback: stamps the event first, then hands it over.
unsafe extern "C" fn stamp_event(user_data: *mut c_void, ev: *const nixl_etcd_event) {
    let at = Instant::now();
    // SAFETY: `user_data` is the sender kept alive by `Bench::invalidation`;
    // the event and its strings are valid during the call.
    let tx = unsafe { &*(user_data as *const mpsc::Sender<Stamp>) };
    let ev = unsafe { &*ev };
    let engine = unsafe { CStr::from_ptr(ev.engine_id) }
        .to_string_lossy()
        .into_owned();
    let _ = tx.send(Stamp {
        kind: ev.kind,
        engine,
        rank: ev.rank,
        at,
    });
}

/// The instant the callback saw `kind` for (`engine`, `rank`); other events
/// (a replay, a previous sample's) are skipped.
fn await_stamp(rx: &mpsc::Receiver<Stamp>, kind: i32, engine: &str, rank: u32) -> R<Instant> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = rx.recv_timeout(left).map_err(|_| {
            format!("no event {kind} for {engine} rank {rank} within {STEP_TIMEOUT:?}")
        })?;
        if s.kind == kind && s.engine == engine && s.rank == rank {
            return Ok(s.at);
        }
    }
}

/// The floor: a raw etcd-client on a runtime of its own, connected once.
struct Floor {
    rt: tokio::runtime::Runtime,
    etcd: etcd_client::Client,
    lease: i64,
    prefix: String,
    value: Vec<u8>,
}

fn etcd_err(what: &str) -> impl Fn(etcd_client::Error) -> String + '_ {
    move |e| format!("etcd-client {what}: {e}")
}

/// The instant the first event of type `kind` arrives on `stream`.
async fn next_event(stream: &mut WatchStream, kind: EventType) -> R<Instant> {
    loop {
        let msg = stream
            .message()
            .await
            .map_err(etcd_err("watch"))?
            .ok_or("etcd-client watch: the stream ended")?;
        if msg.events().iter().any(|e| e.event_type() == kind) {
            return Ok(Instant::now());
        }
        if msg.canceled() {
            return Err(format!(
                "etcd-client watch cancelled: {}",
                msg.cancel_reason()
            ));
        }
    }
}

impl Floor {
    /// `multi_thread`: the client's connection tasks run on a 2-worker
    /// runtime and calls are driven from the bench's thread, as the library
    /// does (its runtime outlives any call); else everything runs on the
    /// calling thread.
    fn connect(endpoints: &str, prefix: &str, multi_thread: bool) -> R<Floor> {
        let rt = match multi_thread {
            true => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
            false => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
        }
        .map_err(|e| format!("build the floor's tokio runtime: {e}"))?;
        let list: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
        let etcd = rt
            .block_on(etcd_client::Client::connect(&list, None))
            .map_err(etcd_err("connect"))?;
        let lease = rt
            .block_on(etcd.lease_client().grant(600, None))
            .map_err(etcd_err("grant"))?
            .id();
        Ok(Floor {
            rt,
            etcd,
            lease,
            prefix: prefix.to_owned(),
            value: capi::blob(0xF100, BLOB),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    fn put_opts(&self) -> Option<PutOptions> {
        Some(PutOptions::new().with_lease(self.lease))
    }

    /// A put of 8 KiB with the lease; microseconds.
    fn put(&mut self, name: &str) -> R<f64> {
        let (key, value, opts) = (self.key(name), self.value.clone(), self.put_opts());
        let mut kv = self.etcd.kv_client();
        let start = Instant::now();
        self.rt
            .block_on(kv.put(key, value, opts))
            .map_err(etcd_err("put"))?;
        Ok(us(start.elapsed()))
    }

    /// A get of the 8 KiB value at `name`; microseconds.
    fn get(&mut self, name: &str) -> R<f64> {
        let key = self.key(name);
        let mut kv = self.etcd.kv_client();
        let start = Instant::now();
        let resp = self
            .rt
            .block_on(kv.get(key, None))
            .map_err(etcd_err("get"))?;
        let t = us(start.elapsed());
        let len = black_box(resp.kvs().first().map_or(0, |kv| kv.value().len()));
        if len != BLOB {
            return Err(format!("etcd-client get returned {len} bytes, not {BLOB}"));
        }
        Ok(t)
    }

    /// A watch on `name` from the get's revision + 1, created (and confirmed)
    /// before a put of 8 KiB: from just before the put to the event.
    fn put_to_watch(&mut self, name: &str) -> R<f64> {
        let (key, value, opts) = (self.key(name), self.value.clone(), self.put_opts());
        let mut kv = self.etcd.kv_client();
        let mut watch = self.etcd.watch_client();
        let rt = &self.rt;
        let revision = rt
            .block_on(kv.get(key.as_str(), None))
            .map_err(etcd_err("get"))?
            .header()
            .map_or(0, |h| h.revision());
        let from = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = rt
            .block_on(watch.watch(key.as_str(), Some(from)))
            .map_err(etcd_err("watch"))?;
        rt.block_on(await_created(&mut stream))?;
        std::thread::sleep(SETTLE);
        rt.block_on(async {
            let start = Instant::now();
            let (put, seen) = tokio::join!(
                kv.put(key.as_str(), value, opts),
                next_event(&mut stream, EventType::Put)
            );
            put.map_err(etcd_err("put"))?;
            Ok(us(seen?.saturating_duration_since(start)))
        })
    }

    /// A watch on the prefix `name`, from the current revision + 1.
    fn watch_prefix(&mut self, name: &str) -> R<WatchStream> {
        let key = self.key(name);
        let mut kv = self.etcd.kv_client();
        let mut watch = self.etcd.watch_client();
        let rt = &self.rt;
        let revision = rt
            .block_on(kv.get(key.as_str(), None))
            .map_err(etcd_err("get"))?
            .header()
            .map_or(0, |h| h.revision());
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = rt
            .block_on(watch.watch(key.as_str(), Some(opts)))
            .map_err(etcd_err("watch"))?;
        rt.block_on(await_created(&mut stream))?;
        Ok(stream)
    }

    /// Puts `name` (its event seen on `watch`), then deletes it: from just
    /// before the delete to its event on `watch`.
    fn delete_to_watch(&mut self, watch: &mut WatchStream, name: &str) -> R<f64> {
        let (key, value, opts) = (self.key(name), self.value.clone(), self.put_opts());
        let mut kv = self.etcd.kv_client();
        let rt = &self.rt;
        rt.block_on(async {
            kv.put(key.as_str(), value, opts)
                .await
                .map_err(etcd_err("put"))?;
            next_event(watch, EventType::Put).await
        })?;
        std::thread::sleep(SETTLE);
        rt.block_on(async {
            let start = Instant::now();
            let (del, seen) = tokio::join!(
                kv.delete(key.as_str(), None),
                next_event(watch, EventType::Delete)
            );
            del.map_err(etcd_err("delete"))?;
            Ok(us(seen?.saturating_duration_since(start)))
        })
    }

    /// Puts `name` under a lease of its own (its event seen on `watch`), then
    /// revokes that lease: from just before the revoke to the delete event.
    fn revoke_to_watch(&mut self, watch: &mut WatchStream, name: &str) -> R<f64> {
        let (key, value) = (self.key(name), self.value.clone());
        let mut kv = self.etcd.kv_client();
        let mut leases = self.etcd.lease_client();
        let rt = &self.rt;
        let lease = rt.block_on(async {
            let lease = leases
                .grant(60, None)
                .await
                .map_err(etcd_err("grant"))?
                .id();
            let opts = PutOptions::new().with_lease(lease);
            kv.put(key.as_str(), value, Some(opts))
                .await
                .map_err(etcd_err("put"))?;
            next_event(watch, EventType::Put).await?;
            Ok::<_, String>(lease)
        })?;
        std::thread::sleep(SETTLE);
        rt.block_on(async {
            let start = Instant::now();
            let (revoked, seen) =
                tokio::join!(leases.revoke(lease), next_event(watch, EventType::Delete));
            revoked.map_err(etcd_err("revoke"))?;
            Ok(us(seen?.saturating_duration_since(start)))
        })
    }

    /// Revokes the floor's lease: its keys go with it.
    fn finish(&mut self) {
        let mut leases = self.etcd.lease_client();
        let _ = self.rt.block_on(leases.revoke(self.lease));
    }
}

/// Waits for the response that confirms a watch was created.
async fn await_created(stream: &mut WatchStream) -> R<()> {
    let msg = stream
        .message()
        .await
        .map_err(etcd_err("watch"))?
        .ok_or("etcd-client watch: the stream ended before it was created")?;
    if msg.created() && !msg.canceled() {
        Ok(())
    } else {
        Err(format!(
            "etcd-client watch not created: {}",
            msg.cancel_reason()
        ))
    }
}
