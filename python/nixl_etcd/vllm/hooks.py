"""The hooks into vLLM 0.32's NixlConnector (``vllm/distributed/kv_transfer/
kv_connector/v1/nixl/``). Installed once per process by :func:`install`.

Where each hook sits, and why there:

``NixlBaseConnectorScheduler.set_xfer_handshake_metadata`` (prefill, engine-core
process)
    vLLM hands it every worker's ``NixlHandshakePayload`` keyed by
    ``(pp_rank, tp_rank)`` and it starts the ZMQ ROUTER listener. After vLLM's
    own code ran (the listener stays for peers without etcd), one nixl-etcd
    :class:`~nixl_etcd.Client` per engine registers each payload, msgpack-encoded
    exactly as the listener serves it, as rank ``pp_rank * tp + tp_rank`` with
    the engine's world size, under the client's lease. ``shutdown`` closes the
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
    A subscription per remote engine reports REPLACED (same engine_id, new
    incarnation), UPDATED and REMOVED; before each step's reads and at each
    step's cleanup, such engines without reads in flight are released with
    vLLM's ``_cleanup_remote_engine`` so the next request handshakes again.

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

import contextlib
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .. import errors, unsigned
from ..client import Client, Event, EventKind
from . import config, publish

logger = logging.getLogger("vllm.nixl_etcd")

# Set on this thread while vLLM's _nixl_handshake runs on etcd-fetched payloads.
_tls = threading.local()

# The originals, kept for the stock path and for uninstall-free chaining.
_orig: Dict[str, Callable[..., Any]] = {}

# Attribute naming the explicit connector's choice on scheduler/worker objects.
FORCE_ATTR = "_nixl_etcd_use"



def _active(obj: Any) -> bool:
    """Whether etcd coordination is on for this scheduler/worker object."""
    settings = config.load()
    if getattr(obj, FORCE_ATTR, None) is not None:
        return bool(getattr(obj, FORCE_ATTR)) and settings.etcd_for_explicit_connector
    return settings.use_etcd


def _etcd_timeout_s() -> float:
    return config.load().timeout_s


# ---------------------------------------------------------------------------
# Prefill side: publish.


def _rank_of(pp_rank: int, tp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


def _set_xfer_handshake_metadata(self: Any, metadata: Dict[Tuple[int, int], Any]) -> None:
    _orig["set_xfer_handshake_metadata"](self, metadata)  # vLLM's ZMQ listener stays
    if not _active(self) or not metadata:
        return
    import msgspec

    encoder = msgspec.msgpack.Encoder()
    tp_size = max(1, int(getattr(self, "transfer_tp_size", 1)))
    ranks = {
        _rank_of(pp, tp, tp_size): encoder.encode(payload)
        for (pp, tp), payload in metadata.items()
    }
    publish.close(getattr(self, "_nixl_etcd_publisher", None))
    self._nixl_etcd_publisher = publish.start(
        self.engine_id, ranks, f"{self.side_channel_host}:{self.side_channel_port}"
    )


def _engine_core_shutdown(self: Any) -> None:
    # vLLM shuts the executor down before the scheduler, and waits for its
    # workers, which it may kill after a few seconds (the scheduler's shutdown
    # never runs then): withdraw this engine from etcd first, so that peers stop
    # being sent to it at once instead of within the lease TTL.
    publish.close_all()
    _orig["engine_core_shutdown"](self)


def _scheduler_shutdown(self: Any) -> None:
    try:
        _orig["scheduler_shutdown"](self)
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
        and _active(self)
    ):
        # vLLM 0.32 ignores a remote prefill without these keys; the etcd
        # handshake does not use them.
        params.setdefault("remote_host", "")
        params.setdefault("remote_port", 0)
    _orig["on_new_request"](self, request)


# ---------------------------------------------------------------------------
# Decode side, worker process: discovery.


class _EtcdUnavailable(Exception):
    """etcd cannot be reached: the caller falls back to vLLM's ZMQ handshake."""

    def __init__(self, cause: BaseException, recent: bool = False) -> None:
        super().__init__(str(cause))
        self.cause = cause
        #: etcd failed moments ago and was not tried again (already warned).
        self.recent = recent


