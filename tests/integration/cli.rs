//! The `nixl-etcd` command against a private etcd: list, get (and --raw),
//! watch, wait's exit statuses, health on a cluster with a member down,
//! list --nixl, --json everywhere.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::{etcdctl_ok, free_port, unique_namespace, EtcdCluster, EtcdServer};
use base64::Engine as _;
use nixl_etcd::{Client, Config};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nixl-etcd");

/// Exit statuses, as `nixl-etcd --help` documents them.
const EXIT_NOT_FOUND: i32 = 3;
const EXIT_TIMEOUT: i32 = 4;
const EXIT_UNREACHABLE: i32 = 5;
const EXIT_DEGRADED: i32 = 6;
const EXIT_USAGE: i32 = 2;

/// The command with a clean environment pointing at `endpoints` and `ns`.
fn cmd(endpoints: &str, ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("VLLM_") || k.starts_with("NIXL_ETCD") || k == "RUST_LOG" {
            c.env_remove(&k);
        }
    }
    c.env("VLLM_NIXL_ETCD_ENDPOINTS", endpoints)
        .env("VLLM_NIXL_ETCD_NAMESPACE", ns)
        .env("VLLM_NIXL_ETCD_TIMEOUT", "10")
        .args(args)
        .stdin(Stdio::null());
    c
}

