"""Whether a handshake outside etcd may be used: the engine's direct (ZMQ)
handshake carries no signature, so where records are signed
(``VLLM_NIXL_ETCD_HMAC_KEY_FILE`` or the option ``hmac_key_file``) it would let
anyone on the network hand a decode forged NIXL metadata. It is then off,
unless ``VLLM_NIXL_ETCD_ALLOW_UNSIGNED=1`` allows it on purpose."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from .env import FALSE_VALUES, TRUE_VALUES, flag

#: Allows the unauthenticated direct handshake although records are signed.
ENV_ALLOW = "VLLM_NIXL_ETCD_ALLOW_UNSIGNED"
ENV_KEY = "VLLM_NIXL_ETCD_HMAC_KEY_FILE"


def refusal(
    options: Optional[Mapping[str, Any]] = None, environ: Mapping[str, str] = os.environ
) -> Optional[str]:
    """None when the direct handshake may be used; else why not, in words
    that fit after "ETCD coordination failed (...) and"."""
    signed = bool(str((options or {}).get("hmac_key_file") or "").strip()) or bool(
        environ.get(ENV_KEY, "").strip()
    )
    if not signed:
        return None
    allowed = flag(environ, ENV_ALLOW)
    if allowed:
        return None
    if allowed is None:
        return (
            f"{ENV_ALLOW}={environ.get(ENV_ALLOW)!r} is not a boolean ({'/'.join(TRUE_VALUES)} "
            f"or {'/'.join(FALSE_VALUES)}), so the unauthenticated direct handshake stays off"
        )
    return (
        f"records are signed here ({ENV_KEY}) while vLLM's direct ZMQ handshake is not "
        f"authenticated, so it is not used; set {ENV_ALLOW}=1 to allow it anyway"
    )