class _Reply:
    __slots__ = ("payload", "remote_perf", "source")

    def __init__(self, payload: bytes, remote_perf: Optional[float], source: str) -> None:
        self.payload = payload
        self.remote_perf = remote_perf
        self.source = source


_EVENT_WORDS = {
    EventKind.REPLACED: "restarted",
    EventKind.UPDATED: "re-registered",
    EventKind.REMOVED: "left",
    EventKind.ADDED: "reappeared",
}


class _Discovery:
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
        self.prewarm: Optional[_Prewarm] = None

    def get_client(self) -> Client:
        with self.lock:
            if self.client is not None and not self.client.closed:
                return self.client
            now = time.monotonic()
            if now < self.down_until:
                raise _EtcdUnavailable(
                    errors.ConnectionFailed("ETCD connection failed moments ago"), recent=True
                )
            try:
                self.client = Client()
            except (errors.ConnectionFailed, errors.Timeout) as e:
                self.down_until = now + self.RETRY_AFTER_S
                raise _EtcdUnavailable(e) from e
            return self.client

    def mark_down(self) -> None:
        with self.lock:
            self.down_until = time.monotonic() + self.RETRY_AFTER_S

    # Runs on the library's event thread: quick, no blocking calls.
    def on_event(self, ev: Event) -> None:
        words = _EVENT_WORDS.get(ev.kind, f"changed ({ev.kind})")
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


def _discovery(worker: Any) -> _Discovery:
    d = worker.__dict__.get("_nixl_etcd_discovery")
    if d is None:
        d = worker.__dict__.setdefault("_nixl_etcd_discovery", _Discovery())
    return d


