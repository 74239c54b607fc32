"""Where the plugin hooks vLLM's NixlConnector, and the version gate.

One table, :data:`HOOKS`: each hook point (its vLLM owner, the attribute,
the full signature it must have, the wrapper that replaces it). The same
table installs the hooks and checks, before anything is replaced, that the
vLLM at hand has every hook point with exactly that signature (names, order,
kinds, which parameters have defaults): a vLLM whose connector changed is
refused with what differs, never hooked wrongly. A vLLM release outside
:data:`~nixl_etcd.vllm.SUPPORTED_VLLM` is refused too, unless
``VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM`` is on and every hook point matches (one
WARNING).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from . import SUPPORTED_VLLM, config, hooks, state

logger = logging.getLogger("vllm.nixl_etcd")

_NIXL = "vllm.distributed.kv_transfer.kv_connector.v1.nixl."


@dataclass(frozen=True)
class HookPoint:
    """An attribute of vLLM the plugin replaces (``wrapper``) or calls
    (``wrapper`` None), with the signature it must have."""

    module: str
    owner: Optional[str]  # a class of the module, or None: a module attribute
    name: str
    signature: str  # as :func:`signature_of` renders it
    wrapper: Optional[str]  # a function of :mod:`.hooks`
    key: str = ""  # where the original is kept in ``state.ORIG`` (default: name)
    prewarm: bool = False  # only for the pre-warm: all or none of these
    factory: bool = False  # ``wrapper(original)`` makes the wrapper

    @property
    def where(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else f"{self.module}.{self.name}"

    @property
    def orig_key(self) -> str:
        return self.key or self.name


def _point(module: str, *rest: Any, **kw: Any) -> HookPoint:
    return HookPoint(module if module.startswith("vllm.") else _NIXL + module, *rest, **kw)


#: Every hook point of vLLM 0.32's NixlConnector.
HOOKS: Tuple[HookPoint, ...] = (
    # Prefill, engine-core process: publish.
    _point("base_scheduler", "NixlBaseConnectorScheduler", "set_xfer_handshake_metadata",
           "self, metadata", "_set_xfer_handshake_metadata"),
    _point("base_scheduler", "NixlBaseConnectorScheduler", "shutdown", "self",
           "_scheduler_shutdown", key="scheduler_shutdown"),
    _point("vllm.v1.engine.core", "EngineCore", "shutdown", "self", "_engine_core_shutdown",
           key="engine_core_shutdown"),
    # Decode, engine-core process: requests without an address.
    _point("base_scheduler", "NixlBaseConnectorScheduler", "on_new_request", "self, request",
           "_on_new_request"),
    # Decode, worker process: discovery, the transport, restarts.
    _point("base_worker", "NixlBaseConnectorWorker", "_nixl_handshake",
           "self, host, port, remote_tp_size, expected_engine_id, remote_dcp_size=, "
           "remote_pp_size=, notif_agents_only=", "_nixl_handshake"),
    _point("base_worker", None, "zmq_ctx", "socket_type, addr", "_zmq_ctx"),
    _point("base_worker", "NixlBaseConnectorWorker", "_track_remote_engine_replacement",
           "self, engine_id, host, port", "_track_remote_engine_replacement"),
    _point("base_worker", "NixlBaseConnectorWorker", "_cleanup_remote_engines", "self",
           "_cleanup_remote_engines"),
    _point("base_worker", "NixlBaseConnectorWorker", "_cleanup_remote_engine",
           "self, engine_id, *, log_eviction=", None),
    _point("base_worker", "NixlBaseConnectorWorker", "shutdown", "self", "_worker_shutdown",
           key="worker_shutdown"),
    _point("pull_worker", "NixlPullConnectorWorker", "start_load_kv", "self, metadata",
           "_make_start_load_kv", key="NixlPullConnectorWorker.start_load_kv", factory=True),
    _point("push_worker", "NixlPushConnectorWorker", "start_load_kv", "self, metadata",
           "_make_start_load_kv", key="NixlPushConnectorWorker.start_load_kv", factory=True),
    # Decode, worker process: pre-warm.
    _point("connector", "NixlBaseConnector", "register_kv_caches", "self, kv_caches",
           "_register_kv_caches", prewarm=True),
    _point("base_worker", "NixlBaseConnectorWorker", "_evict_stale_engines", "self",
           "_evict_stale_engines", prewarm=True),
    _point("base_worker", "NixlBaseConnectorWorker", "_ensure_handshake",
           "self, engine_id, host, port, tp_size, dcp_size=, pp_size=, notif_agents_only=",
           None, prewarm=True),
)

#: Values of vLLM the plugin reads: (module, name).
VALUES: Tuple[Tuple[str, str], ...] = ((_NIXL + "metadata", "GET_META_MSG"),)


def signature_of(fn: Callable[..., Any]) -> str:
    """``fn``'s parameters: names in order, ``=`` after one with a default,
    ``*`` before keyword-only ones, ``*name`` / ``**name`` for variadics."""
    out: List[str] = []
    star = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name + ("=" if p.default is not p.empty else ""))
    return ", ".join(out)


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # pragma: no cover - vLLM not importable at all
        return "unknown"


def _resolve(point: HookPoint) -> Tuple[Any, Any]:
    """(owner object, current attribute), either None when absent."""
    try:
        owner: Any = importlib.import_module(point.module)
    except Exception:
        return None, None
    if point.owner is not None:
        owner = getattr(owner, point.owner, None)
    return owner, getattr(owner, point.name, None) if owner is not None else None


def mismatches(points: Tuple[HookPoint, ...] = HOOKS) -> Tuple[List[str], List[str]]:
    """What this vLLM lacks or has differently: (required, pre-warm) lists of
    ``Owner.name`` or ``Owner.name(found) where (expected)`` is needed."""
    required: List[str] = []
    prewarm: List[str] = []
    for p in points:
        _, attr = _resolve(p)
        where = prewarm if p.prewarm else required
        if not callable(attr):
            where.append(p.where)
            continue
        try:
            found = signature_of(attr)
        except (TypeError, ValueError):
            found = "?"
        if found != p.signature:
            where.append(f"{p.where}({found}) where ({p.signature}) is needed")
    for module, name in VALUES:
        try:
            present = hasattr(importlib.import_module(module), name)
        except Exception:
            present = False
        if not present:
            required.append(f"{module}.{name}")
    return required, prewarm


def _unsupported(what: List[str]) -> RuntimeError:
    return RuntimeError(
        f"nixl-etcd: vLLM {vllm_version()} lacks what the nixl-etcd plugin hooks in its "
        f"NixlConnector ({'; '.join(what)}); the plugin supports vLLM "
        f"{', '.join(SUPPORTED_VLLM)}.x. Install a supported vLLM, or unset "
        "VLLM_NIXL_USE_ETCD to run vLLM's stock ZMQ handshake (see docs/vllm.md)"
    )


def check_supported(settings: Optional[config.PluginConfig] = None) -> bool:
    """Raises RuntimeError, naming the vLLM version and what differs, unless
    every required hook point matches and the release is supported (or
    allowed). Returns whether the pre-warm's hook points match too."""
    settings = settings or config.load()
    required, prewarm = mismatches()
    if required:
        raise _unsupported(required)
    version = vllm_version()
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        if not settings.allow_untested_vllm:
            raise RuntimeError(
                f"nixl-etcd: vLLM {version} is not a release the nixl-etcd plugin was tested "
                f"with ({', '.join(SUPPORTED_VLLM)}.x); its hook points match. Set "
                f"{config.ALLOW_UNTESTED_VLLM}=1 to run it anyway, install a supported vLLM, "
                "or unset VLLM_NIXL_USE_ETCD to run vLLM's stock ZMQ handshake (see docs/vllm.md)"
            )
        logger.warning(
            "nixl-etcd: vLLM %s is not a release the plugin was tested with (%s.x); running "
            "it because %s is set and every hook point matches",
            version,
            ", ".join(SUPPORTED_VLLM),
            config.ALLOW_UNTESTED_VLLM,
        )
    if prewarm:
        logger.info(
            "nixl-etcd: pre-warm unavailable with this vLLM (%s)", "; ".join(prewarm)
        )
    return not prewarm


