"""The wrappers the plugin puts in vLLM 0.32's NixlConnector
(``vllm/distributed/kv_transfer/kv_connector/v1/nixl/``), each small, each
handing the work to the module of its concern: :mod:`.publish` (prefill),
:mod:`.discovery` and :mod:`.transport` (decode), :mod:`.prewarm`. Installed
once per process by :func:`.install.install`, from the table of hook points
:data:`.install.HOOKS`.

Where each hook sits, and why there:

``NixlBaseConnectorScheduler.set_xfer_handshake_metadata`` (prefill, engine-core
process)
    vLLM hands it every worker's ``NixlHandshakePayload`` keyed by
    ``(pp_rank, tp_rank)`` and it starts the ZMQ ROUTER listener. After vLLM's
    own code ran (the listener stays for peers without etcd), one nixl-etcd
    :class:`~nixl_etcd.Client` per engine registers each payload as the listener serves
    it (msgpack) plus one key, the engine's parallel shape (:mod:`.shape`), as
    rank ``pp_rank * tp + tp_rank`` with the engine's world size, under the
    client's lease. ``shutdown`` closes the
    client (the lease is revoked: the keys vanish when the engine exits; after
    a SIGKILL, when the lease expires).

``EngineCore.shutdown`` (engine-core process)
    vLLM stops its workers before its scheduler, and may kill a worker that
    does not exit (the scheduler's shutdown never runs then): the publishing
    client is closed first, so the engine's keys vanish as its shutdown starts.

``NixlBaseConnectorWorker._nixl_handshake`` (decode, worker process)
    Called on vLLM's handshake thread with the remote engine id, its TP/PP/DCP
    sizes and the request's side-channel address. The hook fetches from etcd the
    payloads of exactly the ranks ``transfer_topo.handshake_target_ranks``
    selects, then runs vLLM's own ``_nixl_handshake`` with those payloads as its
    transport (``base_worker.zmq_ctx`` is wrapped: on this thread, during this
    call, the REQ socket is answered from the fetched payloads): vLLM's code
    decodes them, checks the compatibility hash, the engine id and the parallel
    config, and adds the remote agents, unchanged.

    etcd unreachable (cannot connect, or etcd itself times out): vLLM's direct
    ZMQ handshake with the request's host and port, after one WARNING naming the
    cause. Engine not (yet) in etcd, etcd healthy: wait for it up to
    ``VLLM_NIXL_ETCD_TIMEOUT`` while also asking the request's side channel (a
    prefill without nixl-etcd answers there); neither -> "Timeout waiting for
    engine ...". Engine seen leaving (its keys deleted): "Engine ... not found in
    ETCD" at once.

``_track_remote_engine_replacement`` (decode)
    vLLM detects restarts by a new engine id at the same host:port. Engines
    found through etcd are tracked by engine id instead (their host:port may be
    absent or stale); restarts are seen through etcd events (next point).

``start_load_kv`` / ``_cleanup_remote_engines`` (decode, main thread)
    Each engine found through etcd is a :class:`.discovery.RemoteEngine`
    whose status its events move (restarted, stale, gone); before each step's
    reads and at each step's cleanup, those to release and without reads in
    flight are released with vLLM's ``_cleanup_remote_engine`` and forgotten
    with their subscription, so the next request handshakes again.

``NixlBaseConnector.register_kv_caches`` (decode, worker process; pre-warm)
    With ``VLLM_NIXL_ETCD_PREWARM=1`` the worker, once its KV caches are
    registered, subscribes to the remote engines it may read
    (``VLLM_NIXL_ETCD_PREWARM_ENGINES``: ids, or prefixes ending in ``*``; all
    engines but itself by default) and, when one appears in etcd (ADDED, or
    present at start), starts vLLM's own handshake with it at once
    (``_ensure_handshake``, the call a first request makes), so the first
    request finds its agents loaded. At most ``VLLM_NIXL_ETCD_PREWARM_MAX``
    engines (default 16) are pre-warmed; an engine that leaves may be
    pre-warmed again when it comes back; a restarted one (REPLACED) is
    released and handshaken again at the decode's next step (vLLM touches
    its NIXL agents only from its main thread). vLLM's stale-engine scan,
    which must run on the main thread, is skipped for the pre-warm's call
    (it runs at the next request's).

``NixlBaseConnectorScheduler.on_new_request`` (decode, engine-core process)
    A request with ``do_remote_prefill`` and ``remote_engine_id`` but no
    ``remote_host``/``remote_port`` gets placeholders ("" and 0): vLLM 0.32 skips
    the remote load (and heartbeats) when those keys are absent.
"""


from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Tuple

from .. import fallback
from . import config, publish, state
from . import shape as shapes
from .discovery import EtcdUnavailable, Status, discovery_of, evict_stale, fetch
from .prewarm import Prewarm
from . import transport

