"""A handshake helper shaped like vLLM's NixlConnector handshake.

The prefill side publishes, per rank, what a peer needs to reach it (its NIXL
agent metadata, plus whatever layout it wants to share); the decode side
fetches the payloads of the remote ranks its own rank reads from (vLLM's
heterogeneous tensor-parallel mapping, ``nixl_etcd_target_ranks``).

As the guide's "Migration from Direct ZMQ" promises, etcd coordination is used
when ``VLLM_NIXL_USE_ETCD`` enables it, and the engine's existing direct
handshake stays the fallback::

    hs = EtcdHandshake(direct=lambda remote_rank: zmq_handshake(host, port + remote_rank))
    hs.publish("prefill_engine", rank, agent.get_agent_metadata())      # prefill
    payloads = hs.fetch("prefill_engine", local_tp=8, local_rank=r, remote_tp=4)  # decode

* ``VLLM_NIXL_USE_ETCD`` unset or 0: straight to the direct handshake (logged
  at INFO on the ``nixl_etcd`` logger).
* etcd unavailable (``ConnectionFailed`` at open or during the call, or a
  ``Timeout`` while etcd does not answer): the direct handshake, logged as a
  WARNING ("ETCD coordination failed ...; using the direct handshake ...").
* Without a direct callable, the errors propagate.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

from . import fallback
from .client import BytesLike, Client, enabled, target_ranks
from .errors import ConnectionFailed, InvalidArgument, NixlEtcdError, NotFound, Timeout

logger = logging.getLogger("nixl_etcd")

#: ``direct(remote_rank) -> payload``: the engine's existing (e.g. ZMQ) handshake.
DirectHandshake = Callable[[int], BytesLike]

# A rank no engine registers: looking it up asks etcd itself (a cache miss),
# which tells a healthy etcd (NotFound) from an unreachable one.
_PROBE_RANK = 2**32 - 1


class EtcdHandshake:
    """Publishes and fetches per-rank handshake payloads through etcd, with the
    engine's direct handshake as the fallback.

    Args:
        client: an open :class:`Client` to use (not closed by :meth:`close`).
            Without one, a client is opened on first use from ``**options``
            and the environment, and opening is retried on later calls while
            etcd is unavailable.
        direct: the direct handshake, ``direct(remote_rank) -> bytes``; the
            default for :meth:`fetch`. Its presence also lets :meth:`publish`
            degrade (return False) instead of raising when etcd is unavailable.
        use_etcd: force etcd coordination on or off; None (default) follows
            ``VLLM_NIXL_USE_ETCD`` (:func:`nixl_etcd.enabled`).
        **options: :class:`Client` keyword arguments (endpoints, namespace,
            timeout_s, lease_ttl_s, host, world_size, ...).
    """

    def __init__(
        self,
        client: Optional[Client] = None,
        *,
        direct: Optional[DirectHandshake] = None,
        use_etcd: Optional[bool] = None,
        **options: Any,
    ) -> None:
        if client is not None and options:
            raise InvalidArgument("give either an open client or client options, not both")
        self._client = client
        self._owns_client = client is None
        self._options = options
        self.direct = direct
        self._use_etcd = use_etcd

    # -- configuration -----------------------------------------------------

    @property
    def use_etcd(self) -> bool:
        """Whether etcd coordination is on (``use_etcd``, else ``VLLM_NIXL_USE_ETCD``)."""
        return self._use_etcd if self._use_etcd is not None else enabled()

    def _disabled_reason(self) -> str:
        return "use_etcd=False" if self._use_etcd is False else _env_setting()

    @property
    def client(self) -> Client:
        """The client, opened now if needed.

        Raises:
            ConnectionFailed: etcd is unavailable.
        """
        if self._client is None or self._client.closed and self._owns_client:
            self._client = Client(**self._options)
            self._owns_client = True
        return self._client

    def close(self) -> None:
        """Closes the client this helper opened (revoking its lease: what it
        published disappears). A client passed in is left open."""
        client, self._client = self._client, (None if self._owns_client else self._client)
        if client is not None and self._owns_client:
            client.close()

    def __enter__(self) -> "EtcdHandshake":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- prefill side ------------------------------------------------------

    def publish(self, engine_id: str, rank: int, payload: BytesLike) -> bool:
        """Publishes ``payload`` for (engine_id, rank) under the client's lease.

        Returns:
            True when published through etcd; False when etcd coordination is
            disabled, or etcd is unavailable and a direct handshake exists
            (peers then use the direct handshake).

        Raises:
            ConnectionFailed / Timeout: etcd unavailable and no direct handshake.
            TooLarge, InvalidArgument: always (the payload or id is at fault).
        """
        if not self.use_etcd:
            logger.info(
                "ETCD coordination disabled (%s); not publishing engine %s rank %s, peers "
                "use the direct handshake",
                self._disabled_reason(),
                engine_id,
                rank,
            )
            return False
        try:
            self.client.register(engine_id, rank, payload)
            return True
        except (ConnectionFailed, Timeout) as e:
            if self.direct is None:
                raise
            logger.warning(
                "ETCD coordination failed (%s: %s); using the direct handshake: engine %s "
                "rank %s is not published in etcd",
                type(e).__name__,
                e,
                engine_id,
                rank,
            )
            return False

    def unpublish(self, engine_id: str, rank: int) -> None:
        """Removes what :meth:`publish` wrote for (engine_id, rank)."""
        self.client.unregister(engine_id, rank)

    # -- decode side -------------------------------------------------------

    def fetch(
        self,
        remote_engine_id: str,
        local_tp: int,
        local_rank: int,
        remote_tp: Optional[int],
        timeout: Optional[float] = None,
        *,
        direct: Optional[DirectHandshake] = None,
    ) -> Dict[int, bytes]:
        """The payloads of the remote ranks that ``local_rank`` (of a
        ``local_tp``-way engine) reads from, by remote rank.

        Args:
            remote_engine_id: the engine to fetch from.
            local_tp, local_rank: this engine's TP size and rank.
            remote_tp: the remote engine's TP size; None learns it through etcd
                (``wait_engine``: the registrants must declare ``world_size``).
            timeout: seconds for the whole fetch; None: the client's timeout
                for each wait.
            direct: the direct handshake for this call (default: the one given
                to the constructor).

        Raises:
            Timeout: the remote ranks did not register in time (etcd healthy).
            ConnectionFailed / Timeout: etcd unavailable and no direct handshake.
            InvalidArgument: sizes that do not divide, a rank out of range.
        """
        direct = direct if direct is not None else self.direct
        if not self.use_etcd:
            if direct is None:
                raise InvalidArgument(
                    f"ETCD coordination is disabled ({self._disabled_reason()}) and no direct "
                    f"handshake was given to reach engine {remote_engine_id}"
                )
            if remote_tp is None:
                raise InvalidArgument("remote_tp is needed for the direct handshake")
            ranks = target_ranks(local_tp, local_rank, remote_tp)
            logger.info(
                "ETCD coordination disabled (%s); using the direct handshake for engine %s "
                "rank(s) %s",
                self._disabled_reason(),
                remote_engine_id,
                _fmt(ranks),
            )
            return _call_direct(direct, ranks)
        if remote_tp is not None:
            target_ranks(local_tp, local_rank, remote_tp)  # bad sizes are the caller's bug
        try:
            return self._fetch_etcd(remote_engine_id, local_tp, local_rank, remote_tp, timeout)
        except ConnectionFailed as e:
            if direct is None:
                raise
            reason: NixlEtcdError = e
        except Timeout as e:
            # A timeout is etcd's fault only when etcd itself does not answer;
            # a remote engine that never registered is reported as is.
            if direct is None or not self._etcd_unavailable(remote_engine_id):
                raise
            reason = e
        if remote_tp is None:
            raise reason
        ranks = target_ranks(local_tp, local_rank, remote_tp)
        fallback.fall_back(
            reason,
            f"the direct handshake for engine {remote_engine_id} rank(s) {_fmt(ranks)}",
            logger,
            options=self._options,
        )
        return _call_direct(direct, ranks)

    def _fetch_etcd(
        self,
        remote_engine_id: str,
        local_tp: int,
        local_rank: int,
        remote_tp: Optional[int],
        timeout: Optional[float],
    ) -> Dict[int, bytes]:
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout

        def left() -> Optional[float]:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        client = self.client
        if remote_tp is None:
            remote_tp = client.wait_engine(remote_engine_id, left())
        ranks = target_ranks(local_tp, local_rank, remote_tp)
        out = {r: client.wait(remote_engine_id, r, left()) for r in ranks}
        logger.debug(
            "ETCD handshake with engine %s rank(s) %s completed in %.3f seconds",
            remote_engine_id,
            _fmt(ranks),
            time.monotonic() - started,
        )
        return out

    def _etcd_unavailable(self, engine_id: str) -> bool:
        """After a Timeout: does etcd itself fail to answer?"""
        client = self._client
        if client is None or client.closed:
            return True
        try:
            client.lookup(engine_id, _PROBE_RANK)
        except NotFound:
            return False
        except (ConnectionFailed, Timeout):
            return True
        except NixlEtcdError:
            return False
        return False


def _call_direct(direct: DirectHandshake, ranks: List[int]) -> Dict[int, bytes]:
    return {r: bytes(direct(r)) for r in ranks}


def _env_setting() -> str:
    value = os.environ.get("VLLM_NIXL_USE_ETCD")
    return "VLLM_NIXL_USE_ETCD is unset" if value is None else f"VLLM_NIXL_USE_ETCD={value}"


def _fmt(ranks: List[int]) -> str:
    return ",".join(str(r) for r in ranks)
