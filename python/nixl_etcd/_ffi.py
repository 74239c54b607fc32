"""Loading ``libnixl_etcd.so`` and declaring every export of ``include/nixl_etcd.h``.

The library is found, in this order:

1. ``$NIXL_ETCD_LIBRARY``: a path to the shared library (or to a directory that
   holds ``libnixl_etcd.so``). When set, nothing else is tried.
2. ``libnixl_etcd.so`` inside this package (what ``pip install ./python`` ships).
3. The checkout this package sits in: ``<repo>/target/release`` (and
   ``$CARGO_TARGET_DIR/release``), then ``target/debug``.
4. The system's loader (``ldconfig``, ``LD_LIBRARY_PATH``).

Loading happens on first use, so ``import nixl_etcd`` always works; a missing
library raises :class:`LibraryNotFound` (an ``ImportError``) naming every place
that was tried.

The library is loaded with :class:`ctypes.CDLL`, which releases the GIL for the
whole duration of every foreign call: a blocking ``nixl_etcd_wait`` does not
stall the other Python threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import List, Optional

LIBRARY_ENV = "NIXL_ETCD_LIBRARY"
LIBRARY_NAME = "libnixl_etcd.so"

# Status numbers (stable; include/nixl_etcd.h).
OK = 0
ERR_INVALID_ARGUMENT = -1
ERR_CONNECTION = -2
ERR_NOT_FOUND = -3
ERR_TIMEOUT = -4
ERR_TOO_LARGE = -5
ERR_CLOSED = -6
ERR_INTERNAL = -7
ERR_BAD_RECORD = -8
ERR_NIXL = -9
ERR_PERMISSION = -10
ERR_BAD_SIGNATURE = -11

# Event kinds.
EVENT_ADDED = 1
EVENT_UPDATED = 2
EVENT_REPLACED = 3
EVENT_REMOVED = 4

# C types of the header.
c_status = ctypes.c_int32
c_event_kind = ctypes.c_int32
c_client_p = ctypes.c_void_p  # nixl_etcd_client *: an opaque token


class c_buffer(ctypes.Structure):
    """``nixl_etcd_buffer``: bytes owned by the library."""

    _fields_ = [
        ("data", ctypes.POINTER(ctypes.c_uint8)),
        ("len", ctypes.c_size_t),
    ]


class c_record(ctypes.Structure):
    """``nixl_etcd_record``: a rank's whole record, owned by the library."""

    _fields_ = [
        ("engine_id", ctypes.c_void_p),  # char *, freed by nixl_etcd_record_free
        ("rank", ctypes.c_uint32),
        ("world_size", ctypes.c_uint32),
        ("host", ctypes.c_void_p),
        ("pid", ctypes.c_uint32),
        ("incarnation", ctypes.c_void_p),
        ("registered_at_ms", ctypes.c_uint64),
        ("revision", ctypes.c_int64),
        ("metadata", c_buffer),
    ]


class c_event(ctypes.Structure):
    """``nixl_etcd_event``: valid only during the callback."""

    _fields_ = [
        ("kind", c_event_kind),
        ("engine_id", ctypes.c_char_p),
        ("rank", ctypes.c_uint32),
        ("incarnation", ctypes.c_char_p),
        ("host", ctypes.c_char_p),
        ("metadata", ctypes.POINTER(ctypes.c_uint8)),
        ("metadata_len", ctypes.c_size_t),
        ("revision", ctypes.c_int64),
    ]


# void (*nixl_etcd_event_callback)(void *user_data, const nixl_etcd_event *event)
EVENT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(c_event))

# void (*nixl_etcd_log_callback)(void *user_data, nixl_etcd_log_level level,
#                                const char *target, const char *message)
LOG_CALLBACK = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_char_p
)

# Log levels (nixl_etcd_log_level).
LOG_ERROR = 1
LOG_WARNING = 2
LOG_INFO = 3
LOG_DEBUG = 4
LOG_TRACE = 5

