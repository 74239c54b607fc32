"""The decode's pre-warm (``VLLM_NIXL_ETCD_PREWARM``): vLLM's own handshake
with each wanted remote engine starts as the engine appears in etcd, off the
first request's path, and is followed by a warm-up READ (:mod:`.warmup`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List, Set

from ..client import Client, Event, EventKind
from . import shape as shapes
from . import state, warmup
from .config import PrewarmConfig

logger = logging.getLogger("vllm.nixl_etcd")


class Prewarm:
    """Starts vLLM's handshake with each wanted remote engine as it appears in
    etcd. Events arrive on the library's event thread: nothing here blocks
    (the handshake itself runs on vLLM's handshake thread)."""

    def __init__(self, worker: Any, client: Client, settings: PrewarmConfig) -> None:
        self.worker = worker
        self.client = client
        self.config = settings
        self.lock = threading.Lock()
        self.started: Set[str] = set()
        self.capped = False
        self.subs: List[Any] = []

    def start(self) -> None:
        own = str(getattr(self.worker, "engine_id", ""))
        engines = self.config.exact()
        logger.info(
            "nixl-etcd: pre-warm on: handshakes start as remote engines appear in ETCD (%s; "
            "at most %d)",
            ", ".join(engines or self.config.patterns) or "every engine but " + own,
            self.config.cap,
        )
        for engine in engines if engines is not None else [None]:
            self.subs.append(self.client.subscribe(engine, self.on_event))

    def on_event(self, ev: Event) -> None:
        own = str(getattr(self.worker, "engine_id", ""))
        if not self.config.wants(ev.engine_id, own):
            return
        if ev.kind == EventKind.REMOVED:
            with self.lock:
                self.started.discard(ev.engine_id)
            return
        if ev.kind == EventKind.ADDED:
            self.warm(ev.engine_id, ev.rank)

    def again(self, engine_id: str) -> None:
        """A released engine (restarted): handshake again if it is registered."""
        with self.lock:
            self.started.discard(engine_id)
        try:
            rec = self.client.lookup_record(engine_id, 0)
        except Exception:
            return
        self.warm(engine_id, rec.rank)

    def warm(self, engine_id: str, rank: int) -> None:
        with self.lock:
            if engine_id in self.started:
                return
            if len(self.started) >= self.config.cap:
                if not self.capped:
                    self.capped = True
                    logger.info(
                        "nixl-etcd: pre-warm holds %d engines (VLLM_NIXL_ETCD_PREWARM_MAX); "
                        "engine %s and later ones handshake on their first request",
                        self.config.cap,
                        engine_id,
                    )
                return
            self.started.add(engine_id)
        try:
            # A cache hit: the subscription's informer holds the record.
            rec = self.client.lookup_record(engine_id, rank)
            parallel = shapes.read(rec.metadata, engine_id, rec.world_size)
            if parallel is None:
                raise shapes.ShapeError(
                    f"engine {engine_id}'s records carry no parallel shape (published by "
                    "an older nixl-etcd?), and a guess could load the wrong ranks"
                )
            shapes.targets(self.worker, engine_id, parallel)  # mappable onto this decode
        except Exception as e:
            with self.lock:
                self.started.discard(engine_id)
            unmappable = isinstance(e, shapes.ShapeError)
            (logger.warning if unmappable else logger.debug)(
                "nixl-etcd: pre-warm of engine %s skipped: %s; its first request handshakes",
                engine_id,
                e,
            )
            return
        started = time.perf_counter()
        state.THREAD.prewarm = True
        try:
            fut = self.worker._ensure_handshake(
                engine_id, "", 0, parallel.tp, parallel.dcp, parallel.pp
            )
        except Exception as e:
            with self.lock:
                self.started.discard(engine_id)
            logger.warning("nixl-etcd: pre-warm of engine %s failed to start: %s", engine_id, e)
            return
        finally:
            state.THREAD.prewarm = False
        if fut is None:
            return  # already loaded

        def done(f: Any) -> None:
            try:
                f.result()
            except Exception as e:
                with self.lock:
                    self.started.discard(engine_id)
                logger.warning(
                    "nixl-etcd: pre-warm handshake with engine %s failed (%s); its first "
                    "request will handshake",
                    engine_id,
                    e,
                )
                return
            logger.info(
                "nixl-etcd: pre-warmed engine %s (%s): its NIXL agents were loaded %.2f ms "
                "after it appeared in ETCD, before any request",
                engine_id,
                parallel,
                (time.perf_counter() - started) * 1e3,
            )
            # What the first transfer would set up, set up here (logged, never
            # raised), on a thread of its own: a READ that waits for an idle
            # CPU prefill's progress must not hold vLLM's handshake thread.
            threading.Thread(
                target=warmup.warm_up,
                args=(self.worker, self.client, engine_id, parallel),
                name="nixl-etcd-warmup",
                daemon=True,
            ).start()

        fut.add_done_callback(done)


