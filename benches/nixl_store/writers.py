#!/usr/bin/env python3
"""`nixl-etcd serve` with many writers: publish -> visible latency, RSS and CPU
per writer, leases in etcd.

    python3 benches/nixl_store/writers.py [--writers 1000] [--agents 32]
        [--agents-per-process 1] [--samples 200] [--value-bytes 5120]
        [--delay-ms 5] [--remote] [--out FILE]

One run, one machine: a private etcd (free loopback ports, temporary data dir)
and `target/release/nixl-etcd serve --liveness connection --max-connections
4096 --max-writers 4096` with `lease_ttl_s` 10: every (address, PING nonce)
is a writer of its own, with a lease of its own, even from one process.

  1. Stock NIXL 1.5 agents (`nixl._api`, UCX backend, NIXL_TCPSTORE_ENDPOINT
     set) publish through the store with send_local_metadata(), each agent in
     a process of its own by default (--agents-per-process N puts N in one;
     each agent has its own store connection, but NIXL's PING nonce is its pid,
     so the agents of one process are one writer with one lease). The store's
     copy of each agent's key must equal its get_agent_metadata().
  2. --writers TCPStore connections from this process (asyncio): each one
     VALIDATE, PING (a distinct nonce), SET of `/nixl/agents/metadata/w{i}/
     NULL_AGENT` with a --value-bytes value (NIXL metadata sized), then idle
     and connected. Every value must read back exactly, through the store (GET)
     and in etcd, within 60 s.
  3. --samples publish -> visible samples with all of them connected: a reader
     connection sends CHECK of a key not set yet (the store holds it up to
     --check-wait-ms), --delay-ms later one of the writers SETs it
     (`/nixl/agents/s{k}/w{i}/NULL_AGENT`, a new value, writers taken in turn
     across the whole set); a sample is the time from just before the SET is
     sent until the reader has READY. A GET then must return exactly the bytes
     written. The same samples are also timed until the put reaches a watcher
     of etcd (one watch over etcd's HTTP gateway, read by a thread of this
     process), whose value must be the same bytes.

Measured on the store process: RSS (VmRSS) before any writer, after the agents
and after the idle writers (KiB per idle writer), CPU time (utime + stime) while
the writers connect and publish and during the samples; in etcd, the leases
(`etcdctl lease list`: writers + agent processes + the store's own) and the
keys; how long the store's SIGTERM (every lease revoked) takes, and its stderr
lines by level. The issue's goal, p99 <= 20 ms at 1,000 writers and <= 64 KiB
RSS per idle writer, is reported, never asserted. Exits non-zero if bytes read
back differ or a publish never becomes visible.

--remote: for a store without --liveness: listens on this host's non-loopback
address instead, where peers are writers by (address, nonce) as well.

The open-file limit is raised to its hard limit when it is below what the
writers need (the store inherits it).
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import REPO, pct, start_etcd  # noqa: E402

VALIDATE, SET, GET, CHECK, PING = 0, 1, 3, 5, 13
MAGIC = 0x3C85F7CE
READY = 0
# Writers' PING nonces: above any pid (pid_max <= 2^22), so no writer of this
# bench is taken for one of the agents' processes.
NONCE_BASE = 0x4000_0000
VISIBLE_LIMIT_S = 60.0
CHECK_MAX_KEYS = 1024
GOAL_P99_MS, GOAL_KIB_PER_WRITER = 20.0, 64.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _s(b: bytes) -> bytes:
    return struct.pack("=Q", len(b)) + b


class Conn:
    """One TCPStore connection (native byte order, as c10d)."""

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, nonce: int) -> "Conn":
        r, w = await asyncio.open_connection(host, port)
        c = cls(r, w)
        w.write(struct.pack("=BI", VALIDATE, MAGIC) + struct.pack("=BI", PING, nonce))
        got = struct.unpack("=I", await r.readexactly(4))[0]
        if got != nonce:
            raise RuntimeError(f"PING {nonce} answered {got}")
        return c

    async def set(self, key: bytes, value: bytes) -> None:
        self.w.write(bytes([SET]) + _s(key) + _s(value))
        await self.w.drain()

    async def get(self, key: bytes) -> bytes:
        self.w.write(bytes([GET]) + _s(key))
        n = struct.unpack("=Q", await self.r.readexactly(8))[0]
        return await self.r.readexactly(n)

    def send_check(self, keys) -> None:
        self.w.write(bytes([CHECK]) + struct.pack("=Q", len(keys)) + b"".join(_s(k) for k in keys))

    async def check_reply(self) -> int:
        return (await self.r.readexactly(1))[0]

    def close(self) -> None:
        self.w.close()


def md_key(label: str, agent: str) -> bytes:
    return f"/nixl/agents/{label}/{agent}/NULL_AGENT".encode()


def value_of(tag: str, size: int) -> bytes:
    head = tag.encode() + b":"
    return head + os.urandom(max(0, size - len(head)))


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def proc_rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def proc_fds_threads(pid: int) -> str:
    return f"{len(os.listdir(f'/proc/{pid}/fd'))} fds, {proc_status(pid, 'Threads')} threads"


def proc_cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    f = stat[stat.rindex(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def non_loopback_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 9))
        ip = s.getsockname()[0]
    if ip.startswith("127.") or ip == "0.0.0.0":
        raise SystemExit("--remote: this machine has no non-loopback address")
    return ip


def raise_nofile(need: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return f"open-file limit {soft} (enough)"
    new = hard if hard == resource.RLIM_INFINITY else max(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        raise SystemExit(f"open-file limit {new} (hard) is below the {need} this run needs")
    return f"open-file limit raised from {soft} to {new}"


# ---------------------------------------------------------------- agents ----

def agent_host(prefix: str, count: int) -> int:
    """Child mode: `count` stock NIXL agents in this process; each publishes,
    then all of them stay (and keep their store connections) until stdin
    closes. One JSON line on stdout: each agent's get_agent_metadata()."""
    sys.stdout = sys.stderr  # NIXL and UCX log to stdout; the line is marked
    from nixl._api import nixl_agent, nixl_agent_config

    cfg = nixl_agent_config(enable_prog_thread=False)
    agents = [nixl_agent(f"{prefix}-{i}", cfg) for i in range(count)]
    for a in agents:
        a.send_local_metadata()
    md = {a.name: a.get_agent_metadata().hex() for a in agents}
    sys.__stdout__.write("AGENTS " + json.dumps({"pid": os.getpid(), "metadata": md}) + "\n")
    sys.__stdout__.flush()
    sys.stdin.read()
    return 0


