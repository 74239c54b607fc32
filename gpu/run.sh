#!/usr/bin/env bash
# The GPU run, in one go on a machine with an NVIDIA GPU: unpacks what
# gpu/pack.sh packed (bundle.tar.xz beside this script), starts a private etcd,
# and for each UCX setting runs a prefill and a decode process of
# examples/gpu_kv.rs, the prefill on GPU 0 and the decode on GPU 1 when there
# are two (CUDA_VISIBLE_DEVICES), else both on GPU 0; they find each other only
# through etcd (this library) and move 1 GiB of KV blocks VRAM->VRAM with a
# NIXL READ (UCX). The fastest setting is run again with 64 KiB, 32 MiB and
# 1 GiB blocks. Then two stock NIXL agents (the wheel's Python API,
# stock_nixl_gpu.py) whose only link is NIXL_TCPSTORE_ENDPOINT -> `nixl-etcd
# serve` move 256 MiB the same way, and, with two GPUs, a PyTorch copy GPU 0 ->
# GPU 1 gives the peer-to-peer limit.
#
# Writes $OUT/gpu-result.md (a summary, also printed) and $OUT/gpu-log.txt
# (machine probe, every process's output). OUT defaults to ./gpu-out.
#
#   bash run.sh            environment: GPU_KV_BUNDLE (tarball), GPU_KV_WORK (scratch dir),
#                          GPU_RUN=short (one UCX setting, then first transfer with and
#                          without pre-warm, stock NIXL, P2P)
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
W="${GPU_KV_WORK:-/tmp/gpu_kv}"
rm -rf "$W" && mkdir -p "$W"
RES="$OUT/gpu-result.md"
LOG="$OUT/gpu-log.txt"
: >"$LOG"
start=$SECONDS
say() { echo "$*" | tee -a "$LOG"; }

tar -xJf "${GPU_KV_BUNDLE:-$here/bundle.tar.xz}" -C "$W" || { say "run.sh: cannot unpack the bundle"; exit 1; }
BIN="$W/bin/gpu_kv"
NIXL_LIBS="$W/nixl/.nixl_cu13.mesonpy.libs"
export NIXL_CAPI_LIB="$NIXL_LIBS/libnixl_capi.so" NIXL_PLUGIN_DIR="$NIXL_LIBS/plugins"

# CUDA's user-space libraries: libcuda from the driver; NVRTC (the check
# kernel) and libcudart (UCX's CUDA memory hooks) from the toolkit or from a
# Python package.
libdirs=""
for lib in libnvrtc.so.13 libcudart.so.13; do
  p="$(ldconfig -p | awk -v n="$lib" '$1 == n { print $NF; exit }')"
  if [ -z "$p" ]; then
    p="$(find /usr/local/cuda/lib64 /usr/local/cuda*/lib64 /usr/local/cuda*/targets /usr/lib /opt \
          -name "$lib*" -not -path '*stubs*' 2>/dev/null | head -n 1)"
  fi
  [ -n "$p" ] && libdirs="$libdirs:$(dirname "$p")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "== probe"
  date -u
  uname -r
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvidia-smi | grep -i 'CUDA Version' | sed 's/  */ /g'
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
  python3 --version
  ldconfig -p | grep -E 'libcuda\.so\.1|libnvidia-ml\.so\.1|libnvrtc|libcudart' | head
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  du -sh "$W/bin" "$W/nixl"
} >>"$LOG" 2>&1

# etcd, private, on loopback.
EP=http://127.0.0.1:23790
"$W/bin/etcd" --name gpu --data-dir "$W/etcd" \
  --listen-client-urls "$EP" --advertise-client-urls "$EP" \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster gpu=http://127.0.0.1:23800 >"$W/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill $etcd_pid 2>/dev/null' EXIT
for _ in $(seq 100); do
  python3 -c "import urllib.request,sys; sys.exit(0 if b'true' in urllib.request.urlopen('$EP/health', timeout=1).read() else 1)" \
    2>/dev/null && break
  sleep 0.1
done
say "etcd $("$W/bin/etcd" --version | head -n 1) up after $((SECONDS - start)) s on $EP"
ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
ngpu="${ngpu:-0}"
P_GPU=0 D_GPU=0
[ "${ngpu:-0}" -ge 2 ] && D_GPU=1
say "GPUs: $ngpu; prefill on GPU $P_GPU, decode on GPU $D_GPU"
export VLLM_NIXL_USE_ETCD=1 VLLM_NIXL_ETCD_ENDPOINTS="$EP" VLLM_NIXL_ETCD_NAMESPACE=/gpu-kv

