"""Stock NIXL 1.5.1 agents (the nixl-cu12 wheel, Python API `nixl._api`) on etcd
with no code change: `nixl-etcd serve` behind NIXL_TCPSTORE_ENDPOINT, and the
in-process `Client.serve_nixl_store()`.

Each agent is its own process (stock_nixl_agent.py), as in a real fleet: the
store tells writers apart by process. The `nixl-etcd` binary is the one built
beside the library (target/release), or $NIXL_ETCD_CLI.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import uuid

import pytest

import nixl_etcd
from conftest import Etcd, wait_until
from store_helpers import HAVE_NIXL, Agent, Serve, key_lease, keys, names
from store_helpers import fleet, nixl_ns  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not HAVE_NIXL, reason="NIXL (pip nixl-cu12) is not installed")


def test_two_stock_agents_find_each_other_and_move_verified_bytes(etcd, nixl_ns, fleet):
    store = Serve(etcd, nixl_ns)
    fleet.append(store)
    t = names()
    a = Agent(f"A{t}", store.env, seed=3)
    b = Agent(f"B{t}", store.env, seed=5)
    fleet += [a, b]
    a.do("publish")
    b.do("publish")
    assert b.sees(a)
    assert a.sees(b)
    # Both in NIXL's etcd layout, each under a lease.
    for x in (a, b):
        assert sorted(keys(etcd, f"{nixl_ns}/{x.name}/")) == [
            f"{nixl_ns}/{x.name}/", f"{nixl_ns}/{x.name}/metadata"]
        assert key_lease(etcd, f"{nixl_ns}/{x.name}/metadata") > 0
    assert key_lease(etcd, f"{nixl_ns}/{a.name}/metadata") != key_lease(
        etcd, f"{nixl_ns}/{b.name}/metadata")
    r = b.reads(a)
    assert r == {"ok": True, "state": "DONE", "bad": 0}
    r = a.reads(b)
    assert r == {"ok": True, "state": "DONE", "bad": 0}

    # Partial metadata under a label, fetched by a third agent.
    a.do("publish_partial", "lbl")
    assert key_lease(etcd, f"{nixl_ns}/{a.name}/lbl") > 0
    c = Agent(f"C{t}", store.env, seed=7)
    fleet.append(c)
    assert c.sees(a, label="lbl")
    assert c.reads(a)["bad"] == 0

    # Invalidate: every key of A goes at once.
    a.do("invalidate")
    assert wait_until(lambda: keys(etcd, f"{nixl_ns}/{a.name}/") == [], timeout=10)
    assert keys(etcd, f"{nixl_ns}/{b.name}/") != []
    assert "every lease revoked" in store.terminate()
    assert keys(etcd, f"{nixl_ns}/") == []


def test_a_sigkilled_publisher_loses_its_keys(etcd, nixl_ns, fleet):
    # A long TTL: only the store's watch on the process can delete the keys.
    store = Serve(etcd, nixl_ns, "--options", json.dumps({"lease_ttl_s": 600}))
    fleet.append(store)
    t = names()
    a = Agent(f"A{t}", store.env)
    b = Agent(f"B{t}", store.env)
    fleet += [a, b]
    a.do("publish")
    b.do("publish")
    assert b.sees(a)
    assert len(keys(etcd, f"{nixl_ns}/{a.name}/")) == 2
    a.kill()
    assert wait_until(lambda: keys(etcd, f"{nixl_ns}/{a.name}/") == [], timeout=30)
    assert len(keys(etcd, f"{nixl_ns}/{b.name}/")) == 2
    # A new process under the same name is found again.
    a2 = Agent(a.name, store.env, seed=9)
    fleet.append(a2)
    a2.do("publish")
    c = Agent(f"C{t}", store.env)
    fleet.append(c)
    assert c.sees(a2)
    assert c.reads(a2)["bad"] == 0


def test_a_sigkilled_store_leaves_keys_that_expire_with_the_lease(etcd, nixl_ns, fleet):
    store = Serve(etcd, nixl_ns, "--options", json.dumps({"lease_ttl_s": 2}))
    fleet.append(store)
    a = Agent(f"A{names()}", store.env)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: len(keys(etcd, f"{nixl_ns}/{a.name}/")) == 2, timeout=10)
    lease = key_lease(etcd, f"{nixl_ns}/{a.name}/metadata")
    assert "granted with TTL(2s)" in etcd.ctl("lease", "timetolive", format(lease, "x")).decode()
    store.kill()
    assert wait_until(lambda: keys(etcd, f"{nixl_ns}/{a.name}/") == [], timeout=30)


def test_mixed_fleet_nixl_etcd_backend_store_and_c_api(etcd, nixl_ns, fleet):
    """One agent on NIXL's own etcd backend, one through the store, one whose
    metadata goes through this library's C API (Python binding): each finds
    the others and reads their bytes."""
    store = Serve(etcd, nixl_ns)
    fleet.append(store)
    t = names()
    e = Agent(f"E{t}", {"NIXL_ETCD_ENDPOINTS": etcd.endpoint, "NIXL_ETCD_NAMESPACE": nixl_ns},
              seed=11)
    s = Agent(f"S{t}", store.env, seed=13)
    c = Agent(f"C{t}", {}, seed=17)
    fleet += [e, s, c]
    api = nixl_etcd.Client(endpoints=etcd.endpoint, namespace=f"/pytest-ranks/{t}",
                           nixl_namespace=nixl_ns, timeout_s=10)
    try:
        e.do("publish")
        s.do("publish")
        api.publish_nixl(c.name, bytes.fromhex(c.do("metadata")["hex"]))
        # The store's agent and NIXL's etcd agent find each other and C.
        assert s.sees(e) and s.sees(c)
        assert e.sees(s) and e.sees(c)
        # C loads both through the library.
        for other in (e, s):
            blob = api.fetch_nixl(other.name, timeout=10)
            assert c.do("load", blob.hex())["name"] == other.name
        for reader, src in ((s, e), (s, c), (e, s), (e, c), (c, e), (c, s)):
            assert reader.reads(src) == {"ok": True, "state": "DONE", "bad": 0}, (
                reader.name, src.name)
    finally:
        api.close()


def test_in_process_store_of_the_python_client(etcd, nixl_ns, fleet):
    api = nixl_etcd.Client(endpoints=etcd.endpoint, namespace=f"/pytest-ranks/{names()}",
                           nixl_namespace=nixl_ns, timeout_s=10)
    try:
        endpoint = api.serve_nixl_store()
        assert endpoint.startswith("127.0.0.1:") and int(endpoint.split(":")[1]) > 0
        env = {"NIXL_TCPSTORE_ENDPOINT": endpoint}
        t = names()
        a, b = Agent(f"A{t}", env, seed=2), Agent(f"B{t}", env, seed=4)
        fleet += [a, b]
        a.do("publish")
        assert b.sees(a)
        assert b.reads(a)["bad"] == 0
        assert api.fetch_nixl(a.name, timeout=0) != b""
        with pytest.raises(nixl_etcd.InvalidArgument):
            api.serve_nixl_store("no port here")
    finally:
        api.close()
    # Closing the client stops the store and revokes its writers' leases.
    assert wait_until(lambda: keys(etcd, f"{nixl_ns}/") == [], timeout=10)


def test_in_process_store_options_are_checked_and_applied(etcd, nixl_ns):
    api = nixl_etcd.Client(endpoints=etcd.endpoint, namespace=f"/pytest-ranks/{names()}",
                           nixl_namespace=nixl_ns, timeout_s=10)
    try:
        with pytest.raises(nixl_etcd.InvalidArgument, match="unknown NIXL store option"):
            api.serve_nixl_store(max_conections=4)
        with pytest.raises(nixl_etcd.InvalidArgument,
                           match=r"max_connections \(--max-connections\)"):
            api.serve_nixl_store(max_connections=0)
        host, port = api.serve_nixl_store(max_connections=1, liveness="connection").rsplit(":", 1)
        first = socket.create_connection((host, int(port)), timeout=30)
        first.sendall(bytes([0]) + struct.pack("=I", 0x3C85F7CE) + bytes([13]) + struct.pack("=I", 7))
        assert first.recv(4) == struct.pack("=I", 7)
        # The cap is one connection: the second is closed by the store.
        second = socket.create_connection((host, int(port)), timeout=30)
        try:
            assert second.recv(1) == b""
        except ConnectionResetError:
            pass
        first.close()
        second.close()
    finally:
        api.close()


def _store_writes(endpoint: str, etcd: Etcd) -> bool:
    """One TCPStore SET + CHECK through the store, as NIXL sends them; true
    when it was written to etcd (a refused write closes the connection)."""
    import socket
    import struct

    host, port = endpoint.rsplit(":", 1)
    key = f"/probe/{uuid.uuid4().hex[:8]}".encode()
    try:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(bytes([0]) + struct.pack("=I", 0x3C85F7CE))
            s.sendall(bytes([1]) + struct.pack("=Q", len(key)) + key + struct.pack("=Q", 1) + b"x")
            s.sendall(bytes([5]) + struct.pack("=Q", 1) + struct.pack("=Q", len(key)) + key)
            if s.recv(1) != b"\x00":
                return False
    except OSError:
        return False
    return keys(etcd, "/nixl-etcd/tcpstore" + key.decode()) != []


def test_etcd_restart_reads_from_the_copy_then_recovers(private_etcd, nixl_ns, fleet):
    etcd = private_etcd
    store = Serve(etcd, nixl_ns, "--options", json.dumps({"timeout_s": 2}))
    fleet.append(store)
    t = names()
    a = Agent(f"A{t}", store.env, seed=21)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: len(keys(etcd, f"{nixl_ns}/{a.name}/")) == 2, timeout=10)
    etcd.stop()
    # etcd is down: a new agent still finds A (answered from the store's copy)
    # and reads its bytes.
    b = Agent(f"B{t}", store.env, seed=23)
    fleet.append(b)
    assert b.sees(a)
    assert b.reads(a)["bad"] == 0
    etcd.restart()
    # Back: once the store writes again, a publish made now is found, and A's
    # keys are still there.
    assert wait_until(lambda: _store_writes(store.endpoint, etcd), timeout=30)
    c = Agent(f"C{t}", store.env, seed=25)
    fleet.append(c)
    c.do("publish")
    assert b.sees(c)
    assert b.reads(c)["bad"] == 0
    assert len(keys(etcd, f"{nixl_ns}/{a.name}/")) == 2
    assert len(keys(etcd, f"{nixl_ns}/{c.name}/")) == 2


def _get(url: str):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_serve_metrics_health_and_readiness_over_http(private_etcd, nixl_ns, fleet):
    """`serve --metrics`: /metrics (OpenMetrics) moves when an agent
    publishes (its writer's lease); /healthz answers; /readyz says ready while
    etcd answers and 503 with the reason while it is down."""
    store = Serve(private_etcd, nixl_ns, "--metrics", "127.0.0.1:0")
    fleet.append(store)
    assert store.metrics_url and store.metrics_url.startswith("http://127.0.0.1:")
    status, kind, before = _get(store.metrics_url + "/metrics")
    assert (status, kind) == (200, "application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert before.endswith("# EOF\n")
    a = Agent(f"M{names()}", store.env)
    fleet.append(a)
    a.do("publish")
    assert wait_until(lambda: keys(private_etcd, f"{nixl_ns}/{a.name}/") != [], timeout=30)
    _, _, after = _get(store.metrics_url + "/metrics")
    assert _sample(after, "nixl_etcd_lease_grants_total") > _sample(before, "nixl_etcd_lease_grants_total")
    assert _get(store.metrics_url + "/healthz")[::2] == (200, "ok\n")
    assert _get(store.metrics_url + "/readyz")[::2] == (200, "ready: etcd answers\n")
    assert _get(store.metrics_url + "/nope")[0] == 404
    private_etcd.stop()
    status, _, body = _get(store.metrics_url + "/readyz")
    assert status == 503 and body.startswith("not ready: ETCD connection failed"), body
    assert _get(store.metrics_url + "/healthz")[0] == 200
