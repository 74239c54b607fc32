"""The Pythonic client over the C API of ``libnixl_etcd.so``.

One :class:`Client` is one ``nixl_etcd_client``: a connection to etcd and a
lease that lives as long as the client. Everything the client registers is
attached to the lease and disappears when the client closes (or, if the
process dies, when the lease expires).

Every blocking call (open, register, wait, wait_engine, close, ...) runs with
the GIL released: other Python threads keep running meanwhile.
"""

from __future__ import annotations

import atexit
import ctypes
import enum
import json
import logging
import math
import operator
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from . import _ffi
from .errors import Closed, InvalidArgument, NixlError, check

logger = logging.getLogger("nixl_etcd")

BytesLike = Union[bytes, bytearray, memoryview]
EventCallback = Callable[["Event"], None]

_MAX_U32 = 2**32 - 1
_MAX_I64 = 2**63 - 1
_u8_p = ctypes.POINTER(ctypes.c_uint8)


# ---------------------------------------------------------------------------
# Argument conversion (Python-side checks the C API cannot make: a NUL inside
# a str, a negative rank that ctypes would silently wrap).


def _text_arg(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise InvalidArgument(f"{name} {value!r} contains a NUL character")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{name} is not valid UTF-8: {e}") from None


def _u32_arg(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, not bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}") from None
    if not 0 <= n <= _MAX_U32:
        raise InvalidArgument(f"{name} {n} is out of range (0..{_MAX_U32})")
    return n


def _timeout_ms(timeout: Optional[float]) -> int:
    """Seconds (None: the client's timeout, VLLM_NIXL_ETCD_TIMEOUT) to the C milliseconds."""
    if timeout is None:
        return -1
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidArgument(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0 seconds (or None), not {timeout!r}")
    if math.isinf(timeout):
        return _MAX_I64
    return min(int(math.ceil(timeout * 1000.0)), _MAX_I64)


class _Bytes:
    """A pointer and length for ``const uint8_t *`` arguments, without copying
    when the object exports a contiguous buffer. Keeps what it points to alive."""

    __slots__ = ("ptr", "len", "_keep")

    def __init__(self, data: Optional[BytesLike], name: str) -> None:
        self.ptr: Optional[Any] = None
        self.len = 0
        self._keep: Any = None
        if data is None:
            return
        if isinstance(data, str):
            raise InvalidArgument(f"{name} must be bytes-like, not str (encode it first)")
        try:
            view = memoryview(data)
        except TypeError:
            raise InvalidArgument(f"{name} must be bytes-like, not {type(data).__name__}") from None
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self.len = view.nbytes
        if self.len == 0:
            return
        if view.readonly:
            raw = view.obj if type(view.obj) is bytes and len(view.obj) == self.len else view.tobytes()
            self._keep = raw
            self.ptr = ctypes.cast(ctypes.c_char_p(raw), _u8_p)
        else:
            arr = (ctypes.c_uint8 * self.len).from_buffer(view)
            self._keep = arr
            self.ptr = ctypes.cast(arr, _u8_p)


def _take_buffer(buf: _ffi.c_buffer) -> bytes:
    """Copies a library buffer into bytes, then frees it with nixl_etcd_buffer_free."""
    try:
        if buf.len and buf.data:
            return ctypes.string_at(buf.data, buf.len)
        return b""
    finally:
        _ffi.lib().nixl_etcd_buffer_free(ctypes.byref(buf))


def _c_text(ptr: Optional[int]) -> str:
    return ctypes.string_at(ptr).decode("utf-8", "replace") if ptr else ""


def _b_text(raw: Optional[bytes]) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


# ---------------------------------------------------------------------------
# Module-level calls.


def version() -> str:
    """The library's version (``nixl_etcd_version``), e.g. ``"0.2.0"``."""
    return _b_text(_ffi.lib().nixl_etcd_version())


def metrics() -> str:
    """The process's nixl-etcd metrics (``nixl_etcd_metrics``): registrations,
    lookups, waits, events, lease grants and re-grants, keep-alive failures,
    watch starts and restarts, as an OpenMetrics text exposition ending in
    ``# EOF``. No etcd call."""
    buf = _ffi.c_buffer()
    check(_ffi.lib().nixl_etcd_metrics(ctypes.byref(buf)))
    return _take_buffer(buf).decode("utf-8")


def enabled() -> bool:
    """Whether ``VLLM_NIXL_USE_ETCD`` enables etcd coordination (1, true, yes, on)."""
    return bool(_ffi.lib().nixl_etcd_enabled())


def status_str(status: int) -> str:
    """The library's description of a status number (``nixl_etcd_status_str``)."""
    return _ffi.status_str(status)


# The library's log levels -> Python's (TRACE has no Python name: 5).
_LOG_LEVELS = {
    _ffi.LOG_ERROR: logging.ERROR,
    _ffi.LOG_WARNING: logging.WARNING,
    _ffi.LOG_INFO: logging.INFO,
    _ffi.LOG_DEBUG: logging.DEBUG,
    _ffi.LOG_TRACE: 5,
}

# The ctypes callback given to the library; kept alive while it is set.
_log_cfunc: Optional[Any] = None
_log_lock = threading.Lock()


def _on_log(_user_data: Optional[int], level: int, target: Optional[bytes], message: Optional[bytes]) -> None:
    try:
        # "nixl_etcd::client" -> the Python logger "nixl_etcd.client".
        name = _b_text(target).replace("::", ".") or "nixl_etcd"
        logging.getLogger(name).log(_LOG_LEVELS.get(level, logging.INFO), "%s", _b_text(message))
    except Exception:  # never let an exception into the library's thread
        pass


def log_to_python() -> None:
    """Routes the library's log lines into Python's :mod:`logging` instead of
    stderr (``nixl_etcd_set_log_callback``): each line goes to the logger named
    by its target (``nixl_etcd.client``, ... under ``nixl_etcd``) at its level.
    The library's own level filter (``VLLM_LOGGING_LEVEL``, default INFO) still
    applies first. :func:`log_to_stderr` undoes it."""
    global _log_cfunc
    with _log_lock:
        cfunc = _ffi.LOG_CALLBACK(_on_log)
        check(_ffi.lib().nixl_etcd_set_log_callback(cfunc, None))
        # The previous one is never called again once the call returned.
        _log_cfunc = cfunc


def log_to_stderr() -> None:
    """Sends the library's log lines to stderr again (the default)."""
    global _log_cfunc
    with _log_lock:
        check(_ffi.lib().nixl_etcd_set_log_callback(_ffi.LOG_CALLBACK(), None))
        _log_cfunc = None


@atexit.register
def _stop_logging_to_python() -> None:
    # No line may call into Python while the interpreter goes away.
    if _log_cfunc is not None:
        log_to_stderr()


def library_path() -> str:
    """Where ``libnixl_etcd.so`` was loaded from (loads it if needed)."""
    return _ffi.library_path()


def target_ranks(local_tp: int, local_rank: int, remote_tp: int) -> List[int]:
    """The remote ranks local rank ``local_rank`` of a ``local_tp``-way engine reads
    from when the remote engine is ``remote_tp``-way (vLLM's mapping).

    With ``local_tp >= remote_tp``: the one rank ``local_rank // (local_tp // remote_tp)``;
    else the ``k = remote_tp // local_tp`` ranks ``local_rank*k .. local_rank*k+k-1``.

    Raises:
        InvalidArgument: sizes that do not divide, or a rank out of range.
    """
    lt = _u32_arg(local_tp, "local_tp")
    lr = _u32_arg(local_rank, "local_rank")
    rt = _u32_arg(remote_tp, "remote_tp")
    lib = _ffi.lib()
    cap = 8
    while True:
        out = (ctypes.c_uint32 * cap)()
        n = ctypes.c_size_t(0)
        status = lib.nixl_etcd_target_ranks(lt, lr, rt, out, cap, ctypes.byref(n))
        if status == _ffi.ERR_INVALID_ARGUMENT and n.value > cap:
            cap = n.value  # the library says how many are needed
            continue
        check(status)
        return list(out[: n.value])


# ---------------------------------------------------------------------------
# Records and events.


@dataclass(frozen=True)
class Record:
    """A rank's whole record (``nixl_etcd_lookup_record``)."""

    engine_id: str
    rank: int
    #: The engine's declared number of ranks (open option ``world_size``); None if undeclared.
    world_size: Optional[int]
    #: ``VLLM_NIXL_SIDE_CHANNEL_HOST`` of the registrant, else its host name.
    host: str
    pid: int
    #: Unique per registering client: a new value means the rank restarted.
    incarnation: str
    #: Registration time, milliseconds since the Unix epoch.
    registered_at_ms: int
    #: etcd's mod_revision of the record.
    revision: int
    #: The registered metadata (NIXL agent metadata).
    metadata: bytes


class EventKind(enum.IntEnum):
    """Kind of a change event."""

    #: A rank appeared: load its metadata.
    ADDED = _ffi.EVENT_ADDED
    #: The same incarnation registered new metadata: reload.
    UPDATED = _ffi.EVENT_UPDATED
    #: The rank restarted (new incarnation): drop the old remote agent, load the new one.
    REPLACED = _ffi.EVENT_REPLACED
    #: The rank is gone (unregistered, closed, or its lease expired).
    REMOVED = _ffi.EVENT_REMOVED


@dataclass(frozen=True)
class Event:
    """One change to a rank's record, copied out of the library's event."""

    kind: Union[EventKind, int]
    engine_id: str
    rank: int
    #: The incarnation added, or the one removed.
    incarnation: str
    host: str
    #: The new metadata; None for REMOVED.
    metadata: Optional[bytes]
    #: etcd revision of the change.
    revision: int

    @classmethod
    def _from_c(cls, ev: _ffi.c_event) -> "Event":
        try:
            kind: Union[EventKind, int] = EventKind(ev.kind)
        except ValueError:
            kind = int(ev.kind)
        if kind == EventKind.REMOVED:
            metadata: Optional[bytes] = None
        elif ev.metadata and ev.metadata_len:
            metadata = ctypes.string_at(ev.metadata, ev.metadata_len)
        else:
            metadata = b""
        return cls(
            kind=kind,
            engine_id=_b_text(ev.engine_id),
            rank=int(ev.rank),
            incarnation=_b_text(ev.incarnation),
            host=_b_text(ev.host),
            metadata=metadata,
            revision=int(ev.revision),
        )


# Threads currently inside one of our callbacks (the library's event threads).
# A ctypes callback object must not be freed while it runs: unsubscribing or
# closing from inside a callback parks the objects instead.
_in_callback: Dict[int, int] = {}
_in_callback_lock = threading.Lock()
_parked: List[Any] = []


def _inside_callback() -> bool:
    with _in_callback_lock:
        return _in_callback.get(threading.get_ident(), 0) > 0


def _release_callbacks(cfuncs: List[Any]) -> None:
    """Drops ctypes callback objects, or parks them if a callback is running here."""
    with _in_callback_lock:
        if _in_callback.get(threading.get_ident(), 0) > 0:
            _parked.extend(cfuncs)
        else:
            # Parked ones are safe to drop once no callback of ours is on this
            # thread and their subscription is over (the library guarantees it
            # never calls them again).
            if not any(_in_callback.values()):
                _parked.clear()
    cfuncs.clear()


_END = object()


class Subscription:
    """A live subscription (``nixl_etcd_subscribe``).

    With a callback, events are delivered by calling it on the library's event
    thread ("nixl-etcd-events"), one at a time: it must not block (no long
    waits, no ``Client.wait``), since while it runs no other event of this
    client is delivered. Exceptions it raises are logged and dropped.

    Without a callback, events are queued and the subscription is an iterator
    (``for event in sub``) that ends when the subscription does; ``get`` waits
    for one event with a timeout.

    Use it as a context manager, or call :meth:`unsubscribe`.
    """

    def __init__(self, client: "Client", engine_id: Optional[str], callback: Optional[EventCallback]):
        self._client = client
        self.engine_id = engine_id
        self._callback = callback
        self._queue: Optional["queue.SimpleQueue[Any]"] = None if callback else queue.SimpleQueue()
        self.id = 0
        self._active = False
        # The C function pointer given to the library; alive until the
        # subscription is over (see Client.unsubscribe / Client.close).
        self._cfunc: Optional[Any] = _ffi.EVENT_CALLBACK(self._on_event)

    # Runs on the library's event thread, with the GIL taken by ctypes.
    def _on_event(self, _user_data: Optional[int], event_p: Any) -> None:
        ident = threading.get_ident()
        with _in_callback_lock:
            _in_callback[ident] = _in_callback.get(ident, 0) + 1
        try:
            event = Event._from_c(event_p.contents)
            if self._queue is not None:
                self._queue.put(event)
            else:
                assert self._callback is not None
                self._callback(event)
        except Exception:  # never let an exception into the library's thread
            logger.exception("nixl_etcd subscription callback failed (event dropped)")
        finally:
            with _in_callback_lock:
                left = _in_callback[ident] - 1
                if left:
                    _in_callback[ident] = left
                else:
                    del _in_callback[ident]

    def _ended(self) -> List[Any]:
        """Marks the subscription over; returns the callback objects to release."""
        self._active = False
        if self._queue is not None:
            self._queue.put(_END)
        cf, self._cfunc = self._cfunc, None
        return [cf] if cf is not None else []

    @property
    def active(self) -> bool:
        """True until unsubscribed (or the client closed)."""
        return self._active

    def unsubscribe(self) -> None:
        """Ends the subscription (see :meth:`Client.unsubscribe`)."""
        self._client.unsubscribe(self)

    def get(self, timeout: Optional[float] = None) -> Optional[Event]:
        """The next queued event, waiting up to ``timeout`` seconds (None: forever).

        Returns None on timeout, or once the subscription is over and every
        queued event was read. Only for subscriptions without a callback.
        """
        if self._queue is None:
            raise InvalidArgument("this subscription delivers to a callback; it has no queue")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._queue.put(_END)  # every later get/next ends too
            return None
        return item

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._queue is None:
            raise InvalidArgument("this subscription delivers to a callback; it is not iterable")
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)
            raise StopIteration
        return item

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._active:
            try:
                self.unsubscribe()
            except Closed:
                pass

    def __repr__(self) -> str:
        target = self.engine_id if self.engine_id is not None else "*"
        mode = "callback" if self._callback else "iterator"
        return f"<nixl_etcd.Subscription id={self.id} engine={target} {mode} active={self._active}>"


# ---------------------------------------------------------------------------
# The client.

_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


@atexit.register
def _close_live_clients() -> None:
    # Stop every client's event thread before the interpreter goes away, so no
    # callback runs during finalization.
    for client in list(_live_clients):
        try:
            client.close()
        except Exception:
            pass


#: Every key of the options JSON of ``nixl_etcd_open`` (the library's
#: ``config::OPTIONS``; ``tests/integration/single_source.rs`` checks they agree).
OPTIONS = (
    "endpoints",
    "namespace",
    "timeout_s",
    "lease_ttl_s",
    "host",
    "max_request_bytes",
    "max_metadata_bytes",
    "world_size",
    "nixl_namespace",
    "ca_cert",
    "cert",
    "key",
    "username",
    "password",
    "password_file",
    "hmac_key_file",
    "hmac_previous_key_file",
    "cache_idle_s",
)


def build_options(
    *,
    endpoints: Union[str, Sequence[str], None] = None,
    namespace: Optional[str] = None,
    timeout_s: Optional[float] = None,
    lease_ttl_s: Optional[int] = None,
    host: Optional[str] = None,
    max_request_bytes: Optional[int] = None,
    world_size: Optional[int] = None,
    nixl_namespace: Optional[str] = None,
    **extra: Any,
) -> Optional[str]:
    """The options JSON of ``nixl_etcd_open``: the keys given (not None), or None
    when none is (then the environment alone configures the client).

    Each key overrides its environment variable; unknown keys are passed on
    and refused by the library (``InvalidArgument`` naming the key).
    """
    opts: Dict[str, Any] = {}
    if endpoints is not None:
        opts["endpoints"] = endpoints if isinstance(endpoints, str) else list(endpoints)
    for key, value in (
        ("namespace", namespace),
        ("timeout_s", timeout_s),
        ("lease_ttl_s", lease_ttl_s),
        ("host", host),
        ("max_request_bytes", max_request_bytes),
        ("world_size", world_size),
        ("nixl_namespace", nixl_namespace),
    ):
        if value is not None:
            opts[key] = value
    opts.update({k: v for k, v in extra.items() if v is not None})
    if not opts:
        return None
    try:
        return json.dumps(opts)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"options cannot be written as JSON: {e}") from None


