"""The vLLM plugin's own settings, read from the environment, parsed and checked
once: :func:`load` returns a :class:`PluginConfig` or raises :class:`ConfigError`
naming the variable, the value and what is accepted. Never a silent default,
never a silent stock mode: a typo in ``VLLM_NIXL_USE_ETCD`` is an error, not
"off".

The variables read here are the ones the plugin itself interprets:

=================================== ==============================================
``VLLM_NIXL_USE_ETCD``              1/true/yes/on: etcd coordination; 0/false/no/off,
                                    empty or unset: vLLM's stock handshake
``VLLM_NIXL_ETCD_TIMEOUT``          seconds, above 0 and at most 86400 (default 10);
                                    the same rule and message as the library's
``VLLM_NIXL_ETCD_PREWARM``          boolean, as ``VLLM_NIXL_USE_ETCD`` (default off)
``VLLM_NIXL_ETCD_PREWARM_ENGINES``  comma-separated engine ids, or prefixes ending
                                    in ``*``; empty pieces are skipped (default:
                                    every engine but the worker's own)
``VLLM_NIXL_ETCD_PREWARM_MAX``      a positive integer (default 16)
``VLLM_NIXL_ETCD_ALLOW_UNSIGNED``   boolean (default off): with signed records, allows
                                    vLLM's unauthenticated direct handshake
                                    (:mod:`nixl_etcd.unsigned`)
``VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM`` boolean (default off): runs a vLLM release the
                                    plugin was not tested with, if its hook points
                                    match (:mod:`.install`), with one WARNING
=================================== ==============================================

Every variable is checked whatever ``VLLM_NIXL_USE_ETCD`` says: an unset or
empty variable is its default, which is always valid, so with none of them set
nothing can fail; a variable that is set must be valid even while etcd is off
(it would otherwise surface, unexplained, the day etcd is turned on).

The library's variables (endpoints, namespace, lease TTL, TLS, authentication,
signing keys) are checked by the library itself when a client opens, with
messages of the same form (``docs/configuration.md``).

Pure logic: no vLLM, no etcd, no library.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

from ..env import FALSE_VALUES, TRUE_VALUES, flag
from ..env import raw as _raw

__all__ = [
    "ConfigError",
    "PluginConfig",
    "PrewarmConfig",
    "load",
    "load_prewarm",
    "parse_bool",
    "parse_timeout",
    "USE_ETCD",
    "TIMEOUT",
    "PREWARM",
    "PREWARM_ENGINES",
    "PREWARM_MAX",
    "ALLOW_UNSIGNED",
    "ALLOW_UNTESTED_VLLM",
    "VARIABLES",
    "TRUE_VALUES",
    "FALSE_VALUES",
    "DEFAULT_TIMEOUT_S",
    "MAX_TIMEOUT_S",
]

USE_ETCD = "VLLM_NIXL_USE_ETCD"
TIMEOUT = "VLLM_NIXL_ETCD_TIMEOUT"
PREWARM = "VLLM_NIXL_ETCD_PREWARM"
PREWARM_ENGINES = "VLLM_NIXL_ETCD_PREWARM_ENGINES"
PREWARM_MAX = "VLLM_NIXL_ETCD_PREWARM_MAX"
ALLOW_UNSIGNED = "VLLM_NIXL_ETCD_ALLOW_UNSIGNED"
ALLOW_UNTESTED_VLLM = "VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM"

#: Every variable :func:`load` reads.
VARIABLES = (
    USE_ETCD,
    TIMEOUT,
    PREWARM,
    PREWARM_ENGINES,
    PREWARM_MAX,
    ALLOW_UNSIGNED,
    ALLOW_UNTESTED_VLLM,
)


#: The library's default and bound (``src/config.rs``: ``DEFAULT_TIMEOUT_S``,
#: ``MAX_TIMEOUT_S``).
DEFAULT_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 86400

# What accepting each boolean means, for its error message.
_BOOL_MEANING = {
    USE_ETCD: (
        "to enable etcd coordination",
        "for vLLM's stock handshake",
    ),
    PREWARM: (
        "to pre-warm the handshakes with remote engines as they appear in etcd",
        "to handshake on each engine's first request",
    ),
    ALLOW_UNSIGNED: (
        "to allow vLLM's unauthenticated direct handshake while records are signed",
        "to keep it off",
    ),
    ALLOW_UNTESTED_VLLM: (
        "to run a vLLM release the plugin was not tested with when its hook points match",
        "to refuse it",
    ),
}

# A decimal number as Rust's f64 parser takes it (no `_` separators, no hex),
# so that the plugin and the library accept the same timeouts.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_COUNT = re.compile(r"\+?[0-9]+")


class ConfigError(RuntimeError, ValueError):
    """A bad value of one of the plugin's variables (or several: one line each).

    A ``RuntimeError``, so that vLLM, which calls :func:`nixl_etcd.vllm.register`
    as it starts each process, refuses to start with this message; also a
    ``ValueError`` (what :meth:`PrewarmConfig.from_env` raised before).

    Attributes:
        problems: one message per bad variable, in :data:`VARIABLES` order.
    """

    def __init__(self, problems: Union[str, List[str]]) -> None:
        # A str too: what unpickling passes back (the message).
        self.problems = problems.split("\n") if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def parse_bool(environ: Mapping[str, str], name: str) -> bool:
    """A boolean variable: 1/true/yes/on (any case, surrounding blanks
    ignored) is True; 0/false/no/off, empty or unset is False; anything else
    raises :class:`ConfigError`."""
    value = flag(environ, name)
    if value is not None:
        return value
    on, off = _BOOL_MEANING.get(name, ("for true", "for false"))
    raise ConfigError(
        [
            f"{name}={environ.get(name)!r} is not a boolean; use {'/'.join(TRUE_VALUES)} {on} "
            f"or {'/'.join(FALSE_VALUES)} {off}"
        ]
    )


def parse_timeout(environ: Mapping[str, str], name: str = TIMEOUT) -> float:
    """Seconds above 0 and at most :data:`MAX_TIMEOUT_S`; empty or unset:
    :data:`DEFAULT_TIMEOUT_S`. The library's rule and message (``src/config.rs``,
    ``parse_timeout``), so both say the same of one value."""
    raw = _raw(environ, name)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    text = raw.strip()
    value = float(text) if _NUMBER.fullmatch(text) else None
    # Below half a nanosecond the library's Duration rounds to zero: every call
    # would time out at once, as with 0.
    if value is None or not (0 < value <= MAX_TIMEOUT_S) or value * 1e9 < 0.5:
        raise ConfigError(
            [
                f"{name}={raw} is not a timeout; give a number of seconds above 0 and at "
                f"most {MAX_TIMEOUT_S}"
            ]
        )
    return value


def _parse_patterns(environ: Mapping[str, str]) -> List[str]:
    raw = environ.get(PREWARM_ENGINES) or ""
    patterns = [p.strip() for p in raw.split(",") if p.strip()]
    for p in patterns:
        if "*" in p[:-1]:
            raise ConfigError(
                [
                    f"{PREWARM_ENGINES}={raw!r} has {p!r}, which is neither an engine id "
                    "nor a prefix ending in *; give engine ids or prefixes ending in *, "
                    "comma-separated"
                ]
            )
    return patterns


def _parse_cap(environ: Mapping[str, str]) -> int:
    raw = (environ.get(PREWARM_MAX) or "").strip()
    if not raw:
        return PrewarmConfig.DEFAULT_MAX
    cap = int(raw) if _COUNT.fullmatch(raw) else 0
    if cap < 1:
        # Worded as the pre-warm always has (python/tests/test_prewarm_config.py).
        raise ConfigError(
            [f"{PREWARM_MAX} must be a positive integer (engines), got {raw!r}"]
        )
    return cap


@dataclass(frozen=True)
class PrewarmConfig:
    """What a decode worker pre-warms: ``VLLM_NIXL_ETCD_PREWARM`` (on or off),
    ``VLLM_NIXL_ETCD_PREWARM_ENGINES`` (comma-separated engine ids, or
    prefixes ending in ``*``; empty: every engine but the worker's own),
    ``VLLM_NIXL_ETCD_PREWARM_MAX`` (engines pre-warmed at most, default 16)."""

    DEFAULT_MAX: ClassVar[int] = 16

    patterns: List[str] = field(hash=False)
    cap: int = 16

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["PrewarmConfig"]:
        """The pre-warm settings, or None when it is off. Raises
        :class:`ConfigError` for a bad value of any of the three variables."""
        return load_prewarm(os.environ if environ is None else environ)

    def wants(self, engine_id: str, own: str) -> bool:
        if engine_id == own:
            return False
        if not self.patterns:
            return True
        return any(
            engine_id.startswith(p[:-1]) if p.endswith("*") else engine_id == p
            for p in self.patterns
        )

    def exact(self) -> Optional[List[str]]:
        """The engine ids to subscribe to one by one, or None for all engines."""
        if not self.patterns or any(p.endswith("*") for p in self.patterns):
            return None
        return list(self.patterns)


@dataclass(frozen=True)
class PluginConfig:
    """The plugin's settings, checked.

    Attributes:
        use_etcd: ``VLLM_NIXL_USE_ETCD`` is true: the plugin hooks vLLM's
            NixlConnector.
        use_etcd_set: ``VLLM_NIXL_USE_ETCD`` has a (valid, non-blank) value,
            true or false; the explicit ``EtcdNixlConnector`` uses etcd unless
            it is set false (:attr:`etcd_for_explicit_connector`).
        timeout_s: ``VLLM_NIXL_ETCD_TIMEOUT`` in seconds (default 10).
        prewarm: the pre-warm settings, None when ``VLLM_NIXL_ETCD_PREWARM`` is
            off.
        allow_unsigned: ``VLLM_NIXL_ETCD_ALLOW_UNSIGNED`` is true (what
            :func:`nixl_etcd.unsigned.refusal` reads, checked here at start).
        allow_untested_vllm: ``VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM`` is true.
    """

    use_etcd: bool = False
    use_etcd_set: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    prewarm: Optional[PrewarmConfig] = None
    allow_unsigned: bool = False
    allow_untested_vllm: bool = False

    @property
    def etcd_for_explicit_connector(self) -> bool:
        """Whether ``EtcdNixlConnector`` uses etcd: unless ``VLLM_NIXL_USE_ETCD``
        is set to a false value."""
        return self.use_etcd or not self.use_etcd_set


def load_prewarm(environ: Mapping[str, str]) -> Optional[PrewarmConfig]:
    """The pre-warm settings (None when off). All three variables are checked,
    on or off; raises :class:`ConfigError` (every bad one, one line each)."""
    problems: List[str] = []
    results = []
    for parse in (lambda: parse_bool(environ, PREWARM), lambda: _parse_patterns(environ),
                  lambda: _parse_cap(environ)):
        try:
            results.append(parse())
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    on, patterns, cap = results
    return PrewarmConfig(patterns, cap) if on else None


def load(environ: Mapping[str, str] = os.environ) -> PluginConfig:
    """Every variable of :data:`VARIABLES`, parsed and checked.

    Raises:
        ConfigError: one line per bad variable, naming it, its value and what
            is accepted.
    """
    parsers = {
        "use_etcd": lambda: parse_bool(environ, USE_ETCD),
        "timeout_s": lambda: parse_timeout(environ),
        "prewarm": lambda: load_prewarm(environ),
        "allow_unsigned": lambda: parse_bool(environ, ALLOW_UNSIGNED),
        "allow_untested_vllm": lambda: parse_bool(environ, ALLOW_UNTESTED_VLLM),
    }
    problems: List[str] = []
    values: Dict[str, Any] = {}
    for name, parse in parsers.items():
        try:
            values[name] = parse()
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return PluginConfig(use_etcd_set=_raw(environ, USE_ETCD) is not None, **values)


# The settings of this process, parsed once per set of values (an engine's
# environment does not change; a test's may).
_cached: Tuple[Optional[Tuple[Optional[str], ...]], Optional[PluginConfig]] = (None, None)


def current() -> PluginConfig:
    """:func:`load` of ``os.environ``, parsed again only when one of
    :data:`VARIABLES` changed: the hooks ask on every request."""
    global _cached
    key = tuple(os.environ.get(name) for name in VARIABLES)
    seen, settings = _cached
    if seen != key or settings is None:
        settings = load()
        _cached = (key, settings)
    return settings
