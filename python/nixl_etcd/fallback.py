"""The one path from etcd to an engine's direct handshake, shared by the
engine helper (:class:`nixl_etcd.EtcdHandshake`) and the vLLM plugin: when
etcd cannot serve a handshake, the direct one is used only where it is
allowed (signed records refuse it, see :mod:`nixl_etcd.unsigned`), after one
WARNING that names the cause."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Set, Type

from . import unsigned


def fall_back(
    cause: BaseException,
    using: str,
    log: logging.Logger,
    *,
    options: Optional[Mapping[str, Any]] = None,
    error: Optional[Type[BaseException]] = None,
    warned: Optional[Set[str]] = None,
    quiet: bool = False,
) -> None:
    """Says that the direct handshake replaces etcd (``using``: what is used
    instead, in words that follow "using"), or raises when it may not be used.

    Args:
        cause: why etcd could not serve (its message is shown).
        options: client options of the caller (``hmac_key_file``), if any.
        error: the type raised on refusal (default: ``type(cause)``).
        warned: causes already warned about (by their first clause); a cause
            in it is logged at DEBUG, so an outage is one WARNING, not one per
            handshake.
        quiet: logged at DEBUG only (the caller warned moments ago).
    """
    refused = unsigned.refusal(options)
    if refused is not None:
        raise (error or type(cause))(f"ETCD coordination failed ({cause}) and {refused}") from cause
    key = str(cause).split(";")[0]
    if quiet or (warned is not None and key in warned):
        log.debug("ETCD still unavailable (%s); using %s", cause, using)
        return
    if warned is not None:
        warned.add(key)
    log.warning("ETCD coordination failed (%s); using %s", cause, using)
