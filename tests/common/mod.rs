//! Shared test harness for the integration tests: a private etcd per test,
//! `etcdctl` access, unique key namespaces and the C example programs.
//!
//! Use it from a file of `tests/integration/` with `use crate::common;`, or
//! from a test binary of its own (`tests/FILE.rs`) with `mod common;`.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Default etcd binary; `$NIXL_ETCD_TEST_ETCD_BIN` overrides it.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";
/// Default etcdctl binary; `$NIXL_ETCD_TEST_ETCDCTL_BIN` overrides it.
pub const DEFAULT_ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long to wait for etcd to report healthy after a start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Interval between two health polls.
pub const READY_POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when etcd cannot bind its ports.
pub const START_ATTEMPTS: u32 = 5;

/// The etcd binary: `$NIXL_ETCD_TEST_ETCD_BIN`, else [`DEFAULT_ETCD_BIN`].
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("NIXL_ETCD_TEST_ETCD_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN))
}

fn etcdctl_bin() -> PathBuf {
    std::env::var_os("NIXL_ETCD_TEST_ETCDCTL_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCDCTL_BIN))
}

/// Two distinct free loopback ports. Both listeners are held at the same time
/// so the two numbers differ, then released for etcd to take.
fn free_port_pair() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let pa = a.local_addr().unwrap().port();
    let pb = b.local_addr().unwrap().port();
    (pa, pb)
}

/// A free loopback port (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 `GET /health` against `127.0.0.1:port`. True only when the
/// whole exchange finishes within `timeout` and the body reports
/// `"health":"true"`.
pub fn health_ok(port: u16, timeout: Duration) -> bool {
    http_get(port, "/health", timeout).is_some_and(|body| body.contains("\"health\":\"true\""))
}

/// The body of one HTTP/1.0 `GET path` against `127.0.0.1:port`, if the whole
/// exchange finishes within `timeout`.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    let remaining = |d: Instant| d.saturating_duration_since(Instant::now());
    let left = remaining(deadline);
    if left.is_zero() {
        return None;
    }
    let _ = stream.set_write_timeout(Some(left));
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return None;
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The value of a Prometheus metric in a `/metrics` body, summed over its
/// label sets; 0 if absent.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The last `max_bytes` of a file, for diagnostics.
fn file_tail(path: &Path, max_bytes: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max_bytes);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

fn send_signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// Builder for [`EtcdServer`].
#[derive(Debug, Clone, Default)]
pub struct EtcdServerBuilder {
    max_request_bytes: Option<u64>,
    name: Option<String>,
    extra_args: Vec<String>,
}

impl EtcdServerBuilder {
    /// etcd's `--max-request-bytes` (default 1.5 MiB in etcd itself).
    pub fn max_request_bytes(mut self, n: u64) -> Self {
        self.max_request_bytes = Some(n);
        self
    }

    /// Member name (`--name`); defaults to `nixl-etcd-test`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Any further etcd flag, passed as is.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    /// Start the server on free loopback ports and wait until it is healthy.
    /// Panics (with the tail of etcd's log) if it cannot be started.
    pub fn start(self) -> EtcdServer {
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let (client_port, peer_port) = free_port_pair();
            let dir = tempfile::Builder::new()
                .prefix("nixl-etcd-test-")
                .tempdir()
                .expect("create temp dir for etcd");
            let mut server = EtcdServer {
                child: None,
                dir,
                client_port,
                peer_port,
                name: self
                    .name
                    .clone()
                    .unwrap_or_else(|| "nixl-etcd-test".to_string()),
                max_request_bytes: self.max_request_bytes,
                extra_args: self.extra_args.clone(),
                paused: false,
            };
            match server.launch_and_wait() {
                Ok(()) => return server,
                Err(err) => {
                    let tail = file_tail(&server.log_path(), 4000);
                    let clash = tail.contains("address already in use");
                    failures.push(format!(
                        "attempt {attempt} (client port {client_port}, peer port {peer_port}): {err}"
                    ));
                    server.kill();
                    if clash && attempt < START_ATTEMPTS {
                        continue;
                    }
                    panic!(
                        "etcd failed to start ({}):\n{}\n--- tail of {} ---\n{}",
                        etcd_bin().display(),
                        failures.join("\n"),
                        server.log_path().display(),
                        tail
                    );
                }
            }
        }
        unreachable!("the last start attempt either returns or panics")
    }
}

