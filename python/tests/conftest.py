"""Fixtures: a private etcd on free loopback ports with a temporary data dir,
unique namespaces, and the package under test.

Which `nixl_etcd` is tested: the installed one when importable (what
`pip install ./python` put in site-packages), else this checkout's
`python/nixl_etcd` (its library found through $NIXL_ETCD_LIBRARY or
target/release). NIXL_ETCD_TEST_FROM_SOURCE=1 forces the checkout.
The pytest header says which package and library were used.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

PY_DIR = Path(__file__).resolve().parent.parent  # python/
REPO = PY_DIR.parent
EXAMPLES = PY_DIR / "examples"
HEADER = REPO / "include" / "nixl_etcd.h"

if os.environ.get("NIXL_ETCD_TEST_FROM_SOURCE", "") not in ("", "0"):
    sys.path.insert(0, str(PY_DIR))
elif importlib.util.find_spec("nixl_etcd") is None:
    sys.path.insert(0, str(PY_DIR))

import nixl_etcd  # noqa: E402
from nixl_etcd.vllm.testing import free_port  # noqa: E402  (tests import it from here)

ETCD_BIN = os.environ.get("NIXL_ETCD_TEST_ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL_BIN = (
    os.environ.get("NIXL_ETCD_TEST_ETCDCTL_BIN") or shutil.which("etcdctl") or "/usr/bin/etcdctl"
)

# Tests must not inherit the developer's etcd settings.
_SCRUBBED = [
    "VLLM_NIXL_USE_ETCD",
    "VLLM_NIXL_ETCD_ENDPOINTS",
    "VLLM_NIXL_ETCD_NAMESPACE",
    "VLLM_NIXL_ETCD_TIMEOUT",
    "VLLM_NIXL_ETCD_LEASE_TTL",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "NIXL_ETCD_NAMESPACE",
    "NIXL_ETCD_ENDPOINTS",
]


def pytest_report_header(config: pytest.Config) -> List[str]:
    try:
        lib = nixl_etcd.library_path()
    except Exception as e:  # reported by the tests themselves
        lib = f"not loadable: {e}"
    return [
        f"nixl_etcd package: {Path(nixl_etcd.__file__).parent}",
        f"nixl_etcd library: {lib}",
        f"etcd: {ETCD_BIN}",
    ]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)


def _healthy(port: int, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return b'"health":"true"' in r.read()
    except Exception:
        return False


class Etcd:
    """A private etcd: free loopback ports, a temporary data dir, its log kept.

    ``in_memory``: the data dir on /dev/shm (when there is one), so that etcd's
    fsyncs never wait behind other disk writers (a busy machine's builds).
    """

    def __init__(self, in_memory: bool = False) -> None:
        shm = "/dev/shm" if in_memory and os.access("/dev/shm", os.W_OK) else None
        self.data_dir = Path(tempfile.mkdtemp(prefix="nixl-etcd-pytest-", dir=shm))
        self.proc: Optional[subprocess.Popen] = None
        self.client_port = 0
        self.peer_port = 0
        self.log_path = self.data_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def _spawn(self) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                ETCD_BIN,
                "--name", "nixl-etcd-pytest",
                "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", client,
                "--advertise-client-urls", client,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"nixl-etcd-pytest={peer}",
                "--log-level", "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def start(self, attempts: int = 5) -> "Etcd":
        last = ""
        for _ in range(attempts):
            self.client_port, self.peer_port = free_port(), free_port()
            if self.client_port == self.peer_port:
                continue
            self._spawn()
            assert self.proc is not None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _healthy(self.client_port):
                    return self
                time.sleep(0.05)
            last = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"etcd did not start ({ETCD_BIN}); last log:\n{last}")

    def stop(self) -> None:
        """Stops etcd (SIGKILL: as sudden as a crash). The data dir stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        """Starts a stopped etcd again on its ports, with its data dir."""
        self._spawn()
        assert wait_until(lambda: _healthy(self.client_port), timeout=30)

    def pause(self) -> None:
        """Hangs etcd (SIGSTOP): connections stay open, nothing is answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: _healthy(self.client_port), timeout=30)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def ctl(self, *args: str, input: Optional[bytes] = None) -> bytes:
        env = dict(os.environ, ETCDCTL_API="3")
        out = subprocess.run(
            [ETCDCTL_BIN, "--endpoints", self.endpoint, *args],
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            check=True,
            timeout=20,
        )
        return out.stdout


@pytest.fixture(scope="session")
def etcd() -> Iterator[Etcd]:
    """One etcd for the session; tests isolate themselves with `ns`."""
    server = Etcd().start()
    yield server
    server.cleanup()


@pytest.fixture
def private_etcd() -> Iterator[Etcd]:
    """An etcd of this test alone (for tests that stop it)."""
    server = Etcd().start()
    yield server
    server.cleanup()


_counter = itertools.count()


@pytest.fixture
def ns() -> str:
    """A namespace no other test uses."""
    return f"/pytest/{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def open_client(etcd: Etcd, ns: str):
    """Opens clients on the session etcd in the test's namespace; closes them after."""
    clients = []

    def make(**options) -> nixl_etcd.Client:
        options.setdefault("endpoints", etcd.endpoint)
        options.setdefault("namespace", ns)
        options.setdefault("timeout_s", 5)
        c = nixl_etcd.Client(**options)
        clients.append(c)
        return c

    yield make
    for c in clients:
        try:
            c.close()
        except nixl_etcd.NixlEtcdError:
            pass


def engine(prefix: str = "engine") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def wait_until(pred, timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
