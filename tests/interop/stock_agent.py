#!/usr/bin/env python3
"""A stock NIXL agent for nixl-etcd's interop tests (tests/nixl_interop.rs).

It uses ONLY NIXL's built-in etcd exchange: the test sets NIXL_ETCD_ENDPOINTS
and NIXL_ETCD_NAMESPACE, and this script calls nothing but NIXL's own Python
API (send_local_metadata, fetch_remote_metadata, check_remote_metadata). What
it proves, driven by the test against the Rust side (examples/nixl_interop.rs):

  publish NAME SIZE
      Creates agent NAME (UCX), registers a DRAM buffer of SIZE bytes filled
      with the shared pattern, and publishes it with send_local_metadata.
      Prints {"ready":true,"addr":A,"len":SIZE}, then stays alive (its memory
      must stay readable) until stdin closes.

  fetch NAME REMOTE ADDR LEN
      Creates agent NAME (UCX), asks NIXL's exchange for REMOTE's metadata
      (fetch_remote_metadata) and polls check_remote_metadata until it is
      loaded: {"loaded":true,"fetch_ms":T}. Then READs LEN bytes at the
      remote ADDR into a registered local buffer and checks every byte:
      {"verified":LEN}. Then keeps polling check_remote_metadata every 5 ms and
      prints {"invalidated_at":UNIX_TIME} when it turns false (NIXL saw the
      remote agent's marker key deleted and invalidated it), until the watch
      timeout passes or stdin closes.

The pattern (the same in the Rust example): byte i = (i * 7 + 3) % 251.

Every line on stdout is one JSON object (NIXL's own logging is sent to
stderr); failures print {"error": "..."} and
exit with a non-zero code:
  2 usage, 3 NIXL setup, 4 fetch timeout, 5 transfer failure, 6 data mismatch.
"""

import json
import os
import sys
import threading
import time

import numpy as np

# Our JSON lines go to the original stdout; everything else NIXL prints (its
# Python logger writes to stdout, its C++ core may too) goes to stderr, so the
# test reads clean JSON.
_OUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

FETCH_TIMEOUT_S = float(os.environ.get("INTEROP_FETCH_TIMEOUT_S", "30"))
XFER_TIMEOUT_S = float(os.environ.get("INTEROP_XFER_TIMEOUT_S", "30"))
WATCH_TIMEOUT_S = float(os.environ.get("INTEROP_WATCH_TIMEOUT_S", "60"))
POLL_S = 0.005

USAGE = (
    "usage: stock_agent.py publish NAME SIZE\n"
    "       stock_agent.py fetch NAME REMOTE ADDR LEN"
)


def emit(**fields):
    print(json.dumps(fields), file=_OUT, flush=True)


