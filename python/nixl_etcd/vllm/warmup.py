"""The pre-warm's warm-up READ: once vLLM's handshake with a remote engine has
loaded its NIXL agents (off any request's path), two READs of one block from
each remote rank this worker reads, so that what UCX sets up on a
connection's first transfers (the endpoint's lanes on the first, protocol
selection on the second) is not paid by the first request.

The READs land in a scratch buffer of this worker's own (one block, registered
once with the worker's NIXL agent), never in vLLM's KV cache, and read the
first block of the remote's first KV region (whatever it holds: nothing is
kept). The remote's addresses come from its published payload (vLLM's
``NixlAgentMetadata``). Runs on a thread of its own once the handshake is done;
each READ is bounded by :data:`READ_TIMEOUT_S`. On CPU hosts a READ completes only
when the remote's worker progresses UCX, which an idle CPU prefill may not do
in time: the warm-up then ends with a WARNING and changes nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Tuple

from ..client import Client
from . import shape as shapes

logger = logging.getLogger("vllm.nixl_etcd")

#: The longest one warm-up READ may take before it is abandoned.
READ_TIMEOUT_S = 10.0
#: The most bytes one warm-up READ moves (one block, capped).
MAX_BYTES = 4 << 20


class Scratch:
    """One registered buffer per worker, for every warm-up READ."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: Dict[Tuple[str, int], Tuple[Any, int]] = {}

    def get(self, worker: Any, mem_type: str, size: int) -> Tuple[int, int]:
        """(address, device) of a registered buffer of at least ``size`` bytes."""
        import torch

        device = int(getattr(worker, "device_id", 0) or 0)
        with self.lock:
            held = self.buffers.get((mem_type, device))
            if held is None or held[1] < size:
                where = f"cuda:{device}" if mem_type == "VRAM" else "cpu"
                t = torch.empty(size, dtype=torch.uint8, device=where)
                worker.nixl_wrapper.register_memory([(t.data_ptr(), size, device, "")], mem_type)
                held = (t, size)
                # Kept, and registered, for the worker's life.
                self.buffers[(mem_type, device)] = held
            return held[0].data_ptr(), device


SCRATCH = Scratch()


def remote_region(payload: bytes) -> Tuple[int, int, int, str]:
    """(address, block bytes, device, memory type) of the first KV region's
    first block, from a published payload."""
    import msgspec

    outer = msgspec.msgpack.decode(payload)
    md = msgspec.msgpack.decode(outer["agent_metadata_bytes"])
    if isinstance(md, list):  # an array-encoded struct: not a layout we know
        raise ValueError("the payload's agent metadata is not a map")
    mem_types = md.get("region_mem_types") or []
    return (
        int(md["kv_caches_base_addr"][0]),
        int(md["block_lens"][0]),
        int(md["device_id"]),
        str(mem_types[0]) if mem_types else "",
    )


def read_twice(
    worker: Any,
    agent_name: str,
    local: Tuple[int, int, str],
    remote: Tuple[int, int, str],
    size: int,
) -> None:
    """Two READs of ``size`` bytes from ``remote`` (address, device, memory
    type) of ``agent_name`` into ``local``."""
    w = worker.nixl_wrapper
    for _ in range(2):
        local_descs = w.get_xfer_descs([(local[0], size, local[1])], local[2])
        remote_descs = w.get_xfer_descs([(remote[0], size, remote[1])], remote[2])
        handle = w.initialize_xfer("READ", local_descs, remote_descs, agent_name)
        try:
            state = w.transfer(handle)
            deadline = time.monotonic() + READ_TIMEOUT_S
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not complete within {READ_TIMEOUT_S:.0f} s")
                time.sleep(0.0005)
                state = w.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL reported {state}")
        finally:
            w.release_xfer_handle(handle)


def warm_up(worker: Any, client: Client, engine_id: str, parallel: "shapes.Shape") -> None:
    """The warm-up READs from every rank of ``engine_id`` the handshake loaded
    into ``worker``; logged, never raised (the first request then pays)."""
    started = time.perf_counter()
    held = getattr(worker, "_remote_agents", {}).get(engine_id, {})
    agents: Dict[Tuple[int, int], str] = dict(held)
    done: List[int] = []
    try:
        if not agents:
            raise RuntimeError("vLLM holds no NIXL agent of it")
        local_type = str(getattr(worker, "nixl_memory_type", "") or "DRAM")
        size = 0
        for (pp_rank, tp_rank), agent_name in sorted(agents.items()):
            rank = parallel.rank(pp_rank, tp_rank)
            payload = client.lookup_record(engine_id, rank).metadata
            addr, block, device, mem = remote_region(payload)
            size = max(1, min(block, MAX_BYTES))
            local_addr, local_device = SCRATCH.get(worker, local_type, size)
            local = (local_addr, local_device, local_type)
            read_twice(worker, agent_name, local, (addr, device, mem or local_type), size)
            done.append(rank)
    except Exception as e:
        logger.warning(
            "nixl-etcd: pre-warm could not warm up transfers from engine %s (%s); its first "
            "request sets the transport up on its path",
            engine_id,
            e,
        )
        return
    logger.info(
        "nixl-etcd: pre-warm warmed up transfers from engine %s rank(s) %s: two READs of %d "
        "bytes each in %.2f ms, before any request",
        engine_id,
        ",".join(map(str, done)),
        size,
        (time.perf_counter() - started) * 1e3,
    )
