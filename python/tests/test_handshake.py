"""EtcdHandshake: the vLLM-style publish/fetch, and the fallback to the direct
handshake that the guide's "Migration from Direct ZMQ" section promises."""

from __future__ import annotations

import logging
import threading

import pytest

import nixl_etcd
from nixl_etcd import EtcdHandshake
from conftest import engine, free_port


def payload(engine_id: str, rank: int) -> bytes:
    return f"{engine_id}/{rank}:".encode() + bytes([rank]) * 100 + b"\x00"


class Direct:
    """A stand-in for the engine's direct (ZMQ) handshake, counting its calls."""

    def __init__(self, engine_id: str):
        self.engine_id = engine_id
        self.calls = []

    def __call__(self, remote_rank: int) -> bytes:
        self.calls.append(remote_rank)
        return b"direct:" + payload(self.engine_id, remote_rank)


def warnings_of(caplog, level=logging.WARNING):
    return [r for r in caplog.records if r.name == "nixl_etcd" and r.levelno == level]


@pytest.fixture
def opts(etcd, ns):
    return {"endpoints": etcd.endpoint, "namespace": ns, "timeout_s": 5}


@pytest.mark.parametrize("prefill_tp,decode_tp", [(1, 1), (4, 8), (8, 4), (2, 2)])
def test_publish_and_fetch_through_etcd(monkeypatch, opts, prefill_tp, decode_tp):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    e = engine("prefill")
    prefill = [EtcdHandshake(world_size=prefill_tp, **opts) for _ in range(prefill_tp)]
    try:
        for r, hs in enumerate(prefill):
            assert hs.publish(e, r, payload(e, r)) is True
        with EtcdHandshake(**opts) as decode:
            for local_rank in range(decode_tp):
                got = decode.fetch(e, decode_tp, local_rank, prefill_tp, timeout=5)
                expected = nixl_etcd.target_ranks(decode_tp, local_rank, prefill_tp)
                assert sorted(got) == expected
                assert all(got[r] == payload(e, r) for r in expected)
            # the remote TP size learned from the records (world_size)
            got = decode.fetch(e, decode_tp, 0, None, timeout=5)
            assert sorted(got) == nixl_etcd.target_ranks(decode_tp, 0, prefill_tp)
    finally:
        for hs in prefill:
            hs.close()


def test_fetch_waits_for_a_late_prefill(monkeypatch, opts):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    e = engine("prefill")
    with EtcdHandshake(**opts) as prefill, EtcdHandshake(**opts) as decode:
        t = threading.Timer(0.3, prefill.publish, args=(e, 0, payload(e, 0)))
        t.start()
        assert decode.fetch(e, 1, 0, 1, timeout=5) == {0: payload(e, 0)}
        t.join()


def test_explicit_client_is_used_and_left_open(opts):
    c = nixl_etcd.Client(**opts)
    try:
        e = engine()
        hs = EtcdHandshake(c, use_etcd=True)
        assert hs.publish(e, 0, b"md")
        assert hs.fetch(e, 1, 0, 1) == {0: b"md"}
        hs.close()
        assert not c.closed
        with pytest.raises(nixl_etcd.InvalidArgument):
            EtcdHandshake(c, timeout_s=1)
    finally:
        c.close()


# -- fallback -----------------------------------------------------------------


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_etcd_unreachable_at_open_falls_back_to_direct(monkeypatch, caplog):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    e = engine("prefill")
    direct = Direct(e)
    hs = EtcdHandshake(direct=direct, endpoints=dead_endpoint(), timeout_s=1)
    with caplog.at_level(logging.INFO, logger="nixl_etcd"):
        got = hs.fetch(e, 4, 1, 8)
    assert got == {2: direct(2), 3: direct(3)}
    assert direct.calls[:2] == [2, 3]
    [w] = warnings_of(caplog)
    msg = w.getMessage()
    assert "ETCD coordination failed" in msg and "direct handshake" in msg
    assert "ETCD connection failed" in msg  # the library's reason
    # publishing degrades too (the peers use the direct handshake)
    with caplog.at_level(logging.INFO, logger="nixl_etcd"):
        assert hs.publish(e, 0, b"md") is False
    assert "ETCD coordination failed" in warnings_of(caplog)[-1].getMessage()