_installed = False
_lock = threading.Lock()


def install() -> None:
    """Installs the hooks (idempotent, thread-safe), after checking every
    setting and every hook point. The hooks act only on connectors for which
    etcd is on: ``VLLM_NIXL_USE_ETCD`` true, or the explicit
    ``EtcdNixlConnector`` (unless ``VLLM_NIXL_USE_ETCD`` is set false)."""
    global _installed
    with _lock:
        if _installed:
            return
        settings = config.load()
        with_prewarm = check_supported(settings)
        for module, name in VALUES:
            state.ORIG[name] = getattr(importlib.import_module(module), name)
        for p in HOOKS:
            if p.prewarm and not with_prewarm:
                continue
            owner, attr = _resolve(p)
            state.ORIG[p.orig_key] = attr
            if p.wrapper is None:
                continue
            wrapper = getattr(hooks, p.wrapper)
            setattr(owner, p.name, wrapper(attr) if p.factory else wrapper)
        _installed = True
        logger.info(
            "nixl-etcd: NixlConnector handshakes go through ETCD (vLLM %s, namespace %s)",
            vllm_version(),
            os.environ.get("VLLM_NIXL_ETCD_NAMESPACE", "/vllm/nixl/agents"),
        )


def installed() -> bool:
    return _installed
