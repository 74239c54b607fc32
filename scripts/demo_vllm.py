"""The guide's two terminals, for real (run by scripts/demo.sh with the vLLM venv's
python): a prefill vLLM engine and a decode vLLM engine, both with the stock
NixlConnector and VLLM_NIXL_USE_ETCD=1, find each other through etcd.

Usage: python scripts/demo_vllm.py WORKDIR ETCD_ENDPOINT ETCDCTL
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nixl_etcd.vllm.testing import Engine, free_port, make_tiny_llama

NAMESPACE = "/vllm/nixl/agents"
PROMPT = "The future of AI is"


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main() -> int:
    work, endpoint, etcdctl = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def ctl(*args: str) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            [etcdctl, "--endpoints", endpoint, *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout

    section("Making the tiny Llama (random weights, 2 layers, head size 64; no download)")
    model = make_tiny_llama(str(work / "tiny-llama"))
    print(model)

    base = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_NIXL")}
    common = dict(
        base,
        VLLM_TARGET_DEVICE="cpu",
        VLLM_NIXL_USE_ETCD="1",
        VLLM_NIXL_ETCD_ENDPOINTS=endpoint,
        VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        PYTHONUNBUFFERED="1",
    )
    env_p = dict(common, VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()))
    env_d = dict(common, VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()), VLLM_LOGGING_LEVEL="DEBUG")

    section("Terminal 1 - Prefill (kv_producer) and Terminal 2 - Decode (kv_consumer), starting")
    for name, env in (("prefill", env_p), ("decode", env_d)):
        print(
            f"[{name}] export VLLM_NIXL_USE_ETCD=1 VLLM_NIXL_ETCD_ENDPOINTS={endpoint}; "
            f"LLM(model=tiny-llama, kv_transfer_config={{'kv_connector': 'NixlConnector', "
            f"'engine_id': '{name}_engine', 'kv_role': "
            f"'{'kv_producer' if name == 'prefill' else 'kv_consumer'}'}})"
        )
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        fp = pool.submit(
            Engine, sys.executable, model, str(work / "prefill.log"),
            engine_id="prefill_engine", role="kv_producer", env=env_p,
        )
        fd = pool.submit(
            Engine, sys.executable, model, str(work / "decode.log"),
            engine_id="decode_engine", role="kv_consumer", env=env_d,
        )
        prefill, decode = fp.result(), fd.result()
    print(f"both engines up in {time.monotonic() - t0:.0f} s")
    plog = prefill.log_text()
    for line in plog.splitlines():
        if "NIXL ETCD coordinator" in line or "Registered NIXL agent with ETCD" in line:
            print(f"[prefill log] {line.strip()}")

    def keys(prefix: str) -> str:
        out = ctl("get", "--prefix", prefix, "--keys-only")
        return "\n".join(k for k in out.splitlines() if k.strip())

    section(f"etcdctl get --prefix {NAMESPACE}/ --keys-only  (every engine publishes its ranks)")
    print(keys(f"{NAMESPACE}/"))
    kv = json.loads(ctl("get", "-w", "json", f"{NAMESPACE}/prefill_engine/rank_0"))["kvs"][0]
    lease = format(int(kv["lease"]), "x")
    print(f"value: {len(kv['value'])} base64 chars; lease {lease}:")
    print(ctl("lease", "timetolive", lease).strip())

    section("Prefill: the prompt (max_tokens=1, do_remote_decode)")
    r = prefill.generate(PROMPT, 1, kv_transfer_params={"do_remote_decode": True})
    params = dict(r["kv_transfer_params"])
    print(f"kv_transfer_params: {json.dumps(params)}")

    section("Decode: remote_host/remote_port removed; only remote_engine_id and tp_size are used")
    params.update(do_remote_prefill=True, do_remote_decode=False)
    params.pop("remote_host", None)
    params.pop("remote_port", None)
    r = decode.generate(PROMPT, 16, kv_transfer_params=params)
    if not r.get("ok"):
        print(f"decode failed: {r}")
        return 1
    print(f"Prompt: {PROMPT!r}")
    print(f"Generated: {r['text']!r}")
    print(f"token ids: {r['token_ids']}")
    print(f"decode request: {r['seconds']:.3f} s")
    dlog = decode.log_text()
    for line in dlog.splitlines():
        if re.search(r"Discovering engine prefill_engine through ETCD|ETCD handshake completed in|"
                     r"handshake with engine prefill_engine|NIXL compatibility check passed", line):
            print(f"[decode log] {line.strip()[:220]}")

    section("Reference: the decode engine alone computes the same prompt")
    ref = decode.generate(PROMPT, 16)
    print(f"Generated: {ref['text']!r}")
    same = ref["token_ids"] == r["token_ids"]
    print(f"same tokens as P/D: {same}")

    section("Prefill exits: its lease is revoked, its keys are gone")
    rc = prefill.close()
    print(f"prefill exited with status {rc}")
    left = keys(f"{NAMESPACE}/prefill_engine/")
    print(f"etcdctl get --prefix {NAMESPACE}/prefill_engine/ --keys-only -> {left or '(no keys)'}")
    print(f"etcdctl get --prefix {NAMESPACE}/ --keys-only ->\n{keys(f'{NAMESPACE}/')}")
    decode.close()
    print(f"decode exited; etcdctl get --prefix {NAMESPACE}/ --keys-only -> "
          f"{keys(f'{NAMESPACE}/') or '(no keys)'}")
    return 0 if same and not left else 1


if __name__ == "__main__":
    sys.exit(main())