def test_etcd_unreachable_without_direct_raises(monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    hs = EtcdHandshake(endpoints=dead_endpoint(), timeout_s=1)
    with pytest.raises(nixl_etcd.ConnectionFailed) as exc:
        hs.fetch(engine(), 1, 0, 1)
    assert str(exc.value).startswith("ETCD connection failed")
    with pytest.raises(nixl_etcd.ConnectionFailed):
        hs.publish(engine(), 0, b"md")


def test_etcd_dies_during_the_fetch_falls_back(monkeypatch, private_etcd, ns, caplog):
    """etcd goes away while the decode waits: Timeout from an unreachable etcd -> direct."""
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    e = engine("prefill")
    direct = Direct(e)
    hs = EtcdHandshake(direct=direct, endpoints=private_etcd.endpoint, namespace=ns, timeout_s=2)
    hs.client  # connected
    threading.Timer(0.3, private_etcd.stop).start()
    with caplog.at_level(logging.WARNING, logger="nixl_etcd"):
        got = hs.fetch(e, 1, 0, 1, timeout=1.5)
    assert got == {0: direct(0)}
    [w] = warnings_of(caplog)
    assert "ETCD coordination failed" in w.getMessage()
    assert "Timeout" in w.getMessage()
    with pytest.raises(nixl_etcd.ConnectionFailed):
        hs.close()  # the lease cannot be revoked: it expires instead


def test_etcd_dies_without_direct_raises(monkeypatch, private_etcd, ns):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    hs = EtcdHandshake(endpoints=private_etcd.endpoint, namespace=ns, timeout_s=2)
    hs.client
    private_etcd.stop()
    with pytest.raises(nixl_etcd.Timeout):
        hs.fetch(engine(), 1, 0, 1, timeout=0.5)


def test_missing_remote_with_healthy_etcd_is_not_a_fallback(monkeypatch, opts, caplog):
    """The remote never registered, etcd answers: the Timeout is the answer."""
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    direct = Direct("x")
    with EtcdHandshake(direct=direct, **opts) as hs:
        with pytest.raises(nixl_etcd.Timeout) as exc:
            hs.fetch("prefill_engine", 1, 0, 1, timeout=0.3)
    assert str(exc.value).startswith("Timeout waiting for engine prefill_engine")
    assert direct.calls == []
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("value", [None, "0"])
def test_disabled_goes_straight_to_direct(monkeypatch, caplog, value):
    if value is None:
        monkeypatch.delenv("VLLM_NIXL_USE_ETCD", raising=False)
    else:
        monkeypatch.setenv("VLLM_NIXL_USE_ETCD", value)
    e = engine("prefill")
    direct = Direct(e)
    # endpoints nobody serves: proves etcd is not even tried
    hs = EtcdHandshake(direct=direct, endpoints=dead_endpoint(), timeout_s=1)
    assert not hs.use_etcd
    with caplog.at_level(logging.INFO, logger="nixl_etcd"):
        assert hs.fetch(e, 2, 0, 4) == {0: direct(0), 1: direct(1)}
        assert hs.publish(e, 0, b"md") is False
    infos = warnings_of(caplog, logging.INFO)
    assert len(infos) == 2
    assert all("ETCD coordination disabled" in r.getMessage() for r in infos)
    assert "direct handshake" in infos[0].getMessage()
    assert warnings_of(caplog) == []
    assert hs._client is None  # never opened


def test_disabled_without_direct_is_an_error(monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "0")
    with pytest.raises(nixl_etcd.InvalidArgument, match="disabled"):
        EtcdHandshake().fetch(engine(), 1, 0, 1)


def test_per_call_direct_and_forced_use_etcd(monkeypatch, opts):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "0")
    e = engine()
    with EtcdHandshake(use_etcd=True, **opts) as hs:  # forced on despite the variable
        assert hs.publish(e, 0, b"md")
        assert hs.fetch(e, 1, 0, 1) == {0: b"md"}
    direct = Direct(e)
    off = EtcdHandshake(use_etcd=False)
    assert off.fetch(e, 1, 0, 1, direct=direct) == {0: direct(0)}


def test_bad_sizes_are_not_a_fallback(monkeypatch):
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    hs = EtcdHandshake(direct=Direct("x"), endpoints=dead_endpoint(), timeout_s=1)
    with pytest.raises(nixl_etcd.InvalidArgument):
        hs.fetch(engine(), 3, 0, 2)


def test_with_signed_records_the_unsigned_direct_handshake_is_off_unless_allowed(
    monkeypatch, tmp_path
):
    """Records are signed: etcd unreachable does not open the door to an
    unauthenticated payload from the network, unless allowed on purpose."""
    monkeypatch.setenv("VLLM_NIXL_USE_ETCD", "1")
    monkeypatch.delenv("VLLM_NIXL_ETCD_ALLOW_UNSIGNED", raising=False)
    key = tmp_path / "hmac.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    e = engine("prefill")
    direct = Direct(e)
    hs = EtcdHandshake(direct=direct, endpoints=dead_endpoint(), timeout_s=1,
                       hmac_key_file=str(key))
    with pytest.raises(nixl_etcd.ConnectionFailed) as exc:
        hs.fetch(e, 1, 0, 1)
    assert str(exc.value).startswith("ETCD coordination failed (ETCD connection failed")
    assert str(exc.value).endswith(
        "and records are signed here (VLLM_NIXL_ETCD_HMAC_KEY_FILE) while vLLM's direct ZMQ "
        "handshake is not authenticated, so it is not used; set "
        "VLLM_NIXL_ETCD_ALLOW_UNSIGNED=1 to allow it anyway")
    assert direct.calls == []
    monkeypatch.setenv("VLLM_NIXL_ETCD_ALLOW_UNSIGNED", "maybe")
    with pytest.raises(nixl_etcd.ConnectionFailed, match="'maybe' is not a boolean"):
        hs.fetch(e, 1, 0, 1)
    monkeypatch.setenv("VLLM_NIXL_ETCD_ALLOW_UNSIGNED", "1")
    assert hs.fetch(e, 1, 0, 1) == {0: direct(0)}
