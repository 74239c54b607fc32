#!/usr/bin/env python3
"""One stock NIXL 1.5 agent (PyPI wheel, UCX backend), driven line by line.

    python3 stock_nixl_agent.py NAME SIZE SEED

Its metadata backend is whatever the environment selects, exactly as for any
NIXL program: NIXL_TCPSTORE_ENDPOINT (the nixl-etcd store), NIXL_ETCD_ENDPOINTS
(NIXL's own etcd backend) or neither. It registers SIZE bytes of DRAM filled
with a pattern from SEED, prints one JSON line {"pid", "addr", "len"} and then
answers one JSON line per command read from stdin:

  publish                    send_local_metadata()
  publish_partial LABEL      send_partial_agent_metadata(its region, label=LABEL)
  fetch NAME [LABEL]         fetch_remote_metadata(NAME[, label=LABEL])
  check NAME TIMEOUT_S       polls check_remote_metadata(NAME) -> {"ok", "s"}
  read NAME ADDR LEN SEED    READs LEN bytes at ADDR of agent NAME, checks every
                             byte against SEED's pattern -> {"ok", "bad"}
  metadata                   get_agent_metadata() -> {"hex"}
  load HEX                   add_remote_agent(bytes) -> {"name"}
  invalidate                 invalidate_local_metadata()
"""

import json
import os
import sys
import time

import numpy as np


def pattern(n: int, seed: int) -> np.ndarray:
    return ((np.arange(n, dtype=np.uint64) * 131 + seed) % 251).astype(np.uint8)


def out(obj) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def main() -> int:
    name, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    # NIXL and UCX log to stdout: keep it for the JSON lines.
    sys.stdout = sys.stderr
    from nixl._api import nixl_agent, nixl_agent_config

    # The progress thread serves the READs peers make of this agent's memory.
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=True))
    buf = pattern(size, seed)
    reg = agent.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
    out({"pid": os.getpid(), "addr": buf.ctypes.data, "len": size})
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        cmd = w[0]
        try:
            if cmd == "publish":
                agent.send_local_metadata()
                out({"ok": True})
            elif cmd == "publish_partial":
                agent.send_partial_agent_metadata(reg, True, ["UCX"], label=w[1])
                out({"ok": True})
            elif cmd == "fetch":
                if len(w) > 2:
                    agent.fetch_remote_metadata(w[1], label=w[2])
                else:
                    agent.fetch_remote_metadata(w[1])
                out({"ok": True})
            elif cmd == "check":
                t0 = time.perf_counter()
                deadline = t0 + float(w[2])
                ok = agent.check_remote_metadata(w[1])
                while not ok and time.perf_counter() < deadline:
                    time.sleep(0.001)
                    ok = agent.check_remote_metadata(w[1])
                out({"ok": bool(ok), "s": time.perf_counter() - t0})
            elif cmd == "read":
                remote, addr, n, rseed = w[1], int(w[2]), int(w[3]), int(w[4])
                local = np.zeros(n, dtype=np.uint8)
                lreg = agent.register_memory([(local.ctypes.data, n, 0, "")], "DRAM")
                ld = agent.get_xfer_descs(np.array([[local.ctypes.data, n, 0]], dtype=np.uint64), "DRAM")
                rd = agent.get_xfer_descs(np.array([[addr, n, 0]], dtype=np.uint64), "DRAM")
                h = agent.initialize_xfer("READ", ld, rd, remote, b"")
                state = agent.transfer(h)
                deadline = time.perf_counter() + 30
                while state == "PROC" and time.perf_counter() < deadline:
                    time.sleep(0.0005)
                    state = agent.check_xfer_state(h)
                bad = int(np.count_nonzero(local != pattern(n, rseed)))
                agent.release_xfer_handle(h)
                agent.deregister_memory(lreg)
                out({"ok": state == "DONE" and bad == 0, "state": state, "bad": bad})
            elif cmd == "metadata":
                out({"hex": agent.get_agent_metadata().hex()})
            elif cmd == "load":
                got = agent.add_remote_agent(bytes.fromhex(w[1]))
                out({"name": got.decode() if isinstance(got, bytes) else str(got)})
            elif cmd == "invalidate":
                agent.invalidate_local_metadata()
                out({"ok": True})
            else:
                out({"error": f"unknown command {cmd}"})
        except Exception as e:  # reported to the test, which fails on it
            out({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
