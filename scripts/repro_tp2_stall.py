"""Stock vLLM 0.32 (CPU) + NIXL 1.5.1: a TP1 decode's first read of a TP2
prefill's KV stalls for minutes on a 2-core machine. No nixl-etcd involved:
the plugin is not even loaded (``VLLM_PLUGINS=""``, ``VLLM_NIXL_USE_ETCD=0``),
the handshake is vLLM's own over ZMQ. See docs/vllm.md, "TP2 -> TP1".

    .venv-vllm/bin/python scripts/repro_tp2_stall.py [--runs 4] [--bound-s 300]

Each run starts a fresh decode and a fresh prefill, sends one P/D request, and
prints how long the decode took, or that it had not answered within the
bound (then the engines' logs are kept and named).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from nixl_etcd.vllm.testing import Engine, EngineError, free_port, make_tiny_llama  # noqa: E402

PROMPT = "The future of AI is bright because prefill and decode engines share"


def stock_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        VLLM_PLUGINS="",
        VLLM_NIXL_USE_ETCD="0",
        VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        VLLM_NIXL_SIDE_CHANNEL_PORT=str(free_port()),
        **extra,
    )
    return env


def one_run(work: Path, model: str, bound_s: float) -> str:
    py = sys.executable
    decode = Engine(py, model, str(work / "decode.log"), engine_id="decode", role="kv_consumer",
                    env=stock_env())
    prefill = Engine(py, model, str(work / "prefill_tp2.log"), engine_id="prefill_tp2",
                     role="kv_producer", tp=2,
                     env=stock_env(VLLM_ENABLE_V1_MULTIPROCESSING="0",
                                   VLLM_CPU_OMP_THREADS_BIND="0|1"))
    try:
        p = prefill.generate(PROMPT, 1, kv_transfer_params={"do_remote_decode": True})
        params = dict(p["kv_transfer_params"], do_remote_prefill=True, do_remote_decode=False)
        started = time.monotonic()
        try:
            r = decode.generate(PROMPT, 8, params, timeout=bound_s)
        except EngineError:
            return f"STALLED: no answer within {bound_s:.0f} s (logs: {work})"
        return f"decode answered in {time.monotonic() - started:.1f} s: {r.get('finish_reason')}"
    finally:
        for e in (decode, prefill):
            e.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--bound-s", type=float, default=300.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tp2-stall-"))
    model = make_tiny_llama(str(root / "tiny-llama"))
    for i in range(args.runs):
        work = root / f"run{i}"
        work.mkdir()
        print(f"run {i}: {one_run(work, model, args.bound_s)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