logger = logging.getLogger("vllm.nixl_etcd")


# ---------------------------------------------------------------------------
# Prefill side: publish.


def _set_xfer_handshake_metadata(self: Any, metadata: Dict[Tuple[int, int], Any]) -> None:
    state.ORIG["set_xfer_handshake_metadata"](self, metadata)  # vLLM's ZMQ listener stays
    if not state.active(self) or not metadata:
        return
    import msgspec

    encoder = msgspec.msgpack.Encoder()
    parallel = shapes.of_scheduler(self)
    # Each payload as vLLM's listener serves it, plus the engine's shape (for
    # readers without a request in hand: the pre-warm).
    ranks = {
        parallel.rank(pp, tp): shapes.embed(encoder.encode(payload), parallel)
        for (pp, tp), payload in metadata.items()
    }
    old = getattr(self, "_nixl_etcd_publisher", None)
    if old is not None and old.engine_id == self.engine_id and old.world == max(ranks) + 1:
        old.republish(ranks)  # same lease and incarnation: peers see UPDATED
        return
    publish.close(old)
    self._nixl_etcd_publisher = publish.start(
        self.engine_id, ranks, f"{self.side_channel_host}:{self.side_channel_port}"
    )


def _engine_core_shutdown(self: Any) -> None:
    # vLLM shuts the executor down before the scheduler, and waits for its
    # workers, which it may kill after a few seconds (the scheduler's shutdown
    # never runs then): withdraw this engine from etcd first, so that peers stop
    # being sent to it at once instead of within the lease TTL.
    publish.close_all()
    state.ORIG["engine_core_shutdown"](self)


def _scheduler_shutdown(self: Any) -> None:
    try:
        state.ORIG["scheduler_shutdown"](self)
    finally:
        publisher = getattr(self, "_nixl_etcd_publisher", None)
        self._nixl_etcd_publisher = None
        publish.close(publisher)


# ---------------------------------------------------------------------------
# Decode side, engine-core process: requests without an address.


def _on_new_request(self: Any, request: Any) -> None:
    params = getattr(request, "kv_transfer_params", None)
    if (
        params is not None
        and params.get("do_remote_prefill")
        and params.get("remote_engine_id")
        and state.active(self)
    ):
        # vLLM 0.32 ignores a remote prefill without these keys; the etcd
        # handshake does not use them.
        params.setdefault("remote_host", "")
        params.setdefault("remote_port", 0)
    state.ORIG["on_new_request"](self, request)


# ---------------------------------------------------------------------------
# Decode side, worker process: the handshake, restarts, pre-warm.


def _zmq_ctx(socket_type: Any, addr: str) -> Any:
    return transport.zmq_ctx(socket_type, addr)


def _nixl_handshake(
    self: Any,
    host: str,
    port: int,
    remote_tp_size: int,
    expected_engine_id: str,
    remote_dcp_size: int = 1,
    remote_pp_size: int = 1,
    notif_agents_only: bool = False,
) -> Any:
    # The signature is vLLM's own (checked at install); calls go by keyword.
    call = dict(
        host=host,
        port=port,
        remote_tp_size=remote_tp_size,
        expected_engine_id=expected_engine_id,
        remote_dcp_size=remote_dcp_size,
        remote_pp_size=remote_pp_size,
        notif_agents_only=notif_agents_only,
    )

    def orig() -> Any:
        return state.ORIG["_nixl_handshake"](self, **call)

    if not state.active(self):
        return orig()
    d = discovery_of(self)
    logger.debug("Discovering engine %s through ETCD", expected_engine_id)
    started = time.perf_counter()
    asked = shapes.Shape(tp=remote_tp_size, pp=remote_pp_size, dcp=remote_dcp_size)
    targets = shapes.targets(self, expected_engine_id, asked)
    try:
        # Followed before anything of it is read: no change is missed.
        engine, was = d.follow(d.get_client(), expected_engine_id)
    except EtcdUnavailable as e:
        return _direct(d, e, orig, call, targets)
    try:
        replies, records = fetch(d, engine, was, asked, targets, host, port)
    except EtcdUnavailable as e:
        d.forget(engine)
        return _direct(d, e, orig, call, targets)
    except BaseException:
        if engine.status is not Status.GONE:  # a gone one stays known as gone
            d.forget(engine)
        raise
    if not records:
        d.forget(engine)  # every rank answered on the side channel: vLLM tracks it
    discovered = time.perf_counter()
    state.THREAD.replies = replies
    try:
        result = orig()
    except BaseException:
        d.forget(engine)
        raise
    finally:
        state.THREAD.replies = None
    if records:
        d.loaded(engine, records)
    done = time.perf_counter()
    sources = sorted({r.source for r in replies.values()})
    logger.debug("ETCD handshake completed in %.3f seconds", done - started)
    logger.info(
        "nixl-etcd: handshake with engine %s rank(s) %s through %s: discovery %.2f ms, "
        "total %.2f ms",
        expected_engine_id,
        ",".join(f"{asked.rank(pp, r)}" for pp, r in targets),
        " + ".join(sources),
        (discovered - started) * 1e3,
        (done - started) * 1e3,
    )
    return result


