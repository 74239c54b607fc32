"""Builds the package with the workspace's Rust library inside it.

`pip install ./python` (from the repository root) runs `cargo build --release
--lib` on the workspace one directory up and ships the resulting
libnixl_etcd.so as nixl_etcd/libnixl_etcd.so; the wheel is therefore
platform-specific. Environment:

  CARGO                      the cargo binary (default: cargo on PATH)
  CARGO_TARGET_DIR           honoured by cargo as usual
  NIXL_ETCD_CARGO_FEATURES   cargo features to build with, e.g. "nixl"
  NIXL_ETCD_SOURCE_DIR       the Rust workspace, when python/ is not inside it
  NIXL_ETCD_SKIP_CARGO=1     ship no library (an editable install skips it too)
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
LIB = "libnixl_etcd.so"


def workspace() -> Path:
    env = os.environ.get("NIXL_ETCD_SOURCE_DIR")
    root = Path(env).resolve() if env else HERE.parent
    if not (root / "Cargo.toml").is_file():
        sys.exit(
            f"nixl-etcd: no Cargo.toml in {root}; install from a checkout of the repository "
            "(pip install ./python) or set NIXL_ETCD_SOURCE_DIR to it"
        )
    return root


def crate_version() -> str:
    try:
        text = (workspace() / "Cargo.toml").read_text()
    except SystemExit:
        return "0.0.0"
    m = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    return m.group(1) if m else "0.0.0"


def cargo_build() -> Path:
    """Runs cargo and returns the path of the cdylib it produced."""
    root = workspace()
    cmd = [
        os.environ.get("CARGO", "cargo"),
        "build",
        "--release",
        "--lib",
        "--package",
        "nixl-etcd",
        "--manifest-path",
        str(root / "Cargo.toml"),
        "--message-format=json-render-diagnostics",
    ]
    features = os.environ.get("NIXL_ETCD_CARGO_FEATURES", "").strip()
    if features:
        cmd += ["--features", features]
    print("nixl-etcd: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, check=False)
    except FileNotFoundError:
        sys.exit("nixl-etcd: cargo not found; install a Rust toolchain (rustup) or set CARGO")
    if proc.returncode != 0:
        sys.exit(f"nixl-etcd: cargo build failed (exit {proc.returncode})")
    found = None
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        if msg.get("target", {}).get("name") != "nixl_etcd":
            continue
        for f in msg.get("filenames", []):
            if f.endswith(LIB):
                found = Path(f)
    if found is None or not found.is_file():
        sys.exit(f"nixl-etcd: cargo did not report {LIB}")
    return found


class BuildPyWithCargo(build_py):
    """build_py that also builds the Rust library and copies it into the package."""

    def run(self):
        super().run()
        if self.dry_run:
            return
        if os.environ.get("NIXL_ETCD_SKIP_CARGO") == "1" or getattr(self, "editable_mode", False):
            # An editable install reads the package from python/ and the library
            # from <repo>/target/release (see nixl_etcd/_ffi.py): nothing to ship.
            print("nixl-etcd: editable install, cargo build skipped", file=sys.stderr, flush=True)
            return
        built = cargo_build()
        dest = Path(self.build_lib) / "nixl_etcd" / LIB
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, dest)
        os.chmod(dest, 0o755)
        print(f"nixl-etcd: shipping {built} as {dest}", file=sys.stderr, flush=True)


class BinaryDistribution(Distribution):
    """The package holds a native library: platform wheels, not pure ones."""

    def has_ext_modules(self):
        return True


setup(
    version=crate_version(),
    cmdclass={"build_py": BuildPyWithCargo},
    distclass=BinaryDistribution,
)
