"""Test, demo and benchmark helpers: a tiny Llama made locally, and vLLM engines
driven in subprocesses.

* :func:`make_tiny_llama` writes a random-weight Llama (2 layers, hidden 256,
  4 heads of size 64, 2 KV heads) and a BPE tokenizer trained on a few sentences
  to a directory: no download. Needs ``torch``, ``transformers`` and
  ``tokenizers`` (the vLLM venv has them).
* ``python -m nixl_etcd.vllm.testing serve --reply-fd N ...`` runs one vLLM
  ``LLM`` and answers JSON requests read from stdin, one per line, with JSON
  lines written to file descriptor N (the process's stdout/stderr stay free
  for vLLM's logs). :class:`Engine` starts and drives such a process from any
  Python (the system one included: it imports neither vLLM nor torch).

Requests: ``{"op": "generate", "prompt": str, "max_tokens": int,
"kv_transfer_params": dict|null, "logprobs": int}`` -> ``{"ok": true,
"text", "token_ids", "logprobs" (the sampled tokens' logprobs), "finish_reason",
"kv_transfer_params", "seconds"}`` or ``{"ok": false, "error"}``;
``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

SENTENCES = [
    "The future of AI is bright because machines learn from data.",
    "Prefill and decode engines share the key value cache over NIXL.",
    "etcd stores the metadata of every agent under a lease.",
    "A tiny model with random weights still produces tokens and logprobs.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Distributed inference splits prompt processing from token generation.",
]


def make_tiny_llama(path: str, seed: int = 0) -> str:
    """Writes the tiny Llama and its tokenizer to ``path`` (idempotent)."""
    out = Path(path)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(out))
    vocab = fast.vocab_size if fast.vocab_size else len(fast)
    config = LlamaConfig(
        vocab_size=max(vocab, len(fast)),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Random weights of a larger scale than the default init: varied tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)
    return str(out)


# ---------------------------------------------------------------------------
# The engine server (runs inside the vLLM venv).


def _serve(args: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="nixl_etcd.vllm.testing serve")
    p.add_argument("--reply-fd", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--engine-id")
    p.add_argument(
        "--role", choices=["kv_producer", "kv_consumer", "kv_both", "none"], default="none"
    )
    p.add_argument("--connector", default="NixlConnector")
    p.add_argument("--connector-module-path")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=512)
    # The KV cache, explicitly: vLLM's CPU build otherwise takes a share of the
    # NUMA node's memory minus the process's own size, negative on small nodes.
    p.add_argument("--kv-cache-mib", type=int, default=128)
    a = p.parse_args(args)

    reply = os.fdopen(a.reply_fd, "w", buffering=1)

    def send(obj: Dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    # Eager everywhere: vLLM's sampler torch.compiles its logprob ops even with
    # enforce_eager, which costs a minute of C++ compilation per process on a
    # small CPU machine. Inherited by the engine's own processes.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from vllm import LLM, SamplingParams

    kwargs: Dict[str, Any] = dict(
        model=a.model,
        tokenizer=a.model,
        dtype="bfloat16",
        max_model_len=a.max_model_len,
        block_size=32,
        kv_cache_memory_bytes=a.kv_cache_mib * 1024 * 1024,
        enforce_eager=True,
        tensor_parallel_size=a.tp,
        seed=0,
        enable_prefix_caching=False,
    )
    if a.role != "none":
        ktc: Dict[str, Any] = {
            "kv_connector": a.connector,
            "engine_id": a.engine_id,
            "kv_role": a.role,
            "kv_buffer_device": "cpu",
        }
        if a.connector_module_path:
            ktc["kv_connector_module_path"] = a.connector_module_path
        kwargs["kv_transfer_config"] = ktc
    started = time.monotonic()
    try:
        llm = LLM(**kwargs)
    except BaseException as e:
        send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        raise
    send({"ready": True, "pid": os.getpid(), "startup_s": time.monotonic() - started})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        if op != "generate":
            send({"ok": False, "error": f"unknown op {op!r}"})
            continue
        extra = {}
        if req.get("kv_transfer_params") is not None:
            extra["kv_transfer_params"] = req["kv_transfer_params"]
        sp = SamplingParams(
            max_tokens=int(req.get("max_tokens", 8)),
            temperature=0.0,
            logprobs=int(req.get("logprobs", 1)),
            ignore_eos=True,
            extra_args=extra or None,
        )
        t0 = time.perf_counter()
        try:
            outs = llm.generate([req["prompt"]], sp, use_tqdm=False)
        except BaseException as e:  # report, keep serving
            send({"ok": False, "error": f"{type(e).__name__}: {e}"})
            continue
        seconds = time.perf_counter() - t0
        o = outs[0].outputs[0]
        lps: List[Optional[float]] = []
        for tid, d in zip(o.token_ids, o.logprobs or []):
            lp = d.get(tid) if d else None
            lps.append(None if lp is None else float(lp.logprob))
        send(
            {
                "ok": True,
                "text": o.text,
                "token_ids": list(o.token_ids),
                "logprobs": lps,
                "finish_reason": o.finish_reason,
                "kv_transfer_params": outs[0].kv_transfer_params,
                "seconds": seconds,
            }
        )
    send({"bye": True})
    reply.close()
    del llm
    return 0


# ---------------------------------------------------------------------------
# The driver (any Python).


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.SystemRandom()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port that
    bind(0) hands out may be taken again, before its user binds it, by any
    of the sockets a vLLM engine's UCX opens (seen: a decode's side channel
    "Address already in use", the engine then stuck at start)."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = _PORTS.randint(min(10000, high - 1000), high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port found below {high + 1}")


class EngineError(RuntimeError):
    pass


class Engine:
    """A vLLM engine in a subprocess of ``python`` (the vLLM venv's)."""

    def __init__(
        self,
        python: str,
        model: str,
        log_path: str,
        *,
        engine_id: Optional[str] = None,
        role: str = "none",
        env: Optional[Dict[str, str]] = None,
        tp: int = 1,
        connector: str = "NixlConnector",
        connector_module_path: Optional[str] = None,
        startup_timeout: float = 600.0,
        nice: int = 0,
    ) -> None:
        self.engine_id = engine_id
        self.log_path = log_path
        rfd, wfd = os.pipe()
        # vLLM's CPU engines keep threads busy while idle (the worker's queue
        # poll, NIXL's progress thread): ``nice`` leaves etcd and the driver
        # their share of a small machine.
        cmd = (["nice", "-n", str(nice)] if nice else []) + [
            python,
            "-m",
            "nixl_etcd.vllm.testing",
            "serve",
            "--reply-fd",
            str(wfd),
            "--model",
            model,
            "--role",
            role,
            "--tp",
            str(tp),
            "--connector",
            connector,
        ]
        if engine_id:
            cmd += ["--engine-id", engine_id]
        if connector_module_path:
            cmd += ["--connector-module-path", connector_module_path]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(wfd,),
            env=env,
            start_new_session=True,
        )
        os.close(wfd)
        self._reply = os.fdopen(rfd, "r")
        msg = self._read(startup_timeout)
        if not msg.get("ready"):
            self.kill()
            raise EngineError(f"engine {engine_id} did not start: {msg.get('error')}; see {log_path}")
        self.pid = int(msg["pid"])
        self.startup_s = float(msg["startup_s"])

    def _read(self, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"engine {self.engine_id}: no answer within {timeout} s; see {self.log_path}")
            r, _, _ = select.select([self._reply], [], [], min(left, 1.0))
            if r:
                line = self._reply.readline()
                if not line:
                    rc = self.proc.wait()
                    raise EngineError(
                        f"engine {self.engine_id} exited (status {rc}); see {self.log_path}:\n"
                        + self.log_tail()
                    )
                return json.loads(line)
            if self.proc.poll() is not None:
                continue  # read what is left, then EOF

    def generate(
        self,
        prompt: str,
        max_tokens: int = 8,
        kv_transfer_params: Optional[Dict[str, Any]] = None,
        # Minutes, not seconds: this 2-core machine stalls as a whole for up
        # to half a minute at times, several times while engines run.
        timeout: float = 600.0,
    ) -> Dict[str, Any]:
        req = {"op": "generate", "prompt": prompt, "max_tokens": max_tokens, "logprobs": 1}
        if kv_transfer_params is not None:
            req["kv_transfer_params"] = kv_transfer_params
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 120.0) -> int:
        """Asks the engine to quit; kills it if it does not within ``timeout``."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._cleanup()
        return self.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signals the engine's whole process group (its engine-core and workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        # Leftover children (engine core, workers) of the session.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (self._reply, self._log):
            try:
                f.close()
            except Exception:
                pass


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    if argv and argv[0] == "make-model":
        print(make_tiny_llama(argv[1]))
        return 0
    print("usage: python -m nixl_etcd.vllm.testing serve ... | make-model DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