fn run(endpoints: &str, ns: &str, args: &[&str]) -> Output {
    cmd(endpoints, ns, args).output().expect("run nixl-etcd")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(endpoints: &str, ns: &str, args: &[&str]) -> String {
    let out = run(endpoints, ns, args);
    assert!(
        out.status.success(),
        "nixl-etcd {args:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json_of(endpoints: &str, ns: &str, args: &[&str]) -> Value {
    let out = ok(endpoints, ns, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
}

/// A failing run: its exit status, and its stderr as one line.
fn fails(endpoints: &str, ns: &str, args: &[&str]) -> (i32, String) {
    let out = run(endpoints, ns, args);
    let err = text(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: the error is not one line:\n{err}"
    );
    assert!(err.starts_with("nixl-etcd: "), "{err}");
    (out.status.code().expect("exited, not killed"), err)
}

fn client(endpoints: &str, ns: &str, extra: &str) -> Client {
    let mut opts = format!(r#"{{"endpoints":"{endpoints}","namespace":"{ns}","host":"node-a""#);
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    opts.push('}');
    Client::open(Config::from_sources(|_| None, Some(&opts)).unwrap()).unwrap()
}

/// Binary metadata with NUL bytes, different per seed.
fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % 7 == 0 {
                0
            } else {
                (i as u8).wrapping_mul(31) ^ seed
            }
        })
        .collect()
}

#[test]
fn list_shows_engines_ranks_and_whether_each_engine_is_complete() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let ns = unique_namespace("cli-list");
    let a = client(&ep, &ns, r#""world_size":2,"lease_ttl_s":30"#);
    a.register("prefill", 0, &blob(1, 8192)).unwrap();
    a.register("prefill", 1, &blob(2, 8192)).unwrap();
    let b = client(&ep, &ns, r#""world_size":3"#);
    b.register("decode", 0, &blob(3, 100)).unwrap();
    // Keys under an engine that are not rank records are skipped.
    etcdctl_ok(&etcd, &["put", &format!("{ns}/prefill/rank_0/part_1"), "x"]);
    etcdctl_ok(&etcd, &["put", &format!("{ns}/prefill/notes"), "x"]);

    let out = ok(&ep, &ns, &["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[0].starts_with("ENGINE"), "{out}");
    let row = |engine: &str, rank: u32| {
        lines
            .iter()
            .find(|l| {
                l.starts_with(&format!("{engine} "))
                    && l.split_whitespace().nth(1) == Some(&rank.to_string())
            })
            .unwrap_or_else(|| panic!("no row for {engine} {rank}:\n{out}"))
            .to_string()
    };
    let p0 = row("prefill", 0);
    assert!(
        p0.contains("node-a") && p0.contains(a.incarnation()),
        "{p0}"
    );
    assert!(
        p0.contains("8.0 KiB") && p0.trim_end().ends_with("yes"),
        "{p0}"
    );
    let d0 = row("decode", 0);
    assert!(
        d0.contains("100 B") && d0.contains("no (missing 1,2)"),
        "{d0}"
    );
    assert!(lines[4].starts_with("2 engines, 3 ranks"), "{out}");

    let v = json_of(&ep, &ns, &["list", "--json"]);
    assert_eq!(v["namespace"], ns.as_str());
    let engines = v["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{v}");
    let decode = &engines[0];
    assert_eq!(decode["engine_id"], "decode");
    assert_eq!(decode["complete"], false);
    assert_eq!(decode["missing_ranks"], serde_json::json!([1, 2]));
    let prefill = &engines[1];
    assert_eq!(prefill["complete"], true);
    assert_eq!(prefill["world_size"], 2);
    let ranks = prefill["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["rank"], i);
        assert_eq!(r["host"], "node-a");
        assert_eq!(r["pid"], std::process::id());
        assert_eq!(r["metadata_len"], 8192);
        assert_eq!(r["incarnation"], a.incarnation());
        assert_eq!(r["lease_id"], a.lease_id());
        let ttl = r["lease_ttl_s"].as_i64().unwrap();
        assert!((1..=30).contains(&ttl), "{r}");
    }

    // One engine only.
    let v = json_of(&ep, &ns, &["list", "decode", "--json"]);
    assert_eq!(v["engines"].as_array().unwrap().len(), 1);
    let out = ok(&ep, &ns, &["list", "nothing"]);
    assert!(out.contains("engine nothing has no ranks"), "{out}");

    // A value that is not a record is listed as unreadable, not fatal.
    etcdctl_ok(&etcd, &["put", &format!("{ns}/broken/rank_0"), "{oops"]);
    let out = ok(&ep, &ns, &["list", "broken"]);
    assert!(out.contains("broken  0     unreadable: not JSON"), "{out}");
    let v = json_of(&ep, &ns, &["list", "broken", "--json"]);
    assert!(v["engines"][0]["ranks"][0]["error"]
        .as_str()
        .unwrap()
        .starts_with("not JSON"));
    etcdctl_ok(&etcd, &["del", &format!("{ns}/broken/rank_0")]);

    // A closed client's records are gone.
    b.close().unwrap();
    let v = json_of(&ep, &ns, &["list", "--json"]);
    assert_eq!(v["engines"].as_array().unwrap().len(), 1, "{v}");
    a.close().unwrap();
}

#[test]
fn get_shows_one_record_and_raw_writes_the_metadata_byte_for_byte() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let ns = unique_namespace("cli-get");
    let c = client(&ep, &ns, r#""world_size":4"#);
    let md = blob(9, 45_000);
    c.register("prefill", 3, &md).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("md.bin");
    let out = ok(
        &ep,
        &ns,
        &["get", "prefill", "3", "--raw", file.to_str().unwrap()],
    );
    assert_eq!(std::fs::read(&file).unwrap(), md, "--raw differs");
    for want in [
        "engine:      prefill".to_owned(),
        "rank:        3".to_owned(),
        format!("key:         {ns}/prefill/rank_3"),
        "host:        node-a".to_owned(),
        format!("incarnation: {}", c.incarnation()),
        "world size:  4".to_owned(),
        "metadata:    45000 bytes: 00 ".to_owned(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }

    // --raw - : the bytes on stdout, the readable record on stderr.
    let o = run(&ep, &ns, &["get", "prefill", "3", "--raw", "-"]);
    assert!(o.status.success());
    assert_eq!(o.stdout, md);
    assert!(text(&o.stderr).contains("45000 bytes"));

    let v = json_of(&ep, &ns, &["--json", "get", "prefill", "3"]);
    assert_eq!(v["incarnation"], c.incarnation());
    assert_eq!(v["lease_id"], c.lease_id());
    assert_eq!(v["metadata_len"], 45_000);
    let b64 = v["metadata_base64"].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        md
    );

    let (code, err) = fails(&ep, &ns, &["get", "prefill", "2"]);
    assert_eq!(code, EXIT_NOT_FOUND, "{err}");
    assert!(err.contains("not found") && err.contains("check"), "{err}");
    let (code, err) = fails(&ep, &ns, &["get", "a/b", "0"]);
    assert_eq!(code, EXIT_USAGE, "{err}");
    c.close().unwrap();
}

/// A running `watch`, its stdout lines delivered over a channel.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watcher {
    fn start(ep: &str, ns: &str, args: &[&str]) -> Watcher {
        let mut child = cmd(ep, ns, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Armed once it says so on stderr.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "watch exited early");
            if line.contains("watching") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        let (tx, rx) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Watcher { child, lines: rx }
    }

    /// The next `n` lines (generous bound so that a lost event fails the
    /// test rather than hanging it).
    fn take(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                self.lines
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|_| panic!("event {} of {n} never came", i + 1))
            })
            .collect()
    }

    fn stop(mut self, sig: libc::c_int) -> Vec<String> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
        let status = self.child.wait().unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "watch did not exit cleanly: {status}"
        );
        self.lines.try_iter().collect()
    }
}