def start_agent_hosts(endpoint: str, total: int, per: int, tag: str):
    env = dict(os.environ)
    for k in ("NIXL_TCPSTORE_ENDPOINT", "NIXL_ETCD_ENDPOINTS", "NIXL_ETCD_NAMESPACE"):
        env.pop(k, None)
    env["NIXL_TCPSTORE_ENDPOINT"] = endpoint
    env.setdefault("NIXL_LOG_LEVEL", "WARN")
    procs, left, h = [], total, 0
    while left > 0:
        k = min(per, left)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--agent-host", f"a{tag}p{h}", str(k)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True))
        left, h = left - k, h + 1
    return procs


def read_agent_hosts(procs) -> dict:
    """Each host's AGENTS line -> {agent name: its metadata bytes}."""
    md = {}
    for p in procs:
        for line in p.stdout:
            if line.startswith("AGENTS "):
                md.update({n: bytes.fromhex(h)
                           for n, h in json.loads(line[7:])["metadata"].items()})
                break
        else:
            raise SystemExit(f"an agent process exited ({p.wait()}) before its agents published")
    return md


class EtcdWatch:
    """When each put under `prefix` reached a watcher of etcd, and its value:
    one watch over etcd's HTTP gateway (/v3/watch), read by a thread."""

    def __init__(self, endpoint: str, prefix: str):
        u = urllib.parse.urlsplit(endpoint)
        b64 = lambda t: base64.b64encode(t.encode()).decode()  # noqa: E731
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        self.seen, self.cond = {}, threading.Condition()
        self.conn = http.client.HTTPConnection(u.hostname, u.port)
        self.conn.request("POST", "/v3/watch", body=json.dumps({"create_request": {
            "key": b64(prefix), "range_end": b64(end), "filters": ["NODELETE"]}}))
        self.resp = self.conn.getresponse()
        first = json.loads(self.resp.readline())
        if not first.get("result", {}).get("created"):
            raise RuntimeError(f"etcd watch not created: {first}")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for line in self.resp:
                t = time.perf_counter()
                events = json.loads(line).get("result", {}).get("events", [])
                with self.cond:
                    for e in events:
                        kv = e["kv"]
                        self.seen[base64.b64decode(kv["key"]).decode()] = (t, kv.get("value", ""))
                    self.cond.notify_all()
        except (OSError, ValueError, http.client.HTTPException):
            pass  # closed at the end

    def wait(self, keys, limit_s: float):
        """{key: (arrival, value bytes)} once every key arrived, or None after limit_s."""
        with self.cond:
            if not self.cond.wait_for(lambda: all(k in self.seen for k in keys), limit_s):
                return None
            got = {k: self.seen[k] for k in keys}
        return {k: (t, base64.b64decode(v)) for k, (t, v) in got.items()}

    def close(self):
        # The reading thread holds the response's lock: end its read first.
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=10)
        self.conn.close()


