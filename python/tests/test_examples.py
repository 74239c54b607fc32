"""The guide's two terminals as two processes: python/examples/prefill.py and
decode.py with real NIXL agents (UCX, DRAM), finding each other through etcd."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nixl_etcd
from conftest import EXAMPLES, engine

pytest.importorskip("numpy")
pytest.importorskip("nixl._api", reason="NIXL's Python package (pip install nixl nixl-cu12)")


@pytest.fixture
def example_env(etcd, ns):
    env = dict(os.environ)
    env.update(
        VLLM_NIXL_USE_ETCD="1",
        VLLM_NIXL_ETCD_ENDPOINTS=etcd.endpoint,
        VLLM_NIXL_ETCD_NAMESPACE=ns,
        VLLM_NIXL_ETCD_TIMEOUT="10",
        # the package and library under test, installed or not
        NIXL_ETCD_LIBRARY=nixl_etcd.library_path(),
        PYTHONPATH=os.pathsep.join(
            [str(Path(nixl_etcd.__file__).resolve().parent.parent)]
            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
    )
    return env


def start(script: str, *args: str, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} did not finish:\n{out}")
    return out


def test_two_terminals(example_env, etcd, ns):
    e = engine("prefill_engine")
    prefill = start("prefill.py", e, "--size-mib", "32", "--timeout", "60", env=example_env)
    decode = start("decode.py", e, "--timeout", "30", env=example_env)
    dout = finish(decode)
    pout = finish(prefill)
    print("--- prefill ---\n" + pout + "--- decode ---\n" + dout)
    assert decode.returncode == 0, dout
    assert prefill.returncode == 0, pout
    # Terminal 1: registered through etcd, then notified by the decode
    assert "INFO: Registered NIXL agent with ETCD" in pout
    assert re.search(rf"engine {e} rank 0: agent \S+ registered through etcd", pout)
    assert re.search(r"finished its READ \(32 blocks, 33554432 bytes\)", pout)
    assert "checked every byte: ok" in pout
    # Terminal 2: handshake time, bytes, rate, every byte checked
    assert re.search(rf"handshake with {e} rank 0 in \d+\.\d+ s", dout), dout
    assert re.search(r"READ 33554432 bytes \(32 KV blocks of 1048576 bytes, 32\.0 MiB\) in "
                     r"\d+\.\d+ s: \d+\.\d+ GB/s", dout), dout
    assert "checked every byte: 33554432 of 33554432 match" in dout
    # NIXL's own INFO lines stay out of the output
    assert "NIXL INFO" not in pout + dout
    # the prefill closed its client: its record is gone from etcd
    assert etcd.ctl("get", "--prefix", f"{ns}/{e}/", "--keys-only").strip() == b""


def test_tensor_parallel_decode_reads_two_prefill_ranks(example_env):
    """Decode TP1 reads prefill TP2: both ranks, as nixl_etcd_target_ranks says."""
    e = engine("prefill_tp2")
    ranks = [start("prefill.py", e, "--tp", "2", "--rank", str(r), "--size-mib", "8",
                   "--timeout", "60", env=example_env) for r in range(2)]
    decode = start("decode.py", e, "--tp", "1", "--rank", "0", "--timeout", "30", env=example_env)
    dout = finish(decode)
    outs = [finish(p) for p in ranks]
    assert decode.returncode == 0, dout
    assert [p.returncode for p in ranks] == [0, 0], outs
    for r in range(2):
        assert f"handshake with {e} rank {r} in" in dout
    assert dout.count("checked every byte: 8388608 of 8388608 match") == 2
    assert all("checked every byte: ok" in o for o in outs)


def test_decode_without_prefill_times_out_with_the_guides_message(example_env):
    decode = start("decode.py", engine("prefill_engine"), "--remote-tp", "1", "--timeout", "0.5",
                   env=example_env)
    out = finish(decode)
    assert decode.returncode == 1
    assert "Timeout: Timeout waiting for engine prefill_engine" in out
