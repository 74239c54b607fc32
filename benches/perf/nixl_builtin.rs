//! NIXL's built-in etcd exchange, measured by `nixl_builtin.py` (stock NIXL
//! agents in one Python process) against the same etcd as our rows.
//!
//! The interpreter is `python3`, or `$NIXL_PYTHON`. Without NIXL for that
//! interpreter, `run` returns an error and the report goes without the
//! NIXL column.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::stats::{self, Series};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/perf/nixl_builtin.py");

/// The script keeps itself to about a minute; this only stops a hung one.
const KILL_AFTER: Duration = Duration::from_secs(180);

/// The script's exit status when NIXL cannot be imported.
const EXIT_NO_NIXL: i32 = 3;

/// NIXL's built-in exchange, one series per transition (microseconds).
#[derive(Debug, Clone)]
pub struct NixlBuiltin {
    /// A peer waiting in `fetch_remote_metadata`: from `send_local_metadata`
    /// until the peer's `check_remote_metadata` is true.
    pub publish_to_visible: Series,
    /// The blob already in etcd: from a peer's `fetch_remote_metadata` until
    /// its `check_remote_metadata` is true.
    pub fetch_after_publish: Series,
    /// From `invalidate_local_metadata` until the peer's
    /// `check_remote_metadata` is false.
    pub invalidation: Series,
    /// How the script measured, in its own words.
    pub notes: String,
}

impl NixlBuiltin {
    /// NIXL's equivalent of one of our operations, where it has one.
    pub fn for_op(&self, op: &str) -> Option<Series> {
        match op {
            stats::OP_DISCOVERY => Some(self.publish_to_visible.clone()),
            stats::OP_INVAL_UNREGISTER | stats::OP_INVAL_CLOSE => Some(self.invalidation.clone()),
            _ => None,
        }
    }

    /// One line per series: n and percentiles, in milliseconds.
    pub fn summary(&self) -> String {
        [
            (
                "publish -> visible (peer waiting)",
                &self.publish_to_visible,
            ),
            ("fetch after publish", &self.fetch_after_publish),
            ("invalidation -> peer drops it", &self.invalidation),
        ]
        .iter()
        .map(|(what, s)| {
            format!(
                "  NIXL built-in {what}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms",
                s.samples_us.len(),
                s.pct(50.0) / 1e3,
                s.pct(90.0) / 1e3,
                s.pct(99.0) / 1e3
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// Runs `nixl_builtin.py` against `endpoint` for up to `n` samples (the
/// script may take fewer to stay within its time budget; it says so in the
/// notes) and parses what it prints.
pub fn run(endpoint: &str, n: usize) -> Result<NixlBuiltin, String> {
    let python = std::env::var("NIXL_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let mut child = Command::new(&python)
        .arg(SCRIPT)
        .arg(endpoint)
        .arg(n.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("cannot run {python} (set NIXL_PYTHON to the interpreter that has NIXL): {e}")
        })?;

    // Drain both pipes while waiting: NIXL can log a lot on stderr.
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > KILL_AFTER => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{SCRIPT} still running after {} s: killed",
                    KILL_AFTER.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for {python}: {e}")),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();

    if !status.success() {
        let why = last_lines(&stderr, 5);
        return Err(match status.code() {
            // The script's own line already says "NIXL is not installed for ...".
            Some(EXIT_NO_NIXL) => why.replace("nixl_builtin.py: ", ""),
            Some(code) => format!("{SCRIPT} failed (exit {code}): {why}"),
            None => format!("{SCRIPT} killed by a signal ({status}): {why}"),
        });
    }
    let nixl = parse(&stdout)?;
    eprintln!("perf: {}\n{}", nixl.notes, nixl.summary());
    Ok(nixl)
}

/// Parses the script's JSON object.
fn parse(stdout: &str) -> Result<NixlBuiltin, String> {
    // The object is the last non-empty line.
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or("nixl_builtin.py printed nothing")?;
    let v: Value = serde_json::from_str(line)
        .map_err(|e| format!("nixl_builtin.py printed no JSON object ({e}): {line:.200}"))?;
    let series = |key: &str| -> Result<Series, String> {
        let arr = v
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("nixl_builtin.py: no array \"{key}\""))?;
        arr.iter()
            .map(|x| x.as_f64().filter(|f| f.is_finite() && *f >= 0.0))
            .collect::<Option<Vec<f64>>>()
            .map(Series::new)
            .ok_or_else(|| {
                format!("nixl_builtin.py: \"{key}\" holds a value that is not a duration")
            })
    };
    let nixl = NixlBuiltin {
        publish_to_visible: series("publish_to_visible_us")?,
        fetch_after_publish: series("fetch_after_publish_us")?,
        invalidation: series("invalidation_us")?,
        notes: v
            .get("notes")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    };
    if nixl.publish_to_visible.samples_us.is_empty() {
        return Err("nixl_builtin.py returned no publish samples".into());
    }
    Ok(nixl)
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_scripts_object_and_maps_operations() {
        use super::{parse, stats};
        let out =
            "noise\n{\"publish_to_visible_us\":[3000.5,4000],\"fetch_after_publish_us\":[1500],\
                   \"invalidation_us\":[100000],\"notes\":\"n\"}\n";
        let n = parse(out).unwrap();
        assert_eq!(n.publish_to_visible.samples_us, vec![3000.5, 4000.0]);
        assert_eq!(n.notes, "n");
        assert!(n.for_op(stats::OP_DISCOVERY).is_some());
        assert_eq!(
            n.for_op(stats::OP_INVAL_CLOSE).unwrap().samples_us,
            vec![100000.0]
        );
        assert!(n.for_op(stats::OP_REGISTER).is_none());
        assert!(parse("").is_err());
        assert!(parse("{\"publish_to_visible_us\":[]}").is_err());
    }
}
