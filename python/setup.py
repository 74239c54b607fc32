"""Builds the package with the workspace's Rust library inside it.

`pip install ./python` (from the repository root) runs `cargo build --release
--lib --bin nixl-etcd` on the workspace one directory up and ships the
resulting libnixl_etcd.so as nixl_etcd/libnixl_etcd.so and the command as
nixl_etcd/bin/nixl-etcd (run by the `nixl-etcd` entry point); the wheel is
therefore platform-specific, but not tied to one Python (py3-none). A wheel
for hosts with no toolchain: `bash scripts/wheel.sh DIR`. Environment:

  CARGO                      the cargo binary (default: cargo on PATH)
  CARGO_TARGET_DIR           honoured by cargo as usual
  NIXL_ETCD_CARGO_FEATURES   cargo features to build with, e.g. "nixl"
  NIXL_ETCD_SOURCE_DIR       the Rust workspace, when python/ is not inside it
  NIXL_ETCD_SKIP_CARGO=1     ship no library (an editable install skips it too)
  NIXL_ETCD_STRIP=1          strip the library and the command (scripts/wheel.sh)
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

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1: the wheel package's, when installed
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
LIB = "libnixl_etcd.so"
BIN = "nixl-etcd"


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


def cargo_build() -> "tuple[Path, Path]":
    """Runs cargo and returns the paths of the cdylib and the command it produced."""
    root = workspace()
    cmd = [
        os.environ.get("CARGO", "cargo"),
        "build",
        "--release",
        "--lib",
        "--bin",
        BIN,
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
    lib = exe = None
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        name = msg.get("target", {}).get("name")
        if name == "nixl_etcd":
            for f in msg.get("filenames", []):
                if f.endswith(LIB):
                    lib = Path(f)
        elif name == BIN and msg.get("executable"):
            exe = Path(msg["executable"])
    if lib is None or not lib.is_file():
        sys.exit(f"nixl-etcd: cargo did not report {LIB}")
    if exe is None or not exe.is_file():
        sys.exit(f"nixl-etcd: cargo did not report the {BIN} command")
    return lib, exe


def ship(built: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, dest)
    os.chmod(dest, 0o755)
    if os.environ.get("NIXL_ETCD_STRIP") == "1":
        subprocess.run(["strip", "--strip-unneeded", str(dest)], check=True)
    print(f"nixl-etcd: shipping {built} as {dest}", file=sys.stderr, flush=True)


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
        lib, exe = cargo_build()
        ship(lib, Path(self.build_lib) / "nixl_etcd" / LIB)
        ship(exe, Path(self.build_lib) / "nixl_etcd" / "bin" / BIN)


class BinaryDistribution(Distribution):
    """The package holds a native library: platform wheels, not pure ones."""

    def has_ext_modules(self):
        return True


COMMANDS = {"build_py": BuildPyWithCargo}
if bdist_wheel is not None:

    class WheelForAnyPython(bdist_wheel):
        """The library is loaded with ctypes, not as an extension module: one
        wheel serves every Python 3 on the platform (py3-none-<platform>)."""

        def get_tag(self):
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    COMMANDS["bdist_wheel"] = WheelForAnyPython


setup(
    version=crate_version(),
    cmdclass=COMMANDS,
    distclass=BinaryDistribution,
)
