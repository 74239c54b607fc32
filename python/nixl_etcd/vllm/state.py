"""What the plugin's modules share in one process: vLLM's originals of what
the hooks replace (filled by :mod:`.install`), per-thread flags, and whether
etcd is on for a given connector part."""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict

from . import config

#: vLLM's originals, by hook point (``install.HookPoint.orig_key``), and the
#: values read from vLLM (``GET_META_MSG``).
ORIG: Dict[str, Callable[..., Any]] = {}

#: Per-thread flags: ``replies`` while vLLM's ``_nixl_handshake`` runs on
#: payloads fetched from etcd (:mod:`.transport`), ``prewarm`` while the
#: pre-warm starts a handshake (:mod:`.prewarm`).
THREAD = threading.local()

#: Attribute naming the explicit connector's choice on scheduler/worker objects.
FORCE_ATTR = "_nixl_etcd_use"


def active(obj: Any) -> bool:
    """Whether etcd coordination is on for this scheduler/worker object."""
    settings = config.current()
    if getattr(obj, FORCE_ATTR, None) is not None:
        return bool(getattr(obj, FORCE_ATTR)) and settings.etcd_for_explicit_connector
    return settings.use_etcd


def timeout_s() -> float:
    return config.current().timeout_s
