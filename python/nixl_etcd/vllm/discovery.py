"""The decode's view of remote engines: where their payloads come from
(:func:`fetch`, etcd first), what was loaded from which incarnation, and what
to release when an engine restarts or leaves (:class:`Discovery`, one per
vLLM worker, fed by etcd events; :func:`evict_stale`, on vLLM's main thread)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from .. import errors
from ..client import Client, Event, EventKind
from . import state
from .transport import Reply, wait_or_side_channel

logger = logging.getLogger("vllm.nixl_etcd")


def rank_of(pp_rank: int, tp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


class EtcdUnavailable(Exception):
    """etcd cannot be reached: the caller falls back to vLLM's ZMQ handshake."""

    def __init__(self, cause: BaseException, recent: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        #: etcd failed moments ago and was not tried again (already warned).
        self.recent = recent


EVENT_WORDS = {
    EventKind.REPLACED: "restarted",
    EventKind.UPDATED: "re-registered",
    EventKind.REMOVED: "left",
    EventKind.ADDED: "reappeared",
}


class Discovery:
    """Per-worker state: the etcd client, subscriptions, what to drop."""

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
        self.subs: Dict[str, Any] = {}
        # engine -> {rank: incarnation} of the payloads the agents were added from
        self.incarnations: Dict[str, Dict[int, str]] = {}
        self.via_etcd: Set[str] = set()
        self.stale: Set[str] = set()
        self.gone: Set[str] = set()
        # engine -> when it was last seen leaving (monotonic seconds)
        self.gone_since: Dict[str, float] = {}
        # engine -> ranks whose record was deleted since the agents were loaded
        self.missing: Dict[str, Set[int]] = {}
        # engines with a rank replaced by a new incarnation since then
        self.replaced: Set[str] = set()
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

    # Runs on the library's event thread: quick, no blocking calls.
    def on_event(self, ev: Event) -> None:
        words = EVENT_WORDS.get(ev.kind, f"changed ({ev.kind})")
        with self.lock:
            outcome = self._apply(ev)
        if outcome == "unloaded":
            # Released earlier (or never loaded): nothing to drop, but the
            # operator still learns that the engine left or came back.
            logger.info(
                "nixl-etcd: remote engine %s rank %d %s in ETCD (incarnation %s); no NIXL "
                "agents of it are loaded, the next request handshakes with it",
                ev.engine_id,
                ev.rank,
                words,
                ev.incarnation,
            )
        elif outcome == "back":
            logger.info(
                "nixl-etcd: remote engine %s rank %d is back in ETCD (incarnation %s, "
                "unchanged); its NIXL agents stay",
                ev.engine_id,
                ev.rank,
                ev.incarnation,
            )
        elif outcome == "stale":
            logger.info(
                "nixl-etcd: remote engine %s rank %d %s in ETCD (incarnation %s); its NIXL "
                "agents are dropped, the next request handshakes again",
                ev.engine_id,
                ev.rank,
                words,
                ev.incarnation,
            )

    def _apply(self, ev: Event) -> Optional[str]:
        """Updates what to drop for ``ev`` (under ``self.lock``); says what to
        log: "unloaded", "back", "stale", or None (nothing)."""
        known = self.incarnations.get(ev.engine_id)
        if known is None or ev.rank not in known:
            return None if ev.kind == EventKind.UPDATED else "unloaded"
        missing = self.missing.setdefault(ev.engine_id, set())
        if ev.kind == EventKind.ADDED and ev.incarnation == known[ev.rank]:
            # The record the agents were loaded from is back (its lease was
            # lost and re-granted, say): nothing to drop for this rank.
            if ev.rank not in missing:
                return None
            missing.discard(ev.rank)
            if not missing and ev.engine_id not in self.replaced:
                self.stale.discard(ev.engine_id)
                self.gone.discard(ev.engine_id)
                self.gone_since.pop(ev.engine_id, None)
            return "back"
        self.stale.add(ev.engine_id)
        if ev.kind == EventKind.REMOVED:
            missing.add(ev.rank)
            self.gone.add(ev.engine_id)
            self.gone_since[ev.engine_id] = time.monotonic()
        else:
            missing.discard(ev.rank)
            self.replaced.add(ev.engine_id)
            self.gone.discard(ev.engine_id)
            self.gone_since.pop(ev.engine_id, None)
        return "stale"

    def watch(self, client: Client, engine_id: str, incarnations: Dict[int, str]) -> None:
        with self.lock:
            self.incarnations[engine_id] = dict(incarnations)
            self.gone.discard(engine_id)
            self.gone_since.pop(engine_id, None)
            self.missing.pop(engine_id, None)
            self.replaced.discard(engine_id)
            self.via_etcd.add(engine_id)
            need = engine_id not in self.subs
        if need:
            sub = client.subscribe(engine_id, self.on_event)
            with self.lock:
                self.subs[engine_id] = sub

    def close(self) -> None:
        with self.lock:
            client, self.client = self.client, None
            self.subs.clear()
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
    engine_id: str,
    targets: List[Tuple[int, int]],
    remote_tp_size: int,
    host: Optional[str],
    port: Optional[int],
) -> Tuple[Dict[Tuple[int, int], Reply], Dict[int, str]]:
    """The payloads of ``targets`` ((pp_rank, tp_rank) pairs) of ``engine_id``."""
    client = d.get_client()
    timeout = state.timeout_s()
    replies: Dict[Tuple[int, int], Reply] = {}
    incarnations: Dict[int, str] = {}
    for pp, tp in targets:
        rank = rank_of(pp, tp, remote_tp_size)
        try:
            try:
                rec = client.lookup_record(engine_id, rank)
            except errors.NotFound as e:
                with d.lock:
                    gone = engine_id in d.gone
                if gone:
                    # It was registered, then left (closed, or its lease expired).
                    raise RuntimeError(str(e)) from e
                rec = None
                reply = wait_or_side_channel(client, engine_id, rank, pp, tp, host, port, timeout)
                if reply.source != "ETCD":
                    replies[(pp, tp)] = reply
                    continue
                rec = client.lookup_record(engine_id, rank)
            replies[(pp, tp)] = Reply(rec.metadata, None, "ETCD")
            incarnations[rank] = rec.incarnation
        except (errors.ConnectionFailed, errors.Timeout) as e:
            # etcd itself does not answer (a missing engine is a RuntimeError).
            raise EtcdUnavailable(e) from e
    return replies, incarnations


