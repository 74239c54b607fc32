"""What the tests of `nixl-etcd serve` share (test_nixl_store.py,
test_nixl_store_deploy.py): the `nixl-etcd` binary, a stock NIXL agent in its
own process (stock_nixl_agent.py), a store process, and etcd key listings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from conftest import REPO, Etcd

try:
    import nixl._api  # noqa: F401

    HAVE_NIXL = True
except Exception:  # pragma: no cover - the wheel is installed by .ci/install
    HAVE_NIXL = False

AGENT = Path(__file__).resolve().parent / "stock_nixl_agent.py"
SIZE = 1 << 20


def cli() -> str:
    env = os.environ.get("NIXL_ETCD_CLI")
    if env:
        return env
    path = REPO / "target" / "release" / "nixl-etcd"
    if not path.exists():
        pytest.fail(f"{path} is missing: cargo build --release --all-features")
    return str(path)


class Agent:
    """A stock NIXL agent in its own process.

    ``prefix``: a command line the agent runs under (`ip netns exec NS`).
    """

    def __init__(self, name: str, env: Dict[str, str], seed: int = 1,
                 prefix: Sequence[str] = ()) -> None:
        self.name = name
        self.seed = seed
        full = dict(os.environ)
        for k in ("NIXL_TCPSTORE_ENDPOINT", "NIXL_ETCD_ENDPOINTS", "NIXL_ETCD_NAMESPACE"):
            full.pop(k, None)
        full.update(env)
        full.setdefault("NIXL_LOG_LEVEL", "WARN")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, str(AGENT), name, str(SIZE), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=full,
            text=True,
        )
        hello = self._line()
        self.pid, self.addr = hello["pid"], hello["addr"]

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"agent {self.name} exited ({self.proc.poll()})")
        return json.loads(line)

    def do(self, *words) -> dict:
        self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
        self.proc.stdin.flush()
        r = self._line()
        assert "error" not in r, f"{self.name} {words[0]}: {r['error']}"
        return r

    def sees(self, other: "Agent | str", label: Optional[str] = None, timeout: float = 20) -> bool:
        name = other if isinstance(other, str) else other.name
        self.do("fetch", name, *([label] if label else []))
        return self.do("check", name, timeout)["ok"]

    def reads(self, other: "Agent") -> dict:
        return self.do("read", other.name, other.addr, SIZE, other.seed)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


class Serve:
    """`nixl-etcd serve` on a free port.

    ``listen``: the address to listen on (port 0: a free one); ``prefix``: a
    command line the store runs under (`unshare ...`); ``log``: keep its
    stderr (read through a pipe by a thread, so that it never fills up) in
    ``lines``, else it goes nowhere.
    """

    def __init__(self, etcd: Etcd, nixl_ns: str, *extra: str, listen: str = "127.0.0.1:0",
                 prefix: Sequence[str] = (), log: bool = False) -> None:
        self.lines: List[str] = []
        self._lock = threading.Lock()
        self._reader: Optional[threading.Thread] = None
        self.proc = subprocess.Popen(
            [*prefix, cli(), "serve", "--listen", listen, "--endpoints", etcd.endpoint,
             "--nixl-namespace", nixl_ns, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        if log:
            self._reader = threading.Thread(target=self._drain, daemon=True)
            self._reader.start()
        line = self.proc.stdout.readline()
        if not line.startswith("nixl-etcd serve: ready, NIXL_TCPSTORE_ENDPOINT="):
            if self._reader is not None:  # what it said before it exited
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                self._reader.join(timeout=5)
            raise AssertionError(f"no ready line from nixl-etcd serve: {line!r}\n{self.log()}")
        self.endpoint = line.split("NIXL_TCPSTORE_ENDPOINT=")[1].split()[0]
        #: ``--metrics``: the base URL of its HTTP endpoints, from the ready line.
        self.metrics_url = (
            line.split(", metrics ")[1].strip().removesuffix("/metrics")
            if ", metrics " in line
            else None
        )

    def _drain(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        """What the store wrote on stderr so far (with ``log=True``)."""
        with self._lock:
            return "\n".join(self.lines)

    def log_lines(self, containing: str) -> List[str]:
        with self._lock:
            return [x for x in self.lines if containing in x]

    @property
    def env(self) -> Dict[str, str]:
        return {"NIXL_TCPSTORE_ENDPOINT": self.endpoint}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)

    def terminate(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        if self._reader is None:
            rest, _ = self.proc.communicate(timeout=30)
            return rest
        rest = self.proc.stdout.read()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return rest


@pytest.fixture
def nixl_ns() -> str:
    """A NIXL namespace no other test uses."""
    return f"/pytest-nixl/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def fleet():
    """Agents and stores started by a test; killed after it, last first."""
    started: List = []
    yield started
    for x in reversed(started):
        x.kill()


def names() -> str:
    return uuid.uuid4().hex[:6]


def keys(etcd: Etcd, prefix: str) -> List[str]:
    out = etcd.ctl("get", "--prefix", prefix, "--keys-only").decode()
    return [k for k in out.splitlines() if k.strip()]


def key_lease(etcd: Etcd, key: str) -> int:
    doc = json.loads(etcd.ctl("get", key, "-w", "json"))
    kvs = doc.get("kvs") or []
    return int(kvs[0].get("lease", 0)) if kvs else -1


def holds(pred, duration: float, step: float = 0.05) -> Optional[float]:
    """Checks ``pred`` continuously for ``duration`` seconds. None: it held
    throughout; else the seconds after which it first failed."""
    t0 = time.monotonic()
    while True:
        if not pred():
            return time.monotonic() - t0
        if time.monotonic() - t0 >= duration:
            return None
        time.sleep(step)