#[test]
fn watch_prints_each_change_in_order_and_stops_cleanly_on_signals() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let ns = unique_namespace("cli-watch");
    let first = client(&ep, &ns, "");
    first.register("other", 0, b"already here").unwrap();

    let all = Watcher::start(&ep, &ns, &["watch"]);
    let one = Watcher::start(&ep, &ns, &["watch", "prefill", "--json"]);
    let second = client(&ep, &ns, "");
    first.register("prefill", 0, &blob(1, 64)).unwrap();
    first.register("prefill", 0, &blob(2, 65)).unwrap();
    second.register("prefill", 0, &blob(3, 66)).unwrap();
    second.unregister("prefill", 0).unwrap();

    let lines = all.take(5);
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let mut w = l.split_whitespace().skip(1);
            (w.next().unwrap(), w.next().unwrap())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("ADDED", "other"),
            ("ADDED", "prefill"),
            ("UPDATED", "prefill"),
            ("REPLACED", "prefill"),
            ("REMOVED", "prefill"),
        ],
        "{lines:#?}"
    );
    assert!(lines[1].contains(&format!("incarnation={}", first.incarnation())));
    assert!(lines[1].contains("metadata=64") && lines[2].contains("metadata=65"));
    assert!(lines[3].contains(&format!("incarnation={}", second.incarnation())));
    assert!(lines[4].contains("rank=0 host=node-a"));
    assert!(all.stop(libc::SIGINT).is_empty());

    let events: Vec<Value> = one
        .take(4)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["ADDED", "UPDATED", "REPLACED", "REMOVED"]);
    assert!(events
        .iter()
        .all(|e| e["engine_id"] == "prefill" && e["rank"] == 0));
    assert_eq!(events[2]["metadata_len"], 66);
    let revisions: Vec<i64> = events
        .iter()
        .map(|e| e["revision"].as_i64().unwrap())
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    assert!(one.stop(libc::SIGTERM).is_empty());
    first.close().unwrap();
    second.close().unwrap();
}