_u8_p = ctypes.POINTER(ctypes.c_uint8)
_u32_p = ctypes.POINTER(ctypes.c_uint32)
_size_p = ctypes.POINTER(ctypes.c_size_t)
_buffer_p = ctypes.POINTER(c_buffer)
_record_p = ctypes.POINTER(c_record)

# (name, restype, argtypes, required). Optional exports exist only in builds
# with the `nixl` cargo feature.
_SIGNATURES = [
    ("nixl_etcd_open", c_status, [ctypes.c_char_p, ctypes.POINTER(c_client_p)], True),
    ("nixl_etcd_close", c_status, [c_client_p], True),
    (
        "nixl_etcd_lease_health",
        c_status,
        [
            c_client_p,
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint64),
        ],
        True,
    ),
    (
        "nixl_etcd_register",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, _u8_p, ctypes.c_size_t],
        True,
    ),
    ("nixl_etcd_unregister", c_status, [c_client_p, ctypes.c_char_p, ctypes.c_uint32], True),
    (
        "nixl_etcd_lookup",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, _buffer_p],
        True,
    ),
    (
        "nixl_etcd_wait",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_int64, _buffer_p],
        True,
    ),
    (
        "nixl_etcd_publish_nixl",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_char_p, _u8_p, ctypes.c_size_t],
        True,
    ),
    (
        "nixl_etcd_fetch_nixl",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, _buffer_p],
        True,
    ),
    ("nixl_etcd_unpublish_nixl", c_status, [c_client_p, ctypes.c_char_p], True),
    (
        "nixl_etcd_lookup_record",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, _record_p],
        True,
    ),
    (
        "nixl_etcd_recheck",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, _record_p],
        True,
    ),
    ("nixl_etcd_record_free", None, [_record_p], True),
    (
        "nixl_etcd_subscribe",
        c_status,
        [
            c_client_p,
            ctypes.c_char_p,
            EVENT_CALLBACK,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint64),
        ],
        True,
    ),
    ("nixl_etcd_unsubscribe", c_status, [c_client_p, ctypes.c_uint64], True),
    (
        "nixl_etcd_wait_engine",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_int64, _u32_p],
        True,
    ),
    (
        "nixl_etcd_target_ranks",
        c_status,
        [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, _u32_p, ctypes.c_size_t, _size_p],
        True,
    ),
    (
        "nixl_etcd_publish_agent",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_void_p],
        False,
    ),
    (
        "nixl_etcd_load_remote_agent",
        c_status,
        [
            c_client_p,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_void_p),  # char **, freed by nixl_etcd_string_free
        ],
        False,
    ),
    (
        "nixl_etcd_prewarm_start",
        c_status,
        [
            c_client_p,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_void_p),  # nixl_etcd_prewarm **
        ],
        False,
    ),
    (
        "nixl_etcd_prewarm_remote",
        c_status,
        [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_void_p),  # char **, freed by nixl_etcd_string_free
        ],
        False,
    ),
    ("nixl_etcd_prewarm_lock", c_status, [ctypes.c_void_p], False),
    ("nixl_etcd_prewarm_unlock", c_status, [ctypes.c_void_p], False),
    ("nixl_etcd_prewarm_free", None, [ctypes.c_void_p], False),
    (
        "nixl_etcd_prewarm_set_warmup",
        c_status,
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],  # pre-warm, function, user data
        False,
    ),
    (
        "nixl_etcd_prewarm_read",
        c_status,
        [
            ctypes.c_void_p,  # nixl_capi_agent_t
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_size_t,
            ctypes.c_uint64,
            ctypes.c_uint32,
            ctypes.c_size_t,
            ctypes.c_uint64,
            ctypes.c_size_t,
        ],
        False,
    ),
    (
        "nixl_etcd_serve_nixl_store",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint16)],
        True,
    ),
    (
        "nixl_etcd_serve_nixl_store_opts",
        c_status,
        [c_client_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint16)],
        True,
    ),
    ("nixl_etcd_set_log_callback", c_status, [LOG_CALLBACK, ctypes.c_void_p], True),
    ("nixl_etcd_string_free", None, [ctypes.c_void_p], True),
    ("nixl_etcd_buffer_free", None, [_buffer_p], True),
    ("nixl_etcd_last_error", ctypes.c_char_p, [], True),
    ("nixl_etcd_status_str", ctypes.c_char_p, [c_status], True),
    ("nixl_etcd_version", ctypes.c_char_p, [], True),
    ("nixl_etcd_metrics", c_status, [_buffer_p], True),
    ("nixl_etcd_enabled", ctypes.c_bool, [], True),
]