# wait_line FILE PATTERN PID: until FILE has a line matching PATTERN, PID
# exits, or 60 s pass.
wait_line() {
  for _ in $(seq 600); do
    grep -q "$2" "$1" && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# stop_prefill PID: lets the prefill exit on its own (up to 20 s), then
# ends it; returns its exit status.
stop_prefill() {
  for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill "$1" 2>/dev/null
  wait "$1"
}

# field KEY: the value of KEY=... in the caller's result line $r.
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $r"; }

rows=""
best_name="" best_env="" best_gbps=0
# run_case NAME "ENV=VALUE ..." "prefill options"
run_case() {
  local name="$1" envs="$2" opts="$3" eng="gpu-kv-$1" pp rc prc r status
  if [ $((SECONDS - start)) -gt 420 ]; then
    rows="$rows| $name | \`${envs:-UCX defaults}\` | skipped (time) | | | | | | |"$'\n'
    return
  fi
  # shellcheck disable=SC2086
  env $envs CUDA_VISIBLE_DEVICES=$P_GPU "$BIN" prefill "$eng" $opts --timeout-s 90 >"$W/$name.prefill" 2>&1 &
  pp=$!
  wait_line "$W/$name.prefill" '^prefill: ready' "$pp"
  if grep -q '^prefill: ready' "$W/$name.prefill"; then
    # shellcheck disable=SC2086
    env $envs CUDA_VISIBLE_DEVICES=$D_GPU UCX_PROTO_INFO=y timeout 100 "$BIN" decode "$eng" --timeout-s 60 >"$W/$name.decode" 2>&1
    rc=$?
  else
    echo "decode not started: the prefill did not get ready" >"$W/$name.decode"
    rc=125
  fi
  stop_prefill "$pp"
  prc=$?
  {
    echo "== case $name (${envs:-UCX defaults}; $opts): decode exit $rc, prefill exit $prc"
    echo "-- prefill"; cat "$W/$name.prefill"
    echo "-- decode"; cat "$W/$name.decode"
  } >>"$LOG"
  r="$(grep '^RESULT' "$W/$name.decode" | tail -n 1)"
  if [ "$rc" -eq 0 ] && [ -n "$r" ]; then
    status="moved, verified"
    rows="$rows| $name | \`${envs:-UCX defaults}\` | $status | $(field blocks) x $(field block_bytes) B | $(field first_gbps) | $(field median_gbps) | $(field best_gbps) | $(field handshake_ms) | $(field verified_bytes) |"$'\n'
    if [ "$(awk -v a="$(field median_gbps)" -v b="$best_gbps" 'BEGIN { print (a > b) }')" = 1 ] && [ "$opts" = "" ]; then
      best_gbps="$(field median_gbps)" best_name="$name" best_env="$envs"
    fi
  else
    status="failed (decode $rc, prefill $prc): $(grep -hE 'gpu_kv|rror' "$W/$name.decode" "$W/$name.prefill" | tail -n 1 | cut -c1-160 | tr '|' '/')"
    rows="$rows| $name | \`${envs:-UCX defaults}\` | $status | | | | | | |"$'\n'
  fi
  say "case $name: $status $(sed 's/^RESULT //' <<<"$r")"
}

# UCX's defaults: its cuda_ipc transport turns GET (a READ) off on a GPU with
# no NVLink ("cuda-ipc get zcopy disabled as no nvlinks detected"), so READs
# fall back to tcp through the host. UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y turns it
# back on. (UCX_TLS without tcp, e.g. cuda_ipc,cuda_copy,sm,self, fails:
# NIXL's endpoints need peer failure handling, which shared memory lacks.)
# GPU_RUN=short: one UCX setting (no block sizes), then the pre-warm, stock
# NIXL and peer-to-peer parts (for a short device lease).
if [ "${GPU_RUN:-}" != short ]; then
  run_case default "" ""
  run_case ipc-get "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y" ""
fi
run_case ipc-get-tcp "UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y UCX_TLS=cuda_ipc,cuda_copy,tcp" ""
# The same 1 GiB in other block sizes (one NIXL descriptor per block).
if [ -n "$best_name" ] && [ "${GPU_RUN:-}" != short ]; then
  run_case "$best_name-64k" "$best_env" "--blocks 16384 --block-kib 64"
  run_case "$best_name-32m" "$best_env" "--blocks 32 --block-kib 32768"
  run_case "$best_name-1g" "$best_env" "--blocks 1 --block-kib 1048576"
fi

# First transfer after a prefill appears, the decode started first in both
# modes: "cold" waits for the engine and loads its agent on the request's
# path; "prewarm" follows it and loads the agent on its ADDED event, before
# the request (the READ). Alternated, five times each.
first_rows=""
run_first() {
  local name="$1" envs="$2" warm="$3" warmup="${4:-0}" eng="gpu-kv-$1" dp pp rc r res
  # shellcheck disable=SC2086
  env $envs CUDA_VISIBLE_DEVICES=$D_GPU timeout 100 "$BIN" decode "$eng" --prewarm "$warm" --warmup "$warmup" --timeout-s 60 >"$W/$name.decode" 2>&1 &
  dp=$!
  wait_line "$W/$name.decode" '^decode: ready' "$dp"
  # shellcheck disable=SC2086
  env $envs CUDA_VISIBLE_DEVICES=$P_GPU "$BIN" prefill "$eng" --timeout-s 90 >"$W/$name.prefill" 2>&1 &
  pp=$!
  wait "$dp"
  rc=$?
  stop_prefill "$pp"
  { echo "== first-transfer case $name (${envs:-UCX defaults}; --prewarm $warm): decode exit $rc"
    echo "-- prefill"; cat "$W/$name.prefill"; echo "-- decode"; cat "$W/$name.decode"; } >>"$LOG"
  r="$(grep '^FIRST' "$W/$name.decode" | tail -n 1)"
  res="$(r="$(grep '^RESULT' "$W/$name.decode" | tail -n 1)"; echo "$(field first_ms) | $(field median_ms)")"
  if [ "$rc" -eq 0 ] && [ -n "$r" ]; then
    first_rows="$first_rows| $name | $(field mode) | $(field known_ms) | $(field nixl_load_ms) | $(field loaded_ms) | $(field first_read_done_ms) | $(field on_path_ms) | $res |"$'\n'
  else
    first_rows="$first_rows| $name | --prewarm $warm | failed (decode $rc): $(tail -n 1 "$W/$name.decode" | cut -c1-120 | tr '|' '/') | | | | | | |"$'\n'
  fi
  say "first transfer $name: ${r:-failed}"
}
if [ -n "$best_name" ]; then
  for i in 1 2 3 4 5; do
    run_first "$best_name-cold$i" "$best_env" 0
    run_first "$best_name-prewarm$i" "$best_env" 1
    run_first "$best_name-warmup$i" "$best_env" 1 1
  done
fi

# Stock NIXL agents, metadata only through `nixl-etcd serve` (etcd behind it).
stock_row="not run"
"$W/bin/nixl-etcd" serve --listen 127.0.0.1:0 --endpoints "$EP" >"$W/serve.out" 2>"$W/serve.err" &
serve_pid=$!
trap 'kill $etcd_pid $serve_pid 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q 'ready, NIXL_TCPSTORE_ENDPOINT=' "$W/serve.out" && break; sleep 0.1; done
store="$(sed -n 's/.*NIXL_TCPSTORE_ENDPOINT=\([0-9.:]*\) .*/\1/p' "$W/serve.out" | head -n 1)"
if [ -n "$store" ]; then
  export PYTHONPATH="$W/nixl${PYTHONPATH:+:$PYTHONPATH}"
  NIXL_TCPSTORE_ENDPOINT="$store" CUDA_VISIBLE_DEVICES=$P_GPU \
    python3 "$here/stock_nixl_gpu.py" prefill stock-prefill 256 >"$W/stock.prefill" 2>&1 &
  sp=$!
  wait_line "$W/stock.prefill" '^{"addr"' "$sp"
  read -r addr len dev < <(grep '^{"addr"' "$W/stock.prefill" | python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); print(d["addr"], d["len"], d["dev"])')
  if [ -n "${addr:-}" ]; then
    NIXL_TCPSTORE_ENDPOINT="$store" CUDA_VISIBLE_DEVICES=$D_GPU timeout 120 \
      python3 "$here/stock_nixl_gpu.py" decode stock-decode stock-prefill "$addr" "$len" "$dev" >"$W/stock.decode" 2>&1
  fi
  wait $sp
  r="$(grep '^RESULT' "$W/stock.decode" 2>/dev/null | tail -n 1)"
  stock_row="${r:-failed: $(tail -n 2 "$W/stock.decode" "$W/stock.prefill" 2>/dev/null | tr '\n|' ' /' | cut -c1-300)}"
  { echo "== stock NIXL through nixl-etcd serve ($store)"; cat "$W/serve.out" "$W/serve.err";
    echo "-- prefill"; cat "$W/stock.prefill"; echo "-- decode"; cat "$W/stock.decode" 2>/dev/null; } >>"$LOG"
fi
kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null
say "stock NIXL via nixl-etcd serve: $stock_row"
say "serve: $(tail -n 1 "$W/serve.out")"

# The peer-to-peer copy limit GPU 0 -> GPU 1 (PyTorch), and how the GPUs are linked.
p2p="one GPU: no peer-to-peer copy"
if [ "$ngpu" -ge 2 ]; then
  p2p="$(python3 - <<'PY' 2>&1 | tail -n 1
import torch, time
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda:0"); b = torch.empty(n, dtype=torch.uint8, device="cuda:1")
for _ in range(3): b.copy_(a)
torch.cuda.synchronize("cuda:0"); torch.cuda.synchronize("cuda:1")
ts = []
for _ in range(10):
    t = time.perf_counter(); b.copy_(a); torch.cuda.synchronize("cuda:1"); ts.append(time.perf_counter() - t)
ts.sort()
print(f"PyTorch copy cuda:0 -> cuda:1 of 1 GiB: median {n / ts[5] / 1e9:.1f} GB/s, best {n / ts[0] / 1e9:.1f} GB/s")
PY
)"
fi
topo="$(nvidia-smi topo -m 2>/dev/null | sed -n '2,3p' | tr -s ' \t' ' ')"
say "p2p: $p2p"

