"""Every Client call against a real etcd, and every error it raises."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time

import pytest

import nixl_etcd
from conftest import engine, wait_until

BLOB = bytes(range(256)) * 8 + b"\x00tail\x00"  # binary, NUL bytes included


def test_register_lookup_unregister(open_client):
    c = open_client()
    e = engine()
    c.register(e, 0, BLOB)
    assert c.lookup(e, 0) == BLOB
    c.register(e, 0, b"replaced")
    assert c.lookup(e, 0) == b"replaced"
    c.unregister(e, 0)
    with pytest.raises(nixl_etcd.NotFound):
        c.lookup(e, 0)


def test_log_lines_reach_python_logging_not_stderr(open_client, caplog, capfd):
    caplog.set_level(logging.INFO, logger="nixl_etcd")
    nixl_etcd.log_to_python()
    try:
        c = open_client()
        e = engine()
        c.register(e, 0, BLOB)
    finally:
        nixl_etcd.log_to_stderr()
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        ("nixl_etcd.client.write", logging.INFO, f"Initialized NIXL ETCD coordinator: engine_id={e}"),
        ("nixl_etcd.client.write", logging.INFO, "Registered NIXL agent with ETCD"),
    ]
    assert capfd.readouterr().err == ""
    # Back on stderr, in the guide's format.
    c.register(e, 0, BLOB)
    assert capfd.readouterr().err == "INFO: Registered NIXL agent with ETCD\n"


def test_other_client_sees_registration(open_client):
    a, b = open_client(), open_client()
    e = engine()
    a.register(e, 3, BLOB)
    assert b.lookup(e, 3) == BLOB
    assert b.wait(e, 3, timeout=1) == BLOB


def test_bytes_like_inputs(open_client):
    c = open_client()
    e = engine()
    c.register(e, 0, bytearray(BLOB))
    assert c.lookup(e, 0) == BLOB
    c.register(e, 1, memoryview(BLOB)[10:20])
    assert c.lookup(e, 1) == BLOB[10:20]
    c.register(e, 2, b"")
    assert c.lookup(e, 2) == b""
    np = pytest.importorskip("numpy")
    arr = np.arange(64, dtype=np.uint32)
    c.register(e, 3, arr)
    assert c.lookup(e, 3) == arr.tobytes()
    c.register(e, 4, arr[::2])  # not contiguous: copied
    assert c.lookup(e, 4) == arr[::2].tobytes()


def test_lookup_record(open_client):
    c = open_client(host="node1.example.com", world_size=4)
    e = engine()
    before = time.time() * 1000
    c.register(e, 2, BLOB)
    rec = c.lookup_record(e, 2)
    assert isinstance(rec, nixl_etcd.Record)
    assert rec.engine_id == e and rec.rank == 2
    assert rec.world_size == 4
    assert rec.host == "node1.example.com"
    assert rec.pid == os.getpid()
    assert rec.incarnation
    assert before - 5000 <= rec.registered_at_ms <= time.time() * 1000 + 5000
    assert rec.revision > 0
    assert rec.metadata == BLOB
    # another client of the same process: a different incarnation
    d = open_client()
    d.register(e, 5, b"x")
    other = c.lookup_record(e, 5)
    assert other.incarnation != rec.incarnation
    assert other.world_size is None
    with pytest.raises(nixl_etcd.NotFound):
        c.lookup_record(e, 9)


def test_recheck_tells_a_restart_from_a_departure(open_client):
    reader, first = open_client(), open_client()
    e = engine()
    first.register(e, 0, b"old")
    old = first.lookup_record(e, 0)
    assert reader.recheck(e, 0) == old
    first.close()
    with pytest.raises(nixl_etcd.NotFound, match=f"^Engine {e} not found in ETCD"):
        reader.recheck(e, 0)
    second = open_client()
    second.register(e, 0, b"new")
    rec = reader.recheck(e, 0)
    assert rec == second.lookup_record(e, 0)
    assert rec.incarnation != old.incarnation and rec.metadata == b"new"


def test_host_from_environment(open_client, monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "from-env.example")
    c = open_client()
    e = engine()
    c.register(e, 0, b"x")
    assert c.lookup_record(e, 0).host == "from-env.example"


def test_environment_only_client(etcd, ns, monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_ETCD_ENDPOINTS", etcd.endpoint)
    monkeypatch.setenv("VLLM_NIXL_ETCD_NAMESPACE", ns)
    with nixl_etcd.Client() as c:
        assert c.options_json is None
        e = engine()
        c.register(e, 0, b"env")
        # the guide's key layout, under the namespace from the environment
        assert etcd.ctl("get", f"{ns}/{e}/rank_0", "--keys-only").strip() == f"{ns}/{e}/rank_0".encode()


def test_wait_returns_when_registered(open_client):
    a, b = open_client(), open_client()
    e = engine()
    t = threading.Timer(0.3, a.register, args=(e, 1, BLOB))
    t.start()
    started = time.monotonic()
    assert b.wait(e, 1, timeout=5) == BLOB
    elapsed = time.monotonic() - started
    t.join()
    assert 0.2 < elapsed < 3, elapsed


def test_wait_timeout_message(open_client):
    c = open_client()
    e = engine("prefill_engine")
    started = time.monotonic()
    with pytest.raises(nixl_etcd.Timeout) as exc:
        c.wait(e, 0, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 3
    assert str(exc.value).startswith(f"Timeout waiting for engine {e} (rank 0)")
    assert exc.value.status == -4


def test_wait_default_timeout_is_the_clients(open_client):
    c = open_client(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(nixl_etcd.Timeout) as exc:
        c.wait(engine(), 0)
    assert 0.4 < time.monotonic() - started < 3
    assert "after 0.5 s" in str(exc.value)


def test_wait_engine(open_client):
    e = engine()
    ranks = [open_client(world_size=3) for _ in range(3)]
    ranks[0].register(e, 0, b"r0")
    ranks[2].register(e, 2, b"r2")
    waiter = open_client()
    with pytest.raises(nixl_etcd.Timeout) as exc:
        waiter.wait_engine(e, timeout=0.3)
    assert "missing rank(s) 1 of world size 3" in str(exc.value)
    threading.Timer(0.2, ranks[1].register, args=(e, 1, b"r1")).start()
    assert waiter.wait_engine(e, timeout=5) == 3


def test_publish_fetch_unpublish_nixl(open_client, etcd, ns):
    nixl_ns = f"{ns}-nixl"
    a = open_client(nixl_namespace=nixl_ns)
    b = open_client(nixl_namespace=nixl_ns)
    agent = engine("agent")
    a.publish_nixl(agent, BLOB)
    assert b.fetch_nixl(agent, timeout=1) == BLOB
    a.publish_nixl(agent, b"partial", label="conn")
    assert b.fetch_nixl(agent, "conn", timeout=0) == b"partial"
    # NIXL's own layout: marker and raw value
    keys = etcd.ctl("get", "--prefix", f"{nixl_ns}/{agent}/", "--keys-only").split()
    assert sorted(keys) == sorted(
        k.encode() for k in (f"{nixl_ns}/{agent}/", f"{nixl_ns}/{agent}/metadata", f"{nixl_ns}/{agent}/conn")
    )
    a.unpublish_nixl(agent)
    with pytest.raises(nixl_etcd.Timeout) as exc:
        b.fetch_nixl(agent, timeout=0.2)
    assert str(exc.value).startswith(f"Timeout waiting for NIXL agent {agent}")
    with pytest.raises(nixl_etcd.NotFound):
        b.unpublish_nixl(agent)


def test_close_revokes_and_is_idempotent(open_client):
    a, b = open_client(), open_client()
    e = engine()
    a.register(e, 0, BLOB)
    assert b.lookup(e, 0) == BLOB
    a.close()
    a.close()  # no-op
    assert a.closed

    def gone() -> bool:
        try:
            b.lookup(e, 0)
            return False
        except nixl_etcd.NotFound:
            return True

    assert wait_until(gone, timeout=3)
    with pytest.raises(nixl_etcd.Closed) as exc:
        a.lookup(e, 0)
    assert "closed" in str(exc.value)
    assert exc.value.status == -6


def test_context_manager(etcd, ns):
    e = engine()
    with nixl_etcd.Client(endpoints=etcd.endpoint, namespace=ns) as c:
        c.register(e, 0, b"x")
        assert not c.closed
    assert c.closed
    with pytest.raises(nixl_etcd.Closed):
        c.register(e, 0, b"x")


def test_close_wakes_a_blocked_wait(open_client):
    c = open_client()
    result = {}

    def waiter():
        try:
            c.wait(engine(), 0, timeout=10)
        except nixl_etcd.NixlEtcdError as e:
            result["error"] = e

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    started = time.monotonic()
    c.close()
    t.join(5)
    assert not t.is_alive()
    assert time.monotonic() - started < 3
    assert isinstance(result["error"], nixl_etcd.Closed)


# -- errors -------------------------------------------------------------------


def test_connection_failed_message():
    with pytest.raises(nixl_etcd.ConnectionFailed) as exc:
        nixl_etcd.Client(endpoints=f"http://127.0.0.1:{free_dead_port()}", timeout_s=2)
    assert str(exc.value).startswith("ETCD connection failed")
    assert "VLLM_NIXL_ETCD_ENDPOINTS" in str(exc.value)
    assert exc.value.status == -2
    assert isinstance(exc.value, RuntimeError)


def free_dead_port() -> int:
    from conftest import free_port

    return free_port()  # bound then released: nothing listens


def test_not_found_message(open_client):
    c = open_client()
    with pytest.raises(nixl_etcd.NotFound) as exc:
        c.lookup("decode_engine", 0)
    assert str(exc.value).startswith("Engine decode_engine not found in ETCD")
    assert exc.value.status == -3


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.register("bad/id", 0, b"x"),
        lambda c: c.register("", 0, b"x"),
        lambda c: c.register("nul\0id", 0, b"x"),
        lambda c: c.register("ok", -1, b"x"),
        lambda c: c.register("ok", 2**32, b"x"),
        lambda c: c.register("ok", "0", b"x"),
        lambda c: c.register(b"ok", 0, b"x"),
        lambda c: c.register("ok", 0, "text"),
        lambda c: c.lookup("..", 0),
        lambda c: c.wait("ok", 0, timeout=-1),
        lambda c: c.wait("ok", 0, timeout=float("nan")),
        lambda c: c.publish_nixl("agent", b"x", label="a/b"),
    ],
)
def test_invalid_argument(open_client, call):
    c = open_client()
    with pytest.raises(nixl_etcd.InvalidArgument) as exc:
        call(c)
    assert exc.value.status == -1
    assert str(exc.value)


def test_invalid_option_and_environment(etcd, monkeypatch):
    with pytest.raises(nixl_etcd.InvalidArgument) as exc:
        nixl_etcd.Client(endpoints=etcd.endpoint, no_such_option=1)
    assert "no_such_option" in str(exc.value)
    with pytest.raises(nixl_etcd.InvalidArgument) as exc:
        nixl_etcd.Client(endpoints=etcd.endpoint, lease_ttl_s="ten")
    assert "lease_ttl_s" in str(exc.value)
    monkeypatch.setenv("VLLM_NIXL_ETCD_TIMEOUT", "soon")
    with pytest.raises(nixl_etcd.InvalidArgument) as exc:
        nixl_etcd.Client(endpoints=etcd.endpoint)
    assert "VLLM_NIXL_ETCD_TIMEOUT" in str(exc.value)


def test_too_large(open_client):
    c = open_client(max_metadata_bytes=64 * 1024)
    e = engine()
    with pytest.raises(nixl_etcd.TooLarge) as exc:
        c.register(e, 0, b"\x01" * (64 * 1024 + 1))
    assert exc.value.status == -5
    assert "65537 bytes" in str(exc.value)
    with pytest.raises(nixl_etcd.NotFound):  # nothing was written
        c.lookup(e, 0)


def test_metadata_over_one_request_round_trips(open_client):
    writer = open_client(max_request_bytes=64 * 1024)
    reader = open_client()
    e = engine()
    blob = bytes((i * 131 + 7) % 256 for i in range(1 << 20))
    writer.register(e, 0, blob)
    assert reader.wait(e, 0, timeout=5.0) == blob
    assert writer.lookup(e, 0) == blob


def test_bad_record(open_client, etcd, ns):
    c = open_client()
    e = engine()
    etcd.ctl("put", f"{ns}/{e}/rank_0", "this is not a record")
    with pytest.raises(nixl_etcd.BadRecord) as exc:
        c.lookup(e, 0)
    assert exc.value.status == -8
    assert f"{ns}/{e}/rank_0" in str(exc.value)


def test_nixl_calls(open_client):
    c = open_client()
    if nixl_etcd.Client.has_nixl_support():
        # a build with the `nixl` feature: the exports are bound and check
        # their arguments (NULL agent)
        with pytest.raises(nixl_etcd.InvalidArgument, match="agent is NULL"):
            c.publish_agent(engine(), 0, 0)
        with pytest.raises(nixl_etcd.InvalidArgument, match="agent is NULL"):
            c.load_remote_agent(0, engine(), 0, timeout=0.1)
    else:
        with pytest.raises(nixl_etcd.NixlError, match="--features nixl"):
            c.publish_agent(engine(), 0, 0)
        with pytest.raises(nixl_etcd.NixlError):
            c.load_remote_agent(0, engine(), 0)
    nixl_etcd._ffi.lib().nixl_etcd_string_free(None)  # NULL: a no-op


def test_error_messages_are_per_thread(open_client):
    """nixl_etcd_last_error is thread-local: concurrent failures keep their own message."""
    c = open_client()
    results = {}
    barrier = threading.Barrier(8)

    def fail(i: int) -> None:
        barrier.wait()
        for _ in range(50):
            try:
                c.lookup(f"missing_{i}", i)
            except nixl_etcd.NotFound as e:
                if f"missing_{i} not found" not in str(e) or f"rank {i}," not in str(e):
                    results[i] = str(e)
                    return
        results[i] = "ok"

    threads = [threading.Thread(target=fail, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: "ok" for i in range(8)}


def test_returned_memory_is_freed(open_client):
    """Buffers and records are released by the library: RSS stays flat."""
    c = open_client()
    e = engine()
    blob = os.urandom(256 * 1024)
    c.register(e, 0, blob)
    for _ in range(20):
        c.lookup(e, 0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(1500):  # would leak ~375 MiB per call kind
        assert len(c.lookup(e, 0)) == len(blob)
        assert len(c.lookup_record(e, 0).metadata) == len(blob)
        assert len(c.wait(e, 0, timeout=1)) == len(blob)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mib < 64, f"max RSS grew by {grown_mib:.0f} MiB"


def test_fork_child_opens_its_own_client(open_client, etcd, ns):
    """The inherited client is CLOSED in a child; a client the child opens works."""
    parent = open_client()
    e = engine()
    parent.register(e, 0, b"parent")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 1
        try:
            try:
                parent.lookup(e, 0)
                msg = "inherited client still works"
            except nixl_etcd.Closed:
                with nixl_etcd.Client(endpoints=etcd.endpoint, namespace=ns) as own:
                    msg = "ok" if own.lookup(e, 0) == b"parent" else "wrong data"
            code = 0 if msg == "ok" else 1
        except BaseException as ex:  # noqa: BLE001
            msg = f"{type(ex).__name__}: {ex}"
        os.write(w, msg.encode()[:500])
        os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 1000).decode()
    os.close(r)
    assert msg == "ok" and os.WEXITSTATUS(status) == 0, msg
    assert parent.lookup(e, 0) == b"parent"  # the parent's lease is untouched


def test_secrets_never_shown(private_etcd, ns, caplog, capfd, monkeypatch):
    """An open client with an etcd password: repr, attributes, exceptions and
    log lines never contain the password."""
    secret = "pw-7f3a9c1e-never-shown"
    private_etcd.ctl("user", "add", f"root:{secret}")
    private_etcd.ctl("auth", "enable")
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RUST_LOG", "debug")
    seen = []
    with nixl_etcd.Client(
        endpoints=private_etcd.endpoint, namespace=ns, timeout_s=5, username="root", password=secret
    ) as c:
        e = engine()
        c.register(e, 0, b"x")
        seen += [repr(c), str(c), repr(vars(c)), str(c.options_json)]
        with pytest.raises(nixl_etcd.NotFound) as nf:
            c.lookup(e, 1)
        seen += [str(nf.value), repr(nf.value)]
        assert '"password": "<redacted>"' in c.options_json
    with pytest.raises(nixl_etcd.PermissionDenied) as bad:
        nixl_etcd.Client(endpoints=private_etcd.endpoint, namespace=ns, timeout_s=5,
                         username="root", password=secret + "-wrong")
    seen += [str(bad.value), repr(bad.value)]
    seen += [r.getMessage() for r in caplog.records]
    seen += list(capfd.readouterr())
    leaked = [s for s in seen if secret in s]
    assert leaked == []


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_what_the_client_did(open_client):
    """nixl_etcd.metrics(): the OpenMetrics text of the process's counters,
    each moved by exactly the calls made."""
    before = nixl_etcd.metrics()
    c = open_client()
    e = engine("metrics")
    c.register(e, 0, b"x")
    c.register(e, 1, b"y")
    assert c.wait(e, 1, timeout=30) == b"y"
    after = nixl_etcd.metrics()
    for series, moved in [
        ('nixl_etcd_registrations_total{result="ok"}', 2),
        ('nixl_etcd_waits_total{result="found"}', 1),
        ("nixl_etcd_wait_seconds_count", 1),
    ]:
        assert _sample(after, series) - _sample(before, series) == moved, (series, after)
    assert "# TYPE nixl_etcd_lease_grants counter" in after
    assert after.endswith("# EOF\n")


def test_lease_health_of_a_fresh_client_is_kept(open_client):
    c = open_client()
    h = c.lease_health()
    assert h["condition"] == "kept" and h["regrants"] == 0, h
    assert abs(h["since"] - time.time()) < 600, h
