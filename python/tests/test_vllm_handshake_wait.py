"""The decode's wait for a remote engine (etcd, with vLLM's ZMQ side channel
asked meanwhile) sleeps: no busy-wait on vLLM's handshake thread.

The case that used to spin: the etcd wait has already ended with an error
(etcd unreachable) while the side-channel probe still waits for an answer;
the handshake thread then polled with a 20 ms wait that returned at once, a
core at 100 % holding the GIL for up to VLLM_NIXL_ETCD_TIMEOUT. Measured here
as the handshake thread's CPU time against the time the probe ran, in a
subprocess of the vLLM venv (the probe speaks vLLM's ZMQ message).

With signed records the side channel, which is not authenticated, is not
asked at all (unless VLLM_NIXL_ETCD_ALLOW_UNSIGNED=1)."""

from __future__ import annotations

import functools
import json
import os
import subprocess

from test_vllm_plugin import VPY  # skips, loudly, without the vLLM venv

SCRIPT = r'''
import json, threading, time, zmq
from nixl_etcd import errors
from nixl_etcd.vllm import state, transport
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import metadata
state.ORIG.setdefault("GET_META_MSG", metadata.GET_META_MSG)

class EtcdDown:
    """A client whose etcd cannot be reached: its wait fails at once."""
    def wait(self, engine_id, rank, timeout):
        raise errors.ConnectionFailed("ETCD connection failed: test")

ctx = zmq.Context()
silent = ctx.socket(zmq.ROUTER)  # a side channel that never answers
port = silent.bind_to_random_port("tcp://127.0.0.1")
probe_s = 1.5
cpu0, wall0 = time.thread_time(), time.monotonic()
try:
    transport.wait_or_side_channel(EtcdDown(), "engine", 0, 0, 0, "127.0.0.1", port, probe_s)
    raised = None
except errors.ConnectionFailed as e:
    raised = str(e)
cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
out = {"raised": raised, "cpu_s": cpu, "wall_s": wall, "probe_s": probe_s}

# Signed records: the side channel (unauthenticated) is not asked, unless allowed.
import os
probes = []
class Recorder(transport.SideChannelProbe):
    def __init__(self, *a, **kw):
        probes.append(a[:2])
        super().__init__(*a, **kw)
transport.SideChannelProbe = Recorder
os.environ["VLLM_NIXL_ETCD_HMAC_KEY_FILE"] = "/dev/null/key"  # only its presence counts here
for allow in ("", "1"):
    os.environ["VLLM_NIXL_ETCD_ALLOW_UNSIGNED"] = allow
    try:
        transport.wait_or_side_channel(EtcdDown(), "engine", 0, 0, 0, "127.0.0.1", port, 0.2)
    except errors.ConnectionFailed:
        pass
    out["probes_allow_" + (allow or "unset")] = len(probes)
print("@@" + json.dumps(out))
'''


@functools.lru_cache(maxsize=1)
def _run() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_TARGET_DEVICE"] = "cpu"
    proc = subprocess.run(
        [str(VPY), "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("@@")][-1][2:])


def test_waiting_on_the_side_channel_after_etcd_failed_does_not_spin() -> None:
    r = _run()
    print(f"handshake thread: {r['cpu_s'] * 1000:.1f} ms CPU over {r['wall_s']:.2f} s of wait")
    # etcd's error is the one reported, once the probe has had its time.
    assert r["raised"] == "ETCD connection failed: test"
    assert r["wall_s"] >= r["probe_s"]
    # Asleep while the probe runs: a spinning thread burns about as much CPU
    # as the time it waits.
    assert r["cpu_s"] < 0.1 * r["wall_s"], r


def test_with_signed_records_the_side_channel_is_not_asked_unless_allowed() -> None:
    r = _run()
    assert r["probes_allow_unset"] == 0
    assert r["probes_allow_1"] == 1
