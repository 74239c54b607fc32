//! Latency samples, their percentiles, and the rows of the report.

use serde_json::{json, Value};

/// Samples of one operation, in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub samples_us: Vec<f64>,
}

impl Series {
    pub fn new(samples_us: Vec<f64>) -> Series {
        Series { samples_us }
    }

    pub fn push(&mut self, us: f64) {
        self.samples_us.push(us);
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn pct(&self, p: f64) -> f64 {
        if self.samples_us.is_empty() {
            return f64::NAN;
        }
        let mut v = self.samples_us.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1]
    }

    pub fn p50(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn summary(&self) -> Value {
        json!({
            "n": self.samples_us.len(),
            "p50_us": self.pct(50.0),
            "p90_us": self.pct(90.0),
            "p99_us": self.pct(99.0),
            "max_us": self.pct(100.0),
        })
    }
}

/// One measured operation: ours, its floor (raw etcd-client), and NIXL's
/// built-in exchange where it has an equivalent.
#[derive(Debug, Clone)]
pub struct Row {
    /// "single" or "cluster3".
    pub setup: String,
    pub op: String,
    pub ours: Series,
    pub floor: Option<(String, Series)>,
    /// The same floor with the client on a multi-thread runtime, driven from
    /// the caller's thread as the library is.
    pub floor_mt: Option<Series>,
    pub nixl: Option<Series>,
}

impl Row {
    pub fn new(setup: &str, op: &str, ours: Series) -> Row {
        Row {
            setup: setup.into(),
            op: op.into(),
            ours,
            floor: None,
            floor_mt: None,
            nixl: None,
        }
    }

    pub fn floor(mut self, what: &str, s: Series) -> Row {
        self.floor = Some((what.into(), s));
        self
    }

    pub fn floor_mt(mut self, s: Series) -> Row {
        self.floor_mt = Some(s);
        self
    }

    pub fn to_json(&self) -> Value {
        json!({
            "setup": self.setup,
            "op": self.op,
            "ours": self.ours.summary(),
            "ours_samples_us": self.ours.samples_us,
            "floor_op": self.floor.as_ref().map(|f| f.0.clone()),
            "floor": self.floor.as_ref().map(|f| f.1.summary()),
            "floor_samples_us": self.floor.as_ref().map(|f| f.1.samples_us.clone()),
            "ratio_p50": self.floor.as_ref().map(|f| self.ours.p50() / f.1.p50()),
            "floor_multi_thread": self.floor_mt.as_ref().map(Series::summary),
            "ratio_multi_thread_p50": self.floor_mt.as_ref().map(|f| self.ours.p50() / f.p50()),
            "nixl_builtin": self.nixl.as_ref().map(Series::summary),
            "nixl_samples_us": self.nixl.as_ref().map(|s| s.samples_us.clone()),
        })
    }
}

/// Operation names shared by the parts of the benchmark.
pub const OP_REGISTER: &str = "register 8 KiB (lease-bound put)";
pub const OP_COLD_LOOKUP: &str = "cold lookup 8 KiB (not cached)";
pub const OP_WARM_LOOKUP: &str = "warm lookup 8 KiB (cached)";
pub const OP_DISCOVERY: &str = "discovery: register -> blocked wait returns";
pub const OP_INVAL_UNREGISTER: &str = "invalidation: unregister -> REMOVED event";
pub const OP_INVAL_CLOSE: &str = "invalidation: close -> REMOVED event";
