#!/usr/bin/env python3
"""Two stock NIXL agents (the nixl-cu13 wheel's Python API, UCX) moving VRAM,
whose only link for NIXL metadata is NIXL_TCPSTORE_ENDPOINT: `nixl-etcd serve`,
etcd behind it. No nixl-etcd code runs in these processes.

    stock_nixl_gpu.py prefill NAME SIZE_MIB            (prints one JSON line, then serves)
    stock_nixl_gpu.py decode NAME PREFILL ADDR LEN DEV (prints RESULT ...)

The prefill fills SIZE_MIB of VRAM (on the process's cuda:0; choose the GPU with
CUDA_VISIBLE_DEVICES) with a pattern, registers it, publishes its metadata with
send_local_metadata() and prints {"addr", "len", "dev"}; it serves until the
decode's notification "done" arrives (or 120 s). The decode registers as much
VRAM of its own, fetches the prefill's metadata (fetch_remote_metadata, then
check_remote_metadata until it is loaded: the handshake through the store),
READs the prefill's buffer, and checks every byte on the GPU against the
pattern.
"""

import json
import os
import sys
import time


def pattern(torch, n: int, dev: str):
    i = torch.arange(n, dtype=torch.int64, device=dev)
    return ((i * 131 + 7) % 251).to(torch.uint8)


# STOCK_NIXL_MEM=DRAM runs the same exchange in host memory (a check on a
# machine without a GPU); the run on GPUs uses VRAM.
MEM = os.environ.get("STOCK_NIXL_MEM", "VRAM")
DEV = "cuda:0" if MEM == "VRAM" else "cpu"


def agent_of(name: str):
    try:
        from nixl_cu13._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))


def sync(torch) -> None:
    if MEM == "VRAM":
        torch.cuda.synchronize()


def prefill(name: str, size_mib: int) -> int:
    import torch

    n = size_mib << 20
    buf = pattern(torch, n, DEV)
    sync(torch)
    agent = agent_of(name)
    agent.register_memory([(buf.data_ptr(), n, 0, "")], MEM)
    agent.send_local_metadata()
    print(json.dumps({"addr": buf.data_ptr(), "len": n, "dev": 0}), flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        notifs = agent.get_new_notifs()
        if any(b"done" in m for msgs in notifs.values() for m in msgs):
            print("prefill: decode done", flush=True)
            agent.invalidate_local_metadata()
            return 0
        time.sleep(0.01)
    print("prefill: no notification from the decode within 120 s", flush=True)
    return 1


def decode(name: str, peer: str, addr: int, n: int, dev: int) -> int:
    import numpy as np
    import torch

    local = torch.zeros(n, dtype=torch.uint8, device=DEV)
    sync(torch)
    agent = agent_of(name)
    agent.register_memory([(local.data_ptr(), n, 0, "")], MEM)
    t0 = time.perf_counter()
    agent.fetch_remote_metadata(peer)
    while not agent.check_remote_metadata(peer):
        if time.perf_counter() - t0 > 60:
            print(f"decode: metadata of {peer} not loaded within 60 s", flush=True)
            return 1
        time.sleep(0.0005)
    handshake_ms = (time.perf_counter() - t0) * 1e3
    ld = agent.get_xfer_descs(np.array([[local.data_ptr(), n, 0]], dtype=np.uint64), MEM)
    rd = agent.get_xfer_descs(np.array([[addr, n, dev]], dtype=np.uint64), MEM)

    def read(notif: bytes) -> float:
        h = agent.initialize_xfer("READ", ld, rd, peer, notif)
        t = time.perf_counter()
        if agent.transfer(h) == "ERR":
            raise RuntimeError("transfer failed to post")
        while True:
            s = agent.check_xfer_state(h)
            if s == "DONE":
                break
            if s == "ERR":
                raise RuntimeError("transfer failed")
        took = time.perf_counter() - t
        agent.release_xfer_handle(h)
        return took

    first = read(b"")
    times = [read(b"") for _ in range(5)]
    sync(torch)
    bad = int((local != pattern(torch, n, DEV)).sum().item())
    read(b"done")  # tells the prefill it may go
    gbps = n / sorted(times)[len(times) // 2] / 1e9
    print(
        f"RESULT handshake_ms={handshake_ms:.3f} bytes={n} first_gbps={n / first / 1e9:.2f} "
        f"median_gbps={gbps:.2f} bad_bytes={bad} mem={MEM}",
        flush=True,
    )
    return 0 if bad == 0 else 2


def main(argv) -> int:
    os.environ.setdefault("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "y")
    if argv[1] == "prefill":
        return prefill(argv[2], int(argv[3]))
    return decode(argv[2], argv[3], int(argv[4]), int(argv[5]), int(argv[6]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