/// A private single-member etcd on free loopback ports with its own temp data
/// dir. Dropping it kills the process and removes the directory.
pub struct EtcdServer {
    child: Option<Child>,
    // Declared after `child`; `Drop` kills the process before the fields drop,
    // so the directory is removed only once etcd is gone.
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    name: String,
    max_request_bytes: Option<u64>,
    extra_args: Vec<String>,
    paused: bool,
}

impl EtcdServer {
    pub fn builder() -> EtcdServerBuilder {
        EtcdServerBuilder::default()
    }

    /// Start with default settings.
    pub fn start() -> EtcdServer {
        EtcdServerBuilder::default().start()
    }

    /// `http://127.0.0.1:P`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// JSON fragment for the library's options: `"endpoints":"http://127.0.0.1:P"`.
    pub fn endpoints_json(&self) -> String {
        format!("\"endpoints\":\"{}\"", self.endpoint())
    }

    /// A whole options object: endpoints, namespace, then `extra` (more
    /// `"key":value` pairs without a leading comma; may be empty).
    pub fn options_json(&self, namespace: &str, extra: &str) -> String {
        let mut s = format!(
            "{{{},\"namespace\":\"{}\"",
            self.endpoints_json(),
            namespace
        );
        if !extra.trim().is_empty() {
            s.push(',');
            s.push_str(extra);
        }
        s.push('}');
        s
    }

    /// A library client of this server in `namespace` (`extra` as for
    /// [`EtcdServer::options_json`]).
    pub fn client(&self, namespace: &str, extra: &str) -> nixl_etcd::Client {
        let opts = self.options_json(namespace, extra);
        nixl_etcd::Client::open(nixl_etcd::Config::from_sources(|_| None, Some(&opts)).unwrap())
            .unwrap()
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// A metric of this etcd's `/metrics`, e.g. the watch streams open
    /// (`etcd_debugging_mvcc_watch_stream_total`) or the watches on them
    /// (`etcd_debugging_mvcc_watcher_total`). Panics if etcd does not answer.
    pub fn metric(&self, name: &str) -> f64 {
        let body = http_get(self.client_port, "/metrics", Duration::from_secs(10))
            .expect("etcd answers GET /metrics");
        metric(&body, name)
    }

    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// Process id of the running etcd (panics if it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd is not running").id()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's stdout and stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The last `max_bytes` of etcd's log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        file_tail(&self.log_path(), max_bytes)
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// True while the process exists and has not exited (a paused one counts).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// One health probe with the given timeout.
    pub fn is_healthy(&self, timeout: Duration) -> bool {
        health_ok(self.client_port, timeout)
    }

    /// Block until `/health` answers true, or panic after [`READY_TIMEOUT`].
    pub fn wait_healthy(&mut self) {
        if let Err(e) = self.wait_ready() {
            panic!(
                "etcd not healthy: {e}\n--- tail of etcd log ---\n{}",
                self.log_tail(4000)
            );
        }
    }

    /// SIGKILL and reap. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGTERM and reap (SIGKILL after 10 s if etcd does not exit).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            if matches!(child.try_wait(), Ok(None)) {
                send_signal(pid, libc::SIGTERM);
                if self.paused {
                    // A stopped process handles SIGTERM only once continued.
                    send_signal(pid, libc::SIGCONT);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            } else {
                let _ = child.wait();
            }
        }
        self.paused = false;
    }

    /// Start again with the same data dir and ports (killing first if still
    /// running), and wait until healthy. Panics if it does not come up.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_err = String::new();
        // The old sockets may linger a moment; a bind clash here is retried.
        for _ in 0..START_ATTEMPTS {
            match self.launch_and_wait() {
                Ok(()) => return,
                Err(e) => {
                    last_err = e;
                    let clash = self.log_tail(2000).contains("address already in use");
                    self.kill();
                    if !clash {
                        break;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "etcd failed to restart on ports {}/{}: {last_err}\n--- tail of etcd log ---\n{}",
            self.client_port,
            self.peer_port,
            self.log_tail(4000)
        );
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self) {
        let pid = self.pid();
        assert!(
            send_signal(pid, libc::SIGSTOP),
            "SIGSTOP to etcd {pid} failed"
        );
        self.paused = true;
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) {
        let pid = self.pid();
        assert!(
            send_signal(pid, libc::SIGCONT),
            "SIGCONT to etcd {pid} failed"
        );
        self.paused = false;
    }

    fn command(&self) -> Command {
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{}={}", self.name, peer_url))
            .arg("--initial-cluster-state")
            .arg("new");
        if let Some(n) = self.max_request_bytes {
            cmd.arg("--max-request-bytes").arg(n.to_string());
        }
        cmd.args(&self.extra_args);
        // Keep settings of the calling environment (ETCD_* variables) out of
        // the private server.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(&key);
            }
        }
        cmd
    }

    fn launch_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log2 = log.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", etcd_bin().display()))?;
        self.child = Some(child);
        self.paused = false;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        return Err(format!("etcd exited early with {status}"));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("waitpid: {e}")),
                }
            } else {
                return Err("etcd is not running".to_string());
            }
            if health_ok(self.client_port, Duration::from_millis(500)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no healthy answer from {}/health within {:?}",
                    self.endpoint(),
                    READY_TIMEOUT
                ));
            }
            thread::sleep(READY_POLL);
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                send_signal(child.id(), libc::SIGCONT);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run `etcdctl` (API v3) against `server` with `args`.
pub fn etcdctl(server: &EtcdServer, args: &[&str]) -> Output {
    Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(server.endpoint())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", etcdctl_bin().display()))
}

