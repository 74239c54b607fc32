"""Subscriptions (callbacks on the library's event thread, iterators) and the
GIL being released during blocking calls."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

import nixl_etcd
from nixl_etcd import EventKind
from conftest import engine, wait_until


class Recorder:
    def __init__(self):
        self.events = []
        self.threads = set()
        self.lock = threading.Lock()

    def __call__(self, ev):
        with self.lock:
            self.events.append(ev)
            self.threads.add(threading.get_native_id())

    def kinds(self):
        with self.lock:
            return [(ev.kind, ev.rank) for ev in self.events]


def thread_name(native_id: int) -> str:
    try:
        return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()
    except OSError:
        return ""


def test_callback_subscription_sees_every_kind(open_client):
    e = engine()
    first, second, watcher = open_client(), open_client(), open_client()
    first.register(e, 0, b"present")
    rec = Recorder()
    sub = watcher.subscribe(e, rec)
    assert sub.active and sub.id > 0
    assert wait_until(lambda: rec.kinds() == [(EventKind.ADDED, 0)])
    ev = rec.events[0]
    assert ev.engine_id == e and ev.metadata == b"present" and ev.revision > 0
    assert ev.host and ev.incarnation
    added_incarnation = ev.incarnation

    first.register(e, 0, b"updated")  # same incarnation
    assert wait_until(lambda: len(rec.kinds()) == 2)
    assert rec.events[1].kind == EventKind.UPDATED and rec.events[1].metadata == b"updated"

    second.register(e, 0, b"restarted")  # another client: a new incarnation
    assert wait_until(lambda: len(rec.kinds()) == 3)
    assert rec.events[2].kind == EventKind.REPLACED
    assert rec.events[2].incarnation != added_incarnation
    assert rec.events[2].metadata == b"restarted"

    second.unregister(e, 0)
    assert wait_until(lambda: len(rec.kinds()) == 4)
    assert rec.events[3].kind == EventKind.REMOVED and rec.events[3].metadata is None

    # callbacks come on the library's event thread, not ours
    assert threading.get_native_id() not in rec.threads
    names = {thread_name(t) for t in rec.threads}
    assert all(n.startswith("nixl-etcd-event") for n in names), names

    watcher.unsubscribe(sub)
    assert not sub.active
    first.register(e, 1, b"after")
    time.sleep(0.3)
    assert len(rec.kinds()) == 4  # never called again
    with pytest.raises(nixl_etcd.NotFound):
        watcher.unsubscribe(sub)
    with pytest.raises(nixl_etcd.NotFound):
        watcher.unsubscribe(987654321)


def test_closing_the_registrant_is_removed(open_client):
    e = engine()
    watcher = open_client()
    rec = Recorder()
    with watcher.subscribe(e, rec):
        short = open_client()
        short.register(e, 7, b"x")
        assert wait_until(lambda: (EventKind.ADDED, 7) in rec.kinds())
        short.close()  # revokes the lease
        assert wait_until(lambda: (EventKind.REMOVED, 7) in rec.kinds())


def test_iterator_subscription(open_client):
    e = engine()
    a, watcher = open_client(), open_client()
    a.register(e, 0, b"zero")
    sub = watcher.subscribe(e)
    ev = next(iter(sub))
    assert (ev.kind, ev.rank, ev.metadata) == (EventKind.ADDED, 0, b"zero")
    assert sub.get(timeout=0.1) is None  # nothing more yet
    a.register(e, 1, b"one")
    a.unregister(e, 0)
    got = []
    for ev in sub:
        got.append((ev.kind, ev.rank))
        if len(got) == 2:
            break
    assert got == [(EventKind.ADDED, 1), (EventKind.REMOVED, 0)]
    sub.unsubscribe()
    assert list(sub) == []  # the iterator ends with the subscription
    assert sub.get(timeout=0) is None


def test_subscribe_to_every_engine(open_client):
    a, watcher = open_client(), open_client()
    e1, e2 = engine(), engine()
    with watcher.subscribe() as sub:
        a.register(e1, 0, b"a")
        a.register(e2, 1, b"b")
        seen = set()
        while len(seen) < 2:
            ev = sub.get(timeout=5)
            assert ev is not None
            seen.add((ev.engine_id, ev.rank))
        assert seen == {(e1, 0), (e2, 1)}
    assert not sub.active


def test_callback_exception_is_logged_and_delivery_goes_on(open_client, caplog):
    e = engine()
    a, watcher = open_client(), open_client()
    seen = []

    def flaky(ev):
        seen.append(ev.rank)
        if ev.rank == 0:
            raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="nixl_etcd"):
        with watcher.subscribe(e, flaky):
            a.register(e, 0, b"x")
            a.register(e, 1, b"y")
            assert wait_until(lambda: seen == [0, 1])
    assert any("callback failed" in r.getMessage() for r in caplog.records)


def test_unsubscribe_and_close_from_inside_the_callback(open_client):
    e = engine()
    a, watcher = open_client(), open_client()
    calls = []
    holder = {}

    def once(ev):
        calls.append(ev.rank)
        holder["sub"].unsubscribe()  # allowed from the callback itself

    holder["sub"] = watcher.subscribe(e, once)
    a.register(e, 0, b"x")
    assert wait_until(lambda: calls == [0])
    a.register(e, 1, b"y")
    time.sleep(0.3)
    assert calls == [0] and not holder["sub"].active

    closer = open_client()
    closed = threading.Event()

    def close_it(ev):
        closer.close()
        closed.set()

    closer.subscribe(e, close_it)
    assert closed.wait(5)
    assert closer.closed
    with pytest.raises(nixl_etcd.Closed):
        closer.lookup(e, 0)


def test_callbacks_may_call_the_library(open_client):
    e = engine()
    a, watcher = open_client(), open_client()
    looked = []
    done = threading.Event()

    def cb(ev):
        looked.append(watcher.lookup(ev.engine_id, ev.rank))
        done.set()

    with watcher.subscribe(e, cb):
        a.register(e, 0, b"payload")
        assert done.wait(5)
    assert looked == [b"payload"]


def test_close_ends_subscriptions(open_client):
    e = engine()
    watcher = open_client()
    sub = watcher.subscribe(e)
    rec = Recorder()
    sub2 = watcher.subscribe(e, rec)
    watcher.close()
    assert not sub.active and not sub2.active
    assert list(sub) == []


def test_wait_releases_the_gil(open_client):
    """A second thread makes progress while the main thread blocks 2 s in wait."""
    c = open_client()
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(nixl_etcd.Timeout):
        c.wait(engine(), 0, timeout=2)
    ended = time.monotonic()
    stop.set()
    t.join()
    assert ended - started >= 1.9
    during = [x for x in ticks if started <= x <= ended]
    # ~1 ms per tick: hundreds of ticks, and never a long gap
    assert len(during) > 200, len(during)
    gaps = [b - a for a, b in zip([started] + during, during + [ended])]
    assert max(gaps) < 1.0, max(gaps)  # holding the GIL would make one 2 s gap


def test_wait_engine_releases_the_gil(open_client):
    c = open_client()
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.05)
    before = counter[0]
    with pytest.raises(nixl_etcd.Timeout):
        c.wait_engine(engine(), timeout=1)
    progressed = counter[0] - before
    stop.set()
    t.join()
    assert progressed > 100_000, progressed
