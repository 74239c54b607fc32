"""nixl-etcd for vLLM: the NixlConnector's handshake through etcd.

Two ways in, both with no change to vLLM's code:

* **The plugin** (automatic). ``pip install nixl-etcd`` registers
  :func:`register` under vLLM's ``vllm.general_plugins`` entry point group, which
  vLLM calls in every process it starts. It first checks every variable the
  plugin reads (:mod:`.config`): a bad value (``VLLM_NIXL_USE_ETCD=ture``,
  ``VLLM_NIXL_ETCD_TIMEOUT=ten``, ...) raises :class:`~.config.ConfigError`
  naming the variable, the value and what is accepted, and vLLM does not
  start. With ``VLLM_NIXL_USE_ETCD`` true (1/true/yes/on) it then hooks vLLM's
  stock ``NixlConnector``; with it false (0/false/no/off) or unset it does
  nothing more (vLLM behaves as stock, nothing is written to etcd).
* **The explicit connector**, for deployments that do not auto-load plugins
  (``VLLM_PLUGINS`` set without ``nixl_etcd``)::

      kv_transfer_config={
          "kv_connector": "EtcdNixlConnector",
          "kv_connector_module_path": "nixl_etcd.vllm.connector",
          ...}

  It uses etcd unless ``VLLM_NIXL_USE_ETCD`` is set to a false value.

What the hooks do (vLLM 0.32; see ``hooks.py`` and docs/vllm.md):

* Prefill (the scheduler side, where vLLM gathers every worker's handshake
  payload and starts its ZMQ side-channel listener): one nixl-etcd client per
  engine registers each rank's payload, the very bytes vLLM serves over ZMQ, at
  ``{VLLM_NIXL_ETCD_NAMESPACE}/{engine_id}/rank_{rank}`` under its lease. The
  ZMQ listener keeps running for peers without etcd.
* Decode (the worker's handshake with a remote engine): the payloads of exactly
  the remote ranks vLLM's TP mapping selects come from etcd; vLLM's own code then
  checks them (compatibility hash, engine id, parallel config) and adds the
  remote agents. ``remote_host``/``remote_port`` of the request do not matter.
* etcd unreachable: vLLM's direct ZMQ handshake, with one WARNING.
* A remote engine restarted under the same engine_id (new incarnation) or gone
  (lease expired): its NIXL agents are dropped, the next request handshakes
  again; requests for an engine that left fail at once ("Engine ... not found
  in ETCD").
"""

from __future__ import annotations

import os

from . import config
from .config import ConfigError

__all__ = ["register", "SUPPORTED_VLLM", "use_etcd_from_env", "ConfigError", "ENV_VARS"]

#: vLLM releases whose NixlConnector the hooks are written for: 0.32 runs in
#: the tests (the CPU build); 0.33's hook points are checked against its
#: wheel's source (python/tests/test_vllm_source.py), its CUDA build cannot
#: run a model on the CPU machine the tests run on.
SUPPORTED_VLLM = ("0.32", "0.33")


def use_etcd_from_env() -> bool:
    """``VLLM_NIXL_USE_ETCD``: True for 1/true/yes/on (any case), False for
    0/false/no/off, empty or unset, without loading the library.

    Raises:
        ConfigError: any other value (a typo must not silently mean stock vLLM).
    """
    return config.parse_bool(os.environ, config.USE_ETCD)


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: checks the plugin's
    variables, then installs the hooks into NixlConnector when
    ``VLLM_NIXL_USE_ETCD`` is true; else nothing more.

    Every variable of :data:`config.VARIABLES` is checked whether etcd is on or
    off (an unset or empty one is its default, always valid).

    Raises:
        ConfigError: a bad value of one of the plugin's variables (a
            ``RuntimeError``; one line per bad variable, naming it, its value
            and what is accepted); vLLM then refuses to start.
        RuntimeError: the installed vLLM lacks what the hooks need (the message
            names the vLLM version); vLLM then refuses to start, rather than
            running silently without etcd.
    """
    settings = config.load()
    _declare_env_vars()
    if not settings.use_etcd:
        return
    from . import install

    install.install()


#: Every variable the plugin or the library reads whose name vLLM would take for
#: its own (``VLLM_``), declared to vLLM so that the processes it starts after
#: loading plugins do not warn "Unknown vLLM environment variable detected" for
#: them. ``python/tests/test_vllm_config.py`` checks it against the plugin's
#: sources and the library's (``src/config.rs``, docs/configuration.md).
ENV_VARS = (
    # The plugin's own (config.VARIABLES); the library reads the first two too.
    "VLLM_NIXL_USE_ETCD",
    "VLLM_NIXL_ETCD_TIMEOUT",
    "VLLM_NIXL_ETCD_PREWARM",
    "VLLM_NIXL_ETCD_PREWARM_ENGINES",
    "VLLM_NIXL_ETCD_PREWARM_MAX",
    "VLLM_NIXL_ETCD_ALLOW_UNSIGNED",  # nixl_etcd.unsigned's
    "VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM",
    # The library's (docs/configuration.md).
    "VLLM_NIXL_ETCD_ENDPOINTS",
    "VLLM_NIXL_ETCD_NAMESPACE",
    "VLLM_NIXL_ETCD_LEASE_TTL",
    "VLLM_NIXL_ETCD_CA_CERT",
    "VLLM_NIXL_ETCD_CERT",
    "VLLM_NIXL_ETCD_KEY",
    "VLLM_NIXL_ETCD_USERNAME",
    "VLLM_NIXL_ETCD_PASSWORD",
    "VLLM_NIXL_ETCD_PASSWORD_FILE",
    "VLLM_NIXL_ETCD_HMAC_KEY_FILE",
    "VLLM_NIXL_ETCD_HMAC_PREVIOUS_KEY_FILE",
    # vLLM's own (declared by vLLM already: setdefault leaves its entry).
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
)


def _declare_env_vars() -> None:
    try:
        from vllm import envs
    except Exception:
        return
    table = getattr(envs, "environment_variables", None)
    if isinstance(table, dict):
        for name in ENV_VARS:
            table.setdefault(name, lambda name=name: os.environ.get(name))