# ----------------------------------------------------------------- store ----

def start_store(endpoint: str, ns: str, remote: bool, stderr_path: Path):
    cli = os.environ.get("NIXL_ETCD_CLI") or str(REPO / "target" / "release" / "nixl-etcd")
    if not Path(cli).exists():
        raise SystemExit(f"{cli} is missing: cargo build --release --all-features")
    help_text = subprocess.run([cli, "--help"], capture_output=True, text=True).stdout
    opts = json.dumps({"endpoints": endpoint, "namespace": f"/bench-writers/{uuid.uuid4().hex[:8]}",
                       "lease_ttl_s": 10})
    if remote:
        listen, extra = f"{non_loopback_ip()}:0", []
    elif "--liveness" in help_text:
        listen = "127.0.0.1:0"
        extra = ["--liveness", "connection", "--max-connections", "4096", "--max-writers", "4096"]
    else:
        raise SystemExit(f"{cli} has no --liveness (nixl-etcd --help): rebuild it, or run "
                         "with --remote (writers as remote peers)")
    cmd = [cli, "serve", "--listen", listen, *extra, "--options", opts, "--nixl-namespace", ns]
    err = open(stderr_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                            text=True)
    err.close()
    line = proc.stdout.readline()
    if "NIXL_TCPSTORE_ENDPOINT=" not in line:
        proc.kill()
        raise SystemExit(f"nixl-etcd serve did not start: {line!r}; its stderr: "
                         f"{stderr_path.read_text()[-2000:]}")
    ep = line.split("NIXL_TCPSTORE_ENDPOINT=")[1].split()[0]
    return proc, ep, cmd


def stop_store(proc) -> str:
    """SIGTERM (every lease revoked); how long it took and what it said."""
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "did not exit within 120 s of SIGTERM (killed)"
    said = "every lease revoked" if "every lease revoked" in rest else repr(rest.strip()[-200:])
    return f"exit {proc.returncode} {time.perf_counter() - t0:.2f} s after SIGTERM ({said})"


def etcdctl(endpoint: str, *args: str) -> str:
    r = subprocess.run(["etcdctl", "--endpoints", endpoint, *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})
    if r.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def lease_count(endpoint: str) -> int:
    return int(etcdctl(endpoint, "lease", "list").split()[1])  # "found N leases"


def key_count(endpoint: str, prefix: str) -> int:
    out = etcdctl(endpoint, "get", prefix, "--prefix", "--keys-only")
    return sum(1 for ln in out.splitlines() if ln.strip())


