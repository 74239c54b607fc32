//! The threaded C examples against a private etcd: heterogeneous tensor
//! parallelism (tp_prefill with one client per rank thread, tp_decode mapping
//! each local rank to its remote ranks) and a prefill rank restart seen by
//! the decode side (restart_demo).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;

use crate::common::{build_c_examples, keys_under, unique_namespace, EtcdServer};

fn env_for(etcd: &EtcdServer, ns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("VLLM_NIXL_USE_ETCD", "1".into()),
        ("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint()),
        ("VLLM_NIXL_ETCD_NAMESPACE", ns.into()),
        ("VLLM_NIXL_ETCD_TIMEOUT", "10".into()),
    ]
}

/// A running `tp_prefill` that has printed its "holding" line.
struct TpPrefill {
    child: Child,
    /// Yields the whole stdout once the process has exited.
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn start_tp_prefill(etcd: &EtcdServer, ns: &str, engine: &str, tp: u32) -> TpPrefill {
    let dir = build_c_examples();
    let mut child = Command::new(dir.join("tp_prefill"))
        .args([engine, &tp.to_string()])
        .envs(env_for(etcd, ns))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tp_prefill starts");
    let stderr = drain(child.stderr.take().unwrap());
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!(
                "tp_prefill exited ({status}) before holding:\n{seen}\n{}",
                stderr.join().unwrap()
            );
        }
        seen.push_str(&line);
        if line.contains("holding") {
            break;
        }
    }
    // Every rank announced itself before the holding line.
    for r in 0..tp {
        assert!(
            seen.contains(&format!("tp_prefill: rank {r} registered\n")),
            "{seen}"
        );
    }
    assert!(
        seen.contains(&format!(
            "tp_prefill: {tp} ranks of {engine} registered, holding"
        )),
        "{seen}"
    );
    // Keep draining stdout so the child never blocks on a full pipe.
    let stdout = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        seen + &rest
    });
    TpPrefill {
        child,
        stdout,
        stderr,
    }
}

/// SIGTERM, then the exit must be 0 with "tp_prefill: closed".
fn stop_tp_prefill(mut p: TpPrefill) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = p.child.wait().unwrap();
    let stdout = p.stdout.join().unwrap();
    let stderr = p.stderr.join().unwrap();
    assert!(status.success(), "tp_prefill: {status}\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("tp_prefill: got SIGTERM, closing"),
        "{stdout}"
    );
    assert!(stdout.ends_with("tp_prefill: closed\n"), "{stdout}");
}

fn run_tp_decode(etcd: &EtcdServer, ns: &str, engine: &str, local_tp: u32) -> Output {
    let dir = build_c_examples();
    Command::new(dir.join("tp_decode"))
        .args([engine, &local_tp.to_string(), "--timeout-ms", "10000"])
        .envs(env_for(etcd, ns))
        .stdin(Stdio::null())
        .output()
        .expect("tp_decode runs")
}

/// Local rank -> (remote ranks read, bytes verified), from lines
/// "tp_decode: local rank R read remote ranks [a,b] (N bytes verified)".
fn ranks_read(stdout: &str) -> BTreeMap<u32, (Vec<u32>, usize)> {
    let mut map = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("tp_decode: local rank ") else {
            continue;
        };
        let (rank, rest) = rest
            .split_once(" read remote ranks [")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (list, rest) = rest.split_once("] (").unwrap();
        let bytes = rest.strip_suffix(" bytes verified)").unwrap();
        let remote: Vec<u32> = list.split(',').map(|s| s.parse().unwrap()).collect();
        let prev = map.insert(rank.parse().unwrap(), (remote, bytes.parse().unwrap()));
        assert!(
            prev.is_none(),
            "local rank {rank} reported twice:\n{stdout}"
        );
    }
    map
}

/// tp_prefill REMOTE_TP ranks, tp_decode LOCAL_TP ranks; checks what each
/// local rank read against `expected(r)`.
fn heterogeneous(remote_tp: u32, local_tp: u32, expected: impl Fn(u32) -> Vec<u32>) {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("tp");
    let engine = format!("prefill_tp{remote_tp}");
    let prefill = start_tp_prefill(&etcd, &ns, &engine, remote_tp);
    assert_eq!(keys_under(&etcd, &ns).len(), remote_tp as usize);

    let out = run_tp_decode(&etcd, &ns, &engine, local_tp);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "tp_decode:\n{stdout}\n{stderr}");
    let read = ranks_read(&stdout);
    let want: BTreeMap<u32, (Vec<u32>, usize)> = (0..local_tp)
        .map(|r| {
            let remote = expected(r);
            let bytes = 8192 * remote.len();
            (r, (remote, bytes))
        })
        .collect();
    assert_eq!(read, want, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "tp_decode: all {local_tp} ranks verified against {remote_tp} remote ranks in "
        )),
        "{stdout}"
    );

    stop_tp_prefill(prefill);
    // Every rank's client revoked its lease.
    assert!(keys_under(&etcd, &ns).is_empty());
}

#[test]
fn decode_tp8_reads_one_rank_of_prefill_tp4_each() {
    heterogeneous(4, 8, |r| vec![r / 2]);
}

#[test]
fn decode_tp4_reads_two_ranks_of_prefill_tp8_each() {
    heterogeneous(8, 4, |r| vec![2 * r, 2 * r + 1]);
}

#[test]
fn tp_decode_reports_a_size_mismatch_with_exit_2() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("tp-mismatch");
    let prefill = start_tp_prefill(&etcd, &ns, "prefill_tp2", 2);
    let dir = build_c_examples();
    let out = Command::new(dir.join("tp_decode"))
        .args(["prefill_tp2", "2", "--size", "100", "--timeout-ms", "10000"])
        .envs(env_for(&etcd, &ns))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("got 8192 bytes, expected 100"), "{stderr}");
    stop_tp_prefill(prefill);
}

#[test]
fn restart_demo_sees_added_replaced_removed() {
    let etcd = EtcdServer::start();
    let ns = unique_namespace("restart");
    let dir = build_c_examples();
    let out = Command::new(dir.join("restart_demo"))
        .envs(env_for(&etcd, &ns))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let steps = [
        "restart_demo: EVENT kind=ADDED rank=0 ",
        "restart_demo: EVENT kind=REPLACED rank=0 ",
        "restart_demo: reloaded rank 0 from new incarnation ",
        "restart_demo: rank 0 still registered after A closed (version 2)",
        "restart_demo: EVENT kind=REMOVED rank=0 ",
    ];
    let mut at = 0;
    for step in steps {
        let pos = stdout[at..]
            .find(step)
            .unwrap_or_else(|| panic!("{step:?} missing or out of order:\n{stdout}"));
        at += pos + step.len();
    }
    assert_eq!(stdout.matches("EVENT kind=").count(), 3, "{stdout}");
    // Nothing left behind.
    assert!(keys_under(&etcd, &ns).is_empty());
}
