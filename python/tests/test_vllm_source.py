"""The version gate against a vLLM release's source, read without importing
it: vLLM 0.33.0 (its CUDA wheel cannot run a model on this CPU machine) has
every hook point of the plugin's table with the signature the wrappers are
written for, so it is supported; the static reading agrees with the runtime
check on the installed 0.32; and a changed hook point is reported, naming
what differs. ``.ci/install-vllm`` extracts 0.33.0's sources into the venv."""

from __future__ import annotations

import ast
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO
from nixl_etcd.vllm import SUPPORTED_VLLM, install

VENV = Path(os.environ.get("NIXL_ETCD_VLLM_VENV") or REPO / ".venv-vllm")
SOURCES_033 = VENV / "sources" / "vllm-0.33.0"
NIXL = Path("vllm/distributed/kv_transfer/kv_connector/v1/nixl")

if not (SOURCES_033 / NIXL / "base_worker.py").is_file():
    msg = (
        f"vLLM TESTS SKIPPED: no vLLM 0.33.0 sources at {SOURCES_033} (run `bash "
        ".ci/install-vllm`; CI does)"
    )
    print("\n" + "!" * 78 + "\n" + msg + "\n" + "!" * 78, file=sys.stderr)
    pytest.skip(msg, allow_module_level=True)


def test_vllm_033_has_every_hook_point_with_its_signature() -> None:
    assert install.source_mismatches(str(SOURCES_033)) == ([], [])
    assert "0.33" in SUPPORTED_VLLM


def test_the_shape_rides_in_a_dataclass_payload_in_033() -> None:
    """The shape is one more key of the payload's msgpack map: msgspec encodes
    a dataclass as a map and ignores unknown keys when decoding one."""
    tree = ast.parse((SOURCES_033 / NIXL / "metadata.py").read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "NixlHandshakePayload"]
    assert [ast.unparse(d) for d in cls.decorator_list] == ["dataclass"]


def test_the_static_reading_agrees_with_the_running_vllm() -> None:
    site = next((VENV / "lib").glob("python3*/site-packages"))
    assert (site / NIXL / "base_worker.py").is_file()
    assert install.source_mismatches(str(site)) == ([], [])


def test_a_changed_hook_point_is_named_with_what_differs(tmp_path: Path) -> None:
    root = tmp_path / "vllm-changed"
    shutil.copytree(SOURCES_033, root)
    worker = root / NIXL / "base_worker.py"
    text = worker.read_text()
    old = "        remote_pp_size: int = 1,\n        notif_agents_only: bool = False,\n"
    assert text.count(old) == 1
    worker.write_text(text.replace(old, "        notif_agents_only: bool = False,\n"))
    scheduler = root / NIXL / "base_scheduler.py"
    text = scheduler.read_text()
    assert text.count("def on_new_request(") == 1
    scheduler.write_text(text.replace("def on_new_request(", "def on_new_request_renamed("))
    required, prewarm = install.source_mismatches(str(root))
    assert required == [
        "NixlBaseConnectorScheduler.on_new_request",
        "NixlBaseConnectorWorker._nixl_handshake(self, host, port, remote_tp_size, "
        "expected_engine_id, remote_dcp_size=, notif_agents_only=) where (self, host, port, "
        "remote_tp_size, expected_engine_id, remote_dcp_size=, remote_pp_size=, "
        "notif_agents_only=) is needed",
    ]
    assert prewarm == []
