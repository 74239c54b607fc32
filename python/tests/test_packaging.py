"""The package build (setup.py: cargo, then the library shipped inside the
package) and the library search, without network and without recompiling:
a stand-in cargo reports the library that is already built."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path


import nixl_etcd
from nixl_etcd import _ffi
from conftest import PY_DIR, REPO


def fake_cargo(tmp_path: Path, artifact: str, rc: int = 0) -> Path:
    message = {
        "reason": "compiler-artifact",
        "target": {"name": "nixl_etcd", "kind": ["cdylib", "staticlib", "rlib"]},
        "filenames": [artifact.replace(".so", ".a"), artifact],
    }
    command = tmp_path / "nixl-etcd-built"
    command.write_text("#!/bin/sh\necho nixl-etcd 0.0.0\n")
    command.chmod(0o755)
    bin_message = {
        "reason": "compiler-artifact",
        "target": {"name": "nixl-etcd", "kind": ["bin"]},
        "filenames": [str(command)],
        "executable": str(command),
    }
    script = tmp_path / "cargo"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{tmp_path}/cargo-args"\n'
        f"echo '{json.dumps(message)}'\n"
        f"echo '{json.dumps(bin_message)}'\n"
        f"exit {rc}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def build(tmp_path: Path, cargo: Path, **env_extra: str) -> subprocess.CompletedProcess:
    src = tmp_path / "src"
    # a copy of python/ next to the real workspace (NIXL_ETCD_SOURCE_DIR), so
    # the checkout is left untouched
    shutil.copytree(PY_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                              ".pytest_cache", "*.so"))
    env = dict(os.environ, CARGO=str(cargo), NIXL_ETCD_SOURCE_DIR=str(REPO), **env_extra)
    env.pop(_ffi.LIBRARY_ENV, None)
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
        cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_setup_py_ships_the_library_inside_the_package(tmp_path):
    lib = nixl_etcd.library_path()
    out = build(tmp_path, fake_cargo(tmp_path, lib), NIXL_ETCD_CARGO_FEATURES="nixl")
    assert out.returncode == 0, out.stdout
    args = (tmp_path / "cargo-args").read_text().split()
    assert args[:5] == ["build", "--release", "--lib", "--bin", "nixl-etcd"]
    assert "--features" in args and "nixl" in args
    assert str(REPO / "Cargo.toml") in args
    [shipped] = list((tmp_path / "build").glob("lib*/nixl_etcd/libnixl_etcd.so"))
    assert shipped.read_bytes() == Path(lib).read_bytes()
    [command] = list((tmp_path / "build").glob("lib*/nixl_etcd/bin/nixl-etcd"))
    assert command.read_bytes() == (tmp_path / "nixl-etcd-built").read_bytes()
    assert os.access(command, os.X_OK)
    # the built package finds its own copy first, with no environment help
    env = dict(os.environ, PYTHONPATH=str(shipped.parent.parent))
    env.pop(_ffi.LIBRARY_ENV, None)
    probe = subprocess.run(
        [sys.executable, "-c", "import nixl_etcd; print(nixl_etcd.library_path()); "
         "print(nixl_etcd.version())"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert probe.returncode == 0, probe.stdout
    path, version = probe.stdout.split()
    assert Path(path) == shipped
    assert version == nixl_etcd.version()


def test_setup_py_fails_clearly_when_cargo_fails(tmp_path):
    out = build(tmp_path, fake_cargo(tmp_path, "/nonexistent/libnixl_etcd.so", rc=101))
    assert out.returncode != 0
    assert "cargo build failed" in out.stdout


def test_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv("CARGO_TARGET_DIR", str(tmp_path))
    paths = _ffi.candidate_paths()
    assert paths[0] == Path(_ffi.__file__).resolve().parent / "libnixl_etcd.so"
    assert paths[1] == tmp_path / "release" / "libnixl_etcd.so"
    if Path(_ffi.__file__).resolve().parent.parent == PY_DIR:  # running from the checkout
        assert REPO / "target" / "release" / "libnixl_etcd.so" in paths