class _SideChannelProbe:
    """Asks vLLM's ZMQ side channel of the request for one rank's payload, in a
    thread, while etcd is waited on (a prefill without nixl-etcd answers only
    there). Cancellable; never raises."""

    def __init__(
        self,
        host: str,
        port: int,
        pp_rank: int,
        tp_rank: int,
        timeout: float,
        notify: Optional[threading.Event] = None,
    ):
        self.addr = f"{host}:{port}"
        self.reply: Optional[_Reply] = None
        self.error: Optional[str] = None
        self.done = threading.Event()
        # Set too when the probe ends, so a waiter sleeps on one event.
        self._notify = notify
        self._cancel = threading.Event()
        self._args = (host, port, pp_rank, tp_rank, timeout)
        threading.Thread(target=self._run, name="nixl-etcd-zmq-probe", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()

    def _run(self) -> None:
        host, port, pp_rank, tp_rank, timeout = self._args
        try:
            import msgspec
            import zmq
            from vllm.utils.network_utils import make_zmq_path

            ctx = zmq.Context()
            try:
                sock = ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(make_zmq_path("tcp", host, port))
                sock.send(msgspec.msgpack.encode((_orig["GET_META_MSG"], pp_rank, tp_rank)))
                deadline = time.monotonic() + timeout
                while not self._cancel.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.error = f"no answer from {self.addr} within {timeout:.1f} s"
                        return
                    if sock.poll(int(min(left, 0.1) * 1000) + 1, zmq.POLLIN):
                        parts = sock.recv_multipart()
                        perf = msgspec.msgpack.decode(parts[1]) if len(parts) > 1 else None
                        self.reply = _Reply(bytes(parts[0]), perf, f"ZMQ side channel {self.addr}")
                        return
            finally:
                ctx.destroy(linger=0)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()
            if self._notify is not None:
                self._notify.set()


def _fetch(
    d: _Discovery,
    engine_id: str,
    targets: List[Tuple[int, int]],
    remote_tp_size: int,
    host: Optional[str],
    port: Optional[int],
) -> Tuple[Dict[Tuple[int, int], _Reply], Dict[int, str]]:
    """The payloads of ``targets`` ((pp_rank, tp_rank) pairs) of ``engine_id``."""
    client = d.get_client()
    timeout = _etcd_timeout_s()
    replies: Dict[Tuple[int, int], _Reply] = {}
    incarnations: Dict[int, str] = {}
    for pp, tp in targets:
        rank = _rank_of(pp, tp, remote_tp_size)
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
                reply = _wait_or_side_channel(client, engine_id, rank, pp, tp, host, port, timeout)
                if reply.source != "ETCD":
                    replies[(pp, tp)] = reply
                    continue
                rec = client.lookup_record(engine_id, rank)
            replies[(pp, tp)] = _Reply(rec.metadata, None, "ETCD")
            incarnations[rank] = rec.incarnation
        except (errors.ConnectionFailed, errors.Timeout) as e:
            # etcd itself does not answer (a missing engine is a RuntimeError).
            raise _EtcdUnavailable(e) from e
    return replies, incarnations


def _wait_or_side_channel(
    client: Client,
    engine_id: str,
    rank: int,
    pp: int,
    tp: int,
    host: Optional[str],
    port: Optional[int],
    timeout: float,
) -> _Reply:
    # One event for both ends (the etcd wait, the probe): the handshake thread
    # sleeps until one of them has something to say, never polls.
    changed = threading.Event()
    # Signed records: an unauthenticated payload from the network is not
    # taken in their place (unless allowed, see nixl_etcd.unsigned).
    probe = (
        _SideChannelProbe(host, int(port), pp, tp, timeout, notify=changed)
        if host and port and unsigned.refusal() is None
        else None
    )
    result: Dict[str, Any] = {}
    done = threading.Event()

    def wait_etcd() -> None:
        try:
            result["payload"] = client.wait(engine_id, rank, timeout)
        except BaseException as e:  # reported to the handshake thread
            result["error"] = e
        finally:
            done.set()
            changed.set()

    waiter = threading.Thread(target=wait_etcd, name="nixl-etcd-wait", daemon=True)
    waiter.start()
    try:
        while True:
            changed.wait()
            changed.clear()
            # Read after clearing: an end that comes meanwhile sets it again.
            if "payload" in result:
                return _Reply(result["payload"], None, "ETCD")
            if probe is not None and probe.reply is not None:
                logger.info(
                    "nixl-etcd: engine %s is not registered in ETCD; reached it through "
                    "vLLM's ZMQ side channel at %s (a prefill without nixl-etcd?)",
                    engine_id,
                    probe.addr,
                )
                return probe.reply
            if done.is_set() and (probe is None or probe.done.is_set()):
                break
    finally:
        if probe is not None:
            probe.cancel()
    err = result.get("error")
    if probe is not None and probe.error:
        logger.debug("nixl-etcd: side channel of engine %s: %s", engine_id, probe.error)
    if isinstance(err, errors.Timeout):
        # The guide's message ("Timeout waiting for engine ..."), as RuntimeError.
        raise RuntimeError(str(err)) from err
    if isinstance(err, errors.ConnectionFailed):
        raise err
    if err is not None:
        raise RuntimeError(f"nixl-etcd: waiting for engine {engine_id} failed: {err}") from err
    raise RuntimeError(f"Timeout waiting for engine {engine_id}")  # pragma: no cover


class _EtcdReplySocket:
    """Stands in for vLLM's REQ socket inside its _nixl_handshake: answers each
    ``(GET_META_MSG, pp_rank, tp_rank)`` with the payload fetched for it."""

    def __init__(self, replies: Dict[Tuple[int, int], _Reply]) -> None:
        self._replies = replies
        self._next: Optional[List[bytes]] = None

    def setsockopt(self, *args: Any) -> None:
        pass

    def send(self, msg: bytes, *args: Any, **kwargs: Any) -> None:
        import msgspec

        _, pp_rank, tp_rank = msgspec.msgpack.decode(msg)
        reply = self._replies.get((pp_rank, tp_rank))
        if reply is None:
            from .install import vllm_version

            raise RuntimeError(
                f"nixl-etcd: vLLM {vllm_version()} asked for remote rank (pp {pp_rank}, tp "
                f"{tp_rank}) that the plugin did not fetch ({sorted(self._replies)}); this "
                "vLLM's handshake is not the one the plugin supports"
            )
        # The remote's perf_counter: from the side channel when it answered;
        # for etcd, ours (CLOCK_MONOTONIC is shared by the processes of one host;
        # across hosts the offset is taken as 0, see docs/vllm.md).
        perf = reply.remote_perf if reply.remote_perf is not None else time.perf_counter()
        self._next = [reply.payload, msgspec.msgpack.encode(perf)]

    def recv_multipart(self, *args: Any, **kwargs: Any) -> List[bytes]:
        out, self._next = self._next, None
        if out is None:
            raise RuntimeError("nixl-etcd: recv without send on the ETCD reply socket")
        return out


def _zmq_ctx(socket_type: Any, addr: str) -> Any:
    replies = getattr(_tls, "replies", None)
    if replies is None:
        return _orig["zmq_ctx"](socket_type, addr)
    return contextlib.nullcontext(_EtcdReplySocket(replies))


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
        return _orig["_nixl_handshake"](self, **call)

    if not _active(self):
        return orig()
    d = _discovery(self)
    logger.debug("Discovering engine %s through ETCD", expected_engine_id)
    started = time.perf_counter()
    ranks = self.transfer_topo.handshake_target_ranks(remote_tp_size, remote_dcp_size)
    targets = [(pp, r) for pp in range(remote_pp_size) for r in ranks]
    try:
        replies, incarnations = _fetch(d, expected_engine_id, targets, remote_tp_size, host, port)
    except _EtcdUnavailable as e:
        d.mark_down()
        cause = str(e.cause)
        refused = unsigned.refusal()
        if refused is not None:
            raise RuntimeError(f"ETCD coordination failed ({cause}) and {refused}") from e.cause
        key = cause.split(";")[0]
        if e.recent:
            logger.debug(
                "ETCD unavailable moments ago; vLLM's direct ZMQ handshake with engine %s",
                expected_engine_id,
            )
        elif key not in d.warned:
            d.warned.add(key)
            logger.warning(
                "ETCD coordination failed (%s); using vLLM's direct ZMQ handshake with "
                "engine %s at %s:%s",
                cause,
                expected_engine_id,
                host,
                port,
            )
        if not host or not port:
            raise RuntimeError(
                f"ETCD coordination failed ({cause}) and the request for engine "
                f"{expected_engine_id} carries no remote_host/remote_port for vLLM's ZMQ "
                "side channel"
            ) from e.cause
        with d.lock:
            d.via_etcd.discard(expected_engine_id)
        return orig()
    discovered = time.perf_counter()
    _tls.replies = replies
    try:
        result = orig()
    finally:
        _tls.replies = None
    if incarnations:
        try:
            d.watch(d.get_client(), expected_engine_id, incarnations)
        except Exception as e:  # the handshake itself succeeded
            logger.warning(
                "nixl-etcd: cannot watch engine %s for restarts (%s); a restart under the "
                "same engine_id will not be noticed",
                expected_engine_id,
                e,
            )
    elif expected_engine_id in d.via_etcd:
        with d.lock:
            d.via_etcd.discard(expected_engine_id)
    done = time.perf_counter()
    sources = sorted({r.source for r in replies.values()})
    logger.debug("ETCD handshake completed in %.3f seconds", done - started)
    logger.info(
        "nixl-etcd: handshake with engine %s rank(s) %s through %s: discovery %.2f ms, "
        "total %.2f ms",
        expected_engine_id,
        ",".join(f"{_rank_of(pp, r, remote_tp_size)}" for pp, r in targets),
        " + ".join(sources),
        (discovered - started) * 1e3,
        (done - started) * 1e3,
    )
    return result


def _track_remote_engine_replacement(self: Any, engine_id: str, host: str, port: int) -> None:
    d = self.__dict__.get("_nixl_etcd_discovery")
    if d is not None and engine_id in d.via_etcd:
        # Tracked by engine id: restarts come as ETCD events, not as a new
        # engine at an old address (which may be a placeholder or stale).
        host, port = f"etcd:{engine_id}", 0
    _orig["_track_remote_engine_replacement"](self, engine_id, host, port)


#: An engine that left (its records deleted) and has not come back for this
#: long is released with everything the decode kept for it, its
#: subscription included: a long-lived decode whose prefills restart under
#: fresh engine ids keeps no trace of the old ones.
GONE_RELEASE_S = 60.0


def _evict_stale(self: Any, wanted: Optional[Set[str]] = None) -> None:
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


def _make_start_load_kv(orig: Callable[..., Any]) -> Callable[..., Any]:
    def start_load_kv(self: Any, metadata: Any) -> Any:
        reqs = getattr(metadata, "reqs_to_recv", None) or {}
        _evict_stale(
            self,
            {m.remote.engine_id for m in reqs.values() if getattr(m, "remote", None) is not None},
        )
        return orig(self, metadata)

    start_load_kv.__wrapped__ = orig  # type: ignore[attr-defined]
    return start_load_kv


def _cleanup_remote_engines(self: Any) -> None:
    _orig["_cleanup_remote_engines"](self)
    _evict_stale(self)


def _worker_shutdown(self: Any) -> None:
    try:
        _orig["worker_shutdown"](self)
    finally:
        d = self.__dict__.get("_nixl_etcd_discovery")
        if d is not None:
            d.close()


# ---------------------------------------------------------------------------
# Decode side, worker process: pre-warm (VLLM_NIXL_ETCD_PREWARM=1).

# The pre-warm's settings, parsed and checked with every other variable.
PrewarmConfig = config.PrewarmConfig


class _Prewarm:
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
            tp = max(1, int(rec.world_size or 1))
        except Exception as e:
            with self.lock:
                self.started.discard(engine_id)
            logger.debug("nixl-etcd: pre-warm of engine %s skipped: %s", engine_id, e)
            return
        started = time.perf_counter()
        _tls.prewarm = True
        try:
            fut = self.worker._ensure_handshake(engine_id, "", 0, tp, 1, 1)
        except Exception as e:
            with self.lock:
                self.started.discard(engine_id)
            logger.warning("nixl-etcd: pre-warm of engine %s failed to start: %s", engine_id, e)
            return
        finally:
            _tls.prewarm = False
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
                "nixl-etcd: pre-warmed engine %s (TP %d): its NIXL agents were loaded %.2f ms "
                "after it appeared in ETCD, before any request",
                engine_id,
                tp,
                (time.perf_counter() - started) * 1e3,
            )

        fut.add_done_callback(done)


def _register_kv_caches(self: Any, kv_caches: Any) -> Any:
    result = _orig["register_kv_caches"](self, kv_caches)
    worker = getattr(self, "connector_worker", None)
    if worker is None or not _active(worker):
        return result
    role = getattr(getattr(self, "kv_transfer_config", None), "kv_role", None)
    if role == "kv_producer":
        return result  # it never reads from another engine
    d = _discovery(worker)
    try:
        # Connect at start: a bad setting, refused credentials or
        # permissions fail the engine's start here (the error names the
        # variable), instead of every P/D request later.
        client = d.get_client()
    except _EtcdUnavailable as e:
        # Unreachable: the first handshake tries again, and falls back with
        # the WARNING, as each one after it does.
        with d.lock:
            d.down_until = 0.0
        logger.info("nixl-etcd: ETCD not reachable at engine start (%s); retried per request", e)
        return result
    settings = config.load().prewarm  # checked at engine start (register, install)
    if settings is None:
        return result
    try:
        prewarm = _Prewarm(worker, client, settings)
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
    if getattr(_tls, "prewarm", False):
        return
    _orig["_evict_stale_engines"](self)
