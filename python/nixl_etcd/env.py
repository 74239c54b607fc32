"""How the package reads its boolean environment variables, in one place:
the vLLM plugin's settings (:mod:`nixl_etcd.vllm.config`) and the unsigned
fallback's switch (:mod:`nixl_etcd.unsigned`) accept the same words."""

from __future__ import annotations

from typing import Mapping, Optional

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off")


def raw(environ: Mapping[str, str], name: str) -> Optional[str]:
    """The variable's value, or None when unset or blank."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value


def flag(environ: Mapping[str, str], name: str) -> Optional[bool]:
    """True for 1/true/yes/on, False for 0/false/no/off (any case, blanks
    around ignored), empty or unset; None for anything else (the caller says
    what that means)."""
    value = raw(environ, name)
    if value is None:
        return False
    word = value.strip().lower()
    if word in TRUE_VALUES:
        return True
    if word in FALSE_VALUES:
        return False
    return None
