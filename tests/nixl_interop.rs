//! Interop with stock NIXL's built-in etcd exchange, process against process,
//! through a private etcd: a stock NIXL agent (tests/interop/stock_agent.py,
//! NIXL 1.5.x from PyPI, driven only by NIXL_ETCD_ENDPOINTS and
//! NIXL_ETCD_NAMESPACE) and an agent of ours (examples/nixl_interop.rs, whose
//! metadata goes only through this library's `publish_nixl` / `fetch_nixl` /
//! `unpublish_nixl`) find each other and move data, and the stock peer drops
//! our agent when we leave. What each test proves:
//!
//! (a) a stock agent's `fetch_remote_metadata` loads an agent published by
//!     this library, READs from it and gets the right bytes; the keys we wrote
//!     are exactly the two stock NIXL writes (marker + metadata), under a lease.
//! (b) this library's `fetch_nixl` returns what a stock agent published with
//!     `send_local_metadata`, and a READ through it gets the right bytes; the
//!     stock agent's own keys have the layout we reproduce in (a).
//! (c) a stock peer that loaded our agent invalidates it (its
//!     `check_remote_metadata` turns false) after our `unpublish`, our `close`,
//!     and a SIGKILL of our process (lease expiry); the three delays are
//!     printed and written to target/interop-timings.json.
//!
//! Needs the `nixl` feature, the example built (`cargo build --release
//! --features nixl --examples`), and `python3` on PATH with the `nixl-cu12`
//! (or `nixl-cu13`) wheel and numpy.
#![cfg(feature = "nixl")]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{etcdctl_ok, unique_namespace, wait_until, EtcdServer};
use serde_json::Value;

/// Bytes each publisher registers and each reader READs.
const SIZE: usize = 1 << 20;
/// Waits for a process's next line: generous, NIXL and UCX start slowly on a
/// loaded machine.
const STEP: Duration = Duration::from_secs(60);
/// The lease TTL of our client in the SIGKILL run.
const KILL_TTL_S: f64 = 2.0;

/// The tests run one at a time: several UCX agents per test share this
/// machine's cores, and the invalidation timings are cleaner alone.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The example binary, beside this test's profile dir (as tests/integration/nixl_e2e.rs).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = profile.join("examples/nixl_interop");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release --features nixl --examples`",
        bin.display()
    );
    bin
}

fn stock_script() -> PathBuf {
    common::repo_root().join("tests/interop/stock_agent.py")
}

/// `target/`, where the timings go (beside the profile dirs).
fn target_root() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| common::repo_root().join("target"))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// One NIXL namespace shared by both sides, in NIXL's style (trailing `/`,
/// so keys have NIXL's double slash like the default `/nixl/agents/`).
fn nixl_namespace() -> String {
    format!("{}/", unique_namespace("interop"))
}

/// A child process speaking JSON lines on stdout. Killed on drop, so a
/// failing test leaves no process behind.
struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: tempfile::NamedTempFile,
}

