"""The decode's view of remote engines found through etcd: one
:class:`RemoteEngine` per engine, with an explicit :class:`Status`, fed by
that engine's etcd events; :func:`fetch` reads its payloads after following
it (subscribe first, then read: no change between the read and the
subscription is missed); :func:`evict_stale` releases, on vLLM's main thread,
what restarted or left, its subscription included."""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .. import errors
from ..client import Client, Event, EventKind, Record
from . import shape as shapes
from . import state
from .transport import Reply, wait_or_side_channel

logger = logging.getLogger("vllm.nixl_etcd")

#: An engine that left (its records deleted) and has not come back for this
#: long is released with everything the decode kept for it, its
#: subscription included: a long-lived decode whose prefills restart under
#: fresh engine ids keeps no trace of the old ones.
GONE_RELEASE_S = 60.0


class EtcdUnavailable(Exception):
    """etcd cannot be reached: the caller falls back to vLLM's ZMQ handshake."""

    def __init__(self, cause: BaseException, recent: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        #: etcd failed moments ago and was not tried again (already warned).
        self.recent = recent


class Status(enum.Enum):
    #: Followed; its payloads are being read and handshaken.
    LOADING = "loading"
    #: NIXL agents added from the records in ``RemoteEngine.loaded``.
    LOADED = "loaded"
    #: A loaded rank's record was deleted; it may come back unchanged (a
    #: lease lost and re-granted), else it is released when a request needs
    #: it or after ``GONE_RELEASE_S``.
    GONE = "gone"
    #: A loaded rank has a new incarnation: released at the next step.
    RESTARTED = "restarted"
    #: A loaded rank re-registered new payloads (same incarnation): released
    #: at the next step, so that the next request loads the new ones.
    STALE = "stale"


#: Statuses whose agents are released at the decode's next step.
RELEASE_NOW = (Status.RESTARTED, Status.STALE)


class RemoteEngine:
    """What this decode worker knows of one remote engine found through etcd."""

    def __init__(self, engine_id: str) -> None:
        self.engine_id = engine_id
        self.status = Status.LOADING
        #: rank -> (incarnation, revision) of the records the agents came from
        self.loaded: Dict[int, Tuple[str, int]] = {}
        #: while loading: rank -> (incarnation, revision) of the newest event,
        #: None if its record was deleted
        self.seen: Dict[int, Optional[Tuple[str, int]]] = {}
        #: loaded ranks whose record is deleted
        self.missing: Set[int] = set()
        self.gone_since = 0.0
        self.sub: Any = None  # the client's Subscription

    def apply(self, ev: Event) -> Optional[str]:
        """Moves the status for ``ev``; says what to log ("back", "released",
        "gone") or None."""
        if self.status is Status.LOADING:
            # Compared with what was read once loading ends (see loaded()).
            removed = ev.kind == EventKind.REMOVED
            self.seen[ev.rank] = None if removed else (ev.incarnation, ev.revision)
            return None
        held = self.loaded.get(ev.rank)
        if held is None or self.status in RELEASE_NOW:
            return None
        if ev.kind == EventKind.REMOVED:
            self.missing.add(ev.rank)
            if self.status is Status.LOADED:
                self.status, self.gone_since = Status.GONE, time.monotonic()
            return "gone"
        if ev.incarnation != held[0]:
            self.status = Status.RESTARTED
            return "released"
        if ev.kind == EventKind.UPDATED:
            self.status = Status.STALE
            return "released"
        # ADDED, same incarnation: the record is back (its lease was lost and
        # re-granted while the engine lived), or a repeat of what was loaded.
        if ev.rank not in self.missing:
            return None
        self.missing.discard(ev.rank)
        if not self.missing:
            self.status = Status.LOADED
        return "back"

    def loaded_from(self, records: Dict[int, Record]) -> None:
        """Loading ended with agents added from ``records``: what changed
        meanwhile (seen in events) decides the status."""
        self.loaded = {r: (rec.incarnation, rec.revision) for r, rec in records.items()}
        self.missing.clear()
        self.status = Status.LOADED
        for rank, (incarnation, revision) in self.loaded.items():
            if rank not in self.seen:
                continue
            newest = self.seen[rank]
            if newest is None:
                self.missing.add(rank)
                self.status, self.gone_since = Status.GONE, time.monotonic()
            elif newest[0] != incarnation:
                self.status = Status.RESTARTED
                break
            elif newest[1] > revision:
                self.status = Status.STALE
                break
        self.seen.clear()


WORDS = {
    EventKind.REPLACED: "restarted",
    EventKind.UPDATED: "re-registered",
    EventKind.REMOVED: "left",
    EventKind.ADDED: "reappeared",
}


class Discovery:
    """One decode worker's etcd client and the remote engines it follows."""

    # After a failed connection, do not try to connect again for this long
    # (handshakes meanwhile go straight to ZMQ, without a new WARNING). An open
    # client is kept through an outage: it serves the engines it knows from its
    # cache, and its subscriptions resume when etcd is back.
    RETRY_AFTER_S = 5.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.client: Optional[Client] = None
        self.down_until = 0.0
        self.warned: Set[str] = set()
        self.engines: Dict[str, RemoteEngine] = {}
        # The pre-warm of this worker (VLLM_NIXL_ETCD_PREWARM), if on.
        self.prewarm: Optional[Any] = None  # prewarm.Prewarm

    def get_client(self) -> Client:
        with self.lock:
            if self.client is not None and not self.client.closed:
                return self.client
            now = time.monotonic()
            if now < self.down_until:
                raise EtcdUnavailable(
                    errors.ConnectionFailed("ETCD connection failed moments ago"), recent=True
                )
            try:
                self.client = Client()
            except (errors.ConnectionFailed, errors.Timeout) as e:
                self.down_until = now + self.RETRY_AFTER_S
                raise EtcdUnavailable(e) from e
            return self.client

    def mark_down(self) -> None:
        with self.lock:
            self.down_until = time.monotonic() + self.RETRY_AFTER_S

    def via_etcd(self, engine_id: str) -> bool:
        with self.lock:
            return engine_id in self.engines

    def follow(self, client: Client, engine_id: str) -> Tuple[RemoteEngine, Status]:
        """The engine, subscribed (before anything of it is read) and LOADING;
        also its status before this call (LOADING when new)."""
        with self.lock:
            engine = self.engines.get(engine_id)
            if engine is not None:
                before, engine.status = engine.status, Status.LOADING
                engine.seen.clear()
                return engine, before
            engine = self.engines[engine_id] = RemoteEngine(engine_id)
        try:
            sub = client.subscribe(engine_id, lambda ev: self._on_event(engine, ev))
        except (errors.ConnectionFailed, errors.Timeout) as e:
            self.forget(engine)
            raise EtcdUnavailable(e) from e
        except BaseException:
            self.forget(engine)
            raise
        with self.lock:
            engine.sub = sub
        return engine, Status.LOADING

    def loaded(self, engine: RemoteEngine, records: Dict[int, Record]) -> None:
        with self.lock:
            engine.loaded_from(records)
            status = engine.status
        if status is not Status.LOADED:
            logger.info(
                "nixl-etcd: remote engine %s changed in ETCD while its NIXL agents were "
                "loaded (%s); they are released at the decode's next step",
                engine.engine_id,
                status.value,
            )

    def forget(self, engine: RemoteEngine) -> None:
        """Drops the engine and its subscription (released, or not found through etcd)."""
        with self.lock:
            if self.engines.get(engine.engine_id) is engine:
                del self.engines[engine.engine_id]
            sub, engine.sub = engine.sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                sub.unsubscribe()

    # Runs on the library's event thread: quick, no blocking calls.
    def _on_event(self, engine: RemoteEngine, ev: Event) -> None:
        with self.lock:
            outcome = engine.apply(ev)
        if outcome is None:
            return
        if outcome == "back":
            logger.info(
                "nixl-etcd: remote engine %s rank %d is back in ETCD (incarnation %s, "
                "unchanged); its NIXL agents stay",
                ev.engine_id,
                ev.rank,
                ev.incarnation,
            )
            return
        what = {
            "released": "its NIXL agents are released at the decode's next step; the next "
            "request handshakes again",
            "gone": "its NIXL agents are released when a request needs it or after "
            f"{GONE_RELEASE_S:.0f} s, unless it comes back unchanged",
        }[outcome]
        logger.info(
            "nixl-etcd: remote engine %s rank %d %s in ETCD (incarnation %s); %s",
            ev.engine_id,
            ev.rank,
            WORDS.get(ev.kind, f"changed ({ev.kind})"),
            ev.incarnation,
            what,
        )

    def close(self) -> None:
        with self.lock:
            client, self.client = self.client, None
            self.engines.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def discovery_of(worker: Any) -> Discovery:
    d = worker.__dict__.get("_nixl_etcd_discovery")
    if d is None:
        d = worker.__dict__.setdefault("_nixl_etcd_discovery", Discovery())
    return d


def fetch(
    d: Discovery,
    engine: RemoteEngine,
    was: Status,
    asked: shapes.Shape,
    targets: List[Tuple[int, int]],
    host: Optional[str],
    port: Optional[int],
) -> Tuple[Dict[Tuple[int, int], Reply], Dict[int, Record]]:
    """The payloads of ``targets`` ((pp_rank, tp_rank) pairs) of a followed
    engine, and the records of those that came from etcd."""
    client = d.get_client()
    engine_id = engine.engine_id
    timeout = state.timeout_s()
    replies: Dict[Tuple[int, int], Reply] = {}
    records: Dict[int, Record] = {}
    for pp, tp in targets:
        rank = asked.rank(pp, tp)
        try:
            try:
                rec = client.lookup_record(engine_id, rank)
            except errors.NotFound as e:
                if was is Status.GONE:
                    # It was registered, then left (closed, or its lease
                    # expired): it stays gone, and this request fails now
                    # with the guide's "RuntimeError: Engine ... not found".
                    with d.lock:
                        engine.status = Status.GONE
                    raise RuntimeError(str(e)) from e
                reply = wait_or_side_channel(client, engine_id, rank, pp, tp, host, port, timeout)
                if reply.source != "ETCD":
                    replies[(pp, tp)] = reply
                    continue
                # Registered meanwhile: the subscription's cache holds it now.
                rec = client.lookup_record(engine_id, rank)
        except (errors.ConnectionFailed, errors.Timeout) as e:
            # etcd itself does not answer (a missing engine is a RuntimeError).
            raise EtcdUnavailable(e) from e
        published = shapes.read(rec.metadata, engine_id, rec.world_size)
        if published is not None:
            shapes.check_request(engine_id, published, asked.tp, asked.pp, asked.dcp)
        replies[(pp, tp)] = Reply(rec.metadata, None, "ETCD")
        records[rank] = rec
    return replies, records


def evict_stale(self: Any, wanted: Optional[Set[str]] = None) -> None:
    """Releases the NIXL state of remote engines that restarted or left, once
    no transfer uses them, and forgets them (their subscription included).

    A restarted (or re-registered) engine is released at once. One that only
    left is released when a request needs it (``wanted``), or once it has been
    gone for ``GONE_RELEASE_S``: until then its record may come back unchanged
    (a lease lost and re-granted while the engine lives), and its agents stay.
    One whose agents vLLM released itself (its idle-engine eviction) is
    forgotten too."""
    d = self.__dict__.get("_nixl_etcd_discovery")
    if d is None or not d.engines:
        return
    wanted = wanted or set()
    busy = {
        meta.remote.engine_id
        for meta in self._recving_metadata.values()
        if getattr(meta, "remote", None) is not None
    }
    now = time.monotonic()
    with self._handshake_lock:
        pending = set(self._handshake_futures)
        agents = set(self._remote_agents)
    with d.lock:
        engines = [e for e in d.engines.values() if e.engine_id not in pending | busy]
        # Restarted, re-registered, gone too long, or released by vLLM itself
        # (its idle-engine eviction): forgotten with their subscription.
        forget = [
            e
            for e in engines
            if e.status in RELEASE_NOW
            or (e.status is Status.GONE and now - e.gone_since >= GONE_RELEASE_S)
            or (e.status is Status.LOADED and e.engine_id not in agents)
        ]
        # Gone and needed by a request: its agents go, the engine stays known
        # as gone (the request fails at once) until GONE_RELEASE_S.
        unload = [e for e in engines if e.status is Status.GONE and e.engine_id in wanted]
    for engine in forget:
        d.forget(engine)
    for engine in forget + unload:
        if engine.engine_id in self._remote_agents:
            self._cleanup_remote_engine(engine.engine_id, log_eviction=False)
            logger.info(
                "nixl-etcd: released NIXL state of remote engine %s (%s)",
                engine.engine_id,
                engine.status.value,
            )
        if d.prewarm is not None and engine.status in RELEASE_NOW:
            d.prewarm.again(engine.engine_id)
