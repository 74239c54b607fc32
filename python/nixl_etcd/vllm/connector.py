"""``EtcdNixlConnector``: the explicit form, for deployments that do not
auto-load vLLM plugins::

    LLM(model=..., kv_transfer_config={
        "kv_connector": "EtcdNixlConnector",
        "kv_connector_module_path": "nixl_etcd.vllm.connector",
        "engine_id": "prefill_engine",
        "kv_role": "kv_producer",
    })

It is vLLM's NixlConnector (pull mode) with the nixl-etcd hooks installed and
etcd coordination on for this connector, unless ``VLLM_NIXL_USE_ETCD`` is set to
a false value (0/false/no/off). A peer may use either form, or the stock
NixlConnector with ZMQ.
"""

from __future__ import annotations

from typing import Any

from . import install, state

install.install()

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlPullConnector  # noqa: E402


class EtcdNixlConnector(NixlPullConnector):
    """vLLM's NixlConnector, discovering its peers through etcd."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        for part in (self.connector_scheduler, self.connector_worker):
            if part is not None:
                setattr(part, state.FORCE_ATTR, True)


__all__ = ["EtcdNixlConnector"]