# ---------------------------------------------------------------- phases ----

async def wait_visible(reader: Conn, want: dict, what: str) -> None:
    """Until GET of every key returns exactly its bytes; exits on wrong bytes
    or after VISIBLE_LIMIT_S."""
    missing = dict(want)
    deadline = time.perf_counter() + VISIBLE_LIMIT_S
    while True:
        for k, v in list(missing.items()):
            got = await reader.get(k)
            if got == v:
                del missing[k]
            elif got:
                raise SystemExit(f"{what}: GET {k.decode()} returned {len(got)} bytes that differ "
                                 f"from the {len(v)} bytes written")
        if not missing:
            return
        if time.perf_counter() > deadline:
            names = ", ".join(k.decode() for k in list(missing)[:5])
            raise SystemExit(f"{what}: {len(missing)} key(s) not visible {VISIBLE_LIMIT_S:.0f} s "
                             f"after their SET, e.g. {names}")
        reader.send_check(list(missing)[:CHECK_MAX_KEYS])  # waits in the store
        await reader.check_reply()


async def connect_writers(host, port, n, size, parallel=64):
    sem = asyncio.Semaphore(parallel)
    conns, want = [None] * n, {}

    async def one(i):
        async with sem:
            c = await Conn.open(host, port, NONCE_BASE + i)
            key, val = md_key("metadata", f"w{i}"), value_of(f"w{i}", size)
            want[key] = val
            await c.set(key, val)
            conns[i] = c

    await asyncio.gather(*(one(i) for i in range(n)))
    return conns, want


def in_etcd(watch: EtcdWatch, want: dict, what: str) -> float:
    """When the last of `want` ({etcd key: bytes}) reached the watch; exits
    if one never does or its bytes in etcd differ."""
    got = watch.wait(list(want), VISIBLE_LIMIT_S)
    if got is None:
        missing = [k for k in want if k not in watch.seen]
        raise SystemExit(f"{what}: {len(missing)} key(s) not in etcd {VISIBLE_LIMIT_S:.0f} s "
                         f"after their SET, e.g. {', '.join(missing[:5])}")
    for k, (_, v) in got.items():
        if v != want[k]:
            raise SystemExit(f"{what}: {k} in etcd has {len(v)} bytes that differ from the "
                             f"{len(want[k])} bytes written")
    return max(t for t, _ in got.values())


async def sample(reader: Conn, writer: Conn, key: bytes, val: bytes, delay_s: float,
                 watch: EtcdWatch, etcd_key: str):
    """(ms until the waiting reader's READY, ms until the put reached etcd's watcher)."""
    reader.send_check([key])
    await reader.w.drain()
    await asyncio.sleep(delay_s)  # the CHECK is waiting in the store
    t0 = time.perf_counter()
    await writer.set(key, val)
    deadline = t0 + VISIBLE_LIMIT_S
    while await reader.check_reply() != READY:
        if time.perf_counter() > deadline:
            raise SystemExit(f"{key.decode()} not visible {VISIBLE_LIMIT_S:.0f} s after its SET")
        reader.send_check([key])
    ms = (time.perf_counter() - t0) * 1000
    got = await reader.get(key)
    if got != val:
        raise SystemExit(f"GET {key.decode()} after READY: {len(got)} bytes, not the "
                         f"{len(val)} bytes written")
    return ms, (in_etcd(watch, {etcd_key: val}, "sample") - t0) * 1000


