"""The wheel (`bash scripts/wheel.sh DIR`) installs into a fresh venv where no
cargo, protoc or libclang is on PATH, and then its command, its package, its
vLLM entry point and the client tests run against the library inside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ETCD_BIN, ETCDCTL_BIN

PY_DIR = Path(__file__).resolve().parent.parent
REPO = PY_DIR.parent
MAX_WHEEL_BYTES = 10 * 1024 * 1024


def crate_version() -> str:
    text = (REPO / "Cargo.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


#: The Pythons the package is tested with (pyenv's, on this project's machine).
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def interpreter(version: str) -> str:
    """The python of that minor version: pyenv's, else one on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for d in sorted(root.glob(f"{version}.*"), reverse=True):
        exe = d / "bin" / f"python{version}"
        if exe.is_file():
            return str(exe)
    found = shutil.which(f"python{version}")
    assert found, f"no Python {version} here (pyenv install {version}, or put python{version} on PATH)"
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    built = run(["bash", str(REPO / "scripts" / "wheel.sh"), str(dist)], cwd=REPO)
    [whl] = list(dist.glob("nixl_etcd-*.whl"))
    assert re.fullmatch(
        rf"nixl_etcd-{re.escape(crate_version())}-py3-none-manylinux_2_\d+_x86_64\.whl", whl.name
    ), (whl.name, built.stdout)
    assert whl.stat().st_size <= MAX_WHEEL_BYTES, whl.stat().st_size
    names = zipfile.ZipFile(whl).namelist()
    for inside in ["nixl_etcd/libnixl_etcd.so", "nixl_etcd/bin/nixl-etcd", "nixl_etcd/vllm/__init__.py"]:
        assert inside in names, names
    return whl


@pytest.mark.parametrize("python", PYTHONS)
def test_the_wheel_installs_and_runs_with_no_toolchain(wheel: Path, python: str, tmp_path):
    version = crate_version()
    venv = tmp_path / "venv"
    run([interpreter(python), "-m", "venv", str(venv)])
    # PATH: the venv alone. No cargo, protoc or clang is reachable.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NIXL_ETCD_", "CARGO", "RUSTUP", "VIRTUAL_ENV", "PYTHON"))
    }
    env["PATH"] = str(venv / "bin")
    for tool in ["cargo", "rustc", "protoc", "clang", "llvm-config"]:
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    py = str(venv / "bin" / "python")
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], env=env)

    out = run([str(venv / "bin" / "nixl-etcd"), "--version"], env=env, cwd=tmp_path).stdout
    assert out.strip() == f"nixl-etcd {version}", out
    probe = run(
        [
            py,
            "-c",
            "import importlib.metadata as m, nixl_etcd; "
            "print(nixl_etcd.version()); print(m.version('nixl-etcd')); "
            "print(nixl_etcd.library_path()); "
            "print(*[e.value for e in m.distribution('nixl-etcd').entry_points "
            "if e.group == 'vllm.general_plugins'])",
        ],
        env=env,
        cwd=tmp_path,
    ).stdout.split("\n")
    assert probe[0] == version and probe[1] == version, probe
    site = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env)
    assert probe[2] == str(Path(site.stdout.strip()) / "nixl_etcd" / "libnixl_etcd.so"), probe
    assert probe[3] == "nixl_etcd.vllm:register", probe

    # The client tests, with the wheel's package and library (the conftest
    # takes the installed package when there is one).
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "pytest"], env=env)
    tests = dict(env, NIXL_ETCD_TEST_ETCD_BIN=ETCD_BIN, NIXL_ETCD_TEST_ETCDCTL_BIN=ETCDCTL_BIN)
    r = run(
        [py, "-m", "pytest", "-p", "no:cacheprovider", str(PY_DIR / "tests" / "test_client.py")],
        env=tests,
        cwd=REPO,
    )
    assert f"nixl_etcd library: {probe[2]}" in r.stdout, r.stdout[:2000]
    assert re.search(r"\d+ passed", r.stdout) and " failed" not in r.stdout, r.stdout[-2000:]
