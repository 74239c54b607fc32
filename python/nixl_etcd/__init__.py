"""nixl_etcd: Python bindings (ctypes) for nixl-etcd.

NIXL agent metadata discovery and exchange through etcd, for disaggregated
prefill/decode engines: an engine registers its NIXL agent metadata per
(engine_id, rank) under a lease that dies with the process; its peers look it
up, wait for it, or subscribe to changes.

    import nixl_etcd

    with nixl_etcd.Client(endpoints="http://127.0.0.1:2379") as c:
        c.register("prefill_engine", 0, agent.get_agent_metadata())
        md = c.wait("prefill_engine", 0, timeout=10)

The shared library is ``libnixl_etcd.so``, shipped inside the package by
``pip install ./python``, or found through ``$NIXL_ETCD_LIBRARY`` (see
:mod:`nixl_etcd._ffi` for the search order).
"""

from ._ffi import EXPORTS, LIBRARY_ENV, LibraryNotFound
from .client import (
    Client,
    Event,
    EventKind,
    OPTIONS,
    Record,
    Subscription,
    build_options,
    enabled,
    library_path,
    log_to_python,
    log_to_stderr,
    metrics,
    status_str,
    target_ranks,
    version,
)
from .errors import (
    BadRecord,
    Closed,
    ConnectionFailed,
    InternalError,
    InvalidArgument,
    NixlEtcdError,
    NixlError,
    PermissionDenied,
    BadSignature,
    NotFound,
    Timeout,
    TooLarge,
)
from .handshake import DirectHandshake, EtcdHandshake



def __getattr__(name: str) -> str:
    # __version__ is the loaded library's version (the crate's), read on first use.
    if name == "__version__":
        return version()
    raise AttributeError(f"module 'nixl_etcd' has no attribute {name!r}")


__all__ = [
    "OPTIONS",
    "BadRecord",
    "Client",
    "Closed",
    "ConnectionFailed",
    "DirectHandshake",
    "EXPORTS",
    "EtcdHandshake",
    "Event",
    "EventKind",
    "InternalError",
    "InvalidArgument",
    "LIBRARY_ENV",
    "LibraryNotFound",
    "NixlError",
    "PermissionDenied",
    "BadSignature",
    "NixlEtcdError",
    "NotFound",
    "Record",
    "Subscription",
    "Timeout",
    "TooLarge",
    "build_options",
    "enabled",
    "library_path",
    "log_to_python",
    "log_to_stderr",
    "status_str",
    "metrics",
    "target_ranks",
    "version",
]
