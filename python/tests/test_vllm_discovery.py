"""The decode's view of one remote engine (:class:`discovery.RemoteEngine`):
its status through the etcd events a fleet produces (restarts, exits, leases
lost and re-granted, changes while loading), and the engine's parallel shape
in its payloads (:mod:`nixl_etcd.vllm.shape`). Pure logic: no etcd, no vLLM;
the end-to-end paths are in test_vllm_release.py and test_vllm_pd.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO

from nixl_etcd.client import Event, EventKind, Record
from nixl_etcd.vllm import discovery
from nixl_etcd.vllm import shape as shapes
from nixl_etcd.vllm.discovery import RemoteEngine, Status


def ev(kind: EventKind, rank: int = 0, inc: str = "a", rev: int = 10) -> Event:
    return Event(kind=kind, engine_id="p", rank=rank, incarnation=inc, host="h",
                 metadata=b"", revision=rev)


def rec(rank: int = 0, inc: str = "a", rev: int = 10, meta: bytes = b"",
        world: Optional[int] = 1) -> Record:
    return Record(engine_id="p", rank=rank, world_size=world, host="h", pid=1,
                  incarnation=inc, registered_at_ms=0, revision=rev, metadata=meta)


def loaded(*ranks: int) -> RemoteEngine:
    e = RemoteEngine("p")
    e.loaded_from({r: rec(r) for r in ranks or (0,)})
    assert e.status is Status.LOADED
    return e


# -- while loading: what changed between the subscription and the read -------

def test_replay_of_what_was_read_leaves_it_loaded() -> None:
    e = RemoteEngine("p")
    assert e.apply(ev(EventKind.ADDED)) is None  # the subscription's first ADDED
    e.loaded_from({0: rec()})
    assert e.status is Status.LOADED


def test_a_restart_during_loading_is_not_missed() -> None:
    e = RemoteEngine("p")
    e.apply(ev(EventKind.ADDED))
    e.apply(ev(EventKind.REPLACED, inc="b", rev=11))  # after the read
    e.loaded_from({0: rec()})
    assert e.status is Status.RESTARTED


def test_new_payloads_during_loading_make_it_stale() -> None:
    e = RemoteEngine("p")
    e.apply(ev(EventKind.UPDATED, rev=12))
    e.loaded_from({0: rec(rev=10)})
    assert e.status is Status.STALE


def test_an_exit_during_loading_makes_it_gone() -> None:
    e = RemoteEngine("p")
    e.apply(ev(EventKind.REMOVED, rev=11))
    e.loaded_from({0: rec()})
    assert e.status is Status.GONE and e.missing == {0}


def test_a_read_newer_than_the_events_is_loaded() -> None:
    e = RemoteEngine("p")
    e.apply(ev(EventKind.ADDED, inc="a", rev=10))
    e.loaded_from({0: rec(inc="b", rev=11)})  # the event for b comes later
    assert e.status is Status.RESTARTED  # b's read vs a's event: a restart in between
    e = RemoteEngine("p")
    e.apply(ev(EventKind.ADDED, inc="b", rev=11))
    e.loaded_from({0: rec(inc="b", rev=11)})
    assert e.status is Status.LOADED


# -- once loaded ---------------------------------------------------------------

def test_restart_releases_at_once() -> None:
    e = loaded()
    assert e.apply(ev(EventKind.REPLACED, inc="b", rev=11)) == "released"
    assert e.status is Status.RESTARTED
    assert e.apply(ev(EventKind.REMOVED, inc="b", rev=12)) is None  # stays RESTARTED
    assert e.status is Status.RESTARTED


def test_reregistered_payloads_release_at_once() -> None:
    e = loaded()
    assert e.apply(ev(EventKind.UPDATED, rev=11)) == "released"
    assert e.status is Status.STALE


def test_lease_lost_and_regranted_keeps_the_agents() -> None:
    e = loaded(0, 1)
    assert e.apply(ev(EventKind.REMOVED, rank=0, rev=11)) == "gone"
    assert e.apply(ev(EventKind.REMOVED, rank=1, rev=12)) == "gone"
    assert e.status is Status.GONE and e.missing == {0, 1}
    assert e.apply(ev(EventKind.ADDED, rank=0, rev=13)) == "back"
    assert e.status is Status.GONE  # rank 1 still missing
    assert e.apply(ev(EventKind.ADDED, rank=1, rev=14)) == "back"
    assert e.status is Status.LOADED and not e.missing


def test_gone_then_back_as_a_new_incarnation_is_a_restart() -> None:
    e = loaded()
    e.apply(ev(EventKind.REMOVED, rev=11))
    assert e.apply(ev(EventKind.ADDED, inc="b", rev=12)) == "released"
    assert e.status is Status.RESTARTED


def test_ranks_it_never_loaded_change_nothing() -> None:
    e = loaded(0)
    for kind in EventKind:
        assert e.apply(ev(kind, rank=3, inc="z", rev=20)) is None
    assert e.status is Status.LOADED
    assert e.apply(ev(EventKind.ADDED, rev=10)) is None  # a repeat
    assert e.status is Status.LOADED


# -- the parallel shape in the payload -----------------------------------------
# msgpack is the vLLM venv's (msgspec): these cases run there, in one process.

VPY = Path(os.environ.get("NIXL_ETCD_VLLM_VENV") or REPO / ".venv-vllm") / "bin" / "python"

SHAPE_SCRIPT = r"""
import json, msgspec
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlHandshakePayload
from nixl_etcd.vllm import shape as shapes
out = {}
vllms = msgspec.msgpack.encode(NixlHandshakePayload(compatibility_hash="h", agent_metadata_bytes=b"x"))
s = shapes.Shape(tp=2, pp=2, dcp=1)
embedded = shapes.embed(vllms, s)
got = msgspec.msgpack.Decoder(NixlHandshakePayload).decode(embedded)  # vLLM's own decoder
out["vllm_reads"] = [got.compatibility_hash, got.agent_metadata_bytes.decode()]
out["read"] = str(shapes.read(embedded, "p", 4))
out["none"] = shapes.read(vllms, "p", 1)
out["refused"] = {}
for name, raw, world in [
    ("world", {"tp": 2, "pp": 2, "dcp": 1}, 2),
    ("zero", {"tp": 0, "pp": 1, "dcp": 1}, None),
    ("partial", {"tp": 2}, None),
    ("text", "TP2", None),
]:
    bad = msgspec.msgpack.encode({"compatibility_hash": "h", shapes.KEY: raw})
    try:
        shapes.read(bad, "p", world)
        out["refused"][name] = None
    except shapes.ShapeError as e:
        out["refused"][name] = str(e)
