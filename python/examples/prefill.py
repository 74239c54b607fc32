#!/usr/bin/env python3
"""The guide's Terminal 1: a prefill instance (producer) with a real NIXL agent.

It creates a NIXL agent (UCX), fills a DRAM buffer (numpy) with a known
pattern standing in for KV blocks, registers it with NIXL, and publishes its
agent metadata plus the buffer layout through nixl_etcd for (engine_id, rank).
Then it waits for the decode instance's notification (it READs the buffer and
checks every byte) and exits; closing the client revokes its lease, so its
record disappears from etcd at once.

    export VLLM_NIXL_USE_ETCD=1
    export VLLM_NIXL_ETCD_ENDPOINTS="http://localhost:2379"
    python3 python/examples/prefill.py prefill_engine --size-mib 64
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
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
    print(f"[prefill] {msg}", flush=True)


def quiet_nixl(verbose: bool) -> None:
    # NIXL's Python logger writes INFO lines to stdout; keep ours readable.
    logging.getLogger("nixl").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("engine_id", nargs="?", default="prefill_engine")
    ap.add_argument("--rank", type=int, default=0, help="this rank (default 0)")
    ap.add_argument("--tp", type=int, default=1, help="the engine's TP size (world_size)")
    ap.add_argument("--size-mib", type=int, default=64, help="KV buffer size (MiB)")
    ap.add_argument("--block-kib", type=int, default=1024, help="KV block size (KiB)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the decode's notification")
    ap.add_argument("--verbose", action="store_true", help="NIXL's INFO logs too")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    if not nixl_etcd.enabled():
        say("VLLM_NIXL_USE_ETCD is not set to 1: this example has no direct handshake "
            "to fall back to; export VLLM_NIXL_USE_ETCD=1")
        return 2

    from nixl._api import nixl_agent, nixl_agent_config

    quiet_nixl(args.verbose)
    size = args.size_mib << 20
    block = args.block_kib << 10
    if block <= 0 or size % block or block % kv_layout.BLOCK:
        say(f"--size-mib must be a multiple of --block-kib, itself a multiple of {kv_layout.BLOCK // 1024} KiB")
        return 2
    agent_name = f"{args.engine_id}-rank{args.rank}-{os.getpid()}"
    # No progress thread: this process drives UCX itself by polling for
    # notifications every millisecond (on few cores a busy progress thread
    # competes with the transfer).
    agent = nixl_agent(agent_name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))

    buf = np.empty(size, dtype=np.uint8)
    seed = kv_layout.seed_of(args.engine_id, args.rank)
    kv_layout.fill(buf, seed)
    addr = buf.ctypes.data
    reg = agent.register_memory([(addr, size, 0, "")], "DRAM")
    layout = {
        "engine_id": args.engine_id,
        "rank": args.rank,
        "agent": agent_name,
        "mem": "DRAM",
        "addr": addr,
        "block_bytes": block,
        "blocks": size // block,
        "dev": 0,
        "seed": seed,
    }
    md = agent.get_agent_metadata()
    payload = kv_layout.pack(layout, md)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    hs = nixl_etcd.EtcdHandshake(world_size=args.tp)
    try:
        try:
            if not hs.publish(args.engine_id, args.rank, payload):
                say("not published through etcd")
                return 2
        except nixl_etcd.NixlEtcdError as e:
            say(f"{type(e).__name__}: {e}")
            return 1
        say(f"engine {args.engine_id} rank {args.rank}: agent {agent_name} registered "
            f"through etcd ({len(md)} bytes of NIXL metadata, {len(payload)} with the layout), "
            f"{size // block} KV blocks of {block} bytes ({args.size_mib} MiB of DRAM at {addr:#x})")
        say("waiting for the decode instance to read it ...")
        deadline = time.monotonic() + args.timeout
        while True:
            if stop["signal"] is not None:
                say(f"signal {stop['signal']}: leaving")
                return 130
            notifs = agent.get_new_notifs()
            for peer, msgs in notifs.items():
                for msg in msgs:
                    text = msg.decode(errors="replace")
                    if text.startswith("read:"):
                        say(f"{peer} finished its READ ({text[5:]})")
                    elif text.startswith("verified:"):
                        verdict = text[len("verified:"):]
                        say(f"{peer} checked every byte: {verdict}")
                        return 0 if verdict.startswith("ok") else 1
            if time.monotonic() > deadline:
                say(f"no notification from a decode instance within {args.timeout:.0f} s")
                return 1
            time.sleep(0.001)
    finally:
        try:
            hs.close()  # revokes the lease: the record disappears from etcd now
            say("unregistered (lease revoked)")
        except nixl_etcd.NixlEtcdError as e:
            say(f"close: {e}")
        agent.deregister_memory(reg)


if __name__ == "__main__":
    sys.exit(main())
