"""The prefill side: one engine's handshake payloads in etcd.

A :class:`Publisher` registers every rank's payload under one client's lease
(rank ``pp_rank * tp_size + tp_rank``, the engine's world size in each
record), and withdraws them at shutdown (the lease is revoked). When etcd
cannot be reached at engine start, the engine serves vLLM's ZMQ side channel
only, and the publisher keeps trying in the background, with a growing pause,
until etcd answers: one WARNING when it starts waiting, one INFO once the
engine is published.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Dict, Optional, Set

from .. import errors
from ..client import Client

logger = logging.getLogger("vllm.nixl_etcd")

#: Pause between two attempts while etcd cannot be reached: doubles from the
#: first to the last.
RETRY_PAUSE_S = (0.5, 10.0)


class Publisher:
    """One engine's ranks in etcd, kept there until :meth:`close`."""

    def __init__(
        self,
        engine_id: str,
        ranks: Dict[int, bytes],
        side_channel: str,
        client_factory: Callable[..., Client] = Client,
    ) -> None:
        self.engine_id = engine_id
        self.ranks = dict(ranks)
        self.world = max(ranks) + 1
        self.side_channel = side_channel
        self._factory = client_factory
        self._lock = threading.Lock()
        self._client: Optional[Client] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.published = threading.Event()

    def publish(self) -> None:
        """Registers every rank now; if etcd cannot be reached, says so once and
        keeps trying in the background. Any other failure (a bad setting,
        refused credentials or permissions) is raised: the engine should not
        start half-configured."""
        try:
            self._attempt()
        except (errors.ConnectionFailed, errors.Timeout) as e:
            logger.warning(
                "ETCD coordination failed (%s); engine %s is NOT published in ETCD and is "
                "reachable only through vLLM's ZMQ side channel at %s; nixl-etcd keeps "
                "trying in the background and logs when it is published. Check "
                "VLLM_NIXL_ETCD_ENDPOINTS and that etcd is running",
                e,
                self.engine_id,
                self.side_channel,
            )
            self._thread = threading.Thread(
                target=self._retry, name=f"nixl-etcd-publish-{self.engine_id}", daemon=True
            )
            self._thread.start()
            return
        self._announce(None)

    def republish(self, ranks: Dict[int, bytes]) -> None:
        """New payloads for the same ranks (vLLM registers its KV cache again):
        written under the same lease and incarnation, so peers see UPDATED and
        reload, rather than a restart."""
        self.ranks = dict(ranks)
        self.published.clear()
        if self._thread is not None and self._thread.is_alive():
            return  # the retries write the new payloads
        self.publish()

    def _attempt(self) -> None:
        with self._lock:
            client = self._client if self._client is not None and not self._client.closed else None
        if client is None:
            # Connecting may take up to the timeout: not under the lock, so
            # that close() never waits for it.
            client = self._factory(world_size=self.world)
            with self._lock:
                stopped = self._stop.is_set()
                if not stopped:
                    self._client = client
            if stopped:
                client.close()
                return
        for rank in sorted(self.ranks):
            client.register(self.engine_id, rank, self.ranks[rank])
        self.published.set()

    def _retry(self) -> None:
        started = time.monotonic()
        pause, attempts = RETRY_PAUSE_S[0], 1
        while not self._stop.wait(pause):
            attempts += 1
            try:
                self._attempt()
            except (errors.ConnectionFailed, errors.Timeout):
                pause = min(pause * 2, RETRY_PAUSE_S[1])
                continue
            except Exception as e:
                if self._stop.is_set():
                    return  # closed meanwhile
                logger.error(
                    "nixl-etcd: engine %s cannot be published in ETCD: %s; it stays reachable "
                    "only through vLLM's ZMQ side channel at %s",
                    self.engine_id,
                    e,
                    self.side_channel,
                )
                return
            if not self._stop.is_set():
                self._announce((attempts, time.monotonic() - started))
            return

    def _announce(self, after: Optional[tuple]) -> None:
        late = "" if after is None else " after %d attempts over %.1f s" % after
        logger.info(
            "nixl-etcd: engine %s published %d rank(s) in ETCD (world size %d)%s; vLLM's ZMQ "
            "side channel keeps serving at %s",
            self.engine_id,
            len(self.ranks),
            self.world,
            late,
            self.side_channel,
        )

    def close(self) -> None:
        """Stops trying and revokes the lease: the engine's keys vanish now."""
        self._stop.set()
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as e:
                logger.warning("nixl-etcd: closing the ETCD client failed: %s", e)


# The publishers of this process (one per engine core), for shutdown.
_live: Set[Publisher] = set()
_live_lock = threading.Lock()


def start(engine_id: str, ranks: Dict[int, bytes], side_channel: str, **kw: Any) -> Publisher:
    """A publisher for ``ranks``, published (or trying), and known to :func:`close_all`."""
    p = Publisher(engine_id, ranks, side_channel, **kw)
    with _live_lock:
        _live.add(p)
    try:
        p.publish()
    except BaseException:
        close(p)
        raise
    return p


def close(p: Optional[Publisher]) -> None:
    if p is None:
        return
    with _live_lock:
        _live.discard(p)
    with contextlib.suppress(Exception):
        p.close()


def close_all() -> None:
    with _live_lock:
        every = list(_live)
    for p in every:
        close(p)