def fail(code, message):
    emit(error=message)
    print(f"stock_agent: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def pattern(n):
    """byte i = (i * 7 + 3) % 251, as uint8."""
    i = np.arange(n, dtype=np.uint64)
    return ((i * 7 + 3) % 251).astype(np.uint8)


def stdin_closed_event():
    """An event set once stdin reaches EOF (the test closed it or died)."""
    closed = threading.Event()

    def reader():
        # os.read on the raw fd: no buffered-reader lock that a daemon thread
        # could still hold while the interpreter shuts down.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        closed.set()

    threading.Thread(target=reader, name="stdin-eof", daemon=True).start()
    return closed


def make_agent(name):
    if not os.environ.get("NIXL_ETCD_ENDPOINTS"):
        fail(2, "NIXL_ETCD_ENDPOINTS is not set: NIXL's etcd exchange would be off")
    try:
        from nixl._api import nixl_agent, nixl_agent_config

        agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    except Exception as e:  # NIXL missing, or UCX failed
        fail(3, f"cannot create NIXL agent {name} with UCX: {e!r}")
    if "UCX" not in agent.backends:
        fail(3, f"NIXL agent {name} has no UCX backend (plugins: {agent.plugin_list})")
    return agent


def register(agent, buf):
    addr = buf.ctypes.data
    try:
        agent.register_memory([(addr, buf.nbytes, 0, "")], "DRAM")
    except Exception as e:
        fail(3, f"register_memory of {buf.nbytes} bytes failed: {e!r}")
    return addr


def publish(name, size):
    agent = make_agent(name)
    buf = pattern(size)
    addr = register(agent, buf)
    closed = stdin_closed_event()
    try:
        agent.send_local_metadata()
    except Exception as e:
        fail(3, f"send_local_metadata failed: {e!r}")
    emit(ready=True, addr=addr, len=size)
    # Serve reads of `buf` until the test closes our stdin.
    closed.wait()
    # Keep `buf` alive up to here.
    assert buf.nbytes == size


def fetch(name, remote, raddr, length):
    agent = make_agent(name)
    closed = stdin_closed_event()
    started = time.monotonic()
    try:
        agent.fetch_remote_metadata(remote)
    except Exception as e:
        fail(3, f"fetch_remote_metadata({remote!r}) failed: {e!r}")
    deadline = started + FETCH_TIMEOUT_S
    while not agent.check_remote_metadata(remote):
        if time.monotonic() >= deadline:
            fail(
                4,
                f"remote agent {remote!r} not loaded within {FETCH_TIMEOUT_S:.1f} s "
                f"(namespace {os.environ.get('NIXL_ETCD_NAMESPACE', '/nixl/agents/')!r})",
            )
        time.sleep(0.001)
    fetch_ms = (time.monotonic() - started) * 1000.0
    emit(loaded=True, fetch_ms=round(fetch_ms, 3))

    local = np.zeros(length, dtype=np.uint8)
    laddr = register(agent, local)
    try:
        ldescs = agent.get_xfer_descs([(laddr, length, 0)], "DRAM")
        rdescs = agent.get_xfer_descs([(raddr, length, 0)], "DRAM")
        handle = agent.initialize_xfer("READ", ldescs, rdescs, remote)
        state = agent.transfer(handle)
    except Exception as e:
        fail(5, f"READ of {length} bytes from {remote!r} could not start: {e!r}")
    deadline = time.monotonic() + XFER_TIMEOUT_S
    while state == "PROC":
        if time.monotonic() >= deadline:
            fail(5, f"READ of {length} bytes not complete within {XFER_TIMEOUT_S:.1f} s")
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        fail(5, f"READ of {length} bytes from {remote!r} ended in state {state}")
    handle.release()
    expected = pattern(length)
    bad = np.flatnonzero(local != expected)
    if bad.size:
        first = int(bad[0])
        fail(
            6,
            f"{bad.size} of {length} bytes differ; first at {first}: "
            f"got {int(local[first])}, expected {int(expected[first])}",
        )
    emit(verified=length)

    # Watch for the invalidation NIXL applies when the remote's marker goes.
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not closed.is_set() and time.monotonic() < deadline:
        if not agent.check_remote_metadata(remote):
            emit(invalidated_at=time.time())
            return
        time.sleep(POLL_S)
    emit(still_loaded=True, stdin_closed=closed.is_set())


def parse(argv):
    """(mode, args) or None when the arguments are wrong."""
    try:
        if len(argv) == 3 and argv[0] == "publish":
            size = int(argv[2])
            return ("publish", (argv[1], size)) if size > 0 else None
        if len(argv) == 5 and argv[0] == "fetch":
            raddr, length = int(argv[3]), int(argv[4])
            if raddr > 0 and length > 0:
                return ("fetch", (argv[1], argv[2], raddr, length))
    except ValueError:
        pass
    return None


def main(argv):
    parsed = parse(argv)
    if parsed is None:
        fail(2, f"bad arguments {argv!r}\n{USAGE}")
    mode, args = parsed
    if mode == "publish":
        publish(*args)
    else:
        fetch(*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
