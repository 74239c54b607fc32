"""Exceptions: one class per status of the C API.

Every failing call raises the subclass matching its status, carrying the
library's own message (``nixl_etcd_last_error``, read on the calling thread
right after the call), e.g.::

    ConnectionFailed: ETCD connection failed: ...; check that etcd is running at ...
    NotFound: Engine decode_engine not found in ETCD (rank 0, key ...); ...
    Timeout: Timeout waiting for engine prefill_engine (rank 0) after 10.0 s; ...

The base class derives from :class:`RuntimeError`, as in the guide
("RuntimeError: ETCD connection failed: ...").
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from . import _ffi


class NixlEtcdError(RuntimeError):
    """A nixl-etcd call failed.

    Attributes:
        status: the C status number (negative ``NIXL_ETCD_ERR_*``).
        message: the library's message (also ``str(error)``).
    """

    #: The status this class stands for (the base: any status).
    STATUS: Optional[int] = None

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status: int = status if status is not None else (self.STATUS or _ffi.ERR_INTERNAL)

    @property
    def status_name(self) -> str:
        """The C constant's name, e.g. ``NIXL_ETCD_ERR_TIMEOUT``."""
        return STATUS_NAMES.get(self.status, f"status {self.status}")

    def __reduce__(self):  # picklable across processes
        return (type(self), (self.message, self.status))


class InvalidArgument(NixlEtcdError):
    """A bad argument, engine id, option or environment value (``NIXL_ETCD_ERR_INVALID_ARGUMENT``)."""

    STATUS = _ffi.ERR_INVALID_ARGUMENT


class ConnectionFailed(NixlEtcdError):
    """etcd is unreachable (``NIXL_ETCD_ERR_CONNECTION``): "ETCD connection failed: ..."."""

    STATUS = _ffi.ERR_CONNECTION


class NotFound(NixlEtcdError):
    """No record for this engine and rank (``NIXL_ETCD_ERR_NOT_FOUND``)."""

    STATUS = _ffi.ERR_NOT_FOUND


class Timeout(NixlEtcdError):
    """The call did not finish in time (``NIXL_ETCD_ERR_TIMEOUT``)."""

    STATUS = _ffi.ERR_TIMEOUT


class TooLarge(NixlEtcdError):
    """Metadata larger than what etcd can store; nothing was written (``NIXL_ETCD_ERR_TOO_LARGE``)."""

    STATUS = _ffi.ERR_TOO_LARGE


class Closed(NixlEtcdError):
    """The client is closed, or was opened by the parent of a forked process (``NIXL_ETCD_ERR_CLOSED``)."""

    STATUS = _ffi.ERR_CLOSED


class InternalError(NixlEtcdError):
    """A bug in the library: a caught panic or an unexpected state (``NIXL_ETCD_ERR_INTERNAL``)."""

    STATUS = _ffi.ERR_INTERNAL


class BadRecord(NixlEtcdError):
    """A value in etcd that is not a record this library reads (``NIXL_ETCD_ERR_BAD_RECORD``)."""

    STATUS = _ffi.ERR_BAD_RECORD


class NixlError(NixlEtcdError):
    """A NIXL call failed, or NIXL could not be loaded (``NIXL_ETCD_ERR_NIXL``)."""

    STATUS = _ffi.ERR_NIXL


class PermissionDenied(NixlEtcdError):
    """etcd refused the credentials, or the user's roles do not allow the operation on the key
    (``NIXL_ETCD_ERR_PERMISSION``)."""

    STATUS = _ffi.ERR_PERMISSION


class BadSignature(NixlEtcdError):
    """Records are signed (``VLLM_NIXL_ETCD_HMAC_KEY_FILE``) and a record has no signature, or
    one that does not verify (``NIXL_ETCD_ERR_BAD_SIGNATURE``)."""

    STATUS = _ffi.ERR_BAD_SIGNATURE


ERROR_CLASSES: Dict[int, Type[NixlEtcdError]] = {
    cls.STATUS: cls  # type: ignore[misc]
    for cls in (
        InvalidArgument,
        ConnectionFailed,
        NotFound,
        Timeout,
        TooLarge,
        Closed,
        InternalError,
        BadRecord,
        NixlError,
        PermissionDenied,
        BadSignature,
    )
}

STATUS_NAMES: Dict[int, str] = {
    _ffi.OK: "NIXL_ETCD_OK",
    _ffi.ERR_INVALID_ARGUMENT: "NIXL_ETCD_ERR_INVALID_ARGUMENT",
    _ffi.ERR_CONNECTION: "NIXL_ETCD_ERR_CONNECTION",
    _ffi.ERR_NOT_FOUND: "NIXL_ETCD_ERR_NOT_FOUND",
    _ffi.ERR_TIMEOUT: "NIXL_ETCD_ERR_TIMEOUT",
    _ffi.ERR_TOO_LARGE: "NIXL_ETCD_ERR_TOO_LARGE",
    _ffi.ERR_CLOSED: "NIXL_ETCD_ERR_CLOSED",
    _ffi.ERR_INTERNAL: "NIXL_ETCD_ERR_INTERNAL",
    _ffi.ERR_BAD_RECORD: "NIXL_ETCD_ERR_BAD_RECORD",
    _ffi.ERR_NIXL: "NIXL_ETCD_ERR_NIXL",
    _ffi.ERR_PERMISSION: "NIXL_ETCD_ERR_PERMISSION",
    _ffi.ERR_BAD_SIGNATURE: "NIXL_ETCD_ERR_BAD_SIGNATURE",
}


def error_for(status: int, message: str) -> NixlEtcdError:
    """The exception for ``status`` (the base class for an unknown one)."""
    cls = ERROR_CLASSES.get(status, NixlEtcdError)
    return cls(message, status)


def check(status: int) -> None:
    """Raises the matching exception unless ``status`` is ``NIXL_ETCD_OK``.

    Must be called on the thread that made the call, right after it: the
    message is the thread's ``nixl_etcd_last_error``.
    """
    if status == _ffi.OK:
        return
    message = _ffi.last_error() or _ffi.status_str(status)
    raise error_for(status, message)