impl Proc {
    fn spawn(what: &str, mut cmd: Command) -> Proc {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr.reopen().unwrap()));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            what: what.to_owned(),
            child,
            stdin,
            lines,
            stderr,
        }
    }

    fn stderr_tail(&self) -> String {
        let text = common::read_to_string_lossy(self.stderr.path());
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// The next JSON line holding `key`, within `timeout`. Other JSON lines
    /// are skipped; an `error` line, an exit or the timeout fails the test.
    fn expect(&mut self, key: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no {key:?} within {timeout:?}\n--- stderr ---\n{}",
                    self.what,
                    self.stderr_tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "{}: exited ({status:?}) before printing {key:?}\n--- stderr ---\n{}",
                        self.what,
                        self.stderr_tail()
                    )
                }
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                panic!("{}: {e}\n--- stderr ---\n{}", self.what, self.stderr_tail());
            }
            if v.get(key).is_some() {
                return v;
            }
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin (the children's signal to finish) and waits for a
    /// successful exit.
    fn finish(mut self) {
        self.stdin.take();
        let deadline = Instant::now() + STEP;
        loop {
            match self.child.try_wait().unwrap() {
                Some(status) => {
                    assert!(
                        status.success(),
                        "{} exited with {status}\n--- stderr ---\n{}",
                        self.what,
                        self.stderr_tail()
                    );
                    return;
                }
                None if Instant::now() >= deadline => panic!(
                    "{} did not exit within {STEP:?} of its stdin closing\n--- stderr ---\n{}",
                    self.what,
                    self.stderr_tail()
                ),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// The stock agent: NIXL's built-in exchange only.
fn stock(etcd: &EtcdServer, ns: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(stock_script())
        .args(args)
        .env("NIXL_ETCD_ENDPOINTS", etcd.endpoint())
        .env("NIXL_ETCD_NAMESPACE", ns)
        .env("PYTHONUNBUFFERED", "1");
    Proc::spawn(&format!("stock agent {args:?}"), cmd)
}

/// Our agent: this library only. NIXL_ETCD_ENDPOINTS is removed so that the
/// libnixl loaded in the example runs no built-in exchange of its own; the
/// NIXL namespace comes from `nixl_ns_env` (NIXL_ETCD_NAMESPACE) and/or the
/// `--options` in `args`.
fn ours(etcd: &EtcdServer, nixl_ns_env: Option<&str>, args: &[&str]) -> Proc {
    let mut cmd = Command::new(example());
    cmd.args(args)
        .env_remove("NIXL_ETCD_ENDPOINTS")
        .env_remove("NIXL_ETCD_NAMESPACE")
        .env_remove("VLLM_NIXL_ETCD_TIMEOUT")
        .env_remove("VLLM_NIXL_ETCD_LEASE_TTL")
        .env("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint())
        .env(
            "VLLM_NIXL_ETCD_NAMESPACE",
            unique_namespace("interop-ranks"),
        );
    if let Some(ns) = nixl_ns_env {
        cmd.env("NIXL_ETCD_NAMESPACE", ns);
    }
    Proc::spawn(&format!("our agent {args:?}"), cmd)
}

/// One key as etcd holds it.
#[derive(Debug)]
struct Kv {
    key: String,
    value: Vec<u8>,
    lease: i64,
}

/// Every key under `prefix`, in key order (`etcdctl -w json`: exact bytes).
fn kvs_under(etcd: &EtcdServer, prefix: &str) -> Vec<Kv> {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap()
    };
    let json = etcdctl_ok(etcd, &["get", "--prefix", prefix, "-w", "json"]);
    let resp: Value = serde_json::from_str(json.trim()).unwrap();
    resp["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| Kv {
                    key: String::from_utf8(b64(&kv["key"])).unwrap(),
                    value: b64(&kv["value"]),
                    lease: kv["lease"].as_i64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// NIXL's keys for `agent`: the marker `ns + "/" + agent + "/"` and the full
/// metadata `ns + "/" + agent + "/metadata"`, in key order.
fn nixl_keys(ns: &str, agent: &str) -> [String; 2] {
    [format!("{ns}/{agent}/"), format!("{ns}/{agent}/metadata")]
}

fn keys_of(kvs: &[Kv]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

fn int(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}")) as usize
}

fn float(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn a_stock_agent_fetches_and_reads_an_agent_published_by_this_library() {
    let _one = serial();
    let etcd = EtcdServer::start();
    let ns = nixl_namespace();
    let agent = "ours-a";

    // Our side: namespace from NIXL's own variable, as a migrating engine has it.
    let mut pubr = ours(&etcd, Some(&ns), &["publish", agent, &SIZE.to_string()]);
    let ready = pubr.expect("ready", STEP);
    assert_eq!(ready["nixl_namespace"], ns.as_str(), "{ready}");
    let (addr, md_len, lease) = (
        int(&ready, "addr"),
        int(&ready, "md_len"),
        ready["lease"].as_i64().unwrap(),
    );

    // Exactly the keys stock NIXL writes for an agent (see (b)), nothing else
    // in the namespace, all under our client's lease.
    let all = kvs_under(&etcd, &ns);
    assert_eq!(keys_of(&all), nixl_keys(&ns, agent), "{all:?}");
    assert!(all[0].value.is_empty(), "the marker is not empty: {all:?}");
    assert_eq!(all[1].value.len(), md_len, "metadata length");
    assert!(
        all[1]
            .value
            .windows(agent.len())
            .any(|w| w == agent.as_bytes()),
        "the blob does not name the agent"
    );
    for kv in &all {
        assert!(
            lease != 0 && kv.lease == lease,
            "{kv:?} not under lease {lease}"
        );
    }
    let ttl = etcdctl_ok(&etcd, &["lease", "timetolive", &format!("{lease:x}")]);
    assert!(ttl.contains("remaining"), "lease {lease:x}: {ttl}");

    // The stock peer: fetch_remote_metadata + check_remote_metadata, then a READ.
    let mut peer = stock(
        &etcd,
        &ns,
        &[
            "fetch",
            "stock-a",
            agent,
            &addr.to_string(),
            &SIZE.to_string(),
        ],
    );
    let loaded = peer.expect("loaded", STEP);
    let verified = peer.expect("verified", STEP);
    assert_eq!(int(&verified, "verified"), SIZE);
    println!(
        "interop: stock fetch_remote_metadata of an agent published by nixl-etcd: {:.1} ms \
         (to check_remote_metadata true); READ of {SIZE} bytes verified",
        float(&loaded, "fetch_ms")
    );
    peer.finish();

    // Our client closes at EOF: its keys go with its lease. The stock
    // reader's own marker (written at agent creation, no lease) stays.
    pubr.finish();
    let marker = &nixl_keys(&ns, agent)[0];
    assert!(
        wait_until(Duration::from_secs(5), || kvs_under(&etcd, marker)
            .is_empty()),
        "our keys outlived our client"
    );
    println!(
        "interop: left in etcd after both exited: {:?}",
        keys_of(&kvs_under(&etcd, &ns))
    );
}

#[test]
fn this_library_fetches_and_reads_an_agent_published_by_stock_nixl() {
    let _one = serial();
    let etcd = EtcdServer::start();
    let ns = nixl_namespace();
    let agent = "stock-b";

    let mut publisher = stock(&etcd, &ns, &["publish", agent, &SIZE.to_string()]);
    let ready = publisher.expect("ready", STEP);
    let addr = int(&ready, "addr");
    assert_eq!(int(&ready, "len"), SIZE);

    // Stock NIXL's layout, the one publish_nixl reproduces: marker + metadata.
    // (NIXL's send is asynchronous: wait for the blob to land.)
    let prefix = &nixl_keys(&ns, agent)[0];
    assert!(
        wait_until(STEP, || kvs_under(&etcd, prefix).len() == 2),
        "stock NIXL wrote {:?}",
        keys_of(&kvs_under(&etcd, prefix))
    );
    let stock_kvs = kvs_under(&etcd, prefix);
    assert_eq!(keys_of(&stock_kvs), nixl_keys(&ns, agent));
    assert!(stock_kvs[0].value.is_empty(), "{stock_kvs:?}");
    println!(
        "interop: stock NIXL wrote {:?} ({} byte blob), leases {:?}",
        keys_of(&stock_kvs),
        stock_kvs[1].value.len(),
        stock_kvs.iter().map(|kv| kv.lease).collect::<Vec<_>>()
    );

    // Our side: namespace from the open option `nixl_namespace` only.
    let options = serde_json::json!({ "nixl_namespace": ns }).to_string();
    let mut reader = ours(
        &etcd,
        None,
        &[
            "fetch",
            agent,
            &addr.to_string(),
            &SIZE.to_string(),
            "--options",
            &options,
        ],
    );
    let done = reader.expect("verified", STEP);
    assert_eq!(int(&done, "verified"), SIZE);
    assert_eq!(done["remote"], agent);
    assert_eq!(int(&done, "md_len"), stock_kvs[1].value.len());
    println!(
        "interop: nixl-etcd fetch_nixl of an agent published by stock NIXL: {:.2} ms; \
         READ of {SIZE} bytes verified",
        float(&done, "fetched_ms")
    );
    reader.finish();
    publisher.finish();
}

/// How our side leaves in an invalidation run.
#[derive(Clone, Copy, Debug)]
enum Leave {
    Unpublish,
    Close,
    Kill,
}

impl Leave {
    fn name(self) -> &'static str {
        match self {
            Leave::Unpublish => "unpublish",
            Leave::Close => "close",
            Leave::Kill => "kill",
        }
    }

    /// How late the stock peer may notice. After a SIGKILL the lease expires
    /// one TTL after its last renewal (renewals come every TTL / 3), so the
    /// delay from the kill itself lies between about 2/3 of the TTL and the
    /// TTL, plus etcd's expiry check and NIXL's ~100 ms poll.
    fn bound_s(self) -> f64 {
        match self {
            Leave::Unpublish | Leave::Close => 2.0,
            Leave::Kill => KILL_TTL_S + 2.0,
        }
    }
}

struct Run {
    /// Seconds from our action to the stock peer's check turning false.
    invalidation_s: f64,
    /// The stock peer's fetch of our agent, ms.
    stock_fetch_ms: f64,
    /// How long our unpublish / close call took, ms (none for a kill).
    call_ms: Option<f64>,
}

/// One run: we publish, a stock peer fetches us, READs, then polls
/// check_remote_metadata while we leave by `how`.
fn invalidation_run(etcd: &EtcdServer, how: Leave) -> Run {
    let ns = nixl_namespace();
    let agent = format!("ours-{}", how.name());
    let mut args = vec![
        "publish".to_owned(),
        agent.clone(),
        SIZE.to_string(),
        "--options".to_owned(),
    ];
    args.push(match how {
        Leave::Kill => format!("{{\"lease_ttl_s\":{}}}", KILL_TTL_S as i64),
        _ => "{}".to_owned(),
    });
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut pubr = ours(etcd, Some(&ns), &args);
    let addr = int(&pubr.expect("ready", STEP), "addr");

    let mut peer = stock(
        etcd,
        &ns,
        &[
            "fetch",
            &format!("stock-{}", how.name()),
            &agent,
            &addr.to_string(),
            &SIZE.to_string(),
        ],
    );
    let stock_fetch_ms = float(&peer.expect("loaded", STEP), "fetch_ms");
    peer.expect("verified", STEP);
    // The peer polls every 5 ms from here on; let its marker watch settle.
    std::thread::sleep(Duration::from_millis(200));

    let (acted_at, call_ms) = match how {
        Leave::Unpublish => {
            pubr.send("unpublish");
            let v = pubr.expect("unpublished_at", STEP);
            (float(&v, "unpublished_at"), Some(float(&v, "call_ms")))
        }
        Leave::Close => {
            pubr.send("close");
            let v = pubr.expect("closed_at", STEP);
            (float(&v, "closed_at"), Some(float(&v, "call_ms")))
        }
        Leave::Kill => {
            let t = unix_now();
            pubr.kill();
            (t, None)
        }
    };
    let seen = peer.expect("invalidated_at", Duration::from_secs(30));
    let invalidation_s = float(&seen, "invalidated_at") - acted_at;
    assert!(
        invalidation_s <= how.bound_s(),
        "{}: the stock peer invalidated our agent after {invalidation_s:.3} s, over {} s",
        how.name(),
        how.bound_s()
    );
    // Our keys are gone; no one wrote them back.
    let marker = &nixl_keys(&ns, &agent)[0];
    assert!(
        kvs_under(etcd, marker).is_empty(),
        "{}: left {:?}",
        how.name(),
        keys_of(&kvs_under(etcd, marker))
    );
    peer.finish();
    match how {
        Leave::Kill => drop(pubr),
        _ => pubr.finish(),
    }
    Run {
        invalidation_s,
        stock_fetch_ms,
        call_ms,
    }
}

#[test]
fn a_stock_peer_invalidates_our_agent_after_unpublish_close_and_kill() {
    let _one = serial();
    let etcd = EtcdServer::start();
    let mut report = serde_json::Map::new();
    for how in [Leave::Unpublish, Leave::Close, Leave::Kill] {
        let run = invalidation_run(&etcd, how);
        let what = match how {
            Leave::Kill => format!("SIGKILL, lease TTL {KILL_TTL_S} s"),
            _ => format!(
                "{} call {:.2} ms",
                how.name(),
                run.call_ms.unwrap_or_default()
            ),
        };
        println!(
            "interop: invalidation after {}: {:.3} s ({what}; stock fetch {:.1} ms)",
            how.name(),
            run.invalidation_s,
            run.stock_fetch_ms
        );
        report.insert(
            how.name().to_owned(),
            serde_json::json!({
                "invalidation_s": run.invalidation_s,
                "bound_s": how.bound_s(),
                "call_ms": run.call_ms,
                "stock_fetch_ms": run.stock_fetch_ms,
            }),
        );
    }
    report.insert("kill_lease_ttl_s".to_owned(), KILL_TTL_S.into());
    report.insert("measured_at_unix_s".to_owned(), unix_now().into());
    let path = target_root().join("interop-timings.json");
    let text = serde_json::to_string_pretty(&Value::Object(report)).unwrap();
    std::fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!("interop: timings written to {}", path.display());
}
