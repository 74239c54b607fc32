"""The vLLM plugin's prefill side (nixl_etcd.vllm.publish) against a real etcd,
without vLLM: an engine that cannot reach etcd when it starts is published in
the background once etcd answers, with one WARNING and one INFO; closing it
withdraws its ranks."""

from __future__ import annotations

import logging
import uuid

import pytest

import nixl_etcd
from conftest import Etcd, wait_until
from nixl_etcd.vllm import publish


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list:
    return [r.getMessage() for r in caplog.records
            if r.name == "vllm.nixl_etcd" and r.levelno == level]


def test_a_prefill_started_while_etcd_is_down_is_published_when_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="vllm.nixl_etcd")
    etcd = Etcd().start()
    ns = f"/pytest-publish/{uuid.uuid4().hex[:8]}"
    factory = lambda **kw: nixl_etcd.Client(  # noqa: E731
        endpoints=etcd.endpoint, namespace=ns, timeout_s=1, **kw)
    reader = None
    p = None
    try:
        etcd.stop()
        ranks = {0: b"rank 0 payload", 1: b"rank\x00one"}
        p = publish.start("prefill_late", ranks, "127.0.0.1:5600", client_factory=factory)
        assert not p.published.is_set()
        warned = messages(caplog, logging.WARNING)
        assert len(warned) == 1 and warned[0].startswith(
            "ETCD coordination failed (ETCD connection failed: ")
        assert ("engine prefill_late is NOT published in ETCD and is reachable only through "
                "vLLM's ZMQ side channel at 127.0.0.1:5600; nixl-etcd keeps trying") in warned[0]
        etcd.restart()
        assert p.published.wait(timeout=60)
        reader = nixl_etcd.Client(endpoints=etcd.endpoint, namespace=ns, timeout_s=10)
        assert reader.lookup("prefill_late", 0) == ranks[0]
        assert reader.lookup("prefill_late", 1) == ranks[1]
        assert reader.lookup_record("prefill_late", 1).world_size == 2
        assert len(messages(caplog, logging.WARNING)) == 1
        info = [m for m in messages(caplog, logging.INFO)
                if m.startswith("nixl-etcd: engine prefill_late published 2 rank(s) in ETCD "
                                "(world size 2) after ")]
        assert len(info) == 1, messages(caplog, logging.INFO)
        # Withdrawn at shutdown: the lease is revoked.
        publish.close(p)
        p = None
        assert wait_until(lambda: _absent(reader, "prefill_late", 0), timeout=30)
    finally:
        publish.close(p)
        if reader is not None:
            reader.close()
        etcd.cleanup()


def test_closing_while_etcd_is_down_stops_the_retries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vllm.nixl_etcd")
    etcd = Etcd().start()
    try:
        etcd.stop()
        factory = lambda **kw: nixl_etcd.Client(  # noqa: E731
            endpoints=etcd.endpoint, timeout_s=1, **kw)
        p = publish.start("never", {0: b"x"}, "127.0.0.1:5601", client_factory=factory)
        thread = p._thread
        assert thread is not None and thread.is_alive()
        publish.close(p)
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert not p.published.is_set()
        assert p not in publish._live
    finally:
        etcd.cleanup()


def _absent(client: nixl_etcd.Client, engine: str, rank: int) -> bool:
    try:
        client.lookup(engine, rank)
    except nixl_etcd.NotFound:
        return True
    return False


def test_new_payloads_of_a_published_engine_are_an_update_not_a_restart(etcd) -> None:
    ns = f"/pytest-publish/{uuid.uuid4().hex[:8]}"
    opts = dict(endpoints=etcd.endpoint, namespace=ns, timeout_s=10)
    factory = lambda **kw: nixl_etcd.Client(**opts, **kw)  # noqa: E731
    reader = nixl_etcd.Client(**opts)
    p = publish.start("prefill_rereg", {0: b"first"}, "127.0.0.1:5602", client_factory=factory)
    try:
        before = reader.lookup_record("prefill_rereg", 0)
        with reader.subscribe("prefill_rereg") as events:
            p.republish({0: b"second"})
            assert p.published.is_set()
            kinds = []
            while True:
                ev = events.get(timeout=30)
                assert ev is not None
                kinds.append(ev.kind)
                if ev.kind != nixl_etcd.EventKind.ADDED:
                    break
        assert kinds[-1] == nixl_etcd.EventKind.UPDATED, kinds
        after = reader.lookup_record("prefill_rereg", 0)
        assert after.metadata == b"second"
        assert after.incarnation == before.incarnation
    finally:
        publish.close(p)
        reader.close()