print("@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def shape_cases() -> dict:
    if not VPY.is_file():
        pytest.skip(f"vLLM TESTS SKIPPED: no vLLM venv at {VPY.parent.parent}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(VLLM_TARGET_DEVICE="cpu", PYTHONPATH=str(REPO / "python"))
    proc = subprocess.run([str(VPY), "-c", SHAPE_SCRIPT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("@@")][-1][2:])


def test_shape_rides_in_the_payload_and_vllms_decoder_ignores_it(shape_cases: dict) -> None:
    assert shape_cases["vllm_reads"] == ["h", "x"]
    assert shape_cases["read"] == "TP 2, PP 2, DCP 1"
    s = shapes.Shape(tp=2, pp=2)
    assert [s.rank(pp, tp) for pp in range(2) for tp in range(2)] == [0, 1, 2, 3]


def test_a_payload_without_shape_reads_as_none(shape_cases: dict) -> None:
    assert shape_cases["none"] is None


def test_an_inconsistent_shape_is_refused(shape_cases: dict) -> None:
    assert shape_cases["refused"] == {
        "world": "engine p published TP 2, PP 2, DCP 1 (world size 4) in records of world "
        "size 2; its records are inconsistent, nothing is loaded",
        "zero": "engine p published an impossible shape (TP 0, PP 1, DCP 1)",
        "partial": "engine p published a malformed shape {'tp': 2}",
        "text": "engine p published a malformed shape 'TP2'",
    }


def test_a_request_that_disagrees_with_the_published_shape_is_refused() -> None:
    shapes.check_request("p", shapes.Shape(2, 1, 1), 2, 1, 1)
    with pytest.raises(shapes.ShapeError) as e:
        shapes.check_request("p", shapes.Shape(2, 2, 1), 2, 1, 1)
    assert str(e.value) == (
        "the request for engine p says TP 2, PP 1, DCP 1, but the engine published TP 2, "
        "PP 2, DCP 1 in ETCD; check the proxy's kv_transfer_params (a request for an older "
        "engine under the same id?)"
    )


class Topo:
    """vLLM's ``transfer_topo`` of a TP1 decode: reads every rank of a TP2
    prefill, refuses a TP3 one (as vLLM's mapping does for sizes that do not
    divide)."""

    def handshake_target_ranks(self, remote_tp: int, remote_dcp: int):
        if remote_tp % 1 or remote_tp == 3:
            raise ValueError(f"TP 1 cannot read from TP {remote_tp}")
        return list(range(remote_tp))


class Worker:
    transfer_topo = Topo()


def test_targets_cover_every_pipeline_stage() -> None:
    pairs = shapes.targets(Worker(), "p", shapes.Shape(tp=2, pp=2, dcp=1))
    assert pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_an_unmappable_shape_is_refused_with_vllms_reason() -> None:
    with pytest.raises(shapes.ShapeError) as e:
        shapes.targets(Worker(), "p", shapes.Shape(tp=3))
    assert str(e.value) == (
        "engine p (TP 3, PP 1, DCP 1) cannot be mapped onto this decode: TP 1 cannot read "
        "from TP 3"
    )


def test_gone_release_is_bounded() -> None:
    assert 0 < discovery.GONE_RELEASE_S <= 300


def test_the_log_lines_of_a_lease_lost_and_regranted(caplog: pytest.LogCaptureFixture) -> None:
    d = discovery.Discovery()
    e = loaded()
    with caplog.at_level("INFO", logger="vllm.nixl_etcd"):
        d._on_event(e, ev(EventKind.REMOVED, rev=11))
        d._on_event(e, ev(EventKind.ADDED, rev=12))
    assert [r.getMessage() for r in caplog.records] == [
        "nixl-etcd: remote engine p rank 0 left in ETCD (incarnation a); its NIXL agents are "
        "released when a request needs it or after 60 s, unless it comes back unchanged",
        "nixl-etcd: remote engine p rank 0 is back in ETCD (incarnation a, unchanged); its "
        "NIXL agents stay",
    ]
