#!/usr/bin/env bash
# Packs what the GPU run (gpu/run.sh) needs on a machine that has a GPU but
# neither this project nor NIXL: the release builds of examples/gpu_kv.rs and
# of the nixl-etcd command (its `serve`), the libraries of the nixl-cu13 1.5.1
# wheel that its UCX path loads (NIXL, its C API, the UCX plugin, UCX and UCX's
# CUDA transports, and what they link), the wheel's Python API (nixl_cu13, for
# the stock agents of stock_nixl_gpu.py), and etcd, into DEST/bundle.tar.xz,
# with run.sh and stock_nixl_gpu.py beside it.
#
#   gpu/pack.sh DEST [WHEEL]    (WHEEL: a nixl_cu13-1.5.1 .whl; else pip downloads it)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:?usage: gpu/pack.sh DEST [WHEEL]}"
wheel="${2:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

(cd "$root" && cargo build --release --example gpu_kv --features nixl,cuda &&
  cargo build --release --bin nixl-etcd)

if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$tmp" nixl-cu13==1.5.1
  wheel="$(ls "$tmp"/nixl_cu13-*.whl)"
fi
mkdir -p "$tmp/wheel" "$tmp/stage/bin" "$tmp/stage/nixl"
unzip -q "$wheel" -d "$tmp/wheel"

strip -o "$tmp/stage/bin/gpu_kv" "$root/target/release/examples/gpu_kv"
strip -o "$tmp/stage/bin/nixl-etcd" "$root/target/release/nixl-etcd"
cp "$(command -v etcd)" "$tmp/stage/bin/etcd"

# The wheel's libraries reachable (DT_NEEDED) from the C API, the UCX plugin
# and UCX's CUDA and CMA modules, kept at their paths inside the wheel (their
# RPATHs are relative).
python3 - "$tmp/wheel" "$tmp/stage/nixl" <<'PY'
import os, re, shutil, subprocess, sys
src, dst = sys.argv[1], sys.argv[2]
index = {}
for d, _, files in os.walk(src):
    for f in files:
        if ".so" in f:
            index.setdefault(f, os.path.join(d, f))
seeds = [".nixl_cu13.mesonpy.libs/libnixl_capi.so",
         ".nixl_cu13.mesonpy.libs/plugins/libplugin_UCX.so"]
# The Python API of the stock agents: its bindings, and its modules below.
seeds += [os.path.relpath(p, src) for n, p in index.items() if n.startswith("_bindings.")]
seeds += [os.path.relpath(p, src) for n, p in index.items()
          if re.match(r"lib(uct_cuda|ucm_cuda|uct_cma)\.so", n)]
seen, todo, external = set(), [os.path.join(src, s) for s in seeds], set()
while todo:
    p = todo.pop()
    if p in seen:
        continue
    seen.add(p)
    out = subprocess.run(["readelf", "-d", p], capture_output=True, text=True, check=True).stdout
    for need in re.findall(r"NEEDED.*\[(.*)\]", out):
        if need in index:
            todo.append(index[need])
        else:
            external.add(need)
total = 0
for p in sorted(seen):
    rel = os.path.relpath(p, src)
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    shutil.copy2(p, os.path.join(dst, rel))
    total += os.path.getsize(p)
for f in os.listdir(os.path.join(src, "nixl_cu13")):
    if f.endswith(".py"):
        shutil.copy2(os.path.join(src, "nixl_cu13", f), os.path.join(dst, "nixl_cu13", f))
print(f"pack: {len(seen)} wheel libraries, {total / 2**20:.1f} MiB; from the system: "
      + " ".join(sorted(external)))
PY

mkdir -p "$dest"
du -sh "$tmp/stage/bin/gpu_kv" "$tmp/stage/bin/etcd" "$tmp/stage/nixl"
XZ_OPT="-9 -T2" tar -cJf "$dest/bundle.tar.xz" -C "$tmp/stage" .
cp "$root/gpu/run.sh" "$dest/run.sh"
cp "$root/gpu/stock_nixl_gpu.py" "$dest/stock_nixl_gpu.py"
ls -la "$dest"
du -sh "$dest"
