#!/usr/bin/env python3
"""The guide's Terminal 2: a decode instance (consumer) with a real NIXL agent.

It waits through nixl_etcd for the prefill rank(s) its rank reads from
(vLLM's TP mapping), loads each one's NIXL agent metadata
(add_remote_agent), READs the prefill's KV buffer into its own DRAM buffer
over UCX, checks every byte, notifies the prefill, and prints the handshake
time, the bytes moved and the rate.

    export VLLM_NIXL_USE_ETCD=1
    export VLLM_NIXL_ETCD_ENDPOINTS="http://localhost:2379"
    python3 python/examples/decode.py prefill_engine
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kv_layout  # noqa: E402

try:
    import nixl_etcd
except ImportError:  # not installed: this checkout's package (NIXL_ETCD_LIBRARY or target/release)
    sys.path.insert(0, str(HERE.parent))
    import nixl_etcd


def say(msg: str) -> None:
    print(f"[decode] {msg}", flush=True)


def read_rank(agent, remote_rank: int, payload: bytes, handshake_s: float) -> bool:
    """Loads one prefill rank's agent, READs its KV blocks, checks them, notifies it."""
    t0 = time.perf_counter()
    layout, md = kv_layout.unpack(payload)
    remote = agent.add_remote_agent(md)
    load_s = time.perf_counter() - t0
    name = remote.decode() if isinstance(remote, bytes) else str(remote)
    say(f"handshake with {layout['engine_id']} rank {remote_rank} in {handshake_s + load_s:.3f} s "
        f"(etcd {handshake_s:.3f} s + add_remote_agent {load_s:.3f} s): agent {name}, "
        f"{len(md)} bytes of NIXL metadata")

    block, blocks = int(layout["block_bytes"]), int(layout["blocks"])
    size = block * blocks
    local = np.zeros(size, dtype=np.uint8)
    reg = agent.register_memory([(local.ctypes.data, size, 0, "")], "DRAM")

    def descs(base: int, dev: int) -> np.ndarray:
        # one descriptor per KV block: (address, length, device)
        rows = np.empty((blocks, 3), dtype=np.uint64)
        rows[:, 0] = base + np.arange(blocks, dtype=np.uint64) * block
        rows[:, 1] = block
        rows[:, 2] = dev
        return rows

    local_descs = agent.get_xfer_descs(descs(local.ctypes.data, 0), "DRAM")
    remote_descs = agent.get_xfer_descs(descs(int(layout["addr"]), int(layout["dev"])),
                                        layout["mem"])
    handle = agent.initialize_xfer("READ", local_descs, remote_descs, remote,
                                   f"read:{blocks} blocks, {size} bytes".encode())
    t1 = time.perf_counter()
    state = agent.transfer(handle)
    while state == "PROC":
        time.sleep(0.0002)
        state = agent.check_xfer_state(handle)
    xfer_s = time.perf_counter() - t1
    if state != "DONE":
        say(f"READ from {name} failed: {state}")
        agent.release_xfer_handle(handle)
        agent.deregister_memory(reg)
        return False
    say(f"READ {size} bytes ({blocks} KV blocks of {block} bytes, {size / 2**20:.1f} MiB) "
        f"in {xfer_s:.3f} s: {size / xfer_s / 1e9:.2f} GB/s")

    bad = kv_layout.mismatches(local, int(layout["seed"]))
    verdict = "ok" if bad == 0 else f"{bad} bytes differ"
    say(f"checked every byte: {size - bad} of {size} match" + ("" if bad == 0 else " (MISMATCH)"))
    agent.send_notif(remote, f"verified:{verdict}".encode())
    say(f"notified {name}")
    agent.release_xfer_handle(handle)
    agent.deregister_memory(reg)
    agent.remove_remote_agent(remote)
    return bad == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("remote_engine_id", nargs="?", default="prefill_engine")
    ap.add_argument("--tp", type=int, default=1, help="this engine's TP size")
    ap.add_argument("--rank", type=int, default=0, help="this rank")
    ap.add_argument("--remote-tp", type=int, default=None,
                    help="the prefill's TP size (default: learned through etcd)")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds to wait for the prefill to register")
    ap.add_argument("--verbose", action="store_true", help="NIXL's INFO logs too")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not nixl_etcd.enabled():
        say("VLLM_NIXL_USE_ETCD is not set to 1: this example has no direct handshake "
            "to fall back to; export VLLM_NIXL_USE_ETCD=1")
        return 2

    from nixl._api import nixl_agent, nixl_agent_config

    logging.getLogger("nixl").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # No progress thread: the transfer loop below drives UCX (see prefill.py).
    config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    agent = nixl_agent(f"decode-rank{args.rank}-{os.getpid()}", config)

    with nixl_etcd.EtcdHandshake() as hs:
        say(f"waiting for {args.remote_engine_id} through etcd ...")
        t0 = time.perf_counter()
        try:
            payloads = hs.fetch(args.remote_engine_id, args.tp, args.rank, args.remote_tp,
                                timeout=args.timeout)
        except nixl_etcd.NixlEtcdError as e:
            say(f"{type(e).__name__}: {e}")
            return 1
        handshake_s = time.perf_counter() - t0
        ok = all(read_rank(agent, r, payloads[r], handshake_s) for r in sorted(payloads))
    say("done" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