#[test]
fn wait_exit_status_says_found_timed_out_or_unreachable() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let ns = unique_namespace("cli-wait");

    // Found: the wait starts first, the registration comes later.
    let waiter = cmd(
        &ep,
        &ns,
        &["wait", "prefill", "--rank", "1", "--timeout", "60"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let c = client(&ep, &ns, r#""world_size":2"#);
    c.register("prefill", 1, b"md").unwrap();
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("engine prefill rank 1 is registered"));

    // --all (the default) needs every rank of the world size.
    let (code, err) = fails(&ep, &ns, &["wait", "prefill", "--timeout", "0.5"]);
    assert_eq!(code, EXIT_TIMEOUT, "{err}");
    assert!(err.contains("missing rank(s) 0"), "{err}");
    c.register("prefill", 0, b"md").unwrap();
    let v = json_of(&ep, &ns, &["wait", "prefill", "--all", "--json"]);
    assert_eq!(v["world_size"], 2);
    assert_eq!(v["complete"], true);

    // Timed out.
    let (code, err) = fails(
        &ep,
        &ns,
        &["wait", "decode", "--rank", "0", "--timeout", "0.3"],
    );
    assert_eq!(code, EXIT_TIMEOUT, "{err}");
    assert!(err.contains("Timeout waiting for engine decode"), "{err}");

    // Unreachable: nothing listens on the port.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (code, err) = fails(
        &dead,
        &ns,
        &["wait", "prefill", "--rank", "0", "--timeout", "5"],
    );
    assert_eq!(code, EXIT_UNREACHABLE, "{err}");
    assert!(
        err.contains("ETCD connection failed") && err.contains(&dead),
        "{err}"
    );
    let (code, _) = fails(&dead, &ns, &["list"]);
    assert_eq!(code, EXIT_UNREACHABLE);
    c.close().unwrap();
}