#: An engine that left (its records deleted) and has not come back for this
#: long is released with everything the decode kept for it, its
#: subscription included: a long-lived decode whose prefills restart under
#: fresh engine ids keeps no trace of the old ones.
GONE_RELEASE_S = 60.0


def evict_stale(self: Any, wanted: Optional[Set[str]] = None) -> None:
    """Releases the NIXL state of stale remote engines that no transfer uses.

    A restarted engine (a new incarnation) is released at once. One that only
    left is released when a request needs it (``wanted``), or once it has been
    gone for ``GONE_RELEASE_S``: until then its record may come back unchanged
    (a lease lost and re-granted while the engine lives), and its agents stay."""
    d = self.__dict__.get("_nixl_etcd_discovery")
    if d is None or not (d.stale or d.gone):
        return
    wanted = wanted or set()
    with self._handshake_lock:
        pending = set(self._handshake_futures)
    busy = {
        meta.remote.engine_id
        for meta in self._recving_metadata.values()
        if getattr(meta, "remote", None) is not None
    }
    now = time.monotonic()

    def expired(e: str) -> bool:
        return e in d.gone and now - d.gone_since.get(e, now) >= GONE_RELEASE_S

    with d.lock:
        ready = [
            e
            for e in d.stale
            if e not in pending
            and e not in busy
            and (e in d.replaced or e in wanted or expired(e))
        ]
        # Gone long enough: nothing of it is kept, its subscription included
        # (a request for it fails at once until then: "not found in ETCD").
        forget = [e for e in d.gone if expired(e) and e not in pending and e not in busy]
        subs = []
        for e in ready + forget:
            d.stale.discard(e)
            d.incarnations.pop(e, None)
            d.missing.pop(e, None)
            d.replaced.discard(e)
        for e in forget:
            d.gone.discard(e)
            d.gone_since.pop(e, None)
            d.via_etcd.discard(e)
            sub = d.subs.pop(e, None)
            if sub is not None:
                subs.append(sub)
        ready = ready + [e for e in forget if e not in ready]
    for sub in subs:
        with contextlib.suppress(Exception):
            sub.unsubscribe()
    for engine_id in ready:
        if engine_id in self._remote_agents:
            self._cleanup_remote_engine(engine_id, log_eviction=False)
            logger.info(
                "nixl-etcd: released NIXL state of remote engine %s (restarted or left)",
                engine_id,
            )
    if d.prewarm is not None:
        for engine_id in ready:
            d.prewarm.again(engine_id)