{
  echo "# GPU KV transfer through NIXL, metadata through nixl-etcd"
  echo
  echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null) ($(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*'))"
  echo "- NIXL: nixl-cu13 1.5.1 wheel libraries, UCX backend; etcd $("$W/bin/etcd" --version | head -n 1 | awk '{print $3}') on loopback"
  echo "- two processes (prefill on GPU $P_GPU, decode on GPU $D_GPU of $ngpu), each its own CUDA context and NIXL agent; metadata and KV layout only through etcd"
  echo "- topology (nvidia-smi topo -m): ${topo:-n/a}"
  echo "- peer-to-peer limit: $p2p"
  echo
  echo "| case | UCX settings | result | blocks | first READ GB/s | median GB/s | best GB/s | handshake ms | bytes verified |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s' "$rows"
  echo
  if [ -n "$best_name" ]; then
    grep -h '^decode: ' "$W/$best_name.decode" | sed 's/^/    /'
  fi
  echo
  echo "First transfer after the prefill appears, with and without pre-warm (decode started first in all; cold: it waits for the engine and loads the agent on the request's path; prewarm: the library's pre-warm loads the agent and connects to it on the ADDED event, then the decode READs 1 GiB; warmup: as prewarm, and the pre-warm runs the engine's warm-up, two READs of one block, before the request). ms after the prefill's registration (its record's registered_at_ms, same host clock), then the first 1 GiB READ and the median of the repeats; settings \`${best_env:-UCX defaults}\`:"
  echo
  echo "| case | mode | decode knows of it | NIXL load | agent loaded | first READ complete | handshake on the request's path | first READ | median READ |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  printf '%s' "$first_rows"
  echo
  echo "Stock NIXL (nixl-cu13 Python API, no nixl-etcd code in the agents; their only link NIXL_TCPSTORE_ENDPOINT -> \`nixl-etcd serve\` -> etcd), 256 MiB VRAM READ, every byte checked on the GPU:"
  echo
  echo "    $stock_row"
  echo
  echo "Handshake: from decode starting to wait on etcd for the prefill's rank 0 to the remote agent loaded into NIXL (prefill already published)."
  echo "GB/s: bytes / wall time of one NIXL READ request (post to completion), one descriptor per block; median over the repeats."
  echo "Total run time $((SECONDS - start)) s."
} >"$RES"
cat "$RES"
cat "$RES" >>"$LOG"
[ -n "$best_name" ]