EXPORTS = tuple(name for name, _, _, _ in _SIGNATURES)


class LibraryNotFound(ImportError):
    """``libnixl_etcd.so`` could not be found or loaded."""


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def candidate_paths() -> List[Path]:
    """Where the library is looked for when ``$NIXL_ETCD_LIBRARY`` is not set."""
    pkg = _package_dir()
    out = [pkg / LIBRARY_NAME]
    target_dirs = []
    env_target = os.environ.get("CARGO_TARGET_DIR")
    if env_target:
        target_dirs.append(Path(env_target))
    # python/nixl_etcd/ -> the repository root, when running from a checkout.
    repo = pkg.parent.parent
    if (repo / "Cargo.toml").is_file():
        target_dirs.append(repo / "target")
    for profile in ("release", "debug"):
        for t in target_dirs:
            out.append(t / profile / LIBRARY_NAME)
    return out


def _load() -> "tuple[ctypes.CDLL, str]":
    env = os.environ.get(LIBRARY_ENV, "").strip()
    if env:
        path = Path(env)
        if path.is_dir():
            path = path / LIBRARY_NAME
        try:
            return ctypes.CDLL(str(path)), str(path)
        except OSError as e:
            raise LibraryNotFound(
                f"cannot load the nixl-etcd library from {LIBRARY_ENV}={env}: {e}; "
                "build it with `cargo build --release` (target/release/libnixl_etcd.so)"
            ) from e
    tried = []
    for path in candidate_paths():
        if path.is_file():
            try:
                return ctypes.CDLL(str(path)), str(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
        else:
            tried.append(f"{path} (absent)")
    system = ctypes.util.find_library("nixl_etcd")
    for name in ([system] if system else []) + [LIBRARY_NAME]:
        try:
            return ctypes.CDLL(name), name
        except OSError as e:
            tried.append(f"{name} via the system loader ({e})")
    raise LibraryNotFound(
        "cannot find libnixl_etcd.so; install the package with `pip install ./python` "
        f"(builds it), or build it with `cargo build --release` and set {LIBRARY_ENV} "
        "to target/release/libnixl_etcd.so. Tried: " + "; ".join(tried)
    )


def _declare(lib: ctypes.CDLL) -> None:
    for name, restype, argtypes, required in _SIGNATURES:
        try:
            fn = getattr(lib, name)
        except AttributeError:
            if required:
                raise LibraryNotFound(
                    f"{name} is missing from the nixl-etcd library: it is older than this "
                    "Python package; rebuild it"
                ) from None
            continue
        fn.restype = restype
        fn.argtypes = argtypes


_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_path: Optional[str] = None


def lib() -> ctypes.CDLL:
    """The loaded library, with every export declared (loaded on first call)."""
    global _lib, _path
    if _lib is None:
        with _lock:
            if _lib is None:
                loaded, path = _load()
                _declare(loaded)
                _path = path
                _lib = loaded
    return _lib


def library_path() -> str:
    """The path (or name) the library was loaded from; loads it if needed."""
    lib()
    assert _path is not None
    return _path


def has_export(name: str) -> bool:
    """Whether the loaded library has ``name`` (optional NIXL-feature exports)."""
    return hasattr(lib(), name)


def last_error() -> str:
    """This thread's last failure message (``nixl_etcd_last_error``)."""
    raw = lib().nixl_etcd_last_error()
    return raw.decode("utf-8", "replace") if raw else ""


def status_str(status: int) -> str:
    """The library's static description of a status."""
    raw = lib().nixl_etcd_status_str(status)
    return raw.decode("utf-8", "replace") if raw else "unknown status"
