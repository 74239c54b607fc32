"""What the two example terminals share: the handshake payload format and the
byte pattern of the prefill's KV buffer.

Payload (what the prefill registers per rank through nixl_etcd):

    4 bytes   big-endian length L of the layout
    L bytes   layout, JSON: agent name, buffer address and length, memory
              type, pattern seed
    rest      the NIXL agent metadata (nixl_agent.get_agent_metadata())
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any, Dict, Tuple

import numpy as np

BLOCK = 4096  # bytes per pattern block


def pack(layout: Dict[str, Any], agent_metadata: bytes) -> bytes:
    head = json.dumps(layout, sort_keys=True).encode()
    return struct.pack(">I", len(head)) + head + agent_metadata


def unpack(payload: bytes) -> Tuple[Dict[str, Any], bytes]:
    if len(payload) < 4:
        raise ValueError(f"payload of {len(payload)} bytes is too short")
    (n,) = struct.unpack(">I", payload[:4])
    if 4 + n > len(payload):
        raise ValueError("payload layout is truncated")
    return json.loads(payload[4 : 4 + n]), payload[4 + n :]


def seed_of(engine_id: str, rank: int) -> int:
    return zlib.crc32(f"{engine_id}/{rank}".encode()) & 0xFF


def fill(buf: np.ndarray, seed: int) -> None:
    """Writes the pattern in place: byte i of block b is (i % 251 + 7*b + seed) mod 256."""
    if buf.dtype != np.uint8 or buf.size % BLOCK:
        raise ValueError(f"buffer must be uint8 and a multiple of {BLOCK} bytes")
    blocks = buf.reshape(-1, BLOCK)
    base = (np.arange(BLOCK, dtype=np.uint32) % 251).astype(np.uint8)
    offs = ((np.arange(blocks.shape[0], dtype=np.uint64) * 7 + seed) % 256).astype(np.uint8)
    np.add(base[None, :], offs[:, None], out=blocks)


def mismatches(buf: np.ndarray, seed: int) -> int:
    """How many bytes of `buf` differ from the pattern."""
    expected = np.empty_like(buf)
    fill(expected, seed)
    return int(np.count_nonzero(buf != expected))