/// `etcdctl` that must succeed; returns its stdout. Panics with stderr otherwise.
pub fn etcdctl_ok(server: &EtcdServer, args: &[&str]) -> String {
    let out = etcdctl(server, args);
    assert!(
        out.status.success(),
        "etcdctl {:?} failed ({}):\nstdout: {}\nstderr: {}",
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A key namespace no other test (or test process) uses:
/// `/nixl-etcd-test/<tag>-<pid>-<counter>`.
pub fn unique_namespace(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/nixl-etcd-test/{}-{}-{}", tag, std::process::id(), n)
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The dir holding the `libnixl_etcd.so` built with this test binary:
/// `target/<profile>/deps/`, beside the test binary. `cargo test` builds the
/// cdylib there and (unlike `cargo build`) does not copy it up to
/// `target/<profile>/`, where an older build's copy may lie.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("cannot derive the deps dir from {}", exe.display()));
    if deps.join("libnixl_etcd.so").exists() {
        return deps;
    }
    // Benches and examples live elsewhere; fall back to the profile dir.
    deps.parent().map(Path::to_path_buf).unwrap_or(deps)
}

/// Path of the shared library under test.
pub fn cdylib_path() -> PathBuf {
    target_dir().join("libnixl_etcd.so")
}

/// Build `c_examples/` against the library in [`target_dir`] (once per
/// process) and return the `c_examples` dir. Panics with make's output if the
/// build fails.
pub fn build_c_examples() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let dir = repo_root().join("c_examples");
        let libdir = target_dir();
        let out = Command::new("make")
            .arg("-C")
            .arg(&dir)
            .arg(format!("LIBDIR={}", libdir.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run make: {e}"))?;
        if out.status.success() {
            Ok(dir)
        } else {
            Err(format!(
                "make -C {} LIBDIR={} failed ({}); library present: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                dir.display(),
                libdir.display(),
                out.status,
                cdylib_path().exists(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match result {
        Ok(dir) => dir.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns whether
/// it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Poll `cond` every 10 ms for `period`; returns false the moment it fails.
/// For what must stay true (keys a live writer keeps), not a sleep.
pub fn holds_for(period: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        if !cond() {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Read a whole file as text (for logs written by child processes).
pub fn read_to_string_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// `etcdctl` (API v3) against `endpoints` (comma-separated URLs), for a cluster
/// or a chosen subset of its members.
pub fn etcdctl_endpoints(endpoints: &str, args: &[&str]) -> Output {
    Command::new(etcdctl_bin())
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", etcdctl_bin().display()))
}

/// `n` distinct free loopback ports: every listener is held until all are
/// bound, then all are released for etcd to take.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdServer {
    /// Spawns etcd without waiting for `/health`: a cluster member cannot be
    /// healthy before a quorum of its peers runs.
    fn spawn_only(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("open {}: {e}", self.log_path().display()))?;
        let log2 = log.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", etcd_bin().display()))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// This member's id as etcd reports it and the leader it knows, from
    /// `etcdctl endpoint status` (None if it does not answer within 1 s).
    fn member_and_leader(&self) -> Option<(u64, u64)> {
        let out = etcdctl(
            self,
            &[
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "1s",
                "endpoint",
                "status",
                "-w",
                "json",
            ],
        );
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = v.as_array()?.first()?.get("Status")?;
        let member = status.get("header")?.get("member_id")?.as_u64()?;
        let leader = status.get("leader")?.as_u64()?;
        Some((member, leader))
    }
}

/// A private etcd cluster of N members on free loopback ports, each with its
/// own temp data dir, bootstrapped with `--initial-cluster` listing every
/// member, a unique `--initial-cluster-token` and `--initial-cluster-state
/// new`. Members are [`EtcdServer`]s: [`member`](Self::member) gives each one's
/// whole API (pid, log, stop, ...). Dropping the cluster kills every member.
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
    token: String,
}

impl EtcdCluster {
    /// Starts `n` members and waits until every one answers `/health` true
    /// (a leader is elected). Panics, with the members' logs, if it cannot.
    pub fn start(n: usize) -> EtcdCluster {
        assert!(n >= 1, "a cluster needs at least one member");
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            let token = format!(
                "nixl-etcd-test-{}-{}-{}",
                std::process::id(),
                CLUSTERS.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            );
            let ports = free_ports(2 * n);
            let names: Vec<String> = (0..n).map(|i| format!("member{i}")).collect();
            let initial_cluster = (0..n)
                .map(|i| format!("{}=http://127.0.0.1:{}", names[i], ports[2 * i + 1]))
                .collect::<Vec<_>>()
                .join(",");
            let members = (0..n)
                .map(|i| EtcdServer {
                    child: None,
                    dir: tempfile::Builder::new()
                        .prefix("nixl-etcd-cluster-")
                        .tempdir()
                        .expect("create temp dir for etcd"),
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    name: names[i].clone(),
                    max_request_bytes: None,
                    // `command()` names only the member itself in
                    // `--initial-cluster`; etcd takes the last value of a
                    // repeated flag, so these list the whole cluster.
                    extra_args: vec![
                        "--initial-cluster".into(),
                        initial_cluster.clone(),
                        "--initial-cluster-token".into(),
                        token.clone(),
                    ],
                    paused: false,
                })
                .collect();
            let mut cluster = EtcdCluster { members, token };
            match cluster.launch_all() {
                Ok(()) => return cluster,
                Err(err) => {
                    let logs = cluster.logs(3000);
                    let clash = logs.contains("address already in use");
                    failures.push(format!("attempt {attempt} (ports {ports:?}): {err}"));
                    drop(cluster);
                    if clash && attempt < START_ATTEMPTS {
                        continue;
                    }
                    panic!(
                        "etcd cluster of {n} failed to start ({}):\n{}\n{logs}",
                        etcd_bin().display(),
                        failures.join("\n")
                    );
                }
            }
        }
        unreachable!("the last start attempt either returns or panics")
    }

    fn launch_all(&mut self) -> Result<(), String> {
        for m in self.members.iter_mut() {
            m.spawn_only()?;
        }
        self.wait_all_healthy()
    }

    /// Blocks until every running member answers `/health` true, or fails
    /// after [`READY_TIMEOUT`] (or as soon as a member exits).
    pub fn wait_all_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut all = true;
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("member {i} exited early with {status}"));
                    }
                    all &= health_ok(m.client_port, Duration::from_millis(500));
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not every member answered /health true within {READY_TIMEOUT:?}"
                ));
            }
            thread::sleep(READY_POLL);
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The cluster's `--initial-cluster-token`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Every member's client URL, comma-separated (`VLLM_NIXL_ETCD_ENDPOINTS`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(EtcdServer::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs of the members in `which`, comma-separated.
    pub fn endpoints_of(&self, which: &[usize]) -> String {
        which
            .iter()
            .map(|&i| self.members[i].endpoint())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A whole options object for the library: every endpoint, `namespace`,
    /// then `extra` (more `"key":value` pairs, no leading comma; may be empty).
    pub fn options_json(&self, namespace: &str, extra: &str) -> String {
        let mut s = format!(
            "{{\"endpoints\":\"{}\",\"namespace\":\"{}\"",
            self.endpoints(),
            namespace
        );
        if !extra.trim().is_empty() {
            s.push(',');
            s.push_str(extra);
        }
        s.push('}');
        s
    }

    /// A library client of the whole cluster in `namespace` (`extra` as for
    /// [`EtcdServer::options_json`]).
    pub fn client(&self, namespace: &str, extra: &str) -> nixl_etcd::Client {
        let opts = self.options_json(namespace, extra);
        nixl_etcd::Client::open(nixl_etcd::Config::from_sources(|_| None, Some(&opts)).unwrap())
            .unwrap()
    }

    pub fn member(&self, i: usize) -> &EtcdServer {
        &self.members[i]
    }

    pub fn member_mut(&mut self, i: usize) -> &mut EtcdServer {
        &mut self.members[i]
    }

    /// SIGKILL member `i` (its data dir stays for [`restart`](Self::restart)).
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its ports and data dir and waits until it
    /// is healthy, which needs a quorum of the cluster running; to bring back
    /// several members, use [`restart_no_wait`](Self::restart_no_wait) on each
    /// and then [`wait_all_healthy`](Self::wait_all_healthy).
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }

    /// Starts member `i` again (killing it first if running) without waiting.
    pub fn restart_no_wait(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.kill();
        if let Err(e) = m.spawn_only() {
            panic!("restart member {i}: {e}\n{}", m.log_tail(4000));
        }
    }

    /// SIGSTOP member `i`.
    pub fn pause(&mut self, i: usize) {
        self.members[i].pause();
    }

    /// SIGCONT member `i`.
    pub fn resume(&mut self, i: usize) {
        self.members[i].resume();
    }

    /// The index of the member that is leader now, as the first running,
    /// unpaused member that answers `etcdctl endpoint status` reports it
    /// (None if none answers or no leader is known).
    pub fn leader_index(&mut self) -> Option<usize> {
        let mut ids: Vec<Option<u64>> = vec![None; self.members.len()];
        let mut leader = None;
        for (m, id) in self.members.iter_mut().zip(ids.iter_mut()) {
            if m.is_paused() || !m.is_running() {
                continue;
            }
            if let Some((me, lead)) = m.member_and_leader() {
                *id = Some(me);
                if lead != 0 {
                    leader.get_or_insert(lead);
                }
            }
        }
        let leader = leader?;
        ids.iter().position(|id| *id == Some(leader))
    }

    /// Polls [`leader_index`](Self::leader_index) until a leader is known.
    pub fn wait_leader(&mut self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.leader_index() {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tail of every member's log, labelled, for diagnostics.
    pub fn logs(&self, max_bytes_each: usize) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                format!(
                    "--- member {i} ({}) ---\n{}",
                    m.endpoint(),
                    m.log_tail(max_bytes_each)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The keys under `prefix`, as etcdctl lists them.
pub fn keys_under(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    etcdctl_ok(etcd, &["get", "--prefix", prefix, "--keys-only"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// etcd's gRPC proxy (`etcd grpc-proxy start`, the same binary) in front of
/// `endpoints`, on a free loopback port. Killed on drop.
pub struct GrpcProxy {
    child: Option<Child>,
    port: u16,
    backends: String,
    log: PathBuf,
}

impl GrpcProxy {
    /// Starts the proxy and waits until a read through it answers.
    pub fn start(backends: &str) -> GrpcProxy {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "nixl-etcd-grpc-proxy-{}-{port}.log",
            std::process::id()
        ));
        let mut p = GrpcProxy {
            child: None,
            port,
            backends: backends.to_string(),
            log,
        };
        p.restart();
        p
    }

    /// `http://127.0.0.1:PORT`, for a client's endpoints.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the proxy (SIGKILL, as sudden as a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (killing it first if it runs) and
    /// waits until a read through it answers.
    pub fn restart(&mut self) {
        self.kill();
        let backends = self
            .backends
            .split(',')
            .map(|e| e.trim_start_matches("http://"))
            .collect::<Vec<_>>()
            .join(",");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the proxy's log");
        let child = Command::new(etcd_bin())
            .args(["grpc-proxy", "start", "--endpoints", &backends])
            .arg("--listen-addr")
            .arg(format!("127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} grpc-proxy: {e}", etcd_bin().display()));
        self.child = Some(child);
        let endpoint = self.endpoint();
        let up = wait_until(Duration::from_secs(30), || {
            etcdctl_endpoints(
                &endpoint,
                &["get", "--command-timeout=2s", "nixl-etcd-probe"],
            )
            .status
            .success()
        });
        assert!(
            up,
            "the gRPC proxy did not answer at {endpoint}; its log:\n{}",
            read_to_string_lossy(&self.log)
        );
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