#[test]
fn health_reports_a_stopped_member_unreachable_and_the_others_with_leader_and_version() {
    let mut cluster = EtcdCluster::start(3);
    let leader = cluster
        .wait_leader(Duration::from_secs(15))
        .expect("a leader");
    let down = (leader + 1) % 3;
    let eps = cluster.endpoints();
    let ns = unique_namespace("cli-health");

    let v = json_of(&eps, &ns, &["health", "--json"]);
    assert_eq!(v["healthy"], 3, "{v}");

    cluster.member_mut(down).stop();
    let out = run(&eps, &ns, &["health", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(EXIT_DEGRADED),
        "{}",
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], 2, "{v}");
    assert_eq!(v["total"], 3);
    let members = v["endpoints"].as_array().unwrap();
    let leader_id = members[leader]["member_id"].as_str().unwrap().to_owned();
    for (i, m) in members.iter().enumerate() {
        assert_eq!(m["endpoint"], cluster.member(i).endpoint());
        if i == down {
            assert_eq!(m["reachable"], false, "{m}");
            assert!(
                m["error"].as_str().unwrap().contains("Connection refused"),
                "{m}"
            );
        } else {
            assert_eq!(m["reachable"], true, "{m}");
            assert!(m["version"].as_str().unwrap().starts_with("3."), "{m}");
            assert_eq!(m["leader_id"], leader_id.as_str(), "{m}");
            assert_eq!(m["is_leader"], i == leader, "{m}");
            assert!(m["rtt_ms"].as_f64().unwrap() > 0.0, "{m}");
            assert_eq!(m["quorum"], true, "{m}");
        }
    }
    assert_eq!(v["leader_endpoint"], cluster.member(leader).endpoint());

    // The same for people: one row per endpoint.
    let out = run(&eps, &ns, &["health"]);
    assert_eq!(out.status.code(), Some(EXIT_DEGRADED));
    let t = text(&out.stdout);
    let row = |i: usize| {
        t.lines()
            .find(|l| l.starts_with(&format!("{} ", cluster.member(i).endpoint())))
            .unwrap_or_else(|| panic!("no row for member {i}:\n{t}"))
            .to_owned()
    };
    assert!(row(down).split_whitespace().nth(1) == Some("no"), "{t}");
    assert!(row(leader).contains("yes (this member)"), "{t}");
    assert!(t.contains("2 of 3 endpoints healthy"), "{t}");

    // One member left: it answers, but a linearizable read through it
    // cannot reach a quorum (even while it still calls itself leader).
    let last = (down + 1) % 3;
    cluster.member_mut((down + 2) % 3).stop();
    let out = run(&eps, &ns, &["health", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(EXIT_DEGRADED),
        "{}",
        text(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], 0, "{v}");
    let m = &v["endpoints"][last];
    assert_eq!(m["reachable"], true, "{m}");
    assert_eq!(m["quorum"], false, "{m}");
    assert_eq!(m["healthy"], false, "{m}");

    // Every member down: unreachable.
    cluster.member_mut(last).stop();
    let out = run(&eps, &ns, &["health"]);
    assert_eq!(out.status.code(), Some(EXIT_UNREACHABLE));
}

#[test]
fn list_nixl_shows_agents_and_marks_keys_without_a_lease() {
    let etcd = EtcdServer::start();
    let ep = etcd.endpoint();
    let ns = unique_namespace("cli-nixl");
    // Stock NIXL writes with no lease: marker and blob, default namespace.
    etcdctl_ok(&etcd, &["put", "/nixl/agents//stock/", ""]);
    etcdctl_ok(
        &etcd,
        &["put", "/nixl/agents//stock/metadata", "0123456789"],
    );
    // This library's publish: the same layout, under its lease.
    let c = client(&ep, &ns, "");
    c.publish_nixl("leased", None, &blob(4, 451)).unwrap();

    let out = ok(&ep, &ns, &["list", "--nixl"]);
    let row = |agent: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{agent} ")))
            .unwrap_or_else(|| panic!("no row for {agent}:\n{out}"))
            .to_owned()
    };
    let stock = row("stock");
    assert!(
        stock.contains("NO LEASE") && stock.contains("metadata (10 B)"),
        "{stock}"
    );
    let leased = row("leased");
    assert!(
        !leased.contains("NO LEASE") && leased.contains("metadata (451 B)"),
        "{leased}"
    );
    assert!(
        out.contains("2 agents under \"/nixl/agents/\", 1 without a lease"),
        "{out}"
    );

    let v = json_of(&ep, &ns, &["list", "--nixl", "--json"]);
    let agents = v["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 2, "{v}");
    let by = |name: &str| agents.iter().find(|a| a["agent"] == name).unwrap().clone();
    assert_eq!(by("stock")["no_lease"], true);
    assert_eq!(by("stock")["marker"], true);
    assert_eq!(by("leased")["no_lease"], false);
    assert_eq!(by("leased")["labels"][0]["lease_id"], c.lease_id());

    // Another NIXL namespace, from the flag.
    let out = ok(&ep, &ns, &["list", "--nixl", "--nixl-namespace", "/other"]);
    assert!(out.contains("no NIXL agents"), "{out}");
    c.close().unwrap();
}

#[test]
fn bad_command_lines_and_values_exit_2_with_a_hint() {
    let ns = unique_namespace("cli-usage");
    let ep = "http://127.0.0.1:1";
    for args in [
        &["frobnicate"][..],
        &["get", "e"],
        &["wait", "e", "--rank", "x"],
        &["list", "--raw", "f"],
        &["--options", "{", "list"],
    ] {
        let (code, err) = fails(ep, &ns, args);
        assert_eq!(code, EXIT_USAGE, "{args:?}: {err}");
        assert!(err.contains("--help"), "{err}");
    }
    // A bad environment value is reported as the library reports it.
    let out = cmd(ep, &ns, &["list"])
        .env("VLLM_NIXL_ETCD_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    assert!(text(&out.stderr).contains("VLLM_NIXL_ETCD_TIMEOUT=soon"));
    let help = ok(ep, &ns, &["--help"]);
    assert!(help.contains("Exit status:") && help.contains("5  etcd unreachable"));
}