async def measure(a, store, host, port, agent_md, etcd_endpoint, ns, watch, m):
    """Agents checked, writers connected and checked, samples, leases, then the
    store's SIGTERM with every connection still open."""
    pid, conns = store.pid, []
    try:
        reader = await Conn.open(host, port, NONCE_BASE - 1)
        conns.append(reader)
        await wait_visible(reader, {md_key("metadata", n): v for n, v in agent_md.items()},
                           "stock NIXL agents")
        m["rss_agents"] = proc_rss_kib(pid)
        cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
        writers, want = await connect_writers(host, port, a.writers, a.value_bytes)
        conns += writers
        await wait_visible(reader, want, "writers")
        m["publish_wall_s"] = time.perf_counter() - t0
        in_etcd_want = {f"{ns}/w{i}/metadata": want[md_key("metadata", f"w{i}")]
                        for i in range(a.writers)}
        m["publish_etcd_s"] = in_etcd(watch, in_etcd_want, "writers") - t0
        m["publish_cpu_s"] = proc_cpu_s(pid) - cpu0
        m["rss_writers"] = proc_rss_kib(pid)
        m["fds_writers"] = proc_fds_threads(pid)
        cpu0, ms, ms_etcd, total = proc_cpu_s(pid), [], [], a.samples + 2  # 2 warm-ups
        for k in range(total):
            i = k * a.writers // total % a.writers  # spread over all the writers
            label = f"s{k}"
            v, ve = await sample(reader, writers[i], md_key(label, f"w{i}"),
                                 value_of(f"{label}w{i}", a.value_bytes), a.delay_ms / 1000,
                                 watch, f"{ns}/w{i}/{label}")
            if k >= 2:
                ms.append(v)
                ms_etcd.append(ve)
        m["samples_cpu_s"] = proc_cpu_s(pid) - cpu0
        m["ms"], m["ms_etcd"] = ms, ms_etcd
        m["rss_end"] = proc_rss_kib(pid)
        m["leases"] = lease_count(etcd_endpoint)
        m["keys"] = key_count(etcd_endpoint, ns + "/")
        m["stop"] = stop_store(store)
    finally:
        for c in conns:
            c.close()


def report(a, m, cmd_line) -> str:
    v, ve, n = m["ms"], m["ms_etcd"], a.writers
    per_writer = (m["rss_writers"] - m["rss_agents"]) / n
    p99 = pct(v, 99)
    la = os.getloadavg()
    leases_want = n + m["agent_procs"] + 1
    keys_want = 2 * n + len(v) + 2 + 2 * a.agents

    def row(label, x):
        return (f"| {label} | {pct(x, 50):.2f} | {pct(x, 90):.2f} | {pct(x, 99):.2f} | "
                f"{max(x):.2f} |")

    lines = [
        f"`nixl-etcd serve` with {n} idle writers (one TCP connection each, "
        f"{a.value_bytes} B values) and {a.agents} stock NIXL agents ({m['agent_procs']} "
        f"processes) connected; {len(v)} publishes by writers taken in turn, each to a "
        f"CHECK waiting since {a.delay_ms:g} ms (ms); load average {la[0]:.1f} {la[1]:.1f} "
        f"{la[2]:.1f} at the end, {os.cpu_count()} CPUs",
        "",
        "| SET -> | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|",
        row("READY of the waiting CHECK (the store's copy)", v),
        row("the put at an etcd watcher (same samples)", ve),
        "",
        "| writers | agents | store RSS KiB / idle writer | store CPU ms / writer publish | "
        "store CPU ms / sample | leases in etcd | keys in etcd |",
        "|---|---|---|---|---|---|---|",
        f"| {n} | {a.agents} | {per_writer:.1f} | {m['publish_cpu_s'] * 1000 / n:.3f} | "
        f"{m['samples_cpu_s'] * 1000 / (len(v) + 2):.3f} | {m['leases']} (expected "
        f"{leases_want}) | {m['keys']} (expected {keys_want}) |",
        "",
        f"- store RSS (KiB): {m['rss_empty']} before any writer, {m['rss_agents']} with the "
        f"agents, {m['rss_writers']} with the {n} idle writers, {m['rss_end']} after the "
        f"samples; {m['fds_empty']} before any writer, {m['fds_writers']} with the idle "
        f"writers",
        f"- {n} writers connected and published: all readable through the store "
        f"{m['publish_wall_s']:.2f} s after the first connect, all in etcd after "
        f"{m['publish_etcd_s']:.2f} s (store CPU {m['publish_cpu_s']:.2f} s); samples: store "
        f"CPU {m['samples_cpu_s']:.2f} s",
        f"- leases expected: writers + agent processes + the store's own (NIXL's PING nonce "
        f"is its pid, so the agents of one process are one writer); keys: blob and marker "
        f"per writer and per agent, one per sample and warm-up",
        f"- goal (issue): p99 <= {GOAL_P99_MS:g} ms at 1,000 writers: "
        f"{'met' if p99 <= GOAL_P99_MS else 'NOT met'} ({p99:.2f}); <= "
        f"{GOAL_KIB_PER_WRITER:g} KiB store RSS per idle writer: "
        f"{'met' if per_writer <= GOAL_KIB_PER_WRITER else 'NOT met'} ({per_writer:.1f})",
        f"- store stop: {m['stop']}; store stderr lines: {m['stderr']}",
        f"- {m['nofile']}",
        f"- store: `{cmd_line}`",
    ]
    return "\n".join(lines) + "\n"


