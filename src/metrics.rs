//! The library's own numbers, per process, in the OpenMetrics text format
//! (the Prometheus org's `prometheus-client`): registrations, lookups by
//! where they were answered, waits, events by kind, lease grants, losses and
//! re-grants, keep-alive failures, watch starts and restarts. Read with
//! [`text`] (C `nixl_etcd_metrics`, Python `nixl_etcd.metrics()`).
//!
//! Counters only go up; they are process-wide (every client of the process
//! adds to the same ones), as a scrape of the process expects.

use std::sync::OnceLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

const REGISTRATIONS: [&str; 2] = ["ok", "error"];
const LOOKUPS: [&str; 3] = ["cache", "etcd", "error"];
const WAITS: [&str; 3] = ["found", "timeout", "error"];
const EVENTS: [&str; 4] = ["added", "updated", "replaced", "removed"];

/// The labelled counters, made once: an increment on a hot path (a cached
/// lookup) is one atomic add, no label lookup.
struct Labelled {
    registrations: Vec<Counter>,
    lookups: Vec<Counter>,
    waits: Vec<Counter>,
    events: Vec<Counter>,
}

fn each(
    family: &Family<Labels, Counter>,
    label: &'static str,
    values: &[&'static str],
) -> Vec<Counter> {
    values
        .iter()
        .map(|v| family.get_or_create(&vec![(label, *v)]).clone())
        .collect()
}

/// Every metric of the library.
pub struct Metrics {
    registry: Registry,
    registrations: Family<Labels, Counter>,
    lookups: Family<Labels, Counter>,
    waits: Family<Labels, Counter>,
    wait_seconds: Histogram,
    events: Family<Labels, Counter>,
    pub lease_grants: Counter,
    pub lease_regrants: Counter,
    pub keepalive_failures: Counter,
    pub watch_starts: Counter,
    pub watch_restarts: Counter,
    counters: Labelled,
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Every metric, as an OpenMetrics text exposition (ends with `# EOF`).
pub fn text() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &get().registry);
    out
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("nixl_etcd");
        let m = Metrics {
            registrations: Family::default(),
            lookups: Family::default(),
            waits: Family::default(),
            // 0.1 ms to about 100 s.
            wait_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 11)),
            events: Family::default(),
            lease_grants: Counter::default(),
            lease_regrants: Counter::default(),
            keepalive_failures: Counter::default(),
            watch_starts: Counter::default(),
            watch_restarts: Counter::default(),
            registry: Registry::default(),
            counters: Labelled {
                registrations: Vec::new(),
                lookups: Vec::new(),
                waits: Vec::new(),
                events: Vec::new(),
            },
        };
        r.register(
            "registrations",
            "Records registered, by result (ok, error)",
            m.registrations.clone(),
        );
        r.register(
            "lookups",
            "Lookups, by where they were answered (cache, etcd) or error",
            m.lookups.clone(),
        );
        r.register(
            "waits",
            "Waits for a record, by result (found, timeout, error)",
            m.waits.clone(),
        );
        r.register(
            "wait_seconds",
            "How long waits took",
            m.wait_seconds.clone(),
        );
        r.register(
            "events",
            "Change events delivered to subscribers, by kind",
            m.events.clone(),
        );
        r.register(
            "lease_grants",
            "Leases granted (one per client, and re-grants)",
            m.lease_grants.clone(),
        );
        r.register(
            "lease_regrants",
            "Leases lost (etcd forgot them, or not renewed in time) and granted again, the \
             client's records re-registered",
            m.lease_regrants.clone(),
        );
        r.register(
            "keepalive_failures",
            "Lease renewals that failed (etcd unreachable) or answered late",
            m.keepalive_failures.clone(),
        );
        r.register(
            "watch_starts",
            "Watches started by the informer cache",
            m.watch_starts.clone(),
        );
        r.register(
            "watch_restarts",
            "Watches of the informer cache broken and started again (list, then watch)",
            m.watch_restarts.clone(),
        );
        let counters = Labelled {
            registrations: each(&m.registrations, "result", &REGISTRATIONS),
            lookups: each(&m.lookups, "answered", &LOOKUPS),
            waits: each(&m.waits, "result", &WAITS),
            events: each(&m.events, "kind", &EVENTS),
        };
        Metrics {
            registry: r,
            counters,
            ..m
        }
    }

    pub fn registration(&self, ok: bool) {
        self.counters.registrations[usize::from(!ok)].inc();
    }

    /// `answered`: "cache", "etcd" or "error".
    pub fn lookup(&self, answered: &'static str) {
        let i = LOOKUPS.iter().position(|a| *a == answered).unwrap_or(2);
        self.counters.lookups[i].inc();
    }

    /// `result`: "found", "timeout" or "error".
    pub fn wait(&self, result: &'static str, seconds: f64) {
        let i = WAITS.iter().position(|a| *a == result).unwrap_or(2);
        self.counters.waits[i].inc();
        self.wait_seconds.observe(seconds);
    }

    /// `kind`: "added", "updated", "replaced" or "removed".
    pub fn event(&self, kind: &'static str) {
        if let Some(i) = EVENTS.iter().position(|k| *k == kind) {
            self.counters.events[i].inc();
        }
    }
}
