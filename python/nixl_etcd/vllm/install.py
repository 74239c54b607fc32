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

import ast
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


def _runtime_signature(point: HookPoint) -> Optional[str]:
    _, attr = _resolve(point)
    if not callable(attr):
        return None
    try:
        return signature_of(attr)
    except (TypeError, ValueError):
        return "?"


def _runtime_value(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except Exception:
        return False


def mismatches(
    points: Tuple[HookPoint, ...] = HOOKS,
    signature: Callable[[HookPoint], Optional[str]] = _runtime_signature,
    has_value: Callable[[str, str], bool] = _runtime_value,
) -> Tuple[List[str], List[str]]:
    """What a vLLM lacks or has differently: (required, pre-warm) lists of
    ``Owner.name`` or ``Owner.name(found) where (expected)`` is needed. By
    default the vLLM imported here; :func:`source_mismatches` reads a
    release's source instead."""
    required: List[str] = []
    prewarm: List[str] = []
    for p in points:
        where = prewarm if p.prewarm else required
        found = signature(p)
        if found is None:
            where.append(p.where)
        elif found != p.signature:
            where.append(f"{p.where}({found}) where ({p.signature}) is needed")
    for module, name in VALUES:
        if not has_value(module, name):
            required.append(f"{module}.{name}")
    return required, prewarm


def source_mismatches(root: str) -> Tuple[List[str], List[str]]:
    """:func:`mismatches` for the vLLM source tree at ``root`` (the directory
    holding ``vllm/``), read without importing it: a release that cannot run
    here (vLLM's CUDA wheels on a CPU machine) is checked all the same."""
    source = _Source(root)
    return mismatches(HOOKS, source.signature, source.has_value)


class _Source:
    """Definitions in a vLLM source tree, by module, following ``from x
    import y`` and base classes (parsed with :mod:`ast`, nothing imported)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._trees: dict = {}

    def _tree(self, module: str) -> Optional[Any]:
        if module not in self._trees:
            path = os.path.join(self.root, *module.split(".")) + ".py"
            try:
                with open(path, encoding="utf-8") as f:
                    self._trees[module] = ast.parse(f.read())
            except (OSError, SyntaxError):
                self._trees[module] = None
        return self._trees[module]

    def _find(self, module: str, name: str, body: Optional[List[Any]] = None, depth: int = 0) -> Any:
        """The def, class or assignment ``name`` of ``module`` (or of ``body``)."""
        tree = self._tree(module)
        if tree is None or depth > 8:
            return None
        for node in body if body is not None else tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name == name:
                    return node
            elif isinstance(node, ast.Assign):
                if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    return node
            elif isinstance(node, ast.AnnAssign):
                if isinstance(node.target, ast.Name) and node.target.id == name:
                    return node
        if body is not None:
            return None
        for node in tree.body:  # imported into the module
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self._find(node.module, alias.name, None, depth + 1)
        return None

    def _member(self, module: str, owner: str, name: str, depth: int = 0) -> Any:
        cls = self._find(module, owner)
        if not isinstance(cls, ast.ClassDef) or depth > 8:
            return None
        found = self._find(module, name, cls.body)
        if found is not None:
            return found
        for base in cls.bases:  # inherited
            if isinstance(base, ast.Name):
                where = self._module_of(module, base.id)
                if where is not None:
                    found = self._member(where, base.id, name, depth + 1)
                    if found is not None:
                        return found
        return None

    def _module_of(self, module: str, name: str) -> Optional[str]:
        """The module that defines ``name`` as seen from ``module``."""
        tree = self._tree(module)
        if tree is None:
            return None
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name == name:
                return module
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if any((a.asname or a.name) == name for a in node.names):
                    return node.module
        return None

    def signature(self, point: HookPoint) -> Optional[str]:
        if point.owner is None:
            node = self._find(point.module, point.name)
        else:
            node = self._member(point.module, point.owner, point.name)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return None
        return _render(node.args)

    def has_value(self, module: str, name: str) -> bool:
        return self._find(module, name) is not None


def _render(args: Any) -> str:
    """An ``ast.arguments`` as :func:`signature_of` renders a signature."""
    out: List[str] = []
    positional = list(args.posonlyargs) + list(args.args)
    first_default = len(positional) - len(args.defaults)
    out += [a.arg + ("=" if i >= first_default else "") for i, a in enumerate(positional)]
    if args.vararg is not None:
        out.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        out.append("*")
    out += [a.arg + ("=" if d is not None else "") for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg is not None:
        out.append(f"**{args.kwarg.arg}")
    return ", ".join(out)


def _releases() -> str:
    return ", ".join(f"{v}.x" for v in SUPPORTED_VLLM)


def _unsupported(what: List[str]) -> RuntimeError:
    return RuntimeError(
        f"nixl-etcd: vLLM {vllm_version()} lacks what the nixl-etcd plugin hooks in its "
        f"NixlConnector ({'; '.join(what)}); the plugin supports vLLM "
        f"{_releases()}. Install a supported vLLM, or unset "
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
                f"with ({_releases()}); its hook points match. Set "
                f"{config.ALLOW_UNTESTED_VLLM}=1 to run it anyway, install a supported vLLM, "
                "or unset VLLM_NIXL_USE_ETCD to run vLLM's stock ZMQ handshake (see docs/vllm.md)"
            )
        logger.warning(
            "nixl-etcd: vLLM %s is not a release the plugin was tested with (%s); running "
            "it because %s is set and every hook point matches",
            version,
            _releases(),
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