def _direct(
    d: Any, e: EtcdUnavailable, orig: Callable[[], Any], call: Dict[str, Any], targets: List[Any]
) -> Any:
    """etcd unreachable: the payloads from the request's ZMQ side channel,
    waited for as long as etcd would have been, then vLLM's own handshake on
    them (its checks, its agents)."""
    d.mark_down()
    engine_id, host, port = call["expected_engine_id"], call["host"], call["port"]
    fallback.fall_back(
        e.cause,
        f"vLLM's direct ZMQ handshake with engine {engine_id} at {host}:{port}",
        logger,
        error=RuntimeError,
        warned=d.warned,
        quiet=e.recent,
    )
    if not host or not port:
        raise RuntimeError(
            f"ETCD coordination failed ({e.cause}) and the request for engine "
            f"{engine_id} carries no remote_host/remote_port for vLLM's ZMQ side channel"
        ) from e.cause
    try:
        replies = transport.side_channel(host, int(port), targets, state.timeout_s())
    except RuntimeError as err:
        raise RuntimeError(f"ETCD coordination failed ({e.cause}) and {err}") from e.cause
    state.THREAD.replies = replies
    try:
        return orig()
    finally:
        state.THREAD.replies = None


def _track_remote_engine_replacement(self: Any, engine_id: str, host: str, port: int) -> None:
    d = self.__dict__.get("_nixl_etcd_discovery")
    if d is not None and d.via_etcd(engine_id):
        # Tracked by engine id: restarts come as ETCD events, not as a new
        # engine at an old address (which may be a placeholder or stale).
        host, port = f"etcd:{engine_id}", 0
    state.ORIG["_track_remote_engine_replacement"](self, engine_id, host, port)


def _make_start_load_kv(orig: Callable[..., Any]) -> Callable[..., Any]:
    def start_load_kv(self: Any, metadata: Any) -> Any:
        reqs = getattr(metadata, "reqs_to_recv", None) or {}
        evict_stale(
            self,
            {m.remote.engine_id for m in reqs.values() if getattr(m, "remote", None) is not None},
        )
        return orig(self, metadata)

    start_load_kv.__wrapped__ = orig  # type: ignore[attr-defined]
    return start_load_kv


def _cleanup_remote_engines(self: Any) -> None:
    state.ORIG["_cleanup_remote_engines"](self)
    evict_stale(self)


def _worker_shutdown(self: Any) -> None:
    try:
        state.ORIG["worker_shutdown"](self)
    finally:
        d = self.__dict__.get("_nixl_etcd_discovery")
        if d is not None:
            d.close()


def _register_kv_caches(self: Any, kv_caches: Any) -> Any:
    result = state.ORIG["register_kv_caches"](self, kv_caches)
    worker = getattr(self, "connector_worker", None)
    if worker is None or not state.active(worker):
        return result
    role = getattr(getattr(self, "kv_transfer_config", None), "kv_role", None)
    if role == "kv_producer":
        return result  # it never reads from another engine
    d = discovery_of(worker)
    try:
        # Connect at start: a bad setting, refused credentials or
        # permissions fail the engine's start here (the error names the
        # variable), instead of every P/D request later.
        client = d.get_client()
    except EtcdUnavailable as e:
        # Unreachable: the first handshake tries again, and falls back with
        # the WARNING, as each one after it does.
        with d.lock:
            d.down_until = 0.0
        logger.info("nixl-etcd: ETCD not reachable at engine start (%s); retried per request", e)
        return result
    settings = config.current().prewarm  # checked at engine start (register, install)
    if settings is None:
        return result
    try:
        prewarm = Prewarm(worker, client, settings)
        d.prewarm = prewarm
        prewarm.start()
    except Exception as e:  # etcd down: requests handshake as they come
        d.prewarm = None
        logger.warning(
            "nixl-etcd: pre-warm off: cannot follow ETCD (%s); requests handshake as they come",
            e,
        )
    return result


def _evict_stale_engines(self: Any) -> None:
    # vLLM's stale-engine scan must run on its main thread: skipped when the
    # pre-warm starts a handshake from the event thread (the next request's
    # handshake runs it).
    if getattr(state.THREAD, "prewarm", False):
        return
    state.ORIG["_evict_stale_engines"](self)