def summarize_stderr(path: Path) -> str:
    """Lines per level; the first few distinct lines that are not INFO."""
    levels, other, seen = {}, [], set()
    for ln in path.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        level = ln.split(":", 1)[0] if ln[:1].isupper() and ":" in ln[:8] else "other"
        levels[level] = levels.get(level, 0) + 1
        same = re.sub(r"[0-9a-f.:\[\]]*:\d+\b", "ADDR", ln)  # one line per kind
        if level != "INFO" and same not in seen:
            seen.add(same)
            other.append(ln)
    if not levels:
        return "empty"
    counts = ", ".join(f"{k} {c}" for k, c in sorted(levels.items()))
    return counts + "".join(f"; `{ln[:300]}`" for ln in other[:5]) + (
        f"; {len(other) - 5} more kinds" if len(other) > 5 else "")


def main(argv) -> int:
    if argv[:1] == ["--agent-host"]:
        return agent_host(argv[1], int(argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--agents-per-process", type=int, default=1)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--value-bytes", type=int, default=5120)
    ap.add_argument("--delay-ms", type=float, default=5.0,
                    help="from the reader's CHECK to the writer's SET")
    ap.add_argument("--remote", action="store_true",
                    help="listen on the non-loopback address, without --liveness")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.writers < 1 or a.samples < 1:
        ap.error("--writers and --samples must be at least 1")
    m = {"nofile": raise_nofile(a.writers + a.agents + 512)}
    # SIGTERM (e.g. timeout(1)) unwinds through the cleanup below, as SIGINT does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="nixl-store-writers-"))
    procs, hosts, watch = [], [], None
    ns = f"/bench-writers-nixl/{uuid.uuid4().hex[:8]}"
    try:
        etcd, endpoint = start_etcd(tmp)
        procs.append(etcd)
        store, ep, cmd = start_store(endpoint, ns, a.remote, tmp / "store.stderr")
        procs.append(store)
        host, port = ep.rsplit(":", 1)
        m["rss_empty"] = proc_rss_kib(store.pid)
        m["fds_empty"] = proc_fds_threads(store.pid)
        hosts = start_agent_hosts(ep, a.agents, a.agents_per_process, uuid.uuid4().hex[:6])
        procs += hosts
        m["agent_procs"] = len(hosts)
        agent_md = read_agent_hosts(hosts)
        watch = EtcdWatch(endpoint, ns + "/")
        asyncio.run(measure(a, store, host, int(port), agent_md, endpoint, ns, watch, m))
        m["stderr"] = summarize_stderr(tmp / "store.stderr")
        text = report(a, m, " ".join(cmd))
    except BaseException as e:
        if (tmp / "store.stderr").exists():
            print(f"store stderr lines: {summarize_stderr(tmp / 'store.stderr')}", file=sys.stderr)
        if isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
            raise SystemExit(f"the store closed a connection of this bench ({e!r}): "
                             "see its stderr lines above") from None
        raise
    finally:
        if watch is not None:
            watch.close()
        for p in hosts:
            if p.poll() is None:
                p.stdin.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
