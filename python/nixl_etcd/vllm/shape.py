"""An engine's parallel shape in its records: what vLLM's handshake needs to
pick the remote ranks (the TP, PP and DCP sizes a prefill's
``kv_transfer_params`` carry), for readers that have no request in hand
(the pre-warm) and to check a request against what the engine published.

The shape rides in each rank's payload as one more key of the msgpack map
vLLM encodes its ``NixlHandshakePayload`` as; vLLM's decoder ignores keys it
does not know, so the payload stays vLLM's own. Rank ``pp_rank * tp +
tp_rank``; world size ``tp * pp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

#: The payload key that holds the shape.
KEY = "nixl_etcd_shape"


class ShapeError(RuntimeError):
    """A shape the plugin cannot map onto this decode: nothing is loaded."""


@dataclass(frozen=True)
class Shape:
    #: vLLM's transfer TP size (``transfer_tp_size``: the larger of TP and DCP).
    tp: int
    pp: int = 1
    dcp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp

    def rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank

    def __str__(self) -> str:
        return f"TP {self.tp}, PP {self.pp}, DCP {self.dcp}"


def of_scheduler(scheduler: Any) -> Shape:
    """The shape a prefill's scheduler puts in its ``kv_transfer_params``."""
    parallel = scheduler.vllm_config.parallel_config
    return Shape(
        tp=max(1, int(scheduler.transfer_tp_size)),
        pp=max(1, int(parallel.pipeline_parallel_size)),
        dcp=max(1, int(parallel.decode_context_parallel_size)),
    )


def embed(payload: bytes, shape: Shape) -> bytes:
    """``payload`` (a msgpack map) with the shape added."""
    import msgspec

    fields = msgspec.msgpack.decode(payload)
    if not isinstance(fields, dict):
        raise ShapeError("vLLM's handshake payload is not a msgpack map; cannot add the shape")
    fields[KEY] = {"tp": shape.tp, "pp": shape.pp, "dcp": shape.dcp}
    return msgspec.msgpack.encode(fields)


def read(payload: bytes, engine_id: str, world_size: Optional[int]) -> Optional[Shape]:
    """The shape in a published payload; None if it has none (a publisher
    without it). Raises :class:`ShapeError` for one that is malformed or does
    not match the record's world size."""
    import msgspec

    try:
        fields = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise ShapeError(f"engine {engine_id}'s payload is not msgpack ({e})") from e
    raw = fields.get(KEY) if isinstance(fields, dict) else None
    if raw is None:
        return None
    try:
        shape = Shape(tp=int(raw["tp"]), pp=int(raw["pp"]), dcp=int(raw["dcp"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ShapeError(f"engine {engine_id} published a malformed shape {raw!r}") from e
    if min(shape.tp, shape.pp, shape.dcp) < 1:
        raise ShapeError(f"engine {engine_id} published an impossible shape ({shape})")
    if world_size is not None and world_size != shape.world:
        raise ShapeError(
            f"engine {engine_id} published {shape} (world size {shape.world}) in records "
            f"of world size {world_size}; its records are inconsistent, nothing is loaded"
        )
    return shape


def targets(worker: Any, engine_id: str, shape: Shape) -> List[Tuple[int, int]]:
    """The (pp_rank, tp_rank) pairs of ``engine_id`` this decode worker reads,
    by vLLM's own mapping (``transfer_topo.handshake_target_ranks``)."""
    try:
        ranks = worker.transfer_topo.handshake_target_ranks(shape.tp, shape.dcp)
    except Exception as e:  # vLLM's mapping refuses the pair of shapes
        raise ShapeError(
            f"engine {engine_id} ({shape}) cannot be mapped onto this decode: {e}"
        ) from e
    return [(pp, r) for pp in range(shape.pp) for r in ranks]


def check_request(engine_id: str, published: Shape, tp: int, pp: int, dcp: int) -> None:
    """A request's view of the remote shape must be what the engine published:
    otherwise the ranks vLLM picks are not the ones the engine has."""
    asked = Shape(tp=max(1, tp), pp=max(1, pp), dcp=max(1, dcp))
    if asked != published:
        raise ShapeError(
            f"the request for engine {engine_id} says {asked}, but the engine published "
            f"{published} in ETCD; check the proxy's kv_transfer_params (a request for an "
            "older engine under the same id?)"
        )
