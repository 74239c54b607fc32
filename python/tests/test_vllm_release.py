"""The vLLM plugin's decode side keeps nothing of remote engines that left:
a long-lived decode whose prefills restart under fresh engine ids (vLLM's
default engine_id is a new UUID at each start) is back at its baseline after
a thousand of them. Driven without vLLM: a publisher that is not an engine
registers and withdraws each id, and a stand-in for vLLM's worker holds what
the hooks read (its handshake futures, reads in flight, remote agents)."""

from __future__ import annotations

import threading
import tracemalloc
import uuid

import pytest

import nixl_etcd
from conftest import wait_until
from nixl_etcd.vllm import discovery


class Worker:
    """What the hooks read of vLLM's NixlConnector worker."""

    def __init__(self) -> None:
        self._handshake_lock = threading.Lock()
        self._handshake_futures: dict = {}
        self._recving_metadata: dict = {}
        self._remote_agents: dict = {}
        self.released = 0

    def _cleanup_remote_engine(self, engine_id: str, log_eviction: bool = True) -> None:
        self._remote_agents.pop(engine_id, None)
        self.released += 1


def test_a_thousand_prefill_restarts_under_fresh_ids_leave_nothing_behind(
    etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery, "GONE_RELEASE_S", 0.0)
    ns = f"/pytest-release/{uuid.uuid4().hex[:8]}"
    opts = dict(endpoints=etcd.endpoint, namespace=ns, timeout_s=10)
    worker = Worker()
    d = discovery.discovery_of(worker)
    reader = d.client = nixl_etcd.Client(**opts)
    publisher = nixl_etcd.Client(world_size=1, **opts)
    subscriptions = []
    subscribe = reader.subscribe

    def recording_subscribe(*a, **kw):
        sub = subscribe(*a, **kw)
        subscriptions.append(sub)
        return sub

    reader.subscribe = recording_subscribe  # type: ignore[method-assign]
    try:

        def restart(i: int) -> None:
            engine = f"prefill-{i}-{uuid.uuid4().hex}"
            publisher.register(engine, 0, b"handshake payload %d" % i)
            # What the handshake hook does: follow, read, vLLM adds the agents.
            remote, _ = d.follow(reader, engine)
            d.loaded(remote, {0: reader.lookup_record(engine, 0)})
            worker._remote_agents[engine] = {0: f"agent-{i}"}
            publisher.unregister(engine, 0)  # the prefill exits
            assert wait_until(lambda: remote.status is discovery.Status.GONE, timeout=30)
            discovery.evict_stale(worker)  # the decode's next step
            assert engine not in d.engines and engine not in worker._remote_agents
            [sub] = subscriptions
            assert not sub.active  # unsubscribed
            subscriptions.clear()

        for i in range(50):
            restart(i)
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(50, 1000):
            restart(i)
        grown = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        assert d.engines == {}
        assert worker.released == 1000 and worker._remote_agents == {}
        # Python-side memory after 950 more restarts: flat (a leak of one
        # engine's state each would be hundreds of KiB).
        print(f"python memory after 950 more restarts: {grown / 1024:+.1f} KiB")
        assert grown < 64 * 1024, grown
    finally:
        publisher.close()
        reader.close()