#: Options whose values are secrets: never kept, shown or logged.
_SECRET_OPTIONS = frozenset({"password"})


def _redacted(options_json: Optional[str]) -> Optional[str]:
    """The options JSON with every secret value replaced by "<redacted>"."""
    if options_json is None:
        return None
    opts = json.loads(options_json)
    for key in _SECRET_OPTIONS & opts.keys():
        opts[key] = "<redacted>"
    return json.dumps(opts)


class Client:
    """An open nixl-etcd client (``nixl_etcd_open``).

    Configured from the environment (``VLLM_NIXL_ETCD_ENDPOINTS``,
    ``VLLM_NIXL_ETCD_NAMESPACE``, ``VLLM_NIXL_ETCD_TIMEOUT``,
    ``VLLM_NIXL_ETCD_LEASE_TTL``, ``VLLM_NIXL_SIDE_CHANNEL_HOST``,
    ``NIXL_ETCD_NAMESPACE``), each overridden by the keyword argument of the
    same meaning when given:

    Args:
        endpoints: "http://host:port" (comma-separated) or a list of them.
        namespace: key prefix of the rank records.
        timeout_s: bounds connecting and every call; the default wait timeout.
        lease_ttl_s: the client's lease TTL (integer seconds).
        host: recorded as the rank's host.
        max_request_bytes: etcd's request size limit (default 1.5 MiB); larger
            metadata is stored in chunks beside the record.
        world_size: the engine's number of ranks, recorded for ``wait_engine``.
        nixl_namespace: namespace of the ``*_nixl`` calls (verbatim).
        **options: further keys of the options JSON, passed as they are:
            ``max_metadata_bytes`` (default 64 MiB), ``ca_cert``, ``cert``,
            ``key``, ``username``, ``password``, ``password_file``,
            ``hmac_key_file``, ``hmac_previous_key_file`` (see
            docs/security.md), ``cache_idle_s`` (default 300: an engine no
            client of the process read for this long leaves the cache).

    Raises:
        ConnectionFailed: etcd did not answer within the timeout
            ("ETCD connection failed: ...").
        InvalidArgument: a bad option or environment value.
        PermissionDenied: etcd refused the credentials.

    Use it as a context manager; :meth:`close` revokes the lease, so every
    record the client registered disappears at once.
    """

    def __init__(
        self,
        *,
        endpoints: Union[str, Sequence[str], None] = None,
        namespace: Optional[str] = None,
        timeout_s: Optional[float] = None,
        lease_ttl_s: Optional[int] = None,
        host: Optional[str] = None,
        max_request_bytes: Optional[int] = None,
        world_size: Optional[int] = None,
        nixl_namespace: Optional[str] = None,
        **options: Any,
    ) -> None:
        self._handle: Optional[int] = None
        self._closed = True
        self._lock = threading.Lock()
        self._subs: Dict[int, Subscription] = {}
        options_json = build_options(
            endpoints=endpoints,
            namespace=namespace,
            timeout_s=timeout_s,
            lease_ttl_s=lease_ttl_s,
            host=host,
            max_request_bytes=max_request_bytes,
            world_size=world_size,
            nixl_namespace=nixl_namespace,
            **options,
        )
        lib = _ffi.lib()
        out = _ffi.c_client_p()
        arg = options_json.encode("utf-8") if options_json is not None else None
        # Only the redacted form is kept: repr and attributes never hold a secret.
        self.options_json = _redacted(options_json)
        del options_json
        check(lib.nixl_etcd_open(arg, ctypes.byref(out)))
        self._handle = out.value
        self._closed = False
        _live_clients.add(self)

    # -- lifecycle ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Closes the client (``nixl_etcd_close``): revokes its lease (all its
        records disappear at once), wakes its blocked waits with :class:`Closed`,
        ends its subscriptions. Idempotent.

        Raises:
            ConnectionFailed / Timeout: revoking failed; the client is released
                anyway and its records vanish when the lease expires.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs = list(self._subs.values())
            self._subs.clear()
        status = _ffi.lib().nixl_etcd_close(self._handle)
        message = _ffi.last_error() if status != _ffi.OK else ""
        # The library guarantees no callback runs once close returned.
        cfuncs: List[Any] = []
        for sub in subs:
            cfuncs.extend(sub._ended())
        _release_callbacks(cfuncs)
        _live_clients.discard(self)
        if status != _ffi.OK:
            from .errors import error_for

            raise error_for(status, message or _ffi.status_str(status))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not hide the exception in flight
            logger.warning("closing the nixl-etcd client failed: %s", e)

    def __del__(self) -> None:
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<nixl_etcd.Client {state} options={self.options_json or 'env'}>"

    def _h(self) -> Optional[int]:
        # After close the stale token is still passed: the library answers
        # CLOSED with its own message (handles are never reused).
        return self._handle

    # -- rank records ------------------------------------------------------

    def lease_health(self) -> Dict[str, Any]:
        """Where this client's lease stands (``nixl_etcd_lease_health``, no
        etcd call): ``{"condition": "kept" | "renewing" | "lost", "since":
        seconds since the epoch it came to that, "regrants": times it was lost
        and granted again}``."""
        cond, since, regrants = ctypes.c_uint32(), ctypes.c_uint64(), ctypes.c_uint64()
        check(
            _ffi.lib().nixl_etcd_lease_health(
                self._h(), ctypes.byref(cond), ctypes.byref(since), ctypes.byref(regrants)
            )
        )
        names = {0: "kept", 1: "renewing", 2: "lost"}
        return {
            "condition": names.get(cond.value, f"unknown ({cond.value})"),
            "since": since.value / 1000.0,
            "regrants": regrants.value,
        }

    def register(self, engine_id: str, rank: int, metadata: BytesLike) -> None:
        """Publishes ``metadata`` (binary, NUL bytes allowed) for (engine_id, rank)
        under the client's lease. Registering again replaces.

        Raises:
            TooLarge: the metadata is over ``max_metadata_bytes`` (64 MiB by default;
                larger than one etcd request is stored in chunks); nothing written.
            InvalidArgument: a bad engine id or rank.
            ConnectionFailed, Timeout, Closed.
        """
        eid = _text_arg(engine_id, "engine_id")
        r = _u32_arg(rank, "rank")
        data = _Bytes(metadata, "metadata")
        check(_ffi.lib().nixl_etcd_register(self._h(), eid, r, data.ptr, data.len))

    def unregister(self, engine_id: str, rank: int) -> None:
        """Removes a registration this client made."""
        eid = _text_arg(engine_id, "engine_id")
        check(_ffi.lib().nixl_etcd_unregister(self._h(), eid, _u32_arg(rank, "rank")))

    def lookup(self, engine_id: str, rank: int) -> bytes:
        """The metadata of (engine_id, rank), from the cache when it holds it.

        Raises:
            NotFound: at once when absent ("Engine ... not found in ETCD ...").
        """
        eid = _text_arg(engine_id, "engine_id")
        r = _u32_arg(rank, "rank")
        buf = _ffi.c_buffer()
        try:
            check(_ffi.lib().nixl_etcd_lookup(self._h(), eid, r, ctypes.byref(buf)))
        finally:
            data = _take_buffer(buf)
        return data

    def lookup_record(self, engine_id: str, rank: int) -> Record:
        """The whole record of (engine_id, rank): host, pid, incarnation, world
        size, registration time, revision and metadata.

        Raises:
            NotFound: at once when absent.
        """
        return self._record(_ffi.lib().nixl_etcd_lookup_record, engine_id, rank)

    def recheck(self, engine_id: str, rank: int) -> Record:
        """The record of (engine_id, rank) as etcd has it now, never from the
        cache: for a reader whose transfer to the rank just failed. A different
        incarnation than the one loaded means it restarted (reload); the same
        one means its process is gone while its lease runs out (drop it).

        Raises:
            NotFound: the rank is gone ("Engine ... not found in ETCD").
        """
        return self._record(_ffi.lib().nixl_etcd_recheck, engine_id, rank)

    def _record(self, call: Any, engine_id: str, rank: int) -> Record:
        eid = _text_arg(engine_id, "engine_id")
        r = _u32_arg(rank, "rank")
        lib = _ffi.lib()
        rec = _ffi.c_record()
        try:
            check(call(self._h(), eid, r, ctypes.byref(rec)))
            meta = rec.metadata
            return Record(
                engine_id=_c_text(rec.engine_id),
                rank=int(rec.rank),
                world_size=int(rec.world_size) or None,
                host=_c_text(rec.host),
                pid=int(rec.pid),
                incarnation=_c_text(rec.incarnation),
                registered_at_ms=int(rec.registered_at_ms),
                revision=int(rec.revision),
                metadata=ctypes.string_at(meta.data, meta.len) if meta.len and meta.data else b"",
            )
        finally:
            lib.nixl_etcd_record_free(ctypes.byref(rec))

    def wait(self, engine_id: str, rank: int, timeout: Optional[float] = None) -> bytes:
        """The metadata of (engine_id, rank) as soon as it is registered (a get,
        then a watch: no polling). The GIL is released while waiting.

        Args:
            timeout: seconds; None means the client's timeout (``timeout_s`` /
                ``VLLM_NIXL_ETCD_TIMEOUT``).

        Raises:
            Timeout: "Timeout waiting for engine ... (rank ...) after ... s; ...".
            Closed: the client was closed meanwhile.
        """
        eid = _text_arg(engine_id, "engine_id")
        r = _u32_arg(rank, "rank")
        ms = _timeout_ms(timeout)
        buf = _ffi.c_buffer()
        try:
            check(_ffi.lib().nixl_etcd_wait(self._h(), eid, r, ms, ctypes.byref(buf)))
        finally:
            data = _take_buffer(buf)
        return data

    def wait_engine(self, engine_id: str, timeout: Optional[float] = None) -> int:
        """Waits until ranks 0..world_size-1 of ``engine_id`` are all registered;
        returns the world size (declared by the registrants' ``world_size``).

        Raises:
            Timeout: the message names the missing ranks.
        """
        eid = _text_arg(engine_id, "engine_id")
        ms = _timeout_ms(timeout)
        size = ctypes.c_uint32(0)
        check(_ffi.lib().nixl_etcd_wait_engine(self._h(), eid, ms, ctypes.byref(size)))
        return int(size.value)

    # -- change events -----------------------------------------------------

    def subscribe(
        self, engine_id: Optional[str] = None, callback: Optional[EventCallback] = None
    ) -> Subscription:
        """Subscribes to the records of ``engine_id`` (None: every engine of the
        namespace): first ADDED for each record present now, then each change.

        Args:
            callback: called with each :class:`Event` on the library's event
                thread; it must return quickly. Without one, the returned
                :class:`Subscription` queues the events and is an iterator.
        """
        eid = None if engine_id is None else _text_arg(engine_id, "engine_id")
        if callback is not None and not callable(callback):
            raise InvalidArgument("callback must be callable")
        sub = Subscription(self, engine_id, callback)
        sub_id = ctypes.c_uint64(0)
        # Events may arrive before subscribe returns: the callback object is
        # live already (the Subscription holds it).
        check(
            _ffi.lib().nixl_etcd_subscribe(self._h(), eid, sub._cfunc, None, ctypes.byref(sub_id))
        )
        sub.id = int(sub_id.value)
        sub._active = True
        with self._lock:
            if self._closed:  # closed meanwhile (e.g. from a callback)
                _release_callbacks(sub._ended())
            else:
                self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, subscription: Union[Subscription, int]) -> None:
        """Ends a subscription. Once this returns its callback is not running
        and never runs again (from inside that very callback, the callback
        finishes normally).

        Raises:
            NotFound: unknown (or already ended) subscription.
        """
        sub_id = subscription.id if isinstance(subscription, Subscription) else subscription
        sid = operator.index(sub_id)
        if not 0 <= sid < 2**64:
            raise InvalidArgument(f"subscription id {sid} is out of range")
        check(_ffi.lib().nixl_etcd_unsubscribe(self._h(), sid))
        with self._lock:
            sub = self._subs.pop(sid, None)
        if sub is not None:
            _release_callbacks(sub._ended())

    # -- NIXL's own key layout ---------------------------------------------

    def publish_nixl(self, agent_name: str, blob: BytesLike, label: Optional[str] = None) -> None:
        """Publishes ``blob`` in the key layout of NIXL's built-in etcd exchange
        (``{ns}/{agent}/`` marker and ``{ns}/{agent}/{label}``, raw), under the
        lease. ``label`` None means "metadata"."""
        name = _text_arg(agent_name, "agent_name")
        lab = None if label is None else _text_arg(label, "label")
        data = _Bytes(blob, "blob")
        check(_ffi.lib().nixl_etcd_publish_nixl(self._h(), name, lab, data.ptr, data.len))

    def fetch_nixl(
        self, agent_name: str, label: Optional[str] = None, timeout: Optional[float] = None
    ) -> bytes:
        """The raw blob at ``{ns}/{agent}/{label}``, whoever wrote it, waiting up
        to ``timeout`` seconds for it (None: the client's timeout; 0: one read).

        Raises:
            Timeout: "Timeout waiting for NIXL agent ... (key ...) after ... s; ...".
        """
        name = _text_arg(agent_name, "agent_name")
        lab = None if label is None else _text_arg(label, "label")
        ms = _timeout_ms(timeout)
        buf = _ffi.c_buffer()
        try:
            check(_ffi.lib().nixl_etcd_fetch_nixl(self._h(), name, lab, ms, ctypes.byref(buf)))
        finally:
            data = _take_buffer(buf)
        return data

    def unpublish_nixl(self, agent_name: str) -> None:
        """Deletes the agent's whole ``{ns}/{agent}/`` prefix, as NIXL's invalidate.

        Raises:
            NotFound: this client did not publish the agent.
        """
        check(_ffi.lib().nixl_etcd_unpublish_nixl(self._h(), _text_arg(agent_name, "agent_name")))

    def serve_nixl_store(self, listen: str = "127.0.0.1:0", **options: Any) -> str:
        """Serves the NIXL TCPStore metadata store in this process, with etcd
        behind it, and returns the ``host:port`` to put in
        ``NIXL_TCPSTORE_ENDPOINT`` before NIXL agents are created. Stock NIXL
        agents then publish and fetch through etcd, each writing process under a
        lease of its own. Stopped (its leases revoked) by :meth:`close`.

        Keyword options are the store's (``max_connections=64``,
        ``remote_grace=5``, ``liveness="connection"``, ...: the keys of
        ``nixl-etcd serve``'s store flags); a bad one raises ``InvalidArgument``."""
        port = ctypes.c_uint16(0)
        text = _text_arg(listen, "listen")
        if options:
            opts = _text_arg(json.dumps(options), "options")
            check(
                _ffi.lib().nixl_etcd_serve_nixl_store_opts(
                    self._h(), text, opts, ctypes.byref(port)
                )
            )
        else:
            check(_ffi.lib().nixl_etcd_serve_nixl_store(self._h(), text, ctypes.byref(port)))
        host = listen.rsplit(":", 1)[0] if ":" in listen else "127.0.0.1"
        return f"{host}:{port.value}"

    # -- NIXL C agents (builds with the `nixl` cargo feature) --------------

    @staticmethod
    def has_nixl_support() -> bool:
        """Whether the loaded library was built with the ``nixl`` feature."""
        return _ffi.has_export("nixl_etcd_publish_agent")

    def _nixl_export(self, name: str) -> Any:
        if not _ffi.has_export(name):
            raise NixlError(
                f"{name} is not in {_ffi.library_path()}: build the library with "
                "`cargo build --release --features nixl`"
            )
        return getattr(_ffi.lib(), name)

    def publish_agent(self, engine_id: str, rank: int, agent: int) -> None:
        """Registers the local metadata of a NIXL C agent (a ``nixl_capi_agent_t``
        pointer, as an int) for (engine_id, rank). Python ``nixl_agent`` objects
        do not expose that pointer: register ``agent.get_agent_metadata()`` instead."""
        fn = self._nixl_export("nixl_etcd_publish_agent")
        eid = _text_arg(engine_id, "engine_id")
        check(fn(self._h(), eid, _u32_arg(rank, "rank"), agent or None))

    def load_remote_agent(
        self, agent: int, engine_id: str, rank: int, timeout: Optional[float] = None
    ) -> str:
        """Waits for (engine_id, rank), loads its metadata into the NIXL C agent
        ``agent`` (a ``nixl_capi_agent_t`` pointer) and returns the remote agent's name."""
        fn = self._nixl_export("nixl_etcd_load_remote_agent")
        eid = _text_arg(engine_id, "engine_id")
        r = _u32_arg(rank, "rank")
        name = ctypes.c_void_p(None)
        try:
            check(fn(self._h(), agent or None, eid, r, _timeout_ms(timeout), ctypes.byref(name)))
            return _c_text(name.value)
        finally:
            _ffi.lib().nixl_etcd_string_free(name.value)

    # -- conveniences ------------------------------------------------------

    target_ranks = staticmethod(target_ranks)
