#!/usr/bin/env python3
"""publish -> check_remote_metadata true, for a stock NIXL fetcher already waiting.

    python3 benches/nixl_store/bench.py [N] [--delay-ms D] [--out FILE]

One run, same machine, same clock per backend, stock NIXL 1.5 agents
(`nixl._api`, UCX backend) selecting their metadata backend from the
environment exactly as any NIXL program does:

  store        `nixl-etcd serve` (default --check-wait-ms) behind
               NIXL_TCPSTORE_ENDPOINT, etcd behind it
  store-cw0    the same with --check-wait-ms 0 (NIXL's 100 ms re-probe only):
               what the brief wait in CHECK buys
  store-cw200  the same with --check-wait-ms 200
  nixl-etcd    NIXL's own etcd backend (NIXL_ETCD_ENDPOINTS), same etcd
  torch        PyTorch's TCPStore server (torch.distributed.TCPStore, the
               server NIXL's backend was written against): only when torch is
               importable; it is not needed otherwise

Per backend, one process holds a waiter agent; for each sample a new publisher
agent is created, the waiter calls fetch_remote_metadata(name), and D ms later
(default 10, the wait-then-publish scenario of the NIXL etcd measurements) the
publisher calls send_local_metadata(); the time from just before that call until
the waiter's check_remote_metadata(name) is true is one sample (polled every
0.2 ms). Prints a markdown table (p50/p90/p99/max in ms, and p50/p90 ratios
against `store`). Needs etcd (/usr/bin/etcd) and target/release/nixl-etcd.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.0002
# (row, --check-wait-ms): the default first (the ratios are against it).
STORES = (("store", None), ("store-cw0", 0), ("store-cw200", 200))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(v, p):
    v = sorted(v)
    if not v:
        return float("nan")
    k = max(1, -(-len(v) * p // 100))
    return v[int(min(k, len(v))) - 1]


def sampler(n: int, delay_s: float) -> None:
    """Child mode: measures N samples with the backend its environment selects."""
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    obs = nixl_agent_config(enable_prog_thread=False,
                            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    pub_cfg = nixl_agent_config(enable_prog_thread=False)
    tag = uuid.uuid4().hex[:6]
    waiter = nixl_agent(f"waiter-{tag}", obs)
    out, missed = [], 0
    for i in range(-2, n):  # two warm-up samples
        name = f"pub-{tag}-{i + 2}"
        t_fetch = time.perf_counter()
        waiter.fetch_remote_metadata(name)
        pub = nixl_agent(name, pub_cfg)
        rest = delay_s - (time.perf_counter() - t_fetch)
        if rest > 0:
            time.sleep(rest)
        t0 = time.perf_counter()
        pub.send_local_metadata()
        deadline = t0 + 10
        ok = False
        while time.perf_counter() < deadline:
            if waiter.check_remote_metadata(name):
                ok = True
                break
            time.sleep(POLL_S)
        t1 = time.perf_counter()
        if i >= 0:
            if ok:
                out.append((t1 - t0) * 1000)
            else:
                missed += 1
        del pub
    json_out.write(json.dumps({"ms": out, "missed": missed}) + "\n")
    json_out.flush()


def run_child(env_extra, n, delay_ms):
    env = dict(os.environ)
    for k in ("NIXL_TCPSTORE_ENDPOINT", "NIXL_ETCD_ENDPOINTS", "NIXL_ETCD_NAMESPACE"):
        env.pop(k, None)
    env.update(env_extra)
    env.setdefault("NIXL_LOG_LEVEL", "WARN")
    r = subprocess.run([sys.executable, __file__, "--sample", str(n), str(delay_ms)],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       timeout=600, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"sampler failed ({r.returncode}) with {env_extra}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def add(results, label, r):
    cur = results.setdefault(label, {"ms": [], "missed": 0})
    cur["ms"] += r["ms"]
    cur["missed"] += r["missed"]


def start_etcd(tmp: Path):
    cport, pport = free_port(), free_port()
    c, p = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    proc = subprocess.Popen(
        [shutil.which("etcd") or "/usr/bin/etcd", "--name", "bench", "--data-dir", str(tmp / "d"),
         "--listen-client-urls", c, "--advertise-client-urls", c, "--listen-peer-urls", p,
         "--initial-advertise-peer-urls", p, "--initial-cluster", f"bench={p}",
         "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            with urllib.request.urlopen(c + "/health", timeout=1) as r:
                if b"true" in r.read():
                    return proc, c
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("etcd did not start")


def start_serve(endpoint, check_wait_ms):
    cli = os.environ.get("NIXL_ETCD_CLI") or str(REPO / "target" / "release" / "nixl-etcd")
    proc = subprocess.Popen(
        [cli, "serve", "--listen", "127.0.0.1:0", "--endpoints", endpoint,
         "--nixl-namespace", f"/bench-store/{uuid.uuid4().hex[:8]}",
         *([] if check_wait_ms is None else ["--check-wait-ms", str(check_wait_ms)])],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    return proc, line.split("NIXL_TCPSTORE_ENDPOINT=")[1].split()[0]


def start_torch_store():
    code = ("import sys, torch.distributed as d, datetime;"
            "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False,"
            " timeout=datetime.timedelta(seconds=600));"
            "print(s.port, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(proc.stdout.readline())
    return proc, f"127.0.0.1:{port}"


def main(argv):
    if argv[:1] == ["--sample"]:
        sampler(int(argv[1]), float(argv[2]) / 1000)
        return 0
    n, delay_ms, out_file = 50, 10.0, None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--delay-ms":
            delay_ms = float(args.pop(0))
        elif a == "--out":
            out_file = args.pop(0)
        else:
            n = int(a)
    tmp = Path(tempfile.mkdtemp(prefix="nixl-store-bench-"))
    etcd, endpoint = start_etcd(tmp)
    procs = [etcd]
    results = {}
    rounds = 3
    per = max(1, n // rounds)
    try:
        try:
            import torch.distributed  # noqa: F401
            have_torch = True
        except Exception:
            have_torch = False
        tstore = None
        if have_torch:
            tstore, tep = start_torch_store()
            procs.append(tstore)
        # Backends take turns, `rounds` times, so that a change in the load of
        # this shared machine falls on all of them alike.
        for _ in range(rounds):
            for label, cw in STORES:
                serve, ep = start_serve(endpoint, cw)
                procs.append(serve)
                add(results, label, run_child({"NIXL_TCPSTORE_ENDPOINT": ep}, per, delay_ms))
                serve.terminate()
                serve.wait(timeout=30)
            add(results, "nixl-etcd", run_child(
                {"NIXL_ETCD_ENDPOINTS": endpoint,
                 "NIXL_ETCD_NAMESPACE": f"/bench-nixl/{uuid.uuid4().hex[:8]}"}, per, delay_ms))
            if tstore is not None:
                add(results, "torch-tcpstore",
                    run_child({"NIXL_TCPSTORE_ENDPOINT": tep}, per, delay_ms))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["store"]["ms"]
    lines = [
        f"publish -> check_remote_metadata true, waiting stock NIXL fetcher, publish "
        f"{delay_ms:g} ms after the fetch; {per * rounds} samples per backend in {rounds} "
        f"interleaved rounds (ms); load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| backend | p50 | p90 | p99 | max | missed | p50 / store | p90 / store |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        v = r["ms"]
        lines.append(
            f"| {label} | {pct(v, 50):.2f} | {pct(v, 90):.2f} | {pct(v, 99):.2f} | "
            f"{max(v) if v else float('nan'):.2f} | {r['missed']} | "
            f"{pct(v, 50) / pct(base, 50):.1f}x | {pct(v, 90) / pct(base, 90):.1f}x |")
    if "torch-tcpstore" not in results:
        lines.append("")
        lines.append("torch is not installed: PyTorch's TCPStore server was not measured.")
    text = "\n".join(lines) + "\n"
    print(text)
    if out_file:
        Path(out_file).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
