"""Benchmark: vLLM's NixlConnector handshake through etcd (nixl-etcd's plugin)
against vLLM's ZMQ side channel, same engines, same run.

Run with the vLLM venv's python (``bash .ci/install-vllm``) and the release
library built (``cargo build --release --all-features --lib``)::

    NIXL_ETCD_LIBRARY=target/release/libnixl_etcd.so \\
        .venv-vllm/bin/python benches/vllm_handshake.py [--handshakes 50] [--requests 10]

What runs: a private etcd; a tiny Llama made locally; three real vLLM CPU
engines: prefill P (VLLM_NIXL_USE_ETCD=1: publishes in etcd AND serves vLLM's
ZMQ side channel), decode D_etcd (VLLM_NIXL_USE_ETCD=1), decode D_warm (the same
with VLLM_NIXL_ETCD_PREWARM=1: it handshakes with P as P appears in etcd) and
decode D_zmq (VLLM_NIXL_USE_ETCD=0, stock).

1. Handshake, >= 50 times each way, in this process, against P's real payload:
   * ZMQ: what vLLM 0.32's ``_nixl_handshake`` does per remote rank: a new ZMQ
     context and REQ socket to P's side channel, ``(get_meta_msg, 0, 0)``, the
     reply; then decode + compatibility check + NIXL ``add_remote_agent``.
   * etcd: what the plugin does for a remote engine seen for the first time:
     one client per process (opened once, as in a vLLM worker), a cold
     ``lookup_record`` of an engine it never asked about (P's payload
     registered under N engine ids), then the same decode + check + add.
   "discovery" is the fetch alone; "handshake" adds the decode and the NIXL add.
2. Time to first token of a P/D request (prefill on P with max_tokens=1, then
   the decode with max_tokens=1 on D_etcd or D_warm, whose requests carry a dead
   side-channel address, or on D_zmq with P's real address), in turn; the
   first request of D_etcd and D_zmq includes its handshake, D_warm's does not
   (its pre-warm is waited for, by its log line, before the first request).

Prints a Markdown table (also written to --out when given).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from nixl_etcd import Client  # noqa: E402
from nixl_etcd.vllm.testing import Engine, free_port, make_tiny_llama  # noqa: E402


def start_etcd(work: Path) -> Tuple[subprocess.Popen, str]:
    cport, pport = free_port(), free_port()
    client, peer = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{pport}"
    proc = subprocess.Popen(
        [
            shutil.which("etcd") or "/usr/bin/etcd",
            "--name", "bench", "--data-dir", str(work / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}", "--log-level", "warn",
        ],
        stdout=open(work / "etcd.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=0.5) as r:
                if b'"health":"true"' in r.read():
                    return proc, client
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("etcd did not start")


def pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--handshakes", type=int, default=50)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--out")
    ap.add_argument("--pair", choices=["etcd", "warm", "zmq"],
                    help="only P and that one decode alive (no handshake section): its first "
                         "request's TTFT against the later ones, without the other engines' load")
    ap.add_argument("--debug-decodes", action="store_true",
                    help="the decodes log at DEBUG (vLLM's handshake timings), for a breakdown")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the engines' logs (their directory is printed) after a run that succeeded")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nixl-etcd-bench-"))
    etcd, endpoint = start_etcd(work)
    ns = "/vllm/nixl/agents"
    engines: List[Engine] = []
    succeeded = False
    try:
        model = make_tiny_llama(str(work / "tiny-llama"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_NIXL")}
        common = dict(
            base,
            VLLM_TARGET_DEVICE="cpu",
            VLLM_NIXL_ETCD_ENDPOINTS=endpoint,
            VLLM_NIXL_ETCD_NAMESPACE=ns,
            VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
            # Four busy-polling CPU engines on this machine's cores stall every
            # process for seconds: a lease of three times the longest stall
            # (docs/vllm.md, "Leases on busy hosts"), not the GPU hosts' 10 s.
            VLLM_NIXL_ETCD_LEASE_TTL="30",
        )
        p_port = free_port()
        decode = dict(common, VLLM_LOGGING_LEVEL="DEBUG") if a.debug_decodes else common
        specs = {
            "P": dict(engine_id="prefill_engine", role="kv_producer",
                      env=dict(common, VLLM_NIXL_USE_ETCD="1", VLLM_NIXL_SIDE_CHANNEL_PORT=str(p_port))),
            "D_etcd": dict(engine_id="decode_etcd", role="kv_consumer",
                           env=dict(decode, VLLM_NIXL_USE_ETCD="1",
                                    VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))),
            "D_warm": dict(engine_id="decode_warm", role="kv_consumer",
                           env=dict(decode, VLLM_NIXL_USE_ETCD="1", VLLM_NIXL_ETCD_PREWARM="1",
                                    # P only: not the bench's copies of P's payload.
                                    VLLM_NIXL_ETCD_PREWARM_ENGINES="prefill_engine",
                                    VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))),
            "D_zmq": dict(engine_id="decode_zmq", role="kv_consumer",
                          env=dict(decode, VLLM_NIXL_USE_ETCD="0",
                                   VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))),
        }
        if a.pair:
            specs = {k: v for k, v in specs.items() if k in ("P", f"D_{a.pair}")}
        with ThreadPoolExecutor(len(specs)) as pool:
            futs = {
                k: pool.submit(Engine, sys.executable, model, str(work / f"{k}.log"), **v)
                for k, v in specs.items()
            }
            named = {k: f.result() for k, f in futs.items()}
        engines.extend(named.values())
        print(f"engines up; logs in {work}", file=sys.stderr)

        if a.pair:
            table = render_pair(a.pair, ttfts(named, a.requests), a.requests)
        else:
            hs = handshakes(endpoint, ns, p_port, a.handshakes)
            table = render(hs, ttfts(named, a.requests), a.handshakes, a.requests)
        print(table)
        if a.out:
            Path(a.out).write_text(table + "\n")
        succeeded = True
        return 0
    finally:
        for e in engines:
            try:
                e.close(timeout=60)
            except Exception:
                e.kill()
        etcd.kill()
        etcd.wait()
        if succeeded and not a.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        elif succeeded:
            print(f"engines' logs kept in {work}", file=sys.stderr)
        else:
            # What went wrong is in the engines' logs: kept, and said where.
            logs = ", ".join(sorted(p.name for p in work.glob("*.log")))
            print(f"benchmark failed: its logs are kept in {work} ({logs})", file=sys.stderr)


def handshakes(endpoint: str, ns: str, p_port: int, n: int) -> Dict[str, Dict[str, List[float]]]:
    import msgspec
    import zmq
    from vllm.distributed.nixl_utils import NixlWrapper, nixl_agent_config
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        GET_META_MSG,
        NixlAgentMetadata,
        NixlHandshakePayload,
    )

    agent = NixlWrapper("bench-decode", nixl_agent_config(backends=["UCX"]))
    pdec = msgspec.msgpack.Decoder(NixlHandshakePayload)
    mdec = msgspec.msgpack.Decoder(NixlAgentMetadata)

    def add(payload: bytes, expect_hash: str) -> None:
        hp = pdec.decode(payload)
        assert hp.compatibility_hash == expect_hash
        md = mdec.decode(hp.agent_metadata_bytes)
        assert md.engine_id == "prefill_engine"
        name = agent.add_remote_agent(md.agent_metadata)
        agent.remove_remote_agent(name)

    publisher = Client(endpoints=endpoint, namespace=ns)
    reader = Client(endpoints=endpoint, namespace=ns)
    real = publisher.lookup_record("prefill_engine", 0).metadata
    expect = pdec.decode(real).compatibility_hash
    for i in range(n):
        publisher.register(f"bench_copy_{i}", 0, real)

    out: Dict[str, Dict[str, List[float]]] = {
        "zmq": {"discovery": [], "handshake": []},
        "etcd": {"discovery": [], "handshake": []},
    }
    path = f"tcp://127.0.0.1:{p_port}"
    for i in range(n):
        # ZMQ, as vLLM 0.32's _nixl_handshake (a context and a REQ socket per call).
        t0 = time.perf_counter()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.connect(path)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.send(msgspec.msgpack.encode((GET_META_MSG, 0, 0)))
        payload = sock.recv_multipart()[0]
        ctx.destroy(linger=0)
        t1 = time.perf_counter()
        add(payload, expect)
        t2 = time.perf_counter()
        out["zmq"]["discovery"].append(t1 - t0)
        out["zmq"]["handshake"].append(t2 - t0)
        # etcd: a remote engine this client never asked about.
        t0 = time.perf_counter()
        payload = reader.lookup_record(f"bench_copy_{i}", 0).metadata
        t1 = time.perf_counter()
        add(payload, expect)
        t2 = time.perf_counter()
        out["etcd"]["discovery"].append(t1 - t0)
        out["etcd"]["handshake"].append(t2 - t0)
    reader.close()
    publisher.close()
    return out


def ttfts(named: Dict[str, Engine], n: int) -> Dict[str, List[float]]:
    p = named["P"]
    prompt = "The future of AI is bright because prefill and decode engines share"
    out: Dict[str, List[float]] = {"etcd": [], "warm": [], "zmq": [], "prefill": []}
    # D_warm handshakes with P when P appears: wait for its line, not a sleep.
    deadline = time.monotonic() + 300
    while "D_warm" in named and "pre-warmed engine prefill_engine" not in named["D_warm"].log_text():
        if time.monotonic() > deadline:
            raise RuntimeError("D_warm did not pre-warm P: " + named["D_warm"].log_tail())
        time.sleep(0.2)
    for i in range(n):
        ways = [(w, named[f"D_{w}"]) for w in ("etcd", "warm", "zmq") if f"D_{w}" in named]
        for way, d in ways:
            r = p.generate(prompt, 1, kv_transfer_params={"do_remote_decode": True})
            assert r["ok"], r
            out["prefill"].append(r["seconds"])
            params = dict(r["kv_transfer_params"], do_remote_prefill=True, do_remote_decode=False)
            if way in ("etcd", "warm"):
                params["remote_port"] = free_port()  # nothing listens: etcd only
            r = d.generate(prompt, 1, kv_transfer_params=params)
            assert r["ok"] and r["finish_reason"] == "length", r
            out[way].append(r["seconds"])
    return out


def render(hs: Dict[str, Dict[str, List[float]]], ttft: Dict[str, List[float]], n: int, m: int) -> str:
    ms = 1e3
    rows = [
        f"Handshakes: {n} each way, alternating, one process; TTFT: {m} P/D requests each way; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| measure | etcd (nixl-etcd plugin) | ZMQ side channel (stock vLLM) | etcd / ZMQ |",
        "|---|---|---|---|",
    ]
    for part in ("discovery", "handshake"):
        for q, name in ((0.5, "p50"), (0.9, "p90")):
            e, z = pct(hs["etcd"][part], q) * ms, pct(hs["zmq"][part], q) * ms
            rows.append(f"| {part} {name} (ms) | {e:.3f} | {z:.3f} | {e / z:.2f} |")
    e0, z0, w0 = ttft["etcd"][0] * ms, ttft["zmq"][0] * ms, ttft["warm"][0] * ms
    rows.append(f"| first P/D request's decode TTFT, handshake included (ms) | {e0:.1f} | {z0:.1f} | {e0 / z0:.2f} |")
    rows.append(f"| first P/D request's decode TTFT with VLLM_NIXL_ETCD_PREWARM=1 (ms) | {w0:.1f} | - | {w0 / z0:.2f} |")
    if m > 1:
        e, z = statistics.median(ttft["etcd"][1:]) * ms, statistics.median(ttft["zmq"][1:]) * ms
        w = statistics.median(ttft["warm"][1:]) * ms
        rows.append(f"| later P/D requests' decode TTFT p50 (ms) | {e:.1f} | {z:.1f} | {e / z:.2f} |")
        rows.append(f"| later P/D requests' decode TTFT p50 with pre-warm (ms) | {w:.1f} | - | {w / z:.2f} |")
    pf = statistics.median(ttft["prefill"]) * ms
    rows.append(f"| prefill leg (max_tokens=1) p50, same prefill for both (ms) | {pf:.1f} | {pf:.1f} | 1.00 |")
    return "\n".join(rows)


def render_pair(way: str, ttft: Dict[str, List[float]], m: int) -> str:
    ms = 1e3
    first, later = ttft[way][0] * ms, statistics.median(ttft[way][1:]) * ms
    name = {"etcd": "etcd", "warm": "etcd with VLLM_NIXL_ETCD_PREWARM=1", "zmq": "ZMQ (stock)"}[way]
    return "\n".join([
        f"P and one decode ({name}) alive; {m} P/D requests; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end.",
        "",
        "| decode | first TTFT (ms) | later TTFT p50 (ms) | first / later |",
        "|---|---|---|---|",
        f"| {name} | {first:.1f} | {later:.1f} | {first / later:.2f} |",
    ])


if __name__ == "__main__":
    sys.exit(main())
