"""The decode's transport for vLLM's own handshake code: the payloads come
from etcd (or, for a prefill without nixl-etcd, from the request's ZMQ side
channel), and vLLM's ``_nixl_handshake`` reads them through a stand-in for
its REQ socket, so vLLM decodes and checks them unchanged.

* :class:`SideChannelProbe` asks the side channel in a thread, while etcd is
  waited on; :func:`wait_or_side_channel` sleeps until one of them answers.
* :func:`side_channel` fetches the payloads over the side channel when etcd
  does not answer, waiting as long as the etcd wait would.
* :class:`EtcdReplySocket` answers vLLM's ``(GET_META_MSG, pp_rank, tp_rank)``
  with the fetched payload; :func:`zmq_ctx` hands it to vLLM on the thread
  whose handshake fetched it, and vLLM's own ``zmq_ctx`` to everything else.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import errors, unsigned
from ..client import Client
from . import state

logger = logging.getLogger("vllm.nixl_etcd")


class Reply:
    """One rank's payload, where it came from, and the remote's clock if known."""

    __slots__ = ("payload", "remote_perf", "source")

    def __init__(self, payload: bytes, remote_perf: Optional[float], source: str) -> None:
        self.payload = payload
        self.remote_perf = remote_perf
        self.source = source


class SideChannelProbe:
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
        self.reply: Optional[Reply] = None
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
                sock.send(msgspec.msgpack.encode((state.ORIG["GET_META_MSG"], pp_rank, tp_rank)))
                deadline = time.monotonic() + timeout
                while not self._cancel.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.error = f"no answer from {self.addr} within {timeout:.1f} s"
                        return
                    if sock.poll(int(min(left, 0.1) * 1000) + 1, zmq.POLLIN):
                        parts = sock.recv_multipart()
                        perf = msgspec.msgpack.decode(parts[1]) if len(parts) > 1 else None
                        self.reply = Reply(bytes(parts[0]), perf, f"ZMQ side channel {self.addr}")
                        return
            finally:
                ctx.destroy(linger=0)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()
            if self._notify is not None:
                self._notify.set()


def wait_or_side_channel(
    client: Client,
    engine_id: str,
    rank: int,
    pp: int,
    tp: int,
    host: Optional[str],
    port: Optional[int],
    timeout: float,
) -> Reply:
    # One event for both ends (the etcd wait, the probe): the handshake thread
    # sleeps until one of them has something to say, never polls.
    changed = threading.Event()
    # Signed records: an unauthenticated payload from the network is not
    # taken in their place (unless allowed, see nixl_etcd.unsigned).
    probe = (
        SideChannelProbe(host, int(port), pp, tp, timeout, notify=changed)
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
                return Reply(result["payload"], None, "ETCD")
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


def side_channel(
    host: str, port: int, targets: List[Tuple[int, int]], timeout: float
) -> Dict[Tuple[int, int], Reply]:
    """The payloads of ``targets`` from vLLM's ZMQ side channel at
    ``host:port``, each waited for up to ``timeout`` (the fallback when etcd
    does not answer: vLLM's own socket gives up after 5 s, which a starved
    prefill on a busy host can exceed)."""
    replies: Dict[Tuple[int, int], Reply] = {}
    for pp, tp in targets:
        probe = SideChannelProbe(host, port, pp, tp, timeout)
        probe.done.wait()
        if probe.reply is None:
            raise RuntimeError(
                f"vLLM's ZMQ side channel at {host}:{port} did not give rank (pp {pp}, tp {tp}): "
                f"{probe.error}"
            )
        replies[(pp, tp)] = probe.reply
    return replies


class EtcdReplySocket:
    """Stands in for vLLM's REQ socket inside its _nixl_handshake: answers each
    ``(GET_META_MSG, pp_rank, tp_rank)`` with the payload fetched for it."""

    def __init__(self, replies: Dict[Tuple[int, int], Reply]) -> None:
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


def zmq_ctx(socket_type: Any, addr: str) -> Any:
    replies = getattr(state.THREAD, "replies", None)
    if replies is None:
        return state.ORIG["zmq_ctx"](socket_type, addr)
    return contextlib.nullcontext(EtcdReplySocket(replies))


